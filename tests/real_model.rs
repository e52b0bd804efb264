//! Real-model checks, outside CI (ignored by default): wgtune against
//! transformers on a Hugging Face folder such as the SmolLM2-135M-Instruct
//! conversion of tests/reference/get-smollm2.sh (see docs/reference-data.md).
//!
//!   DIR=$(tests/reference/get-smollm2.sh | tail -n 1)
//!   ~/.cache/wgtune-ref/venv/bin/python tests/real/smollm2_reference.py \
//!     $DIR target/smollm2-ref.safetensors
//!   WGTUNE_REAL_MODEL=$DIR WGTUNE_REAL_REF=target/smollm2-ref.safetensors \
//!     cargo test --release --test real_model -- --ignored --nocapture

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use std::path::PathBuf;

use safetensors::SafeTensors;
use wgtune::gpu::{DType, Plan, Tensor};
use wgtune::model::generate::{generate, GenOptions};
use wgtune::model::{Acts, FwdShape, Model, NoHooks};

fn arrays() -> Option<(PathBuf, Vec<u8>)> {
    let dir = std::env::var("WGTUNE_REAL_MODEL").ok()?;
    let refp = std::env::var("WGTUNE_REAL_REF").ok()?;
    Some((
        PathBuf::from(dir),
        std::fs::read(refp).expect("reference file"),
    ))
}

fn get_i32(st: &SafeTensors, n: &str) -> Vec<i32> {
    st.tensor(n)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}
