// attention.wgsl: causal multi-head attention with grouped-query KV heads and
// an optional learned key/value prefix of P rows, forward and backward.
//
//   attention_forward         out, lse <- q, k, v          (online softmax)
//   attention_backward_delta  delta = rowsum(dout * out)
//   attention_backward_dq     dq += ...                    (owner: query row)
//   attention_backward_dkv    dk += ..., dv += ...         (owner: key row)
//
// Layouts (row-major): q, out, dout, dq (B, T, NH, HD); k, v, dk, dv
// (B, S, KVH, HD) with S = P + T and the prefix in rows 0..P of every batch;
// lse, delta (B, NH, T). Query head h reads KV head h / G, G = NH / KVH.
// Query t (0-based among the T real tokens) sees keys s < P + t + 1: every
// prefix key plus the real keys up to itself. Scale 1/sqrt(HD).
//
// Backward recomputes the probabilities from lse (nothing (T, T) is stored)
// and is split in three kernels to stay within 8 storage bindings. Each
// gradient row has exactly one owner that loops over its contributions in a
// fixed order, so there are no atomics and results are bit-reproducible.
//
// Why this shape (shared/docs/lavapipe.md): on lavapipe every storage load is
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
// - HD4, SG and R are `override`s, so every loop over a row or over R has a
//   constant trip count once the pipeline is specialised; the driver unrolls
//   them and keeps the arrays in registers (or plain stack spills).

struct Params {
    b: u32,      // batch
    t: u32,      // real tokens per batch row
    nh: u32,     // query heads
    kvh: u32,    // key/value heads (divides NH)
    pre: u32,    // learned prefix rows P in front of every batch's keys
    s: u32,      // key rows S = P + T
    groups: u32, // row groups (SG lanes x R rows) this dispatch covers
    scale: f32,  // 1 / sqrt(HD)
}

@group(0) @binding(0) var<uniform> p: Params;

override WG: u32 = 64u;  // invocations per workgroup (a multiple of SG)
override SG: u32 = 1u;   // lanes per row group: 1, or the fixed subgroup size
override R: u32 = 1u;    // rows per lane (<= MAXR)
override HD4: u32 = 16u; // head dim / 4 (HD <= 128)
const MAXC: u32 = 32u;   // register row capacity in vec4s (HD <= 128)
const MAXR: u32 = 8u;    // largest R
const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;

alias Row = array<vec4<f32>, MAXC>;
alias Rows = array<Row, MAXR>;
alias Scalars = array<f32, MAXR>;

// Value `v` held by lane `src` of this invocation's row group. The portable
// build (SG = 1) is the identity; src/gpu/ops/attention.rs swaps the body for
// `subgroupShuffle(v, src)` in the subgroup build.
fn lane_get(v: vec4<f32>, src: u32) -> vec4<f32> {
    return v; // LANE_GET
}

// Where one invocation sits: row group `grp` (< p.groups) and lane in it.
// Its rows are first + r * SG + lane for r < R, with first = the group's
// first row inside its head (`per` row groups per head, `n` rows per head).
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

// ---------------------------------------------------------------------------
// attention_forward: out[b,t,h] = sum_s softmax_s(scale * q.k_s) v_s over the
// visible keys s < P + t + 1; lse[b,h,t] = log sum_s exp(scale * q.k_s).
// One invocation per R query rows; a row group is SG*R consecutive t of one
// (b, h) (rows past T compute t = T-1 and do not store). Online softmax in
// base 2 with the finite sentinel NEG_BIG: key 0 is always visible, so the
// running max is a real score after the first step.
@group(0) @binding(1) var<storage, read_write> fw_out: array<vec4<f32>>; // (B, T, NH, HD)
@group(0) @binding(2) var<storage, read_write> fw_lse: array<f32>;       // (B, NH, T)
@group(0) @binding(3) var<storage, read> fw_q: array<vec4<f32>>;         // (B, T, NH, HD)
@group(0) @binding(4) var<storage, read> fw_k: array<vec4<f32>>;         // (B, S, KVH, HD)
@group(0) @binding(5) var<storage, read> fw_v: array<vec4<f32>>;         // (B, S, KVH, HD)

