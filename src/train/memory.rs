//! The memory plan of a training run: what the frozen weights, the saved
//! activations, the logits workspace and the adapter with its optimizer
//! state will take on the GPU, from the same buffer lists the trainer
//! allocates (`trainer::step_specs`), checked against what the adapter
//! offers before anything is allocated.

use std::path::Path;

use crate::adapters::adapter::{flat_len, resolve_targets};
use crate::adapters::peft_io::module_matches;
use crate::error::{Error, Result};
use crate::gpu::tensor::alloc_bytes;
use crate::model::buffers::{specs_bytes, BufKind, BufSpec, FwdShape, Keep};
use crate::model::compact::{target_format, WeightsMode};
use crate::model::config::{Arch, ModelConfig};
use crate::model::gguf::{GgmlType, Gguf};
use crate::model::names::ModelSpec;
use crate::train::options::MethodOptions;
use crate::train::trainer::step_specs_kept;

/// The lowest layer a LoRA of `--num-layers N` adapts (`layers - N`; 0 for
/// every layer), or the error for an N the model does not have.
pub fn lora_first_layer(cfg: &ModelConfig, num_layers: Option<usize>) -> Result<usize> {
    match num_layers {
        None => Ok(0),
        Some(n) if n >= 1 && n <= cfg.layers => Ok(cfg.layers - n),
        Some(n) => Err(Error::invalid(
            "--num-layers",
            format!("{n} is not between 1 and the model's {} layers", cfg.layers),
        )),
    }
}

/// What a training step of `method` keeps for backward (the trainer's
/// `Trainer::keep` once the adapter exists): LoRA on the top N layers keeps
/// nothing below them.
pub fn plan_keep(cfg: &ModelConfig, method: &MethodOptions, grad_checkpoint: bool) -> Result<Keep> {
    let from = match method {
        MethodOptions::Lora(l) => lora_first_layer(cfg, l.num_layers)?,
        _ => 0,
    };
    Ok(Keep {
        from,
        recompute: grad_checkpoint,
    })
}

/// A config's `torch_dtype` / `dtype` as a stored type (f32 when absent or
/// unknown).
pub fn stored_from_torch(name: Option<&str>) -> GgmlType {
    match name {
        Some("float16") => GgmlType::F16,
        Some("bfloat16") => GgmlType::BF16,
        _ => GgmlType::F32,
    }
}

/// Bytes of the frozen weights on the GPU, as `Model::from_weights_with`
/// uploads them: matrices (`tensors`, embedding first) as textures in
/// their `mode` format ([`TexFormat::matrix_bytes`]; a tied LM head is the
/// embedding itself), 1-D tensors and GPT-2's position table as f32
/// buffers, and the RoPE tables.
pub fn frozen_weight_bytes(
    cfg: &ModelConfig,
    tensors: &[(Vec<usize>, GgmlType)],
    mode: WeightsMode,
) -> u64 {
    // GPT-2's learned positions are gathered from an f32 buffer.
    let wpe = |shape: &[usize]| {
        cfg.arch == Arch::Gpt2
            && shape == [cfg.max_positions, cfg.hidden]
            && shape != [cfg.vocab, cfg.hidden]
    };
    let one = |shape: &[usize], t: GgmlType| match shape {
        [rows, cols] if !wpe(shape) => target_format(t, mode).matrix_bytes(*rows, *cols),
        _ => alloc_bytes(shape.iter().product()),
    };
    let mut n: u64 = tensors.iter().map(|(s, t)| one(s, *t)).sum();
    let tables = 2 * cfg.rope_table_count() as u64;
    n += tables * alloc_bytes(cfg.max_positions * cfg.head_dim / 2);
    n
}

/// The frozen tensors of a model (shape, stored type), embedding first.
#[derive(Clone, Debug)]
pub struct FrozenTensors {
    pub tensors: Vec<(Vec<usize>, GgmlType)>,
    /// Where the types came from, for the plan's note.
    pub source: String,
}

impl FrozenTensors {
    /// The checkpoint table of `cfg` with every tensor of type `t`.
    pub fn uniform(cfg: &ModelConfig, t: GgmlType, source: String) -> FrozenTensors {
        FrozenTensors {
            tensors: ModelSpec::saved(cfg)
                .tensors()
                .into_iter()
                .map(|(_, s)| (s, t))
                .collect(),
            source,
        }
    }

