//! CPU twins of `shaders/rope.wgsl`, in f64, plus the host-side tables.
//!
//! RoPE uses the Hugging Face `rotate_half` layout: the pairs are (i, i + D/2),
//! not adjacent elements. The cos/sin tables are built here, in f64, and cast
//! to f32 for upload: GPU sin/cos lose accuracy at large angles.

/// HF `inv_freq`: inv_freq[i] = 1 / theta^(2i / D) for i < D/2
/// (`1.0 / base ** (arange(0, dim, 2) / dim)`; theta is `rope_theta`, 10000 in Llama 2).
pub fn default_inv_freq(head_dim: usize, theta: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
        .collect()
}

/// The (cos, sin) tables, each (max_pos, D/2) row-major with
/// D/2 = inv_freq.len(): cos[pos, i] = cos(pos * inv_freq[i]). The angle and
/// its cos/sin are taken in f64, then cast once.
pub fn rope_tables(inv_freq: &[f64], max_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for pos in 0..max_pos {
        for &f in inv_freq {
            let a = pos as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// Rotate every head of every row by the angles of its position, in place
/// (`sgn` = 1), or by minus them (`sgn` = -1, the transpose).
#[allow(clippy::too_many_arguments)]
fn rotate(
    x: &mut [f64],
    cos: &[f64],
    sin: &[f64],
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    pos_offset: usize,
    sgn: f64,
) {
    assert!(d.is_multiple_of(2), "rope: head dim {d} is odd");
    let half = d / 2;
    for row in 0..b * t {
        // Row r = b*T + t sits at position t + pos_offset.
        let pos = row % t + pos_offset;
        for head in 0..h {
            let base = (row * h + head) * d;
            for i in 0..half {
                let (c, s) = (cos[pos * half + i], sgn * sin[pos * half + i]);
                let (x1, x2) = (x[base + i], x[base + i + half]);
                x[base + i] = x1 * c - x2 * s;
                x[base + i + half] = x2 * c + x1 * s;
            }
        }
    }
}

/// x (B*T, H, D) rotated in place; cos, sin (MAXPOS, D/2). For i < D/2 with
/// c = cos[pos, i], s = sin[pos, i]: out[i] = x[i]*c - x[i+D/2]*s and
/// out[i+D/2] = x[i+D/2]*c + x[i]*s (HF q*cos + rotate_half(q)*sin).
#[allow(clippy::too_many_arguments)]
pub fn rope_forward(
    x: &mut [f64],
    cos: &[f64],
    sin: &[f64],
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    pos_offset: usize,
) {
    rotate(x, cos, sin, b, t, h, d, pos_offset, 1.0);
}

/// Differentiates `out[i] = x[i]*c - x[i+D/2]*s; out[i+D/2] = x[i+D/2]*c + x[i]*s`.
/// The rotation is orthogonal, so dx = R(-theta) dout: dx (B*T, H, D) is
/// rotated back in place (it turns the gradient of the rotated tensor into the
/// gradient of the unrotated one, so it replaces rather than accumulates).
#[allow(clippy::too_many_arguments)]
pub fn rope_backward(
    dx: &mut [f64],
    cos: &[f64],
    sin: &[f64],
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    pos_offset: usize,
) {
    rotate(dx, cos, sin, b, t, h, d, pos_offset, -1.0);
}
