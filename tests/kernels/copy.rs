//! copy_rows against its CPU twin: a fused-qkv split, K rows placed after a
//! prefix, and the accumulating reverse used by backward.

use crate::common::{assert_close, read, run, to64, up, Rng};

use wgtune::cpu;
use wgtune::gpu::ops::copy::{self, Layout, RowBlock};
use wgtune::gpu::{Context, Plan};

#[allow(clippy::too_many_arguments)]
fn check(
    ctx: &Context,
    tag: &str,
    dst_len: usize,
    src_len: usize,
    nb: usize,
    t: usize,
    d: usize,
    dl: Layout,
    sl: Layout,
    acc: bool,
) {
    let mut r = Rng::new(dst_len as u64 * 31 + src_len as u64);
    let (d0, s0) = (r.vec(dst_len, 1.0), r.vec(src_len, 1.0));
    let (dst, src) = (
        up(ctx, &d0, &[dst_len], "dst"),
        up(ctx, &s0, &[src_len], "src"),
    );
    let mut plan = Plan::new(tag);
    let rows = RowBlock { nb, t, d, acc };
    copy::copy_rows(ctx, &mut plan, &dst, dl, &src, sl, rows).unwrap();
    run(ctx, &plan);
    let mut want = to64(&d0);
    cpu::copy::copy_rows(&mut want, &to64(&s0), nb, t, d, dl, sl, acc);
    assert_close(tag, &read(ctx, &dst), &want, 0.0, 1e-7);
}

#[test]
fn copy_rows_matches_cpu() {
    let ctx = gpu!();
    // q third of a fused (B*T, 3C) qkv row, C = 13, 7 tokens.
    let (bt, c) = (7, 13);
    check(
        ctx,
        "qkv split",
        bt * c,
        bt * 3 * c,
        1,
        bt,
        c,
        Layout::dense(bt, c),
        Layout::rows(bt, 3 * c, 0, c),
        false,
    );
    // K rows (B=3, T=5, D=6) after a 4-row prefix in (B, 9, D).
    let (b, t, p, d) = (3, 5, 4, 6);
    check(
        ctx,
        "after prefix",
        b * (p + t) * d,
        b * t * d,
        b,
        t,
        d,
        Layout::rows(p + t, d, p, 0),
        Layout::dense(t, d),
        false,
    );
    // Its reverse, accumulating into the qkv gradient's v third.
    check(
        ctx,
        "reverse acc",
        bt * 3 * c,
        bt * c,
        1,
        bt,
        c,
        Layout::rows(bt, 3 * c, 0, 2 * c),
        Layout::dense(bt, c),
        true,
    );
}

#[test]
fn copy_rows_rejects_out_of_range_blocks() {
    let ctx = gpu!();
    let (dst, src) = (
        up(ctx, &[0.0; 10], &[10], "dst"),
        up(ctx, &[0.0; 12], &[12], "src"),
    );
    let mut plan = Plan::new("oob");
    let err = copy::copy_rows(
        ctx,
        &mut plan,
        &dst,
        Layout::dense(3, 4),
        &src,
        Layout::dense(3, 4),
        RowBlock {
            nb: 1,
            t: 3,
            d: 4,
            acc: false,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("`dst`"), "{err}");
}

#[test]
fn scatter_rows_matches_cpu() {
    let ctx = gpu!();
    let (rows, d) = (23, 13);
    let idx: Vec<i32> = vec![5, 0, 22, 7, 11, 3, -1];
    let mut r = Rng::new(7);
    let (d0, s0) = (r.vec(rows * d, 1.0), r.vec(idx.len() * d, 1.0));
    let dst = up(ctx, &d0, &[rows, d], "dst");
    let src = up(ctx, &s0, &[idx.len(), d], "src");
    let ti = wgtune::gpu::Tensor::from_i32(ctx, &idx, &[1, idx.len()], "idx").unwrap();
    let mut plan = Plan::new("scatter");
    copy::scatter_rows(ctx, &mut plan, &dst, &ti, &src).unwrap();
    run(ctx, &plan);
    let mut want = to64(&d0);
    cpu::copy::scatter_rows(&mut want, &idx, &to64(&s0), rows, d);
    assert_close("scatter_rows", &read(ctx, &dst), &want, 0.0, 1e-7);
}

/// copy_rows_at: one recorded plan replayed at several row counts (a KV
/// cache append), each against the CPU twin; odd widths.
#[test]
fn copy_rows_at_reads_the_position_when_replayed() {
    let ctx = gpu!();
    let (cap, d, t) = (11, 7, 1);
    let mut r = Rng::new(5);
    let d0 = r.vec(cap * d, 1.0);
    let s0 = r.vec(t * d, 1.0);
    let (dst, src) = (
        up(ctx, &d0, &[cap, d], "cache"),
        up(ctx, &s0, &[t, d], "row"),
    );
    let pos = wgtune::gpu::Tensor::zeros(ctx, &[1], wgtune::gpu::DType::U32, "pos").unwrap();
    let mut plan = Plan::new("append");
    let rows = RowBlock {
        nb: 1,
        t,
        d,
        acc: false,
    };
    let (dl, sl) = (Layout::dense(cap, d), Layout::dense(t, d));
    copy::copy_rows_at(ctx, &mut plan, &dst, dl, &src, sl, rows, &pos, cap - t).unwrap();
    let mut want = to64(&d0);
    for p in [0usize, 3, 4, cap - 1] {
        pos.write_u32(ctx, &[p as u32]).unwrap();
        run(ctx, &plan);
        cpu::copy::copy_rows_at(&mut want, &to64(&s0), 1, t, d, dl, sl, p);
        assert_close(
            &format!("append at {p}"),
            &read(ctx, &dst),
            &want,
            0.0,
            1e-7,
        );
    }
    // A shift the destination cannot hold is refused when recorded.
    let err = copy::copy_rows_at(ctx, &mut plan, &dst, dl, &src, sl, rows, &pos, cap).unwrap_err();
    assert!(err.to_string().contains("`cache`"), "{err}");
}
