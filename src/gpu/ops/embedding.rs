//! Wrappers for `shaders/embedding.wgsl` (being written).
