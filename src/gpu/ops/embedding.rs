//! Embedding gather and soft-prompt wrappers (`shaders/embedding.wgsl`).
//!
//! Also home of [`row_chunks`], which splits a tensor that is larger than one
//! storage binding into aligned row ranges (used by the loss wrappers too).

use super::{dims, expect_shape, grid_1d, uniform, Plan, R, W};
use crate::error::{Error, Result};
use crate::gpu::context::Context;
use crate::gpu::kernels::{Access, KernelSpec};
use crate::gpu::tensor::{DType, Tensor};

uniform! { "embedding" "Params"
    /// `Params` of `shaders/embedding.wgsl`.
    pub struct EmbeddingParams {
        b: u32, s: u32, t: u32, c: u32, row_off: u32, v: u32, v0: u32, v1: u32,
        scale: f32, _p0: u32, _p1: u32, _p2: u32,
    }
}

/// Threads per row: enough to cover C in a few strides, at most 256.
fn wg_for(c: usize) -> u32 {
    (c.next_power_of_two() as u32).clamp(32, 256)
}

/// Threads per workgroup of the one-thread-per-element `prompt_backward`.
const WG_ELEMENTWISE: u32 = 64;

fn spec(entry: &'static str, layout: &[Access], wg: u32) -> Result<KernelSpec> {
    Ok(KernelSpec::family("embedding", entry, layout)?.with("WG", wg as f64))
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Fail unless `t` holds i32 (token ids, targets).
pub(crate) fn expect_i32(op: &str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::I32 {
        return Err(Error::invalid(
            op,
            format!(
                "tensor `{}` must hold i32 ids, not {:?}",
                t.label(),
                t.dtype()
            ),
        ));
    }
    Ok(())
}

/// Split the `rows` rows of `t` (each `row_elems` f32/i32 wide) into ranges
/// `[r0, r1)` whose views each fit one storage binding.
///
/// A tensor that fits is one range. Otherwise every range but the last holds
/// a multiple of `align / gcd(row_bytes, align)` rows, so that every view
/// starts on the storage-offset alignment (256 B) relative to `t`. When even
/// that many rows exceed the limit the tensor cannot be split: `Error::Limits`.
pub(crate) fn row_chunks(
    ctx: &Context,
    op: &str,
    t: &Tensor,
    rows: usize,
    row_elems: usize,
) -> Result<Vec<(usize, usize)>> {
    let limit = ctx.binding_limit();
    let row_bytes = row_elems as u64 * 4;
    if rows == 0 {
        return Ok(Vec::new());
    }
    if row_bytes * rows as u64 <= limit {
        return Ok(vec![(0, rows)]);
    }
    let align = (ctx.limits.min_storage_buffer_offset_alignment as u64).max(4);
    let granule = align / gcd(row_bytes, align);
    let per = (limit / row_bytes) / granule * granule;
    if per == 0 {
        return Err(Error::Limits {
            what: format!(
                "{op}: splitting `{}` {:?} into row chunks ({granule} rows at least, so that chunks start {align}-byte aligned)",
                t.label(),
                t.shape()
            ),
            need: granule * row_bytes,
            have: limit,
        });
    }
    let per = per as usize;
    Ok((0..rows)
        .step_by(per)
        .map(|r0| (r0, (r0 + per).min(rows)))
        .collect())
}

/// A view of rows `[r0, r1)` of the 2-D tensor `t` (`row_elems` wide).
pub(crate) fn row_view(t: &Tensor, r0: usize, r1: usize, row_elems: usize) -> Result<Tensor> {
    t.view(
        r0 * row_elems,
        &[r1 - r0, row_elems],
        &format!("{}[{r0}..{r1}]", t.label()),
    )
}

/// out (B, P + T, C) rows P.. <- table (V, C) rows picked by ids (B, T).
///
/// Rows 0..P of each batch are left for [`prompt_forward`]. The table is bound
/// in row chunks when it exceeds [`Context::binding_limit`], one dispatch per
/// chunk; ids outside [0, V) give zero rows.
pub fn embedding_forward(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    ids: &Tensor,
    table: &Tensor,
    row_offset: usize,
) -> Result<()> {
    embedding_forward_scaled(ctx, plan, out, ids, table, row_offset, 1.0)
}

/// [`embedding_forward`] with the rows multiplied by `scale` (in f32, as
/// transformers scales Gemma's embeddings).
pub fn embedding_forward_scaled(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    ids: &Tensor,
    table: &Tensor,
    row_offset: usize,
    scale: f32,
) -> Result<()> {
    let op = "embedding_forward";
    let [b, t] = dims(op, ids, "(B, T)")?;
    let [v, c] = dims(op, table, "(V, C)")?;
    expect_i32(op, ids)?;
    expect_shape(op, out, &[b, row_offset + t, c])?;
    if v == 0 || v > i32::MAX as usize {
        return Err(Error::invalid(
            op,
            format!(
                "table `{}` has {v} rows; expected 1..=i32::MAX",
                table.label()
            ),
        ));
    }
    let s = row_offset + t;
    if b * t == 0 {
        return Ok(());
    }
    let sp = spec(op, &[W, R, R], wg_for(c))?;
    for (v0, v1) in row_chunks(ctx, op, table, v, c)? {
        let chunk = row_view(table, v0, v1, c)?;
        let p = EmbeddingParams {
            b: b as u32,
            s: s as u32,
            t: t as u32,
            c: c as u32,
            row_off: row_offset as u32,
            v: v as u32,
            v0: v0 as u32,
            v1: v1 as u32,
            scale,
            ..Default::default()
        };
        plan.dispatch(
            ctx,
            &sp,
            &p,
            &[out, ids, &chunk],
            grid_1d(ctx, (b * t) as u32),
        )?;
    }
    Ok(())
}

/// The (B, S, C) dims of `out` given a (P, C) prompt, checking C and S >= P.
fn prompt_dims(op: &str, out: &Tensor, prompt: &Tensor) -> Result<[usize; 4]> {
    let [np, c] = dims(op, prompt, "(P, C)")?;
    let [b, s, oc] = dims(op, out, "(B, S, C)")?;
    if oc != c || s < np {
        return Err(Error::Shape {
            op: op.to_string(),
            tensor: out.label().to_string(),
            expected: format!("(B, S >= {np}, {c})"),
            got: out.shape().to_vec(),
        });
    }
    Ok([b, s, np, c])
}

/// The prompt kernels' block: rows 0..P of each of B batches of S rows.
fn prompt_params(b: usize, s: usize, np: usize, c: usize) -> EmbeddingParams {
    EmbeddingParams {
        b: b as u32,
        s: s as u32,
        c: c as u32,
        row_off: np as u32,
        ..Default::default()
    }
}

/// out (B, S, C) rows 0..P of each batch <- prompt (P, C).
pub fn prompt_forward(ctx: &Context, plan: &mut Plan, out: &Tensor, prompt: &Tensor) -> Result<()> {
    let op = "prompt_forward";
    let [b, s, np, c] = prompt_dims(op, out, prompt)?;
    if b * np * c == 0 {
        return Ok(());
    }
    let p = prompt_params(b, s, np, c);
    plan.dispatch(
        ctx,
        &spec(op, &[W, R], wg_for(c))?,
        &p,
        &[out, prompt],
        grid_1d(ctx, (b * np) as u32),
    )
}

/// dprompt (P, C) += sum over b of dout[b, 0..P, :] (fixed b order).
pub fn prompt_backward(
    ctx: &Context,
    plan: &mut Plan,
    dprompt: &Tensor,
    dout: &Tensor,
) -> Result<()> {
    let op = "prompt_backward";
    let [b, s, np, c] = prompt_dims(op, dout, dprompt)?;
    if np * c == 0 {
        return Ok(());
    }
    let p = prompt_params(b, s, np, c);
    let groups = (np * c).div_ceil(WG_ELEMENTWISE as usize) as u32;
    plan.dispatch(
        ctx,
        &spec(op, &[W, R], WG_ELEMENTWISE)?,
        &p,
        &[dprompt, dout],
        grid_1d(ctx, groups),
    )
}
