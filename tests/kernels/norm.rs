use crate::common::{assert_close, read, run, to64, up, zeros, Rng};

use wgtune::cpu;
use wgtune::gpu::ops::norm;
use wgtune::gpu::Plan;

// (N, C): odd sizes, one C above the largest workgroup, and one row count
// that is not a multiple of anything. C % 4 == 0 takes the one row per
// invocation build on software adapters (odd C the workgroup build); 19
// rows leave a partial workgroup of rows.
const SHAPES: &[(usize, usize)] = &[(1, 7), (13, 33), (5, 577), (19, 64), (3, 576)];

#[test]
fn rmsnorm_forward_backward_vs_cpu() {
    let ctx = gpu!();
    for &(n, c) in SHAPES {
        let mut r = Rng::new(n as u64 * 31 + c as u64);
        let (x, w, dout, dacc) = (
            r.vec(n * c, 2.0),
            r.vec(c, 1.0),
            r.vec(n * c, 1.0),
            r.vec(n * c, 1.0),
        );
        let (tx, tw, tdout) = (
            up(ctx, &x, &[n, c], "x"),
            up(ctx, &w, &[c], "w"),
            up(ctx, &dout, &[n, c], "dout"),
        );
        let (out, rstd) = (zeros(ctx, &[n, c], "out"), zeros(ctx, &[n], "rstd"));
        let dx = up(ctx, &dacc, &[n, c], "dx"); // backward accumulates onto existing values
        let mut plan = Plan::new("rmsnorm");
        norm::rmsnorm_forward(ctx, &mut plan, &out, &rstd, &tx, &tw, 1e-5).unwrap();
        norm::rmsnorm_backward(ctx, &mut plan, &dx, &tdout, &tx, &tw, &rstd).unwrap();
        run(ctx, &plan);

        let (mut ro, mut rr) = (vec![0.0; n * c], vec![0.0; n]);
        cpu::norm::rmsnorm_forward(&mut ro, &mut rr, &to64(&x), &to64(&w), n, c, 1e-5);
        let mut rdx = to64(&dacc);
        cpu::norm::rmsnorm_backward(&mut rdx, &to64(&dout), &to64(&x), &to64(&w), &rr, n, c);
        let tag = format!("rmsnorm N={n} C={c}");
        assert_close(&format!("{tag} out"), &read(ctx, &out), &ro, 1e-5, 1e-4);
        assert_close(&format!("{tag} rstd"), &read(ctx, &rstd), &rr, 1e-5, 1e-4);
        assert_close(&format!("{tag} dinp"), &read(ctx, &dx), &rdx, 1e-5, 1e-4);
    }
}

#[test]
fn layernorm_forward_backward_vs_cpu() {
    let ctx = gpu!();
    for &(n, c) in SHAPES {
        let mut r = Rng::new(n as u64 * 17 + c as u64);
        let x: Vec<f32> = r.vec(n * c, 2.0).iter().map(|v| v + 3.0).collect(); // non-zero mean
        let (w, b, dout, dacc) = (
            r.vec(c, 1.0),
            r.vec(c, 1.0),
            r.vec(n * c, 1.0),
            r.vec(n * c, 1.0),
        );
        let (tx, tw, tb, tdout) = (
            up(ctx, &x, &[n, c], "x"),
            up(ctx, &w, &[c], "w"),
            up(ctx, &b, &[c], "b"),
            up(ctx, &dout, &[n, c], "dout"),
        );
        let (out, mean, rstd) = (
            zeros(ctx, &[n, c], "out"),
            zeros(ctx, &[n], "mean"),
            zeros(ctx, &[n], "rstd"),
        );
        let dx = up(ctx, &dacc, &[n, c], "dx");
        let mut plan = Plan::new("layernorm");
        norm::layernorm_forward(ctx, &mut plan, &out, &mean, &rstd, &tx, &tw, &tb, 1e-5).unwrap();
        norm::layernorm_backward(ctx, &mut plan, &dx, &tdout, &tx, &tw, &mean, &rstd).unwrap();
        run(ctx, &plan);

        let (mut ro, mut rm, mut rs) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        cpu::norm::layernorm_forward(
            &mut ro,
            &mut rm,
            &mut rs,
            &to64(&x),
            &to64(&w),
            &to64(&b),
            n,
            c,
            1e-5,
        );
        let mut rdx = to64(&dacc);
        cpu::norm::layernorm_backward(&mut rdx, &to64(&dout), &to64(&x), &to64(&w), &rm, &rs, n, c);
        let tag = format!("layernorm N={n} C={c}");
        assert_close(&format!("{tag} out"), &read(ctx, &out), &ro, 1e-5, 1e-4);
        assert_close(&format!("{tag} mean"), &read(ctx, &mean), &rm, 1e-5, 1e-4);
        assert_close(&format!("{tag} dinp"), &read(ctx, &dx), &rdx, 1e-4, 1e-4);
    }
}

#[test]
fn norm_rejects_wrong_shapes() {
    let ctx = gpu!();
    let x = zeros(ctx, &[4, 8], "x");
    let w = zeros(ctx, &[7], "w");
    let (out, rstd) = (zeros(ctx, &[4, 8], "out"), zeros(ctx, &[4], "rstd"));
    let err =
        norm::rmsnorm_forward(ctx, &mut Plan::new("t"), &out, &rstd, &x, &w, 1e-5).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("`w`") && msg.contains("[7]"), "{msg}");
}
