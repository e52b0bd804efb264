// lora.wgsl: the small-rank halves of a LoRA bypass on a frozen linear layer
// y = x W^T (PEFT: y += scaling * B (A x), lora_A (R, K), lora_B (N, R),
// scaling = lora_alpha / r, or lora_alpha / sqrt(r) with rslora).
//
// The full schedule (src/gpu/ops/lora.rs) is
//   forward:  h = x A^T                 matmul_forward (saved for backward)
//             y += s * h B^T            lora_forward         (this file)
//   backward: dh = s * dy B             lora_backward        (this file)
//             dB += s * dy^T h          matmul_backward_weight
//             dA += dh^T x              matmul_backward_weight
//             dx += dh A                matmul_backward_input
// Only the two products whose inner or outer dimension is the rank R live
// here: R is 1..64, far below any matmul tile, so the generic kernel would
// waste most of its tile on padding.
//
// Geometry of both entries: a 1-D grid of WG invocations per workgroup, one
// invocation per (row, quad of 4 consecutive output columns), folded into
// x*y by plan::grid_1d. Each invocation keeps 4 accumulators in registers and
// runs the whole reduction itself in a fixed order, so results are
// bit-reproducible without atomics or workgroup memory (which costs as much
// as global memory on lavapipe, see docs/software-adapters.md).
//
// Every tensor is bound as array<vec4<f32>> (tensor bindings are padded to
// 16 bytes). When rows start on a vec4 (R4: R % 4 == 0, N4: N % 4 == 0) the
// loads and stores are single vec4 accesses; otherwise vec4s are assembled
// from scalars with the tail zero-filled, so any shape works, only slower.

struct Params {
    m: u32,      // rows (tokens, B*T)
    n: u32,      // output features of the frozen layer
    r: u32,      // LoRA rank
    scale: f32,  // PEFT scaling
}

@group(0) @binding(0) var<uniform> p: Params;

override WG: u32 = 64u;
override R4: bool = false;  // R % 4 == 0: rows of h, B and dh start on a vec4
override N4: bool = false;  // N % 4 == 0: rows of out and dout start on a vec4

// This invocation's flat index in the 1-D grid.
fn lora_slot(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return flat_wg(wg, nwg) * WG + lid;
}

// ---------------------------------------------------------------------------
// lora_forward: out[m, n] += scale * sum_j h[m, j] * B[n, j]
// The "up" projection of the bypass fused with the residual add into y.
// One invocation per (m, 4 consecutive n); each reads the row h[m, :] once
// and reuses it for 4 rows of B.
@group(0) @binding(1) var<storage, read_write> lf_out: array<vec4<f32>>; // (M, N)
@group(0) @binding(2) var<storage, read> lf_h: array<vec4<f32>>;         // (M, R)
@group(0) @binding(3) var<storage, read> lf_b: array<vec4<f32>>;         // (N, R)

// h[row, j..j+4], zero past R.
fn lf_h4(row: u32, j: u32) -> vec4<f32> {
    if (R4) { return lf_h[(row * p.r + j) >> 2u]; }
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (j + i < p.r) { let e = row * p.r + j + i; v[i] = lf_h[e >> 2u][e & 3u]; }
    }
    return v;
}

// B[n, j..j+4], zero past R.
fn lf_b4(n: u32, j: u32) -> vec4<f32> {
    if (R4) { return lf_b[(n * p.r + j) >> 2u]; }
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (j + i < p.r) { let e = n * p.r + j + i; v[i] = lf_b[e >> 2u][e & 3u]; }
    }
    return v;
}

@compute @workgroup_size(WG)
fn lora_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let quads = (p.n + 3u) / 4u;
    let t = lora_slot(wg, nwg, lid);
    if (t >= p.m * quads) { return; }
    let row = t / quads;
    let n0 = (t % quads) * 4u;
    // Columns past N are clamped onto the last row of B (finite data, so the
    // sums stay finite) and dropped at the store.
    let nl = p.n - 1u;
    let n1 = min(n0 + 1u, nl);
    let n2 = min(n0 + 2u, nl);
    let n3 = min(n0 + 3u, nl);
    var c = vec4<f32>(0.0);
    for (var j = 0u; j < p.r; j += 4u) {
        let a = lf_h4(row, j);
        c += vec4<f32>(dot(a, lf_b4(n0, j)), dot(a, lf_b4(n1, j)), dot(a, lf_b4(n2, j)), dot(a, lf_b4(n3, j)));
    }
    // Residual add: out already holds x W^T (+ bias).
    let o = row * p.n + n0;
    if (N4) {
        lf_out[o >> 2u] += p.scale * c;
        return;
    }
    for (var i = 0u; i < 4u; i++) {
        if (n0 + i < p.n) { let e = o + i; lf_out[e >> 2u][e & 3u] += p.scale * c[i]; }
    }
}

