//! Tier 0: every `cpu::*_backward` against central finite differences in f64,
//! with the fake loss L = sum(out * dout) for a random dout.

#[path = "../common/mod.rs"]
#[macro_use]
mod common;

mod activation;
mod attention;
mod embedding;
mod lora;
mod loss;
mod matmul;
mod norm;
mod rope;
