//! One training step on the GPU: forward, loss, backward and AdamW recorded
//! into plans that are built once per batch shape and replayed. Per step the
//! host writes the batch (ids, target rows, loss weights) and submits once;
//! the loss and gradient norm are read back only when asked for.

use std::collections::HashMap;

use crate::adapters::Adapter;
use crate::error::{Error, Result};
use crate::gpu::ops::adamw;
use crate::gpu::{Context, DType, Plan, Tensor};
use crate::model::buffers::{
    logits_workspace, logits_workspace_within, position_ids, BufKind, BufSpec, Keep, Pool,
    LOGITS_BUDGET_BYTES,
};
use crate::model::config::ModelConfig;
use crate::model::packing::{PackBufs, PackTables};
use crate::model::transformer::{Acts, FwdShape, Grads, HeadBufs, Model};
use crate::train::data::Batch;

/// Learning-rate schedule over optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

/// AdamW settings (torch.optim.AdamW's defaults for the betas and eps).
#[derive(Clone, Debug)]
pub struct OptimConfig {
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub max_grad_norm: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl OptimConfig {
    /// Learning rate of optimizer step `step` (0-based): linear warmup from
    /// lr/warmup, then the schedule's decay to 0 at `total_steps`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let frac = ((step - self.warmup_steps) as f64 / span).clamp(0.0, 1.0);
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Linear => self.lr * (1.0 - frac),
            Schedule::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * frac).cos()),
        }
    }
}

/// Buffers and the recorded plan of one batch shape.
struct StepPlan {
    ids: Tensor,
    rows: Tensor,
    targets: Tensor,
    dlosses: Tensor,
    losses: Tensor,
    plan: Plan,
    r: usize,
    s: usize,
    nv: usize,
    /// GPT-2's position ids, rewritten per step: buckets share the buffer.
    pos_ids: Option<(Tensor, Vec<i32>)>,
    /// Packed rows' per-step starts and positions (with packing on).
    pack: Option<PackBufs>,
    /// Kept alive for the plan's bindings.
    _acts: Acts,
    _grads: Grads,
    _head: HeadBufs,
}

/// What a step reports when asked.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    /// Mean loss over the step's targets (all micro-batches).
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// True when the step was skipped for a non-finite gradient.
    pub skipped: bool,
    /// Steps skipped in a row up to this one (counted on the GPU, so steps
    /// that were not read back count too).
    pub skipped_in_a_row: usize,
}

/// Round up to a multiple of 8 up to 64, of 16 above, at most `cap`:
/// short rows (a prompt/completion pair of ~16 tokens) would otherwise run
/// mostly padding, and a few more plans cost little.
fn bucket(x: usize, cap: usize) -> usize {
    let m = if x <= 64 { 8 } else { 16 };
    (x.div_ceil(m) * m).min(cap).max(x)
}

/// The plan shape (B, T, R) of a batch of `b` rows of `t` tokens with
/// `targets` loss targets, `nv` virtual tokens and rows of at most `cap_t`
/// tokens: T and R rounded up (see `bucket`) so that few plans serve a
/// data set.
pub fn bucket_shape(
    b: usize,
    t: usize,
    targets: usize,
    nv: usize,
    cap_t: usize,
) -> (usize, usize, usize) {
    let t = bucket(t, cap_t);
    let r = bucket(targets.max(1), b * (nv + t));
    (b, t, r)
}

/// Every buffer of a training step of `shape` with `r` logit rows: inputs,
/// saved activations, activation gradients and the logits workspace. The
/// trainer allocates these (once, for the largest shape) and the memory
/// plan counts them.
pub fn step_specs(cfg: &ModelConfig, shape: FwdShape, r: usize) -> Vec<BufSpec> {
    step_specs_kept(cfg, shape, r, Keep::default())
}

/// [`step_specs`] with the activations `keep` says.
pub fn step_specs_kept(cfg: &ModelConfig, shape: FwdShape, r: usize, keep: Keep) -> Vec<BufSpec> {
    let i = BufKind::Input;
    let mut v = vec![
        BufSpec::new("ids", &[shape.b, shape.t], DType::I32, i),
        BufSpec::new("target_rows", &[1, r], DType::I32, i),
        BufSpec::new("targets", &[r], DType::I32, i),
        BufSpec::new("dlosses", &[r], DType::F32, i),
        BufSpec::new("losses", &[r], DType::F32, i),
    ];
    v.extend(Acts::specs_kept(cfg, shape, Some(keep), false));
    v.extend(Grads::specs(cfg, shape, r));
    v.extend(
        logits_workspace(cfg, r)
            .into_iter()
            .filter(|s| s.label == "logits" || s.label == "gathered"),
    );
    v
}

