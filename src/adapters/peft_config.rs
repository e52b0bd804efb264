//! `adapter_config.json` of Hugging Face PEFT adapters: the LoRA, prompt-
//! and prefix-tuning configs, read and written key for key as PEFT 0.21.2
//! does, with the value rules (`AdapterConfig::validate`) and the check of
//! tensor names and shapes against a config. The files themselves are
//! `peft_io`'s.
//!
//! Length: about 560 lines of code (three configs, each read and written
//! key for key); the rest is unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use super::peft_io::{
    module_matches, parse_lora_name, LoraMatrix, LORA_NAME_PREFIX, PEFT_VERSION, PROMPT_EMBEDDINGS,
    SUPPORTED_PEFT_TYPES, TASK_TYPE,
};
use crate::error::{Error, Result};

/// LoRA's `adapter_config.json` (the keys wgtune uses; the rest are written
/// at PEFT's defaults).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct LoraConfig {
    #[serde(default = "default_r")]
    pub r: usize,
    /// PEFT stores an int when given one; written back as an int when integral.
    #[serde(default = "default_lora_alpha")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module-name suffixes (`q_proj`, `c_attn`, ...), sorted when written.
    #[serde(deserialize_with = "target_modules_de")]
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub use_rslora: bool,
    /// True for GPT-2 (Conv1D base weights). It does not change the LoRA
    /// shapes: A is still (r, in), B (out, r).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// `true` (kaiming-uniform A, zero B), `false`, `"gaussian"`, ...
    #[serde(default = "default_init_lora_weights")]
    pub init_lora_weights: Value,
    /// Only these layer indices are adapted (PEFT's `layers_to_transform`,
    /// an int or a list); `None` or empty: every layer.
    #[serde(default, deserialize_with = "layers_de")]
    pub layers_to_transform: Option<Vec<usize>>,
    /// The module-list names that precede a layer index (PEFT's
    /// `layers_pattern`, a string or a list, read as plain names); empty:
    /// PEFT's default rule ([`peft_layer_index`]).
    #[serde(default, deserialize_with = "names_de")]
    pub layers_pattern: Vec<String>,
}

/// `layers_to_transform`: null, an int, or a list of ints.
fn layers_de<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Vec<usize>>, D::Error> {
    use serde::de::Error as _;
    let idx = |v: &Value| {
        v.as_u64().map(|x| x as usize).ok_or_else(|| {
            D::Error::custom(format!(
                "layers_to_transform entries must be layer indices (ints >= 0), got {v}"
            ))
        })
    };
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::Array(items) => items.iter().map(idx).collect::<Result<_, _>>().map(Some),
        v @ Value::Number(_) => Ok(Some(vec![idx(&v)?])),
        other => Err(D::Error::custom(format!(
            "layers_to_transform must be an int or a list of ints, got {other}"
        ))),
    }
}

/// `layers_pattern`: null, a name, or a list of names. PEFT matches them as
/// regexes; plain names (letters, digits, `_`, `.`) are what wgtune reads.
fn names_de<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    use serde::de::Error as _;
    let names = match Value::deserialize(d)? {
        Value::Null => Vec::new(),
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(D::Error::custom(format!(
                    "layers_pattern entries must be strings, got {other}"
                ))),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(D::Error::custom(format!(
                "layers_pattern must be a string or a list of strings, got {other}"
            )))
        }
    };
    for n in &names {
        if !n
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            return Err(D::Error::custom(format!(
                "unsupported: regex layers_pattern \"{n}\"; give the module list's name (e.g. \"layers\")"
            )));
        }
    }
    Ok(names)
}

