//! `wgtune train`: data, adapter, the step loop with progress, metrics,
//! validation, checkpoints (also on Ctrl-C), loss plots and the final
//! PEFT-format adapter.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::adapters::adapter::HostTensors;
use crate::adapters::init::{self, LoraInit, PrefixInit, PromptInit};
use crate::adapters::peft_io::{
    self, AdapterConfig, LoadedAdapter, LoraConfig, PrefixConfig, PromptConfig,
};
use crate::adapters::Adapter;
use crate::error::{Error, Result};
use crate::fsio::pause_point;
use crate::gpu::Context;
use crate::model::tokenizer::Tokenizer;
use crate::model::Model;
use crate::train::checkpoint::{self, Checkpoint, Position, RunSettings};
use crate::train::data::{Batch, DataOptions, Dataset};
use crate::train::report::{self, MetricsLog};
use crate::train::trainer::{OptimConfig, Schedule, Trainer};

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
}

/// Everything `wgtune train` takes.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub method: Method,
    pub model: PathBuf,
    pub data: PathBuf,
    pub val_data: Option<PathBuf>,
    pub out: PathBuf,
    pub data_opts: DataOptions,
    pub epochs: usize,
    pub steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: Option<f64>,
    pub weight_decay: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub log_every: usize,
    pub eval_every: usize,
    pub save_every: usize,
    pub init_adapter: Option<PathBuf>,
    pub resume: bool,
    // method settings
    pub num_virtual_tokens: usize,
    pub prompt_init: String,
    pub prompt_init_text: Option<String>,
    pub prefix_projection: bool,
    pub encoder_hidden_size: Option<usize>,
    pub prefix_init: String,
    pub prefix_init_text: Option<String>,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_targets: Vec<String>,
    pub rslora: bool,
    pub lora_init: String,
    pub progress: bool,
    /// Stop with an error after this many skipped (non-finite) steps in a row.
    pub max_bad_steps: usize,
    /// The options the user gave (clap ids, i.e. field names): on a resume
    /// or with an initial adapter, only these can contradict it.
    pub explicit: BTreeSet<String>,
}

fn base_name(model: &Path) -> Option<String> {
    Some(model.display().to_string())
}

