//! The GPU buffers of one forward/backward shape: activations (`Acts`,
//! kept per layer when training), activation gradients (`Grads`), and the
//! KV cache of generation.

use crate::error::Result;
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

/// A norm's output and the statistics its backward reads.
#[derive(Clone)]
pub struct NormActs {
    pub out: Tensor,
    /// LayerNorm only.
    pub mean: Option<Tensor>,
    pub rstd: Tensor,
}

impl NormActs {
    /// Buffers for `n` rows of width `c`; `layernorm` adds the mean.
    fn new(ctx: &Context, n: usize, c: usize, layernorm: bool, label: &str) -> Result<NormActs> {
        Ok(NormActs {
            out: f32s(ctx, &[n, c], label)?,
            mean: if layernorm {
                Some(f32s(ctx, &[n], &format!("{label}_mean"))?)
            } else {
                None
            },
            rstd: f32s(ctx, &[n], &format!("{label}_rstd"))?,
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
    pub resid_mid: Tensor,
    pub ln2: NormActs,
    /// gate (SwiGLU) or fc (GELU) output (B*S, I).
    pub h1: Tensor,
    /// up (SwiGLU) output.
    pub h2: Option<Tensor>,
    pub act: Tensor,
    pub mlp_out: Tensor,
}

/// Activations of one forward shape. With `save`, each layer has its own
/// buffers (backward reads them); without, all layers share one set.
#[derive(Clone)]
pub struct Acts {
    pub shape: FwdShape,
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
}

fn f32s(ctx: &Context, shape: &[usize], label: &str) -> Result<Tensor> {
    Tensor::zeros(ctx, shape, DType::F32, label)
}

impl Acts {
    pub fn new(
        ctx: &Context,
        cfg: &ModelConfig,
        shape: FwdShape,
        save: bool,
        cached: bool,
    ) -> Result<Acts> {
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
        let swiglu = !ln;
        let mk_layer = |l: usize, resid: Tensor| -> Result<LayerActs> {
            let tag = |x: &str| format!("L{l}.{x}");
            Ok(LayerActs {
                resid,
                ln1: NormActs::new(ctx, n, c, ln, &tag("ln1"))?,
                qkv: if ln {
                    Some(f32s(ctx, &[n, 3 * c], &tag("qkv"))?)
                } else {
                    None
                },
                q: f32s(ctx, &[b, s, nh, hd], &tag("q"))?,
                k: f32s(ctx, &[b, s, kvh, hd], &tag("k"))?,
                v: f32s(ctx, &[b, s, kvh, hd], &tag("v"))?,
                kcat: if p > 0 && !cached {
                    Some(f32s(ctx, &[b, p + s, kvh, hd], &tag("kcat"))?)
                } else {
                    None
                },
                vcat: if p > 0 && !cached {
                    Some(f32s(ctx, &[b, p + s, kvh, hd], &tag("vcat"))?)
                } else {
                    None
                },
                att: f32s(ctx, &[b, s, nh, hd], &tag("att"))?,
                lse: f32s(ctx, &[b, nh, s], &tag("lse"))?,
                proj: f32s(ctx, &[n, c], &tag("proj"))?,
                resid_mid: f32s(ctx, &[n, c], &tag("resid_mid"))?,
                ln2: NormActs::new(ctx, n, c, ln, &tag("ln2"))?,
                h1: f32s(ctx, &[n, ff], &tag("h1"))?,
                h2: if swiglu {
                    Some(f32s(ctx, &[n, ff], &tag("h2"))?)
                } else {
                    None
                },
                act: f32s(ctx, &[n, ff], &tag("act"))?,
                mlp_out: f32s(ctx, &[n, c], &tag("mlp_out"))?,
            })
        };
        let x0 = f32s(ctx, &[b, s, c], "x0")?;
        let mut layers: Vec<LayerActs> = Vec::new();
        for l in 0..cfg.layers {
            if save {
                let resid = if l == 0 {
                    x0.reshape(&[n, c])?
                } else {
                    f32s(ctx, &[n, c], &format!("L{l}.resid"))?
                };
                layers.push(mk_layer(l, resid)?);
            } else if l == 0 {
                layers.push(mk_layer(l, x0.reshape(&[n, c])?)?);
            } else {
                // Each layer overwrites the residual stream in place: it reads
                // `resid` only before writing `resid_mid`, and writes the next
                // residual from `resid_mid` and `mlp_out`.
                layers.push(layers[0].clone());
            }
        }
        let resid_out = if save || cfg.layers == 0 {
            f32s(ctx, &[n, c], "resid_out")?
        } else {
            x0.reshape(&[n, c])?
        };
        Ok(Acts {
            shape,
            pos_ids: if ln {
                Some(Tensor::zeros(ctx, &[b, s], DType::I32, "pos_ids")?)
            } else {
                None
            },
            pos_emb: if ln {
                Some(f32s(ctx, &[b, s, c], "pos_emb")?)
            } else {
                None
            },
            emb: if ln {
                Some(f32s(ctx, &[b, s, c], "tok_emb")?)
            } else {
                None
            },
            x0,
            layers,
            resid_out,
            lnf: NormActs::new(ctx, n, c, ln, "lnf")?,
        })
    }
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
        })
    }
}

