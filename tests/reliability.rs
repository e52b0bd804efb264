//! Nothing lost, nothing silently wrong: the `wgtune` binary killed at
//! every save point and resumed, signals, divergence, options that
//! contradict a checkpoint, leftovers and messages. Each test names the
//! defect it guards (docs/inputs.md lists them by input).

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::cli::{root, Run};

fn model() -> String {
    root()
        .join("tests/reference/data/tiny-llama")
        .display()
        .to_string()
}

fn tmp(name: &str) -> PathBuf {
    common::cli::tmp("rel", name)
}

/// Six short text rows of one length: one plan shape, fast steps.
fn small_data(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("small.jsonl");
    let rows: String = (0..6)
        .map(|i| format!("{{\"text\": \"Arr matey, the sea be calm and the wind be fair {i}\"}}\n"))
        .collect();
    std::fs::write(&p, rows).unwrap();
    p.display().to_string()
}

/// A test's scratch folder with the small data, and `--out DIR/out`.
struct Setup {
    dir: PathBuf,
    data: String,
    model: String,
    out: String,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir = tmp(name);
        let data = small_data(&dir);
        let out = dir.join("out").display().to_string();
        Setup {
            dir,
            data,
            model: model(),
            out,
        }
    }

    /// `--method METHOD` on the small data into `out`, batch 2, one line
    /// per step.
    fn method<'a>(&'a self, method: &'a str, out: &'a str) -> Vec<&'a str> {
        vec![
            "--method",
            method,
            "--model",
            &self.model,
            "--data",
            &self.data,
            "--out",
            out,
            "--batch-size",
            "2",
            "--no-progress",
        ]
    }

    /// `--method lora` into `DIR/out`.
    fn lora(&self) -> Vec<&str> {
        self.method("lora", &self.out)
    }
}

fn wgtune(args: &[&str], env: &[(&str, &str)]) -> Run {
    common::cli::run_at(None, args, env, "warn")
}

/// Runs wgtune with `WGTUNE_PAUSE_AT=point` and SIGKILLs it as soon as it
/// reports the pause. Returns false when it finished without reaching it.
fn run_and_kill(args: &[&str], point: &str) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wgtune"))
        .args(args)
        .env("WGTUNE_PAUSE_AT", point)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wgtune");
    let stderr = child.stderr.take().unwrap();
    let mut paused = false;
    for line in std::io::BufReader::new(stderr).lines() {
        if line.unwrap_or_default().contains("wgtune: paused at") {
            paused = true;
            child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(
        paused || status.success(),
        "{point}: wgtune failed before the pause: {status}"
    );
    paused
}

fn temp_files(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for d in [dir.to_path_buf(), dir.join("checkpoint")] {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if n.contains(".tmp-") {
                    v.push(n);
                }
            }
        }
    }
    v
}

