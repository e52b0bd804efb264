//! CPU twins of `shaders/attention.wgsl`, in f64. Same names and argument order.
//!
//! Causal multi-head attention with grouped-query KV heads and an optional
//! learned key/value prefix. Layouts (row-major):
//! q, out, dout, dq (B, T, NH, HD); k, v, dk, dv (B, S, KVH, HD) with
//! S = P + T and the prefix in rows 0..P of every batch; lse (B, NH, T).
//! Query head h reads KV head h / (NH / KVH). Query t sees keys s < P + t + 1,
//! and with a sliding window W only those with (P + t) - s < W: key rows are
//! positions, prefix rows included.
//!
//! Packed rows (the `_segs` twins): `starts` (B, T) gives each token's row
//! start st; query t sees the prefix keys and the real keys st..=t, and its
//! position for the window is P + t - st, as if its row were alone.

/// Score scale and sliding window of one attention.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mask {
    pub scale: f64,
    pub window: Option<usize>,
}

impl Mask {
    /// Plain causal attention scaled by 1/sqrt(HD).
    pub fn causal(hd: usize) -> Mask {
        Mask {
            scale: 1.0 / (hd as f64).sqrt(),
            window: None,
        }
    }
    /// The first key query row `ti` sees (after `p` prefix rows).
    pub fn first_key(&self, p: usize, ti: usize) -> usize {
        self.window.map_or(0, |w| (p + ti + 1).saturating_sub(w))
    }
    /// The keys query row `ti` of a row starting at `st` sees, ascending
    /// (with `st` = 0: `first_key(p, ti)..p + ti + 1`).
    pub fn keys(&self, p: usize, ti: usize, st: usize) -> Vec<usize> {
        // Positions: prefix key j at j, real key P + i at P + i - st.
        let near = |pos: usize| self.window.is_none_or(|w| p + ti - st - pos < w);
        (0..p)
            .filter(|&j| near(j))
            .chain((p + st..p + ti + 1).filter(|&j| near(j - st)))
            .collect()
    }
}

/// Row start of token `ti` of batch `bi` (0 without packing).
fn start(starts: Option<&[usize]>, bi: usize, ti: usize, t: usize) -> usize {
    starts.map_or(0, |s| s[bi * t + ti])
}

/// Index of element (b, t, h, 0) in a (B, T, H, HD) tensor.
fn row(b: usize, t: usize, h: usize, nt: usize, nh: usize, hd: usize) -> usize {
    ((b * nt + t) * nh + h) * hd
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// out[b,t,h] = sum_s softmax_s(scale * q.k_s) v_s over keys s < P + t + 1,
/// scale = 1/sqrt(HD); lse[b,h,t] = log sum_s exp(scale * q.k_s).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    out: &mut [f64],
    lse: &mut [f64],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    b: usize,
    t: usize,
    nh: usize,
    kvh: usize,
    hd: usize,
    p: usize,
) {
    let m = Mask::causal(hd);
    attention_forward_masked(out, lse, q, k, v, b, t, nh, kvh, hd, p, m, None);
}

/// [`attention_forward`] with another scale and a sliding window, over
/// packed rows with row starts `starts` (B, T); `None` is one row per
/// sequence.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_masked(
    out: &mut [f64],
    lse: &mut [f64],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    b: usize,
    t: usize,
    nh: usize,
    kvh: usize,
    hd: usize,
    p: usize,
    mask: Mask,
    starts: Option<&[usize]>,
) {
    let s = p + t;
    let g = nh / kvh; // query heads per KV head
    let scale = mask.scale;
    for bi in 0..b {
        for h in 0..nh {
            let kh = h / g;
            for ti in 0..t {
                let qr = &q[row(bi, ti, h, t, nh, hd)..][..hd];
                // Every prefix key and the real keys of its row up to ti (in
                // the window).
                let keys = mask.keys(p, ti, start(starts, bi, ti, t));
                // Scores, then a max-subtracted softmax.
                let sc: Vec<f64> = (keys.iter())
                    .map(|&j| scale * dot(qr, &k[row(bi, j, kh, s, kvh, hd)..][..hd]))
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                lse[(bi * nh + h) * t + ti] = m + z.ln();
                // out = sum_j p_j v_j with p_j = exp(sc_j - m) / z.
                let o = &mut out[row(bi, ti, h, t, nh, hd)..][..hd];
                o.fill(0.0);
                for (&j, x) in keys.iter().zip(&sc) {
                    let pj = (x - m).exp() / z;
                    let vr = &v[row(bi, j, kh, s, kvh, hd)..][..hd];
                    for d in 0..hd {
                        o[d] += pj * vr[d];
                    }
                }
            }
        }
    }
}

