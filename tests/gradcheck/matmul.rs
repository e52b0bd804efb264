use crate::common::{dot, fd_check, Rng};
use wgtune::cpu::matmul::*;

#[test]
fn matmul_backward_matches_finite_differences() {
    let (m, k, n) = (3, 5, 4);
    let mut r = Rng::new(7);
    let x = r.vec64(m * k, 1.0);
    let w = r.vec64(n * k, 1.0);
    let b = r.vec64(n, 1.0);
    let dout = r.vec64(m * n, 1.0);
    let fwd = |x: &[f64], w: &[f64]| {
        let mut out = vec![0.0; m * n];
        matmul_forward(&mut out, x, w, Some(&b), m, k, n);
        dot(&out, &dout)
    };
    let mut dx = vec![0.0; m * k];
    matmul_backward_input(&mut dx, &dout, &w, m, k, n);
    fd_check("matmul_backward_input dinp", &x, &dx, |x| fwd(x, &w));
    let mut dw = vec![0.0; n * k];
    matmul_backward_weight(&mut dw, &dout, &x, m, k, n);
    fd_check("matmul_backward_weight dweight", &w, &dw, |w| fwd(&x, w));
}
