//! Wrappers for `shaders/lora.wgsl` (being written).
