// embedding.wgsl: token-embedding gather and the soft-prompt rows that go in
// front of it. The base table is frozen, so there is no table gradient; the
// only trainable input here is the prompt, whose gradient is a plain
// fixed-order sum over the batch (no scatter, no atomics, deterministic).
//
// Layout of one batch row of `out` (S = P + T rows of C channels):
//   rows 0..P    the P virtual tokens (prompt_forward)
//   rows P..S    the T embedded ids   (embedding_forward)
// The same prompt kernels also fill the first P rows of each batch's K/V
// with a learned prefix (prefix tuning).

struct Params {
    b: u32,       // batch size B
    s: u32,       // rows per batch in out/dout (S = P + T)
    t: u32,       // tokens per batch in ids (T)
    c: u32,       // channels C
    row_off: u32, // P: virtual rows in front of the tokens
    v: u32,       // full vocab size V; ids outside [0, V) give zero rows
    v0: u32,      // first table row bound by this dispatch (chunk start)
    v1: u32,      // one past the last bound table row (chunk end)
    scale: f32,   // embedding_forward: factor on the rows (Gemma's sqrt(C))
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// Threads per workgroup; the wrappers pick it from C (power of two <= 256).
override WG: u32 = 64u;

// ---------------------------------------------------------------------------
// embedding_forward: out[b, P + t, :] = table[ids[b, t], :] for t < T.
// The table can be larger than one storage binding (Qwen2.5: 151936 x 896 f32
// = 545 MiB vs 128 MiB on lavapipe), so the host binds it in row chunks
// [v0, v1) and dispatches once per chunk; each dispatch copies only the ids
// that fall in its chunk. Ids outside [0, V) never index the table: the
// chunk with v0 == 0 writes zeros for them, so exactly one dispatch owns
// every output row.
// Geometry: one workgroup per token (b, t), folded grid; WG threads stride C.
@group(0) @binding(1) var<storage, read_write> emb_out: array<f32>; // (B, S, C)
@group(0) @binding(2) var<storage, read> emb_ids: array<i32>;       // (B, T)
@group(0) @binding(3) var<storage, read> emb_table: array<f32>;     // (v1 - v0, C): rows v0..v1 of (V, C)

@compute @workgroup_size(WG)
fn embedding_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let tok = flat_wg(wg, nwg);
    // No barriers below, so threads of padding workgroups may leave early.
    if (tok >= p.b * p.t) { return; }
    let bi = tok / p.t;
    let ti = tok % p.t;
    let id = emb_ids[tok];
    let dst = (bi * p.s + p.row_off + ti) * p.c;
    if (id >= i32(p.v0) && id < i32(p.v1)) {
        // Rows are addressed relative to the chunk's view of the table.
        let src = (u32(id) - p.v0) * p.c;
        for (var i = lid; i < p.c; i += WG) {
            emb_out[dst + i] = emb_table[src + i] * p.scale;
        }
    } else if (p.v0 == 0u && (id < 0 || id >= i32(p.v))) {
        // Invalid id: a defined result instead of an out-of-bounds read.
        for (var i = lid; i < p.c; i += WG) {
            emb_out[dst + i] = 0.0;
        }
    }
}

// ---------------------------------------------------------------------------
// prompt_forward: out[b, j, :] = prompt[j, :] for j < P (virtual tokens go
// first). Rows P..S of each batch are left as they are.
// Geometry: one workgroup per (b, j) row, folded grid; WG threads stride C.
@group(0) @binding(1) var<storage, read_write> pf_out: array<f32>; // (B, S, C)
@group(0) @binding(2) var<storage, read> pf_prompt: array<f32>;    // (P, C)

@compute @workgroup_size(WG)
fn prompt_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let row = flat_wg(wg, nwg);
    if (row >= p.b * p.row_off) { return; }
    let bi = row / p.row_off;
    let j = row % p.row_off;
    let dst = (bi * p.s + j) * p.c;
    let src = j * p.c;
    for (var i = lid; i < p.c; i += WG) {
        pf_out[dst + i] = pf_prompt[src + i];
    }
}

// ---------------------------------------------------------------------------
// prompt_backward: differentiates `out[b, j, :] = prompt[j, :]` (prompt_forward).
// Every batch copies the same prompt row, so
//   dprompt[j, c] += sum over b = 0..B-1 of dout[b, j, c],
// summed in increasing b in one thread: the result does not depend on the
// schedule (no atomics, bit-identical between runs).
// Geometry: one thread per (j, c) element of dprompt, folded grid of
// ceil(P*C / WG) workgroups.
@group(0) @binding(1) var<storage, read_write> pb_dprompt: array<f32>; // (P, C)
@group(0) @binding(2) var<storage, read> pb_dout: array<f32>;          // (B, S, C)

@compute @workgroup_size(WG)
fn prompt_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let idx = flat_wg(wg, nwg) * WG + lid;
    if (idx >= p.row_off * p.c) { return; }
    let j = idx / p.c;
    let ci = idx % p.c;
    // Sum first, then add once: the same association as the CPU twin.
    var acc = 0.0;
    for (var bi = 0u; bi < p.b; bi++) {
        acc += pb_dout[(bi * p.s + j) * p.c + ci];
    }
    pb_dprompt[idx] += acc;
}
