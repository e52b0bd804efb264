//! The GPU buffers of one forward/backward shape: activations (`Acts`,
//! kept per layer when training), activation gradients (`Grads`), and the
//! KV cache of generation.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::gpu::ops::attention::decode_part_shape;
use crate::gpu::tensor::alloc_bytes;
use crate::gpu::{Context, DType, Tensor};
use crate::model::config::{Arch, ModelConfig};

/// Shape of one forward: `b` rows of `s` sequence rows (`n_virtual` virtual
/// tokens then `t` real tokens), after `p` K/V rows (prefix or cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwdShape {
    pub b: usize,
    pub t: usize,
    pub n_virtual: usize,
    pub p: usize,
}

impl FwdShape {
    pub fn s(&self) -> usize {
        self.n_virtual + self.t
    }
    pub fn rows(&self) -> usize {
        self.b * self.s()
    }
}

/// What a step buffer holds: the memory plan's lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufKind {
    /// Token ids, target rows, loss weights.
    Input,
    /// Activations kept for backward.
    Activation,
    /// Activation gradients.
    Gradient,
    /// Logits and their gradient, and the gathered rows the LM head reads.
    Logits,
}

/// One GPU buffer of a forward/backward shape. The allocation and the
/// memory planner both read these lists, so the plan counts what is made.
#[derive(Clone, Debug, PartialEq)]
pub struct BufSpec {
    pub label: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub kind: BufKind,
}

impl BufSpec {
    pub fn new(label: impl Into<String>, shape: &[usize], dtype: DType, kind: BufKind) -> BufSpec {
        BufSpec {
            label: label.into(),
            shape: shape.to_vec(),
            dtype,
            kind,
        }
    }
    fn f32(label: impl Into<String>, shape: &[usize], kind: BufKind) -> BufSpec {
        BufSpec::new(label, shape, DType::F32, kind)
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// What `Tensor::zeros` allocates for it.
    pub fn bytes(&self) -> u64 {
        alloc_bytes(self.numel())
    }
}

/// Bytes of `specs` of kind `kind` (all kinds with `None`).
pub fn specs_bytes(specs: &[BufSpec], kind: Option<BufKind>) -> u64 {
    specs
        .iter()
        .filter(|s| kind.is_none_or(|k| s.kind == k))
        .map(BufSpec::bytes)
        .sum()
}

/// Buffers by label, each sized for the largest shape it serves; a shape's
/// tensors are views at offset 0 of them. One buffer per label, not views
/// of one arena: wgpu tracks usage per buffer, so a dispatch may not read
/// one view of a buffer while writing another.
#[derive(Clone, Default)]
pub struct Pool {
    bufs: HashMap<String, Tensor>,
}

impl Pool {
    /// Allocate one zeroed buffer per spec.
    pub fn alloc(ctx: &Context, specs: &[BufSpec]) -> Result<Pool> {
        let mut bufs = HashMap::new();
        for s in specs {
            bufs.insert(
                s.label.clone(),
                Tensor::zeros(ctx, &s.shape, s.dtype, &s.label)?,
            );
        }
        Ok(Pool { bufs })
    }

    /// Whether every spec has a buffer at least its size.
    pub fn fits(&self, specs: &[BufSpec]) -> bool {
        specs.iter().all(|s| {
            self.bufs
                .get(&s.label)
                .is_some_and(|t| t.numel() >= s.numel())
        })
    }

