// norm.wgsl: RMSNorm (Llama) and LayerNorm (GPT-2), forward and backward.
// The norm weights are frozen in adapter training, so backward gives dinp only.
// Geometry of the plain entries: one workgroup per row; WG threads stride
// over C, then a fixed-order tree reduction in workgroup memory
// (deterministic). The `_row` entries (software adapters, C % 4 == 0) give
// each invocation a whole row read as vec4s: on a CPU adapter a barrier
// switches every invocation of the workgroup, and the tree reduction costs
// more than the row itself (see src/gpu/ops/norm.rs).

struct Params {
    n: u32,    // rows (B*T)
    c: u32,    // channels
    eps: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

override WG: u32 = 64u;
const MAX_WG: u32 = 256u;
var<workgroup> red_a: array<f32, MAX_WG>;
var<workgroup> red_b: array<f32, MAX_WG>;

// Sum red_a[0..WG) and red_b[0..WG) into element 0; every thread must call it.
fn reduce2(lid: u32) {
    var s = WG / 2u;
    loop {
        if (s == 0u) { break; }
        if (lid < s) {
            red_a[lid] += red_a[lid + s];
            red_b[lid] += red_b[lid + s];
        }
        workgroupBarrier();
        s = s / 2u;
    }
}

// RMSNorm's 1/sqrt(mean(x^2) + eps) of a row from each thread's partial sum
// of squares; every thread must call it.
fn rms_rstd_of(lid: u32, ss: f32) -> f32 {
    red_a[lid] = ss;
    red_b[lid] = 0.0;
    workgroupBarrier();
    reduce2(lid);
    return inverseSqrt(red_a[0] / f32(p.c) + p.eps);
}

// ---------------------------------------------------------------------------
// rmsnorm_forward: out = weight * x * rstd, rstd = 1/sqrt(mean(x^2) + eps)
// (HF LlamaRMSNorm). Saves rstd for backward.
@group(0) @binding(1) var<storage, read_write> rms_out: array<f32>;  // (N, C)
@group(0) @binding(2) var<storage, read_write> rms_rstd: array<f32>; // (N)
@group(0) @binding(3) var<storage, read> rms_inp: array<f32>;        // (N, C)
@group(0) @binding(4) var<storage, read> rms_weight: array<f32>;     // (C)

@compute @workgroup_size(WG)
fn rmsnorm_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wg, nwg);
    let live = row < p.n;
    let base = row * p.c;
    var ss = 0.0;
    if (live) {
        for (var i = lid; i < p.c; i += WG) {
            let x = rms_inp[base + i];
            ss += x * x;
        }
    }
    let rstd = rms_rstd_of(lid, ss);
    if (live) {
        for (var i = lid; i < p.c; i += WG) {
            rms_out[base + i] = rms_weight[i] * (rms_inp[base + i] * rstd);
        }
        if (lid == 0u) { rms_rstd[row] = rstd; }
    }
}

// ---------------------------------------------------------------------------
// rmsnorm_add_forward: the residual add fused in front of the norm. sum = a + b
// is the next residual (stored, bit-equal to residual_forward), then
// rmsnorm_forward of sum. Each thread reads back only the sums it wrote.
@group(0) @binding(1) var<storage, read_write> rma_out: array<f32>;  // (N, C)
@group(0) @binding(2) var<storage, read_write> rma_rstd: array<f32>; // (N)
@group(0) @binding(3) var<storage, read_write> rma_sum: array<f32>;  // (N, C)
@group(0) @binding(4) var<storage, read> rma_a: array<f32>;          // (N, C)
@group(0) @binding(5) var<storage, read> rma_b: array<f32>;          // (N, C)
@group(0) @binding(6) var<storage, read> rma_weight: array<f32>;     // (C)

@compute @workgroup_size(WG)
fn rmsnorm_add_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wg, nwg);
    let live = row < p.n;
    let base = row * p.c;
    var ss = 0.0;
    if (live) {
        for (var i = lid; i < p.c; i += WG) {
            let x = rma_a[base + i] + rma_b[base + i];
            rma_sum[base + i] = x;
            ss += x * x;
        }
    }
    let rstd = rms_rstd_of(lid, ss);
    if (live) {
        for (var i = lid; i < p.c; i += WG) {
            rma_out[base + i] = rma_weight[i] * (rma_sum[base + i] * rstd);
        }
        if (lid == 0u) { rma_rstd[row] = rstd; }
    }
}