pub struct Trainer<'a> {
    ctx: &'a Context,
    pub model: &'a Model,
    pub adapter: &'a Adapter,
    pub opt: OptimConfig,
    norm: Tensor,
    /// The gradient-norm partials the optimizer plan binds.
    _partials: Tensor,
    scalars: Tensor,
    opt_plan: Plan,
    plans: HashMap<(usize, usize, usize), StepPlan>,
    /// The step buffers every plan views, sized for `pool_max` (B, T, R):
    /// memory follows the largest shape, not the variety of the data.
    pool: Pool,
    pool_max: (usize, usize, usize),
    /// Optimizer steps taken (AdamW's t is this + 1 during a step).
    pub step: usize,
    /// Matmul FLOPs of the last step's plans (for GFLOP/s reports).
    pub last_flops: f64,
    /// Dispatches of the last step's plans, optimizer included.
    pub last_dispatches: usize,
    /// Bytes of the LM head's logits workspace (see [`Trainer::set_logits_budget`]).
    logits_budget: u64,
    /// Gradient checkpointing (see [`Trainer::set_grad_checkpoint`]).
    recompute: bool,
    /// The host RoPE tables when batches are packed (see [`Trainer::set_packing`]).
    packing: Option<PackTables>,
}

impl<'a> Trainer<'a> {
    pub fn new(
        ctx: &'a Context,
        model: &'a Model,
        adapter: &'a Adapter,
        opt: OptimConfig,
    ) -> Result<Trainer<'a>> {
        let flat = &adapter.flat;
        let norm = Tensor::zeros(ctx, &[4], DType::F32, "grad_norm")?;
        let partials = Tensor::zeros(
            ctx,
            &[adamw::global_norm_partials_len(flat.len)],
            DType::F32,
            "norm_partials",
        )?;
        let scalars = Tensor::zeros(ctx, &[8], DType::F32, "adamw_scalars")?;
        let mut opt_plan = Plan::new("optimizer");
        adamw::global_norm(
            ctx,
            &mut opt_plan,
            &norm,
            &partials,
            &flat.grads,
            opt.max_grad_norm as f32,
        )?;
        adamw::adamw_update(
            ctx,
            &mut opt_plan,
            &flat.params,
            &flat.m,
            &flat.v,
            &flat.grads,
            &norm,
            &scalars,
        )?;
        // The next step accumulates from zero.
        opt_plan.clear(&flat.grads);
        let mut clear = Plan::new("clear grads");
        clear.clear(&flat.grads);
        clear.run(ctx)?;
        Ok(Trainer {
            ctx,
            model,
            adapter,
            opt,
            norm,
            _partials: partials,
            scalars,
            opt_plan,
            plans: HashMap::new(),
            pool: Pool::default(),
            pool_max: (0, 0, 0),
            step: 0,
            last_flops: 0.0,
            last_dispatches: 0,
            logits_budget: LOGITS_BUDGET_BYTES,
            recompute: false,
            packing: None,
        })
    }

    /// Gradient checkpointing: keep only each layer's input and recompute
    /// the rest in backward (one more forward per step, one layer's
    /// activations instead of all). Plans and buffers already built are
    /// dropped.
    pub fn set_grad_checkpoint(&mut self, on: bool) {
        self.recompute = on;
        self.plans.clear();
        self.pool = Pool::default();
        self.pool_max = (0, 0, 0);
    }

    /// What the step keeps: nothing below the lowest layer backward
    /// reaches, and with checkpointing only the layer inputs.
    pub fn keep(&self) -> Keep {
        Keep {
            from: self.model.backward_floor(self.adapter).unwrap_or(0),
            recompute: self.recompute,
        }
    }

    /// Train on packed batches (`Batch::starts`): every plan then keeps
    /// attention inside each row and puts each row at its own positions.
    /// Prompt tuning's virtual tokens belong in front of one row, so it is
    /// refused. Plans already built are dropped.
    pub fn set_packing(&mut self, on: bool) -> Result<()> {
        if on && self.adapter_rows().0 > 0 {
            return Err(Error::invalid(
                "train",
                "--packing does not work with prompt tuning: its virtual tokens go in front \
                 of one row, not of each packed row; use --method lora or prefix",
            ));
        }
        self.packing = on.then(|| PackTables::new(&self.model.cfg));
        self.plans.clear();
        Ok(())
    }

    /// Bound the LM head's logits workspace to `bytes` (default
    /// [`LOGITS_BUDGET_BYTES`]); a smaller one means more row chunks, and a
    /// recompute of each chunk's logits in backward. Plans already built
    /// are dropped.
    pub fn set_logits_budget(&mut self, bytes: u64) {
        self.logits_budget = bytes;
        self.plans.clear();
    }

    /// Virtual-token rows (prompt tuning) and K/V rows in front (prefix).
    fn adapter_rows(&self) -> (usize, usize) {
        use crate::model::transformer::Hooks;
        let nv = self.adapter.prompt().map_or(0, |t| t.shape()[0]);
        let p = self.adapter.prefix().map_or(0, |t| t.shape()[0]);
        (nv, p)
    }

    /// The longest batch row this model and adapter allow.
    pub fn max_tokens(&self) -> usize {
        let (nv, p) = self.adapter_rows();
        self.model.cfg.max_positions.saturating_sub(nv + p)
    }

    fn shape(&self, b: usize, t: usize) -> FwdShape {
        let (nv, p) = self.adapter_rows();
        FwdShape {
            b,
            t,
            n_virtual: nv,
            p,
        }
    }

    /// Allocate the step buffers for shapes up to (B, T, R) now, so that
    /// no later batch grows them (`train` reserves the data's largest).
    pub fn reserve(&mut self, b: usize, t: usize, r: usize) -> Result<()> {
        let (pb, pt, pr) = self.pool_max;
        let want = (pb.max(b), pt.max(t), pr.max(r));
        if want == self.pool_max {
            return Ok(());
        }
        // Plans hold views of the old buffers: drop both before allocating.
        self.plans.clear();
        self.pool = Pool::default();
        let shape = self.shape(want.0, want.1);
        self.model.check_positions(shape)?;
        // Packed operands too are sized once for the largest shape.
        self.ctx.reserve_scratch_rows(shape.rows());
        let specs = step_specs_kept(&self.model.cfg, shape, want.2, self.keep());
        self.pool = Pool::alloc(self.ctx, &specs)?;
        self.pool_max = want;
        Ok(())
    }

    fn build(&self, b: usize, t: usize, r: usize) -> Result<StepPlan> {
        let (ctx, model, ad) = (self.ctx, self.model, self.adapter);
        let cfg = &model.cfg;
        let (nv, _) = self.adapter_rows();
        let shape = self.shape(b, t);
        model.check_positions(shape)?;
        let pool = &self.pool;
        let keep = self.keep();
        let mut acts = Acts::in_pool_kept(pool, cfg, shape, Some(keep), false)?;
        let pack = match &self.packing {
            Some(tables) => Some(PackBufs::new(ctx, tables, b, shape.s())?),
            None => None,
        };
        acts.pack = pack.clone();
        let grads = Grads::in_pool(pool, cfg, shape, r)?;
        let v = pool.views(&step_specs_kept(cfg, shape, r, keep))?;
        let (ids, rows, targets) = (v.get("ids")?, v.get("target_rows")?, v.get("targets")?);
        let (dlosses, losses) = (v.get("dlosses")?, v.get("losses")?);
        // The pool's logits chunk is sized for the default budget; a smaller
        // budget (tests) views fewer rows of it.
        let hv = pool.views(&logits_workspace_within(cfg, r, self.logits_budget))?;
        let head = HeadBufs {
            gathered: hv.get("gathered")?,
            logits: hv.get("logits")?,
        };
        let mut plan = Plan::new(&plan_label(b, t, r));
        ad.set_training(true);
        let recorded = Self::record(
            ctx, model, ad, &mut plan, &acts, &grads, &ids, &rows, &targets, &dlosses, &losses,
            &head,
        );
        ad.set_training(false);
        recorded?;
        log::debug!(
            "built {} with {} dispatches",
            plan_label(b, t, r),
            plan.dispatches()
        );
        Ok(StepPlan {
            ids,
            rows,
            targets,
            dlosses,
            losses,
            plan,
            r,
            s: nv + t,
            nv,
            pos_ids: acts.pos_ids.clone().map(|t| (t, position_ids(shape))),
            pack,
            _acts: acts,
            _grads: grads,
            _head: head,
        })
    }

    /// The step's kernels: forward, the head and loss at the target rows,
    /// backward, and the adapter's own backward.
    #[allow(clippy::too_many_arguments)]
    fn record(
        ctx: &Context,
        model: &Model,
        ad: &Adapter,
        plan: &mut Plan,
        acts: &Acts,
        grads: &Grads,
        ids: &Tensor,
        rows: &Tensor,
        targets: &Tensor,
        dlosses: &Tensor,
        losses: &Tensor,
        head: &HeadBufs,
    ) -> Result<()> {
        model.forward(ctx, plan, acts, ids, ad, None)?;
        model.head_losses(ctx, plan, losses, head, acts, rows, targets)?;
        ad.pre_backward(plan);
        model.backward(ctx, plan, acts, grads, head, rows, targets, dlosses, ad)?;
        ad.post_backward(ctx, plan)
    }

    /// Record-once plan for this batch's bucketed shape, inputs written.
    fn prepare(&mut self, batch: &Batch, weight: f32) -> Result<(usize, usize, usize)> {
        let cap_t = self.max_tokens();
        if batch.t > cap_t {
            return Err(Error::invalid(
                "train",
                format!(
                    "a batch row of {} tokens exceeds the {cap_t} positions left by the model ({}) and the adapter; lower --max-seq-len",
                    batch.t, self.model.cfg.max_positions
                ),
            ));
        }
        let (nv, _) = self.adapter_rows();
        let (b, t, r) = bucket_shape(batch.b, batch.t, batch.loss_targets(nv), nv, cap_t);
        let key = (b, t, r);
        if !self.plans.contains_key(&key) {
            self.reserve(b, t, r)?;
            let sp = self.build(b, t, r)?;
            self.plans.insert(key, sp);
        }
        let sp = &self.plans[&key];
        // Re-pad the batch to the bucketed T.
        let pad = batch
            .ids
            .get(batch.t.saturating_sub(1))
            .copied()
            .unwrap_or(0);
        let mut ids = vec![pad; b * t];
        let mut tg_full = vec![-100i32; b * t];
        for row in 0..b {
            for j in 0..batch.t {
                ids[row * t + j] = batch.ids[row * batch.t + j];
                tg_full[row * t + j] = batch.targets[row * batch.t + j];
            }
        }
        // Target rows (flat b * S + nv + j), then distinct non-target rows
        // with no target as padding up to R.
        let mut rows = Vec::with_capacity(sp.r);
        let mut targets = Vec::with_capacity(sp.r);
        let mut is_target = vec![false; b * sp.s];
        for row in 0..b {
            // Prompt tuning: the last virtual token predicts the first token.
            if sp.nv > 0 && batch.first[row] != -100 {
                let flat = row * sp.s + sp.nv - 1;
                rows.push(flat as i32);
                targets.push(batch.first[row]);
                is_target[flat] = true;
            }
            for j in 0..t {
                let tg = tg_full[row * t + j];
                if tg != -100 {
                    let flat = row * sp.s + sp.nv + j;
                    rows.push(flat as i32);
                    targets.push(tg);
                    is_target[flat] = true;
                }
            }
        }
        let mut fill = 0;
        while rows.len() < sp.r {
            while is_target[fill] {
                fill += 1;
            }
            rows.push(fill as i32);
            targets.push(-100);
            fill += 1;
        }
        let dl: Vec<f32> = targets
            .iter()
            .map(|&x| if x == -100 { 0.0 } else { weight })
            .collect();
        match (&sp.pack, &self.packing) {
            (Some(pk), Some(tables)) => {
                let starts = padded_starts(batch, b, t)?;
                let pos = pk.write(self.ctx, tables, &starts, self.adapter_rows().1)?;
                if let Some((pid, _)) = &sp.pos_ids {
                    let pos: Vec<i32> = pos.iter().map(|&x| x as i32).collect();
                    pid.write_i32(self.ctx, &pos)?;
                }
            }
            _ => {
                if batch.starts.iter().any(|&s| s != 0) {
                    return Err(Error::invalid(
                        "train",
                        "a packed batch on a trainer without packing (Trainer::set_packing)",
                    ));
                }
                if let Some((pid, pos)) = &sp.pos_ids {
                    pid.write_i32(self.ctx, pos)?;
                }
            }
        }
        sp.ids.write_i32(self.ctx, &ids)?;
        sp.rows.write_i32(self.ctx, &rows)?;
        sp.targets.write_i32(self.ctx, &targets)?;
        sp.dlosses.write_f32(self.ctx, &dl)?;
        Ok(key)
    }

    /// One optimizer step over `micro` batches (gradient accumulation: the
    /// loss is the mean over all their targets). One submission per
    /// micro-batch, the last one carrying the optimizer. With `read`, returns
    /// the loss and the gradient norm (the only readbacks).
    pub fn train_step(&mut self, micro: &[Batch], read: bool) -> Result<Option<StepStats>> {
        let nv = self.adapter_rows().0;
        let total: usize = micro.iter().map(|b| b.loss_targets(nv)).sum();
        if total == 0 {
            return Err(Error::invalid("train", "a step with no target tokens"));
        }
        let weight = 1.0 / total as f32;
        let lr = self.opt.lr_at(self.step);
        let sc = adamw::adamw_step_scalars(
            lr,
            self.opt.beta1,
            self.opt.beta2,
            self.opt.eps,
            self.opt.weight_decay,
            self.step as u64 + 1,
        );
        self.scalars.write_f32(self.ctx, &sc)?;
        let mut loss_sum = 0.0;
        self.last_flops = 0.0;
        self.last_dispatches = self.opt_plan.dispatches();
        for (i, batch) in micro.iter().enumerate() {
            let key = self.prepare(batch, weight)?;
            // A fresh dropout mask per micro-batch, reproducible from the step.
            self.adapter.set_seed(
                self.ctx,
                (self.step as u32).wrapping_mul(1009).wrapping_add(i as u32),
            )?;
            let sp = &self.plans[&key];
            self.last_flops += sp.plan.flops();
            self.last_dispatches += sp.plan.dispatches();
            let mut enc = self.ctx.device.create_command_encoder(&Default::default());
            sp.plan.encode(&mut enc);
            if i + 1 == micro.len() {
                self.opt_plan.encode(&mut enc);
            }
            self.ctx.queue.submit([enc.finish()]);
            self.ctx.check("train step")?;
            if read {
                loss_sum += sp
                    .losses
                    .read_f32(self.ctx)?
                    .iter()
                    .map(|&x| x as f64)
                    .sum::<f64>();
            }
        }
        self.step += 1;
        if !read {
            return Ok(None);
        }
        let norm = self.norm.read_f32(self.ctx)?;
        Ok(Some(StepStats {
            loss: loss_sum / total as f64,
            grad_norm: norm[0] as f64,
            skipped: norm[2] != 0.0,
            skipped_in_a_row: norm[3] as usize,
        }))
    }

    /// Wall time per kind of GPU step of `batch`'s step plan (largest
    /// first, see `Plan::profile`), each step run alone. Runs the forward
    /// and backward once more: gradients accumulate, so this is for
    /// benchmarks, never inside training.
    pub fn profile(&mut self, batch: &Batch) -> Result<crate::gpu::plan::Profile> {
        let key = self.prepare(batch, 1.0)?;
        self.plans[&key].plan.profile(self.ctx)
    }

    /// Gradients of one batch without an optimizer step (for tests):
    /// returns the mean loss; the adapter's flat gradient holds the result.
    pub fn gradients(&mut self, batch: &Batch) -> Result<f64> {
        let mut clear = Plan::new("clear grads");
        clear.clear(&self.adapter.flat.grads);
        clear.run(self.ctx)?;
        let n = batch.loss_targets(self.adapter_rows().0).max(1);
        let weight = 1.0 / n as f32;
        let key = self.prepare(batch, weight)?;
        let sp = &self.plans[&key];
        sp.plan.run(self.ctx)?;
        let sum: f64 = sp
            .losses
            .read_f32(self.ctx)?
            .iter()
            .map(|&x| x as f64)
            .sum();
        Ok(sum / n as f64)
    }

    /// Optimizer steps skipped in a row for a non-finite gradient, up to
    /// the last one (0 when it was applied). A readback: call it when saving.
    pub fn skipped_in_a_row(&self) -> Result<usize> {
        Ok(self.norm.read_f32(self.ctx)?[3] as usize)
    }

    /// The optimizer state for a checkpoint: (m, v) as named tensors.
    pub fn moments(&self) -> Result<(crate::adapters::HostTensors, crate::adapters::HostTensors)> {
        let f = &self.adapter.flat;
        Ok((f.read(self.ctx, &f.m)?, f.read(self.ctx, &f.v)?))
    }
}

/// A batch's row starts re-padded to the plan's (B, T): none (one row per
/// sequence) are zeros; the bucket's extra tokens are padding, a row of their
/// own from the batch's end.
fn padded_starts(batch: &Batch, b: usize, t: usize) -> Result<Vec<u32>> {
    let mut starts = vec![0u32; b * t];
    if batch.starts.is_empty() {
        return Ok(starts);
    }
    if batch.starts.len() != batch.b * batch.t {
        return Err(Error::invalid(
            "train",
            format!(
                "a packed batch has {} row starts for (B={}, T={})",
                batch.starts.len(),
                batch.b,
                batch.t
            ),
        ));
    }
    for row in 0..batch.b {
        for j in 0..t {
            starts[row * t + j] = if j < batch.t {
                batch.starts[row * batch.t + j]
            } else {
                batch.t as u32
            };
        }
    }
    Ok(starts)
}

fn plan_label(b: usize, t: usize, r: usize) -> String {
    format!("train step B={b} T={t} R={r}")
}
