// matmul.wgsl: the three matmul layouts that adapter training needs.
//
//   matmul_forward         out = alpha * inp . weight^T (+ bias)   NT, HF [out, in] weights
//   matmul_backward_input  dinp += alpha * dout . weight           NN
//   matmul_backward_weight dweight += alpha * dout^T . inp         token reduction, split-K
//   matmul_backward_weight_reduce   sums the split-K partials in a fixed order
//
// This file is a template: src/gpu/ops/matmul.rs replaces the {{NAME}}
// markers with a register tile size, the subgroup width and a fully unrolled
// micro-kernel (naga does not unroll loops, and lavapipe keeps array
// accumulators in memory), then builds one module per variant. Tiled
// variants (hardware GPUs) also get the `*_tiled` entries near the end,
// which stage tiles in workgroup memory; register variants leave them out.
//
// Why this shape (see docs/software-adapters.md): there is no workgroup memory.
// On lavapipe every load is a per-lane loop, so the cost is loads per FMA.
// Each invocation keeps a TM x TN tile of accumulators in registers and reads
// operands as vec4. When the adapter has subgroups of a fixed size SG, the SG
// lanes of a subgroup share the same A rows: each lane loads TM/SG of them and
// subgroupBroadcast hands them out, so A costs SG times fewer loads. Without
// subgroups (SG = 1) every invocation loads its own rows; that is the portable
// path, and on real GPUs the caches absorb the repeated loads.
//
// Operand sources. Each matmul body is written once; the A and B operands
// come from a source chosen per module (ops::matmul::Variant): storage
// buffers bound as array<vec4<f32>>, or matrices packed into rgba32float
// textures by matmul_pack (TexMatrix; on llvmpipe a texel fetch is a SIMD
// gather, about 10x cheaper than a checked storage load, and GPUs serve it
// from the texture cache). The generated micro-kernels reach an operand only
// through two functions named after its source `src` (st, tx):
//   a_row_<src>(row) / b_row_<src>(row)   row handle, hoisted out of loops
//   <layout>_<a|b>_<src>(handle, col)     4 consecutive elements of a row
// so a new source adds its bindings and these functions, not another body.
//
// Frozen weights (the B operand of forward and backward_input) may also be
// compact textures: `tb` and `th` (bf16 or f16 bits, 8 per rgba32uint
// texel) and `tq` (block quantized: 32 4-bit unsigned or 16 8-bit signed
// values per rgba32uint texel, and a (scale, offset) pair per QSUB elements
// in an rg32float texture with the same rows; value = scale * q + offset,
// which reproduces llama.cpp's formula bit for bit, see
// docs/compact-weights.md). They are decoded in registers; no f32 copy of
// a compact weight exists.

// Every storage operand is bound as array<vec4<f32>> (buffers are padded to 16 bytes).
// ALIGNED variants need rows that start on a vec4 (K % 4 == 0 and so on);
// the others assemble vec4s from scalars and zero-fill the reduction tail, so
// any odd shape works, only slower.
//
// Geometry: 1-D workgroups of WG = RG * LC invocations. LC lanes (the
// subgroup, or 8 plain invocations) sit side by side along the output
// columns and RG row groups stack along the rows.

struct Params {
    m: u32,        // rows of out/dinp (tokens), or reduction length for backward_weight
    k: u32,        // inner dim of forward; output columns of the backward kernels
    n: u32,        // output columns of forward; reduction of backward_input; output rows of backward_weight
    ld_out: u32,   // row stride of out (forward: the full N when weight is a row chunk)
    col_off: u32,  // forward: first out column; backward: first dout column of this chunk
    ld_dout: u32,  // row stride of dout (backward kernels)
    alpha: f32,
    flags: u32,    // bit 0: accumulate into out; bit 1: add bias
    m_split: u32,  // backward_weight: tokens per split
    splits: u32,   // backward_weight: number of splits
    a_shift: u32,  // texture path: log2 rows per layer of the A texture (31 = one layer)
    b_shift: u32,  // same for the B texture
    a_row0: u32,   // texture path: first A row of this token chunk; pack: first destination row
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

const TM: u32 = {{TM}}u;     // register tile rows per invocation
const TN: u32 = {{TN}}u;     // register tile columns per invocation (a multiple of 4 for the backward kernels)
const LC: u32 = {{LC}}u;     // lanes side by side along columns
const RG: u32 = {{RG}}u;     // row groups per workgroup
const WG: u32 = {{WG}}u;     // = LC * RG
const ALIGNED: bool = {{ALIGNED}};

// Row handles of the two sources. Storage: the row itself. Texture: texel
// row and layer (texel (c, y, layer) = columns 4c..4c+4 of row
// layer * 2^shift + y, zero-padded), A rows offset by this token chunk's
// a_row0. Only matrices taller than the texture limit are layered; for the
// rest the split folds away at compile time. Handles are computed outside
// the reduction loop where the row is fixed: per-load integer work measured
// as costly as the fetch itself on llvmpipe.
const A_LAYERED: bool = {{A_LAYERED}};
const B_LAYERED: bool = {{B_LAYERED}};
fn tex_row(row: u32, shift: u32) -> vec2<u32> {
    return vec2<u32>(row & ((1u << shift) - 1u), row >> shift);
}
fn a_row_st(row: u32) -> u32 { return row; }
fn b_row_st(row: u32) -> u32 { return row; }
fn b_row_tb(row: u32) -> vec2<u32> { return b_row_tx(row); }
fn b_row_tq(row: u32) -> vec2<u32> { return b_row_tx(row); }
fn a_row_tx(row: u32) -> vec2<u32> {
    if (A_LAYERED) { return tex_row(p.a_row0 + row, p.a_shift); }
    return vec2<u32>(p.a_row0 + row, 0u);
}
fn b_row_tx(row: u32) -> vec2<u32> {
    if (B_LAYERED) { return tex_row(row, p.b_shift); }
    return vec2<u32>(row, 0u);
}

// ---------------------------------------------------------------------------
// matmul_forward: out[m, col_off + n] (+)= alpha * sum_k inp[m, k] * weight[n, k] + bias[n]
// One workgroup per (RG*TM) x (LC*TN) output tile.
@group(0) @binding(1) var<storage, read_write> fw_out: array<f32>;      // (M, LD_OUT)
@group(0) @binding(2) var<storage, read> fw_inp: array<vec4<f32>>;      // (M, K)
@group(0) @binding(3) var<storage, read> fw_weight: array<vec4<f32>>;   // (N, K)
@group(0) @binding(4) var<storage, read> fw_bias: array<f32>;           // (N), or 1 dummy element

// Storage sources: A = inp, B = weight; handles are the rows themselves.
fn fw_a_st(row: u32, k: u32) -> vec4<f32> {
    if (ALIGNED) { return fw_inp[(row * p.k + k) >> 2u]; }
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (k + i < p.k) { let e = row * p.k + k + i; v[i] = fw_inp[e >> 2u][e & 3u]; }
    }
    return v;
}