    /// A model folder: the safetensors headers when the weights are there,
    /// else config.json's `torch_dtype` (or `dtype`), else f32.
    pub fn of_folder(cfg: &ModelConfig, dir: &Path) -> Result<FrozenTensors> {
        let has_weights = dir.join("model.safetensors").exists()
            || dir.join("model.safetensors.index.json").exists()
            || dir.join(crate::model::weights::GGUF_LINK).exists();
        if has_weights {
            let wts = crate::model::weights::Weights::open(dir)?;
            let spec = ModelSpec::of(cfg, &wts);
            let mut tensors = Vec::new();
            for (name, shape) in spec.tensors() {
                tensors.push((shape, wts.stored_type(&name)?));
            }
            return Ok(FrozenTensors {
                tensors,
                source: if wts.is_gguf() { "GGUF" } else { "safetensors" }.into(),
            });
        }
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.clone(),
            message: format!("not valid JSON: {e}"),
        })?;
        let dtype = v
            .get("torch_dtype")
            .or_else(|| v.get("dtype"))
            .and_then(|d| d.as_str());
        Ok(FrozenTensors::uniform(
            cfg,
            stored_from_torch(dtype),
            format!(
                "no weights file: config.json, {}",
                dtype.map_or("f32".to_string(), |d| d.to_string())
            ),
        ))
    }

    /// A GGUF's tensors as its header lists them (the tied output skipped).
    pub fn of_gguf(g: &Gguf, arch: Arch, tied: bool) -> FrozenTensors {
        let mut tensors = Vec::new();
        let mut emb = None;
        for t in &g.tensors {
            let Some(name) = crate::model::import::hf_name(arch, &t.name) else {
                continue;
            };
            if tied && name == "lm_head.weight" {
                continue;
            }
            let entry = (t.shape(), t.ty);
            if t.name == "token_embd.weight" {
                emb = Some(entry);
            } else {
                tensors.push(entry);
            }
        }
        tensors.splice(0..0, emb);
        FrozenTensors {
            tensors,
            source: "GGUF header".into(),
        }
    }
}

/// A `wgtune plan` or `wgtune train` model read without its weights: the
/// config and the frozen tensors (a folder, or a .gguf's header alone).
pub fn describe_model(model: &Path) -> Result<(ModelConfig, FrozenTensors)> {
    if model.is_file() && crate::model::hub::is_gguf(model) {
        let g = Gguf::open(model)?;
        let (arch, json, tied) = crate::model::import::gguf_config(&g)?;
        let cfg = ModelConfig::from_json(&json.to_string(), model)?;
        return Ok((cfg, FrozenTensors::of_gguf(&g, arch, tied)));
    }
    let dir = crate::model::hub::resolve_model(model)?;
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let frozen = FrozenTensors::of_folder(&cfg, &dir)?;
    Ok((cfg, frozen))
}

/// Texture bytes of a packed `rows x cols` f32 operand (4 columns a texel).
fn packed_bytes(rows: usize, cols: usize) -> u64 {
    rows as u64 * cols.div_ceil(4) as u64 * 16
}

