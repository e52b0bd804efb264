//! The decoder-only transformer on the GPU: frozen weights uploaded once, and
//! the forward schedule as a plain per-layer list of kernel calls (llm.c
//! style). One schedule serves the llama family (RMSNorm, RoPE, SwiGLU,
//! separate q/k/v, optional q/k/v biases) and gpt2 (LayerNorm, learned
//! positions, tanh-GELU, fused c_attn), branching on the few places where
//! they differ.
//!
//! Sequence layout of one forward (per batch row): `S` rows of hidden state,
//! which are the `N` virtual tokens of a prompt-tuning adapter followed by
//! the `T` real tokens. Attention also sees `P` K/V rows in front of those:
//! a prefix-tuning adapter's rows, or a KV cache's earlier tokens. Row `i`
//! of the sequence has position `P + i` (PEFT's convention for prefixes).

use std::path::Path;

use crate::error::{Error, Result};
use crate::gpu::ops::attention::{attention_backward, attention_forward, MAX_HEAD_DIM};
use crate::gpu::ops::copy::{copy_rows, Layout};
use crate::gpu::ops::{activation, embedding, loss, matmul, norm, rope};
use crate::gpu::{Context, DType, Plan, Tensor, TexMatrix};
use crate::model::config::{Arch, ModelConfig};
use crate::model::weights::Weights;

/// A frozen weight matrix (out, in) as the matmul reads it.
pub enum Store {
    /// Packed once into a texture (the fast path on every adapter measured).
    Packed(TexMatrix),
    /// A storage buffer (textures disabled or the matrix beyond their limits).
    Buffer(Tensor),
}

/// A frozen linear layer `y = x W^T (+ b)`, named by its Hugging Face module
/// path (what PEFT's `target_modules` match against).
pub struct Linear {
    pub name: String,
    pub out_features: usize,
    pub in_features: usize,
    w: Store,
    bias: Option<Tensor>,
}

impl Linear {
    /// Upload `w` (out, in) and pack it when textures apply.
    fn upload(
        ctx: &Context,
        name: &str,
        w: &[f32],
        out_f: usize,
        in_f: usize,
        bias: Option<Vec<f32>>,
    ) -> Result<Linear> {
        let t = Tensor::from_f32(ctx, w, &[out_f, in_f], &format!("{name}.weight"))?;
        let w = if matmul::use_textures(ctx, &[(out_f, in_f)]) {
            let mut plan = Plan::new(name);
            let packed = matmul::pack(ctx, &mut plan, &t)?;
            plan.run(ctx)?;
            Store::Packed(packed)
        } else {
            Store::Buffer(t)
        };
        let bias = match bias {
            Some(b) => Some(Tensor::from_f32(
                ctx,
                &b,
                &[out_f],
                &format!("{name}.bias"),
            )?),
            None => None,
        };
        Ok(Linear {
            name: name.to_string(),
            out_features: out_f,
            in_features: in_f,
            w,
            bias,
        })
    }

    /// A Hugging Face `nn.Linear` (weight (out, in)) or, with `conv1d`, a
    /// GPT-2 `Conv1D` (weight (in, out), transposed here once).
    fn load(
        ctx: &Context,
        wts: &Weights,
        name: &str,
        out_f: usize,
        in_f: usize,
        bias: bool,
        conv1d: bool,
    ) -> Result<Linear> {
        let wname = format!("{name}.weight");
        let w = if conv1d {
            let w = wts.get_f32(&wname, &[in_f, out_f])?;
            let mut t = vec![0f32; w.len()];
            for i in 0..in_f {
                for o in 0..out_f {
                    t[o * in_f + i] = w[i * out_f + o];
                }
            }
            t
        } else {
            wts.get_f32(&wname, &[out_f, in_f])?
        };
        let b = if bias {
            Some(wts.get_f32(&format!("{name}.bias"), &[out_f])?)
        } else {
            None
        };
        Linear::upload(ctx, name, &w, out_f, in_f, b)
    }

    /// out (M, out) = inp (M, in) W^T + b.
    pub fn forward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        out: &Tensor,
        inp: &Tensor,
    ) -> Result<()> {
        match &self.w {
            Store::Packed(w) => matmul::matmul_forward_packed(
                ctx,
                plan,
                out,
                inp,
                w,
                self.bias.as_ref(),
                1.0,
                false,
            ),
            Store::Buffer(w) => matmul::matmul_forward(ctx, plan, out, inp, w, self.bias.as_ref()),
        }
    }

    /// dinp (M, in) += dout (M, out) W.
    pub fn backward_input(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        dinp: &Tensor,
        dout: &Tensor,
    ) -> Result<()> {
        match &self.w {
            Store::Packed(w) => matmul::matmul_backward_input_packed(ctx, plan, dinp, dout, w, 1.0),
            Store::Buffer(w) => matmul::matmul_backward_input(ctx, plan, dinp, dout, w),
        }
    }

    fn bytes(&self) -> u64 {
        let w = match &self.w {
            Store::Packed(t) => (t.rows() * t.cols().div_ceil(4) * 16) as u64,
            Store::Buffer(t) => t.bytes(),
        };
        w + self.bias.as_ref().map_or(0, |b| b.bytes())
    }
}

/// RMSNorm (weight) or LayerNorm (weight, bias).
pub struct Norm {
    pub w: Tensor,
    pub b: Option<Tensor>,
    pub eps: f32,
}

