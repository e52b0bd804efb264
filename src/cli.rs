//! Command line: clap definitions, parsing, and the `run` entry that `main`
//! calls. Results go to stdout; progress (the bar) and diagnostics (`log`)
//! to stderr. The commands themselves are in `cli/commands.rs` and
//! `cli/training.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::error::Result;
use crate::gpu::context::ContextOptions;
use crate::model::compact::WeightsMode;
use crate::model::generate::GenOptions;
use crate::train::data::{ChatTemplateMode, DataOptions};
use crate::train::template::PromptTemplate;

mod chat;
mod commands;
mod config_file;
mod data_cmd;
pub mod record;
mod training;

use commands::{devices, eval, export, generate, import, plan};
use data_cmd::data;
use training::train;

/// Fine-tune small language models with prompt tuning, prefix tuning or LoRA on any GPU.
#[derive(Parser, Debug)]
#[command(name = "wgtune", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Device selection shared by every subcommand.
#[derive(Args, Debug, Clone, Default)]
pub struct DeviceArgs {
    /// GPU backend: vulkan, metal, dx12 or gl (default: all)
    #[arg(long, env = "WGPU_BACKEND")]
    pub backend: Option<String>,
    /// Use the GPU whose adapter name contains this text
    #[arg(long, env = "WGPU_ADAPTER_NAME")]
    pub gpu: Option<String>,
}

/// `--weights`, shared by the commands that load a model.
#[derive(Args, Debug, Clone, Default)]
pub struct WeightsArgs {
    /// Frozen weights on the GPU: stored (as in the file: f32, f16, bf16 or
    /// the GGUF block format), f16, bf16 or f32 (exact, 4 bytes per weight)
    #[arg(long, default_value = "stored")]
    pub weights: WeightsMode,
}

impl DeviceArgs {
    pub fn options(&self) -> ContextOptions {
        ContextOptions {
            backend: self.backend.clone(),
            adapter: self.gpu.clone(),
            pipeline_cache_dir: pipeline_cache_dir(),
            ..Default::default()
        }
    }
}

/// `pipelines/` in wgtune's cache folder, where compiled pipelines are kept
/// between runs; `WGTUNE_PIPELINE_CACHE=0` turns it off (cold compiles).
pub fn pipeline_cache_dir() -> Option<PathBuf> {
    if std::env::var("WGTUNE_PIPELINE_CACHE").is_ok_and(|v| v == "0") {
        return None;
    }
    Some(crate::model::import::wgtune_cache_dir().join("pipelines"))
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a prompt-tuning, prefix-tuning or LoRA adapter (also: `wgtune --method ...`)
    // A later flag overrides an earlier one: the config file's options come
    // first, so the command line wins.
    #[command(args_override_self = true)]
    Train(Box<TrainArgs>),
    /// Generate text, streaming tokens, optionally with an adapter
    Generate(GenerateArgs),
    /// Chat with a model (and adapter) turn by turn; the KV cache is kept across turns
    Chat(ChatArgs),
    /// Mean per-token cross-entropy and perplexity over a JSONL data set
    Eval(EvalArgs),
    /// List every GPU adapter with its backend, type, driver and key limits
    Devices(DeviceArgs),
    /// Convert a GGUF model (llama.cpp, Ollama, LM Studio) into a Hugging Face folder
    Import(ImportArgs),
    /// Print the memory plan of a training run without training or loading weights
    Plan(PlanArgs),
    /// Write a LoRA adapter in another format: llama.cpp's GGUF LoRA (for llama.cpp, Ollama, LM Studio)
    Export(ExportArgs),
    /// Show what training will see of a data set: rows per kind, token lengths, an example
    Data(DataCmdArgs),
    /// Print a shell completion script to stdout (e.g. `wgtune completions bash > /etc/bash_completion.d/wgtune`)
    Completions {
        /// bash, zsh, fish, elvish or powershell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Benchmarks
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

/// `wgtune import model.gguf --out DIR`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The .gguf file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K tensors)
    pub gguf: PathBuf,
    /// Folder to write: config.json, model.safetensors (narrowest exact dtype), tokenizer files
    #[arg(long)]
    pub out: PathBuf,
}

/// `wgtune export --adapter DIR --out FILE.gguf` (llama.cpp's GGUF LoRA), or
/// `--merge --out DIR` / `--merge --format gguf --out FILE.gguf` (the
/// adapter folded into its base).
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), wgtune's or not
    #[arg(long)]
    pub adapter: PathBuf,
    /// gguf-lora (default without --merge): llama.cpp's adapter format, next to the GGUF base; with --merge: hf (default, a Hugging Face folder) or gguf (needs a GGUF base)
    #[arg(long, value_enum)]
    pub format: Option<ExportFormat>,
    /// Fold W + (alpha/r)·B·A into the base and write the whole model
    #[arg(long)]
    pub merge: bool,
    /// The file (or, for --merge --format hf, the folder) to write; never one of the inputs
    #[arg(long)]
    pub out: PathBuf,
    /// The base model (folder, .gguf or ORG/NAME); default: the adapter's base_model_name_or_path
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// GGUF tensor type: f32, f16 or q8_0 (rows that are not whole 32-value blocks stay f16); default f32 for gguf-lora, f16 for a merged gguf
    #[arg(long, value_enum)]
    pub dtype: Option<ExportDtype>,
    /// Write no Ollama Modelfile next to a GGUF output
    #[arg(long)]
    pub no_modelfile: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    #[value(name = "gguf-lora")]
    GgufLora,
    Hf,
    Gguf,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainExport {
    #[value(name = "gguf-lora")]
    GgufLora,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    F16,
    #[value(name = "q8_0")]
    Q8_0,
}

