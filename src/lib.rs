//! wgtune: adapter fine-tuning (prompt tuning, prefix tuning, LoRA) of small
//! language models on any GPU through wgpu, with hand-written WGSL kernels and
//! a hand-scheduled forward and backward pass.
//!
//! Layers, bottom up: `error`, `cpu` (f64 reference twins of every kernel),
//! `gpu` (context, tensors, kernels, plans, op wrappers), `model` (config and
//! weights of Hugging Face checkpoints), `cli`.

pub mod adapters;
pub mod bench;
pub mod cli;
pub mod cpu;
pub mod error;
pub mod fsio;
pub mod gpu;
pub mod model;
pub mod rng;
pub mod train;

pub use error::{Error, Result};