/// The layer index PEFT reads from a module path when `layers_to_transform`
/// is set (`check_target_module_exists`, PEFT 0.21): without a pattern the
/// first all-digit component that follows two others and is not the last
/// (regex `.*?\.[^.]*\.(\d+)\.`), e.g. `model.layers.3.self_attn.q_proj` and
/// `transformer.h.3.attn.c_attn` give 3; with patterns, the first pattern
/// that is followed by `.<digits>.` (regex `(?:^|.*?\.)P\.(\d+)\.`).
pub fn peft_layer_index(module_path: &str, layers_pattern: &[String]) -> Option<usize> {
    let parts: Vec<&str> = module_path.split('.').collect();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if layers_pattern.is_empty() {
        // Components 0..j-1 then `.<name>.<digits>.`: j - 1 >= 1.
        return (2..parts.len().saturating_sub(1))
            .find(|&j| digits(parts[j]))
            .and_then(|j| parts[j].parse().ok());
    }
    for pat in layers_pattern {
        let k = pat.split('.').count();
        for j in k..parts.len().saturating_sub(1) {
            if parts[j - k..j].join(".") == *pat && digits(parts[j]) {
                return parts[j].parse().ok();
            }
        }
    }
    None
}

fn default_r() -> usize {
    8
}
fn default_lora_alpha() -> f64 {
    8.0
}
fn default_init_lora_weights() -> Value {
    Value::Bool(true)
}

/// PEFT accepts a list of names or one regex string (matched with
/// `re.fullmatch` against the whole module path). A list is supported, and
/// so is a string that is a plain module name (read as a list of one).
fn target_modules_de<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    use serde::de::Error as _;
    match Value::deserialize(d)? {
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(D::Error::custom(format!(
                    "target_modules entries must be strings, got {other}"
                ))),
            })
            .collect(),
        Value::String(s) if is_plain_module_name(&s) => Ok(vec![s]),
        Value::String(s) => Err(D::Error::custom(format!(
            "unsupported: regex target_modules \"{s}\"; list the module names instead \
             (e.g. [\"q_proj\", \"v_proj\"])"
        ))),
        Value::Null => Err(D::Error::custom(
            "target_modules is null (PEFT then picks per-architecture defaults, which wgtune \
             does not resolve); list the module names",
        )),
        other => Err(D::Error::custom(format!(
            "target_modules must be a list of module names, got {other}"
        ))),
    }
}

fn is_plain_module_name(s: &str) -> bool {
    s != "all-linear" && !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl LoraConfig {
    /// A config with PEFT's defaults for everything but rank, alpha and targets.
    pub fn new(r: usize, lora_alpha: f64, target_modules: &[&str]) -> LoraConfig {
        LoraConfig {
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules: target_modules.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
            fan_in_fan_out: false,
            base_model_name_or_path: None,
            init_lora_weights: Value::Bool(true),
            layers_to_transform: None,
            layers_pattern: Vec::new(),
        }
    }

    /// Whether `module_path` sits in a layer the adapter transforms.
    pub fn transforms_layer(&self, module_path: &str) -> bool {
        match self.layers_to_transform.as_deref() {
            None | Some([]) => true,
            Some(layers) => peft_layer_index(module_path, &self.layers_pattern)
                .is_some_and(|l| layers.contains(&l)),
        }
    }

    /// The factor on `B·A·x`: `lora_alpha / r`, or `lora_alpha / sqrt(r)`
    /// with rsLoRA (PEFT `LoraLayer.update_layer`).
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Whether `module_path` (e.g. `model.layers.0.self_attn.q_proj`) is a
    /// target: its name is in `target_modules` and its layer is transformed.
    pub fn targets(&self, module_path: &str) -> bool {
        self.target_modules
            .iter()
            .any(|t| module_matches(module_path, t))
            && self.transforms_layer(module_path)
    }
}

/// Prompt tuning's `adapter_config.json`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct PromptConfig {
    pub num_virtual_tokens: usize,
    /// The model's hidden size.
    pub token_dim: usize,
    /// The model's **query** head count (PEFT copies `num_attention_heads`
    /// from config.json; unlike prefix tuning it is not the KV count).
    pub num_attention_heads: usize,
    pub num_layers: usize,
    /// `"TEXT"`, `"SAMPLE_VOCAB"` or `"RANDOM"` (PEFT's default).
    #[serde(default = "default_prompt_init")]
    pub prompt_tuning_init: String,
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

fn default_prompt_init() -> String {
    "RANDOM".into()
}

/// The values PEFT's `PromptTuningInit` enum takes.
pub const PROMPT_TUNING_INITS: [&str; 3] = ["TEXT", "SAMPLE_VOCAB", "RANDOM"];

/// Prefix tuning's `adapter_config.json`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct PrefixConfig {
    pub num_virtual_tokens: usize,
    /// kv_heads · head_dim (GQA-aware), not the hidden size.
    pub token_dim: usize,
    /// The **KV** head count.
    pub num_attention_heads: usize,
    pub num_layers: usize,
    /// Width of the projection MLP; PEFT fills in `token_dim` when unset.
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// Trained through Embedding → Linear → tanh → Linear. The saved tensor
    /// is the projected result either way, so a loaded adapter is a plain prefix.
    #[serde(default)]
    pub prefix_projection: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
}