impl Norm {
    fn load(
        ctx: &Context,
        wts: &Weights,
        name: &str,
        c: usize,
        bias: bool,
        eps: f64,
    ) -> Result<Norm> {
        let w = wts.get_f32(&format!("{name}.weight"), &[c])?;
        let b = if bias {
            Some(Tensor::from_f32(
                ctx,
                &wts.get_f32(&format!("{name}.bias"), &[c])?,
                &[c],
                &format!("{name}.bias"),
            )?)
        } else {
            None
        };
        Ok(Norm {
            w: Tensor::from_f32(ctx, &w, &[c], &format!("{name}.weight"))?,
            b,
            eps: eps as f32,
        })
    }

    /// out, (mean), rstd <- norm(inp).
    pub fn forward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        out: &Tensor,
        mean: Option<&Tensor>,
        rstd: &Tensor,
        inp: &Tensor,
    ) -> Result<()> {
        match (&self.b, mean) {
            (Some(b), Some(m)) => {
                norm::layernorm_forward(ctx, plan, out, m, rstd, inp, &self.w, b, self.eps)
            }
            (None, _) => norm::rmsnorm_forward(ctx, plan, out, rstd, inp, &self.w, self.eps),
            (Some(_), None) => Err(Error::invalid(
                "layernorm_forward",
                "LayerNorm needs a mean buffer",
            )),
        }
    }

    /// dinp += d norm / d inp . dout.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        dinp: &Tensor,
        dout: &Tensor,
        inp: &Tensor,
        mean: Option<&Tensor>,
        rstd: &Tensor,
    ) -> Result<()> {
        match (&self.b, mean) {
            (Some(_), Some(m)) => {
                norm::layernorm_backward(ctx, plan, dinp, dout, inp, &self.w, m, rstd)
            }
            (None, _) => norm::rmsnorm_backward(ctx, plan, dinp, dout, inp, &self.w, rstd),
            (Some(_), None) => Err(Error::invalid(
                "layernorm_backward",
                "LayerNorm needs a mean buffer",
            )),
        }
    }

    fn bytes(&self) -> u64 {
        self.w.bytes() + self.b.as_ref().map_or(0, |b| b.bytes())
    }
}

/// q/k/v projections: separate (llama family) or GPT-2's fused c_attn.
// One per layer, built once: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// The MLP: llama's SwiGLU or GPT-2's GELU.
#[allow(clippy::large_enum_variant)]
pub enum Mlp {
    SwiGlu {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    Gelu {
        fc: Linear,
        proj: Linear,
    },
}

/// One transformer layer's frozen weights.
pub struct Block {
    pub ln1: Norm,
    pub qkv: Qkv,
    pub o: Linear,
    pub ln2: Norm,
    pub mlp: Mlp,
}

impl Block {
    /// Every linear layer of the block, in forward order.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = match &self.qkv {
            Qkv::Split { q, k, v } => vec![q, k, v],
            Qkv::Fused(l) => vec![l],
        };
        v.push(&self.o);
        match &self.mlp {
            Mlp::SwiGlu { gate, up, down } => v.extend([gate, up, down]),
            Mlp::Gelu { fc, proj } => v.extend([fc, proj]),
        }
        v
    }
}

/// What an adapter adds to the frozen model's forward.
pub trait Hooks {
    /// The learned virtual-token embeddings (N, C) put in front of the
    /// input (prompt tuning).
    fn prompt(&self) -> Option<&Tensor> {
        None
    }
    /// The learned prefix (N, L * 2 * kv_dim), PEFT's layout:
    /// view(N, L, 2, kv_heads, head_dim) (prefix tuning).
    fn prefix(&self) -> Option<&Tensor> {
        None
    }
    /// Recorded at the start of every forward: compute what the other hooks
    /// return (e.g. a prefix produced by a projection MLP).
    fn prepare(&self, _ctx: &Context, _plan: &mut Plan) -> Result<()> {
        Ok(())
    }
    /// Called right after `out = lin(inp)`; adds e.g. a LoRA update.
    fn linear(
        &self,
        _ctx: &Context,
        _plan: &mut Plan,
        _layer: usize,
        _lin: &Linear,
        _out: &Tensor,
        _inp: &Tensor,
    ) -> Result<()> {
        Ok(())
    }
    /// Whether [`Hooks::linear`] does anything for this layer (training:
    /// backward must reach it).
    fn adapts(&self, _layer: usize, _lin: &Linear) -> bool {
        false
    }
    /// Backward of [`Hooks::linear`]: accumulate the adapter's gradients from
    /// `dout`, and its share of `dinp` when given.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        _ctx: &Context,
        _plan: &mut Plan,
        _layer: usize,
        _lin: &Linear,
        _dout: &Tensor,
        _inp: &Tensor,
        _dinp: Option<&Tensor>,
    ) -> Result<()> {
        Ok(())
    }
    /// Gradient buffer of [`Hooks::prompt`], same shape (accumulated).
    fn prompt_grad(&self) -> Option<&Tensor> {
        None
    }
    /// Gradient buffer of [`Hooks::prefix`], same shape (accumulated).
    fn prefix_grad(&self) -> Option<&Tensor> {
        None
    }
}

