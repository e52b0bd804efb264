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

fn params(n: usize, c: usize, eps: f32) -> NormParams {
    NormParams {
        n: n as u32,
        c: c as u32,
        eps,
        _pad: 0,
    }
}

/// Threads per row: enough to cover C in a few strides, at most 256.
fn wg_for(c: usize) -> u32 {
    (c.next_power_of_two() as u32).clamp(32, 256)
}

/// Which build of the norm kernels to record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKernel {
    /// One workgroup per row with a tree reduction in workgroup memory.
    Workgroup,
    /// One invocation per row, vec4 operands (C % 4 == 0).
    Row,
}

impl NormKernel {
    /// The build for this adapter and shape: CPU adapters take whole rows
    /// when there are enough rows to share out (lavapipe, SmolLM2's
    /// 512 x 576: forward 0.9 ms against 20 ms, backward 3.0 against 36;
    /// one row alone is faster in a workgroup), GPUs the workgroup build.
    /// `WGTUNE_NORM=row|workgroup` forces one where it applies.
    pub fn pick(ctx: &Context, n: usize, c: usize) -> NormKernel {
        let row_ok = c.is_multiple_of(4);
        match std::env::var("WGTUNE_NORM").as_deref() {
            Ok("workgroup") => return NormKernel::Workgroup,
            Ok("row") if row_ok => return NormKernel::Row,
            _ => {}
        }
        if row_ok && n >= ROWS_MIN && ctx.is_software() {
            NormKernel::Row
        } else {
            NormKernel::Workgroup
        }
    }
}

/// Threads per workgroup of the `_row` builds (rows per workgroup).
const ROWS_WG: u32 = 16;
/// Fewest rows for which software adapters take the `_row` build.
const ROWS_MIN: usize = 16;

/// The pipeline of `entry` in build `k` and its grid for `n` rows.
fn spec(
    ctx: &Context,
    entry: &'static str,
    layout: &[crate::gpu::kernels::Access],
    n: usize,
    c: usize,
    k: NormKernel,
) -> Result<(KernelSpec, [u32; 3])> {
    Ok(match k {
        NormKernel::Workgroup => (
            KernelSpec::family("norm", entry, layout)?.with("WG", wg_for(c) as f64),
            grid_1d(ctx, n as u32),
        ),
        NormKernel::Row => (
            KernelSpec::family("norm", row_entry(entry), layout)?.with("WG", ROWS_WG as f64),
            grid_1d(ctx, (n as u32).div_ceil(ROWS_WG)),
        ),
    })
}

fn row_entry(entry: &str) -> &'static str {
    match entry {
        "rmsnorm_forward" => "rmsnorm_forward_row",
        "rmsnorm_add_forward" => "rmsnorm_add_forward_row",
        "rmsnorm_backward" => "rmsnorm_backward_row",
        "layernorm_forward" => "layernorm_forward_row",
        _ => "layernorm_backward_row",
    }
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
    let p = params(n, c, eps);
    let (spec, grid) = spec(ctx, op, &[W, W, R, R], n, c, NormKernel::pick(ctx, n, c))?;
    plan.dispatch(ctx, &spec, &p, &[out, rstd, inp, weight], grid)
}

/// sum (N, C) <- a + b, then out (N, C), rstd (N) <- rmsnorm(sum): a
/// residual add and the norm that reads it, in one dispatch. `sum` is
/// bit-equal to `activation::residual_forward`'s.
#[allow(clippy::too_many_arguments)] // the kernel's bindings
pub fn rmsnorm_add_forward(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    rstd: &Tensor,
    sum: &Tensor,
    a: &Tensor,
    b: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<()> {
    let op = "rmsnorm_add_forward";
    let [n, c] = dims(op, a, "(N, C)")?;
    for t in [out, sum, b] {
        expect_shape(op, t, &[n, c])?;
    }
    expect_shape(op, rstd, &[n])?;
    expect_shape(op, weight, &[c])?;
    let p = params(n, c, eps);
    let k = NormKernel::pick(ctx, n, c);
    let (spec, grid) = spec(ctx, op, &[W, W, W, R, R, R], n, c, k)?;
    plan.dispatch(ctx, &spec, &p, &[out, rstd, sum, a, b, weight], grid)
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
    let p = params(n, c, 0.0);
    let (spec, grid) = spec(ctx, op, &[W, R, R, R, R], n, c, NormKernel::pick(ctx, n, c))?;
    plan.dispatch(ctx, &spec, &p, &[dinp, dout, inp, weight, rstd], grid)
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
    let p = params(n, c, eps);
    let (spec, grid) = spec(
        ctx,
        op,
        &[W, W, W, R, R, R],
        n,
        c,
        NormKernel::pick(ctx, n, c),
    )?;
    plan.dispatch(ctx, &spec, &p, &[out, mean, rstd, inp, weight, bias], grid)
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
    let p = params(n, c, 0.0);
    let (spec, grid) = spec(
        ctx,
        op,
        &[W, R, R, R, R, R],
        n,
        c,
        NormKernel::pick(ctx, n, c),
    )?;
    plan.dispatch(ctx, &spec, &p, &[dinp, dout, inp, weight, mean, rstd], grid)
}
