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
use crate::gpu::kernels::Access::{StorageTexture as S, Texture as X};
use crate::gpu::kernels::KernelSpec;
use crate::gpu::plan::Bind;
use crate::gpu::tensor::TexMatrix;
use crate::gpu::tensor::{DType, Tensor};

/// `writeln!` into a `String` of generated WGSL.
macro_rules! emit {
    ($dst:expr, $($arg:tt)*) => {
        writeln!($dst, $($arg)*).expect("invariant: writing to a String cannot fail")
    };
}

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
    /// Texture path: the A / B texture is split into layers (taller than
    /// the texture limit), so row coordinates need a shift and a mask.
    pub a_layered: bool,
    pub b_layered: bool,
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
        format!(
            "matmul_t{}x{}_sg{}_{}{}{}",
            self.tm,
            self.tn,
            self.sg,
            if self.aligned { "v4" } else { "s" },
            if self.a_layered { "_la" } else { "" },
            if self.b_layered { "_lb" } else { "" }
        )
    }
}

/// The default variant for this context and alignment.
pub fn pick_variant(ctx: &Context, aligned: bool) -> Variant {
    // WGTUNE_MATMUL_TILE=TMxTN overrides the tile (for tuning on new hardware).
    if let Some((tm, tn)) = std::env::var("WGTUNE_MATMUL_TILE").ok().and_then(|s| {
        let (a, b) = s.split_once('x')?;
        Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?))
    }) {
        if tm % 4 == 0 && tn % 4 == 0 && tm > 0 && tn > 0 {
            return Variant {
                tm,
                tn,
                sg: ctx.subgroup_size().unwrap_or(1),
                aligned,
                a_layered: false,
                b_layered: false,
            };
        }
        log::warn!("WGTUNE_MATMUL_TILE={tm}x{tn} ignored: both must be positive multiples of 4");
    }
    match ctx.subgroup_size() {
        // Narrow subgroups are CPU SIMD lanes (lavapipe, WARP): big register
        // tiles pay, since every load is expensive and registers are not.
        Some(sg) if sg <= 8 => Variant {
            tm: 32,
            tn: 8,
            sg,
            aligned,
            a_layered: false,
            b_layered: false,
        },
        Some(sg) => Variant {
            tm: 8,
            tn: 8,
            sg,
            aligned,
            a_layered: false,
            b_layered: false,
        },
        None => Variant {
            tm: 8,
            tn: 8,
            sg: 1,
            aligned,
            a_layered: false,
            b_layered: false,
        },
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

    for (tag, fa, fb, fs, tex) in [
        ("FW", "fw_inp4", "fw_weight4", "fw_store", false),
        ("FWT", "fwt_a4", "fwt_b4", "fw_store", true),
    ] {
        let (d, b, st) = gen_nt(tm, tn, sg, fa, fb, fs, tex);
        s = s
            .replace(&format!("{{{{{tag}_DECL}}}}"), &d)
            .replace(&format!("{{{{{tag}_BODY}}}}"), &b)
            .replace(&format!("{{{{{tag}_STORE}}}}"), &st);
    }
    for (tag, fa, fb, fs, tex) in [
        ("BI", "bi_dout4", "bi_weight4", "bi_store", false),
        ("BIT", "bit_a4", "bit_b4", "bi_store", true),
    ] {
        let (d, b, st) = gen_nn(tm, tv, sg, fa, fb, fs, tex);
        s = s
            .replace(&format!("{{{{{tag}_DECL}}}}"), &d)
            .replace(&format!("{{{{{tag}_BODY}}}}"), &b)
            .replace(&format!("{{{{{tag}_STORE}}}}"), &st);
    }
    for (tag, fa, fb, fs, tex) in [
        ("BW", "bw_dout4", "bw_inp4", "bw_store", false),
        ("BWT", "bwt_a4", "bwt_b4", "bw_store", true),
    ] {
        let (d, b, st) = gen_tn(tm, tv, sg, fa, fb, fs, tex);
        s = s
            .replace(&format!("{{{{{tag}_DECL}}}}"), &d)
            .replace(&format!("{{{{{tag}_BODY}}}}"), &b)
            .replace(&format!("{{{{{tag}_STORE}}}}"), &st);
    }

    s.replace("{{LANE_BUILTINS}}", builtins)
        .replace("{{LANE_SETUP}}", setup)
        .replace("{{TM}}", &v.tm.to_string())
        .replace("{{TN}}", &v.tn.to_string())
        .replace("{{LC}}", &lc.to_string())
        .replace("{{RG}}", &rg.to_string())
        .replace("{{WG}}", &(lc * rg).to_string())
        .replace("{{ALIGNED}}", if v.aligned { "true" } else { "false" })
        .replace("{{A_LAYERED}}", if v.a_layered { "true" } else { "false" })
        .replace("{{B_LAYERED}}", if v.b_layered { "true" } else { "false" })
}

