//! Memory levers: `--num-layers N` (LoRA on the top N layers, saved as
//! PEFT's `layers_to_transform`, loaded back, backward stopping at the
//! lowest adapted layer) checked against PEFT (tests/reference/
//! layers_generate.py), and `--grad-checkpoint` (recompute each layer's
//! activations in backward), which must give byte-identical adapters and
//! take less memory, as the plan says.

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use std::path::{Path, PathBuf};

use common::cli::root;
use common::reference::{data_dir, json, Arrays};
use wgtune::adapters::peft_io::{load_adapter, AdapterConfig};
use wgtune::adapters::Adapter;
use wgtune::gpu::Context;
use wgtune::model::compact::WeightsMode;
use wgtune::model::config::ModelConfig;
use wgtune::model::gguf::GgmlType;
use wgtune::model::Model;
use wgtune::train::memory::{plan_keep, Budget, FrozenTensors, MemoryPlan, PlanInput};
use wgtune::train::options::{LoraOptions, MethodOptions};
use wgtune::train::trainer::{bucket_shape, OptimConfig, Schedule, Trainer};

fn wgtune(args: &[&str]) -> (bool, String) {
    let r = common::cli::run(args, "error");
    (r.ok(), r.text)
}

fn tmp(name: &str) -> PathBuf {
    common::cli::tmp("layers", name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const CASE: &str = "lora_layers";

fn opt_steps(train: &serde_json::Value) -> OptimConfig {
    OptimConfig {
        lr: train["lr"].as_f64().unwrap(),
        weight_decay: train["weight_decay"].as_f64().unwrap(),
        beta1: 0.9,
        beta2: 0.999,
        eps: train["eps"].as_f64().unwrap(),
        max_grad_norm: train["clip_grad_norm"].as_f64().unwrap(),
        schedule: Schedule::Constant,
        warmup_steps: 0,
        total_steps: 10,
    }
}

/// PEFT's adapter on layer 1 only (a list for tiny-llama, an int for
/// tiny-gpt2) loads, and its loss, gradients and 10 AdamW steps match
/// PEFT's, with and without gradient checkpointing (which gives the very
/// same bits).
#[test]
fn layers_to_transform_matches_peft() {
    let ctx = gpu!();
    for model in ["tiny-llama", "tiny-gpt2"] {
        let m = Model::load(ctx, &data_dir(model)).unwrap();
        let rel = format!("{model}/peft/{CASE}");
        let loaded = load_adapter(&data_dir(&rel).join("initial")).unwrap();
        let AdapterConfig::Lora(lc) = &loaded.config else {
            panic!("{model}: not LoRA")
        };
        assert_eq!(lc.layers_to_transform.as_deref(), Some(&[1usize][..]));
        let batch = common::reference::peft_batch(&format!("{rel}/step.safetensors"));
        let step = json(&format!("{rel}/step.json"));
        let refs = Arrays::open(&format!("{rel}/step.safetensors"));
        let mut by_mode = Vec::new();
        for gc in [false, true] {
            let adapter =
                Adapter::new(ctx, &m, loaded.config.clone(), loaded.sorted_tensors()).unwrap();
            let mut tr =
                Trainer::new(ctx, &m, &adapter, common::reference::gradients_only()).unwrap();
            tr.set_grad_checkpoint(gc);
            // Backward stops at layer 1: layer 0 keeps nothing of its own.
            assert_eq!(tr.keep().from, 1, "{model}");
            let loss = tr.gradients(&batch).unwrap();
            let want = step["loss"].as_f64().unwrap();
            let grads = adapter.flat.read(ctx, &adapter.flat.grads).unwrap();
            assert_eq!(grads.len(), refs.names().len() - 3, "{model}: tensors");
            let mut worst = 0f64;
            for (name, _, g) in &grads {
                assert!(name.contains(".1."), "{model}: {name} is not on layer 1");
                let want_g = refs.f32(&format!("{name}.grad"));
                assert_eq!(g.len(), want_g.len(), "{model} {name}");
                let scale = want_g.iter().fold(0f64, |a, &x| a.max((x as f64).abs()));
                let diff = g
                    .iter()
                    .zip(&want_g)
                    .fold(0f64, |a, (&x, &y)| a.max((x as f64 - y as f64).abs()));
                let rel_err = diff / scale.max(1e-12);
                worst = worst.max(rel_err);
                assert!(
                    rel_err <= 1e-3,
                    "{model} gc={gc}: gradient {name} rel err {rel_err:.2e} (max |ref| {scale:.2e})"
                );
            }
            eprintln!(
                "{model} gc={gc}: loss {loss:.6} vs PEFT {want:.6}; {} gradients, worst rel err {worst:.2e}",
                grads.len()
            );
            assert!(
                (loss - want).abs() <= 1e-4 * want.abs(),
                "{model} gc={gc}: loss {loss} vs {want}"
            );
            by_mode.push((loss, grads));
        }
        assert_eq!(by_mode[0].0.to_bits(), by_mode[1].0.to_bits(), "{model}");
        for (a, b) in by_mode[0].1.iter().zip(&by_mode[1].1) {
            assert!(
                a.2.iter()
                    .zip(&b.2)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{model}: gradient {} differs with gradient checkpointing",
                a.0
            );
        }

        // 10 AdamW steps from the same start, as in PEFT's run.
        let train = json(&format!("{rel}/train.json"));
        let adapter =
            Adapter::new(ctx, &m, loaded.config.clone(), loaded.sorted_tensors()).unwrap();
        let mut tr = Trainer::new(ctx, &m, &adapter, opt_steps(&train)).unwrap();
        tr.set_grad_checkpoint(true);
        let want = train["loss_before_step"].as_array().unwrap();
        for (i, w) in want.iter().enumerate() {
            let w = w.as_f64().unwrap();
            let st = tr
                .train_step(std::slice::from_ref(&batch), true)
                .unwrap()
                .unwrap();
            assert!(
                (st.loss - w).abs() <= 1e-3,
                "{model}: step {i} loss {} vs PEFT {w}",
                st.loss
            );
        }
        let fin = Arrays::open(&format!("{rel}/final_state.safetensors"));
        for (name, _, p) in adapter.flat.read(ctx, &adapter.flat.params).unwrap() {
            let want_p = fin.f32(&name);
            let diff = p
                .iter()
                .zip(&want_p)
                .fold(0f64, |a, (&x, &y)| a.max((x as f64 - y as f64).abs()));
            assert!(
                diff <= 1e-3,
                "{model}: {name} after 10 steps, max diff {diff:.2e}"
            );
        }
    }
}

/// `layers_pattern` and the int form read as PEFT reads them; a pattern
/// that names no module list adapts nothing, which is an error.
#[test]
fn layers_to_transform_forms_and_patterns() {
    let ctx = gpu!();
    let m = Model::load(ctx, &data_dir("tiny-llama")).unwrap();
    let src = data_dir(&format!("tiny-llama/peft/{CASE}")).join("initial");
    let p = Path::new("x/adapter_config.json");
    let base =
        r#""peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]"#;
    for (i, (extra, ok)) in [
        (r#""layers_to_transform": 1"#, true),
        (
            r#""layers_to_transform": [1], "layers_pattern": "layers""#,
            true,
        ),
        (
            r#""layers_to_transform": [1], "layers_pattern": ["h", "layers"]"#,
            true,
        ),
        (
            r#""layers_to_transform": [1], "layers_pattern": "model.layers""#,
            true,
        ),
        (
            r#""layers_to_transform": [1], "layers_pattern": "h""#,
            false,
        ),
        (r#""layers_to_transform": [0]"#, false),
    ]
    .into_iter()
    .enumerate()
    {
        // PEFT's tensors of layer 1 under this config, loaded as a folder.
        let dir = tmp(&format!("forms-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let w = "adapter_model.safetensors";
        std::fs::copy(src.join(w), dir.join(w)).unwrap();
        std::fs::write(
            dir.join("adapter_config.json"),
            format!("{{{base}, {extra}}}"),
        )
        .unwrap();
        match load_adapter(&dir) {
            Ok(loaded) => {
                let tensors = loaded.sorted_tensors();
                let built = Adapter::new(ctx, &m, loaded.config, tensors);
                assert!(ok && built.is_ok(), "{extra}");
            }
            Err(e) => {
                let e = e.to_string();
                assert!(!ok, "{extra}: {e}");
                assert!(
                    e.contains("not in target_modules") && e.contains("layers_to_transform"),
                    "{e}"
                );
            }
        }
    }
    for bad in [
        r#""layers_to_transform": "1""#,
        r#""layers_to_transform": [-1]"#,
        r#""layers_pattern": "layers""#,
        r#""layers_to_transform": [1], "layers_pattern": "lay.*""#,
    ] {
        let e = AdapterConfig::from_json_str(p, &format!("{{{base}, {bad}}}"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x/adapter_config.json: "), "{bad}: {e}");
        assert!(e.contains("layers_"), "{bad}: {e}");
    }
}

/// `train --num-layers 1`: the adapter holds layer 1's LoRA only, its
/// config says so in PEFT's key, and eval, generate and resume take it.
#[test]
fn num_layers_trains_the_top_layers_and_loads_back() {
    let _ctx = gpu!();
    let model = root().join("tests/reference/data/tiny-llama");
    let data = root().join("assets/data/pirate/train.jsonl");
    let val = root().join("assets/data/pirate/valid.jsonl");
    let out = tmp("num-layers");
    let args = |steps: &'static str| {
        vec![
            "train".to_string(),
            "--method".into(),
            "lora".into(),
            "--model".into(),
            s(&model).into(),
            "--data".into(),
            s(&data).into(),
            "--out".into(),
            s(&out).into(),
            "--steps".into(),
            steps.into(),
            "--batch-size".into(),
            "4".into(),
            "--num-layers".into(),
            "1".into(),
            "--no-progress".into(),
        ]
    };
    let a = args("3");
    let (ok, text) = wgtune(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{text}");
    assert!(
        text.contains("layers below 1 keep only their inputs"),
        "{text}"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["layers_to_transform"], serde_json::json!([1]), "{cfg}");
    assert_eq!(cfg["layers_pattern"], serde_json::Value::Null, "{cfg}");
    let loaded = load_adapter(&out).unwrap();
    let names: Vec<&str> = loaded.tensors.keys().map(String::as_str).collect();
    assert_eq!(names.len(), 4, "q and v of one layer: {names:?}");
    assert!(names.iter().all(|n| n.contains(".layers.1.")), "{names:?}");

    let (ok, text) = wgtune(&[
        "eval",
        "--model",
        s(&model),
        "--adapter",
        s(&out),
        "--data",
        s(&val),
    ]);
    assert!(ok && text.contains("perplexity"), "eval: {text}");
    let (ok, text) = wgtune(&[
        "generate",
        "--model",
        s(&model),
        "--adapter",
        s(&out),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "3",
    ]);
    assert!(ok, "generate: {text}");

    // Resume keeps the layers; another --num-layers contradicts the record.
    let mut a = args("4");
    a.push("--resume".into());
    let (ok, text) = wgtune(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "resume: {text}");
    let after = load_adapter(&out).unwrap();
    assert_eq!(after.tensors.len(), 4);
    let n = a.iter().position(|x| x == "--num-layers").unwrap();
    a[n + 1] = "2".into();
    a[n - 3] = "5".into();
    let (ok, text) = wgtune(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        !ok && text.contains("--num-layers 2 (recorded: 1)"),
        "{text}"
    );
}

/// `--num-layers` out of range or with another method is a clear error
/// before anything trains.
#[test]
fn num_layers_refusals() {
    let _ctx = gpu!();
    let model = root().join("tests/reference/data/tiny-llama");
    let data = root().join("assets/data/pirate/train.jsonl");
    for (method, n, want) in [
        ("lora", "3", "not between 1 and the model's 2 layers"),
        ("prompt", "1", "applies to --method lora only"),
        ("prefix", "1", "applies to --method lora only"),
        ("lora", "0", "at least 1"),
    ] {
        let out = tmp(&format!("refuse-{method}-{n}"));
        let (ok, text) = wgtune(&[
            "train",
            "--method",
            method,
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--steps",
            "1",
            "--num-layers",
            n,
        ]);
        assert!(!ok, "{method} {n}: {text}");
        assert!(text.contains(want), "{method} {n}: {text}");
        assert!(!text.contains("panicked"), "{text}");
        assert!(!out.join("adapter_model.safetensors").exists());
    }
}

/// `--grad-checkpoint` gives byte-identical adapters for every method
/// (LoRA with dropout: the recomputed forward draws the same mask).
#[test]
fn grad_checkpoint_gives_identical_adapters() {
    let _ctx = gpu!();
    let data = root().join("assets/data/pirate/train.jsonl");
    for (model, method, extra) in [
        (
            "tiny-llama",
            "lora",
            vec!["--lora-targets", "all-linear", "--lora-dropout", "0.1"],
        ),
        ("tiny-llama", "prompt", vec![]),
        ("tiny-llama", "prefix", vec!["--prefix-projection"]),
        ("tiny-gpt2", "lora", vec![]),
        ("tiny-gpt2", "prefix", vec![]),
    ] {
        let dir = root().join("tests/reference/data").join(model);
        let mut bytes = Vec::new();
        for gc in [false, true] {
            let out = tmp(&format!("gc-{model}-{method}-{gc}"));
            let mut args = vec![
                "train",
                "--method",
                method,
                "--model",
                s(&dir),
                "--data",
                s(&data),
                "--out",
                s(&out),
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--no-progress",
            ];
            args.extend(extra.iter());
            if gc {
                args.push("--grad-checkpoint");
            }
            let (ok, text) = wgtune(&args);
            assert!(ok, "{args:?}:\n{text}");
            if gc {
                assert!(text.contains("checkpointed"), "the plan says so:\n{text}");
            }
            bytes.push(std::fs::read(out.join("adapter_model.safetensors")).unwrap());
        }
        assert!(
            bytes[0] == bytes[1],
            "{model} {method} {extra:?}: the adapter differs with --grad-checkpoint"
        );
        eprintln!(
            "{model} {method} {extra:?}: identical ({} bytes)",
            bytes[0].len()
        );
    }
}

/// Gradient checkpointing and `--num-layers` shrink the saved activations
/// in the plan; on the tiny model the measured peak follows the plan (as
/// train_parity checks without them) and is lower with checkpointing.
#[test]
fn memory_plan_counts_the_levers() {
    let _ = gpu!();
    // SmolLM2-135M's shape (config alone), batch 4 x 512.
    let cfg =
        ModelConfig::from_file(&root().join("assets/configs/smollm2-135m-instruct.json")).unwrap();
    let frozen = FrozenTensors::uniform(&cfg, GgmlType::F32, "test".into());
    let lora = |n: Option<usize>| {
        MethodOptions::Lora(LoraOptions {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec![],
            rslora: false,
            init: wgtune::adapters::init::LoraInit::Kaiming,
            num_layers: n,
        })
    };
    let plan = |method: &MethodOptions, gc: bool| {
        let input = PlanInput {
            cfg: &cfg,
            frozen: &frozen,
            mode: WeightsMode::Stored,
            method,
            b: 4,
            t: 512,
            r: 2048,
            nv: 0,
            p: 0,
            keep: plan_keep(&cfg, method, gc).unwrap(),
        };
        MemoryPlan::new(&input, Budget::of(None, None)).unwrap()
    };
    let all = plan(&lora(None), false);
    let gc = plan(&lora(None), true);
    let top = plan(&lora(Some(1)), false);
    let mib = |p: &MemoryPlan| p.line("saved activations") as f64 / (1u64 << 20) as f64;
    eprintln!(
        "SmolLM2 4x512 LoRA q,v saved activations: {:.0} MiB; --grad-checkpoint {:.0} MiB; \
         --num-layers 1 {:.0} MiB; totals {:.0} / {:.0} / {:.0} MiB",
        mib(&all),
        mib(&gc),
        mib(&top),
        all.total() as f64 / 1048576.0,
        gc.total() as f64 / 1048576.0,
        top.total() as f64 / 1048576.0
    );
    // One layer's set plus 30 layer inputs, against 30 sets.
    assert!(
        mib(&gc) * 4.0 < mib(&all),
        "{}\n{}",
        all.render(),
        gc.render()
    );
    assert!(mib(&top) * 4.0 < mib(&all), "{}", top.render());
    assert!(top.line("adapter + grads + AdamW") < all.line("adapter + grads + AdamW"));
    assert!(plan_keep(&cfg, &lora(Some(31)), false).is_err());

    // Measured on tiny-llama, LoRA on every linear of both layers.
    let model = "tiny-llama";
    let mut peaks = Vec::new();
    for gc in [false, true] {
        // A context of its own: the counter sees only this run.
        let ctx = Context::new(&Default::default()).unwrap();
        let dir = data_dir(model);
        let m = Model::load(&ctx, &dir).unwrap();
        let loaded = load_adapter(&data_dir(&format!("{model}/peft/lora_all/initial"))).unwrap();
        let AdapterConfig::Lora(lc) = &loaded.config else {
            panic!()
        };
        let method = MethodOptions::Lora(LoraOptions {
            r: lc.r,
            alpha: lc.lora_alpha,
            dropout: 0.0,
            targets: lc.target_modules.clone(),
            rslora: false,
            init: wgtune::adapters::init::LoraInit::Kaiming,
            num_layers: None,
        });
        let adapter =
            Adapter::new(&ctx, &m, loaded.config.clone(), loaded.sorted_tensors()).unwrap();
        let batch =
            common::reference::peft_batch(&format!("{model}/peft/lora_all/step.safetensors"));
        let mut tr = Trainer::new(&ctx, &m, &adapter, common::reference::gradients_only()).unwrap();
        tr.set_grad_checkpoint(gc);
        tr.train_step(std::slice::from_ref(&batch), true).unwrap();
        let measured = ctx.memory.peak();
        let cap_t = m.cfg.max_positions;
        let (b, t, r) = bucket_shape(batch.b, batch.t, batch.loss_targets(0), 0, cap_t);
        let frozen = FrozenTensors::of_folder(&m.cfg, &dir).unwrap();
        let input = PlanInput {
            cfg: &m.cfg,
            frozen: &frozen,
            mode: WeightsMode::Stored,
            method: &method,
            b,
            t,
            r,
            nv: 0,
            p: 0,
            keep: plan_keep(&m.cfg, &method, gc).unwrap(),
        };
        let plan = MemoryPlan::new(&input, Budget::of(None, None)).unwrap();
        let ratio = plan.total() as f64 / measured as f64;
        eprintln!(
            "{model} gc={gc}: plan {} B, measured peak {measured} B ({:+.1}%), saved activations {} B",
            plan.total(),
            (ratio - 1.0) * 100.0,
            plan.line("saved activations")
        );
        assert!(
            (0.9..=1.1).contains(&ratio),
            "{model} gc={gc}: plan {} B vs measured {measured} B",
            plan.total()
        );
        peaks.push((measured, plan.line("saved activations")));
    }
    assert!(peaks[1].0 < peaks[0].0, "{peaks:?}");
    assert!(peaks[1].1 < peaks[0].1, "{peaks:?}");
}

/// `wgtune plan` takes both levers and says what they keep.
#[test]
fn plan_command_takes_the_levers() {
    let _ = gpu!();
    let model = root().join("tests/reference/data/tiny-llama");
    let (ok, text) = wgtune(&["plan", "--model", s(&model), "--grad-checkpoint"]);
    assert!(ok && text.contains("checkpointed: layer inputs"), "{text}");
    let (ok, text) = wgtune(&["plan", "--model", s(&model), "--num-layers", "1"]);
    assert!(ok && text.contains("layers below 1"), "{text}");
    let (ok, text) = wgtune(&["plan", "--model", s(&model), "--num-layers", "5"]);
    assert!(
        !ok && text.contains("not between 1 and the model's 2 layers"),
        "{text}"
    );
    let (ok, text) = wgtune(&[
        "plan",
        "--model",
        s(&model),
        "--method",
        "prompt",
        "--num-layers",
        "1",
    ]);
    assert!(!ok && text.contains("lora only"), "{text}");
}
