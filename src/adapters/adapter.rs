//! A trainable adapter on the GPU: every parameter of the method lives in
//! one flat buffer (and so do its gradient and the AdamW moments), so zeroing
//! the gradients is one clear and the optimizer is one dispatch. The adapter
//! plugs into the frozen model's schedule through [`Hooks`].

use std::cell::RefCell;
use std::collections::HashMap;

use super::peft_io::{lora_names, module_matches, AdapterConfig};
use crate::error::{Error, Result};
use crate::gpu::ops::{activation, lora, matmul};
use crate::gpu::{Context, DType, Plan, Tensor};
use crate::model::transformer::{Hooks, Linear, Model};

pub use super::peft_io::PROMPT_EMBEDDINGS;
/// Names of the prefix projection's parameters (PEFT's, `.default` removed).
pub const PROJ_EMB: &str = "prompt_encoder.embedding.weight";
pub const PROJ_W1: &str = "prompt_encoder.transform.0.weight";
pub const PROJ_B1: &str = "prompt_encoder.transform.0.bias";
pub const PROJ_W2: &str = "prompt_encoder.transform.2.weight";
pub const PROJ_B2: &str = "prompt_encoder.transform.2.bias";

/// One named tensor of the flat layout.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
}

impl Entry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Host tensors by name: (shape, values).
pub type HostTensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Parameters, gradients and AdamW moments in four buffers of one layout.
/// Every entry starts on a 64-float boundary (storage views must be 256-byte
/// aligned); the padding stays zero in all four.
pub struct Flat {
    pub params: Tensor,
    pub grads: Tensor,
    pub m: Tensor,
    pub v: Tensor,
    pub entries: Vec<Entry>,
    pub len: usize,
}

/// Elements a tensor of `numel` takes in the flat arena (64-aligned
/// slots, so every view meets the 256-byte offset alignment).
fn flat_slot(numel: usize) -> usize {
    numel.div_ceil(64) * 64
}

/// Length of the flat arena of tensors of these sizes (the memory plan
/// counts with it).
pub fn flat_len(numels: impl Iterator<Item = usize>) -> usize {
    numels.map(flat_slot).sum::<usize>().max(64)
}

impl Flat {
    pub fn new(ctx: &Context, tensors: &HostTensors) -> Result<Flat> {
        let mut entries = Vec::new();
        let mut n = 0;
        for (name, shape, data) in tensors {
            let k: usize = shape.iter().product();
            if k != data.len() {
                return Err(Error::invalid(
                    "adapter",
                    format!("`{name}`: {} values for shape {shape:?}", data.len()),
                ));
            }
            entries.push(Entry {
                name: name.clone(),
                shape: shape.clone(),
                offset: n,
            });
            n += flat_slot(k);
        }
        let len = n.max(64);
        debug_assert_eq!(len, flat_len(tensors.iter().map(|t| t.2.len())));
        let mut host = vec![0f32; len];
        for (e, (_, _, data)) in entries.iter().zip(tensors) {
            host[e.offset..e.offset + data.len()].copy_from_slice(data);
        }
        let params = Tensor::from_f32(ctx, &host, &[len], "adapter.params")?;
        let z = |l: &str| Tensor::zeros(ctx, &[len], DType::F32, l);
        Ok(Flat {
            params,
            grads: z("adapter.grads")?,
            m: z("adapter.m")?,
            v: z("adapter.v")?,
            entries,
            len,
        })
    }