/// NT micro-kernel (forward): scalar accumulators c_i_j over a TM x TN tile.
/// `tex`: loaders take texel coordinates, computed here once per row.
fn gen_nt(
    tm: usize,
    tn: usize,
    sg: usize,
    load_a: &str,
    load_b: &str,
    store_fn: &str,
    tex: bool,
) -> (String, String, String) {
    let (mut decl, mut body, mut store) = (String::new(), String::new(), String::new());
    row_clamps(&mut decl, tm, sg);
    if tex {
        coords(&mut decl, tm, sg);
    }
    for j in 0..tn {
        emit!(decl, "    let cb{j} = min(col0 + {j}u, nlast);");
        if tex {
            emit!(decl, "    let cbc{j} = b_coord(cb{j});");
        }
    }
    let (ra, cb) = if tex { ("ca", "cbc") } else { ("ra", "cb") };
    for i in 0..tm {
        for j in 0..tn {
            emit!(decl, "    var c{i}_{j} = 0.0;");
        }
    }
    a_rows(&mut body, tm, sg, ra, |r| format!("{load_a}({r}, k)"));
    for j in 0..tn {
        emit!(body, "        let b{j} = {load_b}({cb}{j}, k);");
    }
    for i in 0..tm {
        for j in 0..tn {
            emit!(body, "        c{i}_{j} += dot(a{i}, b{j});");
        }
    }
    for i in 0..tm {
        for j in 0..tn {
            emit!(store, "    {store_fn}(row0 + {i}u, col0 + {j}u, c{i}_{j});");
        }
    }
    (decl, body, store)
}

/// NN micro-kernel (backward_input): vec4 accumulators c_i_v over TV vec4 columns.
fn gen_nn(
    tm: usize,
    tv: usize,
    sg: usize,
    load_a: &str,
    load_b: &str,
    store_fn: &str,
    tex: bool,
) -> (String, String, String) {
    let (mut decl, mut body, mut store) = (String::new(), String::new(), String::new());
    row_clamps(&mut decl, tm, sg);
    if tex {
        coords(&mut decl, tm, sg);
    }
    for c in 0..tv {
        emit!(decl, "    let cc{c} = col0 + {}u;", 4 * c);
    }
    for i in 0..tm {
        for c in 0..tv {
            emit!(decl, "    var c{i}_{c} = vec4<f32>(0.0);");
        }
    }
    a_rows(&mut body, tm, sg, if tex { "ca" } else { "ra" }, |r| {
        format!("{load_a}({r}, n)")
    });
    for u in 0..4 {
        for c in 0..tv {
            emit!(body, "        let b{u}_{c} = {load_b}(n + {u}u, cc{c});");
        }
    }
    for i in 0..tm {
        for c in 0..tv {
            emit!(body, "        c{i}_{c} += a{i}.x * b0_{c} + a{i}.y * b1_{c} + a{i}.z * b2_{c} + a{i}.w * b3_{c};");
        }
    }
    for i in 0..tm {
        for c in 0..tv {
            emit!(store, "    {store_fn}(row0 + {i}u, cc{c}, c{i}_{c});");
        }
    }
    (decl, body, store)
}

