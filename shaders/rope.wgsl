// rope.wgsl: rotary position embedding in the Hugging Face `rotate_half`
// layout, applied in place to Q or K. There is one read_write binding because
// the rotated tensor replaces the unrotated one where it lies.
//
// Row r = b*T + t of x (B*T, H, D) is at position pos = t + pos_offset. For
// each head and each i < D/2, with c = cos[pos, i] and s = sin[pos, i]:
//   out[i]       = x[i] * c - x[i + D/2] * s
//   out[i + D/2] = x[i + D/2] * c + x[i] * s
// This is HF's q*cos + rotate_half(q)*sin with cos = cat(freqs, freqs). The
// tables are (MAXPOS, D/2), built on the CPU in f64 (cpu::rope::rope_tables)
// because GPU sin/cos lose accuracy at large angles.
//
// Geometry: one invocation per (row, group of pairs) that loops over the H
// heads, so every cos/sin load is reused H times (loads dominate on lavapipe).
// The plain entries take 4 pairs per invocation as vec4 and need D/2 % 4 == 0
// (head dims 8, 16, ..., 64, 128). The _x1 entries take one pair per
// invocation for any even D. 1-D grid folded by plan::grid_1d.
// Backward is the same code with sin negated (see rope_backward).

struct Params {
    b: u32,          // batch
    t: u32,          // sequence length
    h: u32,          // heads in x (query or key/value heads)
    d: u32,          // head dim, even
    pos_offset: u32, // position of row t = 0 (tokens already in the cache/prefix)
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

override WG: u32 = 64u;

// vec4 entries (rope_forward, rope_backward).
@group(0) @binding(1) var<storage, read_write> rope_x4: array<vec4<f32>>; // (B*T, H, D) as vec4; dx in backward
@group(0) @binding(2) var<storage, read> rope_cos4: array<vec4<f32>>;     // (MAXPOS, D/2) as vec4
@group(0) @binding(3) var<storage, read> rope_sin4: array<vec4<f32>>;     // (MAXPOS, D/2) as vec4

// Rotate 4 pairs of every head of one row by +theta (sgn = 1) or -theta (sgn = -1).
fn rope_apply4(gid: u32, sgn: f32) {
    let nq = p.d / 8u;  // vec4 groups per half head
    let row = gid / nq;
    if (row >= p.b * p.t) { return; }
    let q = gid % nq;
    let pos = row % p.t + p.pos_offset;
    let c = rope_cos4[pos * nq + q];
    let s = sgn * rope_sin4[pos * nq + q];
    for (var h = 0u; h < p.h; h++) {
        // x1 = x[i..i+4], x2 = x[i+D/2..]: D/2 is nq vec4 further on.
        let i1 = (row * p.h + h) * (2u * nq) + q;
        let x1 = rope_x4[i1];
        let x2 = rope_x4[i1 + nq];
        rope_x4[i1] = x1 * c - x2 * s;
        rope_x4[i1 + nq] = x2 * c + x1 * s;
    }
}

// ---------------------------------------------------------------------------
// rope_forward: x = x*cos + rotate_half(x)*sin in place, 4 pairs per invocation.
@compute @workgroup_size(WG)
fn rope_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    rope_apply4(flat_wg(wg, nwg) * WG + lid, 1.0);
}

// rope_backward: differentiates the forward lines
//   out[i] = x[i]*c - x[i+D/2]*s;  out[i+D/2] = x[i+D/2]*c + x[i]*s,
// i.e. out = R(theta) x. R is orthogonal, so dx = R^T dout = R(-theta) dout:
//   dx[i] = d[i]*c + d[i+D/2]*s;   dx[i+D/2] = d[i+D/2]*c - d[i]*s.
// In place, not +=: the buffer holds the accumulated gradient of the rotated
// tensor and becomes the gradient of the unrotated one. R is linear, so
// rotating the sum equals summing the rotated parts; the caller must not have
// put gradient of the unrotated tensor in the buffer yet.
@compute @workgroup_size(WG)
fn rope_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    rope_apply4(flat_wg(wg, nwg) * WG + lid, -1.0);
}

// ---------------------------------------------------------------------------
// Scalar entries (rope_forward_x1, rope_backward_x1) for D/2 % 4 != 0.
@group(0) @binding(1) var<storage, read_write> rope_x: array<f32>; // (B*T, H, D); dx in backward
@group(0) @binding(2) var<storage, read> rope_cos: array<f32>;     // (MAXPOS, D/2)
@group(0) @binding(3) var<storage, read> rope_sin: array<f32>;     // (MAXPOS, D/2)

// Rotate pair i of every head of one row by +theta (sgn = 1) or -theta (sgn = -1).
fn rope_apply1(gid: u32, sgn: f32) {
    let half = p.d / 2u;
    let row = gid / half;
    if (row >= p.b * p.t) { return; }
    let i = gid % half;
    let pos = row % p.t + p.pos_offset;
    let c = rope_cos[pos * half + i];
    let s = sgn * rope_sin[pos * half + i];
    for (var h = 0u; h < p.h; h++) {
        let i1 = (row * p.h + h) * p.d + i;
        let x1 = rope_x[i1];
        let x2 = rope_x[i1 + half];
        rope_x[i1] = x1 * c - x2 * s;
        rope_x[i1 + half] = x2 * c + x1 * s;
    }
}

// rope_forward_x1: rope_forward for any even D, one pair per invocation.
@compute @workgroup_size(WG)
fn rope_forward_x1(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    rope_apply1(flat_wg(wg, nwg) * WG + lid, 1.0);
}

// rope_backward_x1: rope_backward (dx = R(-theta) dout, in place) for any even D.
@compute @workgroup_size(WG)
fn rope_backward_x1(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    rope_apply1(flat_wg(wg, nwg) * WG + lid, -1.0);
}
