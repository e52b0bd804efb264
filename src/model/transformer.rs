//! The decoder-only transformer's schedule on the GPU: `Model::forward` as
//! a plain per-layer list of calls and `Model::backward` as the same list
//! reversed (llm.c style). One schedule serves the llama family (RMSNorm,
//! RoPE, SwiGLU, separate q/k/v, optional q/k/v biases) and gpt2
//! (LayerNorm, learned positions, tanh-GELU, fused c_attn); the few places
//! where they differ are `Block`'s qkv and mlp steps at the end of this file.
//! The layers live in `layers.rs`, the buffers in `buffers.rs`, the K/V
//! assembly in `kv.rs`, the checkpoint names in `names.rs`.
//!
//! Sequence layout of one forward (per batch row): `S` rows of hidden state,
//! which are the `N` virtual tokens of a prompt-tuning adapter followed by
//! the `T` real tokens. Attention also sees `P` K/V rows in front of those:
//! a prefix-tuning adapter's rows, or a KV cache's earlier tokens. Row `i`
//! of the sequence has position `P + i` (PEFT's convention for prefixes).

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::ops::attention::{
    attention_decode, attention_forward_masked, AttnMask, MAX_HEAD_DIM,
};
use crate::gpu::ops::copy::{copy_rows, scatter_rows, Layout};
use crate::gpu::ops::{activation, embedding, expect_shape, loss, matmul, rope};
use crate::gpu::{Context, Plan, Tensor};
use crate::model::compact::WeightsMode;
use crate::model::config::{Arch, GluAct, LayerAttn, ModelConfig};
use crate::model::kv::{attention_backward_kv, kv_backward, kv_forward, overwrite, Front};
use crate::model::names::{BlockSpec, ModelSpec};
use crate::model::packing::PackBufs;
use crate::model::weights::Weights;

// The types of the model's public surface, at their historical paths.
pub use crate::model::buffers::{
    position_ids, Acts, FwdShape, Grads, HeadBufs, KvCache, LayerActs, NormActs,
};
pub use crate::model::layers::{Block, Linear, Mlp, Norm, Qkv, Store};

/// What an adapter adds to the frozen model's forward.
pub trait Hooks {
    /// The learned virtual-token embeddings (N, C) put in front of the
    /// input (prompt tuning).
    fn prompt(&self) -> Option<&Tensor> {
        None
    }
    /// The learned prefix (N, L * 2 * kv_dim), PEFT's layout:
    /// view(N, L, 2, kv_heads, head_dim) (prefix tuning).
    fn prefix(&self) -> Option<&Tensor> {
        None
    }
    /// Recorded at the start of every forward: compute what the other hooks
    /// return (e.g. a prefix produced by a projection MLP).
    fn prepare(&self, _ctx: &Context, _plan: &mut Plan) -> Result<()> {
        Ok(())
    }
    /// Called right after `out = lin(inp)`; adds e.g. a LoRA update.
    fn linear(
        &self,
        _ctx: &Context,
        _plan: &mut Plan,
        _layer: usize,
        _lin: &Linear,
        _out: &Tensor,
        _inp: &Tensor,
    ) -> Result<()> {
        Ok(())
    }
    /// Whether [`Hooks::linear`] does anything for this layer (training:
    /// backward must reach it).
    fn adapts(&self, _layer: usize, _lin: &Linear) -> bool {
        false
    }
    /// Backward of [`Hooks::linear`]: accumulate the adapter's gradients from
    /// `dout`, and its share of `dinp` when given.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        _ctx: &Context,
        _plan: &mut Plan,
        _layer: usize,
        _lin: &Linear,
        _dout: &Tensor,
        _inp: &Tensor,
        _dinp: Option<&Tensor>,
    ) -> Result<()> {
        Ok(())
    }
    /// Gradient buffer of [`Hooks::prompt`], same shape (accumulated).
    fn prompt_grad(&self) -> Option<&Tensor> {
        None
    }
    /// Gradient buffer of [`Hooks::prefix`], same shape (accumulated).
    fn prefix_grad(&self) -> Option<&Tensor> {
        None
    }
}