/// Token-reduction micro-kernel (backward_weight): A = dout[m, row0..row0+TM]
/// as TM/4 vec4s shared over the subgroup; B = inp[m, cols] as TV vec4s.
fn gen_tn(
    tm: usize,
    tv: usize,
    sg: usize,
    load_a: &str,
    load_b: &str,
    store_fn: &str,
    tex: bool,
) -> (String, String, String) {
    let (mut decl, mut body, mut store) = (String::new(), String::new(), String::new());
    // Both operands are read at token m: one coordinate pair per iteration.
    let (ma, mb) = if tex { ("cma", "cmb") } else { ("m", "m") };
    if tex {
        emit!(
            body,
            "        let cma = a_coord(m);\n        let cmb = b_coord(m);"
        );
    }
    let ta = tm.div_ceil(4);
    for c in 0..tv {
        emit!(decl, "    let cc{c} = col0 + {}u;", 4 * c);
    }
    for i in 0..tm {
        for c in 0..tv {
            emit!(decl, "    var c{i}_{c} = vec4<f32>(0.0);");
        }
    }
    if sg > 1 {
        for slot in 0..ta.div_ceil(sg) {
            emit!(
                body,
                "        let va{slot} = {load_a}({ma}, row0 + 4u * ({}u + lane));",
                slot * sg
            );
        }
        for t in 0..ta {
            emit!(
                body,
                "        let a{t} = subgroupBroadcast(va{}, {}u);",
                t / sg,
                t % sg
            );
        }
    } else {
        for t in 0..ta {
            emit!(
                body,
                "        let a{t} = {load_a}({ma}, row0 + {}u);",
                4 * t
            );
        }
    }
    for c in 0..tv {
        emit!(body, "        let b{c} = {load_b}({mb}, cc{c});");
    }
    for i in 0..tm {
        for c in 0..tv {
            emit!(
                body,
                "        c{i}_{c} += a{}.{} * b{c};",
                i / 4,
                COMP[i % 4]
            );
        }
    }
    for i in 0..tm {
        for c in 0..tv {
            emit!(store, "    {store_fn}(wg.z, row0 + {i}u, cc{c}, c{i}_{c});");
        }
    }
    (decl, body, store)
}

/// Row indices (clamped into range) for the A operand of one tile.
fn row_clamps(decl: &mut String, tm: usize, sg: usize) {
    if sg > 1 {
        for slot in 0..tm.div_ceil(sg) {
            emit!(
                decl,
                "    let ra{slot} = min(row0 + {}u + lane, mlast);",
                slot * sg
            );
        }
    } else {
        for i in 0..tm {
            emit!(decl, "    let ra{i} = min(row0 + {i}u, mlast);");
        }
    }
}

/// Texel coordinates `ca*` of the A rows `ra*` (loop-invariant).
fn coords(decl: &mut String, tm: usize, sg: usize) {
    let n = if sg > 1 { tm.div_ceil(sg) } else { tm };
    for i in 0..n {
        emit!(decl, "    let ca{i} = a_coord(ra{i});");
    }
}

/// Load the TM A rows `a0..`: directly, or one slot per lane then broadcast.
/// `rows` names the per-row index variables (`ra`) or coordinates (`ca`).
fn a_rows(body: &mut String, tm: usize, sg: usize, rows: &str, load: impl Fn(String) -> String) {
    if sg > 1 {
        for slot in 0..tm.div_ceil(sg) {
            emit!(
                body,
                "        let va{slot} = {};",
                load(format!("{rows}{slot}"))
            );
        }
        for i in 0..tm {
            emit!(
                body,
                "        let a{i} = subgroupBroadcast(va{}, {}u);",
                i / sg,
                i % sg
            );
        }
    } else {
        for i in 0..tm {
            emit!(body, "        let a{i} = {};", load(format!("{rows}{i}")));
        }
    }
}

