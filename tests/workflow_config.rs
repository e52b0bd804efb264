//! The workflow around `wgtune train`, end to end on the tiny model: a
//! config file and the equivalent flags give byte-identical adapters,
//! every run records its options in train_args.json and `--resume` keeps
//! to them, a non-empty `--out` needs `--resume` or `--overwrite`,
//! `WGPU_BACKEND` reaches `--backend`, shell completions, and the adapter
//! names its base by repo id (with the local model still found by export).

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use std::path::{Path, PathBuf};

use common::cli::{root, Run};

fn wgtune_at(dir: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Run {
    common::cli::run_at(dir, args, env, "warn")
}

fn wgtune(args: &[&str]) -> Run {
    wgtune_at(None, args, &[])
}

fn tmp(name: &str) -> PathBuf {
    common::cli::tmp_created("workflow-config", name)
}

fn model() -> String {
    root()
        .join("tests/reference/data/tiny-llama")
        .display()
        .to_string()
}

fn data() -> String {
    root()
        .join("assets/data/pirate/train.jsonl")
        .display()
        .to_string()
}

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn metric_steps(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"loss\""))
        .count()
}

/// The acceptance test: a run from a config file (keys, aliases, a flag
/// overriding the file) writes the same adapter bytes as the equivalent
/// flags, and both record the same options.
#[test]
fn a_config_file_run_and_the_flag_run_write_identical_adapters() {
    let _ctx = gpu!();
    let dir = tmp("equal");
    let (m, d) = (model(), data());
    let cfg = dir.join("run.toml");
    // `iters` is overridden by --steps on the command line below.
    std::fs::write(
        &cfg,
        format!(
            "method = \"lora\"\nmodel = {m:?}\ndata = {d:?}\niters = 50\nbatch_size = 4\n\
             learning_rate = 5e-3\nlora_rank = 4\nlora-alpha = 8\n\
             lora_target = [\"q_proj\", \"k_proj\"]\nrslora = true\ntrain_on_prompt = false\n\
             cutoff_len = 48\nseed = 7\nno_progress = true\n"
        ),
    )
    .unwrap();
    let from_file = dir.join("from-file");
    let f = from_file.display().to_string();
    let c = cfg.display().to_string();
    let r = wgtune(&["train", "-c", &c, "--out", &f, "--steps", "3"]);
    assert!(r.ok(), "{}", r.text);
    assert_eq!(
        metric_steps(&from_file),
        3,
        "--steps overrides the file's iters"
    );

    let from_flags = dir.join("from-flags");
    let g = from_flags.display().to_string();
    let r = wgtune(&[
        "train",
        "--method",
        "lora",
        "--model",
        &m,
        "--data",
        &d,
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "0.005",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--lora-targets",
        "q_proj,k_proj",
        "--rslora",
        "--max-seq-len",
        "48",
        "--seed",
        "7",
        "--no-progress",
        "--out",
        &g,
    ]);
    assert!(r.ok(), "{}", r.text);
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        let a = std::fs::read(from_file.join(f)).unwrap();
        let b = std::fs::read(from_flags.join(f)).unwrap();
        assert!(
            a == b,
            "{f} differs between the config-file and the flag run"
        );
    }
    // Nothing run-specific in the config: the base is the model's absolute path.
    let ac = json(&from_file.join("adapter_config.json"));
    let abs = std::fs::canonicalize(&m).unwrap().display().to_string();
    assert_eq!(ac["base_model_name_or_path"], abs.as_str());
    assert_eq!(ac["r"], 4);
    // The records agree too, but for --out (and the file itself is not recorded).
    let mut ra = json(&from_file.join("train_args.json"));
    let mut rb = json(&from_flags.join("train_args.json"));
    for r in [&mut ra, &mut rb] {
        assert!(r.get("config").is_none(), "{r}");
        r.as_object_mut().unwrap().remove("out");
    }
    assert_eq!(ra, rb);
    assert_eq!(ra["lr"], 0.005);
    assert_eq!(ra["lora_targets"], "q_proj,k_proj");
    assert_eq!(ra["rslora"], true);
    assert!(ra.get("num_virtual_tokens").is_none(), "{ra}");
}

