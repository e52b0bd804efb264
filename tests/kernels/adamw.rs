use crate::common::{assert_close, read, run, to64, up, zeros, Rng};

use wgtune::cpu;
use wgtune::gpu::ops::adamw::{self, adamw_step_scalars, global_norm_partials_len};
use wgtune::gpu::{Context, Plan, Tensor};
use wgtune::Error;

// Flat arena lengths: a single element, one partial slice with a ragged
// tail, and several slices (so the finalize pass reduces many partials).
const SIZES: &[usize] = &[1, 1001, 70001];

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
const WD: f64 = 0.1;

/// The GPU side of one optimizer: the arena tensors and the recorded plan
/// global_norm -> adamw_update.
struct Opt {
    params: Tensor,
    m: Tensor,
    v: Tensor,
    grads: Tensor,
    norm: Tensor,
    step: Tensor,
    plan: Plan,
}

impl Opt {
    fn new(ctx: &Context, p0: &[f32], max_norm: f32) -> Opt {
        let n = p0.len();
        let (params, m, v, grads) = (
            up(ctx, p0, &[n], "params"),
            zeros(ctx, &[n], "m"),
            zeros(ctx, &[n], "v"),
            zeros(ctx, &[n], "grads"),
        );
        let (norm, step) = (zeros(ctx, &[4], "norm"), zeros(ctx, &[8], "step"));
        let partials = zeros(ctx, &[global_norm_partials_len(n)], "partials");
        let mut plan = Plan::new("optimizer");
        adamw::global_norm(ctx, &mut plan, &norm, &partials, &grads, max_norm).unwrap();
        adamw::adamw_update(ctx, &mut plan, &params, &m, &v, &grads, &norm, &step).unwrap();
        assert_eq!(plan.dispatches(), 3);
        Opt {
            params,
            m,
            v,
            grads,
            norm,
            step,
            plan,
        }
    }

    /// Host side of one training step: new grads and step scalars, replay.
    fn step(&self, ctx: &Context, grads: &[f32], lr: f64, t: u64) {
        self.grads.write_f32(ctx, grads).unwrap();
        self.step
            .write_f32(ctx, &adamw_step_scalars(lr, BETA1, BETA2, EPS, WD, t))
            .unwrap();
        run(ctx, &self.plan);
    }
}

/// Learning rate of step t: a decaying schedule, so a stale recorded value
/// would show up as a mismatch.
fn lr_at(t: u64) -> f64 {
    1e-2 * (1.0 - 0.05 * t as f64)
}

#[test]
fn global_norm_vs_cpu() {
    let ctx = gpu!();
    for &n in SIZES {
        let mut r = Rng::new(n as u64 + 5);
        let g = r.vec(n, 1.0);
        let mut want = [0.0; 4];
        cpu::adamw::global_norm(&mut want, &to64(&g), 0.0);
        let exact = want[0];
        // Disabled (0), inactive (threshold above the norm), active (below).
        for max_norm in [0.0, 2.0 * exact, 0.25 * exact] {
            let (tg, norm) = (up(ctx, &g, &[n], "grads"), zeros(ctx, &[4], "norm"));
            let partials = zeros(ctx, &[global_norm_partials_len(n)], "partials");
            let mut plan = Plan::new("global_norm");
            adamw::global_norm(ctx, &mut plan, &norm, &partials, &tg, max_norm as f32).unwrap();
            run(ctx, &plan);
            cpu::adamw::global_norm(&mut want, &to64(&g), max_norm as f32 as f64);
            let got = read(ctx, &norm);
            assert_close(
                &format!("global_norm N={n} max_norm={max_norm:.3}"),
                &got,
                &want,
                1e-6,
                1e-5,
            );
            if max_norm == 0.25 * exact {
                assert!(got[1] < 0.3, "clipping should be active: {got:?}");
            } else {
                assert_eq!(got[1], 1.0, "clipping should be inactive: {got:?}");
            }
        }
    }
}

