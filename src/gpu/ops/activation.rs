//! SwiGLU/GeGLU, GELU, tanh and residual-add wrappers
//! (`shaders/activation.wgsl`).
//!
//! The kernels treat every tensor as a flat array. When the element count is a
//! multiple of 4 the vec4 entry point runs (one vec4 per invocation, the fast
//! path on lavapipe); otherwise its `_x1` twin (4 scalars per invocation),
//! because a binding of n floats cannot be viewed as vec4 past the last whole 4.

use super::{expect_shape, grid_1d, uniform, Plan, R, W};
use crate::error::{Error, Result};
use crate::gpu::context::Context;
use crate::gpu::kernels::{Access, KernelSpec};
use crate::gpu::tensor::Tensor;

uniform! { "activation" "Params"
    /// `Params` of `shaders/activation.wgsl`.
    pub struct ActivationParams { n: u32, _p0: u32, _p1: u32, _p2: u32 }
}

/// Invocations per workgroup: 8 lavapipe SIMD-8 batches, and a multiple of
/// every real GPU's wave size.
const WG: u32 = 64;

/// Check that `t` has `n` elements, whatever its shape.
fn expect_numel(op: &str, t: &Tensor, n: usize) -> Result<()> {
    if t.numel() != n {
        return Err(Error::Shape {
            op: op.to_string(),
            tensor: t.label().to_string(),
            expected: format!("{n} elements"),
            got: t.shape().to_vec(),
        });
    }
    Ok(())
}

/// Record `entry` (vec4, n % 4 == 0) or `entry_x1` over `n` flat elements.
fn dispatch_flat(
    ctx: &Context,
    plan: &mut Plan,
    entry: &'static str,
    entry_x1: &'static str,
    layout: &[Access],
    bindings: &[&Tensor],
    n: usize,
) -> Result<()> {
    dispatch_gated(ctx, plan, entry, entry_x1, layout, bindings, n, false)
}

/// [`dispatch_flat`] with the `GATE` override: tanh-GELU instead of silu.
#[allow(clippy::too_many_arguments)]
fn dispatch_gated(
    ctx: &Context,
    plan: &mut Plan,
    entry: &'static str,
    entry_x1: &'static str,
    layout: &[Access],
    bindings: &[&Tensor],
    n: usize,
    gelu: bool,
) -> Result<()> {
    // Nothing to do; empty tensors are only placeholder buffers.
    if n == 0 {
        return Ok(());
    }
    let entry = if n.is_multiple_of(4) { entry } else { entry_x1 };
    // Both entries cover 4 elements per invocation.
    let groups = n.div_ceil(4).div_ceil(WG as usize);
    let mut spec = KernelSpec::family("activation", entry, layout)?.with("WG", WG as f64);
    if gelu {
        spec = spec.with("GATE", 1.0);
    }
    plan.dispatch(
        ctx,
        &spec,
        &ActivationParams {
            n: n as u32,
            ..Default::default()
        },
        bindings,
        grid_1d(ctx, groups as u32),
    )
}

/// out (N, F) <- silu(gate (N, F)) * up (N, F). Any shape, as long as all three agree.
pub fn swiglu_forward(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    gate: &Tensor,
    up: &Tensor,
) -> Result<()> {
    glu_forward(ctx, plan, out, gate, up, false)
}

/// out (N, F) <- act(gate (N, F)) * up (N, F): silu (SwiGLU) or, with
/// `gelu`, the tanh GELU (GeGLU).
pub fn glu_forward(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    gelu: bool,
) -> Result<()> {
    let op = if gelu {
        "geglu_forward"
    } else {
        "swiglu_forward"
    };
    expect_shape(op, out, gate.shape())?;
    expect_shape(op, up, gate.shape())?;
    let n = gate.numel();
    let (e, x1) = ("swiglu_forward", "swiglu_forward_x1");
    dispatch_gated(ctx, plan, e, x1, &[W, R, R], &[out, gate, up], n, gelu)
}

/// dgate (N, F) +=, dup (N, F) += d swiglu . dout (N, F).
pub fn swiglu_backward(
    ctx: &Context,
    plan: &mut Plan,
    dgate: &Tensor,
    dup: &Tensor,
    dout: &Tensor,
    gate: &Tensor,
    up: &Tensor,
) -> Result<()> {
    glu_backward(ctx, plan, dgate, dup, dout, gate, up, false)
}

