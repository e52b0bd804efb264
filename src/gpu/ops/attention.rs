//! Causal GQA attention with an optional learned K/V prefix
//! (`shaders/attention.wgsl`).
//!
//! Shapes: q, out (B, T, NH, HD); k, v (B, S, KVH, HD) with S = P + T, the
//! prefix length P being `S - T`; lse (B, NH, T). NH % KVH == 0,
//! HD % 4 == 0 and HD <= 256. The score scale and an optional sliding
//! window come in an [`AttnMask`].
//!
//! Kernel configuration ([`AttnConfig`], see the shader header):
//! - When the context allows textures (`Context::textures`), the streamed
//!   operands (k, v; q, dout for dkv) are packed into textures in the same
//!   plan (`matmul::pack`) and the kernels are built for the texture source
//!   (one body per kernel, see the shader header): on lavapipe a texture
//!   fetch is a SIMD gather, a storage load a per-lane loop.
//! - When the context has subgroups of a fixed size, the kernels are built
//!   from the same source with `lane_get` turned into `subgroupShuffle`, so
//!   a subgroup shares the rows it streams. Otherwise the portable build
//!   (`lanes = 1`) is used.
//! - On software adapters reading storage buffers, each invocation owns
//!   several rows, so every lane-looped load feeds all of them (see
//!   [`AttnConfig::for_context`] for the measurements).

use std::borrow::Cow;
use std::sync::Arc;

use super::{dims, expect_shape, grid_1d, matmul, uniform, Plan, R, W};
use crate::error::{Error, Result};
use crate::gpu::context::Context;
use crate::gpu::kernels::{Access, KernelSpec, Source, SpecSource};
use crate::gpu::plan::Bind;
use crate::gpu::tensor::{DType, Tensor, TexMatrix};

/// Largest head dim supported (Gemma 3's 256). Head dims over 128 get a
/// shader build with larger register rows (`MAXC`).
pub const MAX_HEAD_DIM: usize = 256;

/// The shader's register row capacity line and its default (HD <= 128).
const MAXC_LINE: &str = "const MAXC: u32 = 32u;";
const MAXC_DEFAULT: usize = 32;

/// Score scale and sliding window of an attention (the twin of
/// `cpu::attention::Mask`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnMask {
    pub scale: f32,
    /// Keys within this many positions of the query (`None`: all earlier).
    pub window: Option<usize>,
}

impl AttnMask {
    /// Plain causal attention scaled by 1/sqrt(HD).
    pub fn causal(hd: usize) -> AttnMask {
        AttnMask {
            scale: 1.0 / (hd as f32).sqrt(),
            window: None,
        }
    }
}

const TEMPLATE: &str = include_str!("../../../shaders/attention.wgsl");

/// The plain build's row-start bodies and flag, and their segmented
/// (packed rows) replacements: each kernel reads its own binding.
const SEG_SWAPS: [(&str, &str); 4] = [
    (
        "const SEG: bool = false; // SEG_BUILD",
        "const SEG: bool = true;",
    ),
    (
        "return 0u; // FW_SEG",
        "return fw_seg[b * p.t + min(t, p.t - 1u)];",
    ),
    (
        "return 0u; // DQ_SEG",
        "return dq_seg[b * p.t + min(t, p.t - 1u)];",
    ),
    (
        "return 0u; // KV_SEG",
        "return kv_seg[b * p.t + min(t, p.t - 1u)];",
    ),
];

/// The portable `lane_get` body and its subgroup replacement.
const LANE_PORTABLE: &str = "return v; // LANE_GET";
const LANE_SUBGROUP: &str = "return subgroupShuffle(v, src);";

/// Attention dimensions, read off the tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub kvh: usize,
    pub hd: usize,
    /// Prefix rows in front of every batch's keys.
    pub p: usize,
}

impl AttnDims {
    /// Key rows S = P + T.
    pub fn s(&self) -> usize {
        self.p + self.t
    }
    /// (query, key) pairs the causal mask keeps (an upper bound with a
    /// window).
    fn pairs(&self) -> f64 {
        (self.b * self.nh) as f64 * (self.t * self.p + self.t * (self.t + 1) / 2) as f64
    }
    /// Vec4s per register row the shader build needs.
    fn maxc(&self) -> usize {
        (self.hd / 4).max(MAXC_DEFAULT)
    }
}