// ---------------------------------------------------------------------------
// rmsnorm_backward: differentiates out = w * x * rstd.
// g = w*dout; dinp += rstd * (g - x * rstd^2 * mean(g*x)).
@group(0) @binding(1) var<storage, read_write> rmsb_dinp: array<f32>;  // (N, C)
@group(0) @binding(2) var<storage, read> rmsb_dout: array<f32>;        // (N, C)
@group(0) @binding(3) var<storage, read> rmsb_inp: array<f32>;         // (N, C)
@group(0) @binding(4) var<storage, read> rmsb_weight: array<f32>;      // (C)
@group(0) @binding(5) var<storage, read> rmsb_rstd: array<f32>;        // (N)

@compute @workgroup_size(WG)
fn rmsnorm_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wg, nwg);
    let live = row < p.n;
    let base = row * p.c;
    var dot = 0.0;
    if (live) {
        for (var i = lid; i < p.c; i += WG) {
            dot += rmsb_weight[i] * rmsb_dout[base + i] * rmsb_inp[base + i];
        }
    }
    red_a[lid] = dot;
    red_b[lid] = 0.0;
    workgroupBarrier();
    reduce2(lid);
    if (live) {
        let rstd = rmsb_rstd[row];
        let k = rstd * rstd * red_a[0] / f32(p.c);
        for (var i = lid; i < p.c; i += WG) {
            let g = rmsb_weight[i] * rmsb_dout[base + i];
            rmsb_dinp[base + i] += rstd * (g - rmsb_inp[base + i] * k);
        }
    }
}

// ---------------------------------------------------------------------------
// layernorm_forward: out = (x - mean) * rstd * weight + bias (torch LayerNorm,
// biased variance). Saves mean and rstd.
@group(0) @binding(1) var<storage, read_write> ln_out: array<f32>;  // (N, C)
@group(0) @binding(2) var<storage, read_write> ln_mean: array<f32>; // (N)
@group(0) @binding(3) var<storage, read_write> ln_rstd: array<f32>; // (N)
@group(0) @binding(4) var<storage, read> ln_inp: array<f32>;        // (N, C)
@group(0) @binding(5) var<storage, read> ln_weight: array<f32>;     // (C)
@group(0) @binding(6) var<storage, read> ln_bias: array<f32>;       // (C)

@compute @workgroup_size(WG)
fn layernorm_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wg, nwg);
    let live = row < p.n;
    let base = row * p.c;
    var s = 0.0;
    if (live) {
        for (var i = lid; i < p.c; i += WG) { s += ln_inp[base + i]; }
    }
    red_a[lid] = s;
    red_b[lid] = 0.0;
    workgroupBarrier();
    reduce2(lid);
    let mean = red_a[0] / f32(p.c);
    workgroupBarrier();
    // Two-pass variance: exact enough in f32 for large-mean rows.
    var v = 0.0;
    if (live) {
        for (var i = lid; i < p.c; i += WG) {
            let d = ln_inp[base + i] - mean;
            v += d * d;
        }
    }
    red_a[lid] = v;
    red_b[lid] = 0.0;
    workgroupBarrier();
    reduce2(lid);
    let rstd = inverseSqrt(red_a[0] / f32(p.c) + p.eps);
    if (live) {
        for (var i = lid; i < p.c; i += WG) {
            ln_out[base + i] = (ln_inp[base + i] - mean) * rstd * ln_weight[i] + ln_bias[i];
        }
        if (lid == 0u) {
            ln_mean[row] = mean;
            ln_rstd[row] = rstd;
        }
    }
}

// ---------------------------------------------------------------------------
// layernorm_backward: differentiates out = xhat * weight + bias with
// xhat = (x - mean) * rstd. g = w*dout;
// dinp += rstd * (g - mean(g) - xhat * mean(g*xhat)).
@group(0) @binding(1) var<storage, read_write> lnb_dinp: array<f32>; // (N, C)
@group(0) @binding(2) var<storage, read> lnb_dout: array<f32>;       // (N, C)
@group(0) @binding(3) var<storage, read> lnb_inp: array<f32>;        // (N, C)
@group(0) @binding(4) var<storage, read> lnb_weight: array<f32>;     // (C)
@group(0) @binding(5) var<storage, read> lnb_mean: array<f32>;       // (N)
@group(0) @binding(6) var<storage, read> lnb_rstd: array<f32>;       // (N)

