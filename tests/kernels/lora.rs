use crate::common::{assert_close, read, run, to64, up, zeros, Rng};
use wgtune::cpu;
use wgtune::gpu::ops::lora;
use wgtune::gpu::{Context, Plan};

// (M, K, N, R): M = 1; nothing a multiple of 4 (scalar paths); R = 8 with K
// and N multiples of 4 (vec4 paths); R = 1; R % 4 == 0 with N odd (mixed).
const SHAPES: &[(usize, usize, usize, usize)] = &[
    (1, 7, 5, 2),
    (13, 33, 17, 3),
    (12, 32, 20, 8),
    (5, 11, 9, 1),
    (6, 16, 18, 12),
];
const SCALE: f32 = 2.5; // lora_alpha 20 / r 8, say

/// Forward and backward on the GPU against the CPU twin, starting from
/// non-zero out / dA / dB / dx (to prove accumulation) and a garbage dh
/// scratch (to prove it is overwritten). R = 1 also runs without dinp.
fn check(ctx: &Context, m: usize, k: usize, n: usize, r: usize) {
    let with_dinp = r != 1;
    let mut rng = Rng::new((m * 1000 + k * 100 + n * 10 + r) as u64);
    let (x, a, b, dy) = (
        rng.vec(m * k, 1.0),
        rng.vec(r * k, 1.0),
        rng.vec(n * r, 1.0),
        rng.vec(m * n, 1.0),
    );
    let (y0, da0, db0, dx0) = (
        rng.vec(m * n, 1.0),
        rng.vec(r * k, 1.0),
        rng.vec(n * r, 1.0),
        rng.vec(m * k, 1.0),
    );
    let (tx, ta, tb, tdy) = (
        up(ctx, &x, &[m, k], "x"),
        up(ctx, &a, &[r, k], "lora.A"),
        up(ctx, &b, &[n, r], "lora.B"),
        up(ctx, &dy, &[m, n], "dy"),
    );
    let out = up(ctx, &y0, &[m, n], "y");
    let h = zeros(ctx, &[m, r], "lora.h");
    let dh = up(ctx, &vec![7.0; m * r], &[m, r], "lora.dh");
    let (da, db, dx) = (
        up(ctx, &da0, &[r, k], "lora.dA"),
        up(ctx, &db0, &[n, r], "lora.dB"),
        up(ctx, &dx0, &[m, k], "dx"),
    );
    let mut plan = Plan::new("lora");
    lora::lora_forward(ctx, &mut plan, &out, &h, &tx, &ta, &tb, SCALE).unwrap();
    lora::lora_backward(
        ctx,
        &mut plan,
        with_dinp.then_some(&dx),
        &da,
        &db,
        &dh,
        &tdy,
        &h,
        &tx,
        &ta,
        &tb,
        SCALE,
    )
    .unwrap();
    run(ctx, &plan);

    let s = SCALE as f64;
    let (x64, a64, b64, dy64) = (to64(&x), to64(&a), to64(&b), to64(&dy));
    let (mut ro, mut rh) = (to64(&y0), vec![0.0; m * r]);
    cpu::lora::lora_forward(&mut ro, &mut rh, &x64, &a64, &b64, m, k, n, r, s);
    let (mut rda, mut rdb, mut rdx) = (to64(&da0), to64(&db0), to64(&dx0));
    cpu::lora::lora_backward(
        with_dinp.then_some(&mut rdx[..]),
        &mut rda,
        &mut rdb,
        &dy64,
        &rh,
        &x64,
        &a64,
        &b64,
        m,
        k,
        n,
        r,
        s,
    );
    // dh = s * dy B, spelled out here since the CPU twin keeps it internal.
    let rdh: Vec<f64> = (0..m * r)
        .map(|i| {
            s * (0..n)
                .map(|c| dy64[(i / r) * n + c] * b64[c * r + i % r])
                .sum::<f64>()
        })
        .collect();

    let t = format!("lora M={m} K={k} N={n} R={r}");
    assert_close(&format!("{t} h"), &read(ctx, &h), &rh, 1e-5, 1e-4);
    assert_close(&format!("{t} out"), &read(ctx, &out), &ro, 1e-5, 1e-4);
    assert_close(&format!("{t} dh"), &read(ctx, &dh), &rdh, 1e-5, 1e-4);
    assert_close(&format!("{t} dA"), &read(ctx, &da), &rda, 1e-5, 1e-4);
    assert_close(&format!("{t} dB"), &read(ctx, &db), &rdb, 1e-5, 1e-4);
    if with_dinp {
        assert_close(&format!("{t} dinp"), &read(ctx, &dx), &rdx, 1e-5, 1e-4);
    } else {
        // Absent dinp: the tensor is untouched.
        assert_eq!(read(ctx, &dx), dx0, "{t}: dinp was written although absent");
    }
}

