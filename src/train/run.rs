//! `wgtune train`: data, adapter, the step loop (progress through the
//! `Progress` trait), metrics, validation, checkpoints (also on a signal),
//! loss plots and the final PEFT-format adapter. The options are in
//! `options`, the resume rules in `resume`.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use crate::adapters::adapter::{match_targets, resolve_targets, HostTensors};
use crate::adapters::init::{self, LoraInit, PrefixInit, PromptInit};
use crate::adapters::peft_io::{self, AdapterConfig, LoraConfig, PrefixConfig, PromptConfig};
use crate::adapters::Adapter;
use crate::clock::Stopwatch;
use crate::error::{Error, Result};
use crate::fsio::{pause_point, write_atomic};
use crate::gpu::Context;
use crate::model::config::ModelConfig;
use crate::model::tokenizer::Tokenizer;
use crate::model::transformer::Linear;
use crate::model::Model;
use crate::train::base_id::base_model_id;
use crate::train::checkpoint::{self, Checkpoint, EvalState, Position, RunSettings};
use crate::train::data::{Batch, Dataset};
use crate::train::memory::{
    does_not_fit, lora_first_layer, plan_keep, suggestions, Budget, FrozenTensors, MemoryPlan,
    PlanInput,
};
use crate::train::options::Method;
use crate::train::options::{MethodOptions, PrefixInitKind, PromptInitKind, TrainOptions};
use crate::train::outdir;
use crate::train::packing;
use crate::train::plot::write_loss_plot;
use crate::train::progress::{Progress, StepLog};
use crate::train::report::{self, MetricsLog, TrainRecord, ValRecord};
use crate::train::resume::{
    adapter_conflicts, adopt_settings, check_adapter_base, conflict_error, settings_conflicts,
};
use crate::train::trainer::{bucket_shape, OptimConfig, Trainer};

/// Build the adapter config and initial tensors for a fresh run, and for
/// LoRA the layers it adapts.
fn fresh_adapter<'m>(
    ctx: &Context,
    model: &'m Model,
    tok: &Tokenizer,
    o: &TrainOptions,
    data: &Dataset,
    base: &str,
) -> Result<(AdapterConfig, HostTensors, Vec<&'m Linear>)> {
    let cfg = &model.cfg;
    let mut layers = Vec::new();
    let (config, tensors) = match &o.method {
        MethodOptions::Lora(l) => {
            // Matched once: the init, the saved target list and the adapter use it.
            layers = match_targets(model, &l.targets)?;
            let mut lc = LoraConfig::new(l.r, l.alpha, &[]);
            if l.num_layers.is_some() {
                // The top N layers, as PEFT's list of indices.
                let from = lora_first_layer(cfg, l.num_layers)?;
                lc.layers_to_transform = Some((from..cfg.layers).collect());
            }
            lc.target_modules = if l.targets.iter().any(|t| t == "all-linear") {
                // Saved resolved to module names, as PEFT saves it; sorted.
                let mut names: Vec<String> = layers
                    .iter()
                    .filter_map(|l| l.name.rsplit('.').next().map(str::to_string))
                    .collect();
                names.sort();
                names.dedup();
                names
            } else {
                resolve_targets(
                    &l.targets,
                    model.linears().iter().map(|(_, l)| l.name.as_str()),
                )?
            };
            layers.retain(|lin| lc.transforms_layer(&lin.name));
            lc.lora_dropout = l.dropout;
            lc.use_rslora = l.rslora;
            lc.base_model_name_or_path = Some(base.to_string());
            if l.init == LoraInit::Gaussian {
                lc.init_lora_weights = serde_json::Value::String("gaussian".into());
            }
            let t = init::init_lora(&layers, &lc, l.init, o.seed);
            (AdapterConfig::Lora(lc), t)
        }
        MethodOptions::Prompt(p) => {
            let init = match p.init {
                PromptInitKind::Text => {
                    let text = p.init_text.clone().ok_or_else(|| {
                        Error::invalid("train", "--prompt-init text needs --prompt-init-text")
                    })?;
                    // PEFT tokenizes the init text with the special tokens.
                    PromptInit::Text(tok.encode(&text, true)?)
                }
                PromptInitKind::Vocab => PromptInit::Vocab,
                PromptInitKind::Random => PromptInit::Random,
            };
            let pc = PromptConfig {
                num_virtual_tokens: p.num_virtual_tokens,
                token_dim: cfg.hidden,
                num_attention_heads: cfg.heads,
                num_layers: cfg.layers,
                prompt_tuning_init: match &init {
                    PromptInit::Text(_) => "TEXT",
                    PromptInit::Vocab => "SAMPLE_VOCAB",
                    PromptInit::Random => "RANDOM",
                }
                .into(),
                prompt_tuning_init_text: p.init_text.clone(),
                tokenizer_name_or_path: Some(base.to_string()),
                base_model_name_or_path: Some(base.to_string()),
            };
            let t = init::init_prompt(ctx, model, &pc, &init, o.seed)?;
            (AdapterConfig::Prompt(pc), t)
        }
        MethodOptions::Prefix(p) => {
            let init = match p.init {
                PrefixInitKind::Zero => PrefixInit::Zero,
                PrefixInitKind::Random => PrefixInit::Random(1.0),
                PrefixInitKind::Text => {
                    // Without a text, the first training example's tokens.
                    let ids = match &p.init_text {
                        Some(t) => tok.encode(t, true)?,
                        None => data.examples[0].ids.clone(),
                    };
                    PrefixInit::Text(ids)
                }
            };
            let pc = PrefixConfig {
                num_virtual_tokens: p.num_virtual_tokens,
                token_dim: cfg.kv_dim(),
                num_attention_heads: cfg.kv_heads,
                num_layers: cfg.layers,
                encoder_hidden_size: Some(p.encoder_hidden_size.unwrap_or(cfg.hidden)),
                prefix_projection: p.projection,
                base_model_name_or_path: Some(base.to_string()),
            };
            let t = init::init_prefix(ctx, model, &pc, &init, o.seed)?;
            (AdapterConfig::Prefix(pc), t)
        }
    };
    Ok((config, tensors, layers))
}

