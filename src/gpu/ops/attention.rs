//! Causal GQA attention with an optional learned K/V prefix
//! (`shaders/attention.wgsl`).
//!
//! Shapes: q, out (B, T, NH, HD); k, v (B, S, KVH, HD) with S = P + T, the
//! prefix length P being `S - T`; lse (B, NH, T). NH % KVH == 0,
//! HD % 4 == 0 and HD <= 128.
//!
//! When the context has subgroups of a fixed size, the kernels are built from
//! the same source with `lane_get` turned into `subgroupShuffle`, so a
//! subgroup shares the rows it streams (see the shader header). Otherwise
//! the portable build (one row per group) is used.

use std::borrow::Cow;

use super::{dims, expect_shape, grid_1d, Params, Plan, R, W};
use crate::error::{Error, Result};
use crate::gpu::context::Context;
use crate::gpu::kernels::{Access, KernelSpec};
use crate::gpu::tensor::Tensor;

/// Largest head dim the register rows hold (`MAXC` vec4s in the shader).
pub const MAX_HEAD_DIM: usize = 128;

/// The portable `lane_get` body and its subgroup replacement.
const LANE_PORTABLE: &str = "return v; // LANE_GET";
const LANE_SUBGROUP: &str = "return subgroupShuffle(v, src);";

/// Attention dimensions, read off the tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub kvh: usize,
    pub hd: usize,
    /// Prefix rows in front of every batch's keys.
    pub p: usize,
}

impl AttnDims {
    /// Key rows S = P + T.
    pub fn s(&self) -> usize {
        self.p + self.t
    }
    /// (query, key) pairs the causal mask keeps.
    fn pairs(&self) -> f64 {
        (self.b * self.nh) as f64 * (self.t * self.p + self.t * (self.t + 1) / 2) as f64
    }
}

/// Read and check (B, T, NH, HD) from q and (B, S, KVH, HD) from k and v.
fn attn_dims(op: &str, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<AttnDims> {
    let [b, t, nh, hd] = dims(op, q, "(B, T, NH, HD)")?;
    let [kb, s, kvh, khd] = dims(op, k, "(B, S, KVH, HD)")?;
    let shape_err = |tensor: &Tensor, expected: String| Error::Shape {
        op: op.to_string(),
        tensor: tensor.label().to_string(),
        expected,
        got: tensor.shape().to_vec(),
    };
    if hd % 4 != 0 || hd == 0 || hd > MAX_HEAD_DIM {
        return Err(shape_err(q, format!("(B, T, NH, HD) with HD a multiple of 4 in 4..={MAX_HEAD_DIM}")));
    }
    if kb != b || khd != hd || s < t || kvh == 0 || nh % kvh != 0 {
        return Err(shape_err(
            k,
            format!("(B={b}, S>={t}, KVH, HD={hd}) with KVH dividing NH={nh}"),
        ));
    }
    expect_shape(op, v, &[b, s, kvh, hd])?;
    Ok(AttnDims { b, t, nh, kvh, hd, p: s - t })
}

/// The row-group width the kernels use on `ctx`: its fixed subgroup size, or 1.
pub fn lanes(ctx: &Context) -> u32 {
    ctx.subgroup_size().unwrap_or(1)
}

fn spec(entry: &'static str, layout: &[Access], d: &AttnDims, sg: u32) -> Result<KernelSpec> {
    let mut spec = KernelSpec::family("attention", entry, layout)?;
    if sg > 1 {
        if !spec.source.contains(LANE_PORTABLE) {
            return Err(Error::invalid(entry, "attention.wgsl lost its `// LANE_GET` marker"));
        }
        spec.source = Cow::Owned(spec.source.replace(LANE_PORTABLE, LANE_SUBGROUP));
        spec.module = Cow::Borrowed("attention_subgroup");
    }
    // A workgroup holds whole row groups.
    let wg = sg.max(64);
    Ok(spec.with("WG", wg as f64).with("SG", sg as f64).with("HD4", (d.hd / 4) as f64))
}

/// Uniform block: b, t, nh, kvh, pre, s, groups, scale.
fn params(d: &AttnDims, groups: usize) -> Params {
    Params::new()
        .u(d.b)
        .u(d.t)
        .u(d.nh)
        .u(d.kvh)
        .u(d.p)
        .u(d.s())
        .u(groups)
        .f(1.0 / (d.hd as f32).sqrt())
}

/// Workgroups for `groups` row groups of `sg` lanes.
fn grid(ctx: &Context, groups: usize, sg: u32) -> [u32; 3] {
    let wg = sg.max(64) as usize;
    grid_1d(ctx, (groups * sg as usize).div_ceil(wg) as u32)
}

/// out (B, T, NH, HD), lse (B, NH, T) <- q (B, T, NH, HD), k, v (B, S, KVH, HD).
pub fn attention_forward(ctx: &Context, plan: &mut Plan, out: &Tensor, lse: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
    attention_forward_lanes(ctx, plan, out, lse, q, k, v, lanes(ctx))
}

/// [`attention_forward`] with an explicit row-group width (1 = portable build).
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_lanes(ctx: &Context, plan: &mut Plan, out: &Tensor, lse: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, sg: u32) -> Result<()> {
    let op = "attention_forward";
    let d = attn_dims(op, q, k, v)?;
    expect_shape(op, out, &[d.b, d.t, d.nh, d.hd])?;
    expect_shape(op, lse, &[d.b, d.nh, d.t])?;
    // One group per SG consecutive queries of a (b, h).
    let groups = d.b * d.nh * d.t.div_ceil(sg as usize);
    plan.add_flops(4.0 * d.pairs() * d.hd as f64);
    plan.dispatch(ctx, &spec(op, &[W, W, R, R, R], &d, sg)?, &params(&d, groups), &[out, lse, q, k, v], grid(ctx, groups, sg))
}

/// dq (B, T, NH, HD) +=, dk, dv (B, S, KVH, HD) += the attention gradients
/// for `dout`, using the forward's `out` and `lse`. `delta` (B, NH, T) is
/// scratch that this call overwrites. Records three dispatches: delta, dq, dkv.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    ctx: &Context,
    plan: &mut Plan,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    delta: &Tensor,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
) -> Result<()> {
    attention_backward_lanes(ctx, plan, dq, dk, dv, delta, dout, q, k, v, out, lse, lanes(ctx))
}

