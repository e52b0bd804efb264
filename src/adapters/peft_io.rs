//! Hugging Face PEFT adapter folders: read what PEFT 0.21.2 writes, and
//! write what `PeftModel.from_pretrained` loads unchanged.
//!
//! A folder holds `adapter_config.json` (every key PEFT writes, sorted, with
//! `"inference_mode": true`), `adapter_model.safetensors` (F32, metadata
//! `{"format": "pt"}`) and a short `README.md` model card that loading
//! ignores. The measured formats are in `docs/peft.md`:
//!
//! | method | tensors (PEFT names) | shape |
//! |---|---|---|
//! | LORA | `base_model.model.<module>.lora_A.weight` | (r, in) |
//! |      | `base_model.model.<module>.lora_B.weight` | (out, r) |
//! | PROMPT_TUNING | `prompt_embeddings` | (N, token_dim = hidden) |
//! | PREFIX_TUNING | `prompt_embeddings` | (N, L·2·token_dim), token_dim = kv_heads·head_dim |
//!
//! The configs (`adapter_config.json`) are in `peft_config`.
//!
//! Both directions check the tensors against the config (names, ranks,
//! shapes), so a mismatch is an error naming the file, not a wrong model.
//! Every file is written with [`write_atomic`], so an interrupted save never
//! leaves a half-written file behind.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

// The configs live in `peft_config`; re-exported so `peft_io` stays the one
// path for everything PEFT.
pub use super::peft_config::{
    AdapterConfig, LoraConfig, PrefixConfig, PromptConfig, PROMPT_TUNING_INITS,
};

/// The PEFT version whose format this module writes (and records in
/// `peft_version`).
pub const PEFT_VERSION: &str = "0.21.2";
/// The only task type wgtune trains and writes.
pub const TASK_TYPE: &str = "CAUSAL_LM";
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's old pickle format; recognised only to say it is unsupported.
pub const LEGACY_WEIGHTS_FILE: &str = "adapter_model.bin";
pub const README_FILE: &str = "README.md";
/// The one tensor of a prompt- or prefix-tuning adapter.
/// Prompt: (N, hidden). Prefix: (N, L·2·kv_heads·head_dim), laid out as
/// `view(N, L, 2, kv_heads, head_dim)` with `[:, l, 0]` keys, `[:, l, 1]` values.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";
/// Prefix of every LoRA tensor name (PEFT's `PeftModel.base_model.model`).
pub const LORA_NAME_PREFIX: &str = "base_model.model.";
/// The `peft_type` values wgtune reads and writes.
pub const SUPPORTED_PEFT_TYPES: [&str; 3] = ["LORA", "PROMPT_TUNING", "PREFIX_TUNING"];

// ---------------------------------------------------------------------------
// tensor names

/// Which half of a LoRA pair a tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoraMatrix {
    /// `lora_A.weight`, (r, in_features)
    A,
    /// `lora_B.weight`, (out_features, r)
    B,
}

/// The PEFT names of a module's LoRA pair, `(lora_A, lora_B)`.
///
/// ```
/// let (a, b) = wgtune::adapters::peft_io::lora_names("model.layers.0.self_attn.q_proj");
/// assert_eq!(a, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
/// assert_eq!(b, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
/// ```
pub fn lora_names(module_path: &str) -> (String, String) {
    (
        format!("{LORA_NAME_PREFIX}{module_path}.lora_A.weight"),
        format!("{LORA_NAME_PREFIX}{module_path}.lora_B.weight"),
    )
}

/// The inverse of [`lora_names`]: the module path and matrix of a PEFT LoRA
/// tensor name, or `None` if the name is not one.
pub fn parse_lora_name(name: &str) -> Option<(&str, LoraMatrix)> {
    let rest = name.strip_prefix(LORA_NAME_PREFIX)?;
    let (module, m) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, LoraMatrix::A)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, LoraMatrix::B)
    };
    (!module.is_empty()).then_some((module, m))
}

/// Whether PEFT's `target_modules` entry `target` selects `module_path`:
/// the path equals it or ends with `.target` (PEFT's list matching).
pub fn module_matches(module_path: &str, target: &str) -> bool {
    module_path == target
        || module_path
            .strip_suffix(target)
            .is_some_and(|head| head.ends_with('.'))
}

