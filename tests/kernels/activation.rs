use crate::common::{assert_close, read, run, to64, up, zeros, Rng};

use wgtune::cpu;
use wgtune::gpu::ops::activation as act;
use wgtune::gpu::Plan;
use wgtune::Error;

// (N, F), treated as flat arrays of N*F elements. N*F % 4 != 0 runs the _x1
// entries (1, 7, 429), N*F % 4 == 0 the vec4 ones (480 = 120 vec4 and
// 10780 = 2695 vec4: neither a multiple of the 64-wide workgroup).
const SHAPES: &[(usize, usize)] = &[(1, 1), (1, 7), (13, 33), (5, 96), (7, 1540)];

/// Seeded values in [-scale, scale) with a few extremes at the front, where
/// naive sigmoid/tanh overflow (exp(100) is inf in f32).
fn with_extremes(r: &mut Rng, n: usize, scale: f32, big: f32) -> Vec<f32> {
    let mut v = r.vec(n, scale);
    for (slot, x) in v.iter_mut().zip([big, -big, 0.0, 1e-3]) {
        *slot = x;
    }
    v
}

#[test]
fn glu_forward_backward_vs_cpu() {
    let ctx = gpu!();
    for (gelu, &(n, f)) in [false, true]
        .into_iter()
        .flat_map(|g| SHAPES.iter().map(move |s| (g, s)))
    {
        let k = n * f;
        let mut r = Rng::new(n as u64 * 131 + f as u64);
        let (g, u, dout) = (
            with_extremes(&mut r, k, 6.0, 100.0),
            r.vec(k, 2.0),
            r.vec(k, 1.0),
        );
        // Backward accumulates onto existing values.
        let (dg0, du0) = (r.vec(k, 1.0), r.vec(k, 1.0));
        let (tg, tu, tdout) = (
            up(ctx, &g, &[n, f], "gate"),
            up(ctx, &u, &[n, f], "up"),
            up(ctx, &dout, &[n, f], "dout"),
        );
        let out = zeros(ctx, &[n, f], "out");
        let (dgate, dup) = (
            up(ctx, &dg0, &[n, f], "dgate"),
            up(ctx, &du0, &[n, f], "dup"),
        );
        let mut plan = Plan::new("swiglu");
        if gelu {
            act::glu_forward(ctx, &mut plan, &out, &tg, &tu, true).unwrap();
            act::glu_backward(ctx, &mut plan, &dgate, &dup, &tdout, &tg, &tu, true).unwrap();
        } else {
            act::swiglu_forward(ctx, &mut plan, &out, &tg, &tu).unwrap();
            act::swiglu_backward(ctx, &mut plan, &dgate, &dup, &tdout, &tg, &tu).unwrap();
        }
        run(ctx, &plan);

        let mut ro = vec![0.0; k];
        let (mut rdg, mut rdu) = (to64(&dg0), to64(&du0));
        let (g64, u64, d64) = (to64(&g), to64(&u), to64(&dout));
        if gelu {
            cpu::activation::geglu_forward(&mut ro, &g64, &u64, k);
            cpu::activation::geglu_backward(&mut rdg, &mut rdu, &d64, &g64, &u64, k);
        } else {
            cpu::activation::swiglu_forward(&mut ro, &g64, &u64, k);
            cpu::activation::swiglu_backward(&mut rdg, &mut rdu, &d64, &g64, &u64, k);
        }
        let tag = format!("{} N={n} F={f}", if gelu { "geglu" } else { "swiglu" });
        assert_close(&format!("{tag} out"), &read(ctx, &out), &ro, 1e-5, 1e-5);
        assert_close(
            &format!("{tag} dgate"),
            &read(ctx, &dgate),
            &rdg,
            1e-5,
            1e-5,
        );
        assert_close(&format!("{tag} dup"), &read(ctx, &dup), &rdu, 1e-5, 1e-5);
    }
}

#[test]
fn gelu_forward_backward_vs_cpu() {
    let ctx = gpu!();
    for &(n, c) in SHAPES {
        let k = n * c;
        let mut r = Rng::new(n as u64 * 71 + c as u64);
        // |x| up to 5 covers the curved part; +-20 saturates tanh (clamped).
        let (x, dout, d0) = (
            with_extremes(&mut r, k, 5.0, 20.0),
            r.vec(k, 1.0),
            r.vec(k, 1.0),
        );
        let (tx, tdout) = (up(ctx, &x, &[n, c], "inp"), up(ctx, &dout, &[n, c], "dout"));
        let out = zeros(ctx, &[n, c], "out");
        let dinp = up(ctx, &d0, &[n, c], "dinp");
        let mut plan = Plan::new("gelu");
        act::gelu_forward(ctx, &mut plan, &out, &tx).unwrap();
        act::gelu_backward(ctx, &mut plan, &dinp, &tdout, &tx).unwrap();
        run(ctx, &plan);

        let mut ro = vec![0.0; k];
        cpu::activation::gelu_forward(&mut ro, &to64(&x), k);
        let mut rd = to64(&d0);
        cpu::activation::gelu_backward(&mut rd, &to64(&dout), &to64(&x), k);
        let tag = format!("gelu N={n} C={c}");
        assert_close(&format!("{tag} out"), &read(ctx, &out), &ro, 1e-5, 1e-5);
        assert_close(&format!("{tag} dinp"), &read(ctx, &dinp), &rd, 1e-5, 1e-5);
    }
}

