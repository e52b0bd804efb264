//! Resumable checkpoints. A checkpoint is ONE file,
//! `<out>/checkpoint/state.safetensors`: the adapter's parameters, AdamW's
//! moments, and in its metadata where the run stands and the settings it
//! ran with. One file renamed into place is the unit of atomicity, so a kill
//! at any moment leaves the previous checkpoint or the next one, never parts
//! of both. (Before format 2 the position was a separate
//! `trainer_state.json`, and a kill between the two renames left a torn
//! checkpoint that resumed silently wrong; such checkpoints are refused.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::adapters::peft_io::AdapterConfig;
use crate::adapters::HostTensors;
use crate::error::{Error, Result};
use crate::fsio::write_atomic;

/// The checkpoint file in `<out>/checkpoint`.
pub const STATE_FILE: &str = "state.safetensors";
/// The separate position file of format 1 (refused, see the module doc).
pub const LEGACY_STATE_FILE: &str = "trainer_state.json";
const FORMAT: &str = "wgtune-checkpoint-2";

/// Where a run stands after `step` optimizer steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub step: usize,
    pub epoch: usize,
    /// Optimizer steps already taken in `epoch`.
    pub batch_in_epoch: usize,
    /// Tokens seen so far (metrics.jsonl's `tokens`).
    pub tokens: u64,
}

/// The settings a run was started with that a resume must not change
/// silently (the adapter's own shape lives in its config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    /// `--model` as given when the run started.
    pub model: String,
    /// `Model::fingerprint` of that model, hex.
    pub model_fingerprint: String,
    pub lr: f64,
    pub weight_decay: f64,
    pub lr_schedule: String,
    pub warmup_steps: usize,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: Option<usize>,
    pub train_on_prompt: bool,
    /// `--chat-template` as resolved (on or off); checkpoints from before
    /// the option trained raw text.
    #[serde(default = "chat_template_off")]
    pub chat_template: String,
}

fn chat_template_off() -> String {
    "off".into()
}

/// Everything a checkpoint holds.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub position: Position,
    pub settings: RunSettings,
    pub config: AdapterConfig,
    pub params: HostTensors,
    pub m: HostTensors,
    pub v: HostTensors,
}

fn corrupt(path: &Path, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Write `ck` as `dir/state.safetensors` in one atomic rename. A stale
/// format-1 `trainer_state.json` is removed afterwards.
pub fn save(dir: &Path, ck: &Checkpoint) -> Result<()> {
    use safetensors::tensor::TensorView;
    let path = dir.join(STATE_FILE);
    let mut all: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (prefix, set) in [("param.", &ck.params), ("m.", &ck.m), ("v.", &ck.v)] {
        for (n, s, d) in set {
            if d.iter().any(|x| !x.is_finite()) {
                return Err(corrupt(
                    &path,
                    format!("not written: `{prefix}{n}` holds Inf or NaN"),
                ));
            }
            all.push((
                format!("{prefix}{n}"),
                s.clone(),
                bytemuck::cast_slice(d).to_vec(),
            ));
        }
    }
    let views = all
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| corrupt(&path, format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = BTreeMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("position".to_string(), json(&ck.position)),
        ("settings".to_string(), json(&ck.settings)),
        ("adapter_config".to_string(), ck.config.to_json_string()),
    ]);
    let bytes = crate::fsio::serialize_safetensors(views, meta)
        .map_err(|e| corrupt(&path, format!("could not serialize: {e}")))?;
    std::fs::create_dir_all(dir).map_err(|source| Error::IoWhile {
        action: "cannot create the checkpoint folder".into(),
        path: dir.to_path_buf(),
        source,
    })?;
    write_atomic(&path, &bytes)?;
    let legacy = dir.join(LEGACY_STATE_FILE);
    if legacy.exists() {
        let _ = std::fs::remove_file(legacy);
    }
    Ok(())
}

/// These types hold only numbers, strings and options, which serde_json
/// always writes.
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("invariant: plain structs serialize to JSON")
}

