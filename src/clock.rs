//! Time, from one place: the stopwatch that run, bench and the command line
//! time things with, and the wall clock that chat templates may print.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A monotonic stopwatch, started when made.
#[derive(Clone, Copy, Debug)]
pub struct Stopwatch(Instant);

impl Stopwatch {
    pub fn start() -> Stopwatch {
        Stopwatch(Instant::now())
    }

    /// Seconds since the start.
    pub fn secs(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }

    /// Seconds since the start, and start again.
    pub fn lap(&mut self) -> f64 {
        let s = self.secs();
        self.0 = Instant::now();
        s
    }
}

/// Seconds since the Unix epoch (0 on a clock set before it).
pub fn unix_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
