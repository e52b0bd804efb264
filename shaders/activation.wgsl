// activation.wgsl: (being written)
