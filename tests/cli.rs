//! The `wgtune` binary end to end on the tiny test model: `wgtune --method
//! ...` (no subcommand) trains each method on the shipped sample data, the
//! loss falls, and the output folder holds a PEFT adapter, a checkpoint,
//! metrics.jsonl and a loss plot; `eval` and `generate` take the adapter;
//! bad input is a clear error and a non-zero exit, never a panic.

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::cli::root;

fn wgtune(args: &[&str]) -> (bool, String) {
    wgtune_env(args, &[])
}

fn wgtune_env(args: &[&str], env: &[(&str, &Path)]) -> (bool, String) {
    wgtune_at(None, args, env)
}

/// `wgtune args` run from the folder `dir`.
fn wgtune_in(dir: &Path, args: &[&str]) -> (bool, String) {
    wgtune_at(Some(dir), args, &[])
}

fn wgtune_at(dir: Option<&Path>, args: &[&str], env: &[(&str, &Path)]) -> (bool, String) {
    let r = common::cli::run_at(dir, args, env, "error");
    (r.ok(), r.text)
}

fn tmp(name: &str) -> PathBuf {
    common::cli::tmp("cli", name)
}

fn losses(metrics: &Path) -> Vec<f64> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect()
}

#[test]
fn every_method_trains_on_the_sample_data_and_the_adapter_is_usable() {
    let _ctx = gpu!();
    let model = root().join("tests/reference/data/tiny-llama");
    let data = root().join("assets/data/pirate/train.jsonl");
    let val = root().join("assets/data/pirate/valid.jsonl");
    // Projection, all-linear and dropout are covered by train_parity; each
    // extra run here costs CI a cold pipeline build in a new process.
    for (method, extra) in [
        (
            "lora",
            vec!["--lora-dropout", "0.1", "--export", "gguf-lora"],
        ),
        ("prompt", vec![]),
        ("prefix", vec![]),
    ] {
        let out = tmp(&format!("{method}{}", extra.len()));
        let mut args = vec![
            "--method",
            method,
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--val-data",
            val.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "30",
            "--batch-size",
            "8",
            "--no-progress",
        ];
        args.extend(extra.iter());
        let (ok, text) = wgtune(&args);
        assert!(ok, "wgtune {args:?} failed:\n{text}");
        let l = losses(&out.join("metrics.jsonl"));
        assert_eq!(l.len(), 30, "{method}: one metrics line per step\n{text}");
        if method == "lora" {
            // --export gguf-lora: the llama.cpp file and its Modelfile.
            let g = wgtune::model::gguf::Gguf::open(&out.join("adapter.gguf")).unwrap();
            assert_eq!(g.tensors.len(), 2 * 2 * 2, "q,v LoRA on 2 layers");
            assert!(out.join("adapter.Modelfile").exists(), "{text}");
        }
        let first: f64 = l[..3].iter().sum::<f64>() / 3.0;
        let last: f64 = l[l.len() - 3..].iter().sum::<f64>() / 3.0;
        eprintln!("{method} {extra:?}: loss {first:.3} -> {last:.3}");
        assert!(
            last < first - 0.05,
            "{method} {extra:?}: loss did not fall ({first} -> {last})"
        );
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "loss.svg",
            "checkpoint-30/state.safetensors",
            "checkpoint-30/adapter_model.safetensors",
        ] {
            assert!(out.join(f).exists(), "{method}: {f} missing");
        }
        let loaded = wgtune::adapters::peft_io::load_adapter(&out).unwrap();
        assert!(!loaded.tensors.is_empty());
        let (ok, text) = wgtune(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "--data",
            val.to_str().unwrap(),
        ]);
        assert!(ok && text.contains("perplexity"), "eval: {text}");
        let (ok, text) = wgtune(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "--chat",
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "5",
        ]);
        assert!(ok && text.contains("new tokens"), "generate: {text}");
    }
}

#[test]
fn resume_continues_from_the_checkpoint() {
    let _ctx = gpu!();
    let model = root().join("tests/reference/data/tiny-llama");
    let data = root().join("assets/data/pirate/train.jsonl");
    let out = tmp("resume");
    let base = |steps: &str| {
        vec![
            "--method".to_string(),
            "lora".into(),
            "--model".into(),
            model.display().to_string(),
            "--data".into(),
            data.display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--steps".into(),
            steps.into(),
            "--no-progress".into(),
            "--save-every".into(),
            "4".into(),
        ]
    };
    let a: Vec<String> = base("4");
    let (ok, text) = wgtune(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(ok, "{text}");
    let mut b = base("8");
    b.push("--resume".into());
    let (ok, text) = wgtune(&b.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(ok && text.contains("resuming"), "{text}");
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("step")?
                .as_u64()
        })
        .collect();
    assert_eq!(
        steps,
        (1..=8).collect::<Vec<u64>>(),
        "metrics continue without gaps or repeats"
    );
}