    /// Views of `specs` into the pool, by label.
    pub fn views(&self, specs: &[BufSpec]) -> Result<Views> {
        let mut m = HashMap::new();
        for s in specs {
            let buf = self.bufs.get(&s.label).ok_or_else(|| {
                Error::invalid(
                    "buffers",
                    format!("no buffer `{}` in the pool for {:?}", s.label, s.shape),
                )
            })?;
            m.insert(s.label.clone(), buf.view(0, &s.shape, &s.label)?);
        }
        Ok(Views(m))
    }
}

/// A shape's tensors by label (see [`Pool::views`]).
pub struct Views(HashMap<String, Tensor>);

impl Views {
    pub fn get(&self, label: &str) -> Result<Tensor> {
        self.0
            .get(label)
            .cloned()
            .ok_or_else(|| Error::invalid("buffers", format!("no buffer `{label}` for this shape")))
    }
    /// Present only when the spec list has it.
    pub fn opt(&self, label: &str) -> Option<Tensor> {
        self.0.get(label).cloned()
    }
}

/// A norm's output and the statistics its backward reads.
#[derive(Clone)]
pub struct NormActs {
    pub out: Tensor,
    /// LayerNorm only.
    pub mean: Option<Tensor>,
    pub rstd: Tensor,
}

impl NormActs {
    /// Specs for `n` rows of width `c`; `layernorm` adds the mean.
    fn specs(v: &mut Vec<BufSpec>, n: usize, c: usize, layernorm: bool, label: &str) {
        let k = BufKind::Activation;
        v.push(BufSpec::f32(label, &[n, c], k));
        if layernorm {
            v.push(BufSpec::f32(format!("{label}_mean"), &[n], k));
        }
        v.push(BufSpec::f32(format!("{label}_rstd"), &[n], k));
    }

    fn from_views(v: &Views, label: &str) -> Result<NormActs> {
        Ok(NormActs {
            out: v.get(label)?,
            mean: v.opt(&format!("{label}_mean")),
            rstd: v.get(&format!("{label}_rstd"))?,
        })
    }
}

/// One layer's activations, kept for backward when training.
#[derive(Clone)]
pub struct LayerActs {
    /// The layer's input: the residual stream (B*S, C).
    pub resid: Tensor,
    pub ln1: NormActs,
    /// GPT-2's fused projection (B*S, 3C).
    pub qkv: Option<Tensor>,
    /// q and k as projected, before their per-head norms (qwen3, gemma3),
    /// and the norms' statistics (B*S*NH), (B*S*KVH).
    pub q_pre: Option<Tensor>,
    pub k_pre: Option<Tensor>,
    pub q_rstd: Option<Tensor>,
    pub k_rstd: Option<Tensor>,
    /// (B, S, NH, HD), rotated.
    pub q: Tensor,
    /// (B, S, KVH, HD), k rotated.
    pub k: Tensor,
    pub v: Tensor,
    /// (B, P + S, KVH, HD) when P > 0 and there is no cache.
    pub kcat: Option<Tensor>,
    pub vcat: Option<Tensor>,
    pub att: Tensor,
    pub lse: Tensor,
    pub proj: Tensor,
    /// The attention output's norm (gemma3), added to the residual.
    pub post_attn: Option<NormActs>,
    pub resid_mid: Tensor,
    pub ln2: NormActs,
    /// gate (SwiGLU) or fc (GELU) output (B*S, I).
    pub h1: Tensor,
    /// up (SwiGLU) output.
    pub h2: Option<Tensor>,
    pub act: Tensor,
    pub mlp_out: Tensor,
    /// The MLP output's norm (gemma3), added to the residual.
    pub post_mlp: Option<NormActs>,
}

/// Which activations a training forward keeps for backward. Every layer
/// keeps its input (the residual stream); the rest is a layer's own set of
/// buffers, or one set shared by the layers that keep none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keep {
    /// Layers below this one keep nothing of their own: backward stops
    /// above them (`Model::backward_floor`).
    pub from: usize,
    /// Gradient checkpointing: no layer keeps a set of its own, and backward
    /// recomputes each layer's from its input before using it.
    pub recompute: bool,
}

/// Activations of one forward shape. With `save`, each layer has its own
/// buffers (backward reads them); without, all layers share one set.
#[derive(Clone)]
pub struct Acts {
    pub shape: FwdShape,
    /// The layers share one set that backward must refill ([`Keep::recompute`]).
    pub recompute: bool,
    /// Embedding output / first layer input (B*S, C); the positions' ids.
    pub x0: Tensor,
    pub pos_ids: Option<Tensor>,
    pub pos_emb: Option<Tensor>,
    /// GPT-2: prompt + token embeddings before the positions are added.
    pub emb: Option<Tensor>,
    pub layers: Vec<LayerActs>,
    /// The final residual (B*S, C) and the final norm.
    pub resid_out: Tensor,
    pub lnf: NormActs,
    /// Packed rows' starts and positions (train --packing); set by the trainer.
    pub pack: Option<crate::model::packing::PackBufs>,
}

