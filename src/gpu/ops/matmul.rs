//! Matmul wrappers (`shaders/matmul.wgsl`) and the generator of its unrolled
//! variants.
//!
//! The template's `{{NAME}}` markers get a register tile size, the lane
//! layout and a fully unrolled micro-kernel. The variant is chosen from the
//! adapter's features (a fixed subgroup size enables the broadcast path) and
//! from operand alignment; never from the adapter's name.
//!
//! Tensors larger than the storage binding limit are processed in row chunks:
//! `matmul_forward` splits the weight rows (output columns) and the token
//! rows, `matmul_backward_input` splits the weight rows (accumulating) and the
//! token rows. That is what lets a 151936 x 896 LM head run under lavapipe's
//! 128 MiB binding cap.

use std::borrow::Cow;
use std::fmt::Write;

use super::{dims, expect_shape, grid_1d, Params, Plan, R, W};
use crate::error::{Error, Result};
use crate::gpu::context::Context;
use crate::gpu::kernels::KernelSpec;
use crate::gpu::tensor::{DType, Tensor};

const TEMPLATE: &str = include_str!("../../../shaders/matmul.wgsl");

/// One generated configuration of the matmul module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    /// Register tile rows per invocation.
    pub tm: u32,
    /// Register tile columns per invocation (multiple of 4).
    pub tn: u32,
    /// Subgroup size whose lanes share A rows; 1 = no subgroup operations.
    pub sg: u32,
    /// Operand rows start on vec4 boundaries.
    pub aligned: bool,
}

impl Variant {
    fn lanes(&self) -> (u32, u32) {
        if self.sg > 1 {
            (self.sg, (64 / self.sg).max(1))
        } else {
            (8, 8)
        }
    }
    /// Output rows and columns covered by one workgroup.
    pub fn tile(&self) -> (u32, u32) {
        let (lc, rg) = self.lanes();
        (rg * self.tm, lc * self.tn)
    }
    fn name(&self) -> String {
        format!("matmul_t{}x{}_sg{}_{}", self.tm, self.tn, self.sg, if self.aligned { "v4" } else { "s" })
    }
}

/// The default variant for this context and alignment.
pub fn pick_variant(ctx: &Context, aligned: bool) -> Variant {
    match ctx.subgroup_size() {
        // Narrow subgroups are CPU SIMD lanes (lavapipe, WARP): big register
        // tiles pay, since every load is expensive and registers are not.
        Some(sg) if sg <= 8 => Variant { tm: 16, tn: 8, sg, aligned },
        Some(sg) => Variant { tm: 8, tn: 8, sg, aligned },
        None => Variant { tm: 8, tn: 8, sg: 1, aligned },
    }
}

const COMP: [&str; 4] = ["x", "y", "z", "w"];