/// Defect 1 (torn checkpoint) and the fault-injection acceptance: SIGKILL
/// inside every file write of every save, between the adapter and the
/// checkpoint and between steps; then resume (or start again when nothing
/// was saved). The final adapter must equal the uninterrupted run's byte
/// for byte every time, or resume must refuse with a clear error.
#[test]
fn killed_at_every_save_point_then_resumed_gives_the_same_adapter() {
    let _ctx = gpu!();
    let dir = tmp("kill");
    let data = small_data(&dir);
    let m = model();
    let args = |out: &Path| -> Vec<String> {
        [
            "--method",
            "lora",
            "--model",
            &m,
            "--data",
            &data,
            "--out",
            &out.display().to_string(),
            "--steps",
            "6",
            "--save-every",
            "2",
            "--batch-size",
            "2",
            "--lora-dropout",
            "0.1",
            "--no-progress",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let refdir = dir.join("reference");
    let a = args(&refdir);
    let r = wgtune(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert!(r.ok(), "{}", r.text);
    let want = std::fs::read(refdir.join("adapter_model.safetensors")).unwrap();

    // Three saves of 5, 4 and 4 files (adapter, config, README once,
    // checkpoint, plot), and the metrics rewrite of a resume.
    let mut points: Vec<String> = Vec::new();
    for kind in ["write-partial", "write-before-rename", "write-after-rename"] {
        for k in 1..=13 {
            points.push(format!("{kind}:{k}"));
        }
    }
    for k in 1..=3 {
        points.push(format!("between-adapter-and-checkpoint:{k}"));
    }
    for k in [1, 2, 5] {
        points.push(format!("after-step:{k}"));
    }
    let (mut killed, mut refused) = (0, 0);
    for (i, point) in points.iter().enumerate() {
        let out = dir.join(format!("run{i}"));
        let a = args(&out);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        if !run_and_kill(&a, point) {
            continue;
        }
        killed += 1;
        let has_ckpt = !wgtune::train::checkpoint::list(&out).is_empty();
        let mut b = a.clone();
        if has_ckpt {
            b.push("--resume");
        } else {
            // Start again over what the killed run left.
            b.push("--overwrite");
        }
        let r = wgtune(&b, &[]);
        if !r.ok() {
            // Refusing is allowed, but only with a clear error.
            assert!(
                r.code == Some(2) && r.text.contains("error:") && !r.text.contains("panicked"),
                "{point}: resume failed without a clear error:\n{}",
                r.text
            );
            refused += 1;
            continue;
        }
        let got = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        assert!(
            got == want,
            "{point}: the resumed adapter differs from the uninterrupted run's\n{}",
            r.text
        );
        assert_eq!(
            temp_files(&out),
            Vec::<String>::new(),
            "{point}: temp files left"
        );
    }
    eprintln!(
        "{killed} kills out of {} points; {refused} resumes refused, the rest byte-identical",
        points.len()
    );
    assert!(killed >= 35, "only {killed} kill points were reached");
    assert_eq!(
        refused, 0,
        "a single-file checkpoint should never need refusing"
    );
}

/// Defect 1: a checkpoint from the two-file format, whose parts may
/// disagree, is refused with both files named.
#[test]
fn a_checkpoint_in_the_old_two_file_format_is_refused() {
    let dir = tmp("legacy");
    let ck = dir.join("checkpoint");
    std::fs::create_dir_all(&ck).unwrap();
    // Format 1: tensors without metadata, position in trainer_state.json.
    let data = vec![0u8; 16];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &data).unwrap();
    let bytes = safetensors::serialize(vec![("param.x", view)], None).unwrap();
    std::fs::write(ck.join("state.safetensors"), bytes).unwrap();
    std::fs::write(ck.join("trainer_state.json"), "{\"step\": 20}").unwrap();
    let err = wgtune::train::checkpoint::load(&ck)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("state.safetensors") && err.contains("trainer_state.json"),
        "{err}"
    );
    // Only the JSON file: torn.
    std::fs::remove_file(ck.join("state.safetensors")).unwrap();
    let err = wgtune::train::checkpoint::load(&ck)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("torn") && err.contains("trainer_state.json"),
        "{err}"
    );
}

