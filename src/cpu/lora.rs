//! CPU twins of the LoRA schedule (`shaders/lora.wgsl` plus the matmuls that
//! `gpu::ops::lora` records around it), in f64. Same names and argument order
//! as the GPU wrappers.
//!
//! PEFT semantics: `y += scaling * (x A^T) B^T` with lora_A `(R, K)`
//! (`[r, in_features]`), lora_B `(N, R)` (`[out_features, r]`) and
//! `scaling = lora_alpha / r` (or `/ sqrt(r)` with rslora); the caller passes
//! the resolved scaling as `scale`. All matrices are row-major.

use super::matmul::{matmul_backward_input, matmul_backward_weight, matmul_forward};

/// Forward of the LoRA bypass of a frozen linear layer:
/// h (M, R) = inp (M, K) . a (R, K)^T, saved for backward;
/// out (M, N) += scale * h . b (N, R)^T (the residual add into y = x W^T).
#[allow(clippy::too_many_arguments)]
pub fn lora_forward(
    out: &mut [f64],
    h: &mut [f64],
    inp: &[f64],
    a: &[f64],
    b: &[f64],
    m: usize,
    k: usize,
    n: usize,
    r: usize,
    scale: f64,
) {
    // The "down" projection is a plain matmul with R output features.
    matmul_forward(h, inp, a, None, m, k, r);
    // The "up" projection, added into the frozen layer's output.
    for row in 0..m {
        for col in 0..n {
            let s: f64 = (0..r).map(|j| h[row * r + j] * b[col * r + j]).sum();
            out[row * n + col] += scale * s;
        }
    }
}

/// Backward of [`lora_forward`]; accumulates (`+=`) into da (R, K), db (N, R)
/// and, when given, dinp (M, K). `dinp` is `None` for the lowest layer, whose
/// input needs no gradient.
///
/// Differentiates `out[m, n] += scale * sum_j h[m, j] * b[n, j]` with
/// `h[m, j] = sum_k inp[m, k] * a[j, k]`:
/// dh = scale * dout . b (M, R); db += scale * dout^T . h;
/// da += dh^T . inp; dinp += dh . a.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    dinp: Option<&mut [f64]>,
    da: &mut [f64],
    db: &mut [f64],
    dout: &[f64],
    h: &[f64],
    inp: &[f64],
    a: &[f64],
    b: &[f64],
    m: usize,
    k: usize,
    n: usize,
    r: usize,
    scale: f64,
) {
    // dh (M, R) = scale * dout (M, N) . b (N, R): the gradient reaching h.
    // A scratch, so it is written, not accumulated.
    let mut dh = vec![0.0; m * r];
    for row in 0..m {
        for j in 0..r {
            let s: f64 = (0..n).map(|col| dout[row * n + col] * b[col * r + j]).sum();
            dh[row * r + j] = scale * s;
        }
    }
    // db (N, R) += scale * dout^T . h.
    for row in 0..m {
        for col in 0..n {
            let d = scale * dout[row * n + col];
            for j in 0..r {
                db[col * r + j] += d * h[row * r + j];
            }
        }
    }
    // h = inp . a^T is a matmul with R output features, so its two backward
    // halves are the matmul ones: da (R, K) += dh^T . inp, dinp += dh . a.
    matmul_backward_weight(da, &dh, inp, m, k, r);
    if let Some(dinp) = dinp {
        matmul_backward_input(dinp, &dh, a, m, k, r);
    }
}

fn pcg_hash(v: u32) -> u32 {
    let state = v.wrapping_mul(747796405).wrapping_add(2891336453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277803737);
    (word >> 22) ^ word
}

/// Whether element `i` of dropout site `site` is kept for `seed` (the
/// shader's hash; `threshold` = p * 2^32).
pub fn dropout_keep(seed: u32, site: u32, i: u32, threshold: u32) -> bool {
    pcg_hash(i ^ pcg_hash(seed ^ pcg_hash(site))) >= threshold
}

/// out = inp * keep / (1 - p).
pub fn lora_dropout_forward(
    out: &mut [f64],
    inp: &[f64],
    seed: u32,
    site: u32,
    threshold: u32,
    p: f64,
) {
    for (i, (o, &x)) in out.iter_mut().zip(inp).enumerate() {
        *o = if dropout_keep(seed, site, i as u32, threshold) {
            x / (1.0 - p)
        } else {
            0.0
        };
    }
}

/// Differentiates [`lora_dropout_forward`]: dinp += g * keep / (1 - p).
pub fn lora_dropout_backward(
    dinp: &mut [f64],
    g: &[f64],
    seed: u32,
    site: u32,
    threshold: u32,
    p: f64,
) {
    for (i, (d, &x)) in dinp.iter_mut().zip(g).enumerate() {
        if dropout_keep(seed, site, i as u32, threshold) {
            *d += x / (1.0 - p);
        }
    }
}
