//! Models: configuration and weights of Hugging Face checkpoints.
//! (The forward schedules for llama and gpt2 build on these.)

pub mod config;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use weights::Weights;
