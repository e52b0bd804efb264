//! What `--model` names: a Hugging Face folder, a GGUF file (imported into
//! wgtune's cache on first use), or a Hugging Face repo id `ORG/NAME`,
//! taken from the local Hugging Face cache (`HF_HUB_CACHE`, else
//! `HF_HOME/hub`, else `~/.cache/huggingface/hub`) and downloaded into it
//! when it is not there and the network allows.

use std::path::{Path, PathBuf};

use super::import::{gguf_as_folder, home_dir};
use crate::error::{Error, Result};

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
            "not in the Hugging Face cache ({} has no snapshot with config.json) and \
             HF_HUB_OFFLINE is set, so it cannot be downloaded",
            folder.display()
        )));
    }
    download(&text, hub_cache).map_err(|e| {
        err(format!(
            "not in the Hugging Face cache ({}), and downloading it failed: {e}\n---> HINT: \
             offline? Copy the model folder here and pass its path, or fill the cache on a \
             machine that is online",
            folder.display()
        ))
    })
}

/// The snapshot folder of `repo` in the hub cache: the one `refs/main`
/// names, else the only one there is; it must hold config.json.
pub fn cached_snapshot(hub_cache: &Path, repo: &str) -> Option<PathBuf> {
    let folder = hub_cache.join(format!("models--{}", repo.replace('/', "--")));
    let snaps = folder.join("snapshots");
    if let Ok(hash) = std::fs::read_to_string(folder.join("refs").join("main")) {
        let dir = snaps.join(hash.trim());
        if dir.join("config.json").exists() {
            return Some(dir);
        }
    }
    let dirs: Vec<PathBuf> = std::fs::read_dir(&snaps)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").exists())
        .collect();
    match dirs.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

/// Files of a model folder wgtune reads; weights are chosen from the listing.
#[cfg(feature = "hub")]
const WANTED: [&str; 6] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

#[cfg(not(feature = "hub"))]
fn download(_repo: &str, _hub_cache: &Path) -> std::result::Result<PathBuf, String> {
    Err("this wgtune was built without the `hub` feature, so it cannot download".into())
}

#[cfg(feature = "hub")]
fn download(repo: &str, hub_cache: &Path) -> std::result::Result<PathBuf, String> {
    use hf_hub::api::sync::ApiBuilder;
    let api = ApiBuilder::from_env()
        .with_cache_dir(hub_cache.to_path_buf())
        .with_progress(true)
        .build()
        .map_err(|e| e.to_string())?;
    let r = api.model(repo.to_string());
    let info = r.info().map_err(|e| e.to_string())?;
    let names: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    if !names.contains(&"config.json") {
        return Err(format!(
            "the repo has no config.json (files: {}); for a GGUF repo, download the .gguf and \
             pass its path",
            names.join(", ")
        ));
    }
    let mut files: Vec<&str> = WANTED
        .iter()
        .copied()
        .filter(|w| names.contains(w))
        .collect();
    if names.contains(&"model.safetensors") {
        files.push("model.safetensors");
    } else if names.contains(&"model.safetensors.index.json") {
        files.push("model.safetensors.index.json");
        files.extend(
            names
                .iter()
                .copied()
                .filter(|n| n.starts_with("model-") && n.ends_with(".safetensors")),
        );
    } else {
        return Err("the repo has no model.safetensors (wgtune does not read .bin)".into());
    }
    let mut dir = None;
    for f in files {
        println!("downloading {repo}/{f}");
        let p = r.get(f).map_err(|e| format!("{f}: {e}"))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    dir.ok_or_else(|| "nothing downloaded".into())
}

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
        // An older snapshot must not confuse the lookup.
        let old = repo.join("snapshots").join("old");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("config.json"), "{}").unwrap();
        let got = resolve_model_in(Path::new("Org/Tiny"), &hub, true).unwrap();
        assert_eq!(got, snap);
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