/// How a run ended, errors aside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Trained to the last step; the adapter is saved.
    Done { steps: usize },
    /// `--resume` found the checkpoint at or past the last step: nothing
    /// was trained or written.
    NothingToDo { step: usize },
    /// `--early-stopping-patience` stopped it at `step`, saved like a
    /// normal end; `best_step` had the lowest validation loss.
    EarlyStopped {
        step: usize,
        best_step: Option<usize>,
    },
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

/// What this run created in the output folder, removed again when the run
/// fails before it saved anything.
struct Created {
    dir: Option<PathBuf>,
    metrics: Option<PathBuf>,
    record: Option<PathBuf>,
}

impl Created {
    fn undo(&self) {
        for f in [&self.metrics, &self.record].into_iter().flatten() {
            let _ = std::fs::remove_file(f);
        }
        if let Some(d) = &self.dir {
            // Only if empty: never remove what someone else put there.
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Validation bookkeeping: what the checkpoint keeps ([`EvalState`], the
/// best adapter's tensors) and this process's last evaluation.
#[derive(Default)]
struct Evals {
    state: EvalState,
    /// (step, loss) of the last validation this process ran: the end of
    /// the run reuses it instead of evaluating (and logging) a step twice.
    last: Option<(usize, f64)>,
    /// PEFT tensors of the best step's adapter, under `--keep-best`.
    best_tensors: HostTensors,
}

/// Write the adapter, the checkpoint `checkpoint-N` (N = the step, with
/// the step's adapter beside its state) and the loss plot, then drop
/// checkpoints past `--save-total-limit`. Returns false (and writes
/// nothing) when the last step was skipped for a non-finite gradient: a
/// diverging run must not replace the last good state.
fn save_all(
    ctx: &Context,
    o: &TrainOptions,
    tr: &Trainer,
    settings: &RunSettings,
    pos: Position,
    metrics: &MetricsLog,
    ev: &Evals,
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
    let fp = Some(tr.model.fingerprint);
    peft_io::save_adapter_with(&o.out, &ad.config, &tensors, fp)?;
    crate::train::template::save_beside_adapter(&o.out, o.data_opts.template.as_ref())?;
    pause_point("between-adapter-and-checkpoint");
    let (m, v) = tr.moments()?;
    let ck = Checkpoint {
        position: pos,
        settings: settings.clone(),
        config: ad.config.clone(),
        params: ad.flat.read(ctx, &ad.flat.params)?,
        m,
        v,
        eval: ev.state.clone(),
        best: ev.best_tensors.clone(),
    };
    checkpoint::save_numbered(&o.out, &ck, |d| {
        peft_io::save_adapter_with(d, &ad.config, &tensors, fp)
    })?;
    if let Some(k) = o.save_total_limit {
        // Never the one just written, nor the best step's.
        let mut protect = vec![pos.step];
        if let (true, Some((s, _))) = (o.keep_best, ev.state.best) {
            protect.push(s);
        }
        let removed = checkpoint::prune(&o.out, k, &protect);
        if !removed.is_empty() {
            log::info!("--save-total-limit {k}: removed the checkpoints of steps {removed:?}");
        }
    }
    let hist = report::read_loss_history(metrics.path())?;
    write_loss_plot(
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
pub fn train(
    ctx: &Context,
    o: &TrainOptions,
    stop: &StopFlag,
    progress: &mut dyn Progress,
) -> Result<Outcome> {
    let t_load = Stopwatch::start();
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
    // A new run never silently replaces an earlier one.
    outdir::check(&o.out, o.resume, o.overwrite)?;
    // A data folder's valid file counts as validation data.
    let (train_path, val_path) =
        crate::train::rows::train_and_valid(&o.data, o.val_data.as_deref())?;
    if o.keep_best && val_path.is_none() {
        return Err(Error::invalid(
            "--keep-best",
            "needs validation data (--val-data, or valid.jsonl in the --data folder): the best \
             adapter is the one with the lowest validation loss",
        ));
    }
    if let Some(k) = o.early_stopping_patience {
        if val_path.is_none() || o.eval_every == 0 {
            return Err(Error::invalid(
                "--early-stopping-patience",
                format!(
                    "needs validation data (--val-data, or valid.jsonl in the --data folder) and \
                     --eval-every N: the run stops after {k} evaluations without a lower \
                     validation loss"
                ),
            ));
        }
    }
    for d in [o.out.clone(), o.out.join(checkpoint::LEGACY_DIR)] {
        let n = checkpoint::remove_stale_temp_files(&d);
        if n > 0 {
            log::info!(
                "{}: removed {n} temp files of an interrupted run",
                d.display()
            );
        }
    }
    // A missing or torn checkpoint is an error before anything loads.
    let ckpt_dir = if o.resume {
        checkpoint::latest(&o.out)?
    } else {
        o.out.join(checkpoint::LEGACY_DIR)
    };
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
    // The config, tokenizer and data first: the memory plan needs the
    // longest row before anything goes to the GPU.
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let tok = Tokenizer::load(&dir)?;
    // `auto` becomes on or off here, so the checkpoint records the choice.
    o.data_opts.chat_template = o.data_opts.chat_template.resolve(&tok)?;
    let loaded_init = match &o.init_adapter {
        Some(d) => Some(peft_io::load_adapter(d)?),
        None => None,
    };
    // A resumed run's batch and length are the checkpoint's: they shape the
    // data and the plan (contradicting options are errors once the model
    // is loaded, below).
    let mut o_eff = o.clone();
    if let Some(ck) = &resumed {
        adopt_settings(&mut o_eff, &ck.settings, &ck.config);
    }
    let adapter_rows = match (&o.method, &resumed, &loaded_init) {
        (MethodOptions::Lora(_), _, _) => 0,
        (_, Some(ck), _) => virtual_tokens(&ck.config),
        (_, _, Some(l)) => virtual_tokens(&l.config),
        (m, _, _) => m.num_virtual_tokens(),
    };
    // One row must remain to predict the next token.
    if adapter_rows + 2 > cfg.max_positions {
        return Err(Error::invalid(
            "train",
            format!(
                "--num-virtual-tokens {adapter_rows} leaves no room for tokens: the model has {} \
                 positions, and the virtual tokens take theirs from the same budget",
                cfg.max_positions
            ),
        ));
    }
    if o.packing && matches!(o_eff.method.method(), Method::Prompt) {
        return Err(Error::invalid(
            "train",
            "--packing does not work with --method prompt: its virtual tokens go in front of \
             one row, not of each packed row; use --method lora or prefix, or drop --packing",
        ));
    }
    let room = cfg.max_positions - adapter_rows;
    let mut dopts = o_eff.data_opts.clone();
    let limit = dopts.max_seq_len.unwrap_or(room).min(room);
    dopts.max_seq_len = Some(limit);
    let data = Dataset::load(&train_path, &tok, &dopts)?;
    if data.truncated > 0 || data.dropped > 0 {
        log::warn!(
            "{}: {} rows truncated to {limit} tokens, {} dropped (no target left)",
            train_path.display(),
            data.truncated,
            data.dropped
        );
    }
    if let Some(w) = data.length_warning() {
        log::warn!("{w}");
    }
    let val = match &val_path {
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
        data.kinds.messages + data.kinds.sharegpt,
        if data.truncated > 0 {
            format!(", {} truncated to {limit} tokens", data.truncated)
        } else {
            String::new()
        }
    );
    if data.kinds.prompt_completion + data.kinds.alpaca > 0 {
        println!(
            "chat template for prompt/completion and alpaca rows: {} (--chat-template)",
            o_eff.data_opts.chat_template.name()
        );
    }
    if o.packing {
        let cap = pack_len(&o_eff, &data, room);
        let st = packing::stats(&data, o_eff.batch_size, 0, o_eff.seed, cap);
        println!(
            "packing: {} rows into {} sequences of up to {cap} tokens; batches {} -> {}, \
             padding tokens {} -> {}",
            st.rows,
            st.sequences,
            st.batches_before,
            st.batches_after,
            st.padded_before,
            st.padded_after
        );
    }
    if let Some(s) = signalled(stop) {
        return stopped(s);
    }
    let memory = plan_memory(ctx, &o_eff, &cfg, &dir, &data, adapter_rows)?;
    if !memory.plan.fits() {
        return Err(does_not_fit(&memory.plan, &memory.hints));
    }
    println!("{}", memory.plan.render().trim_end());
    if let Some(s) = signalled(stop) {
        return stopped(s);
    }
    let model = Model::load_with(ctx, &dir, o.weights)?;
    print_model(ctx, &model);
    pause_point("model-loaded");
    if let Some(s) = signalled(stop) {
        return stopped(s);
    }

    // The adapter: from the checkpoint, an initial adapter, or new.
    let ckpt_path = ckpt_dir.join(checkpoint::STATE_FILE);
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
        let lr_given = o.lr();
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
    let mut pos = Position::default();
    let mut moments = None;
    let mut evals = Evals::default();
    let adapter = if let Some(ck) = resumed {
        pos = ck.position;
        moments = Some((ck.m, ck.v));
        evals.state = ck.eval;
        evals.best_tensors = ck.best;
        Adapter::new(ctx, &model, ck.config, ck.params)?
    } else if let (Some(dir), Some(loaded)) = (&o.init_adapter, loaded_init) {
        println!("starting from adapter {}", dir.display());
        Adapter::new(ctx, &model, loaded.config.clone(), loaded.sorted_tensors())?
    } else {
        let base = base_model_id(&o.model, &dir);
        let (cfg, tensors, layers) = fresh_adapter(ctx, &model, &tok, &o, &data, &base)?;
        Adapter::on_layers(ctx, &model, cfg, tensors, &layers)?
    };
    let lr = o.lr();
    let settings = o.settings(model.fingerprint, lr);
    // Packed: the first epoch's sequences (first-fit varies a little with
    // the shuffle; the loop moves on when an epoch runs out).
    let rows_per_epoch = if o.packing {
        let cap = pack_len(&o, &data, room);
        packing::epoch_sequences(&data, 0, o.seed, cap).len()
    } else {
        data.len()
    };
    let steps_per_epoch = rows_per_epoch.div_ceil(o.batch_size).div_ceil(o.grad_accum);
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
        if let (Some(k), Some((s, b))) = (o.early_stopping_patience, evals.state.best) {
            if evals.state.since_best >= k {
                println!(
                    "nothing to do: the run stopped early at step {}: {} evaluations without a \
                     validation loss below {b:.4} (step {s}); raise --early-stopping-patience \
                     to train further",
                    pos.step, evals.state.since_best
                );
                return Ok(Outcome::NothingToDo { step: pos.step });
            }
        }
        println!("resuming from {} at step {}", ckpt_dir.display(), pos.step);
    }
    // LoRA's targets may be the model's default: say which.
    let method = match &adapter.config {
        AdapterConfig::Lora(c) => format!(
            "{} on {}",
            init::method_name(&adapter.config),
            c.target_modules.join(",")
        ),
        c => init::method_name(c).to_string(),
    };
    println!(
        "adapter: {method} with {} trainable parameters; {total} steps ({steps_per_epoch}/epoch), batch {} x {} accum, lr {lr:.1e}",
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
    tr.set_grad_checkpoint(o.grad_checkpoint);
    tr.set_packing(o.packing)?;
    // The step buffers for the data's largest shape, once (what the plan counted).
    tr.reserve(memory.b, memory.t, memory.r)?;
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
        record: None,
    };
    if o.overwrite && o.out.is_dir() {
        outdir::clear(&o.out)?;
    }
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
        // A new run's checkpoints and best adapter replace an old run's.
        let old = checkpoint::list(&o.out).into_iter().map(|(_, d)| d);
        for d in old.chain([
            o.out.join(checkpoint::LEGACY_DIR),
            o.out.join(checkpoint::BEST_DIR),
        ]) {
            if d.is_dir() {
                log::info!("{}: removed (a new run in this folder)", d.display());
                let _ = std::fs::remove_dir_all(&d);
            }
        }
    } else if o.keep_best {
        restore_best(&o.out, &adapter, model.fingerprint, &evals)?;
    }
    if let Some(rec) = &o.record {
        let path = o.out.join(outdir::ARGS_FILE);
        let mut text = serde_json::to_string_pretty(rec).unwrap_or_default();
        text.push('\n');
        if let Err(e) = write_atomic(&path, text.as_bytes()) {
            created.undo();
            return Err(e);
        }
        if !o.resume {
            created.record = Some(path);
        }
    }
    log::info!("setup took {:.1} s", t_load.secs());
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
    let result = run.run(&mut tr, &mut metrics, pos, &mut saved, &mut evals, progress);
    if result.is_err() && saved.is_none() {
        created.undo();
    }
    result
}

/// The memory plan of a run and, when it does not fit, what would.
struct Memory {
    plan: MemoryPlan,
    hints: Vec<String>,
    b: usize,
    t: usize,
    r: usize,
}

/// The largest step shape `data` can make: `batch_size` rows of its
/// longest row, with the targets of its `batch_size` richest rows.
fn largest_step(
    data: &Dataset,
    batch_size: usize,
    nv: usize,
    cap_t: usize,
) -> (usize, usize, usize) {
    let b = batch_size.min(data.len()).max(1);
    let t = data.examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    // Prompt tuning also trains each row's first token.
    let first = |e: &crate::train::data::Example| {
        usize::from(nv > 0 && e.labels.first().is_some_and(|&l| l != -100))
    };
    let mut per_row: Vec<usize> = data
        .examples
        .iter()
        .map(|e| e.n_targets() + first(e))
        .collect();
    per_row.sort_unstable_by(|a, b| b.cmp(a));
    let targets = per_row.iter().take(b).sum();
    bucket_shape(b, t, targets, nv, cap_t)
}

fn plan_memory(
    ctx: &Context,
    o: &TrainOptions,
    cfg: &ModelConfig,
    dir: &Path,
    data: &Dataset,
    adapter_rows: usize,
) -> Result<Memory> {
    let (nv, p) = match o.method.method() {
        Method::Prompt => (adapter_rows, 0),
        Method::Prefix => (0, adapter_rows),
        Method::Lora => (0, 0),
    };
    let cap_t = cfg.max_positions.saturating_sub(nv + p);
    let (b, t, r) = if o.packing {
        // Packed sequences: up to the pack length, every token a target.
        let (b, t) = (
            o.batch_size.min(data.len()).max(1),
            pack_len(o, data, cap_t),
        );
        bucket_shape(b, t, b * t, nv, cap_t)
    } else {
        largest_step(data, o.batch_size, nv, cap_t)
    };
    let frozen = FrozenTensors::of_folder(cfg, dir)?;
    let input = PlanInput {
        cfg,
        frozen: &frozen,
        mode: o.weights,
        method: &o.method,
        b,
        t,
        r,
        nv,
        p,
        keep: plan_keep(cfg, &o.method, o.grad_checkpoint)?,
    };
    let budget = Budget::of(Some(ctx.info.device_type), Some(ctx.limits.max_buffer_size));
    let plan = MemoryPlan::new(&input, budget.clone())?;
    let hints = if plan.fits() {
        Vec::new()
    } else {
        suggestions(&input, &budget, o.grad_accum)?
    };
    Ok(Memory {
        plan,
        hints,
        b,
        t,
        r,
    })
}

/// The length packed sequences fill: --max-seq-len (within the `room` the
/// model leaves), else the longest row, so memory stays that of the
/// unpacked run.
fn pack_len(o: &TrainOptions, data: &Dataset, room: usize) -> usize {
    let longest = data.max_len().max(1);
    o.data_opts
        .max_seq_len
        .map_or(longest, |m| m.min(room).max(1))
}

fn virtual_tokens(cfg: &AdapterConfig) -> usize {
    match cfg {
        AdapterConfig::Lora(_) => 0,
        AdapterConfig::Prompt(c) => c.num_virtual_tokens,
        AdapterConfig::Prefix(c) => c.num_virtual_tokens,
    }
}

/// On a resume with `--keep-best`, make `<out>/best` the checkpoint's best
/// step again: a run killed after a later best left one from the steps the
/// resume repeats.
fn restore_best(out: &Path, adapter: &Adapter, fingerprint: u64, ev: &Evals) -> Result<()> {
    let Some((step, loss)) = ev.state.best else {
        return Ok(());
    };
    if checkpoint::best_step(out) == Some(step) {
        return Ok(());
    }
    if ev.best_tensors.is_empty() {
        log::warn!(
            "the checkpoint records the best validation loss {loss:.4} at step {step} but not \
             its adapter (that run had no --keep-best): {} will hold the best adapter from \
             the next lower loss on",
            out.join(checkpoint::BEST_DIR).display()
        );
        return Ok(());
    }
    checkpoint::save_best(out, step, loss, |d| {
        peft_io::save_adapter_with(d, &adapter.config, &ev.best_tensors, Some(fingerprint))
    })
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

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

impl Loop<'_> {
    /// Validation loss at the trainer's step, once per step: a step already
    /// evaluated returns its loss without running or logging it again.
    /// Tracks the best loss (and under `--keep-best` writes its adapter to
    /// `<out>/best`) and early stopping's counter.
    fn evaluate(
        &self,
        step: usize,
        epoch: f64,
        metrics: &mut MetricsLog,
        ev: &mut Evals,
        progress: &mut dyn Progress,
    ) -> Result<Option<f64>> {
        let Some(v) = self.val else {
            return Ok(None);
        };
        if let Some((s, vl)) = ev.last {
            if s == step {
                return Ok(Some(vl));
            }
        }
        let vl = val_loss(self.ctx, self.model, self.adapter, v, self.o.batch_size)?;
        metrics.val(&ValRecord {
            step,
            epoch,
            val_loss: vl,
        })?;
        ev.last = Some((step, vl));
        let improved = vl.is_finite()
            && match ev.state.best {
                Some((_, b)) => vl < b,
                None => true,
            };
        if improved {
            ev.state.best = Some((step, vl));
            ev.state.since_best = 0;
            if self.o.keep_best {
                let (ad, fp) = (self.adapter, self.model.fingerprint);
                let t = ad.peft_tensors(self.ctx)?;
                checkpoint::save_best(&self.o.out, step, vl, |d| {
                    peft_io::save_adapter_with(d, &ad.config, &t, Some(fp))
                })?;
                ev.best_tensors = t;
            }
        } else {
            ev.state.since_best += 1;
        }
        let best = match ev.state.best {
            Some((s, b)) => format!("  best_val_loss {b:.4}  best_step {s}"),
            None => String::new(),
        };
        progress.line(&format!(
            "step {step}/{}  val_loss {vl:.4}{best}",
            self.total
        ));
        Ok(Some(vl))
    }

    /// Train from `pos` to `total`; `saved` is the last step saved.
    fn run(
        &self,
        tr: &mut Trainer,
        metrics: &mut MetricsLog,
        mut pos: Position,
        saved: &mut Option<usize>,
        ev: &mut Evals,
        progress: &mut dyn Progress,
    ) -> Result<Outcome> {
        let (ctx, o, total) = (self.ctx, self.o, self.total);
        // A resume past an early stop runs on with a larger patience.
        ev.state.stopped_early = false;
        progress.start(tr.step, total);
        let t0 = Stopwatch::start();
        let (start_step, start_tokens, start_targets) = (tr.step, pos.tokens, pos.target_tokens);
        let (mut tokens_at_log, mut targets_at_log) = (pos.tokens, pos.target_tokens);
        let mut t_log = Stopwatch::start();
        // Prompt tuning also trains each row's first token.
        let nv = match &self.adapter.config {
            AdapterConfig::Prompt(c) => c.num_virtual_tokens,
            _ => 0,
        };
        let mut last_loss = f64::NAN;
        let mut last_finite: Option<(usize, f64)> = None;
        let mut ep = pos.epoch as f64;
        while tr.step < total {
            let batches: Vec<Batch> = if o.packing {
                let cap = pack_len(o, self.data, tr.max_tokens());
                packing::packed_batches(self.data, o.batch_size, pos.epoch, o.seed, cap)
            } else {
                self.data.batches(o.batch_size, pos.epoch, o.seed)
            };
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
            pos.target_tokens += micro.iter().map(|b| b.loss_targets(nv) as u64).sum::<u64>();
            pos.batch_in_epoch += 1;
            pos.step = tr.step;
            ep = pos.epoch as f64 + pos.batch_in_epoch as f64 / groups.len() as f64;
            if let Some(st) = stats {
                let dt = t_log.lap().max(1e-9);
                let elapsed = t0.secs();
                let log = StepLog {
                    step: tr.step,
                    total,
                    loss: st.loss,
                    lr: lr_now,
                    grad_norm: st.grad_norm,
                    tokens_per_s: (pos.tokens - tokens_at_log) as f64 / dt,
                    target_tokens_per_s: (pos.target_tokens - targets_at_log) as f64 / dt,
                    tokens: pos.tokens,
                    target_tokens: pos.target_tokens,
                    elapsed_s: elapsed,
                    eta_s: elapsed / (tr.step - start_step) as f64 * (total - tr.step) as f64,
                    gpu_mib: mib(ctx.memory.live()),
                    gpu_peak_mib: mib(ctx.memory.peak()),
                    skipped: st.skipped,
                };
                (tokens_at_log, targets_at_log) = (pos.tokens, pos.target_tokens);
                last_loss = st.loss;
                if st.loss.is_finite() && !st.skipped {
                    last_finite = Some((tr.step, st.loss));
                }
                metrics.train(&TrainRecord {
                    step: tr.step,
                    epoch: ep,
                    loss: st.loss,
                    lr: lr_now,
                    grad_norm: st.grad_norm,
                    tokens: pos.tokens,
                    target_tokens: pos.target_tokens,
                    tokens_per_s: log.tokens_per_s,
                    target_tokens_per_s: log.target_tokens_per_s,
                    elapsed_s: elapsed,
                    gpu_mib: log.gpu_mib,
                    gpu_peak_mib: log.gpu_peak_mib,
                })?;
                progress.step(tr.step, total, Some(&log));
                if st.skipped_in_a_row >= o.max_bad_steps {
                    progress.end(false);
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
            } else {
                progress.step(tr.step, total, None);
            }
            if o.eval_every > 0 && tr.step.is_multiple_of(o.eval_every) {
                self.evaluate(tr.step, ep, metrics, ev, progress)?;
                if let Some(k) = o.early_stopping_patience {
                    ev.state.stopped_early = ev.state.since_best >= k;
                }
            }
            let signal = signalled(self.stop);
            // The end of the run saves its last step: not here too.
            let ends = tr.step == total || ev.state.stopped_early;
            let periodic = o.save_every > 0 && tr.step.is_multiple_of(o.save_every) && !ends;
            if (periodic || signal.is_some())
                && save_all(ctx, o, tr, self.settings, pos, metrics, ev)?
            {
                *saved = Some(tr.step);
            }
            if let Some(signal) = signal {
                progress.end(false);
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
            if ev.state.stopped_early {
                break;
            }
        }
        progress.end(true);
        if ev.state.stopped_early {
            if let Some((s, b)) = ev.state.best {
                println!(
                    "early stopping at step {}: the last {} evaluations found no validation loss \
                     below {b:.4} (step {s})",
                    tr.step, ev.state.since_best
                );
            }
        }
        // Evaluated already when --eval-every hit the last step.
        if let Some(vl) = self.evaluate(tr.step, ep, metrics, ev, progress)? {
            println!("val loss {vl:.4} (ppl {:.2})", vl.exp());
        }
        if !save_all(ctx, o, tr, self.settings, pos, metrics, ev)? {
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
        if let Some((s, b)) = ev.state.best {
            let kept = if o.keep_best {
                format!(
                    "; its adapter is in {}",
                    o.out.join(checkpoint::BEST_DIR).display()
                )
            } else {
                String::new()
            };
            println!("best val loss {b:.4} at step {s}{kept}");
        }
        let secs = t0.secs();
        println!(
            "done: {} steps in {secs:.1} s ({:.0} tok/s, {:.0} target tok/s), final loss \
             {last_loss:.4}; adapter in {}, loss plot {}; GPU buffers and textures peaked at \
             {:.0} MiB",
            tr.step,
            (pos.tokens - start_tokens) as f64 / secs.max(1e-9),
            (pos.target_tokens - start_targets) as f64 / secs.max(1e-9),
            o.out.display(),
            o.out.join("loss.svg").display(),
            mib(ctx.memory.peak())
        );
        Ok(if ev.state.stopped_early {
            Outcome::EarlyStopped {
                step: tr.step,
                best_step: ev.state.best.map(|(s, _)| s),
            }
        } else {
            Outcome::Done { steps: tr.step }
        })
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

/// What `train` prints at load.
pub fn print_model(ctx: &Context, model: &Model) {
    let _ = print_model_to(ctx, model, &mut std::io::stdout());
}

/// [`print_model`] into `w` (`generate`, `eval`, `chat`: stderr, so that
/// stdout holds only their results).
pub fn print_model_to(
    ctx: &Context,
    model: &Model,
    w: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    writeln!(
        w,
        "model: {:?}, {} layers, hidden {}, {:.1} M parameters, {:.0} MiB of GPU memory for weights",
        model.cfg.arch,
        model.cfg.layers,
        model.cfg.hidden,
        model.params as f64 / 1e6,
        model.weight_bytes() as f64 / (1 << 20) as f64
    )?;
    writeln!(w, "device: {} ({:?})", ctx.info.name, ctx.info.backend)
}