/// The frozen model alone.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// A model on the GPU.
pub struct Model {
    pub cfg: ModelConfig,
    /// Token embeddings (V, C), gathered by id.
    pub wte: Tensor,
    /// GPT-2's learned positions (max_positions, C).
    pub wpe: Option<Tensor>,
    pub blocks: Vec<Block>,
    pub ln_f: Norm,
    pub lm_head: Linear,
    /// RoPE tables (max_positions, head_dim / 2), llama family only.
    pub rope: Option<(Tensor, Tensor)>,
    /// Parameters in the checkpoint (tied matrices counted once).
    pub params: usize,
    /// Identifies the weights (shape and sampled embedding values), so that
    /// an adapter or checkpoint made on another base model is caught.
    pub fingerprint: u64,
}

/// FNV-1a over the model's dimensions and up to 4096 evenly spaced
/// embedding values: cheap, and different for any two checkpoints that are
/// not copies of each other (fine-tunes of one base included).
pub fn weights_fingerprint(cfg: &ModelConfig, wte: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for d in [cfg.vocab, cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads] {
        eat(d as u64);
    }
    let stride = (wte.len() / 4096).max(1);
    for x in wte.iter().step_by(stride) {
        eat(x.to_bits() as u64);
    }
    h
}

impl Model {
    /// Load a Hugging Face model folder (config.json + safetensors).
    pub fn load(ctx: &Context, dir: &Path) -> Result<Model> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let wts = Weights::open(dir)?;
        Model::from_weights(ctx, cfg, &wts)
    }

    /// Upload `wts` for `cfg`, checking every shape against the config.
    pub fn from_weights(ctx: &Context, cfg: ModelConfig, wts: &Weights) -> Result<Model> {
        if cfg.head_dim > MAX_HEAD_DIM || !cfg.head_dim.is_multiple_of(4) {
            return Err(Error::Config {
                path: "config.json".into(),
                message: format!(
                    "head_dim {} is not supported (needs a multiple of 4, at most {MAX_HEAD_DIM})",
                    cfg.head_dim
                ),
            });
        }
        let (c, v) = (cfg.hidden, cfg.vocab);
        let mut params = 0usize;
        let gpt2 = cfg.arch == Arch::Gpt2;
        // GPT-2 checkpoints come with or without the `transformer.` prefix.
        let root = if gpt2 {
            if wts.contains("transformer.wte.weight") {
                "transformer."
            } else {
                ""
            }
        } else {
            "model."
        };
        let emb_name = if gpt2 {
            format!("{root}wte.weight")
        } else {
            format!("{root}embed_tokens.weight")
        };
        let wte_host = wts.get_f32(&emb_name, &[v, c])?;
        params += wte_host.len();
        let fingerprint = weights_fingerprint(&cfg, &wte_host);
        let wte = Tensor::from_f32(ctx, &wte_host, &[v, c], &emb_name)?;
        let wpe = if gpt2 {
            let name = format!("{root}wpe.weight");
            let p = wts.get_f32(&name, &[cfg.max_positions, c])?;
            params += p.len();
            Some(Tensor::from_f32(ctx, &p, &[cfg.max_positions, c], &name)?)
        } else {
            None
        };
        let count = |l: &Linear| {
            l.out_features * l.in_features + l.bias.as_ref().map_or(0, |_| l.out_features)
        };
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let block = if gpt2 {
                let p = format!("{root}h.{i}");
                let ln1 = Norm::load(ctx, wts, &format!("{p}.ln_1"), c, true, cfg.norm_eps)?;
                let ln2 = Norm::load(ctx, wts, &format!("{p}.ln_2"), c, true, cfg.norm_eps)?;
                let qkv =
                    Linear::load(ctx, wts, &format!("{p}.attn.c_attn"), 3 * c, c, true, true)?;
                let o = Linear::load(ctx, wts, &format!("{p}.attn.c_proj"), c, c, true, true)?;
                let fc = Linear::load(
                    ctx,
                    wts,
                    &format!("{p}.mlp.c_fc"),
                    cfg.intermediate,
                    c,
                    true,
                    true,
                )?;
                let proj = Linear::load(
                    ctx,
                    wts,
                    &format!("{p}.mlp.c_proj"),
                    c,
                    cfg.intermediate,
                    true,
                    true,
                )?;
                params += 4 * c;
                Block {
                    ln1,
                    qkv: Qkv::Fused(qkv),
                    o,
                    ln2,
                    mlp: Mlp::Gelu { fc, proj },
                }
            } else {
                let p = format!("{root}layers.{i}");
                let (qd, kvd) = (cfg.heads * cfg.head_dim, cfg.kv_dim());
                let a = format!("{p}.self_attn");
                let ln1 = Norm::load(
                    ctx,
                    wts,
                    &format!("{p}.input_layernorm"),
                    c,
                    false,
                    cfg.norm_eps,
                )?;
                let ln2 = Norm::load(
                    ctx,
                    wts,
                    &format!("{p}.post_attention_layernorm"),
                    c,
                    false,
                    cfg.norm_eps,
                )?;
                let q = Linear::load(ctx, wts, &format!("{a}.q_proj"), qd, c, cfg.qkv_bias, false)?;
                let k = Linear::load(
                    ctx,
                    wts,
                    &format!("{a}.k_proj"),
                    kvd,
                    c,
                    cfg.qkv_bias,
                    false,
                )?;
                let vv = Linear::load(
                    ctx,
                    wts,
                    &format!("{a}.v_proj"),
                    kvd,
                    c,
                    cfg.qkv_bias,
                    false,
                )?;
                let o = Linear::load(ctx, wts, &format!("{a}.o_proj"), c, qd, false, false)?;
                let m = format!("{p}.mlp");
                let ff = cfg.intermediate;
                let gate = Linear::load(ctx, wts, &format!("{m}.gate_proj"), ff, c, false, false)?;
                let up = Linear::load(ctx, wts, &format!("{m}.up_proj"), ff, c, false, false)?;
                let down = Linear::load(ctx, wts, &format!("{m}.down_proj"), c, ff, false, false)?;
                params += 2 * c;
                Block {
                    ln1,
                    qkv: Qkv::Split { q, k, v: vv },
                    o,
                    ln2,
                    mlp: Mlp::SwiGlu { gate, up, down },
                }
            };
            params += block.linears().iter().map(|l| count(l)).sum::<usize>();
            blocks.push(block);
        }
        let ln_f = if gpt2 {
            Norm::load(ctx, wts, &format!("{root}ln_f"), c, true, cfg.norm_eps)?
        } else {
            Norm::load(ctx, wts, &format!("{root}norm"), c, false, cfg.norm_eps)?
        };
        params += c * if gpt2 { 2 } else { 1 };
        // A checkpoint may carry lm_head.weight even when tied; the config decides.
        let lm_head = if cfg.tie_embeddings {
            Linear::upload(ctx, "lm_head", &wte_host, v, c, None)?
        } else {
            let l = Linear::load(ctx, wts, "lm_head", v, c, false, false)?;
            params += v * c;
            l
        };
        drop(wte_host);
        let rope = if gpt2 {
            None
        } else {
            let (cos, sin) = cfg.rope_tables();
            let half = cfg.head_dim / 2;
            Some((
                Tensor::from_f32(ctx, &cos, &[cfg.max_positions, half], "rope.cos")?,
                Tensor::from_f32(ctx, &sin, &[cfg.max_positions, half], "rope.sin")?,
            ))
        };
        Ok(Model {
            cfg,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            rope,
            params,
            fingerprint,
        })
    }

    /// Bytes of GPU memory held by the frozen weights.
    pub fn weight_bytes(&self) -> u64 {
        let mut n = self.wte.bytes() + self.wpe.as_ref().map_or(0, |t| t.bytes());
        for b in &self.blocks {
            n += b.ln1.bytes() + b.ln2.bytes();
            n += b.linears().iter().map(|l| l.bytes()).sum::<u64>();
        }
        n += self.ln_f.bytes() + self.lm_head.bytes();
        if let Some((c, s)) = &self.rope {
            n += c.bytes() + s.bytes();
        }
        n
    }

    /// Every frozen linear layer, with its layer index.
    pub fn linears(&self) -> Vec<(usize, &Linear)> {
        self.blocks
            .iter()
            .enumerate()
            .flat_map(|(i, b)| b.linears().into_iter().map(move |l| (i, l)))
            .collect()
    }
}

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

