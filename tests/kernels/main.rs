//! Tier 1: every GPU kernel against its f64 CPU twin at odd shapes
//! (never multiples of a tile), printing the max diff.

#[path = "../common/mod.rs"]
#[macro_use]
mod common;

mod activation;
mod adamw;
mod attention;
mod compact;
mod copy;
mod determinism;
mod embedding;
mod lora;
mod loss;
mod matmul;
mod memory;
mod norm;
mod pipeline_cache;
mod rope;
