//! Resumable checkpoints. A checkpoint's state is ONE file,
//! `<out>/checkpoint-N/state.safetensors` (N = the step): the adapter's
//! parameters, AdamW's moments, and in its metadata where the run stands,
//! the settings it ran with and the validation bookkeeping (best loss,
//! early stopping's counter). Beside it, the step's PEFT adapter. Each
//! folder is written as a temp folder and renamed into place, so a kill at
//! any moment leaves complete `checkpoint-N` folders only; `--resume` takes
//! the newest one holding a state file, or a legacy `<out>/checkpoint/`.
//! (Before format 2 the position was a separate `trainer_state.json`, and a
//! kill between the two renames left a torn checkpoint that resumed
//! silently wrong; such checkpoints are refused.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::adapters::peft_io::AdapterConfig;
use crate::adapters::HostTensors;
use crate::error::{Error, Result};
use crate::fsio::write_atomic;

/// The checkpoint file in `<out>/checkpoint-N`.
pub const STATE_FILE: &str = "state.safetensors";
/// The single checkpoint folder of earlier versions, still resumed from.
pub const LEGACY_DIR: &str = "checkpoint";
/// Numbered checkpoint folders are `checkpoint-N`.
const DIR_PREFIX: &str = "checkpoint-";
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
    /// Input tokens seen so far (metrics.jsonl's `tokens`).
    pub tokens: u64,
    /// Loss targets seen so far (`target_tokens`; 0 in older checkpoints).
    #[serde(default)]
    pub target_tokens: u64,
}

/// Validation bookkeeping that a resume continues.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalState {
    /// The lowest finite validation loss so far: (step, loss).
    pub best: Option<(usize, f64)>,
    /// Evaluations since the best one (early stopping's counter).
    pub since_best: usize,
    /// The run ended by early stopping.
    pub stopped_early: bool,
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
    pub eval: EvalState,
    /// The PEFT tensors of the best step's adapter (`--keep-best`), so a
    /// resume can restore `<out>/best`; empty otherwise.
    pub best: HostTensors,
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
    for (prefix, set) in [
        ("param.", &ck.params),
        ("m.", &ck.m),
        ("v.", &ck.v),
        ("best.", &ck.best),
    ] {
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
        ("eval".to_string(), json(&ck.eval)),
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
    // Absent before numbered checkpoints: nothing evaluated yet.
    let eval: EvalState = match meta.get("eval") {
        Some(e) => {
            serde_json::from_str(e).map_err(|e| corrupt(&path, format!("metadata `eval`: {e}")))?
        }
        None => EvalState::default(),
    };
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
    let (mut params, mut m, mut v, mut best) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
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
        } else if let Some(k) = n.strip_prefix("best.") {
            (&mut best, k)
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
        eval,
        best,
    })
}

/// The folder of the checkpoint at `step`.
pub fn dir_for(out: &Path, step: usize) -> PathBuf {
    out.join(format!("{DIR_PREFIX}{step}"))
}

/// The numbered checkpoint folders in `out` that hold a state file, as
/// (step, folder), oldest first. A folder without one (torn by hand, or
/// half-deleted) is skipped with a warning: it is never the newest.
pub fn list(out: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Vec::new();
    };
    let mut v: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let step = name.to_str()?.strip_prefix(DIR_PREFIX)?.parse().ok()?;
            let p = e.path();
            if !p.join(STATE_FILE).is_file() {
                log::warn!("{}: no {STATE_FILE}, not a checkpoint", p.display());
                return None;
            }
            Some((step, p))
        })
        .collect();
    v.sort();
    v
}

/// The checkpoint folder `--resume` continues from: the newest numbered
/// one, else a legacy `checkpoint/`. An error naming the output folder
/// when there is none.
pub fn latest(out: &Path) -> Result<PathBuf> {
    if let Some((_, p)) = list(out).pop() {
        return Ok(p);
    }
    let legacy = out.join(LEGACY_DIR);
    if legacy.exists() {
        return Ok(legacy);
    }
    Err(corrupt(
        &out.join(format!("{DIR_PREFIX}N")),
        "no checkpoint to resume from (none was saved in this output folder)\n---> HINT: run \
         without --resume to start over",
    ))
}

