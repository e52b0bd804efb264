//! GGUF to Hugging Face: the config from `{arch}.*` metadata, tensors
//! dequantized to f32 under their transformers names (llama.cpp's Q/K row
//! permutation undone, GPT-2's Conv1D weights transposed back), and the
//! tokenizer from `tokenizer.ggml.*`. `import_gguf` writes a folder that
//! every other command loads like any Hugging Face checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value as Json};

use super::config::{Arch, ModelConfig};
use super::gguf::{Gguf, TensorInfo};
use super::gguf_tokenizer::tokenizer_from_gguf;
use crate::error::{Error, Result};
use crate::fsio::write_atomic;
use crate::model::weights::GGUF_LINK;

/// GGUF architectures wgtune imports.
pub const SUPPORTED_GGUF_ARCHS: &str = "llama, qwen2, qwen3, gemma3, gpt2";

/// A GGUF model converted in memory: config.json, the tensors (HF name ->
/// shape, f32 data) and the tokenizer files.
pub struct Imported {
    pub arch: Arch,
    pub config: Json,
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    pub tokenizer_json: Json,
    pub tokenizer_config: Json,
    pub generation_config: Json,
}

fn cfg_err(g: &Gguf, message: String) -> Error {
    Error::Config {
        path: g.path.clone(),
        message,
    }
}

/// A metadata number, as the shortest decimal that round-trips its f32,
/// since GGUF stores `1e-5` as f32 9.99999974e-6.
fn meta_f64(g: &Gguf, key: &str) -> Option<f64> {
    g.get(key).and_then(|v| match v {
        super::gguf::Value::F32(f) => format!("{f}").parse().ok(),
        v => v.as_f64(),
    })
}

fn meta_usize(g: &Gguf, key: &str) -> Result<usize> {
    g.get(key)
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| cfg_err(g, format!("GGUF metadata has no integer `{key}`")))
}

/// The HF name of a llama.cpp tensor name, or None for tensors that have no
/// place in the HF checkpoint.
pub fn hf_name(arch: Arch, name: &str) -> Option<String> {
    let (base, suffix) = name.rsplit_once('.')?;
    let top = |s: &str| Some(format!("{s}.{suffix}"));
    if arch == Arch::Gpt2 {
        return match base {
            "token_embd" => top("transformer.wte"),
            "position_embd" => top("transformer.wpe"),
            "output_norm" => top("transformer.ln_f"),
            "output" => top("lm_head"),
            _ => {
                let rest = base.strip_prefix("blk.")?;
                let (n, part) = rest.split_once('.')?;
                let hf = match part {
                    "attn_norm" => "ln_1",
                    "attn_qkv" => "attn.c_attn",
                    "attn_output" => "attn.c_proj",
                    "ffn_norm" => "ln_2",
                    "ffn_up" => "mlp.c_fc",
                    "ffn_down" => "mlp.c_proj",
                    _ => return None,
                };
                Some(format!("transformer.h.{n}.{hf}.{suffix}"))
            }
        };
    }
    match base {
        "token_embd" => top("model.embed_tokens"),
        "output_norm" => top("model.norm"),
        "output" => top("lm_head"),
        _ => {
            let rest = base.strip_prefix("blk.")?;
            let (n, part) = rest.split_once('.')?;
            let gemma = arch == Arch::Gemma3;
            let hf = match part {
                "attn_norm" => "input_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "attn_q_norm" => "self_attn.q_norm",
                "attn_k_norm" => "self_attn.k_norm",
                // Gemma 3's four norms: llama.cpp's names by position.
                "post_attention_norm" if gemma => "post_attention_layernorm",
                "ffn_norm" if gemma => "pre_feedforward_layernorm",
                "post_ffw_norm" if gemma => "post_feedforward_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                _ => return None,
            };
            Some(format!("model.layers.{n}.{hf}.{suffix}"))
        }
    }
}