/// One layer's activations, kept for backward when training.
#[derive(Clone)]
pub struct LayerActs {
    /// The layer's input: the residual stream (B*S, C).
    pub resid: Tensor,
    pub ln1: Tensor,
    pub ln1_mean: Option<Tensor>,
    pub ln1_rstd: Tensor,
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
    pub ln2: Tensor,
    pub ln2_mean: Option<Tensor>,
    pub ln2_rstd: Tensor,
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
    pub lnf: Tensor,
    pub lnf_mean: Option<Tensor>,
    pub lnf_rstd: Tensor,
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
                ln1: f32s(ctx, &[n, c], &tag("ln1"))?,
                ln1_mean: if ln {
                    Some(f32s(ctx, &[n], &tag("ln1_mean"))?)
                } else {
                    None
                },
                ln1_rstd: f32s(ctx, &[n], &tag("ln1_rstd"))?,
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
                ln2: f32s(ctx, &[n, c], &tag("ln2"))?,
                ln2_mean: if ln {
                    Some(f32s(ctx, &[n], &tag("ln2_mean"))?)
                } else {
                    None
                },
                ln2_rstd: f32s(ctx, &[n], &tag("ln2_rstd"))?,
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
            lnf: f32s(ctx, &[n, c], "lnf")?,
            lnf_mean: if ln {
                Some(f32s(ctx, &[n], "lnf_mean")?)
            } else {
                None
            },
            lnf_rstd: f32s(ctx, &[n], "lnf_rstd")?,
        })
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

impl Model {
    /// Check that a forward of `shape` stays within the model's positions.
    pub fn check_positions(&self, shape: FwdShape) -> Result<()> {
        let need = shape.p + shape.s();
        if need > self.cfg.max_positions {
            return Err(Error::invalid(
                "forward",
                format!(
                    "a sequence of {need} positions ({} prefix/cache + {} virtual + {} tokens) exceeds the model's {} (max_position_embeddings)",
                    shape.p, shape.n_virtual, shape.t, self.cfg.max_positions
                ),
            ));
        }
        Ok(())
    }