/// Build the adapter config and initial tensors for a fresh run.
fn fresh_adapter(
    ctx: &Context,
    model: &Model,
    tok: &Tokenizer,
    o: &TrainOptions,
    data: &Dataset,
) -> Result<(AdapterConfig, HostTensors)> {
    let cfg = &model.cfg;
    let n = o.num_virtual_tokens;
    if o.method != Method::Lora && n == 0 {
        return Err(Error::invalid(
            "train",
            "--num-virtual-tokens must be at least 1",
        ));
    }
    match o.method {
        Method::Lora => {
            let mut lc = LoraConfig::new(o.lora_r, o.lora_alpha, &[]);
            lc.target_modules = if o.lora_targets.iter().any(|t| t == "all-linear") {
                resolve_lora_targets(model, &o.lora_targets)
            } else {
                o.lora_targets.clone()
            };
            lc.lora_dropout = o.lora_dropout;
            lc.use_rslora = o.rslora;
            lc.base_model_name_or_path = base_name(&o.model);
            let init = match o.lora_init.as_str() {
                "kaiming" | "default" => LoraInit::Kaiming,
                "gaussian" => {
                    lc.init_lora_weights = serde_json::Value::String("gaussian".into());
                    LoraInit::Gaussian
                }
                other => {
                    return Err(Error::invalid(
                        "train",
                        format!("--lora-init `{other}`: use kaiming or gaussian"),
                    ))
                }
            };
            if lc.r < 1 {
                return Err(Error::invalid(
                    "lora",
                    format!("--lora-r {} must be at least 1", lc.r),
                ));
            }
            if lc.lora_alpha.is_nan() || lc.lora_alpha <= 0.0 {
                return Err(Error::invalid(
                    "lora",
                    format!("--lora-alpha {} must be > 0", lc.lora_alpha),
                ));
            }
            if !(0.0..1.0).contains(&lc.lora_dropout) {
                return Err(Error::invalid(
                    "lora",
                    format!("--lora-dropout {} must be in [0, 1)", lc.lora_dropout),
                ));
            }
            let t = init::init_lora(model, &lc, init, o.seed)?;
            Ok((AdapterConfig::Lora(lc), t))
        }
        Method::Prompt => {
            let init = match o.prompt_init.as_str() {
                "text" => {
                    let text = o.prompt_init_text.clone().ok_or_else(|| {
                        Error::invalid("train", "--prompt-init text needs --prompt-init-text")
                    })?;
                    // PEFT tokenizes the init text with the special tokens.
                    PromptInit::Text(tok.encode(&text, true)?)
                }
                "vocab" => PromptInit::Vocab,
                "random" => PromptInit::Random,
                other => {
                    return Err(Error::invalid(
                        "train",
                        format!("--prompt-init `{other}`: use text, vocab or random"),
                    ))
                }
            };
            let pc = PromptConfig {
                num_virtual_tokens: n,
                token_dim: cfg.hidden,
                num_attention_heads: cfg.heads,
                num_layers: cfg.layers,
                prompt_tuning_init: match &init {
                    PromptInit::Text(_) => "TEXT",
                    PromptInit::Vocab => "SAMPLE_VOCAB",
                    PromptInit::Random => "RANDOM",
                }
                .into(),
                prompt_tuning_init_text: o.prompt_init_text.clone(),
                tokenizer_name_or_path: base_name(&o.model),
                base_model_name_or_path: base_name(&o.model),
            };
            let t = init::init_prompt(ctx, model, &pc, &init, o.seed)?;
            Ok((AdapterConfig::Prompt(pc), t))
        }
        Method::Prefix => {
            let init = match o.prefix_init.as_str() {
                "zero" => PrefixInit::Zero,
                "random" => PrefixInit::Random(1.0),
                "text" => {
                    // Without a text, the first training example's tokens.
                    let ids = match &o.prefix_init_text {
                        Some(t) => tok.encode(t, true)?,
                        None => data.examples[0].ids.clone(),
                    };
                    PrefixInit::Text(ids)
                }
                other => {
                    return Err(Error::invalid(
                        "train",
                        format!("--prefix-init `{other}`: use text, zero or random"),
                    ))
                }
            };
            let pc = PrefixConfig {
                num_virtual_tokens: n,
                token_dim: cfg.kv_dim(),
                num_attention_heads: cfg.kv_heads,
                num_layers: cfg.layers,
                encoder_hidden_size: Some(o.encoder_hidden_size.unwrap_or(cfg.hidden)),
                prefix_projection: o.prefix_projection,
                base_model_name_or_path: base_name(&o.model),
            };
            let t = init::init_prefix(ctx, model, &pc, &init, o.seed)?;
            Ok((AdapterConfig::Prefix(pc), t))
        }
    }
}

/// How a run ended, errors aside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Trained to the last step; the adapter is saved.
    Done { steps: usize },
    /// `--resume` found the checkpoint at or past the last step: nothing
    /// was trained or written.
    NothingToDo { step: usize },
    /// Stopped by signal `signal`. What training had done is saved
    /// (`saved_step`); None when it stopped before the first step.
    Interrupted {
        signal: i32,
        saved_step: Option<usize>,
    },
}

/// What the command-line edge sets to stop a run: the signal's number, 0
/// while none came. The run checks it between phases and between steps.
pub type StopFlag = std::sync::atomic::AtomicI32;

fn schedule_name(s: Schedule) -> &'static str {
    match s {
        Schedule::Constant => "constant",
        Schedule::Linear => "linear",
        Schedule::Cosine => "cosine",
    }
}

fn method_of(cfg: &AdapterConfig) -> Method {
    match cfg {
        AdapterConfig::Lora(_) => Method::Lora,
        AdapterConfig::Prompt(_) => Method::Prompt,
        AdapterConfig::Prefix(_) => Method::Prefix,
    }
}

fn method_str(m: Method) -> &'static str {
    match m {
        Method::Lora => "lora",
        Method::Prompt => "prompt",
        Method::Prefix => "prefix",
    }
}

impl TrainOptions {
    /// Whether the user gave option `id` (clap's id: the field name).
    fn given(&self, id: &str) -> bool {
        self.explicit.contains(id)
    }

    fn settings(&self, model: &Model, lr: f64) -> RunSettings {
        RunSettings {
            model: self.model.display().to_string(),
            model_fingerprint: format!("{:016x}", model.fingerprint),
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
        }
    }
}

