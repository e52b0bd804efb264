// loss.wgsl: softmax cross-entropy over the vocabulary, forward and backward.
// Targets are i32 token ids; -100 marks a position without a loss (prompt
// tokens, padding), as in PyTorch's `ignore_index` and HF labels.
//
// Geometry for both entries: one workgroup per row. Each thread keeps an
// online (max, sum of exp) pair over its strided slice of the V logits (one
// read of the row instead of a max pass plus a sum pass, which matters where
// every load is expensive, see docs/software-adapters.md), then the WG pairs merge in
// a fixed-order tree in workgroup memory (deterministic).
//
// Logits (N, V) can be larger than one storage binding (N*151936*4 bytes), so
// the host binds them in row chunks and dispatches once per chunk. The small
// per-row tensors (losses, targets, dlosses) stay bound whole and are indexed
// with the chunk's first row `r0`; that avoids the 256-byte offset alignment
// they would need as views.

struct Params {
    n: u32,   // rows in this chunk
    v: u32,   // vocab size V
    r0: u32,  // first row of the chunk in losses / targets / dlosses
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Threads per row; the wrappers pick a power of two <= MAX_WG from V.
override WG: u32 = 256u;
const MAX_WG: u32 = 256u;
const IGNORE_INDEX: i32 = -100;
var<workgroup> red_m: array<f32, MAX_WG>;
var<workgroup> red_l: array<f32, MAX_WG>;
var<workgroup> row_target: i32;

// Fold x into a running (m, l) = (max, sum exp(x_j - m)). One exp per element:
// exp(-|x - m|) is the factor that either rescales l (new max) or is added.
// Starting from m = NEG_BIG, l = 0 the first element gives (x, 1).
fn online_push(ml: vec2<f32>, x: f32) -> vec2<f32> {
    let e = exp(-abs(x - ml.x));
    let l = select(ml.y + e, ml.y * e + 1.0, x > ml.x);
    return vec2<f32>(max(ml.x, x), l);
}

// Merge the (red_m, red_l) pairs [0, WG) into element 0 in a fixed tree
// order; every thread must call it (it contains barriers).
fn merge_stats(lid: u32) {
    var s = WG / 2u;
    loop {
        if (s == 0u) { break; }
        if (lid < s) {
            let ma = red_m[lid];
            let mb = red_m[lid + s];
            let m = max(ma, mb);
            red_l[lid] = red_l[lid] * exp(ma - m) + red_l[lid + s] * exp(mb - m);
            red_m[lid] = m;
        }
        workgroupBarrier();
        s = s / 2u;
    }
}

// ---------------------------------------------------------------------------
// crossentropy_forward: losses[i] = logsumexp(logits[i, :]) - logits[i, t_i]
// with t_i = targets[i]; losses[i] = 0 where t_i == -100. A target outside
// [0, V) is treated as ignored so that no read leaves the row (the host
// validates targets). Written as (m - logits[i, t_i]) + log(l) with m the
// row max: no exp overflow for large logits, and the large terms cancel
// before the small log(l) is added.
@group(0) @binding(1) var<storage, read_write> ce_losses: array<f32>; // (N)
@group(0) @binding(2) var<storage, read> ce_logits: array<f32>;       // (n, V): rows r0..r0+n of (N, V)
@group(0) @binding(3) var<storage, read> ce_targets: array<i32>;      // (N)

@compute @workgroup_size(WG)
fn crossentropy_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wg, nwg);
    let live = row < p.n;
    // Broadcast the target through workgroup memory so that the skip below
    // is uniform control flow (barriers follow it).
    if (lid == 0u) {
        var t = IGNORE_INDEX;
        if (live) { t = ce_targets[p.r0 + row]; }
        row_target = t;
    }
    let tgt = workgroupUniformLoad(&row_target);
    if (tgt < 0 || tgt >= i32(p.v)) {
        if (live && lid == 0u) { ce_losses[p.r0 + row] = 0.0; }
        return;
    }
    // From here on the row is live (padding rows were given IGNORE_INDEX).
    let base = row * p.v;
    var ml = vec2<f32>(NEG_BIG, 0.0);
    for (var j = lid; j < p.v; j += WG) {
        ml = online_push(ml, ce_logits[base + j]);
    }
    red_m[lid] = ml.x;
    red_l[lid] = ml.y;
    workgroupBarrier();
    merge_stats(lid);
    if (lid == 0u) {
        ce_losses[p.r0 + row] = (red_m[0] - ce_logits[base + u32(tgt)]) + log(red_l[0]);
    }
}