/// Read and check (B, T, NH, HD) from q and (B, S, KVH, HD) from k and v.
fn attn_dims(op: &str, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<AttnDims> {
    let [b, t, nh, hd] = dims(op, q, "(B, T, NH, HD)")?;
    let [kb, s, kvh, khd] = dims(op, k, "(B, S, KVH, HD)")?;
    let shape_err = |tensor: &Tensor, expected: String| Error::Shape {
        op: op.to_string(),
        tensor: tensor.label().to_string(),
        expected,
        got: tensor.shape().to_vec(),
    };
    if hd % 4 != 0 || hd == 0 || hd > MAX_HEAD_DIM {
        return Err(shape_err(
            q,
            format!("(B, T, NH, HD) with HD a multiple of 4 in 4..={MAX_HEAD_DIM}"),
        ));
    }
    if kb != b || khd != hd || s < t || kvh == 0 || nh % kvh != 0 {
        return Err(shape_err(
            k,
            format!("(B={b}, S>={t}, KVH, HD={hd}) with KVH dividing NH={nh}"),
        ));
    }
    expect_shape(op, v, &[b, s, kvh, hd])?;
    Ok(AttnDims {
        b,
        t,
        nh,
        kvh,
        hd,
        p: s - t,
    })
}

/// How the kernels lay rows on invocations (see the shader header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnConfig {
    /// Read the streamed operands from packed textures (falls back to
    /// storage buffers when a matrix does not fit the texture limits).
    pub textures: bool,
    /// Lanes per row group: the fixed subgroup size (subgroup build) or 1
    /// (portable build).
    pub lanes: u32,
    /// Query rows each forward invocation owns: 1, 2 or 4.
    pub fwd_rows: u32,
    /// Query rows each dq invocation owns: 1, 2 or 4.
    pub dq_rows: u32,
    /// Key rows each dkv invocation owns: 1, 2 or 4.
    pub dkv_rows: u32,
}

impl AttnConfig {
    /// The configuration for `ctx` and these dims.
    ///
    /// Rows per invocation (measured on lavapipe, 2 cores, at B=4, T=128,
    /// NH=9, KVH=3, HD=64; JIT = cold Mesa shader cache, once per machine):
    /// - textures: one row. Four are within 5-10% (forward 8.3 vs 8.7 ms,
    ///   backward 29.5 vs 30 ms) but multiply the JIT time (dkv 27 s vs 1.5 s).
    /// - storage buffers on a software adapter (textures off): every streamed
    ///   load is a per-lane loop, so forward takes 4 rows (24 -> 12.6 ms) and
    ///   the backward kernels 2 (dq 29 -> 19.7 ms, dkv 29 -> 22.5 ms; 4 rows
    ///   gain 10-20% more for 20 s of dkv JIT). Never more rows than one
    ///   head's rows fill.
    /// - GPUs: one row; several rows of HD floats would spill registers.
    pub fn for_context(ctx: &Context, d: &AttnDims) -> AttnConfig {
        let lanes = ctx.subgroup_size().unwrap_or(1);
        let textures = ctx.textures();
        let (fwd_max, bwd_max) = if ctx.is_software() && !textures {
            (4, 2)
        } else {
            (1, 1)
        };
        let rows = |n: usize, max: u32| -> u32 {
            [4, 2, 1]
                .into_iter()
                .find(|&r| r <= max && n >= (r * lanes) as usize)
                .unwrap_or(1)
        };
        AttnConfig {
            textures,
            lanes,
            fwd_rows: rows(d.t, fwd_max),
            dq_rows: rows(d.t, bwd_max),
            dkv_rows: rows(d.s(), bwd_max),
        }
    }

    fn check(&self, op: &str) -> Result<()> {
        let ok_rows = |r: u32| matches!(r, 1 | 2 | 4);
        let ok = self.lanes.is_power_of_two()
            && self.lanes <= 128
            && ok_rows(self.fwd_rows)
            && ok_rows(self.dq_rows)
            && ok_rows(self.dkv_rows);
        if !ok {
            return Err(Error::invalid(
                op,
                format!("unsupported kernel configuration {self:?}"),
            ));
        }
        Ok(())
    }
}

