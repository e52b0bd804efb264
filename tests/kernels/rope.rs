use crate::common::{assert_close, read, run, to64, up, Rng};

use wgtune::cpu;
use wgtune::cpu::rope::{default_inv_freq, rope_tables};
use wgtune::gpu::ops::rope;
use wgtune::gpu::Plan;
use wgtune::Error;

/// One case: (B, T, H, D, pos_offset, MAXPOS, x given as (B, T, H, D)).
type Case = (usize, usize, usize, usize, usize, usize, bool);

// D/2 % 4 == 0 runs the vec4 entries (D = 16, 64), otherwise the _x1 ones
// (D = 2, 6). Row counts B*T are odd; positions reach the last table row in
// the (3, 5, ...) case; pos_offset > 0 in all but the first.
const CASES: &[Case] = &[
    (1, 1, 1, 2, 0, 1, false),
    (2, 7, 3, 16, 5, 13, false),
    (3, 5, 2, 6, 9, 14, false),
    (1, 13, 5, 64, 3, 20, true),
];

#[test]
fn rope_forward_backward_vs_cpu() {
    let ctx = gpu!();
    for &(b, t, h, d, off, max_pos, four_d) in CASES {
        let n = b * t * h * d;
        let (cos, sin) = rope_tables(&default_inv_freq(d, 10_000.0), max_pos);
        let mut r = Rng::new((b * 1000 + t * 100 + h * 10 + d) as u64);
        let (x, dx) = (r.vec(n, 2.0), r.vec(n, 1.0));
        let shape = if four_d {
            vec![b, t, h, d]
        } else {
            vec![b * t, h, d]
        };
        let (tx, tdx) = (up(ctx, &x, &shape, "q"), up(ctx, &dx, &shape, "dq"));
        let (tcos, tsin) = (
            up(ctx, &cos, &[max_pos, d / 2], "cos"),
            up(ctx, &sin, &[max_pos, d / 2], "sin"),
        );
        let mut plan = Plan::new("rope");
        rope::rope_forward(ctx, &mut plan, &tx, &tcos, &tsin, b, t, off).unwrap();
        // The gradient buffer is non-zero: backward rotates it where it is.
        rope::rope_backward(ctx, &mut plan, &tdx, &tcos, &tsin, b, t, off).unwrap();
        run(ctx, &plan);

        let (c64, s64) = (to64(&cos), to64(&sin));
        let (mut rx, mut rdx) = (to64(&x), to64(&dx));
        cpu::rope::rope_forward(&mut rx, &c64, &s64, b, t, h, d, off);
        cpu::rope::rope_backward(&mut rdx, &c64, &s64, b, t, h, d, off);
        let tag = format!("rope B={b} T={t} H={h} D={d} pos_offset={off}");
        assert_close(&format!("{tag} x"), &read(ctx, &tx), &rx, 1e-6, 1e-5);
        assert_close(&format!("{tag} dx"), &read(ctx, &tdx), &rdx, 1e-6, 1e-5);
    }
}

#[test]
fn rope_rejects_bad_arguments() {
    let ctx = gpu!();
    let (b, t, h, d, max_pos) = (2, 3, 2, 8, 6);
    let (cos, sin) = rope_tables(&default_inv_freq(d, 10_000.0), max_pos);
    let x = up(ctx, &vec![0.0; b * t * h * d], &[b * t, h, d], "q");
    let tcos = up(ctx, &cos, &[max_pos, d / 2], "cos");
    let tsin = up(ctx, &sin, &[max_pos, d / 2], "sin");
    let mut plan = Plan::new("t");

    // Last position t - 1 + pos_offset must be < MAXPOS: offset 3 is the edge.
    rope::rope_forward(ctx, &mut plan, &x, &tcos, &tsin, b, t, 3).unwrap();
    let err = rope::rope_forward(ctx, &mut plan, &x, &tcos, &tsin, b, t, 4).unwrap_err();
    assert!(
        matches!(err, Error::Invalid { .. }) && err.to_string().contains("6 rows"),
        "{err}"
    );

    // Table for another head dim: a Shape error naming the table.
    let wide = up(ctx, &vec![0.0; max_pos * 5], &[max_pos, 5], "sin");
    let err = rope::rope_backward(ctx, &mut plan, &x, &tcos, &wide, b, t, 0).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Shape { .. }) && msg.contains("`sin`") && msg.contains("[6, 5]"),
        "{msg}"
    );

    // B*T disagreeing with x's rows.
    let err = rope::rope_forward(ctx, &mut plan, &x, &tcos, &tsin, b, t + 1, 0).unwrap_err();
    assert!(
        matches!(err, Error::Shape { .. }) && err.to_string().contains("`q`"),
        "{err}"
    );

    // Odd head dim.
    let odd = up(ctx, &vec![0.0; b * t * h * 7], &[b * t, h, 7], "k");
    let err = rope::rope_forward(ctx, &mut plan, &odd, &tcos, &tsin, b, t, 0).unwrap_err();
    assert!(
        matches!(err, Error::Invalid { .. }) && err.to_string().contains("D = 7"),
        "{err}"
    );
}