// ---------------------------------------------------------------------------
// crossentropy_softmax_backward: differentiates
//   `losses[i] = logsumexp(logits[i, :]) - logits[i, t_i]` (crossentropy_forward):
//   dlogits[i, j] += dlosses[i] * (softmax(logits[i, :])_j - [j == t_i]),
// nothing for ignored rows. dlosses already holds mask / num_targets (the
// host fills it, llm.c's dloss_mean), so this kernel does no averaging.
// The row statistics are recomputed here (one extra read of the row) rather
// than saved by forward, which keeps forward's outputs to the losses alone.
@group(0) @binding(1) var<storage, read_write> ceb_dlogits: array<f32>; // (n, V): rows r0..r0+n of (N, V)
@group(0) @binding(2) var<storage, read> ceb_dlosses: array<f32>;       // (N)
@group(0) @binding(3) var<storage, read> ceb_logits: array<f32>;        // (n, V): rows r0..r0+n of (N, V)
@group(0) @binding(4) var<storage, read> ceb_targets: array<i32>;       // (N)

@compute @workgroup_size(WG)
fn crossentropy_softmax_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                 @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wg, nwg);
    if (lid == 0u) {
        var t = IGNORE_INDEX;
        if (row < p.n) { t = ceb_targets[p.r0 + row]; }
        row_target = t;
    }
    let tgt = workgroupUniformLoad(&row_target);
    if (tgt < 0 || tgt >= i32(p.v)) { return; }
    let base = row * p.v;
    var ml = vec2<f32>(NEG_BIG, 0.0);
    for (var j = lid; j < p.v; j += WG) {
        ml = online_push(ml, ceb_logits[base + j]);
    }
    red_m[lid] = ml.x;
    red_l[lid] = ml.y;
    workgroupBarrier();
    merge_stats(lid);
    let m = red_m[0];
    let inv_l = 1.0 / red_l[0];
    let dl = ceb_dlosses[p.r0 + row];
    for (var j = lid; j < p.v; j += WG) {
        let prob = exp(ceb_logits[base + j] - m) * inv_l;
        let hit = select(0.0, 1.0, j == u32(tgt));
        ceb_dlogits[base + j] += dl * (prob - hit);
    }
}

// ---------------------------------------------------------------------------
// crossentropy_softmax_backward_inplace: the same gradient written over the
// logits it comes from, so that the LM head needs one (rows, V) workspace
// instead of logits plus dlogits:
//   logits[i, j] <- dlosses[i] * (softmax(logits[i, :])_j - [j == t_i])
// (an assignment, not +=), and zeros over ignored rows. The row is bound once,
// read_write: wgpu refuses one buffer bound both read and read_write in a
// dispatch. Each thread overwrites only the elements it read itself, and only
// after merge_stats' barriers, so no read sees a gradient.
@group(0) @binding(1) var<storage, read_write> cei_logits: array<f32>; // (n, V): rows r0..r0+n of (N, V); logits in, dlogits out
@group(0) @binding(2) var<storage, read> cei_dlosses: array<f32>;      // (N)
@group(0) @binding(3) var<storage, read> cei_targets: array<i32>;      // (N)

@compute @workgroup_size(WG)
fn crossentropy_softmax_backward_inplace(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                         @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wg, nwg);
    let live = row < p.n;
    if (lid == 0u) {
        var t = IGNORE_INDEX;
        if (live) { t = cei_targets[p.r0 + row]; }
        row_target = t;
    }
    let tgt = workgroupUniformLoad(&row_target);
    let base = row * p.v;
    if (tgt < 0 || tgt >= i32(p.v)) {
        // The row's logits must not pass for its gradient.
        if (live) {
            for (var j = lid; j < p.v; j += WG) { cei_logits[base + j] = 0.0; }
        }
        return;
    }
    var ml = vec2<f32>(NEG_BIG, 0.0);
    for (var j = lid; j < p.v; j += WG) {
        ml = online_push(ml, cei_logits[base + j]);
    }
    red_m[lid] = ml.x;
    red_l[lid] = ml.y;
    workgroupBarrier();
    merge_stats(lid);
    let m = red_m[0];
    let inv_l = 1.0 / red_l[0];
    let dl = cei_dlosses[p.r0 + row];
    for (var j = lid; j < p.v; j += WG) {
        let prob = exp(cei_logits[base + j] - m) * inv_l;
        let hit = select(0.0, 1.0, j == u32(tgt));
        cei_logits[base + j] = dl * (prob - hit);
    }
}