/// The shared scratch textures the matmuls and attention pack their
/// activation operands into (`Context::scratch_texture`): one per operand
/// width and slot, as tall as the most rows packed at that width. `rows`
/// token rows, `rc` logits rows per chunk.
fn packed_operand_bytes(
    cfg: &ModelConfig,
    method: &MethodOptions,
    shape: FwdShape,
    rc: usize,
) -> u64 {
    use std::collections::BTreeMap;
    let n = shape.rows();
    let (c, hd) = (cfg.hidden, cfg.head_dim);
    // (width, slot) -> rows
    let mut need: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    let mut add = |w: usize, slot: usize, rows: usize| {
        let e = need.entry((w, slot)).or_insert(0);
        *e = (*e).max(rows);
    };
    // Frozen linears: inputs forward, output gradients backward (slot 0).
    let mut widths = vec![c, cfg.heads * hd, cfg.kv_dim(), cfg.intermediate];
    if cfg.arch == Arch::Gpt2 {
        widths.extend([3 * c, 4 * c]);
    }
    for w in widths {
        add(w, 0, n);
    }
    // The logits gradient, where a chunk's row fits a texture (assumed
    // 16384 texels, the common limit).
    if cfg.vocab <= 4 * 16384 {
        add(cfg.vocab, 0, rc);
    }
    // Attention streams K/V (and in backward dout/q) in slots 2 and 3.
    let kv_rows = shape.b * (shape.p + shape.s()) * cfg.kv_heads;
    let q_rows = shape.b * shape.s() * cfg.heads;
    add(hd, 2, kv_rows.max(q_rows));
    add(hd, 3, kv_rows.max(q_rows));
    if let MethodOptions::Lora(l) = method {
        // dB packs (dout, h), dA packs (dh, x): h and x go in slot 1.
        add(l.r, 0, n);
        add(l.r, 1, n);
        let all = l.targets.iter().any(|t| t == "all-linear");
        let spec = ModelSpec::saved(cfg);
        let lins = spec.linears();
        // `adapter_tensors` has already reported targets that cannot resolve.
        let targets =
            resolve_targets(&l.targets, lins.iter().map(|l| l.name.as_str())).unwrap_or_default();
        let from = lora_first_layer(cfg, l.num_layers).unwrap_or(0);
        for lin in spec.blocks.iter().skip(from).flat_map(|b| b.linears()) {
            if all || targets.iter().any(|t| module_matches(&lin.name, t)) {
                add(lin.in_f, 1, n);
            }
        }
    }
    need.iter()
        .map(|(&(w, _), &rows)| packed_bytes(rows, w))
        .sum()
}

/// Shapes of the adapter's trainable tensors and its other GPU buffers
/// (prefix MLP work buffers, LoRA scratch for `rows` rows).
fn adapter_tensors(
    cfg: &ModelConfig,
    method: &MethodOptions,
    rows: usize,
) -> Result<(Vec<usize>, u64)> {
    let f = |s: &[usize]| s.iter().product::<usize>();
    let mut extra = alloc_bytes(1); // the dropout seed
    let numels = match method {
        MethodOptions::Lora(l) => {
            let spec = ModelSpec::saved(cfg);
            let lins = spec.linears();
            let all = l.targets.iter().any(|t| t == "all-linear");
            let targets = resolve_targets(&l.targets, lins.iter().map(|l| l.name.as_str()))?;
            // The same message as `match_targets`, before anything loads.
            for t in targets.iter().filter(|_| !all) {
                if !lins.iter().any(|lin| module_matches(&lin.name, t)) {
                    let mut names: Vec<&str> = lins
                        .iter()
                        .map(|l| l.name.rsplit('.').next().unwrap_or(""))
                        .collect();
                    names.sort_unstable();
                    names.dedup();
                    return Err(Error::invalid(
                        "lora",
                        format!(
                            "target module `{t}` matches no linear layer of this model; its \
                             linear modules are: {}",
                            names.join(", ")
                        ),
                    ));
                }
            }
            let mut v = Vec::new();
            let from = lora_first_layer(cfg, l.num_layers)?;
            for lin in spec.blocks.iter().skip(from).flat_map(|b| b.linears()) {
                if all || targets.iter().any(|t| module_matches(&lin.name, t)) {
                    v.push(l.r * lin.in_f);
                    v.push(lin.out_f * l.r);
                    // h and dh (M, r); with dropout the masked input and its grad.
                    extra += 2 * alloc_bytes(rows * l.r);
                    if l.dropout > 0.0 {
                        extra += 2 * alloc_bytes(rows * lin.in_f);
                    }
                }
            }
            v
        }
        MethodOptions::Prompt(p) => vec![p.num_virtual_tokens * cfg.hidden],
        MethodOptions::Prefix(p) => {
            let n = p.num_virtual_tokens;
            let width = cfg.layers * 2 * cfg.kv_dim();
            if p.projection {
                let (td, h) = (cfg.kv_dim(), p.encoder_hidden_size.unwrap_or(cfg.hidden));
                // table, dtable; hidden, act, dact, dhidden; ones.
                extra += 2 * alloc_bytes(n * width) + 4 * alloc_bytes(n * h) + alloc_bytes(n);
                vec![f(&[n, td]), f(&[h, td]), h, f(&[width, h]), width]
            } else {
                vec![n * width]
            }
        }
    };
    Ok((numels, extra))
}