fn fw_b_st(row: u32, k: u32) -> vec4<f32> {
    if (ALIGNED) { return fw_weight[(row * p.k + k) >> 2u]; }
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (k + i < p.k) { let e = row * p.k + k + i; v[i] = fw_weight[e >> 2u][e & 3u]; }
    }
    return v;
}

// Texture sources; c = a_row_tx / b_row_tx of the row.
@group(0) @binding(2) var fwt_a: texture_2d_array<f32>;              // packed inp (rows >= a_row0 + M, K)
@group(0) @binding(3) var fwt_b: texture_2d_array<f32>;              // packed weight (N, K)

fn fw_a_tx(c: vec2<u32>, k: u32) -> vec4<f32> {
    return textureLoad(fwt_a, vec2<u32>(k >> 2u, c.x), c.y, 0);
}
fn fw_b_tx(c: vec2<u32>, k: u32) -> vec4<f32> {
    return textureLoad(fwt_b, vec2<u32>(k >> 2u, c.x), c.y, 0);
}

// Compact weight sources.
const QBITS: u32 = {{QBITS}}u;   // 4 or 8 (tq)
const QSUB: u32 = {{QSUB}}u;     // elements per (scale, offset) pair (tq)
const TQ_SHIFT: u32 = {{TQ_SHIFT}}u;  // log2 of the quants per tq texel: 5 (4-bit) or 4 (8-bit)
// The quants of columns k..k+4 (k % 4 == 0) in their wide texel `t`, in
// the low bits (quant4 masks the rest). Each u32 holds 8 4-bit or 4 8-bit
// values, lowest column in the lowest bits.
fn tq_word(t: vec4<u32>, k: u32) -> u32 {
    if (QBITS == 4u) { return t[(k >> 3u) & 3u] >> ((k & 4u) << 2u); }
    return t[(k >> 2u) & 3u];
}
// 16-bit floats: 8 per rgba32uint texel, 2 per u32 (the lower column in
// the low half); bf16 (tb) or, in modules whose B is th, f16.
const H16_F16: bool = {{H16_F16}};
fn bf16x2(u: u32) -> vec2<f32> {
    return bitcast<vec2<f32>>(vec2<u32>(u << 16u, u & 0xffff0000u));
}
fn h16x4(u: vec2<u32>) -> vec4<f32> {
    if (H16_F16) { return vec4<f32>(unpack2x16float(u.x), unpack2x16float(u.y)); }
    return vec4<f32>(bf16x2(u.x), bf16x2(u.y));
}
// Columns k..k+4 (k % 4 == 0) of their 16-bit texel `t`.
fn tb4(t: vec4<u32>, k: u32) -> vec4<f32> {
    if ((k & 4u) != 0u) { return h16x4(t.zw); }
    return h16x4(t.xy);
}
fn quant4(q: u32) -> vec4<f32> {
    if (QBITS == 4u) {
        return vec4<f32>((vec4<u32>(q) >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u));
    }
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(q) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
}
@group(0) @binding(3) var fwu_b: texture_2d_array<u32>;   // bf16 bits or quants of weight (N, K)
@group(0) @binding(5) var fwq_s: texture_2d_array<f32>;   // (scale, offset) of weight (N, K / QSUB)

fn fw_b_tb(c: vec2<u32>, k: u32) -> vec4<f32> {
    return tb4(textureLoad(fwu_b, vec2<u32>(k >> 3u, c.x), c.y, 0), k);
}
fn fw_b_tq(c: vec2<u32>, k: u32) -> vec4<f32> {
    let q = tq_word(textureLoad(fwu_b, vec2<u32>(k >> TQ_SHIFT, c.x), c.y, 0), k);
    let s = textureLoad(fwq_s, vec2<u32>(k / QSUB, c.x), c.y, 0);
    return s.x * quant4(q) + s.y;
}

// The register forward over wide quantized texels (gen_nt): one texel and
// its (scale, offset) pair per column and texel, then its 4-column steps
// picked out of registers, instead of two fetches per step.
fn fwt_tq(c: vec2<u32>, k: u32) -> vec4<u32> {
    return textureLoad(fwu_b, vec2<u32>(k >> TQ_SHIFT, c.x), c.y, 0);
}
fn fws_tq(c: vec2<u32>, k: u32) -> vec4<f32> {
    return textureLoad(fwq_s, vec2<u32>(k / QSUB, c.x), c.y, 0);
}
fn fwx_tq(t: vec4<u32>, s: vec4<f32>, k: u32) -> vec4<f32> {
    return s.x * quant4(tq_word(t, k)) + s.y;
}

fn fw_store(row: u32, col: u32, acc: f32) {
    if (row >= p.m || col >= p.n) { return; }
    var v = p.alpha * acc;
    if ((p.flags & 2u) != 0u) { v += fw_bias[col]; }
    let o = row * p.ld_out + p.col_off + col;
    if ((p.flags & 1u) != 0u) { v += fw_out[o]; }
    fw_out[o] = v;
}

@compute @workgroup_size(WG)
fn matmul_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32,
                  {{LANE_BUILTINS}}) {
    {{LANE_SETUP}}
    let row0 = wg.x * (RG * TM) + rg * TM;
    let col0 = wg.y * (LC * TN) + lane * TN;
    // A row group past the last row leaves (uniform over its subgroup, and
    // there are no barriers): a prompt of a few rows in a 64-row workgroup
    // fetched every weight once per row group, wanted or not.
    if (row0 >= p.m) { return; }
    let mlast = p.m - 1u;
    let nlast = p.n - 1u;
{{FW_DECL}}
    for (var k = 0u; k < p.k; k += {{FW_STEP}}u) {
{{FW_BODY}}
    }
{{FW_STORE}}
}

// matmul_gemv_tex: matmul_forward for few rows (generation, short inputs),
// texture operands only. The register-tiled entry computes RG*TM rows per
// workgroup, so at M = 1 nearly all of its work is thrown away; here one
// invocation owns one output element and streams its weight row.
@compute @workgroup_size(64)
fn matmul_gemv_tex(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let n = wg.x * 64u + lid;
    let m = wg.y;
    if (n >= p.n || m >= p.m) { return; }
    let ca = a_row_{{A}}(m);
    let cb = b_row_{{B}}(n);
    var acc = vec4<f32>(0.0);
    // Packed rows are zero-padded to whole texels.
    for (var k = 0u; k < p.k; k += 4u) {
        acc = fma(fw_a_{{A}}(ca, k), fw_b_{{B}}(cb, k), acc);
    }
    fw_store(m, n, (acc.x + acc.y) + (acc.z + acc.w));
}

