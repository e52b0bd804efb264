//! CPU twins of `shaders/matmul.wgsl`, in f64. Row-major; weights in the
//! Hugging Face `[out, in]` layout.

/// out (M, N) = inp (M, K) . weight (N, K)^T + bias (N).
#[allow(clippy::too_many_arguments)]
pub fn matmul_forward(
    out: &mut [f64],
    inp: &[f64],
    weight: &[f64],
    bias: Option<&[f64]>,
    m: usize,
    k: usize,
    n: usize,
) {
    for r in 0..m {
        for c in 0..n {
            let mut s = bias.map_or(0.0, |b| b[c]);
            for i in 0..k {
                s += inp[r * k + i] * weight[c * k + i];
            }
            out[r * n + c] = s;
        }
    }
}

/// Differentiates out = inp . weight^T: dinp (M, K) += dout (M, N) . weight (N, K).
pub fn matmul_backward_input(
    dinp: &mut [f64],
    dout: &[f64],
    weight: &[f64],
    m: usize,
    k: usize,
    n: usize,
) {
    for r in 0..m {
        for c in 0..n {
            let d = dout[r * n + c];
            for i in 0..k {
                dinp[r * k + i] += d * weight[c * k + i];
            }
        }
    }
}

/// Differentiates out = inp . weight^T w.r.t. weight: dweight (N, K) += dout^T . inp.
pub fn matmul_backward_weight(
    dweight: &mut [f64],
    dout: &[f64],
    inp: &[f64],
    m: usize,
    k: usize,
    n: usize,
) {
    for r in 0..m {
        for c in 0..n {
            let d = dout[r * n + c];
            for i in 0..k {
                dweight[c * k + i] += d * inp[r * k + i];
            }
        }
    }
}
