//! crossentropy_forward and crossentropy_softmax_backward (accumulating and
//! in place) against their CPU twins: odd and real vocab sizes, ignored rows,
//! large-magnitude logits, logits split into row chunks by a small binding
//! limit, and logits chunks that start at a row offset of the per-row tensors.

use crate::common::{assert_close, read, run, to64, up, zeros, Rng};
use crate::embedding::small_ctx;

use wgtune::cpu;
use wgtune::cpu::loss::IGNORE_INDEX;
use wgtune::gpu::ops::loss;
use wgtune::gpu::{Context, Plan, Tensor};
use wgtune::Error;

/// Random targets in [0, V) with every third row ignored when `mask`.
fn random_targets(r: &mut Rng, n: usize, v: usize, mask: bool) -> Vec<i32> {
    (0..n)
        .map(|i| {
            if mask && i % 3 == 1 {
                IGNORE_INDEX
            } else {
                r.below(v) as i32
            }
        })
        .collect()
}

/// Forward + backward on GPU and CPU from the same logits; dlogits starts
/// non-zero (backward accumulates) and dlosses is the host's mean scaling.
/// Returns the GPU (losses, dlogits) for determinism checks.
#[allow(clippy::too_many_arguments)]
fn check_ce(
    ctx: &Context,
    tag: &str,
    logits: &[f32],
    targets: &[i32],
    n: usize,
    v: usize,
    r: &mut Rng,
    dispatches: Option<usize>,
) -> (Vec<f32>, Vec<f32>) {
    let (_, dl) = cpu::loss::mean_loss_scale(targets);
    let dl32: Vec<f32> = dl.iter().map(|&x| x as f32).collect();
    let dacc = r.vec(n * v, 0.01);
    let (tl, ttg) = (
        up(ctx, logits, &[n, v], "logits"),
        Tensor::from_i32(ctx, targets, &[n], "targets").unwrap(),
    );
    let (losses, tdl, dlogits) = (
        up(ctx, &r.vec(n, 1.0), &[n], "losses"),
        up(ctx, &dl32, &[n], "dlosses"),
        up(ctx, &dacc, &[n, v], "dlogits"),
    );
    let mut plan = Plan::new("crossentropy");
    loss::crossentropy_forward(ctx, &mut plan, &losses, &tl, &ttg).unwrap();
    loss::crossentropy_softmax_backward(ctx, &mut plan, &dlogits, &tdl, &tl, &ttg).unwrap();
    if let Some(d) = dispatches {
        assert_eq!(
            plan.dispatches(),
            d,
            "{tag}: dispatches (forward + backward chunks)"
        );
    }
    run(ctx, &plan);

    let (x, dl64) = (to64(logits), to64(&dl32));
    let mut want = vec![0.0; n];
    cpu::loss::crossentropy_forward(&mut want, &x, targets, n, v);
    let mut wd = to64(&dacc);
    cpu::loss::crossentropy_softmax_backward(&mut wd, &dl64, &x, targets, n, v);
    let (got, gd) = (read(ctx, &losses), read(ctx, &dlogits));
    assert_close(&format!("{tag} losses"), &got, &want, 1e-5, 1e-5);
    assert_close(&format!("{tag} dlogits"), &gd, &wd, 1e-7, 1e-5);
    (got, gd)
}

#[test]
fn crossentropy_forward_backward_vs_cpu() {
    let ctx = gpu!();
    // (N, V): one row, odd sizes, and the SmolLM / Qwen2.5 vocab sizes plus one.
    for &(n, v) in &[(1, 7), (13, 333), (5, 49153), (3, 151937)] {
        let mut r = Rng::new((n * 7 + v) as u64);
        let logits = r.vec(n * v, 4.0);
        let targets = random_targets(&mut r, n, v, n > 1);
        let tag = format!("crossentropy N={n} V={v}");
        let first = check_ce(
            ctx,
            &tag,
            &logits,
            &targets,
            n,
            v,
            &mut Rng::new(5),
            Some(2),
        );
        // Fixed-order reductions, no atomics: bit-identical on a second run.
        let second = check_ce(ctx, &tag, &logits, &targets, n, v, &mut Rng::new(5), None);
        assert!(first == second, "{tag}: results differ between two runs");
    }
}

