// attention.wgsl: (being written)
