//! Tier 3 for wide vocabularies: tiny llama models with 151,936 (Qwen2.5's) and
//! 262,144 (Gemma 3's) tokens, hidden 64, 2 layers, tied. Their weights are a
//! formula (tests/reference/wide_vocab_generate.py) that this file computes
//! bit-identically, so nothing big is committed. For LoRA (q_proj, v_proj),
//! prompt tuning and prefix tuning (8 virtual tokens each), on a 4 x 128 batch
//! whose ids and targets reach the top of the vocabulary: the loss and every
//! adapter gradient of one backward, and 2 AdamW steps, against PEFT.

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use common::reference::{data_dir, json, Arrays};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use wgtune::adapters::peft_io::load_adapter;
use wgtune::adapters::Adapter;
use wgtune::gpu::Context;
use wgtune::model::weights::Weights;
use wgtune::model::{Model, ModelConfig};
use wgtune::train::data::Batch;
use wgtune::train::trainer::{OptimConfig, Schedule, Trainer};

const CASES: &[&str] = &["lora", "prompt", "prefix"];

/// murmur3's 32-bit finalizer.
fn fmix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x85EB_CA6B);
    x ^= x >> 13;
    x = x.wrapping_mul(0xC2B2_AE35);
    x ^= x >> 16;
    x
}

fn fnv1a32(name: &str) -> u32 {
    name.bytes()
        .fold(0x811C_9DC5, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193))
}

/// Element `i` of a tensor: `u = f32(h >> 8) * 2^-24 - 0.5` with
/// `h = fmix32(fmix32(i) ^ seed)`, then `u * scale` (+ offset). One rounding
/// (the product; with an offset, also the sum), as in numpy's float32.
fn formula(seed: u32, n: usize, scale: f32, offset: f32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let h = fmix32(fmix32(i) ^ seed);
            let w = ((h >> 8) as f32 * (1.0 / 16_777_216.0) - 0.5) * scale;
            if offset != 0.0 {
                offset + w
            } else {
                w
            }
        })
        .collect()
}

/// Every weight of data/wide_vocab/<model> from weights.json's formula, each
/// checked against numpy's checksum of its bit patterns: (name, shape, values).
fn wide_weights(model: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let table = json(&format!("wide_vocab/{model}/weights.json"));
    let mut out = Vec::new();
    for (name, t) in table["tensors"].as_object().unwrap() {
        let shape: Vec<usize> = (t["shape"].as_array().unwrap().iter())
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let seed = t["seed"].as_u64().unwrap() as u32;
        assert_eq!(seed, fnv1a32(name), "{name}");
        let w = formula(
            seed,
            shape.iter().product(),
            t["scale"].as_f64().unwrap() as f32,
            t["offset"].as_f64().unwrap() as f32,
        );
        let sum = (w.iter()).fold(0u64, |a, x| a.wrapping_add(x.to_bits() as u64));
        assert_eq!(
            sum,
            t["checksum"].as_u64().unwrap(),
            "{model} {name}: the formula differs from numpy's"
        );
        let first: Vec<u32> = (t["first"].as_array().unwrap().iter())
            .map(|x| (x.as_f64().unwrap() as f32).to_bits())
            .collect();
        let got: Vec<u32> = w[..first.len()].iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, first, "{model} {name}");
        out.push((name.clone(), shape, w));
    }
    out
}