/// The frozen model alone.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// How a forward uses a KV cache.
#[derive(Clone, Copy)]
pub enum Cached<'a> {
    /// Append the forward's rows after the cache's `len` rows.
    Fill(&'a KvCache),
    /// One token at the position in the cache's `pos` buffer, read when the
    /// plan runs: recorded once per cache, replayed for every token (the
    /// caller writes `pos` and the token's RoPE rows or position id).
    Decode(&'a KvCache),
}

/// A model on the GPU.
pub struct Model {
    pub cfg: ModelConfig,
    /// Token embeddings (V, C), gathered by id ([`Model::embed`]); the same
    /// matrix as a tied LM head's.
    pub wte: Store,
    /// The precision frozen weights were uploaded in.
    pub weights_mode: WeightsMode,
    /// GPT-2's learned positions (max_positions, C).
    pub wpe: Option<Tensor>,
    pub blocks: Vec<Block>,
    pub ln_f: Norm,
    pub lm_head: Linear,
    /// RoPE tables (max_positions, head_dim / 2), llama family only.
    pub rope: Option<(Tensor, Tensor)>,
    /// The sliding-window layers' RoPE tables when they differ (Gemma 3).
    pub rope_local: Option<(Tensor, Tensor)>,
    /// Parameters in the checkpoint (tied matrices counted once).
    pub params: usize,
    /// Identifies the weights (shape and sampled embedding values), so that
    /// an adapter or checkpoint made on another base model is caught.
    pub fingerprint: u64,
}

/// FNV-1a over the model's dimensions and up to 4096 evenly spaced
/// embedding values: cheap, and different for any two checkpoints that are
/// not copies of each other (fine-tunes of one base included).
pub fn weights_fingerprint(cfg: &ModelConfig, wte: &[f32]) -> u64 {
    let mut h = crate::hash::FNV_OFFSET;
    let mut eat = |x: u64| h = crate::hash::fnv1a(h, &x.to_le_bytes());
    for d in [cfg.vocab, cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads] {
        eat(d as u64);
    }
    let stride = (wte.len() / 4096).max(1);
    for x in wte.iter().step_by(stride) {
        eat(x.to_bits() as u64);
    }
    h
}

/// The blocks' weights, read, decoded and uploaded on up to 4 threads: a
/// GGUF's blocks are re-encoded on the CPU (about a third of loading
/// SmolLM2-135M Q4_1), and each thread's uploads queue independently.
fn load_blocks(
    ctx: &Context,
    wts: &Weights,
    specs: &[BlockSpec],
    cfg: &ModelConfig,
    mode: WeightsMode,
) -> Result<Vec<Block>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    let per = specs.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let parts: Vec<_> = specs
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|b| Block::load(ctx, wts, b, cfg, mode))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut blocks = Vec::with_capacity(specs.len());
        for p in parts {
            blocks.extend(p.join().expect("a block-loading thread panicked")?);
        }
        Ok(blocks)
    })
}

impl Model {
    /// Load a Hugging Face model folder (config.json + safetensors, or a
    /// link to a GGUF), frozen weights as stored.
    pub fn load(ctx: &Context, dir: &Path) -> Result<Model> {
        Model::load_with(ctx, dir, WeightsMode::Stored)
    }