/// The norm `label` when the spec list has it.
fn opt_norm(v: &Views, label: &str) -> Result<Option<NormActs>> {
    match v.opt(label) {
        Some(_) => NormActs::from_views(v, label).map(Some),
        None => Ok(None),
    }
}

fn f32s(ctx: &Context, shape: &[usize], label: &str) -> Result<Tensor> {
    Tensor::zeros(ctx, shape, DType::F32, label)
}

impl Acts {
    /// Allocate the activations of `shape` (see [`Acts::specs`]).
    pub fn new(
        ctx: &Context,
        cfg: &ModelConfig,
        shape: FwdShape,
        save: bool,
        cached: bool,
    ) -> Result<Acts> {
        let specs = Acts::specs(cfg, shape, save, cached);
        Acts::in_pool(&Pool::alloc(ctx, &specs)?, cfg, shape, save, cached)
    }

    /// The activations of `shape` as views into `pool` (sized for this
    /// shape or a larger one).
    pub fn in_pool(
        pool: &Pool,
        cfg: &ModelConfig,
        shape: FwdShape,
        save: bool,
        cached: bool,
    ) -> Result<Acts> {
        Acts::in_pool_kept(pool, cfg, shape, save.then(Keep::default), cached)
    }

    /// [`Acts::in_pool`] for training with `keep` (`None`: inference, one
    /// set for all layers and the residual stream overwritten in place).
    pub fn in_pool_kept(
        pool: &Pool,
        cfg: &ModelConfig,
        shape: FwdShape,
        keep: Option<Keep>,
        cached: bool,
    ) -> Result<Acts> {
        let v = pool.views(&Acts::specs_kept(cfg, shape, keep, cached))?;
        let n = shape.rows();
        let c = cfg.hidden;
        let x0 = v.get("x0")?;
        let layer = |l: usize, resid: Tensor| -> Result<LayerActs> {
            let tag = |x: &str| format!("L{l}.{x}");
            Ok(LayerActs {
                resid,
                ln1: NormActs::from_views(&v, &tag("ln1"))?,
                qkv: v.opt(&tag("qkv")),
                q_pre: v.opt(&tag("q_pre")),
                k_pre: v.opt(&tag("k_pre")),
                q_rstd: v.opt(&tag("q_rstd")),
                k_rstd: v.opt(&tag("k_rstd")),
                q: v.get(&tag("q"))?,
                k: v.get(&tag("k"))?,
                v: v.get(&tag("v"))?,
                kcat: v.opt(&tag("kcat")),
                vcat: v.opt(&tag("vcat")),
                att: v.get(&tag("att"))?,
                lse: v.get(&tag("lse"))?,
                proj: v.get(&tag("proj"))?,
                post_attn: opt_norm(&v, &tag("post_attn"))?,
                resid_mid: v.get(&tag("resid_mid"))?,
                ln2: NormActs::from_views(&v, &tag("ln2"))?,
                h1: v.get(&tag("h1"))?,
                h2: v.opt(&tag("h2")),
                act: v.get(&tag("act"))?,
                mlp_out: v.get(&tag("mlp_out"))?,
                post_mlp: opt_norm(&v, &tag("post_mlp"))?,
            })
        };
        let mut layers: Vec<LayerActs> = Vec::new();
        for l in 0..cfg.layers {
            if l == 0 {
                layers.push(layer(0, x0.reshape(&[n, c])?)?);
            } else if owns_set(keep, l) {
                layers.push(layer(l, v.get(&format!("L{l}.resid"))?)?);
            } else if keep.is_some() {
                // Layer 0's set, with this layer's own input.
                let mut a = layers[0].clone();
                a.resid = v.get(&format!("L{l}.resid"))?;
                layers.push(a);
            } else {
                // Each layer overwrites the residual stream in place: it reads
                // `resid` only before writing `resid_mid`, and writes the next
                // residual from `resid_mid` and `mlp_out`.
                layers.push(layers[0].clone());
            }
        }
        let resid_out = match v.opt("resid_out") {
            Some(t) => t,
            None => x0.reshape(&[n, c])?,
        };
        Ok(Acts {
            shape,
            recompute: keep.is_some_and(|k| k.recompute),
            pos_ids: v.opt("pos_ids"),
            pos_emb: v.opt("pos_emb"),
            emb: v.opt("tok_emb"),
            x0,
            layers,
            resid_out,
            lnf: NormActs::from_views(&v, "lnf")?,
            pack: None,
        })
    }

