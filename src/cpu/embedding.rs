//! CPU twins of `shaders/embedding.wgsl` (being written).
