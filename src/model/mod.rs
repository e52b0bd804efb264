//! Models: configuration and weights of Hugging Face checkpoints.
//! (The forward schedules for llama and gpt2 build on these.)

pub mod config;
pub mod generate;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod hub;
pub mod import;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use transformer::{Acts, FwdShape, Hooks, KvCache, Model, NoHooks};
pub use weights::Weights;