#[test]
fn adamw_update_10_steps_vs_cpu() {
    let ctx = gpu!();
    for &n in SIZES {
        let mut r = Rng::new(n as u64 * 7 + 1);
        let p0 = r.vec(n, 1.0);
        // Clip at a norm between the small and large gradient steps below.
        let max_norm = (0.5 * (n as f64 / 3.0).sqrt()).max(0.1) as f32;
        let opt = Opt::new(ctx, &p0, max_norm);
        let (mut p, mut m, mut v) = (to64(&p0), vec![0.0; n], vec![0.0; n]);
        let (mut norm, mut clipped) = ([0.0; 4], 0);
        for t in 1..=10u64 {
            // Alternate large (clipped) and small (unclipped) gradients.
            let scale = if t % 2 == 1 { 2.0 } else { 0.1 };
            let g = r.vec(n, scale);
            opt.step(ctx, &g, lr_at(t), t);
            cpu::adamw::global_norm(&mut norm, &to64(&g), max_norm as f64);
            let step = cpu::adamw::adamw_step_scalars(lr_at(t), BETA1, BETA2, EPS, WD, t);
            cpu::adamw::adamw_update(&mut p, &mut m, &mut v, &to64(&g), &norm, &step);
            assert_close(
                &format!("adamw N={n} t={t} norm"),
                &read(ctx, &opt.norm),
                &norm,
                1e-6,
                1e-5,
            );
            clipped += (norm[1] < 1.0) as usize;
        }
        assert!(
            (1..10).contains(&clipped),
            "N={n}: clipping active in {clipped} of 10 steps"
        );
        let tag = format!("adamw N={n} after 10 steps");
        assert_close(
            &format!("{tag} params"),
            &read(ctx, &opt.params),
            &p,
            1e-6,
            1e-5,
        );
        assert_close(&format!("{tag} m"), &read(ctx, &opt.m), &m, 1e-7, 1e-5);
        assert_close(&format!("{tag} v"), &read(ctx, &opt.v), &v, 1e-9, 1e-5);
    }
}

#[test]
fn adamw_deterministic() {
    let ctx = gpu!();
    let n = 70001;
    let mut r = Rng::new(99);
    let p0 = r.vec(n, 1.0);
    let grads: Vec<Vec<f32>> = (0..3).map(|_| r.vec(n, 1.0)).collect();
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<u32>>();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let opt = Opt::new(ctx, &p0, 1.0);
        let mut norms = Vec::new();
        for (t, g) in grads.iter().enumerate() {
            opt.step(ctx, g, 1e-3, t as u64 + 1);
            norms.push(bits(read(ctx, &opt.norm)));
        }
        runs.push((norms, bits(read(ctx, &opt.params))));
    }
    assert!(
        runs[0].0 == runs[1].0,
        "grad norm bits differ between identical runs"
    );
    assert!(
        runs[0].1 == runs[1].1,
        "param bits differ between identical runs"
    );
}

#[test]
fn adamw_update_skips_nonfinite_grads() {
    let ctx = gpu!();
    let n = 1001;
    let mut r = Rng::new(3);
    let p0 = r.vec(n, 1.0);
    for (what, bad) in [
        ("nan", f32::NAN),
        ("+inf", f32::INFINITY),
        ("-inf", f32::NEG_INFINITY),
    ] {
        let opt = Opt::new(ctx, &p0, 1.0);
        // One good step so that m and v are non-zero, then a poisoned one.
        opt.step(ctx, &r.vec(n, 1.0), 1e-2, 1);
        let before: Vec<Vec<f32>> = [&opt.params, &opt.m, &opt.v]
            .iter()
            .map(|t| read(ctx, t))
            .collect();
        let mut g = r.vec(n, 1.0);
        g[517] = bad;
        opt.step(ctx, &g, 1e-2, 2);
        let norm = read(ctx, &opt.norm);
        assert_eq!(norm[2], 1.0, "{what}: non-finite flag not set: {norm:?}");
        assert_eq!(
            norm[0],
            f32::INFINITY,
            "{what}: norm should read +inf: {norm:?}"
        );
        let mut want = [0.0; 4];
        cpu::adamw::global_norm(&mut want, &to64(&g), 1.0);
        assert_eq!(want[2], 1.0, "{what}: CPU twin should flag too");
        for (t, b) in [&opt.params, &opt.m, &opt.v].iter().zip(&before) {
            let after = read(ctx, t);
            assert!(
                after.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{what}: `{}` changed on a skipped step",
                t.label()
            );
        }
        eprintln!("adamw N={n}: {what} gradient -> step skipped, state unchanged");
    }
}

