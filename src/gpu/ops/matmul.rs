//! Matmul wrappers (`shaders/matmul.wgsl`) and the generator of its unrolled
//! variants.
//!
//! The template's `{{NAME}}` markers get a register tile size, the lane
//! layout and a fully unrolled micro-kernel. The variant is chosen from the
//! adapter's features (a fixed subgroup size enables the broadcast path) and
//! from operand alignment; never from the adapter's name. Two families share
//! the loaders: register tiles for software adapters and workgroup-memory
//! tiles for hardware GPUs ([`Context::matmul_kernel`],
//! docs/hardware-kernels.md).
//!
//! Tensors larger than the storage binding limit are processed in row chunks:
//! `matmul_forward` splits the weight rows (output columns) and the token
//! rows, `matmul_backward_input` splits the weight rows (accumulating) and the
//! token rows. That is what lets a 151936 x 896 LM head run under lavapipe's
//! 128 MiB binding cap.
//!
//! Operands come from storage buffers or packed textures ([`Source`], bound
//! as [`Bind`]). Each layout has one WGSL body and one recording function
//! for every source: the source picks the loaders the micro-kernel calls
//! and how rows are chunked (buffers to the binding limit, textures whole).
//!
//! Length: about 730 lines of code plus tests. The variant generator and
//! the three layouts' recording functions share the chunking and the
//! operand sources; split apart they would need those internals public.

use std::borrow::Cow;
use std::fmt::Write;
use std::sync::Arc;

use super::{dims, expect_shape, grid_1d, uniform, Plan, R, W};
use crate::error::{Error, Result};
use crate::gpu::context::{Context, MatmulKernel};
use crate::gpu::kernels::Access::StorageTexture as S;
use crate::gpu::kernels::Access::Texture as T;
use crate::gpu::kernels::{Access, KernelSpec, Source, SpecSource};
use crate::gpu::plan::Bind;
use crate::gpu::tensor::{DType, Tensor, TexMatrix};

/// `writeln!` into a `String` of generated WGSL.
macro_rules! emit {
    ($dst:expr, $($arg:tt)*) => {
        writeln!($dst, $($arg)*).expect("invariant: writing to a String cannot fail")
    };
}

const TEMPLATE: &str = include_str!("../../../shaders/matmul.wgsl");

uniform! { "matmul" "Params"
    /// `Params` of `shaders/matmul.wgsl` (see there for each field).
    pub struct MatmulParams {
        m: u32, k: u32, n: u32, ld_out: u32, col_off: u32, ld_dout: u32,
        alpha: f32, flags: u32, m_split: u32, splits: u32,
        a_shift: u32, b_shift: u32, a_row0: u32, _p0: u32, _p1: u32, _p2: u32,
    }
}

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
    /// Where the A and B operands are read from.
    pub a_src: Source,
    pub b_src: Source,
    /// Texture sources: the A / B texture is split into layers (taller than
    /// the texture limit), so row coordinates need a shift and a mask.
    pub a_layered: bool,
    pub b_layered: bool,
    /// The tiled (workgroup-memory) family: `tm` x `tn` outputs per
    /// invocation of a 16 x 16 workgroup, no subgroups. Else the register
    /// family.
    pub tiled: bool,
}

impl Variant {
    fn lanes(&self) -> (u32, u32) {
        if self.sg > 1 {
            (self.sg, (64 / self.sg).max(1))
        } else {
            (8, 8)
        }
    }
    /// The entry point of `layout` (`matmul_forward`, `matmul_backward_input`
    /// or `matmul_backward_weight`) in this variant's family.
    pub fn entry(&self, layout: &'static str) -> &'static str {
        match (self.tiled, layout) {
            (true, "matmul_forward") => "matmul_forward_tiled",
            (true, "matmul_backward_input") => "matmul_backward_input_tiled",
            (true, "matmul_backward_weight") => "matmul_backward_weight_tiled",
            _ => layout,
        }
    }
    /// Output rows and columns covered by one workgroup.
    pub fn tile(&self) -> (u32, u32) {
        if self.tiled {
            return (16 * self.tm, 16 * self.tn);
        }
        let (lc, rg) = self.lanes();
        (rg * self.tm, lc * self.tn)
    }
    fn name(&self) -> String {
        format!(
            "matmul_{}{}x{}_sg{}_{}_{}{}{}{}",
            if self.tiled { "w" } else { "t" },
            self.tm,
            self.tn,
            self.sg,
            if self.aligned { "v4" } else { "s" },
            self.a_src.name(),
            self.b_src.name(),
            if self.a_layered { "_la" } else { "" },
            if self.b_layered { "_lb" } else { "" }
        )
    }
}

/// The default variant for this context and alignment (storage operands):
/// the family from [`Context::matmul_kernel`], the tile from the adapter's
/// subgroups (register family) or fixed (tiled family).
pub fn pick_variant(ctx: &Context, aligned: bool) -> Variant {
    let tiled = ctx.matmul_kernel() == MatmulKernel::Tiled;
    let base = |tm: u32, tn: u32, sg: u32| Variant {
        tm,
        tn,
        sg,
        aligned,
        a_src: Source::Storage,
        b_src: Source::Storage,
        a_layered: false,
        b_layered: false,
        tiled,
    };
    // WGTUNE_MATMUL_TILE=TMxTN overrides the tile (for tuning on new
    // hardware); for the tiled family it is the tile of one invocation.
    if let Some((tm, tn)) = std::env::var("WGTUNE_MATMUL_TILE").ok().and_then(|s| {
        let (a, b) = s.split_once('x')?;
        Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?))
    }) {
        let ok = tm % 4 == 0 && tn % 4 == 0 && tm > 0 && tn > 0;
        if tiled && ok && tm <= 8 && tn <= 8 {
            return base(tm, tn, 1);
        }
        if !tiled && ok {
            return base(tm, tn, ctx.subgroup_size().unwrap_or(1));
        }
        log::warn!(
            "WGTUNE_MATMUL_TILE={tm}x{tn} ignored: both must be positive multiples of 4{}",
            if tiled {
                ", at most 8 for the tiled kernels"
            } else {
                ""
            }
        );
    }
    if tiled {
        // 8 x 4 per invocation: a 128 x 64 tile, 12 KiB of workgroup memory,
        // 3 vec4 reads of it per 32 FMAs.
        return base(8, 4, 1);
    }
    match ctx.subgroup_size() {
        // Narrow subgroups are CPU SIMD lanes (lavapipe, WARP): big register
        // tiles pay, since every load is expensive and registers are not.
        Some(sg) if sg <= 8 => base(32, 8, sg),
        Some(sg) => base(8, 8, sg),
        None => base(8, 8, 1),
    }
}