/// One query row per head at position `pos` against rows 0..=pos of a
/// (1, CAP, KVH, HD) cache: [`attention_forward_masked`] with P = pos, T = 1
/// (the twin of the GPU's split-K `attention_decode`).
#[allow(clippy::too_many_arguments)]
pub fn attention_decode(
    out: &mut [f64],
    lse: &mut [f64],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    pos: usize,
    nh: usize,
    kvh: usize,
    hd: usize,
    mask: Mask,
) {
    let rows = (pos + 1) * kvh * hd;
    attention_forward_masked(
        out,
        lse,
        q,
        &k[..rows],
        &v[..rows],
        1,
        1,
        nh,
        kvh,
        hd,
        pos,
        mask,
        None,
    );
}

/// Differentiates, for every (b, h, t) and visible key s,
///     sc_s = scale * q.k_s;  p_s = exp(sc_s - lse);  out = sum_s p_s v_s
/// with delta = dout.out, dp_s = dout.v_s, ds_s = p_s (dp_s - delta):
///     dq += scale * sum_s ds_s k_s
///     dk_s += scale * ds_s q;  dv_s += p_s dout   (summed over the group's heads)
/// Prefix rows of dk/dv get the gradient of their own batch only.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f64],
    dk: &mut [f64],
    dv: &mut [f64],
    dout: &[f64],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    out: &[f64],
    lse: &[f64],
    b: usize,
    t: usize,
    nh: usize,
    kvh: usize,
    hd: usize,
    p: usize,
) {
    let m = Mask::causal(hd);
    attention_backward_masked(
        dq, dk, dv, dout, q, k, v, out, lse, b, t, nh, kvh, hd, p, m, None,
    );
}

/// [`attention_backward`] of [`attention_forward_masked`] (the same mask
/// and row starts).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_masked(
    dq: &mut [f64],
    dk: &mut [f64],
    dv: &mut [f64],
    dout: &[f64],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    out: &[f64],
    lse: &[f64],
    b: usize,
    t: usize,
    nh: usize,
    kvh: usize,
    hd: usize,
    p: usize,
    mask: Mask,
    starts: Option<&[usize]>,
) {
    let s = p + t;
    let g = nh / kvh;
    let scale = mask.scale;
    for bi in 0..b {
        for h in 0..nh {
            let kh = h / g;
            for ti in 0..t {
                let qi = row(bi, ti, h, t, nh, hd);
                let (qr, go) = (&q[qi..][..hd], &dout[qi..][..hd]);
                let l = lse[(bi * nh + h) * t + ti];
                // sum_j p_j dp_j = dout . sum_j p_j v_j = dout . out.
                let delta = dot(go, &out[qi..][..hd]);
                for j in mask.keys(p, ti, start(starts, bi, ti, t)) {
                    let ki = row(bi, j, kh, s, kvh, hd);
                    // Recompute the probability from lse, as the kernels do.
                    let pj = (scale * dot(qr, &k[ki..][..hd]) - l).exp();
                    // Softmax backward: ds_j = p_j (dp_j - sum_i p_i dp_i).
                    let ds = pj * (dot(go, &v[ki..][..hd]) - delta);
                    // sc = scale q.k, out += p v: the three gradients.
                    for d in 0..hd {
                        dq[qi + d] += scale * ds * k[ki + d];
                        dk[ki + d] += scale * ds * qr[d];
                        dv[ki + d] += pj * go[d];
                    }
                }
            }
        }
    }
}
