//! Wrappers for `shaders/rope.wgsl` (being written).
