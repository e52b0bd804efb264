//! CPU twins of `shaders/attention.wgsl` (being written).
