//! wgtune: adapter fine-tuning (prompt tuning, prefix tuning, LoRA) of small
//! language models on any GPU through wgpu, with hand-written WGSL kernels and
//! a hand-scheduled forward and backward pass.
//!
//! Modules, bottom up:
//! - `error`: the library's error type (every message names its file or option).
//! - `clock`: time, from one place (stopwatch, wall clock).
//! - `rng`: the seeded random numbers of inits, shuffles and dropout.
//! - `fsio`: atomic file writes, safetensors bytes, test pause points.
//! - `cpu`: f64 reference twins of every GPU kernel.
//! - `gpu`: context, tensors, kernels, plans and op wrappers.
//! - `model`: Hugging Face configs, weights, tokenizer, GGUF import, generation.
//! - `adapters`: LoRA, prompt and prefix adapters and their PEFT format.
//! - `train`: options, data, the step loop, checkpoints, reports.
//! - `bench`: `wgtune bench` (kernel and training throughput).
//! - `cli`: the command line (clap, progress bar, signals), which `main` calls.

pub mod adapters;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod cpu;
pub mod error;
pub mod fsio;
pub mod gpu;
pub mod hash;
pub mod model;
pub mod rng;
pub mod train;

pub use error::{Error, Result};
