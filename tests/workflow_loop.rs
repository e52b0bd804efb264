//! The training loop's workflow, end to end on the tiny model: plain log
//! lines when stderr is a file or a pipe, tokens and target tokens,
//! metrics.jsonl with one validation per evaluated step, numbered
//! checkpoints with `--save-total-limit` and `--resume` from the newest
//! complete one, `--keep-best` and `--early-stopping-patience` on a run
//! whose validation loss rises.

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::cli::{root, Run};
use serde_json::Value;

fn model() -> String {
    root()
        .join("tests/reference/data/tiny-llama")
        .display()
        .to_string()
}

fn tmp(name: &str) -> PathBuf {
    common::cli::tmp_created("loop", name)
}

/// Six short text rows of one length: one plan shape, fast steps.
fn small_data(dir: &Path) -> String {
    let p = dir.join("small.jsonl");
    let rows: String = (0..6)
        .map(|i| format!("{{\"text\": \"Arr matey, the sea be calm and the wind be fair {i}\"}}\n"))
        .collect();
    std::fs::write(&p, rows).unwrap();
    p.display().to_string()
}

/// Validation rows unlike the training rows, so that a high learning rate
/// on the training rows makes their loss rise.
fn unlike_data(dir: &Path) -> String {
    let p = dir.join("unlike.jsonl");
    let rows: String = (0..4)
        .map(|i| format!("{{\"text\": \"{i} 7 19 zq kx 42 0 8 {i} vw 3 11 yj\"}}\n"))
        .collect();
    std::fs::write(&p, rows).unwrap();
    p.display().to_string()
}

/// `wgtune args` with stdout and stderr piped (so not a terminal).
fn wgtune(args: &[&str]) -> Run {
    common::cli::run(args, "warn")
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
            child.kill().expect("SIGKILL");
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(paused || status.success(), "{point}: failed: {status}");
    paused
}

/// LoRA on `data` into `out`, batch 2, a high learning rate (so the run
/// overfits quickly), plus `extra`.
fn lora<'a>(m: &'a str, data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--method",
        "lora",
        "--model",
        m,
        "--data",
        data,
        "--out",
        out,
        "--batch-size",
        "2",
        "--lr",
        "0.05",
        "--lr-schedule",
        "constant",
    ];
    v.extend_from_slice(extra);
    v
}

fn records(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a metrics line is JSON"))
        .collect()
}

/// (step, val_loss) of every validation record, in file order.
fn vals(out: &Path) -> Vec<(u64, f64)> {
    records(out)
        .iter()
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("val_loss")?.as_f64()?)))
        .collect()
}

fn steps_with_val(out: &Path) -> Vec<u64> {
    vals(out).into_iter().map(|(s, _)| s).collect()
}

fn checkpoints(out: &Path) -> Vec<usize> {
    let mut v: Vec<usize> = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()
        })
        .collect();
    v.sort();
    v
}

