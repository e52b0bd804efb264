// adamw.wgsl: global gradient-norm clipping and the fused AdamW step over the
// flat trainable arena (params, grads, m and v share one layout of N floats).
//
// A step is three dispatches, recorded once and replayed:
//   global_norm_partial   sum of squares per contiguous slice  -> partials (G)
//   global_norm_finalize  one workgroup, partials in index order -> norm (4)
//   adamw_update          torch.optim.AdamW, clip coefficient read from norm
// The clip decision stays on the GPU: no host sync between backward and step.
// Both reductions use fixed tree orders and no atomics, so the norm (and hence
// every parameter) is bit-identical from run to run.
//
// Elements are read as scalars, ITEMS per thread: the arena length is odd in
// general, and a vec4 view of an odd-length binding would drop the tail.

struct Params {
    n: u32,         // elements in the flat arena (N)
    parts: u32,     // partial sums (G = ceil(N / (WG * ITEMS)), at least 1)
    max_norm: f32,  // clip threshold; <= 0 disables clipping
    inf_bits: u32,  // bits of +inf: WGSL has no infinite constants
}

@group(0) @binding(0) var<uniform> p: Params;

// Threads per workgroup; a power of two, at most MAX_WG (tree reductions).
override WG: u32 = 256u;
// Elements per thread; one workgroup covers WG * ITEMS contiguous elements.
override ITEMS: u32 = 8u;
const MAX_WG: u32 = 256u;
var<workgroup> red_s: array<f32, MAX_WG>; // partial sums of squares
var<workgroup> red_f: array<u32, MAX_WG>; // non-finite flags (OR-reduced)

// Inf or NaN, decided on the bits: the compiler may assume neither exists,
// so `x != x` or `abs(x) > MAX` could be folded away.
fn non_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) == 0x7f800000u;
}

// Sum red_s and OR red_f over [0, WG) into element 0, pairing lid with
// lid + s for s = WG/2, WG/4, ..: a fixed order. Every thread must call it.
fn reduce_sum_flag(lid: u32) {
    var s = WG / 2u;
    loop {
        if (s == 0u) { break; }
        if (lid < s) {
            red_s[lid] += red_s[lid + s];
            red_f[lid] |= red_f[lid + s];
        }
        workgroupBarrier();
        s = s / 2u;
    }
}

// ---------------------------------------------------------------------------
// global_norm_partial: partials[g] = sum of grads[i]^2 over workgroup g's
// slice [g*WG*ITEMS, (g+1)*WG*ITEMS). Thread lid adds elements lid, lid+WG, ..
// of the slice in order (coalesced), then a tree sums the threads.
// A slice holding Inf/NaN (or whose sum overflows) writes -1: sums of squares
// are never negative, so the sign carries the flag to the finalize pass.
// Geometry: G workgroups (grid_1d-folded), WG threads each.
@group(0) @binding(1) var<storage, read_write> gnp_partials: array<f32>; // (G)
@group(0) @binding(2) var<storage, read> gnp_grads: array<f32>;          // (N)

@compute @workgroup_size(WG)
fn global_norm_partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let g = flat_wg(wg, nwg);
    let live = g < p.parts;
    var ss = 0.0;
    var bad = 0u;
    if (live) {
        let base = g * WG * ITEMS;
        for (var k = 0u; k < ITEMS; k++) {
            let i = base + k * WG + lid;
            if (i < p.n) {
                let x = gnp_grads[i];
                bad |= select(0u, 1u, non_finite(x));
                ss += x * x;
            }
        }
    }
    red_s[lid] = ss;
    red_f[lid] = bad;
    workgroupBarrier();
    reduce_sum_flag(lid);
    if (live && lid == 0u) {
        let s = red_s[0];
        gnp_partials[g] = select(s, -1.0, red_f[0] != 0u || non_finite(s));
    }
}

// ---------------------------------------------------------------------------
// global_norm_finalize: torch.nn.utils.clip_grad_norm_ on the partials.
//   norm[0] = sqrt(sum(partials))                        (+inf if flagged)
//   norm[1] = clip_coef = min(1, max_norm / (norm + 1e-6)) if max_norm > 0
//             else 1 (torch's clip_coef_clamped; 1 when flagged)
//   norm[2] = 1 if the norm is non-finite (the step must be skipped), else 0
//   norm[3] = skipped steps in a row: the old norm[3] + 1 if skipped, else 0
//             (the host reads it when it logs and stops a diverged run)
// Geometry: one workgroup of WG threads; thread lid adds partials lid,
// lid+WG, .. in index order, then the fixed tree.
@group(0) @binding(1) var<storage, read_write> gnf_norm: array<f32>; // (4)
@group(0) @binding(2) var<storage, read> gnf_partials: array<f32>;   // (G)

