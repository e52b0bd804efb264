// rope.wgsl: (being written)