// ---------------------------------------------------------------------------
// folders

/// An adapter read back from disk: its config and every tensor as f32,
/// `name -> (shape, row-major data)`.
#[derive(Clone, Debug)]
pub struct LoadedAdapter {
    pub config: AdapterConfig,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    /// The weights file's metadata (`format`, and what wgtune adds, such as
    /// [`BASE_FINGERPRINT_KEY`]).
    pub metadata: HashMap<String, String>,
}

impl LoadedAdapter {
    /// The fingerprint of the base model wgtune trained it on, if recorded.
    pub fn base_fingerprint(&self) -> Option<u64> {
        self.metadata
            .get(BASE_FINGERPRINT_KEY)
            .and_then(|s| u64::from_str_radix(s, 16).ok())
    }
}

/// Metadata key of `adapter_model.safetensors` where wgtune records its base
/// model's fingerprint (`Model::fingerprint`, hex). PEFT ignores it.
pub const BASE_FINGERPRINT_KEY: &str = "wgtune.base_model_fingerprint";

impl LoadedAdapter {
    /// The LoRA module paths (`model.layers.0.self_attn.q_proj`), sorted.
    /// Empty for prompt and prefix adapters.
    pub fn lora_modules(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .filter_map(|n| match parse_lora_name(n) {
                Some((m, LoraMatrix::A)) => Some(m.to_string()),
                _ => None,
            })
            .collect();
        v.sort();
        v
    }