/// Bad config files fail before anything loads, naming the file and key.
#[test]
fn bad_config_files_are_clear_errors() {
    let dir = tmp("badcfg");
    for (name, text, needles) in [
        (
            "unknown.toml",
            "lora_rnk = 4\n",
            vec!["unknown key `lora_rnk`"],
        ),
        (
            "syntax.toml",
            "steps = = 4\n",
            vec!["not valid TOML", "line 1"],
        ),
        (
            "type.toml",
            "method = \"lora\"\nsteps = \"ten\"\n",
            vec!["--steps", "key `steps`"],
        ),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        let ps = p.display().to_string();
        let r = wgtune(&["train", "--config", &ps, "--model", "m", "--data", "d"]);
        assert_eq!(r.code, Some(2), "{name}: {}", r.text);
        assert!(r.text.contains(name), "{name}: {}", r.text);
        for n in needles {
            assert!(r.text.contains(n), "{name}: want `{n}`:\n{}", r.text);
        }
    }
    let r = wgtune(&["train", "-c", "no-such.toml"]);
    assert!(
        r.code == Some(2) && r.text.contains("no-such.toml: cannot read"),
        "{}",
        r.text
    );
}

/// train_args.json is written by every run; `--resume` refuses options
/// that contradict it (before loading anything), takes the recorded ones
/// it is not given, and lets the run's length change. A non-empty --out
/// needs --resume or --overwrite; --overwrite keeps files wgtune did not write.
#[test]
fn the_record_drives_resume_and_a_full_out_needs_resume_or_overwrite() {
    let _ctx = gpu!();
    let dir = tmp("record");
    let (m, d) = (model(), data());
    let out = dir.join("out");
    let o = out.display().to_string();
    let base = [
        "--method",
        "lora",
        "--model",
        &m,
        "--data",
        &d,
        "--out",
        &o,
        "--no-progress",
    ];
    let run = |extra: &[&str]| wgtune(&[&base[..], extra].concat());
    let r = run(&["--steps", "2", "--lora-r", "4", "--learning-rate", "3e-3"]);
    assert!(r.ok(), "{}", r.text);
    let rec = json(&out.join("train_args.json"));
    assert_eq!(rec["lora_r"], 4);
    assert_eq!(rec["lr"], 0.003);
    assert_eq!(rec["steps"], 2);
    assert_eq!(rec["lr_schedule"], "cosine");
    assert_eq!(
        rec["model"],
        std::fs::canonicalize(&m)
            .unwrap()
            .display()
            .to_string()
            .as_str()
    );

    // Contradictions are listed, before the model loads.
    let r = run(&["--resume", "--steps", "4", "--lora-r", "8", "--seed", "3"]);
    assert!(!r.ok(), "{}", r.text);
    for n in [
        "train_args.json",
        "--lora-r 8 (recorded: 4)",
        "--seed 3 (recorded: 42)",
    ] {
        assert!(r.text.contains(n), "want `{n}`:\n{}", r.text);
    }
    assert!(
        !r.stdout.contains("model:"),
        "loaded the model:\n{}",
        r.text
    );

    // Not given: the recorded rank and learning rate; --steps may change.
    let r = run(&["--resume", "--steps", "3", "--log-every", "2"]);
    assert!(r.ok() && r.text.contains("resuming"), "{}", r.text);
    assert!(r.text.contains("lr 3.0e-3"), "{}", r.text);
    assert_eq!(metric_steps(&out), 3);
    let rec = json(&out.join("train_args.json"));
    assert_eq!(
        (rec["steps"].clone(), rec["lora_r"].clone()),
        (3.into(), 4.into())
    );
    assert_eq!(rec["log_every"], 2);

    // A new run into the full folder: refused before loading, naming both ways out.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let r = run(&["--steps", "1"]);
    assert!(!r.ok(), "{}", r.text);
    for n in ["not empty", "--resume", "--overwrite"] {
        assert!(r.text.contains(n), "want `{n}`:\n{}", r.text);
    }
    assert!(
        !r.stdout.contains("model:"),
        "loaded the model:\n{}",
        r.text
    );
    assert_eq!(metric_steps(&out), 3, "the old run is untouched");

    // --overwrite starts again: old metrics and checkpoint replaced, notes kept.
    let r = run(&["--steps", "1", "--overwrite", "--lora-r", "2"]);
    assert!(r.ok(), "{}", r.text);
    assert_eq!(metric_steps(&out), 1);
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(json(&out.join("adapter_config.json"))["r"], 2);
    assert_eq!(json(&out.join("train_args.json"))["lora_r"], 2);

    // A folder holding nothing of wgtune's is refused even with --overwrite.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("thesis.tex"), "x").unwrap();
    let ot = other.display().to_string();
    let r = wgtune(&[
        "--method",
        "lora",
        "--model",
        &m,
        "--data",
        &d,
        "--out",
        &ot,
        "--overwrite",
    ]);
    assert!(
        !r.ok() && r.text.contains("holds no wgtune run") && other.join("thesis.tex").exists(),
        "{}",
        r.text
    );
}

