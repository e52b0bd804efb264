//! Model configuration: `HfConfig` mirrors Hugging Face `config.json`;
//! `ModelConfig` is the resolved form the model code uses. The architecture
//! comes from `model_type`; anything else is an error listing what is
//! supported.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The architectures wgtune runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3, SmolLM/SmolLM2, TinyLlama: RMSNorm, RoPE, SwiGLU, GQA.
    Llama,
    /// Mistral: the Llama block (its sliding window is beyond our lengths).
    Mistral,
    /// Qwen2: the Llama block with q/k/v biases.
    Qwen2,
    /// GPT-2: LayerNorm, learned positions, tanh-GELU, Conv1D weights.
    Gpt2,
}

/// `model_type` values accepted, for error messages.
pub const SUPPORTED: &str = "llama, mistral, qwen2, gpt2";

/// Llama 3 style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// The subset of `config.json` wgtune reads. Llama-family and GPT-2 names
/// are both accepted; `into_config` resolves them.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 writes `rope_parameters` (theta and scaling together).
    pub rope_parameters: Option<serde_json::Value>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    // GPT-2 names.
    pub n_embd: Option<usize>,
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub n_inner: Option<usize>,
    pub n_positions: Option<usize>,
    pub layer_norm_epsilon: Option<f64>,
}

/// A resolved model configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    /// C
    pub hidden: usize,
    /// F (MLP inner width)
    pub intermediate: usize,
    /// L
    pub layers: usize,
    /// NH
    pub heads: usize,
    /// KVH
    pub kv_heads: usize,
    /// HD
    pub head_dim: usize,
    /// V
    pub vocab: usize,
    pub max_positions: usize,
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    pub tie_embeddings: bool,
    /// q/k/v projections carry biases (qwen2, or `attention_bias`).
    pub qkv_bias: bool,
}

fn need<T>(v: Option<T>, field: &str, path: &Path) -> Result<T> {
    v.ok_or_else(|| Error::Config {
        path: path.to_path_buf(),
        message: format!("missing field `{field}`"),
    })
}

impl HfConfig {
    /// Resolve into a [`ModelConfig`]; `path` is only used in errors.
    pub fn into_config(self, path: &Path) -> Result<ModelConfig> {
        let bad = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let mt = need(self.model_type.clone(), "model_type", path)?;
        let arch = match mt.as_str() {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "gpt2" => Arch::Gpt2,
            other => {
                return Err(bad(format!(
                    "unsupported model_type `{other}`; supported: {SUPPORTED}"
                )))
            }
        };
        let cfg = if arch == Arch::Gpt2 {
            let hidden = need(self.n_embd.or(self.hidden_size), "n_embd", path)?;
            let heads = need(self.n_head.or(self.num_attention_heads), "n_head", path)?;
            ModelConfig {
                arch,
                hidden,
                intermediate: self.n_inner.unwrap_or(4 * hidden),
                layers: need(self.n_layer.or(self.num_hidden_layers), "n_layer", path)?,
                heads,
                kv_heads: heads,
                head_dim: hidden.checked_div(heads).unwrap_or(0),
                vocab: need(self.vocab_size, "vocab_size", path)?,
                max_positions: need(
                    self.n_positions.or(self.max_position_embeddings),
                    "n_positions",
                    path,
                )?,
                norm_eps: self.layer_norm_epsilon.unwrap_or(1e-5),
                rope_theta: 0.0,
                rope_scaling: None,
                tie_embeddings: self.tie_word_embeddings.unwrap_or(true),
                qkv_bias: true,
            }
        } else {
            let hidden = need(self.hidden_size, "hidden_size", path)?;
            let heads = need(self.num_attention_heads, "num_attention_heads", path)?;
            ModelConfig {
                arch,
                hidden,
                intermediate: need(self.intermediate_size, "intermediate_size", path)?,
                layers: need(self.num_hidden_layers, "num_hidden_layers", path)?,
                heads,
                kv_heads: self.num_key_value_heads.unwrap_or(heads),
                head_dim: self
                    .head_dim
                    .unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
                vocab: need(self.vocab_size, "vocab_size", path)?,
                max_positions: need(
                    self.max_position_embeddings,
                    "max_position_embeddings",
                    path,
                )?,
                norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
                rope_theta: self
                    .rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|t| t.as_f64())
                    .or(self.rope_theta)
                    .unwrap_or(10_000.0),
                rope_scaling: parse_scaling(
                    self.rope_parameters.as_ref().or(self.rope_scaling.as_ref()),
                    path,
                )?,
                tie_embeddings: self.tie_word_embeddings.unwrap_or(false),
                qkv_bias: arch == Arch::Qwen2 || self.attention_bias.unwrap_or(false),
            }
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

fn parse_scaling(v: Option<&serde_json::Value>, path: &Path) -> Result<Option<Llama3Scaling>> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("");
    let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
    match kind {
        "default" | "" => Ok(None),
        "llama3" => {
            let get = |k: &str| {
                num(k).ok_or_else(|| Error::Config {
                    path: path.to_path_buf(),
                    message: format!("rope_scaling.{k} missing"),
                })
            };
            Ok(Some(Llama3Scaling {
                factor: get("factor")?,
                low_freq_factor: get("low_freq_factor")?,
                high_freq_factor: get("high_freq_factor")?,
                original_max_position_embeddings: get("original_max_position_embeddings")? as usize,
            }))
        }
        other => Err(Error::Config {
            path: path.to_path_buf(),
            message: format!(
                "unsupported rope_scaling type `{other}`; supported: llama3 (or none)"
            ),
        }),
    }
}

impl ModelConfig {
    /// Read and resolve `config.json`.
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_json(&text, path)
    }

