//! CPU twins of `shaders/activation.wgsl` (being written).
