// attention.wgsl: causal multi-head attention with grouped-query KV heads and
// an optional learned key/value prefix of P rows, forward and backward.
//
//   attention_forward         out, lse <- q, k, v          (online softmax)
//   attention_backward_delta  delta = rowsum(dout * out)
//   attention_backward_dq     dq += ...                    (owner: query row)
//   attention_backward_dkv    dk += ..., dv += ...         (owner: key row)
//
// Each body is written once for every source of the streamed operands (k and
// v; q and dout for dkv): this file is a template whose SRC markers (in
// double braces) src/gpu/ops/attention.rs replaces with a source tag (st:
// storage buffers, tx: packed textures), which picks the row_<src> and
// <operand>_<src> loaders below. Another source adds loaders, not bodies.
//
// Layouts (row-major): q, out, dout, dq (B, T, NH, HD); k, v, dk, dv
// (B, S, KVH, HD) with S = P + T and the prefix in rows 0..P of every batch;
// lse, delta (B, NH, T). Query head h reads KV head h / G, G = NH / KVH.
// Query t (0-based among the T real tokens) sees keys s < P + t + 1: every
// prefix key plus the real keys up to itself; with a sliding window W > 0
// only those with (P + t) - s < W (key rows are positions, prefix rows
// included, as in transformers' mask). The score scale comes in `scale`.
//
// Packed rows (segmented build): several data rows share one sequence, and
// (B, T) u32 row starts give, for every token, the index of its row's first
// token. Query t then sees the prefix keys and the real keys st(t)..t only,
// and its position (for the window) is P + t - st(t): each row attends as if
// it were alone. The plain build has st = 0 (one row per sequence) and
// src/gpu/ops/attention.rs turns the `*_row_start` bodies into buffer reads
// (fw: binding 6, dq: 8, dkv: 9, one past each kernel's others) and SEG on.
//
// Backward recomputes the probabilities from lse (nothing (T, T) is stored)
// and is split in three kernels to stay within 8 storage bindings.
//
// llvmpipe caps the loop iterations of one invocation at 65,535, summed over
// every loop the compiler did not unroll, and silently stops there (a row
// loop of HD4 = 64 is not unrolled; at HD 256 forward broke after ~480 keys,
// dq at HD 128 after ~980). So a dispatch walks only keys p.lo..p.hi
// (queries for dkv) and the host splits long sequences over several: dq, dk
// and dv accumulate anyway, and forward resumes from the (out, lse) the
// previous block stored, which is exactly the online-softmax state
// (max = lse, sum = 1, acc = out). Each
// gradient row has exactly one owner that loops over its contributions in a
// fixed order, so there are no atomics and results are bit-reproducible.
//
// Why this shape (docs/software-adapters.md): on lavapipe every storage load is
// a per-lane loop, so cost is counted in load instructions, not FMAs.
// - An invocation owns R rows (queries, or keys for dkv) and keeps them and
//   their accumulators in registers as HD4 = HD/4 vec4s each. It streams the
//   other side one row at a time, so every streamed load feeds R rows.
// - A row group is SG lanes x R rows = SG*R consecutive t (or s) of one head.
//   The whole group walks the same streamed rows (up to its last row's
//   causal bound; rows past their own bound mask the step out). With
//   subgroups of fixed size SG each lane loads only 1/SG of a streamed row
//   and `lane_get` (subgroupShuffle) hands the pieces around. The portable
//   build has SG = 1 and `lane_get` is the identity.
// - The texture source reads streamed rows with textureLoad from a packed copy
//   (texel (c, y, layer) = vec4 c of row layer * 2^shift + y, as
//   matmul_pack writes it). llvmpipe turns that into one SIMD gather instead
//   of a per-lane loop: forward at B=4, T=128, NH=9, HD=64 goes from 24 ms
//   to 8.6 ms with one row per invocation.
// - HD4 and SG are `override`s, so every loop over a row has a constant trip
//   count once the pipeline is specialised; the driver unrolls it and keeps
//   the row arrays in registers (or plain stack spills). A loop over R rows
//   is too big to be unrolled, and a dynamically indexed array of rows ends
//   up in lane-looped scratch memory (measured: 3x slower, 2-minute JIT), so
//   the R rows are four separately named local rows, passed by pointer to
//   per-row helpers, and `if (R > n)` on the override folds away when the
//   pipeline is built.