/// What the adapter offers: a memory size (when known) and the largest
/// buffer it allows.
#[derive(Clone, Debug)]
pub struct Budget {
    pub bytes: Option<u64>,
    /// Where `bytes` comes from.
    pub what: String,
    pub max_buffer: Option<u64>,
}

/// `MemAvailable` of /proc/meminfo (Linux), in bytes.
pub fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The hidden test knob: pretend the device has this many bytes.
pub const CAP_ENV: &str = "WGTUNE_MEMORY_CAP";

impl Budget {
    /// The budget of an adapter: `WGTUNE_MEMORY_CAP` when set; system
    /// memory for software and integrated adapters (they allocate from it);
    /// otherwise unknown, as wgpu has no query for a discrete GPU's memory.
    pub fn of(kind: Option<wgpu::DeviceType>, max_buffer: Option<u64>) -> Budget {
        if let Some(cap) = std::env::var(CAP_ENV).ok().and_then(|v| v.parse().ok()) {
            return Budget {
                bytes: Some(cap),
                what: CAP_ENV.to_string(),
                max_buffer,
            };
        }
        let shared = match kind {
            None => Some("no adapter"),
            Some(wgpu::DeviceType::Cpu) => Some("software adapter"),
            Some(wgpu::DeviceType::IntegratedGpu) => Some("integrated adapter"),
            _ => None,
        };
        match (shared, mem_available()) {
            (Some(k), Some(m)) => Budget {
                bytes: Some(m),
                what: format!("system memory available (MemAvailable; {k})"),
                max_buffer,
            },
            _ => Budget {
                bytes: None,
                what: "the adapter reports no memory size (only its buffer limit is checked)"
                    .into(),
                max_buffer,
            },
        }
    }
}

/// What one run needs: the model, the method and the largest step shape.
#[derive(Clone, Debug)]
pub struct PlanInput<'a> {
    pub cfg: &'a ModelConfig,
    pub frozen: &'a FrozenTensors,
    pub mode: WeightsMode,
    pub method: &'a MethodOptions,
    /// Largest batch rows, tokens per row and logit rows (bucketed).
    pub b: usize,
    pub t: usize,
    pub r: usize,
    /// Virtual tokens (prompt tuning) and K/V rows in front (prefix).
    pub nv: usize,
    pub p: usize,
    /// The activations kept for backward ([`plan_keep`]).
    pub keep: Keep,
}

/// One line of the plan.
#[derive(Clone, Debug)]
pub struct PlanLine {
    pub name: &'static str,
    pub bytes: u64,
    pub note: String,
}

