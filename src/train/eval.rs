//! Evaluation: mean per-token cross-entropy over the target tokens of a
//! data set, forward only, logits computed only at target positions, a row
//! chunk at a time.

use crate::error::Result;
use crate::gpu::{Context, DType, Plan, Tensor};
use crate::model::transformer::{Acts, FwdShape, HeadBufs, Hooks, Model};
use crate::train::data::Batch;

/// Sum of target-token losses and the number of targets over `batches`.
pub fn eval_batches(
    ctx: &Context,
    model: &Model,
    hooks: &dyn Hooks,
    batches: &[Batch],
) -> Result<(f64, usize)> {
    let cfg = &model.cfg;
    let nv = hooks.prompt().map_or(0, |t| t.shape()[0]);
    let p = hooks.prefix().map_or(0, |t| t.shape()[0]);
    let (mut sum, mut count) = (0.0, 0usize);
    for batch in batches {
        if batch.loss_targets(nv) == 0 {
            continue;
        }
        let (b, t) = (batch.b, batch.t);
        let shape = FwdShape {
            b,
            t,
            n_virtual: nv,
            p,
        };
        model.check_positions(shape)?;
        let s = shape.s();
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for r in 0..b {
            // Prompt tuning also predicts the first token (PEFT's labels).
            if nv > 0 && batch.first[r] != -100 {
                rows.push((r * s + nv - 1) as i32);
                targets.push(batch.first[r]);
            }
            for j in 0..t {
                let tg = batch.targets[r * t + j];
                if tg != -100 {
                    rows.push((r * s + nv + j) as i32);
                    targets.push(tg);
                }
            }
        }
        let n = rows.len();
        let acts = Acts::new(ctx, cfg, shape, false, false)?;
        let ids = Tensor::from_i32(ctx, &batch.ids, &[b, t], "ids")?;
        let rows_t = Tensor::from_i32(ctx, &rows, &[1, n], "rows")?;
        let tg = Tensor::from_i32(ctx, &targets, &[n], "targets")?;
        let head = HeadBufs::new(ctx, cfg, n)?;
        let losses = Tensor::zeros(ctx, &[n], DType::F32, "losses")?;
        let mut plan = Plan::new("eval");
        model.forward(ctx, &mut plan, &acts, &ids, hooks, None)?;
        model.head_losses(ctx, &mut plan, &losses, &head, &acts, &rows_t, &tg)?;
        plan.run(ctx)?;
        sum += losses.read_f32(ctx)?.iter().map(|&x| x as f64).sum::<f64>();
        count += n;
    }
    Ok((sum, count))
}
