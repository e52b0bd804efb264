//! Wrappers for `shaders/loss.wgsl` (being written).
