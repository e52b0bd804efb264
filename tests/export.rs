//! `wgtune export --format gguf-lora`: PEFT LoRA adapters of every tiny
//! family as llama.cpp's GGUF LoRA, checked against the base GGUFs llama.cpp's
//! own converter wrote (tests/reference/data/gguf/families): every LoRA
//! tensor names a base tensor and fits its shape, and B·A lands on the base's
//! rows (q/k permuted as the base's are). Merged models (`--merge`, folder
//! and GGUF) give PEFT's loss for base + adapter (these need the GPU).

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use std::path::Path;

use common::reference::{data_dir, TINY_MODELS};
use wgtune::adapters::gguf_lora::gguf_lora;
use wgtune::adapters::peft_io::{load_adapter, lora_names};
use wgtune::model::gguf::{GgmlType, Gguf};
use wgtune::model::import::permute_qk;
use wgtune::model::{Model, ModelConfig, Weights};

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

/// The step batch's loss of `m` with `case`'s LoRA, or (`zero_b`) with a
/// LoRA whose B is zero, so that the model alone decides it; and PEFT's
/// loss for base + adapter.
fn loss_with(
    ctx: &wgtune::gpu::Context,
    m: &Model,
    model: &str,
    case: &str,
    zero_b: bool,
) -> (f64, f64) {
    use wgtune::adapters::Adapter;
    use wgtune::train::trainer::Trainer;
    let loaded = load_adapter(&data_dir(&format!("{model}/peft/{case}/initial"))).unwrap();
    let zero_b: Vec<_> = loaded
        .sorted_tensors()
        .into_iter()
        .map(|(n, s, mut d)| {
            if zero_b && n.contains("lora_B") {
                d.iter_mut().for_each(|x| *x = 0.0);
            }
            (n, s, d)
        })
        .collect();
    let adapter = Adapter::new(ctx, m, loaded.config.clone(), zero_b).unwrap();
    let opt = common::reference::gradients_only();
    let batch = common::reference::peft_batch(&format!("{model}/peft/{case}/step.safetensors"));
    let loss = Trainer::new(ctx, m, &adapter, opt)
        .unwrap()
        .gradients(&batch)
        .unwrap();
    let want = common::reference::json(&format!("{model}/peft/{case}/step.json"))["loss"]
        .as_f64()
        .unwrap();
    (loss, want)
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("export-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The largest relative loss error a merged model may show. f32 bases keep
/// the sum exactly (as train_parity's 1e-4). bf16/f16 bases store W + ΔW
/// rounded to their dtype, as PEFT's own merge_and_unload does
/// (tests/reference/merge_check.py: wgtune's merged logits equal PEFT's
/// merge in those dtypes); the bound is what that rounding was measured to
/// cost on these batches, with room.
fn merged_tolerance(model: &str) -> f64 {
    match model {
        "tiny-mistral" | "tiny-gemma3" | "tiny-gpt2" => 5e-3,
        _ => 1e-4,
    }
}

/// `export --merge` (a Hugging Face folder): the merged model alone gives
/// PEFT's loss for base + adapter, for every family and both LoRA cases.
#[test]
fn merged_folder_gives_peft_loss() {
    use wgtune::adapters::merge::{lora_config, lora_scale, lora_updates, merge_folder};
    let ctx = gpu!();
    for model in TINY_MODELS {
        let cfg = ModelConfig::from_file(&data_dir(&format!("{model}/config.json"))).unwrap();
        for case in ["lora_qv", "lora_all"] {
            let dir = data_dir(&format!("{model}/peft/{case}/initial"));
            let adapter = load_adapter(&dir).unwrap();
            let updates = lora_updates(&adapter, &dir, &cfg).unwrap();
            let scale = lora_scale(lora_config(&adapter, &dir).unwrap());
            let out = scratch(&format!("{model}-{case}"));
            let r = merge_folder(&data_dir(model), &updates, scale, &out).unwrap();
            assert_eq!(r.merged, updates.len());
            let m = Model::load(ctx, &out).unwrap();
            let (loss, want) = loss_with(ctx, &m, model, case, true);
            let rel = (loss - want).abs() / want;
            eprintln!(
                "{model}/{case}: merged folder loss {loss:.6} vs PEFT {want:.6} (rel {rel:.1e})"
            );
            assert!(
                rel <= merged_tolerance(model),
                "{model}/{case}: {loss} vs {want}"
            );
            // Tokenizer and chat template travel with it.
            for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
                assert!(out.join(f).exists(), "{model}: {f}");
            }
        }
    }
}

/// `export --merge --format gguf` from the llama.cpp-converted base GGUF:
/// it reads back in wgtune with the loss of the unmerged pair and PEFT's
/// loss, keeps every base tensor name and metadata key, and leaves
/// unadapted tensors byte-identical. tiny-gemma3's GGUF is not the folder's
/// model (llama.cpp's converter drops `layer_types`, so llama.cpp, and
/// wgtune reading the GGUF, use Gemma 3's default window pattern): there the
/// unmerged pair alone is the referee.
#[test]
fn merged_gguf_gives_peft_loss() {
    use wgtune::adapters::merge::{lora_config, lora_scale, lora_updates, merge_gguf};
    let ctx = gpu!();
    let load = |g: Gguf| {
        let cfg = wgtune::model::import::gguf_meta(&g).unwrap().model;
        Model::from_weights(ctx, cfg, &Weights::from_gguf(g).unwrap()).unwrap()
    };
    for model in TINY_MODELS {
        let path = data_dir(&format!("gguf/families/{model}.gguf"));
        let base = Gguf::open(&path).unwrap();
        let cfg = wgtune::model::import::gguf_meta(&base).unwrap().model;
        let case = "lora_all";
        let dir = data_dir(&format!("{model}/peft/{case}/initial"));
        let adapter = load_adapter(&dir).unwrap();
        let updates = lora_updates(&adapter, &dir, &cfg).unwrap();
        let scale = lora_scale(lora_config(&adapter, &dir).unwrap());
        let (w, r) = merge_gguf(&base, &cfg, &updates, scale, GgmlType::F32).unwrap();
        assert_eq!(r.merged, updates.len());
        let out = scratch(&format!("{model}.gguf"));
        w.write(&out).unwrap();
        let g = Gguf::open(&out).unwrap();
        assert_eq!(g.meta, base.meta, "{model}: metadata");
        assert_eq!(
            g.tensors.iter().map(|t| &t.name).collect::<Vec<_>>(),
            base.tensors.iter().map(|t| &t.name).collect::<Vec<_>>()
        );
        let changed = g
            .tensors
            .iter()
            .filter(|t| g.raw(t).unwrap() != base.raw(base.tensor(&t.name).unwrap()).unwrap())
            .count();
        assert_eq!(
            changed,
            updates.len(),
            "{model}: only adapted tensors change"
        );
        let (merged, want) = loss_with(ctx, &load(g), model, case, true);
        let (pair, _) = loss_with(ctx, &load(Gguf::open(&path).unwrap()), model, case, false);
        eprintln!(
            "{model}/{case}: merged GGUF loss {merged:.6}, base GGUF + adapter {pair:.6}, PEFT {want:.6}"
        );
        assert!(
            (merged - pair).abs() <= 1e-5 * pair,
            "{model}: {merged} vs {pair}"
        );
        if *model != "tiny-gemma3" {
            assert!(
                (merged - want).abs() <= 1e-4 * want,
                "{model}: {merged} vs {want}"
            );
        }
    }
}

/// What llama.cpp's own GGUF reader (gguf-py) listed for wgtune's exports
/// (tests/reference/gguf_lora_lists.py): the same metadata, tensor names,
/// shapes and types come out of an export now, for every family, as GGUF
/// LoRA (f32, q8_0) and as a merged GGUF (f16).
#[test]
fn exports_match_what_gguf_py_listed() {
    use wgtune::adapters::merge::{lora_config, lora_scale, lora_updates, merge_gguf};
    let lists = common::reference::json("gguf/lora_lists.json");
    let exports = lists["exports"].as_object().unwrap();
    assert_eq!(exports.len(), 4 * TINY_MODELS.len());
    for (key, want) in exports {
        let parts: Vec<&str> = key.split('/').collect();
        let (model, case, kind) = (parts[0], parts[1], parts[2]);
        let dir = data_dir(&format!("{model}/peft/{case}/initial"));
        let adapter = load_adapter(&dir).unwrap();
        let ty = |s: &str| match s {
            "f32" => GgmlType::F32,
            "f16" => GgmlType::F16,
            "q8_0" => GgmlType::Q8_0,
            other => panic!("{other}"),
        };
        let bytes = match kind.strip_prefix("merged-") {
            None => {
                let cfg =
                    ModelConfig::from_file(&data_dir(&format!("{model}/config.json"))).unwrap();
                gguf_lora(&adapter, &dir, &cfg, ty(kind))
                    .unwrap()
                    .0
                    .to_bytes()
            }
            Some(dtype) => {
                let base = Gguf::open(&data_dir(&format!("gguf/families/{model}.gguf"))).unwrap();
                let cfg = wgtune::model::import::gguf_meta(&base).unwrap().model;
                let updates = lora_updates(&adapter, &dir, &cfg).unwrap();
                let scale = lora_scale(lora_config(&adapter, &dir).unwrap());
                merge_gguf(&base, &cfg, &updates, scale, ty(dtype))
                    .unwrap()
                    .0
                    .to_bytes()
            }
        };
        let g = Gguf::from_bytes(Path::new(key), bytes).unwrap();
        assert_eq!(
            g.meta.len() as u64,
            want["n_meta"].as_u64().unwrap(),
            "{key}"
        );
        for (k, v) in want["meta"].as_object().unwrap() {
            let ours = g.get(k).unwrap_or_else(|| panic!("{key}: no {k}"));
            match v {
                serde_json::Value::String(s) => {
                    assert_eq!(ours.as_str(), Some(s.as_str()), "{key} {k}")
                }
                n => assert_eq!(ours.as_f64(), n.as_f64(), "{key} {k}"),
            }
        }
        let listed = want["tensors"].as_array().unwrap();
        assert_eq!(g.tensors.len(), listed.len(), "{key}");
        for (t, w) in g.tensors.iter().zip(listed) {
            assert_eq!(t.name, w[0].as_str().unwrap(), "{key}");
            let ne: Vec<u64> = w[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            assert_eq!(t.dims, ne, "{key}: {} (innermost first)", t.name);
            assert_eq!(t.ty.name(), w[2].as_str().unwrap(), "{key}: {}", t.name);
        }
    }
}

/// The Ollama TEMPLATE read off each family's chat template: ChatML
/// (SmolLM2, Qwen), Gemma's turns (no system turn: Gemma folds the system
/// prompt into the first user turn, which a per-message Go template cannot
/// say). The pieces are checked against the formats' published shapes; the
/// read itself already checks that they rebuild the Jinja renderings.
#[test]
fn modelfile_template_follows_the_chat_template() {
    use wgtune::adapters::modelfile::{modelfile, ChatPieces};
    use wgtune::model::tokenizer::Tokenizer;
    let chatml = |role: &str| (format!("<|im_start|>{role}\n"), "<|im_end|>\n".to_string());
    for model in ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"] {
        let tok = Tokenizer::load(&data_dir(model)).unwrap();
        let p = ChatPieces::read(&tok).unwrap_or_else(|| panic!("{model}: no pieces"));
        eprintln!("{model}: {p:?}");
        if model == "tiny-gemma3" {
            assert_eq!(p.system, None);
            assert_eq!(
                p.user,
                ("<start_of_turn>user\n".into(), "<end_of_turn>\n".into())
            );
            assert_eq!(
                p.assistant,
                ("<start_of_turn>model\n".into(), "<end_of_turn>\n".into())
            );
            assert_eq!(p.generation, "<start_of_turn>model\n");
        } else {
            assert_eq!(p.system, Some(chatml("system")), "{model}");
            assert_eq!(p.user, chatml("user"), "{model}");
            assert_eq!(p.assistant, chatml("assistant"), "{model}");
            assert_eq!(p.generation, "<|im_start|>assistant\n", "{model}");
        }
        let (text, has_template) = modelfile(
            Path::new("/m/base.gguf"),
            Some(Path::new("/m/lora.gguf")),
            &tok,
        );
        assert!(has_template, "{model}");
        assert!(
            text.contains("FROM /m/base.gguf\nADAPTER /m/lora.gguf\nTEMPLATE \"\"\""),
            "{text}"
        );
        let stop = if model == "tiny-gemma3" {
            "<end_of_turn>"
        } else {
            "<|im_end|>"
        };
        assert!(
            text.contains(&format!("PARAMETER stop \"{stop}\"")),
            "{model}: {text}"
        );
    }
}