struct Params {
    b: u32,      // batch
    t: u32,      // real tokens per batch row
    nh: u32,     // query heads
    kvh: u32,    // key/value heads (divides NH)
    pre: u32,    // learned prefix rows P in front of every batch's keys
    s: u32,      // key rows S = P + T
    groups: u32, // row groups (SG lanes x R rows) this dispatch covers
    scale: f32,  // score scale (1 / sqrt(HD), or the model's)
    shift: u32,  // texture source: log2 rows per texture layer (31 = one layer)
    window: u32, // sliding window W (0: none)
    lo: u32,     // forward, dq: keys lo..hi of this dispatch; dkv: queries lo..hi
    hi: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

override WG: u32 = 64u;  // invocations per workgroup (a multiple of SG)
override SG: u32 = 1u;   // lanes per row group: 1, or the fixed subgroup size
override R: u32 = 1u;    // rows per lane: 1, 2 or 4
override HD4: u32 = 16u; // head dim / 4 (HD <= 4 * MAXC)
// Register row capacity in vec4s: an array size cannot be an override, so
// src/gpu/ops/attention.rs rewrites this line for head dims over 128.
const MAXC: u32 = 32u;
const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;
const SEG: bool = false; // SEG_BUILD

alias Row = array<vec4<f32>, MAXC>;
alias RowP = ptr<function, Row>;
alias V2P = ptr<function, vec2<f32>>;

// Value `v` held by lane `src` of this invocation's row group. The portable
// build (SG = 1) is the identity; src/gpu/ops/attention.rs swaps the body for
// `subgroupShuffle(v, src)` in the subgroup build.
fn lane_get(v: vec4<f32>, src: u32) -> vec4<f32> {
    return v; // LANE_GET
}

// Where one invocation sits: row group `grp` (< p.groups) and lane in it.
// Its rows are first + r * SG + lane for r < R, with `first` the group's
// first row inside its head (n rows per head, split in groups of SG * R).
struct Slot {
    grp: u32,   // row group
    lane: u32,  // lane in the group
    head: u32,  // grp / per: which (b, h) or (b, kvh)
    first: u32, // first row of the group inside the head
}

fn slot(wg: vec3<u32>, nwg: vec3<u32>, lid: u32, n: u32) -> Slot {
    let gi = flat_wg(wg, nwg) * WG + lid;
    let grp = gi / SG;
    let per = (n + SG * R - 1u) / (SG * R);
    return Slot(grp, gi % SG, grp / per, (grp % per) * SG * R);
}

// A lane's share of a streamed row is vec4 number i * SG + lane for
// i < share_count() (clamped to the row: spare lanes load a valid duplicate).
fn share_count() -> u32 {
    return (HD4 + SG - 1u) / SG;
}

fn share_index(i: u32, lane: u32) -> u32 {
    return min(i * SG + lane, HD4 - 1u);
}

// Handle of streamed row `row` (e.g. (b * S + j) * KVH + kh), computed once
// per row: storage, its first vec4; texture, its texel row and layer.
fn row_st(row: u32) -> u32 {
    return row * HD4;
}
fn row_tx(row: u32) -> vec2<u32> {
    return vec2<u32>(row & ((1u << p.shift) - 1u), row >> p.shift);
}

// Geometry of a query-row invocation (forward and dq): batch, head, KV
// head, its first row t (row r is t + r * SG) and the keys its group walks.
struct QGeo {
    b: u32,
    h: u32,
    kh: u32,
    t: u32,
    k0_grp: u32,
    nk_grp: u32,
    st: vec4<u32>, // row starts of rows r = 0..3 (q_starts)
}

// The group walks keys k0_grp..nk_grp: from its first row's window start
// (0 without a window) to its last row's causal bound.
fn q_geo(sl: Slot) -> QGeo {
    let h = sl.head % p.nh;
    let nk_grp = p.pre + min(sl.first + SG * R, p.t);
    let reach = p.pre + sl.first + 1u;
    // Packed rows see prefix keys from their own (lower) positions.
    let k0_grp = select(0u, reach - min(reach, p.window), p.window > 0u && !SEG);
    return QGeo(sl.head / p.nh, h, h / (p.nh / p.kvh), sl.first + sl.lane, k0_grp, nk_grp,
                vec4<u32>(0u));
}

// Row starts of token t of batch b, for each kernel's own binding. The
// plain build's bodies return 0; the segmented build's read the buffer.
fn fw_row_start(b: u32, t: u32) -> u32 {
    return 0u; // FW_SEG
}
fn dq_row_start(b: u32, t: u32) -> u32 {
    return 0u; // DQ_SEG
}
fn kv_row_start(b: u32, t: u32) -> u32 {
    return 0u; // KV_SEG
}

// Row starts of the R rows g.t + r * SG.
fn fw_starts(g: QGeo) -> vec4<u32> {
    return vec4<u32>(fw_row_start(g.b, g.t), fw_row_start(g.b, g.t + SG),
                     fw_row_start(g.b, g.t + 2u * SG), fw_row_start(g.b, g.t + 3u * SG));
}
fn dq_starts(g: QGeo) -> vec4<u32> {
    return vec4<u32>(dq_row_start(g.b, g.t), dq_row_start(g.b, g.t + SG),
                     dq_row_start(g.b, g.t + 2u * SG), dq_row_start(g.b, g.t + 3u * SG));
}

// Row t, whose data row starts at token st, sees key j iff j is a prefix
// key or st <= j - P <= t, and, with a window, its distance from the row's
// position P + t - st is under W (for real keys that is (P + t) - j < W).
// With st = 0: j < P + t + 1 and (P + t) - j < W.
fn sees(j: u32, t: u32, st: u32) -> bool {
    if (j < p.pre) {
        return p.window == 0u || p.pre + t - st - j < p.window;
    }
    let i = j - p.pre;
    return i >= st && i <= t && (p.window == 0u || p.pre + t - j < p.window);
}

// ---------------------------------------------------------------------------
// attention_forward: out[b,t,h] = sum_s softmax_s(scale * q.k_s) v_s over the
// visible keys s < P + t + 1; lse[b,h,t] = log sum_s exp(scale * q.k_s).
// One invocation per R query rows; a row group is SG*R consecutive t of one
// (b, h) (rows past T compute t = T-1 and do not store). Online softmax in
// base 2 with the finite sentinel NEG_BIG: a masked step leaves the state
// as is (corr = 1, p = 0), and the row's first visible key replaces the
// sentinel max (corr = 0). Every row sees at least its own key.
@group(0) @binding(1) var<storage, read_write> fw_out: array<vec4<f32>>; // (B, T, NH, HD)
@group(0) @binding(2) var<storage, read_write> fw_lse: array<f32>;       // (B, NH, T)
@group(0) @binding(3) var<storage, read> fw_q: array<vec4<f32>>;         // (B, T, NH, HD)
@group(0) @binding(4) var<storage, read> fw_k: array<vec4<f32>>;         // (B, S, KVH, HD)
@group(0) @binding(5) var<storage, read> fw_v: array<vec4<f32>>;         // (B, S, KVH, HD)
// Texture source: bindings 4 and 5 are packed textures instead.
@group(0) @binding(4) var fwx_k: texture_2d_array<f32>;                  // packed (B*S*KVH, HD)
@group(0) @binding(5) var fwx_v: texture_2d_array<f32>;                  // packed (B*S*KVH, HD)
// Segmented build: row starts.
@group(0) @binding(6) var<storage, read> fw_seg: array<u32>;             // (B, T)

// Vec4 `i` of streamed k / v row `h` (a row_<src> handle).
fn fw_k_st(h: u32, i: u32) -> vec4<f32> { return fw_k[h + i]; }
fn fw_v_st(h: u32, i: u32) -> vec4<f32> { return fw_v[h + i]; }
fn fw_k_tx(h: vec2<u32>, i: u32) -> vec4<f32> { return textureLoad(fwx_k, vec2<u32>(i, h.x), h.y, 0); }
fn fw_v_tx(h: vec2<u32>, i: u32) -> vec4<f32> { return textureLoad(fwx_v, vec2<u32>(i, h.x), h.y, 0); }

// Load query row `t` (clamped) pre-scaled to log2 units; reset its state,
// or resume it from the previous key block's (out, lse).
fn fw_init(q: RowP, acc: RowP, ml: V2P, b: u32, h: u32, t: u32) {
    let tc = min(t, p.t - 1u);
    let base = ((b * p.t + tc) * p.nh + h) * HD4;
    let c2 = p.scale * LOG2E;
    let lse = fw_lse[(b * p.nh + h) * p.t + tc];
    // A row that saw no key yet stored NEG_BIG (fw_finish).
    let resume = p.lo > 0u && lse > 0.5 * NEG_BIG;
    for (var c = 0u; c < HD4; c++) {
        (*q)[c] = fw_q[base + c] * c2;
        (*acc)[c] = select(vec4<f32>(0.0), fw_out[base + c], resume);
    }
    *ml = select(vec2<f32>(NEG_BIG, 0.0), vec2<f32>(lse * LOG2E, 1.0), resume);
}

// One online-softmax step of a row against the key/value shares kr, vr.
// A key past the row's causal bound (live = false) leaves the state as is.
fn fw_step(q: RowP, acc: RowP, ml: V2P, kr: RowP, vr: RowP, live: bool) {
    var sc = 0.0;
    for (var c = 0u; c < HD4; c++) {
        sc += dot((*q)[c], lane_get((*kr)[c / SG], c % SG));
    }
    // Raise the running max if needed and rescale the old sum and output by
    // exp2(m - m_new) (= 1 when the max did not move).
    let m = (*ml).x;
    let m_new = select(m, max(m, sc), live);
    let corr = exp2(m - m_new);
    let pj = select(0.0, exp2(sc - m_new), live);
    *ml = vec2<f32>(m_new, (*ml).y * corr + pj);
    for (var c = 0u; c < HD4; c++) {
        (*acc)[c] = (*acc)[c] * corr + pj * lane_get((*vr)[c / SG], c % SG);
    }
}

// Normalise and store row `t` unless it is padding.
fn fw_finish(acc: RowP, ml: vec2<f32>, b: u32, h: u32, t: u32) {
    if (t >= p.t) { return; }
    let base = ((b * p.t + t) * p.nh + h) * HD4;
    // >= 1 once a key was seen (the max key contributes exp2(0)); 0 while a
    // row's keys are all in later blocks.
    let seen = ml.y > 0.0;
    let inv = select(0.0, 1.0 / ml.y, seen);
    for (var c = 0u; c < HD4; c++) {
        fw_out[base + c] = (*acc)[c] * inv;
    }
    fw_lse[(b * p.nh + h) * p.t + t] = select(NEG_BIG, (ml.x + log2(ml.y)) * LN2, seen);
}

// The R-row helpers take rows r = 0..3 as separate pointers (not a struct
// or an array of rows: naga's SPIR-V writer cannot pass a pointer to a
// struct field, and private variables or arrays of rows stay in memory).
// Rows r < R of one invocation: q (log2 units), a (output accumulator),
// m = (running max, running sum of exp2(score - max)).
fn fw_begin(q0: RowP, q1: RowP, q2: RowP, q3: RowP, a0: RowP, a1: RowP, a2: RowP, a3: RowP,
            m0: V2P, m1: V2P, m2: V2P, m3: V2P, g: QGeo) {
    fw_init(q0, a0, m0, g.b, g.h, g.t);
    if (R > 1u) { fw_init(q1, a1, m1, g.b, g.h, g.t + SG); }
    if (R > 2u) {
        fw_init(q2, a2, m2, g.b, g.h, g.t + 2u * SG);
        fw_init(q3, a3, m3, g.b, g.h, g.t + 3u * SG);
    }
}

// Key j (shares kr, vr) for every row.
fn fw_key(q0: RowP, q1: RowP, q2: RowP, q3: RowP, a0: RowP, a1: RowP, a2: RowP, a3: RowP,
          m0: V2P, m1: V2P, m2: V2P, m3: V2P, kr: RowP, vr: RowP, j: u32, g: QGeo) {
    fw_step(q0, a0, m0, kr, vr, sees(j, g.t, g.st.x));
    if (R > 1u) { fw_step(q1, a1, m1, kr, vr, sees(j, g.t + SG, g.st.y)); }
    if (R > 2u) {
        fw_step(q2, a2, m2, kr, vr, sees(j, g.t + 2u * SG, g.st.z));
        fw_step(q3, a3, m3, kr, vr, sees(j, g.t + 3u * SG, g.st.w));
    }
}

fn fw_end(a0: RowP, a1: RowP, a2: RowP, a3: RowP, m0: vec2<f32>, m1: vec2<f32>, m2: vec2<f32>, m3: vec2<f32>, g: QGeo) {
    fw_finish(a0, m0, g.b, g.h, g.t);
    if (R > 1u) { fw_finish(a1, m1, g.b, g.h, g.t + SG); }
    if (R > 2u) {
        fw_finish(a2, m2, g.b, g.h, g.t + 2u * SG);
        fw_finish(a3, m3, g.b, g.h, g.t + 3u * SG);
    }
}

// attention_forward: each lane loads its share of a key/value row, then
// every row of the group takes the step.
@compute @workgroup_size(WG)
fn attention_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let sl = slot(wg, nwg, lid, p.t);
    // Whole row groups are live or dead together (WG % SG == 0).
    if (sl.grp >= p.groups) { return; }
    var g = q_geo(sl);
    g.st = fw_starts(g);
    var q0: Row; var q1: Row; var q2: Row; var q3: Row;
    var a0: Row; var a1: Row; var a2: Row; var a3: Row;
    var m0: vec2<f32>; var m1: vec2<f32>; var m2: vec2<f32>; var m3: vec2<f32>;
    fw_begin(&q0, &q1, &q2, &q3, &a0, &a1, &a2, &a3, &m0, &m1, &m2, &m3, g);
    // Keys in order, as the CPU twin's softmax sums them, rescaled online.
    for (var j = max(g.k0_grp, p.lo); j < min(g.nk_grp, p.hi); j++) {
        let hr = row_{{SRC}}((g.b * p.s + j) * p.kvh + g.kh);
        var kr: Row;
        var vr: Row;
        for (var i = 0u; i < share_count(); i++) {
            kr[i] = fw_k_{{SRC}}(hr, share_index(i, sl.lane));
            vr[i] = fw_v_{{SRC}}(hr, share_index(i, sl.lane));
        }
        fw_key(&q0, &q1, &q2, &q3, &a0, &a1, &a2, &a3, &m0, &m1, &m2, &m3, &kr, &vr, j, g);
    }
    fw_end(&a0, &a1, &a2, &a3, m0, m1, m2, m3, g);
}

