//! The frozen layers of a transformer on the GPU: `Linear`, `Norm`, and a
//! `Block` of them, each loaded from its entry in the checkpoint table
//! (`names.rs`) and recording its own forward and backward kernels.

use crate::error::{Error, Result};
use crate::gpu::ops::{activation, matmul, norm};
use std::sync::Arc;

use crate::gpu::{Context, Plan, Tensor, TexMatrix};
use crate::model::buffers::NormActs;
use crate::model::compact::{self, StoredMatrix, WeightsMode};
use crate::model::config::ModelConfig;
use crate::model::names::{BlockSpec, LinearSpec, NormSpec};
use crate::model::transformer::Hooks;
use crate::model::weights::Weights;

/// A frozen weight matrix (out, in) as the matmul reads it.
#[derive(Clone)]
pub enum Store {
    /// A texture in the stored precision (the fast path on every adapter
    /// measured); shared by a tied embedding and LM head.
    Packed(Arc<TexMatrix>),
    /// An f32 storage buffer (textures disabled or the matrix beyond their
    /// limits).
    Buffer(Tensor),
}

impl Store {
    /// Upload a stored matrix: as a texture in `mode`'s format where
    /// textures apply, else expanded to an f32 buffer.
    pub fn upload(
        ctx: &Context,
        m: &StoredMatrix,
        mode: WeightsMode,
        label: &str,
    ) -> Result<Store> {
        if matmul::use_textures(ctx, &[(m.rows, m.cols)]) {
            let fmt = compact::target_format(m.ty, mode);
            return Ok(Store::Packed(Arc::new(compact::upload(
                ctx, m, fmt, label,
            )?)));
        }
        m.check()?;
        let data = m.rows_f32(0, m.rows);
        Ok(Store::Buffer(Tensor::from_f32(
            ctx,
            &data,
            &[m.rows, m.cols],
            label,
        )?))
    }

    /// GPU bytes.
    pub fn bytes(&self) -> u64 {
        match self {
            Store::Packed(t) => t.bytes(),
            Store::Buffer(t) => t.bytes(),
        }
    }