    /// The tensors sorted by name, in the form [`save_adapter`] takes.
    pub fn sorted_tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut v: Vec<_> = self
            .tensors
            .iter()
            .map(|(n, (s, d))| (n.clone(), s.clone(), d.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Write an adapter folder: `adapter_model.safetensors` first, then
/// `adapter_config.json`, each atomically; `README.md` only if absent (it
/// may have been edited). `tensors` are `(PEFT name, shape, data)`; they are
/// checked against `cfg` before anything is written.
pub fn save_adapter(
    dir: &Path,
    cfg: &AdapterConfig,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<()> {
    save_adapter_with(dir, cfg, tensors, None)
}

/// [`save_adapter`], recording the base model's fingerprint when given.
/// Non-finite values are refused: a diverged run must not overwrite a
/// usable adapter.
pub fn save_adapter_with(
    dir: &Path,
    cfg: &AdapterConfig,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    base_fingerprint: Option<u64>,
) -> Result<()> {
    let weights_path = dir.join(WEIGHTS_FILE);
    let err = |message: String| Error::Adapter {
        path: weights_path.clone(),
        message,
    };
    cfg.validate()
        .map_err(|m| err(format!("invalid {} config: {m}", cfg.peft_type())))?;
    let mut seen = BTreeSet::new();
    for (name, shape, data) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(err(format!("tensor `{name}` given twice")));
        }
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(err(format!(
                "tensor `{name}` has shape {shape:?} ({numel} values) but {} values",
                data.len()
            )));
        }
    }
    cfg.check_tensors(tensors.iter().map(|(n, s, _)| (n.as_str(), s.as_slice())))
        .map_err(err)?;
    if let Some((name, _, _)) = tensors
        .iter()
        .find(|(_, _, d)| d.iter().any(|x| !x.is_finite()))
    {
        return Err(err(format!(
            "not written: tensor `{name}` holds Inf or NaN (the run diverged)"
        )));
    }

    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;

    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (name.as_str(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| err(format!("could not build tensor views: {e}")))?;
    let mut metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    if let Some(fp) = base_fingerprint {
        metadata.insert(BASE_FINGERPRINT_KEY.to_string(), format!("{fp:016x}"));
    }
    let st = crate::fsio::serialize_safetensors(
        views.into_iter().map(|(n, v)| (n.to_string(), v)),
        metadata,
    )
    .map_err(|e| err(format!("could not serialize: {e}")))?;
    write_atomic(&weights_path, &st)?;

    write_atomic(&dir.join(CONFIG_FILE), cfg.to_json_string().as_bytes())?;

    let readme = dir.join(README_FILE);
    if !readme.exists() {
        write_atomic(&readme, model_card(cfg).as_bytes())?;
    }
    Ok(())
}

/// A short model card in PEFT's front-matter form.
fn model_card(cfg: &AdapterConfig) -> String {
    let mut s = String::from("---\n");
    if let Some(base) = cfg.base_model_name_or_path() {
        s += &format!("base_model: {base}\n");
    }
    s += "library_name: peft\npipeline_tag: text-generation\ntags:\n";
    if let Some(base) = cfg.base_model_name_or_path() {
        s += &format!("- base_model:adapter:{base}\n");
    }
    let (tag, what) = match cfg {
        AdapterConfig::Lora(_) => ("lora", "LoRA"),
        AdapterConfig::Prompt(_) => ("prompt-tuning", "Prompt-tuning"),
        AdapterConfig::Prefix(_) => ("prefix-tuning", "Prefix-tuning"),
    };
    s += &format!("- {tag}\n- wgtune\n---\n\n# {what} adapter trained with wgtune\n\n");
    s += &format!(
        "A PEFT {PEFT_VERSION} `{}` adapter. Load it with\n\n```python\n\
         from peft import AutoPeftModelForCausalLM\n\
         model = AutoPeftModelForCausalLM.from_pretrained(\"<this folder>\")\n```\n",
        cfg.peft_type()
    );
    if !matches!(cfg, AdapterConfig::Lora(_)) {
        s += "\nPEFT 0.21.2's `generate()` mishandles prompt and prefix adapters with \
              transformers 5.x; use a greedy loop over full forward passes, or `wgtune sample`.\n";
    }
    s
}

/// Read an adapter folder written by PEFT or by [`save_adapter`]. Tensors
/// may be F32, F16 or BF16 and come back as f32; they are checked against
/// the config. Errors name the file at fault.
pub fn load_adapter(dir: &Path) -> Result<LoadedAdapter> {
    if !dir.is_dir() {
        return Err(Error::Adapter {
            path: dir.to_path_buf(),
            message: "no such adapter folder".into(),
        });
    }
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(Error::Adapter {
            path: config_path,
            message: format!(
                "missing; an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE} \
                 (as PEFT's save_pretrained writes them)"
            ),
        });
    }
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::Io {
        path: config_path.clone(),
        source: e,
    })?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() {
        let legacy = dir.join(LEGACY_WEIGHTS_FILE);
        return Err(if legacy.is_file() {
            Error::Adapter {
                path: legacy,
                message: format!(
                    "PyTorch pickle adapters are not supported; convert it to {WEIGHTS_FILE}:\n\
                     ---> HINT: python -c \"import torch; from safetensors.torch import save_file; \
                     save_file(torch.load('{LEGACY_WEIGHTS_FILE}'), '{WEIGHTS_FILE}', \
                     metadata={{'format': 'pt'}})\""
                ),
            }
        } else {
            Error::Adapter {
                path: weights_path,
                message: "missing; the adapter's tensors live in this file".into(),
            }
        });
    }
    let bytes = std::fs::read(&weights_path).map_err(|e| Error::Io {
        path: weights_path.clone(),
        source: e,
    })?;
    adapter_from_bytes(dir, &text, &bytes)
}

/// An adapter from the contents of its two files: `config_json` (the text
/// of `adapter_config.json`) and `weights` (the bytes of
/// `adapter_model.safetensors`). `dir` only names the files in errors.
pub fn adapter_from_bytes(dir: &Path, config_json: &str, weights: &[u8]) -> Result<LoadedAdapter> {
    let config = AdapterConfig::from_json_str(&dir.join(CONFIG_FILE), config_json)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let bytes = weights;
    let err = |message: String| Error::Adapter {
        path: weights_path.clone(),
        message,
    };
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        err(format!(
            "not a valid safetensors file ({e}); is it truncated or corrupt?"
        ))
    })?;
    let metadata = SafeTensors::read_metadata(bytes)
        .ok()
        .and_then(|(_, m)| m.metadata().clone())
        .unwrap_or_default();
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(err(format!(
                    "tensor `{name}` has dtype {other:?}; supported: F32, F16, BF16"
                )))
            }
        };
        tensors.insert(name, (view.shape().to_vec(), values));
    }
    config
        .check_tensors(tensors.iter().map(|(n, (s, _))| (n.as_str(), s.as_slice())))
        .map_err(|m| err(format!("does not match {CONFIG_FILE}: {m}")))?;
    Ok(LoadedAdapter {
        config,
        tensors,
        metadata,
    })
}

