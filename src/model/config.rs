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
    /// Qwen3: the Llama block with per-head RMSNorm on q and k.
    Qwen3,
    /// Gemma 3 (text): (1 + w) RMSNorms before and after attention and the
    /// MLP, q/k norms, GeGLU, scaled embeddings, sliding-window layers.
    Gemma3,
    /// GPT-2: LayerNorm, learned positions, tanh-GELU, Conv1D weights.
    Gpt2,
}

/// `model_type` values accepted, for error messages.
pub const SUPPORTED: &str = "llama, mistral, qwen2, qwen3, gemma3_text (gemma3), gpt2";

/// Positions wgtune gives a RoPE model at most (`max_positions` is capped
/// here): Gemma 3 allows 131,072, whose tables (two bases) would take
/// 256 MiB of GPU memory for sequences far beyond what trains on a laptop.
pub const MAX_TABLE_POSITIONS: usize = 32_768;

/// The gated MLP's activation: act(gate) * up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GluAct {
    /// SwiGLU (`silu`).
    Silu,
    /// GeGLU with the tanh GELU (`gelu_pytorch_tanh`).
    GeluTanh,
}

/// A layer's attention span (`layer_types`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerAttn {
    Full,
    /// Keys within `sliding_window` positions of the query.
    Sliding,
}

