//! Running the `wgtune` binary and scratch folders, for the tests that drive
//! the command line.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A finished run. `text` is stdout then stderr, what a person would see.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub text: String,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

impl From<Output> for Run {
    fn from(out: Output) -> Run {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        Run {
            code: out.status.code(),
            text: format!("{stdout}{stderr}"),
            stdout,
            stderr,
        }
    }
}

/// `wgtune args` with `RUST_LOG=log`, not yet started, for callers that add
/// environment or stdin.
pub fn command(args: &[&str], log: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wgtune"));
    cmd.args(args).env("RUST_LOG", log);
    cmd
}

/// `wgtune args` with `RUST_LOG=log`.
pub fn run(args: &[&str], log: &str) -> Run {
    run_at(None, args, &[] as &[(&str, &str)], log)
}

/// `wgtune args` run in `dir` (or here) with `env` added; `log` wins over an
/// `RUST_LOG` in `env`.
pub fn run_at<K: AsRef<OsStr>, V: AsRef<OsStr>>(
    dir: Option<&Path>,
    args: &[&str],
    env: &[(K, V)],
    log: &str,
) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wgtune"));
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", log);
    Run::from(cmd.output().expect("run wgtune"))
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `prefix-name` under the target's scratch folder, removed so that a test
/// never sees a previous run's files.
pub fn tmp(prefix: &str, name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{prefix}-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// [`tmp`], created empty.
pub fn tmp_created(prefix: &str, name: &str) -> PathBuf {
    let d = tmp(prefix, name);
    std::fs::create_dir_all(&d).unwrap();
    d
}