/// The llama.cpp tensor name (without `.weight`) of a Hugging Face linear
/// module path such as `model.layers.0.self_attn.q_proj`: the inverse of
/// [`hf_name`] for the modules LoRA adapts.
pub fn gguf_module_name(arch: Arch, module: &str) -> Option<String> {
    let (prefix, table): (&str, &[(&str, &str)]) = if arch == Arch::Gpt2 {
        (
            "transformer.h.",
            &[
                ("attn.c_attn", "attn_qkv"),
                ("attn.c_proj", "attn_output"),
                ("mlp.c_fc", "ffn_up"),
                ("mlp.c_proj", "ffn_down"),
            ],
        )
    } else {
        (
            "model.layers.",
            &[
                ("self_attn.q_proj", "attn_q"),
                ("self_attn.k_proj", "attn_k"),
                ("self_attn.v_proj", "attn_v"),
                ("self_attn.o_proj", "attn_output"),
                ("mlp.gate_proj", "ffn_gate"),
                ("mlp.up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"),
            ],
        )
    };
    // PEFT's paths may keep the root scope or not (GPT-2 without `transformer.`).
    let rest = module
        .strip_prefix(prefix)
        .or_else(|| module.strip_prefix(prefix.trim_start_matches("transformer.")))?;
    let (n, part) = rest.split_once('.')?;
    n.parse::<usize>().ok()?;
    let (_, gguf) = table.iter().find(|(hf, _)| *hf == part)?;
    Some(format!("blk.{n}.{gguf}"))
}

/// The GGUF `general.architecture` of a model family (llama.cpp writes
/// Mistral as `llama`).
pub fn gguf_arch_name(arch: Arch) -> &'static str {
    match arch {
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
        Arch::Gemma3 => "gemma3",
        Arch::Gpt2 => "gpt2",
    }
}