/// Move the complete folder `tmp` to `dst` (a sibling), replacing a `dst`
/// already there: readers see the old folder or the new one, and a kill
/// between the two renames leaves only temp names, which the next run
/// removes.
pub fn replace_dir(tmp: &Path, dst: &Path) -> Result<()> {
    let io = |source: std::io::Error| Error::IoWhile {
        action: "cannot move the finished folder into place".into(),
        path: dst.to_path_buf(),
        source,
    };
    let parent = dst.parent().unwrap_or(Path::new("."));
    let mut old = None;
    if dst.exists() {
        let name = dst.file_name().map(|n| n.to_string_lossy().to_string());
        let aside = parent.join(format!(
            ".{}.old.tmp-{}",
            name.unwrap_or_default(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::rename(dst, &aside).map_err(io)?;
        old = Some(aside);
    }
    std::fs::rename(tmp, dst).map_err(io)?;
    #[cfg(unix)]
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    if let Some(o) = old {
        let _ = std::fs::remove_dir_all(o);
    }
    Ok(())
}

/// A fresh temp folder beside `dst` for [`replace_dir`].
pub fn temp_dir_for(dst: &Path) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let parent = dst.parent().unwrap_or(Path::new("."));
    let name = dst.file_name().map(|n| n.to_string_lossy().to_string());
    let tmp = parent.join(format!(
        ".{}.tmp-{}-{}",
        name.unwrap_or_default(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|source| Error::IoWhile {
        action: "cannot create a temp folder".into(),
        path: tmp.clone(),
        source,
    })?;
    Ok(tmp)
}

/// Write `ck` as `<out>/checkpoint-<step>`, with `write_adapter` filling
/// the same folder (the step's PEFT adapter) before it appears. Returns
/// the folder.
pub fn save_numbered(
    out: &Path,
    ck: &Checkpoint,
    write_adapter: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dst = dir_for(out, ck.position.step);
    let tmp = temp_dir_for(&dst)?;
    let r = save(&tmp, ck)
        .and_then(|()| write_adapter(&tmp))
        .and_then(|()| replace_dir(&tmp, &dst));
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r.map(|()| dst)
}

/// `--keep-best`'s folder in `<out>`: a PEFT adapter plus [`BEST_FILE`].
pub const BEST_DIR: &str = "best";
/// `{"step": N, "val_loss": X}` of the adapter in [`BEST_DIR`].
pub const BEST_FILE: &str = "val_loss.json";

/// Replace `<out>/best` by the adapter `write_adapter` writes, recording
/// its step and validation loss; atomic as a checkpoint folder is.
pub fn save_best(
    out: &Path,
    step: usize,
    val_loss: f64,
    write_adapter: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let dst = out.join(BEST_DIR);
    let tmp = temp_dir_for(&dst)?;
    let record = json(&serde_json::json!({ "step": step, "val_loss": val_loss }));
    let r = write_adapter(&tmp)
        .and_then(|()| write_atomic(&tmp.join(BEST_FILE), record.as_bytes()))
        .and_then(|()| replace_dir(&tmp, &dst));
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r
}

/// The step `<out>/best` records, if it is there and readable.
pub fn best_step(out: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(out.join(BEST_DIR).join(BEST_FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("step")?.as_u64().map(|s| s as usize)
}

/// Keep the newest `keep` numbered checkpoints and those of the steps in
/// `protect`; remove the others. Returns the steps removed.
pub fn prune(out: &Path, keep: usize, protect: &[usize]) -> Vec<usize> {
    let all = list(out);
    let n = all.len();
    let mut removed = Vec::new();
    for (i, (step, dir)) in all.into_iter().enumerate() {
        if i + keep >= n || protect.contains(&step) {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => removed.push(step),
            Err(e) => log::warn!("cannot remove {}: {e}", dir.display()),
        }
    }
    removed
}

/// Remove temp files and folders (`.NAME.tmp-PID-N`) that a killed process
/// left in `dir`; returns how many. A live writer of the same folder would
/// lose its temp file, but two runs writing one output folder are broken
/// anyway.
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
        .filter(|p| {
            if p.is_dir() {
                std::fs::remove_dir_all(p).is_ok()
            } else {
                std::fs::remove_file(p).is_ok()
            }
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_latest_skips_folders_without_state_and_prune_keeps_newest_and_protected() {
        let out = std::env::temp_dir().join(format!("wgtune-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        assert!(latest(&out)
            .unwrap_err()
            .to_string()
            .contains("no checkpoint"));
        std::fs::create_dir_all(out.join(LEGACY_DIR)).unwrap();
        assert_eq!(latest(&out).unwrap(), out.join(LEGACY_DIR));
        for s in [2, 4, 6, 10] {
            std::fs::create_dir_all(dir_for(&out, s)).unwrap();
            std::fs::write(dir_for(&out, s).join(STATE_FILE), b"x").unwrap();
        }
        // torn: a newer folder without its state file
        std::fs::create_dir_all(dir_for(&out, 12)).unwrap();
        assert_eq!(latest(&out).unwrap(), dir_for(&out, 10));
        assert_eq!(prune(&out, 2, &[2]), [4]);
        let left: Vec<usize> = list(&out).into_iter().map(|(s, _)| s).collect();
        assert_eq!(left, [2, 6, 10]);
        // replace_dir over an existing folder, then no temp names remain
        let tmp = temp_dir_for(&dir_for(&out, 10)).unwrap();
        std::fs::write(tmp.join(STATE_FILE), b"new").unwrap();
        replace_dir(&tmp, &dir_for(&out, 10)).unwrap();
        assert_eq!(
            std::fs::read(dir_for(&out, 10).join(STATE_FILE)).unwrap(),
            b"new"
        );
        assert_eq!(remove_stale_temp_files(&out), 0);
        std::fs::remove_dir_all(&out).unwrap();
    }
}