/// The LoRA target modules as saved: `all-linear` resolved to the model's
/// module names, as PEFT saves it; sorted.
fn resolve_lora_targets(model: &Model, targets: &[String]) -> Vec<String> {
    let mut names: Vec<String> = if targets.iter().any(|t| t == "all-linear") {
        model
            .linears()
            .iter()
            .filter_map(|(_, l)| l.name.rsplit('.').next().map(str::to_string))
            .collect()
    } else {
        targets.to_vec()
    };
    names.sort();
    names.dedup();
    names
}

/// `--flag given (source: recorded)` for every option the user gave that
/// `cfg` (a checkpoint's or an initial adapter's) contradicts.
fn adapter_conflicts(o: &TrainOptions, model: &Model, cfg: &AdapterConfig) -> Vec<String> {
    let mut out = Vec::new();
    let mut differ = |id: &str, flag: &str, given: String, recorded: String| {
        if o.given(id) && given != recorded {
            out.push(format!("--{flag} {given} (recorded: {recorded})"));
        }
    };
    if method_of(cfg) != o.method {
        out.push(format!(
            "--method {} (recorded: {})",
            method_str(o.method),
            init::method_name(cfg)
        ));
        return out;
    }
    // Init options shape a new adapter only.
    let only_new = "applies only to a new adapter".to_string();
    match cfg {
        AdapterConfig::Lora(c) => {
            differ("lora_r", "lora-r", o.lora_r.to_string(), c.r.to_string());
            differ(
                "lora_alpha",
                "lora-alpha",
                o.lora_alpha.to_string(),
                c.lora_alpha.to_string(),
            );
            differ(
                "lora_dropout",
                "lora-dropout",
                o.lora_dropout.to_string(),
                c.lora_dropout.to_string(),
            );
            let mut recorded = c.target_modules.clone();
            recorded.sort();
            differ(
                "lora_targets",
                "lora-targets",
                resolve_lora_targets(model, &o.lora_targets).join(","),
                recorded.join(","),
            );
            differ(
                "rslora",
                "rslora",
                o.rslora.to_string(),
                c.use_rslora.to_string(),
            );
            differ(
                "lora_init",
                "lora-init",
                o.lora_init.clone(),
                only_new.clone(),
            );
        }
        AdapterConfig::Prompt(c) => {
            differ(
                "num_virtual_tokens",
                "num-virtual-tokens",
                o.num_virtual_tokens.to_string(),
                c.num_virtual_tokens.to_string(),
            );
            differ(
                "prompt_init",
                "prompt-init",
                o.prompt_init.clone(),
                only_new.clone(),
            );
            differ(
                "prompt_init_text",
                "prompt-init-text",
                o.prompt_init_text.clone().unwrap_or_default(),
                only_new.clone(),
            );
        }
        AdapterConfig::Prefix(c) => {
            differ(
                "num_virtual_tokens",
                "num-virtual-tokens",
                o.num_virtual_tokens.to_string(),
                c.num_virtual_tokens.to_string(),
            );
            differ(
                "prefix_projection",
                "prefix-projection",
                o.prefix_projection.to_string(),
                c.prefix_projection.to_string(),
            );
            differ(
                "encoder_hidden_size",
                "encoder-hidden-size",
                o.encoder_hidden_size.unwrap_or(0).to_string(),
                if c.prefix_projection {
                    c.encoder_hidden_size().to_string()
                } else {
                    "none (no projection)".into()
                },
            );
            differ(
                "prefix_init",
                "prefix-init",
                o.prefix_init.clone(),
                only_new.clone(),
            );
            differ(
                "prefix_init_text",
                "prefix-init-text",
                o.prefix_init_text.clone().unwrap_or_default(),
                only_new,
            );
        }
    }
    out
}

