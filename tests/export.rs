//! `wgtune export --format gguf-lora`: PEFT LoRA adapters of every tiny
//! family as llama.cpp's GGUF LoRA, checked against the base GGUFs llama.cpp's
//! own converter wrote (tests/reference/data/gguf/families): every LoRA
//! tensor names a base tensor and fits its shape, and B·A lands on the base's
//! rows (q/k permuted as the base's are). No GPU needed.

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use std::path::Path;

use common::reference::{data_dir, TINY_MODELS};
use wgtune::adapters::gguf_lora::gguf_lora;
use wgtune::adapters::peft_io::{load_adapter, lora_names};
use wgtune::model::gguf::{GgmlType, Gguf};
use wgtune::model::import::permute_qk;
use wgtune::model::{ModelConfig, Weights};

/// The exported file of `model`'s PEFT case `case`, read back.
fn export(model: &str, case: &str, ty: GgmlType) -> (Gguf, ModelConfig) {
    let dir = data_dir(&format!("{model}/peft/{case}/initial"));
    let adapter = load_adapter(&dir).unwrap();
    let cfg = ModelConfig::from_file(&data_dir(&format!("{model}/config.json"))).unwrap();
    let (w, info) = gguf_lora(&adapter, &dir, &cfg, ty).unwrap();
    assert_eq!(info.rank, 4);
    (
        Gguf::from_bytes(Path::new("lora.gguf"), w.to_bytes()).unwrap(),
        cfg,
    )
}

#[test]
fn gguf_lora_tensors_fit_the_llama_cpp_base() {
    for model in TINY_MODELS {
        let base = Gguf::open(&data_dir(&format!("gguf/families/{model}.gguf"))).unwrap();
        for case in ["lora_qv", "lora_all"] {
            let (g, cfg) = export(model, case, GgmlType::F32);
            let get = |k: &str| g.get(k).unwrap_or_else(|| panic!("{model}: no {k}"));
            assert_eq!(get("general.type").as_str(), Some("adapter"));
            assert_eq!(get("adapter.type").as_str(), Some("lora"));
            assert_eq!(get("adapter.lora.alpha").as_f64(), Some(8.0));
            assert_eq!(
                g.architecture().unwrap(),
                base.architecture().unwrap(),
                "{model}"
            );
            let per_layer = match (case, cfg.arch) {
                ("lora_qv", wgtune::model::Arch::Gpt2) => 1, // c_attn
                ("lora_qv", _) => 2,
                (_, wgtune::model::Arch::Gpt2) => 4, // c_attn, attn/mlp c_proj, c_fc
                _ => 7,
            };
            assert_eq!(
                g.tensors.len(),
                2 * per_layer * cfg.layers,
                "{model} {case}"
            );
            for t in &g.tensors {
                let (stem, ab) = t.name.rsplit_once('.').unwrap();
                let b = base
                    .tensor(stem)
                    .unwrap_or_else(|| panic!("{model}: `{}` names no base tensor", t.name));
                let [out, inp] = [b.shape()[0], b.shape()[1]];
                let want = if ab == "lora_a" {
                    vec![4, inp]
                } else {
                    assert_eq!(ab, "lora_b");
                    vec![out, 4]
                };
                assert_eq!(t.shape(), want, "{model}: {}", t.name);
            }
        }
    }
}