// ---------------------------------------------------------------------------
// attention_backward_delta: delta[b,h,t] = sum_d dout[b,t,h,d] * out[b,t,h,d],
// the softmax-backward row term (sum_s p_s dp_s = dout . out).
// One invocation per (b, h, t); SG and R are unused here.
@group(0) @binding(1) var<storage, read_write> de_delta: array<f32>;   // (B, NH, T)
@group(0) @binding(2) var<storage, read> de_dout: array<vec4<f32>>;    // (B, T, NH, HD)
@group(0) @binding(3) var<storage, read> de_out: array<vec4<f32>>;     // (B, T, NH, HD)

@compute @workgroup_size(WG)
fn attention_backward_delta(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wg, nwg) * WG + lid;   // (b * NH + h) * T + t
    if (row >= p.b * p.nh * p.t) { return; }
    let t = row % p.t;
    let bh = row / p.t;
    let base = (((bh / p.nh) * p.t + t) * p.nh + bh % p.nh) * HD4;
    var s = vec4<f32>(0.0);
    for (var c = 0u; c < HD4; c++) {
        s += de_dout[base + c] * de_out[base + c];
    }
    de_delta[row] = s.x + s.y + s.z + s.w;
}

// ---------------------------------------------------------------------------
// attention_backward_dq: differentiates
//     sc_s = scale * q . k_s;  p_s = exp(sc_s - lse);  out = sum_s p_s v_s
// for the query: dp_s = dout . v_s, ds_s = p_s (dp_s - delta),
//     dq += scale * sum_s ds_s k_s        (s ascending, s < P + t + 1).
// Geometry as attention_forward: R query rows per invocation, SG*R-row groups.
@group(0) @binding(1) var<storage, read_write> dq_dq: array<vec4<f32>>; // (B, T, NH, HD)
@group(0) @binding(2) var<storage, read> dq_dout: array<vec4<f32>>;     // (B, T, NH, HD)
@group(0) @binding(3) var<storage, read> dq_q: array<vec4<f32>>;        // (B, T, NH, HD)
@group(0) @binding(4) var<storage, read> dq_k: array<vec4<f32>>;        // (B, S, KVH, HD)
@group(0) @binding(5) var<storage, read> dq_v: array<vec4<f32>>;        // (B, S, KVH, HD)
@group(0) @binding(6) var<storage, read> dq_lse: array<f32>;            // (B, NH, T)
@group(0) @binding(7) var<storage, read> dq_delta: array<f32>;          // (B, NH, T)
// Texture source: bindings 4 and 5 are packed textures instead.
@group(0) @binding(4) var dqx_k: texture_2d_array<f32>;                 // packed (B*S*KVH, HD)
@group(0) @binding(5) var dqx_v: texture_2d_array<f32>;                 // packed (B*S*KVH, HD)
@group(0) @binding(8) var<storage, read> dq_seg: array<u32>;            // (B, T), segmented build

