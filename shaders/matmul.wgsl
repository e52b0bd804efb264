// matmul.wgsl: (being written)