/// Every variant the wrappers can pick, for naga validation in tests.
pub fn all_variant_sources() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (tm, tn, sg) in [
        (32, 8, 8),
        (16, 8, 8),
        (8, 8, 32),
        (8, 8, 16),
        (8, 8, 64),
        (8, 8, 1),
        (16, 8, 4),
    ] {
        for aligned in [true, false] {
            for layered in [false, true] {
                let v = Variant {
                    tm,
                    tn,
                    sg,
                    aligned,
                    a_layered: layered,
                    b_layered: layered,
                };
                out.push((v.name(), generate(&v)));
            }
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
fn chunk_rows(
    ctx: &Context,
    what: &str,
    total: usize,
    row_elems: &[usize],
    multiple: usize,
) -> Result<usize> {
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
        return Err(Error::Limits {
            what: format!("{what}: one chunk of {step} rows"),
            need: step as u64 * widest,
            have: limit,
        });
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
pub fn matmul_forward(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    inp: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<()> {
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
    if use_textures(ctx, &[(m, k), (n, k)]) {
        let w = pack(ctx, plan, weight)?;
        return matmul_forward_packed(ctx, plan, out, inp, &w, bias, alpha, accumulate);
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
            let b = if bias.is_some() {
                bias_t.view(n0, &[nr], bias_t.label())?
            } else {
                bias_t.clone()
            };
            let p = Params::new()
                .u(mr)
                .u(k)
                .u(nr)
                .u(n)
                .u(n0)
                .u(0)
                .f(alpha)
                .u(flags as usize)
                .u(0)
                .u(1);
            let grid = [
                (nr as u32).div_ceil(tile_n),
                (mr as u32).div_ceil(tile_m),
                1,
            ];
            plan.dispatch(ctx, &kern, &p, &[&o, &x, &w, &b], grid)?;
        }
    }
    plan.add_flops(2.0 * m as f64 * n as f64 * k as f64);
    Ok(())
}

/// dinp (M, K) += dout (M, N) . weight (N, K). See [`matmul_backward_input_ex`].
pub fn matmul_backward_input(
    ctx: &Context,
    plan: &mut Plan,
    dinp: &Tensor,
    dout: &Tensor,
    weight: &Tensor,
) -> Result<()> {
    matmul_backward_input_ex(ctx, plan, dinp, dout, weight, 1.0)
}

/// dinp (M, K) += alpha * dout (M, N) . weight (N, K). Weight rows (the
/// reduction) and token rows are chunked when they exceed a binding.
pub fn matmul_backward_input_ex(
    ctx: &Context,
    plan: &mut Plan,
    dinp: &Tensor,
    dout: &Tensor,
    weight: &Tensor,
    alpha: f32,
) -> Result<()> {
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
    if use_textures(ctx, &[(m, n), (n, k)]) {
        let w = pack(ctx, plan, weight)?;
        return matmul_backward_input_packed(ctx, plan, dinp, dout, &w, alpha);
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
            let p = Params::new()
                .u(mr)
                .u(k)
                .u(nr)
                .u(0)
                .u(n0)
                .u(n)
                .f(alpha)
                .u(1)
                .u(0)
                .u(1);
            let grid = [(k as u32).div_ceil(tile_k), (mr as u32).div_ceil(tile_m), 1];
            plan.dispatch(ctx, &kern, &p, &[&dx, &dy, &w], grid)?;
        }
    }
    plan.add_flops(2.0 * m as f64 * n as f64 * k as f64);
    Ok(())
}

/// The backward_weight variant: its A operand is shared over the subgroup
/// for a whole token, so a narrower column tile wins (measured on lavapipe:
/// 32x4 ~17.7 vs 32x8 ~14.9 GFLOP/s at 1024^3).
pub fn weight_variant(ctx: &Context, aligned: bool) -> Variant {
    let v = pick_variant(ctx, aligned);
    let tuned = std::env::var("WGTUNE_MATMUL_TILE").is_ok();
    if !tuned && v.sg > 1 && v.sg <= 8 {
        Variant { tn: 4, ..v }
    } else {
        v
    }
}

/// Number of token splits for a backward_weight call (1 = no scratch).
pub fn split_count(ctx: &Context, m: usize, n: usize, k: usize) -> usize {
    let v = weight_variant(ctx, true);
    let (tr, tc) = v.tile();
    let tiles = (n as u32).div_ceil(tr) as usize * (k as u32).div_ceil(tc) as usize;
    // Enough workgroups to fill the device, but at least 32 tokens per split.
    let want = 64usize.div_ceil(tiles);
    want.min(m.div_ceil(32)).clamp(1, 64)
}

/// dweight (N, K) += dout (M, N)^T . inp (M, K). See [`matmul_backward_weight_ex`].
pub fn matmul_backward_weight(
    ctx: &Context,
    plan: &mut Plan,
    dweight: &Tensor,
    dout: &Tensor,
    inp: &Tensor,
) -> Result<()> {
    matmul_backward_weight_ex(ctx, plan, dweight, dout, inp, 1.0)
}

/// dweight (N, K) += alpha * dout (M, N)^T . inp (M, K), reduced over the M
/// tokens with a deterministic split-K: each split writes a partial and a
/// second kernel sums them in index order. The scratch is allocated here, at
/// plan-build time.
pub fn matmul_backward_weight_ex(
    ctx: &Context,
    plan: &mut Plan,
    dweight: &Tensor,
    dout: &Tensor,
    inp: &Tensor,
    alpha: f32,
) -> Result<()> {
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
    let v = weight_variant(ctx, k % 4 == 0 && n % 4 == 0);
    let (tile_r, tile_c) = v.tile();
    let splits = split_count(ctx, m, n, k);
    let m_split = m.div_ceil(splits);
    let splits = m.div_ceil(m_split);
    let grid = [
        (k as u32).div_ceil(tile_c),
        (n as u32).div_ceil(tile_r),
        splits as u32,
    ];
    let tex = use_textures(ctx, &[(m, n), (m, k)]);
    let (a, b) = if tex {
        (Some(pack(ctx, plan, dout)?), Some(pack(ctx, plan, inp)?))
    } else {
        (None, None)
    };
    let mut p = Params::new()
        .u(m)
        .u(k)
        .u(n)
        .u(0)
        .u(0)
        .u(n)
        .f(alpha)
        .u(0)
        .u(m_split)
        .u(splits);
    let mut v = v;
    if let (Some(a), Some(b)) = (&a, &b) {
        p = p
            .u(a.layer_shift() as usize)
            .u(b.layer_shift() as usize)
            .u(0);
        v = layered(v, a, b);
    }
    let main = |plan: &mut Plan, target: &Tensor| -> Result<()> {
        match (&a, &b) {
            (Some(a), Some(b)) => plan.dispatch_with(
                ctx,
                &spec(&v, "matmul_backward_weight_tex", &[W, X, X]),
                &p,
                &[Bind::T(target), Bind::X(a), Bind::X(b)],
                grid,
            ),
            _ => plan.dispatch(
                ctx,
                &spec(&v, op, &[W, R, R]),
                &p,
                &[target, dout, inp],
                grid,
            ),
        }
    };
    if splits == 1 {
        main(plan, dweight)?;
    } else {
        let partials = Tensor::zeros(
            ctx,
            &[splits, n, k],
            DType::F32,
            &format!("{}.splitk", dweight.label()),
        )?;
        main(plan, &partials)?;
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

/// Whether every `(rows, cols)` operand can be read from a packed texture.
pub fn use_textures(ctx: &Context, mats: &[(usize, usize)]) -> bool {
    ctx.textures() && mats.iter().all(|&(r, c)| TexMatrix::fits(ctx, r, c))
}

/// Record the packing of `src` (rows, cols) into `dst`. Source rows are read
/// in chunks that fit a storage binding.
pub fn matmul_pack(ctx: &Context, plan: &mut Plan, dst: &TexMatrix, src: &Tensor) -> Result<()> {
    let op = "matmul_pack";
    let [rows, cols] = dims(op, src, "(ROWS, COLS)")?;
    if dst.rows() != rows || dst.cols() != cols {
        return Err(Error::Shape {
            op: op.into(),
            tensor: src.label().into(),
            expected: format!("[{}, {}] like `{}`", dst.rows(), dst.cols(), dst.label()),
            got: src.shape().to_vec(),
        });
    }
    // Rows of whole 256-byte multiples are a plain copy (a memcpy on
    // lavapipe, where textureStore measured ~50 ns per texel).
    if cols % 64 == 0 && src.offset().is_multiple_of(16) {
        let h = 1usize << dst.layer_shift().min(30);
        let mut r0 = 0;
        while r0 < rows {
            let (y, layer) = if dst.layer_shift() >= 31 {
                (r0, 0)
            } else {
                (r0 % h, r0 / h)
            };
            let n = (rows - r0).min(if dst.layer_shift() >= 31 { rows } else { h - y });
            let part = src.view(r0 * cols, &[n, cols], src.label())?;
            plan.copy_to_texture(&part, dst, y as u32, layer as u32)?;
            r0 += n;
        }
        return Ok(());
    }
    let v = pick_variant(ctx, true);
    // Whole vec4 rows need one load per texel instead of four.
    let kern = spec(&v, if cols % 4 == 0 { "matmul_pack4" } else { op }, &[S, R]);
    let rc = chunk_rows(ctx, "matmul_pack source", rows, &[cols], 1)?;
    for r0 in (0..rows).step_by(rc) {
        let rr = rc.min(rows - r0);
        let chunk = src.view(r0 * cols, &[rr, cols], src.label())?;
        let p = Params::new()
            .u(rr)
            .u(cols)
            .u(0)
            .u(0)
            .u(0)
            .u(0)
            .f(1.0)
            .u(0)
            .u(0)
            .u(1)
            .u(dst.layer_shift() as usize)
            .u(0)
            .u(r0);
        let texels = (cols.div_ceil(4) * rr) as u32;
        plan.dispatch_with(
            ctx,
            &kern,
            &p,
            &[Bind::X(dst), Bind::T(&chunk)],
            grid_1d(ctx, texels.div_ceil(64)),
        )?;
    }
    Ok(())
}

/// Allocate a packed copy of `src` and record its packing.
pub fn pack(ctx: &Context, plan: &mut Plan, src: &Tensor) -> Result<TexMatrix> {
    let [rows, cols] = dims("matmul_pack", src, "(ROWS, COLS)")?;
    let t = TexMatrix::new(ctx, rows, cols, &format!("{}.packed", src.label()))?;
    matmul_pack(ctx, plan, &t, src)?;
    Ok(t)
}

/// Up to this many rows the forward uses the untiled `matmul_gemv_tex`
/// (measured on lavapipe, SmolLM2-135M: see README); `WGTUNE_GEMV_ROWS`
/// overrides it.
pub fn gemv_max_rows() -> usize {
    std::env::var("WGTUNE_GEMV_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(GEMV_MAX_ROWS)
}
const GEMV_MAX_ROWS: usize = 16;

/// [`matmul_forward_ex`] with a weight packed once (frozen weights).
#[allow(clippy::too_many_arguments)]
pub fn matmul_forward_packed(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    inp: &Tensor,
    weight: &TexMatrix,
    bias: Option<&Tensor>,
    alpha: f32,
    accumulate: bool,
) -> Result<()> {
    let op = "matmul_forward";
    let [m, k] = dims(op, inp, "(M, K)")?;
    let n = weight.rows();
    if weight.cols() != k {
        return Err(Error::Shape {
            op: op.into(),
            tensor: weight.label().into(),
            expected: format!("[{n}, {k}]"),
            got: vec![weight.rows(), weight.cols()],
        });
    }
    expect_shape(op, out, &[m, n])?;
    if let Some(b) = bias {
        expect_shape(op, b, &[n])?;
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let a = pack(ctx, plan, inp)?;
    let v = layered(pick_variant(ctx, k % 4 == 0), &a, weight);
    let (mut tile_m, mut tile_n) = v.tile();
    let gemv = m <= gemv_max_rows();
    let kern = if gemv {
        (tile_m, tile_n) = (1, 64);
        spec(&v, "matmul_gemv_tex", &[W, X, X, R])
    } else {
        spec(&v, "matmul_forward_tex", &[W, X, X, R])
    };
    let dummy = Tensor::zeros(ctx, &[1], DType::F32, "no_bias")?;
    let b = bias.unwrap_or(&dummy);
    let flags = u32::from(accumulate) | (u32::from(bias.is_some()) << 1);
    let mc = chunk_rows(ctx, "matmul_forward output", m, &[n], 1)?;
    for m0 in (0..m).step_by(mc) {
        let mr = mc.min(m - m0);
        let o = out.view(m0 * n, &[mr, n], out.label())?;
        let p = Params::new()
            .u(mr)
            .u(k)
            .u(n)
            .u(n)
            .u(0)
            .u(0)
            .f(alpha)
            .u(flags as usize)
            .u(0)
            .u(1)
            .u(a.layer_shift() as usize)
            .u(weight.layer_shift() as usize)
            .u(m0);
        let grid = [(n as u32).div_ceil(tile_n), (mr as u32).div_ceil(tile_m), 1];
        plan.dispatch_with(
            ctx,
            &kern,
            &p,
            &[Bind::T(&o), Bind::X(&a), Bind::X(weight), Bind::T(b)],
            grid,
        )?;
    }
    plan.add_flops(2.0 * m as f64 * n as f64 * k as f64);
    Ok(())
}

/// [`matmul_backward_input_ex`] with a weight packed once (frozen weights).
pub fn matmul_backward_input_packed(
    ctx: &Context,
    plan: &mut Plan,
    dinp: &Tensor,
    dout: &Tensor,
    weight: &TexMatrix,
    alpha: f32,
) -> Result<()> {
    let op = "matmul_backward_input";
    let [m, n] = dims(op, dout, "(M, N)")?;
    let k = weight.cols();
    if weight.rows() != n {
        return Err(Error::Shape {
            op: op.into(),
            tensor: weight.label().into(),
            expected: format!("[{n}, {k}]"),
            got: vec![weight.rows(), weight.cols()],
        });
    }
    expect_shape(op, dinp, &[m, k])?;
    if m == 0 || k == 0 {
        return Ok(());
    }
    let a = pack(ctx, plan, dout)?;
    let v = layered(pick_variant(ctx, k.is_multiple_of(4)), &a, weight);
    let (tile_m, tile_k) = v.tile();
    let kern = spec(&v, "matmul_backward_input_tex", &[W, X, X]);
    let mc = chunk_rows(ctx, "matmul_backward_input dinp", m, &[k], 1)?;
    for m0 in (0..m).step_by(mc) {
        let mr = mc.min(m - m0);
        let dx = dinp.view(m0 * k, &[mr, k], dinp.label())?;
        let p = Params::new()
            .u(mr)
            .u(k)
            .u(n)
            .u(0)
            .u(0)
            .u(n)
            .f(alpha)
            .u(1)
            .u(0)
            .u(1)
            .u(a.layer_shift() as usize)
            .u(weight.layer_shift() as usize)
            .u(m0);
        let grid = [(k as u32).div_ceil(tile_k), (mr as u32).div_ceil(tile_m), 1];
        plan.dispatch_with(
            ctx,
            &kern,
            &p,
            &[Bind::T(&dx), Bind::X(&a), Bind::X(weight)],
            grid,
        )?;
    }
    plan.add_flops(2.0 * m as f64 * n as f64 * k as f64);
    Ok(())
}

/// Set the layered flags of `v` from the textures it will read.
fn layered(v: Variant, a: &TexMatrix, b: &TexMatrix) -> Variant {
    Variant {
        a_layered: a.layer_shift() < 31,
        b_layered: b.layer_shift() < 31,
        ..v
    }
}
