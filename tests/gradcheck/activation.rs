use crate::common::{dot, fd_check, Rng};
use wgtune::cpu::activation::*;

#[test]
fn swiglu_backward_matches_finite_differences() {
    let n = 2 * 7;
    let mut r = Rng::new(11);
    let (g, u, dout) = (r.vec64(n, 4.0), r.vec64(n, 2.0), r.vec64(n, 1.0));
    let fwd = |g: &[f64], u: &[f64]| {
        let mut out = vec![0.0; n];
        swiglu_forward(&mut out, g, u, n);
        dot(&out, &dout)
    };
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    swiglu_backward(&mut dg, &mut du, &dout, &g, &u, n);
    fd_check("swiglu_backward dgate", &g, &dg, |g| fwd(g, &u));
    fd_check("swiglu_backward dup", &u, &du, |u| fwd(&g, u));
}

#[test]
fn geglu_backward_matches_finite_differences() {
    let n = 3 * 7;
    let mut r = Rng::new(15);
    let (g, u, dout) = (r.vec64(n, 4.0), r.vec64(n, 2.0), r.vec64(n, 1.0));
    let fwd = |g: &[f64], u: &[f64]| {
        let mut out = vec![0.0; n];
        geglu_forward(&mut out, g, u, n);
        dot(&out, &dout)
    };
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    geglu_backward(&mut dg, &mut du, &dout, &g, &u, n);
    fd_check("geglu_backward dgate", &g, &dg, |g| fwd(g, &u));
    fd_check("geglu_backward dup", &u, &du, |u| fwd(&g, u));
}

#[test]
fn gelu_backward_matches_finite_differences() {
    let n = 3 * 5;
    let mut r = Rng::new(12);
    // [-4, 4): both tails and the curved middle of the tanh approximation.
    let (x, dout) = (r.vec64(n, 4.0), r.vec64(n, 1.0));
    let loss = |x: &[f64]| {
        let mut out = vec![0.0; n];
        gelu_forward(&mut out, x, n);
        dot(&out, &dout)
    };
    let mut dx = vec![0.0; n];
    gelu_backward(&mut dx, &dout, &x, n);
    fd_check("gelu_backward dinp", &x, &dx, loss);
}

#[test]
fn gelu_forward_matches_known_values() {
    // torch's gelu(x, approximate="tanh") formula at x = 1, -2, 0.5, evaluated
    // independently in Python (math.tanh, math.sqrt(2/math.pi)).
    let x = [1.0, -2.0, 0.5];
    let mut out = [0.0; 3];
    gelu_forward(&mut out, &x, 3);
    for (got, want) in out.iter().zip([
        0.841_191_990_608_276_8,
        -0.045_402_305_912_224_94,
        0.345_714_009_825_143_94,
    ]) {
        assert!((got - want).abs() < 1e-12, "gelu: {got} vs {want}");
    }
}

#[test]
fn residual_backward_matches_finite_differences() {
    let n = 9;
    let mut r = Rng::new(13);
    let (a, b, dout) = (r.vec64(n, 1.0), r.vec64(n, 1.0), r.vec64(n, 1.0));
    let fwd = |a: &[f64], b: &[f64]| {
        let mut out = vec![0.0; n];
        residual_forward(&mut out, a, b, n);
        dot(&out, &dout)
    };
    let (mut da, mut db) = (vec![0.0; n], vec![0.0; n]);
    residual_backward(&mut da, &mut db, &dout, n);
    fd_check("residual_backward dinp1", &a, &da, |a| fwd(a, &b));
    fd_check("residual_backward dinp2", &b, &db, |b| fwd(&a, b));
}

#[test]
fn tanh_backward_matches_finite_differences() {
    let n = 3 * 5;
    let mut r = Rng::new(13);
    let (x, dout) = (r.vec64(n, 3.0), r.vec64(n, 1.0));
    let loss = |x: &[f64]| {
        let mut out = vec![0.0; n];
        tanh_forward(&mut out, x, n);
        dot(&out, &dout)
    };
    let mut y = vec![0.0; n];
    tanh_forward(&mut y, &x, n);
    let mut dx = vec![0.0; n];
    tanh_backward(&mut dx, &dout, &y, n);
    fd_check("tanh_backward dinp", &x, &dx, loss);
}

#[test]
fn copy_and_scatter_are_adjoint_to_their_reverse() {
    // The backward of a strided copy is the swapped copy with accumulation;
    // the backward of a row gather is scatter_rows. Checked as <Ax, y> = <x, A^T y>.
    use wgtune::cpu::copy::{copy_rows, scatter_rows, Layout};
    let mut r = Rng::new(14);
    let (nb, t, d, p) = (3, 4, 5, 2);
    let x = r.vec64(nb * t * d, 1.0);
    let y = r.vec64(nb * (p + t) * d, 1.0);
    let (dl, sl) = (Layout::rows(p + t, d, p, 0), Layout::dense(t, d));
    let mut ax = vec![0.0; y.len()];
    copy_rows(&mut ax, &x, nb, t, d, dl, sl, false);
    let mut aty = vec![0.0; x.len()];
    copy_rows(&mut aty, &y, nb, t, d, sl, dl, true);
    assert!((dot(&ax, &y) - dot(&x, &aty)).abs() < 1e-12);
    // Gather rows idx of a (rows, d) table, then scatter back.
    let (rows, idx) = (7usize, [4i32, 0, 6]);
    let table = r.vec64(rows * d, 1.0);
    let g: Vec<f64> = idx
        .iter()
        .flat_map(|&i| table[i as usize * d..][..d].to_vec())
        .collect();
    let dy = r.vec64(idx.len() * d, 1.0);
    let mut dt = vec![0.0; rows * d];
    scatter_rows(&mut dt, &idx, &dy, rows, d);
    assert!((dot(&g, &dy) - dot(&table, &dt)).abs() < 1e-12);
}
