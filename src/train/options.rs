//! What `wgtune train` takes: the run's options and, per method, the
//! adapter's (`MethodOptions`), built once by the command line. Value
//! ranges are checked by the command-line parser; adapter values again,
//! in one place, by `AdapterConfig::validate`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::adapters::init::LoraInit;
use crate::train::checkpoint::RunSettings;
use crate::train::data::DataOptions;
use crate::train::trainer::Schedule;

/// Which adapter to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Prompt,
    Prefix,
    Lora,
}

impl Method {
    /// Default learning rate (see README: picked from runs on the tiny
    /// models and SmolLM2-135M).
    pub fn default_lr(self) -> f64 {
        match self {
            Method::Lora => 2e-3,
            Method::Prompt => 3e-2,
            Method::Prefix => 1e-2,
        }
    }

    /// The `--method` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::Prompt => "prompt",
            Method::Prefix => "prefix",
        }
    }
}

/// How a new prompt-tuning table starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptInitKind {
    /// Embedding rows of `init_text`'s tokens (required).
    Text,
    /// Embedding rows of random token ids.
    Vocab,
    /// N(0, 1) rows.
    Random,
}

/// How a new prefix starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixInitKind {
    /// The frozen model's K/V for `init_text` (default: the first example).
    Text,
    Zero,
    Random,
}

/// LoRA's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraOptions {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names, or `all-linear`; empty: PEFT's default for the model
    /// (`adapters::adapter::default_targets`).
    pub targets: Vec<String>,
    pub rslora: bool,
    pub init: LoraInit,
    /// Adapt only the top N layers (saved as PEFT's `layers_to_transform`);
    /// `None`: every layer.
    pub num_layers: Option<usize>,
}

/// Prompt tuning's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptOptions {
    pub num_virtual_tokens: usize,
    pub init: PromptInitKind,
    pub init_text: Option<String>,
}

/// Prefix tuning's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefixOptions {
    pub num_virtual_tokens: usize,
    /// Reparameterize through an MLP.
    pub projection: bool,
    /// The MLP's hidden size (default: the model's hidden size).
    pub encoder_hidden_size: Option<usize>,
    pub init: PrefixInitKind,
    pub init_text: Option<String>,
}

/// The method and its settings.
#[derive(Clone, Debug, PartialEq)]
pub enum MethodOptions {
    Lora(LoraOptions),
    Prompt(PromptOptions),
    Prefix(PrefixOptions),
}

impl MethodOptions {
    pub fn method(&self) -> Method {
        match self {
            MethodOptions::Lora(_) => Method::Lora,
            MethodOptions::Prompt(_) => Method::Prompt,
            MethodOptions::Prefix(_) => Method::Prefix,
        }
    }

    /// Virtual tokens a new adapter takes from the position budget (0 for LoRA).
    pub fn num_virtual_tokens(&self) -> usize {
        match self {
            MethodOptions::Lora(_) => 0,
            MethodOptions::Prompt(p) => p.num_virtual_tokens,
            MethodOptions::Prefix(p) => p.num_virtual_tokens,
        }
    }
}

/// Everything `wgtune train` takes.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub method: MethodOptions,
    pub model: PathBuf,
    /// Precision of the frozen weights on the GPU.
    pub weights: crate::model::compact::WeightsMode,
    pub data: PathBuf,
    pub val_data: Option<PathBuf>,
    pub out: PathBuf,
    pub data_opts: DataOptions,
    pub epochs: usize,
    pub steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// None: the method's default.
    pub lr: Option<f64>,
    pub weight_decay: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub log_every: usize,
    pub eval_every: usize,
    pub save_every: usize,
    /// Keep only the newest K `checkpoint-N` folders (and the best step's
    /// under `keep_best`); None keeps all.
    pub save_total_limit: Option<usize>,
    /// Keep the adapter of the lowest validation loss in `<out>/best`.
    pub keep_best: bool,
    /// Stop after this many evaluations without a lower validation loss.
    pub early_stopping_patience: Option<usize>,
    pub init_adapter: Option<PathBuf>,
    pub resume: bool,
    /// Start again in a non-empty `out`, removing what an earlier run wrote.
    pub overwrite: bool,
    /// What `out/train_args.json` records of this run (written when the
    /// run touches `out`); None writes none.
    pub record: Option<serde_json::Value>,
    /// Stop with an error after this many skipped (non-finite) steps in a row.
    pub max_bad_steps: usize,
    /// Recompute each layer's activations in backward instead of keeping them.
    pub grad_checkpoint: bool,
    /// Pack short rows into full sequences, attention kept inside each row
    /// (see `train::packing`).
    pub packing: bool,
    /// The options the user gave (clap ids, i.e. field names): on a resume
    /// or with an initial adapter, only these can contradict it.
    pub explicit: BTreeSet<String>,
}

impl TrainOptions {
    /// Whether the user gave option `id` (clap's id: the field name).
    pub fn given(&self, id: &str) -> bool {
        self.explicit.contains(id)
    }

    /// The learning rate: given, else the method's default.
    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or(self.method.method().default_lr())
    }

    /// What a checkpoint records of this run.
    pub fn settings(&self, model_fingerprint: u64, lr: f64) -> RunSettings {
        RunSettings {
            model: self.model.display().to_string(),
            model_fingerprint: format!("{model_fingerprint:016x}"),
            lr,
            weight_decay: self.weight_decay,
            lr_schedule: schedule_name(self.schedule).into(),
            warmup_steps: self.warmup_steps,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            max_seq_len: self.data_opts.max_seq_len,
            train_on_prompt: self.data_opts.train_on_prompt,
            chat_template: self.data_opts.chat_template.name().into(),
        }
    }
}

/// The `--lr-schedule` spelling, as checkpoints record it.
pub fn schedule_name(s: Schedule) -> &'static str {
    match s {
        Schedule::Constant => "constant",
        Schedule::Linear => "linear",
        Schedule::Cosine => "cosine",
    }
}
