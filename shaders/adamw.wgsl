// adamw.wgsl: (being written)
