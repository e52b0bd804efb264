//! CPU twins of `shaders/loss.wgsl` (being written).
