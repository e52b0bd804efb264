//! embedding_forward, prompt_forward and prompt_backward against their CPU
//! twins, including a table split into row chunks by a small binding limit.

use crate::common::{assert_close, read, run, to64, up, zeros, Rng};

use wgtune::cpu;
use wgtune::gpu::ops::embedding;
use wgtune::gpu::{Context, ContextOptions, Plan, Tensor};
use wgtune::Error;

/// A private context whose storage bindings are capped at `max_binding_bytes`,
/// so that tests can force row chunking. `None` (skip) when there is no
/// adapter, unless `WGTUNE_REQUIRE_GPU=1`, as for `common::ctx()`.
pub(crate) fn small_ctx(max_binding_bytes: u64) -> Option<Context> {
    let opts = ContextOptions {
        max_binding_bytes: Some(max_binding_bytes),
        ..Default::default()
    };
    match Context::new(&opts) {
        Ok(c) => Some(c),
        Err(e) => {
            if std::env::var("WGTUNE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("WGTUNE_REQUIRE_GPU=1 but no GPU context: {e}");
            }
            eprintln!("skipping: no wgpu adapter ({e})");
            None
        }
    }
}

/// Random ids in [0, V), with one id below 0 and one >= V when `invalid`.
fn random_ids(r: &mut Rng, n: usize, v: usize, invalid: bool) -> Vec<i32> {
    let mut ids: Vec<i32> = (0..n).map(|_| r.below(v) as i32).collect();
    if invalid && n >= 3 {
        ids[1] = -3;
        ids[n - 1] = v as i32 + 5;
    }
    ids
}

/// Run embedding_forward on GPU and CPU from the same non-zero `out` (to show
/// rows 0..P are untouched and invalid ids really write zeros) and compare.
#[allow(clippy::too_many_arguments)]
fn check_embedding(
    ctx: &Context,
    tag: &str,
    b: usize,
    t: usize,
    np: usize,
    v: usize,
    c: usize,
    r: &mut Rng,
    expect_dispatches: Option<usize>,
) {
    let s = np + t;
    let ids = random_ids(r, b * t, v, true);
    let (table, out0) = (r.vec(v * c, 1.0), r.vec(b * s * c, 1.0));
    let tids = Tensor::from_i32(ctx, &ids, &[b, t], "ids").unwrap();
    let (ttable, out) = (
        up(ctx, &table, &[v, c], "wte"),
        up(ctx, &out0, &[b, s, c], "out"),
    );
    let mut plan = Plan::new("embedding");
    embedding::embedding_forward(ctx, &mut plan, &out, &tids, &ttable, np).unwrap();
    if let Some(d) = expect_dispatches {
        assert_eq!(plan.dispatches(), d, "{tag}: table chunks");
    }
    run(ctx, &plan);

    let mut want = to64(&out0);
    cpu::embedding::embedding_forward(&mut want, &ids, &to64(&table), b, t, v, c, np);
    // A pure copy: bit-exact.
    assert_close(&format!("{tag} out"), &read(ctx, &out), &want, 0.0, 0.0);
}

#[test]
fn embedding_forward_vs_cpu() {
    let ctx = gpu!();
    // (B, T, P, V, C): one token, odd sizes, C above the largest workgroup.
    for &(b, t, np, v, c) in &[(1, 1, 0, 5, 7), (3, 11, 2, 37, 33), (2, 5, 3, 101, 577)] {
        let mut r = Rng::new((b * 1000 + t * 10 + c) as u64);
        let tag = format!("embedding_forward B={b} T={t} P={np} V={v} C={c}");
        check_embedding(ctx, &tag, b, t, np, v, c, &mut r, Some(1));
    }
}

#[test]
fn embedding_forward_chunked_table_vs_cpu() {
    // 2048-byte bindings: a (157, 7) table (4396 B) splits into 64-row chunks
    // (64 rows * 28 B = 1792 B is the smallest 256-aligned step): 3 dispatches.
    let Some(ctx) = small_ctx(2048) else { return };
    let (b, t, np, v, c) = (3, 11, 2, 157, 7);
    let mut r = Rng::new(7);
    check_embedding(
        &ctx,
        "embedding_forward chunked V=157 C=7",
        b,
        t,
        np,
        v,
        c,
        &mut r,
        Some(3),
    );

    // Ids on every chunk boundary, plus invalid ones, in a single batch row.
    let ids = [0, 63, 64, 127, 128, 156, -1, 157, 100];
    let table = r.vec(v * c, 1.0);
    let out = up(&ctx, &r.vec(ids.len() * c, 1.0), &[1, ids.len(), c], "out");
    let tids = Tensor::from_i32(&ctx, &ids, &[1, ids.len()], "ids").unwrap();
    let mut plan = Plan::new("embedding");
    embedding::embedding_forward(
        &ctx,
        &mut plan,
        &out,
        &tids,
        &up(&ctx, &table, &[v, c], "wte"),
        0,
    )
    .unwrap();
    run(&ctx, &plan);
    let mut want = vec![0.0; ids.len() * c];
    cpu::embedding::embedding_forward(&mut want, &ids, &to64(&table), 1, ids.len(), v, c, 0);
    assert_close(
        "embedding_forward chunk boundaries",
        &read(&ctx, &out),
        &want,
        0.0,
        0.0,
    );

    // An output larger than one binding cannot be split: Error::Limits.
    let big = zeros(&ctx, &[3, 30, c], "big_out");
    let ids = Tensor::from_i32(&ctx, &vec![0; 3 * 28], &[3, 28], "ids").unwrap();
    let err = embedding::embedding_forward(
        &ctx,
        &mut Plan::new("t"),
        &big,
        &ids,
        &up(&ctx, &table, &[v, c], "wte"),
        2,
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Limits { .. }) && err.to_string().contains("big_out"),
        "{err}"
    );
}

