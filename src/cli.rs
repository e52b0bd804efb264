//! Command line: clap definitions and the `run` entry that `main` calls.
//! Progress and results go to stdout; diagnostics go through `log`.

use std::io::Write;
use std::path::PathBuf;

use std::collections::BTreeSet;
use std::sync::Arc;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::adapters::init::LoraInit;
use crate::adapters::{peft_io, Adapter};
use crate::error::{Error, Result};
use crate::gpu::context::{list_adapters, ContextOptions};
use crate::gpu::Context;
use crate::model::generate::{generate as gen, GenOptions};
use crate::model::tokenizer::{ChatMessage, Tokenizer};
use crate::model::{Hooks, Model, NoHooks};
use crate::train::data::{DataOptions, Dataset};
use crate::train::options::{
    LoraOptions, MethodOptions, PrefixInitKind, PrefixOptions, PromptInitKind, PromptOptions,
    TrainOptions,
};
use crate::train::progress::{Lines, Progress};
use crate::train::resume::check_adapter_base;
use crate::train::run::{print_model, train as train_run, Outcome, StopFlag};
use crate::train::template::PromptTemplate;
use crate::train::trainer::Schedule;

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
    /// GPU backend: vulkan, metal, dx12 or gl (default: all; env WGPU_BACKEND)
    #[arg(long)]
    pub backend: Option<String>,
    /// Use the GPU whose adapter name contains this text (env WGPU_ADAPTER_NAME)
    #[arg(long)]
    pub gpu: Option<String>,
}

impl DeviceArgs {
    pub fn options(&self) -> ContextOptions {
        ContextOptions {
            backend: self.backend.clone(),
            adapter: self.gpu.clone(),
            ..Default::default()
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a prompt-tuning, prefix-tuning or LoRA adapter (also: `wgtune --method ...`)
    Train(Box<TrainArgs>),
    /// Generate text, streaming tokens, optionally with an adapter
    Generate(GenerateArgs),
    /// Mean per-token cross-entropy and perplexity over a JSONL data set
    Eval(EvalArgs),
    /// List every GPU adapter with its backend, type, driver and key limits
    Devices(DeviceArgs),
    /// Convert a GGUF model (llama.cpp, Ollama, LM Studio) into a Hugging Face folder
    Import(ImportArgs),
    /// Benchmarks
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

/// `wgtune import model.gguf --out DIR`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The .gguf file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K or Q6_K tensors)
    pub gguf: PathBuf,
    /// Folder to write: config.json, model.safetensors (f32), tokenizer files
    #[arg(long)]
    pub out: PathBuf,
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
    #[arg(long, value_parser = two_or_more)]
    pub max_seq_len: Option<usize>,
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
        })
    }
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// prompt, prefix or lora
    #[arg(long, value_enum)]
    pub method: MethodArg,
    /// Model: a Hugging Face folder, a .gguf file, or a repo id ORG/NAME
    #[arg(long)]
    pub model: PathBuf,
    /// Training data, JSONL: {"text"}, {"prompt","completion"}, {"messages"} or alpaca rows
    #[arg(long)]
    pub data: PathBuf,
    /// Validation data (same format), evaluated every --eval-every steps and at the end
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Output folder: the PEFT adapter, checkpoint/, metrics.jsonl, loss.svg
    #[arg(long, default_value = "wgtune-out")]
    pub out: PathBuf,
    #[command(flatten)]
    pub data_args: DataArgs,
    /// Passes over the data (ignored when --steps is given)
    #[arg(long, default_value_t = 3, value_parser = positive)]
    pub epochs: usize,
    /// Optimizer steps (overrides --epochs)
    #[arg(long, value_parser = positive)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 4, value_parser = positive)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step
    #[arg(long, default_value_t = 1, value_parser = positive)]
    pub grad_accum: usize,
    /// Learning rate (default per method: lora 2e-3, prompt 3e-2, prefix 1e-2)
    #[arg(long, value_parser = positive_f64)]
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
    /// Start from an existing PEFT adapter folder
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Continue from <out>/checkpoint
    #[arg(long)]
    pub resume: bool,
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
    #[arg(long, default_value_t = 8, value_parser = positive)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0, value_parser = positive_f64)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.0, value_parser = dropout)]
    pub lora_dropout: f64,
    /// Comma-separated module names, or all-linear
    #[arg(long, default_value = "q_proj,v_proj")]
    pub lora_targets: String,
    /// Scale by alpha/sqrt(r) instead of alpha/r
    #[arg(long)]
    pub rslora: bool,
    /// LoRA A init: kaiming (PEFT's default; also: default) or gaussian
    #[arg(long, value_enum, default_value_t = LoraInitArg::Kaiming)]
    pub lora_init: LoraInitArg,
    /// No progress bar (one line per logged step)
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The options given on the command line (set by [`parse`]).
    #[arg(skip)]
    pub explicit: BTreeSet<String>,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model: a Hugging Face folder, a .gguf file, or a repo id ORG/NAME
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder (LoRA, prompt or prefix tuning)
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt with the model's chat template
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat)
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128, value_parser = positive)]
    pub max_new_tokens: usize,
    /// 0 = greedy
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_f32)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0, value_parser = top_p)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model: a Hugging Face folder, a .gguf file, or a repo id ORG/NAME
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    pub data_args: DataArgs,
    #[arg(long, default_value_t = 4, value_parser = positive)]
    pub batch_size: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
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

