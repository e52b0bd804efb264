//! LoRA bypass wrappers (`shaders/lora.wgsl` plus three matmul layouts).
//!
//! A LoRA-wrapped frozen linear layer computes `y = x W^T + s * (x A^T) B^T`
//! with PEFT's lora_A `a` (R, K), lora_B `b` (N, R) and `s` = scaling. The
//! caller records the frozen `y = x W^T` first; [`lora_forward`] then adds the
//! bypass and saves `h = x A^T` for [`lora_backward`].
//!
//! The products with the rank R as an outer or inner dimension (`h B^T` into
//! y, `dy B`) run in the small-rank kernels of `lora.wgsl`; the token
//! reductions (dA, dB) and dx reuse the matmul kernels, whose split-K keeps
//! them deterministic. Every shape is checked before anything is recorded,
//! and an error names the offending tensor.

use super::matmul::{matmul_backward_input_ex, matmul_backward_weight_ex, matmul_forward_ex};
use super::{dims, expect_shape, grid_1d, uniform, Plan, R, W};
use crate::error::{Error, Result};
use crate::gpu::context::Context;
use crate::gpu::kernels::{Access, KernelSpec};
use crate::gpu::tensor::Tensor;

uniform! { "lora" "Params"
    /// `Params` of `shaders/lora.wgsl` (dropout reuses it, see there).
    pub struct LoraParams { m: u32, n: u32, r: u32, scale: f32 }
}

/// Invocations per workgroup: 8 lavapipe SIMD-8 batches, and a multiple of
/// every real GPU's wave size.
const WG: u32 = 64;

/// (M, K, N, R) of a LoRA call, read from `inp`, `a` and `b` and checked
/// against each other.
fn lora_dims(
    op: &str,
    inp: &Tensor,
    a: &Tensor,
    b: &Tensor,
) -> Result<(usize, usize, usize, usize)> {
    let [m, k] = dims(op, inp, "(M, K)")?;
    let [r, k2] = dims(op, a, "lora_A (R, K)")?;
    if k2 != k {
        expect_shape(op, a, &[r, k])?;
    }
    if r == 0 {
        return Err(Error::Shape {
            op: op.to_string(),
            tensor: a.label().to_string(),
            expected: "lora_A (R, K) with rank R >= 1".into(),
            got: a.shape().to_vec(),
        });
    }
    let [n, r2] = dims(op, b, "lora_B (N, R)")?;
    if r2 != r {
        expect_shape(op, b, &[n, r])?;
    }
    Ok((m, k, n, r))
}

fn check_scale(op: &str, scale: f32) -> Result<()> {
    if !scale.is_finite() {
        return Err(Error::invalid(op, format!("scaling {scale} is not finite")));
    }
    Ok(())
}

/// Record one small-rank entry over `rows * ceil(cols / 4)` invocations.
#[allow(clippy::too_many_arguments)]
fn dispatch_small_rank(
    ctx: &Context,
    plan: &mut Plan,
    entry: &'static str,
    layout: &[Access],
    bindings: &[&Tensor],
    (m, n, r): (usize, usize, usize),
    cols: usize,
    scale: f32,
) -> Result<()> {
    let invocations = m * cols.div_ceil(4);
    if invocations == 0 {
        return Ok(());
    }
    // Vec4 fast paths when rows start on a vec4 boundary.
    let spec = KernelSpec::family("lora", entry, layout)?
        .with("WG", WG as f64)
        .with("R4", f64::from(u8::from(r % 4 == 0)))
        .with("N4", f64::from(u8::from(n % 4 == 0)));
    let p = LoraParams {
        m: m as u32,
        n: n as u32,
        r: r as u32,
        scale,
    };
    let groups = invocations.div_ceil(WG as usize);
    plan.dispatch(ctx, &spec, &p, bindings, grid_1d(ctx, groups as u32))?;
    plan.add_flops("lora", 2.0 * (m * n * r) as f64);
    Ok(())
}

/// out (M, N) += scale * (inp (M, K) . a (R, K)^T) . b (N, R)^T, saving
/// h (M, R) = inp . a^T for backward.
///
/// Records `matmul_forward` (h) then the `lora_forward` entry. `out` must
/// already hold the frozen layer's output: the bypass is added to it.
#[allow(clippy::too_many_arguments)]
pub fn lora_forward(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    h: &Tensor,
    inp: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f32,
) -> Result<()> {
    let op = "lora_forward";
    let (m, _k, n, r) = lora_dims(op, inp, a, b)?;
    expect_shape(op, out, &[m, n])?;
    expect_shape(op, h, &[m, r])?;
    check_scale(op, scale)?;
    // h = x A^T: the "down" projection, a plain NT matmul.
    matmul_forward_ex(ctx, plan, h, inp, a, None, 1.0, false)?;
    // y += s * h B^T: the "up" projection fused with the residual add.
    dispatch_small_rank(ctx, plan, op, &[W, R, R], &[out, h, b], (m, n, r), n, scale)
}