#[test]
fn prompt_forward_backward_vs_cpu() {
    let ctx = gpu!();
    // (B, S, P, C): a single row, odd sizes, C above the largest workgroup.
    for &(b, s, np, c) in &[(1, 1, 1, 7), (3, 13, 5, 33), (5, 9, 2, 577)] {
        let mut r = Rng::new((b * 100 + s * 10 + c) as u64);
        let (prompt, out0, dout, dacc) = (
            r.vec(np * c, 1.0),
            r.vec(b * s * c, 1.0),
            r.vec(b * s * c, 1.0),
            r.vec(np * c, 1.0),
        );
        let (tp, out, tdout) = (
            up(ctx, &prompt, &[np, c], "prompt"),
            up(ctx, &out0, &[b, s, c], "out"),
            up(ctx, &dout, &[b, s, c], "dout"),
        );
        let dprompt = up(ctx, &dacc, &[np, c], "dprompt"); // backward accumulates onto existing values
        let mut plan = Plan::new("prompt");
        embedding::prompt_forward(ctx, &mut plan, &out, &tp).unwrap();
        embedding::prompt_backward(ctx, &mut plan, &dprompt, &tdout).unwrap();
        run(ctx, &plan);

        let mut want = to64(&out0);
        cpu::embedding::prompt_forward(&mut want, &to64(&prompt), b, s, np, c);
        let mut wdp = to64(&dacc);
        cpu::embedding::prompt_backward(&mut wdp, &to64(&dout), b, s, np, c);
        let tag = format!("prompt B={b} S={s} P={np} C={c}");
        assert_close(&format!("{tag} out"), &read(ctx, &out), &want, 0.0, 0.0);
        assert_close(
            &format!("{tag} dprompt"),
            &read(ctx, &dprompt),
            &wdp,
            1e-6,
            1e-6,
        );

        // Fixed-order sum, no atomics: a second run from the same start is bit-identical.
        let twin = up(ctx, &dacc, &[np, c], "dprompt2");
        let mut again = Plan::new("prompt again");
        embedding::prompt_backward(ctx, &mut again, &twin, &tdout).unwrap();
        run(ctx, &again);
        assert_eq!(
            read(ctx, &twin),
            read(ctx, &dprompt),
            "{tag}: prompt_backward is not deterministic"
        );
    }
}

#[test]
fn embedding_rejects_wrong_shapes() {
    let ctx = gpu!();
    let ids = Tensor::from_i32(ctx, &[0; 6], &[2, 3], "ids").unwrap();
    let table = zeros(ctx, &[10, 8], "wte");
    // S must be P + T = 5, and C must match the table.
    let out = zeros(ctx, &[2, 5, 7], "out");
    let msg = embedding::embedding_forward(ctx, &mut Plan::new("t"), &out, &ids, &table, 2)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`out`") && msg.contains("[2, 5, 7]"), "{msg}");
    let out = zeros(ctx, &[2, 4, 8], "out");
    let err =
        embedding::embedding_forward(ctx, &mut Plan::new("t"), &out, &ids, &table, 2).unwrap_err();
    assert!(
        matches!(err, Error::Shape { ref tensor, .. } if tensor == "out"),
        "{err}"
    );
    // f32 ids are refused by name.
    let fids = zeros(ctx, &[2, 3], "fids");
    let msg = embedding::embedding_forward(
        ctx,
        &mut Plan::new("t"),
        &zeros(ctx, &[2, 3, 8], "o"),
        &fids,
        &table,
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("`fids`"), "{msg}");

    let dprompt = zeros(ctx, &[3, 7], "dprompt");
    let dout = zeros(ctx, &[2, 5, 8], "dout");
    let err = embedding::prompt_backward(ctx, &mut Plan::new("t"), &dprompt, &dout).unwrap_err();
    assert!(
        matches!(err, Error::Shape { ref tensor, .. } if tensor == "dout"),
        "{err}"
    );
    let prompt = zeros(ctx, &[6, 8], "prompt");
    let err = embedding::prompt_forward(ctx, &mut Plan::new("t"), &dout, &prompt).unwrap_err();
    assert!(err.to_string().contains("S >= 6"), "{err}");
}