#[test]
fn crossentropy_large_logits_vs_cpu() {
    let ctx = gpu!();
    let (n, v) = (7, 1001);
    // A large common offset (exp would overflow without the max shift), and a
    // large spread (softmax close to one-hot, losses in the thousands).
    for &(offset, spread) in &[(1000.0f32, 5.0f32), (-3000.0, 5.0), (0.0, 2000.0)] {
        let mut r = Rng::new(offset.abs() as u64 + spread as u64);
        let logits: Vec<f32> = r.vec(n * v, spread).iter().map(|x| x + offset).collect();
        let targets = random_targets(&mut r, n, v, true);
        let tag = format!("crossentropy large offset={offset} spread={spread}");
        check_ce(ctx, &tag, &logits, &targets, n, v, &mut r, Some(2));
    }
}

#[test]
fn crossentropy_chunked_logits_vs_cpu() {
    // 10000-byte bindings: (150, 37) logits (22200 B) split into 64-row chunks
    // (64 rows * 148 B is the smallest 256-aligned step): 3 dispatches each way.
    let Some(ctx) = small_ctx(10_000) else { return };
    let (n, v) = (150, 37);
    let mut r = Rng::new(11);
    let logits = r.vec(n * v, 3.0);
    let targets = random_targets(&mut r, n, v, true);
    check_ce(
        &ctx,
        "crossentropy chunked N=150 V=37",
        &logits,
        &targets,
        n,
        v,
        &mut r,
        Some(6),
    );

    // A row too wide for one binding cannot be split: Error::Limits.
    let wide = zeros(&ctx, &[2, 3000], "wide_logits");
    let tg = Tensor::from_i32(&ctx, &[0, 1], &[2], "targets").unwrap();
    let err = loss::crossentropy_forward(
        &ctx,
        &mut Plan::new("t"),
        &zeros(&ctx, &[2], "losses"),
        &wide,
        &tg,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Limits { .. }) && err.to_string().contains("wide_logits"),
        "{err}"
    );
}

/// The LM head's chunk path: logits (n, V) are rows row0..row0+n of N, the
/// loss is written at those rows and the gradient over the logits. Checks the
/// CPU twins, that rows outside the chunk keep their losses, and that the
/// in-place gradient has the bits of the accumulating kernel's from zero.
fn check_inplace(ctx: &Context, tag: &str, n: usize, v: usize, big_n: usize, row0: usize) {
    let mut r = Rng::new((n * 31 + v + row0) as u64);
    let logits = r.vec(n * v, 3.0);
    let all_targets = random_targets(&mut r, big_n, v, true);
    let (_, dl) = cpu::loss::mean_loss_scale(&all_targets);
    let dl32: Vec<f32> = dl.iter().map(|&x| x as f32).collect();
    let before = r.vec(big_n, 1.0);
    let ws = up(ctx, &logits, &[n, v], "logits_ws");
    let ttg = Tensor::from_i32(ctx, &all_targets, &[big_n], "targets").unwrap();
    let (losses, tdl) = (
        up(ctx, &before, &[big_n], "losses"),
        up(ctx, &dl32, &[big_n], "dlosses"),
    );
    // The accumulating kernel from zero, on a copy of the chunk's rows.
    let tl = up(ctx, &logits, &[n, v], "logits");
    let dz = zeros(ctx, &[n, v], "dlogits");
    let sub = |x: &[i32]| Tensor::from_i32(ctx, x, &[n], "sub_targets").unwrap();
    let sub_dl = up(ctx, &dl32[row0..row0 + n], &[n], "sub_dlosses");
    let sub_tg = sub(&all_targets[row0..row0 + n]);
    let mut plan = Plan::new("crossentropy in place");
    loss::crossentropy_forward_at(ctx, &mut plan, &losses, &ws, &ttg, row0).unwrap();
    loss::crossentropy_softmax_backward_inplace(ctx, &mut plan, &ws, &tdl, &ttg, row0).unwrap();
    loss::crossentropy_softmax_backward(ctx, &mut plan, &dz, &sub_dl, &tl, &sub_tg).unwrap();
    run(ctx, &plan);

    let targets = &all_targets[row0..row0 + n];
    let x = to64(&logits);
    let mut want = to64(&before);
    cpu::loss::crossentropy_forward(&mut want[row0..row0 + n], &x, targets, n, v);
    let mut wd = x.clone();
    let dl64 = to64(&dl32[row0..row0 + n]);
    cpu::loss::crossentropy_softmax_backward_inplace(&mut wd, &dl64, targets, n, v);
    let (got, gd) = (read(ctx, &losses), read(ctx, &ws));
    assert_close(&format!("{tag} losses"), &got, &want, 1e-5, 1e-5);
    assert_close(&format!("{tag} dlogits in place"), &gd, &wd, 1e-7, 1e-5);
    let acc = read(ctx, &dz);
    assert!(
        gd.iter().zip(&acc).all(|(a, b)| a.to_bits() == b.to_bits()),
        "{tag}: in-place gradient differs from the accumulating kernel's"
    );
}

