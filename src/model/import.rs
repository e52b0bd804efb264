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

/// GGUF architectures wgtune imports.
pub const SUPPORTED_GGUF_ARCHS: &str = "llama, qwen2, gpt2";

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
            let hf = match part {
                "attn_norm" => "input_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
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

/// Undo llama.cpp's `permute` of q/k rows: GGUF row `h*hd + 2*i + s` is HF
/// row `h*hd + s*hd/2 + i` (rotary halves interleaved for its rope kernel).
/// Works on weights (`cols` > 1) and biases (`cols` == 1).
pub fn unpermute_qk(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
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
        .filter(|t| *t != "none")
    {
        return Err(cfg_err(
            g,
            format!("RoPE scaling `{t}` ({a}.rope.scaling.type) is not supported"),
        ));
    }
    if g.tensor("rope_freqs.weight").is_some() {
        return Err(cfg_err(
            g,
            "this GGUF carries `rope_freqs.weight` (Llama 3.1-style RoPE scaling), whose \
             parameters GGUF does not record; import the Hugging Face checkpoint instead"
                .into(),
        ));
    }
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
    let theta = meta_f64(g, &k("rope.freq_base")).unwrap_or(10_000.0);
    let (arch_name, model_type) = match arch {
        Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        _ => ("LlamaForCausalLM", "llama"),
    };
    Ok(json!({
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
    }))
}

/// What a GGUF's header says: the architecture, the HF config.json, and
/// whether the output matrix is the embedding (tied). Reads no tensor data
/// except to compare a stored output matrix with the embedding.
pub fn gguf_config(g: &Gguf) -> Result<(Arch, Json, bool)> {
    let a = g.architecture()?;
    let arch = match a {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
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

/// Convert a GGUF model in memory.
pub fn convert_gguf(g: &Gguf) -> Result<Imported> {
    let (arch, config, tied) = gguf_config(g)?;
    let tok = tokenizer_from_gguf(g)?;
    let cfg_path = g.path.join("config.json");
    let mc = ModelConfig::from_json(&config.to_string(), &cfg_path)?;
    let mut tensors = BTreeMap::new();
    for t in &g.tensors {
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
        let (shape, data) = convert_tensor(g, arch, &mc, t, &name)?;
        tensors.insert(name, (shape, data));
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
    Ok(Imported {
        arch,
        config,
        tensors,
        tokenizer_json: tok.tokenizer_json,
        tokenizer_config: tok.tokenizer_config,
        generation_config,
    })
}

fn convert_tensor(
    g: &Gguf,
    arch: Arch,
    mc: &ModelConfig,
    t: &TensorInfo,
    name: &str,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let shape = t.shape();
    let data = g.dequantize(t)?;
    let cols = if shape.len() == 2 { shape[1] } else { 1 };
    Ok(match arch {
        Arch::Gpt2
            if shape.len() == 2
                && (name.ends_with("c_attn.weight")
                    || name.ends_with("c_proj.weight")
                    || name.ends_with("c_fc.weight")) =>
        {
            // HF Conv1D keeps [in, out]; llama.cpp stores [out, in].
            (
                vec![shape[1], shape[0]],
                transpose(&data, shape[0], shape[1]),
            )
        }
        Arch::Llama if name.ends_with("q_proj.weight") || name.ends_with("q_proj.bias") => {
            (shape, unpermute_qk(&data, mc.heads, cols))
        }
        Arch::Llama if name.ends_with("k_proj.weight") || name.ends_with("k_proj.bias") => {
            (shape, unpermute_qk(&data, mc.kv_heads, cols))
        }
        _ => (shape, data),
    })
}

/// Write an imported model as a Hugging Face folder: config.json,
/// model.safetensors (f32), tokenizer.json, tokenizer_config.json and
/// generation_config.json. Each file is written to a temp file and renamed.
pub fn write_folder(m: &Imported, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = m
        .tensors
        .iter()
        .map(|(n, (s, d))| (n.clone(), s.clone(), bytemuck::cast_slice(d).to_vec()))
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (n, s, b) in &bytes {
        let v = TensorView::new(Dtype::F32, s.clone(), b).map_err(|e| Error::Weights {
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
    let pretty = |v: &Json| {
        serde_json::to_vec_pretty(v)
            .expect("invariant: a serde_json::Value (string keys) serializes into a Vec")
    };
    write_atomic(&out.join("tokenizer.json"), &pretty(&m.tokenizer_json))?;
    write_atomic(
        &out.join("tokenizer_config.json"),
        &pretty(&m.tokenizer_config),
    )?;
    write_atomic(
        &out.join("generation_config.json"),
        &pretty(&m.generation_config),
    )?;
    // Last, so a folder with config.json is a complete one.
    write_atomic(&out.join("config.json"), &pretty(&m.config))?;
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

/// A GGUF model as a folder: imported into the cache on first use.
pub fn gguf_as_folder(gguf: &Path) -> Result<PathBuf> {
    let dir = cache_dir_for(gguf)?;
    if dir.join("config.json").exists() {
        log::info!("using {} (imported from {})", dir.display(), gguf.display());
        return Ok(dir);
    }
    println!("importing {} into {} (once)", gguf.display(), dir.display());
    import_gguf(gguf, &dir)?;
    Ok(dir)
}