// SUBGROUP_ONLY_BEGIN (src/gpu/ops/matmul.rs drops this block without subgroups)
// matmul_gemv_split: matmul_gemv_tex with the reduction split over the SGW
// lanes of a subgroup. Lanes side by side read consecutive texels of one
// weight row, so a SIMD gather on a CPU adapter touches one contiguous run
// of memory (one output per lane gathers from SGW rows apart), and
// subgroupAdd sums the lanes. A subgroup owns GR outputs; SGW is the
// adapter's fixed subgroup size.
const SGW: u32 = {{SGW}}u;
const GR: u32 = 4u;
@compute @workgroup_size(64)
fn matmul_gemv_split(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32,
                     @builtin(subgroup_id) sid: u32) {
    let n0 = (wg.x * (64u / SGW) + sid) * GR;
    let m = wg.y;
    // Uniform over the subgroup: all its lanes leave or none.
    if (n0 >= p.n || m >= p.m) { return; }
    let nlast = p.n - 1u;
    let ca = a_row_{{A}}(m);
    let cb0 = b_row_{{B}}(n0);
    let cb1 = b_row_{{B}}(min(n0 + 1u, nlast));
    let cb2 = b_row_{{B}}(min(n0 + 2u, nlast));
    let cb3 = b_row_{{B}}(min(n0 + 3u, nlast));
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    // Packed rows are zero-padded to whole texels.
    for (var k = lane * 4u; k < p.k; k += SGW * 4u) {
        let a = fw_a_{{A}}(ca, k);
        c0 = fma(a, fw_b_{{B}}(cb0, k), c0);
        c1 = fma(a, fw_b_{{B}}(cb1, k), c1);
        c2 = fma(a, fw_b_{{B}}(cb2, k), c2);
        c3 = fma(a, fw_b_{{B}}(cb3, k), c3);
    }
    gemv_store(m, n0, lane, c0, c1, c2, c3);
}

// The GR = 4 outputs n0.. of a gemv subgroup: each lane's partial sums
// added over the subgroup, then lane j stores output j. One store that all
// lanes make costs llvmpipe one lane loop, as one lane's store does.
fn gemv_store(m: u32, n0: u32, lane: u32, c0: vec4<f32>, c1: vec4<f32>, c2: vec4<f32>, c3: vec4<f32>) {
    let s = vec4<f32>(subgroupAdd((c0.x + c0.y) + (c0.z + c0.w)),
                      subgroupAdd((c1.x + c1.y) + (c1.z + c1.w)),
                      subgroupAdd((c2.x + c2.y) + (c2.z + c2.w)),
                      subgroupAdd((c3.x + c3.y) + (c3.z + c3.w)));
    for (var j = lane; j < GR; j += SGW) {
        fw_store(m, n0 + j, pick4(s, j));
    }
}

// Component j (< 4) of v, without a dynamic index.
fn pick4(v: vec4<f32>, j: u32) -> f32 {
    return select(select(v.x, v.y, j == 1u), select(v.z, v.w, j == 3u), j >= 2u);
}