    /// [`Model::load`] with the frozen weights' precision chosen.
    pub fn load_with(ctx: &Context, dir: &Path, mode: WeightsMode) -> Result<Model> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let wts = Weights::open(dir)?;
        Model::from_weights_with(ctx, cfg, &wts, mode)
    }

    /// Upload `wts` for `cfg` (weights as stored), checking every shape
    /// against the config.
    pub fn from_weights(ctx: &Context, cfg: ModelConfig, wts: &Weights) -> Result<Model> {
        Model::from_weights_with(ctx, cfg, wts, WeightsMode::Stored)
    }

    /// [`Model::from_weights`] with the frozen weights' precision chosen.
    pub fn from_weights_with(
        ctx: &Context,
        cfg: ModelConfig,
        wts: &Weights,
        mode: WeightsMode,
    ) -> Result<Model> {
        if cfg.head_dim > MAX_HEAD_DIM || !cfg.head_dim.is_multiple_of(4) {
            return Err(Error::Config {
                path: "config.json".into(),
                message: format!(
                    "head_dim {} is not supported (needs a multiple of 4, at most {MAX_HEAD_DIM})",
                    cfg.head_dim
                ),
            });
        }
        let (c, v) = (cfg.hidden, cfg.vocab);
        let spec = ModelSpec::of(&cfg, wts);
        // Tied matrices are counted once: the table lists lm_head only untied.
        let params = spec
            .tensors()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let (emb_name, emb_shape) = &spec.wte;
        if emb_shape != &[v, c] {
            return Err(Error::invalid(
                "loading weights",
                format!("`{emb_name}` is not [{v}, {c}]"),
            ));
        }
        let emb = wts.matrix(emb_name, v, c, false)?;
        emb.check()?;
        let fingerprint = weights_fingerprint(&cfg, &emb.sample_f32(((v * c) / 4096).max(1)));
        let wte = Store::upload(ctx, &emb, mode, emb_name)?;
        drop(emb);
        let wpe = match &spec.wpe {
            Some((name, shape)) => Some(Tensor::from_f32(
                ctx,
                &wts.get_f32(name, shape)?,
                shape,
                name,
            )?),
            None => None,
        };
        let blocks = load_blocks(ctx, wts, &spec.blocks, &cfg, mode)?;
        let ln_f = Norm::load(ctx, wts, &spec.ln_f, cfg.norm_eps, cfg.norm_plus_one)?;
        // A checkpoint may carry lm_head.weight even when tied; the config decides.
        let lm_head = match &spec.lm_head {
            Some(s) => Linear::load(ctx, wts, s, mode)?,
            None => Linear::new(ctx, "lm_head", wte.clone(), None)?,
        };
        let half = cfg.head_dim / 2;
        let tables = |(cos, sin): (Vec<f32>, Vec<f32>), tag: &str| -> Result<(Tensor, Tensor)> {
            let shape = [cfg.max_positions, half];
            Ok((
                Tensor::from_f32(ctx, &cos, &shape, &format!("rope{tag}.cos"))?,
                Tensor::from_f32(ctx, &sin, &shape, &format!("rope{tag}.sin"))?,
            ))
        };
        let rope = if cfg.arch == Arch::Gpt2 {
            None
        } else {
            Some(tables(cfg.rope_tables(), "")?)
        };
        let rope_local = match cfg.rope_local_tables() {
            Some(t) => Some(tables(t, "_local")?),
            None => None,
        };
        Ok(Model {
            cfg,
            wte,
            weights_mode: mode,
            wpe,
            blocks,
            ln_f,
            lm_head,
            rope,
            rope_local,
            params,
            fingerprint,
        })
    }

    /// out (B, row_offset + T, C): rows `row_offset..` of each batch get the
    /// token embeddings of `ids` (B, T).
    pub fn embed(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        out: &Tensor,
        ids: &Tensor,
        row_offset: usize,
    ) -> Result<()> {
        let scale = self.cfg.embed_scale.unwrap_or(1.0);
        match &self.wte {
            Store::Packed(t) => matmul::matmul_gather(ctx, plan, out, ids, t, row_offset, scale),
            Store::Buffer(t) => {
                embedding::embedding_forward_scaled(ctx, plan, out, ids, t, row_offset, scale)
            }
        }
    }

    /// Bytes of GPU memory held by the frozen weights.
    pub fn weight_bytes(&self) -> u64 {
        let mut n = self.wte.bytes() + self.wpe.as_ref().map_or(0, |t| t.bytes());
        let tied = matches!((&self.wte, self.lm_head.store()), (Store::Packed(a), Store::Packed(b)) if Arc::ptr_eq(a, b));
        for b in &self.blocks {
            n += b.ln1.bytes() + b.ln2.bytes();
            n += b.extra_norms().map(|x| x.bytes()).sum::<u64>();
            n += b.linears().iter().map(|l| l.bytes()).sum::<u64>();
        }
        n += self.ln_f.bytes() + if tied { 0 } else { self.lm_head.bytes() };
        for (c, s) in self.rope.iter().chain(&self.rope_local) {
            n += c.bytes() + s.bytes();
        }
        n
    }

    /// Every frozen linear layer, with its layer index.
    pub fn linears(&self) -> Vec<(usize, &Linear)> {
        self.blocks
            .iter()
            .enumerate()
            .flat_map(|(i, b)| b.linears().into_iter().map(move |l| (i, l)))
            .collect()
    }

    /// Check that a forward of `shape` stays within the model's positions.
    pub fn check_positions(&self, shape: FwdShape) -> Result<()> {
        let need = shape.p + shape.s();
        if need > self.cfg.max_positions {
            return Err(Error::invalid(
                "forward",
                format!(
                    "a sequence of {need} positions ({} prefix/cache + {} virtual + {} tokens) exceeds the model's {} (max_position_embeddings)",
                    shape.p, shape.n_virtual, shape.t, self.cfg.max_positions
                ),
            ));
        }
        Ok(())
    }

    /// Record the forward up to the final norm: `acts.lnf` holds the
    /// normalized hidden state of every row. `ids` (B, T) i32. With a cache,
    /// new K/V rows go to rows `cache.len..` and attention reads rows
    /// `0..cache.len + S` (the caller advances `cache.len` afterwards);
    /// `acts.shape.p` must equal `cache.len`. [`Cached::Decode`] instead
    /// records one token whose position is read when the plan runs.
    pub fn forward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        acts: &Acts,
        ids: &Tensor,
        hooks: &dyn Hooks,
        cache: Option<Cached>,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let sh = acts.shape;
        let (b, s, nv, p) = (sh.b, sh.s(), sh.n_virtual, sh.p);
        let c = cfg.hidden;
        self.check_positions(sh)?;
        if let Some(Cached::Decode(kc)) = cache {
            // RoPE rows come gathered at the position (PackBufs of 1 x 1).
            let rope_rows = acts.pack.is_some() || cfg.arch == Arch::Gpt2;
            if b != 1 || s != 1 || !rope_rows || kc.cap < 2 {
                return Err(Error::invalid(
                    "forward",
                    format!("a decode step is one token with gathered RoPE rows, got {sh:?}"),
                ));
            }
        }
        if let Some(Cached::Fill(kc)) = cache {
            if kc.len != p || b != 1 || p + s > kc.cap {
                return Err(Error::invalid(
                    "forward",
                    format!(
                        "KV cache of {} rows (cap {}) does not fit a forward of {sh:?}",
                        kc.len, kc.cap
                    ),
                ));
            }
        }
        let n = sh.rows();
        // With a cache the prefix is already in it (generate prepares once).
        if cache.is_none() {
            hooks.prepare(ctx, plan)?;
        }
        // Embeddings: virtual tokens, then the ids' rows.
        plan.push_group("embed");
        let emb = acts.emb.as_ref().unwrap_or(&acts.x0);
        if nv > 0 {
            let prompt = hooks
                .prompt()
                .ok_or_else(|| Error::invalid("forward", "virtual tokens without a prompt"))?;
            embedding::prompt_forward(ctx, plan, emb, prompt)?;
        }
        self.embed(ctx, plan, emb, ids, nv)?;
        if let (Some(wpe), Some(pid), Some(pe)) = (&self.wpe, &acts.pos_ids, &acts.pos_emb) {
            // Positions are fixed by the shape, and a plan is replayed only
            // for its own shape, so they are written once, here.
            pid.write_i32(ctx, &position_ids(sh))?;
            embedding::embedding_forward(ctx, plan, pe, pid, wpe, 0)?;
            residual(ctx, plan, &acts.x0, emb, pe)?;
        }
        plan.pop_group();
        // K/V rows in front: a cache's, or the adapter's prefix (unrotated).
        let front = match cache {
            Some(Cached::Fill(kc)) => Front::Cache(kc),
            Some(Cached::Decode(kc)) => Front::Decode(kc),
            None if p > 0 => Front::Prefix(hooks.prefix()),
            None => Front::None,
        };
        let nl = self.blocks.len();
        for l in 0..nl {
            plan.push_group(&format!("layer {l}"));
            // Each layer's last residual add also runs the norm that reads
            // its output: the next layer's ln1, or the final norm.
            let (norm, nacts) = match self.blocks.get(l + 1) {
                Some(nb) => (&nb.ln1, &acts.layers[l + 1].ln1),
                None => (&self.ln_f, &acts.lnf),
            };
            let out = acts.layer_output(l);
            let tail = Tail {
                out,
                norm,
                acts: nacts,
            };
            let (a, pack) = (&acts.layers[l], acts.pack.as_ref());
            self.layer_forward(ctx, plan, hooks, l, a, Some(tail), l > 0, sh, front, pack)?;
            plan.pop_group();
        }
        if nl == 0 {
            self.ln_f
                .forward(ctx, plan, &acts.lnf, &acts.x0.reshape(&[n, c])?)?;
        }
        Ok(())
    }

    /// Layer `l` from its input `a.resid`; the output residual goes to
    /// `tail` (backward's recompute passes none: the output is kept).
    /// `ln1_done`: the layer below's tail already wrote `a.ln1`.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        hooks: &dyn Hooks,
        l: usize,
        a: &LayerActs,
        tail: Option<Tail>,
        ln1_done: bool,
        sh: FwdShape,
        front: Front,
        pack: Option<&PackBufs>,
    ) -> Result<()> {
        let (cfg, blk) = (&self.cfg, &self.blocks[l]);
        let att2 = a.att.reshape(&[sh.rows(), cfg.heads * cfg.head_dim])?;
        let (ln1, qkv, o, ln2, mlp) = (&blk.ln1, &blk.qkv, &blk.o, &blk.ln2, &blk.mlp);
        if !ln1_done {
            ln1.forward(ctx, plan, &a.ln1, &a.resid)?;
        }
        let (q_out, k_out) = qk_outputs(a);
        qkv.forward(ctx, plan, hooks, l, a, q_out, k_out)?;
        blk.qk_norm_forward(ctx, plan, a)?;
        self.rope_forward(ctx, plan, l, &a.q, &a.k, sh, pack)?;
        let (k, v) = kv_forward(ctx, plan, cfg, l, a, sh, front)?;
        let mask = self.mask(l);
        if let Front::Decode(kc) = front {
            let (q, part) = (&a.q, &kc.part);
            attention_decode(ctx, plan, &a.att, &a.lse, part, q, &k, &v, &kc.pos, mask)?;
        } else {
            let segs = pack.map(|pk| &pk.starts);
            attention_forward_masked(ctx, plan, &a.att, &a.lse, &a.q, &k, &v, mask, segs)?;
        }
        o.forward_hooked(ctx, plan, hooks, l, &a.proj, &att2)?;
        let attn_out = post_norm_forward(ctx, plan, &blk.post_attn, &a.post_attn, &a.proj)?;
        ln2.forward_add(ctx, plan, &a.ln2, &a.resid_mid, &a.resid, attn_out)?;
        mlp.forward(ctx, plan, hooks, l, a, cfg.glu_act)?;
        let mlp_out = post_norm_forward(ctx, plan, &blk.post_mlp, &a.post_mlp, &a.mlp_out)?;
        if let Some(t) = tail {
            t.norm
                .forward_add(ctx, plan, t.acts, t.out, &a.resid_mid, mlp_out)?;
        }
        Ok(())
    }

    /// logits (R, V) for the rows of `acts.lnf` listed in `rows` (1, R) i32
    /// (flat row indices b * S + i); `gathered` (1, R, C) is scratch.
    pub fn logits_rows(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        logits: &Tensor,
        gathered: &Tensor,
        acts: &Acts,
        rows: &Tensor,
    ) -> Result<()> {
        let r = rows.shape()[1];
        embedding::embedding_forward(ctx, plan, gathered, rows, &acts.lnf.out, 0)?;
        self.lm_head
            .forward(ctx, plan, logits, &gathered.reshape(&[r, self.cfg.hidden])?)
    }

    /// Per-row losses (R) of `logits` (R, V) against `targets` (R) i32.
    pub fn losses(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        losses: &Tensor,
        logits: &Tensor,
        targets: &Tensor,
    ) -> Result<()> {
        loss::crossentropy_forward(ctx, plan, losses, logits, targets)
    }

    /// Per-row losses (R) of the LM head at the rows of `acts.lnf` listed in
    /// `rows` (1, R) i32 against `targets` (R) i32, with the logits computed
    /// `head.chunk_rows()` rows at a time in `head.logits`: full (R, V)
    /// logits never exist. With one chunk the logits stay there for
    /// [`Model::backward`].
    #[allow(clippy::too_many_arguments)]
    pub fn head_losses(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        losses: &Tensor,
        head: &HeadBufs,
        acts: &Acts,
        rows: &Tensor,
        targets: &Tensor,
    ) -> Result<()> {
        let chunks = self.head_chunks(head, rows, targets)?;
        embedding::embedding_forward(ctx, plan, &head.gathered, rows, &acts.lnf.out, 0)?;
        for &(r0, r1) in &chunks {
            let logits = self.chunk_logits(ctx, plan, head, r0, r1)?;
            loss::crossentropy_forward_at(ctx, plan, losses, &logits, targets, r0)?;
        }
        Ok(())
    }

    /// The row chunks of the head's R rows, after checking `head`'s shapes.
    fn head_chunks(
        &self,
        head: &HeadBufs,
        rows: &Tensor,
        targets: &Tensor,
    ) -> Result<Vec<(usize, usize)>> {
        let op = "head_losses";
        let (r, c, v) = (rows.numel(), self.cfg.hidden, self.cfg.vocab);
        expect_shape(op, rows, &[1, r])?;
        expect_shape(op, targets, &[r])?;
        expect_shape(op, &head.gathered, &[1, r, c])?;
        let rc = head.chunk_rows();
        if rc == 0 {
            return Err(Error::invalid(op, "a logits workspace of 0 rows"));
        }
        expect_shape(op, &head.logits, &[rc, v])?;
        Ok((0..r)
            .step_by(rc)
            .map(|r0| (r0, (r0 + rc).min(r)))
            .collect())
    }

    /// logits of rows `r0..r1` into the first rows of `head.logits`.
    fn chunk_logits(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        head: &HeadBufs,
        r0: usize,
        r1: usize,
    ) -> Result<Tensor> {
        let (n, c, v) = (r1 - r0, self.cfg.hidden, self.cfg.vocab);
        let g = &head.gathered;
        let hidden = g.view(r0 * c, &[n, c], &format!("{}[{r0}..{r1}]", g.label()))?;
        let logits = head.logits.view(0, &[n, v], head.logits.label())?;
        self.lm_head.forward(ctx, plan, &logits, &hidden)?;
        Ok(logits)
    }

    /// Lowest layer backward must reach for `hooks`, or `None` when the
    /// gradient must flow down to the embeddings (prompt tuning).
    pub fn backward_floor(&self, hooks: &dyn Hooks) -> Option<usize> {
        if hooks.prompt_grad().is_some() {
            return None;
        }
        if hooks.prefix_grad().is_some() {
            return Some(0);
        }
        let lowest = self
            .blocks
            .iter()
            .enumerate()
            .find(|(l, b)| b.linears().iter().any(|lin| hooks.adapts(*l, lin)))
            .map(|(l, _)| l);
        Some(lowest.unwrap_or(self.blocks.len()))
    }

    /// Record the backward of [`Model::forward`] + [`Model::head_losses`]:
    /// the forward list reversed. `dlosses` (R) holds each row's loss weight
    /// (1 / targets for a mean). The head's backward goes chunk by chunk: the
    /// logits' gradient is written over the chunk's logits (recomputed first
    /// when there are several chunks; one chunk's are still there from
    /// forward) and goes straight into the hidden-state gradient. Only
    /// adapter gradients are produced (through `hooks`); frozen weights get
    /// none, and activation gradients stop at the lowest layer an adapter
    /// needs.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        acts: &Acts,
        g: &Grads,
        head: &HeadBufs,
        rows: &Tensor,
        targets: &Tensor,
        dlosses: &Tensor,
        hooks: &dyn Hooks,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let sh = acts.shape;
        let (b, s, p) = (sh.b, sh.s(), sh.p);
        let (c, nh, hd) = (cfg.hidden, cfg.heads, cfg.head_dim);
        let n = sh.rows();
        let r = rows.numel();
        let chunks = self.head_chunks(head, rows, targets)?;
        let floor = self.backward_floor(hooks);
        if floor == Some(self.blocks.len()) {
            return Err(Error::invalid(
                "backward",
                "no trainable parameters: the adapter touches no layer",
            ));
        }
        plan.push_group("head backward");
        for t in &g.head {
            plan.clear(t);
        }
        let dg = g.dgathered.reshape(&[r, c])?;
        for &(r0, r1) in &chunks {
            let logits = if chunks.len() == 1 {
                head.logits
                    .view(0, &[r1 - r0, cfg.vocab], head.logits.label())?
            } else {
                self.chunk_logits(ctx, plan, head, r0, r1)?
            };
            loss::crossentropy_softmax_backward_inplace(ctx, plan, &logits, dlosses, targets, r0)?;
            let dgc = dg.view(r0 * c, &[r1 - r0, c], &format!("dgathered[{r0}..{r1}]"))?;
            // Known cost: where V / 4 fits a texture row, the matmul packs each
            // chunk's gradient into a texture of its own that the plan keeps
            // (a shared pack scratch in ops::matmul would bound that too).
            self.lm_head.backward_input(ctx, plan, &dgc, &logits)?;
        }
        scatter_rows(ctx, plan, &g.dlnf, rows, &dg)?;
        let last = if self.blocks.is_empty() {
            acts.x0.reshape(&[n, c])?
        } else {
            acts.resid_out.clone()
        };
        self.ln_f
            .backward(ctx, plan, &g.dresid, &g.dlnf, &last, &acts.lnf)?;
        plan.pop_group();
        let dprefix = hooks.prefix_grad();
        let front = if p > 0 {
            Front::Prefix(hooks.prefix())
        } else {
            Front::None
        };
        // A residual add's backward is `dresid` flowing on unchanged (each
        // branch's backward accumulates into it), so it has no line here.
        for (l, blk) in self.blocks.iter().enumerate().rev() {
            if floor.is_some_and(|f| l < f) {
                break;
            }
            // Whether the gradient must go on below this layer's input.
            let below = floor.is_none_or(|f| l > f);
            let a = &acts.layers[l];
            let att2 = a.att.reshape(&[n, nh * hd])?;
            let datt2 = g.datt.reshape(&[n, nh * hd])?;
            let (ln1, qkv, o, ln2, mlp) = (&blk.ln1, &blk.qkv, &blk.o, &blk.ln2, &blk.mlp);
            // Gradient checkpointing: refill the shared set from the kept
            // input (the top layer's is still there from forward).
            if acts.recompute && l + 1 < self.blocks.len() {
                plan.push_group(&format!("layer {l} recompute"));
                let pack = acts.pack.as_ref();
                self.layer_forward(ctx, plan, hooks, l, a, None, false, sh, front, pack)?;
                plan.pop_group();
            }
            plan.push_group(&format!("layer {l} backward"));
            for t in &g.layer {
                plan.clear(t);
            }
            let dmlp = post_norm_backward(
                ctx,
                plan,
                &blk.post_mlp,
                &a.post_mlp,
                &a.mlp_out,
                g.dmlp_out.as_ref(),
                &g.dresid,
            )?;
            mlp.backward(ctx, plan, hooks, l, a, g, dmlp, cfg.glu_act)?;
            ln2.backward(ctx, plan, &g.dresid, &g.dln2, &a.resid_mid, &a.ln2)?;
            let dproj = post_norm_backward(
                ctx,
                plan,
                &blk.post_attn,
                &a.post_attn,
                &a.proj,
                g.dproj.as_ref(),
                &g.dresid,
            )?;
            o.backward_hooked(ctx, plan, hooks, l, Some(&datt2), dproj, &att2)?;
            let segs = acts.pack.as_ref().map(|pk| &pk.starts);
            attention_backward_kv(ctx, plan, a, g, p, self.mask(l), segs)?;
            kv_backward(ctx, plan, cfg, l, g, sh, dprefix)?;
            // At the floor layer q/k/v's backward serves only their adapters.
            if below || qkv.all().iter().any(|x| hooks.adapts(l, x)) {
                self.rope_backward(ctx, plan, l, &g.dq, &g.dk, sh, acts.pack.as_ref())?;
                let (dq, dk) = blk.qk_norm_backward(ctx, plan, a, g)?;
                qkv.backward(ctx, plan, hooks, l, a, g, dq, dk, below.then_some(&g.dln1))?;
                if below {
                    ln1.backward(ctx, plan, &g.dresid, &g.dln1, &a.resid, &a.ln1)?;
                }
            }
            plan.pop_group();
        }
        if floor.is_none() {
            // dresid is now the gradient of x0 (GPT-2: of the token + prompt
            // embeddings too, since the positions are only added).
            if let Some(dprompt) = hooks.prompt_grad() {
                let dx0 = g.dresid.reshape(&[b, s, c])?;
                embedding::prompt_backward(ctx, plan, dprompt, &dx0)?;
            }
        }
        Ok(())
    }

    /// The RoPE tables of layer `l`.
    fn rope_of(&self, l: usize) -> Option<&(Tensor, Tensor)> {
        match (&self.rope_local, self.cfg.layer_types.get(l)) {
            (Some(t), Some(LayerAttn::Sliding)) => Some(t),
            _ => self.rope.as_ref(),
        }
    }

    /// The attention scale and window of layer `l`.
    pub fn mask(&self, l: usize) -> AttnMask {
        AttnMask {
            scale: self.cfg.attn_scale(),
            window: self.cfg.layer_window(l),
        }
    }

    /// Rotate q and k (B, S, *, HD) of layer `l` at positions P.. (llama
    /// family); packed rows at their own positions, from tables gathered
    /// per token (one table row per row of q and k).
    #[allow(clippy::too_many_arguments)]
    fn rope_forward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        l: usize,
        q: &Tensor,
        k: &Tensor,
        sh: FwdShape,
        pack: Option<&PackBufs>,
    ) -> Result<()> {
        if let Some(pk) = pack {
            if let Some((cos, sin)) = pk.rope_of(&self.cfg, l) {
                let (n, hd) = (sh.rows(), self.cfg.head_dim);
                for x in [q, k] {
                    let x = x.reshape(&[n, x.numel() / (n * hd), hd])?;
                    rope::rope_forward(ctx, plan, &x, cos, sin, 1, n, 0)?;
                }
            }
            return Ok(());
        }
        if let Some((cos, sin)) = self.rope_of(l) {
            rope::rope_forward(ctx, plan, q, cos, sin, sh.b, sh.s(), sh.p)?;
            rope::rope_forward(ctx, plan, k, cos, sin, sh.b, sh.s(), sh.p)?;
        }
        Ok(())
    }

    /// Backward of [`Model::rope_forward`], in place on dq and dk.
    #[allow(clippy::too_many_arguments)]
    fn rope_backward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        l: usize,
        dq: &Tensor,
        dk: &Tensor,
        sh: FwdShape,
        pack: Option<&PackBufs>,
    ) -> Result<()> {
        if let Some(pk) = pack {
            if let Some((cos, sin)) = pk.rope_of(&self.cfg, l) {
                let (n, hd) = (sh.rows(), self.cfg.head_dim);
                for x in [dq, dk] {
                    let x = x.reshape(&[n, x.numel() / (n * hd), hd])?;
                    rope::rope_backward(ctx, plan, &x, cos, sin, 1, n, 0)?;
                }
            }
            return Ok(());
        }
        if let Some((cos, sin)) = self.rope_of(l) {
            rope::rope_backward(ctx, plan, dq, cos, sin, sh.b, sh.s(), sh.p)?;
            rope::rope_backward(ctx, plan, dk, cos, sin, sh.b, sh.s(), sh.p)?;
        }
        Ok(())
    }
}