fn dq_k_st(h: u32, i: u32) -> vec4<f32> { return dq_k[h + i]; }
fn dq_v_st(h: u32, i: u32) -> vec4<f32> { return dq_v[h + i]; }
fn dq_k_tx(h: vec2<u32>, i: u32) -> vec4<f32> { return textureLoad(dqx_k, vec2<u32>(i, h.x), h.y, 0); }
fn dq_v_tx(h: vec2<u32>, i: u32) -> vec4<f32> { return textureLoad(dqx_v, vec2<u32>(i, h.x), h.y, 0); }

// Load query row `t` (clamped) with its dout row, lse and delta; clear dq.
fn dq_init(q: RowP, go: RowP, acc: RowP, ld: V2P, b: u32, h: u32, t: u32) {
    let tc = min(t, p.t - 1u);
    let base = ((b * p.t + tc) * p.nh + h) * HD4;
    let c2 = p.scale * LOG2E;
    for (var c = 0u; c < HD4; c++) {
        (*q)[c] = dq_q[base + c] * c2;
        (*go)[c] = dq_dout[base + c];
        (*acc)[c] = vec4<f32>(0.0);
    }
    let row = (b * p.nh + h) * p.t + tc;
    *ld = vec2<f32>(dq_lse[row] * LOG2E, dq_delta[row]);
}