const COMP: [&str; 4] = ["x", "y", "z", "w"];

/// Generate the complete WGSL module of a variant.
pub fn generate(v: &Variant) -> String {
    let (lc, rg) = v.lanes();
    let (tm, tn) = (v.tm as usize, v.tn as usize);
    let sg = v.sg as usize;
    let tv = tn / 4;
    let (a, b) = (v.a_src.tag(), v.b_src.tag());
    // Compact sources are weights only; backward_weight never reads one.
    let bw_b = if v.b_src.access() == Access::TextureUint {
        "st"
    } else {
        b
    };
    let (builtins, setup) = if sg > 1 {
        (
            "@builtin(subgroup_invocation_id) sg_lane: u32, @builtin(subgroup_id) sg_id: u32",
            "let lane = sg_lane;\n    let rg = sg_id;",
        )
    } else {
        ("", "let lane = lid % LC;\n    let rg = lid / LC;")
    };
    let mut s = format!("{}\n{TEMPLATE}", crate::gpu::kernels::COMMON);
    if !v.tiled {
        // Register modules stay as they were: no workgroup memory at all.
        let (b0, e0) = (s.find("// {{TILED_BEGIN}}"), s.find("// {{TILED_END}}"));
        if let (Some(b0), Some(e0)) = (b0, e0) {
            s.replace_range(b0..e0 + "// {{TILED_END}}".len(), "");
        }
    }
    let wide = match v.b_src {
        Source::TexQ4 => Some(32),
        Source::TexQ8 { .. } => Some(16),
        Source::TexBf16 | Source::TexF16 => Some(8),
        _ => None,
    };
    let (qbits, qsub) = v.b_src.quant();
    // Measured on lavapipe (SmolLM2, LoRA step and 40-token prefill): the
    // texel-wide forward pays for 4- and 8-bit weights (32 and 16 columns
    // a texel); for 16-bit ones (8) it was slower as a loop and no faster
    // unrolled, so they keep one fetch per step.
    // A (scale, offset) block must span each texel (true of every block
    // format: QSUB is 16 or 32).
    let quant = matches!(v.b_src, Source::TexQ4 | Source::TexQ8 { .. });
    let fw_wide = wide.filter(|&e| quant && (qsub as usize).is_multiple_of(e));
    // backward_input: a lane's TN columns share one quant texel and block.
    let bi_shared = quant
        && tv > 1
        && wide.is_some_and(|e| e.is_multiple_of(tn))
        && (qsub as usize).is_multiple_of(tn);
    for (tag, (decl, body, store)) in [
        ("FW", gen_nt(tm, tn, sg, a, b, fw_wide)),
        ("BI", gen_nn(tm, tv, sg, a, b, bi_shared)),
        ("BW", gen_tn(tm, tv, sg, a, bw_b)),
    ] {
        s = s
            .replace(&format!("{{{{{tag}_DECL}}}}"), &decl)
            .replace(&format!("{{{{{tag}_BODY}}}}"), &body)
            .replace(&format!("{{{{{tag}_STORE}}}}"), &store);
    }
    for (drop, (a, b)) in [
        (sg <= 1, ("// SUBGROUP_ONLY_BEGIN", "// SUBGROUP_ONLY_END")),
        (wide.is_none(), ("// WIDE_ONLY_BEGIN", "// WIDE_ONLY_END")),
    ] {
        if let (true, Some(i), Some(j)) = (drop, s.find(a), s.find(b)) {
            s.replace_range(i..j + b.len(), "");
        }
    }
    let (decl, body, [fw, bi, bw], stages) = gen_tiled(tm, tn);
    for (marker, stage) in stages {
        s = s.replace(&marker, &stage);
    }
    s = s
        .replace("{{TL_DECL}}", &decl)
        .replace("{{TL_BODY}}", &body)
        .replace("{{TL_FW_STORE}}", &fw)
        .replace("{{TL_BI_STORE}}", &bi)
        .replace("{{TL_BW_STORE}}", &bw);
    s.replace("{{LANE_BUILTINS}}", builtins)
        .replace("{{FW_STEP}}", &fw_wide.unwrap_or(4).to_string())
        .replace("{{SGW}}", &sg.to_string())
        .replace("{{BW_B}}", bw_b)
        .replace("{{A}}", a)
        .replace("{{B}}", b)
        .replace("{{QBITS}}", &qbits.to_string())
        .replace("{{QSUB}}", &qsub.to_string())
        .replace("{{TQ_SHIFT}}", if qbits == 8 { "4" } else { "5" })
        .replace("{{WIDE_E}}", &wide.unwrap_or(4).to_string())
        .replace(
            "{{H16_F16}}",
            if v.b_src == Source::TexF16 {
                "true"
            } else {
                "false"
            },
        )
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
/// `a`, `b`: source tags; row handles are computed once per row.
/// `wide` (quantized B only): its texels hold E > 4 columns, each within
/// one (scale, offset) block: the K loop steps a texel at a time and each column
/// fetches it once, then its E / 4 steps run from registers (an inner loop:
/// unrolled, the quantized modules were slower).
fn gen_nt(
    tm: usize,
    tn: usize,
    sg: usize,
    a: &str,
    b: &str,
    wide: Option<usize>,
) -> (String, String, String) {
    let (mut decl, mut body, mut store) = (String::new(), String::new(), String::new());
    row_clamps(&mut decl, tm, sg, a);
    for j in 0..tn {
        emit!(decl, "    let cb{j} = b_row_{b}(min(col0 + {j}u, nlast));");
    }
    for i in 0..tm {
        for j in 0..tn {
            emit!(decl, "    var c{i}_{j} = 0.0;");
        }
    }
    // One 4-column step at `kk`: A rows, B columns, TM x TN dots.
    let step = |body: &mut String, kk: &str| {
        a_rows(body, tm, sg, |r| format!("fw_a_{a}({r}, {kk})"));
        for j in 0..tn {
            match wide {
                Some(_) => emit!(body, "        let b{j} = fwx_tq(tb{j}, sb{j}, {kk});"),
                None => emit!(body, "        let b{j} = fw_b_{b}(cb{j}, {kk});"),
            }
        }
        for i in 0..tm {
            for j in 0..tn {
                emit!(body, "        c{i}_{j} += dot(a{i}, b{j});");
            }
        }
    };
    match wide {
        Some(e) => {
            for j in 0..tn {
                emit!(body, "        let tb{j} = fwt_tq(cb{j}, k);");
                emit!(body, "        let sb{j} = fws_tq(cb{j}, k);");
            }
            // Block formats make K whole texels; the guard (uniform, as K
            // is) keeps a step past K from reading A out of bounds anyway.
            emit!(body, "        for (var u = 0u; u < {e}u; u += 4u) {{");
            emit!(body, "        let kk = k + u;");
            emit!(body, "        if (kk >= p.k) {{ break; }}");
            step(&mut body, "kk");
            emit!(body, "        }}");
        }
        None => step(&mut body, "k"),
    }
    for i in 0..tm {
        for j in 0..tn {
            emit!(store, "    fw_store(row0 + {i}u, col0 + {j}u, c{i}_{j});");
        }
    }
    (decl, body, store)
}

/// NN micro-kernel (backward_input): vec4 accumulators c_i_v over TV vec4 columns.
fn gen_nn(
    tm: usize,
    tv: usize,
    sg: usize,
    a: &str,
    b: &str,
    tq_shared: bool,
) -> (String, String, String) {
    let (mut decl, mut body, mut store) = (String::new(), String::new(), String::new());
    row_clamps(&mut decl, tm, sg, a);
    for c in 0..tv {
        emit!(decl, "    let cc{c} = col0 + {}u;", 4 * c);
    }
    for i in 0..tm {
        for c in 0..tv {
            emit!(decl, "    var c{i}_{c} = vec4<f32>(0.0);");
        }
    }
    a_rows(&mut body, tm, sg, |r| format!("bi_a_{a}({r}, n)"));
    // B rows change every step: one handle per row and step.
    for u in 0..4 {
        emit!(body, "        let hb{u} = bi_bh_row_{b}(n + {u}u);");
        if (b == "tb" || b == "th") && tv.is_multiple_of(2) {
            // Columns cc{2h}.. start on an 8-element 16-bit texel (TN % 8
            // == 0): one fetch serves two column vec4s.
            for h in 0..tv / 2 {
                let c = 2 * h;
                emit!(body, "        let t{u}_{h} = bi_bh_{b}8(hb{u}, cc{c});");
                emit!(body, "        let b{u}_{c} = h16x4(t{u}_{h}.xy);");
                emit!(body, "        let b{u}_{} = h16x4(t{u}_{h}.zw);", c + 1);
            }
            continue;
        }
        if tq_shared {
            // A lane's TN = 4 TV columns start on a multiple of TN, so they
            // lie in one quant texel and one (scale, offset) block.
            emit!(body, "        let t{u} = bi_bh_tqt(hb{u}, cc0);");
            emit!(body, "        let s{u} = bi_bh_tqs(hb{u}, cc0);");
            for c in 0..tv {
                emit!(
                    body,
                    "        let b{u}_{c} = s{u}.x * quant4(tq_word(t{u}, cc{c})) + s{u}.y;"
                );
            }
            continue;
        }
        for c in 0..tv {
            emit!(body, "        let b{u}_{c} = bi_bh_{b}(hb{u}, cc{c});");
        }
    }
    for i in 0..tm {
        for c in 0..tv {
            emit!(body, "        c{i}_{c} += a{i}.x * b0_{c} + a{i}.y * b1_{c} + a{i}.z * b2_{c} + a{i}.w * b3_{c};");
        }
    }
    for i in 0..tm {
        for c in 0..tv {
            emit!(store, "    bi_store(row0 + {i}u, cc{c}, c{i}_{c});");
        }
    }
    (decl, body, store)
}

/// Token-reduction micro-kernel (backward_weight): A = dout[m, row0..row0+TM]
/// as TM/4 vec4s shared over the subgroup; B = inp[m, cols] as TV vec4s.
fn gen_tn(tm: usize, tv: usize, sg: usize, a: &str, b: &str) -> (String, String, String) {
    let (mut decl, mut body, mut store) = (String::new(), String::new(), String::new());
    // Both operands are read at token m: one handle each per iteration.
    emit!(
        body,
        "        let cma = a_row_{a}(m);\n        let cmb = b_row_{b}(m);"
    );
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
                "        let va{slot} = bw_a_{a}(cma, row0 + 4u * ({}u + lane));",
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
            emit!(body, "        let a{t} = bw_a_{a}(cma, row0 + {}u);", 4 * t);
        }
    }
    for c in 0..tv {
        emit!(body, "        let b{c} = bw_b_{b}(cmb, cc{c});");
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
            emit!(store, "    bw_store(wg.z, row0 + {i}u, cc{c}, c{i}_{c});");
        }
    }
    (decl, body, store)
}

