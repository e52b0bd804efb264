//! The K/V rows attention reads, (B, P + S, KVH, HD): the `P` rows in front
//! (a prefix-tuning adapter's, or a KV cache's earlier tokens) then the
//! forward's own `S`. Assembly, its backward, and PEFT's prefix layout.

use crate::error::{Error, Result};
use crate::gpu::ops::attention::{attention_backward_masked, AttnMask};
use crate::gpu::ops::copy::{copy_rows, copy_rows_at, Layout, RowBlock};
use crate::gpu::{Context, Plan, Tensor};
use crate::model::buffers::{FwdShape, Grads, KvCache, LayerActs};
use crate::model::config::ModelConfig;

/// K (`kv` 0) or V (`kv` 1) rows of layer `l` in a prefix table: PEFT keeps
/// the prefix as (N, L * 2 * kv_dim), i.e. view(N, L, 2, KVH, HD). Every
/// batch row shares the table (block stride 0).
pub fn prefix_layout(cfg: &ModelConfig, l: usize, kv: usize) -> Layout {
    let kvd = cfg.kv_dim();
    Layout {
        off: (l * 2 + kv) * kvd,
        bs: 0,
        rs: cfg.layers * 2 * kvd,
    }
}

/// What sits in front of a forward's own K/V rows.
#[derive(Clone, Copy)]
pub enum Front<'a> {
    /// Nothing (P = 0).
    None,
    /// An adapter's prefix table (unrotated), when it has one.
    Prefix(Option<&'a Tensor>),
    /// A cache holding P rows; new rows are appended to it.
    Cache(&'a KvCache),
    /// A cache and one token at the position in its `pos` buffer, read when
    /// the plan runs (a decode step recorded once, replayed per token).
    Decode(&'a KvCache),
}

/// Overwrite `t` rows of width `d` in each of `nb` blocks (no accumulate).
pub(crate) fn overwrite(nb: usize, t: usize, d: usize) -> RowBlock {
    RowBlock {
        nb,
        t,
        d,
        acc: false,
    }
}

/// Layer `l`'s K and V as attention reads them (B, P + S, KVH, HD).
pub fn kv_forward(
    ctx: &Context,
    plan: &mut Plan,
    cfg: &ModelConfig,
    l: usize,
    a: &LayerActs,
    sh: FwdShape,
    front: Front,
) -> Result<(Tensor, Tensor)> {
    let (b, s, p, kvd) = (sh.b, sh.s(), sh.p, cfg.kv_dim());
    let own = Layout::dense(s, kvd);
    match front {
        Front::None => Ok((a.k.clone(), a.v.clone())),
        Front::Cache(kc) => {
            for (dst, src) in [(&kc.k[l], &a.k), (&kc.v[l], &a.v)] {
                let after = Layout::rows(kc.cap, kvd, p, 0);
                copy_rows(ctx, plan, dst, after, src, own, overwrite(1, s, kvd))?;
            }
            let shape = [1, p + s, cfg.kv_heads, cfg.head_dim];
            Ok((
                kc.k[l].view(0, &shape, "cache.k")?,
                kc.v[l].view(0, &shape, "cache.v")?,
            ))
        }
        Front::Decode(kc) => {
            let at = Layout::rows(kc.cap, kvd, 0, 0);
            for (dst, src) in [(&kc.k[l], &a.k), (&kc.v[l], &a.v)] {
                copy_rows_at(
                    ctx,
                    plan,
                    dst,
                    at,
                    src,
                    own,
                    overwrite(1, s, kvd),
                    &kc.pos,
                    kc.cap - s,
                )?;
            }
            Ok((kc.k[l].clone(), kc.v[l].clone()))
        }
        Front::Prefix(prefix) => {
            let pre = prefix
                .ok_or_else(|| Error::invalid("forward", "K/V rows in front without a prefix"))?;
            let (kcat, vcat) = cat(a);
            for (j, (dst, src)) in [(kcat, &a.k), (vcat, &a.v)].into_iter().enumerate() {
                let (head, tail) = (
                    Layout::rows(p + s, kvd, 0, 0),
                    Layout::rows(p + s, kvd, p, 0),
                );
                let pl = prefix_layout(cfg, l, j);
                copy_rows(ctx, plan, dst, head, pre, pl, overwrite(b, p, kvd))?;
                copy_rows(ctx, plan, dst, tail, src, own, overwrite(b, s, kvd))?;
            }
            Ok((kcat.clone(), vcat.clone()))
        }
    }
}

// Acts::new allocates kcat/vcat when p > 0 and the acts are not for a cache;
// every caller builds acts with `cached` set exactly when it passes a cache.
fn cat(a: &LayerActs) -> (&Tensor, &Tensor) {
    (
        a.kcat
            .as_ref()
            .expect("invariant: Acts::new allocates kcat when p > 0 and not cached"),
        a.vcat
            .as_ref()
            .expect("invariant: Acts::new allocates vcat when p > 0 and not cached"),
    )
}

/// Backward of attention over the K/V rows [`kv_forward`] assembled: dq,
/// and dk/dv of those rows (the assembled (B, P + S) ones when P > 0);
/// `segs`: packed rows' starts (see [`attention_backward_masked`]).
pub fn attention_backward_kv(
    ctx: &Context,
    plan: &mut Plan,
    a: &LayerActs,
    g: &Grads,
    p: usize,
    mask: AttnMask,
    segs: Option<&Tensor>,
) -> Result<()> {
    let ((k, v), (dk, dv)) = match p {
        0 => ((&a.k, &a.v), (&g.dk, &g.dv)),
        _ => (cat(a), dcat(g)),
    };
    let (q, att, lse) = (&a.q, &a.att, &a.lse);
    attention_backward_masked(
        ctx, plan, &g.dq, dk, dv, &g.delta, &g.datt, q, k, v, att, lse, mask, segs,
    )
}

// Training acts are built with `cached` false, and grads for the same shape.
fn dcat(g: &Grads) -> (&Tensor, &Tensor) {
    (
        g.dkcat
            .as_ref()
            .expect("invariant: Grads::new allocates dkcat when p > 0"),
        g.dvcat
            .as_ref()
            .expect("invariant: Grads::new allocates dvcat when p > 0"),
    )
}

/// Backward of [`kv_forward`] with a prefix: the own rows' gradients into
/// `g.dk`/`g.dv`, and the prefix rows' into `dprefix` when it is trained.
pub fn kv_backward(
    ctx: &Context,
    plan: &mut Plan,
    cfg: &ModelConfig,
    l: usize,
    g: &Grads,
    sh: FwdShape,
    dprefix: Option<&Tensor>,
) -> Result<()> {
    let (b, s, p, kvd) = (sh.b, sh.s(), sh.p, cfg.kv_dim());
    if p == 0 {
        return Ok(());
    }
    let (dkcat, dvcat) = dcat(g);
    for (j, (dcat, dsplit)) in [(dkcat, &g.dk), (dvcat, &g.dv)].into_iter().enumerate() {
        if let Some(dpre) = dprefix {
            // Sum over the batch, one row block at a time (each prefix
            // element has one writer per dispatch).
            let add = RowBlock {
                nb: 1,
                t: p,
                d: kvd,
                acc: true,
            };
            for bi in 0..b {
                let src = Layout {
                    off: bi * (p + s) * kvd,
                    bs: 0,
                    rs: kvd,
                };
                copy_rows(ctx, plan, dpre, prefix_layout(cfg, l, j), dcat, src, add)?;
            }
        }
        let (own, tail) = (Layout::dense(s, kvd), Layout::rows(p + s, kvd, p, 0));
        copy_rows(ctx, plan, dsplit, own, dcat, tail, overwrite(b, s, kvd))?;
    }
    Ok(())
}
