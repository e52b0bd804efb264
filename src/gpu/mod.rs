//! GPU runtime: context, tensors, kernels, plans and the typed op wrappers.

pub mod context;
pub mod kernels;
pub mod ops;
pub mod plan;
pub mod tensor;
pub mod uniform;

pub use context::{Context, ContextOptions, MatmulKernel, PipelineStats};
pub use plan::{Bind, Plan};
pub use tensor::{DType, Tensor, TexMatrix};
pub use uniform::Uniform;