/// The tiled family's micro-kernel (one reduction index `kk` of the
/// workgroup tiles) and its stores for the three layouts. Row slot `s` of
/// an invocation is vec4 `ty + 16 s` of the tile, column slot `v` vec4
/// `tx + 16 v`; accumulators `c{row}_{v}` are vec4s of 4 columns.
#[allow(clippy::type_complexity)]
fn gen_tiled(tm: usize, tn: usize) -> (String, String, [String; 3], Vec<(String, String)>) {
    let (mut decl, mut body) = (String::new(), String::new());
    let mut body_stage = Vec::new();
    let (mut fw, mut bi, mut bw) = (String::new(), String::new(), String::new());
    let tv = tn / 4;
    for s in 0..tm / 4 {
        emit!(decl, "    let tr{s} = row0 + 4u * (ty + {}u);", 16 * s);
    }
    for v in 0..tv {
        emit!(decl, "    let tc{v} = col0 + 4u * (tx + {}u);", 16 * v);
    }
    for i in 0..tm {
        for v in 0..tv {
            emit!(decl, "    var c{i}_{v} = vec4<f32>(0.0);");
        }
    }
    // Unrolled over the BK reduction indices of a K-step.
    for kk in 0..16 {
        emit!(body, "        {{");
        emit!(body, "            let ka = {kk}u * (BM / 4u) + ty;");
        emit!(body, "            let kb = {kk}u * (BN / 4u) + tx;");
        for s in 0..tm / 4 {
            emit!(body, "            let a{s} = tl_a[ka + {}u];", 16 * s);
        }
        for v in 0..tv {
            emit!(body, "            let b{v} = tl_b[kb + {}u];", 16 * v);
        }
        for i in 0..tm {
            for v in 0..tv {
                emit!(
                    body,
                    "            c{i}_{v} = fma(vec4<f32>(a{}.{}), b{v}, c{i}_{v});",
                    i / 4,
                    COMP[i % 4]
                );
            }
        }
        emit!(body, "        }}");
    }
    for i in 0..tm {
        let row = format!("tr{} + {}u", i / 4, i % 4);
        for v in 0..tv {
            for (j, c) in COMP.iter().enumerate() {
                emit!(fw, "    fw_store({row}, tc{v} + {j}u, c{i}_{v}.{c});");
            }
            emit!(bi, "    bi_store({row}, tc{v}, c{i}_{v});");
            emit!(bw, "    bw_store(wg.z, {row}, tc{v}, c{i}_{v});");
        }
    }
    for (x, tag) in [("fw", "FW"), ("bi", "BI"), ("bw", "BW")] {
        let mut stage = String::new();
        for t in 0..tm / 4 {
            emit!(
                stage,
                "        {x}_stage_a(lid + {}u, k0, row0, end);",
                256 * t
            );
        }
        for t in 0..tv {
            emit!(
                stage,
                "        {x}_stage_b(lid + {}u, k0, col0, end);",
                256 * t
            );
        }
        body_stage.push((format!("{{{{TL_STAGE_{tag}}}}}"), stage));
    }
    (decl, body, [fw, bi, bw], body_stage)
}

