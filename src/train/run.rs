//! `wgtune train`: data, adapter, the step loop with progress, metrics,
//! validation, checkpoints (also on Ctrl-C), loss plots and the final
//! PEFT-format adapter.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::adapters::adapter::HostTensors;
use crate::adapters::init::{self, LoraInit, PrefixInit, PromptInit};
use crate::adapters::peft_io::{self, AdapterConfig, LoraConfig, PrefixConfig, PromptConfig};
use crate::adapters::Adapter;
use crate::error::{Error, Result};
use crate::gpu::Context;
use crate::model::tokenizer::Tokenizer;
use crate::model::Model;
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
            lc.target_modules = o.lora_targets.clone();
            if lc.target_modules.iter().any(|t| t == "all-linear") {
                // Saved resolved, as PEFT does: the modules' own names.
                let mut names: Vec<String> = model
                    .linears()
                    .iter()
                    .map(|(_, l)| l.name.rsplit('.').next().unwrap_or("").to_string())
                    .collect();
                names.sort();
                names.dedup();
                lc.target_modules = names;
            }
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
            if !(lc.lora_alpha > 0.0) {
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

/// Files of a resumable checkpoint in `<out>/checkpoint`.
fn save_checkpoint(
    ctx: &Context,
    dir: &Path,
    tr: &Trainer,
    epoch: usize,
    batch_in_epoch: usize,
) -> Result<()> {
    let ad = tr.adapter;
    let params = ad.flat.read(ctx, &ad.flat.params)?;
    let (m, v) = tr.moments()?;
    let mut all: HostTensors = Vec::new();
    for (prefix, set) in [("param.", params), ("m.", m), ("v.", v)] {
        for (n, s, d) in set {
            all.push((format!("{prefix}{n}"), s, d));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let bytes = serialize(&all)?;
    peft_io::write_atomic(&dir.join("state.safetensors"), &bytes)?;
    let state = serde_json::json!({
        "step": tr.step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
        "adapter_config": ad.config.to_json(),
    });
    peft_io::write_atomic(
        &dir.join("trainer_state.json"),
        serde_json::to_string_pretty(&state).unwrap().as_bytes(),
    )
}

fn serialize(t: &HostTensors) -> Result<Vec<u8>> {
    use safetensors::tensor::TensorView;
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), bytemuck::cast_slice(d).to_vec()))
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            Ok((
                n.clone(),
                TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .map_err(|e| Error::invalid("checkpoint", e.to_string()))?,
            ))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, None).map_err(|e| Error::invalid("checkpoint", e.to_string()))
}

fn load_checkpoint(
    dir: &Path,
) -> Result<(
    AdapterConfig,
    HostTensors,
    HostTensors,
    HostTensors,
    usize,
    usize,
    usize,
)> {
    let sp = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::Io {
        path: sp.clone(),
        source: e,
    })?;
    let st: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: sp.clone(),
        message: e.to_string(),
    })?;
    let cfg = AdapterConfig::from_json_str(&sp, &st["adapter_config"].to_string())?;
    let wp = dir.join("state.safetensors");
    let bytes = std::fs::read(&wp).map_err(|e| Error::Io {
        path: wp.clone(),
        source: e,
    })?;
    let stt = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Weights {
        path: wp.clone(),
        message: e.to_string(),
    })?;
    let (mut p, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
    let mut names: Vec<String> = stt.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    for n in names {
        let t = stt.tensor(&n).map_err(|e| Error::Weights {
            path: wp.clone(),
            message: e.to_string(),
        })?;
        let d: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let s = t.shape().to_vec();
        if let Some(k) = n.strip_prefix("param.") {
            p.push((k.to_string(), s, d));
        } else if let Some(k) = n.strip_prefix("m.") {
            m.push((k.to_string(), s, d));
        } else if let Some(k) = n.strip_prefix("v.") {
            v.push((k.to_string(), s, d));
        }
    }
    let num = |k: &str| st[k].as_u64().unwrap_or(0) as usize;
    Ok((
        cfg,
        p,
        m,
        v,
        num("step"),
        num("epoch"),
        num("batch_in_epoch"),
    ))
}

/// Write the final (or interim) adapter, checkpoint and loss plot.
fn save_all(
    ctx: &Context,
    o: &TrainOptions,
    tr: &Trainer,
    epoch: usize,
    bi: usize,
    metrics: &MetricsLog,
) -> Result<()> {
    let tensors = tr.adapter.peft_tensors(ctx)?;
    peft_io::save_adapter(&o.out, &tr.adapter.config, &tensors)?;
    save_checkpoint(ctx, &o.out.join("checkpoint"), tr, epoch, bi)?;
    let hist = report::read_loss_history(metrics.path())?;
    report::write_loss_plot(
        &o.out.join("loss.svg"),
        "wgtune training loss",
        &hist.train,
        &hist.val,
    )
}