    pub fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| Error::invalid("adapter", format!("no parameter `{name}`")))
    }

    fn view(&self, t: &Tensor, name: &str, what: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        t.view(e.offset, &e.shape, &format!("{name}.{what}"))
    }
    pub fn param(&self, name: &str) -> Result<Tensor> {
        self.view(&self.params, name, "param")
    }
    pub fn grad(&self, name: &str) -> Result<Tensor> {
        self.view(&self.grads, name, "grad")
    }

    /// Read back one of the four buffers, split into its named tensors.
    pub fn read(&self, ctx: &Context, which: &Tensor) -> Result<HostTensors> {
        let all = which.read_f32(ctx)?;
        Ok(self
            .entries
            .iter()
            .map(|e| {
                (
                    e.name.clone(),
                    e.shape.clone(),
                    all[e.offset..e.offset + e.numel()].to_vec(),
                )
            })
            .collect())
    }

    /// Overwrite one of the four buffers from named tensors (all entries).
    pub fn write(&self, ctx: &Context, which: &Tensor, tensors: &HostTensors) -> Result<()> {
        let mut host = vec![0f32; self.len];
        for e in &self.entries {
            let (_, shape, data) = tensors
                .iter()
                .find(|(n, _, _)| *n == e.name)
                .ok_or_else(|| Error::invalid("adapter", format!("state has no `{}`", e.name)))?;
            if *shape != e.shape {
                return Err(Error::Shape {
                    op: "adapter state".into(),
                    tensor: e.name.clone(),
                    expected: format!("{:?}", e.shape),
                    got: shape.clone(),
                });
            }
            host[e.offset..e.offset + data.len()].copy_from_slice(data);
        }
        which.write_f32(ctx, &host)
    }
}

/// One LoRA-adapted linear layer: views into the flat buffers.
pub struct LoraSite {
    /// Index of the site (its dropout mask stream).
    pub id: u32,
    pub a: Tensor,
    pub b: Tensor,
    pub da: Tensor,
    pub db: Tensor,
    pub r: usize,
    pub scale: f32,
}

/// The prefix projection MLP's forward buffers (Embedding -> Linear -> tanh
/// -> Linear), recomputed every step from the parameters.
struct Proj {
    emb: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    demb: Tensor,
    dw1: Tensor,
    db1: Tensor,
    dw2: Tensor,
    db2: Tensor,
    hidden: Tensor,
    act: Tensor,
    dact: Tensor,
    dhidden: Tensor,
    ones: Tensor,
    /// Scratch cleared with the step: the table's gradient and dact/dhidden.
    scratch: Vec<Tensor>,
}

enum Kind {
    Lora(HashMap<String, LoraSite>),
    Prompt {
        table: Tensor,
        grad: Tensor,
    },
    Prefix {
        table: Tensor,
        grad: Tensor,
        proj: Option<Box<Proj>>,
    },
}

/// A trainable adapter on the GPU.
pub struct Adapter {
    pub config: AdapterConfig,
    pub flat: Flat,
    kind: Kind,
    /// LoRA's saved h = A x and dh scratch, per (module, rows), and with
    /// dropout the dropped input and the bypass's share of dx.
    lora_scratch: RefCell<HashMap<(String, usize), Scratch>>,
    /// LoRA dropout probability (applied only in plans recorded for training).
    dropout: f64,
    training: std::cell::Cell<bool>,
    /// The dropout seed (1 u32), rewritten before every training step.
    seed: Tensor,
}

#[derive(Clone)]
struct Scratch {
    h: Tensor,
    dh: Tensor,
    xd: Option<Tensor>,
    g: Option<Tensor>,
}

/// PEFT's default LoRA targets (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`)
/// for a model with these linear module paths: GPT-2's fused `c_attn`, and
/// `q_proj`, `v_proj` for llama, mistral, qwen2, qwen3 and gemma3_text.
/// Keyed on the modules the model has, so every architecture with those
/// names gets the same default.
pub fn default_targets<'a>(linear_names: impl IntoIterator<Item = &'a str>) -> Result<Vec<String>> {
    let mut names: Vec<&str> = linear_names
        .into_iter()
        .map(|n| n.rsplit('.').next().unwrap_or(""))
        .collect();
    names.sort_unstable();
    names.dedup();
    let has = |n: &str| names.binary_search(&n).is_ok();
    if has("c_attn") {
        Ok(vec!["c_attn".into()])
    } else if has("q_proj") && has("v_proj") {
        Ok(vec!["q_proj".into(), "v_proj".into()])
    } else {
        Err(Error::invalid(
            "lora",
            format!(
                "no default LoRA target modules for this model; pass --lora-targets (its linear modules are: {})",
                names.join(", ")
            ),
        ))
    }
}