    /// Record the forward up to the final norm: `acts.lnf` holds the
    /// normalized hidden state of every row. `ids` (B, T) i32. With a cache,
    /// new K/V rows go to rows `cache.len..` and attention reads rows
    /// `0..cache.len + S` (the caller advances `cache.len` afterwards);
    /// `acts.shape.p` must equal `cache.len`.
    pub fn forward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        acts: &Acts,
        ids: &Tensor,
        hooks: &dyn Hooks,
        cache: Option<&KvCache>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let sh = acts.shape;
        let (b, s, nv, p) = (sh.b, sh.s(), sh.n_virtual, sh.p);
        let (c, nh, kvh, hd) = (cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim);
        let kvd = cfg.kv_dim();
        self.check_positions(sh)?;
        if let Some(kc) = cache {
            if kc.len != p || b != 1 || p + s > kc.cap {
                return Err(Error::invalid(
                    "forward",
                    format!(
                        "KV cache of {} rows (cap {}) does not fit a forward of {sh:?}",
                        kc.len, kc.cap
                    ),
                ));
            }
        }
        let n = sh.rows();
        // With a cache the prefix is already in it (generate prepares once).
        if cache.is_none() {
            hooks.prepare(ctx, plan)?;
        }
        // Embeddings: virtual tokens, then the ids' rows.
        plan.push_group("embed");
        let emb = acts.emb.as_ref().unwrap_or(&acts.x0);
        if nv > 0 {
            let prompt = hooks
                .prompt()
                .ok_or_else(|| Error::invalid("forward", "virtual tokens without a prompt"))?;
            embedding::prompt_forward(ctx, plan, emb, prompt)?;
        }
        embedding::embedding_forward(ctx, plan, emb, ids, &self.wte, nv)?;
        if let (Some(wpe), Some(pid), Some(pe)) = (&self.wpe, &acts.pos_ids, &acts.pos_emb) {
            // Positions are fixed by the shape, and a plan is replayed only
            // for its own shape, so they are written once, here.
            pid.write_i32(ctx, &position_ids(sh))?;
            embedding::embedding_forward(ctx, plan, pe, pid, wpe, 0)?;
            activation::residual_forward(ctx, plan, &flat(&acts.x0)?, &flat(emb)?, &flat(pe)?)?;
        }
        plan.pop_group();
        // Prefix rows of every layer's K/V come from the adapter, unrotated.
        let prefix = hooks.prefix();
        for (l, blk) in self.blocks.iter().enumerate() {
            let a = &acts.layers[l];
            plan.push_group(&format!("layer {l}"));
            blk.ln1.forward(
                ctx,
                plan,
                &a.ln1,
                a.ln1_mean.as_ref(),
                &a.ln1_rstd,
                &a.resid,
            )?;
            let q2 = a.q.reshape(&[n, nh * hd])?;
            let k2 = a.k.reshape(&[n, kvd])?;
            let v2 = a.v.reshape(&[n, kvd])?;
            match &blk.qkv {
                Qkv::Split { q, k, v } => {
                    for (lin, out) in [(q, &q2), (k, &k2), (v, &v2)] {
                        lin.forward(ctx, plan, out, &a.ln1)?;
                        hooks.linear(ctx, plan, l, lin, out, &a.ln1)?;
                    }
                }
                Qkv::Fused(lin) => {
                    let qkv = a
                        .qkv
                        .as_ref()
                        .expect("invariant: Acts::new allocates qkv for GPT-2 (fused qkv)");
                    lin.forward(ctx, plan, qkv, &a.ln1)?;
                    hooks.linear(ctx, plan, l, lin, qkv, &a.ln1)?;
                    for (i, out) in [&q2, &k2, &v2].into_iter().enumerate() {
                        copy_rows(
                            ctx,
                            plan,
                            out,
                            Layout::dense(n, c),
                            qkv,
                            Layout::rows(n, 3 * c, 0, i * c),
                            1,
                            n,
                            c,
                            false,
                        )?;
                    }
                }
            }
            if let Some((cos, sin)) = &self.rope {
                rope::rope_forward(ctx, plan, &a.q, cos, sin, b, s, p)?;
                rope::rope_forward(ctx, plan, &a.k, cos, sin, b, s, p)?;
            }
            // K/V as attention reads them: (B, P + S, KVH, HD).
            let (kk, vv) = if let Some(kc) = cache {
                for (dst, src) in [(&kc.k[l], &a.k), (&kc.v[l], &a.v)] {
                    copy_rows(
                        ctx,
                        plan,
                        dst,
                        Layout::rows(kc.cap, kvd, p, 0),
                        src,
                        Layout::dense(s, kvd),
                        1,
                        s,
                        kvd,
                        false,
                    )?;
                }
                (
                    kc.k[l].view(0, &[1, p + s, kvh, hd], "cache.k")?,
                    kc.v[l].view(0, &[1, p + s, kvh, hd], "cache.v")?,
                )
            } else if p > 0 {
                // Acts::new allocates kcat/vcat when p > 0 and the acts are not
                // for a cache; every caller builds acts with `cached` set
                // exactly when it passes a cache, and here there is none.
                let kcat = a
                    .kcat
                    .as_ref()
                    .expect("invariant: Acts::new allocates kcat when p > 0 and not cached");
                let vcat = a
                    .vcat
                    .as_ref()
                    .expect("invariant: Acts::new allocates vcat when p > 0 and not cached");
                let pre = prefix.ok_or_else(|| {
                    Error::invalid("forward", "K/V rows in front without a prefix")
                })?;
                let width = cfg.layers * 2 * kvd;
                for (j, (dst, src)) in [(kcat, &a.k), (vcat, &a.v)].into_iter().enumerate() {
                    // The prefix table is shared by every batch row (block stride 0).
                    let pl = Layout {
                        off: (l * 2 + j) * kvd,
                        bs: 0,
                        rs: width,
                    };
                    copy_rows(
                        ctx,
                        plan,
                        dst,
                        Layout::rows(p + s, kvd, 0, 0),
                        pre,
                        pl,
                        b,
                        p,
                        kvd,
                        false,
                    )?;
                    copy_rows(
                        ctx,
                        plan,
                        dst,
                        Layout::rows(p + s, kvd, p, 0),
                        src,
                        Layout::dense(s, kvd),
                        b,
                        s,
                        kvd,
                        false,
                    )?;
                }
                (kcat.clone(), vcat.clone())
            } else {
                (a.k.clone(), a.v.clone())
            };
            attention_forward(ctx, plan, &a.att, &a.lse, &a.q, &kk, &vv)?;
            let att2 = a.att.reshape(&[n, nh * hd])?;
            blk.o.forward(ctx, plan, &a.proj, &att2)?;
            hooks.linear(ctx, plan, l, &blk.o, &a.proj, &att2)?;
            activation::residual_forward(
                ctx,
                plan,
                &flat(&a.resid_mid)?,
                &flat(&a.resid)?,
                &flat(&a.proj)?,
            )?;
            blk.ln2.forward(
                ctx,
                plan,
                &a.ln2,
                a.ln2_mean.as_ref(),
                &a.ln2_rstd,
                &a.resid_mid,
            )?;
            match &blk.mlp {
                Mlp::SwiGlu { gate, up, down } => {
                    let h2 = a.h2.as_ref().expect(
                        "invariant: Acts::new allocates h2 for every non-GPT-2 (SwiGLU) arch",
                    );
                    gate.forward(ctx, plan, &a.h1, &a.ln2)?;
                    hooks.linear(ctx, plan, l, gate, &a.h1, &a.ln2)?;
                    up.forward(ctx, plan, h2, &a.ln2)?;
                    hooks.linear(ctx, plan, l, up, h2, &a.ln2)?;
                    activation::swiglu_forward(ctx, plan, &a.act, &a.h1, h2)?;
                    down.forward(ctx, plan, &a.mlp_out, &a.act)?;
                    hooks.linear(ctx, plan, l, down, &a.mlp_out, &a.act)?;
                }
                Mlp::Gelu { fc, proj } => {
                    fc.forward(ctx, plan, &a.h1, &a.ln2)?;
                    hooks.linear(ctx, plan, l, fc, &a.h1, &a.ln2)?;
                    activation::gelu_forward(ctx, plan, &a.act, &a.h1)?;
                    proj.forward(ctx, plan, &a.mlp_out, &a.act)?;
                    hooks.linear(ctx, plan, l, proj, &a.mlp_out, &a.act)?;
                }
            }
            let next = match acts.layers.get(l + 1) {
                Some(nx) => &nx.resid,
                None => &acts.resid_out,
            };
            activation::residual_forward(
                ctx,
                plan,
                &flat(next)?,
                &flat(&a.resid_mid)?,
                &flat(&a.mlp_out)?,
            )?;
            plan.pop_group();
        }
        let last = acts.layers.last().map_or(&acts.x0, |_| &acts.resid_out);
        let last = last.reshape(&[n, c])?;
        self.ln_f.forward(
            ctx,
            plan,
            &acts.lnf,
            acts.lnf_mean.as_ref(),
            &acts.lnf_rstd,
            &last,
        )?;
        Ok(())
    }

    /// logits (R, V) for the rows of `acts.lnf` listed in `rows` (1, R) i32
    /// (flat row indices b * S + i); `gathered` (1, R, C) is scratch.
    pub fn logits_rows(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        logits: &Tensor,
        gathered: &Tensor,
        acts: &Acts,
        rows: &Tensor,
    ) -> Result<()> {
        let r = rows.shape()[1];
        embedding::embedding_forward(ctx, plan, gathered, rows, &acts.lnf, 0)?;
        self.lm_head
            .forward(ctx, plan, logits, &gathered.reshape(&[r, self.cfg.hidden])?)
    }

    /// Per-row losses (R) of `logits` (R, V) against `targets` (R) i32.
    pub fn losses(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        losses: &Tensor,
        logits: &Tensor,
        targets: &Tensor,
    ) -> Result<()> {
        loss::crossentropy_forward(ctx, plan, losses, logits, targets)
    }
}

