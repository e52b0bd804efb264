//! Text generation with a KV cache: the prompt (after any virtual tokens or
//! prefix rows of an adapter) is run once, then one token per step, each
//! step reading only the last position's logits. A [`Session`] keeps the
//! cache between prompts (chat turns) and runs only what is not cached.
//!
//! Sampling follows transformers: the repetition penalty (also when
//! greedy), then temperature, top-k, top-p and min-p; [`StopText`] cuts the
//! decoded text at stop strings.

use crate::clock::Stopwatch;

use crate::error::{Error, Result};
use crate::gpu::ops::copy::{copy_rows, Layout};
use crate::gpu::{Context, DType, Plan, Tensor};
use crate::model::kv::{overwrite, prefix_layout};
use crate::model::packing::{PackBufs, PackTables};
use crate::model::tokenizer::{ChatMessage, Tokenizer};
use crate::model::transformer::{Acts, Cached, FwdShape, Hooks, KvCache, Model};
use crate::rng::Rng;

/// Sampling settings. `temperature == 0` is greedy decoding; the
/// repetition penalty applies to it too (a logits processor in
/// transformers), the other filters only to sampling (warpers).
#[derive(Clone, Debug)]
pub struct GenOptions {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// Stop after producing any of these ids (it is still reported).
    pub stop: Vec<u32>,
    /// Keep only the `top_k` most likely tokens (0: off).
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely (0: off).
    pub min_p: f32,
    /// transformers' repetition penalty over prompt and output (1: off).
    pub repetition_penalty: f32,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

/// What a generation did.
#[derive(Clone, Debug, Default)]
pub struct GenStats {
    pub prompt_tokens: usize,
    /// Prompt tokens actually run; the rest came from the KV cache.
    pub prefilled: usize,
    pub new_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub stopped_at_eos: bool,
    /// Stopped because the model's positions ran out before
    /// `max_new_tokens` new tokens.
    pub stopped_at_context: bool,
    /// Stopped because the caller's callback said so (a stop string).
    pub stopped_by_caller: bool,
}

impl GenStats {
    /// Decode speed, new tokens per second after the prefill.
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_s > 0.0 && self.new_tokens > 1 {
            (self.new_tokens - 1) as f64 / self.decode_s
        } else {
            0.0
        }
    }
}

/// What a token callback wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// First index of the largest logit (torch.argmax's tie rule).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each id in `seen`
/// (once, however often it occurs) has a positive logit divided by
/// `penalty` and a negative one multiplied by it.
pub fn repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = vec![false; logits.len()];
    for &id in seen {
        let i = id as usize;
        if i < logits.len() && !done[i] {
            done[i] = true;
            let x = logits[i];
            logits[i] = if x < 0.0 { x * penalty } else { x / penalty };
        }
    }
}

/// softmax in f64 (-inf entries get 0).
fn softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&x| (x as f64 - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// transformers' sampling warpers in its order (temperature, top-k, top-p,
/// min-p), each keeping at least one token; removed tokens get -inf.
pub fn warp_logits(logits: &mut [f32], opts: &GenOptions) {
    let n = logits.len();
    if opts.temperature > 0.0 && opts.temperature != 1.0 {
        logits.iter_mut().for_each(|x| *x /= opts.temperature);
    }
    if opts.top_k > 0 && opts.top_k < n {
        // Ties with the k-th value stay, as with torch's `scores < kth`.
        let mut sorted = logits.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[opts.top_k - 1];
        logits
            .iter_mut()
            .filter(|x| **x < kth)
            .for_each(|x| *x = f32::NEG_INFINITY);
    }
    if opts.top_p < 1.0 {
        // Ascending; among equal logits the lower index comes last (kept
        // first), matching argmax's tie rule.
        let p = softmax(logits);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)));
        let mut cum = 0.0;
        for &i in &order[..n.saturating_sub(1)] {
            cum += p[i];
            if cum <= 1.0 - opts.top_p as f64 {
                logits[i] = f32::NEG_INFINITY;
            }
        }
    }
    if opts.min_p > 0.0 {
        let p = softmax(logits);
        let top = p.iter().cloned().fold(0.0, f64::max);
        for (x, &pi) in logits.iter_mut().zip(&p) {
            if pi < opts.min_p as f64 * top {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// The logits a token is drawn from: repetition penalty over `seen`, then
/// (when sampling) the warpers. Removed tokens are -inf.
pub fn process_logits(logits: &[f32], seen: &[u32], opts: &GenOptions) -> Vec<f32> {
    let mut l = logits.to_vec();
    repetition_penalty(&mut l, seen, opts.repetition_penalty);
    if opts.temperature > 0.0 {
        warp_logits(&mut l, opts);
    }
    l
}

fn sample(logits: &[f32], seen: &[u32], opts: &GenOptions, rng: &mut Rng) -> u32 {
    let l = process_logits(logits, seen, opts);
    if opts.temperature <= 0.0 {
        return argmax(&l);
    }
    let probs = softmax(&l);
    let mut u = rng.uniform();
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            if u < p {
                return i as u32;
            }
            u -= p;
            last = i;
        }
    }
    last as u32
}

/// Cuts generated text at the first stop string. A tail that may begin
/// one is held back, so nothing from a stop string on is ever emitted.
#[derive(Clone, Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    pending: String,
}