/// Threads per workgroup for `invocations` threads in groups of `sg`: 64,
/// halved (down to 16, and never below `sg`) while a software adapter, whose
/// thread pool hands out whole workgroups, would get fewer than 4 per CPU
/// thread (dkv at B=4, KVH=3, T=128 with 4 rows has only 384 invocations).
/// Each distinct value is a pipeline of its own, hence the floor.
fn wg_for(ctx: &Context, sg: u32, invocations: usize) -> u32 {
    let floor = sg.max(16);
    let mut wg = sg.max(64);
    if ctx.is_software() {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        while wg > floor && invocations.div_ceil(wg as usize) < 4 * threads {
            wg /= 2;
        }
    }
    wg
}

/// The module text for streamed operands from `src`, with subgroup lanes
/// when `sg > 1`.
#[doc(hidden)]
pub fn source(src: Source, sg: u32) -> Result<String> {
    source_for(src, sg, MAXC_DEFAULT, false)
}

/// The segmented build's module text (packed rows; for validation in tests).
#[doc(hidden)]
pub fn segmented_source(src: Source, sg: u32) -> Result<String> {
    source_for(src, sg, MAXC_DEFAULT, true)
}

/// [`source`] with register rows of `maxc` vec4s, segmented when `seg`.
fn source_for(src: Source, sg: u32, maxc: usize, seg: bool) -> Result<String> {
    let text = format!("{}\n{TEMPLATE}", crate::gpu::kernels::COMMON);
    let mut text = text.replace("{{SRC}}", src.tag());
    if seg {
        for (plain, segmented) in SEG_SWAPS {
            if !text.contains(plain) {
                return Err(Error::invalid(
                    "attention",
                    format!("attention.wgsl lost its `{plain}` line"),
                ));
            }
            text = text.replace(plain, segmented);
        }
    }
    if maxc != MAXC_DEFAULT {
        if !text.contains(MAXC_LINE) {
            return Err(Error::invalid(
                "attention",
                "attention.wgsl lost its `MAXC` line",
            ));
        }
        return source_tail(
            text.replace(MAXC_LINE, &format!("const MAXC: u32 = {maxc}u;")),
            sg,
        );
    }
    source_tail(text, sg)
}

fn source_tail(text: String, sg: u32) -> Result<String> {
    if sg <= 1 {
        return Ok(text);
    }
    if !text.contains(LANE_PORTABLE) {
        return Err(Error::invalid(
            "attention",
            "attention.wgsl lost its `// LANE_GET` marker",
        ));
    }
    Ok(text.replace(LANE_PORTABLE, LANE_SUBGROUP))
}

/// `entry` built for streamed operands from `src`; `layout` lists the
/// other bindings, with `None` at the streamed ones. The segmented build
/// (`seg`) takes the row starts as one more binding, after the others.
#[allow(clippy::too_many_arguments)]
fn spec(
    entry: &'static str,
    layout: &[Option<Access>],
    src: Source,
    d: &AttnDims,
    sg: u32,
    rows: u32,
    wg: u32,
    seg: bool,
) -> Result<KernelSpec> {
    let maxc = d.maxc();
    let module = format!(
        "attention{}_{}{}{}",
        if sg > 1 { "_subgroup" } else { "" },
        src.tag(),
        if maxc == MAXC_DEFAULT {
            String::new()
        } else {
            format!("_c{maxc}")
        },
        if seg { "_seg" } else { "" }
    );
    let mut layout: Vec<Access> = layout.iter().map(|a| a.unwrap_or(src.access())).collect();
    if seg {
        layout.push(R);
    }
    Ok(KernelSpec {
        module: Cow::Owned(module),
        source: SpecSource::Generated(Arc::new(move || source_for(src, sg, maxc, seg))),
        entry,
        constants: Vec::new(),
        layout,
    }
    .with("WG", wg as f64)
    .with("SG", sg as f64)
    .with("R", rows as f64)
    .with("HD4", (d.hd / 4) as f64))
}

uniform! { "attention" "Params"
    /// `Params` of `shaders/attention.wgsl`.
    pub struct AttentionParams {
        b: u32, t: u32, nh: u32, kvh: u32, pre: u32, s: u32, groups: u32,
        scale: f32, shift: u32, window: u32, lo: u32, hi: u32,
    }
}

