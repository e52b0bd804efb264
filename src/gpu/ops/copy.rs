//! Strided row-block copies (`shaders/copy.wgsl`): qkv splits, K/V placement
//! after a prefix or into a KV cache, row gathers, and their reverses.

use super::{grid_1d, Params, Plan, R, W};
use crate::error::{Error, Result};
use crate::gpu::context::Context;
use crate::gpu::kernels::KernelSpec;
use crate::gpu::tensor::Tensor;

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
    RowBlock { nb, t, d, acc }: RowBlock,
) -> Result<()> {
    let op = "copy_rows";
    for (tn, l) in [(dst, dl), (src, sl)] {
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
    let spec = KernelSpec::family("copy", op, &[W, R])?.with("WG", WG as f64);
    let p = Params::new()
        .u(nb)
        .u(t)
        .u(d)
        .u(usize::from(acc))
        .u(sl.bs)
        .u(sl.rs)
        .u(sl.off)
        .u(dl.bs)
        .u(dl.rs)
        .u(dl.off);
    plan.dispatch(
        ctx,
        &spec,
        &p,
        &[dst, src],
        grid_1d(ctx, (n as u32).div_ceil(WG)),
    )
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
    let p = Params::new().u(r).u(d).u(rows);
    plan.dispatch(
        ctx,
        &spec,
        &p,
        &[dst, idx, src],
        grid_1d(ctx, ((r * d) as u32).div_ceil(WG)),
    )
}
