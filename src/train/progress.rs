//! How a training run reports progress: through this trait, so the library
//! draws nothing itself. The command line implements it with a progress
//! bar; [`Lines`] prints one line per logged step.

/// Receives a run's progress. Lines are results (stdout); a bar is the
/// implementation's business.
pub trait Progress {
    /// Training starts at step `start` of `total`.
    fn start(&mut self, start: usize, total: usize);
    /// Step `step` of `total` is done; `summary` (loss, lr, tokens/s) when
    /// the step was logged.
    fn step(&mut self, step: usize, total: usize, summary: Option<&str>);
    /// A line that must not tear a bar (validation losses).
    fn line(&mut self, line: &str);
    /// The step loop ended: all steps ran (`completed`), or it stopped early.
    fn end(&mut self, completed: bool);
}

/// One stdout line per logged step.
#[derive(Clone, Copy, Debug, Default)]
pub struct Lines;

impl Progress for Lines {
    fn start(&mut self, _start: usize, _total: usize) {}

    fn step(&mut self, step: usize, total: usize, summary: Option<&str>) {
        if let Some(s) = summary {
            println!("step {step}/{total}  {s}");
        }
    }

    fn line(&mut self, line: &str) {
        println!("{line}");
    }

    fn end(&mut self, _completed: bool) {}
}