/// Generate the complete WGSL module of a variant.
pub fn generate(v: &Variant) -> String {
    let (lc, rg) = v.lanes();
    let (tm, tn) = (v.tm as usize, v.tn as usize);
    let sg = v.sg as usize;
    let tv = tn / 4;
    let mut s = format!("{}\n{TEMPLATE}", crate::gpu::kernels::COMMON);
    let (builtins, setup) = if sg > 1 {
        (
            "@builtin(subgroup_invocation_id) sg_lane: u32, @builtin(subgroup_id) sg_id: u32",
            "let lane = sg_lane;\n    let rg = sg_id;",
        )
    } else {
        ("", "let lane = lid % LC;\n    let rg = lid / LC;")
    };

    // Forward (NT): scalar accumulators c_i_j.
    let mut decl = String::new();
    let mut body = String::new();
    let mut store = String::new();
    row_clamps(&mut decl, tm, sg);
    for j in 0..tn {
        writeln!(decl, "    let cb{j} = min(col0 + {j}u, nlast);").unwrap();
    }
    for i in 0..tm {
        for j in 0..tn {
            writeln!(decl, "    var c{i}_{j} = 0.0;").unwrap();
        }
    }
    a_rows(&mut body, tm, sg, |r| format!("fw_inp4({r}, k)"));
    for j in 0..tn {
        writeln!(body, "        let b{j} = fw_weight4(cb{j}, k);").unwrap();
    }
    for i in 0..tm {
        for j in 0..tn {
            writeln!(body, "        c{i}_{j} += dot(a{i}, b{j});").unwrap();
        }
    }
    for i in 0..tm {
        for j in 0..tn {
            writeln!(store, "    fw_store(row0 + {i}u, col0 + {j}u, c{i}_{j});").unwrap();
        }
    }
    s = s.replace("{{FW_DECL}}", &decl).replace("{{FW_BODY}}", &body).replace("{{FW_STORE}}", &store);

    // Backward input (NN): vec4 accumulators c_i_v over output columns.
    let (mut decl, mut body, mut store) = (String::new(), String::new(), String::new());
    row_clamps(&mut decl, tm, sg);
    for c in 0..tv {
        writeln!(decl, "    let cc{c} = col0 + {}u;", 4 * c).unwrap();
    }
    for i in 0..tm {
        for c in 0..tv {
            writeln!(decl, "    var c{i}_{c} = vec4<f32>(0.0);").unwrap();
        }
    }
    a_rows(&mut body, tm, sg, |r| format!("bi_dout4({r}, n)"));
    for u in 0..4 {
        for c in 0..tv {
            writeln!(body, "        let b{u}_{c} = bi_weight4(n + {u}u, cc{c});").unwrap();
        }
    }
    for i in 0..tm {
        for c in 0..tv {
            writeln!(
                body,
                "        c{i}_{c} += a{i}.x * b0_{c} + a{i}.y * b1_{c} + a{i}.z * b2_{c} + a{i}.w * b3_{c};"
            )
            .unwrap();
        }
    }
    for i in 0..tm {
        for c in 0..tv {
            writeln!(store, "    bi_store(row0 + {i}u, cc{c}, c{i}_{c});").unwrap();
        }
    }
    s = s.replace("{{BI_DECL}}", &decl).replace("{{BI_BODY}}", &body).replace("{{BI_STORE}}", &store);

    // Backward weight (token reduction): A = dout[m, row0..row0+TM] as TM/4
    // vec4s, shared over the subgroup; B = inp[m, cols] as TN/4 vec4s.
    let (mut decl, mut body, mut store) = (String::new(), String::new(), String::new());
    let ta = tm.div_ceil(4);
    for c in 0..tv {
        writeln!(decl, "    let cc{c} = col0 + {}u;", 4 * c).unwrap();
    }
    for i in 0..tm {
        for c in 0..tv {
            writeln!(decl, "    var c{i}_{c} = vec4<f32>(0.0);").unwrap();
        }
    }
    if sg > 1 {
        for slot in 0..ta.div_ceil(sg) {
            writeln!(body, "        let va{slot} = bw_dout4(m, row0 + 4u * ({}u + lane));", slot * sg).unwrap();
        }
        for t in 0..ta {
            writeln!(body, "        let a{t} = subgroupBroadcast(va{}, {}u);", t / sg, t % sg).unwrap();
        }
    } else {
        for t in 0..ta {
            writeln!(body, "        let a{t} = bw_dout4(m, row0 + {}u);", 4 * t).unwrap();
        }
    }
    for c in 0..tv {
        writeln!(body, "        let b{c} = bw_inp4(m, cc{c});").unwrap();
    }
    for i in 0..tm {
        for c in 0..tv {
            writeln!(body, "        c{i}_{c} += a{}.{} * b{c};", i / 4, COMP[i % 4]).unwrap();
        }
    }
    for i in 0..tm {
        for c in 0..tv {
            writeln!(store, "    bw_store(wg.z, row0 + {i}u, cc{c}, c{i}_{c});").unwrap();
        }
    }
    s = s.replace("{{BW_DECL}}", &decl).replace("{{BW_BODY}}", &body).replace("{{BW_STORE}}", &store);

    s.replace("{{LANE_BUILTINS}}", builtins)
        .replace("{{LANE_SETUP}}", setup)
        .replace("{{TM}}", &v.tm.to_string())
        .replace("{{TN}}", &v.tn.to_string())
        .replace("{{LC}}", &lc.to_string())
        .replace("{{RG}}", &rg.to_string())
        .replace("{{WG}}", &(lc * rg).to_string())
        .replace("{{ALIGNED}}", if v.aligned { "true" } else { "false" })
}