// acc += ds * k for one key (shares kr, vr); live = visible to this row.
fn dq_step(q: RowP, go: RowP, acc: RowP, ld: vec2<f32>, kr: RowP, vr: RowP, live: bool) {
    var sc = 0.0;
    var dp = 0.0;
    for (var c = 0u; c < HD4; c++) {
        sc += dot((*q)[c], lane_get((*kr)[c / SG], c % SG));
        dp += dot((*go)[c], lane_get((*vr)[c / SG], c % SG));
    }
    // p = exp(scale q.k - lse) = exp2(sc - lse * log2 e), as forward saw it.
    let pj = select(0.0, exp2(sc - ld.x), live);
    let ds = pj * (dp - ld.y);
    for (var c = 0u; c < HD4; c++) {
        (*acc)[c] += ds * lane_get((*kr)[c / SG], c % SG);
    }
}

// dq += scale * acc for row `t` unless it is padding.
fn dq_finish(acc: RowP, b: u32, h: u32, t: u32) {
    if (t >= p.t) { return; }
    let base = ((b * p.t + t) * p.nh + h) * HD4;
    for (var c = 0u; c < HD4; c++) {
        dq_dq[base + c] += (*acc)[c] * p.scale;
    }
}

// Rows r < R: q (log2 units), o (dout), a (dq accumulator), l = (lse in
// log2 units, delta).
fn dq_begin(q0: RowP, q1: RowP, q2: RowP, q3: RowP, o0: RowP, o1: RowP, o2: RowP, o3: RowP,
            a0: RowP, a1: RowP, a2: RowP, a3: RowP, l0: V2P, l1: V2P, l2: V2P, l3: V2P, g: QGeo) {
    dq_init(q0, o0, a0, l0, g.b, g.h, g.t);
    if (R > 1u) { dq_init(q1, o1, a1, l1, g.b, g.h, g.t + SG); }
    if (R > 2u) {
        dq_init(q2, o2, a2, l2, g.b, g.h, g.t + 2u * SG);
        dq_init(q3, o3, a3, l3, g.b, g.h, g.t + 3u * SG);
    }
}

// Key j (shares kr, vr) for every row; each row's dq sums keys ascending.
fn dq_key(q0: RowP, q1: RowP, q2: RowP, q3: RowP, o0: RowP, o1: RowP, o2: RowP, o3: RowP,
          a0: RowP, a1: RowP, a2: RowP, a3: RowP, l0: vec2<f32>, l1: vec2<f32>, l2: vec2<f32>, l3: vec2<f32>,
          kr: RowP, vr: RowP, j: u32, g: QGeo) {
    dq_step(q0, o0, a0, l0, kr, vr, sees(j, g.t, g.st.x));
    if (R > 1u) { dq_step(q1, o1, a1, l1, kr, vr, sees(j, g.t + SG, g.st.y)); }
    if (R > 2u) {
        dq_step(q2, o2, a2, l2, kr, vr, sees(j, g.t + 2u * SG, g.st.z));
        dq_step(q3, o3, a3, l3, kr, vr, sees(j, g.t + 3u * SG, g.st.w));
    }
}

fn dq_end(a0: RowP, a1: RowP, a2: RowP, a3: RowP, g: QGeo) {
    dq_finish(a0, g.b, g.h, g.t);
    if (R > 1u) { dq_finish(a1, g.b, g.h, g.t + SG); }
    if (R > 2u) {
        dq_finish(a2, g.b, g.h, g.t + 2u * SG);
        dq_finish(a3, g.b, g.h, g.t + 3u * SG);
    }
}