impl PrefixConfig {
    /// `encoder_hidden_size`, defaulting to `token_dim` as PEFT does.
    pub fn encoder_hidden_size(&self) -> usize {
        self.encoder_hidden_size.unwrap_or(self.token_dim)
    }

    /// Per-head width: `token_dim / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.token_dim / self.num_attention_heads.max(1)
    }
}

/// One adapter's config, by PEFT type.
#[derive(Clone, Debug, PartialEq)]
pub enum AdapterConfig {
    Lora(LoraConfig),
    Prompt(PromptConfig),
    Prefix(PrefixConfig),
}

/// Keys that change what a LoRA adapter computes. wgtune implements none of
/// them, so a config that sets one is refused rather than silently misread.
const LORA_UNSUPPORTED_KEYS: [&str; 13] = [
    "use_dora",
    "use_qalora",
    "bias",
    "lora_bias",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "layer_replication",
    "exclude_modules",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_bdlora",
];

/// Whether a key is at its "off" value (null, false, "none", {} or []).
fn is_unset(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::String(s) => s == "none",
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

impl AdapterConfig {
    /// PEFT's `peft_type` string.
    pub fn peft_type(&self) -> &'static str {
        match self {
            AdapterConfig::Lora(_) => "LORA",
            AdapterConfig::Prompt(_) => "PROMPT_TUNING",
            AdapterConfig::Prefix(_) => "PREFIX_TUNING",
        }
    }

    pub fn base_model_name_or_path(&self) -> Option<&str> {
        match self {
            AdapterConfig::Lora(c) => c.base_model_name_or_path.as_deref(),
            AdapterConfig::Prompt(c) => c.base_model_name_or_path.as_deref(),
            AdapterConfig::Prefix(c) => c.base_model_name_or_path.as_deref(),
        }
    }

    /// The full key set PEFT 0.21.2 writes for this type, unknown-to-wgtune
    /// keys at PEFT's defaults. Sorted, as PEFT's `json.dumps(sort_keys=True)`.
    pub fn to_json(&self) -> BTreeMap<&'static str, Value> {
        let mut m: BTreeMap<&'static str, Value> = BTreeMap::new();
        // keys common to every PEFT config
        m.insert("auto_mapping", Value::Null);
        m.insert(
            "base_model_name_or_path",
            json!(self.base_model_name_or_path()),
        );
        m.insert("inference_mode", Value::Bool(true));
        m.insert("modules_to_save", Value::Null);
        m.insert("peft_type", json!(self.peft_type()));
        m.insert("peft_version", json!(PEFT_VERSION));
        m.insert("revision", Value::Null);
        m.insert("task_type", json!(TASK_TYPE));
        match self {
            AdapterConfig::Lora(c) => {
                let mut targets = c.target_modules.clone();
                targets.sort();
                targets.dedup();
                for k in [
                    "alora_invocation_tokens",
                    "arrow_config",
                    "corda_config",
                    "eva_config",
                    "exclude_modules",
                    "kasa_config",
                    "layer_replication",
                    "layers_pattern",
                    "layers_to_transform",
                    "lora_ga_config",
                    "megatron_config",
                    "monteclora_config",
                    "target_parameters",
                    "trainable_token_indices",
                    "use_bdlora",
                    "velora_config",
                ] {
                    m.insert(k, Value::Null);
                }
                for k in ["alpha_pattern", "loftq_config", "rank_pattern"] {
                    m.insert(k, json!({}));
                }
                for k in ["ensure_weight_tying", "lora_bias", "use_dora", "use_qalora"] {
                    m.insert(k, Value::Bool(false));
                }
                m.insert("bias", json!("none"));
                m.insert("megatron_core", json!("megatron.core"));
                m.insert("qalora_group_size", json!(16));
                m.insert("r", json!(c.r));
                m.insert("lora_alpha", int_if_integral(c.lora_alpha));
                m.insert("lora_dropout", json!(c.lora_dropout));
                m.insert("target_modules", json!(targets));
                m.insert("use_rslora", json!(c.use_rslora));
                m.insert("fan_in_fan_out", json!(c.fan_in_fan_out));
                m.insert("init_lora_weights", c.init_lora_weights.clone());
                if let Some(layers) = c.layers_to_transform.as_ref().filter(|l| !l.is_empty()) {
                    m.insert("layers_to_transform", json!(layers));
                }
                if let [one] = c.layers_pattern.as_slice() {
                    m.insert("layers_pattern", json!(one));
                } else if !c.layers_pattern.is_empty() {
                    m.insert("layers_pattern", json!(c.layers_pattern));
                }
            }
            AdapterConfig::Prompt(c) => {
                m.insert("num_virtual_tokens", json!(c.num_virtual_tokens));
                m.insert("token_dim", json!(c.token_dim));
                m.insert("num_attention_heads", json!(c.num_attention_heads));
                m.insert("num_layers", json!(c.num_layers));
                m.insert("num_transformer_submodules", json!(1));
                m.insert("prompt_tuning_init", json!(c.prompt_tuning_init));
                m.insert("prompt_tuning_init_text", json!(c.prompt_tuning_init_text));
                m.insert("tokenizer_name_or_path", json!(c.tokenizer_name_or_path));
                m.insert("tokenizer_kwargs", Value::Null);
            }
            AdapterConfig::Prefix(c) => {
                m.insert("num_virtual_tokens", json!(c.num_virtual_tokens));
                m.insert("token_dim", json!(c.token_dim));
                m.insert("num_attention_heads", json!(c.num_attention_heads));
                m.insert("num_layers", json!(c.num_layers));
                m.insert("num_transformer_submodules", json!(1));
                m.insert("encoder_hidden_size", json!(c.encoder_hidden_size()));
                m.insert("prefix_projection", json!(c.prefix_projection));
                m.insert("init_weights", Value::Null);
            }
        }
        m
    }

    /// `adapter_config.json` text: 2-space indent, sorted keys, no trailing
    /// newline (byte-for-byte PEFT's layout for ASCII configs).
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(&self.to_json())
            .expect("invariant: a map of JSON values serializes")
    }

    /// Parse `adapter_config.json` text. `path` only names the file in errors.
    pub fn from_json_str(path: &Path, text: &str) -> Result<AdapterConfig> {
        let err = |message: String| Error::Adapter {
            path: path.to_path_buf(),
            message,
        };
        let v: Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| err("expected a JSON object".into()))?;
        let supported = SUPPORTED_PEFT_TYPES.join(", ");
        let peft_type = match obj.get("peft_type") {
            Some(Value::String(s)) => s.as_str(),
            _ => {
                return Err(err(format!(
                    "no \"peft_type\" string; wgtune supports {supported}"
                )))
            }
        };
        match obj.get("task_type") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) if t == TASK_TYPE => {}
            Some(other) => {
                return Err(err(format!(
                    "unsupported task_type {other}; wgtune trains causal LMs (\"{TASK_TYPE}\")"
                )))
            }
        }
        let parse_err = |e: serde_json::Error| err(format!("invalid {peft_type} config: {e}"));
        let cfg = match peft_type {
            "LORA" => {
                for key in LORA_UNSUPPORTED_KEYS {
                    if let Some(val) = obj.get(key).filter(|v| !is_unset(v)) {
                        return Err(err(format!(
                            "\"{key}\": {val} is not supported by wgtune (it changes what the \
                             adapter computes); leave it at PEFT's default"
                        )));
                    }
                }
                let c: LoraConfig = serde_json::from_value(v.clone()).map_err(parse_err)?;
                let init_known = matches!(&c.init_lora_weights, Value::Bool(_))
                    || c.init_lora_weights == "gaussian";
                if !init_known {
                    log::warn!(
                        "{}: init_lora_weights {} may have changed the base weights (PiSSA, \
                         OLoRA, LoftQ, ...); wgtune applies the adapter to the unmodified base",
                        path.display(),
                        c.init_lora_weights
                    );
                }
                AdapterConfig::Lora(c)
            }
            "PROMPT_TUNING" | "PREFIX_TUNING" => {
                if let Some(val) = obj.get("modules_to_save").filter(|v| !is_unset(v)) {
                    return Err(err(format!(
                        "\"modules_to_save\": {val} is not supported by wgtune"
                    )));
                }
                match obj.get("num_transformer_submodules") {
                    None | Some(Value::Null) => {}
                    Some(n) if n == 1 => {}
                    Some(n) => {
                        return Err(err(format!(
                            "num_transformer_submodules {n} (an encoder-decoder model) is not \
                             supported; wgtune trains decoder-only models (1)"
                        )))
                    }
                }
                if peft_type == "PROMPT_TUNING" {
                    AdapterConfig::Prompt(serde_json::from_value(v.clone()).map_err(parse_err)?)
                } else {
                    AdapterConfig::Prefix(serde_json::from_value(v.clone()).map_err(parse_err)?)
                }
            }
            other => {
                return Err(err(format!(
                    "unsupported peft_type \"{other}\"; wgtune supports {supported}"
                )))
            }
        };
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    /// The value rules for any config wgtune builds, reads or writes: the
    /// one place they are checked (files when read and written, and every
    /// adapter when built). The message says what is wrong; callers add the
    /// file or option.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match self {
            AdapterConfig::Lora(c) => {
                if c.r == 0 {
                    return Err("r must be at least 1".into());
                }
                if c.target_modules.is_empty() {
                    return Err("target_modules is empty".into());
                }
                if !c.layers_pattern.is_empty() && c.layers_to_transform.is_none() {
                    // PEFT's LoraConfig refuses this too.
                    return Err("layers_pattern is set without layers_to_transform".into());
                }
                if !(0.0..1.0).contains(&c.lora_dropout) {
                    return Err(format!("lora_dropout {} is not in [0, 1)", c.lora_dropout));
                }
                if !(c.lora_alpha.is_finite() && c.lora_alpha > 0.0) {
                    return Err(format!(
                        "lora_alpha {} must be a finite number > 0",
                        c.lora_alpha
                    ));
                }
            }
            AdapterConfig::Prompt(c) => {
                if c.num_virtual_tokens == 0 || c.token_dim == 0 {
                    return Err("num_virtual_tokens and token_dim must be at least 1".into());
                }
                if !PROMPT_TUNING_INITS.contains(&c.prompt_tuning_init.as_str()) {
                    return Err(format!(
                        "prompt_tuning_init \"{}\" is not one of {}",
                        c.prompt_tuning_init,
                        PROMPT_TUNING_INITS.join(", ")
                    ));
                }
            }
            AdapterConfig::Prefix(c) => {
                if c.num_virtual_tokens == 0 || c.token_dim == 0 || c.num_layers == 0 {
                    return Err(
                        "num_virtual_tokens, token_dim and num_layers must be at least 1".into(),
                    );
                }
                if c.num_attention_heads == 0 || c.token_dim % c.num_attention_heads != 0 {
                    return Err(format!(
                        "token_dim {} is not a multiple of num_attention_heads {} (the KV head count)",
                        c.token_dim, c.num_attention_heads
                    ));
                }
            }
        }
        Ok(())
    }

    /// Check tensor names and shapes against this config; the message says
    /// what is wrong (the caller adds the file).
    pub(crate) fn check_tensors<'a>(
        &self,
        tensors: impl Iterator<Item = (&'a str, &'a [usize])>,
    ) -> std::result::Result<(), String> {
        let tensors: BTreeMap<&str, &[usize]> = tensors.collect();
        match self {
            AdapterConfig::Lora(c) => {
                let mut a_mods = BTreeSet::new();
                let mut b_mods = BTreeSet::new();
                for (&name, &shape) in &tensors {
                    let (module, m) = parse_lora_name(name).ok_or_else(|| {
                        format!(
                            "unexpected tensor `{name}` in a LoRA adapter (expected \
                             {LORA_NAME_PREFIX}<module>.lora_A.weight / .lora_B.weight)"
                        )
                    })?;
                    if !c.targets(module) {
                        let layers = match &c.layers_to_transform {
                            Some(l) if !l.is_empty() => format!(" on layers_to_transform {l:?}"),
                            _ => String::new(),
                        };
                        return Err(format!(
                            "tensor `{name}`: module `{module}` is not in target_modules {:?}{layers}",
                            c.target_modules
                        ));
                    }
                    let ok = shape.len() == 2
                        && match m {
                            LoraMatrix::A => shape[0] == c.r,
                            LoraMatrix::B => shape[1] == c.r,
                        };
                    if !ok {
                        let want = match m {
                            LoraMatrix::A => format!("[{}, in_features]", c.r),
                            LoraMatrix::B => format!("[out_features, {}]", c.r),
                        };
                        return Err(format!(
                            "tensor `{name}` has shape {shape:?}, expected {want} (r = {})",
                            c.r
                        ));
                    }
                    match m {
                        LoraMatrix::A => a_mods.insert(module),
                        LoraMatrix::B => b_mods.insert(module),
                    };
                }
                if let Some(m) = a_mods.symmetric_difference(&b_mods).next() {
                    return Err(format!("module `{m}` has only one of lora_A / lora_B"));
                }
                if a_mods.is_empty() {
                    return Err("no LoRA tensors".into());
                }
            }
            AdapterConfig::Prompt(PromptConfig {
                num_virtual_tokens: n,
                token_dim: d,
                ..
            }) => check_single(&tensors, &[*n, *d], "[num_virtual_tokens, token_dim]")?,
            AdapterConfig::Prefix(c) => check_single(
                &tensors,
                &[c.num_virtual_tokens, c.num_layers * 2 * c.token_dim],
                "[num_virtual_tokens, num_layers * 2 * token_dim]",
            )?,
        }
        Ok(())
    }
}

