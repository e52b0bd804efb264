//! CPU twins of `shaders/loss.wgsl`, in f64, plus the host-side loss scaling.
//! Same names and argument order as the kernels (outputs, inputs, then dims).
//!
//! Targets are token ids; [`IGNORE_INDEX`] (-100, PyTorch's default and the
//! HF label convention) marks positions that carry no loss.

/// Target value of a position without a loss.
pub const IGNORE_INDEX: i32 = -100;

/// The target of row `i` as an index into V, or `None` when the row carries
/// no loss. Out-of-range targets count as ignored, as in the GPU kernels (the
/// host validates targets; this only keeps reads inside the row).
fn target(targets: &[i32], i: usize, v: usize) -> Option<usize> {
    usize::try_from(targets[i]).ok().filter(|&t| t < v)
}

/// (max, log sum exp(x - max)) of one row, so logsumexp = max + second.
/// Subtracting the max keeps exp in range for logits of any magnitude.
fn row_stats(x: &[f64]) -> (f64, f64) {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (m, x.iter().map(|&xi| (xi - m).exp()).sum::<f64>().ln())
}

/// losses[i] = logsumexp(logits[i, :]) - logits[i, targets[i]]; 0 for ignored rows.
///
/// Shapes: losses (N), logits (N, V), targets (N).
pub fn crossentropy_forward(
    losses: &mut [f64],
    logits: &[f64],
    targets: &[i32],
    n: usize,
    v: usize,
) {
    for i in 0..n {
        let x = &logits[i * v..(i + 1) * v];
        losses[i] = match target(targets, i, v) {
            // (m - x_t) + log l: the large terms cancel first, as on the GPU.
            Some(t) => {
                let (m, log_l) = row_stats(x);
                (m - x[t]) + log_l
            }
            None => 0.0,
        };
    }
}

/// Differentiates `losses[i] = logsumexp(logits[i, :]) - logits[i, t_i]`
/// (`crossentropy_forward`):
/// dlogits[i, j] += dlosses[i] * (softmax(logits[i, :])_j - [j == t_i]),
/// nothing for ignored rows.
///
/// Shapes: dlogits (N, V), dlosses (N), logits (N, V), targets (N). `dlosses`
/// carries the mask and the 1/num_targets scaling ([`mean_loss_scale`]).
pub fn crossentropy_softmax_backward(
    dlogits: &mut [f64],
    dlosses: &[f64],
    logits: &[f64],
    targets: &[i32],
    n: usize,
    v: usize,
) {
    for i in 0..n {
        let Some(t) = target(targets, i, v) else {
            continue;
        };
        let x = &logits[i * v..(i + 1) * v];
        let (m, log_l) = row_stats(x);
        let lse = m + log_l;
        for (j, d) in dlogits[i * v..(i + 1) * v].iter_mut().enumerate() {
            let hit = if j == t { 1.0 } else { 0.0 };
            *d += dlosses[i] * ((x[j] - lse).exp() - hit);
        }
    }
}

/// [`crossentropy_softmax_backward`] written over its input, as the in-place
/// kernel does: `logits` rows become dlosses[i] * (softmax - onehot), and
/// ignored rows become zeros.
///
/// Shapes: logits (N, V) in, dlogits (N, V) out; dlosses (N), targets (N).
pub fn crossentropy_softmax_backward_inplace(
    logits: &mut [f64],
    dlosses: &[f64],
    targets: &[i32],
    n: usize,
    v: usize,
) {
    let x = logits[..n * v].to_vec();
    logits[..n * v].fill(0.0);
    crossentropy_softmax_backward(logits, dlosses, &x, targets, n, v);
}

/// The seed of backward for a mean loss over the positions that have a target
/// (llm.c's `dloss_mean`): returns `(num_targets, dlosses)` with
/// dlosses[i] = 1/num_targets where targets[i] != -100, else 0. With no
/// targets at all every entry is 0 (the step then has no gradient, rather
/// than a division by zero).
///
/// Any negative target counts as ignored, like out-of-range ones in the
/// kernels; ids >= V cannot be told apart here and count as targets.
pub fn mean_loss_scale(targets: &[i32]) -> (usize, Vec<f64>) {
    let num = targets.iter().filter(|&&t| t >= 0).count();
    let scale = if num == 0 { 0.0 } else { 1.0 / num as f64 };
    (
        num,
        targets
            .iter()
            .map(|&t| if t >= 0 { scale } else { 0.0 })
            .collect(),
    )
}