/// Read the checkpoint in `dir`. Every way it can be missing, torn, corrupt
/// or from another format is an error naming the file.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    let path = dir.join(STATE_FILE);
    let legacy = dir.join(LEGACY_STATE_FILE);
    if !path.is_file() {
        let message = if legacy.is_file() {
            format!(
                "missing, but {} is there: a torn checkpoint",
                legacy.display()
            )
        } else if dir.exists() {
            "missing: the checkpoint folder holds no checkpoint".to_string()
        } else {
            "no checkpoint to resume from (none was saved in this output folder)".to_string()
        };
        return Err(corrupt(
            &path,
            format!("{message}\n---> HINT: run without --resume to start over"),
        ));
    }
    let bytes = std::fs::read(&path).map_err(|source| Error::IoWhile {
        action: "cannot read the checkpoint".into(),
        path: path.clone(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        corrupt(
            &path,
            format!("not a valid safetensors file ({e}); is it truncated or corrupt?"),
        )
    })?;
    let meta = safetensors::SafeTensors::read_metadata(&bytes)
        .ok()
        .and_then(|(_, m)| m.metadata().clone())
        .unwrap_or_default();
    match meta.get("format").map(String::as_str) {
        Some(FORMAT) => {}
        Some(other) => {
            return Err(corrupt(
                &path,
                format!("checkpoint format `{other}` is not {FORMAT}"),
            ))
        }
        None => {
            return Err(corrupt(
                &path,
                format!(
                    "written by an older wgtune, whose checkpoint is two files ({STATE_FILE} \
                     and {}) that cannot be checked against each other\n---> HINT: start a \
                     new run from the saved adapter with --init-adapter <out>",
                    legacy.display()
                ),
            ))
        }
    }
    let field = |k: &str| {
        meta.get(k)
            .ok_or_else(|| corrupt(&path, format!("metadata has no `{k}`")))
    };
    let position: Position = serde_json::from_str(field("position")?)
        .map_err(|e| corrupt(&path, format!("metadata `position`: {e}")))?;
    let settings: RunSettings = serde_json::from_str(field("settings")?)
        .map_err(|e| corrupt(&path, format!("metadata `settings`: {e}")))?;
    let config = AdapterConfig::from_json_str(&path, field("adapter_config")?)?;
    if legacy.is_file() {
        // Format 2 removes it after writing; if one is back, the folder was
        // assembled by hand and its parts may disagree.
        return Err(corrupt(
            &path,
            format!(
                "found next to {}, an older format's file: the checkpoint's parts may \
                 disagree; remove one of them",
                legacy.display()
            ),
        ));
    }
    let (mut params, mut m, mut v) = (Vec::new(), Vec::new(), Vec::new());
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    for n in names {
        let t = st
            .tensor(&n)
            .map_err(|e| corrupt(&path, format!("tensor `{n}`: {e}")))?;
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(corrupt(&path, format!("tensor `{n}` is not F32")));
        }
        let d: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let s = t.shape().to_vec();
        let dst = if let Some(k) = n.strip_prefix("param.") {
            params.push((k.to_string(), s, d));
            continue;
        } else if let Some(k) = n.strip_prefix("m.") {
            (&mut m, k)
        } else if let Some(k) = n.strip_prefix("v.") {
            (&mut v, k)
        } else {
            return Err(corrupt(&path, format!("unexpected tensor `{n}`")));
        };
        dst.0.push((dst.1.to_string(), s, d));
    }
    let shapes = |set: &HostTensors| -> Vec<(String, Vec<usize>)> {
        set.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect()
    };
    if params.is_empty() || shapes(&params) != shapes(&m) || shapes(&params) != shapes(&v) {
        return Err(corrupt(
            &path,
            "parameters and optimizer moments do not have the same tensors",
        ));
    }
    Ok(Checkpoint {
        position,
        settings,
        config,
        params,
        m,
        v,
    })
}

/// Remove temp files (`.NAME.tmp-PID-N`) that a killed process left in
/// `dir`; returns how many. A live writer of the same folder would lose its
/// temp file, but two runs writing one output folder are broken anyway.
pub fn remove_stale_temp_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let stale: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(crate::fsio::is_temp_name)
        })
        .collect();
    stale
        .iter()
        .filter(|p| std::fs::remove_file(p).is_ok())
        .count()
}