    /// Every buffer of the activations of `shape`: with `save` one set per
    /// layer (training), else one set for all; `cached` (generation) has no
    /// kcat/vcat.
    pub fn specs(cfg: &ModelConfig, shape: FwdShape, save: bool, cached: bool) -> Vec<BufSpec> {
        Acts::specs_kept(cfg, shape, save.then(Keep::default), cached)
    }

    /// [`Acts::specs`] for training with `keep` (`None`: inference). Layer
    /// 0's set (`L0.*`) is the one the layers without a set of their own share.
    pub fn specs_kept(
        cfg: &ModelConfig,
        shape: FwdShape,
        keep: Option<Keep>,
        cached: bool,
    ) -> Vec<BufSpec> {
        let (c, nh, kvh, hd, ff) = (
            cfg.hidden,
            cfg.heads,
            cfg.kv_heads,
            cfg.head_dim,
            cfg.intermediate,
        );
        let (b, s, p) = (shape.b, shape.s(), shape.p);
        let n = shape.rows();
        let ln = cfg.arch == Arch::Gpt2;
        let k = BufKind::Activation;
        let mut v = vec![BufSpec::f32("x0", &[b, s, c], k)];
        for l in 0..cfg.layers {
            let tag = |x: &str| format!("L{l}.{x}");
            // Layer 0 reads x0; later layers their own residual (training).
            if l > 0 && keep.is_some() {
                v.push(BufSpec::f32(tag("resid"), &[n, c], k));
            }
            if l > 0 && !owns_set(keep, l) {
                continue;
            }
            NormActs::specs(&mut v, n, c, ln, &tag("ln1"));
            if ln {
                v.push(BufSpec::f32(tag("qkv"), &[n, 3 * c], k));
            }
            if cfg.qk_norm {
                v.push(BufSpec::f32(tag("q_pre"), &[b, s, nh, hd], k));
                v.push(BufSpec::f32(tag("k_pre"), &[b, s, kvh, hd], k));
                v.push(BufSpec::f32(tag("q_rstd"), &[n * nh], k));
                v.push(BufSpec::f32(tag("k_rstd"), &[n * kvh], k));
            }
            v.push(BufSpec::f32(tag("q"), &[b, s, nh, hd], k));
            v.push(BufSpec::f32(tag("k"), &[b, s, kvh, hd], k));
            v.push(BufSpec::f32(tag("v"), &[b, s, kvh, hd], k));
            if p > 0 && !cached {
                v.push(BufSpec::f32(tag("kcat"), &[b, p + s, kvh, hd], k));
                v.push(BufSpec::f32(tag("vcat"), &[b, p + s, kvh, hd], k));
            }
            v.push(BufSpec::f32(tag("att"), &[b, s, nh, hd], k));
            v.push(BufSpec::f32(tag("lse"), &[b, nh, s], k));
            v.push(BufSpec::f32(tag("proj"), &[n, c], k));
            if cfg.sandwich_norms {
                NormActs::specs(&mut v, n, c, false, &tag("post_attn"));
            }
            v.push(BufSpec::f32(tag("resid_mid"), &[n, c], k));
            NormActs::specs(&mut v, n, c, ln, &tag("ln2"));
            v.push(BufSpec::f32(tag("h1"), &[n, ff], k));
            if !ln {
                v.push(BufSpec::f32(tag("h2"), &[n, ff], k));
            }
            v.push(BufSpec::f32(tag("act"), &[n, ff], k));
            v.push(BufSpec::f32(tag("mlp_out"), &[n, c], k));
            if cfg.sandwich_norms {
                NormActs::specs(&mut v, n, c, false, &tag("post_mlp"));
            }
        }
        if keep.is_some() || cfg.layers == 0 {
            v.push(BufSpec::f32("resid_out", &[n, c], k));
        }
        if ln {
            v.push(BufSpec::new("pos_ids", &[b, s], DType::I32, k));
            v.push(BufSpec::f32("pos_emb", &[b, s, c], k));
            v.push(BufSpec::f32("tok_emb", &[b, s, c], k));
        }
        NormActs::specs(&mut v, n, c, ln, "lnf");
        v
    }
}