#[test]
fn adamw_rejects_wrong_shapes() {
    let ctx = gpu!();
    let n = 100;
    let t = |shape: &[usize], label: &str| zeros(ctx, shape, label);
    let (p, m, v, g, norm, step) = (
        t(&[n], "params"),
        t(&[n], "m"),
        t(&[n], "v"),
        t(&[n], "grads"),
        t(&[4], "norm"),
        t(&[8], "step"),
    );
    let bad_v = t(&[n - 1], "v_short");
    let err = adamw::adamw_update(ctx, &mut Plan::new("t"), &p, &m, &bad_v, &g, &norm, &step)
        .unwrap_err();
    assert!(
        matches!(&err, Error::Shape { tensor, .. } if tensor == "v_short"),
        "{err}"
    );
    let bad_step = t(&[7], "step7");
    let err = adamw::adamw_update(ctx, &mut Plan::new("t"), &p, &m, &v, &g, &norm, &bad_step)
        .unwrap_err();
    assert!(
        matches!(&err, Error::Shape { tensor, .. } if tensor == "step7"),
        "{err}"
    );
    let bad_partials = t(&[global_norm_partials_len(n) + 1], "partials");
    let err =
        adamw::global_norm(ctx, &mut Plan::new("t"), &norm, &bad_partials, &g, 1.0).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, Error::Shape { tensor, .. } if tensor == "partials")
            && msg.contains("`partials`"),
        "{msg}"
    );
}

/// An overflowing update (a learning rate of 1e36) writes nothing
/// non-finite: the elements that would overflow keep p, m and v, the others
/// update as the CPU twin says. The skip counter (norm[3]) counts skipped
/// steps in a row and resets on an applied one.
#[test]
fn adamw_update_never_writes_nonfinite_and_counts_skips() {
    let ctx = gpu!();
    let n = 1001;
    let mut r = Rng::new(11);
    let mut p0 = r.vec(n, 1.0);
    // Large parameters overflow under weight decay at this lr; small ones
    // take a finite step of about lr.
    for x in p0.iter_mut().step_by(3) {
        *x = 3e37;
    }
    let g = r.vec(n, 1.0);
    let opt = Opt::new(ctx, &p0, 0.0);
    let lr = 1e36;
    opt.step(ctx, &g, lr, 1);
    let (mut p, mut m, mut v) = (to64(&p0), vec![0.0; n], vec![0.0; n]);
    let mut norm = [0.0; 4];
    cpu::adamw::global_norm(&mut norm, &to64(&g), 0.0);
    let sc = cpu::adamw::adamw_step_scalars(lr, BETA1, BETA2, EPS, WD, 1);
    cpu::adamw::adamw_update(&mut p, &mut m, &mut v, &to64(&g), &norm, &sc);
    let got = read(ctx, &opt.params);
    assert!(got.iter().all(|x| x.is_finite()), "a non-finite parameter");
    let kept = got
        .iter()
        .zip(&p0)
        .filter(|(a, b)| a.to_bits() == b.to_bits())
        .count();
    assert!(
        kept >= n / 3,
        "overflowing elements should keep their value"
    );
    assert!(kept < n, "finite updates should still apply");
    for (name, t, want) in [
        ("params", &opt.params, &p),
        ("m", &opt.m, &m),
        ("v", &opt.v, &v),
    ] {
        let got = read(ctx, t);
        for (i, (&a, &b)) in got.iter().zip(want.iter()).enumerate() {
            let tol = 1e-5 * b.abs().max(1.0);
            assert!(
                (a as f64 - b).abs() <= tol,
                "{name}[{i}]: GPU {a} vs CPU twin {b}"
            );
        }
    }
    // Counter: 2 skipped steps, then an applied one.
    let mut bad = g.clone();
    bad[5] = f32::NAN;
    for (t, grads, want) in [(2, &bad, 1.0), (3, &bad, 2.0), (4, &g, 0.0)] {
        opt.step(ctx, grads, 1e-3, t);
        let got = read(ctx, &opt.norm);
        cpu::adamw::global_norm(&mut norm, &to64(grads), 0.0);
        assert_eq!(got[3], want, "step {t}: skipped in a row {got:?}");
        assert_eq!(norm[3], want as f64, "step {t}: CPU twin's counter");
    }
}