fn temp_names(out: &Path) -> Vec<String> {
    std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

/// The plain step line's names, in order (metrics.jsonl's names).
const STEP_FIELDS: [&str; 11] = [
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "target_tokens_per_s",
    "tokens",
    "target_tokens",
    "elapsed_s",
    "eta_s",
    "gpu_mib",
    "gpu_peak_mib",
];

/// A plain step line parsed: (step, total, name -> value).
type Parsed = (u64, u64, Vec<(String, f64)>);

fn parse_line(line: &str) -> Option<Parsed> {
    let mut fields = line.split("  ");
    let (s, t) = fields.next()?.strip_prefix("step ")?.split_once('/')?;
    let pairs = fields
        .map(|f| {
            let (k, v) = f.split_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((s.parse().ok()?, t.parse().ok()?, pairs))
}

/// Acceptance: `wgtune train ... 2>log` leaves one parseable line per
/// logged step in the log (stderr is not a terminal here), with every
/// field mlx-lm's line has, the validation lines too; the console and
/// metrics.jsonl agree on tokens, and `tokens` counts every input token
/// while `target_tokens` counts the loss targets.
#[test]
fn plain_log_lines_survive_a_pipe_and_agree_with_metrics() {
    let _ctx = gpu!();
    let dir = tmp("lines");
    let (m, data, val) = (model(), small_data(&dir), unlike_data(&dir));
    let o = dir.join("out").display().to_string();
    let extra = [
        "--steps",
        "5",
        "--log-every",
        "1",
        "--val-data",
        &val,
        "--eval-every",
        "2",
    ];
    let r = wgtune(&lora(&m, &data, &o, &extra));
    assert!(r.ok(), "{}", r.text);
    let steps: Vec<_> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("step ") && !l.contains("val_loss"))
        .map(|l| parse_line(l).unwrap_or_else(|| panic!("unparseable: {l}")))
        .collect();
    assert_eq!(
        steps.iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
        [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)],
        "{}",
        r.stderr
    );
    for (_, _, pairs) in &steps {
        let names: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, STEP_FIELDS, "{}", r.stderr);
    }
    // Nothing of the progress goes to stdout.
    assert!(!r.stdout.contains("step 1/5"), "{}", r.stdout);
    let val_lines: Vec<u64> = r
        .stderr
        .lines()
        .filter(|l| l.contains("val_loss"))
        .map(|l| parse_line(l).unwrap().0)
        .collect();
    assert_eq!(val_lines, [2, 4, 5], "{}", r.stderr);

    let out = dir.join("out");
    let train: Vec<Value> = records(&out)
        .into_iter()
        .filter(|v| v.get("loss").is_some())
        .collect();
    assert_eq!(train.len(), 5);
    for (rec, (step, _, pairs)) in train.iter().zip(&steps) {
        assert_eq!(rec["step"].as_u64(), Some(*step));
        let get = |k: &str| pairs.iter().find(|(n, _)| n == k).unwrap().1;
        let (tokens, targets) = (
            rec["tokens"].as_u64().unwrap(),
            rec["target_tokens"].as_u64().unwrap(),
        );
        assert_eq!(get("tokens"), tokens as f64);
        assert_eq!(get("target_tokens"), targets as f64);
        // Text rows: every token but each row's first is a target; two rows a step.
        assert_eq!(tokens - targets, 2 * step, "{rec}");
        for k in [
            "tokens_per_s",
            "target_tokens_per_s",
            "gpu_mib",
            "gpu_peak_mib",
        ] {
            assert!(rec[k].as_f64().unwrap() > 0.0, "{k}: {rec}");
        }
    }
    assert!(r.stdout.contains("tok/s"), "{}", r.stdout);

    // --no-progress: the same plain lines (here with --log-every 2: steps 1, 2, 3).
    let o2 = dir.join("out2").display().to_string();
    let extra = ["--steps", "3", "--log-every", "2", "--no-progress"];
    let r = wgtune(&lora(&m, &data, &o2, &extra));
    assert!(r.ok(), "{}", r.text);
    let logged: Vec<u64> = r
        .stderr
        .lines()
        .filter_map(parse_line)
        .map(|s| s.0)
        .collect();
    assert_eq!(logged, [1, 2, 3], "{}", r.stderr);
}

/// metrics.jsonl holds exactly one validation record per evaluated step:
/// with --eval-every dividing the last step (and gradient accumulation),
/// not dividing it, and after a kill and a resume.
#[test]
fn the_final_validation_is_run_and_logged_once() {
    let _ctx = gpu!();
    let dir = tmp("val-once");
    let (m, data, val) = (model(), small_data(&dir), unlike_data(&dir));
    for (name, extra, want) in [
        (
            "accum",
            vec!["--steps", "4", "--grad-accum", "2"],
            vec![2, 4],
        ),
        ("odd", vec!["--steps", "3"], vec![2, 3]),
    ] {
        let o = dir.join(name).display().to_string();
        let mut e = vec!["--val-data", &val, "--eval-every", "2"];
        e.extend(extra);
        let r = wgtune(&lora(&m, &data, &o, &e));
        assert!(r.ok(), "{}", r.text);
        assert_eq!(steps_with_val(&dir.join(name)), want, "{name}");
        let finals = r.stdout.lines().filter(|l| l.starts_with("val loss"));
        assert_eq!(finals.count(), 1, "{}", r.stdout);
    }
    // Killed after step 3 (checkpoint at 2, validations at 2), then resumed.
    let o = dir.join("killed").display().to_string();
    let e = [
        "--val-data",
        &val,
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--steps",
        "4",
    ];
    let a = lora(&m, &data, &o, &e);
    assert!(run_and_kill(&a, "after-step:3"));
    let mut b = a.clone();
    b.push("--resume");
    let r = wgtune(&b);
    assert!(r.ok(), "{}", r.text);
    assert!(r.stdout.contains("at step 2"), "{}", r.stdout);
    assert_eq!(steps_with_val(&dir.join("killed")), [2, 4]);
}

