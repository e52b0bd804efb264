// copy.wgsl: strided row-block copies, the glue of the host schedules.
// One kernel covers every layout change the model needs and its reverse:
//   - split GPT-2's fused qkv rows (row stride 3C) into q, k, v;
//   - put a layer's K/V rows after the P prefix rows of each batch, or into
//     a KV cache at the current position, and slice them back for backward;
//   - gather the last position's hidden row for generation.
// scatter_rows is the reverse of a row gather by index (embedding_forward
// over a hidden-state table): the logits' gradient rows go back to the
// target positions they were gathered from.
// The backward of a copy is the same copy with src and dst swapped, with
// `acc = 1` where several sources sum into one gradient.
//
// Element (n, i, j), n < NB, i < T, j < D:
//   dst[dst_off + n*dst_bs + i*dst_rs + j] (+)= src[src_off + n*src_bs + i*src_rs + j]
// Blocks must not overlap in dst (each element has one writer).

struct Params {
    nb: u32,      // blocks (usually the batch B)
    t: u32,       // rows per block
    d: u32,       // elements per row
    acc: u32,     // 1: dst += src, 0: dst = src
    src_bs: u32,  // src stride between blocks (elements)
    src_rs: u32,  // src stride between rows
    src_off: u32, // src element offset
    dst_bs: u32,
    dst_rs: u32,
    dst_off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

override WG: u32 = 64u;

// Geometry: one thread per element, folded 1-D grid.
@group(0) @binding(1) var<storage, read_write> cp_dst: array<f32>; // strided (NB, T, D) view, see header
@group(0) @binding(2) var<storage, read> cp_src: array<f32>;       // strided (NB, T, D) view, see header

// Element e of the (NB, T, D) block, its destination moved down `shift` rows.
fn copy_elem(e: u32, shift: u32) {
    let j = e % p.d;
    let r = e / p.d;
    let i = r % p.t;
    let n = r / p.t;
    let s = cp_src[p.src_off + n * p.src_bs + i * p.src_rs + j];
    let di = p.dst_off + n * p.dst_bs + (i + shift) * p.dst_rs + j;
    if (p.acc != 0u) {
        cp_dst[di] = cp_dst[di] + s;
    } else {
        cp_dst[di] = s;
    }
}

@compute @workgroup_size(WG)
fn copy_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let e = flat_wg(wg, nwg) * WG + lid;
    if (e >= p.nb * p.t * p.d) { return; }
    copy_elem(e, 0u);
}

// copy_rows_at: copy_rows with the destination rows moved down by the
// count in cp_pos[0], read on the GPU (a KV cache append at the current
// length, recorded once for every token). The host checks that the last
// row fits for every count up to ROWS - T.
@group(0) @binding(3) var<storage, read> cp_pos: array<u32>;       // (1)

@compute @workgroup_size(WG)
fn copy_rows_at(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let e = flat_wg(wg, nwg) * WG + lid;
    if (e >= p.nb * p.t * p.d) { return; }
    copy_elem(e, cp_pos[0]);
}

// scatter_rows: dst[idx[i], :] += src[i, :] for i < R. Indices must be
// distinct (target positions are), so each element has one writer.
// Geometry: one thread per element, folded 1-D grid.
struct ScatterParams {
    r: u32,    // rows of src / entries of idx
    d: u32,    // row width
    rows: u32, // rows of dst; indices outside [0, rows) are skipped
    _p0: u32,
}
@group(0) @binding(0) var<uniform> sp: ScatterParams;
@group(0) @binding(1) var<storage, read_write> sc_dst: array<f32>; // (ROWS, D)
@group(0) @binding(2) var<storage, read> sc_idx: array<i32>;       // (R)
@group(0) @binding(3) var<storage, read> sc_src: array<f32>;       // (R, D)

@compute @workgroup_size(WG)
fn scatter_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let e = flat_wg(wg, nwg) * WG + lid;
    if (e >= sp.r * sp.d) { return; }
    let i = e / sp.d;
    let j = e % sp.d;
    let row = sc_idx[i];
    if (row < 0 || u32(row) >= sp.rows) { return; }
    let di = u32(row) * sp.d + j;
    sc_dst[di] = sc_dst[di] + sc_src[e];
}