fn flat(t: &Tensor) -> Result<Tensor> {
    t.reshape(&[t.numel()])
}

/// Activation gradients of one backward shape. What a layer needs is cleared
/// by consecutive clears at its start (one pass break; every backward kernel
/// accumulates); `dresid` carries the residual gradient from layer to layer.
pub struct Grads {
    /// (B*S, C): gradient of the residual stream.
    pub dresid: Tensor,
    /// Head buffers, cleared once per backward: dresid, dlnf, dgathered, dlogits.
    head: Vec<Tensor>,
    pub dlnf: Tensor,
    pub dgathered: Tensor,
    pub dlogits: Tensor,
    /// Layer buffers, cleared at the start of every layer's backward.
    layer: Vec<Tensor>,
    dln1: Tensor,
    dln2: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    dkcat: Option<Tensor>,
    dvcat: Option<Tensor>,
    datt: Tensor,
    delta: Tensor,
    dqkv: Option<Tensor>,
    dh1: Tensor,
    dh2: Option<Tensor>,
    dact: Tensor,
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
        let (c, nh, kvh, hd, ff, v) = (
            cfg.hidden,
            cfg.heads,
            cfg.kv_heads,
            cfg.head_dim,
            cfg.intermediate,
            cfg.vocab,
        );
        let (b, s, p, n) = (shape.b, shape.s(), shape.p, shape.rows());
        let gpt2 = cfg.arch == Arch::Gpt2;
        let mut h = Arena::new();
        let i_dresid = h.add("dresid", &[n, c]);
        let i_dlnf = h.add("dlnf", &[n, c]);
        let i_dg = h.add("dgathered", &[r, c]);
        let i_dl = h.add("dlogits", &[r, v]);
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
            dlogits: hv[i_dl].clone(),
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

impl Model {
    /// Lowest layer backward must reach for `hooks`, or `None` when the
    /// gradient must flow down to the embeddings (prompt tuning).
    fn backward_floor(&self, hooks: &dyn Hooks) -> Option<usize> {
        if hooks.prompt_grad().is_some() {
            return None;
        }
        if hooks.prefix_grad().is_some() {
            return Some(0);
        }
        let lowest = self
            .blocks
            .iter()
            .enumerate()
            .find(|(l, b)| b.linears().iter().any(|lin| hooks.adapts(*l, lin)))
            .map(|(l, _)| l);
        Some(lowest.unwrap_or(self.blocks.len()))
    }