/// Whether layer `l` has a set of activations of its own (layer 0 always
/// has one: the set the others share).
fn owns_set(keep: Option<Keep>, l: usize) -> bool {
    l == 0 || keep.is_some_and(|k| !k.recompute && l >= k.from)
}

impl Acts {
    /// The residual after layer `l`: the next layer's input, or `resid_out`.
    pub fn layer_output(&self, l: usize) -> &Tensor {
        self.layers.get(l + 1).map_or(&self.resid_out, |x| &x.resid)
    }
}

/// A KV cache for one sequence (batch 1): per layer (1, cap, KVH, HD).
pub struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub cap: usize,
    /// Rows filled so far (prefix rows included).
    pub len: usize,
    /// (1) u32: where a decode step's token goes (the rows before it),
    /// written before each replay of the recorded step.
    pub pos: Tensor,
    /// `attention_decode`'s scratch, shared by the layers.
    pub part: Tensor,
}

impl KvCache {
    pub fn new(ctx: &Context, cfg: &ModelConfig, cap: usize) -> Result<KvCache> {
        let mk = |x: &str, l: usize| {
            f32s(
                ctx,
                &[1, cap, cfg.kv_heads, cfg.head_dim],
                &format!("cache.{x}{l}"),
            )
        };
        Ok(KvCache {
            k: (0..cfg.layers).map(|l| mk("k", l)).collect::<Result<_>>()?,
            v: (0..cfg.layers).map(|l| mk("v", l)).collect::<Result<_>>()?,
            cap,
            len: 0,
            pos: Tensor::zeros(ctx, &[1], DType::U32, "cache.pos")?,
            part: f32s(
                ctx,
                &decode_part_shape(cfg.heads, cfg.head_dim, cap),
                "cache.decode_part",
            )?,
        })
    }
}

/// Position ids of a forward: row i of every batch has position p + i.
pub fn position_ids(shape: FwdShape) -> Vec<i32> {
    (0..shape.b)
        .flat_map(|_| (0..shape.s()).map(move |i| (shape.p + i) as i32))
        .collect()
}

/// Bytes the LM head's logits workspace may take. One chunk avoids
/// recomputing the head's logits in backward (measured ~10% of a SmolLM2
/// 4x128 step on lavapipe), so the budget holds 512 rows of a 49,152-token
/// vocabulary; a Gemma-size one (262,144) gets 128-row chunks, where full
/// logits would take 512 MiB (and their gradient as much again).
pub const LOGITS_BUDGET_BYTES: u64 = 128 << 20;

/// Rows of logits the head computes at a time for `rows` target rows of a
/// `vocab`-wide head over `hidden`-wide states, within
/// [`LOGITS_BUDGET_BYTES`]: all of them when they fit (then backward reuses
/// the forward's logits), else as many as fit, at least one granule.
pub fn logits_chunk_rows(rows: usize, vocab: usize, hidden: usize) -> usize {
    logits_chunk_rows_within(rows, vocab, hidden, LOGITS_BUDGET_BYTES)
}