/// `targets` as given, or [`default_targets`] when empty (no `--lora-targets`).
pub fn resolve_targets<'a>(
    targets: &[String],
    linear_names: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<String>> {
    if targets.is_empty() {
        default_targets(linear_names)
    } else {
        Ok(targets.to_vec())
    }
}

/// The linear layers of `model` whose module name matches `targets`
/// (PEFT's rule: a target matches the last component(s) of the module path;
/// `all-linear` is every linear except the output head; empty is the
/// model's [`default_targets`]).
pub fn match_targets<'m>(model: &'m Model, targets: &[String]) -> Result<Vec<&'m Linear>> {
    // The output head is not among `linears()` (nor is GPT-2's tied wte),
    // so `all-linear` leaves it out as PEFT does.
    let all: Vec<&Linear> = model.linears().into_iter().map(|(_, l)| l).collect();
    let targets = &resolve_targets(targets, all.iter().map(|l| l.name.as_str()))?;
    let names: Vec<String> = {
        let mut v: Vec<String> = all
            .iter()
            .map(|l| l.name.rsplit('.').next().unwrap_or("").to_string())
            .collect();
        v.sort();
        v.dedup();
        v
    };
    if targets.iter().any(|t| t == "all-linear") {
        return Ok(all);
    }
    let mut out = Vec::new();
    for t in targets {
        let hits: Vec<&Linear> = all
            .iter()
            .copied()
            .filter(|l| module_matches(&l.name, t))
            .collect();
        if hits.is_empty() {
            return Err(Error::invalid(
                "lora",
                format!("target module `{t}` matches no linear layer of this model; its linear modules are: {}", names.join(", ")),
            ));
        }
        out.extend(hits);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| a.name == b.name);
    Ok(out)
}

impl Adapter {
    /// Build from a config and the initial trainable tensors (PEFT's saved
    /// names; for a prefix with projection, the MLP's parameters).
    pub fn new(
        ctx: &Context,
        model: &Model,
        config: AdapterConfig,
        tensors: HostTensors,
    ) -> Result<Adapter> {
        let layers = match &config {
            AdapterConfig::Lora(lc) => {
                let hits: Vec<&Linear> = match_targets(model, &lc.target_modules)?
                    .into_iter()
                    .filter(|l| lc.transforms_layer(&l.name))
                    .collect();
                if hits.is_empty() {
                    return Err(Error::invalid(
                        "lora",
                        format!(
                            "layers_to_transform {:?} selects no layer of this model (it has {})",
                            lc.layers_to_transform.as_deref().unwrap_or_default(),
                            model.cfg.layers
                        ),
                    ));
                }
                hits
            }
            _ => Vec::new(),
        };
        Adapter::on_layers(ctx, model, config, tensors, &layers)
    }