/// Position ids of a forward: row i of every batch has position p + i.
pub fn position_ids(shape: FwdShape) -> Vec<i32> {
    (0..shape.b)
        .flat_map(|_| (0..shape.s()).map(move |i| (shape.p + i) as i32))
        .collect()
}

/// Bytes the LM head's logits workspace may take: with a Gemma-size
/// vocabulary (262,144) that is 64 rows, where 512 rows of full logits
/// would take 512 MiB (and their gradient as much again).
pub const LOGITS_BUDGET_BYTES: u64 = 64 << 20;

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

/// Named gradient buffers, cleared together. They are separate buffers, not
/// views of one: wgpu tracks usage per buffer, so a dispatch may not read
/// one view of a buffer while writing another.
struct Arena {
    sizes: Vec<(String, Vec<usize>)>,
}

impl Arena {
    fn new() -> Arena {
        Arena { sizes: Vec::new() }
    }
    fn add(&mut self, name: &str, shape: &[usize]) -> usize {
        self.sizes.push((name.to_string(), shape.to_vec()));
        self.sizes.len() - 1
    }
    fn build(self, ctx: &Context, _label: &str) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let v = self
            .sizes
            .iter()
            .map(|(n, sh)| f32s(ctx, sh, n))
            .collect::<Result<Vec<_>>>()?;
        Ok((v.clone(), v))
    }
}

impl Grads {
    /// Gradient buffers for `shape` with `r` logit rows.
    pub fn new(ctx: &Context, cfg: &ModelConfig, shape: FwdShape, r: usize) -> Result<Grads> {
        let (c, nh, kvh, hd, ff) = (
            cfg.hidden,
            cfg.heads,
            cfg.kv_heads,
            cfg.head_dim,
            cfg.intermediate,
        );
        let (b, s, p, n) = (shape.b, shape.s(), shape.p, shape.rows());
        let gpt2 = cfg.arch == Arch::Gpt2;
        let mut h = Arena::new();
        let i_dresid = h.add("dresid", &[n, c]);
        let i_dlnf = h.add("dlnf", &[n, c]);
        let i_dg = h.add("dgathered", &[r, c]);
        let (head, hv) = h.build(ctx, "grads.head")?;
        let mut a = Arena::new();
        let i1 = a.add("dln1", &[n, c]);
        let i2 = a.add("dln2", &[n, c]);
        let iq = a.add("dq", &[b, s, nh, hd]);
        let ik = a.add("dk", &[b, s, kvh, hd]);
        let iv = a.add("dv", &[b, s, kvh, hd]);
        let ikc = (p > 0).then(|| a.add("dkcat", &[b, p + s, kvh, hd]));
        let ivc = (p > 0).then(|| a.add("dvcat", &[b, p + s, kvh, hd]));
        let ia = a.add("datt", &[b, s, nh, hd]);
        let idl = a.add("delta", &[b, nh, s]);
        let iqkv = gpt2.then(|| a.add("dqkv", &[n, 3 * c]));
        let ih1 = a.add("dh1", &[n, ff]);
        let ih2 = (!gpt2).then(|| a.add("dh2", &[n, ff]));
        let iact = a.add("dact", &[n, ff]);
        let (layer, lv) = a.build(ctx, "grads.layer")?;
        let g = |i: usize| lv[i].clone();
        Ok(Grads {
            dresid: hv[i_dresid].clone(),
            dlnf: hv[i_dlnf].clone(),
            dgathered: hv[i_dg].clone(),
            head,
            dln1: g(i1),
            dln2: g(i2),
            dq: g(iq),
            dk: g(ik),
            dv: g(iv),
            dkcat: ikc.map(g),
            dvcat: ivc.map(g),
            datt: g(ia),
            delta: g(idl),
            dqkv: iqkv.map(g),
            dh1: g(ih1),
            dh2: ih2.map(g),
            dact: g(iact),
            layer,
        })
    }
}