pub use crate::fsio::write_atomic;

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("wgtune-peft-io-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn test_lora_names_round_trip() {
        let (a, b) = lora_names("transformer.h.1.attn.c_attn");
        assert_eq!(
            a,
            "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"
        );
        assert_eq!(
            parse_lora_name(&a),
            Some(("transformer.h.1.attn.c_attn", LoraMatrix::A))
        );
        assert_eq!(
            parse_lora_name(&b),
            Some(("transformer.h.1.attn.c_attn", LoraMatrix::B))
        );
        assert_eq!(parse_lora_name(PROMPT_EMBEDDINGS), None);
        assert_eq!(parse_lora_name("base_model.model.lora_A.weight"), None);
        assert_eq!(parse_lora_name("base_model.model..lora_A.weight"), None);
    }

    #[test]
    fn test_module_matches_suffix_only_at_dots() {
        assert!(module_matches("model.layers.0.self_attn.q_proj", "q_proj"));
        assert!(module_matches(
            "model.layers.0.self_attn.q_proj",
            "self_attn.q_proj"
        ));
        assert!(module_matches("q_proj", "q_proj"));
        assert!(!module_matches(
            "model.layers.0.self_attn.xq_proj",
            "q_proj"
        ));
        assert!(!module_matches("transformer.h.0.mlp.c_proj", "attn.c_proj"));
    }

    #[test]
    fn test_write_atomic_replaces_and_leaves_no_temp() {
        let d = scratch("atomic");
        let p = d.join("f.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two!").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two!");
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f.txt"]);
        // into a folder that does not exist: an error naming the path, no panic
        let e = write_atomic(&d.join("nope/f.txt"), b"x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope/f.txt"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A 2-token prompt-tuning config of width 3.
    fn tiny_prompt_config() -> AdapterConfig {
        AdapterConfig::Prompt(PromptConfig {
            num_virtual_tokens: 2,
            token_dim: 3,
            num_attention_heads: 1,
            num_layers: 1,
            prompt_tuning_init: "RANDOM".into(),
            prompt_tuning_init_text: None,
            tokenizer_name_or_path: None,
            base_model_name_or_path: None,
        })
    }

    #[test]
    fn test_adapter_from_bytes_matches_load_adapter() {
        let d = scratch("bytes");
        let cfg = tiny_prompt_config();
        let t = [(PROMPT_EMBEDDINGS.to_string(), vec![2, 3], vec![0.5; 6])];
        save_adapter(&d, &cfg, &t).unwrap();
        let text = std::fs::read_to_string(d.join(CONFIG_FILE)).unwrap();
        let weights = std::fs::read(d.join(WEIGHTS_FILE)).unwrap();
        let from_bytes = adapter_from_bytes(&d, &text, &weights).unwrap();
        let from_dir = load_adapter(&d).unwrap();
        assert_eq!(from_bytes.sorted_tensors(), from_dir.sorted_tensors());
        assert_eq!(from_bytes.config, from_dir.config);
        let err = adapter_from_bytes(&d, &text, &weights[..10])
            .unwrap_err()
            .to_string();
        assert!(err.contains(WEIGHTS_FILE), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn test_save_refuses_mismatched_tensors_before_writing() {
        let d = scratch("refuse");
        let cfg = tiny_prompt_config();
        let out = d.join("out");
        let bad = [(PROMPT_EMBEDDINGS.to_string(), vec![2, 3], vec![0.0; 5])];
        assert!(save_adapter(&out, &cfg, &bad).is_err());
        let bad = [(PROMPT_EMBEDDINGS.to_string(), vec![3, 3], vec![0.0; 9])];
        assert!(save_adapter(&out, &cfg, &bad).is_err());
        assert!(!out.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