/// [`logits_chunk_rows`] for another byte budget. Several chunks come in a
/// multiple of 64 / gcd(hidden, 64) rows (1 for the usual widths): the
/// chunks are views of the (R, hidden) states, and a view must start 256-byte
/// aligned (the largest storage offset alignment wgpu allows).
pub fn logits_chunk_rows_within(rows: usize, vocab: usize, hidden: usize, budget: u64) -> usize {
    let per = usize::try_from(budget / (vocab.max(1) as u64 * 4)).unwrap_or(usize::MAX);
    if per >= rows {
        return rows.max(1);
    }
    let granule = 64 / gcd(hidden, 64);
    (per / granule * granule).max(granule).min(rows)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

/// The LM head's buffers for `r` target rows: their hidden states, gathered
/// once, and one logits workspace of at most [`logits_chunk_rows`] rows,
/// which backward overwrites with the logits' gradient. Full (R, V) logits
/// never exist: the head and the loss run a row chunk at a time.
pub struct HeadBufs {
    /// (1, R, C): the final-norm rows that have a target.
    pub gathered: Tensor,
    /// (rc, V), rc = the chunk rows.
    pub logits: Tensor,
}

impl HeadBufs {
    /// Buffers for `r` rows within [`LOGITS_BUDGET_BYTES`].
    pub fn new(ctx: &Context, cfg: &ModelConfig, r: usize) -> Result<HeadBufs> {
        HeadBufs::with_budget(ctx, cfg, r, LOGITS_BUDGET_BYTES)
    }

    /// Buffers for `r` rows whose logits workspace fits `budget` bytes.
    pub fn with_budget(
        ctx: &Context,
        cfg: &ModelConfig,
        r: usize,
        budget: u64,
    ) -> Result<HeadBufs> {
        let rc = logits_chunk_rows_within(r, cfg.vocab, cfg.hidden, budget);
        Ok(HeadBufs {
            gathered: f32s(ctx, &[1, r, cfg.hidden], "gathered")?,
            logits: f32s(ctx, &[rc, cfg.vocab], "logits")?,
        })
    }

    /// The rows of logits computed at a time.
    pub fn chunk_rows(&self) -> usize {
        self.logits.shape()[0]
    }
}

/// Activation gradients of one backward shape. What a layer needs is cleared
/// by consecutive clears at its start (one pass break; every backward kernel
/// accumulates); `dresid` carries the residual gradient from layer to layer.
pub struct Grads {
    /// (B*S, C): gradient of the residual stream.
    pub dresid: Tensor,
    /// Head buffers, cleared once per backward: dresid, dlnf, dgathered.
    /// The logits' gradient lives in [`HeadBufs::logits`], written in place.
    pub(crate) head: Vec<Tensor>,
    pub dlnf: Tensor,
    pub dgathered: Tensor,
    /// Layer buffers, cleared at the start of every layer's backward.
    pub(crate) layer: Vec<Tensor>,
    pub(crate) dln1: Tensor,
    pub(crate) dln2: Tensor,
    pub(crate) dq: Tensor,
    pub(crate) dk: Tensor,
    /// Gradients of q and k before their per-head norms (qwen3, gemma3).
    pub(crate) dq_pre: Option<Tensor>,
    pub(crate) dk_pre: Option<Tensor>,
    /// Gradients of the attention and MLP outputs before their norms
    /// (gemma3).
    pub(crate) dproj: Option<Tensor>,
    pub(crate) dmlp_out: Option<Tensor>,
    pub(crate) dv: Tensor,
    pub(crate) dkcat: Option<Tensor>,
    pub(crate) dvcat: Option<Tensor>,
    pub(crate) datt: Tensor,
    pub(crate) delta: Tensor,
    pub(crate) dqkv: Option<Tensor>,
    pub(crate) dh1: Tensor,
    pub(crate) dh2: Option<Tensor>,
    pub(crate) dact: Tensor,
}

/// The logits workspace of `r` logit rows: one chunk of logits (at most
/// [`logits_chunk_rows`] rows of V, which backward overwrites with their
/// gradient), the gathered rows the LM head reads (1, R, C) and their
/// gradient. The memory plan's "logits workspace" line is this list's bytes.
pub fn logits_workspace(cfg: &ModelConfig, r: usize) -> Vec<BufSpec> {
    logits_workspace_within(cfg, r, LOGITS_BUDGET_BYTES)
}

/// [`logits_workspace`] with the logits chunk sized for `budget` bytes.
pub fn logits_workspace_within(cfg: &ModelConfig, r: usize, budget: u64) -> Vec<BufSpec> {
    let (c, v) = (cfg.hidden, cfg.vocab);
    let rc = logits_chunk_rows_within(r, v, c, budget);
    let k = BufKind::Logits;
    vec![
        BufSpec::f32("logits", &[rc, v], k),
        BufSpec::f32("gathered", &[1, r, c], k),
        BufSpec::f32("dgathered", &[r, c], k),
    ]
}

/// The gradient part of [`logits_workspace`] (what `Grads` holds).
fn is_logits_grad(s: &BufSpec) -> bool {
    s.label == "dgathered"
}

/// Gradient buffers cleared at the start of every layer's backward, in
/// clearing order.
const LAYER_GRADS: [&str; 17] = [
    "dln1", "dln2", "dq", "dk", "dv", "dkcat", "dvcat", "datt", "delta", "dqkv", "dh1", "dh2",
    "dact", "dq_pre", "dk_pre", "dproj", "dmlp_out",
];

impl Grads {
    /// Gradient buffers for `shape` with `r` logit rows.
    pub fn new(ctx: &Context, cfg: &ModelConfig, shape: FwdShape, r: usize) -> Result<Grads> {
        let specs = Grads::specs(cfg, shape, r);
        Grads::in_pool(&Pool::alloc(ctx, &specs)?, cfg, shape, r)
    }

    /// Every buffer of the activation gradients of `shape` (the logits
    /// gradient of `r` rows included).
    pub fn specs(cfg: &ModelConfig, shape: FwdShape, r: usize) -> Vec<BufSpec> {
        let (c, nh, kvh, hd, ff) = (
            cfg.hidden,
            cfg.heads,
            cfg.kv_heads,
            cfg.head_dim,
            cfg.intermediate,
        );
        let (b, s, p, n) = (shape.b, shape.s(), shape.p, shape.rows());
        let gpt2 = cfg.arch == Arch::Gpt2;
        let k = BufKind::Gradient;
        let mut v = vec![
            BufSpec::f32("dresid", &[n, c], k),
            BufSpec::f32("dlnf", &[n, c], k),
        ];
        v.extend(logits_workspace(cfg, r).into_iter().filter(is_logits_grad));
        v.push(BufSpec::f32("dln1", &[n, c], k));
        v.push(BufSpec::f32("dln2", &[n, c], k));
        v.push(BufSpec::f32("dq", &[b, s, nh, hd], k));
        v.push(BufSpec::f32("dk", &[b, s, kvh, hd], k));
        v.push(BufSpec::f32("dv", &[b, s, kvh, hd], k));
        if p > 0 {
            v.push(BufSpec::f32("dkcat", &[b, p + s, kvh, hd], k));
            v.push(BufSpec::f32("dvcat", &[b, p + s, kvh, hd], k));
        }
        v.push(BufSpec::f32("datt", &[b, s, nh, hd], k));
        v.push(BufSpec::f32("delta", &[b, nh, s], k));
        if gpt2 {
            v.push(BufSpec::f32("dqkv", &[n, 3 * c], k));
        }
        v.push(BufSpec::f32("dh1", &[n, ff], k));
        if !gpt2 {
            v.push(BufSpec::f32("dh2", &[n, ff], k));
        }
        v.push(BufSpec::f32("dact", &[n, ff], k));
        if cfg.qk_norm {
            v.push(BufSpec::f32("dq_pre", &[b, s, nh, hd], k));
            v.push(BufSpec::f32("dk_pre", &[b, s, kvh, hd], k));
        }
        if cfg.sandwich_norms {
            v.push(BufSpec::f32("dproj", &[n, c], k));
            v.push(BufSpec::f32("dmlp_out", &[n, c], k));
        }
        v
    }

    /// The gradients of `shape` as views into `pool`.
    pub fn in_pool(pool: &Pool, cfg: &ModelConfig, shape: FwdShape, r: usize) -> Result<Grads> {
        let v = pool.views(&Grads::specs(cfg, shape, r))?;
        let (dresid, dlnf) = (v.get("dresid")?, v.get("dlnf")?);
        let dgathered = v.get("dgathered")?;
        Ok(Grads {
            head: vec![dresid.clone(), dlnf.clone(), dgathered.clone()],
            dresid,
            dlnf,
            dgathered,
            layer: LAYER_GRADS.iter().filter_map(|l| v.opt(l)).collect(),
            dln1: v.get("dln1")?,
            dln2: v.get("dln2")?,
            dq: v.get("dq")?,
            dk: v.get("dk")?,
            dq_pre: v.opt("dq_pre"),
            dk_pre: v.opt("dk_pre"),
            dproj: v.opt("dproj"),
            dmlp_out: v.opt("dmlp_out"),
            dv: v.get("dv")?,
            dkcat: v.opt("dkcat"),
            dvcat: v.opt("dvcat"),
            datt: v.get("datt")?,
            delta: v.get("delta")?,
            dqkv: v.opt("dqkv"),
            dh1: v.get("dh1")?,
            dh2: v.opt("dh2"),
            dact: v.get("dact")?,
        })
    }
}