@compute @workgroup_size(WG)
fn global_norm_finalize(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    var bad = 0u;
    for (var i = lid; i < p.parts; i += WG) {
        let x = gnf_partials[i];
        bad |= select(0u, 1u, x < 0.0);
        s += x;
    }
    red_s[lid] = s;
    red_f[lid] = bad;
    workgroupBarrier();
    reduce_sum_flag(lid);
    if (lid == 0u) {
        let sum = red_s[0];
        // The total can overflow even when every slice was finite.
        let flagged = red_f[0] != 0u || non_finite(sum);
        let norm = sqrt(sum);
        var coef = 1.0;
        if (!flagged && p.max_norm > 0.0) {
            coef = min(1.0, p.max_norm / (norm + 1.0e-6));
        }
        gnf_norm[0] = select(norm, bitcast<f32>(p.inf_bits), flagged);
        gnf_norm[1] = coef;
        gnf_norm[2] = select(0.0, 1.0, flagged);
        gnf_norm[3] = select(0.0, gnf_norm[3] + 1.0, flagged);
    }
}

// ---------------------------------------------------------------------------
// adamw_update: one step of torch.optim.AdamW (decoupled weight decay):
//   g = grads * clip_coef
//   p = p * (1 - lr*wd)
//   m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g
//   p = p - (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)
// with bc1 = 1-b1^t, bc2 = 1-b2^t. Every scalar combination above is formed
// on the host in f64 (as torch does in Python floats) and arrives in step (8);
// 1-b2 in particular loses 1.3e-5 relative if formed here from f32 b2.
// If norm[2] flags a non-finite gradient norm, p, m and v are left alone.
// An element whose new p, m or v would be Inf/NaN (an overflowing learning
// rate) keeps its old values too: no update ever writes a non-finite value.
// The per-step scalars live in a storage tensor the host rewrites before each
// submission, because the uniform is baked into the recorded plan.
// Geometry: ceil(N / (WG*ITEMS)) workgroups (grid_1d-folded); thread lid of
// workgroup w updates w*WG*ITEMS + k*WG + lid for k < ITEMS.
@group(0) @binding(1) var<storage, read_write> ad_params: array<f32>; // (N)
@group(0) @binding(2) var<storage, read_write> ad_m: array<f32>;      // (N)
@group(0) @binding(3) var<storage, read_write> ad_v: array<f32>;      // (N)
@group(0) @binding(4) var<storage, read> ad_grads: array<f32>;        // (N)
@group(0) @binding(5) var<storage, read> ad_norm: array<f32>;         // (4) norm, clip_coef, flag, -
@group(0) @binding(6) var<storage, read> ad_step: array<f32>;         // (8) see below

@compute @workgroup_size(WG)
fn adamw_update(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    // Skipped step: no barriers follow, so a plain early return is fine.
    if (ad_norm[2] != 0.0) { return; }
    let coef = ad_norm[1];
    let decay = ad_step[0];     // 1 - lr*wd
    let b1 = ad_step[1];
    let omb1 = ad_step[2];      // 1 - b1
    let b2 = ad_step[3];
    let omb2 = ad_step[4];      // 1 - b2
    let eps = ad_step[5];
    let step_size = ad_step[6]; // lr / bc1
    let bc2_sqrt = ad_step[7];  // sqrt(bc2)
    let base = flat_wg(wg, nwg) * WG * ITEMS;
    for (var k = 0u; k < ITEMS; k++) {
        let i = base + k * WG + lid;
        if (i < p.n) {
            let g = ad_grads[i] * coef;
            let m = b1 * ad_m[i] + omb1 * g;
            let v = b2 * ad_v[i] + omb2 * g * g;
            let np = ad_params[i] * decay - step_size * m / (sqrt(v) / bc2_sqrt + eps);
            if (!(non_finite(np) || non_finite(m) || non_finite(v))) {
                ad_m[i] = m;
                ad_v[i] = v;
                ad_params[i] = np;
            }
        }
    }
}
