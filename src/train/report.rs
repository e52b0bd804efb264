//! Training reports: `metrics.jsonl` (one JSON object per logged step and
//! per validation, for scripts and for re-plotting after a resume); the SVG
//! loss plot drawn from it is in `plot`.
//!
//! Lines are [`TrainRecord`] and [`ValRecord`] through serde: keys in field
//! order, non-finite numbers written as `null`:
//! ```text
//! {"step":10,"epoch":0.5,"loss":3.41,"lr":0.0002,"grad_norm":0.8,"tokens":5120,"target_tokens":2100,"tokens_per_s":180.2,"target_tokens_per_s":73.9,"elapsed_s":28.4,"gpu_mib":41.5,"gpu_peak_mib":52.0}
//! {"step":10,"epoch":0.5,"val_loss":3.52}
//! ```
//! `tokens` counts every input token (prompt and completion, not padding
//! or virtual tokens), `target_tokens` only those the loss is computed on.
//! Lines of older versions (without the target and GPU fields) still read.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::adapters::peft_io::write_atomic;
use crate::error::{Error, Result};

/// Appends one JSON line per event to `<out>/metrics.jsonl`. Each line goes
/// to the file in a single unbuffered write, so a crash loses at most the
/// line being written.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

/// Losses read back from a `metrics.jsonl`, as `(step, value)`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LossHistory {
    pub train: Vec<(usize, f64)>,
    pub val: Vec<(usize, f64)>,
}

/// One logged optimizer step in metrics.jsonl.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    pub step: usize,
    /// Epochs done, fractional.
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Input tokens trained on so far (not padding, not virtual tokens).
    pub tokens: u64,
    /// Loss targets trained on so far.
    #[serde(default)]
    pub target_tokens: u64,
    /// Input tokens per second since the previous logged step.
    pub tokens_per_s: f64,
    #[serde(default)]
    pub target_tokens_per_s: f64,
    /// Seconds since this process started its steps.
    pub elapsed_s: f64,
    /// GPU buffers and textures wgtune holds, now and at their peak.
    #[serde(default)]
    pub gpu_mib: f64,
    #[serde(default)]
    pub gpu_peak_mib: f64,
}

/// One validation pass in metrics.jsonl: at most one per step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValRecord {
    pub step: usize,
    pub epoch: f64,
    pub val_loss: f64,
}

impl MetricsLog {
    pub const FILE_NAME: &'static str = "metrics.jsonl";

    /// Start a fresh log for a new run: creates `out_dir` and truncates
    /// any `metrics.jsonl` in it.
    pub fn create(out_dir: &Path) -> Result<MetricsLog> {
        std::fs::create_dir_all(out_dir).map_err(|e| Error::Io {
            path: out_dir.to_path_buf(),
            source: e,
        })?;
        let path = out_dir.join(Self::FILE_NAME);
        let file = std::fs::File::create(&path).map_err(|e| Error::Io {
            path: path.clone(),
            source: e,
        })?;
        Ok(MetricsLog { path, file })
    }

