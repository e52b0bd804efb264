//! CPU reference twins of every GPU kernel, in f64.
//!
//! Each function has the name and argument order of its WGSL entry point
//! (outputs, then inputs, then dims). Backward functions accumulate (`+=`).
//! They are checked against finite differences, and the GPU is checked
//! against them.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod copy;
pub mod embedding;
pub mod lora;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod rope;