#[test]
fn crossentropy_inplace_chunks_vs_cpu() {
    let ctx = gpu!();
    check_inplace(ctx, "in place whole", 9, 37, 9, 0);
    check_inplace(ctx, "in place at row 5", 7, 1001, 20, 5);
    check_inplace(ctx, "in place last rows", 3, 384, 12, 9);
    // Bound in 64-row pieces too (10000-byte bindings), at an offset.
    let Some(small) = small_ctx(10_000) else {
        return;
    };
    check_inplace(&small, "in place split at row 11", 150, 37, 170, 11);
}

#[test]
fn crossentropy_chunk_out_of_range_is_refused() {
    let ctx = gpu!();
    let ws = zeros(ctx, &[4, 9], "logits_ws");
    let losses = zeros(ctx, &[6], "losses");
    let targets = Tensor::from_i32(ctx, &[0; 6], &[6], "targets").unwrap();
    let mut plan = Plan::new("t");
    let err = loss::crossentropy_forward_at(ctx, &mut plan, &losses, &ws, &targets, 3).unwrap_err();
    assert!(err.to_string().contains("logits_ws"), "{err}");
    let err =
        loss::crossentropy_softmax_backward_inplace(ctx, &mut plan, &ws, &losses, &targets, 3)
            .unwrap_err();
    assert!(err.to_string().contains("3..7"), "{err}");
    loss::crossentropy_forward_at(ctx, &mut plan, &losses, &ws, &targets, 2).unwrap();
}

#[test]
fn crossentropy_rejects_wrong_shapes() {
    let ctx = gpu!();
    let logits = zeros(ctx, &[4, 9], "logits");
    let losses = zeros(ctx, &[4], "losses");
    let targets = Tensor::from_i32(ctx, &[0; 5], &[5], "targets").unwrap();
    let err = loss::crossentropy_forward(ctx, &mut Plan::new("t"), &losses, &logits, &targets)
        .unwrap_err();
    assert!(
        matches!(err, Error::Shape { ref tensor, .. } if tensor == "targets"),
        "{err}"
    );
    assert!(err.to_string().contains("[5]"), "{err}");

    let targets = Tensor::from_i32(ctx, &[0; 4], &[4], "targets").unwrap();
    let dlogits = zeros(ctx, &[4, 8], "dlogits");
    let err = loss::crossentropy_softmax_backward(
        ctx,
        &mut Plan::new("t"),
        &dlogits,
        &losses,
        &logits,
        &targets,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Shape { ref tensor, .. } if tensor == "dlogits"),
        "{err}"
    );
    // f32 targets are refused by name.
    let ftargets = zeros(ctx, &[4], "ftargets");
    let msg = loss::crossentropy_forward(ctx, &mut Plan::new("t"), &losses, &logits, &ftargets)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`ftargets`"), "{msg}");
}