/// Row handles `ca*` of the A rows of one tile (clamped into range).
fn row_clamps(decl: &mut String, tm: usize, sg: usize, a: &str) {
    if sg > 1 {
        for slot in 0..tm.div_ceil(sg) {
            emit!(
                decl,
                "    let ca{slot} = a_row_{a}(min(row0 + {}u + lane, mlast));",
                slot * sg
            );
        }
    } else {
        for i in 0..tm {
            emit!(decl, "    let ca{i} = a_row_{a}(min(row0 + {i}u, mlast));");
        }
    }
}

/// Load the TM A rows `a0..` from handles `ca*`: directly, or one slot per
/// lane then broadcast.
fn a_rows(body: &mut String, tm: usize, sg: usize, load: impl Fn(String) -> String) {
    if sg > 1 {
        for slot in 0..tm.div_ceil(sg) {
            emit!(
                body,
                "        let va{slot} = {};",
                load(format!("ca{slot}"))
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
            emit!(body, "        let a{i} = {};", load(format!("ca{i}")));
        }
    }
}

/// Every variant the wrappers can pick, for naga validation in tests.
pub fn all_variant_sources() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (tm, tn, sg, tiled) in [
        (32, 8, 8, false),
        (16, 8, 8, false),
        (8, 8, 32, false),
        (8, 8, 16, false),
        (8, 8, 64, false),
        (8, 8, 1, false),
        (16, 8, 4, false),
        (8, 4, 1, true),
        (4, 4, 1, true),
        (8, 8, 1, true),
    ] {
        for aligned in [true, false] {
            for (a_src, b_src, layered) in [
                (Source::Storage, Source::Storage, false),
                (Source::Texture, Source::Texture, false),
                (Source::Texture, Source::Texture, true),
                (Source::Storage, Source::Texture, true),
                (Source::Texture, Source::Storage, true),
                (Source::Texture, Source::TexBf16, true),
                (Source::Texture, Source::TexF16, false),
                (Source::Storage, Source::TexQ4, false),
                (Source::Texture, Source::TexQ8 { sub: 32 }, true),
                (Source::Texture, Source::TexQ8 { sub: 16 }, false),
            ] {
                let v = Variant {
                    tm,
                    tn,
                    sg,
                    aligned,
                    a_src,
                    b_src,
                    a_layered: layered,
                    b_layered: layered,
                    tiled,
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
        source: SpecSource::Generated({
            let v = *v;
            Arc::new(move || Ok(generate(&v)))
        }),
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
    let scalars = (bias, alpha, accumulate);
    matmul_forward_op(ctx, plan, out, inp, Bind::T(weight), scalars)
}

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
    let scalars = (bias, alpha, accumulate);
    matmul_forward_op(ctx, plan, out, inp, Bind::X(weight), scalars)
}

/// The forward for a weight from either source: shape checks, then the
/// operand sources ([`Operands`]), then [`forward`].
fn matmul_forward_op(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    inp: &Tensor,
    weight: Bind,
    (bias, alpha, accumulate): (Option<&Tensor>, f32, bool),
) -> Result<()> {
    let fw = Forward {
        bias,
        alpha,
        accumulate,
    };
    let op = "matmul_forward";
    let [m, k] = dims(op, inp, "(M, K)")?;
    let n = match weight {
        Bind::T(w) => {
            let [n, k2] = dims(op, w, "(N, K)")?;
            if k2 != k {
                expect_shape(op, w, &[n, k])?;
            }
            n
        }
        Bind::X(w) | Bind::S(w) if w.cols() != k => {
            return Err(packed_shape_error(op, w, w.rows(), k))
        }
        Bind::X(w) | Bind::S(w) => w.rows(),
    };
    expect_shape(op, out, &[m, n])?;
    if let Some(b) = fw.bias {
        expect_shape(op, b, &[n])?;
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let fits = use_textures(ctx, &[(m, k), (n, k)]);
    let ops = Operands::new(ctx, plan, inp, weight, fits)?;
    let (a, b) = ops.binds();
    forward(ctx, plan, out, a, b, fw, [m, n, k])
}

/// The A operand and weight of a forward or backward_input, with their
/// sources chosen: a buffer weight is packed (then A) when both fit
/// textures (`fits`); a packed weight gets a packed A when A fits one.
struct Operands<'a> {
    a: &'a Tensor,
    weight: Bind<'a>,
    packed_a: Option<Arc<TexMatrix>>,
    packed_w: Option<Arc<TexMatrix>>,
}

impl<'a> Operands<'a> {
    fn new(
        ctx: &Context,
        plan: &mut Plan,
        a: &'a Tensor,
        weight: Bind<'a>,
        fits: bool,
    ) -> Result<Self> {
        let packed_w = match weight {
            Bind::T(w) if fits => Some(pack_scratch(ctx, plan, w, 1)?),
            _ => None,
        };
        // An A too wide for a texture row (dlogits of a 151,936-token
        // vocabulary) stays in its buffer: the mixed variant reads it there.
        let a_fits = match a.shape() {
            &[rows, cols] => use_textures(ctx, &[(rows, cols)]),
            _ => false,
        };
        let packed_a = if a_fits && (packed_w.is_some() || weight.source().is_texture()) {
            Some(pack_scratch(ctx, plan, a, 0)?)
        } else {
            None
        };
        Ok(Operands {
            a,
            weight,
            packed_a,
            packed_w,
        })
    }
    fn binds(&self) -> (Bind<'_>, Bind<'_>) {
        let a = self.packed_a.as_deref().map_or(Bind::T(self.a), Bind::X);
        let w = self.packed_w.as_deref().map_or(self.weight, Bind::X);
        (a, w)
    }
}

/// A packed weight that is not (`n`, `k`).
fn packed_shape_error(op: &str, weight: &TexMatrix, n: usize, k: usize) -> Error {
    Error::Shape {
        op: op.into(),
        tensor: weight.label().into(),
        expected: format!("[{n}, {k}]"),
        got: vec![weight.rows(), weight.cols()],
    }
}

/// The scalars of a forward.
struct Forward<'a> {
    bias: Option<&'a Tensor>,
    alpha: f32,
    accumulate: bool,
}

/// Rows `r0..r0 + n` of a `width`-column operand: a storage operand is
/// narrowed to a view, a texture is bound whole and the kernel offsets its
/// rows by `a_row0`.
enum Rows<'a> {
    View(Tensor),
    Tex(&'a TexMatrix, usize),
}

impl<'a> Rows<'a> {
    fn of(x: Bind<'a>, r0: usize, n: usize, width: usize) -> Result<Rows<'a>> {
        Ok(match x {
            Bind::T(t) => Rows::View(t.view(r0 * width, &[n, width], t.label())?),
            Bind::X(t) | Bind::S(t) => Rows::Tex(t, r0),
        })
    }
    fn bind(&self) -> Bind<'_> {
        match self {
            Rows::View(t) => Bind::T(t),
            Rows::Tex(t, _) => Bind::X(t),
        }
    }
    /// The kernel's `a_row0`.
    fn row0(&self) -> u32 {
        match self {
            Rows::View(_) => 0,
            Rows::Tex(_, r0) => *r0 as u32,
        }
    }
}

/// Log2 rows per layer of a texture operand (unused for storage).
fn shift(x: Bind) -> u32 {
    match x {
        Bind::T(_) => 0,
        Bind::X(t) | Bind::S(t) => t.layer_shift(),
    }
}

/// `v` with its register tile's rows halved while a workgroup still covers
/// `m` rows (not below the subgroup width or 4). A prompt of 41 tokens in
/// a 256-row workgroup (32 x 8 tiles on lavapipe) computed 215 rows of
/// padding; with 8-row tiles the workgroup is 64 rows, and the smaller
/// unrolled kernel also compiles faster the first time. backward_input
/// fits too: the LM head's gradient over 80 or 128 target rows ran at 15
/// and 21 GFLOP/s, fitted at 18 and 35 (lavapipe).
fn fit_rows(v: Variant, m: usize) -> Variant {
    if v.tiled {
        return v;
    }
    let (_, rg) = v.lanes();
    let mut tm = v.tm;
    while tm / 2 >= v.sg.max(4) && tm.is_multiple_of(8) && (rg * tm / 2) as usize >= m {
        tm /= 2;
    }
    Variant { tm, ..v }
}

/// `v` reading `a` and `b` from their sources.
fn with_sources(v: Variant, a: Bind, b: Bind) -> Variant {
    let layered = |x: Bind| matches!(x, Bind::X(t) | Bind::S(t) if t.layer_shift() < 31);
    Variant {
        a_src: a.source(),
        b_src: b.source(),
        a_layered: layered(a),
        b_layered: layered(b),
        ..v
    }
}

/// Rows per chunk of an operand: storage operands (rows of `width`) are
/// chunked to fit a binding, textures are bound whole.
fn operand_chunk(
    ctx: &Context,
    what: &str,
    x: Bind,
    rows: usize,
    widths: &[usize],
    multiple: usize,
) -> Result<usize> {
    match x {
        Bind::T(_) => chunk_rows(ctx, what, rows, widths, multiple),
        Bind::X(_) | Bind::S(_) => Ok(rows),
    }
}

/// out (M, N) (+)= alpha * a (M, K) . b (N, K)^T + bias, from any sources
/// (shapes checked).
fn forward(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    a: Bind,
    b: Bind,
    fw: Forward,
    [m, n, k]: [usize; 3],
) -> Result<()> {
    let v = fit_rows(with_sources(pick_variant(ctx, k % 4 == 0), a, b), m);
    let (mut tile_m, mut tile_n) = v.tile();
    let both_tex = a.source().is_texture() && b.source().is_texture();
    let mut gemv = None;
    let entry = if both_tex && m <= gemv_max_rows() && v.sg > 1 && gemv_split() {
        // 64 / SG subgroups of 4 outputs each.
        (tile_m, tile_n) = (1, 4 * 64 / v.sg);
        match b.source() {
            Source::TexQ4 | Source::TexQ8 { .. } | Source::TexBf16 | Source::TexF16 => {
                let g = gemv_wide_shape(ctx, b.source(), k, v.sg);
                gemv = Some(g);
                tile_n = g.rows_per_workgroup;
                "matmul_gemv_wide"
            }
            _ => "matmul_gemv_split",
        }
    } else if both_tex && m <= gemv_max_rows() {
        (tile_m, tile_n) = (1, 64);
        "matmul_gemv_tex"
    } else {
        v.entry("matmul_forward")
    };
    let register = entry == "matmul_forward";
    let mut layout = vec![W, a.source().access(), b.source().access(), R];
    if b.source().has_scales() {
        layout.push(T);
    }
    let mut kern = spec(&v, entry, &layout);
    if let Some(g) = gemv {
        kern.constants = vec![
            ("GEMV_LPR", g.lanes_per_set as f64),
            ("GEMV_WG", g.workgroup as f64),
        ];
    }
    let dummy;
    let bias_t = match fw.bias {
        Some(b) => b,
        None => {
            dummy = Tensor::zeros(ctx, &[1], DType::F32, "no_bias")?;
            &dummy
        }
    };
    // Weight row chunks: whole rows of W, a multiple of 64 so that the bias
    // view stays 256-byte aligned.
    let nc = operand_chunk(ctx, "matmul_forward weight", b, n, &[k], 64)?;
    // Token chunks must fit the input rows (when in a buffer) and the
    // full-width output rows.
    let mc = match a {
        Bind::T(_) => chunk_rows(ctx, "matmul_forward input", m, &[k, n], 1)?,
        _ => chunk_rows(ctx, "matmul_forward output", m, &[n], 1)?,
    };
    let flags = u32::from(fw.accumulate) | (u32::from(fw.bias.is_some()) << 1);
    for m0 in (0..m).step_by(mc) {
        let mr = mc.min(m - m0);
        let x = Rows::of(a, m0, mr, k)?;
        let o = out.view(m0 * n, &[mr, n], out.label())?;
        for n0 in (0..n).step_by(nc) {
            let nr = nc.min(n - n0);
            let w = Rows::of(b, n0, nr, k)?;
            let bv = if fw.bias.is_some() {
                bias_t.view(n0, &[nr], bias_t.label())?
            } else {
                bias_t.clone()
            };
            let p = MatmulParams {
                m: mr as u32,
                k: k as u32,
                n: nr as u32,
                ld_out: n as u32,
                col_off: n0 as u32,
                alpha: fw.alpha,
                flags,
                splits: 1,
                a_shift: shift(a),
                b_shift: shift(b),
                a_row0: x.row0(),
                ..Default::default()
            };
            let grid = grid_of(
                register,
                (nr as u32).div_ceil(tile_n),
                (mr as u32).div_ceil(tile_m),
                1,
            );
            let mut binds = vec![Bind::T(&o), x.bind(), w.bind(), Bind::T(&bv)];
            binds.extend(scales(b));
            plan.dispatch_with(ctx, &kern, &p, &binds, grid)?;
        }
    }
    plan.add_flops("matmul", 2.0 * m as f64 * n as f64 * k as f64);
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
    matmul_backward_input_op(ctx, plan, dinp, dout, Bind::T(weight), alpha)
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
    matmul_backward_input_op(ctx, plan, dinp, dout, Bind::X(weight), alpha)
}

/// The backward_input for a weight from either source, as
/// [`matmul_forward_op`]: checks, operand sources, then [`backward_input`].
fn matmul_backward_input_op(
    ctx: &Context,
    plan: &mut Plan,
    dinp: &Tensor,
    dout: &Tensor,
    weight: Bind,
    alpha: f32,
) -> Result<()> {
    let op = "matmul_backward_input";
    let [m, n] = dims(op, dout, "(M, N)")?;
    let k = match weight {
        Bind::T(w) => {
            let [n2, k] = dims(op, w, "(N, K)")?;
            if n2 != n {
                expect_shape(op, w, &[n, k])?;
            }
            k
        }
        Bind::X(w) | Bind::S(w) if w.rows() != n => {
            return Err(packed_shape_error(op, w, n, w.cols()))
        }
        Bind::X(w) | Bind::S(w) => w.cols(),
    };
    expect_shape(op, dinp, &[m, k])?;
    if m == 0 || k == 0 {
        return Ok(());
    }
    let fits = use_textures(ctx, &[(m, n), (n, k)]);
    let ops = Operands::new(ctx, plan, dout, weight, fits)?;
    let (a, b) = ops.binds();
    backward_input(ctx, plan, dinp, a, b, alpha, [m, n, k])
}

/// Weight rows per backward_input dispatch of the register family. The
/// LM head's reduction over 49,152 rows streamed every operand row from
/// memory once per tile; in 1,024-row steps (each accumulating into dinp)
/// the step's rows stay in the CPU's cache. Measured on lavapipe at
/// 512 x 49,152 -> 576: 22.5 -> 46.7 GFLOP/s (2,048 rows: 42.9; 512: 42.4),
/// and at 2,048 tokens 23.1 -> 53.2.
const REDUCE_CHUNK_ROWS: usize = 1024;

/// dinp (M, K) += alpha * a (M, N) . b (N, K), from any sources (shapes checked).
fn backward_input(
    ctx: &Context,
    plan: &mut Plan,
    dinp: &Tensor,
    a: Bind,
    b: Bind,
    alpha: f32,
    [m, n, k]: [usize; 3],
) -> Result<()> {
    let op = "matmul_backward_input";
    // Buffer rows of dout (N wide) must start on a vec4.
    let aligned = k % 4 == 0 && (a.source() != Source::Storage || n % 4 == 0);
    let v = with_sources(pick_variant(ctx, aligned), a, b);
    let v = fit_rows(v, m);
    let (tile_m, tile_k) = v.tile();
    let mut layout = vec![W, a.source().access(), b.source().access()];
    if b.source().has_scales() {
        layout.push(T);
    }
    let kern = spec(&v, v.entry(op), &layout);
    let mut nc = operand_chunk(ctx, "matmul_backward_input weight", b, n, &[k], 4)?;
    if !v.tiled {
        nc = nc.min(REDUCE_CHUNK_ROWS);
    }
    let mc = match a {
        Bind::T(_) => chunk_rows(ctx, "matmul_backward_input dout", m, &[k, n], 1)?,
        _ => chunk_rows(ctx, "matmul_backward_input dinp", m, &[k], 1)?,
    };
    for m0 in (0..m).step_by(mc) {
        let mr = mc.min(m - m0);
        let dx = dinp.view(m0 * k, &[mr, k], dinp.label())?;
        let dy = Rows::of(a, m0, mr, n)?;
        for n0 in (0..n).step_by(nc) {
            let nr = nc.min(n - n0);
            let w = Rows::of(b, n0, nr, k)?;
            let p = MatmulParams {
                m: mr as u32,
                k: k as u32,
                n: nr as u32,
                col_off: n0 as u32,
                ld_dout: n as u32,
                alpha,
                flags: 1,
                splits: 1,
                a_shift: shift(a),
                b_shift: shift(b),
                a_row0: dy.row0(),
                ..Default::default()
            };
            let grid = grid_of(
                !v.tiled,
                (k as u32).div_ceil(tile_k),
                (mr as u32).div_ceil(tile_m),
                1,
            );
            let mut binds = vec![Bind::T(&dx), dy.bind(), w.bind()];
            binds.extend(scales(b));
            plan.dispatch_with(ctx, &kern, &p, &binds, grid)?;
        }
    }
    plan.add_flops("matmul", 2.0 * m as f64 * n as f64 * k as f64);
    Ok(())
}

/// The backward_weight variant: its A operand is shared over the subgroup
/// for a whole token, so a narrower column tile wins (measured on lavapipe:
/// 32x4 ~17.7 vs 32x8 ~14.9 GFLOP/s at 1024^3).
pub fn weight_variant(ctx: &Context, aligned: bool) -> Variant {
    let v = pick_variant(ctx, aligned);
    let tuned = std::env::var("WGTUNE_MATMUL_TILE").is_ok();
    if !tuned && !v.tiled && v.sg > 1 && v.sg <= 8 {
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
    let grid = grid_of(
        !v.tiled,
        (k as u32).div_ceil(tile_c),
        (n as u32).div_ceil(tile_r),
        splits as u32,
    );
    let packed = if use_textures(ctx, &[(m, n), (m, k)]) {
        Some((
            pack_scratch(ctx, plan, dout, 0)?,
            pack_scratch(ctx, plan, inp, 1)?,
        ))
    } else {
        None
    };
    let (a, b) = match &packed {
        Some((a, b)) => (Bind::X(a), Bind::X(b)),
        None => (Bind::T(dout), Bind::T(inp)),
    };
    let v = with_sources(v, a, b);
    let p = MatmulParams {
        m: m as u32,
        k: k as u32,
        n: n as u32,
        ld_dout: n as u32,
        alpha,
        m_split: m_split as u32,
        splits: splits as u32,
        a_shift: shift(a),
        b_shift: shift(b),
        ..Default::default()
    };
    let kern = spec(
        &v,
        v.entry(op),
        &[W, a.source().access(), b.source().access()],
    );
    if splits == 1 {
        plan.dispatch_with(ctx, &kern, &p, &[Bind::T(dweight), a, b], grid)?;
    } else {
        let partials = Tensor::zeros(
            ctx,
            &[splits, n, k],
            DType::F32,
            &format!("{}.splitk", dweight.label()),
        )?;
        plan.dispatch_with(ctx, &kern, &p, &[Bind::T(&partials), a, b], grid)?;
        let total = (n * k) as u32;
        plan.dispatch(
            ctx,
            &spec(&v, "matmul_backward_weight_reduce", &[W, R]),
            &p,
            &[dweight, &partials],
            grid_1d(ctx, total.div_ceil(64)),
        )?;
    }
    plan.add_flops("matmul", 2.0 * m as f64 * n as f64 * k as f64);
    Ok(())
}

/// The extra (scale, offset) binding of a block-quantized weight.
fn scales(b: Bind) -> Option<Bind> {
    match b {
        Bind::X(t) if b.source().has_scales() => Some(Bind::S(t)),
        _ => None,
    }
}

/// out (B, row_offset + T, C): rows `row_offset..` of each batch get the
/// `table` (V, C) rows of `ids` (B, T) i32 times `scale` (zero for ids
/// outside 0..V): the embedding lookup over a packed table of any format.
pub fn matmul_gather(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    ids: &Tensor,
    table: &TexMatrix,
    row_offset: usize,
    scale: f32,
) -> Result<()> {
    let op = "matmul_gather";
    let [b, t] = dims(op, ids, "(B, T)")?;
    let (v, c) = (table.rows(), table.cols());
    expect_shape(op, out, &[b, row_offset + t, c])?;
    if b * t == 0 {
        return Ok(());
    }
    let x = Bind::X(table);
    let v_ = with_sources(pick_variant(ctx, c % 4 == 0), Bind::T(ids), x);
    let mut layout = vec![W, R, x.source().access(), R];
    if x.source().has_scales() {
        layout.push(T);
    }
    let kern = spec(&v_, op, &layout);
    let p = MatmulParams {
        m: (b * t) as u32,
        k: c as u32,
        n: t as u32,
        ld_out: (row_offset + t) as u32,
        col_off: row_offset as u32,
        b_shift: table.layer_shift(),
        a_row0: v as u32,
        alpha: scale,
        splits: 1,
        ..Default::default()
    };
    let dummy = Tensor::zeros(ctx, &[1], DType::F32, "no_bias")?;
    let mut binds = vec![Bind::T(out), Bind::T(ids), x, Bind::T(&dummy)];
    binds.extend(scales(x));
    let invocations = (b * t * c.div_ceil(4)) as u32;
    plan.dispatch_with(
        ctx,
        &kern,
        &p,
        &binds,
        grid_1d(ctx, invocations.div_ceil(64)),
    )
}

/// Whether every `(rows, cols)` operand can be read from a packed texture.
pub fn use_textures(ctx: &Context, mats: &[(usize, usize)]) -> bool {
    ctx.textures() && mats.iter().all(|&(r, c)| TexMatrix::fits(ctx, r, c))
}

/// Record the packing of `src` (rows, cols) into the first rows of `dst`.
/// Source rows are read in chunks that fit a storage binding.
pub fn matmul_pack(ctx: &Context, plan: &mut Plan, dst: &TexMatrix, src: &Tensor) -> Result<()> {
    if plan.holds_pack(dst, src) {
        return Ok(());
    }
    pack_rows(ctx, plan, dst, src)?;
    plan.note_pack(dst, src);
    Ok(())
}

fn pack_rows(ctx: &Context, plan: &mut Plan, dst: &TexMatrix, src: &Tensor) -> Result<()> {
    let op = "matmul_pack";
    let [rows, cols] = dims(op, src, "(ROWS, COLS)")?;
    // A scratch texture may have more rows than this operand: the first
    // `rows` are written and read.
    if dst.rows() < rows || dst.cols() != cols {
        return Err(Error::Shape {
            op: op.into(),
            tensor: src.label().into(),
            expected: format!("[<= {}, {}] like `{}`", dst.rows(), dst.cols(), dst.label()),
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
        let p = MatmulParams {
            m: rr as u32,
            k: cols as u32,
            alpha: 1.0,
            splits: 1,
            a_shift: dst.layer_shift(),
            a_row0: r0 as u32,
            ..Default::default()
        };
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

/// Record the packing of `src` (rows, cols) into the context's shared scratch
/// texture of its width and `slot` ([`Context::scratch_texture`]).
pub fn pack_scratch(
    ctx: &Context,
    plan: &mut Plan,
    src: &Tensor,
    slot: usize,
) -> Result<Arc<TexMatrix>> {
    let [rows, cols] = dims("matmul_pack", src, "(ROWS, COLS)")?;
    let t = ctx.scratch_texture(rows, cols, slot)?;
    matmul_pack(ctx, plan, &t, src)?;
    Ok(t)
}

/// Allocate a packed copy of `src` and record its packing.
pub fn pack(ctx: &Context, plan: &mut Plan, src: &Tensor) -> Result<TexMatrix> {
    let [rows, cols] = dims("matmul_pack", src, "(ROWS, COLS)")?;
    let t = TexMatrix::new(ctx, rows, cols, &format!("{}.packed", src.label()))?;
    matmul_pack(ctx, plan, &t, src)?;
    Ok(t)
}

/// How `matmul_gemv_wide` splits a one-row forward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemvShape {
    /// Lanes that share a set of 8 weight rows (splitting its reduction).
    pub lanes_per_set: u32,
    /// Invocations per workgroup.
    pub workgroup: u32,
    /// Weight rows (outputs) per workgroup.
    pub rows_per_workgroup: u32,
}

/// The split of a one-row forward over wide texels (E weights each) of a
/// weight with `k` columns, 64 invocations per workgroup. Hardware GPUs keep a
/// whole subgroup per 8 rows. On a CPU adapter a lane step costs the same
/// whether or not the lane has a texel left, so a set gets the largest
/// power of two of lanes that wastes the fewest steps (K = 576 in Q4 is 18
/// texels: 2 lanes of 9 steps, where 8 lanes took 3 steps for 2.25).
/// Measured on lavapipe: a 576 x 1536 Q4 forward 242 -> 173 us, the Q4 LM
/// head 576 x 49152 6.4 -> 4.2 ms. `ContextOptions::gemv_lanes` (or
/// `WGTUNE_GEMV_LPR`) forces the lanes per set, clamped to the subgroup.
pub fn gemv_wide_shape(ctx: &Context, b: Source, k: usize, sg: u32) -> GemvShape {
    let e = match b {
        Source::TexQ4 => 32,
        Source::TexQ8 { .. } => 16,
        _ => 8,
    };
    let texels = k.div_ceil(e).max(1);
    let steps = |l: u32| texels.div_ceil(l as usize) * l as usize;
    let lanes = match ctx.gemv_lanes() {
        Some(l) => l.clamp(1, sg).next_power_of_two().min(sg),
        None if !ctx.is_software() => sg,
        // Largest lanes per set among the fewest lane steps.
        None => (0..=sg.trailing_zeros())
            .map(|i| sg >> i)
            .fold(sg, |best, l| if steps(l) < steps(best) { l } else { best }),
    };
    let per_wg = (64 / sg).max(1);
    GemvShape {
        lanes_per_set: lanes,
        workgroup: per_wg * sg,
        rows_per_workgroup: per_wg * 8 * sg / lanes,
    }
}

/// The grid of `cols` x `rows` workgroup tiles (x `splits`). The register
/// family takes row tiles from `workgroup_id.x`, so that they come first:
/// llvmpipe hands each thread one contiguous run of a dispatch's
/// workgroups, and a last row tile of few rows (M = 257: one row of 256)
/// then spreads over the threads instead of leaving one thread all the full
/// tiles (M = 257 took as long as M = 512).
fn grid_of(register: bool, cols: u32, rows: u32, splits: u32) -> [u32; 3] {
    if register {
        [rows, cols, splits]
    } else {
        [cols, rows, splits]
    }
}

/// Up to this many rows the forward uses the untiled GEMV;
/// `WGTUNE_GEMV_ROWS` overrides it. Once the register tile's idle row groups
/// returned early, the register kernel won from 2 rows on lavapipe
/// (576 -> 1536 at 2 rows: 0.82 ms against the GEMV's 1.04; 1 row: 0.84
/// against 0.56).
pub fn gemv_max_rows() -> usize {
    std::env::var("WGTUNE_GEMV_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(GEMV_MAX_ROWS)
}
const GEMV_MAX_ROWS: usize = 1;

/// Whether few-row forwards split each output's reduction over a subgroup
/// (`matmul_gemv_split`); `WGTUNE_GEMV_SPLIT=0` keeps one output per
/// invocation (`matmul_gemv_tex`), for comparison.
fn gemv_split() -> bool {
    std::env::var("WGTUNE_GEMV_SPLIT").map_or(true, |v| v != "0")
}