/// Row indices (clamped into range) for the A operand of one tile.
fn row_clamps(decl: &mut String, tm: usize, sg: usize) {
    if sg > 1 {
        for slot in 0..tm.div_ceil(sg) {
            writeln!(decl, "    let ra{slot} = min(row0 + {}u + lane, mlast);", slot * sg).unwrap();
        }
    } else {
        for i in 0..tm {
            writeln!(decl, "    let ra{i} = min(row0 + {i}u, mlast);").unwrap();
        }
    }
}

/// Load the TM A rows `a0..`: directly, or one slot per lane then broadcast.
fn a_rows(body: &mut String, tm: usize, sg: usize, load: impl Fn(String) -> String) {
    if sg > 1 {
        for slot in 0..tm.div_ceil(sg) {
            writeln!(body, "        let va{slot} = {};", load(format!("ra{slot}"))).unwrap();
        }
        for i in 0..tm {
            writeln!(body, "        let a{i} = subgroupBroadcast(va{}, {}u);", i / sg, i % sg).unwrap();
        }
    } else {
        for i in 0..tm {
            writeln!(body, "        let a{i} = {};", load(format!("ra{i}"))).unwrap();
        }
    }
}

/// Every variant the wrappers can pick, for naga validation in tests.
pub fn all_variant_sources() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (tm, tn, sg) in [(16, 8, 8), (8, 8, 32), (8, 8, 16), (8, 8, 64), (8, 8, 1), (16, 8, 4)] {
        for aligned in [true, false] {
            let v = Variant { tm, tn, sg, aligned };
            out.push((v.name(), generate(&v)));
        }
    }
    out
}

fn spec(v: &Variant, entry: &'static str, layout: &[crate::gpu::kernels::Access]) -> KernelSpec {
    KernelSpec {
        module: Cow::Owned(v.name()),
        source: Cow::Owned(generate(v)),
        entry,
        constants: Vec::new(),
        layout: layout.to_vec(),
    }
}

/// Rows per chunk so that every tensor with rows of `row_elems` fits the
/// binding limit, and each chunk starts on the storage offset alignment
/// (the chunk row count is also a multiple of `multiple`).
fn chunk_rows(ctx: &Context, what: &str, total: usize, row_elems: &[usize], multiple: usize) -> Result<usize> {
    let limit = ctx.binding_limit();
    let widest = (row_elems.iter().copied().max().unwrap_or(1).max(1) * 4) as u64;
    // Binding sizes round up to 16 bytes.
    if (total as u64 * widest).next_multiple_of(16) <= limit {
        return Ok(total);
    }
    let align = ctx.limits.min_storage_buffer_offset_alignment as u64;
    let mut step = multiple;
    for &e in row_elems {
        let rb = (e.max(1) * 4) as u64;
        step = lcm(step, (align / gcd(align, rb)) as usize);
    }
    let fit = (limit / widest) as usize / step * step;
    if fit == 0 {
        return Err(Error::Limits { what: format!("{what}: one chunk of {step} rows"), need: step as u64 * widest, have: limit });
    }
    Ok(fit)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a as u64, b as u64) as usize * b
}

/// out (M, N) = inp (M, K) . weight (N, K)^T + bias (N). See [`matmul_forward_ex`].
pub fn matmul_forward(ctx: &Context, plan: &mut Plan, out: &Tensor, inp: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
    matmul_forward_ex(ctx, plan, out, inp, weight, bias, 1.0, false)
}

