//! The library's one error type. Every variant carries the tensor, kernel,
//! file or limit it is about, so a message is actionable without a backtrace.

use std::path::PathBuf;

/// Errors of the wgtune library. `main` prints them with `{:#}`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No wgpu adapter matched the request (or none exists at all).
    #[error("no GPU adapter found{0}\n---> HINT: on Linux without a GPU install Mesa's software Vulkan driver: apt-get install -y mesa-vulkan-drivers libvulkan1")]
    NoAdapter(String),
    /// `request_device` failed.
    #[error("could not open the GPU device on adapter `{adapter}`: {message}")]
    RequestDevice { adapter: String, message: String },
    /// A WGSL module or pipeline failed to build.
    #[error("kernel `{kernel}` failed to build: {message}")]
    Shader { kernel: String, message: String },
    /// wgpu reported a validation, out-of-memory or device-lost error.
    #[error("GPU error{}: {message}", context.as_ref().map(|c| format!(" in {c}")).unwrap_or_default())]
    Gpu {
        context: Option<String>,
        message: String,
    },
    /// A tensor does not have the shape an op needs.
    #[error("{op}: tensor `{tensor}` has shape {got:?}, expected {expected}")]
    Shape {
        op: String,
        tensor: String,
        expected: String,
        got: Vec<usize>,
    },
    /// A tensor (or chunk of one) is larger than a device limit allows.
    #[error("{what}: needs {need} bytes but the device allows {have}\n---> HINT: this op cannot split the tensor further; use a smaller batch or sequence length")]
    Limits { what: String, need: u64, have: u64 },
    /// An argument is outside the range an op accepts.
    #[error("{op}: {message}")]
    Invalid { op: String, message: String },
    /// `config.json` is missing a field, malformed, or describes an
    /// unsupported model.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// A weights file or index is malformed, truncated or of an unsupported dtype.
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    /// A tensor the model needs is not in its weights.
    #[error("tensor `{name}` not found in {file}")]
    MissingTensor { name: String, file: String },
    /// A tokenizer file is missing or malformed, or encoding, decoding or
    /// rendering the chat template failed.
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// A data set (JSONL) row is malformed, or the file has no usable rows.
    /// `line` is 1-based.
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Data {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    /// An adapter folder (PEFT `adapter_config.json` +
    /// `adapter_model.safetensors`) is missing a file, malformed, of an
    /// unsupported PEFT type, or disagrees with itself.
    #[error("{path}: {message}")]
    Adapter { path: PathBuf, message: String },
    /// `--model` names nothing wgtune can load: no such folder or file, a
    /// Hugging Face repo id that is not in the cache and cannot be downloaded.
    #[error("model `{model}`: {message}")]
    Model { model: String, message: String },
    /// A training checkpoint is missing, torn, corrupt, of another format,
    /// or contradicts the options of the run that resumes it.
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// A file operation failed; `action` says what wgtune was doing.
    #[error("{action} {path}: {source}")]
    IoWhile {
        action: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Training diverged: too many steps in a row had a non-finite loss or
    /// gradient. Nothing non-finite was saved.
    #[error("{0}")]
    Diverged(String),
    /// The memory plan of a run does not fit the device (the message holds
    /// the plan and what would fit). Nothing was allocated.
    #[error("{0}")]
    OutOfMemory(String),
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Shorthand used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(op: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            op: op.into(),
            message: message.into(),
        }
    }
}
