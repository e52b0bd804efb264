//! RMSNorm and LayerNorm wrappers (`shaders/norm.wgsl`).

use super::{dims, expect_shape, grid_1d, uniform, Plan, R, W};
use crate::error::Result;
use crate::gpu::context::Context;
use crate::gpu::kernels::KernelSpec;
use crate::gpu::tensor::Tensor;

uniform! { "norm" "Params"
    /// `Params` of `shaders/norm.wgsl` (eps is unused by the backward kernels).
    pub struct NormParams { n: u32, c: u32, eps: f32, _pad: u32 }
}

/// Threads per row: enough to cover C in a few strides, at most 256.
fn wg_for(c: usize) -> u32 {
    (c.next_power_of_two() as u32).clamp(32, 256)
}

fn spec(
    entry: &'static str,
    layout: &[crate::gpu::kernels::Access],
    c: usize,
) -> Result<KernelSpec> {
    Ok(KernelSpec::family("norm", entry, layout)?.with("WG", wg_for(c) as f64))
}

/// out (N, C), rstd (N) <- inp (N, C), weight (C).
pub fn rmsnorm_forward(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    rstd: &Tensor,
    inp: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<()> {
    let op = "rmsnorm_forward";
    let [n, c] = dims(op, inp, "(N, C)")?;
    expect_shape(op, out, &[n, c])?;
    expect_shape(op, rstd, &[n])?;
    expect_shape(op, weight, &[c])?;
    let p = NormParams {
        n: n as u32,
        c: c as u32,
        eps,
        _pad: 0,
    };
    plan.dispatch(
        ctx,
        &spec(op, &[W, W, R, R], c)?,
        &p,
        &[out, rstd, inp, weight],
        grid_1d(ctx, n as u32),
    )
}

/// dinp (N, C) += d rmsnorm / d inp . dout.
pub fn rmsnorm_backward(
    ctx: &Context,
    plan: &mut Plan,
    dinp: &Tensor,
    dout: &Tensor,
    inp: &Tensor,
    weight: &Tensor,
    rstd: &Tensor,
) -> Result<()> {
    let op = "rmsnorm_backward";
    let [n, c] = dims(op, inp, "(N, C)")?;
    expect_shape(op, dinp, &[n, c])?;
    expect_shape(op, dout, &[n, c])?;
    expect_shape(op, weight, &[c])?;
    expect_shape(op, rstd, &[n])?;
    let p = NormParams {
        n: n as u32,
        c: c as u32,
        ..Default::default()
    };
    plan.dispatch(
        ctx,
        &spec(op, &[W, R, R, R, R], c)?,
        &p,
        &[dinp, dout, inp, weight, rstd],
        grid_1d(ctx, n as u32),
    )
}

/// out (N, C), mean (N), rstd (N) <- inp (N, C), weight (C), bias (C).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    inp: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> Result<()> {
    let op = "layernorm_forward";
    let [n, c] = dims(op, inp, "(N, C)")?;
    expect_shape(op, out, &[n, c])?;
    expect_shape(op, mean, &[n])?;
    expect_shape(op, rstd, &[n])?;
    expect_shape(op, weight, &[c])?;
    expect_shape(op, bias, &[c])?;
    let p = NormParams {
        n: n as u32,
        c: c as u32,
        eps,
        _pad: 0,
    };
    plan.dispatch(
        ctx,
        &spec(op, &[W, W, W, R, R, R], c)?,
        &p,
        &[out, mean, rstd, inp, weight, bias],
        grid_1d(ctx, n as u32),
    )
}

/// dinp (N, C) += d layernorm / d inp . dout.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    ctx: &Context,
    plan: &mut Plan,
    dinp: &Tensor,
    dout: &Tensor,
    inp: &Tensor,
    weight: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> Result<()> {
    let op = "layernorm_backward";
    let [n, c] = dims(op, inp, "(N, C)")?;
    expect_shape(op, dinp, &[n, c])?;
    expect_shape(op, dout, &[n, c])?;
    expect_shape(op, weight, &[c])?;
    expect_shape(op, mean, &[n])?;
    expect_shape(op, rstd, &[n])?;
    let p = NormParams {
        n: n as u32,
        c: c as u32,
        ..Default::default()
    };
    plan.dispatch(
        ctx,
        &spec(op, &[W, R, R, R, R, R], c)?,
        &p,
        &[dinp, dout, inp, weight, mean, rstd],
        grid_1d(ctx, n as u32),
    )
}