/// Numbered checkpoints: `checkpoint-N` per save, `--save-total-limit`
/// keeps the newest, each holds the step's PEFT adapter; `--resume` takes
/// the newest complete one (a folder without a state file is torn and
/// skipped) and also a legacy `checkpoint/`.
#[test]
fn numbered_checkpoints_are_pruned_and_resumed_from_the_newest_complete_one() {
    let _ctx = gpu!();
    let dir = tmp("ckpt");
    let (m, data) = (model(), small_data(&dir));
    let out = dir.join("out");
    let o = out.display().to_string();
    let e = [
        "--steps",
        "6",
        "--save-every",
        "2",
        "--save-total-limit",
        "2",
    ];
    let r = wgtune(&lora(&m, &data, &o, &e));
    assert!(r.ok(), "{}", r.text);
    assert_eq!(checkpoints(&out), [4, 6]);
    assert!(!out.join("checkpoint").exists());
    let top = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let six = out.join("checkpoint-6");
    assert_eq!(
        std::fs::read(six.join("adapter_model.safetensors")).unwrap(),
        top
    );
    assert!(six.join("adapter_config.json").exists() && six.join("state.safetensors").exists());
    let ck = wgtune::train::checkpoint::load(&six).unwrap();
    assert_eq!(ck.position.step, 6);

    // A legacy copy of step 6 in another folder, before the resume moves on.
    let legacy = dir.join("legacy");
    std::fs::create_dir_all(legacy.join("checkpoint")).unwrap();
    std::fs::copy(
        six.join("state.safetensors"),
        legacy.join("checkpoint/state.safetensors"),
    )
    .unwrap();

    // A torn newer folder is not taken for the newest.
    std::fs::create_dir_all(out.join("checkpoint-7")).unwrap();
    let e = ["--steps", "8", "--save-total-limit", "2", "--resume"];
    let r = wgtune(&lora(&m, &data, &o, &e));
    assert!(r.ok(), "{}", r.text);
    assert!(
        r.stdout
            .contains(&format!("resuming from {} at step 6", six.display())),
        "{}",
        r.stdout
    );
    assert_eq!(
        checkpoints(&out),
        [6, 7, 8],
        "the torn folder stays, unused"
    );
    assert_eq!(temp_names(&out), Vec::<String>::new());
    let resumed = std::fs::read(out.join("adapter_model.safetensors")).unwrap();

    let lo = legacy.display().to_string();
    let r = wgtune(&lora(&m, &data, &lo, &e));
    assert!(r.ok(), "{}", r.text);
    assert!(r.stdout.contains("checkpoint at step 6"), "{}", r.stdout);
    assert_eq!(
        std::fs::read(legacy.join("adapter_model.safetensors")).unwrap(),
        resumed
    );
    assert_eq!(checkpoints(&legacy), [8]);
}

