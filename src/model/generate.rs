//! Text generation with a KV cache: the prompt (after any virtual tokens or
//! prefix rows of an adapter) is run once, then one token per step, each
//! step reading only the last position's logits.

use crate::clock::Stopwatch;

use crate::error::{Error, Result};
use crate::gpu::ops::copy::{copy_rows, Layout};
use crate::gpu::{Context, DType, Plan, Tensor};
use crate::model::kv::{overwrite, prefix_layout};
use crate::model::transformer::{Acts, FwdShape, Hooks, KvCache, Model};
use crate::rng::Rng;

/// Sampling settings. `temperature == 0` is greedy decoding.
#[derive(Clone, Debug)]
pub struct GenOptions {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// Stop after producing any of these ids (it is still reported).
    pub stop: Vec<u32>,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

/// What a generation did.
#[derive(Clone, Debug, Default)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub stopped_at_eos: bool,
    /// Stopped because the model's positions ran out before
    /// `max_new_tokens` new tokens.
    pub stopped_at_context: bool,
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

fn sample(logits: &[f32], opts: &GenOptions, rng: &mut Rng) -> u32 {
    if opts.temperature <= 0.0 {
        return argmax(logits);
    }
    let t = opts.temperature as f64;
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i, ((x as f64 - m) / t).exp()))
        .collect();
    let z: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= z);
    if opts.top_p < 1.0 {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p.1;
            if cum >= opts.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let z: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= z);
    }
    let mut u = rng.uniform();
    for &(i, p) in &probs {
        if u < p {
            return i as u32;
        }
        u -= p;
    }
    probs.last().map_or(0, |p| p.0 as u32)
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
    let cfg = &model.cfg;
    if prompt.is_empty() {
        return Err(Error::invalid("generate", "the prompt has no tokens"));
    }
    if let Some(&bad) = prompt.iter().find(|&&id| id as usize >= cfg.vocab) {
        return Err(Error::invalid(
            "generate",
            format!("token id {bad} is outside the vocabulary ({})", cfg.vocab),
        ));
    }
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
    let mut rng = Rng::new(opts.seed);
    let mut stats = GenStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let t0 = Stopwatch::start();
    let ids: Vec<i32> = prompt.iter().map(|&x| x as i32).collect();
    let shape = FwdShape {
        b: 1,
        t: ids.len(),
        n_virtual: nv,
        p: cache.len,
    };
    let mut next = step(ctx, model, hooks, &mut cache, shape, &ids, None)?;
    stats.prefill_s = t0.secs();
    let t1 = Stopwatch::start();
    let one = FwdShape {
        b: 1,
        t: 1,
        n_virtual: 0,
        p: 0,
    };
    let decode_acts = Acts::new(ctx, cfg, one, false, true)?;
    let mut produced = 0;
    loop {
        let tok = sample(&next, opts, &mut rng);
        produced += 1;
        stats.new_tokens = produced;
        on_token(tok, &next)?;
        if opts.stop.contains(&tok) {
            stats.stopped_at_eos = true;
            break;
        }
        if produced >= opts.max_new_tokens {
            break;
        }
        if cache.len + 1 > cap {
            stats.stopped_at_context = true;
            break;
        }
        let shape = FwdShape {
            p: cache.len,
            ..one
        };
        next = step(
            ctx,
            model,
            hooks,
            &mut cache,
            shape,
            &[tok as i32],
            Some(&decode_acts),
        )?;
    }
    stats.decode_s = t1.secs();
    Ok(stats)
}

/// One cached forward over `ids`; returns the last row's logits.
fn step(
    ctx: &Context,
    model: &Model,
    hooks: &dyn Hooks,
    cache: &mut KvCache,
    shape: FwdShape,
    ids: &[i32],
    acts: Option<&Acts>,
) -> Result<Vec<f32>> {
    let cfg = &model.cfg;
    let owned;
    let acts = match acts {
        Some(a) => {
            // Decode buffers do not depend on the cache length.
            owned = Acts { shape, ..a.clone() };
            &owned
        }
        None => {
            owned = Acts::new(ctx, cfg, shape, false, true)?;
            &owned
        }
    };
    let idt = Tensor::from_i32(ctx, ids, &[1, ids.len()], "ids")?;
    let last = Tensor::from_i32(ctx, &[(shape.s() - 1) as i32], &[1, 1], "last_row")?;
    let gathered = Tensor::zeros(ctx, &[1, 1, cfg.hidden], DType::F32, "last_hidden")?;
    let logits = Tensor::zeros(ctx, &[1, cfg.vocab], DType::F32, "logits")?;
    let mut t = Stopwatch::start();
    let mut plan = Plan::new("generate step");
    model.forward(ctx, &mut plan, acts, &idt, hooks, Some(cache))?;
    model.logits_rows(ctx, &mut plan, &logits, &gathered, acts, &last)?;
    if std::env::var("WGTUNE_PROFILE").is_ok_and(|v| v == "1") {
        for (name, secs, n) in plan.profile(ctx)?.iter().take(8) {
            log::info!("profile {shape:?}: {name} {n}x {:.1} ms", secs * 1e3);
        }
    }
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
            sample(&logits, &greedy, &mut rng),
            1,
            "first of the tied maxima"
        );
        // top_p so small that only the most likely token survives.
        let narrow = GenOptions {
            temperature: 1.0,
            top_p: 0.01,
            ..Default::default()
        };
        assert!((0..50).all(|_| sample(&logits, &narrow, &mut rng) == 1));
        // Plain sampling: frequencies follow softmax(logits).
        let t1 = GenOptions {
            temperature: 1.0,
            ..Default::default()
        };
        let mut counts = [0usize; 4];
        for _ in 0..20000 {
            counts[sample(&logits, &t1, &mut rng) as usize] += 1;
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
                .map(|_| sample(&logits, &t1, &mut r))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
    }
}