/// RoPE frequency scaling of the full-attention layers.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Llama3(Llama3Scaling),
    /// Every frequency divided by `factor` (`rope_type: linear`).
    Linear {
        factor: f64,
    },
}

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
    // Gemma 3 and sliding windows.
    pub query_pre_attn_scalar: Option<f64>,
    pub sliding_window: Option<usize>,
    pub sliding_window_pattern: Option<usize>,
    pub layer_types: Option<Vec<String>>,
    pub rope_local_base_freq: Option<f64>,
    pub hidden_activation: Option<String>,
    pub hidden_act: Option<String>,
    pub use_sliding_window: Option<bool>,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    /// Per-dimension RoPE frequency divisors (a GGUF's `rope_freqs.weight`,
    /// which `wgtune import` writes here: Llama 3.1-style scaling whose
    /// parameters the GGUF does not record).
    pub rope_freq_factors: Option<Vec<f32>>,
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
    /// `max_position_embeddings`, at most [`MAX_TABLE_POSITIONS`] for RoPE
    /// models.
    pub max_positions: usize,
    pub norm_eps: f64,
    /// RoPE base of the full-attention layers.
    pub rope_theta: f64,
    /// Scaling of the full-attention layers' RoPE.
    pub rope_scaling: Option<RopeScaling>,
    /// Per-dimension divisors of the inverse frequencies (GGUF
    /// `rope_freqs.weight`), applied instead of `rope_scaling`.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// RoPE base of the sliding-window layers (Gemma 3), unscaled; `None`:
    /// they use the full layers' RoPE.
    pub rope_local_theta: Option<f64>,
    pub tie_embeddings: bool,
    /// q/k/v projections carry biases (qwen2, or `attention_bias`).
    pub qkv_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (qwen3, gemma3).
    pub qk_norm: bool,
    /// Norms after attention and after the MLP too (gemma3).
    pub sandwich_norms: bool,
    /// RMSNorm scales by (1 + weight) (gemma3).
    pub norm_plus_one: bool,
    /// Token embeddings are multiplied by this (gemma3: sqrt(hidden) in f32).
    pub embed_scale: Option<f32>,
    pub glu_act: GluAct,
    /// Attention scores are scaled by this^-0.5 (default head_dim).
    pub query_pre_attn_scalar: Option<f64>,
    /// Window of the sliding layers.
    pub sliding_window: Option<usize>,
    /// One per layer.
    pub layer_types: Vec<LayerAttn>,
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
            "qwen3" => Arch::Qwen3,
            "gemma3_text" | "gemma3" => Arch::Gemma3,
            "gpt2" => Arch::Gpt2,
            other => {
                return Err(bad(format!(
                    "unsupported model_type `{other}`; supported: {SUPPORTED}"
                )))
            }
        };
        if mt == "gemma3" && self.hidden_size.is_none() {
            return Err(bad(
                "a multimodal Gemma 3 checkpoint (model_type gemma3 with a text_config); \
                 only the text model (gemma3_text, e.g. gemma-3-270m, gemma-3-1b) is supported"
                    .into(),
            ));
        }
        for (key, v) in [
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
        ] {
            if let Some(v) = v {
                return Err(bad(format!("`{key}` ({v}) is not supported")));
            }
        }
        let cfg = if arch == Arch::Gpt2 {
            let hidden = need(self.n_embd.or(self.hidden_size), "n_embd", path)?;
            let heads = need(self.n_head.or(self.num_attention_heads), "n_head", path)?;
            let layers = need(self.n_layer.or(self.num_hidden_layers), "n_layer", path)?;
            ModelConfig {
                arch,
                hidden,
                intermediate: self.n_inner.unwrap_or(4 * hidden),
                layers,
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
                rope_freq_factors: None,
                rope_local_theta: None,
                tie_embeddings: self.tie_word_embeddings.unwrap_or(true),
                qkv_bias: true,
                qk_norm: false,
                sandwich_norms: false,
                norm_plus_one: false,
                embed_scale: None,
                glu_act: GluAct::Silu,
                query_pre_attn_scalar: None,
                sliding_window: None,
                layer_types: vec![LayerAttn::Full; layers],
            }
        } else {
            let gemma = arch == Arch::Gemma3;
            let hidden = need(self.hidden_size, "hidden_size", path)?;
            let heads = need(self.num_attention_heads, "num_attention_heads", path)?;
            let layers = need(self.num_hidden_layers, "num_hidden_layers", path)?;
            // transformers 5 writes `rope_parameters`: one dict, or for
            // Gemma 3 one per layer type.
            let rp = self.rope_parameters.as_ref().filter(|v| !v.is_null());
            let (full_rp, local_rp) = match rp {
                Some(v) if v.get("full_attention").is_some() => {
                    (v.get("full_attention"), v.get("sliding_attention"))
                }
                other => (other, None),
            };
            let theta_of = |v: Option<&serde_json::Value>| {
                v.and_then(|p| p.get("rope_theta")).and_then(|t| t.as_f64())
            };
            let rope_theta = theta_of(full_rp).or(self.rope_theta).unwrap_or(if gemma {
                1_000_000.0
            } else {
                10_000.0
            });
            let rope_scaling = parse_scaling(full_rp.or(self.rope_scaling.as_ref()), path)?;
            let rope_local_theta = if gemma {
                if parse_scaling(local_rp, path)?.is_some() {
                    return Err(bad(
                        "RoPE scaling on the sliding-window layers is not supported".into(),
                    ));
                }
                Some(
                    theta_of(local_rp)
                        .or(self.rope_local_base_freq)
                        .unwrap_or(10_000.0),
                )
            } else {
                None
            };
            let act = (self.hidden_activation.as_deref())
                .or(self.hidden_act.as_deref())
                .unwrap_or(if gemma { "gelu_pytorch_tanh" } else { "silu" });
            let glu_act = match act {
                "silu" | "swish" => GluAct::Silu,
                "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => GluAct::GeluTanh,
                other => {
                    return Err(bad(format!(
                        "MLP activation `{other}` is not supported (silu, gelu_pytorch_tanh)"
                    )))
                }
            };
            let sliding_window = match arch {
                Arch::Gemma3 => Some(self.sliding_window.unwrap_or(4096)),
                // Qwen keeps `sliding_window` even when `use_sliding_window`
                // is false; then only `layer_types` can turn it on.
                Arch::Qwen2 | Arch::Qwen3 if self.use_sliding_window != Some(true) => {
                    self.layer_types.as_ref().and(self.sliding_window)
                }
                _ => self.sliding_window,
            };
            let layer_types = match (&self.layer_types, arch) {
                (Some(types), _) => {
                    if types.len() != layers {
                        return Err(bad(format!(
                            "`layer_types` has {} entries for {layers} layers",
                            types.len()
                        )));
                    }
                    types
                        .iter()
                        .map(|t| match t.as_str() {
                            "full_attention" => Ok(LayerAttn::Full),
                            "sliding_attention" => Ok(LayerAttn::Sliding),
                            other => Err(bad(format!("unsupported layer type `{other}`"))),
                        })
                        .collect::<Result<Vec<_>>>()?
                }
                (None, Arch::Gemma3) => {
                    let every = self.sliding_window_pattern.unwrap_or(6).max(1);
                    (0..layers)
                        .map(|i| {
                            if (i + 1) % every == 0 {
                                LayerAttn::Full
                            } else {
                                LayerAttn::Sliding
                            }
                        })
                        .collect()
                }
                (None, Arch::Qwen2 | Arch::Qwen3) if self.use_sliding_window == Some(true) => {
                    return Err(bad(
                        "`use_sliding_window` without `layer_types` is not supported".into(),
                    ))
                }
                // Mistral: a window, when set, applies to every layer.
                (None, _) if sliding_window.is_some() => vec![LayerAttn::Sliding; layers],
                (None, _) => vec![LayerAttn::Full; layers],
            };
            if layer_types.contains(&LayerAttn::Sliding) && sliding_window.is_none_or(|w| w == 0) {
                return Err(bad(
                    "sliding-window layers without a `sliding_window`".into()
                ));
            }
            ModelConfig {
                arch,
                hidden,
                intermediate: need(self.intermediate_size, "intermediate_size", path)?,
                layers,
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
                )?
                .min(MAX_TABLE_POSITIONS),
                norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
                rope_theta,
                rope_scaling,
                rope_freq_factors: self.rope_freq_factors.clone(),
                rope_local_theta,
                tie_embeddings: self.tie_word_embeddings.unwrap_or(gemma),
                qkv_bias: arch == Arch::Qwen2 || self.attention_bias.unwrap_or(false),
                qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
                sandwich_norms: gemma,
                norm_plus_one: gemma,
                // transformers: torch.tensor(hidden_size ** 0.5), float32.
                embed_scale: gemma.then(|| (hidden as f64).sqrt() as f32),
                glu_act,
                query_pre_attn_scalar: if gemma {
                    Some(self.query_pre_attn_scalar.unwrap_or(256.0))
                } else {
                    None
                },
                sliding_window: if layer_types.contains(&LayerAttn::Sliding) {
                    sliding_window
                } else {
                    None
                },
                layer_types,
            }
        };
        cfg.validate(path)?;
        Ok(cfg)
    }
}