/// Prompt and prefix adapters hold exactly `prompt_embeddings` of `expected`.
fn check_single(
    tensors: &BTreeMap<&str, &[usize]>,
    expected: &[usize],
    formula: &str,
) -> std::result::Result<(), String> {
    if let Some(other) = tensors.keys().find(|&&n| n != PROMPT_EMBEDDINGS) {
        return Err(format!(
            "unexpected tensor `{other}`; this adapter holds only `{PROMPT_EMBEDDINGS}`"
        ));
    }
    let shape = tensors
        .get(PROMPT_EMBEDDINGS)
        .ok_or_else(|| format!("no `{PROMPT_EMBEDDINGS}` tensor"))?;
    if *shape != expected {
        return Err(format!(
            "tensor `{PROMPT_EMBEDDINGS}` has shape {shape:?}, expected {expected:?} = {formula}"
        ));
    }
    Ok(())
}

/// PEFT writes an int `lora_alpha` as an int; keep that for integral values.
fn int_if_integral(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

#[cfg(test)]
mod tests {
    use super::super::peft_io::lora_names;
    use super::*;

    #[test]
    fn test_lora_scaling() {
        let mut c = LoraConfig::new(16, 32.0, &["q_proj"]);
        assert_eq!(c.scaling(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scaling(), 8.0);
    }

    #[test]
    fn test_lora_alpha_written_as_int_when_integral() {
        let mut c = LoraConfig::new(4, 8.0, &["v_proj", "q_proj"]);
        let j = AdapterConfig::Lora(c.clone()).to_json();
        assert_eq!(j["lora_alpha"].to_string(), "8");
        assert_eq!(j["lora_dropout"].to_string(), "0.0");
        assert_eq!(j["target_modules"], json!(["q_proj", "v_proj"]));
        c.lora_alpha = 2.5;
        assert_eq!(
            AdapterConfig::Lora(c).to_json()["lora_alpha"].to_string(),
            "2.5"
        );
    }

    #[test]
    fn test_target_modules_string_forms() {
        let p = Path::new("x/adapter_config.json");
        let ok =
            AdapterConfig::from_json_str(p, r#"{"peft_type": "LORA", "target_modules": "q_proj"}"#)
                .unwrap();
        match ok {
            AdapterConfig::Lora(c) => {
                assert_eq!(c.target_modules, ["q_proj"]);
                assert_eq!((c.r, c.lora_alpha), (8, 8.0));
            }
            _ => panic!("not LoRA"),
        }
        for bad in [r#"".*\\.(q|v)_proj""#, r#""all-linear""#, "null"] {
            let text = format!(r#"{{"peft_type": "LORA", "target_modules": {bad}}}"#);
            let e = AdapterConfig::from_json_str(p, &text)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("x/adapter_config.json") && e.contains("target_modules"),
                "{e}"
            );
        }
        let e = AdapterConfig::from_json_str(
            p,
            r#"{"peft_type": "LORA", "target_modules": "model.*q_proj"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unsupported: regex target_modules"), "{e}");
    }

    #[test]
    fn test_semantics_changing_keys_are_refused() {
        let p = Path::new("a/adapter_config.json");
        for extra in [
            r#""use_dora": true"#,
            r#""bias": "all""#,
            r#""rank_pattern": {"q_proj": 8}"#,
            r#""modules_to_save": ["lm_head"]"#,
        ] {
            let text = format!(r#"{{"peft_type": "LORA", "target_modules": ["q_proj"], {extra}}}"#);
            let e = AdapterConfig::from_json_str(p, &text)
                .unwrap_err()
                .to_string();
            assert!(e.contains("not supported"), "{extra}: {e}");
        }
        // the defaults PEFT writes are accepted
        let text = r#"{"peft_type": "LORA", "target_modules": ["q_proj"], "use_dora": false,
            "bias": "none", "rank_pattern": {}, "layers_to_transform": null, "modules_to_save": null}"#;
        AdapterConfig::from_json_str(p, text).unwrap();
    }

    #[test]
    fn test_peft_layer_index() {
        let none: &[String] = &[];
        for (path, want) in [
            ("model.layers.3.self_attn.q_proj", Some(3)),
            ("transformer.h.12.attn.c_attn", Some(12)),
            ("model.language_model.layers.1.mlp.up_proj", Some(1)),
            // the number must be a whole component followed by another
            ("model.layers.3", None),
            ("layers.3.q_proj", None),
            ("a.b.x3.q", None),
        ] {
            assert_eq!(peft_layer_index(path, none), want, "{path}");
        }
        let pats = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let path = "model.layers.3.self_attn.q_proj";
        assert_eq!(peft_layer_index(path, &pats(&["layers"])), Some(3));
        assert_eq!(peft_layer_index(path, &pats(&["h", "layers"])), Some(3));
        assert_eq!(peft_layer_index(path, &pats(&["model.layers"])), Some(3));
        assert_eq!(peft_layer_index(path, &pats(&["h"])), None);
        assert_eq!(
            peft_layer_index("layers.3.q_proj", &pats(&["layers"])),
            Some(3)
        );
    }

    #[test]
    fn test_layers_to_transform_round_trip() {
        let p = Path::new("a/adapter_config.json");
        let text =
            r#"{"peft_type": "LORA", "target_modules": ["q_proj"], "layers_to_transform": 2}"#;
        let AdapterConfig::Lora(c) = AdapterConfig::from_json_str(p, text).unwrap() else {
            panic!("not LoRA")
        };
        assert_eq!(c.layers_to_transform, Some(vec![2]));
        assert!(c.targets("model.layers.2.self_attn.q_proj"));
        assert!(!c.targets("model.layers.1.self_attn.q_proj"));
        let j = AdapterConfig::Lora(c.clone()).to_json();
        assert_eq!(j["layers_to_transform"], json!([2]));
        assert_eq!(j["layers_pattern"], Value::Null);
        let back =
            AdapterConfig::from_json_str(p, &AdapterConfig::Lora(c.clone()).to_json_string());
        assert_eq!(back.unwrap(), AdapterConfig::Lora(c));
        // an empty list is PEFT's "every layer"
        let text =
            r#"{"peft_type": "LORA", "target_modules": ["q_proj"], "layers_to_transform": []}"#;
        let AdapterConfig::Lora(c) = AdapterConfig::from_json_str(p, text).unwrap() else {
            panic!("not LoRA")
        };
        assert!(c.targets("model.layers.7.self_attn.q_proj"));
    }

    #[test]
    fn test_bad_configs_name_file_and_supported_types() {
        let p = Path::new("d/adapter_config.json");
        let e = AdapterConfig::from_json_str(p, r#"{"peft_type": "IA3"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("d/adapter_config.json: "), "{e}");
        for t in SUPPORTED_PEFT_TYPES {
            assert!(e.contains(t), "{e}");
        }
        for text in ["{", "[]", "{}", r#"{"peft_type": "PROMPT_TUNING"}"#] {
            let e = AdapterConfig::from_json_str(p, text)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("d/adapter_config.json: "), "{e}");
        }
        let e = AdapterConfig::from_json_str(
            p,
            r#"{"peft_type": "LORA", "task_type": "SEQ_CLS", "target_modules": ["q_proj"]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("task_type"), "{e}");
    }

    #[test]
    fn test_tensor_checks() {
        let lora = AdapterConfig::Lora(LoraConfig::new(2, 4.0, &["q_proj"]));
        let (a, b) = lora_names("m.layers.0.q_proj");
        let ok = [
            (a.as_str(), &[2usize, 8][..]),
            (b.as_str(), &[6usize, 2][..]),
        ];
        lora.check_tensors(ok.into_iter()).unwrap();
        let e = lora
            .check_tensors(
                [
                    (a.as_str(), &[3usize, 8][..]),
                    (b.as_str(), &[6usize, 2][..]),
                ]
                .into_iter(),
            )
            .unwrap_err();
        assert!(e.contains("expected [2, in_features]"), "{e}");
        let e = lora
            .check_tensors([(a.as_str(), &[2usize, 8][..])].into_iter())
            .unwrap_err();
        assert!(e.contains("only one of"), "{e}");
        let (a2, _) = lora_names("m.layers.0.k_proj");
        let e = lora
            .check_tensors([(a2.as_str(), &[2usize, 8][..])].into_iter())
            .unwrap_err();
        assert!(e.contains("not in target_modules"), "{e}");

        let prefix = AdapterConfig::Prefix(PrefixConfig {
            num_virtual_tokens: 3,
            token_dim: 8,
            num_attention_heads: 2,
            num_layers: 2,
            encoder_hidden_size: None,
            prefix_projection: false,
            base_model_name_or_path: None,
        });
        prefix
            .check_tensors([(PROMPT_EMBEDDINGS, &[3usize, 32][..])].into_iter())
            .unwrap();
        let e = prefix
            .check_tensors([(PROMPT_EMBEDDINGS, &[3usize, 8][..])].into_iter())
            .unwrap_err();
        assert!(e.contains("num_layers * 2 * token_dim"), "{e}");
    }
}