// The one-row forward over 4- or 8-bit weights (tq, see matmul_gemv_wide).
// Lanes side by side read consecutive wide texels (TQE = 32 or 16 quants,
// inside one (scale, offset) block since QSUB is a multiple of TQE) of 8
// rows. Per lane and texel the rows share the TQE / 4 fetches of x, and
// each row adds scale * sum(x q) + offset * sum(x): per lane and step
// TQE / 4 + 16 fetches for 8 TQE weights, where 4-element texels took
// 1 + GR + 1 fetches for 4 GR (a fetch is a gather per lane on llvmpipe).
const TQE: u32 = 1u << TQ_SHIFT;
// Outputs of 8 rows: rows 0-3 in lo, 4-7 in hi.
struct GemvPair { lo: vec4<f32>, hi: vec4<f32> }
fn gemv_q_word(xa: vec4<f32>, w0: u32, w1: u32, w2: u32, w3: u32, d0: ptr<function, vec4<f32>>,
               d1: ptr<function, vec4<f32>>, d2: ptr<function, vec4<f32>>, d3: ptr<function, vec4<f32>>) {
    *d0 = fma(xa, quant4(w0), *d0);
    *d1 = fma(xa, quant4(w1), *d1);
    *d2 = fma(xa, quant4(w2), *d2);
    *d3 = fma(xa, quant4(w3), *d3);
}
fn gemv_q_row(d: vec4<f32>, s: vec2<f32>, sx: f32) -> f32 {
    return s.x * ((d.x + d.y) + (d.z + d.w)) + s.y * sx;
}
// Texel t of rows cb0..cb3 against this lane's x (x4..x7 unused for 8-bit).
fn gemv_q_rows(t: u32, sb: u32, cb0: vec2<u32>, cb1: vec2<u32>, cb2: vec2<u32>, cb3: vec2<u32>,
               x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>,
               x4: vec4<f32>, x5: vec4<f32>, x6: vec4<f32>, x7: vec4<f32>, sx: f32) -> vec4<f32> {
    let w0 = textureLoad(fwu_b, vec2<u32>(t, cb0.x), cb0.y, 0);
    let w1 = textureLoad(fwu_b, vec2<u32>(t, cb1.x), cb1.y, 0);
    let w2 = textureLoad(fwu_b, vec2<u32>(t, cb2.x), cb2.y, 0);
    let w3 = textureLoad(fwu_b, vec2<u32>(t, cb3.x), cb3.y, 0);
    var d0 = vec4<f32>(0.0);
    var d1 = vec4<f32>(0.0);
    var d2 = vec4<f32>(0.0);
    var d3 = vec4<f32>(0.0);
    if (QBITS == 4u) {
        // Word j holds columns 8j..8j+8: low half, then high half.
        gemv_q_word(x0, w0.x, w1.x, w2.x, w3.x, &d0, &d1, &d2, &d3);
        gemv_q_word(x1, w0.x >> 16u, w1.x >> 16u, w2.x >> 16u, w3.x >> 16u, &d0, &d1, &d2, &d3);
        gemv_q_word(x2, w0.y, w1.y, w2.y, w3.y, &d0, &d1, &d2, &d3);
        gemv_q_word(x3, w0.y >> 16u, w1.y >> 16u, w2.y >> 16u, w3.y >> 16u, &d0, &d1, &d2, &d3);
        gemv_q_word(x4, w0.z, w1.z, w2.z, w3.z, &d0, &d1, &d2, &d3);
        gemv_q_word(x5, w0.z >> 16u, w1.z >> 16u, w2.z >> 16u, w3.z >> 16u, &d0, &d1, &d2, &d3);
        gemv_q_word(x6, w0.w, w1.w, w2.w, w3.w, &d0, &d1, &d2, &d3);
        gemv_q_word(x7, w0.w >> 16u, w1.w >> 16u, w2.w >> 16u, w3.w >> 16u, &d0, &d1, &d2, &d3);
    } else {
        gemv_q_word(x0, w0.x, w1.x, w2.x, w3.x, &d0, &d1, &d2, &d3);
        gemv_q_word(x1, w0.y, w1.y, w2.y, w3.y, &d0, &d1, &d2, &d3);
        gemv_q_word(x2, w0.z, w1.z, w2.z, w3.z, &d0, &d1, &d2, &d3);
        gemv_q_word(x3, w0.w, w1.w, w2.w, w3.w, &d0, &d1, &d2, &d3);
    }
    return vec4<f32>(
        gemv_q_row(d0, textureLoad(fwq_s, vec2<u32>(sb, cb0.x), cb0.y, 0).xy, sx),
        gemv_q_row(d1, textureLoad(fwq_s, vec2<u32>(sb, cb1.x), cb1.y, 0).xy, sx),
        gemv_q_row(d2, textureLoad(fwq_s, vec2<u32>(sb, cb2.x), cb2.y, 0).xy, sx),
        gemv_q_row(d3, textureLoad(fwq_s, vec2<u32>(sb, cb3.x), cb3.y, 0).xy, sx));
}
// One step of a lane over the texel at column k0 of 8 rows (tq). The A
// row handle is made here: its type depends on the A source.
fn gemv_wide_tq(k0: u32, m: u32, cb0: vec2<u32>, cb1: vec2<u32>, cb2: vec2<u32>, cb3: vec2<u32>,
                cb4: vec2<u32>, cb5: vec2<u32>, cb6: vec2<u32>, cb7: vec2<u32>) -> GemvPair {
    let ca = a_row_{{A}}(m);
    let x0 = fw_a_{{A}}(ca, k0);
    let x1 = fw_a_{{A}}(ca, k0 + 4u);
    let x2 = fw_a_{{A}}(ca, k0 + 8u);
    let x3 = fw_a_{{A}}(ca, k0 + 12u);
    var x4 = vec4<f32>(0.0);
    var x5 = vec4<f32>(0.0);
    var x6 = vec4<f32>(0.0);
    var x7 = vec4<f32>(0.0);
    if (QBITS == 4u) {
        x4 = fw_a_{{A}}(ca, k0 + 16u);
        x5 = fw_a_{{A}}(ca, k0 + 20u);
        x6 = fw_a_{{A}}(ca, k0 + 24u);
        x7 = fw_a_{{A}}(ca, k0 + 28u);
    }
    let xs = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7));
    let sx = (xs.x + xs.y) + (xs.z + xs.w);
    let t = k0 >> TQ_SHIFT;
    let sb = k0 / QSUB;
    return GemvPair(gemv_q_rows(t, sb, cb0, cb1, cb2, cb3, x0, x1, x2, x3, x4, x5, x6, x7, sx),
                    gemv_q_rows(t, sb, cb4, cb5, cb6, cb7, x0, x1, x2, x3, x4, x5, x6, x7, sx));
}

// The 8 outputs n0.. of a wide gemv subgroup (one per component of c0, c1):
// summed over the subgroup, then lane j stores output j (see gemv_store).
fn gemv_store8(m: u32, n0: u32, lane: u32, c0: vec4<f32>, c1: vec4<f32>) {
    let s0 = subgroupAdd(c0);
    let s1 = subgroupAdd(c1);
    for (var j = lane; j < 8u; j += SGW) {
        fw_store(m, n0 + j, select(pick4(s0, j), pick4(s1, j - 4u), j >= 4u));
    }
}

// bf16 or f16 weights (tb, th): texels of 8 weights, sharing the lane's 2 x fetches.
fn gemv_b_rows(t: u32, cb0: vec2<u32>, cb1: vec2<u32>, cb2: vec2<u32>, cb3: vec2<u32>,
               x0: vec4<f32>, x1: vec4<f32>) -> vec4<f32> {
    let w0 = textureLoad(fwu_b, vec2<u32>(t, cb0.x), cb0.y, 0);
    let w1 = textureLoad(fwu_b, vec2<u32>(t, cb1.x), cb1.y, 0);
    let w2 = textureLoad(fwu_b, vec2<u32>(t, cb2.x), cb2.y, 0);
    let w3 = textureLoad(fwu_b, vec2<u32>(t, cb3.x), cb3.y, 0);
    return vec4<f32>(
        dot(x0, h16x4(w0.xy)) + dot(x1, h16x4(w0.zw)),
        dot(x0, h16x4(w1.xy)) + dot(x1, h16x4(w1.zw)),
        dot(x0, h16x4(w2.xy)) + dot(x1, h16x4(w2.zw)),
        dot(x0, h16x4(w3.xy)) + dot(x1, h16x4(w3.zw)));
}
// One step of a lane over the texel at column k0 of 8 rows (tb). Weight
// texels are zero past K; x's second half past K meets those zeros.
fn gemv_wide_tb(k0: u32, m: u32, cb0: vec2<u32>, cb1: vec2<u32>, cb2: vec2<u32>, cb3: vec2<u32>,
                cb4: vec2<u32>, cb5: vec2<u32>, cb6: vec2<u32>, cb7: vec2<u32>) -> GemvPair {
    let ca = a_row_{{A}}(m);
    let x0 = fw_a_{{A}}(ca, k0);
    let x1 = fw_a_{{A}}(ca, k0 + 4u);
    return GemvPair(gemv_b_rows(k0 >> 3u, cb0, cb1, cb2, cb3, x0, x1),
                    gemv_b_rows(k0 >> 3u, cb4, cb5, cb6, cb7, x0, x1));
}

fn gemv_wide_th(k0: u32, m: u32, cb0: vec2<u32>, cb1: vec2<u32>, cb2: vec2<u32>, cb3: vec2<u32>,
                cb4: vec2<u32>, cb5: vec2<u32>, cb6: vec2<u32>, cb7: vec2<u32>) -> GemvPair {
    return gemv_wide_tb(k0, m, cb0, cb1, cb2, cb3, cb4, cb5, cb6, cb7);
}