fn parse_scaling(v: Option<&serde_json::Value>, path: &Path) -> Result<Option<RopeScaling>> {
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
            Ok(Some(RopeScaling::Llama3(Llama3Scaling {
                factor: get("factor")?,
                low_freq_factor: get("low_freq_factor")?,
                high_freq_factor: get("high_freq_factor")?,
                original_max_position_embeddings: get("original_max_position_embeddings")? as usize,
            })))
        }
        "linear" => match num("factor") {
            Some(f) if f > 0.0 => Ok(Some(RopeScaling::Linear { factor: f })),
            _ => Err(Error::Config {
                path: path.to_path_buf(),
                message: "rope_scaling.factor missing or not positive".into(),
            }),
        },
        other => Err(Error::Config {
            path: path.to_path_buf(),
            message: format!(
                "unsupported rope_scaling type `{other}`; supported: llama3, linear (or none)"
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
        if let Some(f) = &self.rope_freq_factors {
            if f.len() * 2 != self.head_dim {
                return bad(format!(
                    "{} RoPE frequency factors for head_dim {}",
                    f.len(),
                    self.head_dim
                ));
            }
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

    /// RoPE inverse frequencies of the full-attention layers as transformers
    /// computes them: in f32, with the configured scaling (or a GGUF's
    /// per-dimension factors) applied. Computing them in f64 instead would
    /// move angles at position ~2000 by ~1e-4 rad off the reference.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let mut inv = base_inv_freq(self.rope_theta, self.head_dim);
        if let Some(f) = &self.rope_freq_factors {
            // llama.cpp divides each frequency by its factor.
            for (x, f) in inv.iter_mut().zip(f) {
                *x /= *f;
            }
            return inv;
        }
        match &self.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => {
                for f in inv.iter_mut() {
                    *f /= *factor as f32;
                }
            }
            Some(RopeScaling::Llama3(s)) => {
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
                    let medium =
                        wavelen >= high_wavelen && wavelen <= low_wavelen || wavelen.is_nan();
                    *f = if medium {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        inv
    }

    /// (cos, sin) tables of the full-attention layers; see [`rope_tables_of`].
    pub fn rope_tables(&self) -> (Vec<f32>, Vec<f32>) {
        rope_tables_of(&self.rope_inv_freq(), self.max_positions)
    }

    /// RoPE tables the model holds (cos and sin each): 0 for GPT-2, 2 with a
    /// local RoPE.
    pub fn rope_table_count(&self) -> usize {
        match (self.arch, self.rope_local_theta) {
            (Arch::Gpt2, _) => 0,
            (_, Some(_)) => 2,
            (_, None) => 1,
        }
    }

    /// (cos, sin) tables of the sliding-window layers when they have a RoPE
    /// of their own (Gemma 3's local base, unscaled).
    pub fn rope_local_tables(&self) -> Option<(Vec<f32>, Vec<f32>)> {
        let theta = self.rope_local_theta?;
        Some(rope_tables_of(
            &base_inv_freq(theta, self.head_dim),
            self.max_positions,
        ))
    }

    /// The sliding window of layer `l`, if it has one.
    pub fn layer_window(&self, l: usize) -> Option<usize> {
        match self.layer_types.get(l) {
            Some(LayerAttn::Sliding) => self.sliding_window,
            _ => None,
        }
    }

    /// The attention score scale: `query_pre_attn_scalar`^-0.5, else
    /// head_dim^-0.5.
    pub fn attn_scale(&self) -> f32 {
        match self.query_pre_attn_scalar {
            Some(s) => s.powf(-0.5) as f32,
            None => 1.0 / (self.head_dim as f32).sqrt(),
        }
    }
}

/// 1 / base^(2i / d) in f32, as transformers computes the default RoPE.
fn base_inv_freq(theta: f64, d: usize) -> Vec<f32> {
    let base = theta as f32;
    (0..d / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
        .collect()
}

/// (cos, sin) tables (max_positions, head_dim / 2): the angle is the f32
/// product pos * inv_freq (as in transformers), its cos/sin taken in f64.
fn rope_tables_of(inv: &[f32], max_positions: usize) -> (Vec<f32>, Vec<f32>) {
    let n = max_positions * inv.len();
    let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for pos in 0..max_positions {
        for &f in inv {
            let a = (pos as f32 * f) as f64;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}
