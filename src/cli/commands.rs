//! `wgtune import`, `devices`, `generate` and `eval`: each loads what it
//! needs, runs, and prints its result to stdout.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::model::gguf::GgmlType;

use super::{DeviceArgs, EvalArgs, ExportArgs, GenerateArgs, ImportArgs, MethodArg, PlanArgs};
use crate::adapters::{peft_io, Adapter};
use crate::error::{Error, Result};
use crate::gpu::context::list_adapters;
use crate::gpu::Context;
use crate::model::generate::{generate as gen, GenOptions};
use crate::model::tokenizer::{ChatMessage, Tokenizer};
use crate::model::{Hooks, Model, NoHooks};
use crate::train::data::Dataset;
use crate::train::resume::check_adapter_base;
use crate::train::run::print_model;

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
    let base = match (base, &lora.base_model_name_or_path) {
        (Some(b), _) => b.to_path_buf(),
        (None, Some(b)) if !b.is_empty() => PathBuf::from(b),
        (None, _) => {
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

/// Load a model folder and its tokenizer, and say what was loaded.
fn load_model(
    ctx: &Context,
    arg: &std::path::Path,
    weights: crate::model::compact::WeightsMode,
) -> Result<(Model, Tokenizer)> {
    let dir = crate::model::hub::resolve_model(arg)?;
    let model = Model::load_with(ctx, &dir, weights)?;
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

pub(super) fn generate(a: &GenerateArgs) -> Result<()> {
    let ctx = Context::new(&a.device.options())?;
    let (model, tok) = load_model(&ctx, &a.model, a.weights.weights)?;
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
