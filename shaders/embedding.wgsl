// embedding.wgsl: (being written)