/// The plan: its lines (the total is their sum) and the budget.
#[derive(Clone, Debug)]
pub struct MemoryPlan {
    pub lines: Vec<PlanLine>,
    /// The largest single buffer (label, bytes), against the buffer limit.
    pub largest_buffer: (String, u64),
    pub budget: Budget,
    pub b: usize,
    pub t: usize,
    pub r: usize,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// The plan's logits workspace: a single place to switch when the LM head
/// runs in row chunks.
fn logits_workspace_bytes(specs: &[BufSpec]) -> u64 {
    specs_bytes(specs, Some(BufKind::Logits))
}

impl MemoryPlan {
    pub fn new(i: &PlanInput, budget: Budget) -> Result<MemoryPlan> {
        let cfg = i.cfg;
        let shape = FwdShape {
            b: i.b,
            t: i.t,
            n_virtual: i.nv,
            p: i.p,
        };
        let specs = step_specs_kept(cfg, shape, i.r, i.keep);
        let weights = frozen_weight_bytes(cfg, &i.frozen.tensors, i.mode);
        let rc = crate::model::buffers::logits_chunk_rows(i.r, cfg.vocab, cfg.hidden);
        let packed = packed_operand_bytes(cfg, i.method, shape, rc);
        let (numels, extra) = adapter_tensors(cfg, i.method, shape.rows())?;
        let n_params: usize = numels.iter().sum();
        let flat = alloc_bytes(flat_len(numels.into_iter()));
        // Upload staging: a few MiB of texture rows at a time.
        let big = i
            .frozen
            .tensors
            .iter()
            .map(|(s, t)| {
                let (r, c) = (s[0], s.iter().skip(1).product::<usize>().max(1));
                target_format(*t, i.mode)
                    .matrix_bytes(r, c)
                    .min(crate::model::compact::UPLOAD_CHUNK_BYTES)
            })
            .max()
            .unwrap_or(0);
        let big_name = "upload staging of weight rows".to_string();
        let (temp_name, temp) = if flat > big {
            ("checkpoint readback of the adapter".to_string(), flat)
        } else {
            (big_name, big)
        };
        let largest_buffer = specs
            .iter()
            .map(|s| (s.label.clone(), s.bytes()))
            .chain(std::iter::once(("f32 weight matrix".to_string(), big)))
            .max_by_key(|x| x.1)
            .unwrap_or_default();
        let params = i
            .frozen
            .tensors
            .iter()
            .map(|(s, _)| s.iter().product::<usize>())
            .sum::<usize>();
        let lines = vec![
            PlanLine {
                name: "frozen weights",
                bytes: weights,
                note: format!(
                    "{:.1} M parameters, weights {} ({}){}",
                    params as f64 / 1e6,
                    i.mode,
                    i.frozen.source,
                    if cfg.tie_embeddings {
                        "; the tied LM head is the embedding"
                    } else {
                        ""
                    }
                ),
            },
            PlanLine {
                name: "saved activations",
                bytes: specs_bytes(&specs, Some(BufKind::Activation))
                    + specs_bytes(&specs, Some(BufKind::Input)),
                note: format!(
                    "{} layers x {} rows ({} x {} tokens{}){}",
                    cfg.layers,
                    shape.rows(),
                    i.b,
                    i.t,
                    if i.nv > 0 {
                        format!(" + {} virtual", i.nv)
                    } else {
                        String::new()
                    },
                    match i.keep {
                        Keep {
                            recompute: true, ..
                        } => "; checkpointed: layer inputs + one layer's set".to_string(),
                        Keep { from: 0, .. } => String::new(),
                        Keep { from, .. } => {
                            format!("; layers below {from} keep only their inputs")
                        }
                    }
                ),
            },
            PlanLine {
                name: "activation gradients",
                bytes: specs_bytes(&specs, Some(BufKind::Gradient)),
                note: "one layer's, reused down the stack".into(),
            },
            PlanLine {
                name: "logits workspace",
                bytes: logits_workspace_bytes(&specs),
                note: format!(
                    "{} of {} target rows at a time x {} vocab (the gradient overwrites it), and the gathered rows",
                    rc, i.r, cfg.vocab
                ),
            },
            PlanLine {
                name: "adapter + grads + AdamW",
                bytes: 4 * flat + extra,
                note: format!(
                    "{n_params} trainable parameters x 4 copies{}",
                    if mib(extra) >= 0.05 {
                        format!(", {:.1} MiB work buffers", mib(extra))
                    } else {
                        String::new()
                    }
                ),
            },
            PlanLine {
                name: "packed operands",
                bytes: packed,
                note: "shared textures the matmuls read activations from".into(),
            },
            PlanLine {
                name: "largest temporary",
                bytes: temp,
                note: temp_name,
            },
        ];
        Ok(MemoryPlan {
            lines,
            largest_buffer,
            budget,
            b: i.b,
            t: i.t,
            r: i.r,
        })
    }

    pub fn total(&self) -> u64 {
        self.lines.iter().map(|l| l.bytes).sum()
    }

    /// The bytes of line `name`.
    pub fn line(&self, name: &str) -> u64 {
        self.lines
            .iter()
            .find(|l| l.name == name)
            .map_or(0, |l| l.bytes)
    }

    /// Whether the total fits the budget and every buffer the buffer limit.
    pub fn fits(&self) -> bool {
        self.budget.bytes.is_none_or(|b| self.total() <= b)
            && self
                .budget
                .max_buffer
                .is_none_or(|m| self.largest_buffer.1 <= m)
    }

