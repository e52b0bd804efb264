//! CPU twins of `shaders/adamw.wgsl` (being written).
