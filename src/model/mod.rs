//! Models: Hugging Face checkpoints loaded onto the GPU, their forward and
//! backward schedule, and generation.
//!
//! - `config`: config.json to `ModelConfig` (llama, mistral, qwen2, gpt2).
//! - `weights`: safetensors tensors by name, from bytes or memory-mapped files.
//! - `names`: the checkpoint's tensor names and shapes, one table per family.
//! - `layers`: the frozen `Linear`, `Norm` and `Block` on the GPU, and their loading.
//! - `buffers`: activations (`Acts`), activation gradients (`Grads`), the LM
//!   head's chunked logits (`HeadBufs`), `KvCache`.
//! - `kv`: the K/V rows attention reads (prefix or cache in front), PEFT's prefix layout.
//! - `transformer`: `Model`, adapter `Hooks`, the forward/backward schedule.
//! - `generate`: sampling with a KV cache.
//! - `tokenizer`: a model folder's tokenizer, resolved as transformers does it.
//! - `gguf`: reading GGUF files (metadata, tensors, dequantization).
//! - `gguf_tokenizer`: a tokenizer.json built from GGUF metadata.
//! - `import`: GGUF to a Hugging Face folder (config, safetensors, tokenizer).
//! - `hub`: what `--model` names (folder, GGUF file, Hub repo id) to a folder.

pub mod buffers;
pub mod compact;
pub mod config;
pub mod generate;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod gguf_write;
pub mod hub;
pub mod import;
pub mod kv;
pub mod layers;
pub mod names;
pub mod packing;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use transformer::{Acts, Cached, FwdShape, Hooks, KvCache, Model, NoHooks};
pub use weights::Weights;
