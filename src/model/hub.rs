//! What `--model` names: a Hugging Face folder, a GGUF file (imported into
//! wgtune's cache on first use), or a Hugging Face repo id `ORG/NAME`,
//! taken from the local Hugging Face cache (`HF_HUB_CACHE`, else
//! `HF_HOME/hub`, else `~/.cache/huggingface/hub`) and downloaded into it
//! when it is not there and the network allows (`download`, the `hub`
//! feature). A cached snapshot counts only when it holds config.json and
//! every weights file, so a download that broke off is fetched again.

use std::path::{Path, PathBuf};

use super::import::{gguf_as_folder, home_dir};
use crate::error::{Error, Result};

#[cfg(feature = "hub")]
mod download;

/// The Hugging Face hub cache folder, as huggingface_hub resolves it.
pub fn hf_hub_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    home_dir().join(".cache").join("huggingface").join("hub")
}

/// `HF_HUB_OFFLINE=1` (or true/yes) forbids downloads, as in huggingface_hub.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// `ORG/NAME` with the characters the hub allows.
pub fn is_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(org) && ok(name)
}

pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// Resolve `--model` to a Hugging Face folder.
pub fn resolve_model(arg: &Path) -> Result<PathBuf> {
    resolve_model_in(arg, &hf_hub_cache(), offline())
}

/// [`resolve_model`] with the hub cache and the offline switch given.
pub fn resolve_model_in(arg: &Path, hub_cache: &Path, offline: bool) -> Result<PathBuf> {
    let err = |message: String| Error::Model {
        model: arg.display().to_string(),
        message,
    };
    if arg.is_dir() {
        return Ok(arg.to_path_buf());
    }
    if arg.is_file() {
        if is_gguf(arg) {
            return gguf_as_folder(arg);
        }
        return Err(err(
            "is a file but not a GGUF; give a Hugging Face model folder, a .gguf file or a \
             repo id ORG/NAME"
                .into(),
        ));
    }
    let text = arg.to_string_lossy();
    if !is_repo_id(&text) {
        return Err(err(
            "no such folder or file (and not a Hugging Face repo id ORG/NAME)".into(),
        ));
    }
    if let Some(dir) = cached_snapshot(hub_cache, &text) {
        log::info!("{text}: using the Hugging Face cache at {}", dir.display());
        return Ok(dir);
    }
    let folder = hub_cache.join(format!("models--{}", text.replace('/', "--")));
    if offline {
        return Err(err(format!(
            "not in the Hugging Face cache ({} has no snapshot with config.json and the \
             weights) and HF_HUB_OFFLINE is set, so it cannot be downloaded",
            folder.display()
        )));
    }
    let dir = download(&text, hub_cache).map_err(|e| {
        err(format!(
            "not in the Hugging Face cache ({}), and downloading it failed: {e}\n---> HINT: \
             check the repo id and the network (HF_ENDPOINT, HF_TOKEN); offline, copy the \
             model folder here and pass its path, or fill the cache on a machine that is online",
            folder.display()
        ))
    })?;
    if let Some(missing) = snapshot_missing(&dir).first() {
        return Err(err(format!(
            "downloaded into {}, but {missing} is missing there",
            dir.display()
        )));
    }
    Ok(dir)
}

/// The shard file names of a `model.safetensors.index.json`.
pub fn index_shards(index: &Path) -> std::result::Result<Vec<String>, String> {
    let text = std::fs::read_to_string(index).map_err(|e| format!("{}: {e}", index.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", index.display()))?;
    let map = v["weight_map"]
        .as_object()
        .ok_or_else(|| format!("{}: no `weight_map` object", index.display()))?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(String::from))
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// What a cached snapshot lacks of config.json and the weights (a broken
/// link counts as missing); empty when it is complete.
pub fn snapshot_missing(dir: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    if !dir.join("config.json").exists() {
        missing.push("config.json".to_string());
    }
    if dir.join("model.safetensors").exists() {
        return missing;
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        missing.push("model.safetensors".into());
        return missing;
    }
    match index_shards(&index) {
        Ok(shards) => missing.extend(shards.into_iter().filter(|s| !dir.join(s).exists())),
        Err(e) => missing.push(e),
    }
    missing
}

/// The snapshot folder of `repo` in the hub cache: the one `refs/main`
/// names, else the only one there is; it must hold config.json and the
/// weights ([`snapshot_missing`]).
pub fn cached_snapshot(hub_cache: &Path, repo: &str) -> Option<PathBuf> {
    let folder = hub_cache.join(format!("models--{}", repo.replace('/', "--")));
    let snaps = folder.join("snapshots");
    if let Ok(hash) = std::fs::read_to_string(folder.join("refs").join("main")) {
        let dir = snaps.join(hash.trim());
        if snapshot_missing(&dir).is_empty() {
            return Some(dir);
        }
    }
    let dirs: Vec<PathBuf> = std::fs::read_dir(&snaps)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| snapshot_missing(p).is_empty())
        .collect();
    match dirs.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

#[cfg(not(feature = "hub"))]
fn download(_repo: &str, _hub_cache: &Path) -> std::result::Result<PathBuf, String> {
    Err("this wgtune was built without the `hub` feature, so it cannot download".into())
}

#[cfg(feature = "hub")]
use download::download;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(is_repo_id("org/model.v1_x"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("./x"));
        assert!(!is_repo_id("/abs/path"));
        assert!(!is_repo_id("noslash"));
        assert!(!is_repo_id("org/na me"));
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wgtune-hub-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn cache_snapshot_from_refs_main() {
        let hub = tmp("refs");
        let repo = hub.join("models--Org--Tiny");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::write(snap.join("model.safetensors"), "").unwrap();
        // An older snapshot must not confuse the lookup.
        let old = repo.join("snapshots").join("old");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("config.json"), "{}").unwrap();
        std::fs::write(old.join("model.safetensors"), "").unwrap();
        let got = resolve_model_in(Path::new("Org/Tiny"), &hub, true).unwrap();
        assert_eq!(got, snap);
        std::fs::remove_dir_all(&hub).unwrap();
    }

    #[test]
    fn a_snapshot_without_its_weights_is_not_taken() {
        let hub = tmp("partial");
        let snap = hub.join("models--Org--Part").join("snapshots").join("c1");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(snapshot_missing(&snap), ["model.safetensors"]);
        assert_eq!(cached_snapshot(&hub, "Org/Part"), None);
        let index = r#"{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}"#;
        std::fs::write(snap.join("model.safetensors.index.json"), index).unwrap();
        std::fs::write(snap.join("model-1.safetensors"), "").unwrap();
        assert_eq!(snapshot_missing(&snap), ["model-2.safetensors"]);
        assert_eq!(cached_snapshot(&hub, "Org/Part"), None);
        std::fs::write(snap.join("model-2.safetensors"), "").unwrap();
        assert_eq!(cached_snapshot(&hub, "Org/Part"), Some(snap.clone()));
        let e = resolve_model_in(Path::new("Org/Part2"), &hub, true).unwrap_err();
        assert!(e.to_string().contains("HF_HUB_OFFLINE"), "{e}");
        std::fs::remove_dir_all(&hub).unwrap();
    }

    #[test]
    fn offline_miss_is_a_clear_error() {
        let hub = tmp("miss");
        let e = resolve_model_in(Path::new("Org/Missing"), &hub, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Org/Missing") && e.contains("HF_HUB_OFFLINE"),
            "{e}"
        );
        assert!(e.contains("models--Org--Missing"), "{e}");
        let e = resolve_model_in(Path::new("no/such/dir"), &hub, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such folder"), "{e}");
    }
}