    /// Continue the log of a run resumed from the checkpoint of `last_step`:
    /// lines logged after that step (by the interrupted run, and about to be
    /// repeated) and a torn last line are dropped, then new lines are
    /// appended. `usize::MAX` keeps every line. A missing file starts empty.
    pub fn resume(out_dir: &Path, last_step: usize) -> Result<MetricsLog> {
        let path = out_dir.join(Self::FILE_NAME);
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::Io {
                path: path.clone(),
                source: e,
            })?;
            let kept: String = text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<Value>(line)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_some_and(|s| s <= last_step as u64)
                })
                .flat_map(|line| [line, "\n"])
                .collect();
            if kept != text {
                write_atomic(&path, kept.as_bytes())?;
            }
        } else {
            std::fs::create_dir_all(out_dir).map_err(|e| Error::Io {
                path: out_dir.to_path_buf(),
                source: e,
            })?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::Io {
                path: path.clone(),
                source: e,
            })?;
        Ok(MetricsLog { path, file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_line(&mut self, line: String) -> Result<()> {
        let line = line + "\n";
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::Io {
                path: self.path.clone(),
                source: e,
            })
    }

    fn write_record<T: Serialize>(&mut self, r: &T) -> Result<()> {
        // serde_json writes NaN/inf as null; a plain struct cannot fail.
        let line = serde_json::to_string(r).map_err(|e| Error::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        self.write_line(line)
    }

    /// Log one optimizer step.
    pub fn train(&mut self, r: &TrainRecord) -> Result<()> {
        self.write_record(r)
    }

    /// Log one validation pass.
    pub fn val(&mut self, r: &ValRecord) -> Result<()> {
        self.write_record(r)
    }
}

/// The train and val losses of a `metrics.jsonl`, in file order. Lines that
/// are not JSON objects with a `step` (such as a torn last line) are skipped;
/// a `null` loss reads as NaN.
pub fn read_loss_history(path: &Path) -> Result<LossHistory> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut h = LossHistory::default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(step) = v.get("step").and_then(Value::as_u64) else {
            continue;
        };
        let value = |k: &str| v.get(k).map(|x| x.as_f64().unwrap_or(f64::NAN));
        if let Some(loss) = value("loss") {
            h.train.push((step as usize, loss));
        }
        if let Some(loss) = value("val_loss") {
            h.val.push((step as usize, loss));
        }
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wgtune-report-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn rec(step: usize, epoch: f64, loss: f64, grad_norm: f64, tokens: u64) -> TrainRecord {
        TrainRecord {
            step,
            epoch,
            loss,
            lr: 2e-4,
            grad_norm,
            tokens,
            target_tokens: tokens / 2,
            tokens_per_s: 180.5,
            target_tokens_per_s: 90.25,
            elapsed_s: 28.0,
            gpu_mib: 1.5,
            gpu_peak_mib: 2.0,
        }
    }

    #[test]
    fn test_metrics_log_lines_and_resume() {
        let d = scratch("metrics");
        let mut log = MetricsLog::create(&d).unwrap();
        log.train(&rec(10, 0.5, 3.25, 0.75, 5120)).unwrap();
        log.val(&ValRecord {
            step: 10,
            epoch: 0.5,
            val_loss: 3.5,
        })
        .unwrap();
        log.train(&rec(20, 1.0, f64::NAN, f64::INFINITY, 10240))
            .unwrap();
        drop(log);
        let text = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            r#"{"step":10,"epoch":0.5,"loss":3.25,"lr":0.0002,"grad_norm":0.75,"tokens":5120,"target_tokens":2560,"tokens_per_s":180.5,"target_tokens_per_s":90.25,"elapsed_s":28.0,"gpu_mib":1.5,"gpu_peak_mib":2.0}"#
        );
        assert_eq!(lines[1], r#"{"step":10,"epoch":0.5,"val_loss":3.5}"#);
        let v: Value = serde_json::from_str(lines[2]).unwrap();
        assert!(v["loss"].is_null() && v["grad_norm"].is_null());

        // a torn line from a crash, then resume from the step-10 checkpoint
        std::fs::OpenOptions::new()
            .append(true)
            .open(d.join("metrics.jsonl"))
            .unwrap()
            .write_all(b"{\"step\":30,\"ep")
            .unwrap();
        let mut log = MetricsLog::resume(&d, 10).unwrap();
        log.train(&rec(20, 1.0, 3.0, 0.5, 10240)).unwrap();
        let h = read_loss_history(log.path()).unwrap();
        assert_eq!(h.train, [(10, 3.25), (20, 3.0)]);
        assert_eq!(h.val, [(10, 3.5)]);

        // a line of an older version (no target or GPU fields) reads
        let old = r#"{"step":10,"epoch":0.5,"loss":3.25,"lr":0.0002,"grad_norm":0.75,"tokens":5120,"tokens_per_s":180.5,"elapsed_s":28.0}"#;
        let r: TrainRecord = serde_json::from_str(old).unwrap();
        assert_eq!((r.step, r.tokens, r.target_tokens), (10, 5120, 0));

        // a fresh run truncates
        let log = MetricsLog::create(&d).unwrap();
        assert_eq!(
            read_loss_history(log.path()).unwrap(),
            LossHistory::default()
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