#[test]
fn gguf_import_and_gguf_as_model() {
    let ctx = gpu!();
    let gguf = |n: &str| root().join("tests/reference/data/gguf").join(n);
    let dir = tmp("gguf");
    let out = dir.join("imported");
    let (ok, text) = wgtune(&[
        "import",
        gguf("tiny-qwen2.gguf").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing:\n{text}");
    }
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert!(tc["chat_template"]
        .as_str()
        .is_some_and(|t| t.contains("im_start")));

    // `--model file.gguf`: weights read from the GGUF itself; only the
    // config and tokenizer files go into the cache, once.
    let cache = dir.join("cache");
    let env = [("WGTUNE_CACHE", cache.as_path())];
    let m = gguf("tiny-llama.gguf");
    let m = m.to_str().unwrap();
    let (ok, text) = wgtune_env(
        &[
            "generate",
            "--model",
            m,
            "--chat",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "3",
        ],
        &env,
    );
    assert!(ok, "{text}");
    assert!(text.contains("first token after"), "{text}");
    // Compiled pipelines are kept in the cache folder for the next run.
    let gen = [
        "generate",
        "--model",
        m,
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
    ];
    if ctx.features.contains(wgpu::Features::PIPELINE_CACHE)
        && wgpu::util::pipeline_cache_key(&ctx.info).is_some()
    {
        let files: Vec<_> = std::fs::read_dir(cache.join("pipelines"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert!(files.len() == 1 && files[0].ends_with(".bin"), "{files:?}");
        let (ok, text) = wgtune_env(&gen, &env);
        assert!(ok && text.contains("pipeline cache warm"), "{text}");
    }
    let off = Command::new(env!("CARGO_BIN_EXE_wgtune"))
        .args(gen)
        .env("WGTUNE_CACHE", &cache)
        .env("WGTUNE_PIPELINE_CACHE", "0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&off.stderr);
    assert!(
        off.status.success() && text.contains("no pipeline cache"),
        "{text}"
    );
    let cached: Vec<std::path::PathBuf> = std::fs::read_dir(cache.join("gguf"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(cached[0].join("weights.gguf.json").exists());
    assert!(cached[0].join("tokenizer.json").exists());
    assert!(
        !cached[0].join("model.safetensors").exists(),
        "no converted weights"
    );
    let val = root().join("assets/data/pirate/valid.jsonl");
    let (ok, text) = wgtune_env(
        &["eval", "--model", m, "--data", val.to_str().unwrap()],
        &env,
    );
    assert!(ok, "{text}");
    assert!(text.contains("perplexity"), "{text}");

    let (ok, text) = wgtune(&[
        "import",
        gguf("unknown-arch.gguf").to_str().unwrap(),
        "--out",
        dir.join("x").to_str().unwrap(),
    ]);
    assert!(
        !ok && text.contains("falcon") && !text.contains("panicked"),
        "{text}"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let _ctx = gpu!();
    let model = root().join("tests/reference/data/tiny-llama");
    let dir = tmp("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"text\": \"fine\"}\n{\"prompt\": \"x\", \"completion\": 3}\n",
    )
    .unwrap();
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let m = model.to_str().unwrap();
    let long = "word ".repeat(200);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--method",
                "lora",
                "--model",
                m,
                "--data",
                bad.to_str().unwrap(),
            ],
            "bad.jsonl:2",
        ),
        (
            vec![
                "--method",
                "lora",
                "--model",
                m,
                "--data",
                empty.to_str().unwrap(),
            ],
            "empty.jsonl",
        ),
        (
            vec![
                "--method",
                "lora",
                "--model",
                m,
                "--data",
                bad.to_str().unwrap(),
                "--lora-targets",
                "nope",
            ],
            "",
        ),
        (
            vec![
                "--method",
                "lora",
                "--model",
                m,
                "--data",
                "/nonexistent.jsonl",
            ],
            "nonexistent.jsonl",
        ),
        (
            vec![
                "--method",
                "lora",
                "--model",
                "/nonexistent-model",
                "--data",
                bad.to_str().unwrap(),
            ],
            "nonexistent-model",
        ),
        (
            vec!["generate", "--model", m, "--prompt", &long],
            "positions",
        ),
    ];
    for (args, needle) in cases {
        let (ok, text) = wgtune(&args);
        assert!(!ok, "{args:?} should fail:\n{text}");
        assert!(!text.contains("panicked"), "{args:?} panicked:\n{text}");
        assert!(
            text.contains(needle),
            "{args:?}: message should name `{needle}`:\n{text}"
        );
        eprintln!("{}", text.lines().last().unwrap_or(""));
    }
    // An unknown target module lists the model's linear modules.
    let good = root().join("assets/data/pirate/train.jsonl");
    let (ok, text) = wgtune(&[
        "--method",
        "lora",
        "--model",
        m,
        "--data",
        good.to_str().unwrap(),
        "--lora-targets",
        "nope",
        "--out",
        dir.join("out").to_str().unwrap(),
    ]);
    assert!(
        !ok && text.contains("q_proj") && text.contains("nope"),
        "{text}"
    );
    let (ok, text) = wgtune(&[
        "--method",
        "lora",
        "--model",
        m,
        "--data",
        good.to_str().unwrap(),
        "--lora-r",
        "0",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(!ok && text.contains("at least 1"), "{text}");
}

/// `wgtune plan` works from a config.json alone (no weights, no tokenizer:
/// the weights' bytes come from the config) and from a GGUF's header, and
/// loads nothing into the GPU.
#[test]
fn plan_works_from_a_config_alone_and_from_gguf() {
    let d = tmp("plan-config");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(
        root().join("tests/reference/data/tiny-llama/config.json"),
        d.join("config.json"),
    )
    .unwrap();
    let dir = d.display().to_string();
    for method in ["lora", "prompt", "prefix"] {
        let (ok, text) = wgtune(&[
            "plan",
            "--model",
            &dir,
            "--method",
            method,
            "--batch-size",
            "2",
            "--seq-len",
            "64",
        ]);
        assert!(ok, "{text}");
        eprintln!("{text}");
        for want in [
            "memory plan",
            "frozen weights",
            "saved activations",
            "activation gradients",
            "logits workspace",
            "adapter + grads + AdamW",
            "largest temporary",
            "total",
            "no weights file: config.json, float32",
        ] {
            assert!(text.contains(want), "{method}: no `{want}` in:\n{text}");
        }
        assert!(!text.contains("GPU memory for weights"), "{text}");
    }
    let gguf = root().join("tests/reference/data/gguf/tiny-llama.gguf");
    let (ok, text) = wgtune(&["plan", "--model", &gguf.display().to_string()]);
    assert!(ok, "{text}");
    assert!(text.contains("GGUF header"), "{text}");
}

/// Without `--lora-targets`, LoRA adapts PEFT's default modules of the model
/// loaded: `c_attn` on GPT-2 (which has no `q_proj`), for `plan` and `train`.
#[test]
fn lora_default_targets_train_gpt2() {
    let _ctx = gpu!();
    let model = root().join("tests/reference/data/tiny-gpt2");
    let data = root().join("tests/reference/data/sample.jsonl");
    let peft = common::reference::json("tokenizers/lora_targets.json");
    let want = &peft["models"]["tiny-gpt2"]["default"];
    let (ok, text) = wgtune(&[
        "plan",
        "--model",
        model.to_str().unwrap(),
        "--method",
        "lora",
    ]);
    assert!(ok, "plan: {text}");
    let out = tmp("lora-default-gpt2");
    let args = [
        "--method",
        "lora",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--no-progress",
    ];
    let (ok, text) = wgtune(&args);
    assert!(ok, "wgtune {args:?} failed:\n{text}");
    assert_eq!(losses(&out.join("metrics.jsonl")).len(), 2, "{text}");
    let names: Vec<&str> = want
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let line = format!("adapter: lora on {} with", names.join(","));
    assert!(text.contains(&line), "no `{line}` in:\n{text}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(&cfg["target_modules"], want, "saved target_modules");
}

/// `wgtune export --format gguf-lora`: a LoRA adapter becomes a GGUF LoRA
/// file (base from adapter_config.json, or --base); a prompt adapter is
/// refused with the reason, and nothing is written.
#[test]
fn export_gguf_lora_and_refusals() {
    let out = tmp("export");
    std::fs::create_dir_all(&out).unwrap();
    let file = out.join("lora.gguf");
    let adapter = root().join("tests/reference/data/tiny-qwen3/peft/lora_all/initial");
    let base = root().join("tests/reference/data/tiny-qwen3");
    let (ok, text) = wgtune(&[
        "export",
        "--adapter",
        adapter.to_str().unwrap(),
        "--format",
        "gguf-lora",
        "--base",
        base.to_str().unwrap(),
        "--dtype",
        "f16",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("qwen3 LoRA") && text.contains("14 modules"),
        "{text}"
    );
    let g = wgtune::model::gguf::Gguf::open(&file).unwrap();
    assert_eq!(g.get("adapter.type").and_then(|v| v.as_str()), Some("lora"));
    assert_eq!(g.tensors.len(), 28);
    let prompt = root().join("tests/reference/data/tiny-qwen3/peft/prompt/initial");
    let refused = out.join("prompt.gguf");
    let (ok, text) = wgtune(&[
        "export",
        "--adapter",
        prompt.to_str().unwrap(),
        "--format",
        "gguf-lora",
        "--out",
        refused.to_str().unwrap(),
    ]);
    assert!(
        !ok && text.contains("no llama.cpp format") && text.contains("wgtune generate"),
        "{text}"
    );
    assert!(
        !refused.exists(),
        "a refused export wrote {}",
        refused.display()
    );
}

#[test]
fn export_merge_modelfile_and_refusals() {
    let out = tmp("export-merge");
    std::fs::create_dir_all(&out).unwrap();
    let data = root().join("tests/reference/data");
    let adapter = data.join("tiny-llama/peft/lora_qv/initial");
    let base = data.join("tiny-llama");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec!["export", "--adapter", adapter.to_str().unwrap()];
        args.extend_from_slice(extra);
        wgtune(&args)
    };
    // A merged folder (the base is the adapter's base_model_name_or_path,
    // relative to the repository root).
    let merged = out.join("merged");
    let (ok, text) = wgtune_in(
        &root(),
        &[
            "export",
            "--adapter",
            &s(&adapter),
            "--merge",
            "--out",
            &s(&merged),
        ],
    );
    assert!(
        ok && text.contains("Hugging Face folder: 4 weights merged"),
        "{text}"
    );
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(merged.join(f).exists(), "{f}");
    }
    // Never over an input: the base folder, a file in it, the adapter folder.
    let before = std::fs::read(base.join("model.safetensors")).unwrap();
    for target in [
        base.clone(),
        base.join("model.safetensors"),
        adapter.clone(),
    ] {
        let (ok, text) = run(&["--base", &s(&base), "--merge", "--out", &s(&target)]);
        assert!(!ok && text.contains("never overwrites its input"), "{text}");
    }
    assert_eq!(
        std::fs::read(base.join("model.safetensors")).unwrap(),
        before
    );
    // Format and flag mistakes.
    let x = out.join("x.gguf");
    let (ok, text) = run(&[
        "--base",
        &s(&base),
        "--merge",
        "--format",
        "gguf",
        "--out",
        &s(&x),
    ]);
    assert!(!ok && text.contains("from a GGUF base"), "{text}");
    let (ok, text) = run(&["--base", &s(&base), "--format", "hf", "--out", &s(&x)]);
    assert!(!ok && text.contains("add --merge"), "{text}");
    let (ok, text) = run(&[
        "--base",
        &s(&base),
        "--merge",
        "--format",
        "gguf-lora",
        "--out",
        &s(&x),
    ]);
    assert!(!ok && text.contains("without --merge"), "{text}");
    assert!(!x.exists());
    // A merged GGUF from the GGUF base, with its Modelfile.
    let gguf_base = data.join("gguf/families/tiny-llama.gguf");
    let (ok, text) = run(&[
        "--base",
        &s(&gguf_base),
        "--merge",
        "--format",
        "gguf",
        "--dtype",
        "q8_0",
        "--out",
        &s(&x),
    ]);
    assert!(ok && text.contains("4 weights merged as Q8_0"), "{text}");
    let mf = std::fs::read_to_string(out.join("x.Modelfile")).unwrap();
    assert!(
        mf.contains(&format!("FROM {}", s(&x))) && !mf.contains("ADAPTER"),
        "{mf}"
    );
    assert!(text.contains("ollama create x -f"), "{text}");
    // train --export gguf-lora with a prompt adapter: refused before training.
    let never = out.join("never");
    let (ok, text) = wgtune(&[
        "--method",
        "prompt",
        "--model",
        &s(&base),
        "--data",
        &s(&root().join("assets/data/pirate/train.jsonl")),
        "--out",
        &s(&never),
        "--export",
        "gguf-lora",
    ]);
    assert!(!ok && text.contains("llama.cpp's LoRA format"), "{text}");
    assert!(!never.exists());
    // A GGUF LoRA's Modelfile names the base GGUF and the adapter.
    let lora = out.join("lora.gguf");
    let (ok, text) = run(&["--base", &s(&gguf_base), "--out", &s(&lora)]);
    assert!(ok, "{text}");
    let mf = std::fs::read_to_string(out.join("lora.Modelfile")).unwrap();
    let canon = std::fs::canonicalize(&gguf_base).unwrap();
    assert!(
        mf.contains(&format!("FROM {}\nADAPTER {}", canon.display(), s(&lora)))
            && mf.contains("TEMPLATE \"\"\"")
            && mf.contains("PARAMETER stop \"<|im_end|>\""),
        "{mf}"
    );
}