/// The steps of the schedule that differ between families: q/k/v ...
impl Qkv {
    /// q, k, v (B, S, *, HD) <- ln1 output into `q`, `k` and `a.v`; GPT-2
    /// splits its fused c_attn.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        hooks: &dyn Hooks,
        l: usize,
        a: &LayerActs,
        q: &Tensor,
        k: &Tensor,
    ) -> Result<()> {
        let [q2, k2, v2] = qkv_rows(a.q.shape()[..2].iter().product(), q, k, &a.v)?;
        match self {
            Qkv::Split { q, k, v } => {
                q.forward_hooked(ctx, plan, hooks, l, &q2, &a.ln1.out)?;
                k.forward_hooked(ctx, plan, hooks, l, &k2, &a.ln1.out)?;
                v.forward_hooked(ctx, plan, hooks, l, &v2, &a.ln1.out)?;
            }
            Qkv::Fused(lin) => {
                let qkv = a
                    .qkv
                    .as_ref()
                    .expect("invariant: Acts::new allocates qkv for GPT-2 (fused qkv)");
                lin.forward_hooked(ctx, plan, hooks, l, qkv, &a.ln1.out)?;
                let (n, c) = (q2.shape()[0], q2.shape()[1]);
                for (i, out) in [&q2, &k2, &v2].into_iter().enumerate() {
                    let third = Layout::rows(n, 3 * c, 0, i * c);
                    copy_rows(
                        ctx,
                        plan,
                        out,
                        Layout::dense(n, c),
                        qkv,
                        third,
                        overwrite(1, n, c),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Backward of [`Qkv::forward`]: `dq`, `dk` (the projections' output
    /// gradients) and dv into `dln1` (when given) and the adapters'
    /// gradients.
    #[allow(clippy::too_many_arguments)] // forward's operands plus grads
    fn backward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        hooks: &dyn Hooks,
        l: usize,
        a: &LayerActs,
        g: &Grads,
        dq: &Tensor,
        dk: &Tensor,
        dln1: Option<&Tensor>,
    ) -> Result<()> {
        let [dq2, dk2, dv2] = qkv_rows(a.q.shape()[..2].iter().product(), dq, dk, &g.dv)?;
        let ln1 = &a.ln1.out;
        match self {
            Qkv::Split { q, k, v } => {
                q.backward_hooked(ctx, plan, hooks, l, dln1, &dq2, ln1)?;
                k.backward_hooked(ctx, plan, hooks, l, dln1, &dk2, ln1)?;
                v.backward_hooked(ctx, plan, hooks, l, dln1, &dv2, ln1)?;
            }
            Qkv::Fused(lin) => {
                let dqkv = g
                    .dqkv
                    .as_ref()
                    .expect("invariant: Grads::new allocates dqkv for GPT-2 (fused qkv)");
                let (n, c) = (dq2.shape()[0], dq2.shape()[1]);
                for (i, src) in [&dq2, &dk2, &dv2].into_iter().enumerate() {
                    let third = Layout::rows(n, 3 * c, 0, i * c);
                    copy_rows(
                        ctx,
                        plan,
                        dqkv,
                        third,
                        src,
                        Layout::dense(n, c),
                        overwrite(1, n, c),
                    )?;
                }
                lin.backward_hooked(ctx, plan, hooks, l, dln1, dqkv, ln1)?;
            }
        }
        Ok(())
    }
}

/// ... and the MLP.
impl Mlp {
    /// mlp_out <- ln2 output: SwiGLU/GeGLU (gate, up, down) or GELU (fc,
    /// proj).
    fn forward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        hooks: &dyn Hooks,
        l: usize,
        a: &LayerActs,
        act: GluAct,
    ) -> Result<()> {
        let x = &a.ln2.out;
        match self {
            Mlp::SwiGlu { gate, up, down } => {
                let h2 = a
                    .h2
                    .as_ref()
                    .expect("invariant: Acts::new allocates h2 for every non-GPT-2 (SwiGLU) arch");
                gate.forward_hooked(ctx, plan, hooks, l, &a.h1, x)?;
                up.forward_hooked(ctx, plan, hooks, l, h2, x)?;
                let gelu = act == GluAct::GeluTanh;
                activation::glu_forward(ctx, plan, &a.act, &a.h1, h2, gelu)?;
                down.forward_hooked(ctx, plan, hooks, l, &a.mlp_out, &a.act)?;
            }
            Mlp::Gelu { fc, proj } => {
                fc.forward_hooked(ctx, plan, hooks, l, &a.h1, x)?;
                activation::gelu_forward(ctx, plan, &a.act, &a.h1)?;
                proj.forward_hooked(ctx, plan, hooks, l, &a.mlp_out, &a.act)?;
            }
        }
        Ok(())
    }

    /// Backward of [`Mlp::forward`]: `dy` (the MLP output's gradient) into
    /// `g.dln2`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        hooks: &dyn Hooks,
        l: usize,
        a: &LayerActs,
        g: &Grads,
        dy: &Tensor,
        act: GluAct,
    ) -> Result<()> {
        let (x, dx) = (&a.ln2.out, Some(&g.dln2));
        match self {
            Mlp::SwiGlu { gate, up, down } => {
                let h2 = a
                    .h2
                    .as_ref()
                    .expect("invariant: Acts::new allocates h2 for every non-GPT-2 (SwiGLU) arch");
                let dh2 = g.dh2.as_ref().expect(
                    "invariant: Grads::new allocates dh2 for every non-GPT-2 (SwiGLU) arch",
                );
                down.backward_hooked(ctx, plan, hooks, l, Some(&g.dact), dy, &a.act)?;
                let gelu = act == GluAct::GeluTanh;
                activation::glu_backward(ctx, plan, &g.dh1, dh2, &g.dact, &a.h1, h2, gelu)?;
                gate.backward_hooked(ctx, plan, hooks, l, dx, &g.dh1, x)?;
                up.backward_hooked(ctx, plan, hooks, l, dx, dh2, x)?;
            }
            Mlp::Gelu { fc, proj } => {
                proj.backward_hooked(ctx, plan, hooks, l, Some(&g.dact), dy, &a.act)?;
                activation::gelu_backward(ctx, plan, &g.dh1, &g.dact, &a.h1)?;
                fc.backward_hooked(ctx, plan, hooks, l, dx, &g.dh1, x)?;
            }
        }
        Ok(())
    }
}

/// Where the q and k projections write: before their per-head norms when
/// the model has them.
fn qk_outputs(a: &LayerActs) -> (&Tensor, &Tensor) {
    match (&a.q_pre, &a.k_pre) {
        (Some(q), Some(k)) => (q, k),
        _ => (&a.q, &a.k),
    }
}

/// ... the per-head q/k norms (qwen3, gemma3) ...
impl Block {
    /// q, k <- their per-head norms of q_pre, k_pre (rows of HD).
    fn qk_norm_forward(&self, ctx: &Context, plan: &mut Plan, a: &LayerActs) -> Result<()> {
        for (norm, pre, out, rstd) in self.qk_norms(a) {
            let hd = out.shape()[3];
            let rows = out.numel() / hd;
            let acts = NormActs {
                out: out.reshape(&[rows, hd])?,
                mean: None,
                rstd: rstd.clone(),
            };
            norm.forward(ctx, plan, &acts, &pre.reshape(&[rows, hd])?)?;
        }
        Ok(())
    }

    /// Backward of [`Block::qk_norm_forward`]: the gradients of the q and k
    /// projections' outputs (`g.dq`, `g.dk` themselves without norms).
    fn qk_norm_backward<'g>(
        &self,
        ctx: &Context,
        plan: &mut Plan,
        a: &LayerActs,
        g: &'g Grads,
    ) -> Result<(&'g Tensor, &'g Tensor)> {
        let (Some(dq_pre), Some(dk_pre)) = (&g.dq_pre, &g.dk_pre) else {
            return Ok((&g.dq, &g.dk));
        };
        for ((norm, pre, out, rstd), (dpre, dout)) in self
            .qk_norms(a)
            .into_iter()
            .zip([(dq_pre, &g.dq), (dk_pre, &g.dk)])
        {
            let hd = out.shape()[3];
            let rows = out.numel() / hd;
            let saved = NormActs {
                out: out.reshape(&[rows, hd])?,
                mean: None,
                rstd: rstd.clone(),
            };
            let flat = |t: &Tensor| t.reshape(&[rows, hd]);
            norm.backward(ctx, plan, &flat(dpre)?, &flat(dout)?, &flat(pre)?, &saved)?;
        }
        Ok((dq_pre, dk_pre))
    }

    /// (norm, input, output, rstd) of the q and k norms, when present.
    fn qk_norms<'a>(
        &'a self,
        a: &'a LayerActs,
    ) -> Vec<(&'a Norm, &'a Tensor, &'a Tensor, &'a Tensor)> {
        match (
            &self.q_norm,
            &self.k_norm,
            &a.q_pre,
            &a.k_pre,
            &a.q_rstd,
            &a.k_rstd,
        ) {
            (Some(qn), Some(kn), Some(qp), Some(kp), Some(qr), Some(kr)) => {
                vec![(qn, qp, &a.q, qr), (kn, kp, &a.k, kr)]
            }
            _ => Vec::new(),
        }
    }
}

