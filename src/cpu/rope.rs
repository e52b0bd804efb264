//! CPU twins of `shaders/rope.wgsl` (being written).
