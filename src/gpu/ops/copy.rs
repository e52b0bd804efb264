//! Strided row-block copies (`shaders/copy.wgsl`): qkv splits, K/V placement
//! after a prefix or into a KV cache, row gathers, and their reverses.

use super::{grid_1d, uniform, Plan, R, W};
use crate::error::{Error, Result};
use crate::gpu::context::Context;
use crate::gpu::kernels::KernelSpec;
use crate::gpu::tensor::Tensor;

uniform! { "copy" "Params"
    /// `Params` of `copy_rows` in `shaders/copy.wgsl`.
    pub struct CopyParams {
        nb: u32, t: u32, d: u32, acc: u32,
        src_bs: u32, src_rs: u32, src_off: u32,
        dst_bs: u32, dst_rs: u32, dst_off: u32,
    }
}

uniform! { "copy" "ScatterParams"
    /// `ScatterParams` of `scatter_rows` in `shaders/copy.wgsl`.
    pub struct ScatterParams { r: u32, d: u32, rows: u32, _p0: u32 }
}

const WG: u32 = 64;

pub use crate::cpu::copy::Layout;

/// Largest element index touched, plus one.
fn extent(l: Layout, nb: usize, t: usize, d: usize) -> usize {
    if nb * t * d == 0 {
        0
    } else {
        l.at(nb - 1, t - 1) + d
    }
}

/// What [`copy_rows`] moves: `nb` blocks of `t` rows of `d` elements, added
/// into `dst` when `acc` (overwriting it otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowBlock {
    pub nb: usize,
    pub t: usize,
    pub d: usize,
    pub acc: bool,
}

/// dst (strided) (+)= src (strided), an (nb, t, d) block of rows.
pub fn copy_rows(
    ctx: &Context,
    plan: &mut Plan,
    dst: &Tensor,
    dl: Layout,
    src: &Tensor,
    sl: Layout,
    block: RowBlock,
) -> Result<()> {
    copy_impl(ctx, plan, dst, dl, src, sl, block, None)
}

/// [`copy_rows`] with the destination moved down by the row count in `pos`
/// (1) u32, read when the plan runs: a KV cache append recorded once for
/// every position. `max_shift` is the largest count `pos` will hold; the
/// block must fit in `dst` at that shift.
#[allow(clippy::too_many_arguments)]
pub fn copy_rows_at(
    ctx: &Context,
    plan: &mut Plan,
    dst: &Tensor,
    dl: Layout,
    src: &Tensor,
    sl: Layout,
    block: RowBlock,
    pos: &Tensor,
    max_shift: usize,
) -> Result<()> {
    super::expect_shape("copy_rows_at", pos, &[1])?;
    if pos.dtype() != crate::gpu::tensor::DType::U32 {
        return Err(Error::invalid(
            "copy_rows_at",
            format!("row count `{}` must be u32", pos.label()),
        ));
    }
    copy_impl(ctx, plan, dst, dl, src, sl, block, Some((pos, max_shift)))
}

#[allow(clippy::too_many_arguments)]
fn copy_impl(
    ctx: &Context,
    plan: &mut Plan,
    dst: &Tensor,
    dl: Layout,
    src: &Tensor,
    sl: Layout,
    RowBlock { nb, t, d, acc }: RowBlock,
    at: Option<(&Tensor, usize)>,
) -> Result<()> {
    let op = if at.is_some() {
        "copy_rows_at"
    } else {
        "copy_rows"
    };
    let far = Layout {
        off: dl.off + at.map_or(0, |(_, m)| m) * dl.rs,
        ..dl
    };
    for (tn, l) in [(dst, far), (src, sl)] {
        let need = extent(l, nb, t, d);
        if need > tn.numel() {
            return Err(Error::invalid(
                op,
                format!(
                    "`{}` {:?} holds {} elements; the ({nb}, {t}, {d}) block at {l:?} needs {need}",
                    tn.label(),
                    tn.shape(),
                    tn.numel()
                ),
            ));
        }
    }
    let n = nb * t * d;
    if n == 0 {
        return Ok(());
    }
    if n > u32::MAX as usize {
        return Err(Error::Limits {
            what: format!("{op}: elements in one copy of `{}`", src.label()),
            need: n as u64,
            have: u32::MAX as u64,
        });
    }
    let layout: &[_] = if at.is_some() { &[W, R, R] } else { &[W, R] };
    let spec = KernelSpec::family("copy", op, layout)?.with("WG", WG as f64);
    let p = CopyParams {
        nb: nb as u32,
        t: t as u32,
        d: d as u32,
        acc: u32::from(acc),
        src_bs: sl.bs as u32,
        src_rs: sl.rs as u32,
        src_off: sl.off as u32,
        dst_bs: dl.bs as u32,
        dst_rs: dl.rs as u32,
        dst_off: dl.off as u32,
    };
    let grid = grid_1d(ctx, (n as u32).div_ceil(WG));
    match at {
        Some((pos, _)) => plan.dispatch(ctx, &spec, &p, &[dst, src, pos], grid),
        None => plan.dispatch(ctx, &spec, &p, &[dst, src], grid),
    }
}

/// dst (ROWS, D) rows idx[i] += src (R, D) rows i; idx (R) or (1, R) i32,
/// distinct. The reverse of gathering rows with `embedding_forward`.
pub fn scatter_rows(
    ctx: &Context,
    plan: &mut Plan,
    dst: &Tensor,
    idx: &Tensor,
    src: &Tensor,
) -> Result<()> {
    let op = "scatter_rows";
    crate::gpu::ops::embedding::expect_i32(op, idx)?;
    let r = idx.numel();
    let (rows, d) = match *dst.shape() {
        [rows, d] => (rows, d),
        _ => {
            return Err(Error::invalid(
                op,
                format!("`{}` must be (ROWS, D), not {:?}", dst.label(), dst.shape()),
            ))
        }
    };
    if src.numel() != r * d {
        return Err(Error::Shape {
            op: op.into(),
            tensor: src.label().into(),
            expected: format!("({r}, {d})"),
            got: src.shape().to_vec(),
        });
    }
    if r * d == 0 {
        return Ok(());
    }
    let spec = KernelSpec::family("copy", op, &[W, R, R])?.with("WG", WG as f64);
    let p = ScatterParams {
        r: r as u32,
        d: d as u32,
        rows: rows as u32,
        _p0: 0,
    };
    plan.dispatch(
        ctx,
        &spec,
        &p,
        &[dst, idx, src],
        grid_1d(ctx, ((r * d) as u32).div_ceil(WG)),
    )
}
