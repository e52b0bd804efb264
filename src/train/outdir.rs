//! The output folder's rule: a new run needs a missing or empty `--out`;
//! `--resume` continues the run that is there; `--overwrite` starts again,
//! removing what wgtune wrote there and nothing else (other files are
//! kept, and named), and refuses a folder that holds no wgtune run at all.

use std::path::Path;

use crate::adapters::peft_io::{CONFIG_FILE, README_FILE, WEIGHTS_FILE};
use crate::error::{Error, Result};
use crate::fsio::is_temp_name;

/// The record of a run's options (written by the command line).
pub const ARGS_FILE: &str = "train_args.json";

/// Files a run writes in the output folder (README.md only when it is
/// wgtune's model card, see [`is_ours`]).
const FILES: [&str; 7] = [
    CONFIG_FILE,
    WEIGHTS_FILE,
    "metrics.jsonl",
    "loss.svg",
    ARGS_FILE,
    "adapter.gguf",
    "adapter.Modelfile",
];

/// Whether `name` in `out` is something a wgtune run wrote.
fn is_ours(out: &Path, name: &str) -> bool {
    if FILES.contains(&name) || name == "checkpoint" || name == "best" {
        return true;
    }
    if let Some(n) = name.strip_prefix("checkpoint-") {
        return !n.is_empty() && n.chars().all(|c| c.is_ascii_digit());
    }
    name == README_FILE
        && std::fs::read_to_string(out.join(name)).is_ok_and(|t| t.contains("trained with wgtune"))
}

/// The entries of `out`, temp files of an interrupted write aside; sorted.
fn entries(out: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(out).map_err(|source| Error::IoWhile {
        action: "cannot list the output folder".into(),
        path: out.to_path_buf(),
        source,
    })?;
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !is_temp_name(n))
        .collect();
    names.sort();
    Ok(names)
}

fn listed(names: &[String]) -> String {
    const SHOWN: usize = 6;
    let mut s = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s += &format!(" and {} more", names.len() - SHOWN);
    }
    s
}

/// Refuse a new run in a non-empty `out` unless `overwrite`, and an
/// `overwrite` of a folder that holds no wgtune run. Touches nothing.
pub fn check(out: &Path, resume: bool, overwrite: bool) -> Result<()> {
    if resume || !out.is_dir() {
        return Ok(());
    }
    // Folders holding nothing (or temp files a killed run left) do not count.
    let names: Vec<String> = entries(out)?
        .into_iter()
        .filter(|n| !entries(&out.join(n)).is_ok_and(|e| e.is_empty()))
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    if !overwrite {
        return Err(Error::invalid(
            "train",
            format!(
                "--out {} is not empty ({}): a new run would replace what is there\n---> \
                 HINT: --resume continues that run, --overwrite starts again (removing what \
                 wgtune wrote there), or give another --out",
                out.display(),
                listed(&names)
            ),
        ));
    }
    if !names.iter().any(|n| is_ours(out, n)) {
        return Err(Error::invalid(
            "train",
            format!(
                "--overwrite: {} holds no wgtune run (no adapter, checkpoint, metrics or {ARGS_FILE}), \
                 only {}; refusing to write into it\n---> HINT: give another --out",
                out.display(),
                listed(&names)
            ),
        ));
    }
    Ok(())
}

/// Remove what an earlier run wrote in `out`; returns the entries kept.
pub fn clear(out: &Path) -> Result<Vec<String>> {
    let mut kept = Vec::new();
    for name in entries(out)? {
        if !is_ours(out, &name) {
            kept.push(name);
            continue;
        }
        let p = out.join(&name);
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|source| Error::IoWhile {
            action: "--overwrite: cannot remove".into(),
            path: p.clone(),
            source,
        })?;
    }
    if !kept.is_empty() {
        log::warn!(
            "--overwrite: kept {} in {} (not written by wgtune)",
            listed(&kept),
            out.display()
        );
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overwrite_removes_only_what_wgtune_wrote() {
        let out = std::env::temp_dir().join(format!("wgtune-outdir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(out.join("checkpoint-4")).unwrap();
        std::fs::create_dir_all(out.join("checkpoint-x")).unwrap();
        for f in [CONFIG_FILE, "metrics.jsonl", "notes.txt"] {
            std::fs::write(out.join(f), "x").unwrap();
        }
        std::fs::write(out.join(README_FILE), "# my own notes").unwrap();
        let e = check(&out, false, false).unwrap_err().to_string();
        assert!(e.contains("not empty") && e.contains("--overwrite"), "{e}");
        check(&out, true, false).unwrap();
        check(&out, false, true).unwrap();
        let kept = clear(&out).unwrap();
        assert_eq!(kept, ["README.md", "checkpoint-x", "notes.txt"]);
        assert_eq!(entries(&out).unwrap(), kept);
        // Nothing of wgtune's left: --overwrite refuses the folder.
        let e = check(&out, false, true).unwrap_err().to_string();
        assert!(e.contains("holds no wgtune run"), "{e}");
        std::fs::remove_dir_all(&out).unwrap();
    }
}
