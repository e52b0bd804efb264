//! The base model's name as an adapter records it
//! (`base_model_name_or_path`, prompt tuning's `tokenizer_name_or_path`):
//! a Hugging Face repo id whenever one is known, so that PEFT's
//! `AutoPeftModelForCausalLM` finds the base on any machine; else the
//! model's absolute path. wgtune itself finds a local base through the
//! `model` of the run's train_args.json (see `wgtune export`).

use std::path::Path;

use crate::model::gguf::Gguf;
use crate::model::hub::{is_gguf, is_repo_id};

/// The id for `--model arg`, resolved to the folder `dir`:
/// - `ORG/NAME` as given (not a local path);
/// - a GGUF whose metadata names its source repo;
/// - a snapshot of the Hugging Face cache (`models--ORG--NAME/snapshots/REV`);
/// - a folder whose config.json `_name_or_path` is a repo id;
/// - else the canonical absolute path of `arg`.
pub fn base_model_id(arg: &Path, dir: &Path) -> String {
    if !arg.exists() {
        let s = arg.to_string_lossy();
        if is_repo_id(&s) {
            return s.into_owned();
        }
    }
    let canon = std::fs::canonicalize(arg).unwrap_or_else(|_| arg.to_path_buf());
    if arg.is_file() && is_gguf(arg) {
        if let Some(id) = Gguf::open(arg)
            .ok()
            .and_then(|g| gguf_repo(|k| g.get(k).and_then(|v| v.as_str()).map(str::to_string)))
        {
            return id;
        }
        return canon.display().to_string();
    }
    let dir_canon = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    if let Some(id) = hub_cache_repo(&dir_canon) {
        return id;
    }
    if let Some(id) = config_repo(&dir.join("config.json")) {
        return id;
    }
    canon.display().to_string()
}

/// `ORG/NAME` of a path inside the Hugging Face cache
/// (`.../models--ORG--NAME/snapshots/REV[/...]`).
pub fn hub_cache_repo(path: &Path) -> Option<String> {
    let parts: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    parts.windows(2).find_map(|w| {
        let rest = w[0].strip_prefix("models--")?;
        if w[1] != "snapshots" {
            return None;
        }
        let (org, name) = rest.split_once("--")?;
        let id = format!("{org}/{name}");
        is_repo_id(&id).then_some(id)
    })
}

/// config.json's `_name_or_path` when it is a repo id, not a local path.
fn config_repo(config: &Path) -> Option<String> {
    let text = std::fs::read_to_string(config).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let s = v.get("_name_or_path")?.as_str()?;
    (is_repo_id(s) && !Path::new(s).exists()).then(|| s.to_string())
}

/// The source repo a GGUF's metadata names (llama.cpp's converter writes
/// these keys). `general.base_model.N.*` is left out on purpose: it names
/// the model this one was fine-tuned from, not this one.
pub fn gguf_repo(get: impl Fn(&str) -> Option<String>) -> Option<String> {
    let from_url = |u: String| -> Option<String> {
        let rest = u
            .trim()
            .strip_prefix("https://huggingface.co/")
            .or_else(|| u.trim().strip_prefix("http://huggingface.co/"))?;
        let mut it = rest.split('/');
        let id = format!("{}/{}", it.next()?, it.next()?);
        is_repo_id(&id).then_some(id)
    };
    if let Some(id) = get("general.source.huggingface.repository") {
        let id = id.trim().to_string();
        if is_repo_id(&id) {
            return Some(id);
        }
        if let Some(id) = from_url(id) {
            return Some(id);
        }
    }
    ["general.source.url", "general.repo_url"]
        .iter()
        .find_map(|k| get(k).and_then(from_url))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn repo_ids_are_found_where_the_hub_and_llama_cpp_put_them() {
        let p = Path::new("/h/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/abc123");
        assert_eq!(
            hub_cache_repo(p).as_deref(),
            Some("HuggingFaceTB/SmolLM2-135M-Instruct")
        );
        assert_eq!(hub_cache_repo(Path::new("/h/models--x/other/abc")), None);
        assert_eq!(hub_cache_repo(Path::new("/data/tiny-llama")), None);

        let meta = |kv: &[(&str, &str)]| -> HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let cases = [
            (
                meta(&[("general.source.huggingface.repository", "Qwen/Qwen2.5-0.5B")]),
                Some("Qwen/Qwen2.5-0.5B"),
            ),
            (
                meta(&[(
                    "general.source.url",
                    "https://huggingface.co/org/m-1.5/tree/main",
                )]),
                Some("org/m-1.5"),
            ),
            (
                meta(&[("general.repo_url", "https://huggingface.co/org/name")]),
                Some("org/name"),
            ),
            (
                meta(&[
                    (
                        "general.base_model.0.repo_url",
                        "https://huggingface.co/org/parent",
                    ),
                    ("general.name", "Tiny"),
                ]),
                None,
            ),
            (
                meta(&[("general.source.url", "https://example.com/a/b")]),
                None,
            ),
        ];
        for (m, want) in cases {
            assert_eq!(gguf_repo(|k| m.get(k).cloned()).as_deref(), want, "{m:?}");
        }

        // A repo id as typed; a folder is its absolute path.
        assert_eq!(
            base_model_id(
                Path::new("HuggingFaceTB/SmolLM2-135M"),
                Path::new("/nonexistent")
            ),
            "HuggingFaceTB/SmolLM2-135M"
        );
        let dir = std::env::temp_dir().join(format!("wgtune-baseid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"_name_or_path": "/home/me/llama"}"#,
        )
        .unwrap();
        let abs = std::fs::canonicalize(&dir).unwrap().display().to_string();
        assert_eq!(base_model_id(&dir, &dir), abs);
        std::fs::write(
            dir.join("config.json"),
            r#"{"_name_or_path": "meta-llama/Llama-3.2-1B"}"#,
        )
        .unwrap();
        assert_eq!(base_model_id(&dir, &dir), "meta-llama/Llama-3.2-1B");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