    /// Record the backward of [`Model::forward`] + [`Model::logits_rows`] +
    /// cross-entropy: the forward list reversed. `dlosses` (R) holds each
    /// row's loss weight (1 / targets for a mean). Only adapter gradients are
    /// produced (through `hooks`); frozen weights get none, and activation
    /// gradients stop at the lowest layer an adapter needs.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        acts: &Acts,
        g: &Grads,
        logits: &Tensor,
        rows: &Tensor,
        targets: &Tensor,
        dlosses: &Tensor,
        hooks: &dyn Hooks,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let sh = acts.shape;
        let (b, s, p) = (sh.b, sh.s(), sh.p);
        let (c, nh, hd) = (cfg.hidden, cfg.heads, cfg.head_dim);
        let kvd = cfg.kv_dim();
        let n = sh.rows();
        let r = rows.numel();
        let floor = self.backward_floor(hooks);
        if floor == Some(self.blocks.len()) {
            return Err(Error::invalid(
                "backward",
                "no trainable parameters: the adapter touches no layer",
            ));
        }
        plan.push_group("head backward");
        for t in &g.head {
            plan.clear(t);
        }
        loss::crossentropy_softmax_backward(ctx, plan, &g.dlogits, dlosses, logits, targets)?;
        let dg = g.dgathered.reshape(&[r, c])?;
        self.lm_head.backward_input(ctx, plan, &dg, &g.dlogits)?;
        crate::gpu::ops::copy::scatter_rows(ctx, plan, &g.dlnf, rows, &dg)?;
        let last = if self.blocks.is_empty() {
            acts.x0.reshape(&[n, c])?
        } else {
            acts.resid_out.clone()
        };
        self.ln_f.backward(
            ctx,
            plan,
            &g.dresid,
            &g.dlnf,
            &last,
            acts.lnf_mean.as_ref(),
            &acts.lnf_rstd,
        )?;
        plan.pop_group();
        let prefix_grad = hooks.prefix_grad();
        for (l, blk) in self.blocks.iter().enumerate().rev() {
            if floor.is_some_and(|f| l < f) {
                break;
            }
            let below = floor.is_none_or(|f| l > f);
            let a = &acts.layers[l];
            plan.push_group(&format!("layer {l} backward"));
            for t in &g.layer {
                plan.clear(t);
            }
            // MLP; dresid is the gradient of this layer's output.
            match &blk.mlp {
                Mlp::SwiGlu { gate, up, down } => {
                    let h2 = a.h2.as_ref().expect(
                        "invariant: Acts::new allocates h2 for every non-GPT-2 (SwiGLU) arch",
                    );
                    let dh2 = g.dh2.as_ref().expect(
                        "invariant: Grads::new allocates dh2 for every non-GPT-2 (SwiGLU) arch",
                    );
                    down.backward_input(ctx, plan, &g.dact, &g.dresid)?;
                    hooks.linear_backward(ctx, plan, l, down, &g.dresid, &a.act, Some(&g.dact))?;
                    activation::swiglu_backward(ctx, plan, &g.dh1, dh2, &g.dact, &a.h1, h2)?;
                    gate.backward_input(ctx, plan, &g.dln2, &g.dh1)?;
                    hooks.linear_backward(ctx, plan, l, gate, &g.dh1, &a.ln2, Some(&g.dln2))?;
                    up.backward_input(ctx, plan, &g.dln2, dh2)?;
                    hooks.linear_backward(ctx, plan, l, up, dh2, &a.ln2, Some(&g.dln2))?;
                }
                Mlp::Gelu { fc, proj } => {
                    proj.backward_input(ctx, plan, &g.dact, &g.dresid)?;
                    hooks.linear_backward(ctx, plan, l, proj, &g.dresid, &a.act, Some(&g.dact))?;
                    activation::gelu_backward(ctx, plan, &g.dh1, &g.dact, &a.h1)?;
                    fc.backward_input(ctx, plan, &g.dln2, &g.dh1)?;
                    hooks.linear_backward(ctx, plan, l, fc, &g.dh1, &a.ln2, Some(&g.dln2))?;
                }
            }
            // dresid becomes the gradient of resid_mid (skip + ln2 path).
            blk.ln2.backward(
                ctx,
                plan,
                &g.dresid,
                &g.dln2,
                &a.resid_mid,
                a.ln2_mean.as_ref(),
                &a.ln2_rstd,
            )?;
            let att2 = a.att.reshape(&[n, nh * hd])?;
            let datt2 = g.datt.reshape(&[n, nh * hd])?;
            blk.o.backward_input(ctx, plan, &datt2, &g.dresid)?;
            hooks.linear_backward(ctx, plan, l, &blk.o, &g.dresid, &att2, Some(&datt2))?;
            let (kk, vv, dkk, dvv) = if p > 0 {
                (
                    // Training acts are built with `cached` false, and acts
                    // and grads for the same shape.
                    a.kcat
                        .clone()
                        .expect("invariant: Acts::new allocates kcat when p > 0 and not cached"),
                    a.vcat
                        .clone()
                        .expect("invariant: Acts::new allocates vcat when p > 0 and not cached"),
                    g.dkcat
                        .clone()
                        .expect("invariant: Grads::new allocates dkcat when p > 0"),
                    g.dvcat
                        .clone()
                        .expect("invariant: Grads::new allocates dvcat when p > 0"),
                )
            } else {
                (a.k.clone(), a.v.clone(), g.dk.clone(), g.dv.clone())
            };
            attention_backward(
                ctx, plan, &g.dq, &dkk, &dvv, &g.delta, &g.datt, &a.q, &kk, &vv, &a.att, &a.lse,
            )?;
            if p > 0 {
                let width = cfg.layers * 2 * kvd;
                for (j, (dcat, dsplit)) in [(&dkk, &g.dk), (&dvv, &g.dv)].into_iter().enumerate() {
                    if let Some(dpre) = prefix_grad {
                        // Sum over the batch, one row block at a time (each
                        // prefix element has one writer per dispatch).
                        for bi in 0..b {
                            let src = Layout {
                                off: bi * (p + s) * kvd,
                                bs: 0,
                                rs: kvd,
                            };
                            let dst = Layout {
                                off: (l * 2 + j) * kvd,
                                bs: 0,
                                rs: width,
                            };
                            copy_rows(ctx, plan, dpre, dst, dcat, src, 1, p, kvd, true)?;
                        }
                    }
                    copy_rows(
                        ctx,
                        plan,
                        dsplit,
                        Layout::dense(s, kvd),
                        dcat,
                        Layout::rows(p + s, kvd, p, 0),
                        b,
                        s,
                        kvd,
                        false,
                    )?;
                }
            }
            let qkv_adapted = match &blk.qkv {
                Qkv::Split { q, k, v } => [q, k, v].iter().any(|x| hooks.adapts(l, x)),
                Qkv::Fused(x) => hooks.adapts(l, x),
            };
            if below || qkv_adapted {
                if let Some((cos, sin)) = &self.rope {
                    rope::rope_backward(ctx, plan, &g.dq, cos, sin, b, s, p)?;
                    rope::rope_backward(ctx, plan, &g.dk, cos, sin, b, s, p)?;
                }
                let dln1 = below.then_some(&g.dln1);
                let dq2 = g.dq.reshape(&[n, nh * hd])?;
                let dk2 = g.dk.reshape(&[n, kvd])?;
                let dv2 = g.dv.reshape(&[n, kvd])?;
                match &blk.qkv {
                    Qkv::Split { q, k, v } => {
                        for (lin, dout) in [(q, &dq2), (k, &dk2), (v, &dv2)] {
                            if below {
                                lin.backward_input(ctx, plan, &g.dln1, dout)?;
                            }
                            hooks.linear_backward(ctx, plan, l, lin, dout, &a.ln1, dln1)?;
                        }
                    }
                    Qkv::Fused(lin) => {
                        let dqkv = g
                            .dqkv
                            .as_ref()
                            .expect("invariant: Grads::new allocates dqkv for GPT-2 (fused qkv)");
                        for (i, src) in [&dq2, &dk2, &dv2].into_iter().enumerate() {
                            copy_rows(
                                ctx,
                                plan,
                                dqkv,
                                Layout::rows(n, 3 * c, 0, i * c),
                                src,
                                Layout::dense(n, c),
                                1,
                                n,
                                c,
                                false,
                            )?;
                        }
                        if below {
                            lin.backward_input(ctx, plan, &g.dln1, dqkv)?;
                        }
                        hooks.linear_backward(ctx, plan, l, lin, dqkv, &a.ln1, dln1)?;
                    }
                }
                if below {
                    blk.ln1.backward(
                        ctx,
                        plan,
                        &g.dresid,
                        &g.dln1,
                        &a.resid,
                        a.ln1_mean.as_ref(),
                        &a.ln1_rstd,
                    )?;
                }
            }
            plan.pop_group();
        }
        if floor.is_none() {
            // dresid is now the gradient of x0 (GPT-2: of the token + prompt
            // embeddings too, since the positions are only added).
            if let Some(dprompt) = hooks.prompt_grad() {
                let dx0 = g.dresid.reshape(&[b, s, c])?;
                embedding::prompt_backward(ctx, plan, dprompt, &dx0)?;
            }
        }
        Ok(())
    }
}
