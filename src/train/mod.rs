//! Training: the data set (JSONL rows → token ids, loss masks and batches).

pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod report;
pub mod run;
pub mod trainer;

pub use data::{Batch, DataOptions, Dataset, Example, PromptTemplate};