/// `wgtune plan --model M`: the memory plan `train` prints, from config.json
/// (or a GGUF's header) alone.
#[derive(Args, Debug)]
pub struct PlanArgs {
    /// Model: a folder (config.json alone is enough), a .gguf file (its header), or ORG/NAME
    #[arg(long)]
    pub model: PathBuf,
    /// prompt, prefix or lora
    #[arg(long, value_enum, default_value_t = MethodArg::Lora)]
    pub method: MethodArg,
    #[arg(long, default_value_t = 4, value_parser = positive)]
    pub batch_size: usize,
    /// Tokens per row, every one a target (the largest logits workspace)
    #[arg(long, default_value_t = 512, value_parser = two_or_more)]
    pub seq_len: usize,
    /// Micro-batches per optimizer step (kept in the suggestions)
    #[arg(long, default_value_t = 1, value_parser = positive)]
    pub grad_accum: usize,
    /// Virtual tokens (prompt and prefix tuning)
    #[arg(long, default_value_t = 20, value_parser = positive)]
    pub num_virtual_tokens: usize,
    /// Prefix tuning: reparameterize through an MLP
    #[arg(long)]
    pub prefix_projection: bool,
    /// Hidden size of the prefix MLP (default: the model's hidden size)
    #[arg(long, value_parser = positive)]
    pub encoder_hidden_size: Option<usize>,
    #[arg(long, default_value_t = 8, value_parser = positive)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 0.0, value_parser = dropout)]
    pub lora_dropout: f64,
    /// Comma-separated module names, or all-linear (default: PEFT's for the
    /// model: c_attn for gpt2, q_proj,v_proj for llama, mistral, qwen2, qwen3, gemma3)
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// LoRA: adapt only the top N layers
    #[arg(long, value_parser = positive)]
    pub num_layers: Option<usize>,
    /// Recompute each layer's activations in backward instead of keeping them
    #[arg(long)]
    pub grad_checkpoint: bool,
    #[command(flatten)]
    pub weights: WeightsArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// GFLOP/s of the matmul layouts and attention timings
    Kernels {
        #[command(flatten)]
        device: DeviceArgs,
        /// Timed iterations per case (the median is reported)
        #[arg(long, default_value_t = 5, value_parser = positive)]
        iters: usize,
    },
    /// Tokens/s and GFLOP/s of full training steps per method
    Train {
        #[command(flatten)]
        device: DeviceArgs,
        /// Model: a folder, a .gguf or ORG/NAME (or --config for random weights of that shape)
        #[arg(long)]
        model: Option<PathBuf>,
        /// config.json to benchmark with random weights
        #[arg(long)]
        config: Option<PathBuf>,
        /// Comma list of lora, lora-all, prompt, prefix, prefix-proj
        #[arg(long, default_value = "lora,prompt,prefix")]
        methods: String,
        #[arg(long, default_value_t = 4, value_parser = positive)]
        batch_size: usize,
        #[arg(long, default_value_t = 128, value_parser = two_or_more)]
        seq_len: usize,
        /// Timed steps per method (after one warm-up step)
        #[arg(long, default_value_t = 3, value_parser = positive)]
        steps: usize,
        #[command(flatten)]
        weights: WeightsArgs,
        /// Also time each method with gradient checkpointing (a second row)
        #[arg(long)]
        grad_checkpoint: bool,
        /// LoRA methods adapt only the top N layers
        #[arg(long, value_parser = positive)]
        num_layers: Option<usize>,
    },
    /// Prefill and decode tokens/s of greedy generation (no adapter)
    Generate {
        #[command(flatten)]
        device: DeviceArgs,
        /// Model: a folder, a .gguf or ORG/NAME
        #[arg(long)]
        model: PathBuf,
        /// Random prompt tokens
        #[arg(long, default_value_t = 40, value_parser = positive)]
        prompt_tokens: usize,
        /// New tokens per run (no stop token)
        #[arg(long, default_value_t = 64, value_parser = positive)]
        new_tokens: usize,
        /// Runs on one session (the first builds the pipelines)
        #[arg(long, default_value_t = 3, value_parser = positive)]
        runs: usize,
        #[command(flatten)]
        weights: WeightsArgs,
    },
}