/// The model of data/wide_vocab/<model>: its config.json and [`wide_weights`],
/// serialized as one in-memory model.safetensors.
fn wide_model(ctx: &Context, model: &str) -> Model {
    let cfg_path = data_dir(&format!("wide_vocab/{model}/config.json"));
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let cfg = ModelConfig::from_json(&text, &cfg_path).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = (wide_weights(model).into_iter())
        .map(|(n, s, w)| (n, s, w.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = (tensors.iter()).map(|(n, s, b)| {
        (
            n.as_str(),
            TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
        )
    });
    let st = safetensors::serialize(views, None).unwrap();
    drop(tensors);
    let wts = Weights::from_bytes(vec![(format!("{model}/model.safetensors"), st)]).unwrap();
    Model::from_weights(ctx, cfg, &wts).unwrap()
}

fn step_batch(rel: &str) -> Batch {
    common::reference::peft_batch(rel)
}

fn opt(lr: f64, weight_decay: f64, max_grad_norm: f64, total_steps: usize) -> OptimConfig {
    OptimConfig {
        lr,
        weight_decay,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        max_grad_norm,
        schedule: Schedule::Constant,
        warmup_steps: 0,
        total_steps,
    }
}

/// Loss (rel 1e-4) and every gradient (max |diff| <= 1e-3 max |ref|) of one
/// backward, then 2 AdamW steps (loss within 1e-3, gradient norm within 1e-3
/// relative), as tests/train_parity.rs checks the tiny models.
fn check_case(ctx: &Context, m: &Model, model: &str, case: &str) {
    let rel = format!("wide_vocab/{model}/peft/{case}");
    let loaded = load_adapter(&data_dir(&format!("{rel}/initial"))).unwrap();
    let (cfg, tensors) = (loaded.config.clone(), loaded.sorted_tensors());
    let batch = step_batch(&format!("{rel}/step.safetensors"));
    assert_eq!((batch.b, batch.t), (4, 128));
    assert!(batch.ids.iter().any(|&i| i as usize == m.cfg.vocab - 1));
    let step = json(&format!("{rel}/step.json"));

    let t0 = std::time::Instant::now();
    let adapter = Adapter::new(ctx, m, cfg.clone(), tensors.clone()).unwrap();
    let mut tr = Trainer::new(ctx, m, &adapter, opt(0.0, 0.0, 0.0, 1)).unwrap();
    let loss = tr.gradients(&batch).unwrap();
    let want = step["loss"].as_f64().unwrap();
    let grads = adapter.flat.read(ctx, &adapter.flat.grads).unwrap();
    let refs = Arrays::open(&format!("{rel}/step.safetensors"));
    let mut worst = 0f64;
    let mut report = Vec::new();
    for (name, _, g) in &grads {
        let ref_name = if name == "prompt_embeddings" {
            "prompt_encoder.embedding.weight.grad".to_string()
        } else {
            format!("{name}.grad")
        };
        let want_g = refs.f32(&ref_name);
        assert_eq!(g.len(), want_g.len(), "{model}/{case} {name}");
        let scale = want_g.iter().fold(0f64, |a, &x| a.max((x as f64).abs()));
        let diff = g
            .iter()
            .zip(&want_g)
            .fold(0f64, |a, (&x, &y)| a.max((x as f64 - y as f64).abs()));
        let r = diff / scale.max(1e-12);
        worst = worst.max(r);
        report.push(format!("{name} {r:.2e} (max |ref| {scale:.2e})"));
    }
    eprintln!(
        "{model}/{case}: loss {loss:.6} vs PEFT {want:.6} (rel {:.1e}); {} gradients, worst rel err {worst:.2e} [{}] ({:.1} s)",
        (loss - want).abs() / want,
        grads.len(),
        report.join(", "),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        (loss - want).abs() <= 1e-4 * want.abs(),
        "{model}/{case}: loss {loss} vs PEFT {want}"
    );
    assert!(
        worst <= 1e-3,
        "{model}/{case}: gradient rel err {worst:.2e} > 1e-3: {}",
        report.join(", ")
    );

    let train = json(&format!("{rel}/train.json"));
    let f = |k: &str| train[k].as_f64().unwrap();
    let list = |k: &str| -> Vec<f64> {
        (train[k].as_array().unwrap().iter())
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    // Two of PEFT's three steps: step 1's loss and gradient norm follow the
    // first AdamW update (with clipping); more would only add run time.
    let (mut want, mut want_norm) = (list("loss_before_step"), list("grad_norm_before_clip"));
    want.truncate(2);
    want_norm.truncate(2);
    let adapter = Adapter::new(ctx, m, cfg, tensors).unwrap();
    let o = opt(f("lr"), f("weight_decay"), f("clip_grad_norm"), want.len());
    let mut tr = Trainer::new(ctx, m, &adapter, o).unwrap();
    for (i, (&w, &wn)) in want.iter().zip(&want_norm).enumerate() {
        let st = (tr.train_step(std::slice::from_ref(&batch), true))
            .unwrap()
            .unwrap();
        eprintln!(
            "{model}/{case}: step {i} loss {:.6} (PEFT {w:.6}), grad norm {:.6} (PEFT {wn:.6})",
            st.loss, st.grad_norm
        );
        assert!(
            (st.loss - w).abs() <= 1e-3,
            "{model}/{case}: step {i} loss {} vs PEFT {w}",
            st.loss
        );
        assert!(
            (st.grad_norm - wn).abs() <= 1e-3 * wn.max(1.0),
            "{model}/{case}: step {i} grad norm {} vs PEFT {wn}",
            st.grad_norm
        );
    }
    eprintln!("{model}/{case}: {:.1} s in all", t0.elapsed().as_secs_f64());
}

fn run_model(model: &str, vocab: usize) {
    let ctx = gpu!();
    let t0 = std::time::Instant::now();
    let m = wide_model(ctx, model);
    assert_eq!(m.cfg.vocab, vocab);
    eprintln!("{model}: built in {:.1} s", t0.elapsed().as_secs_f64());
    for case in CASES {
        check_case(ctx, &m, model, case);
    }
}

#[test]
fn vocab_151936_adapters_match_peft() {
    run_model("wide-151936", 151_936);
}

#[test]
fn vocab_262144_adapters_match_peft() {
    run_model("wide-262144", 262_144);
}

/// The formula without a GPU: every tensor of both models equals numpy's,
/// bit for bit (checksum of the bit patterns and the first values).
#[test]
fn weight_formula_matches_numpy() {
    for (model, vocab) in [("wide-151936", 151_936), ("wide-262144", 262_144)] {
        let w = wide_weights(model);
        let emb = w.iter().find(|(n, ..)| n == "model.embed_tokens.weight");
        assert_eq!(emb.unwrap().1, [vocab, 64]);
        assert_eq!(
            w.len(),
            2 * 9 + 2,
            "{model}: embedding, 9 per layer, final norm"
        );
    }
}
