use crate::common::{assert_close, read, run, to64, up, zeros, Rng};

use wgtune::cpu;
use wgtune::gpu::ops::{activation, norm};
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

/// The residual add fused in front of RMSNorm: against the CPU twin, and
/// bit-equal to the two dispatches it replaces (residual_forward, then
/// rmsnorm_forward), in both builds (SHAPES has rows for each).
#[test]
fn rmsnorm_add_forward_vs_cpu_and_unfused() {
    let ctx = gpu!();
    for &(n, c) in SHAPES {
        let mut r = Rng::new(n as u64 * 17 + c as u64);
        let (a, b, w) = (r.vec(n * c, 2.0), r.vec(n * c, 1.0), r.vec(c, 1.0));
        let (ta, tb, tw) = (
            up(ctx, &a, &[n, c], "a"),
            up(ctx, &b, &[n, c], "b"),
            up(ctx, &w, &[c], "w"),
        );
        let z = |l: &str| zeros(ctx, &[n, c], l);
        let (out, sum, rstd) = (z("out"), z("sum"), zeros(ctx, &[n], "rstd"));
        let (out2, sum2, rstd2) = (z("out2"), z("sum2"), zeros(ctx, &[n], "rstd2"));
        let mut plan = Plan::new("rmsnorm_add");
        norm::rmsnorm_add_forward(ctx, &mut plan, &out, &rstd, &sum, &ta, &tb, &tw, 1e-5).unwrap();
        activation::residual_forward(ctx, &mut plan, &sum2, &ta, &tb).unwrap();
        norm::rmsnorm_forward(ctx, &mut plan, &out2, &rstd2, &sum2, &tw, 1e-5).unwrap();
        run(ctx, &plan);

        let (mut ro, mut rr, mut rs) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n * c]);
        let (a64, b64) = (to64(&a), to64(&b));
        cpu::norm::rmsnorm_add_forward(
            &mut ro,
            &mut rr,
            &mut rs,
            &a64,
            &b64,
            &to64(&w),
            n,
            c,
            1e-5,
        );
        let tag = format!("rmsnorm_add N={n} C={c}");
        assert_close(&format!("{tag} out"), &read(ctx, &out), &ro, 1e-5, 1e-4);
        assert_close(&format!("{tag} rstd"), &read(ctx, &rstd), &rr, 1e-5, 1e-4);
        assert_close(&format!("{tag} sum"), &read(ctx, &sum), &rs, 1e-6, 1e-6);
        for (name, x, y) in [
            ("out", &out, &out2),
            ("rstd", &rstd, &rstd2),
            ("sum", &sum, &sum2),
        ] {
            let (x, y) = (read(ctx, x), read(ctx, y));
            let same = x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(
                same,
                "{tag}: fused {name} differs from the unfused dispatches"
            );
        }
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