/// llama.cpp's `permute` of q/k rows (the inverse of [`unpermute_qk`]): HF
/// row `h*hd + s*hd/2 + i` goes to GGUF row `h*hd + 2*i + s`.
pub fn permute_qk<T: Copy + Default>(w: &[T], heads: usize, cols: usize) -> Vec<T> {
    let rows = w.len() / cols;
    let hd = rows / heads;
    let mut out = vec![T::default(); w.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for s in 0..2 {
                let src = h * hd + s * hd / 2 + i;
                let dst = h * hd + 2 * i + s;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Undo llama.cpp's `permute` of q/k rows: GGUF row `h*hd + 2*i + s` is HF
/// row `h*hd + s*hd/2 + i` (rotary halves interleaved for its rope kernel).
/// Works on weights (`cols` > 1) and biases (`cols` == 1).
pub fn unpermute_qk<T: Copy + Default>(w: &[T], heads: usize, cols: usize) -> Vec<T> {
    let rows = w.len() / cols;
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![T::default(); w.len()];
    for h in 0..heads {
        for i in 0..half {
            for s in 0..2 {
                let src = h * hd + 2 * i + s;
                let dst = h * hd + s * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = w[r * cols + c];
        }
    }
    out
}

/// The HF config.json for a GGUF's metadata.
fn config_json(g: &Gguf, arch: Arch, vocab: usize, tied: bool) -> Result<Json> {
    let a = g.architecture()?.to_string();
    let k = |s: &str| format!("{a}.{s}");
    let ctx = meta_usize(g, &k("context_length"))?;
    let hidden = meta_usize(g, &k("embedding_length"))?;
    let layers = meta_usize(g, &k("block_count"))?;
    let heads = meta_usize(g, &k("attention.head_count"))?;
    let ff = meta_usize(g, &k("feed_forward_length"))?;
    if arch == Arch::Gpt2 {
        let eps = meta_f64(g, &k("attention.layer_norm_epsilon")).unwrap_or(1e-5);
        return Ok(json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": hidden,
            "n_layer": layers,
            "n_head": heads,
            "n_inner": ff,
            "n_positions": ctx,
            "n_ctx": ctx,
            "vocab_size": vocab,
            "layer_norm_epsilon": eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": tied,
            "torch_dtype": "float32",
        }));
    }
    if let Some(t) = g
        .get(&k("rope.scaling.type"))
        .and_then(|v| v.as_str())
        .filter(|t| *t != "none" && !(arch == Arch::Gemma3 && *t == "linear"))
    {
        return Err(cfg_err(
            g,
            format!("RoPE scaling `{t}` ({a}.rope.scaling.type) is not supported"),
        ));
    }
    // Llama 3.1/3.2: per-dimension divisors of the RoPE frequencies.
    let rope_freq_factors = match g.tensor("rope_freqs.weight") {
        Some(t) => {
            let f = g.dequantize(t)?;
            if f.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
                return Err(cfg_err(
                    g,
                    "`rope_freqs.weight` has a value that is not positive".into(),
                ));
            }
            Some(f)
        }
        None => None,
    };
    let kv_heads = g
        .get(&k("attention.head_count_kv"))
        .and_then(|v| v.as_u64())
        .map_or(heads, |v| v as usize);
    let head_dim = g
        .get(&k("attention.key_length"))
        .or_else(|| g.get(&k("rope.dimension_count")))
        .and_then(|v| v.as_u64())
        .map_or(hidden / heads.max(1), |v| v as usize);
    let eps = meta_f64(g, &k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6);
    let gemma = arch == Arch::Gemma3;
    let theta = meta_f64(g, &k("rope.freq_base")).unwrap_or(if gemma { 1e6 } else { 10_000.0 });
    let (arch_name, model_type) = match arch {
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        Arch::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        Arch::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
        _ => ("LlamaForCausalLM", "llama"),
    };
    let mut cfg = json!({
        "architectures": [arch_name],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": ff,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": ctx,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    if let Some(f) = rope_freq_factors {
        cfg["rope_freq_factors"] = json!(f);
    }
    if gemma {
        gemma3_config(g, &mut cfg, layers, head_dim)?;
    }
    Ok(cfg)
}

/// Gemma 3's keys, as llama.cpp reads them: the window, which layers slide
/// (every 6th is global unless the file says), the sliding layers' RoPE base
/// (10,000 unless the file says) and the attention scale (1/sqrt(head_dim),
/// for the 27B 1/sqrt(hidden / heads), unless the file says).
fn gemma3_config(g: &Gguf, cfg: &mut Json, layers: usize, head_dim: usize) -> Result<()> {
    let a = g.architecture()?.to_string();
    let k = |s: &str| format!("{a}.{s}");
    let window = meta_usize(g, &k("attention.sliding_window"))?;
    let types: Vec<&str> = match g.get(&k("attention.sliding_window_pattern")) {
        Some(v) if v.as_array().is_some() => {
            let flags = v.as_array().unwrap_or_default();
            if flags.len() != layers {
                return Err(cfg_err(
                    g,
                    format!(
                        "{a}.attention.sliding_window_pattern has {} entries for {layers} layers",
                        flags.len()
                    ),
                ));
            }
            flags
                .iter()
                .map(|f| {
                    if f.as_bool() == Some(true) {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect()
        }
        other => {
            let every = other.and_then(|v| v.as_u64()).unwrap_or(6).max(1) as usize;
            (0..layers)
                .map(|i| {
                    if (i + 1) % every == 0 {
                        "full_attention"
                    } else {
                        "sliding_attention"
                    }
                })
                .collect()
        }
    };
    // llama.cpp: Gemma 3 27B (62 layers) scales by (hidden / heads)^-0.5,
    // the others by head_dim^-0.5, as their query_pre_attn_scalar says.
    let hidden = meta_usize(g, &k("embedding_length"))?;
    let heads = meta_usize(g, &k("attention.head_count"))?.max(1);
    let scalar = match meta_f64(g, &k("attention.scale")) {
        Some(s) if s > 0.0 => 1.0 / (s * s),
        _ if layers == 62 => (hidden / heads) as f64,
        _ => head_dim as f64,
    };
    cfg["sliding_window"] = json!(window);
    cfg["layer_types"] = json!(types);
    cfg["rope_local_base_freq"] = json!(meta_f64(g, &k("rope.freq_base_swa")).unwrap_or(10_000.0));
    cfg["query_pre_attn_scalar"] = json!(scalar);
    cfg["hidden_activation"] = json!("gelu_pytorch_tanh");
    cfg.as_object_mut().map(|o| o.remove("hidden_act"));
    if let Some(f) = meta_f64(g, &k("rope.scaling.factor"))
        .filter(|_| g.get(&k("rope.scaling.type")).and_then(|v| v.as_str()) == Some("linear"))
    {
        cfg["rope_scaling"] = json!({"rope_type": "linear", "factor": f});
    }
    Ok(())
}

/// What a GGUF's header says: the architecture, the HF config.json, and
/// whether the output matrix is the embedding (tied). Reads no tensor data
/// except to compare a stored output matrix with the embedding.
pub fn gguf_config(g: &Gguf) -> Result<(Arch, Json, bool)> {
    let a = g.architecture()?;
    let arch = match a {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        "gemma3" => Arch::Gemma3,
        "gpt2" => Arch::Gpt2,
        other => {
            return Err(cfg_err(
                g,
                format!(
                    "unsupported GGUF architecture `{other}`; supported: {SUPPORTED_GGUF_ARCHS}"
                ),
            ))
        }
    };
    let embd = g
        .tensor("token_embd.weight")
        .ok_or_else(|| cfg_err(g, "GGUF has no tensor `token_embd.weight`".into()))?;
    let vocab = embd.shape()[0];
    let tied = match g.tensor("output.weight") {
        None => true,
        // llama.cpp's GPT-2 conversion stores a copy of the embedding.
        Some(o) => o.ty == embd.ty && o.dims == embd.dims && g.raw(o)? == g.raw(embd)?,
    };
    Ok((arch, config_json(g, arch, vocab, tied)?, tied))
}

/// A GGUF model's Hugging Face side, without its tensors: the config, the
/// tokenizer files, and which GGUF tensor each HF tensor name reads.
pub struct GgufMeta {
    pub arch: Arch,
    pub config: Json,
    pub model: ModelConfig,
    /// HF name -> index into `Gguf::tensors` (a tied LM head is absent).
    pub names: BTreeMap<String, usize>,
    pub tokenizer_json: Json,
    pub tokenizer_config: Json,
    pub generation_config: Json,
}

/// Read a GGUF's config, tokenizer and tensor names.
pub fn gguf_meta(g: &Gguf) -> Result<GgufMeta> {
    let (arch, config, tied) = gguf_config(g)?;
    let tok = tokenizer_from_gguf(g)?;
    let cfg_path = g.path.join("config.json");
    let model = ModelConfig::from_json(&config.to_string(), &cfg_path)?;
    let mut names = BTreeMap::new();
    for (i, t) in g.tensors.iter().enumerate() {
        let Some(name) = hf_name(arch, &t.name) else {
            log::warn!(
                "{}: skipping tensor `{}` (no HF counterpart)",
                g.path.display(),
                t.name
            );
            continue;
        };
        if tied && name == "lm_head.weight" {
            continue;
        }
        names.insert(name, i);
    }
    let mut generation_config = json!({});
    for (key, id) in [
        ("bos_token_id", tok.bos_token_id),
        ("eos_token_id", tok.eos_token_id),
        ("pad_token_id", tok.pad_token_id),
    ] {
        if let Some(id) = id {
            generation_config[key] = json!(id);
        }
    }
    let mut config = config;
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(v) = generation_config.get(key) {
            config[key] = v.clone();
        }
    }
    Ok(GgufMeta {
        arch,
        config,
        model,
        names,
        tokenizer_json: tok.tokenizer_json,
        tokenizer_config: tok.tokenizer_config,
        generation_config,
    })
}

/// Whether HF tensor `name` is a GPT-2 `Conv1D` weight ([in, out] in HF,
/// [out, in] in GGUF).
pub(crate) fn is_conv1d(arch: Arch, name: &str) -> bool {
    arch == Arch::Gpt2
        && (name.ends_with("c_attn.weight")
            || name.ends_with("c_proj.weight")
            || name.ends_with("c_fc.weight"))
}

/// The heads whose q/k rows llama.cpp permuted in HF tensor `name`, if any.
pub(crate) fn permuted_heads(arch: Arch, mc: &ModelConfig, name: &str) -> Option<usize> {
    if arch != Arch::Llama {
        return None;
    }
    if name.ends_with("q_proj.weight") || name.ends_with("q_proj.bias") {
        Some(mc.heads)
    } else if name.ends_with("k_proj.weight") || name.ends_with("k_proj.bias") {
        Some(mc.kv_heads)
    } else {
        None
    }
}

/// Convert a GGUF model in memory.
pub fn convert_gguf(g: &Gguf) -> Result<Imported> {
    let meta = gguf_meta(g)?;
    let mut tensors = BTreeMap::new();
    for (name, &i) in &meta.names {
        let (shape, data) = convert_tensor(g, meta.arch, &meta.model, &g.tensors[i], name)?;
        tensors.insert(name.clone(), (shape, data));
    }
    Ok(Imported {
        arch: meta.arch,
        config: meta.config,
        tensors,
        tokenizer_json: meta.tokenizer_json,
        tokenizer_config: meta.tokenizer_config,
        generation_config: meta.generation_config,
    })
}

/// One tensor as f32 under its HF name and shape.
pub(crate) fn convert_tensor(
    g: &Gguf,
    arch: Arch,
    mc: &ModelConfig,
    t: &TensorInfo,
    name: &str,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let shape = t.shape();
    let data = g.dequantize(t)?;
    let cols = if shape.len() == 2 { shape[1] } else { 1 };
    if shape.len() == 2 && is_conv1d(arch, name) {
        // HF Conv1D keeps [in, out]; llama.cpp stores [out, in].
        return Ok((
            vec![shape[1], shape[0]],
            transpose(&data, shape[0], shape[1]),
        ));
    }
    if arch == Arch::Gemma3 && name.ends_with("norm.weight") {
        // llama.cpp's converter stores Gemma's (1 + w); HF stores w.
        return Ok((shape, data.into_iter().map(|x| x - 1.0).collect()));
    }
    Ok(match permuted_heads(arch, mc, name) {
        Some(h) => (shape, unpermute_qk(&data, h, cols)),
        None => (shape, data),
    })
}

/// The narrowest of f16, bf16 and f32 that holds every value of `d` exactly,
/// and the little-endian bytes in it. GGUF f16/bf16 tensors stay 16-bit;
/// dequantized blocks are exact in f32 (and sometimes in 16 bits).
fn lossless_bytes(d: &[f32]) -> (Dtype, Vec<u8>) {
    if d.iter()
        .all(|x| half::f16::from_f32(*x).to_f32().to_bits() == x.to_bits())
    {
        return (
            Dtype::F16,
            d.iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
        );
    }
    if d.iter()
        .all(|x| half::bf16::from_f32(*x).to_f32().to_bits() == x.to_bits())
    {
        return (
            Dtype::BF16,
            d.iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
        );
    }
    (Dtype::F32, bytemuck::cast_slice(d).to_vec())
}

/// Write an imported model as a Hugging Face folder: config.json,
/// model.safetensors (each tensor in the narrowest exact dtype), tokenizer.json, tokenizer_config.json and
/// generation_config.json. Each file is written to a temp file and renamed.
pub fn write_folder(m: &Imported, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let bytes: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = m
        .tensors
        .iter()
        .map(|(n, (s, d))| {
            let (dt, b) = lossless_bytes(d);
            (n.clone(), s.clone(), dt, b)
        })
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (n, s, dt, b) in &bytes {
        let v = TensorView::new(*dt, s.clone(), b).map_err(|e| Error::Weights {
            path: out.join("model.safetensors"),
            message: format!("tensor `{n}`: {e}"),
        })?;
        views.push((n.as_str(), v));
    }
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let st = safetensors::serialize(views, Some(meta)).map_err(|e| Error::Weights {
        path: out.join("model.safetensors"),
        message: e.to_string(),
    })?;
    drop(bytes);
    write_atomic(&out.join("model.safetensors"), &st)?;
    drop(st);
    write_meta_files(
        out,
        &m.tokenizer_json,
        &m.tokenizer_config,
        &m.generation_config,
        &m.config,
    )
}

fn pretty(v: &Json) -> Vec<u8> {
    serde_json::to_vec_pretty(v)
        .expect("invariant: a serde_json::Value (string keys) serializes into a Vec")
}

/// The tokenizer files, then config.json last, so that a folder with
/// config.json is a complete one.
fn write_meta_files(
    out: &Path,
    tokenizer: &Json,
    tokenizer_config: &Json,
    generation: &Json,
    config: &Json,
) -> Result<()> {
    write_atomic(&out.join("tokenizer.json"), &pretty(tokenizer))?;
    write_atomic(
        &out.join("tokenizer_config.json"),
        &pretty(tokenizer_config),
    )?;
    write_atomic(&out.join("generation_config.json"), &pretty(generation))?;
    write_atomic(&out.join("config.json"), &pretty(config))?;
    Ok(())
}

/// `wgtune import`: convert `gguf` into the folder `out`.
pub fn import_gguf(gguf: &Path, out: &Path) -> Result<Imported> {
    let g = Gguf::open(gguf)?;
    let m = convert_gguf(&g)?;
    write_folder(&m, out)?;
    Ok(m)
}

/// Where `--model file.gguf` is imported: a folder under the user's cache
/// named by the file's name, size and modification time, so an edited or
/// replaced file is imported again.
pub fn cache_dir_for(gguf: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(gguf).map_err(|source| Error::Io {
        path: gguf.to_path_buf(),
        source,
    })?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let stem = gguf
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    Ok(wgtune_cache_dir()
        .join("gguf")
        .join(format!("{stem}-{:x}-{mtime:x}", meta.len())))
}

/// `$WGTUNE_CACHE`, else `$XDG_CACHE_HOME/wgtune`, else `~/.cache/wgtune`.
pub fn wgtune_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("WGTUNE_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("wgtune");
    }
    home_dir().join(".cache").join("wgtune")
}

pub(crate) fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A GGUF model as a folder: its config and tokenizer files written into the
/// cache on first use, with a link (`weights.gguf.json`) through which the
/// weights are read from the GGUF itself, memory-mapped. No converted copy
/// of the weights is written.
pub fn gguf_as_folder(gguf: &Path) -> Result<PathBuf> {
    let dir = cache_dir_for(gguf)?;
    if dir.join("config.json").exists() && dir.join(GGUF_LINK).exists() {
        log::info!("using {} (metadata of {})", dir.display(), gguf.display());
        return Ok(dir);
    }
    let g = Gguf::open(gguf)?;
    let meta = gguf_meta(&g)?;
    let abs = std::fs::canonicalize(gguf).map_err(|source| Error::Io {
        path: gguf.to_path_buf(),
        source,
    })?;
    std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
        path: dir.clone(),
        source,
    })?;
    let link = json!({ "gguf": abs.to_string_lossy() });
    write_atomic(&dir.join(GGUF_LINK), &pretty(&link))?;
    write_meta_files(
        &dir,
        &meta.tokenizer_json,
        &meta.tokenizer_config,
        &meta.generation_config,
        &meta.config,
    )?;
    Ok(dir)
}
