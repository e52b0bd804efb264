//! CPU twins of `shaders/embedding.wgsl`, in f64. Same names and argument
//! order (outputs, inputs, then dims).
//!
//! One batch row of `out` holds S = P + T rows of C channels: the P virtual
//! tokens (`prompt_forward`) followed by the T embedded ids (`embedding_forward`).

/// out[b, P + t, :] = table[ids[b, t], :] for t < T.
///
/// Shapes: out (B, P + T, C), ids (B, T), table (V, C). Rows 0..P of each
/// batch are not touched. An id outside [0, V) gives a zero row, exactly as
/// the GPU kernel does (the host validates ids; this only keeps reads in range).
#[allow(clippy::too_many_arguments)]
pub fn embedding_forward(
    out: &mut [f64],
    ids: &[i32],
    table: &[f64],
    b: usize,
    t: usize,
    v: usize,
    c: usize,
    row_offset: usize,
) {
    let s = row_offset + t;
    for bi in 0..b {
        for ti in 0..t {
            let dst = &mut out[(bi * s + row_offset + ti) * c..][..c];
            match usize::try_from(ids[bi * t + ti]) {
                Ok(id) if id < v => dst.copy_from_slice(&table[id * c..(id + 1) * c]),
                _ => dst.fill(0.0),
            }
        }
    }
}

/// out[b, j, :] = prompt[j, :] for j < P: the virtual tokens go first.
///
/// Shapes: out (B, S, C) with S >= P, prompt (P, C). Rows P..S are not touched.
pub fn prompt_forward(out: &mut [f64], prompt: &[f64], b: usize, s: usize, p: usize, c: usize) {
    for bi in 0..b {
        out[bi * s * c..][..p * c].copy_from_slice(&prompt[..p * c]);
    }
}

/// Differentiates `out[b, j, :] = prompt[j, :]` (`prompt_forward`):
/// dprompt[j, :] += sum over b of dout[b, j, :].
///
/// Shapes: dprompt (P, C), dout (B, S, C). The batch sum is formed first in
/// increasing b and then added once, the same association as the GPU kernel.
pub fn prompt_backward(dprompt: &mut [f64], dout: &[f64], b: usize, s: usize, p: usize, c: usize) {
    for j in 0..p {
        for ci in 0..c {
            let acc: f64 = (0..b).map(|bi| dout[(bi * s + j) * c + ci]).sum();
            dprompt[j * c + ci] += acc;
        }
    }
}