@compute @workgroup_size(WG)
fn layernorm_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wg, nwg);
    let live = row < p.n;
    let base = row * p.c;
    var mean = 0.0;
    var rstd = 0.0;
    if (live) {
        mean = lnb_mean[row];
        rstd = lnb_rstd[row];
    }
    var sg = 0.0;
    var sgx = 0.0;
    if (live) {
        for (var i = lid; i < p.c; i += WG) {
            let g = lnb_weight[i] * lnb_dout[base + i];
            sg += g;
            sgx += g * (lnb_inp[base + i] - mean) * rstd;
        }
    }
    red_a[lid] = sg;
    red_b[lid] = sgx;
    workgroupBarrier();
    reduce2(lid);
    let mg = red_a[0] / f32(p.c);
    let mgx = red_b[0] / f32(p.c);
    if (live) {
        for (var i = lid; i < p.c; i += WG) {
            let g = lnb_weight[i] * lnb_dout[base + i];
            let xhat = (lnb_inp[base + i] - mean) * rstd;
            lnb_dinp[base + i] += rstd * (g - mg - xhat * mgx);
        }
    }
}

// ---------------------------------------------------------------------------
// The `_row` entries: same maths, one invocation per row, vec4 operands,
// C4 = C / 4. Sums run in one fixed order per row (deterministic).
@group(0) @binding(1) var<storage, read_write> rr_out: array<vec4<f32>>; // (N, C)
@group(0) @binding(2) var<storage, read_write> rr_rstd: array<f32>;      // (N)
@group(0) @binding(3) var<storage, read> rr_inp: array<vec4<f32>>;       // (N, C)
@group(0) @binding(4) var<storage, read> rr_weight: array<vec4<f32>>;    // (C)

fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

@compute @workgroup_size(WG)
fn rmsnorm_forward_row(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wg, nwg) * WG + lid;
    if (row >= p.n) { return; }
    let c4 = p.c / 4u;
    let base = row * c4;
    var ss = vec4<f32>(0.0);
    for (var i = 0u; i < c4; i++) {
        let x = rr_inp[base + i];
        ss = fma(x, x, ss);
    }
    let rstd = inverseSqrt(hsum(ss) / f32(p.c) + p.eps);
    for (var i = 0u; i < c4; i++) {
        rr_out[base + i] = rr_weight[i] * (rr_inp[base + i] * rstd);
    }
    rr_rstd[row] = rstd;
}

@group(0) @binding(1) var<storage, read_write> rra_out: array<vec4<f32>>; // (N, C)
@group(0) @binding(2) var<storage, read_write> rra_rstd: array<f32>;      // (N)
@group(0) @binding(3) var<storage, read_write> rra_sum: array<vec4<f32>>; // (N, C)
@group(0) @binding(4) var<storage, read> rra_a: array<vec4<f32>>;         // (N, C)
@group(0) @binding(5) var<storage, read> rra_b: array<vec4<f32>>;         // (N, C)
@group(0) @binding(6) var<storage, read> rra_weight: array<vec4<f32>>;    // (C)

@compute @workgroup_size(WG)
fn rmsnorm_add_forward_row(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wg, nwg) * WG + lid;
    if (row >= p.n) { return; }
    let c4 = p.c / 4u;
    let base = row * c4;
    var ss = vec4<f32>(0.0);
    for (var i = 0u; i < c4; i++) {
        let x = rra_a[base + i] + rra_b[base + i];
        rra_sum[base + i] = x;
        ss = fma(x, x, ss);
    }
    let rstd = inverseSqrt(hsum(ss) / f32(p.c) + p.eps);
    for (var i = 0u; i < c4; i++) {
        rra_out[base + i] = rra_weight[i] * (rra_sum[base + i] * rstd);
    }
    rra_rstd[row] = rstd;
}