/// Run `wgtune train`.
pub fn train(ctx: &Context, o: &TrainOptions) -> Result<()> {
    let t_load = Instant::now();
    let dir = crate::model::hub::resolve_model(&o.model)?;
    let model = Model::load(ctx, &dir)?;
    let tok = Tokenizer::load(&dir)?;
    print_model(ctx, &model);
    if o.batch_size == 0 || o.grad_accum == 0 {
        return Err(Error::invalid(
            "train",
            "--batch-size and --grad-accum must be at least 1",
        ));
    }
    // Leave room for the adapter's rows in front of the tokens.
    let adapter_rows = if o.method == Method::Lora {
        0
    } else {
        o.num_virtual_tokens
    };
    let room = model.cfg.max_positions.saturating_sub(adapter_rows);
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
    std::fs::create_dir_all(&o.out).map_err(|e| Error::Io {
        path: o.out.clone(),
        source: e,
    })?;
    let ckpt = o.out.join("checkpoint");
    let mut start = (0usize, 0usize, 0usize);
    let mut moments = None;
    let (cfg, tensors) = if o.resume {
        let (cfg, p, m, v, step, epoch, bi) = load_checkpoint(&ckpt)?;
        println!("resuming from {} at step {step}", ckpt.display());
        start = (step, epoch, bi);
        moments = Some((m, v));
        (cfg, p)
    } else if let Some(dir) = &o.init_adapter {
        let loaded = peft_io::load_adapter(dir)?;
        println!("starting from adapter {}", dir.display());
        (loaded.config.clone(), loaded.sorted_tensors())
    } else {
        fresh_adapter(ctx, &model, &tok, o, &data)?
    };
    let adapter = Adapter::new(ctx, &model, cfg, tensors)?;
    let lr = o.lr.unwrap_or(o.method.default_lr());
    let steps_per_epoch = data.len().div_ceil(o.batch_size).div_ceil(o.grad_accum);
    let total = o.steps.unwrap_or(o.epochs * steps_per_epoch).max(1);
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
        tr.step = start.0;
    }
    let mut metrics = if o.resume {
        MetricsLog::resume(&o.out, start.0)?
    } else {
        MetricsLog::create(&o.out)?
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let s = stop.clone();
        // A second Ctrl-C while saving falls through to the default handler.
        let _ = ctrlc::set_handler(move || {
            if s.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }
    log::info!("setup took {:.1} s", t_load.elapsed().as_secs_f64());
    let bar = progress_bar(o.progress, total as u64, tr.step as u64);
    let t0 = Instant::now();
    let (mut tokens, mut tokens_at_log, mut t_log) = (0u64, 0u64, Instant::now());
    let mut last_loss = f64::NAN;
    let (mut epoch, mut bi) = (start.1, start.2);
    'outer: while tr.step < total {
        let batches: Vec<Batch> = data.batches(o.batch_size, epoch, o.seed);
        let groups: Vec<&[Batch]> = batches.chunks(o.grad_accum).collect();
        while bi < groups.len() {
            if tr.step >= total {
                break 'outer;
            }
            let micro = groups[bi];
            let log_now =
                (tr.step + 1) % o.log_every.max(1) == 0 || tr.step + 1 == total || tr.step == 0;
            let lr_now = tr.opt.lr_at(tr.step);
            let stats = tr.train_step(micro, log_now)?;
            tokens += micro
                .iter()
                .map(|b| b.lens.iter().sum::<usize>() as u64)
                .sum::<u64>();
            bi += 1;
            let ep = epoch as f64 + bi as f64 / groups.len() as f64;
            if let Some(st) = stats {
                let dt = t_log.elapsed().as_secs_f64();
                let tps = (tokens - tokens_at_log) as f64 / dt.max(1e-9);
                (tokens_at_log, t_log) = (tokens, Instant::now());
                last_loss = st.loss;
                metrics.train(
                    tr.step,
                    ep,
                    st.loss,
                    lr_now,
                    st.grad_norm,
                    tokens,
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
            }
            if let Some(b) = &bar {
                b.set_position(tr.step as u64);
            }
            if o.eval_every > 0 && tr.step % o.eval_every == 0 {
                if let Some(v) = &val {
                    let vl = val_loss(ctx, &model, &adapter, v, o.batch_size)?;
                    metrics.val(tr.step, ep, vl)?;
                    let line = format!("step {}: val loss {vl:.4}", tr.step);
                    match &bar {
                        Some(b) => b.println(line),
                        None => println!("{line}"),
                    }
                }
            }
            let interrupted = stop.load(Ordering::SeqCst);
            if (o.save_every > 0 && tr.step % o.save_every == 0) || interrupted {
                save_all(ctx, o, &tr, epoch, bi, &metrics)?;
            }
            if interrupted {
                if let Some(b) = &bar {
                    b.abandon();
                }
                println!(
                    "interrupted: adapter and checkpoint saved to {} (resume with --resume)",
                    o.out.display()
                );
                return Ok(());
            }
        }
        epoch += 1;
        bi = 0;
    }
    if let Some(b) = &bar {
        b.finish();
    }
    if let Some(v) = &val {
        let vl = val_loss(ctx, &model, &adapter, v, o.batch_size)?;
        metrics.val(tr.step, epoch as f64, vl)?;
        println!("val loss {vl:.4} (ppl {:.2})", vl.exp());
    }
    save_all(ctx, o, &tr, epoch, bi, &metrics)?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "done: {} steps in {secs:.1} s ({:.0} tok/s), final loss {last_loss:.4}; adapter in {}, loss plot {}",
        tr.step,
        tokens as f64 / secs.max(1e-9),
        o.out.display(),
        o.out.join("loss.svg").display()
    );
    Ok(())
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