    /// [`Adapter::new`] with LoRA's layers already matched: `layers` is what
    /// [`match_targets`] returns for the config's `target_modules` (empty
    /// for prompt and prefix tuning), so a caller that matched them to
    /// initialize the tensors does not match again.
    pub fn on_layers(
        ctx: &Context,
        model: &Model,
        config: AdapterConfig,
        tensors: HostTensors,
        layers: &[&Linear],
    ) -> Result<Adapter> {
        let cfg = &model.cfg;
        let flat = Flat::new(ctx, &tensors)?;
        let expect = |name: &str, shape: &[usize]| -> Result<()> {
            let e = flat.entry(name)?;
            if e.shape != shape {
                return Err(Error::Shape {
                    op: "adapter".into(),
                    tensor: name.into(),
                    expected: format!("{shape:?}"),
                    got: e.shape.clone(),
                });
            }
            Ok(())
        };
        config
            .validate()
            .map_err(|m| Error::invalid("adapter", m))?;
        let kind = match &config {
            AdapterConfig::Lora(lc) => {
                let mut sites = HashMap::new();
                for (id, lin) in layers.iter().enumerate() {
                    let (an, bn) = lora_names(&lin.name);
                    expect(&an, &[lc.r, lin.in_features])?;
                    expect(&bn, &[lin.out_features, lc.r])?;
                    sites.insert(
                        lin.name.clone(),
                        LoraSite {
                            id: id as u32,
                            a: flat.param(&an)?,
                            b: flat.param(&bn)?,
                            da: flat.grad(&an)?,
                            db: flat.grad(&bn)?,
                            r: lc.r,
                            scale: lc.scaling() as f32,
                        },
                    );
                }
                if sites.len() * 2 != flat.entries.len() {
                    return Err(Error::invalid(
                        "lora",
                        "the adapter holds tensors for modules its target_modules do not select",
                    ));
                }
                Kind::Lora(sites)
            }
            AdapterConfig::Prompt(pc) => {
                expect(PROMPT_EMBEDDINGS, &[pc.num_virtual_tokens, cfg.hidden])?;
                Kind::Prompt {
                    table: flat.param(PROMPT_EMBEDDINGS)?,
                    grad: flat.grad(PROMPT_EMBEDDINGS)?,
                }
            }
            AdapterConfig::Prefix(pc) => {
                let n = pc.num_virtual_tokens;
                let width = cfg.layers * 2 * cfg.kv_dim();
                if pc.token_dim != cfg.kv_dim() || pc.num_layers != cfg.layers {
                    return Err(Error::invalid(
                        "prefix",
                        format!(
                            "adapter is for {} layers x token_dim {}, the model has {} layers x kv_dim {}",
                            pc.num_layers,
                            pc.token_dim,
                            cfg.layers,
                            cfg.kv_dim()
                        ),
                    ));
                }
                if flat.entries.iter().any(|e| e.name == PROJ_EMB) {
                    let (td, h) = (pc.token_dim, pc.encoder_hidden_size());
                    expect(PROJ_EMB, &[n, td])?;
                    expect(PROJ_W1, &[h, td])?;
                    expect(PROJ_B1, &[h])?;
                    expect(PROJ_W2, &[width, h])?;
                    expect(PROJ_B2, &[width])?;
                    let z = |shape: &[usize], l: &str| Tensor::zeros(ctx, shape, DType::F32, l);
                    let dtable = z(&[n, width], "prefix.dtable")?;
                    let (dact, dhidden) =
                        (z(&[n, h], "prefix.dact")?, z(&[n, h], "prefix.dhidden")?);
                    let proj = Proj {
                        emb: flat.param(PROJ_EMB)?,
                        w1: flat.param(PROJ_W1)?,
                        b1: flat.param(PROJ_B1)?,
                        w2: flat.param(PROJ_W2)?,
                        b2: flat.param(PROJ_B2)?,
                        demb: flat.grad(PROJ_EMB)?,
                        dw1: flat.grad(PROJ_W1)?,
                        db1: flat.grad(PROJ_B1)?,
                        dw2: flat.grad(PROJ_W2)?,
                        db2: flat.grad(PROJ_B2)?,
                        hidden: Tensor::zeros(ctx, &[n, h], DType::F32, "prefix.hidden")?,
                        act: Tensor::zeros(ctx, &[n, h], DType::F32, "prefix.act")?,
                        ones: Tensor::from_f32(ctx, &vec![1.0; n], &[n, 1], "ones")?,
                        scratch: vec![dtable.clone(), dact.clone(), dhidden.clone()],
                        dact,
                        dhidden,
                    };
                    Kind::Prefix {
                        table: Tensor::zeros(ctx, &[n, width], DType::F32, "prefix.table")?,
                        grad: dtable,
                        proj: Some(Box::new(proj)),
                    }
                } else {
                    expect(PROMPT_EMBEDDINGS, &[n, width])?;
                    Kind::Prefix {
                        table: flat.param(PROMPT_EMBEDDINGS)?,
                        grad: flat.grad(PROMPT_EMBEDDINGS)?,
                        proj: None,
                    }
                }
            }
        };
        let dropout = match &config {
            AdapterConfig::Lora(lc) => lc.lora_dropout,
            _ => 0.0,
        };
        let seed = Tensor::from_u32(ctx, &[0], &[1], "dropout_seed")?;
        Ok(Adapter {
            config,
            flat,
            kind,
            lora_scratch: RefCell::new(HashMap::new()),
            dropout,
            training: std::cell::Cell::new(false),
            seed,
        })
    }