    /// The plan as printed before training.
    pub fn render(&self) -> String {
        let mut s = format!(
            "memory plan (largest step: batch {} x {} tokens, {} logit rows):\n",
            self.b, self.t, self.r
        );
        for l in &self.lines {
            s += &format!("  {:<24} {:>10.1} MiB  {}\n", l.name, mib(l.bytes), l.note);
        }
        s += &format!("  {:<24} {:>10.1} MiB\n", "total", mib(self.total()));
        match self.budget.bytes {
            Some(b) => {
                s += &format!(
                    "  {:<24} {:>10.1} MiB  {}: {}\n",
                    "available",
                    mib(b),
                    self.budget.what,
                    if self.total() <= b {
                        "fits"
                    } else {
                        "does NOT fit"
                    }
                )
            }
            None => s += &format!("  {:<24} {:>14}  {}\n", "available", "?", self.budget.what),
        }
        if let Some(m) = self.budget.max_buffer {
            s += &format!(
                "  {:<24} {:>10.1} MiB  `{}` (the adapter allows {:.1} MiB per buffer{})\n",
                "largest buffer",
                mib(self.largest_buffer.1),
                self.largest_buffer.0,
                mib(m),
                if self.largest_buffer.1 > m {
                    ": too big"
                } else {
                    ""
                }
            );
        }
        s
    }
}

/// What would fit when `plan(input)` does not: a smaller batch with more
/// accumulation, a shorter length, fewer bytes of weights. `grad_accum`
/// is the run's, so the suggested batch keeps the effective batch.
pub fn suggestions(i: &PlanInput, budget: &Budget, grad_accum: usize) -> Result<Vec<String>> {
    let fits = |x: &PlanInput| -> Result<bool> { Ok(MemoryPlan::new(x, budget.clone())?.fits()) };
    let mut out = Vec::new();
    let mut b = i.b / 2;
    while b >= 1 {
        let s = i.nv + i.t;
        let r = (i.r * b).div_ceil(i.b).next_multiple_of(16).min(b * s);
        let x = PlanInput { b, r, ..i.clone() };
        if fits(&x)? {
            out.push(format!(
                "--batch-size {b} --grad-accum {} (the same {} rows per optimizer step)",
                grad_accum * i.b.div_ceil(b),
                i.b * grad_accum
            ));
            break;
        }
        b /= 2;
    }
    let mut t = i.t / 2;
    while t >= 16 {
        let r = i.r.min(i.b * (i.nv + t));
        let x = PlanInput { t, r, ..i.clone() };
        if fits(&x)? {
            out.push(format!("--max-seq-len {t}"));
            break;
        }
        t /= 2;
    }
    if out.is_empty() {
        // Neither alone: both, the largest batch first.
        let mut b = i.b / 2;
        'outer: while b >= 1 {
            let mut t = i.t / 2;
            while t >= 16 {
                let r = i.r.min(b * (i.nv + t));
                let x = PlanInput {
                    b,
                    t,
                    r,
                    ..i.clone()
                };
                if fits(&x)? {
                    out.push(format!(
                        "--batch-size {b} --grad-accum {} --max-seq-len {t}",
                        grad_accum * i.b.div_ceil(b)
                    ));
                    break 'outer;
                }
                t /= 2;
            }
            b /= 2;
        }
    }
    for mode in [WeightsMode::F16, WeightsMode::Stored] {
        if mode == i.mode {
            continue;
        }
        let x = PlanInput { mode, ..i.clone() };
        let plan = MemoryPlan::new(&x, budget.clone())?;
        if plan.fits() {
            out.push(format!(
                "frozen weights of fewer bytes: as {mode:?} they would take {:.1} MiB instead of \
                 {:.1} MiB (`--weights`, with the compact-weights work)",
                mib(plan.line("frozen weights")),
                mib(MemoryPlan::new(i, budget.clone())?.line("frozen weights"))
            ));
            break;
        }
    }
    Ok(out)
}

/// The error of a plan that does not fit: the plan and the suggestions.
pub fn does_not_fit(plan: &MemoryPlan, hints: &[String]) -> Error {
    let mut msg = format!(
        "the run does not fit in memory; nothing was allocated\n{}",
        plan.render()
    );
    if hints.is_empty() {
        msg += "---> HINT: no smaller batch or length fits: use a smaller model";
    } else {
        msg += "---> HINT: any of these would fit:";
        for h in hints {
            msg += &format!("\n    {h}");
        }
    }
    Error::OutOfMemory(msg)
}