// attention_backward_dq: keys ascending.
@compute @workgroup_size(WG)
fn attention_backward_dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let sl = slot(wg, nwg, lid, p.t);
    if (sl.grp >= p.groups) { return; }
    var g = q_geo(sl);
    g.st = dq_starts(g);
    var q0: Row; var q1: Row; var q2: Row; var q3: Row;
    var o0: Row; var o1: Row; var o2: Row; var o3: Row;
    var a0: Row; var a1: Row; var a2: Row; var a3: Row;
    var l0: vec2<f32>; var l1: vec2<f32>; var l2: vec2<f32>; var l3: vec2<f32>;
    dq_begin(&q0, &q1, &q2, &q3, &o0, &o1, &o2, &o3, &a0, &a1, &a2, &a3, &l0, &l1, &l2, &l3, g);
    for (var j = max(g.k0_grp, p.lo); j < min(g.nk_grp, p.hi); j++) {
        let hr = row_{{SRC}}((g.b * p.s + j) * p.kvh + g.kh);
        var kr: Row;
        var vr: Row;
        for (var i = 0u; i < share_count(); i++) {
            kr[i] = dq_k_{{SRC}}(hr, share_index(i, sl.lane));
            vr[i] = dq_v_{{SRC}}(hr, share_index(i, sl.lane));
        }
        dq_key(&q0, &q1, &q2, &q3, &o0, &o1, &o2, &o3, &a0, &a1, &a2, &a3, l0, l1, l2, l3, &kr, &vr, j, g);
    }
    dq_end(&a0, &a1, &a2, &a3, g);
}

// ---------------------------------------------------------------------------
// attention_backward_dkv: differentiates the same lines as _dq for a key:
//     dv_s += sum_{h,t} p_{h,t,s} dout_{h,t}
//     dk_s += scale * sum_{h,t} ds_{h,t,s} q_{h,t}
// over the G query heads of the key's KV head (h ascending) and the queries
// that see it (t ascending, P + t >= s). Prefix rows (s < P) get every query
// of their own batch; summing them over the batch is another kernel's job.
// One invocation per R key rows; a row group is SG*R consecutive s of one
// (b, kvh) (rows past S compute s = S-1 and do not store).
@group(0) @binding(1) var<storage, read_write> kv_dk: array<vec4<f32>>; // (B, S, KVH, HD)
@group(0) @binding(2) var<storage, read_write> kv_dv: array<vec4<f32>>; // (B, S, KVH, HD)
@group(0) @binding(3) var<storage, read> kv_dout: array<vec4<f32>>;     // (B, T, NH, HD)
@group(0) @binding(4) var<storage, read> kv_q: array<vec4<f32>>;        // (B, T, NH, HD)
@group(0) @binding(5) var<storage, read> kv_k: array<vec4<f32>>;        // (B, S, KVH, HD)
@group(0) @binding(6) var<storage, read> kv_v: array<vec4<f32>>;        // (B, S, KVH, HD)
@group(0) @binding(7) var<storage, read> kv_lse: array<f32>;            // (B, NH, T)
@group(0) @binding(8) var<storage, read> kv_delta: array<f32>;          // (B, NH, T)
// Texture source: bindings 3 and 4 are packed textures instead.
@group(0) @binding(3) var kvx_dout: texture_2d_array<f32>;              // packed (B*T*NH, HD)
@group(0) @binding(4) var kvx_q: texture_2d_array<f32>;                 // packed (B*T*NH, HD)
@group(0) @binding(9) var<storage, read> kv_seg: array<u32>;            // (B, T), segmented build

fn kv_dout_st(h: u32, i: u32) -> vec4<f32> { return kv_dout[h + i]; }
fn kv_q_st(h: u32, i: u32) -> vec4<f32> { return kv_q[h + i]; }
fn kv_dout_tx(h: vec2<u32>, i: u32) -> vec4<f32> { return textureLoad(kvx_dout, vec2<u32>(i, h.x), h.y, 0); }
fn kv_q_tx(h: vec2<u32>, i: u32) -> vec4<f32> { return textureLoad(kvx_q, vec2<u32>(i, h.x), h.y, 0); }

// Geometry of a key-row invocation: batch, KV head, first row s (row r is
// s + r * SG) and the queries its group walks: key s is seen by queries
// t >= s - P (all of them for prefix keys), so the group starts at its first
// key's bound; with a window W only by t < s + W - P, so it ends at its
// last key's.
struct KGeo {
    b: u32,
    kh: u32,
    s: u32,
    t_grp: u32,
    t_end: u32,
}

fn k_geo(sl: Slot) -> KGeo {
    let last = sl.first + SG * R - 1u;
    let t_end = select(p.t, min(p.t, max(last + p.window, p.pre) - p.pre), p.window > 0u && !SEG);
    return KGeo(sl.head / p.kvh, sl.head % p.kvh, sl.first + sl.lane,
                max(sl.first, p.pre) - p.pre, t_end);
}

// Load key/value row `s` (clamped; k in log2 units); clear dk, dv.
fn kv_init(kk: RowP, vv: RowP, dk: RowP, dv: RowP, b: u32, kh: u32, s: u32) {
    let base = ((b * p.s + min(s, p.s - 1u)) * p.kvh + kh) * HD4;
    let c2 = p.scale * LOG2E;
    for (var c = 0u; c < HD4; c++) {
        (*kk)[c] = kv_k[base + c] * c2;
        (*vv)[c] = kv_v[base + c];
        (*dk)[c] = vec4<f32>(0.0);
        (*dv)[c] = vec4<f32>(0.0);
    }
}