fn top_p(s: &str) -> std::result::Result<f32, String> {
    let v = finite(s)?;
    if !(v > 0.0 && v <= 1.0) {
        return Err("must be in (0, 1]".into());
    }
    Ok(v as f32)
}

/// Parse the command line (exits with clap's message on a usage error),
/// and record which train options were given, for the resume rules.
pub fn parse(args: Vec<String>) -> Cli {
    let matches = Cli::command().get_matches_from(normalize_args(args));
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Command::Train(a), Some(("train", m))) = (&mut cli.command, matches.subcommand()) {
        a.explicit = m
            .ids()
            .filter(|id| {
                matches!(
                    m.value_source(id.as_str()),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            })
            .map(|id| id.to_string())
            .collect();
    }
    cli
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
        Command::Eval(a) => done(eval(&a)),
        Command::Devices(d) => done(devices(&d)),
        Command::Import(a) => done(import(&a)),
        Command::Bench {
            what: BenchCommand::Kernels { device, iters },
        } => done(crate::bench::kernels(&device.options(), iters)),
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
            ))
        }
    }
}

fn import(a: &ImportArgs) -> Result<()> {
    let t = crate::clock::Stopwatch::start();
    let m = crate::model::import::import_gguf(&a.gguf, &a.out)?;
    let params: usize = m.tensors.values().map(|(_, d)| d.len()).sum();
    println!(
        "imported {} ({:?}, {} tensors, {:.1} M parameters) into {} in {:.1} s",
        a.gguf.display(),
        m.arch,
        m.tensors.len(),
        params as f64 / 1e6,
        a.out.display(),
        t.secs()
    );
    Ok(())
}

fn devices(d: &DeviceArgs) -> Result<()> {
    let list = list_adapters(d.backend.as_deref())?;
    if list.is_empty() {
        println!(
            "no GPU adapters found (on Linux: apt-get install -y mesa-vulkan-drivers libvulkan1)"
        );
    }
    for (i, a) in list.iter().enumerate() {
        let sub = if a.features.contains(wgpu::Features::SUBGROUP) {
            format!("{}..{}", a.info.subgroup_min_size, a.info.subgroup_max_size)
        } else {
            "none".to_string()
        };
        println!("[{i}] {}", a.info.name);
        println!(
            "    backend {:?}, type {:?}, driver {} {}",
            a.info.backend, a.info.device_type, a.info.driver, a.info.driver_info
        );
        println!(
            "    max storage binding {} MiB, max buffer {} MiB, workgroup storage {} KiB, storage buffers/stage {}",
            a.limits.max_storage_buffer_binding_size >> 20,
            a.limits.max_buffer_size >> 20,
            a.limits.max_compute_workgroup_storage_size >> 10,
            a.limits.max_storage_buffers_per_shader_stage
        );
        println!(
            "    subgroups {sub}, f16 {}, timestamps {}",
            a.features.contains(wgpu::Features::SHADER_F16),
            a.features.contains(wgpu::Features::TIMESTAMP_QUERY)
        );
    }
    Ok(())
}

/// SIGINT and SIGTERM ask the run to save and stop; a second one while it
/// saves exits at once (every file write is atomic, so nothing is torn).
fn install_stop_handlers() -> Arc<StopFlag> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(StopFlag::new(0));
    for sig in [SIGINT, SIGTERM] {
        let s = stop.clone();
        // SAFETY: the handler only does an atomic swap and `_exit`, both
        // async-signal-safe.
        let r = unsafe {
            signal_hook::low_level::register(sig, move || {
                if s.swap(sig, std::sync::atomic::Ordering::SeqCst) != 0 {
                    signal_hook::low_level::exit(128 + sig);
                }
            })
        };
        if let Err(e) = r {
            log::warn!("cannot handle signal {sig}: {e}; stopping will lose unsaved steps");
        }
    }
    stop
}