/// Acceptance: `--keep-best` and `--early-stopping-patience` on a run whose
/// validation loss rises (a high learning rate on rows unlike the
/// validation rows). best/ holds the best step's adapter, byte for byte
/// the one in that step's checkpoint; early stopping stops at the step the
/// losses say, saves like a normal end, and a resume has nothing to do.
#[test]
fn keep_best_and_early_stopping_on_a_rising_validation_loss() {
    let _ctx = gpu!();
    let dir = tmp("best");
    let (m, data, val) = (model(), small_data(&dir), unlike_data(&dir));

    // Both need validation data (and early stopping evaluations).
    let o = dir.join("refused").display().to_string();
    for (extra, needle) in [
        (vec!["--keep-best"], "--val-data"),
        (
            vec!["--early-stopping-patience", "2", "--val-data", &val],
            "--eval-every",
        ),
    ] {
        let r = wgtune(&lora(&m, &data, &o, &extra));
        assert!(!r.ok() && r.text.contains(needle), "{extra:?}: {}", r.text);
        assert!(!dir.join("refused").exists());
    }

    let total = 10;
    let ts = total.to_string();
    let out = dir.join("keep");
    let o = out.display().to_string();
    let e = [
        "--steps",
        &ts,
        "--val-data",
        &val,
        "--eval-every",
        "1",
        "--save-every",
        "1",
        "--keep-best",
    ];
    let r = wgtune(&lora(&m, &data, &o, &e));
    assert!(r.ok(), "{}", r.text);
    let v = vals(&out);
    assert_eq!(v.len(), total, "one validation per step: {v:?}");
    let (best_i, &(best_step, best_loss)) = v
        .iter()
        .enumerate()
        .min_by(|a, b| a.1 .1.total_cmp(&b.1 .1))
        .unwrap();
    eprintln!("val losses {v:?}; best {best_loss} at step {best_step}");
    assert!(
        v[best_i + 1..].iter().any(|&(_, l)| l > best_loss + 0.01),
        "the validation loss must rise after its best: {v:?}"
    );
    let rec: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("best/val_loss.json")).unwrap())
            .unwrap();
    assert_eq!(rec["step"].as_u64(), Some(best_step));
    assert_eq!(rec["val_loss"].as_f64(), Some(best_loss));
    assert_eq!(
        std::fs::read(out.join("best/adapter_model.safetensors")).unwrap(),
        std::fs::read(out.join(format!("checkpoint-{best_step}/adapter_model.safetensors")))
            .unwrap(),
        "best/ holds the adapter of step {best_step}"
    );
    assert!(
        r.stdout
            .contains(&format!("best val loss {best_loss:.4} at step {best_step}")),
        "{}",
        r.stdout
    );
    assert!(wgtune::adapters::peft_io::load_adapter(&out.join("best")).is_ok());

    // Early stopping with patience 2 stops where two evaluations in a row
    // found nothing lower.
    let patience = 2;
    let (mut best, mut since, mut want) = (f64::INFINITY, 0, None);
    for &(s, l) in &v {
        if l < best {
            (best, since) = (l, 0);
        } else {
            since += 1;
        }
        if since >= patience {
            want = Some(s);
            break;
        }
    }
    let want = want.expect("the losses give two evaluations without improvement");
    assert!(want < total as u64);
    let out2 = dir.join("early");
    let o2 = out2.display().to_string();
    let ps = patience.to_string();
    let e2 = [
        "--steps",
        &ts,
        "--val-data",
        &val,
        "--eval-every",
        "1",
        "--early-stopping-patience",
        &ps,
        "--keep-best",
    ];
    let r = wgtune(&lora(&m, &data, &o2, &e2));
    assert!(r.ok(), "{}", r.text);
    assert!(
        r.stdout.contains(&format!("early stopping at step {want}")),
        "{}",
        r.stdout
    );
    let last_train = records(&out2)
        .iter()
        .filter(|v| v.get("loss").is_some())
        .filter_map(|v| v["step"].as_u64())
        .max();
    assert_eq!(last_train, Some(want));
    assert_eq!(steps_with_val(&out2), (1..=want).collect::<Vec<_>>());
    assert_eq!(checkpoints(&out2), [want as usize]);
    assert_eq!(
        std::fs::read(out2.join("best/adapter_model.safetensors")).unwrap(),
        std::fs::read(out.join("best/adapter_model.safetensors")).unwrap()
    );
    let ck = wgtune::train::checkpoint::load(&out2.join(format!("checkpoint-{want}"))).unwrap();
    assert_eq!(ck.eval.best, Some((best_step as usize, best_loss)));
    assert_eq!(ck.eval.since_best, patience);

    // Resumed with the same patience: nothing to do; with more, it goes on.
    let mut e3 = e2.to_vec();
    e3.push("--resume");
    let r = wgtune(&lora(&m, &data, &o2, &e3));
    assert!(r.ok() && r.stdout.contains("nothing to do"), "{}", r.text);
}