// ---------------------------------------------------------------------------
// lora_backward: differentiates out[m, n] += scale * sum_j h[m, j] * B[n, j]
// w.r.t. h: dh[m, j] = scale * sum_n dout[m, n] * B[n, j].
// dh is a per-call scratch, so this entry WRITES it (=) instead of
// accumulating like every other backward: the accumulated gradients dA, dB
// and dx are formed from it by the matmul kernels.
// One invocation per (m, 4 consecutive j); the loop over N runs in index
// order inside the invocation (deterministic).
@group(0) @binding(1) var<storage, read_write> lb_dh: array<vec4<f32>>; // (M, R)
@group(0) @binding(2) var<storage, read> lb_dout: array<vec4<f32>>;     // (M, N)
@group(0) @binding(3) var<storage, read> lb_b: array<vec4<f32>>;        // (N, R)

// dout[row, n..n+4], zero past N.
fn lb_dout4(row: u32, n: u32) -> vec4<f32> {
    if (N4) { return lb_dout[(row * p.n + n) >> 2u]; }
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (n + i < p.n) { let e = row * p.n + n + i; v[i] = lb_dout[e >> 2u][e & 3u]; }
    }
    return v;
}

// B[n, j..j+4], zero past N or R (never read out of range: a zero dout
// times garbage could still be NaN).
fn lb_b4(n: u32, j: u32) -> vec4<f32> {
    if (n >= p.n) { return vec4<f32>(0.0); }
    if (R4) { return lb_b[(n * p.r + j) >> 2u]; }
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if (j + i < p.r) { let e = n * p.r + j + i; v[i] = lb_b[e >> 2u][e & 3u]; }
    }
    return v;
}

@compute @workgroup_size(WG)
fn lora_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let quads = (p.r + 3u) / 4u;
    let t = lora_slot(wg, nwg, lid);
    if (t >= p.m * quads) { return; }
    let row = t / quads;
    let j0 = (t % quads) * 4u;
    var c = vec4<f32>(0.0);
    for (var n = 0u; n < p.n; n += 4u) {
        let d = lb_dout4(row, n);
        c += d.x * lb_b4(n, j0) + d.y * lb_b4(n + 1u, j0) + d.z * lb_b4(n + 2u, j0) + d.w * lb_b4(n + 3u, j0);
    }
    let o = row * p.r + j0;
    if (R4) {
        lb_dh[o >> 2u] = p.scale * c;
        return;
    }
    for (var i = 0u; i < 4u; i++) {
        if (j0 + i < p.r) { let e = o + i; lb_dh[e >> 2u][e & 3u] = p.scale * c[i]; }
    }
}

// ---------------------------------------------------------------------------
// LoRA dropout, on the adapter's input only (PEFT: B (A dropout(x))).
// The mask is a hash of (seed, site, element), so backward recomputes it
// instead of storing it, and a step is reproducible from its seed. The seed
// lives in a buffer the host rewrites before each step (plans are replayed).
//   lora_dropout_forward:  out = x * keep / (1 - p)
//   lora_dropout_backward: dinp += g * keep / (1 - p); g = 0 afterwards, so
//                          the scratch g (the bypass's share of dx) is ready
//                          to accumulate again at the next use.
// Params reuse the struct above: m = elements, n = site id,
// r = keep threshold (p * 2^32), scale = 1 / (1 - p).
// Geometry: one invocation per element, folded 1-D grid.

fn pcg_hash(v: u32) -> u32 {
    let state = v * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

// 1.0 when element `i` of site `site` is kept for this seed, else 0.0.
fn keep(seed: u32, site: u32, i: u32) -> f32 {
    let h = pcg_hash(i ^ pcg_hash(seed ^ pcg_hash(site)));
    return select(0.0, 1.0, h >= p.r);
}

@group(0) @binding(1) var<storage, read_write> ldf_out: array<f32>; // (M, K)
@group(0) @binding(2) var<storage, read> ldf_inp: array<f32>;       // (M, K)
@group(0) @binding(3) var<storage, read> ldf_seed: array<u32>;      // (1)

@compute @workgroup_size(WG)
fn lora_dropout_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let i = lora_slot(wg, nwg, lid);
    if (i >= p.m) { return; }
    ldf_out[i] = ldf_inp[i] * keep(ldf_seed[0], p.n, i) * p.scale;
}

@group(0) @binding(1) var<storage, read_write> ldb_dinp: array<f32>; // (M, K)
@group(0) @binding(2) var<storage, read_write> ldb_g: array<f32>;    // (M, K), zeroed after use
@group(0) @binding(3) var<storage, read> ldb_seed: array<u32>;       // (1)

@compute @workgroup_size(WG)
fn lora_dropout_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let i = lora_slot(wg, nwg, lid);
    if (i >= p.m) { return; }
    ldb_dinp[i] += ldb_g[i] * keep(ldb_seed[0], p.n, i) * p.scale;
    ldb_g[i] = 0.0;
}