impl TrainArgs {
    /// The adapter settings of `--method`.
    fn method_options(&self) -> MethodOptions {
        match self.method {
            MethodArg::Lora => MethodOptions::Lora(LoraOptions {
                r: self.lora_r,
                alpha: self.lora_alpha,
                dropout: self.lora_dropout,
                targets: self
                    .lora_targets
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
                rslora: self.rslora,
                init: match self.lora_init {
                    LoraInitArg::Kaiming => LoraInit::Kaiming,
                    LoraInitArg::Gaussian => LoraInit::Gaussian,
                },
            }),
            MethodArg::Prompt => MethodOptions::Prompt(PromptOptions {
                num_virtual_tokens: self.num_virtual_tokens,
                init: match self.prompt_init {
                    PromptInitArg::Text => PromptInitKind::Text,
                    PromptInitArg::Vocab => PromptInitKind::Vocab,
                    PromptInitArg::Random => PromptInitKind::Random,
                },
                init_text: self.prompt_init_text.clone(),
            }),
            MethodArg::Prefix => MethodOptions::Prefix(PrefixOptions {
                num_virtual_tokens: self.num_virtual_tokens,
                projection: self.prefix_projection,
                encoder_hidden_size: self.encoder_hidden_size,
                init: match self.prefix_init {
                    PrefixInitArg::Text => PrefixInitKind::Text,
                    PrefixInitArg::Zero => PrefixInitKind::Zero,
                    PrefixInitArg::Random => PrefixInitKind::Random,
                },
                init_text: self.prefix_init_text.clone(),
            }),
        }
    }

    /// The library's options, built once from the arguments.
    pub fn options(&self) -> Result<TrainOptions> {
        Ok(TrainOptions {
            method: self.method_options(),
            model: self.model.clone(),
            data: self.data.clone(),
            val_data: self.val_data.clone(),
            out: self.out.clone(),
            data_opts: self.data_args.options()?,
            epochs: self.epochs,
            steps: self.steps,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            lr: self.lr,
            weight_decay: self.weight_decay,
            schedule: match self.lr_schedule {
                ScheduleArg::Constant => Schedule::Constant,
                ScheduleArg::Linear => Schedule::Linear,
                ScheduleArg::Cosine => Schedule::Cosine,
            },
            warmup_steps: self.warmup_steps,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            log_every: self.log_every,
            eval_every: self.eval_every,
            save_every: self.save_every,
            init_adapter: self.init_adapter.clone(),
            resume: self.resume,
            max_bad_steps: self.max_bad_steps,
            explicit: self.explicit.clone(),
        })
    }
}

/// The progress bar of `wgtune train` (on stderr, as indicatif draws).
struct Bar(Option<indicatif::ProgressBar>);

impl Progress for Bar {
    fn start(&mut self, start: usize, total: usize) {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_position(start as u64);
        self.0 = Some(b);
    }

    fn step(&mut self, step: usize, _total: usize, summary: Option<&str>) {
        if let Some(b) = &self.0 {
            if let Some(s) = summary {
                b.set_message(s.to_string());
            }
            b.set_position(step as u64);
        }
    }

    fn line(&mut self, line: &str) {
        match &self.0 {
            Some(b) => b.println(line),
            None => println!("{line}"),
        }
    }

    fn end(&mut self, completed: bool) {
        if let Some(b) = self.0.take() {
            if completed {
                b.finish();
            } else {
                b.abandon();
            }
        }
    }
}

fn train(a: &TrainArgs) -> Result<u8> {
    let stop = install_stop_handlers();
    let ctx = Context::new(&a.device.options())?;
    let o = a.options()?;
    let mut bar = Bar(None);
    let mut lines = Lines;
    let progress: &mut dyn Progress = if a.no_progress { &mut lines } else { &mut bar };
    Ok(match train_run(&ctx, &o, &stop, progress)? {
        Outcome::Done { .. } | Outcome::NothingToDo { .. } => 0,
        Outcome::Interrupted { signal, saved_step } => {
            if saved_step.is_none() {
                println!("interrupted before any step was saved: nothing written");
            }
            (128 + signal).clamp(1, 255) as u8
        }
    })
}