/// Defects 2 and 6: zero, negative and non-finite numbers are usage errors
/// before anything runs (no panic, no folder, no metrics.jsonl).
#[test]
fn bad_numbers_are_usage_errors_before_anything_is_created() {
    let dir = tmp("numbers");
    let data = small_data(&dir);
    let m = model();
    let out = dir.join("out");
    let o = out.display().to_string();
    let train = |extra: &[&str]| {
        let mut a = vec![
            "--method", "prefix", "--model", &m, "--data", &data, "--out", &o,
        ];
        a.extend_from_slice(extra);
        wgtune(&a, &[])
    };
    let cases: &[(&[&str], &str)] = &[
        (
            &["--prefix-projection", "--encoder-hidden-size", "0"],
            "at least 1",
        ),
        (&["--steps", "0"], "at least 1"),
        (&["--epochs", "0"], "at least 1"),
        (&["--lr", "0"], "greater than 0"),
        (&["--lr=-1"], "greater than 0"),
        (&["--lr", "inf"], "finite"),
        (&["--lr", "nan"], "finite"),
        (&["--max-grad-norm=-1"], "0 or more"),
        (&["--max-grad-norm", "nan"], "finite"),
        (&["--num-virtual-tokens", "0"], "at least 1"),
        (&["--batch-size", "0"], "at least 1"),
        (&["--grad-accum", "0"], "at least 1"),
        (&["--log-every", "0"], "at least 1"),
        (&["--max-seq-len", "1"], "at least 2"),
        (&["--max-bad-steps", "0"], "at least 1"),
        (&["--lora-dropout", "1"], "[0, 1)"),
        (&["--weight-decay=-0.1"], "0 or more"),
    ];
    for (extra, needle) in cases {
        let r = train(extra);
        assert!(
            !r.ok() && r.text.contains(needle) && !r.text.contains("panicked"),
            "{extra:?}: want a usage error with `{needle}`:\n{}",
            r.text
        );
        assert!(!out.exists(), "{extra:?}: created {}", out.display());
    }
    for (args, needle) in [
        (
            vec![
                "generate",
                "--model",
                &m,
                "--prompt",
                "hi",
                "--max-new-tokens",
                "0",
            ],
            "at least 1",
        ),
        (
            vec!["generate", "--model", &m, "--prompt", "hi", "--top-p", "0"],
            "(0, 1]",
        ),
        (
            vec![
                "generate",
                "--model",
                &m,
                "--prompt",
                "hi",
                "--temperature=-1",
            ],
            "0 or more",
        ),
        (
            vec!["eval", "--model", &m, "--data", &data, "--batch-size", "0"],
            "at least 1",
        ),
        (vec!["bench", "kernels", "--iters", "0"], "at least 1"),
        (vec!["bench", "train", "--steps", "0"], "at least 1"),
    ] {
        let r = wgtune(&args, &[]);
        assert!(
            !r.ok() && r.text.contains(needle) && !r.text.contains("panicked"),
            "{args:?}: want `{needle}`:\n{}",
            r.text
        );
    }
}

/// Defect 3: a diverging run stops after --max-bad-steps skipped steps
/// with an error and a non-zero exit, and writes no adapter over a good one.
#[test]
fn divergence_stops_the_run_and_keeps_the_last_good_adapter() {
    let _ctx = gpu!();
    let setup = Setup::new("diverge");
    let dir = &setup.dir;
    let base = setup.lora();
    let r = wgtune(&[&base[..], &["--steps", "2"]].concat(), &[]);
    assert!(r.ok(), "{}", r.text);
    let good = std::fs::read(dir.join("out/adapter_model.safetensors")).unwrap();
    let r = wgtune(
        &[
            &base[..],
            &[
                "--steps",
                "20",
                "--lr",
                "1e30",
                "--save-every",
                "1",
                "--overwrite",
            ],
        ]
        .concat(),
        &[],
    );
    assert!(
        !r.ok() && r.text.contains("diverged") && r.text.contains("--lr"),
        "{}",
        r.text
    );
    assert!(!r.text.contains("done:"), "{}", r.text);
    // Step 1 at lr 1e30 is finite (and saved); from step 2 every step is
    // skipped, so nothing after it may be written, and nothing non-finite.
    let loaded = wgtune::adapters::peft_io::load_adapter(&dir.join("out")).unwrap();
    assert!(loaded
        .tensors
        .values()
        .all(|(_, d)| d.iter().all(|x| x.is_finite())));
    let lines = std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 6, "steps 1..=6 logged:\n{lines}");
    // With the default of 5 and no save, a fresh run writes no adapter
    // (into a new folder), and leaves an earlier run alone (refused there).
    std::fs::write(dir.join("out/adapter_model.safetensors"), &good).unwrap();
    let fresh = dir.join("fresh").display().to_string();
    let mut fresh_args = setup.method("lora", &fresh);
    fresh_args.extend(["--steps", "20", "--lr", "1e30"]);
    let r = wgtune(&fresh_args, &[]);
    assert!(
        !r.ok() && r.text.contains("Nothing was saved"),
        "{}",
        r.text
    );
    assert!(!dir.join("fresh/adapter_model.safetensors").exists());
    let r = wgtune(
        &[&base[..], &["--steps", "20", "--lr", "1e30"]].concat(),
        &[],
    );
    assert!(!r.ok() && r.text.contains("not empty"), "{}", r.text);
    assert_eq!(
        std::fs::read(dir.join("out/adapter_model.safetensors")).unwrap(),
        good
    );
}