#[test]
fn lora_forward_backward_vs_cpu() {
    let ctx = gpu!();
    for &(m, k, n, r) in SHAPES {
        check(ctx, m, k, n, r);
    }
}

#[test]
fn lora_rejects_wrong_shapes() {
    let ctx = gpu!();
    let (m, k, n, r) = (3, 8, 4, 2);
    let x = zeros(ctx, &[m, k], "x");
    let a = zeros(ctx, &[r, k], "lora.A");
    let b = zeros(ctx, &[n, r], "lora.B");
    let (out, h, dy) = (
        zeros(ctx, &[m, n], "y"),
        zeros(ctx, &[m, r], "lora.h"),
        zeros(ctx, &[m, n], "dy"),
    );
    let (da, db, dh, dx) = (
        zeros(ctx, &[r, k], "lora.dA"),
        zeros(ctx, &[n, r], "lora.dB"),
        zeros(ctx, &[m, r], "lora.dh"),
        zeros(ctx, &[m, k], "dx"),
    );
    let bad_a = zeros(ctx, &[r, k + 1], "lora.A.bad");
    let bad_b = zeros(ctx, &[n, r + 1], "lora.B.bad");
    let bad_h = zeros(ctx, &[m, r + 1], "lora.h.bad");
    let bad_dx = zeros(ctx, &[m, k - 1], "dx.bad");
    let bad_db = zeros(ctx, &[r, n], "lora.dB.bad");
    let rank0 = zeros(ctx, &[0, k], "lora.A.rank0");
    let mut plan = Plan::new("t");
    let fwd = |plan: &mut Plan, h: &_, a: &_, b: &_| {
        lora::lora_forward(ctx, plan, &out, h, &x, a, b, 1.0)
    };
    for (want, e) in [
        ("lora.A.bad", fwd(&mut plan, &h, &bad_a, &b)),
        ("lora.B.bad", fwd(&mut plan, &h, &a, &bad_b)),
        ("lora.h.bad", fwd(&mut plan, &bad_h, &a, &b)),
        ("lora.A.rank0", fwd(&mut plan, &h, &rank0, &b)),
        (
            "dx.bad",
            lora::lora_backward(
                ctx,
                &mut plan,
                Some(&bad_dx),
                &da,
                &db,
                &dh,
                &dy,
                &h,
                &x,
                &a,
                &b,
                1.0,
            ),
        ),
        (
            "lora.dB.bad",
            lora::lora_backward(
                ctx,
                &mut plan,
                Some(&dx),
                &da,
                &bad_db,
                &dh,
                &dy,
                &h,
                &x,
                &a,
                &b,
                1.0,
            ),
        ),
    ] {
        let msg = e.expect_err(want).to_string();
        assert!(msg.contains(want), "expected `{want}` in: {msg}");
    }
    let e = lora::lora_forward(ctx, &mut plan, &out, &h, &x, &a, &b, f32::NAN)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not finite"), "{e}");
    assert_eq!(
        plan.dispatches(),
        0,
        "nothing may be recorded before the checks pass"
    );
}