// WIDE_ONLY_BEGIN (modules whose B is tq or tb; the generator drops it elsewhere)
// matmul_gemv_wide: the one-row forward over wide texels (tq, tb): lanes
// side by side read consecutive texels (WIDE_E weights each) of 8 rows.
const WIDE_E: u32 = {{WIDE_E}}u;
// Lanes per set of 8 rows (a power of two dividing SGW): SGW / GEMV_LPR sets
// per subgroup. Fewer lanes per set leave no lane idle on the last step when
// a row's texels are no multiple of SGW (K = 576 is 18 Q4 texels: 2 lanes
// take 9 each, where 8 lanes took 3 steps for 2.25).
override GEMV_LPR: u32 = SGW;
override GEMV_WG: u32 = 64u;
@compute @workgroup_size(GEMV_WG)
fn matmul_gemv_wide(@builtin(workgroup_id) wg: vec3<u32>, @builtin(subgroup_invocation_id) lane: u32,
                    @builtin(subgroup_id) sid: u32) {
    let sets = SGW / GEMV_LPR;
    let sub0 = (wg.x * (GEMV_WG / SGW) + sid) * sets * 8u;
    let m = wg.y;
    // Uniform over the subgroup; a set past the end computes clamped rows
    // and stores nothing, so its lanes stay for the shuffles.
    if (sub0 >= p.n || m >= p.m) { return; }
    let part = lane % GEMV_LPR;
    let n0 = sub0 + (lane / GEMV_LPR) * 8u;
    let nlast = p.n - 1u;
    let cb0 = b_row_tx(min(n0, nlast));
    let cb1 = b_row_tx(min(n0 + 1u, nlast));
    let cb2 = b_row_tx(min(n0 + 2u, nlast));
    let cb3 = b_row_tx(min(n0 + 3u, nlast));
    let cb4 = b_row_tx(min(n0 + 4u, nlast));
    let cb5 = b_row_tx(min(n0 + 5u, nlast));
    let cb6 = b_row_tx(min(n0 + 6u, nlast));
    let cb7 = b_row_tx(min(n0 + 7u, nlast));
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    // K is whole texels, zero-padded; lanes past the end skip the step.
    for (var k0 = part * WIDE_E; k0 < p.k; k0 += GEMV_LPR * WIDE_E) {
        let s = gemv_wide_{{B}}(k0, m, cb0, cb1, cb2, cb3, cb4, cb5, cb6, cb7);
        c0 += s.lo;
        c1 += s.hi;
    }
    if (GEMV_LPR == SGW) {
        gemv_store8(m, n0, lane, c0, c1);
        return;
    }
    for (var o = 1u; o < GEMV_LPR; o *= 2u) {
        c0 += subgroupShuffleXor(c0, o);
        c1 += subgroupShuffleXor(c1, o);
    }
    if (n0 < p.n) {
        for (var j = part; j < 8u; j += GEMV_LPR) {
            fw_store(m, n0 + j, select(pick4(c0, j), pick4(c1, j - 4u), j >= 4u));
        }
    }
}
// WIDE_ONLY_END
// SUBGROUP_ONLY_END

// matmul_gather: the embedding lookup over a weight from any source:
// out[b, col_off + t, :] = alpha * weight[ids[b, t], :], zero for an id outside
// 0..a_row0 (= V). p.m = B*T ids, p.n = T, p.ld_out = S, p.k = C.
// One invocation per 4 output columns.
@group(0) @binding(2) var<storage, read> ga_ids: array<i32>;               // (B, T)

@compute @workgroup_size(64)
fn matmul_gather(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let w4 = (p.k + 3u) / 4u;
    let i = flat_wg(wg, nwg) * 64u + lid;
    if (i >= w4 * p.m) { return; }
    let tok = i / w4;
    let c4 = (i - tok * w4) * 4u;
    let id = ga_ids[tok];
    let dst = ((tok / p.n) * p.ld_out + p.col_off + tok % p.n) * p.k + c4;
    var v = vec4<f32>(0.0);
    if (id >= 0 && u32(id) < p.a_row0) { v = p.alpha * fw_b_{{B}}(b_row_{{B}}(u32(id)), c4); }
    for (var j = 0u; j < 4u; j++) {
        if (c4 + j < p.k) { fw_out[dst + j] = v[j]; }
    }
}

// ---------------------------------------------------------------------------
// matmul_backward_input: differentiates out = inp . weight^T:
// dinp[m, k] += alpha * sum_n dout[m, col_off + n] * weight[n, k]
// Tile: TM rows x TN columns (TN/4 vec4 accumulators per row).
@group(0) @binding(1) var<storage, read_write> bi_dinp: array<vec4<f32>>; // (M, K)
@group(0) @binding(2) var<storage, read> bi_dout: array<vec4<f32>>;       // (M, LD_DOUT)
@group(0) @binding(3) var<storage, read> bi_weight: array<vec4<f32>>;     // (N, K)

// Storage sources: A = dout (row stride LD_DOUT), B = weight.
fn bi_a_st(row: u32, n: u32) -> vec4<f32> {
    let base = row * p.ld_dout + p.col_off + n;
    if (ALIGNED) { return bi_dout[base >> 2u]; }
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (n + i < p.n) { let e = base + i; v[i] = bi_dout[e >> 2u][e & 3u]; }
    }
    return v;
}

// weight[n, col..col+4], zero when n is past the end.
fn bi_b_st(n: u32, col: u32) -> vec4<f32> {
    if (n >= p.n) { return vec4<f32>(0.0); }
    if (ALIGNED) { return bi_weight[(n * p.k + min(col, p.k - 4u)) >> 2u]; }
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (col + i < p.k) { let e = n * p.k + col + i; v[i] = bi_weight[e >> 2u][e & 3u]; }
    }
    return v;
}

// Texture sources: A = packed dout (rows >= a_row0 + M, N), B = packed weight.
@group(0) @binding(2) var bit_a: texture_2d_array<f32>;                    // packed dout (rows >= a_row0 + M, N)
@group(0) @binding(3) var bit_b: texture_2d_array<f32>;                    // packed weight (N, K)

// A reduction in steps (REDUCE_CHUNK_ROWS in src/gpu/ops/matmul.rs) binds
// whole textures: col_off (a multiple of 4) is the step's first dout column
// and weight row.
fn bi_a_tx(c: vec2<u32>, n: u32) -> vec4<f32> {
    return textureLoad(bit_a, vec2<u32>((p.col_off + n) >> 2u, c.x), c.y, 0);
}
fn bi_w_row(n: u32) -> vec2<u32> { return b_row_tx(p.col_off + n); }
// weight[n, col..col+4]; zero past the last row (dout is zero there too, but
// an out-of-range fetch may return any texel).
fn bi_b_tx(n: u32, col: u32) -> vec4<f32> {
    if (n >= p.n) { return vec4<f32>(0.0); }
    let c = bi_w_row(n);
    return textureLoad(bit_b, vec2<u32>(col >> 2u, c.x), c.y, 0);
}