/// The uniform block of one dispatch; `shift` is the packed textures' log2
/// rows per layer (31 for storage operands).
fn params(d: &AttnDims, m: &AttnMask, groups: usize, shift: u32) -> AttentionParams {
    AttentionParams {
        b: d.b as u32,
        t: d.t as u32,
        nh: d.nh as u32,
        kvh: d.kvh as u32,
        pre: d.p as u32,
        s: d.s() as u32,
        groups: groups as u32,
        scale: m.scale,
        shift,
        // A window past every key is no window (and fits the u32).
        window: m.window.filter(|&w| w < d.s()).map_or(0, |w| w as u32),
        lo: 0,
        hi: u32::MAX,
    }
}

/// Loop iterations llvmpipe allows one invocation, summed over the loops it
/// did not unroll (65,535), less a margin for the row loads and stores.
const LOOP_BUDGET: usize = 60_000;

/// The ranges `lo..hi` of `n` keys (or queries) that one dispatch each
/// walks: all of them on GPUs; on software adapters as many as keep an
/// invocation's loop iterations within llvmpipe's cap, counting `per` for
/// each (as if no row loop were unrolled; see the shader header).
fn blocks(ctx: &Context, n: usize, per: usize) -> Vec<(u32, u32)> {
    let step = if ctx.is_software() {
        (LOOP_BUDGET / per.max(1)).max(1)
    } else {
        n.max(1)
    };
    (0..n.max(1))
        .step_by(step)
        .map(|lo| (lo as u32, (lo + step).min(n) as u32))
        .collect()
}

/// Record `spec` once per block of [`blocks`] over `n` rows, `p` with the
/// block's `lo..hi`.
#[allow(clippy::too_many_arguments)]
fn dispatch_blocks(
    ctx: &Context,
    plan: &mut Plan,
    spec: &KernelSpec,
    p: AttentionParams,
    binds: &[Bind],
    grid: [u32; 3],
    n: usize,
    per: usize,
) -> Result<()> {
    for (lo, hi) in blocks(ctx, n, per) {
        let p = AttentionParams { lo, hi, ..p };
        plan.dispatch_with(ctx, spec, &p, binds, grid)?;
    }
    Ok(())
}

/// Loop iterations per streamed row of an invocation with `rows` rows:
/// the share loads, then two row loops per row.
fn iters_per_row(d: &AttnDims, lanes: u32, rows: u32) -> usize {
    let hd4 = d.hd / 4;
    hd4.div_ceil(lanes as usize) + 2 * rows as usize * hd4 + 1
}

/// The two streamed operands `a`, `b` (same shape, viewed as (rows, HD)) of
/// one kernel: packed texture copies recorded into `plan`, or the buffers
/// themselves when textures are off or do not fit.
// One short-lived value per dispatch: boxing the textures buys nothing.
#[allow(clippy::large_enum_variant)]
enum Streamed<'a> {
    Packed(std::sync::Arc<TexMatrix>, std::sync::Arc<TexMatrix>),
    Buffers(&'a Tensor, &'a Tensor),
}

impl<'a> Streamed<'a> {
    fn new(
        ctx: &Context,
        plan: &mut Plan,
        on: bool,
        a: &'a Tensor,
        b: &'a Tensor,
        hd: usize,
    ) -> Result<Self> {
        let rows = a.numel() / hd;
        if !(on && ctx.textures() && TexMatrix::fits(ctx, rows, hd)) {
            return Ok(Streamed::Buffers(a, b));
        }
        // Slots apart from the matmuls' (0, 1): both are read at once.
        let pa = matmul::pack_scratch(ctx, plan, &a.reshape(&[rows, hd])?, 2)?;
        let pb = matmul::pack_scratch(ctx, plan, &b.reshape(&[rows, hd])?, 3)?;
        Ok(Streamed::Packed(pa, pb))
    }
    fn source(&self) -> Source {
        match self {
            Streamed::Packed(..) => Source::Texture,
            Streamed::Buffers(..) => Source::Storage,
        }
    }
    fn binds(&self) -> [Bind<'_>; 2] {
        match self {
            Streamed::Packed(a, b) => [Bind::X(a), Bind::X(b)],
            Streamed::Buffers(a, b) => [Bind::T(a), Bind::T(b)],
        }
    }
    /// The kernels' `shift` (31 = one layer, also for buffers).
    fn shift(&self) -> u32 {
        match self {
            Streamed::Packed(a, _) => a.layer_shift(),
            Streamed::Buffers(..) => 31,
        }
    }
}

