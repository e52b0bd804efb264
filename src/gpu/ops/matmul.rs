//! Wrappers for `shaders/matmul.wgsl` (being written).
pub fn all_variant_sources() -> Vec<(String, String)> { Vec::new() }