/// Backward of [`lora_forward`]. Accumulates (`+=`) into da (R, K), db (N, R)
/// and, when given, dinp (M, K); `dinp` is `None` for the lowest layer.
/// `dh_scratch` (M, R) is overwritten (it holds dh = scale * dout . b).
///
/// Differentiates `y += s * h B^T` with `h = x A^T`. Records, in order:
/// `lora_backward` (dh = s dy B), `matmul_backward_weight` (dB += s dy^T h),
/// `matmul_backward_weight` (dA += dh^T x), `matmul_backward_input` (dx += dh A).
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    ctx: &Context,
    plan: &mut Plan,
    dinp: Option<&Tensor>,
    da: &Tensor,
    db: &Tensor,
    dh_scratch: &Tensor,
    dout: &Tensor,
    h: &Tensor,
    inp: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f32,
) -> Result<()> {
    let op = "lora_backward";
    let (m, k, n, r) = lora_dims(op, inp, a, b)?;
    if let Some(dx) = dinp {
        expect_shape(op, dx, &[m, k])?;
    }
    expect_shape(op, da, &[r, k])?;
    expect_shape(op, db, &[n, r])?;
    expect_shape(op, dh_scratch, &[m, r])?;
    expect_shape(op, dout, &[m, n])?;
    expect_shape(op, h, &[m, r])?;
    check_scale(op, scale)?;
    // dh = s * dy B (written: a scratch).
    dispatch_small_rank(
        ctx,
        plan,
        op,
        &[W, R, R],
        &[dh_scratch, dout, b],
        (m, n, r),
        r,
        scale,
    )?;
    // dB += s * dy^T h
    matmul_backward_weight_ex(ctx, plan, db, dout, h, scale)?;
    // dA += dh^T x
    matmul_backward_weight_ex(ctx, plan, da, dh_scratch, inp, 1.0)?;
    // dx += dh A
    if let Some(dx) = dinp {
        matmul_backward_input_ex(ctx, plan, dx, dh_scratch, a, 1.0)?;
    }
    Ok(())
}

/// The u32 threshold a hash must reach to keep an element with drop
/// probability `p` (in [0, 1)).
pub fn dropout_threshold(p: f64) -> u32 {
    (p * 4294967296.0).floor().min(u32::MAX as f64) as u32
}

#[allow(clippy::too_many_arguments)]
fn dropout_dispatch(
    ctx: &Context,
    plan: &mut Plan,
    entry: &'static str,
    layout: &[Access],
    bindings: &[&Tensor],
    n: usize,
    site: u32,
    p: f64,
) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(
            entry,
            format!("dropout probability {p} must be in [0, 1)"),
        ));
    }
    if n == 0 {
        return Ok(());
    }
    let spec = KernelSpec::family("lora", entry, layout)?.with("WG", WG as f64);
    let params = LoraParams {
        m: n as u32,
        n: site,
        r: dropout_threshold(p),
        scale: (1.0 / (1.0 - p)) as f32,
    };
    plan.dispatch(
        ctx,
        &spec,
        &params,
        bindings,
        grid_1d(ctx, n.div_ceil(WG as usize) as u32),
    )
}

/// out (M, K) = inp * keep / (1 - p), keep hashed from (seed[0], site, index).
pub fn lora_dropout_forward(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    inp: &Tensor,
    seed: &Tensor,
    site: u32,
    p: f64,
) -> Result<()> {
    let op = "lora_dropout_forward";
    expect_shape(op, out, inp.shape())?;
    dispatch_check_seed(op, seed)?;
    dropout_dispatch(
        ctx,
        plan,
        op,
        &[W, R, R],
        &[out, inp, seed],
        inp.numel(),
        site,
        p,
    )
}

/// dinp (M, K) += g * keep / (1 - p) with the forward's mask; g is zeroed.
pub fn lora_dropout_backward(
    ctx: &Context,
    plan: &mut Plan,
    dinp: &Tensor,
    g: &Tensor,
    seed: &Tensor,
    site: u32,
    p: f64,
) -> Result<()> {
    let op = "lora_dropout_backward";
    expect_shape(op, g, dinp.shape())?;
    dispatch_check_seed(op, seed)?;
    dropout_dispatch(
        ctx,
        plan,
        op,
        &[W, W, R],
        &[dinp, g, seed],
        dinp.numel(),
        site,
        p,
    )
}

fn dispatch_check_seed(op: &str, seed: &Tensor) -> Result<()> {
    if seed.dtype() != crate::gpu::DType::U32 || seed.numel() != 1 {
        return Err(Error::invalid(
            op,
            format!("seed `{}` must be one u32", seed.label()),
        ));
    }
    Ok(())
}