    /// Number of trainable values.
    pub fn num_params(&self) -> usize {
        self.flat.entries.iter().map(|e| e.numel()).sum()
    }

    /// Record what must run before the model's forward (the prefix MLP).
    pub fn pre_forward(&self, ctx: &Context, plan: &mut Plan) -> Result<()> {
        if let Kind::Prefix {
            table,
            proj: Some(p),
            ..
        } = &self.kind
        {
            matmul::matmul_forward(ctx, plan, &p.hidden, &p.emb, &p.w1, Some(&p.b1))?;
            activation::tanh_forward(ctx, plan, &p.act, &p.hidden)?;
            matmul::matmul_forward(ctx, plan, table, &p.act, &p.w2, Some(&p.b2))?;
        }
        Ok(())
    }

    /// Record what must run before the model's backward (clearing scratch
    /// that is not part of the flat gradient).
    pub fn pre_backward(&self, plan: &mut Plan) {
        if let Kind::Prefix { proj: Some(p), .. } = &self.kind {
            for t in &p.scratch {
                plan.clear(t);
            }
        }
    }

    /// Record what must run after the model's backward (the prefix MLP's
    /// backward into the flat gradient).
    pub fn post_backward(&self, ctx: &Context, plan: &mut Plan) -> Result<()> {
        if let Kind::Prefix {
            grad,
            proj: Some(p),
            ..
        } = &self.kind
        {
            matmul::matmul_backward_weight(ctx, plan, &p.dw2, grad, &p.act)?;
            let db2 = p.db2.reshape(&[p.db2.numel(), 1])?;
            matmul::matmul_backward_weight(ctx, plan, &db2, grad, &p.ones)?;
            matmul::matmul_backward_input(ctx, plan, &p.dact, grad, &p.w2)?;
            activation::tanh_backward(ctx, plan, &p.dhidden, &p.dact, &p.act)?;
            matmul::matmul_backward_weight(ctx, plan, &p.dw1, &p.dhidden, &p.emb)?;
            let db1 = p.db1.reshape(&[p.db1.numel(), 1])?;
            matmul::matmul_backward_weight(ctx, plan, &db1, &p.dhidden, &p.ones)?;
            matmul::matmul_backward_input(ctx, plan, &p.demb, &p.dhidden, &p.w1)?;
        }
        Ok(())
    }

    /// The tensors PEFT's `adapter_model.safetensors` holds: LoRA A/B, or
    /// `prompt_embeddings` (for a projected prefix, the projected table, as
    /// PEFT saves it; run a forward first so it is current).
    pub fn peft_tensors(&self, ctx: &Context) -> Result<HostTensors> {
        match &self.kind {
            Kind::Prefix {
                table,
                proj: Some(_),
                ..
            } => {
                let mut plan = Plan::new("prefix projection");
                self.pre_forward(ctx, &mut plan)?;
                plan.run(ctx)?;
                Ok(vec![(
                    PROMPT_EMBEDDINGS.to_string(),
                    table.shape().to_vec(),
                    table.read_f32(ctx)?,
                )])
            }
            _ => self.flat.read(ctx, &self.flat.params),
        }
    }

    /// Whether plans recorded from now on are training plans (LoRA dropout
    /// on). The trainer sets it while it records; eval and generation never.
    pub fn set_training(&self, on: bool) {
        self.training.set(on);
    }

    /// The dropout seed of the next submitted training step.
    pub fn set_seed(&self, ctx: &Context, seed: u32) -> Result<()> {
        ctx.queue
            .write_buffer(self.seed.buffer(), self.seed.offset(), &seed.to_le_bytes());
        Ok(())
    }

    fn dropping(&self) -> bool {
        self.training.get() && self.dropout > 0.0
    }