/// Adapter method.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodArg {
    Prompt,
    Prefix,
    Lora,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleArg {
    Constant,
    Linear,
    Cosine,
}

/// `--lora-init`: how LoRA's A starts.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInitArg {
    /// PEFT's default (Kaiming-uniform)
    #[value(alias = "default")]
    Kaiming,
    Gaussian,
}

/// `--prompt-init`: how the virtual tokens start.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptInitArg {
    Text,
    Vocab,
    Random,
}

/// `--prefix-init`: how the prefix starts.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixInitArg {
    Text,
    Zero,
    Random,
}

/// Data-set options shared by train and eval.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Prompt template applied to every prompt: text or a file, with
    /// {prompt}, {instruction}, {input} placeholders
    #[arg(long)]
    pub template: Option<String>,
    /// Train on prompt tokens too (no loss masking)
    #[arg(long)]
    pub train_on_prompt: bool,
    /// Truncate rows to this many tokens (default: what the model allows)
    #[arg(long, visible_aliases = ["max-seq-length", "cutoff-len"], value_parser = two_or_more)]
    pub max_seq_len: Option<usize>,
    /// Render prompt/completion and alpaca rows with the model's chat
    /// template (auto: when it has one; on: error if it has none; off: raw text)
    #[arg(long, value_enum, default_value_t = ChatTemplateArg::Auto)]
    pub chat_template: ChatTemplateArg,
}

/// `--chat-template`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatTemplateArg {
    Auto,
    On,
    Off,
}