/// [`attention_backward`] with an explicit row-group width (1 = portable build).
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_lanes(
    ctx: &Context,
    plan: &mut Plan,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    delta: &Tensor,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    sg: u32,
) -> Result<()> {
    let op = "attention_backward";
    let d = attn_dims(op, q, k, v)?;
    let qs = [d.b, d.t, d.nh, d.hd];
    let ks = [d.b, d.s(), d.kvh, d.hd];
    for (t, s) in [(dq, &qs[..]), (dout, &qs), (out, &qs), (dk, &ks), (dv, &ks)] {
        expect_shape(op, t, s)?;
    }
    expect_shape(op, lse, &[d.b, d.nh, d.t])?;
    expect_shape(op, delta, &[d.b, d.nh, d.t])?;

    // delta = rowsum(dout * out): one invocation per query row, portable build.
    let rows = d.b * d.nh * d.t;
    let e = "attention_backward_delta";
    plan.dispatch(ctx, &spec(e, &[W, R, R], &d, 1)?, &params(&d, rows), &[delta, dout, out], grid(ctx, rows, 1))?;

    // dq: row groups of SG queries, as in forward.
    let groups = d.b * d.nh * d.t.div_ceil(sg as usize);
    let e = "attention_backward_dq";
    let layout = [W, R, R, R, R, R, R];
    plan.dispatch(ctx, &spec(e, &layout, &d, sg)?, &params(&d, groups), &[dq, dout, q, k, v, lse, delta], grid(ctx, groups, sg))?;

    // dk, dv: row groups of SG keys of one (b, kvh).
    let groups = d.b * d.kvh * d.s().div_ceil(sg as usize);
    let e = "attention_backward_dkv";
    let layout = [W, W, R, R, R, R, R, R];
    plan.dispatch(ctx, &spec(e, &layout, &d, sg)?, &params(&d, groups), &[dk, dv, dout, q, k, v, lse, delta], grid(ctx, groups, sg))?;

    // dq: 3 dots per pair (scores, dp, ds k); dkv: 4 (scores, dp, dv, dk).
    plan.add_flops(14.0 * d.pairs() * d.hd as f64 + 2.0 * (rows * d.hd) as f64);
    Ok(())
}

/// The full WGSL text of the subgroup build (for validation in tests).
#[doc(hidden)]
pub fn subgroup_source() -> Result<String> {
    let d = AttnDims { b: 1, t: 1, nh: 1, kvh: 1, hd: 4, p: 0 };
    Ok(spec("attention_forward", &[], &d, 8)?.source.into_owned())
}
