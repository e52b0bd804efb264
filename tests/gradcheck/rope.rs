use crate::common::{dot, fd_check, to64, Rng};
use wgtune::cpu::rope::*;

/// (B, T, H, D, pos_offset, MAXPOS) for the CPU checks: odd B*T, offset > 0.
const DIMS: (usize, usize, usize, usize, usize, usize) = (2, 3, 2, 6, 4, 8);

fn tables(d: usize, max_pos: usize) -> (Vec<f64>, Vec<f64>) {
    let (c, s) = rope_tables(&default_inv_freq(d, 10_000.0), max_pos);
    (to64(&c), to64(&s))
}

#[test]
fn rope_backward_matches_finite_differences() {
    let (b, t, h, d, off, max_pos) = DIMS;
    let n = b * t * h * d;
    let (cos, sin) = tables(d, max_pos);
    let mut r = Rng::new(21);
    let (x, dout) = (r.vec64(n, 1.0), r.vec64(n, 1.0));
    // Fake loss on a copy, because rope_forward works in place.
    let loss = |x: &[f64]| {
        let mut y = x.to_vec();
        rope_forward(&mut y, &cos, &sin, b, t, h, d, off);
        dot(&y, &dout)
    };
    let mut dx = dout.clone();
    rope_backward(&mut dx, &cos, &sin, b, t, h, d, off);
    fd_check("rope_backward dx", &x, &dx, loss);
}

#[test]
fn rope_forward_matches_hf_rotate_half() {
    // HF: q * cos + rotate_half(q) * sin, cos = cat(freqs, freqs).cos(),
    // rotate_half(q) = cat(-q[D/2..], q[..D/2]).
    let (b, t, h, d, off, max_pos) = DIMS;
    let half = d / 2;
    let inv = default_inv_freq(d, 10_000.0);
    let (cos, sin) = tables(d, max_pos);
    let mut r = Rng::new(22);
    let x = r.vec64(b * t * h * d, 1.0);
    let mut y = x.clone();
    rope_forward(&mut y, &cos, &sin, b, t, h, d, off);
    let mut maxdiff = 0.0f64;
    for row in 0..b * t {
        let pos = (row % t + off) as f64;
        for head in 0..h {
            let q = &x[(row * h + head) * d..][..d];
            for j in 0..d {
                let angle = pos * inv[j % half];
                let rot = if j < half { -q[j + half] } else { q[j - half] };
                let want = q[j] * angle.cos() + rot * angle.sin();
                maxdiff = maxdiff.max((y[(row * h + head) * d + j] - want).abs());
            }
        }
    }
    eprintln!("rope_forward vs HF rotate_half: maxdiff {maxdiff:.3e}");
    // The tables are f32, the reference angles f64.
    assert!(
        maxdiff < 1e-6,
        "rope_forward differs from HF rotate_half by {maxdiff}"
    );
}

#[test]
fn rope_backward_inverts_forward() {
    // The rotation is orthogonal: its transpose is its inverse.
    let (b, t, h, d, off, max_pos) = DIMS;
    let (cos, sin) = tables(d, max_pos);
    let x = Rng::new(23).vec64(b * t * h * d, 1.0);
    let mut y = x.clone();
    rope_forward(&mut y, &cos, &sin, b, t, h, d, off);
    rope_backward(&mut y, &cos, &sin, b, t, h, d, off);
    let maxdiff = x
        .iter()
        .zip(&y)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    // cos^2 + sin^2 is 1 only to f32 precision (the tables are f32).
    assert!(
        maxdiff < 1e-6,
        "backward(forward(x)) != x: maxdiff {maxdiff}"
    );
}

#[test]
fn rope_tables_match_definition() {
    let inv = default_inv_freq(8, 10_000.0);
    // 1/10000^(2i/8) for i = 0..4.
    let want = [1.0, 0.1, 0.01, 0.001];
    for (got, want) in inv.iter().zip(want) {
        assert!(
            (got - want).abs() < 1e-15 * want.max(1.0),
            "inv_freq {got} vs {want}"
        );
    }
    let (cos, sin) = rope_tables(&inv, 5);
    assert_eq!((cos.len(), sin.len()), (5 * 4, 5 * 4));
    // Position 0 is the identity rotation; row 3, column 1: angle 0.3.
    assert!(cos[..4].iter().all(|&c| c == 1.0) && sin[..4].iter().all(|&s| s == 0.0));
    assert_eq!(
        (cos[3 * 4 + 1], sin[3 * 4 + 1]),
        (0.3f64.cos() as f32, 0.3f64.sin() as f32)
    );
}