/// Defect 4: SIGINT during start-up stops the run (exit 130, nothing
/// written); SIGTERM mid-run saves and exits 143, and resume continues.
#[cfg(unix)]
#[test]
fn signals_stop_the_run_with_the_shells_exit_codes() {
    let _ctx = gpu!();
    let setup = Setup::new("signals");
    let dir = &setup.dir;
    let args = setup.lora();
    let spawn = |pause: &str| {
        Command::new(env!("CARGO_BIN_EXE_wgtune"))
            .args(&args)
            .args(["--steps", "400"])
            .env("WGTUNE_PAUSE_AT", pause)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let kill = |pid: u32, sig: &str| {
        let s = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(s.success());
    };
    let wait_for = |child: &mut std::process::Child, what: &str| {
        let err = child.stderr.take().unwrap();
        let mut r = std::io::BufReader::new(err);
        let mut line = String::new();
        while r.read_line(&mut line).unwrap() > 0 {
            if line.contains(what) {
                return r;
            }
            line.clear();
        }
        panic!("`{what}` never came");
    };
    // Start-up: paused 3 s right after the model loaded, SIGINT meanwhile.
    let mut child = spawn("model-loaded:1:3");
    let _rest = wait_for(&mut child, "paused at model-loaded");
    kill(child.id(), "-INT");
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{stdout}");
    assert!(
        !stdout.contains("step 1/"),
        "trained after SIGINT:\n{stdout}"
    );
    assert!(!dir.join("out").exists(), "wrote an output folder");

    // Mid-run: SIGTERM after step 3 (paused 2 s there).
    let mut child = spawn("after-step:3:2");
    let _rest = wait_for(&mut child, "paused at after-step");
    kill(child.id(), "-TERM");
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(143), "{stdout}");
    assert!(stdout.contains("interrupted at step 3"), "{stdout}");
    let r = wgtune(&[&args[..], &["--resume", "--steps", "5"]].concat(), &[]);
    assert!(r.ok() && r.text.contains("at step 3"), "{}", r.text);
    let tokens: Vec<u64> = std::fs::read_to_string(dir.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["tokens"].as_u64())
        .collect();
    // Defect 8: tokens keep counting after a resume.
    assert_eq!(tokens.len(), 5);
    assert!(tokens.windows(2).all(|w| w[1] > w[0]), "{tokens:?}");
}

