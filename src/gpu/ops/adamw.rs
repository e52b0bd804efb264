//! Wrappers for `shaders/adamw.wgsl` (being written).
