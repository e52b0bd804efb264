//! Wrappers for `shaders/attention.wgsl` (being written).