/// Options the user gave that the checkpoint's run settings contradict.
fn settings_conflicts(o: &TrainOptions, lr: f64, s: &RunSettings) -> Vec<String> {
    let mut out = Vec::new();
    let mut differ = |id: &str, flag: &str, given: String, recorded: String| {
        if o.given(id) && given != recorded {
            out.push(format!("--{flag} {given} (recorded: {recorded})"));
        }
    };
    differ("lr", "lr", lr.to_string(), s.lr.to_string());
    differ(
        "weight_decay",
        "weight-decay",
        o.weight_decay.to_string(),
        s.weight_decay.to_string(),
    );
    differ(
        "lr_schedule",
        "lr-schedule",
        schedule_name(o.schedule).into(),
        s.lr_schedule.clone(),
    );
    differ(
        "warmup_steps",
        "warmup-steps",
        o.warmup_steps.to_string(),
        s.warmup_steps.to_string(),
    );
    differ(
        "max_grad_norm",
        "max-grad-norm",
        o.max_grad_norm.to_string(),
        s.max_grad_norm.to_string(),
    );
    differ("seed", "seed", o.seed.to_string(), s.seed.to_string());
    differ(
        "batch_size",
        "batch-size",
        o.batch_size.to_string(),
        s.batch_size.to_string(),
    );
    differ(
        "grad_accum",
        "grad-accum",
        o.grad_accum.to_string(),
        s.grad_accum.to_string(),
    );
    let msl = |x: Option<usize>| x.map_or("auto".to_string(), |v| v.to_string());
    differ(
        "max_seq_len",
        "max-seq-len",
        msl(o.data_opts.max_seq_len),
        msl(s.max_seq_len),
    );
    differ(
        "train_on_prompt",
        "train-on-prompt",
        o.data_opts.train_on_prompt.to_string(),
        s.train_on_prompt.to_string(),
    );
    out
}

/// The run's settings with the checkpoint's filled in where the user gave
/// none (so a resume continues the run it resumes).
fn adopt_settings(o: &mut TrainOptions, s: &RunSettings, c: &AdapterConfig) {
    if !o.given("lr") {
        o.lr = Some(s.lr);
    }
    if !o.given("weight_decay") {
        o.weight_decay = s.weight_decay;
    }
    if !o.given("lr_schedule") {
        o.schedule = match s.lr_schedule.as_str() {
            "constant" => Schedule::Constant,
            "linear" => Schedule::Linear,
            _ => Schedule::Cosine,
        };
    }
    if !o.given("warmup_steps") {
        o.warmup_steps = s.warmup_steps;
    }
    if !o.given("max_grad_norm") {
        o.max_grad_norm = s.max_grad_norm;
    }
    if !o.given("seed") {
        o.seed = s.seed;
    }
    if !o.given("batch_size") {
        o.batch_size = s.batch_size;
    }
    if !o.given("grad_accum") {
        o.grad_accum = s.grad_accum;
    }
    if !o.given("max_seq_len") {
        o.data_opts.max_seq_len = s.max_seq_len;
    }
    if !o.given("train_on_prompt") {
        o.data_opts.train_on_prompt = s.train_on_prompt;
    }
    if let AdapterConfig::Lora(l) = c {
        o.lora_dropout = l.lora_dropout;
    }
}

fn conflict_error(path: &Path, what: &str, list: &[String], hint: &str) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!(
            "these options contradict the {what}:\n  {}\n---> HINT: {hint}",
            list.join("\n  ")
        ),
    }
}

/// Checks that an adapter loaded from `dir` was made for `model`. wgtune
/// records the base model's fingerprint, and a mismatch is an error. A PEFT
/// adapter records only a name or path, so a different one is a warning.
pub fn check_adapter_base(
    model: &Model,
    model_arg: &Path,
    loaded: &LoadedAdapter,
    dir: &Path,
) -> Result<()> {
    if let Some(fp) = loaded.base_fingerprint() {
        if fp != model.fingerprint {
            return Err(Error::Adapter {
                path: dir.to_path_buf(),
                message: format!(
                    "was trained on another base model ({}) than `{}`: its weights differ\n\
                     ---> HINT: pass the model it was trained on as --model",
                    loaded.config.base_model_name_or_path().unwrap_or("unnamed"),
                    model_arg.display()
                ),
            });
        }
        return Ok(());
    }
    if let Some(base) = loaded.config.base_model_name_or_path() {
        let last = |s: &str| {
            s.trim_end_matches(['/', '\\'])
                .rsplit(['/', '\\'])
                .next()
                .unwrap_or("")
                .to_lowercase()
        };
        let given = model_arg.display().to_string();
        if last(base) != last(&given) {
            log::warn!(
                "{}: adapter made for `{base}`, used with `{given}`; it loads because the \
                 shapes fit, but on another base model it is not what was trained",
                dir.display()
            );
        }
    }
    Ok(())
}

/// What this run created in the output folder, removed again when the run
/// fails before it saved anything.
struct Created {
    dir: Option<PathBuf>,
    metrics: Option<PathBuf>,
}

