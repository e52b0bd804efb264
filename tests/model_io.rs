//! Tier 0: config.json and safetensors loading, including every kind of bad
//! input the loader must turn into an error naming the file or tensor.
//! The files are written here with the safetensors crate; no Python needed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use wgtune::model::config::RopeScaling;
use wgtune::model::{Arch, ModelConfig, Weights};

/// A fresh empty folder under the system temp dir.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgtune-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: HashMap<String, TensorView> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(&views, None, path).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

const LLAMA: &str = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50,
  "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, "tie_word_embeddings": true}"#;

#[test]
fn llama_qwen2_and_gpt2_configs_resolve() {
    let p = Path::new("config.json");
    let c = ModelConfig::from_json(LLAMA, p).unwrap();
    assert_eq!(
        (c.arch, c.hidden, c.heads, c.kv_heads, c.head_dim),
        (Arch::Llama, 64, 4, 2, 16)
    );
    assert!(
        matches!(&c.rope_scaling, Some(RopeScaling::Llama3(s)) if s.factor == 8.0),
        "{:?}",
        c.rope_scaling
    );
    assert!(c.tie_embeddings && !c.qkv_bias);
    let q = ModelConfig::from_json(&LLAMA.replace("\"llama\"", "\"qwen2\""), p).unwrap();
    assert!(q.qkv_bias, "qwen2 has q/k/v biases");
    let g = ModelConfig::from_json(
        r#"{"model_type": "gpt2", "n_embd": 48, "n_layer": 2, "n_head": 3, "vocab_size": 70, "n_positions": 64}"#,
        p,
    )
    .unwrap();
    assert_eq!(
        (g.arch, g.intermediate, g.head_dim, g.kv_heads),
        (Arch::Gpt2, 192, 16, 3)
    );
}

#[test]
fn bad_configs_are_clear_errors() {
    let p = Path::new("/models/x/config.json");
    let e = ModelConfig::from_json(&LLAMA.replace("\"llama\"", "\"mamba\""), p)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("mamba")
            && e.contains("llama, mistral, qwen2, qwen3, gemma3_text (gemma3), gpt2")
            && e.contains("/models/x/config.json"),
        "{e}"
    );
    let e = ModelConfig::from_json(&LLAMA.replace("\"hidden_size\": 64,", ""), p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("hidden_size"), "{e}");
    let e = ModelConfig::from_json(
        &LLAMA.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"),
        p,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("key/value heads"), "{e}");
    // Gemma 3: the multimodal checkpoint, logit soft-capping, a layer list
    // of the wrong length; Llama 3.1: RoPE factors of the wrong length.
    for (edit, want) in [
        (
            r#"{"model_type": "gemma3", "text_config": {}}"#.to_string(),
            "multimodal",
        ),
        (
            LLAMA.replace("\"llama\"", "\"gemma3_text\"").replacen(
                "{",
                r#"{"final_logit_softcapping": 30.0,"#,
                1,
            ),
            "final_logit_softcapping",
        ),
        (
            LLAMA.replacen("{", r#"{"layer_types": ["full_attention"],"#, 1),
            "layer_types",
        ),
        (
            LLAMA.replacen("{", r#"{"rope_freq_factors": [1.0, 2.0],"#, 1),
            "RoPE frequency factors",
        ),
        (
            LLAMA.replacen(
                "{",
                r#"{"layer_types": ["sliding_attention", "full_attention"],"#,
                1,
            ),
            "sliding_window",
        ),
    ] {
        let e = ModelConfig::from_json(&edit, p).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("config.json"), "{e}");
    }
    let e = ModelConfig::from_json("{not json", p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
    let missing = scratch("noconfig").join("config.json");
    let e = ModelConfig::from_file(&missing).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn weights_load_f32_f16_bf16_and_check_shapes() {
    let d = scratch("dtypes");
    let vals = [1.5f32, -2.25, 0.0, 3.0];
    let f16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    write_st(
        &d.join("model.safetensors"),
        &[
            ("a.f32", Dtype::F32, vec![2, 2], f32_bytes(&vals)),
            ("a.f16", Dtype::F16, vec![2, 2], f16),
            ("a.bf16", Dtype::BF16, vec![4], bf16),
            ("a.i64", Dtype::I64, vec![1], vec![0; 8]),
        ],
    );
    let w = Weights::open(&d).unwrap();
    assert_eq!(w.names(), vec!["a.bf16", "a.f16", "a.f32", "a.i64"]);
    for (n, s) in [
        ("a.f32", vec![2, 2]),
        ("a.f16", vec![2, 2]),
        ("a.bf16", vec![4]),
    ] {
        assert_eq!(w.get_f32(n, &s).unwrap(), vals, "{n}");
    }
    let e = w.get_f32("a.f32", &[4, 1]).unwrap_err().to_string();
    assert!(
        e.contains("a.f32") && e.contains("[2, 2]") && e.contains("model.safetensors"),
        "{e}"
    );
    let e = w.get_f32("a.i64", &[1]).unwrap_err().to_string();
    assert!(e.contains("a.i64") && e.contains("I64"), "{e}");
    let e = w
        .get_f32("model.norm.weight", &[4])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.norm.weight") && e.contains("model.safetensors"),
        "{e}"
    );
}

#[test]
fn truncated_and_corrupt_safetensors_are_errors() {
    let d = scratch("truncated");
    let path = d.join("model.safetensors");
    write_st(&path, &[("w", Dtype::F32, vec![64], f32_bytes(&[0.5; 64]))]);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let e = Weights::open(&d)
        .err()
        .expect("truncated file must fail")
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );
    std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage-header}").unwrap();
    let e = Weights::open(&d)
        .err()
        .expect("garbage header must fail")
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(&path, b"abc").unwrap();
    assert!(Weights::open(&d).is_err());
}