impl DataArgs {
    fn options(&self) -> Result<DataOptions> {
        Ok(DataOptions {
            template: self
                .template
                .as_deref()
                .map(PromptTemplate::parse)
                .transpose()?,
            train_on_prompt: self.train_on_prompt,
            max_seq_len: self.max_seq_len,
            chat_template: match self.chat_template {
                ChatTemplateArg::Auto => ChatTemplateMode::Auto,
                ChatTemplateArg::On => ChatTemplateMode::On,
                ChatTemplateArg::Off => ChatTemplateMode::Off,
            },
        })
    }
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Read options from a TOML file: keys are the long option names (or
    /// their aliases, `_` or `-`), e.g. `lr = 2e-3`, `lora_r = 8`,
    /// `rslora = true`; options on the command line override it. Relative
    /// paths in it are relative to the current folder, as on the command line
    #[arg(short = 'c', long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// prompt, prefix or lora
    #[arg(long, value_enum)]
    pub method: MethodArg,
    /// Model: a Hugging Face folder, a .gguf file, or a repo id ORG/NAME
    #[arg(long)]
    pub model: PathBuf,
    /// Training data: a JSONL file or a JSON array of {"text"}, {"prompt","completion"},
    /// {"messages"}, ShareGPT {"conversations"} or alpaca rows; or a folder with
    /// train.jsonl (and valid.jsonl for validation, test.jsonl for eval; or .json)
    #[arg(long)]
    pub data: PathBuf,
    /// Validation data (same format), evaluated every --eval-every steps and at the end
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Output folder: the PEFT adapter, checkpoint-N/, best/, metrics.jsonl,
    /// loss.svg, train_args.json; if it holds files, give --resume or --overwrite
    #[arg(long, visible_aliases = ["adapter-path", "output-dir"], default_value = "wgtune-out")]
    pub out: PathBuf,
    #[command(flatten)]
    pub weights: WeightsArgs,
    #[command(flatten)]
    pub data_args: DataArgs,
    /// Passes over the data (ignored when --steps is given)
    #[arg(long, visible_alias = "num-train-epochs", default_value_t = 3, value_parser = positive)]
    pub epochs: usize,
    /// Optimizer steps (overrides --epochs)
    #[arg(long, visible_alias = "iters", value_parser = positive)]
    pub steps: Option<usize>,
    #[arg(long, visible_alias = "per-device-train-batch-size", default_value_t = 4, value_parser = positive)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step
    #[arg(long, visible_alias = "gradient-accumulation-steps", default_value_t = 1, value_parser = positive)]
    pub grad_accum: usize,
    /// Learning rate (default per method: lora 2e-3, prompt 3e-2, prefix 1e-2)
    #[arg(long, visible_alias = "learning-rate", value_parser = positive_f64)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_f64)]
    pub weight_decay: f64,
    #[arg(long, value_enum, default_value_t = ScheduleArg::Cosine)]
    pub lr_schedule: ScheduleArg,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Clip the global gradient norm (0 disables)
    #[arg(long, default_value_t = 1.0, value_parser = non_negative_f64)]
    pub max_grad_norm: f64,
    /// Stop with an error after this many steps in a row were skipped for a
    /// non-finite loss or gradient (a diverged run)
    #[arg(long, default_value_t = 5, value_parser = positive)]
    pub max_bad_steps: usize,
    /// Pack short rows into sequences of up to --max-seq-len tokens (default:
    /// the longest row); each row attends only to itself, at its own
    /// positions, so fewer steps and less padding for the same loss. LoRA
    /// and prefix tuning only
    #[arg(long)]
    pub packing: bool,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Read back the loss every N steps
    #[arg(long, default_value_t = 1, value_parser = positive)]
    pub log_every: usize,
    /// Validation every N steps (0: only at the end)
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Checkpoint every N steps (0: only at the end and on Ctrl-C)
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Keep only the newest K checkpoint-N folders (plus the best step's with --keep-best)
    #[arg(long, value_parser = positive)]
    pub save_total_limit: Option<usize>,
    /// Keep the adapter with the lowest validation loss in OUT/best (needs --val-data)
    #[arg(long)]
    pub keep_best: bool,
    /// Stop after K evaluations without a lower validation loss (needs --val-data and --eval-every)
    #[arg(long, value_parser = positive)]
    pub early_stopping_patience: Option<usize>,
    /// Start from an existing PEFT adapter folder
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Continue from the newest OUT/checkpoint-N (or a legacy OUT/checkpoint);
    /// options not given are taken from OUT/train_args.json (--steps, --epochs,
    /// --log-every, --eval-every, --save-every, --save-total-limit,
    /// --early-stopping-patience, --max-bad-steps, --val-data, --export and
    /// the device and progress options may change; the others must match)
    #[arg(long)]
    pub resume: bool,
    /// Start a new run in a non-empty --out: first remove what an earlier
    /// run wrote there (adapter, checkpoints, metrics, plot, train_args.json);
    /// other files are kept
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Virtual tokens (prompt and prefix tuning)
    #[arg(long, default_value_t = 20, value_parser = positive)]
    pub num_virtual_tokens: usize,
    /// Prompt tuning init: text, vocab or random
    #[arg(long, value_enum, default_value_t = PromptInitArg::Vocab)]
    pub prompt_init: PromptInitArg,
    #[arg(long)]
    pub prompt_init_text: Option<String>,
    /// Prefix tuning: reparameterize through an MLP
    #[arg(long)]
    pub prefix_projection: bool,
    /// Hidden size of the prefix MLP (default: the model's hidden size)
    #[arg(long, value_parser = positive)]
    pub encoder_hidden_size: Option<usize>,
    /// Prefix init: text (the frozen model's K/V for --prefix-init-text, default the first example), zero or random
    #[arg(long, value_enum, default_value_t = PrefixInitArg::Text)]
    pub prefix_init: PrefixInitArg,
    #[arg(long)]
    pub prefix_init_text: Option<String>,
    #[arg(long, visible_alias = "lora-rank", default_value_t = 8, value_parser = positive)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0, value_parser = positive_f64)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.0, value_parser = dropout)]
    pub lora_dropout: f64,
    /// Comma-separated module names, or all-linear (default: PEFT's for the
    /// model: c_attn for gpt2, q_proj,v_proj for llama, mistral, qwen2, qwen3, gemma3)
    #[arg(long, visible_alias = "lora-target")]
    pub lora_targets: Option<String>,
    /// Scale by alpha/sqrt(r) instead of alpha/r
    #[arg(long)]
    pub rslora: bool,
    /// LoRA A init: kaiming (PEFT's default; also: default) or gaussian
    #[arg(long, value_enum, default_value_t = LoraInitArg::Kaiming)]
    pub lora_init: LoraInitArg,
    /// LoRA: adapt only the top N layers (saved as PEFT's layers_to_transform); backward stops below them
    #[arg(long, value_parser = positive)]
    pub num_layers: Option<usize>,
    /// Recompute each layer's activations in backward instead of keeping them: less memory, one more forward per step
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// No progress bar: one plain line per logged step on stderr (also when stderr is not a terminal)
    #[arg(long)]
    pub no_progress: bool,
    /// After training, also write the adapter as llama.cpp's GGUF LoRA (OUT/adapter.gguf) with an Ollama Modelfile beside it
    #[arg(long, value_enum)]
    pub export: Option<TrainExport>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The options given on the command line or in the config file (set by [`parse`]).
    #[arg(skip)]
    pub explicit: BTreeSet<String>,
    /// Every option's value as text (clap id to value; set by [`parse`]):
    /// what train_args.json records.
    #[arg(skip)]
    pub resolved: BTreeMap<String, String>,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model: a Hugging Face folder, a .gguf file, or a repo id ORG/NAME
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder (LoRA, prompt or prefix tuning)
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The prompt; `-` reads it from stdin (trailing newlines removed)
    #[arg(long)]
    pub prompt: String,
    /// Require the model's chat template (an error when it has none); it is
    /// already the default when the model has one
    #[arg(long, conflicts_with = "raw")]
    pub chat: bool,
    /// Tokenize the prompt as it is, without the model's chat template
    #[arg(long)]
    pub raw: bool,
    /// System message (chat template only)
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128, value_parser = positive)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub template: TemplateArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print the rendered prompt and its token ids to stderr
    #[arg(long)]
    pub show_prompt: bool,
    #[command(flatten)]
    pub weights: WeightsArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `wgtune chat --model M [--adapter A]`: lines from stdin, answers to stdout.
#[derive(Args, Debug)]
pub struct ChatArgs {
    /// Model with a chat template: a Hugging Face folder, a .gguf file, or a repo id ORG/NAME
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder (LoRA, prompt or prefix tuning)
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// System message at the start of the conversation (kept by /reset)
    #[arg(long)]
    pub system: Option<String>,
    /// New tokens per answer at most
    #[arg(long, default_value_t = 512, value_parser = positive)]
    pub max_new_tokens: usize,
    /// Positions the conversation may fill (default: the model's, at most 4096)
    #[arg(long, value_parser = two_or_more)]
    pub max_context: Option<usize>,
    #[command(flatten)]
    pub template: TemplateArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print each turn's rendered prompt and its token ids to stderr
    #[arg(long)]
    pub show_prompt: bool,
    #[command(flatten)]
    pub weights: WeightsArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `--template`/`--no-template` of `generate` and `chat`.
#[derive(Args, Debug, Clone, Default)]
pub struct TemplateArgs {
    /// Prompt template applied to the prompt: text or a file, with a
    /// {prompt} placeholder (default: the adapter's prompt_template.txt)
    #[arg(long)]
    pub template: Option<String>,
    /// Apply no prompt template, not even the adapter's
    #[arg(long, conflicts_with = "template")]
    pub no_template: bool,
}

/// Sampling options of `generate` and `chat`, applied in transformers'
/// order: repetition penalty, temperature, top-k, top-p, min-p.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// 0 = greedy
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_f32)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0, value_parser = top_p)]
    pub top_p: f32,
    /// Sample from the k most likely tokens only (0: all)
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Drop tokens less likely than this fraction of the most likely one (0: off)
    #[arg(long, default_value_t = 0.0, value_parser = unit_f32)]
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of tokens already in
    /// the prompt or output by this, as transformers does; also when greedy (1: off)
    #[arg(long, default_value_t = 1.0, value_parser = positive_f32)]
    pub repetition_penalty: f32,
    /// Stop when the output reaches this text, which is not printed (repeatable)
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The generation options; `eos` ids end generation.
    pub fn options(&self, max_new_tokens: usize, eos: &[u32]) -> GenOptions {
        GenOptions {
            max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            stop: eos.to_vec(),
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
        }
    }
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model: a Hugging Face folder, a .gguf file, or a repo id ORG/NAME
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// A data file, or a folder: its test.jsonl (else valid.jsonl)
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    pub data_args: DataArgs,
    /// Apply no prompt template, not even the adapter's prompt_template.txt
    #[arg(long, conflicts_with = "template")]
    pub no_template: bool,
    /// Raw text for prompt/completion and alpaca rows (--chat-template off)
    #[arg(long, conflicts_with = "chat_template")]
    pub raw: bool,
    #[arg(long, default_value_t = 4, value_parser = positive)]
    pub batch_size: usize,
    #[command(flatten)]
    pub weights: WeightsArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `wgtune data --model M --data D`: what training will see, from the