// dv += p * dout, dk += ds * q for one query (shares qr, gr; ld = (lse in
// log2 units, delta)); live = the query sees this key.
fn kv_step(kk: RowP, vv: RowP, dk: RowP, dv: RowP, qr: RowP, gr: RowP, ld: vec2<f32>, live: bool) {
    var sc = 0.0;
    var dp = 0.0;
    for (var c = 0u; c < HD4; c++) {
        sc += dot((*kk)[c], lane_get((*qr)[c / SG], c % SG));
        dp += dot((*vv)[c], lane_get((*gr)[c / SG], c % SG));
    }
    // The same probability and ds as in dq_step, seen from the key side.
    let pj = select(0.0, exp2(sc - ld.x), live);
    let ds = pj * (dp - ld.y);
    for (var c = 0u; c < HD4; c++) {
        (*dv)[c] += pj * lane_get((*gr)[c / SG], c % SG);
        (*dk)[c] += ds * lane_get((*qr)[c / SG], c % SG);
    }
}

// dk += scale * dk_acc, dv += dv_acc for row `s` unless it is padding.
fn kv_finish(dk: RowP, dv: RowP, b: u32, kh: u32, s: u32) {
    if (s >= p.s) { return; }
    let base = ((b * p.s + s) * p.kvh + kh) * HD4;
    for (var c = 0u; c < HD4; c++) {
        kv_dk[base + c] += (*dk)[c] * p.scale;
        kv_dv[base + c] += (*dv)[c];
    }
}

// Rows r < R: k (log2 units), v, dk and dv accumulators (x, y).
fn kv_begin(k0: RowP, k1: RowP, k2: RowP, k3: RowP, v0: RowP, v1: RowP, v2: RowP, v3: RowP,
            x0: RowP, x1: RowP, x2: RowP, x3: RowP, y0: RowP, y1: RowP, y2: RowP, y3: RowP, g: KGeo) {
    kv_init(k0, v0, x0, y0, g.b, g.kh, g.s);
    if (R > 1u) { kv_init(k1, v1, x1, y1, g.b, g.kh, g.s + SG); }
    if (R > 2u) {
        kv_init(k2, v2, x2, y2, g.b, g.kh, g.s + 2u * SG);
        kv_init(k3, v3, x3, y3, g.b, g.kh, g.s + 3u * SG);
    }
}

// Query t of head h (shares qr, gr) for every row: key s' is visible to
// query t iff sees(s', t).
fn kv_query(k0: RowP, k1: RowP, k2: RowP, k3: RowP, v0: RowP, v1: RowP, v2: RowP, v3: RowP,
            x0: RowP, x1: RowP, x2: RowP, x3: RowP, y0: RowP, y1: RowP, y2: RowP, y3: RowP,
            qr: RowP, gr: RowP, h: u32, t: u32, g: KGeo) {
    let row = (g.b * p.nh + h) * p.t + t;
    let ld = vec2<f32>(kv_lse[row] * LOG2E, kv_delta[row]);
    // Rows past S (clamped loads, never stored) are never live.
    let lim = p.pre + t + 1u;
    let st = kv_row_start(g.b, t);
    kv_step(k0, v0, x0, y0, qr, gr, ld, g.s < lim && sees(g.s, t, st));
    if (R > 1u) { kv_step(k1, v1, x1, y1, qr, gr, ld, g.s + SG < lim && sees(g.s + SG, t, st)); }
    if (R > 2u) {
        kv_step(k2, v2, x2, y2, qr, gr, ld, g.s + 2u * SG < lim && sees(g.s + 2u * SG, t, st));
        kv_step(k3, v3, x3, y3, qr, gr, ld, g.s + 3u * SG < lim && sees(g.s + 3u * SG, t, st));
    }
}

fn kv_end(x0: RowP, x1: RowP, x2: RowP, x3: RowP, y0: RowP, y1: RowP, y2: RowP, y3: RowP, g: KGeo) {
    kv_finish(x0, y0, g.b, g.kh, g.s);
    if (R > 1u) { kv_finish(x1, y1, g.b, g.kh, g.s + SG); }
    if (R > 2u) {
        kv_finish(x2, y2, g.b, g.kh, g.s + 2u * SG);
        kv_finish(x3, y3, g.b, g.kh, g.s + 3u * SG);
    }
}

// attention_backward_dkv: each (head, query) step also reads that query's
// lse and delta (always from buffers).
@compute @workgroup_size(WG)
fn attention_backward_dkv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let sl = slot(wg, nwg, lid, p.s);
    if (sl.grp >= p.groups) { return; }
    let g = k_geo(sl);
    let gs = p.nh / p.kvh;
    var k0: Row; var k1: Row; var k2: Row; var k3: Row;
    var v0: Row; var v1: Row; var v2: Row; var v3: Row;
    var x0: Row; var x1: Row; var x2: Row; var x3: Row;
    var y0: Row; var y1: Row; var y2: Row; var y3: Row;
    kv_begin(&k0, &k1, &k2, &k3, &v0, &v1, &v2, &v3, &x0, &x1, &x2, &x3, &y0, &y1, &y2, &y3, g);
    // The fixed summation order: query heads of the group, then queries.
    for (var h = g.kh * gs; h < (g.kh + 1u) * gs; h++) {
        for (var t = max(g.t_grp, p.lo); t < min(g.t_end, p.hi); t++) {
            let hr = row_{{SRC}}((g.b * p.t + t) * p.nh + h);
            var qr: Row;
            var gr: Row;
            for (var i = 0u; i < share_count(); i++) {
                qr[i] = kv_q_{{SRC}}(hr, share_index(i, sl.lane));
                gr[i] = kv_dout_{{SRC}}(hr, share_index(i, sl.lane));
            }
            kv_query(&k0, &k1, &k2, &k3, &v0, &v1, &v2, &v3, &x0, &x1, &x2, &x3, &y0, &y1, &y2, &y3, &qr, &gr, h, t, g);
        }
    }
    kv_end(&x0, &x1, &x2, &x3, &y0, &y1, &y2, &y3, g);
}