/// A model taken from the Hugging Face cache by repo id (or by its
/// snapshot path) is recorded as that repo id; export still finds the
/// local base without --base through train_args.json.
#[test]
fn the_adapter_names_its_base_by_repo_id() {
    let _ctx = gpu!();
    let dir = tmp("baseid");
    let snap = dir.join("hub/models--wgtune-test--tiny-llama/snapshots/0123abc");
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(model()).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
        }
    }
    let hub = dir.join("hub").display().to_string();
    let env = [("HF_HUB_CACHE", hub.as_str()), ("HF_HUB_OFFLINE", "1")];
    let d = data();
    let snap_s = snap.display().to_string();
    for (i, model_arg) in ["wgtune-test/tiny-llama", snap_s.as_str()]
        .iter()
        .enumerate()
    {
        let out = dir.join(format!("out{i}"));
        let o = out.display().to_string();
        let r = wgtune_at(
            None,
            &[
                "--method",
                "lora",
                "--model",
                model_arg,
                "--data",
                &d,
                "--out",
                &o,
                "--steps",
                "1",
                "--no-progress",
            ],
            &env,
        );
        assert!(r.ok(), "{model_arg}: {}", r.text);
        let ac = json(&out.join("adapter_config.json"));
        assert_eq!(
            ac["base_model_name_or_path"], "wgtune-test/tiny-llama",
            "{model_arg}"
        );
        let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(
            readme.contains("base_model: wgtune-test/tiny-llama"),
            "{readme}"
        );
    }
    // No hub cache in sight: export takes the recorded local model.
    let out = dir.join("out1");
    let gg = dir.join("a.gguf").display().to_string();
    let r = wgtune(&[
        "export",
        "--adapter",
        &out.display().to_string(),
        "--out",
        &gg,
        "--no-modelfile",
    ]);
    assert!(r.ok() && Path::new(&gg).exists(), "{}", r.text);
}

/// WGPU_BACKEND and WGPU_ADAPTER_NAME reach --backend and --gpu.
#[test]
fn wgpu_environment_variables_reach_the_device_options() {
    let r = wgtune_at(None, &["devices"], &[("WGPU_BACKEND", "bogus")]);
    assert!(
        r.code == Some(2) && r.text.contains("unknown backend `bogus`"),
        "{}",
        r.text
    );
    // The flag wins over the variable.
    let r = wgtune_at(
        None,
        &["devices", "--backend", "nonsense"],
        &[("WGPU_BACKEND", "vulkan")],
    );
    assert!(r.text.contains("`nonsense`"), "{}", r.text);
    let help = wgtune(&["devices", "--help"]);
    assert!(
        help.text.contains("WGPU_BACKEND") && help.text.contains("WGPU_ADAPTER_NAME"),
        "{}",
        help.text
    );
}

#[test]
fn shell_completions_name_the_commands_and_options() {
    for shell in ["bash", "zsh", "fish"] {
        let r = wgtune(&["completions", shell]);
        assert!(r.ok(), "{shell}: {}", r.text);
        for n in [
            "train",
            "generate",
            "export",
            "lora-r",
            "iters",
            "overwrite",
        ] {
            assert!(r.stdout.contains(n), "{shell}: `{n}` missing");
        }
    }
    let r = wgtune(&["completions", "tcsh"]);
    assert_eq!(r.code, Some(2), "{}", r.text);
}

/// The README's example runs (`assets/runs/*.toml`, one per method, on the
/// `assets/data/pirate` folder) are complete runs: each trains, from the
/// repository root, with only the model, the length and `--out` overridden.
#[test]
fn the_shipped_run_files_train() {
    let dir = tmp("shipped");
    let m = model();
    for method in ["lora", "prompt", "prefix"] {
        let file = format!("assets/runs/pirate-{method}.toml");
        let out = dir.join(method).display().to_string();
        let args = [
            "train",
            "-c",
            &file,
            "--model",
            &m,
            "--steps",
            "2",
            "--eval-every",
            "1",
            "--out",
            &out,
            "--no-progress",
        ];
        let r = wgtune_at(Some(&root()), &args, &[]);
        assert!(r.ok(), "{file}: {}", r.text);
        let rec = json(&Path::new(&out).join("train_args.json"));
        assert_eq!(rec["method"], method, "{file}: {rec}");
        let cfg = json(&Path::new(&out).join("adapter_config.json"));
        let want = match method {
            "lora" => "LORA",
            "prompt" => "PROMPT_TUNING",
            _ => "PREFIX_TUNING",
        };
        assert_eq!(cfg["peft_type"], want, "{file}");
        // The folder's valid.jsonl is the validation data.
        let metrics = std::fs::read_to_string(Path::new(&out).join("metrics.jsonl")).unwrap();
        assert!(metrics.contains("val_loss"), "{file}: {metrics}");
    }
    // keep_best in the LoRA file: best/ holds an adapter.
    assert!(dir.join("lora/best/adapter_model.safetensors").is_file());
}