/// One dispatch's layout: row groups, workgroup size and grid.
struct Layout {
    groups: usize,
    wg: u32,
    grid: [u32; 3],
}

/// Row groups of `sg` lanes x `rows` rows for `heads` heads of `n` rows each.
fn layout(ctx: &Context, heads: usize, n: usize, sg: u32, rows: u32) -> Layout {
    let groups = heads * n.div_ceil((sg * rows) as usize);
    let invocations = groups * sg as usize;
    let wg = wg_for(ctx, sg, invocations);
    Layout {
        groups,
        wg,
        grid: grid_1d(ctx, invocations.div_ceil(wg as usize) as u32),
    }
}

/// out (B, T, NH, HD), lse (B, NH, T) <- q (B, T, NH, HD), k, v (B, S, KVH, HD).
pub fn attention_forward(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    lse: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<()> {
    let d = attn_dims("attention_forward", q, k, v)?;
    attention_forward_masked(ctx, plan, out, lse, q, k, v, AttnMask::causal(d.hd), None)
}

/// [`attention_forward`] with the model's score scale and sliding window,
/// over packed rows: `segs` (B, T) u32 holds each token's row start (see the
/// shader header); `None` is one row per sequence, the plain build.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_masked(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    lse: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: AttnMask,
    segs: Option<&Tensor>,
) -> Result<()> {
    let d = attn_dims("attention_forward", q, k, v)?;
    let cfg = AttnConfig::for_context(ctx, &d);
    attention_forward_with(ctx, plan, out, lse, q, k, v, mask, cfg, segs)
}

/// Check the row starts `segs` against (B, T).
fn check_segs(op: &str, segs: Option<&Tensor>, d: &AttnDims) -> Result<()> {
    if let Some(t) = segs {
        expect_shape(op, t, &[d.b, d.t])?;
        if t.dtype() != DType::U32 {
            return Err(Error::invalid(
                op,
                format!(
                    "row starts `{}` must be u32, got {:?}",
                    t.label(),
                    t.dtype()
                ),
            ));
        }
    }
    Ok(())
}

/// [`attention_forward_masked`] with an explicit kernel configuration.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_with(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    lse: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: AttnMask,
    cfg: AttnConfig,
    segs: Option<&Tensor>,
) -> Result<()> {
    let op = "attention_forward";
    let d = attn_dims(op, q, k, v)?;
    expect_shape(op, out, &[d.b, d.t, d.nh, d.hd])?;
    expect_shape(op, lse, &[d.b, d.nh, d.t])?;
    check_segs(op, segs, &d)?;
    cfg.check(op)?;
    let seg = segs.is_some();
    let l = layout(ctx, d.b * d.nh, d.t, cfg.lanes, cfg.fwd_rows);
    plan.add_flops("attention", 4.0 * d.pairs() * d.hd as f64);
    let kv = Streamed::new(ctx, plan, cfg.textures, k, v, d.hd)?;
    let lay = [Some(W), Some(W), Some(R), None, None];
    let spec = spec(
        op,
        &lay,
        kv.source(),
        &d,
        cfg.lanes,
        cfg.fwd_rows,
        l.wg,
        seg,
    )?;
    let [kb, vb] = kv.binds();
    let mut b = vec![Bind::T(out), Bind::T(lse), Bind::T(q), kb, vb];
    b.extend(segs.map(Bind::T));
    let per = iters_per_row(&d, cfg.lanes, cfg.fwd_rows);
    let p = params(&d, &mask, l.groups, kv.shift());
    dispatch_blocks(ctx, plan, &spec, p, &b, l.grid, d.s(), per)
}

/// Keys per chunk of [`attention_decode`] (the shader's `DCH`).
pub const DECODE_CHUNK: usize = 64;

/// Shape of [`attention_decode`]'s scratch for `nh` heads of dim `hd` over a
/// cache of `cap` rows: per (head, chunk) an accumulator row and (max, sum).
pub fn decode_part_shape(nh: usize, hd: usize, cap: usize) -> [usize; 3] {
    [nh, cap.div_ceil(DECODE_CHUNK), hd + 4]
}

