//! `wgtune import`, `devices`, `generate` and `eval`: each loads what it
//! needs, runs, and prints its result to stdout.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::model::gguf::GgmlType;

use super::{DeviceArgs, EvalArgs, ExportArgs, GenerateArgs, ImportArgs, MethodArg, PlanArgs};
use crate::adapters::{peft_io, Adapter};
use crate::error::{Error, Result};
use crate::gpu::context::list_adapters;
use crate::gpu::Context;
use crate::model::generate::{chat_prompt_ids, generate_until, Flow, GenStats, StopText};
use crate::model::tokenizer::{ChatMessage, StreamDecoder, Tokenizer};
use crate::model::{Hooks, Model, NoHooks};
use crate::train::data::Dataset;
use crate::train::resume::check_adapter_base;
use crate::train::run::print_model_to;
use crate::train::template::{load_beside_adapter, PromptTemplate, TEMPLATE_FILE};

pub(super) fn import(a: &ImportArgs) -> Result<()> {
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

/// `wgtune export`: a LoRA adapter as llama.cpp's GGUF LoRA, or merged into
/// its base.
pub(super) fn export(a: &ExportArgs) -> Result<()> {
    use super::ExportFormat;
    let format = match (a.merge, a.format) {
        (false, None | Some(ExportFormat::GgufLora)) => ExportFormat::GgufLora,
        (true, None) => ExportFormat::Hf,
        (true, Some(ExportFormat::GgufLora)) => {
            return Err(Error::invalid(
                "export",
                "--merge writes a whole model: --format hf (a folder) or gguf; gguf-lora is the                  adapter alone, without --merge",
            ))
        }
        (false, Some(f)) => {
            return Err(Error::invalid(
                "export",
                format!(
                    "--format {} writes a merged model: add --merge",
                    if f == ExportFormat::Hf { "hf" } else { "gguf" }
                ),
            ))
        }
        (true, Some(f)) => f,
    };
    export_as(
        &a.adapter,
        a.base.as_deref(),
        format,
        &a.out,
        a.dtype,
        !a.no_modelfile,
    )
}

/// The GGUF type of `--dtype`, defaulting to `default`.
fn ggml_type(d: Option<super::ExportDtype>, default: super::ExportDtype) -> GgmlType {
    use super::ExportDtype;
    match d.unwrap_or(default) {
        ExportDtype::F32 => GgmlType::F32,
        ExportDtype::F16 => GgmlType::F16,
        ExportDtype::Q8_0 => GgmlType::Q8_0,
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Write an Ollama Modelfile beside `out` and print how to use it.
fn write_modelfile(out: &Path, from: &Path, adapter: Option<&Path>, tok_dir: &Path) -> Result<()> {
    let tok = Tokenizer::load(tok_dir)?;
    let (text, has_template) = crate::adapters::modelfile::modelfile(
        &absolute(from),
        adapter.map(absolute).as_deref(),
        &tok,
    );
    let stem = out
        .file_stem()
        .map_or("wgtune".into(), |s| s.to_string_lossy().to_string());
    let path = out.with_file_name(format!("{stem}.Modelfile"));
    crate::fsio::write_atomic(&path, text.as_bytes())?;
    // `train --export` writes OUT/adapter.gguf: name the model after OUT.
    let label = match (
        stem.as_str(),
        out.parent().and_then(|p| {
            absolute(p)
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
        }),
    ) {
        ("adapter", Some(dir)) => dir,
        _ => stem.clone(),
    };
    let name: String = label
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    println!(
        "wrote {}{}; for Ollama:\n  ollama create {name} -f {}\n  ollama run {name}",
        path.display(),
        if has_template {
            ""
        } else {
            " (no TEMPLATE: Ollama uses the GGUF's chat template)"
        },
        path.display()
    );
    if !from
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        println!(
            "  (FROM is a Hugging Face folder, which Ollama converts itself; point FROM at the \
             base's GGUF if you have one)"
        );
    }
    Ok(())
}

/// The local `model` that `adapter_dir/train_args.json` records, if it
/// still exists.
fn recorded_model(adapter_dir: &Path) -> Option<PathBuf> {
    let rec = super::record::read(adapter_dir).ok()??;
    let p = PathBuf::from(rec.get("model")?);
    p.exists().then_some(p)
}

/// Export the LoRA adapter in `adapter_dir` as `format` at `out` (shared by
/// `wgtune export` and `wgtune train --export`).
pub(super) fn export_as(
    adapter_dir: &Path,
    base: Option<&Path>,
    format: super::ExportFormat,
    out: &Path,
    dtype: Option<super::ExportDtype>,
    modelfile: bool,
) -> Result<()> {
    use super::{ExportDtype, ExportFormat};
    use crate::adapters::merge;
    let adapter = peft_io::load_adapter(adapter_dir)?;
    let lora = merge::lora_config(&adapter, adapter_dir)?;
    // The adapter names its base by repo id where one is known; the run's
    // record knows the local model it was trained on.
    let recorded = base
        .is_none()
        .then(|| recorded_model(adapter_dir))
        .flatten();
    let base = match (base, recorded, &lora.base_model_name_or_path) {
        (Some(b), _, _) => b.to_path_buf(),
        (None, Some(r), _) => r,
        (None, None, Some(b)) if !b.is_empty() => PathBuf::from(b),
        (None, None, _) => {
            return Err(Error::Adapter {
                path: adapter_dir.to_path_buf(),
                message: "adapter_config.json names no base model; give --base".into(),
            })
        }
    };
    let dir = crate::model::hub::resolve_model(&base)?;
    let cfg = crate::model::ModelConfig::from_file(&dir.join("config.json"))?;
    let base_gguf = crate::model::weights::linked_gguf(&dir)?;
    let mut inputs = vec![base.as_path(), dir.as_path()];
    if let Some(g) = &base_gguf {
        inputs.push(g);
    }
    merge::check_not_input(out, adapter_dir, &inputs)?;
    let t = crate::clock::Stopwatch::start();
    match format {
        ExportFormat::GgufLora => {
            let ty = ggml_type(dtype, ExportDtype::F32);
            let (w, info) = crate::adapters::gguf_lora::gguf_lora(&adapter, adapter_dir, &cfg, ty)?;
            w.write(out)?;
            println!(
                "wrote {} ({} LoRA, {} modules, rank {}, alpha {}): load it next to the GGUF \
                 base, e.g. `llama-cli -m base.gguf --lora {}`",
                out.display(),
                info.arch,
                info.modules,
                info.rank,
                info.alpha,
                out.display()
            );
            if modelfile {
                let from = base_gguf.as_deref().unwrap_or(&dir);
                write_modelfile(out, from, Some(out), &dir)?;
            }
        }
        ExportFormat::Hf => {
            if dtype.is_some() {
                return Err(Error::invalid(
                    "export",
                    "--dtype is for GGUF outputs; a merged folder keeps the base's dtype",
                ));
            }
            let updates = merge::lora_updates(&adapter, adapter_dir, &cfg)?;
            let r = merge::merge_folder(&dir, &updates, merge::lora_scale(lora), out)?;
            println!(
                "wrote {} (a Hugging Face folder: {} weights merged, {} copied) in {:.1} s",
                out.display(),
                r.merged,
                r.copied,
                t.secs()
            );
        }
        ExportFormat::Gguf => {
            let Some(g) = &base_gguf else {
                return Err(Error::invalid(
                    "export",
                    format!(
                        "a merged GGUF is written from a GGUF base (its tokenizer and metadata \
                         are copied); {} is a Hugging Face folder. Give --base FILE.gguf, or \
                         write a folder (--format hf) and convert it with llama.cpp's \
                         convert_hf_to_gguf.py",
                        base.display()
                    ),
                ));
            };
            let ty = ggml_type(dtype, ExportDtype::F16);
            let updates = merge::lora_updates(&adapter, adapter_dir, &cfg)?;
            let gguf = crate::model::gguf::Gguf::open(g)?;
            let (w, r) = merge::merge_gguf(&gguf, &cfg, &updates, merge::lora_scale(lora), ty)?;
            w.write(out)?;
            println!(
                "wrote {} (GGUF: {} weights merged as {}, {} tensors copied) in {:.1} s",
                out.display(),
                r.merged,
                ty.name(),
                r.copied,
                t.secs()
            );
            if modelfile {
                write_modelfile(out, out, None, &dir)?;
            }
        }
    }
    Ok(())
}

/// `wgtune plan`: the memory plan of a training run, from the config (or
/// a GGUF's header) alone; nothing is loaded into the GPU.
pub(super) fn plan(a: &PlanArgs) -> Result<()> {
    use crate::adapters::init::LoraInit;
    use crate::train::memory::{
        describe_model, plan_keep, suggestions, Budget, MemoryPlan, PlanInput,
    };
    use crate::train::options::{LoraOptions, MethodOptions, PrefixInitKind, PrefixOptions};
    use crate::train::options::{PromptInitKind, PromptOptions};
    use crate::train::trainer::bucket_shape;
    let (cfg, frozen) = describe_model(&a.model)?;
    if a.num_layers.is_some() && a.method != MethodArg::Lora {
        return Err(Error::invalid(
            "--num-layers",
            "applies to --method lora only",
        ));
    }
    let n = a.num_virtual_tokens;
    let (method, nv, p) = match a.method {
        MethodArg::Lora => (
            MethodOptions::Lora(LoraOptions {
                r: a.lora_r,
                alpha: 16.0,
                dropout: a.lora_dropout,
                targets: a
                    .lora_targets
                    .as_deref()
                    .unwrap_or_default()
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
                rslora: false,
                init: LoraInit::Kaiming,
                num_layers: a.num_layers,
            }),
            0,
            0,
        ),
        MethodArg::Prompt => (
            MethodOptions::Prompt(PromptOptions {
                num_virtual_tokens: n,
                init: PromptInitKind::Vocab,
                init_text: None,
            }),
            n,
            0,
        ),
        MethodArg::Prefix => (
            MethodOptions::Prefix(PrefixOptions {
                num_virtual_tokens: n,
                projection: a.prefix_projection,
                encoder_hidden_size: a.encoder_hidden_size,
                init: PrefixInitKind::Zero,
                init_text: None,
            }),
            0,
            n,
        ),
    };
    let cap_t = cfg.max_positions.saturating_sub(nv + p);
    if cap_t < 2 {
        return Err(Error::invalid(
            "plan",
            format!(
                "--num-virtual-tokens {n} leaves no room for tokens in the model's {} positions",
                cfg.max_positions
            ),
        ));
    }
    if a.seq_len > cap_t {
        eprintln!(
            "--seq-len {} is cut to the {cap_t} positions the model and adapter leave",
            a.seq_len
        );
    }
    let t = a.seq_len.min(cap_t);
    // Every token a target (prompt tuning: the first one too).
    let targets = a.batch_size * (t + usize::from(nv > 0));
    let (b, t, r) = bucket_shape(a.batch_size, t, targets, nv, cap_t);
    // The adapter's kind decides the budget; opening it allocates nothing.
    let budget = match Context::new(&a.device.options()) {
        Ok(ctx) => {
            println!(
                "device: {} ({:?}, {:?})",
                ctx.info.name, ctx.info.backend, ctx.info.device_type
            );
            Budget::of(Some(ctx.info.device_type), Some(ctx.limits.max_buffer_size))
        }
        Err(e) => {
            log::warn!("{e}");
            Budget::of(None, None)
        }
    };
    println!(
        "model: {} ({:?}, {} layers, hidden {}, vocab {}); {} with batch {} x {} tokens",
        a.model.display(),
        cfg.arch,
        cfg.layers,
        cfg.hidden,
        cfg.vocab,
        method.method().name(),
        a.batch_size,
        t
    );
    let input = PlanInput {
        cfg: &cfg,
        frozen: &frozen,
        mode: a.weights.weights,
        method: &method,
        b,
        t,
        r,
        nv,
        p,
        keep: plan_keep(&cfg, &method, a.grad_checkpoint)?,
    };
    let plan = MemoryPlan::new(&input, budget.clone())?;
    print!("{}", plan.render());
    if !plan.fits() {
        let hints = suggestions(&input, &budget, a.grad_accum)?;
        if hints.is_empty() {
            println!("no smaller batch or length fits: use a smaller model");
        }
        for h in hints {
            println!("would fit: {h}");
        }
    }
    Ok(())
}

pub(super) fn devices(d: &DeviceArgs) -> Result<()> {
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

/// Load a model folder and its tokenizer, and say on stderr what was
/// loaded (stdout is for results).
pub(super) fn load_model(
    ctx: &Context,
    arg: &std::path::Path,
    weights: crate::model::compact::WeightsMode,
) -> Result<(Model, Tokenizer)> {
    let dir = crate::model::hub::resolve_model(arg)?;
    let model = Model::load_with(ctx, &dir, weights)?;
    let tok = Tokenizer::load(&dir)?;
    let _ = print_model_to(ctx, &model, &mut std::io::stderr());
    Ok((model, tok))
}

/// Load an optional PEFT adapter for inference.
pub(super) fn load_adapter(
    ctx: &Context,
    model: &Model,
    model_arg: &std::path::Path,
    dir: Option<&PathBuf>,
) -> Result<Option<Adapter>> {
    let Some(dir) = dir else { return Ok(None) };
    let loaded = peft_io::load_adapter(dir)?;
    check_adapter_base(model, model_arg, &loaded, dir)?;
    let ad = Adapter::new(ctx, model, loaded.config.clone(), loaded.sorted_tensors())?;
    eprintln!(
        "adapter: {} ({} parameters)",
        dir.display(),
        ad.num_params()
    );
    Ok(Some(ad))
}

/// The prompt template to apply: `given` (`--template`), else the one
/// saved beside the adapter unless `skip` (`--no-template`). Says on
/// stderr which one applies.
pub(super) fn prompt_template(
    given: Option<PromptTemplate>,
    skip: bool,
    adapter: Option<&PathBuf>,
) -> Result<Option<PromptTemplate>> {
    if skip {
        return Ok(None);
    }
    if let Some(t) = given {
        eprintln!("prompt template: --template {:?}", t.text());
        return Ok(Some(t));
    }
    let Some(dir) = adapter else { return Ok(None) };
    let saved = load_beside_adapter(dir)?;
    if let Some(t) = &saved {
        eprintln!(
            "prompt template: {} {:?} (the adapter's; --no-template skips it)",
            dir.join(TEMPLATE_FILE).display(),
            t.text()
        );
    }
    Ok(saved)
}

/// Whether the prompt is rendered with the chat template: by default when
/// the model has one; `--chat` requires it, `--raw` turns it off.
fn use_chat_template(tok: &Tokenizer, require: bool, raw: bool) -> Result<bool> {
    let has = tok.chat_template().is_some();
    if require && !has {
        return Err(Error::invalid(
            "generate",
            "--chat: the model has no chat template; leave out --chat to use the prompt as it is",
        ));
    }
    Ok(has && !raw)
}

/// `--prompt -` reads the prompt from stdin, without its trailing newlines.
fn read_prompt(arg: &str) -> Result<String> {
    if arg != "-" {
        return Ok(arg.to_string());
    }
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|source| Error::Io {
            path: PathBuf::from("<stdin>"),
            source,
        })?;
    let text = text.trim_end_matches(['\n', '\r']);
    if text.is_empty() {
        return Err(Error::invalid(
            "generate",
            "--prompt -: stdin holds no text",
        ));
    }
    Ok(text.to_string())
}

/// `--show-prompt`: the rendered prompt and its ids, on stderr.
pub(super) fn show_prompt(text: &str, ids: &[u32]) {
    eprintln!("prompt ({} tokens):\n{text}", ids.len());
    eprintln!("prompt ids: {ids:?}");
}

/// Streams generated ids to stdout as text, cut at the first `--stop`
/// string; keeps what it printed.
pub(super) struct Printer<'t> {
    dec: StreamDecoder<'t>,
    stops: StopText,
    stopped: bool,
    text: String,
}

impl<'t> Printer<'t> {
    pub(super) fn new(tok: &'t Tokenizer, stops: &[String]) -> Printer<'t> {
        Printer {
            dec: tok.stream_decoder(true),
            stops: StopText::new(stops),
            stopped: false,
            text: String::new(),
        }
    }

    /// Adds an id; `Flow::Stop` once a stop string is reached.
    pub(super) fn push(&mut self, id: u32) -> Result<Flow> {
        if let Some(t) = self.dec.push(id)? {
            let (out, hit) = self.stops.push(&t);
            emit(&mut self.text, &out);
            if hit {
                self.stopped = true;
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }

    /// Prints what is held back and returns the whole text.
    pub(super) fn finish(self) -> Result<String> {
        let Printer {
            dec,
            mut stops,
            stopped,
            mut text,
        } = self;
        if !stopped {
            let (out, hit) = stops.push(&dec.finish()?);
            emit(&mut text, &out);
            if !hit {
                emit(&mut text, &stops.finish());
            }
        }
        Ok(text)
    }
}

/// Prints `s` at once and keeps it in `text`.
fn emit(text: &mut String, s: &str) {
    if !s.is_empty() {
        print!("{s}");
        let _ = std::io::stdout().flush();
        text.push_str(s);
    }
}

/// Why a generation ended, for the stats line.
pub(super) fn stop_reason(stats: &GenStats, positions: usize, max_new_tokens: usize) -> String {
    if stats.stopped_at_eos {
        ", stopped at EOS".to_string()
    } else if stats.stopped_by_caller {
        ", stopped at a --stop string".to_string()
    } else if stats.stopped_at_context {
        format!(
            ", stopped at the context limit of {positions} positions before \
             --max-new-tokens {max_new_tokens}"
        )
    } else {
        String::new()
    }
}

pub(super) fn generate(a: &GenerateArgs) -> Result<()> {
    // Read first: a bad pipe fails before the model loads.
    let prompt = read_prompt(&a.prompt)?;
    // Time to first token counts from here (arguments parsed, prompt read).
    let mut clock = crate::clock::Stopwatch::start();
    let ctx = Context::new(&a.device.options())?;
    let device_s = clock.lap();
    let (model, tok) = load_model(&ctx, &a.model, a.weights.weights)?;
    let adapter = load_adapter(&ctx, &model, &a.model, a.adapter.as_ref())?;
    let load_s = clock.lap();
    let hooks: &dyn Hooks = adapter.as_ref().map_or(&NoHooks, |ad| ad as &dyn Hooks);
    let given = a.template.template.as_deref().map(PromptTemplate::parse);
    let template = prompt_template(
        given.transpose()?,
        a.template.no_template,
        a.adapter.as_ref(),
    )?;
    let prompt = match &template {
        Some(t) => t.apply_prompt(&prompt)?,
        None => prompt,
    };
    let (text, ids) = if use_chat_template(&tok, a.chat, a.raw)? {
        if !a.chat {
            eprintln!("chat template: the model's (--raw turns it off)");
        }
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s.clone()));
        }
        msgs.push(ChatMessage::new("user", prompt));
        chat_prompt_ids(&tok, &msgs)?
    } else {
        if a.system.is_some() {
            return Err(Error::invalid(
                "generate",
                "--system needs the chat template (the model has none, or --raw was given)",
            ));
        }
        let ids = tok.encode(&prompt, true)?;
        (prompt, ids)
    };
    if a.show_prompt {
        show_prompt(&text, &ids);
    }
    let opts = a.sampling.options(a.max_new_tokens, tok.eos_ids());
    let mut printer = Printer::new(&tok, &a.sampling.stop);
    let mut first: Option<(f64, crate::gpu::PipelineStats)> = None;
    let stats = generate_until(&ctx, &model, hooks, &ids, &opts, |t, _| {
        if first.is_none() {
            first = Some((device_s + load_s + clock.secs(), ctx.pipeline_stats()));
        }
        printer.push(t)
    })?;
    printer.finish()?;
    println!();
    ctx.save_pipeline_cache();
    eprintln!(
        "[{} prompt tokens, {} new tokens; prefill {:.2} s, {:.2} tok/s{}]",
        stats.prompt_tokens,
        stats.new_tokens,
        stats.prefill_s,
        stats.decode_tokens_per_s(),
        stop_reason(&stats, model.cfg.max_positions, a.max_new_tokens)
    );
    if let Some((ttft, p)) = first {
        eprintln!(
            "[first token after {ttft:.2} s: device {device_s:.2} s, model load {load_s:.2} s, \
             prefill {:.2} s; {} pipelines built in {:.2} s ({})]",
            stats.prefill_s,
            p.built,
            p.build_secs,
            cache_note(&p)
        );
    }
    Ok(())
}

/// What the pipeline cache did, for the stats lines.
pub(super) fn cache_note(p: &crate::gpu::PipelineStats) -> String {
    match (&p.cache_file, p.cache_loaded_bytes) {
        (None, _) => "no pipeline cache".into(),
        (Some(_), 0) => "pipeline cache cold".into(),
        (Some(_), n) if n < 1 << 20 => format!("pipeline cache warm, {n} B"),
        (Some(_), n) => format!(
            "pipeline cache warm, {:.1} MiB",
            n as f64 / (1 << 20) as f64
        ),
    }
}

pub(super) fn eval(a: &EvalArgs) -> Result<()> {
    let ctx = Context::new(&a.device.options())?;
    let (model, tok) = load_model(&ctx, &a.model, a.weights.weights)?;
    let adapter = load_adapter(&ctx, &model, &a.model, a.adapter.as_ref())?;
    let hooks: &dyn Hooks = adapter.as_ref().map_or(&NoHooks, |ad| ad as &dyn Hooks);
    // Rows must leave room for the adapter's virtual tokens or prefix rows.
    let rows =
        hooks.prompt().map_or(0, |t| t.shape()[0]) + hooks.prefix().map_or(0, |t| t.shape()[0]);
    let room = model.cfg.max_positions.saturating_sub(rows);
    let mut dopts = a.data_args.options()?;
    dopts.template = prompt_template(dopts.template, a.no_template, a.adapter.as_ref())?;
    dopts.max_seq_len = Some(dopts.max_seq_len.unwrap_or(room).min(room));
    if a.raw {
        dopts.chat_template = crate::train::data::ChatTemplateMode::Off;
    }
    let (path, split) = crate::train::rows::eval_file(&a.data)?;
    if let Some(split) = split {
        println!("evaluating {} ({split})", path.display());
    }
    let data = Dataset::load(&path, &tok, &dopts)?;
    if data.truncated > 0 {
        println!(
            "{} rows truncated to {} tokens",
            data.truncated,
            dopts.max_seq_len.unwrap_or(room)
        );
    }
    let (sum, n) =
        crate::train::eval::eval_batches(&ctx, &model, hooks, &data.in_order(a.batch_size))?;
    ctx.save_pipeline_cache();
    if n == 0 {
        return Err(Error::invalid(
            "eval",
            format!("{}: no target tokens", path.display()),
        ));
    }
    let mean = sum / n as f64;
    println!(
        "{}: {} examples, {n} target tokens",
        path.display(),
        data.len()
    );
    println!("loss {mean:.6}  perplexity {:.4}", mean.exp());
    Ok(())
}
