use crate::common::{dot, fd_check, Rng};
use wgtune::cpu::lora::*;

// (M, K, N, R) and a scaling != 1 (lora_alpha 3 / r 2).
const M: usize = 3;
const K: usize = 5;
const N: usize = 4;
const R: usize = 2;
const SCALE: f64 = 1.5;

/// Fake loss L = sum(out * dout), with out starting from a fixed y0 (the
/// frozen layer's output) so the residual add is part of what is checked.
fn loss(y0: &[f64], dout: &[f64], inp: &[f64], a: &[f64], b: &[f64]) -> f64 {
    let (mut out, mut h) = (y0.to_vec(), vec![0.0; M * R]);
    lora_forward(&mut out, &mut h, inp, a, b, M, K, N, R, SCALE);
    dot(&out, dout)
}

#[test]
fn lora_backward_matches_finite_differences() {
    let mut rng = Rng::new(41);
    let x = rng.vec64(M * K, 1.0);
    let a = rng.vec64(R * K, 1.0);
    let b = rng.vec64(N * R, 1.0); // non-zero: PEFT's zero init would hide dA and dx
    let y0 = rng.vec64(M * N, 1.0);
    let dout = rng.vec64(M * N, 1.0);

    let (mut out, mut h) = (y0.clone(), vec![0.0; M * R]);
    lora_forward(&mut out, &mut h, &x, &a, &b, M, K, N, R, SCALE);
    let (mut dx, mut da, mut db) = (vec![0.0; M * K], vec![0.0; R * K], vec![0.0; N * R]);
    lora_backward(
        Some(&mut dx),
        &mut da,
        &mut db,
        &dout,
        &h,
        &x,
        &a,
        &b,
        M,
        K,
        N,
        R,
        SCALE,
    );

    fd_check("lora_backward dA", &a, &da, |a| loss(&y0, &dout, &x, a, &b));
    fd_check("lora_backward dB", &b, &db, |b| loss(&y0, &dout, &x, &a, b));
    fd_check("lora_backward dinp", &x, &dx, |x| {
        loss(&y0, &dout, x, &a, &b)
    });
}

#[test]
fn lora_backward_accumulates_and_skips_absent_dinp() {
    let mut rng = Rng::new(42);
    let (x, a, b, dout) = (
        rng.vec64(M * K, 1.0),
        rng.vec64(R * K, 1.0),
        rng.vec64(N * R, 1.0),
        rng.vec64(M * N, 1.0),
    );
    let (mut out, mut h) = (vec![0.0; M * N], vec![0.0; M * R]);
    lora_forward(&mut out, &mut h, &x, &a, &b, M, K, N, R, SCALE);
    // Gradients from zero...
    let (mut da0, mut db0) = (vec![0.0; R * K], vec![0.0; N * R]);
    lora_backward(
        None, &mut da0, &mut db0, &dout, &h, &x, &a, &b, M, K, N, R, SCALE,
    );
    // ...and on top of existing values: the difference must be the same.
    let (ia, ib) = (rng.vec64(R * K, 1.0), rng.vec64(N * R, 1.0));
    let (mut da1, mut db1) = (ia.clone(), ib.clone());
    lora_backward(
        None, &mut da1, &mut db1, &dout, &h, &x, &a, &b, M, K, N, R, SCALE,
    );
    for (name, g0, g1, init) in [("dA", &da0, &da1, &ia), ("dB", &db0, &db1, &ib)] {
        for i in 0..g0.len() {
            assert!(
                (g1[i] - init[i] - g0[i]).abs() < 1e-12,
                "{name}[{i}] does not accumulate"
            );
        }
    }
}

#[test]
fn lora_dropout_backward_matches_finite_differences() {
    use wgtune::cpu::lora::{lora_dropout_backward, lora_dropout_forward};
    let n = 4 * 9;
    let (p, th) = (0.25, (0.25 * 4294967296.0) as u32);
    let mut r = Rng::new(21);
    let (x, dout) = (r.vec64(n, 1.0), r.vec64(n, 1.0));
    let loss = |x: &[f64]| {
        let mut out = vec![0.0; n];
        lora_dropout_forward(&mut out, x, 5, 3, th, p);
        dot(&out, &dout)
    };
    let mut dx = vec![0.0; n];
    lora_dropout_backward(&mut dx, &dout, 5, 3, th, p);
    fd_check("lora_dropout_backward dinp", &x, &dx, loss);
}