#[test]
fn lora_backward_is_deterministic() {
    // Enough tokens that dA and dB use several split-K partials.
    let ctx = gpu!();
    let (m, k, n, r) = (100, 20, 24, 8);
    let mut rng = Rng::new(9);
    let (x, a, b, dy) = (
        rng.vec(m * k, 1.0),
        rng.vec(r * k, 1.0),
        rng.vec(n * r, 1.0),
        rng.vec(m * n, 1.0),
    );
    let (tx, ta, tb, tdy) = (
        up(ctx, &x, &[m, k], "x"),
        up(ctx, &a, &[r, k], "lora.A"),
        up(ctx, &b, &[n, r], "lora.B"),
        up(ctx, &dy, &[m, n], "dy"),
    );
    let h = zeros(ctx, &[m, r], "lora.h");
    let mut plan = Plan::new("lora fwd");
    lora::lora_forward(
        ctx,
        &mut plan,
        &zeros(ctx, &[m, n], "y"),
        &h,
        &tx,
        &ta,
        &tb,
        2.0,
    )
    .unwrap();
    run(ctx, &plan);
    let go = || {
        let (da, db, dh, dx) = (
            zeros(ctx, &[r, k], "lora.dA"),
            zeros(ctx, &[n, r], "lora.dB"),
            zeros(ctx, &[m, r], "lora.dh"),
            zeros(ctx, &[m, k], "dx"),
        );
        let mut plan = Plan::new("lora bwd");
        lora::lora_backward(
            ctx,
            &mut plan,
            Some(&dx),
            &da,
            &db,
            &dh,
            &tdy,
            &h,
            &tx,
            &ta,
            &tb,
            2.0,
        )
        .unwrap();
        run(ctx, &plan);
        [read(ctx, &da), read(ctx, &db), read(ctx, &dx)]
    };
    let (p, q) = (go(), go());
    for (name, u, v) in [
        ("dA", &p[0], &q[0]),
        ("dB", &p[1], &q[1]),
        ("dinp", &p[2], &q[2]),
    ] {
        assert!(
            u.iter().zip(v).all(|(x, y)| x.to_bits() == y.to_bits()),
            "lora_backward {name} differs between runs"
        );
    }
}

#[test]
fn lora_dropout_vs_cpu() {
    let ctx = gpu!();
    let (m, k, p, seed, site) = (13usize, 37usize, 0.3, 12345u32, 7u32);
    let mut r = Rng::new(99);
    let (x, g, d0) = (r.vec(m * k, 1.0), r.vec(m * k, 1.0), r.vec(m * k, 1.0));
    let tx = up(ctx, &x, &[m, k], "x");
    let tg = up(ctx, &g, &[m, k], "g");
    let td = up(ctx, &d0, &[m, k], "dinp");
    let out = zeros(ctx, &[m, k], "out");
    let ts = wgtune::gpu::Tensor::from_u32(ctx, &[seed], &[1], "seed").unwrap();
    let mut plan = Plan::new("dropout");
    lora::lora_dropout_forward(ctx, &mut plan, &out, &tx, &ts, site, p).unwrap();
    lora::lora_dropout_backward(ctx, &mut plan, &td, &tg, &ts, site, p).unwrap();
    run(ctx, &plan);
    let th = lora::dropout_threshold(p);
    let mut ro = vec![0.0; m * k];
    cpu::lora::lora_dropout_forward(&mut ro, &to64(&x), seed, site, th, p);
    let mut rd = to64(&d0);
    cpu::lora::lora_dropout_backward(&mut rd, &to64(&g), seed, site, th, p);
    assert_close("dropout out", &read(ctx, &out), &ro, 1e-6, 1e-6);
    assert_close("dropout dinp", &read(ctx, &td), &rd, 1e-6, 1e-6);
    assert!(
        read(ctx, &tg).iter().all(|&v| v == 0.0),
        "scratch g is zeroed"
    );
    let kept = ro.iter().filter(|&&v| v != 0.0).count() as f64 / (m * k) as f64;
    assert!((kept - (1.0 - p)).abs() < 0.08, "kept fraction {kept}");
}