    fn scratch(&self, ctx: &Context, name: &str, m: usize, r: usize, k: usize) -> Result<Scratch> {
        let drop = self.dropping();
        let key = (name.to_string(), m);
        if let Some(t) = self.lora_scratch.borrow().get(&key) {
            if t.xd.is_some() || !drop {
                return Ok(t.clone());
            }
        }
        let z = |shape: &[usize], what: &str| {
            Tensor::zeros(ctx, shape, DType::F32, &format!("{name}.{what}"))
        };
        let sc = Scratch {
            h: z(&[m, r], "lora_h")?,
            dh: z(&[m, r], "lora_dh")?,
            xd: if drop {
                Some(z(&[m, k], "lora_xd")?)
            } else {
                None
            },
            g: if drop {
                Some(z(&[m, k], "lora_g")?)
            } else {
                None
            },
        };
        self.lora_scratch.borrow_mut().insert(key, sc.clone());
        Ok(sc)
    }
}

impl Hooks for Adapter {
    fn prepare(&self, ctx: &Context, plan: &mut Plan) -> Result<()> {
        self.pre_forward(ctx, plan)
    }
    fn prompt(&self) -> Option<&Tensor> {
        match &self.kind {
            Kind::Prompt { table, .. } => Some(table),
            _ => None,
        }
    }
    fn prefix(&self) -> Option<&Tensor> {
        match &self.kind {
            Kind::Prefix { table, .. } => Some(table),
            _ => None,
        }
    }
    fn prompt_grad(&self) -> Option<&Tensor> {
        match &self.kind {
            Kind::Prompt { grad, .. } => Some(grad),
            _ => None,
        }
    }
    fn prefix_grad(&self) -> Option<&Tensor> {
        match &self.kind {
            Kind::Prefix { grad, .. } => Some(grad),
            _ => None,
        }
    }
    fn adapts(&self, _layer: usize, lin: &Linear) -> bool {
        matches!(&self.kind, Kind::Lora(s) if s.contains_key(&lin.name))
    }
    fn linear(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        _layer: usize,
        lin: &Linear,
        out: &Tensor,
        inp: &Tensor,
    ) -> Result<()> {
        let Kind::Lora(sites) = &self.kind else {
            return Ok(());
        };
        let Some(site) = sites.get(&lin.name) else {
            return Ok(());
        };
        let m = inp.shape()[0];
        let sc = self.scratch(ctx, &lin.name, m, site.r, lin.in_features)?;
        if let (true, Some(xd)) = (self.dropping(), &sc.xd) {
            lora::lora_dropout_forward(ctx, plan, xd, inp, &self.seed, site.id, self.dropout)?;
            return lora::lora_forward(ctx, plan, out, &sc.h, xd, &site.a, &site.b, site.scale);
        }
        lora::lora_forward(ctx, plan, out, &sc.h, inp, &site.a, &site.b, site.scale)
    }
    fn linear_backward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        _layer: usize,
        lin: &Linear,
        dout: &Tensor,
        inp: &Tensor,
        dinp: Option<&Tensor>,
    ) -> Result<()> {
        let Kind::Lora(sites) = &self.kind else {
            return Ok(());
        };
        let Some(site) = sites.get(&lin.name) else {
            return Ok(());
        };
        let m = inp.shape()[0];
        let sc = self.scratch(ctx, &lin.name, m, site.r, lin.in_features)?;
        if let (true, Some(xd), Some(g)) = (self.dropping(), &sc.xd, &sc.g) {
            // The bypass's dx goes through the same mask: into g, then masked
            // into dinp (which also zeroes g for the next step).
            lora::lora_backward(
                ctx,
                plan,
                dinp.map(|_| g),
                &site.da,
                &site.db,
                &sc.dh,
                dout,
                &sc.h,
                xd,
                &site.a,
                &site.b,
                site.scale,
            )?;
            if let Some(dx) = dinp {
                lora::lora_dropout_backward(ctx, plan, dx, g, &self.seed, site.id, self.dropout)?;
            }
            return Ok(());
        }
        lora::lora_backward(
            ctx, plan, dinp, &site.da, &site.db, &sc.dh, dout, &sc.h, inp, &site.a, &site.b,
            site.scale,
        )
    }
}