    /// (rows, cols).
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Store::Packed(t) => (t.rows(), t.cols()),
            Store::Buffer(t) => (t.shape()[0], t.shape()[1]),
        }
    }
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
    /// A layer over an uploaded weight (out, in).
    pub(crate) fn new(
        ctx: &Context,
        name: &str,
        w: Store,
        bias: Option<Vec<f32>>,
    ) -> Result<Linear> {
        let (out_f, in_f) = w.dims();
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
    /// GPT-2 `Conv1D` (weight (in, out), transposed on load).
    pub(crate) fn load(
        ctx: &Context,
        wts: &Weights,
        spec: &LinearSpec,
        mode: WeightsMode,
    ) -> Result<Linear> {
        let (out_f, in_f) = (spec.out_f, spec.in_f);
        let name = spec.weight();
        let m = wts.matrix(&name, out_f, in_f, spec.conv1d)?;
        let w = Store::upload(ctx, &m, mode, &name)?;
        let b = match spec.bias() {
            Some(name) => Some(wts.get_f32(&name, &[out_f])?),
            None => None,
        };
        Linear::new(ctx, &spec.name, w, b)
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

    /// [`Linear::forward`], then the adapter's share (`hooks.linear`, e.g.
    /// LoRA) added into `out`; `layer` is the block index.
    pub fn forward_hooked(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        hooks: &dyn Hooks,
        layer: usize,
        out: &Tensor,
        inp: &Tensor,
    ) -> Result<()> {
        self.forward(ctx, plan, out, inp)?;
        hooks.linear(ctx, plan, layer, self, out, inp)
    }

    /// Backward of [`Linear::forward_hooked`]: `dinp += dout W` when `dinp`
    /// is given (`None` below the lowest layer backward must reach), then
    /// the adapter's gradients and its share of `dinp`.
    #[allow(clippy::too_many_arguments)] // forward_hooked's operands plus dout
    pub fn backward_hooked(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        hooks: &dyn Hooks,
        layer: usize,
        dinp: Option<&Tensor>,
        dout: &Tensor,
        inp: &Tensor,
    ) -> Result<()> {
        if let Some(d) = dinp {
            self.backward_input(ctx, plan, d, dout)?;
        }
        hooks.linear_backward(ctx, plan, layer, self, dout, inp, dinp)
    }

    /// Parameters: weight and bias.
    pub fn params(&self) -> usize {
        self.out_features * self.in_features + self.bias.as_ref().map_or(0, |_| self.out_features)
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.w.bytes() + self.bias.as_ref().map_or(0, |b| b.bytes())
    }

    /// The weight as the matmul reads it.
    pub fn store(&self) -> &Store {
        &self.w
    }
}

/// RMSNorm (weight) or LayerNorm (weight, bias).
pub struct Norm {
    pub w: Tensor,
    pub b: Option<Tensor>,
    pub eps: f32,
}

impl Norm {
    /// `plus_one`: the norm scales by (1 + weight) (Gemma), folded into
    /// the weight here, in f32 as transformers adds it.
    pub(crate) fn load(
        ctx: &Context,
        wts: &Weights,
        spec: &NormSpec,
        eps: f64,
        plus_one: bool,
    ) -> Result<Norm> {
        let c = spec.c;
        let mut w = wts.get_f32(&spec.weight(), &[c])?;
        if plus_one {
            for x in w.iter_mut() {
                *x += 1.0;
            }
        }
        let b = match spec.bias() {
            Some(name) => Some(Tensor::from_f32(
                ctx,
                &wts.get_f32(&name, &[c])?,
                &[c],
                &name,
            )?),
            None => None,
        };
        Ok(Norm {
            w: Tensor::from_f32(ctx, &w, &[c], &spec.weight())?,
            b,
            eps: eps as f32,
        })
    }

    /// out.out, (out.mean), out.rstd <- norm(inp).
    pub fn forward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        out: &NormActs,
        inp: &Tensor,
    ) -> Result<()> {
        let (y, rstd) = (&out.out, &out.rstd);
        match (&self.b, out.mean.as_ref()) {
            (Some(b), Some(m)) => {
                norm::layernorm_forward(ctx, plan, y, m, rstd, inp, &self.w, b, self.eps)
            }
            (None, _) => norm::rmsnorm_forward(ctx, plan, y, rstd, inp, &self.w, self.eps),
            (Some(_), None) => Err(Error::invalid(
                "layernorm_forward",
                "LayerNorm needs a mean buffer",
            )),
        }
    }

    /// sum <- a + b (a residual add), then [`Norm::forward`] of sum. RMSNorm
    /// does both in one dispatch; LayerNorm (GPT-2) in two. Any shapes of
    /// (N, C) elements, as `out.out`'s.
    pub fn forward_add(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        out: &NormActs,
        sum: &Tensor,
        a: &Tensor,
        b: &Tensor,
    ) -> Result<()> {
        let shape = out.out.shape();
        let (sum, a, b) = (sum.reshape(shape)?, a.reshape(shape)?, b.reshape(shape)?);
        if self.b.is_some() {
            activation::residual_forward(ctx, plan, &sum, &a, &b)?;
            return self.forward(ctx, plan, out, &sum);
        }
        let (y, rstd, w) = (&out.out, &out.rstd, &self.w);
        norm::rmsnorm_add_forward(ctx, plan, y, rstd, &sum, &a, &b, w, self.eps)
    }

    /// dinp += d norm / d inp . dout, from the statistics `saved` by forward.
    pub fn backward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        dinp: &Tensor,
        dout: &Tensor,
        inp: &Tensor,
        saved: &NormActs,
    ) -> Result<()> {
        let rstd = &saved.rstd;
        match (&self.b, saved.mean.as_ref()) {
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

    pub(crate) fn bytes(&self) -> u64 {
        self.w.bytes() + self.b.as_ref().map_or(0, |b| b.bytes())
    }
}

/// q/k/v projections: separate (llama family) or GPT-2's fused c_attn.
/// `L` is a loaded [`Linear`], or its checkpoint entry in the name table.
// One per layer, built once: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Qkv<L = Linear> {
    Split { q: L, k: L, v: L },
    Fused(L),
}

