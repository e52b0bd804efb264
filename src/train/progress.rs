//! How a training run reports progress: through this trait, so the library
//! draws nothing itself. The command line implements it with a progress
//! bar on a terminal; [`Lines`] writes one plain line per logged step to
//! stderr (what survives `2>log`).

/// What one logged step reports. The names are metrics.jsonl's.
#[derive(Clone, Debug, PartialEq)]
pub struct StepLog {
    pub step: usize,
    pub total: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Every input token of the batches (prompt and completion; not
    /// padding, not virtual tokens) since the last logged step, per second.
    pub tokens_per_s: f64,
    /// Only the tokens the loss is computed on, per second.
    pub target_tokens_per_s: f64,
    /// Input tokens trained on so far (the whole run, resumes included).
    pub tokens: u64,
    /// Target tokens trained on so far.
    pub target_tokens: u64,
    /// Seconds since this process started its steps.
    pub elapsed_s: f64,
    /// Estimated seconds to the last step, from this process's pace.
    pub eta_s: f64,
    /// GPU buffers and textures wgtune holds now, and their peak, in MiB.
    pub gpu_mib: f64,
    pub gpu_peak_mib: f64,
    /// The step was skipped for a non-finite gradient.
    pub skipped: bool,
}

impl StepLog {
    /// The plain line: `step S/T` then `name value` pairs separated by two
    /// spaces, names as in metrics.jsonl.
    pub fn line(&self) -> String {
        format!(
            "step {}/{}  loss {:.4}  lr {:.3e}  grad_norm {:.4}  tokens_per_s {:.1}  \
             target_tokens_per_s {:.1}  tokens {}  target_tokens {}  elapsed_s {:.1}  eta_s {:.1}  \
             gpu_mib {:.1}  gpu_peak_mib {:.1}{}",
            self.step,
            self.total,
            self.loss,
            self.lr,
            self.grad_norm,
            self.tokens_per_s,
            self.target_tokens_per_s,
            self.tokens,
            self.target_tokens,
            self.elapsed_s,
            self.eta_s,
            self.gpu_mib,
            self.gpu_peak_mib,
            self.skipped_note()
        )
    }

    /// The short form a progress bar shows beside itself.
    pub fn short(&self) -> String {
        format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s  {:.0} MiB{}",
            self.loss,
            self.lr,
            self.tokens_per_s,
            self.gpu_mib,
            self.skipped_note()
        )
    }

    fn skipped_note(&self) -> &'static str {
        if self.skipped {
            "  (non-finite grad: step skipped)"
        } else {
            ""
        }
    }
}

/// Receives a run's progress.
pub trait Progress {
    /// Training starts at step `start` of `total`.
    fn start(&mut self, start: usize, total: usize);
    /// Step `step` of `total` is done; `log` when the step was logged.
    fn step(&mut self, step: usize, total: usize, log: Option<&StepLog>);
    /// A line that must not tear a bar (validation losses, early stopping).
    fn line(&mut self, line: &str);
    /// The step loop ended: all steps ran (`completed`), or it stopped early.
    fn end(&mut self, completed: bool);
}

/// One stderr line per logged step and per validation: for a log file, a
/// pipe, or `--no-progress`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Lines;

impl Progress for Lines {
    fn start(&mut self, _start: usize, _total: usize) {}

    fn step(&mut self, _step: usize, _total: usize, log: Option<&StepLog>) {
        if let Some(l) = log {
            eprintln!("{}", l.line());
        }
    }

    fn line(&mut self, line: &str) {
        eprintln!("{line}");
    }

    fn end(&mut self, _completed: bool) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_step_line_is_name_value_pairs() {
        let l = StepLog {
            step: 3,
            total: 10,
            loss: 2.5,
            lr: 1e-3,
            grad_norm: 0.5,
            tokens_per_s: 100.0,
            target_tokens_per_s: 40.0,
            tokens: 300,
            target_tokens: 120,
            elapsed_s: 3.0,
            eta_s: 7.0,
            gpu_mib: 12.0,
            gpu_peak_mib: 13.0,
            skipped: false,
        };
        let line = l.line();
        let fields: Vec<&str> = line.split("  ").collect();
        assert_eq!(fields[0], "step 3/10");
        let pairs: Vec<(&str, &str)> = fields[1..]
            .iter()
            .map(|f| f.split_once(' ').unwrap())
            .collect();
        assert_eq!(pairs[0], ("loss", "2.5000"));
        assert_eq!(pairs.len(), 11, "{line}");
        assert!(
            pairs.iter().all(|(_, v)| v.parse::<f64>().is_ok()),
            "{line}"
        );
    }
}
