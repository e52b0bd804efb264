use crate::common::{dot, fd_check, Rng};
use wgtune::cpu::norm::*;

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let (n, c, eps) = (3, 5, 1e-5);
    let mut r = Rng::new(1);
    let x = r.vec64(n * c, 1.0);
    let w = r.vec64(c, 1.0);
    let dout = r.vec64(n * c, 1.0);
    let loss = |x: &[f64]| {
        let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
        rmsnorm_forward(&mut out, &mut rstd, x, &w, n, c, eps);
        dot(&out, &dout)
    };
    let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
    rmsnorm_forward(&mut out, &mut rstd, &x, &w, n, c, eps);
    let mut dx = vec![0.0; n * c];
    rmsnorm_backward(&mut dx, &dout, &x, &w, &rstd, n, c);
    fd_check("rmsnorm_backward dinp", &x, &dx, loss);
}

#[test]
fn layernorm_backward_matches_finite_differences() {
    let (n, c, eps) = (3, 5, 1e-5);
    let mut r = Rng::new(2);
    let x = r.vec64(n * c, 1.0);
    let w = r.vec64(c, 1.0);
    let b = r.vec64(c, 1.0);
    let dout = r.vec64(n * c, 1.0);
    let fwd = |x: &[f64]| {
        let (mut out, mut m, mut s) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        layernorm_forward(&mut out, &mut m, &mut s, x, &w, &b, n, c, eps);
        (out, m, s)
    };
    let (_, m, s) = fwd(&x);
    let mut dx = vec![0.0; n * c];
    layernorm_backward(&mut dx, &dout, &x, &w, &m, &s, n, c);
    fd_check("layernorm_backward dinp", &x, &dx, |x| {
        dot(&fwd(x).0, &dout)
    });
}