/// llama (and mistral, stored as `llama`) GGUFs permute q/k rows: the
/// exported lora_b is permuted the same way, so B·A adds to the rows the
/// base's q/k weights have there. The permutation is checked on the base
/// weights themselves (the folder's q_proj permuted equals llama.cpp's
/// attn_q), then applied to the adapter.
#[test]
fn gguf_lora_permutes_q_and_k_as_the_base() {
    for model in ["tiny-llama", "tiny-mistral"] {
        let base = Gguf::open(&data_dir(&format!("gguf/families/{model}.gguf"))).unwrap();
        let (g, cfg) = export(model, "lora_all", GgmlType::F32);
        let wts = Weights::open(&data_dir(model)).unwrap();
        let adapter = load_adapter(&data_dir(&format!("{model}/peft/lora_all/initial"))).unwrap();
        for (proj, heads, gguf) in [
            ("q_proj", cfg.heads, "attn_q"),
            ("k_proj", cfg.kv_heads, "attn_k"),
        ] {
            let hf = format!("model.layers.1.self_attn.{proj}");
            let rows = heads * cfg.head_dim;
            let w = wts
                .get_f32(&format!("{hf}.weight"), &[rows, cfg.hidden])
                .unwrap();
            let bt = base.tensor(&format!("blk.1.{gguf}.weight")).unwrap();
            assert_eq!(
                permute_qk(&w, heads, cfg.hidden),
                base.dequantize(bt).unwrap(),
                "{model}: {proj} permutation"
            );
            let (_, bn) = lora_names(&hf);
            let b_hf = &adapter.tensors[&bn].1;
            let b_gguf = g.dequantize(g.tensor(&format!("blk.1.{gguf}.weight.lora_b")).unwrap());
            assert_eq!(
                b_gguf.unwrap(),
                permute_qk(b_hf, heads, 4),
                "{model}: {proj} lora_b"
            );
        }
        // v is not permuted.
        let (an, bn) = lora_names("model.layers.0.self_attn.v_proj");
        let b = g
            .dequantize(g.tensor("blk.0.attn_v.weight.lora_b").unwrap())
            .unwrap();
        let a = g
            .dequantize(g.tensor("blk.0.attn_v.weight.lora_a").unwrap())
            .unwrap();
        assert_eq!(b, adapter.tensors[&bn].1);
        assert_eq!(a, adapter.tensors[&an].1);
    }
}

/// f16 and q8_0 exports hold the same values to their precision; q8_0 keeps
/// lora_b (rows of r = 4 values, no whole 32-value block) in f16, as
/// llama.cpp's converter falls back.
#[test]
fn gguf_lora_f16_and_q8_0() {
    let (f32s, _) = export("tiny-llama", "lora_qv", GgmlType::F32);
    for ty in [GgmlType::F16, GgmlType::Q8_0] {
        let (g, _) = export("tiny-llama", "lora_qv", ty);
        for t in &g.tensors {
            let want_ty = match (ty, t.name.ends_with("lora_b")) {
                (GgmlType::Q8_0, true) => GgmlType::F16,
                _ => ty,
            };
            assert_eq!(t.ty, want_ty, "{}", t.name);
            let (x, y) = (
                g.dequantize(t).unwrap(),
                f32s.dequantize(f32s.tensor(&t.name).unwrap()).unwrap(),
            );
            let amax = y.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= amax / 100.0, "{}: {a} vs {b}", t.name);
            }
        }
    }
}

/// rsLoRA's alpha/√r scale becomes alpha·√r / r in llama.cpp's alpha/r.
#[test]
fn gguf_lora_bakes_rslora_into_alpha() {
    let dir = data_dir("tiny-llama/peft/lora_qv/initial");
    let mut adapter = load_adapter(&dir).unwrap();
    if let wgtune::adapters::peft_config::AdapterConfig::Lora(l) = &mut adapter.config {
        l.use_rslora = true;
    }
    let cfg = ModelConfig::from_file(&data_dir("tiny-llama/config.json")).unwrap();
    let (_, info) = gguf_lora(&adapter, &dir, &cfg, GgmlType::F32).unwrap();
    assert_eq!(info.alpha, 8.0 * 2.0, "alpha 8, r 4: 8/sqrt(4) = 16/4");
}

/// Prompt and prefix adapters have no llama.cpp format: a clear error that
/// points to `wgtune generate`.
#[test]
fn prompt_and_prefix_adapters_are_refused() {
    let cfg = ModelConfig::from_file(&data_dir("tiny-llama/config.json")).unwrap();
    for case in ["prompt", "prefix", "prefix_proj"] {
        let dir = data_dir(&format!("tiny-llama/peft/{case}/initial"));
        let adapter = load_adapter(&dir).unwrap();
        let e = gguf_lora(&adapter, &dir, &cfg, GgmlType::F32)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("no llama.cpp format")
                && e.contains("wgtune generate")
                && e.contains(case.split('_').next().unwrap()),
            "{case}: {e}"
        );
    }
}
