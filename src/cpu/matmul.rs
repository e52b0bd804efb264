//! CPU twins of `shaders/matmul.wgsl` (being written).
