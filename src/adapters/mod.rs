//! Adapters: the trainable extras wgtune adds to a frozen base model, and
//! their on-disk format, which is Hugging Face PEFT's.
//!
//! - `adapter`: an adapter on the GPU (LoRA sites, prompt/prefix tables) and
//!   the hooks the forward and backward passes call.
//! - `init`: fresh adapters, initialized as PEFT does.
//! - `peft_config`: `adapter_config.json` and its one set of value rules.
//! - `peft_io`: adapter folders (tensor names, save, load).
//! - `gguf_lora`: a LoRA adapter as llama.cpp's GGUF LoRA.
//! - `merge`: a LoRA adapter folded into its base (Hugging Face folder or GGUF).
//! - `modelfile`: an Ollama Modelfile for an exported adapter or merged model.

pub mod adapter;
pub mod gguf_lora;
pub mod init;
pub mod merge;
pub mod modelfile;
pub mod peft_config;
pub mod peft_io;

pub use adapter::{Adapter, Flat, HostTensors};