// ---------------------------------------------------------------------------
// Decode: one new query row per head against a KV cache whose length is in
// a buffer, so one recorded step serves every position (a plan recorded
// once per cache capacity; generation replays it per token). The query sits
// at position pos = dc_pos[0] and sees cache rows 0..=pos (prefix rows
// included, as in attention_forward with P = pos, T = 1), or with a window
// W only those with pos - j < W. Split-K ("flash decoding"): the keys are
// cut in chunks of DCH rows, each (head, chunk) invocation keeps an online
// softmax state, and attention_decode_combine merges the chunks in order.
// Chunks past pos do nothing. Uses p.nh, p.kvh, p.s (cache rows, CAP),
// p.groups (chunks = ceil(CAP / DCH)), p.scale, p.window; storage only.
override DCH: u32 = 64u; // keys per chunk

@group(0) @binding(1) var<storage, read_write> dp_part: array<vec4<f32>>; // (NH, CHUNKS, HD4 + 1): acc, then (max, sum, 0, 0)
@group(0) @binding(2) var<storage, read> dp_q: array<vec4<f32>>;          // (1, 1, NH, HD)
@group(0) @binding(3) var<storage, read> dp_k: array<vec4<f32>>;          // (1, CAP, KVH, HD)
@group(0) @binding(4) var<storage, read> dp_v: array<vec4<f32>>;          // (1, CAP, KVH, HD)
@group(0) @binding(5) var<storage, read> dp_pos: array<u32>;              // (1): the query's position

@compute @workgroup_size(WG)
fn attention_decode(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let gi = flat_wg(wg, nwg) * WG + lid;
    if (gi >= p.nh * p.groups) { return; }
    let h = gi / p.groups;
    let ch = gi % p.groups;
    let kh = h / (p.nh / p.kvh);
    let pos = min(dp_pos[0], p.s - 1u);
    var lo = ch * DCH;
    if (p.window > 0u && pos + 1u > p.window) { lo = max(lo, pos + 1u - p.window); }
    let hi = min(ch * DCH + DCH, pos + 1u);
    var q: Row;
    var acc: Row;
    let c2 = p.scale * LOG2E;
    for (var c = 0u; c < HD4; c++) {
        q[c] = dp_q[h * HD4 + c] * c2;
        acc[c] = vec4<f32>(0.0);
    }
    var m = NEG_BIG;
    var l = 0.0;
    for (var j = lo; j < hi; j++) {
        let base = (j * p.kvh + kh) * HD4;
        var sc = 0.0;
        for (var c = 0u; c < HD4; c++) {
            sc += dot(q[c], dp_k[base + c]);
        }
        let m_new = max(m, sc);
        let corr = exp2(m - m_new);
        let pj = exp2(sc - m_new);
        l = l * corr + pj;
        for (var c = 0u; c < HD4; c++) {
            acc[c] = acc[c] * corr + pj * dp_v[base + c];
        }
        m = m_new;
    }
    let out = gi * (HD4 + 1u);
    for (var c = 0u; c < HD4; c++) {
        dp_part[out + c] = acc[c];
    }
    dp_part[out + HD4] = vec4<f32>(m, l, 0.0, 0.0);
}

// attention_decode_combine: out[h] = sum_c acc_c 2^(m_c - M) / L and
// lse[h] = (M + log2 L) ln 2, with M = max_c m_c, L = sum_c l_c 2^(m_c - M),
// chunks in ascending order. One invocation per (head, vec4 of the row).
@group(0) @binding(1) var<storage, read_write> dm_out: array<vec4<f32>>;  // (1, 1, NH, HD)
@group(0) @binding(2) var<storage, read_write> dm_lse: array<f32>;        // (1, NH, 1)
@group(0) @binding(3) var<storage, read> dm_part: array<vec4<f32>>;       // (NH, CHUNKS, HD4 + 1)

@compute @workgroup_size(WG)
fn attention_decode_combine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) lid: u32) {
    let gi = flat_wg(wg, nwg) * WG + lid;
    if (gi >= p.nh * HD4) { return; }
    let h = gi / HD4;
    let c = gi % HD4;
    let first = h * p.groups;
    var mx = NEG_BIG;
    for (var ch = 0u; ch < p.groups; ch++) {
        mx = max(mx, dm_part[(first + ch) * (HD4 + 1u) + HD4].x);
    }
    var l = 0.0;
    var acc = vec4<f32>(0.0);
    for (var ch = 0u; ch < p.groups; ch++) {
        let at = (first + ch) * (HD4 + 1u);
        let ml = dm_part[at + HD4];
        // Empty chunks hold (NEG_BIG, 0) and weigh 0.
        let w = select(0.0, exp2(ml.x - mx), ml.y > 0.0);
        l += ml.y * w;
        acc += dm_part[at + c] * w;
    }
    dm_out[gi] = acc / l;
    if (c == 0u) {
        dm_lse[h] = (mx + log2(l)) * LN2;
    }
}