// Compact weight sources (see the forward's).
@group(0) @binding(3) var biu_b: texture_2d_array<u32>;                    // bf16 bits or quants of weight (N, K)
@group(0) @binding(4) var biq_s: texture_2d_array<f32>;                    // (scale, offset) of weight (N, K / QSUB)

fn bi_b_tb(n: u32, col: u32) -> vec4<f32> {
    if (n >= p.n) { return vec4<f32>(0.0); }
    let c = bi_w_row(n);
    return tb4(textureLoad(biu_b, vec2<u32>(col >> 3u, c.x), c.y, 0), col);
}
fn bi_b_tq(n: u32, col: u32) -> vec4<f32> {
    if (n >= p.n) { return vec4<f32>(0.0); }
    let c = bi_w_row(n);
    let q = tq_word(textureLoad(biu_b, vec2<u32>(col >> TQ_SHIFT, c.x), c.y, 0), col);
    let s = textureLoad(biq_s, vec2<u32>(col / QSUB, c.x), c.y, 0);
    return s.x * quant4(q) + s.y;
}

// The register kernel's B loads through a row handle made once per row and
// step (bi_bh_row_<src>), instead of per load: on llvmpipe the handle's
// integer work (layered textures: a shift and a mask) costs about a fetch.
// Texture rows past the last are clamped to it, not zeroed: the dout
// columns they meet are zero (zero-padded texels). Storage keeps its check.
fn bi_bh_row_st(n: u32) -> u32 { return n; }
fn bi_bh_row_tx(n: u32) -> vec2<u32> { return bi_w_row(min(n, p.n - 1u)); }
fn bi_bh_row_tb(n: u32) -> vec2<u32> { return bi_bh_row_tx(n); }
fn bi_bh_row_tq(n: u32) -> vec2<u32> { return bi_bh_row_tx(n); }
fn bi_bh_st(n: u32, col: u32) -> vec4<f32> { return bi_b_st(n, col); }
fn bi_bh_tx(c: vec2<u32>, col: u32) -> vec4<f32> {
    return textureLoad(bit_b, vec2<u32>(col >> 2u, c.x), c.y, 0);
}
fn bi_bh_tb(c: vec2<u32>, col: u32) -> vec4<f32> {
    return tb4(textureLoad(biu_b, vec2<u32>(col >> 3u, c.x), c.y, 0), col);
}
// The whole 16-bit texel of columns col..col+8 (col % 8 == 0).
fn bi_bh_tb8(c: vec2<u32>, col: u32) -> vec4<u32> {
    return textureLoad(biu_b, vec2<u32>(col >> 3u, c.x), c.y, 0);
}

// f16 weights (th) share the bf16 loaders: H16_F16 picks the decode.
fn b_row_th(row: u32) -> vec2<u32> { return b_row_tx(row); }
fn fw_b_th(c: vec2<u32>, k: u32) -> vec4<f32> { return fw_b_tb(c, k); }
fn bi_b_th(n: u32, col: u32) -> vec4<f32> { return bi_b_tb(n, col); }
fn bi_bh_row_th(n: u32) -> vec2<u32> { return bi_bh_row_tb(n); }
fn bi_bh_th(c: vec2<u32>, col: u32) -> vec4<f32> { return bi_bh_tb(c, col); }
fn bi_bh_th8(c: vec2<u32>, col: u32) -> vec4<u32> { return bi_bh_tb8(c, col); }
fn bi_bh_tq(c: vec2<u32>, col: u32) -> vec4<f32> {
    let q = tq_word(textureLoad(biu_b, vec2<u32>(col >> TQ_SHIFT, c.x), c.y, 0), col);
    let s = textureLoad(biq_s, vec2<u32>(col / QSUB, c.x), c.y, 0);
    return s.x * quant4(q) + s.y;
}
// The whole quant texel of `col` and its (scale, offset): gen_nn decodes
// all of a lane's columns from one fetch of each when they share a texel.
fn bi_bh_tqt(c: vec2<u32>, col: u32) -> vec4<u32> {
    return textureLoad(biu_b, vec2<u32>(col >> TQ_SHIFT, c.x), c.y, 0);
}
fn bi_bh_tqs(c: vec2<u32>, col: u32) -> vec4<f32> {
    return textureLoad(biq_s, vec2<u32>(col / QSUB, c.x), c.y, 0);
}

fn bi_store(row: u32, col: u32, acc: vec4<f32>) {
    if (row >= p.m) { return; }
    if (ALIGNED) {
        if (col < p.k) { let o = (row * p.k + col) >> 2u; bi_dinp[o] += p.alpha * acc; }
        return;
    }
    for (var i = 0u; i < 4u; i++) {
        if (col + i < p.k) { let e = row * p.k + col + i; bi_dinp[e >> 2u][e & 3u] += p.alpha * acc[i]; }
    }
}

@compute @workgroup_size(WG)
fn matmul_backward_input(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32,
                         {{LANE_BUILTINS}}) {
    {{LANE_SETUP}}
    let row0 = wg.x * (RG * TM) + rg * TM;
    let col0 = wg.y * (LC * TN) + lane * TN;
    if (row0 >= p.m) { return; }  // as matmul_forward
    let mlast = p.m - 1u;
{{BI_DECL}}
    // 8 columns of the reduction per iteration: llvmpipe (lavapipe) silently
    // ends a loop after 65535 iterations, and lm_head's backward reduces over
    // the vocabulary: 262,144 (Gemma 3) in steps of 4 is 65,536 iterations.
    // Steps of 8 keep vocabularies up to 524,280 whole there.
    for (var n0 = 0u; n0 < p.n; n0 += 8u) {
        {
            let n = n0;
{{BI_BODY}}
        }
        if (n0 + 4u < p.n) {
            let n = n0 + 4u;
{{BI_BODY}}
        }
    }
{{BI_STORE}}
}

