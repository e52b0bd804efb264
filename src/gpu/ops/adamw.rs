//! Global grad-norm clipping and the fused AdamW step (`shaders/adamw.wgsl`).
//!
//! All trainable parameters live in one flat f32 arena; grads, m and v share
//! its layout, so one optimizer step is three dispatches whatever the adapter:
//!
//! ```text
//! global_norm(ctx, &mut plan, &norm, &partials, &grads, max_norm)?;      // 2 dispatches
//! adamw_update(ctx, &mut plan, &params, &m, &v, &grads, &norm, &step)?;  // 1 dispatch
//! // each step, before submitting the plan:
//! step.write_f32(ctx, &adamw_step_scalars(lr, 0.9, 0.999, 1e-8, 0.01, t))?;
//! ```
//!
//! `lr` and `t` change every step but the plan (and its uniforms) is recorded
//! once, so the per-step scalars live in the small `step` (8) tensor instead.

use super::{dims, expect_shape, grid_1d, uniform, Plan, R, W};
use crate::error::Result;
use crate::gpu::context::Context;
use crate::gpu::kernels::{Access, KernelSpec};
use crate::gpu::tensor::Tensor;

uniform! { "adamw" "Params"
    /// `Params` of `shaders/adamw.wgsl`.
    pub struct AdamwParams { n: u32, parts: u32, max_norm: f32, inf_bits: u32 }
}

/// Threads per workgroup (a power of two <= 256, the shader's MAX_WG).
const WG: usize = 256;
/// Elements per thread.
const ITEMS: usize = 8;

fn spec(entry: &'static str, layout: &[Access]) -> Result<KernelSpec> {
    Ok(KernelSpec::family("adamw", entry, layout)?
        .with("WG", WG as f64)
        .with("ITEMS", ITEMS as f64))
}

/// Length of the partials scratch `global_norm` needs for `n` gradients:
/// one f32 per WG*ITEMS slice, at least one.
pub fn global_norm_partials_len(n: usize) -> usize {
    n.div_ceil(WG * ITEMS).max(1)
}

/// The `step` (8) tensor contents for step `t` (counted from 1): [1 - lr*wd,
/// beta1, 1 - beta1, beta2, 1 - beta2, eps, lr / (1 - beta1^t),
/// sqrt(1 - beta2^t)], each formed in f64 and rounded once, as torch does
/// (see `cpu::adamw::adamw_step_scalars`). Write it with `Tensor::write_f32`
/// before each submission.
pub fn adamw_step_scalars(
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    t: u64,
) -> [f32; 8] {
    crate::cpu::adamw::adamw_step_scalars(lr, beta1, beta2, eps, weight_decay, t).map(|x| x as f32)
}

/// norm (4) = [norm, clip_coef, nonfinite_flag, 0] <- grads (N), using
/// partials (G = `global_norm_partials_len(N)`) as scratch.
/// `max_norm <= 0` disables clipping (clip_coef = 1).
pub fn global_norm(
    ctx: &Context,
    plan: &mut Plan,
    norm: &Tensor,
    partials: &Tensor,
    grads: &Tensor,
    max_norm: f32,
) -> Result<()> {
    let op = "global_norm";
    let [n] = dims(op, grads, "(N)")?;
    let g = global_norm_partials_len(n);
    expect_shape(op, norm, &[4])?;
    expect_shape(op, partials, &[g])?;
    let p = AdamwParams {
        n: n as u32,
        parts: g as u32,
        max_norm,
        inf_bits: f32::INFINITY.to_bits(),
    };
    plan.dispatch(
        ctx,
        &spec("global_norm_partial", &[W, R])?,
        &p,
        &[partials, grads],
        grid_1d(ctx, g as u32),
    )?;
    plan.dispatch(
        ctx,
        &spec("global_norm_finalize", &[W, R])?,
        &p,
        &[norm, partials],
        [1, 1, 1],
    )
}

/// params, m, v (N) updated in place by one torch.optim.AdamW step from
/// grads (N), norm (4) (from [`global_norm`]: clip_coef and the skip flag)
/// and step (8) (from [`adamw_step_scalars`]).
#[allow(clippy::too_many_arguments)]
pub fn adamw_update(
    ctx: &Context,
    plan: &mut Plan,
    params: &Tensor,
    m: &Tensor,
    v: &Tensor,
    grads: &Tensor,
    norm: &Tensor,
    step: &Tensor,
) -> Result<()> {
    let op = "adamw_update";
    let [n] = dims(op, params, "(N)")?;
    expect_shape(op, m, &[n])?;
    expect_shape(op, v, &[n])?;
    expect_shape(op, grads, &[n])?;
    expect_shape(op, norm, &[4])?;
    expect_shape(op, step, &[8])?;
    let p = AdamwParams {
        n: n as u32,
        ..Default::default()
    };
    let wgs = n.div_ceil(WG * ITEMS) as u32;
    plan.dispatch(
        ctx,
        &spec(op, &[W, W, W, R, R, R])?,
        &p,
        &[params, m, v, grads, norm, step],
        grid_1d(ctx, wgs),
    )
}