/// tokenizer alone.
#[derive(Args, Debug)]
pub struct DataCmdArgs {
    /// Model (its tokenizer and config.json): a folder, a .gguf file, or ORG/NAME
    #[arg(long)]
    pub model: PathBuf,
    /// A data file, or a folder (each of train, valid and test it holds)
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    pub data_args: DataArgs,
    /// Which kept example to show rendered (1 = the first)
    #[arg(long, default_value_t = 1, value_parser = positive)]
    pub show: usize,
}

// Value parsers: a bad number is a clear error before anything runs.

fn at_least(s: &str, min: usize) -> std::result::Result<usize, String> {
    let v: usize = s.parse().map_err(|e| format!("{e}"))?;
    if v < min {
        return Err(format!("must be at least {min}"));
    }
    Ok(v)
}

fn positive(s: &str) -> std::result::Result<usize, String> {
    at_least(s, 1)
}

fn two_or_more(s: &str) -> std::result::Result<usize, String> {
    at_least(s, 2)
}

fn finite(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !v.is_finite() {
        return Err("must be a finite number".into());
    }
    Ok(v)
}

fn positive_f64(s: &str) -> std::result::Result<f64, String> {
    let v = finite(s)?;
    if v <= 0.0 {
        return Err("must be greater than 0".into());
    }
    Ok(v)
}