/// Defect 5: options that contradict the checkpoint or the initial adapter
/// are errors listing each one; a checkpoint already past --steps is
/// "nothing to do"; an adapter from another base model is refused.
#[test]
fn options_that_contradict_a_checkpoint_or_adapter_are_errors() {
    let _ctx = gpu!();
    let setup = Setup::new("conflicts");
    let (dir, data, m) = (&setup.dir, &setup.data, &setup.model);
    let run = |method: &str, extra: &[&str]| {
        let mut a = setup.method(method, &setup.out);
        a.extend_from_slice(extra);
        wgtune(&a, &[])
    };
    let r = run("lora", &["--steps", "2", "--lora-r", "4"]);
    assert!(r.ok(), "{}", r.text);
    for (method, extra, needles) in [
        (
            "prompt",
            vec!["--resume", "--steps", "4"],
            vec!["--method prompt", "lora"],
        ),
        (
            "lora",
            vec!["--resume", "--steps", "4", "--lora-r", "8", "--lr", "1e-3"],
            vec!["--lora-r 8 (recorded: 4)", "--lr 0.001 (recorded: 0.002)"],
        ),
        (
            "lora",
            vec!["--resume", "--steps", "4", "--seed", "7"],
            vec!["--seed 7"],
        ),
    ] {
        let r = run(method, &extra);
        assert!(!r.ok(), "{extra:?} should fail:\n{}", r.text);
        for n in needles {
            assert!(r.text.contains(n), "{extra:?}: want `{n}`:\n{}", r.text);
        }
    }
    // Unchanged options resume; the learning rate is the checkpoint's.
    let r = run("lora", &["--resume", "--steps", "1"]);
    assert!(
        r.ok() && r.text.contains("nothing to do") && !r.text.contains("NaN"),
        "{}",
        r.text
    );
    let r = run("lora", &["--resume", "--steps", "3"]);
    assert!(r.ok() && r.text.contains("lr 2.0e-3"), "{}", r.text);

    // --init-adapter of another method, or with another rank.
    let init = dir.join("out").display().to_string();
    let o2 = dir.join("out2").display().to_string();
    for (method, extra, needle) in [
        ("prompt", vec![], "--method prompt"),
        ("lora", vec!["--lora-r", "16"], "--lora-r 16 (recorded: 4)"),
    ] {
        let mut a = setup.method(method, &o2);
        a.extend(["--steps", "1", "--init-adapter", &init]);
        a.extend(extra);
        let r = wgtune(&a, &[]);
        assert!(!r.ok() && r.text.contains(needle), "{a:?}:\n{}", r.text);
    }
    // The same shapes on another base model (tiny-mistral: other weights).
    let other = root()
        .join("tests/reference/data/tiny-mistral")
        .display()
        .to_string();
    let r = wgtune(
        &[
            "eval",
            "--model",
            &other,
            "--adapter",
            &init,
            "--data",
            data,
        ],
        &[],
    );
    assert!(
        !r.ok() && r.text.contains("another base model"),
        "{}",
        r.text
    );
    let r = wgtune(
        &["eval", "--model", m, "--adapter", &init, "--data", data],
        &[],
    );
    assert!(r.ok(), "{}", r.text);
}

/// Defects 7 and 8: errors reached before training leave nothing behind,
/// temp files of a killed run are removed at the next start, and messages
/// name the setting or the action at fault. (Also: the last step's
/// validation is written once, not twice, with --eval-every.)
#[test]
fn errors_leave_nothing_behind_and_name_the_cause() {
    let _ctx = gpu!();
    let dir = tmp("leftovers");
    let data = small_data(&dir);
    let m = model();
    let out = dir.join("out");
    let o = out.display().to_string();
    let base = ["--model", &m, "--data", &data, "--out", &o, "--no-progress"];
    for (extra, needle) in [
        (vec!["--method", "lora", "--lora-targets", "nope"], "nope"),
        (
            vec!["--method", "prompt", "--num-virtual-tokens", "1000"],
            "--num-virtual-tokens 1000",
        ),
        (vec!["--method", "lora", "--resume"], "no checkpoint"),
    ] {
        let r = wgtune(&[&extra[..], &base[..]].concat(), &[]);
        assert!(
            !r.ok() && r.text.contains(needle) && !r.text.contains("all 6 rows"),
            "{extra:?}: want `{needle}`:\n{}",
            r.text
        );
        assert!(!out.exists(), "{extra:?}: left {}", out.display());
    }
    let r = wgtune(
        &[
            "--method",
            "lora",
            "--model",
            &m,
            "--data",
            &data,
            "--out",
            "/proc/wgtune-x",
        ],
        &[],
    );
    assert!(
        !r.ok() && r.text.contains("cannot create the output folder"),
        "{}",
        r.text
    );
    // A killed run's temp file goes at the next start.
    std::fs::create_dir_all(out.join("checkpoint")).unwrap();
    let stale = out.join(".adapter_model.safetensors.tmp-999999-0");
    let stale2 = out.join("checkpoint/.state.safetensors.tmp-999999-3");
    std::fs::write(&stale, b"partial").unwrap();
    std::fs::write(&stale2, b"partial").unwrap();
    let r = wgtune(
        &[
            &["--method", "lora", "--steps", "1", "--batch-size", "2"],
            &base[..],
        ]
        .concat(),
        &[],
    );
    assert!(r.ok(), "{}", r.text);
    assert!(!stale.exists() && !stale2.exists());

    // The last step's validation is written once, with --eval-every too.
    let val = root().join("assets/data/pirate/valid.jsonl");
    let r = wgtune(
        &[
            &["--method", "lora", "--steps", "2", "--batch-size", "2"],
            &base[..],
            &["--val-data", val.to_str().unwrap(), "--eval-every", "1"],
            &["--overwrite"],
        ]
        .concat(),
        &[],
    );
    assert!(r.ok(), "{}", r.text);
    let vals: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("val_loss"))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .collect();
    assert_eq!(vals, [1, 2], "one validation per step");

    // generate says when the context, not --max-new-tokens, ended it.
    let r = wgtune(
        &[
            "generate",
            "--model",
            &m,
            "--prompt",
            "hi",
            "--max-new-tokens",
            "1000",
        ],
        &[],
    );
    assert!(
        r.ok() && r.text.contains("context limit of 128"),
        "{}",
        r.text
    );
}

