//! `wgtune bench kernels`: GFLOP/s of the three matmul layouts and the
//! attention timings, on whatever adapter the context picks.
//!
//! Each case is one plan, run once to warm up (pipeline JIT) and then
//! `iters` times; the median wall time of submit + wait is reported.

use std::time::Instant;

use crate::error::Result;
use crate::gpu::ops::matmul;
use crate::gpu::{Context, ContextOptions, DType, Plan, Tensor};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `iters` runs of `plan` (after one warm-up run).
pub fn time_plan(ctx: &Context, plan: &Plan, iters: usize) -> Result<f64> {
    plan.run(ctx)?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        plan.run(ctx)?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

fn filled(ctx: &Context, shape: &[usize], label: &str) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    // Deterministic, bounded values; the content does not affect speed.
    let data: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    Tensor::from_f32(ctx, &data, shape, label)
}

/// One matmul case: `layout` is "forward", "backward_input" or "backward_weight".
/// Frozen weights are packed once, as at model load (outside the timing);
/// packing of the activations is timed.
pub fn matmul_case(
    ctx: &Context,
    layout: &str,
    m: usize,
    k: usize,
    n: usize,
    iters: usize,
) -> Result<(f64, f64)> {
    let mut plan = Plan::new(layout);
    let tex = matmul::use_textures(ctx, &[(m, k), (n, k), (m, n)]);
    match layout {
        "forward" => {
            let (x, w, y) = (
                filled(ctx, &[m, k], "x")?,
                filled(ctx, &[n, k], "w")?,
                Tensor::zeros(ctx, &[m, n], DType::F32, "y")?,
            );
            if tex {
                let mut load = Plan::new("pack weight");
                let wt = matmul::pack(ctx, &mut load, &w)?;
                load.run(ctx)?;
                matmul::matmul_forward_packed(ctx, &mut plan, &y, &x, &wt, None, 1.0, false)?;
            } else {
                matmul::matmul_forward(ctx, &mut plan, &y, &x, &w, None)?;
            }
        }
        "backward_input" => {
            let (dy, w, dx) = (
                filled(ctx, &[m, n], "dy")?,
                filled(ctx, &[n, k], "w")?,
                Tensor::zeros(ctx, &[m, k], DType::F32, "dx")?,
            );
            if tex {
                let mut load = Plan::new("pack weight");
                let wt = matmul::pack(ctx, &mut load, &w)?;
                load.run(ctx)?;
                matmul::matmul_backward_input_packed(ctx, &mut plan, &dx, &dy, &wt, 1.0)?;
            } else {
                matmul::matmul_backward_input(ctx, &mut plan, &dx, &dy, &w)?;
            }
        }
        _ => {
            let (dy, x, dw) = (
                filled(ctx, &[m, n], "dy")?,
                filled(ctx, &[m, k], "x")?,
                Tensor::zeros(ctx, &[n, k], DType::F32, "dw")?,
            );
            matmul::matmul_backward_weight(ctx, &mut plan, &dw, &dy, &x)?;
        }
    }
    let secs = time_plan(ctx, &plan, iters)?;
    Ok((secs, plan.flops() / secs / 1e9))
}

/// Run the kernel benchmark and print one line per case.
pub fn kernels(opts: &ContextOptions, iters: usize) -> Result<()> {
    let ctx = Context::new(opts)?;
    let v = matmul::pick_variant(&ctx, true);
    println!(
        "adapter: {} ({:?}, {:?})",
        ctx.info.name, ctx.info.backend, ctx.info.device_type
    );
    println!(
        "matmul: {}x{} register tile per invocation, subgroup width {}, operands from {} ({} iterations, median; frozen weights packed once, untimed)",
        v.tm,
        v.tn,
        v.sg,
        if ctx.textures() { "packed textures" } else { "storage buffers" },
        iters
    );
    println!(
        "{:<16} {:>6} {:>6} {:>6} {:>10} {:>9}",
        "layout", "M", "K", "N", "ms", "GFLOP/s"
    );
    let shapes = [
        (1024, 1024, 1024),
        (512, 576, 1536),
        (512, 1536, 576),
        (512, 576, 49152),
    ];
    for layout in ["forward", "backward_input", "backward_weight"] {
        for &(m, k, n) in &shapes {
            let (secs, gflops) = matmul_case(&ctx, layout, m, k, n, iters)?;
            println!(
                "{layout:<16} {m:>6} {k:>6} {n:>6} {:>10.2} {gflops:>9.1}",
                secs * 1e3
            );
        }
    }
    attention(&ctx, iters)?;
    Ok(())
}

/// Attention forward and backward for B=4, T=128, 9 query heads over 3 KV
/// heads, head_dim 64 (SmolLM2-135M's attention at a training batch).
pub fn attention(ctx: &Context, iters: usize) -> Result<()> {
    use crate::gpu::ops::attention as att;
    let (b, t, nh, kvh, hd) = (4, 128, 9, 3, 64);
    let z = |shape: &[usize], l: &str| Tensor::zeros(ctx, shape, DType::F32, l);
    let (q, k, v) = (
        filled(ctx, &[b, t, nh, hd], "q")?,
        filled(ctx, &[b, t, kvh, hd], "k")?,
        filled(ctx, &[b, t, kvh, hd], "v")?,
    );
    let (out, lse, dout) = (
        z(&[b, t, nh, hd], "out")?,
        z(&[b, nh, t], "lse")?,
        filled(ctx, &[b, t, nh, hd], "dout")?,
    );
    let (dq, dk, dv, delta) = (
        z(&[b, t, nh, hd], "dq")?,
        z(&[b, t, kvh, hd], "dk")?,
        z(&[b, t, kvh, hd], "dv")?,
        z(&[b, nh, t], "delta")?,
    );
    let mut fwd = Plan::new("attention_forward");
    att::attention_forward(ctx, &mut fwd, &out, &lse, &q, &k, &v)?;
    let mut bwd = Plan::new("attention_backward");
    att::attention_backward(
        ctx, &mut bwd, &dq, &dk, &dv, &delta, &dout, &q, &k, &v, &out, &lse,
    )?;
    let tf = time_plan(ctx, &fwd, iters)?;
    let tb = time_plan(ctx, &bwd, iters)?;
    println!("attention B={b} T={t} heads {nh}/{kvh} kv, head_dim {hd}, causal:");
    println!(
        "  forward  {:>8.2} ms  {:>6.1} GFLOP/s",
        tf * 1e3,
        fwd.flops() / tf / 1e9
    );
    println!(
        "  backward {:>8.2} ms  {:>6.1} GFLOP/s",
        tb * 1e3,
        bwd.flops() / tb / 1e9
    );
    Ok(())
}
