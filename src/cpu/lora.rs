//! CPU twins of `shaders/lora.wgsl` (being written).