fn non_negative_f64(s: &str) -> std::result::Result<f64, String> {
    let v = finite(s)?;
    if v < 0.0 {
        return Err("must be 0 or more".into());
    }
    Ok(v)
}

fn dropout(s: &str) -> std::result::Result<f64, String> {
    let v = finite(s)?;
    if !(0.0..1.0).contains(&v) {
        return Err("must be in [0, 1)".into());
    }
    Ok(v)
}

fn non_negative_f32(s: &str) -> std::result::Result<f32, String> {
    non_negative_f64(s).map(|v| v as f32)
}

fn positive_f32(s: &str) -> std::result::Result<f32, String> {
    positive_f64(s).map(|v| v as f32)
}

fn unit_f32(s: &str) -> std::result::Result<f32, String> {
    let v = finite(s)?;
    if !(0.0..=1.0).contains(&v) {
        return Err("must be in [0, 1]".into());
    }
    Ok(v as f32)
}

fn top_p(s: &str) -> std::result::Result<f32, String> {
    let v = finite(s)?;
    if !(v > 0.0 && v <= 1.0) {
        return Err("must be in (0, 1]".into());
    }
    Ok(v as f32)
}

/// Parse the command line (exits with clap's message on a usage error),
/// and record which train options were given, for the resume rules. A
/// `train -c FILE` has the file's options inserted right after `train`.
pub fn parse(args: Vec<String>) -> Cli {
    let mut args = normalize_args(args);
    let mut cmd = Cli::command();
    let from_file = match config_file::expand(&mut args, &cmd) {
        Ok(f) => f,
        Err(e) => clap::Error::raw(clap::error::ErrorKind::Io, format!("{e}\n")).exit(),
    };
    let matches = match cmd.try_get_matches_from_mut(args) {
        Ok(m) => m,
        Err(e) => {
            let _ = e.print();
            if let Some(note) = from_file.as_ref().and_then(|f| f.note(&e)) {
                eprintln!("{note}");
            }
            std::process::exit(e.exit_code());
        }
    };
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Command::Train(a), Some(("train", m))) = (&mut cli.command, matches.subcommand()) {
        a.explicit = explicit_ids(m);
        a.resolved = record::resolved(m, train_command(&cmd));
    }
    cli
}