/// One query row per head at the position in `pos` (1) u32, against cache
/// rows 0..=pos of `k`, `v` (1, CAP, KVH, HD): out (1, 1, NH, HD) and lse
/// (1, NH, 1) as [`attention_forward_masked`] gives with P = pos and T = 1.
/// The position is read on the GPU, so the recorded dispatches serve every
/// token of a generation. `part` ([`decode_part_shape`]) is scratch.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    ctx: &Context,
    plan: &mut Plan,
    out: &Tensor,
    lse: &Tensor,
    part: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pos: &Tensor,
    mask: AttnMask,
) -> Result<()> {
    let op = "attention_decode";
    let d = attn_dims(op, q, k, v)?;
    if d.b != 1 || d.t != 1 {
        return Err(Error::invalid(
            op,
            format!("one query row of batch 1, got q {:?}", q.shape()),
        ));
    }
    let cap = d.s();
    expect_shape(op, out, &[1, 1, d.nh, d.hd])?;
    expect_shape(op, lse, &[1, d.nh, 1])?;
    expect_shape(op, part, &decode_part_shape(d.nh, d.hd, cap))?;
    expect_shape(op, pos, &[1])?;
    if pos.dtype() != DType::U32 {
        return Err(Error::invalid(
            op,
            format!("position `{}` must be u32", pos.label()),
        ));
    }
    let chunks = cap.div_ceil(DECODE_CHUNK);
    // A window as wide as the cache is none (`params` drops it).
    let p = params(&d, &mask, chunks, 31);
    // Every position up to the cap, half of the cache on average.
    plan.add_flops("attention", 2.0 * d.nh as f64 * cap as f64 * d.hd as f64);
    let n_part = d.nh * chunks;
    let wg = wg_for(ctx, 1, n_part);
    let lay = [Some(W), Some(R), Some(R), Some(R), Some(R)];
    let part_spec =
        spec(op, &lay, Source::Storage, &d, 1, 1, wg, false)?.with("DCH", DECODE_CHUNK as f64);
    let grid = grid_1d(ctx, n_part.div_ceil(wg as usize) as u32);
    let b = [
        Bind::T(part),
        Bind::T(q),
        Bind::T(k),
        Bind::T(v),
        Bind::T(pos),
    ];
    plan.dispatch_with(ctx, &part_spec, &p, &b, grid)?;
    let n_out = d.nh * d.hd / 4;
    let wg = wg_for(ctx, 1, n_out);
    let lay = [Some(W), Some(W), Some(R)];
    let comb = spec(
        "attention_decode_combine",
        &lay,
        Source::Storage,
        &d,
        1,
        1,
        wg,
        false,
    )?;
    let grid = grid_1d(ctx, n_out.div_ceil(wg as usize) as u32);
    plan.dispatch_with(
        ctx,
        &comb,
        &p,
        &[Bind::T(out), Bind::T(lse), Bind::T(part)],
        grid,
    )
}

/// dq (B, T, NH, HD) +=, dk, dv (B, S, KVH, HD) += the attention gradients
/// for `dout`, using the forward's `out` and `lse`. `delta` (B, NH, T) is
/// scratch that this call overwrites. Records three dispatches: delta, dq, dkv.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    ctx: &Context,
    plan: &mut Plan,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    delta: &Tensor,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
) -> Result<()> {
    let d = attn_dims("attention_backward", q, k, v)?;
    let m = AttnMask::causal(d.hd);
    attention_backward_masked(
        ctx, plan, dq, dk, dv, delta, dout, q, k, v, out, lse, m, None,
    )
}

/// [`attention_backward`] of [`attention_forward_masked`] (the same mask
/// and row starts `segs`).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_masked(
    ctx: &Context,
    plan: &mut Plan,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    delta: &Tensor,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    mask: AttnMask,
    segs: Option<&Tensor>,
) -> Result<()> {
    let d = attn_dims("attention_backward", q, k, v)?;
    let cfg = AttnConfig::for_context(ctx, &d);
    attention_backward_with(
        ctx, plan, dq, dk, dv, delta, dout, q, k, v, out, lse, mask, cfg, segs,
    )
}