impl StopText {
    /// Empty strings are ignored.
    pub fn new(stops: &[String]) -> StopText {
        StopText {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds text; returns what may be emitted now and whether a stop string
    /// was found (then nothing after it is kept).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        let hold = self
            .stops
            .iter()
            .map(|s| longest_partial(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out: String = self.pending.drain(..cut).collect();
        (out, false)
    }

    /// What was held back, at the end of generation.
    pub fn finish(self) -> String {
        self.pending
    }
}

/// The length of the longest proper prefix of `stop` that `text` ends with.
fn longest_partial(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .filter(|&k| stop.is_char_boundary(k))
        .find(|&k| text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

/// `messages` rendered with the model's chat template and a generation
/// prompt, and its ids: BOS is prepended when the tokenizer adds one and
/// the template did not write it.
pub fn chat_prompt_ids(tok: &Tokenizer, messages: &[ChatMessage]) -> Result<(String, Vec<u32>)> {
    let text = tok.render_chat(messages, true)?;
    let mut ids = tok.encode(&text, false)?;
    if let Some(bos) = tok
        .bos_id()
        .filter(|b| tok.adds_bos() && ids.first() != Some(b))
    {
        ids.insert(0, bos);
    }
    Ok((text, ids))
}

/// Run the model over the prompt, then produce up to `max_new_tokens`
/// tokens, calling `on_token` with each as soon as it is known.
pub fn generate(
    ctx: &Context,
    model: &Model,
    hooks: &dyn Hooks,
    prompt: &[u32],
    opts: &GenOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenStats> {
    generate_with_logits(ctx, model, hooks, prompt, opts, |tok, _| on_token(tok))
}

/// [`generate`], passing each token with the logits it was chosen from
/// (the KV-cached forward's last row).
pub fn generate_with_logits(
    ctx: &Context,
    model: &Model,
    hooks: &dyn Hooks,
    prompt: &[u32],
    opts: &GenOptions,
    mut on_token: impl FnMut(u32, &[f32]) -> Result<()>,
) -> Result<GenStats> {
    generate_until(ctx, model, hooks, prompt, opts, |tok, logits| {
        on_token(tok, logits).map(|()| Flow::Continue)
    })
}

/// [`generate_with_logits`] whose callback may stop the generation.
pub fn generate_until(
    ctx: &Context,
    model: &Model,
    hooks: &dyn Hooks,
    prompt: &[u32],
    opts: &GenOptions,
    on_token: impl FnMut(u32, &[f32]) -> Result<Flow>,
) -> Result<GenStats> {
    let cfg = &model.cfg;
    let nv = hooks.prompt().map_or(0, |p| p.shape()[0]);
    let np = hooks.prefix().map_or(0, |p| p.shape()[0]);
    let first = np + nv + prompt.len();
    if first > cfg.max_positions {
        return Err(Error::invalid(
            "generate",
            format!(
                "the prompt needs {first} positions ({} tokens + {} adapter rows); the model allows {}",
                prompt.len(),
                np + nv,
                cfg.max_positions
            ),
        ));
    }
    let cap = (first + opts.max_new_tokens).min(cfg.max_positions);
    let mut session = Session::new(ctx, model, hooks, cap)?;
    session.generate(prompt, opts, on_token)
}

/// A KV-cached decoding session. The cache keeps every token fed so far,
/// so a prompt that extends them (the next turn of a chat) runs only its
/// new tokens.
pub struct Session<'m> {
    ctx: &'m Context,
    model: &'m Model,
    hooks: &'m dyn Hooks,
    cache: KvCache,
    /// Prefix-tuning rows at the front of the cache (always there).
    np: usize,
    /// Prompt-tuning virtual tokens, in the cache after the first prefill.
    nv: usize,
    primed: bool,
    /// The token ids in the cache after the adapter rows.
    ids: Vec<u32>,
    /// The one-token step, recorded at the first token after a prefill.
    decoder: Option<Decoder>,
}

/// The one-token step recorded once per session (its cache capacity fixes
/// every shape): before each replay the token, its position and its RoPE
/// rows (or GPT-2 position id) are written, so a token costs one
/// submission and one readback of its logits row.
struct Decoder {
    plan: Plan,
    acts: Acts,
    ids: Tensor,
    logits: Tensor,
    tables: PackTables,
}

impl Decoder {
    fn new(ctx: &Context, model: &Model, hooks: &dyn Hooks, cache: &KvCache) -> Result<Decoder> {
        let cfg = &model.cfg;
        let one = FwdShape {
            b: 1,
            t: 1,
            n_virtual: 0,
            p: 0,
        };
        let mut acts = Acts::new(ctx, cfg, one, false, true)?;
        let tables = PackTables::new(cfg);
        acts.pack = Some(PackBufs::new(ctx, &tables, 1, 1)?);
        let ids = Tensor::zeros(ctx, &[1, 1], DType::I32, "decode.ids")?;
        let last = Tensor::from_i32(ctx, &[0], &[1, 1], "decode.last_row")?;
        let gathered = Tensor::zeros(ctx, &[1, 1, cfg.hidden], DType::F32, "decode.hidden")?;
        let logits = Tensor::zeros(ctx, &[1, cfg.vocab], DType::F32, "decode.logits")?;
        let t = Stopwatch::start();
        let mut plan = Plan::new("decode step");
        model.forward(
            ctx,
            &mut plan,
            &acts,
            &ids,
            hooks,
            Some(Cached::Decode(cache)),
        )?;
        model.logits_rows(ctx, &mut plan, &logits, &gathered, &acts, &last)?;
        log::debug!(
            "decode step recorded in {:.1} ms: {} dispatches",
            t.secs() * 1e3,
            plan.dispatches()
        );
        Ok(Decoder {
            plan,
            acts,
            ids,
            logits,
            tables,
        })
    }

    /// Run token `tok` at position `pos` (the cache rows before it).
    fn run(&self, ctx: &Context, cache: &KvCache, tok: u32, pos: usize) -> Result<Vec<f32>> {
        let t = Stopwatch::start();
        self.ids.write_i32(ctx, &[tok as i32])?;
        cache.pos.write_u32(ctx, &[pos as u32])?;
        if let Some(pk) = &self.acts.pack {
            pk.write(ctx, &self.tables, &[0], pos)?;
        }
        if let Some(pid) = &self.acts.pos_ids {
            pid.write_i32(ctx, &[pos as i32])?;
        }
        log_profile(ctx, &self.plan, "decode")?;
        self.plan.submit(ctx)?;
        let out = self.logits.read_f32(ctx)?;
        log::trace!("decode at {pos}: {:.1} ms", t.secs() * 1e3);
        Ok(out)
    }
}

impl<'m> Session<'m> {
    /// A session whose cache holds `cap` positions, adapter rows included.
    pub fn new(
        ctx: &'m Context,
        model: &'m Model,
        hooks: &'m dyn Hooks,
        cap: usize,
    ) -> Result<Session<'m>> {
        let cfg = &model.cfg;
        let nv = hooks.prompt().map_or(0, |p| p.shape()[0]);
        let np = hooks.prefix().map_or(0, |p| p.shape()[0]);
        if cap > cfg.max_positions || cap <= np + nv {
            return Err(Error::invalid(
                "generate",
                format!(
                    "a context of {cap} positions: it must hold the adapter's {} rows and more, \
                     and the model allows {}",
                    np + nv,
                    cfg.max_positions
                ),
            ));
        }
        let mut cache = KvCache::new(ctx, cfg, cap)?;
        let kvd = cfg.kv_dim();
        if let Some(pre) = hooks.prefix() {
            // The prefix's K/V rows go into the cache as they are (no rotation),
            // once computed (a projected prefix is produced by `prepare`).
            let mut plan = Plan::new("prefix->cache");
            hooks.prepare(ctx, &mut plan)?;
            let (front, block) = (Layout::dense(cap, kvd), overwrite(1, np, kvd));
            for l in 0..cfg.layers {
                for (j, dst) in [&cache.k[l], &cache.v[l]].into_iter().enumerate() {
                    let src = prefix_layout(cfg, l, j);
                    copy_rows(ctx, &mut plan, dst, front, pre, src, block)?;
                }
            }
            plan.run(ctx)?;
            cache.len = np;
        }
        Ok(Session {
            ctx,
            model,
            hooks,
            cache,
            np,
            nv,
            primed: false,
            ids: Vec::new(),
            decoder: None,
        })
    }

    /// Dispatches and floating-point operations of the recorded one-token
    /// step, once a token was decoded (for benchmarks).
    pub fn decode_step_cost(&self) -> Option<(usize, f64)> {
        self.decoder
            .as_ref()
            .map(|d| (d.plan.dispatches(), d.plan.flops()))
    }

    /// Positions the cache holds, adapter rows included.
    pub fn cap(&self) -> usize {
        self.cache.cap
    }

    /// Positions a prompt of `n` tokens needs, adapter rows included.
    pub fn positions_for(&self, n: usize) -> usize {
        self.np + self.nv + n
    }

    /// The token ids in the cache (after any adapter rows).
    pub fn tokens(&self) -> &[u32] {
        &self.ids
    }

    /// Forget every token (the adapter rows stay).
    pub fn reset(&mut self) {
        self.ids.clear();
        self.cache.len = self.front();
    }

    fn front(&self) -> usize {
        self.np + if self.primed { self.nv } else { 0 }
    }

    /// Run `prompt`, the whole sequence so far, reusing the longest prefix
    /// of it already in the cache; returns the last position's logits and
    /// how many tokens were run. Rows after the reused prefix are
    /// overwritten: attention is causal, so the kept rows stay exact.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<(Vec<f32>, usize)> {
        let cfg = &self.model.cfg;
        if prompt.is_empty() {
            return Err(Error::invalid("generate", "the prompt has no tokens"));
        }
        if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= cfg.vocab) {
            return Err(Error::invalid(
                "generate",
                format!("token id {bad} is outside the vocabulary ({})", cfg.vocab),
            ));
        }
        let need = self.positions_for(prompt.len());
        if need > self.cache.cap {
            return Err(Error::invalid(
                "generate",
                format!(
                    "the prompt needs {need} positions ({} tokens + {} adapter rows); the context \
                     holds {}",
                    prompt.len(),
                    self.np + self.nv,
                    self.cache.cap
                ),
            ));
        }
        let same = self
            .ids
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // The last token is always run: its logits pick the next one.
        let keep = same.min(prompt.len() - 1);
        self.ids.truncate(keep);
        self.cache.len = self.front() + keep;
        let new = &prompt[keep..];
        let ids: Vec<i32> = new.iter().map(|&x| x as i32).collect();
        let shape = FwdShape {
            b: 1,
            t: ids.len(),
            n_virtual: if self.primed { 0 } else { self.nv },
            p: self.cache.len,
        };
        let logits = step(
            self.ctx,
            self.model,
            self.hooks,
            &mut self.cache,
            shape,
            &ids,
        )?;
        self.primed = true;
        self.ids.extend_from_slice(new);
        Ok((logits, new.len()))
    }

    /// Run one token after the cached ones; returns its logits.
    fn feed(&mut self, tok: u32) -> Result<Vec<f32>> {
        let pos = self.cache.len;
        if pos >= self.cache.cap {
            return Err(Error::invalid(
                "generate",
                format!("the context of {} positions is full", self.cache.cap),
            ));
        }
        if self.decoder.is_none() {
            let d = Decoder::new(self.ctx, self.model, self.hooks, &self.cache)?;
            self.decoder = Some(d);
        }
        let dec = self
            .decoder
            .as_ref()
            .expect("invariant: the decoder was recorded just above");
        let logits = dec.run(self.ctx, &self.cache, tok, pos)?;
        self.cache.len += 1;
        self.ids.push(tok);
        Ok(logits)
    }

    /// Prefill `prompt` (see [`Session::prefill`]), then produce up to
    /// `max_new_tokens` tokens, calling `on_token` with each and the logits
    /// it was chosen from. The last token produced is not run, so it is not
    /// in the cache.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenOptions,
        mut on_token: impl FnMut(u32, &[f32]) -> Result<Flow>,
    ) -> Result<GenStats> {
        let mut stats = GenStats {
            prompt_tokens: prompt.len(),
            ..Default::default()
        };
        let t0 = Stopwatch::start();
        let (mut next, ran) = self.prefill(prompt)?;
        stats.prefilled = ran;
        stats.prefill_s = t0.secs();
        let t1 = Stopwatch::start();
        let mut rng = Rng::new(opts.seed);
        // What the repetition penalty sees: prompt and output.
        let mut seen = prompt.to_vec();
        loop {
            let tok = sample(&next, &seen, opts, &mut rng);
            seen.push(tok);
            stats.new_tokens += 1;
            let flow = on_token(tok, &next)?;
            if opts.stop.contains(&tok) {
                stats.stopped_at_eos = true;
                break;
            }
            if flow == Flow::Stop {
                stats.stopped_by_caller = true;
                break;
            }
            if stats.new_tokens >= opts.max_new_tokens {
                break;
            }
            if self.cache.len + 1 > self.cache.cap {
                stats.stopped_at_context = true;
                break;
            }
            next = self.feed(tok)?;
        }
        stats.decode_s = t1.secs();
        Ok(stats)
    }
}

/// With `WGTUNE_PROFILE=1`, log the slowest kinds of `plan`'s steps, each
/// run alone (it runs the plan's work once more: diagnostics only).
fn log_profile(ctx: &Context, plan: &Plan, what: &str) -> Result<()> {
    if std::env::var("WGTUNE_PROFILE").is_ok_and(|v| v == "1") {
        let prof = plan.profile(ctx)?;
        for (name, secs, n) in prof.kinds.iter().take(8) {
            log::info!(
                "profile {what} ({}): {name} {n}x {:.1} ms",
                prof.how(),
                secs * 1e3
            );
        }
    }
    Ok(())
}

/// One cached forward over `ids`; returns the last row's logits.
fn step(
    ctx: &Context,
    model: &Model,
    hooks: &dyn Hooks,
    cache: &mut KvCache,
    shape: FwdShape,
    ids: &[i32],
) -> Result<Vec<f32>> {
    let cfg = &model.cfg;
    let acts = &Acts::new(ctx, cfg, shape, false, true)?;
    let idt = Tensor::from_i32(ctx, ids, &[1, ids.len()], "ids")?;
    let last = Tensor::from_i32(ctx, &[(shape.s() - 1) as i32], &[1, 1], "last_row")?;
    let gathered = Tensor::zeros(ctx, &[1, 1, cfg.hidden], DType::F32, "last_hidden")?;
    let logits = Tensor::zeros(ctx, &[1, cfg.vocab], DType::F32, "logits")?;
    let mut t = Stopwatch::start();
    let mut plan = Plan::new("generate step");
    model.forward(ctx, &mut plan, acts, &idt, hooks, Some(Cached::Fill(cache)))?;
    model.logits_rows(ctx, &mut plan, &logits, &gathered, acts, &last)?;
    log_profile(ctx, &plan, &format!("{shape:?}"))?;
    let record_s = t.lap();
    plan.submit(ctx)?;
    cache.len += shape.s();
    let out = logits.read_f32(ctx)?;
    log::debug!(
        "step {shape:?}: record {:.1} ms, run {:.1} ms, {} dispatches",
        record_s * 1e3,
        t.secs() * 1e3,
        plan.dispatches()
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_follows_temperature_and_top_p() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let greedy = GenOptions::default();
        let mut rng = Rng::new(1);
        assert_eq!(
            sample(&logits, &[], &greedy, &mut rng),
            1,
            "first of the tied maxima"
        );
        // top_p so small that only the most likely token survives.
        let narrow = GenOptions {
            temperature: 1.0,
            top_p: 0.01,
            ..Default::default()
        };
        assert!((0..50).all(|_| sample(&logits, &[], &narrow, &mut rng) == 1));
        // Plain sampling: frequencies follow softmax(logits).
        let t1 = GenOptions {
            temperature: 1.0,
            ..Default::default()
        };
        let mut counts = [0usize; 4];
        for _ in 0..20000 {
            counts[sample(&logits, &[], &t1, &mut rng) as usize] += 1;
        }
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        for (i, &c) in counts.iter().enumerate() {
            let p = (logits[i] as f64).exp() / z;
            assert!(
                (c as f64 / 20000.0 - p).abs() < 0.02,
                "token {i}: {c} draws, p = {p:.3}"
            );
        }
        // The same seed gives the same draws.
        let draw = |seed| {
            let mut r = Rng::new(seed);
            (0..20)
                .map(|_| sample(&logits, &[], &t1, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
    }

    #[test]
    fn filters_match_transformers_logits_processors() {
        // tests/reference/sampling_generate.py: transformers' processors on
        // one logits vector.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/reference/data/sampling.json"
        );
        let text = std::fs::read_to_string(path).expect("tests/reference/data/sampling.json");
        let r: serde_json::Value = serde_json::from_str(&text).unwrap();
        let f32s = |v: &serde_json::Value| -> Vec<f32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().map_or(f32::NEG_INFINITY, |x| x as f32))
                .collect()
        };
        let logits = f32s(&r["logits"]);
        let seen: Vec<u32> = r["seen"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let cases = r["cases"].as_array().unwrap();
        assert!(cases.len() >= 8);
        for case in cases {
            let o = &case["options"];
            let get = |k: &str, d: f64| o.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
            let opts = GenOptions {
                temperature: get("temperature", 1.0) as f32,
                top_k: get("top_k", 0.0) as usize,
                top_p: get("top_p", 1.0) as f32,
                min_p: get("min_p", 0.0) as f32,
                repetition_penalty: get("repetition_penalty", 1.0) as f32,
                ..Default::default()
            };
            let got = process_logits(&logits, &seen, &opts);
            let want = f32s(&case["scores"]);
            let mut maxdiff = 0f32;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.is_finite(), w.is_finite(), "{o}: token {i}: {g} vs {w}");
                if w.is_finite() {
                    maxdiff = maxdiff.max((g - w).abs());
                }
            }
            let probs = softmax(&got);
            let pd = probs
                .iter()
                .zip(case["probs"].as_array().unwrap())
                .map(|(g, w)| (g - w.as_f64().unwrap()).abs())
                .fold(0.0, f64::max);
            eprintln!("{o}: maxdiff logits {maxdiff:.2e}, probs {pd:.2e}");
            assert!(maxdiff < 1e-5 && pd < 1e-6, "{o}: {got:?} vs {want:?}");
        }
    }