#[test]
fn tanh_forward_backward_vs_cpu() {
    let ctx = gpu!();
    for &(n, c) in SHAPES {
        let k = n * c;
        let mut r = Rng::new(n as u64 * 73 + c as u64);
        let (x, dout, d0) = (
            with_extremes(&mut r, k, 3.0, 20.0),
            r.vec(k, 1.0),
            r.vec(k, 1.0),
        );
        let (tx, tdout) = (up(ctx, &x, &[n, c], "inp"), up(ctx, &dout, &[n, c], "dout"));
        let out = zeros(ctx, &[n, c], "out");
        let dinp = up(ctx, &d0, &[n, c], "dinp");
        let mut plan = Plan::new("tanh");
        act::tanh_forward(ctx, &mut plan, &out, &tx).unwrap();
        act::tanh_backward(ctx, &mut plan, &dinp, &tdout, &out).unwrap();
        run(ctx, &plan);
        let mut ro = vec![0.0; k];
        cpu::activation::tanh_forward(&mut ro, &to64(&x), k);
        let mut rd = to64(&d0);
        cpu::activation::tanh_backward(&mut rd, &to64(&dout), &ro, k);
        let tag = format!("tanh N={n} C={c}");
        assert_close(&format!("{tag} out"), &read(ctx, &out), &ro, 1e-6, 1e-5);
        assert_close(&format!("{tag} dinp"), &read(ctx, &dinp), &rd, 1e-5, 1e-5);
    }
}

#[test]
fn residual_forward_backward_vs_cpu() {
    let ctx = gpu!();
    for &(n, c) in SHAPES {
        let k = n * c;
        let mut r = Rng::new(n as u64 * 37 + c as u64);
        let (a, b, dout, d1, d2) = (
            r.vec(k, 2.0),
            r.vec(k, 2.0),
            r.vec(k, 1.0),
            r.vec(k, 1.0),
            r.vec(k, 1.0),
        );
        // Equal element counts with different shapes are accepted.
        let (ta, tb) = (up(ctx, &a, &[n, c], "inp1"), up(ctx, &b, &[k], "inp2"));
        let tdout = up(ctx, &dout, &[n, c], "dout");
        let out = zeros(ctx, &[1, n, c], "out");
        let (dinp1, dinp2) = (up(ctx, &d1, &[n, c], "dinp1"), up(ctx, &d2, &[k], "dinp2"));
        let mut plan = Plan::new("residual");
        act::residual_forward(ctx, &mut plan, &out, &ta, &tb).unwrap();
        act::residual_backward(ctx, &mut plan, &dinp1, &dinp2, &tdout).unwrap();
        run(ctx, &plan);

        let mut ro = vec![0.0; k];
        cpu::activation::residual_forward(&mut ro, &to64(&a), &to64(&b), k);
        let (mut r1, mut r2) = (to64(&d1), to64(&d2));
        cpu::activation::residual_backward(&mut r1, &mut r2, &to64(&dout), k);
        let tag = format!("residual N={n} C={c}");
        assert_close(&format!("{tag} out"), &read(ctx, &out), &ro, 1e-6, 1e-6);
        assert_close(&format!("{tag} dinp1"), &read(ctx, &dinp1), &r1, 1e-6, 1e-6);
        assert_close(&format!("{tag} dinp2"), &read(ctx, &dinp2), &r2, 1e-6, 1e-6);
    }
}

/// More than max_compute_workgroups_per_dimension workgroups: the grid folds
/// into x*y and the kernel recovers the flat index with flat_wg.
#[test]
fn residual_forward_folds_large_grid() {
    let ctx = gpu!();
    let cap = ctx.limits.max_compute_workgroups_per_dimension as usize;
    // 64 invocations per workgroup, 4 elements each; a ragged last workgroup.
    let k = (cap + 3) * 64 * 4 + 4 * 5;
    if (k * 4) as u64 > ctx.binding_limit() {
        eprintln!("skipping: {k} elements exceed one binding on this device (cap {cap})");
        return;
    }
    let a: Vec<f32> = (0..k).map(|i| (i % 1000) as f32).collect();
    let b: Vec<f32> = (0..k).map(|i| (i / 1000) as f32 * 0.5).collect();
    let (ta, tb, out) = (
        up(ctx, &a, &[k], "inp1"),
        up(ctx, &b, &[k], "inp2"),
        zeros(ctx, &[k], "out"),
    );
    let mut plan = Plan::new("residual_big");
    act::residual_forward(ctx, &mut plan, &out, &ta, &tb).unwrap();
    run(ctx, &plan);
    // Both addends and the sum are exact in f32, so the reference is exact too.
    let want: Vec<f64> = a.iter().zip(&b).map(|(x, y)| (x + y) as f64).collect();
    assert_close(
        &format!("residual_forward folded grid ({k} elements)"),
        &read(ctx, &out),
        &want,
        0.0,
        0.0,
    );
}

#[test]
fn activation_rejects_wrong_shapes() {
    let ctx = gpu!();
    let (g, out) = (zeros(ctx, &[4, 8], "gate"), zeros(ctx, &[4, 8], "out"));
    let bad = zeros(ctx, &[4, 9], "up");
    let err = act::swiglu_forward(ctx, &mut Plan::new("t"), &out, &g, &bad).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Shape { .. }) && msg.contains("`up`") && msg.contains("[4, 9]"),
        "{msg}"
    );

    let dinp = zeros(ctx, &[8, 4], "dinp");
    let err = act::gelu_backward(ctx, &mut Plan::new("t"), &dinp, &out, &g).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Shape { .. }) && msg.contains("`dinp`"),
        "{msg}"
    );

    let short = zeros(ctx, &[31], "inp2");
    let err = act::residual_forward(ctx, &mut Plan::new("t"), &out, &g, &short).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Shape { .. }) && msg.contains("`inp2`") && msg.contains("32 elements"),
        "{msg}"
    );
}