/// ... and the norms after attention and the MLP (gemma3): what the residual
/// adds, `x` itself without a norm.
fn post_norm_forward<'a>(
    ctx: &Context,
    plan: &mut Plan,
    norm: &Option<Norm>,
    acts: &'a Option<NormActs>,
    x: &'a Tensor,
) -> Result<&'a Tensor> {
    match (norm, acts) {
        (Some(n), Some(acts)) => {
            n.forward(ctx, plan, acts, x)?;
            Ok(&acts.out)
        }
        _ => Ok(x),
    }
}

/// Backward of [`post_norm_forward`]: the gradient of `x` from `dout` (the
/// residual's), written into `dx` (cleared), or `dout` itself without a norm.
fn post_norm_backward<'a>(
    ctx: &Context,
    plan: &mut Plan,
    norm: &Option<Norm>,
    acts: &Option<NormActs>,
    x: &Tensor,
    dx: Option<&'a Tensor>,
    dout: &'a Tensor,
) -> Result<&'a Tensor> {
    match (norm, acts, dx) {
        (Some(n), Some(acts), Some(dx)) => {
            n.backward(ctx, plan, dx, dout, x, acts)?;
            Ok(dx)
        }
        _ => Ok(dout),
    }
}

/// Where a layer's output residual goes, and the norm that reads it next
/// (run in the same dispatch as the add).
#[derive(Clone, Copy)]
struct Tail<'a> {
    out: &'a Tensor,
    norm: &'a Norm,
    acts: &'a NormActs,
}

/// q, k, v (B, S, *, HD) as (B*S, *) matrices for the projections.
fn qkv_rows(n: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<[Tensor; 3]> {
    let rows = |t: &Tensor| t.reshape(&[n, t.numel() / n]);
    Ok([rows(q)?, rows(k)?, rows(v)?])
}

/// out = a + b, elementwise over whole buffers (any shapes of one size).
fn residual(ctx: &Context, plan: &mut Plan, out: &Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
    activation::residual_forward(ctx, plan, &flat(out)?, &flat(a)?, &flat(b)?)
}

fn flat(t: &Tensor) -> Result<Tensor> {
    t.reshape(&[t.numel()])
}