impl Created {
    fn undo(&self) {
        if let Some(m) = &self.metrics {
            let _ = std::fs::remove_file(m);
        }
        if let Some(d) = &self.dir {
            // Only if empty: never remove what someone else put there.
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Write the adapter, the checkpoint and the loss plot. Returns false (and
/// writes nothing) when the last step was skipped for a non-finite
/// gradient: a diverging run must not replace the last good state.
fn save_all(
    ctx: &Context,
    o: &TrainOptions,
    tr: &Trainer,
    settings: &RunSettings,
    pos: Position,
    metrics: &MetricsLog,
) -> Result<bool> {
    if tr.skipped_in_a_row()? > 0 {
        log::warn!(
            "step {}: not saved, the last step was skipped for a non-finite gradient",
            tr.step
        );
        return Ok(false);
    }
    let ad = tr.adapter;
    let tensors = ad.peft_tensors(ctx)?;
    peft_io::save_adapter_with(&o.out, &ad.config, &tensors, Some(tr.model.fingerprint))?;
    pause_point("between-adapter-and-checkpoint");
    let (m, v) = tr.moments()?;
    let ck = Checkpoint {
        position: pos,
        settings: settings.clone(),
        config: ad.config.clone(),
        params: ad.flat.read(ctx, &ad.flat.params)?,
        m,
        v,
    };
    checkpoint::save(&o.out.join("checkpoint"), &ck)?;
    let hist = report::read_loss_history(metrics.path())?;
    report::write_loss_plot(
        &o.out.join("loss.svg"),
        "wgtune training loss",
        &hist.train,
        &hist.val,
    )?;
    Ok(true)
}

fn signalled(stop: &StopFlag) -> Option<i32> {
    match stop.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Run `wgtune train`. Everything is validated before the output folder
/// is touched; `stop` is checked between phases and after every step.
pub fn train(ctx: &Context, o: &TrainOptions, stop: &StopFlag) -> Result<Outcome> {
    let t_load = Instant::now();
    let mut o = o.clone();
    let stopped = |signal| {
        Ok(Outcome::Interrupted {
            signal,
            saved_step: None,
        })
    };
    if o.out.exists() && !o.out.is_dir() {
        return Err(Error::invalid(
            "train",
            format!("--out {} is a file, not a folder", o.out.display()),
        ));
    }
    let ckpt_dir = o.out.join("checkpoint");
    for d in [&o.out, &ckpt_dir] {
        let n = checkpoint::remove_stale_temp_files(d);
        if n > 0 {
            log::info!(
                "{}: removed {n} temp files of an interrupted run",
                d.display()
            );
        }
    }
    // A missing or torn checkpoint is an error before anything loads.
    let resumed = if o.resume {
        Some(checkpoint::load(&ckpt_dir)?)
    } else {
        None
    };
    if o.resume && o.init_adapter.is_some() {
        return Err(Error::invalid(
            "train",
            "--resume continues the checkpoint; --init-adapter starts a new run: give one",
        ));
    }
    let dir = crate::model::hub::resolve_model(&o.model)?;
    let model = Model::load(ctx, &dir)?;
    let tok = Tokenizer::load(&dir)?;
    print_model(ctx, &model);
    pause_point("model-loaded");
    if let Some(s) = signalled(stop) {
        return stopped(s);
    }

    // The adapter: from the checkpoint, an initial adapter, or new.
    let ckpt_path = ckpt_dir.join(checkpoint::STATE_FILE);
    let loaded_init = match &o.init_adapter {
        Some(d) => Some(peft_io::load_adapter(d)?),
        None => None,
    };
    if let Some(ck) = &resumed {
        if ck.settings.model_fingerprint != format!("{:016x}", model.fingerprint) {
            return Err(Error::Checkpoint {
                path: ckpt_path,
                message: format!(
                    "trained on another base model (`{}`) than --model `{}`: their weights \
                     differ\n---> HINT: resume with the model the run started with",
                    ck.settings.model,
                    o.model.display()
                ),
            });
        }
        let mut list = adapter_conflicts(&o, &model, &ck.config);
        let lr_given = o.lr.unwrap_or(o.method.default_lr());
        list.extend(settings_conflicts(&o, lr_given, &ck.settings));
        if !list.is_empty() {
            return Err(conflict_error(
                &ckpt_path,
                "checkpoint",
                &list,
                "drop them to continue the run as it was, or start a new run from the \
                 saved adapter with --init-adapter and another --out",
            ));
        }
        adopt_settings(&mut o, &ck.settings, &ck.config);
    }
    if let (Some(d), Some(l)) = (&o.init_adapter, &loaded_init) {
        check_adapter_base(&model, &o.model, l, d)?;
        let list = adapter_conflicts(&o, &model, &l.config);
        if !list.is_empty() {
            return Err(conflict_error(
                &d.join("adapter_config.json"),
                "adapter given with --init-adapter",
                &list,
                "drop them: training continues the adapter as it is",
            ));
        }
    }
    let adapter_rows = if o.method == Method::Lora {
        0
    } else {
        match (&resumed, &loaded_init) {
            (Some(ck), _) => virtual_tokens(&ck.config),
            (_, Some(l)) => virtual_tokens(&l.config),
            _ => o.num_virtual_tokens,
        }
    };
    // One row must remain to predict the next token.
    if adapter_rows + 2 > model.cfg.max_positions {
        return Err(Error::invalid(
            "train",
            format!(
                "--num-virtual-tokens {adapter_rows} leaves no room for tokens: the model has {} \
                 positions, and the virtual tokens take theirs from the same budget",
                model.cfg.max_positions
            ),
        ));
    }
    let room = model.cfg.max_positions - adapter_rows;
    let mut dopts = o.data_opts.clone();
    let limit = dopts.max_seq_len.unwrap_or(room).min(room);
    dopts.max_seq_len = Some(limit);
    let data = Dataset::load(&o.data, &tok, &dopts)?;
    if data.truncated > 0 || data.dropped > 0 {
        log::warn!(
            "{}: {} rows truncated to {limit} tokens, {} dropped (no target left)",
            o.data.display(),
            data.truncated,
            data.dropped
        );
    }
    if let Some(w) = data.length_warning() {
        log::warn!("{w}");
    }
    let val = match &o.val_data {
        Some(p) => Some(Dataset::load(p, &tok, &dopts)?),
        None => None,
    };
    println!(
        "data: {} examples, {} target tokens ({} text, {} prompt/completion, {} alpaca, {} chat){}",
        data.len(),
        data.n_targets(),
        data.kinds.text,
        data.kinds.prompt_completion,
        data.kinds.alpaca,
        data.kinds.messages,
        if data.truncated > 0 {
            format!(", {} truncated to {limit} tokens", data.truncated)
        } else {
            String::new()
        }
    );
    if let Some(s) = signalled(stop) {
        return stopped(s);
    }
    let mut pos = Position::default();
    let mut moments = None;
    let (cfg, tensors) = if let Some(ck) = resumed {
        pos = ck.position;
        moments = Some((ck.m, ck.v));
        (ck.config, ck.params)
    } else if let (Some(dir), Some(loaded)) = (&o.init_adapter, loaded_init) {
        println!("starting from adapter {}", dir.display());
        (loaded.config.clone(), loaded.sorted_tensors())
    } else {
        fresh_adapter(ctx, &model, &tok, &o, &data)?
    };
    let adapter = Adapter::new(ctx, &model, cfg, tensors)?;
    let lr = o.lr.unwrap_or(o.method.default_lr());
    let settings = o.settings(&model, lr);
    let steps_per_epoch = data.len().div_ceil(o.batch_size).div_ceil(o.grad_accum);
    let total = o.steps.unwrap_or(o.epochs * steps_per_epoch);
    if o.resume {
        if pos.step >= total {
            println!(
                "nothing to do: the checkpoint in {} is at step {}, and this run ends at step \
                 {total}; raise --steps or --epochs to train further",
                ckpt_dir.display(),
                pos.step
            );
            return Ok(Outcome::NothingToDo { step: pos.step });
        }
        println!("resuming from {} at step {}", ckpt_dir.display(), pos.step);
    }
    println!(
        "adapter: {} with {} trainable parameters; {total} steps ({steps_per_epoch}/epoch), batch {} x {} accum, lr {lr:.1e}",
        init::method_name(&adapter.config),
        adapter.num_params(),
        o.batch_size,
        o.grad_accum
    );
    let opt = OptimConfig {
        lr,
        weight_decay: o.weight_decay,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        max_grad_norm: o.max_grad_norm,
        schedule: o.schedule,
        warmup_steps: o.warmup_steps,
        total_steps: total,
    };
    let mut tr = Trainer::new(ctx, &model, &adapter, opt)?;
    if let Some((m, v)) = &moments {
        adapter.flat.write(ctx, &adapter.flat.m, m)?;
        adapter.flat.write(ctx, &adapter.flat.v, v)?;
        tr.step = pos.step;
    }
    if let Some(s) = signalled(stop) {
        return stopped(s);
    }

    // Validated: only now is the output folder touched.
    let mut created = Created {
        dir: None,
        metrics: None,
    };
    if !o.out.exists() {
        std::fs::create_dir_all(&o.out).map_err(|source| Error::IoWhile {
            action: "cannot create the output folder".into(),
            path: o.out.clone(),
            source,
        })?;
        created.dir = Some(o.out.clone());
    }
    let metrics = if o.resume {
        MetricsLog::resume(&o.out, pos.step)
    } else {
        MetricsLog::create(&o.out)
    };
    let mut metrics = match metrics {
        Ok(m) => m,
        Err(e) => {
            created.undo();
            return Err(e);
        }
    };
    if !o.resume {
        created.metrics = Some(metrics.path().to_path_buf());
    }
    log::info!("setup took {:.1} s", t_load.elapsed().as_secs_f64());
    let run = Loop {
        ctx,
        o: &o,
        model: &model,
        adapter: &adapter,
        data: &data,
        val: val.as_ref(),
        settings: &settings,
        total,
        stop,
    };
    let mut saved = None;
    let result = run.run(&mut tr, &mut metrics, pos, &mut saved);
    if result.is_err() && saved.is_none() {
        created.undo();
    }
    result
}

fn virtual_tokens(cfg: &AdapterConfig) -> usize {
    match cfg {
        AdapterConfig::Lora(_) => 0,
        AdapterConfig::Prompt(c) => c.num_virtual_tokens,
        AdapterConfig::Prefix(c) => c.num_virtual_tokens,
    }
}

/// The step loop and what it needs.
struct Loop<'a> {
    ctx: &'a Context,
    o: &'a TrainOptions,
    model: &'a Model,
    adapter: &'a Adapter,
    data: &'a Dataset,
    val: Option<&'a Dataset>,
    settings: &'a RunSettings,
    total: usize,
    stop: &'a StopFlag,
}

impl Loop<'_> {
    /// Train from `pos` to `total`; `saved` is the last step saved.
    fn run(
        &self,
        tr: &mut Trainer,
        metrics: &mut MetricsLog,
        mut pos: Position,
        saved: &mut Option<usize>,
    ) -> Result<Outcome> {
        let (ctx, o, total) = (self.ctx, self.o, self.total);
        let bar = progress_bar(o.progress, total as u64, tr.step as u64);
        let say = |line: String| match &bar {
            Some(b) => b.println(line),
            None => println!("{line}"),
        };
        let t0 = Instant::now();
        let (mut tokens_at_log, mut t_log) = (pos.tokens, Instant::now());
        let mut last_loss = f64::NAN;
        let mut last_finite: Option<(usize, f64)> = None;
        while tr.step < total {
            let batches: Vec<Batch> = self.data.batches(o.batch_size, pos.epoch, o.seed);
            let groups: Vec<&[Batch]> = batches.chunks(o.grad_accum).collect();
            if pos.batch_in_epoch >= groups.len() {
                pos.epoch += 1;
                pos.batch_in_epoch = 0;
                continue;
            }
            let micro = groups[pos.batch_in_epoch];
            let log_now = (tr.step + 1).is_multiple_of(o.log_every.max(1))
                || tr.step + 1 == total
                || tr.step == 0;
            let lr_now = tr.opt.lr_at(tr.step);
            let stats = tr.train_step(micro, log_now)?;
            pause_point("after-step");
            pos.tokens += micro
                .iter()
                .map(|b| b.lens.iter().sum::<usize>() as u64)
                .sum::<u64>();
            pos.batch_in_epoch += 1;
            pos.step = tr.step;
            let ep = pos.epoch as f64 + pos.batch_in_epoch as f64 / groups.len() as f64;
            if let Some(st) = stats {
                let dt = t_log.elapsed().as_secs_f64();
                let tps = (pos.tokens - tokens_at_log) as f64 / dt.max(1e-9);
                (tokens_at_log, t_log) = (pos.tokens, Instant::now());
                last_loss = st.loss;
                if st.loss.is_finite() && !st.skipped {
                    last_finite = Some((tr.step, st.loss));
                }
                metrics.train(
                    tr.step,
                    ep,
                    st.loss,
                    lr_now,
                    st.grad_norm,
                    pos.tokens,
                    tps,
                    t0.elapsed().as_secs_f64(),
                )?;
                let msg = format!(
                    "loss {:.4}  lr {lr_now:.2e}  {tps:.0} tok/s{}",
                    st.loss,
                    if st.skipped {
                        "  (non-finite grad: step skipped)"
                    } else {
                        ""
                    }
                );
                match &bar {
                    Some(b) => b.set_message(msg),
                    None => println!("step {}/{total}  {msg}", tr.step),
                }
                if st.skipped_in_a_row >= o.max_bad_steps {
                    if let Some(b) = &bar {
                        b.abandon();
                    }
                    return Err(Error::Diverged(format!(
                        "training diverged: {} steps in a row (to step {}) had a non-finite \
                         loss or gradient and were skipped; {}. {}\n---> HINT: lower --lr \
                         (this run: {:.1e})",
                        st.skipped_in_a_row,
                        tr.step,
                        match last_finite {
                            Some((s, l)) => format!("the last finite loss was {l:.4} at step {s}"),
                            None => "no step had a finite loss".into(),
                        },
                        match saved {
                            Some(s) => format!(
                                "The adapter and checkpoint in {} stay at step {s}",
                                o.out.display()
                            ),
                            None => "Nothing was saved".into(),
                        },
                        self.settings.lr
                    )));
                }
            }
            if let Some(b) = &bar {
                b.set_position(tr.step as u64);
            }
            if o.eval_every > 0 && tr.step.is_multiple_of(o.eval_every) {
                if let Some(v) = self.val {
                    let vl = val_loss(ctx, self.model, self.adapter, v, o.batch_size)?;
                    metrics.val(tr.step, ep, vl)?;
                    say(format!("step {}: val loss {vl:.4}", tr.step));
                }
            }
            let signal = signalled(self.stop);
            if ((o.save_every > 0 && tr.step.is_multiple_of(o.save_every)) || signal.is_some())
                && save_all(ctx, o, tr, self.settings, pos, metrics)?
            {
                *saved = Some(tr.step);
            }
            if let Some(signal) = signal {
                if let Some(b) = &bar {
                    b.abandon();
                }
                match saved {
                    Some(s) if *s == tr.step => println!(
                        "interrupted at step {s}: adapter and checkpoint saved to {} (continue \
                         with --resume)",
                        o.out.display()
                    ),
                    _ => println!("interrupted at step {}: nothing new saved", tr.step),
                }
                return Ok(Outcome::Interrupted {
                    signal,
                    saved_step: *saved,
                });
            }
        }
        if let Some(b) = &bar {
            b.finish();
        }
        if let Some(v) = self.val {
            let vl = val_loss(ctx, self.model, self.adapter, v, o.batch_size)?;
            metrics.val(tr.step, pos.epoch as f64, vl)?;
            println!("val loss {vl:.4} (ppl {:.2})", vl.exp());
        }
        if !save_all(ctx, o, tr, self.settings, pos, metrics)? {
            return Err(Error::Diverged(format!(
                "the last step was skipped for a non-finite gradient: the final adapter was \
                 not written{}",
                match saved {
                    Some(s) => format!("; {} holds step {s}", o.out.display()),
                    None => String::new(),
                }
            )));
        }
        *saved = Some(tr.step);
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "done: {} steps in {secs:.1} s, final loss {last_loss:.4}; adapter in {}, loss plot {}",
            tr.step,
            o.out.display(),
            o.out.join("loss.svg").display()
        );
        Ok(Outcome::Done { steps: tr.step })
    }
}

fn val_loss(
    ctx: &Context,
    model: &Model,
    adapter: &Adapter,
    v: &Dataset,
    bs: usize,
) -> Result<f64> {
    let (sum, n) = crate::train::eval::eval_batches(ctx, model, adapter, &v.in_order(bs))?;
    Ok(sum / n.max(1) as f64)
}

fn progress_bar(enabled: bool, total: u64, pos: u64) -> Option<indicatif::ProgressBar> {
    if !enabled {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    b.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_position(pos);
    Some(b)
}

/// What `train`, `generate` and `eval` print at load.
pub fn print_model(ctx: &Context, model: &Model) {
    println!(
        "model: {:?}, {} layers, hidden {}, {:.1} M parameters, {:.0} MiB of GPU memory for weights",
        model.cfg.arch,
        model.cfg.layers,
        model.cfg.hidden,
        model.params as f64 / 1e6,
        model.weight_bytes() as f64 / (1 << 20) as f64
    );
    println!("device: {} ({:?})", ctx.info.name, ctx.info.backend);
}