@compute @workgroup_size(WG)
fn attention_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let sl = slot(wg, nwg, lid, p.t);
    // Whole row groups are live or dead together (WG % SG == 0).
    if (sl.grp >= p.groups) { return; }
    let b = sl.head / p.nh;
    let h = sl.head % p.nh;
    let kh = h / (p.nh / p.kvh);
    let nk_grp = p.pre + min(sl.first + SG * R, p.t); // keys the group walks

    // Own rows; q pre-scaled so that scores come out in log2 units.
    let c2 = p.scale * LOG2E;
    var q: Rows;
    var acc: Rows;
    var m: Scalars;  // running max (log2 units)
    var l: Scalars;  // running sum of exp2(score - m)
    for (var r = 0u; r < R; r++) {
        let t = min(sl.first + r * SG + sl.lane, p.t - 1u);
        let qbase = ((b * p.t + t) * p.nh + h) * HD4;
        for (var c = 0u; c < HD4; c++) {
            q[r][c] = fw_q[qbase + c] * c2;
            acc[r][c] = vec4<f32>(0.0);
        }
        m[r] = NEG_BIG;
        l[r] = 0.0;
    }
    for (var j = 0u; j < nk_grp; j++) {
        // This lane's share of key/value row j: vec4 i * SG + lane.
        let kbase = ((b * p.s + j) * p.kvh + kh) * HD4;
        var kr: Row;
        var vr: Row;
        for (var i = 0u; i < (HD4 + SG - 1u) / SG; i++) {
            let c = min(i * SG + sl.lane, HD4 - 1u);
            kr[i] = fw_k[kbase + c];
            vr[i] = fw_v[kbase + c];
        }
        for (var r = 0u; r < R; r++) {
            var sc = 0.0;
            for (var c = 0u; c < HD4; c++) {
                sc += dot(q[r][c], lane_get(kr[c / SG], c % SG));
            }
            // Keys past this row's causal bound leave its state untouched.
            let live = j < p.pre + sl.first + r * SG + sl.lane + 1u;
            let m_new = select(m[r], max(m[r], sc), live);
            let corr = exp2(m[r] - m_new);
            let pj = select(0.0, exp2(sc - m_new), live);
            l[r] = l[r] * corr + pj;
            for (var c = 0u; c < HD4; c++) {
                acc[r][c] = acc[r][c] * corr + pj * lane_get(vr[c / SG], c % SG);
            }
            m[r] = m_new;
        }
    }
    for (var r = 0u; r < R; r++) {
        let t = sl.first + r * SG + sl.lane;
        if (t < p.t) {
            let qbase = ((b * p.t + t) * p.nh + h) * HD4;
            let inv = 1.0 / l[r]; // l >= 1: the max key contributes exp2(0)
            for (var c = 0u; c < HD4; c++) {
                fw_out[qbase + c] = acc[r][c] * inv;
            }
            fw_lse[sl.head * p.t + t] = (m[r] + log2(l[r])) * LN2;
        }
    }
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

@compute @workgroup_size(WG)
fn attention_backward_dq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let sl = slot(wg, nwg, lid, p.t);
    if (sl.grp >= p.groups) { return; }
    let b = sl.head / p.nh;
    let h = sl.head % p.nh;
    let kh = h / (p.nh / p.kvh);
    let nk_grp = p.pre + min(sl.first + SG * R, p.t);

    let c2 = p.scale * LOG2E;
    var q: Rows;     // scaled to log2 units, as in forward
    var go: Rows;    // dout rows
    var acc: Rows;   // sum_s ds_s k_s
    var lse2: Scalars;
    var delta: Scalars;
    for (var r = 0u; r < R; r++) {
        let t = min(sl.first + r * SG + sl.lane, p.t - 1u);
        let qbase = ((b * p.t + t) * p.nh + h) * HD4;
        for (var c = 0u; c < HD4; c++) {
            q[r][c] = dq_q[qbase + c] * c2;
            go[r][c] = dq_dout[qbase + c];
            acc[r][c] = vec4<f32>(0.0);
        }
        lse2[r] = dq_lse[sl.head * p.t + t] * LOG2E;
        delta[r] = dq_delta[sl.head * p.t + t];
    }
    for (var j = 0u; j < nk_grp; j++) {
        let kbase = ((b * p.s + j) * p.kvh + kh) * HD4;
        var kr: Row;
        var vr: Row;
        for (var i = 0u; i < (HD4 + SG - 1u) / SG; i++) {
            let c = min(i * SG + sl.lane, HD4 - 1u);
            kr[i] = dq_k[kbase + c];
            vr[i] = dq_v[kbase + c];
        }
        for (var r = 0u; r < R; r++) {
            var sc = 0.0;
            var dp = 0.0;
            for (var c = 0u; c < HD4; c++) {
                sc += dot(q[r][c], lane_get(kr[c / SG], c % SG));
                dp += dot(go[r][c], lane_get(vr[c / SG], c % SG));
            }
            let live = j < p.pre + sl.first + r * SG + sl.lane + 1u;
            let pj = select(0.0, exp2(sc - lse2[r]), live);
            let ds = pj * (dp - delta[r]);
            for (var c = 0u; c < HD4; c++) {
                acc[r][c] += ds * lane_get(kr[c / SG], c % SG);
            }
        }
    }
    for (var r = 0u; r < R; r++) {
        let t = sl.first + r * SG + sl.lane;
        if (t < p.t) {
            let qbase = ((b * p.t + t) * p.nh + h) * HD4;
            for (var c = 0u; c < HD4; c++) {
                dq_dq[qbase + c] += acc[r][c] * p.scale;
            }
        }
    }
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

