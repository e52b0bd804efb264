//! Wrappers for `shaders/activation.wgsl` (being written).