fn get_f32(st: &SafeTensors, n: &str) -> Vec<f32> {
    st.tensor(n)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
#[ignore = "needs WGTUNE_REAL_MODEL and WGTUNE_REAL_REF"]
fn real_model_matches_transformers() {
    let ctx = gpu!();
    let Some((dir, bytes)) = arrays() else {
        panic!("set WGTUNE_REAL_MODEL and WGTUNE_REAL_REF");
    };
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t0 = std::time::Instant::now();
    let m = Model::load(ctx, &dir).unwrap();
    eprintln!(
        "loaded in {:.1} s, {} params",
        t0.elapsed().as_secs_f64(),
        m.params
    );
    let (c, v) = (m.cfg.hidden, m.cfg.vocab);
    let mut worst = 0f64;
    for i in 0.. {
        let name = format!("p{i}.ids");
        if st.tensor(&name).is_err() {
            break;
        }
        let ids = get_i32(&st, &name);
        let want = get_f32(&st, &format!("p{i}.logits"));
        let t = ids.len();
        let acts = Acts::new(
            ctx,
            &m.cfg,
            FwdShape {
                b: 1,
                t,
                n_virtual: 0,
                p: 0,
            },
            false,
            false,
        )
        .unwrap();
        let idt = Tensor::from_i32(ctx, &ids, &[1, t], "ids").unwrap();
        let rows: Vec<i32> = (0..t as i32).collect();
        let rows = Tensor::from_i32(ctx, &rows, &[1, t], "rows").unwrap();
        let g = Tensor::zeros(ctx, &[1, t, c], DType::F32, "g").unwrap();
        let logits = Tensor::zeros(ctx, &[t, v], DType::F32, "logits").unwrap();
        let mut plan = Plan::new("fwd");
        m.forward(ctx, &mut plan, &acts, &idt, &NoHooks, None)
            .unwrap();
        m.logits_rows(ctx, &mut plan, &logits, &g, &acts, &rows)
            .unwrap();
        plan.run(ctx).unwrap();
        let got = logits.read_f32(ctx).unwrap();
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .fold(0.0, f64::max);
        eprintln!("prompt {i}: {t} tokens, max |logits diff| {d:.3e}");
        worst = worst.max(d);
    }
    let ids: Vec<u32> = get_i32(&st, "chat.ids").iter().map(|&x| x as u32).collect();
    let want: Vec<u32> = get_i32(&st, "chat.greedy")
        .iter()
        .map(|&x| x as u32)
        .collect();
    let opts = GenOptions {
        max_new_tokens: want.len(),
        stop: vec![2],
        ..Default::default()
    };
    let mut got = Vec::new();
    let stats = generate(ctx, &m, &NoHooks, &ids, &opts, |t| {
        got.push(t);
        Ok(())
    })
    .unwrap();
    eprintln!(
        "greedy: {} new tokens, prefill {:.2} s, decode {:.2} tok/s",
        stats.new_tokens,
        stats.prefill_s,
        stats.decode_tokens_per_s()
    );
    assert_eq!(got, want[..got.len()], "greedy tokens");
    assert!(worst <= 1e-3, "logits differ by {worst}");
}

/// With prompt and prefix adapters on a real model, KV-cached greedy
/// generation equals a loop that reruns the full forward every step.
#[test]
#[ignore = "needs WGTUNE_REAL_MODEL"]
fn real_model_adapter_generation_equals_full_forward_loop() {
    use wgtune::adapters::init::{init_prefix, init_prompt, PrefixInit, PromptInit};
    use wgtune::adapters::peft_io::{AdapterConfig, PrefixConfig, PromptConfig};
    use wgtune::adapters::Adapter;
    use wgtune::model::Hooks;
    let ctx = gpu!();
    let dir = PathBuf::from(std::env::var("WGTUNE_REAL_MODEL").expect("WGTUNE_REAL_MODEL"));
    let m = Model::load(ctx, &dir).unwrap();
    let cfg = m.cfg.clone();
    let prompt: Vec<u32> = vec![1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47];
    let n = 8;
    let pc = PromptConfig {
        num_virtual_tokens: n,
        token_dim: cfg.hidden,
        num_attention_heads: cfg.heads,
        num_layers: cfg.layers,
        prompt_tuning_init: "SAMPLE_VOCAB".into(),
        prompt_tuning_init_text: None,
        tokenizer_name_or_path: None,
        base_model_name_or_path: None,
    };
    let xc = PrefixConfig {
        num_virtual_tokens: n,
        token_dim: cfg.kv_dim(),
        num_attention_heads: cfg.kv_heads,
        num_layers: cfg.layers,
        encoder_hidden_size: None,
        prefix_projection: false,
        base_model_name_or_path: None,
    };
    let adapters = vec![
        (
            "prompt",
            Adapter::new(
                ctx,
                &m,
                AdapterConfig::Prompt(pc.clone()),
                init_prompt(ctx, &m, &pc, &PromptInit::Vocab, 3).unwrap(),
            )
            .unwrap(),
        ),
        (
            "prefix",
            Adapter::new(
                ctx,
                &m,
                AdapterConfig::Prefix(xc.clone()),
                init_prefix(
                    ctx,
                    &m,
                    &xc,
                    &PrefixInit::Text(vec![504, 3458, 282, 260, 1978]),
                    3,
                )
                .unwrap(),
            )
            .unwrap(),
        ),
    ];
    for (name, ad) in &adapters {
        let steps = 10;
        let opts = GenOptions {
            max_new_tokens: steps,
            ..Default::default()
        };
        let mut cached = Vec::new();
        generate(ctx, &m, ad, &prompt, &opts, |t| {
            cached.push(t);
            Ok(())
        })
        .unwrap();
        // The reference: full forward over prompt + generated so far.
        let nv = ad.prompt().map_or(0, |t| t.shape()[0]);
        let p = ad.prefix().map_or(0, |t| t.shape()[0]);
        let mut seq = prompt.clone();
        let mut full = Vec::new();
        for _ in 0..steps {
            let t = seq.len();
            let shape = FwdShape {
                b: 1,
                t,
                n_virtual: nv,
                p,
            };
            let acts = Acts::new(ctx, &cfg, shape, false, false).unwrap();
            let ids: Vec<i32> = seq.iter().map(|&x| x as i32).collect();
            let idt = Tensor::from_i32(ctx, &ids, &[1, t], "ids").unwrap();
            let last = Tensor::from_i32(ctx, &[(nv + t - 1) as i32], &[1, 1], "last").unwrap();
            let g = Tensor::zeros(ctx, &[1, 1, cfg.hidden], DType::F32, "g").unwrap();
            let logits = Tensor::zeros(ctx, &[1, cfg.vocab], DType::F32, "logits").unwrap();
            let mut plan = Plan::new("full");
            m.forward(ctx, &mut plan, &acts, &idt, ad, None).unwrap();
            m.logits_rows(ctx, &mut plan, &logits, &g, &acts, &last)
                .unwrap();
            plan.run(ctx).unwrap();
            let tok = wgtune::model::generate::argmax(&logits.read_f32(ctx).unwrap());
            full.push(tok);
            seq.push(tok);
        }
        eprintln!("{name}: cached {cached:?}\n{name}: full   {full:?}");
        assert_eq!(
            cached, full,
            "{name}: cached generation differs from the full-forward loop"
        );
    }
}