    #[test]
    fn greedy_applies_the_repetition_penalty_only() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let opts = GenOptions {
            repetition_penalty: 2.0,
            top_k: 1,
            ..Default::default()
        };
        let mut rng = Rng::new(1);
        // 3.0 / 2 = 1.5 < 2.0; top_k is a sampling filter and is ignored.
        assert_eq!(sample(&logits, &[1, 1], &opts, &mut rng), 2);
        assert_eq!(process_logits(&logits, &[3], &opts)[3], -2.0);
    }

    #[test]
    fn stop_strings_cut_the_text_and_hold_back_partial_matches() {
        let mut s = StopText::new(&["\n\nUser:".to_string(), "###".to_string()]);
        assert_eq!(s.push("Hello"), ("Hello".to_string(), false));
        // "\n" may begin a stop string: held back.
        assert_eq!(s.push(" there\n"), (" there".to_string(), false));
        assert_eq!(s.push("\nUs"), (String::new(), false));
        assert_eq!(s.push("er: more"), (String::new(), true));
        // A stop string inside one piece: the text before it comes out.
        let mut s = StopText::new(&["###".to_string()]);
        assert_eq!(s.push("a#b##"), ("a#b".to_string(), false));
        assert_eq!(s.push("x"), ("##x".to_string(), false));
        assert_eq!(s.push("y ### z"), ("y ".to_string(), true));
        // What was held back comes out at the end; no stops, nothing held.
        let mut s = StopText::new(&["éé".to_string()]);
        assert_eq!(s.push("caf\u{e9}"), ("caf".to_string(), false));
        assert_eq!(s.finish(), "\u{e9}");
        let mut s = StopText::new(&[String::new()]);
        assert_eq!(s.push("a\n"), ("a\n".to_string(), false));
    }
}
