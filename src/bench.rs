//! `wgtune bench kernels`: GFLOP/s of the matmul layouts and attention timings.

use crate::error::Result;
use crate::gpu::ContextOptions;

/// Run the kernel benchmark and print one line per case.
pub fn kernels(_opts: &ContextOptions, _iters: usize) -> Result<()> {
    Err(crate::Error::invalid("bench", "not built yet"))
}