@group(0) @binding(1) var<storage, read_write> rrb_dinp: array<vec4<f32>>; // (N, C)
@group(0) @binding(2) var<storage, read> rrb_dout: array<vec4<f32>>;       // (N, C)
@group(0) @binding(3) var<storage, read> rrb_inp: array<vec4<f32>>;        // (N, C)
@group(0) @binding(4) var<storage, read> rrb_weight: array<vec4<f32>>;     // (C)
@group(0) @binding(5) var<storage, read> rrb_rstd: array<f32>;             // (N)

@compute @workgroup_size(WG)
fn rmsnorm_backward_row(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wg, nwg) * WG + lid;
    if (row >= p.n) { return; }
    let c4 = p.c / 4u;
    let base = row * c4;
    var d = vec4<f32>(0.0);
    for (var i = 0u; i < c4; i++) {
        d = fma(rrb_weight[i] * rrb_dout[base + i], rrb_inp[base + i], d);
    }
    let rstd = rrb_rstd[row];
    let k = rstd * rstd * hsum(d) / f32(p.c);
    for (var i = 0u; i < c4; i++) {
        let g = rrb_weight[i] * rrb_dout[base + i];
        rrb_dinp[base + i] += rstd * (g - rrb_inp[base + i] * k);
    }
}

@group(0) @binding(1) var<storage, read_write> lr_out: array<vec4<f32>>; // (N, C)
@group(0) @binding(2) var<storage, read_write> lr_mean: array<f32>;      // (N)
@group(0) @binding(3) var<storage, read_write> lr_rstd: array<f32>;      // (N)
@group(0) @binding(4) var<storage, read> lr_inp: array<vec4<f32>>;       // (N, C)
@group(0) @binding(5) var<storage, read> lr_weight: array<vec4<f32>>;    // (C)
@group(0) @binding(6) var<storage, read> lr_bias: array<vec4<f32>>;      // (C)

@compute @workgroup_size(WG)
fn layernorm_forward_row(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wg, nwg) * WG + lid;
    if (row >= p.n) { return; }
    let c4 = p.c / 4u;
    let base = row * c4;
    var s = vec4<f32>(0.0);
    for (var i = 0u; i < c4; i++) { s += lr_inp[base + i]; }
    let mean = hsum(s) / f32(p.c);
    // Two-pass variance, as the plain entry.
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < c4; i++) {
        let d = lr_inp[base + i] - mean;
        v = fma(d, d, v);
    }
    let rstd = inverseSqrt(hsum(v) / f32(p.c) + p.eps);
    for (var i = 0u; i < c4; i++) {
        lr_out[base + i] = (lr_inp[base + i] - mean) * rstd * lr_weight[i] + lr_bias[i];
    }
    lr_mean[row] = mean;
    lr_rstd[row] = rstd;
}

@group(0) @binding(1) var<storage, read_write> lrb_dinp: array<vec4<f32>>; // (N, C)
@group(0) @binding(2) var<storage, read> lrb_dout: array<vec4<f32>>;       // (N, C)
@group(0) @binding(3) var<storage, read> lrb_inp: array<vec4<f32>>;        // (N, C)
@group(0) @binding(4) var<storage, read> lrb_weight: array<vec4<f32>>;     // (C)
@group(0) @binding(5) var<storage, read> lrb_mean: array<f32>;             // (N)
@group(0) @binding(6) var<storage, read> lrb_rstd: array<f32>;             // (N)

@compute @workgroup_size(WG)
fn layernorm_backward_row(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wg, nwg) * WG + lid;
    if (row >= p.n) { return; }
    let c4 = p.c / 4u;
    let base = row * c4;
    let mean = lrb_mean[row];
    let rstd = lrb_rstd[row];
    var sg = vec4<f32>(0.0);
    var sgx = vec4<f32>(0.0);
    for (var i = 0u; i < c4; i++) {
        let g = lrb_weight[i] * lrb_dout[base + i];
        sg += g;
        sgx = fma(g, (lrb_inp[base + i] - mean) * rstd, sgx);
    }
    let mg = hsum(sg) / f32(p.c);
    let mgx = hsum(sgx) / f32(p.c);
    for (var i = 0u; i < c4; i++) {
        let g = lrb_weight[i] * lrb_dout[base + i];
        let xhat = (lrb_inp[base + i] - mean) * rstd;
        lrb_dinp[base + i] += rstd * (g - mg - xhat * mgx);
    }
}