/// [`attention_backward_masked`] with an explicit kernel configuration.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_with(
    ctx: &Context,
    plan: &mut Plan,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    delta: &Tensor,
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    mask: AttnMask,
    cfg: AttnConfig,
    segs: Option<&Tensor>,
) -> Result<()> {
    let op = "attention_backward";
    let d = attn_dims(op, q, k, v)?;
    check_segs(op, segs, &d)?;
    let seg = segs.is_some();
    let qs = [d.b, d.t, d.nh, d.hd];
    let ks = [d.b, d.s(), d.kvh, d.hd];
    for (t, s) in [(dq, &qs[..]), (dout, &qs), (out, &qs), (dk, &ks), (dv, &ks)] {
        expect_shape(op, t, s)?;
    }
    expect_shape(op, lse, &[d.b, d.nh, d.t])?;
    expect_shape(op, delta, &[d.b, d.nh, d.t])?;

    cfg.check(op)?;

    // delta = rowsum(dout * out): one invocation per query row, portable build.
    let rows = d.b * d.nh * d.t;
    let e = "attention_backward_delta";
    let l = layout(ctx, rows, 1, 1, 1);
    let lay = [Some(W), Some(R), Some(R)];
    plan.dispatch(
        ctx,
        &spec(e, &lay, Source::Storage, &d, 1, 1, l.wg, false)?,
        &params(&d, &mask, rows, 31),
        &[delta, dout, out],
        l.grid,
    )?;

    // dq: groups of queries of one (b, h), as in forward; streams k and v.
    let l = layout(ctx, d.b * d.nh, d.t, cfg.lanes, cfg.dq_rows);
    let kv = Streamed::new(ctx, plan, cfg.textures, k, v, d.hd)?;
    let lay = [Some(W), Some(R), Some(R), None, None, Some(R), Some(R)];
    let e = "attention_backward_dq";
    let spec_dq = spec(e, &lay, kv.source(), &d, cfg.lanes, cfg.dq_rows, l.wg, seg)?;
    let [kb, vb] = kv.binds();
    let mut b = vec![
        Bind::T(dq),
        Bind::T(dout),
        Bind::T(q),
        kb,
        vb,
        Bind::T(lse),
        Bind::T(delta),
    ];
    b.extend(segs.map(Bind::T));
    let per = iters_per_row(&d, cfg.lanes, cfg.dq_rows);
    let p = params(&d, &mask, l.groups, kv.shift());
    dispatch_blocks(ctx, plan, &spec_dq, p, &b, l.grid, d.s(), per)?;

    // dk, dv: groups of keys of one (b, kvh); streams q and dout.
    let l = layout(ctx, d.b * d.kvh, d.s(), cfg.lanes, cfg.dkv_rows);
    let gq = Streamed::new(ctx, plan, cfg.textures, dout, q, d.hd)?;
    let lay = [
        Some(W),
        Some(W),
        None,
        None,
        Some(R),
        Some(R),
        Some(R),
        Some(R),
    ];
    let e = "attention_backward_dkv";
    let spec_dkv = spec(e, &lay, gq.source(), &d, cfg.lanes, cfg.dkv_rows, l.wg, seg)?;
    let [gb, qb] = gq.binds();
    let mut b = vec![
        Bind::T(dk),
        Bind::T(dv),
        gb,
        qb,
        Bind::T(k),
        Bind::T(v),
        Bind::T(lse),
        Bind::T(delta),
    ];
    b.extend(segs.map(Bind::T));
    // Each query is walked once per query head of the group.
    let per = iters_per_row(&d, cfg.lanes, cfg.dkv_rows) * (d.nh / d.kvh);
    let p = params(&d, &mask, l.groups, gq.shift());
    dispatch_blocks(ctx, plan, &spec_dkv, p, &b, l.grid, d.t, per)?;

    // dq: 3 dots per pair (scores, dp, ds k); dkv: 4 (scores, dp, dv, dk).
    plan.add_flops(
        "attention",
        14.0 * d.pairs() * d.hd as f64 + 2.0 * (rows * d.hd) as f64,
    );
    Ok(())
}

/// The full WGSL text of the subgroup build (for validation in tests).
#[doc(hidden)]
pub fn subgroup_source() -> Result<String> {
    source(Source::Storage, 8)
}