    /// Resolve config JSON text; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<ModelConfig> {
        let hf: HfConfig = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("not valid config JSON: {e}"),
        })?;
        hf.into_config(path)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| {
            Err(Error::Config {
                path: path.to_path_buf(),
                message: m,
            })
        };
        if self.hidden == 0
            || self.layers == 0
            || self.heads == 0
            || self.vocab == 0
            || self.kv_heads == 0
        {
            return bad(
                "hidden size, layers, heads, kv heads and vocab must all be positive".into(),
            );
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} attention heads are not a multiple of {} key/value heads",
                self.heads, self.kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be positive and even",
                self.head_dim
            ));
        }
        Ok(())
    }
}

impl ModelConfig {
    /// Number of K/V channels per token (kv_heads * head_dim).
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// RoPE inverse frequencies as transformers computes them: in f32, with
    /// the llama3 rescaling applied when configured. Computing them in f64
    /// instead would move angles at position ~2000 by ~1e-4 rad off the
    /// reference.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base = self.rope_theta as f32;
        let mut inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
            .collect();
        if let Some(s) = &self.rope_scaling {
            let old = s.original_max_position_embeddings as f32;
            let (lo, hi, factor) = (
                s.low_freq_factor as f32,
                s.high_freq_factor as f32,
                s.factor as f32,
            );
            let low_wavelen = old / lo;
            let high_wavelen = old / hi;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                let scaled = if wavelen > low_wavelen {
                    *f / factor
                } else {
                    *f
                };
                // Written so that NaN counts as medium, as in transformers.
                let medium = wavelen >= high_wavelen && wavelen <= low_wavelen || wavelen.is_nan();
                *f = if medium {
                    let smooth = (old / wavelen - lo) / (hi - lo);
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                } else {
                    scaled
                };
            }
        }
        inv
    }

    /// (cos, sin) tables (max_positions, head_dim / 2): the angle is the f32
    /// product pos * inv_freq (as in transformers), its cos/sin taken in f64.
    pub fn rope_tables(&self) -> (Vec<f32>, Vec<f32>) {
        let inv = self.rope_inv_freq();
        let n = self.max_positions * inv.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for pos in 0..self.max_positions {
            for &f in &inv {
                let a = (pos as f32 * f) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        (cos, sin)
    }
}
