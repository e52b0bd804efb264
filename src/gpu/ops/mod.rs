//! Typed wrappers that record one kernel family's dispatches into a [`Plan`].
//!
//! Each wrapper has the name and argument order of its WGSL entry point and
//! of its CPU twin in `cpu::` (outputs, then inputs, then scalars). Shapes are
//! taken from the tensors and checked before anything is recorded.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod copy;
pub mod embedding;
pub mod lora;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod rope;

use crate::error::{Error, Result};
use crate::gpu::tensor::Tensor;

pub use crate::gpu::kernels::Access::{Read as R, ReadWrite as W};
pub use crate::gpu::plan::{grid_1d, Plan};
pub(crate) use crate::gpu::uniform::uniform;

/// Check that `t` has exactly `shape`.
pub(crate) fn expect_shape(op: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.shape() != shape {
        return Err(Error::Shape {
            op: op.to_string(),
            tensor: t.label().to_string(),
            expected: format!("{shape:?}"),
            got: t.shape().to_vec(),
        });
    }
    Ok(())
}

/// Check the rank of `t` and return its dims.
pub(crate) fn dims<const N: usize>(op: &str, t: &Tensor, what: &str) -> Result<[usize; N]> {
    t.shape().try_into().map_err(|_| Error::Shape {
        op: op.to_string(),
        tensor: t.label().to_string(),
        expected: format!("rank {N} {what}"),
        got: t.shape().to_vec(),
    })
}