// ---------------------------------------------------------------------------
// matmul_backward_weight: differentiates out = inp . weight^T w.r.t. weight:
// dweight[n, k] += alpha * sum_m dout[m, col_off + n] * inp[m, k]
// Tile: TM weight rows x TN columns. Split-K over tokens: split z sums tokens
// [z*m_split, (z+1)*m_split) and, when splits > 1, writes its own partial
// (splits, N, K) slice; the reduce entry then adds them in index order, so
// the result is bit-reproducible without atomics.
@group(0) @binding(1) var<storage, read_write> bw_dweight: array<vec4<f32>>; // (N, K), or partials (SPLITS, N, K)
@group(0) @binding(2) var<storage, read> bw_dout: array<vec4<f32>>;          // (M, LD_DOUT)
@group(0) @binding(3) var<storage, read> bw_inp: array<vec4<f32>>;           // (M, K)

// dout[m, n..n+4] (zero past the ends).
fn bw_a_st(m: u32, n: u32) -> vec4<f32> {
    let base = m * p.ld_dout + p.col_off + n;
    if (ALIGNED) { if (n >= p.n) { return vec4<f32>(0.0); } return bw_dout[base >> 2u]; }
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (n + i < p.n) { let e = base + i; v[i] = bw_dout[e >> 2u][e & 3u]; }
    }
    return v;
}

fn bw_b_st(m: u32, col: u32) -> vec4<f32> {
    if (ALIGNED) { return bw_inp[(m * p.k + min(col, p.k - 4u)) >> 2u]; }
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (col + i < p.k) { let e = m * p.k + col + i; v[i] = bw_inp[e >> 2u][e & 3u]; }
    }
    return v;
}

// Texture sources: A = packed dout (M, N), B = packed inp (M, K);
// c = a_row_tx(m) / b_row_tx(m), computed once per token by the caller.
@group(0) @binding(2) var bwt_a: texture_2d_array<f32>;                       // packed dout (M, N)
@group(0) @binding(3) var bwt_b: texture_2d_array<f32>;                       // packed inp (M, K)

fn bw_a_tx(c: vec2<u32>, n: u32) -> vec4<f32> {
    return textureLoad(bwt_a, vec2<u32>(min(n, p.n - 1u) >> 2u, c.x), c.y, 0);
}
fn bw_b_tx(c: vec2<u32>, col: u32) -> vec4<f32> {
    return textureLoad(bwt_b, vec2<u32>(min(col, p.k - 1u) >> 2u, c.x), c.y, 0);
}

fn bw_store(z: u32, row: u32, col: u32, acc: vec4<f32>) {
    if (row >= p.n) { return; }
    // With splits, each split owns a plain (N, K) slice of the partials.
    let base = z * p.n * p.k;
    let scale = select(p.alpha, 1.0, p.splits > 1u);
    if (ALIGNED) {
        if (col >= p.k) { return; }
        let o = (base + row * p.k + col) >> 2u;
        if (p.splits > 1u) { bw_dweight[o] = acc; } else { bw_dweight[o] += scale * acc; }
        return;
    }
    for (var i = 0u; i < 4u; i++) {
        if (col + i < p.k) {
            let e = base + row * p.k + col + i;
            if (p.splits > 1u) { bw_dweight[e >> 2u][e & 3u] = acc[i]; }
            else { bw_dweight[e >> 2u][e & 3u] += scale * acc[i]; }
        }
    }
}

@compute @workgroup_size(WG)
fn matmul_backward_weight(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32,
                          {{LANE_BUILTINS}}) {
    {{LANE_SETUP}}
    let row0 = wg.x * (RG * TM) + rg * TM;
    let col0 = wg.y * (LC * TN) + lane * TN;
    if (row0 >= p.n) { return; }  // as matmul_forward (rows here are dout columns)
    let m0 = wg.z * p.m_split;
    let m1 = min(p.m, m0 + p.m_split);
{{BW_DECL}}
    for (var m = m0; m < m1; m++) {
{{BW_BODY}}
    }
{{BW_STORE}}
}

// ---------------------------------------------------------------------------
// matmul_backward_weight_reduce: dweight[i] += alpha * sum_z partials[z, i],
// z in increasing order. One invocation per element.
@group(0) @binding(1) var<storage, read_write> rd_dweight: array<f32>; // (N, K)
@group(0) @binding(2) var<storage, read> rd_partials: array<f32>;      // (SPLITS, N, K)

@compute @workgroup_size(64)
fn matmul_backward_weight_reduce(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                 @builtin(local_invocation_index) lid: u32) {
    let i = flat_wg(wg, nwg) * 64u + lid;
    let total = p.n * p.k;
    if (i >= total) { return; }
    var s = 0.0;
    for (var z = 0u; z < p.splits; z++) { s += rd_partials[z * total + i]; }
    rd_dweight[i] += p.alpha * s;
}

// {{TILED_BEGIN}} (register variants leave this section out)
// ---------------------------------------------------------------------------
// The tiled family (hardware GPUs; docs/hardware-kernels.md): the same three
// layouts, staged through workgroup memory. A 16 x 16 workgroup owns a
// BM x BN output tile (BM = 16 TM, BN = 16 TN); per K-step of BK reduction
// elements it loads an A tile and a B tile with vec4 loads through the SAME
// per-source loaders as the register kernels (so every source, compact
// weights included, works), then each invocation accumulates TM x TN outputs
// from workgroup memory. Its rows and columns are strided by 16 vec4s
// (row slots ty + 16 s, column slots tx + 16 v) so that neighbouring
// invocations read neighbouring vec4s: no bank conflicts, coalesced stores.
// Tiles are kept reduction-major ([BK][BM / 4] vec4s): one vec4 read gives
// 4 rows (or columns) at one reduction index. Out-of-range rows are clamped
// (their results are never stored) and reduction indices past the end read
// zero, so any shape works. Software adapters do not use it: there workgroup
// memory costs as much as a global load (docs/software-adapters.md).
const BK: u32 = 16u;         // reduction elements per K-step
const BM: u32 = 16u * TM;    // output rows per workgroup
const BN: u32 = 16u * TN;    // output columns per workgroup
var<workgroup> tl_a: array<vec4<f32>, 256u * TM / 4u>;   // A tile (BK, BM), = BK * BM / 4 vec4s
var<workgroup> tl_b: array<vec4<f32>, 256u * TN / 4u>;   // B tile (BK, BN)

// v = elements kk..kk+4 of the reduction at tile row r: a transposed store.
// (Written out: no loop, see the staging note below.)
fn tl_put_a(kk: u32, r: u32, v: vec4<f32>) {
    let o = kk * (BM / 4u) + (r >> 2u);
    let c = r & 3u;
    tl_a[o][c] = v.x;
    tl_a[o + BM / 4u][c] = v.y;
    tl_a[o + 2u * (BM / 4u)][c] = v.z;
    tl_a[o + 3u * (BM / 4u)][c] = v.w;
}
fn tl_put_b(kk: u32, r: u32, v: vec4<f32>) {
    let o = kk * (BN / 4u) + (r >> 2u);
    let c = r & 3u;
    tl_b[o][c] = v.x;
    tl_b[o + BN / 4u][c] = v.y;
    tl_b[o + 2u * (BN / 4u)][c] = v.z;
    tl_b[o + 3u * (BN / 4u)][c] = v.w;
}

