// loss.wgsl: (being written)
