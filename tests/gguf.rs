//! GGUF reading without a GPU: dequantization of every supported type
//! against gguf-py's `dequantize`, llama.cpp's Q/K permutation undone as
//! transformers undoes it, the HF config and names, and clear errors for
//! unsupported types, unknown architectures and truncated files. Reference
//! values: tests/reference/gguf_generate.py.

#[path = "common/mod.rs"]
#[macro_use]
mod common;
#[path = "gguf/tokenizer.rs"]
mod tokenizer;

use std::path::Path;

use common::reference::{data_dir, json, quant_case, Arrays, QUANT_TYPES};
use wgtune::model::gguf::{dequantize_into, Gguf};
use wgtune::model::import::convert_gguf;
use wgtune::model::ModelConfig;

fn gguf(name: &str) -> Gguf {
    Gguf::open(&data_dir(&format!("gguf/{name}"))).unwrap()
}

#[test]
fn dequantize_matches_gguf_py() {
    let g = gguf("quants.gguf");
    let want = Arrays::open("gguf/quants_expected.safetensors");
    let types = [
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
    ];
    for ty in types {
        let name = format!("quant.{ty}");
        let t = g.tensor(&name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(t.ty.name(), ty);
        assert_eq!(t.shape(), want.shape(&name), "{name}");
        let got = g.dequantize(t).unwrap();
        let exp = want.f32(&name);
        let bad = got
            .iter()
            .zip(&exp)
            .filter(|(a, b)| a.to_bits() != b.to_bits() && (*a - *b).abs() > 0.0)
            .count();
        let max = got
            .iter()
            .zip(&exp)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{ty}: {} values, max |diff| {max:e}", got.len());
        assert_eq!(
            bad, 0,
            "{name}: {bad} values differ from gguf-py (max {max})"
        );
    }
}

/// Each type on its own odd-shaped tensor (tests/reference/quant_generate.py: 5 or 7 rows, 37
/// columns or an odd number of blocks, random block bytes with edge-value scales), decoded whole
/// and row by row: bit-identical to gguf-py (-0.0 included).
#[test]
fn dequantize_each_format_bit_exact() {
    for ty in QUANT_TYPES {
        let c = quant_case(ty);
        let name = ty.name();
        let mut whole = vec![f32::NAN; c.rows * c.cols];
        dequantize_into(ty, &c.raw, &mut whole);
        let row_bytes = c.raw.len() / c.rows;
        let mut by_row = vec![f32::NAN; c.rows * c.cols];
        for (r, out) in by_row.chunks_exact_mut(c.cols).enumerate() {
            dequantize_into(ty, &c.raw[r * row_bytes..(r + 1) * row_bytes], out);
        }
        assert_eq!(c.expected.len(), whole.len(), "{name}");
        for (got, how) in [(&whole, "whole"), (&by_row, "by row")] {
            let bad: Vec<usize> = (0..got.len())
                .filter(|&i| got[i].to_bits() != c.expected[i].to_bits())
                .collect();
            if let Some(&i) = bad.first() {
                panic!(
                    "{name} [{}, {}] ({how}): {} of {} values differ from gguf-py; first at row {} col {}: {:e} vs {:e}",
                    c.rows, c.cols, bad.len(), got.len(), i / c.cols, i % c.cols, got[i], c.expected[i]
                );
            }
        }
        let max = c.expected.iter().fold(0f32, |a, x| a.max(x.abs()));
        eprintln!(
            "{name} [{}, {}]: {} raw bytes, bit-exact (max |value| {max:e})",
            c.rows,
            c.cols,
            c.raw.len()
        );
    }
}

#[test]
fn unsupported_type_is_named() {
    let g = gguf("unsupported-quant.gguf");
    let t = &g.tensors[0];
    let e = g.dequantize(t).unwrap_err().to_string();
    assert!(
        e.contains("Q2_K") && e.contains(&t.name) && e.contains("Q5_1"),
        "{e}"
    );
}

#[test]
fn unknown_architecture_is_an_error() {
    let g = gguf("unknown-arch.gguf");
    let e = convert_gguf(&g)
        .err()
        .expect("falcon must be rejected")
        .to_string();
    assert!(
        e.contains("falcon") && e.contains("llama, qwen2, qwen3, gemma3, gpt2"),
        "{e}"
    );
}

#[test]
fn truncated_or_corrupt_files_are_errors() {
    let src = data_dir("gguf/tiny-qwen2.gguf");
    let bytes = std::fs::read(&src).unwrap();
    let dir = std::env::temp_dir().join(format!("wgtune-gguf-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "cut-data.gguf",
            bytes[..bytes.len() - 1000].to_vec(),
            "truncated",
        ),
        ("cut-header.gguf", bytes[..200].to_vec(), "truncated"),
        ("not.gguf", b"PK\x03\x04 not a gguf".to_vec(), "GGUF"),
        (
            "v1.gguf",
            [b"GGUF".as_slice(), &1u32.to_le_bytes(), &bytes[8..]].concat(),
            "version 1",
        ),
    ];
    for (name, data, want) in cases {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        let e = Gguf::open(&p).err().expect(name).to_string();
        assert!(e.contains(want) && e.contains(name), "{name}: {e}");
        // The same from bytes in memory (no file system).
        let data = std::fs::read(&p).unwrap();
        let e = Gguf::from_bytes(Path::new(name), data).err().expect(name);
        assert!(e.to_string().contains(want), "{name} from bytes: {e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    // A good file parses the same from bytes as from disk.
    let a = Gguf::open(&src).unwrap();
    let b = Gguf::from_bytes(&src, bytes).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    let t = &a.tensors[0];
    assert_eq!(a.dequantize(t).unwrap(), b.dequantize(t).unwrap());
}

#[test]
fn config_and_names_match_transformers() {
    let models = json("gguf/models.json");
    for (file, m) in models.as_object().unwrap() {
        let g = gguf(file);
        let imp = convert_gguf(&g).unwrap();
        let cfg = ModelConfig::from_json(&imp.config.to_string(), &g.path).unwrap();
        let want = &m["config"];
        let num = |k: &str| want[k].as_u64().map(|v| v as usize);
        assert_eq!(Some(cfg.hidden), num("hidden_size"), "{file}");
        assert_eq!(Some(cfg.layers), num("num_hidden_layers"), "{file}");
        assert_eq!(Some(cfg.heads), num("num_attention_heads"), "{file}");
        assert_eq!(Some(cfg.vocab), num("vocab_size"), "{file}");
        assert_eq!(
            Some(cfg.max_positions),
            num("max_position_embeddings"),
            "{file}"
        );
        if let Some(kv) = num("num_key_value_heads") {
            assert_eq!(cfg.kv_heads, kv, "{file}");
            assert_eq!(Some(cfg.intermediate), num("intermediate_size"), "{file}");
            assert_eq!(Some(cfg.rope_theta), want["rope_theta"].as_f64(), "{file}");
        }
        let eps = want["rms_norm_eps"]
            .as_f64()
            .or(want["layer_norm_epsilon"].as_f64())
            .unwrap();
        assert!(
            (cfg.norm_eps - eps).abs() < 1e-12,
            "{file}: eps {}",
            cfg.norm_eps
        );
        assert_eq!(
            Some(cfg.tie_embeddings),
            want["tie_word_embeddings"].as_bool(),
            "{file}"
        );
        // Every HF tensor the model needs is there with its HF shape.
        for (name, shape) in wgtune::model::weights::checkpoint_specs(&cfg) {
            let (s, _) = imp
                .tensors
                .get(&name)
                .unwrap_or_else(|| panic!("{file}: no `{name}`"));
            assert_eq!(s, &shape, "{file}: {name}");
        }
    }
}

#[test]
fn qk_permutation_is_undone() {
    let g = gguf("tiny-llama.gguf");
    let imp = convert_gguf(&g).unwrap();
    let want = Arrays::open("gguf/models_expected.safetensors");
    for (ours, theirs) in [
        (
            "model.layers.0.self_attn.q_proj.weight",
            "tiny-llama.q_proj",
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            "tiny-llama.k_proj",
        ),
    ] {
        let (shape, got) = &imp.tensors[ours];
        assert_eq!(shape, &want.shape(theirs));
        let exp = want.f32(theirs);
        let max = got
            .iter()
            .zip(&exp)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max == 0.0, "{ours}: max |diff| {max} vs transformers");
    }
}