#[test]
fn sharded_index_loads_and_missing_shard_is_named() {
    let d = scratch("sharded");
    write_st(
        &d.join("model-00001-of-00002.safetensors"),
        &[("x", Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0]))],
    );
    write_st(
        &d.join("model-00002-of-00002.safetensors"),
        &[("y", Dtype::F32, vec![1], f32_bytes(&[3.0]))],
    );
    let index = r#"{"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}"#;
    std::fs::write(d.join("model.safetensors.index.json"), index).unwrap();
    let w = Weights::open(&d).unwrap();
    assert_eq!(w.get_f32("x", &[2]).unwrap(), vec![1.0, 2.0]);
    assert_eq!(w.get_f32("y", &[1]).unwrap(), vec![3.0]);
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    let e = Weights::open(&d)
        .err()
        .expect("missing shard must fail")
        .to_string();
    assert!(
        e.contains("model-00002-of-00002.safetensors") && e.contains("index.json"),
        "{e}"
    );
    let empty = scratch("empty");
    let e = Weights::open(&empty)
        .err()
        .expect("no weights must fail")
        .to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn weights_from_bytes_and_reader_match_the_file() {
    let d = scratch("bytes");
    let vals = [0.5f32, -1.0, 2.0];
    let path = d.join("model.safetensors");
    write_st(&path, &[("w", Dtype::F32, vec![3], f32_bytes(&vals))]);
    let bytes = std::fs::read(&path).unwrap();
    let a = Weights::from_bytes(vec![("mem".into(), bytes.clone())]).unwrap();
    assert_eq!(a.get_f32("w", &[3]).unwrap(), vals);
    let b = Weights::from_reader("stream", std::io::Cursor::new(bytes)).unwrap();
    assert_eq!(b.get_f32("w", &[3]).unwrap(), vals);
    // Errors name the buffer by its label.
    let e = a.get_f32("nope", &[1]).unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("mem"), "{e}");
    let e = Weights::from_bytes(vec![("junk".into(), vec![1, 2, 3])])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("junk"), "{e}");
}
