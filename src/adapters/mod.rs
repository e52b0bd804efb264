//! Adapters: the trainable extras wgtune adds to a frozen base model
//! (LoRA, prompt tuning, prefix tuning), and their on-disk format, which is
//! Hugging Face PEFT's (`peft_io`).

pub mod adapter;
pub mod init;
pub mod peft_io;

pub use adapter::{Adapter, Flat, HostTensors};
