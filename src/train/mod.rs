//! Training: options, data, the step loop and what it writes.
//!
//! - `options`: what `wgtune train` takes (`TrainOptions`, `MethodOptions`).
//! - `data`: the JSONL data set (rows to token ids, loss masks and batches).
//! - `rows`: data folders, JSON arrays and the row kinds, up to the parsed row.
//! - `template`: the `--template` prompt template applied to every prompt.
//! - `trainer`: one optimizer step (forward, backward, AdamW) on the GPU.
//! - `memory`: the memory plan, checked before anything is allocated.
//! - `run`: `wgtune train` from options to a saved adapter.
//! - `outdir`: the output folder's rule (`--resume`, `--overwrite`).
//! - `base_id`: the base model's repo id that adapters record.
//! - `resume`: the rules for `--resume` and `--init-adapter`.
//! - `progress`: the `Progress` trait the step loop reports through.
//! - `checkpoint`: the crash-safe one-file checkpoint.
//! - `eval`: mean loss over a data set (`wgtune eval`, validation).
//! - `report`: `metrics.jsonl`.
//! - `plot`: the SVG loss plot.

pub mod base_id;
pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod memory;
pub mod options;
pub mod outdir;
pub mod packing;
pub mod plot;
pub mod progress;
pub mod report;
pub mod resume;
pub mod rows;
pub mod run;
pub mod template;
pub mod trainer;

pub use data::{Batch, DataOptions, Dataset, Example};
pub use template::PromptTemplate;
