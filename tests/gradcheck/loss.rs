//! crossentropy_softmax_backward (accumulating and in place) against finite
//! differences of crossentropy_forward, and the host-side mean-loss scaling.

use crate::common::{dot, fd_check, Rng};
use wgtune::cpu::loss::*;

/// fd check of dlogits for L = sum(losses * dlosses) at logits + offset.
fn check(name: &str, offset: f64, spread: f64) {
    let (n, v) = (4, 5);
    let mut r = Rng::new(9);
    let logits: Vec<f64> = r.vec64(n * v, spread).iter().map(|x| x + offset).collect();
    let targets = [1, IGNORE_INDEX, 4, 0];
    // Random dlosses (not only the mean scaling) so that every row's weight differs.
    let dlosses = r.vec64(n, 1.0);
    let loss = |x: &[f64]| {
        let mut losses = vec![0.0; n];
        crossentropy_forward(&mut losses, x, &targets, n, v);
        dot(&losses, &dlosses)
    };
    let mut dlogits = vec![0.0; n * v];
    crossentropy_softmax_backward(&mut dlogits, &dlosses, &logits, &targets, n, v);
    assert!(
        dlogits[v..2 * v].iter().all(|&d| d == 0.0),
        "{name}: ignored row got a gradient"
    );
    fd_check(name, &logits, &dlogits, loss);
}

#[test]
fn crossentropy_softmax_backward_matches_finite_differences() {
    check("crossentropy_softmax_backward dlogits", 0.0, 2.0);
    // exp(1000) overflows f64: this passes only with the max subtracted.
    check(
        "crossentropy_softmax_backward dlogits (offset 1000)",
        1000.0,
        2.0,
    );
}

#[test]
fn crossentropy_softmax_backward_inplace_matches_finite_differences() {
    let (n, v) = (4, 5);
    let mut r = Rng::new(10);
    let logits = r.vec64(n * v, 2.0);
    let targets = [3, IGNORE_INDEX, 0, 2];
    let dlosses = r.vec64(n, 1.0);
    let loss = |x: &[f64]| {
        let mut losses = vec![0.0; n];
        crossentropy_forward(&mut losses, x, &targets, n, v);
        dot(&losses, &dlosses)
    };
    let mut dlogits = logits.clone();
    crossentropy_softmax_backward_inplace(&mut dlogits, &dlosses, &targets, n, v);
    // The ignored row's logits are overwritten with zeros, not left behind.
    assert!(dlogits[v..2 * v].iter().all(|&d| d == 0.0));
    fd_check(
        "crossentropy_softmax_backward_inplace dlogits",
        &logits,
        &dlogits,
        loss,
    );
}

#[test]
fn crossentropy_forward_is_finite_for_large_logits() {
    let (n, v) = (2, 3);
    let logits = [1000.0, 1001.0, 999.0, -2000.0, -2001.0, -1999.5];
    let mut losses = vec![0.0; n];
    crossentropy_forward(&mut losses, &logits, &[1, 2], n, v);
    // Shift invariance: same as the logits minus their row max.
    let mut shifted = vec![0.0; n];
    crossentropy_forward(
        &mut shifted,
        &[-1.0, 0.0, -2.0, -0.5, -1.5, 0.0],
        &[1, 2],
        n,
        v,
    );
    for (a, b) in losses.iter().zip(&shifted) {
        assert!(
            a.is_finite() && (a - b).abs() < 1e-12,
            "loss {a} vs shifted {b}"
        );
    }
}

#[test]
fn mean_loss_scale_masks_and_averages() {
    let (num, dl) = mean_loss_scale(&[3, IGNORE_INDEX, 0, 7, IGNORE_INDEX]);
    assert_eq!(num, 3);
    assert_eq!(dl, vec![1.0 / 3.0, 0.0, 1.0 / 3.0, 1.0 / 3.0, 0.0]);
    // No targets: all zeros, no division by zero.
    let (num, dl) = mean_loss_scale(&[IGNORE_INDEX, IGNORE_INDEX]);
    assert_eq!((num, dl), (0, vec![0.0, 0.0]));
    assert_eq!(mean_loss_scale(&[]), (0, vec![]));
}