/// The ids of the options given on the command line (or the config file,
/// whose options are command-line tokens) or through the environment.
fn explicit_ids(m: &clap::ArgMatches) -> BTreeSet<String> {
    m.ids()
        .filter(|id| {
            matches!(
                m.value_source(id.as_str()),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })
        .map(|id| id.to_string())
        .collect()
}

/// The `train` subcommand's definition.
fn train_command(cmd: &clap::Command) -> &clap::Command {
    cmd.find_subcommand("train")
        .expect("invariant: the CLI has a train subcommand")
}

/// `wgtune --method ...` without a subcommand means `wgtune train ...`.
pub fn normalize_args(mut args: Vec<String>) -> Vec<String> {
    let first = args.get(1).map(String::as_str).unwrap_or("");
    if first.starts_with("--") && !matches!(first, "--help" | "--version") {
        args.insert(1, "train".into());
    }
    args
}

/// Run a parsed command line; returns the exit status (0, or 128 + the
/// signal that stopped a training run, as shells expect).
pub fn run(cli: Cli) -> Result<u8> {
    let done = |r: Result<()>| r.map(|()| 0);
    match cli.command {
        Command::Train(a) => train(&a),
        Command::Generate(a) => done(generate(&a)),
        Command::Chat(a) => done(chat::chat(&a)),
        Command::Eval(a) => done(eval(&a)),
        Command::Devices(d) => done(devices(&d)),
        Command::Import(a) => done(import(&a)),
        Command::Plan(a) => done(plan(&a)),
        Command::Export(a) => done(export(&a)),
        Command::Data(a) => done(data(&a)),
        Command::Completions { shell } => {
            // Into memory first: clap_complete panics on a failed write.
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "wgtune", &mut buf);
            match std::io::Write::write_all(&mut std::io::stdout(), &buf) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(crate::error::Error::IoWhile {
                        action: "cannot write the completion script to".into(),
                        path: "stdout".into(),
                        source: e,
                    })
                }
                _ => Ok(0),
            }
        }
        Command::Bench {
            what: BenchCommand::Kernels { device, iters },
        } => done(crate::bench::kernels(&device.options(), iters)),
        Command::Bench {
            what:
                BenchCommand::Generate {
                    device,
                    model,
                    prompt_tokens,
                    new_tokens,
                    runs,
                    weights,
                },
        } => done(crate::bench::generate(
            &device.options(),
            &model,
            weights.weights,
            prompt_tokens,
            new_tokens,
            runs,
        )),
        Command::Bench {
            what:
                BenchCommand::Train {
                    device,
                    model,
                    config,
                    methods,
                    batch_size,
                    seq_len,
                    steps,
                    weights,
                    grad_checkpoint,
                    num_layers,
                },
        } => {
            let m: Vec<&str> = methods
                .split(',')
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .collect();
            done(crate::bench::train(
                &device.options(),
                model.as_deref(),
                config.as_deref(),
                &m,
                batch_size,
                seq_len,
                steps,
                weights.weights,
                grad_checkpoint,
                num_layers,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::init::LoraInit;
    use crate::train::options::{MethodOptions, PrefixInitKind, PromptInitKind};

    fn train_args(extra: &[&str]) -> TrainArgs {
        let mut args = vec!["wgtune", "train", "--model", "m", "--data", "d.jsonl"];
        args.extend_from_slice(extra);
        match Cli::try_parse_from(args).unwrap().command {
            Command::Train(a) => *a,
            _ => unreachable!("a train command line"),
        }
    }

    #[test]
    fn aliases_of_mlx_lm_trl_and_llama_factory_parse_as_the_canonical_options() {
        let a = train_args(&[
            "--method",
            "lora",
            "--iters",
            "7",
            "--learning-rate",
            "3e-3",
            "--adapter-path",
            "ad",
            "--max-seq-length",
            "64",
            "--lora-rank",
            "4",
            "--lora-target",
            "q_proj,v_proj",
            "--num-train-epochs",
            "2",
            "--gradient-accumulation-steps",
            "3",
            "--per-device-train-batch-size",
            "5",
        ]);
        assert_eq!(a.steps, Some(7));
        assert_eq!(a.lr, Some(3e-3));
        assert_eq!(a.out, PathBuf::from("ad"));
        assert_eq!(a.data_args.max_seq_len, Some(64));
        assert_eq!(a.lora_r, 4);
        assert_eq!(a.lora_targets.as_deref(), Some("q_proj,v_proj"));
        assert_eq!((a.epochs, a.grad_accum, a.batch_size), (2, 3, 5));
        let a = train_args(&[
            "--method",
            "lora",
            "--cutoff-len",
            "32",
            "--output-dir",
            "o",
        ]);
        assert_eq!(a.data_args.max_seq_len, Some(32));
        assert_eq!(a.out, PathBuf::from("o"));
        // A later flag overrides an earlier one (the config file comes first).
        let a = train_args(&[
            "--method",
            "lora",
            "--lr",
            "1e-3",
            "--learning-rate",
            "2e-3",
        ]);
        assert_eq!(a.lr, Some(2e-3));
    }

    #[test]
    fn parse_records_the_given_options_and_every_value() {
        let cli = parse(
            [
                "wgtune", "--method", "lora", "--model", "m", "--data", "d", "--iters", "3",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        );
        let Command::Train(a) = cli.command else {
            panic!("a train command line")
        };
        for id in ["method", "model", "data", "steps"] {
            assert!(a.explicit.contains(id), "{id}: {:?}", a.explicit);
        }
        assert!(!a.explicit.contains("lr"));
        assert_eq!(a.resolved.get("steps").map(String::as_str), Some("3"));
        assert_eq!(
            a.resolved.get("lr_schedule").map(String::as_str),
            Some("cosine")
        );
        assert_eq!(a.resolved.get("lora_alpha").map(String::as_str), Some("16"));
        let rec = record::to_json(&a);
        assert_eq!(rec["lr"], 2e-3, "the method's default, filled in");
        assert!(rec.get("prompt_init").is_none() && rec.get("resume").is_none());
    }

    #[test]
    fn init_options_are_checked_when_parsed() {
        for (spelling, want) in [
            ("default", LoraInit::Kaiming),
            ("kaiming", LoraInit::Kaiming),
            ("gaussian", LoraInit::Gaussian),
        ] {
            let a = train_args(&["--method", "lora", "--lora-init", spelling]);
            match a.options().unwrap().method {
                MethodOptions::Lora(l) => assert_eq!(l.init, want),
                m => panic!("{m:?}"),
            }
        }
        let a = train_args(&["--method", "prompt", "--prompt-init", "text"]);
        match a.options().unwrap().method {
            MethodOptions::Prompt(p) => assert_eq!(p.init, PromptInitKind::Text),
            m => panic!("{m:?}"),
        }
        let a = train_args(&["--method", "prefix", "--prefix-init", "zero"]);
        match a.options().unwrap().method {
            MethodOptions::Prefix(p) => assert_eq!(p.init, PrefixInitKind::Zero),
            m => panic!("{m:?}"),
        }
        let args = [
            "wgtune", "train", "--method", "lora", "--model", "m", "--data", "d",
        ];
        for bad in [["--lora-init", "xavier"], ["--prompt-init", "zero"]] {
            let e = Cli::try_parse_from(args.iter().chain(&bad)).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue, "{bad:?}");
        }
    }
}
