//! Softmax cross-entropy wrappers (`shaders/loss.wgsl`).
//!
//! Logits (N, V) are bound in row chunks when they exceed one storage binding
//! (V = 151936 gives 0.6 MB per row); losses, targets and dlosses stay bound
//! whole and each dispatch gets its first row in the uniform.

use super::embedding::{expect_i32, row_chunks, row_view};
use super::{dims, expect_shape, grid_1d, uniform, Plan, R, W};
use crate::error::{Error, Result};
use crate::gpu::context::Context;
use crate::gpu::kernels::{Access, KernelSpec};
use crate::gpu::tensor::Tensor;

uniform! { "loss" "Params"
    /// `Params` of `shaders/loss.wgsl`.
    pub struct LossParams { n: u32, v: u32, r0: u32, _pad: u32 }
}

/// Threads per row: V is large in practice, so usually the 256 maximum.
fn wg_for(v: usize) -> u32 {
    (v.next_power_of_two() as u32).clamp(32, 256)
}

fn spec(entry: &'static str, layout: &[Access], v: usize) -> Result<KernelSpec> {
    Ok(KernelSpec::family("loss", entry, layout)?.with("WG", wg_for(v) as f64))
}

/// The (N, V) dims of `logits`, with `v` small enough for the kernels' i32 compare.
fn logit_dims(op: &str, logits: &Tensor) -> Result<[usize; 2]> {
    let [n, v] = dims(op, logits, "(N, V)")?;
    if v > i32::MAX as usize {
        return Err(Error::invalid(
            op,
            format!("`{}`: vocab {v} exceeds i32::MAX", logits.label()),
        ));
    }
    Ok([n, v])
}

/// The uniform of a dispatch over `n` rows starting at row `r0` of the
/// per-row tensors.
fn params(r0: usize, n: usize, v: usize) -> LossParams {
    LossParams {
        n: n as u32,
        v: v as u32,
        r0: r0 as u32,
        _pad: 0,
    }
}

/// Checks that the per-row `a` and `targets` (N) cover the `logits` chunk
/// at `row0`.
fn chunk_rows(op: &str, logits: &Tensor, a: &Tensor, targets: &Tensor, row0: usize) -> Result<()> {
    let n = logits.shape()[0];
    let [total] = dims(op, a, "(N)")?;
    expect_shape(op, targets, &[total])?;
    expect_i32(op, targets)?;
    if row0 + n > total {
        return Err(Error::invalid(
            op,
            format!(
                "`{}` rows {row0}..{} out of range for `{}` {:?}",
                logits.label(),
                row0 + n,
                a.label(),
                a.shape()
            ),
        ));
    }
    Ok(())
}

/// losses (N) <- logsumexp(logits (N, V)) - logits[targets (N)]; 0 where the
/// target is -100.
pub fn crossentropy_forward(
    ctx: &Context,
    plan: &mut Plan,
    losses: &Tensor,
    logits: &Tensor,
    targets: &Tensor,
) -> Result<()> {
    let [n, _] = logit_dims("crossentropy_forward", logits)?;
    expect_shape("crossentropy_forward", losses, &[n])?;
    crossentropy_forward_at(ctx, plan, losses, logits, targets, 0)
}

/// [`crossentropy_forward`] for one row chunk: `logits` (n, V) are rows
/// `row0..row0 + n` of the N rows of `losses` and `targets` (N), so that the
/// LM head can compute its logits a chunk at a time.
pub fn crossentropy_forward_at(
    ctx: &Context,
    plan: &mut Plan,
    losses: &Tensor,
    logits: &Tensor,
    targets: &Tensor,
    row0: usize,
) -> Result<()> {
    let op = "crossentropy_forward";
    let [n, v] = logit_dims(op, logits)?;
    chunk_rows(op, logits, losses, targets, row0)?;
    let sp = spec(op, &[W, R, R], v)?;
    for (r0, r1) in row_chunks(ctx, op, logits, n, v)? {
        let chunk = row_view(logits, r0, r1, v)?;
        plan.dispatch(
            ctx,
            &sp,
            &params(row0 + r0, r1 - r0, v),
            &[losses, &chunk, targets],
            grid_1d(ctx, (r1 - r0) as u32),
        )?;
    }
    Ok(())
}

/// dlogits (N, V) += dlosses (N) * (softmax(logits) - onehot(targets)), nothing
/// for ignored rows. dlosses carries the mask and 1/num_targets
/// ([`crate::cpu::loss::mean_loss_scale`]).
pub fn crossentropy_softmax_backward(
    ctx: &Context,
    plan: &mut Plan,
    dlogits: &Tensor,
    dlosses: &Tensor,
    logits: &Tensor,
    targets: &Tensor,
) -> Result<()> {
    let op = "crossentropy_softmax_backward";
    let [n, v] = logit_dims(op, logits)?;
    expect_shape(op, dlogits, &[n, v])?;
    expect_shape(op, dlosses, &[n])?;
    expect_shape(op, targets, &[n])?;
    expect_i32(op, targets)?;
    let sp = spec(op, &[W, R, R, R], v)?;
    // dlogits has the shape of logits; if both start aligned, the same ranges
    // give aligned views of both.
    for (r0, r1) in row_chunks(ctx, op, logits, n, v)? {
        let dchunk = row_view(dlogits, r0, r1, v)?;
        let chunk = row_view(logits, r0, r1, v)?;
        plan.dispatch(
            ctx,
            &sp,
            &params(r0, r1 - r0, v),
            &[&dchunk, dlosses, &chunk, targets],
            grid_1d(ctx, (r1 - r0) as u32),
        )?;
    }
    Ok(())
}

/// logits (n, V) <- dlosses (N) * (softmax(logits) - onehot(targets)) in
/// place, zeros for ignored rows: the gradient of [`crossentropy_forward_at`]
/// (same `row0`), written over the logits chunk so that the LM head's backward
/// needs no separate dlogits buffer. An assignment, unlike
/// [`crossentropy_softmax_backward`]'s accumulation.
pub fn crossentropy_softmax_backward_inplace(
    ctx: &Context,
    plan: &mut Plan,
    logits: &Tensor,
    dlosses: &Tensor,
    targets: &Tensor,
    row0: usize,
) -> Result<()> {
    let op = "crossentropy_softmax_backward_inplace";
    let [n, v] = logit_dims(op, logits)?;
    chunk_rows(op, logits, dlosses, targets, row0)?;
    let sp = spec(op, &[W, R, R], v)?;
    for (r0, r1) in row_chunks(ctx, op, logits, n, v)? {
        let chunk = row_view(logits, r0, r1, v)?;
        plan.dispatch(
            ctx,
            &sp,
            &params(row0 + r0, r1 - r0, v),
            &[&chunk, dlosses, targets],
            grid_1d(ctx, (r1 - r0) as u32),
        )?;
    }
    Ok(())
}