fn rust_sources(dir: &Path, out: &mut String) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push_str(&std::fs::read_to_string(&p).unwrap());
        }
    }
}

/// docs/inputs.md is checked against the tests: each row's test exists, and
/// each test of this file has a row.
#[test]
fn inputs_table_names_existing_tests() {
    let table = std::fs::read_to_string(root().join("docs/inputs.md")).unwrap();
    let mut code = String::new();
    rust_sources(&root().join("tests"), &mut code);
    rust_sources(&root().join("src"), &mut code);
    let mut named = Vec::new();
    for row in table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| input"))
    {
        let last = row.trim_end_matches('|').rsplit('|').next().unwrap().trim();
        let name = last.trim_matches('`');
        assert!(
            !name.is_empty() && code.contains(&format!("fn {name}(")),
            "docs/inputs.md names `{name}`, which is no test:\n{row}"
        );
        named.push(name.to_string());
    }
    assert!(named.len() >= 30, "only {} rows", named.len());
    let this = std::fs::read_to_string(root().join("tests/reliability.rs")).unwrap();
    // Split so that this line does not match itself.
    for chunk in this.split(concat!("#[", "test]\nfn ")).skip(1) {
        let name = chunk.split('(').next().unwrap();
        if name != "inputs_table_names_existing_tests" {
            assert!(
                named.iter().any(|n| n == name),
                "test `{name}` has no row in docs/inputs.md"
            );
        }
    }
}

/// A run whose memory plan does not fit stops before anything goes to the
/// GPU: the error shows the plan and what would fit, the exit status is
/// non-zero and no output folder is left behind.
#[test]
fn a_run_that_does_not_fit_stops_before_allocating() {
    let dir = tmp("nofit");
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("long.jsonl");
    // Rows longer than the tiny model's 128 positions: 64 x 128 tokens.
    let row = "Arr matey, the sea be calm and the wind be fair. ".repeat(12);
    let rows: String = (0..64)
        .map(|i| format!("{{\"text\": \"{row}{i}\"}}\n"))
        .collect();
    std::fs::write(&data, rows).unwrap();
    let out = dir.join("out");
    let (data, out_s, model) = (
        data.display().to_string(),
        out.display().to_string(),
        model(),
    );
    let args = [
        "--method",
        "lora",
        "--model",
        &model,
        "--data",
        &data,
        "--out",
        &out_s,
        "--batch-size",
        "64",
        "--max-seq-len",
        "8192",
        "--no-progress",
    ];
    let r = wgtune(&args, &[("WGTUNE_MEMORY_CAP", "40000000")]);
    eprintln!("{}", r.text);
    assert!(!r.ok(), "{}", r.text);
    for want in [
        "memory plan",
        "frozen weights",
        "saved activations",
        "logits workspace",
        "does NOT fit",
        "--batch-size",
        "--grad-accum",
        "--max-seq-len",
    ] {
        assert!(r.text.contains(want), "no `{want}` in:\n{}", r.text);
    }
    // Stopped before the weights were uploaded.
    assert!(!r.text.contains("GPU memory for weights"), "{}", r.text);
    assert!(!out.exists(), "{} was left behind", out.display());
}
