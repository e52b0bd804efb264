//! CPU twins of `shaders/norm.wgsl`, in f64. Same names and argument order.

/// out (N, C) = weight * x * rstd; rstd (N) = 1/sqrt(mean(x^2) + eps).
pub fn rmsnorm_forward(
    out: &mut [f64],
    rstd: &mut [f64],
    inp: &[f64],
    weight: &[f64],
    n: usize,
    c: usize,
    eps: f64,
) {
    for r in 0..n {
        let x = &inp[r * c..(r + 1) * c];
        let ms = x.iter().map(|v| v * v).sum::<f64>() / c as f64;
        let s = 1.0 / (ms + eps).sqrt();
        rstd[r] = s;
        for i in 0..c {
            out[r * c + i] = weight[i] * x[i] * s;
        }
    }
}

/// sum (N, C) = a + b, then [`rmsnorm_forward`] of sum (the residual add
/// fused in front of the norm). Its backward is the norm's: the add passes
/// the gradient on unchanged.
#[allow(clippy::too_many_arguments)] // the kernel's bindings
pub fn rmsnorm_add_forward(
    out: &mut [f64],
    rstd: &mut [f64],
    sum: &mut [f64],
    a: &[f64],
    b: &[f64],
    weight: &[f64],
    n: usize,
    c: usize,
    eps: f64,
) {
    for i in 0..n * c {
        sum[i] = a[i] + b[i];
    }
    rmsnorm_forward(out, rstd, sum, weight, n, c, eps);
}

/// dinp += rstd * (g - x * rstd^2 * mean(g*x)), g = weight * dout.
pub fn rmsnorm_backward(
    dinp: &mut [f64],
    dout: &[f64],
    inp: &[f64],
    weight: &[f64],
    rstd: &[f64],
    n: usize,
    c: usize,
) {
    for r in 0..n {
        let x = &inp[r * c..(r + 1) * c];
        let d = &dout[r * c..(r + 1) * c];
        let s = rstd[r];
        let dot: f64 = (0..c).map(|i| weight[i] * d[i] * x[i]).sum::<f64>() / c as f64;
        for i in 0..c {
            dinp[r * c + i] += s * (weight[i] * d[i] - x[i] * s * s * dot);
        }
    }
}

/// out = (x - mean) * rstd * weight + bias; saves mean and rstd (biased variance).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: &mut [f64],
    mean: &mut [f64],
    rstd: &mut [f64],
    inp: &[f64],
    weight: &[f64],
    bias: &[f64],
    n: usize,
    c: usize,
    eps: f64,
) {
    for r in 0..n {
        let x = &inp[r * c..(r + 1) * c];
        let m = x.iter().sum::<f64>() / c as f64;
        let v = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / c as f64;
        let s = 1.0 / (v + eps).sqrt();
        mean[r] = m;
        rstd[r] = s;
        for i in 0..c {
            out[r * c + i] = (x[i] - m) * s * weight[i] + bias[i];
        }
    }
}

/// dinp += rstd * (g - mean(g) - xhat * mean(g*xhat)), g = weight * dout.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: &mut [f64],
    dout: &[f64],
    inp: &[f64],
    weight: &[f64],
    mean: &[f64],
    rstd: &[f64],
    n: usize,
    c: usize,
) {
    for r in 0..n {
        let (m, s) = (mean[r], rstd[r]);
        let xhat: Vec<f64> = (0..c).map(|i| (inp[r * c + i] - m) * s).collect();
        let g: Vec<f64> = (0..c).map(|i| weight[i] * dout[r * c + i]).collect();
        let mg = g.iter().sum::<f64>() / c as f64;
        let mgx = (0..c).map(|i| g[i] * xhat[i]).sum::<f64>() / c as f64;
        for i in 0..c {
            dinp[r * c + i] += s * (g[i] - mg - xhat[i] * mgx);
        }
    }
}
