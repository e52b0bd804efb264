//! CPU twins of `shaders/activation.wgsl`, in f64. Same names and argument
//! order as the WGSL entry points and the `gpu::ops::activation` wrappers.
//! Every tensor is a flat array of `n` elements, as in the kernels; backward
//! functions accumulate (`+=`).

/// Logistic sigmoid without `exp` overflow (the form common.wgsl uses).
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// sqrt(2/pi), the GELU tanh-approximation constant.
const GELU_K0: f64 = 0.797_884_560_802_865_4;
const GELU_K1: f64 = 0.044715;

/// out (N, F) = silu(gate) * up = gate * sigmoid(gate) * up (Llama MLP).
pub fn swiglu_forward(out: &mut [f64], gate: &[f64], up: &[f64], n: usize) {
    for i in 0..n {
        out[i] = gate[i] * sigmoid(gate[i]) * up[i];
    }
}

/// Differentiates `out = gate * s(gate) * up`, s = sigmoid:
/// dgate += dout * up * s * (1 + gate * (1 - s)); dup += dout * gate * s.
pub fn swiglu_backward(
    dgate: &mut [f64],
    dup: &mut [f64],
    dout: &[f64],
    gate: &[f64],
    up: &[f64],
    n: usize,
) {
    for i in 0..n {
        let (g, s) = (gate[i], sigmoid(gate[i]));
        dgate[i] += dout[i] * up[i] * s * (1.0 + g * (1.0 - s));
        dup[i] += dout[i] * g * s;
    }
}

/// out (N, C) = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
/// (HF GPT-2 "gelu_new").
pub fn gelu_forward(out: &mut [f64], inp: &[f64], n: usize) {
    for i in 0..n {
        let x = inp[i];
        out[i] = 0.5 * x * (1.0 + (GELU_K0 * (x + GELU_K1 * x * x * x)).tanh());
    }
}

/// Differentiates `out = 0.5 * x * (1 + tanh(u))`, u = K0 * (x + K1 * x^3):
/// dinp += dout * (0.5 * (1 + t) + 0.5 * x * (1 - t^2) * K0 * (1 + 3 * K1 * x^2)).
pub fn gelu_backward(dinp: &mut [f64], dout: &[f64], inp: &[f64], n: usize) {
    for i in 0..n {
        let x = inp[i];
        let t = (GELU_K0 * (x + GELU_K1 * x * x * x)).tanh();
        let local =
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K0 * (1.0 + 3.0 * GELU_K1 * x * x);
        dinp[i] += dout[i] * local;
    }
}

/// out = gelu(gate) * up (Gemma's GeGLU, tanh GELU as in [`gelu_forward`]).
pub fn geglu_forward(out: &mut [f64], gate: &[f64], up: &[f64], n: usize) {
    gelu_forward(out, gate, n);
    for i in 0..n {
        out[i] *= up[i];
    }
}

/// Differentiates `out = gelu(gate) * up`: dgate += dout * up * gelu'(gate);
/// dup += dout * gelu(gate).
pub fn geglu_backward(
    dgate: &mut [f64],
    dup: &mut [f64],
    dout: &[f64],
    gate: &[f64],
    up: &[f64],
    n: usize,
) {
    let mut g = vec![0.0; n];
    gelu_forward(&mut g, gate, n);
    let scaled: Vec<f64> = (0..n).map(|i| dout[i] * up[i]).collect();
    gelu_backward(dgate, &scaled, gate, n);
    for i in 0..n {
        dup[i] += dout[i] * g[i];
    }
}

/// out = inp1 + inp2 (the skip connection).
pub fn residual_forward(out: &mut [f64], inp1: &[f64], inp2: &[f64], n: usize) {
    for i in 0..n {
        out[i] = inp1[i] + inp2[i];
    }
}

/// Differentiates `out = inp1 + inp2`: dinp1 += dout; dinp2 += dout.
pub fn residual_backward(dinp1: &mut [f64], dinp2: &mut [f64], dout: &[f64], n: usize) {
    for i in 0..n {
        dinp1[i] += dout[i];
        dinp2[i] += dout[i];
    }
}

/// out = tanh(inp).
pub fn tanh_forward(out: &mut [f64], inp: &[f64], n: usize) {
    for i in 0..n {
        out[i] = inp[i].tanh();
    }
}

/// Differentiates `out = tanh(inp)` from the saved output: dinp += dout * (1 - out^2).
pub fn tanh_backward(dinp: &mut [f64], dout: &[f64], out: &[f64], n: usize) {
    for i in 0..n {
        dinp[i] += dout[i] * (1.0 - out[i] * out[i]);
    }
}