@compute @workgroup_size(WG)
fn attention_backward_dkv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let sl = slot(wg, nwg, lid, p.s);
    if (sl.grp >= p.groups) { return; }
    let b = sl.head / p.kvh;
    let kh = sl.head % p.kvh;
    let g = p.nh / p.kvh;
    // Key s is seen by queries t >= s - P (all of them for prefix keys); the
    // group starts at its first key's bound.
    let t_grp = max(sl.first, p.pre) - p.pre;

    let c2 = p.scale * LOG2E;
    var kk: Rows;  // keys scaled to log2 units
    var vv: Rows;
    var dk: Rows;
    var dv: Rows;
    for (var r = 0u; r < R; r++) {
        let s = min(sl.first + r * SG + sl.lane, p.s - 1u);
        let kbase = ((b * p.s + s) * p.kvh + kh) * HD4;
        for (var c = 0u; c < HD4; c++) {
            kk[r][c] = kv_k[kbase + c] * c2;
            vv[r][c] = kv_v[kbase + c];
            dk[r][c] = vec4<f32>(0.0);
            dv[r][c] = vec4<f32>(0.0);
        }
    }
    for (var hi = 0u; hi < g; hi++) {
        let bh = b * p.nh + kh * g + hi;
        for (var t = t_grp; t < p.t; t++) {
            // This lane's share of query row t and its dout row.
            let qbase = ((b * p.t + t) * p.nh + kh * g + hi) * HD4;
            var qr: Row;
            var gr: Row;
            for (var i = 0u; i < (HD4 + SG - 1u) / SG; i++) {
                let c = min(i * SG + sl.lane, HD4 - 1u);
                qr[i] = kv_q[qbase + c];
                gr[i] = kv_dout[qbase + c];
            }
            let lse2 = kv_lse[bh * p.t + t] * LOG2E;
            let delta = kv_delta[bh * p.t + t];
            for (var r = 0u; r < R; r++) {
                var sc = 0.0;
                var dp = 0.0;
                for (var c = 0u; c < HD4; c++) {
                    sc += dot(kk[r][c], lane_get(qr[c / SG], c % SG));
                    dp += dot(vv[r][c], lane_get(gr[c / SG], c % SG));
                }
                // Visible iff s < P + t + 1.
                let live = sl.first + r * SG + sl.lane < p.pre + t + 1u;
                let pj = select(0.0, exp2(sc - lse2), live);
                let ds = pj * (dp - delta);
                for (var c = 0u; c < HD4; c++) {
                    dv[r][c] += pj * lane_get(gr[c / SG], c % SG);
                    dk[r][c] += ds * lane_get(qr[c / SG], c % SG);
                }
            }
        }
    }
    for (var r = 0u; r < R; r++) {
        let s = sl.first + r * SG + sl.lane;
        if (s < p.s) {
            let kbase = ((b * p.s + s) * p.kvh + kh) * HD4;
            for (var c = 0u; c < HD4; c++) {
                kv_dk[kbase + c] += dk[r][c] * p.scale;
                kv_dv[kbase + c] += dv[r][c];
            }
        }
    }
}