/// Load a model folder and its tokenizer, and say what was loaded.
fn load_model(ctx: &Context, arg: &std::path::Path) -> Result<(Model, Tokenizer)> {
    let dir = crate::model::hub::resolve_model(arg)?;
    let model = Model::load(ctx, &dir)?;
    let tok = Tokenizer::load(&dir)?;
    print_model(ctx, &model);
    Ok((model, tok))
}

/// Load an optional PEFT adapter for inference.
fn load_adapter(
    ctx: &Context,
    model: &Model,
    model_arg: &std::path::Path,
    dir: Option<&PathBuf>,
) -> Result<Option<Adapter>> {
    let Some(dir) = dir else { return Ok(None) };
    let loaded = peft_io::load_adapter(dir)?;
    check_adapter_base(model, model_arg, &loaded, dir)?;
    let ad = Adapter::new(ctx, model, loaded.config.clone(), loaded.sorted_tensors())?;
    println!(
        "adapter: {} ({} parameters)",
        dir.display(),
        ad.num_params()
    );
    Ok(Some(ad))
}

fn generate(a: &GenerateArgs) -> Result<()> {
    let ctx = Context::new(&a.device.options())?;
    let (model, tok) = load_model(&ctx, &a.model)?;
    let adapter = load_adapter(&ctx, &model, &a.model, a.adapter.as_ref())?;
    let hooks: &dyn Hooks = adapter.as_ref().map_or(&NoHooks, |ad| ad as &dyn Hooks);
    let ids = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s.clone()));
        }
        msgs.push(ChatMessage::new("user", a.prompt.clone()));
        let text = tok.render_chat(&msgs, true)?;
        let mut ids = tok.encode(&text, false)?;
        if let Some(bos) = tok
            .bos_id()
            .filter(|b| tok.adds_bos() && ids.first() != Some(b))
        {
            ids.insert(0, bos);
        }
        ids
    } else {
        if a.system.is_some() {
            return Err(Error::invalid("generate", "--system needs --chat"));
        }
        tok.encode(&a.prompt, true)?
    };
    let opts = GenOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        stop: tok.eos_ids().to_vec(),
    };
    let mut dec = tok.stream_decoder(true);
    let mut out = std::io::stdout();
    let stats = gen(&ctx, &model, hooks, &ids, &opts, |t| {
        if let Some(text) = dec.push(t)? {
            print!("{text}");
            let _ = out.flush();
        }
        Ok(())
    })?;
    print!("{}", dec.finish()?);
    println!();
    eprintln!(
        "[{} prompt tokens, {} new tokens; prefill {:.2} s, {:.2} tok/s{}]",
        stats.prompt_tokens,
        stats.new_tokens,
        stats.prefill_s,
        stats.decode_tokens_per_s(),
        if stats.stopped_at_eos {
            ", stopped at EOS".to_string()
        } else if stats.stopped_at_context {
            format!(
                ", stopped at the model's context limit of {} positions before \
                 --max-new-tokens {}",
                model.cfg.max_positions, a.max_new_tokens
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

fn eval(a: &EvalArgs) -> Result<()> {
    let ctx = Context::new(&a.device.options())?;
    let (model, tok) = load_model(&ctx, &a.model)?;
    let adapter = load_adapter(&ctx, &model, &a.model, a.adapter.as_ref())?;
    let hooks: &dyn Hooks = adapter.as_ref().map_or(&NoHooks, |ad| ad as &dyn Hooks);
    // Rows must leave room for the adapter's virtual tokens or prefix rows.
    let rows =
        hooks.prompt().map_or(0, |t| t.shape()[0]) + hooks.prefix().map_or(0, |t| t.shape()[0]);
    let room = model.cfg.max_positions.saturating_sub(rows);
    let mut dopts = a.data_args.options()?;
    dopts.max_seq_len = Some(dopts.max_seq_len.unwrap_or(room).min(room));
    let data = Dataset::load(&a.data, &tok, &dopts)?;
    if data.truncated > 0 {
        println!(
            "{} rows truncated to {} tokens",
            data.truncated,
            dopts.max_seq_len.unwrap_or(room)
        );
    }
    let (sum, n) =
        crate::train::eval::eval_batches(&ctx, &model, hooks, &data.in_order(a.batch_size))?;
    if n == 0 {
        return Err(Error::invalid(
            "eval",
            format!("{}: no target tokens", a.data.display()),
        ));
    }
    let mean = sum / n as f64;
    println!(
        "{}: {} examples, {n} target tokens",
        a.data.display(),
        data.len()
    );
    println!("loss {mean:.6}  perplexity {:.4}", mean.exp());
    Ok(())
}