// Staging: invocation lid stores vec4s lid, lid + 256, ... of each tile
// (TM/4 of A, TN/4 of B; the generated calls are unrolled, and so is the
// BK loop: llvmpipe ends a shader's loops after 65535 iterations in total,
// which an inner loop reaches on long reductions). `end` is the reduction
// length (tokens m1 for backward_weight).

// matmul_forward (NT): A = inp rows along k, B = weight rows along k.
fn fw_stage_a(l: u32, k0: u32, row0: u32, end: u32) {
    let r = l / (BK / 4u);
    let kk = (l % (BK / 4u)) * 4u;
    var v = vec4<f32>(0.0);
    if (k0 + kk < end) { v = fw_a_{{A}}(a_row_{{A}}(min(row0 + r, p.m - 1u)), k0 + kk); }
    tl_put_a(kk, r, v);
}
fn fw_stage_b(l: u32, k0: u32, col0: u32, end: u32) {
    let r = l / (BK / 4u);
    let kk = (l % (BK / 4u)) * 4u;
    var v = vec4<f32>(0.0);
    if (k0 + kk < end) { v = fw_b_{{B}}(b_row_{{B}}(min(col0 + r, p.n - 1u)), k0 + kk); }
    tl_put_b(kk, r, v);
}

@compute @workgroup_size(256)
fn matmul_forward_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let tx = lid % 16u;
    let ty = lid / 16u;
    let row0 = wg.y * BM;
    let col0 = wg.x * BN;
    let end = p.k;
{{TL_DECL}}
    for (var k0 = 0u; k0 < end; k0 += BK) {
{{TL_STAGE_FW}}
        workgroupBarrier();
{{TL_BODY}}
        workgroupBarrier();
    }
{{TL_FW_STORE}}
}

// matmul_backward_input (NN): A = dout rows along n, B = weight[n, cols]
// (bi_b_* read zero past the last weight row).
fn bi_stage_a(l: u32, n0: u32, row0: u32, end: u32) {
    let r = l / (BK / 4u);
    let kk = (l % (BK / 4u)) * 4u;
    var v = vec4<f32>(0.0);
    if (n0 + kk < end) { v = bi_a_{{A}}(a_row_{{A}}(min(row0 + r, p.m - 1u)), n0 + kk); }
    tl_put_a(kk, r, v);
}
fn bi_stage_b(l: u32, n0: u32, col0: u32, end: u32) {
    tl_b[l] = bi_b_{{B}}(n0 + l / (BN / 4u), col0 + 4u * (l % (BN / 4u)));
}

@compute @workgroup_size(256)
fn matmul_backward_input_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let tx = lid % 16u;
    let ty = lid / 16u;
    let row0 = wg.y * BM;
    let col0 = wg.x * BN;
    let end = p.n;
{{TL_DECL}}
    for (var k0 = 0u; k0 < end; k0 += BK) {
{{TL_STAGE_BI}}
        workgroupBarrier();
{{TL_BODY}}
        workgroupBarrier();
    }
{{TL_BI_STORE}}
}

// matmul_backward_weight (TN): A = dout[m, rows], B = inp[m, cols], tokens
// m0..m1 of split wg.z; tokens past m1 read zero.
fn bw_stage_a(l: u32, mb: u32, row0: u32, end: u32) {
    let m = mb + l / (BM / 4u);
    var v = vec4<f32>(0.0);
    if (m < end) { v = bw_a_{{A}}(a_row_{{A}}(m), row0 + 4u * (l % (BM / 4u))); }
    tl_a[l] = v;
}
fn bw_stage_b(l: u32, mb: u32, col0: u32, end: u32) {
    let m = mb + l / (BN / 4u);
    var v = vec4<f32>(0.0);
    if (m < end) { v = bw_b_{{BW_B}}(b_row_{{BW_B}}(m), col0 + 4u * (l % (BN / 4u))); }
    tl_b[l] = v;
}

@compute @workgroup_size(256)
fn matmul_backward_weight_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let tx = lid % 16u;
    let ty = lid / 16u;
    let row0 = wg.y * BM;
    let col0 = wg.x * BN;
    let m0 = wg.z * p.m_split;
    let end = min(p.m, m0 + p.m_split);
{{TL_DECL}}
    for (var k0 = m0; k0 < end; k0 += BK) {
{{TL_STAGE_BW}}
        workgroupBarrier();
{{TL_BODY}}
        workgroupBarrier();
    }
{{TL_BW_STORE}}
}
// {{TILED_END}}

// ---------------------------------------------------------------------------
// matmul_pack: dst texel (c, y, layer) of row r = a_row0 + i gets
// src[i, 4c..4c+4] (zero past the last column). One invocation per texel;
// p.m = rows of this chunk, p.k = columns, p.a_shift = layer shift of dst.
@group(0) @binding(1) var pk_dst: texture_storage_2d_array<rgba32float, write>; // packed (ROWS, COLS)
@group(0) @binding(2) var<storage, read> pk_src: array<f32>;                      // (M, K) chunk

@compute @workgroup_size(64)
fn matmul_pack(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let w4 = (p.k + 3u) / 4u;
    let i = flat_wg(wg, nwg) * 64u + lid;
    if (i >= w4 * p.m) { return; }
    let row = i / w4;
    let c = i - row * w4;
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let col = 4u * c + j;
        if (col < p.k) { v[j] = pk_src[row * p.k + col]; }
    }
    let r = tex_row(p.a_row0 + row, p.a_shift);
    textureStore(pk_dst, vec2<u32>(c, r.x), r.y, v);
}

// matmul_pack4: matmul_pack for COLS % 4 == 0, one vec4 load per texel.
@group(0) @binding(1) var pk4_dst: texture_storage_2d_array<rgba32float, write>; // packed (ROWS, COLS)
@group(0) @binding(2) var<storage, read> pk4_src: array<vec4<f32>>;                // (M, K) chunk

@compute @workgroup_size(64)
fn matmul_pack4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let w4 = p.k / 4u;
    let i = flat_wg(wg, nwg) * 64u + lid;
    if (i >= w4 * p.m) { return; }
    let row = i / w4;
    let r = tex_row(p.a_row0 + row, p.a_shift);
    textureStore(pk4_dst, vec2<u32>(i - row * w4, r.x), r.y, pk4_src[i]);
}
