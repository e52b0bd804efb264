//! RoPE wrappers (`shaders/rope.wgsl`): rotate Q or K in place by the angles
//! of their positions, and rotate their gradient back in place.
//!
//! The cos/sin tables (MAXPOS, D/2) come from `cpu::rope::rope_tables`, built
//! in f64 on the host. H and D are read from `x`; B and T are passed because
//! the (B*T, H, D) layout does not carry them.

use super::{dims, expect_shape, grid_1d, uniform, Plan, R, W};
use crate::error::{Error, Result};
use crate::gpu::context::Context;
use crate::gpu::kernels::KernelSpec;
use crate::gpu::tensor::Tensor;

uniform! { "rope" "Params"
    /// `Params` of `shaders/rope.wgsl`.
    pub struct RopeParams { b: u32, t: u32, h: u32, d: u32, pos_offset: u32, _p0: u32, _p1: u32, _p2: u32 }
}

const WG: u32 = 64;

/// x (B*T, H, D) or (B, T, H, D) rotated in place, row b*T + t by the angles
/// of position t + pos_offset; cos, sin (MAXPOS, D/2).
#[allow(clippy::too_many_arguments)]
pub fn rope_forward(
    ctx: &Context,
    plan: &mut Plan,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    b: usize,
    t: usize,
    pos_offset: usize,
) -> Result<()> {
    rope(
        ctx,
        plan,
        ["rope_forward", "rope_forward_x1"],
        x,
        cos,
        sin,
        b,
        t,
        pos_offset,
    )
}

/// dx (B*T, H, D) or (B, T, H, D) rotated back in place (by minus the angles):
/// the gradient of the rotated tensor becomes that of the unrotated one.
#[allow(clippy::too_many_arguments)]
pub fn rope_backward(
    ctx: &Context,
    plan: &mut Plan,
    dx: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    b: usize,
    t: usize,
    pos_offset: usize,
) -> Result<()> {
    rope(
        ctx,
        plan,
        ["rope_backward", "rope_backward_x1"],
        dx,
        cos,
        sin,
        b,
        t,
        pos_offset,
    )
}

/// Shared checks and dispatch; `entries` = [vec4 entry, scalar entry].
#[allow(clippy::too_many_arguments)]
fn rope(
    ctx: &Context,
    plan: &mut Plan,
    entries: [&'static str; 2],
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    b: usize,
    t: usize,
    pos_offset: usize,
) -> Result<()> {
    let op = entries[0];
    // Both layouts are the same memory; (B, T, H, D) is what a reshaped
    // projection output looks like, so accept it without a reshape.
    let (h, d) = match *x.shape() {
        [bt, h, d] if bt == b * t => (h, d),
        [b2, t2, h, d] if b2 == b && t2 == t => (h, d),
        _ => {
            return Err(Error::Shape {
                op: op.into(),
                tensor: x.label().into(),
                expected: format!("(B*T, H, D) or (B, T, H, D) with B = {b}, T = {t}"),
                got: x.shape().to_vec(),
            })
        }
    };
    if d == 0 || !d.is_multiple_of(2) {
        return Err(Error::invalid(
            op,
            format!(
                "head dim D = {d} of `{}` must be even and positive",
                x.label()
            ),
        ));
    }
    let half = d / 2;
    let [max_pos, _] = dims(op, cos, "(MAXPOS, D/2)")?;
    expect_shape(op, cos, &[max_pos, half])?;
    expect_shape(op, sin, &[max_pos, half])?;
    // A position past the table would not fail on the GPU: the out-of-range
    // read is clamped or zeroed, and the rotation silently wrong.
    if t > 0 && t + pos_offset > max_pos {
        return Err(Error::invalid(
            op,
            format!(
                "positions {pos_offset}..{} of `{}` exceed the {max_pos} rows of tables `{}`/`{}`",
                t + pos_offset,
                x.label(),
                cos.label(),
                sin.label()
            ),
        ));
    }
    // Nothing to rotate; empty tensors are only placeholder buffers.
    if b * t * h == 0 {
        return Ok(());
    }
    // vec4 path when the half head is whole vec4s (every common head dim).
    let (entry, per_row) = if half.is_multiple_of(4) {
        (entries[0], half / 4)
    } else {
        (entries[1], half)
    };
    // One invocation per (row, pair group); each loops over the H heads.
    let groups = (b * t * per_row).div_ceil(WG as usize);
    let spec = KernelSpec::family("rope", entry, &[W, R, R])?.with("WG", WG as f64);
    let p = RopeParams {
        b: b as u32,
        t: t as u32,
        h: h as u32,
        d: d as u32,
        pos_offset: pos_offset as u32,
        ..Default::default()
    };
    plan.dispatch(ctx, &spec, &p, &[x, cos, sin], grid_1d(ctx, groups as u32))
}
