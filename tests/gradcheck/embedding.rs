//! prompt_backward against finite differences of prompt_forward (the
//! soft-prompt gradient), with the real layout: prompt rows, then embedded ids.

use crate::common::{dot, fd_check, Rng};
use wgtune::cpu::embedding::*;

#[test]
fn prompt_backward_matches_finite_differences() {
    let (b, t, np, v, c) = (3, 4, 2, 6, 5);
    let s = np + t;
    let mut r = Rng::new(3);
    let prompt = r.vec64(np * c, 1.0);
    let table = r.vec64(v * c, 1.0);
    let ids: Vec<i32> = (0..b * t).map(|_| r.below(v) as i32).collect();
    let dout = r.vec64(b * s * c, 1.0);
    // L = sum(out * dout) with out = [prompt; table[ids]] per batch row.
    let fwd = |prompt: &[f64]| {
        let mut out = vec![0.0; b * s * c];
        embedding_forward(&mut out, &ids, &table, b, t, v, c, np);
        prompt_forward(&mut out, prompt, b, s, np, c);
        out
    };
    let mut dprompt = vec![0.0; np * c];
    prompt_backward(&mut dprompt, &dout, b, s, np, c);
    fd_check("prompt_backward dprompt", &prompt, &dprompt, |x| {
        dot(&fwd(x), &dout)
    });

    // Backward accumulates: a second call adds the same gradient again.
    let once = dprompt.clone();
    prompt_backward(&mut dprompt, &dout, b, s, np, c);
    for (twice, g) in dprompt.iter().zip(&once) {
        assert!(
            (twice - 2.0 * g).abs() < 1e-12,
            "prompt_backward must accumulate (+=)"
        );
    }
}