/// out (M, N) (+)= alpha * inp (M, K) . weight (N, K)^T + bias (N).
/// Weight rows and token rows are chunked when they exceed a binding.
#[allow(clippy::too_many_arguments)]
pub fn matmul_forward_ex(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    inp: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    alpha: f32,
    accumulate: bool,
) -> Result<()> {
    let op = "matmul_forward";
    let [m, k] = dims(op, inp, "(M, K)")?;
    let [n, k2] = dims(op, weight, "(N, K)")?;
    if k2 != k {
        expect_shape(op, weight, &[n, k])?;
    }
    expect_shape(op, out, &[m, n])?;
    if let Some(b) = bias {
        expect_shape(op, b, &[n])?;
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let v = pick_variant(ctx, k % 4 == 0);
    let (tile_m, tile_n) = v.tile();
    let kern = spec(&v, op, &[W, R, R, R]);
    let dummy;
    let bias_t = match bias {
        Some(b) => b,
        None => {
            dummy = Tensor::zeros(ctx, &[1], DType::F32, "no_bias")?;
            &dummy
        }
    };
    // Weight row chunks: whole rows of W, a multiple of 64 so that the bias
    // view stays 256-byte aligned.
    let nc = chunk_rows(ctx, "matmul_forward weight", n, &[k], 64)?;
    // Token chunks must fit both the input rows and the full-width output rows.
    let mc = chunk_rows(ctx, "matmul_forward input", m, &[k, n], 1)?;
    let flags = u32::from(accumulate) | (u32::from(bias.is_some()) << 1);
    for m0 in (0..m).step_by(mc) {
        let mr = mc.min(m - m0);
        let x = inp.view(m0 * k, &[mr, k], inp.label())?;
        let o = out.view(m0 * n, &[mr, n], out.label())?;
        for n0 in (0..n).step_by(nc) {
            let nr = nc.min(n - n0);
            let w = weight.view(n0 * k, &[nr, k], weight.label())?;
            let b = if bias.is_some() { bias_t.view(n0, &[nr], bias_t.label())? } else { bias_t.clone() };
            let p = Params::new().u(mr).u(k).u(nr).u(n).u(n0).u(0).f(alpha).u(flags as usize).u(0).u(1);
            let grid = [(nr as u32).div_ceil(tile_n), (mr as u32).div_ceil(tile_m), 1];
            plan.dispatch(ctx, &kern, &p, &[&o, &x, &w, &b], grid)?;
        }
    }
    plan.add_flops(2.0 * m as f64 * n as f64 * k as f64);
    Ok(())
}

/// dinp (M, K) += dout (M, N) . weight (N, K). See [`matmul_backward_input_ex`].
pub fn matmul_backward_input(ctx: &Context, plan: &mut Plan, dinp: &Tensor, dout: &Tensor, weight: &Tensor) -> Result<()> {
    matmul_backward_input_ex(ctx, plan, dinp, dout, weight, 1.0)
}

/// dinp (M, K) += alpha * dout (M, N) . weight (N, K). Weight rows (the
/// reduction) and token rows are chunked when they exceed a binding.
pub fn matmul_backward_input_ex(ctx: &Context, plan: &mut Plan, dinp: &Tensor, dout: &Tensor, weight: &Tensor, alpha: f32) -> Result<()> {
    let op = "matmul_backward_input";
    let [m, n] = dims(op, dout, "(M, N)")?;
    let [n2, k] = dims(op, weight, "(N, K)")?;
    if n2 != n {
        expect_shape(op, weight, &[n, k])?;
    }
    expect_shape(op, dinp, &[m, k])?;
    if m == 0 || k == 0 {
        return Ok(());
    }
    let v = pick_variant(ctx, k % 4 == 0 && n % 4 == 0);
    let (tile_m, tile_k) = v.tile();
    let kern = spec(&v, op, &[W, R, R]);
    let nc = chunk_rows(ctx, "matmul_backward_input weight", n, &[k], 4)?;
    let mc = chunk_rows(ctx, "matmul_backward_input dout", m, &[k, n], 1)?;
    for m0 in (0..m).step_by(mc) {
        let mr = mc.min(m - m0);
        let dx = dinp.view(m0 * k, &[mr, k], dinp.label())?;
        let dy = dout.view(m0 * n, &[mr, n], dout.label())?;
        for n0 in (0..n).step_by(nc) {
            let nr = nc.min(n - n0);
            let w = weight.view(n0 * k, &[nr, k], weight.label())?;
            let p = Params::new().u(mr).u(k).u(nr).u(0).u(n0).u(n).f(alpha).u(1).u(0).u(1);
            let grid = [(k as u32).div_ceil(tile_k), (mr as u32).div_ceil(tile_m), 1];
            plan.dispatch(ctx, &kern, &p, &[&dx, &dy, &w], grid)?;
        }
    }
    plan.add_flops(2.0 * m as f64 * n as f64 * k as f64);
    Ok(())
}

/// Number of token splits for a backward_weight call (0 = no scratch).
pub fn split_count(ctx: &Context, m: usize, n: usize, k: usize) -> usize {
    let v = pick_variant(ctx, true);
    let (tr, tc) = v.tile();
    let tiles = (n as u32).div_ceil(tr) as usize * (k as u32).div_ceil(tc) as usize;
    // Enough workgroups to fill the device, but at least 32 tokens per split.
    let want = 64usize.div_ceil(tiles);
    want.min(m.div_ceil(32)).clamp(1, 64)
}

/// dweight (N, K) += dout (M, N)^T . inp (M, K). See [`matmul_backward_weight_ex`].
pub fn matmul_backward_weight(ctx: &Context, plan: &mut Plan, dweight: &Tensor, dout: &Tensor, inp: &Tensor) -> Result<()> {
    matmul_backward_weight_ex(ctx, plan, dweight, dout, inp, 1.0)
}

/// dweight (N, K) += alpha * dout (M, N)^T . inp (M, K), reduced over the M
/// tokens with a deterministic split-K: each split writes a partial and a
/// second kernel sums them in index order. The scratch is allocated here, at
/// plan-build time.
pub fn matmul_backward_weight_ex(ctx: &Context, plan: &mut Plan, dweight: &Tensor, dout: &Tensor, inp: &Tensor, alpha: f32) -> Result<()> {
    let op = "matmul_backward_weight";
    let [m, n] = dims(op, dout, "(M, N)")?;
    let [m2, k] = dims(op, inp, "(M, K)")?;
    if m2 != m {
        expect_shape(op, inp, &[m, k])?;
    }
    expect_shape(op, dweight, &[n, k])?;
    if n == 0 || k == 0 || m == 0 {
        return Ok(());
    }
    let v = pick_variant(ctx, k % 4 == 0 && n % 4 == 0);
    let (tile_r, tile_c) = v.tile();
    let splits = split_count(ctx, m, n, k);
    let m_split = m.div_ceil(splits);
    let splits = m.div_ceil(m_split);
    let grid = [(k as u32).div_ceil(tile_c), (n as u32).div_ceil(tile_r), splits as u32];
    let p = Params::new().u(m).u(k).u(n).u(0).u(0).u(n).f(alpha).u(0).u(m_split).u(splits);
    if splits == 1 {
        plan.dispatch(ctx, &spec(&v, op, &[W, R, R]), &p, &[dweight, dout, inp], grid)?;
    } else {
        let partials = Tensor::zeros(ctx, &[splits, n, k], DType::F32, &format!("{}.splitk", dweight.label()))?;
        plan.dispatch(ctx, &spec(&v, op, &[W, R, R]), &p, &[&partials, dout, inp], grid)?;
        let total = (n * k) as u32;
        plan.dispatch(
            ctx,
            &spec(&v, "matmul_backward_weight_reduce", &[W, R]),
            &p,
            &[dweight, &partials],
            grid_1d(ctx, total.div_ceil(64)),
        )?;
    }
    plan.add_flops(2.0 * m as f64 * n as f64 * k as f64);
    Ok(())
}