/// Backward of [`glu_forward`]: dgate (N, F) +=, dup (N, F) +=.
#[allow(clippy::too_many_arguments)]
pub fn glu_backward(
    ctx: &Context,
    plan: &mut Plan,
    dgate: &Tensor,
    dup: &Tensor,
    dout: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    gelu: bool,
) -> Result<()> {
    let op = if gelu {
        "geglu_backward"
    } else {
        "swiglu_backward"
    };
    for t in [dgate, dup, dout, up] {
        expect_shape(op, t, gate.shape())?;
    }
    let (e, x1) = ("swiglu_backward", "swiglu_backward_x1");
    let b = [dgate, dup, dout, gate, up];
    dispatch_gated(ctx, plan, e, x1, &[W, W, R, R, R], &b, gate.numel(), gelu)
}

/// out (N, C) <- gelu(inp (N, C)), tanh approximation (GPT-2 "gelu_new").
pub fn gelu_forward(ctx: &Context, plan: &mut Plan, out: &Tensor, inp: &Tensor) -> Result<()> {
    let op = "gelu_forward";
    expect_shape(op, out, inp.shape())?;
    dispatch_flat(
        ctx,
        plan,
        op,
        "gelu_forward_x1",
        &[W, R],
        &[out, inp],
        inp.numel(),
    )
}

/// dinp (N, C) += gelu'(inp) * dout.
pub fn gelu_backward(
    ctx: &Context,
    plan: &mut Plan,
    dinp: &Tensor,
    dout: &Tensor,
    inp: &Tensor,
) -> Result<()> {
    let op = "gelu_backward";
    expect_shape(op, dinp, inp.shape())?;
    expect_shape(op, dout, inp.shape())?;
    dispatch_flat(
        ctx,
        plan,
        op,
        "gelu_backward_x1",
        &[W, R, R],
        &[dinp, dout, inp],
        inp.numel(),
    )
}

/// out <- tanh(inp), any shape.
pub fn tanh_forward(ctx: &Context, plan: &mut Plan, out: &Tensor, inp: &Tensor) -> Result<()> {
    let op = "tanh_forward";
    expect_shape(op, out, inp.shape())?;
    dispatch_flat(
        ctx,
        plan,
        op,
        "tanh_forward_x1",
        &[W, R],
        &[out, inp],
        inp.numel(),
    )
}

/// dinp += dout * (1 - out^2), with `out` the saved forward output.
pub fn tanh_backward(
    ctx: &Context,
    plan: &mut Plan,
    dinp: &Tensor,
    dout: &Tensor,
    out: &Tensor,
) -> Result<()> {
    let op = "tanh_backward";
    expect_shape(op, dinp, out.shape())?;
    expect_shape(op, dout, out.shape())?;
    dispatch_flat(
        ctx,
        plan,
        op,
        "tanh_backward_x1",
        &[W, R, R],
        &[dinp, dout, out],
        out.numel(),
    )
}

/// out <- inp1 + inp2. Shapes may differ ((B, T, C) vs (B*T, C)); element counts may not.
pub fn residual_forward(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    inp1: &Tensor,
    inp2: &Tensor,
) -> Result<()> {
    let op = "residual_forward";
    let n = out.numel();
    expect_numel(op, inp1, n)?;
    expect_numel(op, inp2, n)?;
    dispatch_flat(
        ctx,
        plan,
        op,
        "residual_forward_x1",
        &[W, R, R],
        &[out, inp1, inp2],
        n,
    )
}

/// dinp1 += dout, dinp2 += dout (same element counts, any shapes).
pub fn residual_backward(
    ctx: &Context,
    plan: &mut Plan,
    dinp1: &Tensor,
    dinp2: &Tensor,
    dout: &Tensor,
) -> Result<()> {
    let op = "residual_backward";
    let n = dout.numel();
    expect_numel(op, dinp1, n)?;
    expect_numel(op, dinp2, n)?;
    dispatch_flat(
        ctx,
        plan,
        op,
        "residual_backward_x1",
        &[W, W, R],
        &[dinp1, dinp2, dout],
        n,
    )
}