impl<L> Qkv<L> {
    /// The projections in forward order.
    pub fn all(&self) -> Vec<&L> {
        match self {
            Qkv::Split { q, k, v } => vec![q, k, v],
            Qkv::Fused(l) => vec![l],
        }
    }
    fn try_map<M>(&self, mut f: impl FnMut(&L) -> Result<M>) -> Result<Qkv<M>> {
        Ok(match self {
            Qkv::Split { q, k, v } => Qkv::Split {
                q: f(q)?,
                k: f(k)?,
                v: f(v)?,
            },
            Qkv::Fused(l) => Qkv::Fused(f(l)?),
        })
    }
}

/// The MLP: llama's SwiGLU or GPT-2's GELU.
#[allow(clippy::large_enum_variant)]
pub enum Mlp<L = Linear> {
    SwiGlu { gate: L, up: L, down: L },
    Gelu { fc: L, proj: L },
}

impl<L> Mlp<L> {
    /// The linear layers in forward order.
    pub fn all(&self) -> Vec<&L> {
        match self {
            Mlp::SwiGlu { gate, up, down } => vec![gate, up, down],
            Mlp::Gelu { fc, proj } => vec![fc, proj],
        }
    }
    fn try_map<M>(&self, mut f: impl FnMut(&L) -> Result<M>) -> Result<Mlp<M>> {
        Ok(match self {
            Mlp::SwiGlu { gate, up, down } => Mlp::SwiGlu {
                gate: f(gate)?,
                up: f(up)?,
                down: f(down)?,
            },
            Mlp::Gelu { fc, proj } => Mlp::Gelu {
                fc: f(fc)?,
                proj: f(proj)?,
            },
        })
    }
}

/// One transformer layer's frozen weights.
pub struct Block {
    pub ln1: Norm,
    pub qkv: Qkv,
    /// Per-head norms of q and k (qwen3, gemma3).
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    pub o: Linear,
    /// Norm of the attention output before the residual add (gemma3).
    pub post_attn: Option<Norm>,
    pub ln2: Norm,
    pub mlp: Mlp,
    /// Norm of the MLP output before the residual add (gemma3).
    pub post_mlp: Option<Norm>,
}

impl Block {
    /// Load the block `spec` names (norms first, then the linears in
    /// forward order, as the checkpoint table lists them).
    pub(crate) fn load(
        ctx: &Context,
        wts: &Weights,
        spec: &BlockSpec,
        cfg: &ModelConfig,
        mode: WeightsMode,
    ) -> Result<Block> {
        let norm = |s: &NormSpec| Norm::load(ctx, wts, s, cfg.norm_eps, cfg.norm_plus_one);
        let opt = |s: &Option<NormSpec>| s.as_ref().map(norm).transpose();
        let ln1 = norm(&spec.ln1)?;
        let ln2 = norm(&spec.ln2)?;
        let lin = |s: &LinearSpec| Linear::load(ctx, wts, s, mode);
        let qkv = spec.qkv.try_map(lin)?;
        let o = lin(&spec.o)?;
        let mlp = spec.mlp.try_map(lin)?;
        Ok(Block {
            ln1,
            qkv,
            q_norm: opt(&spec.q_norm)?,
            k_norm: opt(&spec.k_norm)?,
            o,
            post_attn: opt(&spec.post_attn)?,
            ln2,
            mlp,
            post_mlp: opt(&spec.post_mlp)?,
        })
    }

    /// The optional norms (q, k, post-attention, post-MLP).
    pub fn extra_norms(&self) -> impl Iterator<Item = &Norm> {
        [&self.q_norm, &self.k_norm, &self.post_attn, &self.post_mlp]
            .into_iter()
            .flatten()
    }

    /// Every linear layer of the block, in forward order.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = self.qkv.all();
        v.push(&self.o);
        v.extend(self.mlp.all());
        v
    }
}
