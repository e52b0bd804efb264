//! CPU twins of `shaders/adamw.wgsl`, in f64. Same names and argument order.
//!
//! The GPU splits the norm into `global_norm_partial` + `global_norm_finalize`
//! only to parallelise the reduction; here one `global_norm` does both, and
//! takes no partials scratch. The result layout is the same: norm (4) =
//! [norm, clip_coef, nonfinite_flag, unused].

/// The per-step scalars of `adamw_update`, as the host writes them before each
/// submission. They are the f32 scalars torch.optim.AdamW (single-tensor,
/// non-capturable) hands its kernels, each derived in f64 first:
///   [0] decay     = 1 - lr * weight_decay
///   [1] beta1       [2] 1 - beta1
///   [3] beta2       [4] 1 - beta2
///   [5] eps
///   [6] step_size = lr / (1 - beta1^t)
///   [7] bc2_sqrt  = sqrt(1 - beta2^t)
/// Forming 1 - beta2 on the GPU from an f32 beta2 = 0.999 would be off by
/// 1.3e-5 relative (cancellation), hence the separate slots.
/// `t` counts steps from 1, as torch's `state["step"]` does after its
/// increment; t = 0 (bias correction undefined) is treated as 1.
pub fn adamw_step_scalars(
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    t: u64,
) -> [f64; 8] {
    let t = t.max(1) as f64;
    // powf matches Python's `beta ** step` (float ** int calls pow()).
    let bc1 = 1.0 - beta1.powf(t);
    let bc2 = 1.0 - beta2.powf(t);
    [
        1.0 - lr * weight_decay,
        beta1,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        eps,
        lr / bc1,
        bc2.sqrt(),
    ]
}

/// norm (4) <- grads (N): torch.nn.utils.clip_grad_norm_ without the scaling.
/// norm[0] = ||grads||_2 (+inf when non-finite);
/// norm[1] = min(1, max_norm / (norm + 1e-6)) if max_norm > 0, else 1
///           (also 1 when non-finite, as the step is skipped anyway);
/// norm[2] = 1 if the norm is Inf/NaN (any Inf/NaN gradient), else 0;
/// norm[3] = skipped steps in a row: its old value + 1 when flagged, else 0.
pub fn global_norm(norm: &mut [f64], grads: &[f64], max_norm: f64) {
    let sum: f64 = grads.iter().map(|g| g * g).sum();
    // A NaN or Inf anywhere makes the f64 sum NaN or Inf.
    let flagged = !sum.is_finite();
    let n = sum.sqrt();
    let coef = if !flagged && max_norm > 0.0 {
        (max_norm / (n + 1e-6)).min(1.0)
    } else {
        1.0
    };
    norm[0] = if flagged { f64::INFINITY } else { n };
    norm[1] = coef;
    norm[2] = if flagged { 1.0 } else { 0.0 };
    norm[3] = if flagged { norm[3] + 1.0 } else { 0.0 };
}

/// params, m, v (N) updated in place from grads (N), norm (4) (from
/// [`global_norm`]) and step (8) (from [`adamw_step_scalars`]):
/// one step of torch.optim.AdamW,
///   g = grads * clip_coef
///   p -= lr * wd * p                                  (decoupled decay)
///   m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g
///   p -= lr * (m / bc1) / (sqrt(v / bc2) + eps)
/// written with the precomputed scalars as torch evaluates it:
///   p = p*decay - step_size * m / (sqrt(v)/bc2_sqrt + eps).
/// Nothing changes when norm[2] flags a non-finite gradient norm, and an
/// element whose new p, m or v is not a finite f32 (the GPU's precision)
/// keeps its old values.
pub fn adamw_update(
    params: &mut [f64],
    m: &mut [f64],
    v: &mut [f64],
    grads: &[f64],
    norm: &[f64],
    step: &[f64],
) {
    if norm[2] != 0.0 {
        return;
    }
    let coef = norm[1];
    let [decay, b1, omb1, b2, omb2, eps, step_size, bc2_sqrt] = [
        step[0], step[1], step[2], step[3], step[4], step[5], step[6], step[7],
    ];
    let f32_finite = |x: f64| (x as f32).is_finite();
    for i in 0..params.len() {
        let g = grads[i] * coef;
        let mi = b1 * m[i] + omb1 * g;
        let vi = b2 * v[i] + omb2 * g * g;
        let p = params[i] * decay - step_size * mi / (vi.sqrt() / bc2_sqrt + eps);
        if f32_finite(p) && f32_finite(mi) && f32_finite(vi) {
            (params[i], m[i], v[i]) = (p, mi, vi);
        }
    }
}
