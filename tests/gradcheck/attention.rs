use crate::common::{dot, fd_check, Rng};
use wgtune::cpu::attention::*;

/// (B, T, NH, KVH, HD, P)
type Dims = (usize, usize, usize, usize, usize, usize);

fn forward(q: &[f64], k: &[f64], v: &[f64], dims: Dims) -> (Vec<f64>, Vec<f64>) {
    forward_masked(q, k, v, dims, Mask::causal(dims.4))
}

fn forward_masked(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    (b, t, nh, kvh, hd, p): Dims,
    m: Mask,
) -> (Vec<f64>, Vec<f64>) {
    let (mut out, mut lse) = (vec![0.0; b * t * nh * hd], vec![0.0; b * nh * t]);
    attention_forward_masked(&mut out, &mut lse, q, k, v, b, t, nh, kvh, hd, p, m, None);
    (out, lse)
}

/// dq, dk, dv of L = sum(out * dout) against central finite differences.
fn check(tag: &str, dims: Dims, seed: u64) {
    check_masked(tag, dims, seed, Mask::causal(dims.4));
}

fn check_masked(tag: &str, dims: Dims, seed: u64, m: Mask) {
    let forward = |q: &[f64], k: &[f64], v: &[f64], d: Dims| forward_masked(q, k, v, d, m);
    let (b, t, nh, kvh, hd, p) = dims;
    let (nq, nk) = (b * t * nh * hd, b * (p + t) * kvh * hd);
    let mut r = Rng::new(seed);
    let (q, k, v, dout) = (
        r.vec64(nq, 1.5),
        r.vec64(nk, 1.5),
        r.vec64(nk, 1.0),
        r.vec64(nq, 1.0),
    );
    let (out, lse) = forward(&q, &k, &v, dims);
    let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
    attention_backward_masked(
        &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, b, t, nh, kvh, hd, p, m, None,
    );
    fd_check(&format!("{tag} dq"), &q, &dq, |x| {
        dot(&forward(x, &k, &v, dims).0, &dout)
    });
    fd_check(&format!("{tag} dk"), &k, &dk, |x| {
        dot(&forward(&q, x, &v, dims).0, &dout)
    });
    fd_check(&format!("{tag} dv"), &v, &dv, |x| {
        dot(&forward(&q, &k, x, dims).0, &dout)
    });

    // Backward accumulates: starting from g0 gives g0 + gradient.
    let g0 = r.vec64(nk, 1.0);
    let (mut dq2, mut dk2, mut dv2) = (vec![0.0; nq], g0.clone(), vec![0.0; nk]);
    attention_backward_masked(
        &mut dq2, &mut dk2, &mut dv2, &dout, &q, &k, &v, &out, &lse, b, t, nh, kvh, hd, p, m, None,
    );
    for i in 0..nk {
        assert!(
            (dk2[i] - g0[i] - dk[i]).abs() < 1e-12,
            "{tag}: dk does not accumulate at {i}"
        );
    }
}

#[test]
fn attention_backward_matches_finite_differences_gqa_prefix() {
    check("attention GQA P=2", (2, 3, 4, 2, 4, 2), 11);
}

#[test]
fn attention_backward_matches_finite_differences_sliding_window() {
    let m = |w| Mask {
        scale: 0.3,
        window: Some(w),
    };
    check_masked("attention window 2 P=2", (2, 5, 4, 2, 4, 2), 15, m(2));
    check_masked("attention window 3 P=0", (1, 6, 2, 1, 4, 0), 16, m(3));
}

#[test]
fn attention_backward_matches_finite_differences_mha() {
    check("attention MHA P=0", (2, 3, 2, 2, 4, 0), 12);
}

#[test]
fn attention_backward_matches_finite_differences_t1() {
    check("attention T=1 P=3", (1, 1, 3, 1, 8, 3), 13);
}

/// Sanity of the forward itself: with P=0 the first query sees only key 0,
/// so its output is v_0 and its lse is its one score.
#[test]
fn attention_forward_first_query_is_v0() {
    let dims = (1, 4, 2, 1, 4, 0);
    let mut r = Rng::new(14);
    let (q, k, v) = (
        r.vec64(4 * 2 * 4, 1.0),
        r.vec64(4 * 4, 1.0),
        r.vec64(4 * 4, 1.0),
    );
    let (out, lse) = forward(&q, &k, &v, dims);
    for h in 0..2 {
        for d in 0..4 {
            assert!((out[h * 4 + d] - v[d]).abs() < 1e-12);
        }
        let sc: f64 = (0..4).map(|d| q[h * 4 + d] * k[d]).sum::<f64>() / 2.0;
        assert!((lse[h * 4] - sc).abs() < 1e-12);
    }
}
