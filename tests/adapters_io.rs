//! Tier 0: PEFT adapter folders. Round trips of what wgtune writes, the real
//! adapters PEFT 0.21.2 wrote for the tiny models (tests/reference/data), a
//! re-save that must reproduce PEFT's adapter_config.json, and every kind of
//! bad folder, whose error must name the file at fault. No GPU, no Python.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use wgtune::adapters::peft_io::{
    load_adapter, lora_names, save_adapter, AdapterConfig, LoraConfig, PrefixConfig, PromptConfig,
    PROMPT_EMBEDDINGS,
};

/// A fresh empty folder under the system temp dir.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgtune-adapters-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn reference(model: &str, case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference/data")
        .join(model)
        .join("peft")
        .join(case)
        .join("initial")
}

/// Deterministic values that are not all equal.
fn ramp(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect()
}

fn tensor(name: &str, shape: &[usize], seed: f32) -> (String, Vec<usize>, Vec<f32>) {
    let n = shape.iter().product();
    (name.to_string(), shape.to_vec(), ramp(n, seed))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn assert_round_trip(name: &str, cfg: AdapterConfig, tensors: Vec<(String, Vec<usize>, Vec<f32>)>) {
    let dir = scratch(name).join("adapter");
    save_adapter(&dir, &cfg, &tensors).unwrap();
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
    ] {
        assert!(dir.join(f).is_file(), "{name}: {f} not written");
    }
    let loaded = load_adapter(&dir).unwrap();
    assert_eq!(loaded.config, cfg, "{name}: config");
    assert_eq!(loaded.tensors.len(), tensors.len(), "{name}");
    for (n, shape, data) in &tensors {
        let (s, d) = &loaded.tensors[n];
        assert_eq!(s, shape, "{name}: {n}");
        assert_eq!(d, data, "{name}: {n} must round-trip bit-exactly in f32");
    }
    // safetensors metadata {"format": "pt"}, every tensor F32
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (_, v) in st.tensors() {
        assert_eq!(v.dtype(), safetensors::Dtype::F32);
    }
    let cfg_json = read_json(&dir.join("adapter_config.json"));
    assert_eq!(cfg_json["peft_version"], "0.21.2");
    assert_eq!(cfg_json["task_type"], "CAUSAL_LM");
    assert_eq!(cfg_json["inference_mode"], true);
    // no temp files left behind
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{name}: {names:?}");
    std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
}

#[test]
fn lora_round_trip() {
    let mut cfg = LoraConfig::new(4, 8.0, &["v_proj", "q_proj"]);
    cfg.lora_dropout = 0.05;
    cfg.base_model_name_or_path = Some("HuggingFaceTB/SmolLM2-135M-Instruct".into());
    let mut tensors = Vec::new();
    for l in 0..2 {
        for (m, out) in [("q_proj", 64), ("v_proj", 32)] {
            let (a, b) = lora_names(&format!("model.layers.{l}.self_attn.{m}"));
            tensors.push(tensor(&a, &[4, 64], l as f32));
            tensors.push(tensor(&b, &[out, 4], 10.0 + l as f32));
        }
    }
    // targets come back sorted, as PEFT writes them
    let mut expect = cfg.clone();
    expect.target_modules.sort();
    let dir = scratch("lora_sorted");
    save_adapter(&dir, &AdapterConfig::Lora(cfg.clone()), &tensors).unwrap();
    assert_eq!(
        load_adapter(&dir).unwrap().config,
        AdapterConfig::Lora(expect.clone())
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert_round_trip("lora", AdapterConfig::Lora(expect), tensors);
}

#[test]
fn prompt_round_trip() {
    let cfg = AdapterConfig::Prompt(PromptConfig {
        num_virtual_tokens: 8,
        token_dim: 64,
        num_attention_heads: 4,
        num_layers: 2,
        prompt_tuning_init: "TEXT".into(),
        prompt_tuning_init_text: Some("answer the question".into()),
        tokenizer_name_or_path: Some("tiny".into()),
        base_model_name_or_path: Some("tiny".into()),
    });
    assert_round_trip(
        "prompt",
        cfg,
        vec![tensor(PROMPT_EMBEDDINGS, &[8, 64], 1.0)],
    );
}

#[test]
fn prefix_round_trip() {
    for projection in [false, true] {
        let cfg = AdapterConfig::Prefix(PrefixConfig {
            num_virtual_tokens: 6,
            token_dim: 32,
            num_attention_heads: 2,
            num_layers: 2,
            encoder_hidden_size: Some(48),
            prefix_projection: projection,
            base_model_name_or_path: None,
        });
        assert_round_trip(
            &format!("prefix{projection}"),
            cfg,
            vec![tensor(PROMPT_EMBEDDINGS, &[6, 2 * 2 * 32], 2.0)],
        );
    }
}

/// The LoRA shapes of the tiny models: module path -> (in, out).
fn lora_shapes(model: &str, case: &str) -> Vec<(String, usize, usize)> {
    let mut v = Vec::new();
    for l in 0..2 {
        let mods: Vec<(&str, usize, usize)> = match (model, case) {
            ("tiny-llama", "lora_qv") => {
                vec![("self_attn.q_proj", 64, 64), ("self_attn.v_proj", 64, 32)]
            }
            ("tiny-llama", _) => vec![
                ("self_attn.q_proj", 64, 64),
                ("self_attn.k_proj", 64, 32),
                ("self_attn.v_proj", 64, 32),
                ("self_attn.o_proj", 64, 64),
                ("mlp.gate_proj", 64, 96),
                ("mlp.up_proj", 64, 96),
                ("mlp.down_proj", 96, 64),
            ],
            ("tiny-gpt2", "lora_qv") => vec![("attn.c_attn", 64, 192)],
            _ => vec![
                ("attn.c_attn", 64, 192),
                ("attn.c_proj", 64, 64),
                ("mlp.c_fc", 64, 256),
                ("mlp.c_proj", 256, 64),
            ],
        };
        let stem = if model == "tiny-llama" {
            format!("model.layers.{l}")
        } else {
            format!("transformer.h.{l}")
        };
        for (m, i, o) in mods {
            v.push((format!("{stem}.{m}"), i, o));
        }
    }
    v
}

#[test]
fn peft_written_lora_adapters_load() {
    for model in ["tiny-llama", "tiny-gpt2"] {
        for case in ["lora_qv", "lora_all"] {
            let a = load_adapter(&reference(model, case)).unwrap();
            let AdapterConfig::Lora(c) = &a.config else {
                panic!("{model}/{case}: not LoRA");
            };
            assert_eq!(
                (c.r, c.lora_alpha, c.lora_dropout),
                (4, 8.0, 0.0),
                "{model}/{case}"
            );
            assert_eq!(c.scaling(), 2.0);
            assert!(!c.use_rslora);
            assert_eq!(
                c.fan_in_fan_out,
                model == "tiny-gpt2",
                "{model}: fan_in_fan_out"
            );
            assert_eq!(c.init_lora_weights, Value::Bool(true));
            assert_eq!(
                c.base_model_name_or_path.as_deref(),
                Some(format!("tests/reference/data/{model}").as_str())
            );
            let expect = lora_shapes(model, case);
            assert_eq!(a.tensors.len(), 2 * expect.len(), "{model}/{case}");
            for (module, i, o) in &expect {
                let (an, bn) = lora_names(module);
                assert_eq!(a.tensors[&an].0, [4, *i], "{an}");
                assert_eq!(a.tensors[&bn].0, [*o, 4], "{bn}");
                // PEFT init: A ~ U(-1/sqrt(in), 1/sqrt(in)). (B is zero in PEFT, but
                // generate.py overwrote it with N(0, 0.02) so the test is not trivial.)
                let bound = 1.0 / (*i as f32).sqrt();
                assert!(a.tensors[&an].1.iter().all(|x| x.abs() <= bound), "{an}");
                assert!(a.tensors[&an].1.iter().any(|&x| x != 0.0), "{an}");
                assert!(a.tensors[&bn].1.iter().any(|&x| x != 0.0), "{bn}");
            }
            let mut mods: Vec<String> = expect.into_iter().map(|m| m.0).collect();
            mods.sort();
            assert_eq!(a.lora_modules(), mods);
        }
    }
    // the exact example from the brief
    let a = load_adapter(&reference("tiny-llama", "lora_qv")).unwrap();
    assert_eq!(
        a.tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].0,
        [4, 64]
    );
}

#[test]
fn peft_written_prompt_and_prefix_adapters_load() {
    for model in ["tiny-llama", "tiny-gpt2"] {
        let a = load_adapter(&reference(model, "prompt")).unwrap();
        let AdapterConfig::Prompt(c) = &a.config else {
            panic!("{model}: not prompt tuning");
        };
        // prompt tuning records the *query* head count and the hidden size
        assert_eq!(
            (
                c.num_virtual_tokens,
                c.token_dim,
                c.num_attention_heads,
                c.num_layers
            ),
            (8, 64, 4, 2)
        );
        assert_eq!(c.prompt_tuning_init, "TEXT");
        assert_eq!(
            c.prompt_tuning_init_text.as_deref(),
            Some("answer the question")
        );
        assert_eq!(
            c.tokenizer_name_or_path.as_deref(),
            Some(format!("tests/reference/data/{model}").as_str())
        );
        assert_eq!(a.tensors.len(), 1);
        assert_eq!(a.tensors[PROMPT_EMBEDDINGS].0, [8, 64]);

        for case in ["prefix", "prefix_proj"] {
            let a = load_adapter(&reference(model, case)).unwrap();
            let AdapterConfig::Prefix(c) = &a.config else {
                panic!("{model}/{case}: not prefix tuning");
            };
            // prefix tuning records the *KV* head count and kv_heads * head_dim
            let (heads, dim) = if model == "tiny-llama" {
                (2, 32)
            } else {
                (4, 64)
            };
            assert_eq!(
                (
                    c.num_virtual_tokens,
                    c.token_dim,
                    c.num_attention_heads,
                    c.num_layers
                ),
                (6, dim, heads, 2),
                "{model}/{case}"
            );
            assert_eq!(c.head_dim(), 16);
            assert_eq!(c.prefix_projection, case == "prefix_proj");
            let hidden = if (model, case) == ("tiny-gpt2", "prefix") {
                64
            } else {
                32
            };
            assert_eq!(c.encoder_hidden_size(), hidden, "{model}/{case}");
            assert_eq!(a.tensors.len(), 1);
            // the saved tensor is the projected prefix, also with projection
            assert_eq!(
                a.tensors[PROMPT_EMBEDDINGS].0,
                [6, 2 * 2 * dim],
                "{model}/{case}"
            );
        }
    }
}

/// Loading a PEFT adapter and saving it again gives PEFT's adapter_config.json:
/// the same keys and values (and, ASCII configs being what they are, the
/// same bytes) and the same tensors.
#[test]
fn resaved_peft_adapters_match_peft() {
    for model in ["tiny-llama", "tiny-gpt2"] {
        for case in ["lora_qv", "lora_all", "prompt", "prefix", "prefix_proj"] {
            let src = reference(model, case);
            let a = load_adapter(&src).unwrap();
            let out = scratch(&format!("resave-{model}-{case}"));
            save_adapter(&out, &a.config, &a.sorted_tensors()).unwrap();

            let theirs = read_json(&src.join("adapter_config.json"));
            let ours = read_json(&out.join("adapter_config.json"));
            let (t, o) = (theirs.as_object().unwrap(), ours.as_object().unwrap());
            let missing: Vec<&String> = t.keys().filter(|k| !o.contains_key(*k)).collect();
            let extra: Vec<&String> = o.keys().filter(|k| !t.contains_key(*k)).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "{model}/{case}: missing {missing:?}, extra {extra:?}"
            );
            for (k, v) in t {
                // Value equality also checks int vs float (lora_alpha 8, lora_dropout 0.0)
                assert_eq!(&o[k], v, "{model}/{case}: key {k}");
            }
            assert_eq!(
                std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
                std::fs::read_to_string(src.join("adapter_config.json")).unwrap(),
                "{model}/{case}: bytes"
            );

            let b = load_adapter(&out).unwrap();
            assert_eq!(b.config, a.config);
            let shapes = |x: &HashMap<String, (Vec<usize>, Vec<f32>)>| {
                let mut v: Vec<(String, Vec<usize>)> =
                    x.iter().map(|(n, (s, _))| (n.clone(), s.clone())).collect();
                v.sort();
                v
            };
            assert_eq!(shapes(&b.tensors), shapes(&a.tensors));
            for (n, (_, d)) in &a.tensors {
                assert_eq!(&b.tensors[n].1, d, "{model}/{case}: {n}");
            }
            std::fs::remove_dir_all(&out).unwrap();
        }
    }
}

/// F16 and BF16 adapters (PEFT writes them when trained in half precision)
/// load as f32.
#[test]
fn half_precision_tensors_load_as_f32() {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let dir = scratch("half");
    std::fs::copy(
        reference("tiny-llama", "prompt").join("adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let vals: Vec<f32> = (0..8 * 64).map(|i| (i as f32 - 256.0) / 64.0).collect();
    for dtype in [Dtype::F16, Dtype::BF16] {
        let bytes: Vec<u8> = match dtype {
            Dtype::F16 => vals
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
            _ => vals
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        };
        let view = TensorView::new(dtype, vec![8, 64], &bytes).unwrap();
        safetensors::serialize_to_file(
            [(PROMPT_EMBEDDINGS, view)],
            None,
            &dir.join("adapter_model.safetensors"),
        )
        .unwrap();
        let a = load_adapter(&dir).unwrap();
        // these values are exact in both half formats
        assert_eq!(a.tensors[PROMPT_EMBEDDINGS].1, vals, "{dtype:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Copy a PEFT adapter folder into a scratch dir to break it.
fn copy_of(model: &str, case: &str, name: &str) -> PathBuf {
    let dir = scratch(name);
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(reference(model, case).join(f), dir.join(f)).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    format!("{:#}", load_adapter(dir).expect_err("should fail"))
}

#[test]
fn missing_files_are_named() {
    let dir = scratch("nothing");
    let e = load_err(&dir.join("nope"));
    assert!(
        e.contains("nope") && e.contains("no such adapter folder"),
        "{e}"
    );

    let e = load_err(&dir);
    assert!(
        e.contains("adapter_config.json") && e.contains("missing"),
        "{e}"
    );

    let dir = copy_of("tiny-llama", "lora_qv", "no_weights");
    std::fs::remove_file(dir.join("adapter_model.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains(&format!(
            "{}",
            dir.join("adapter_model.safetensors").display()
        )),
        "{e}"
    );
    assert!(e.contains("missing"), "{e}");

    std::fs::write(dir.join("adapter_model.bin"), b"pickle").unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("adapter_model.bin") && e.contains("not supported"),
        "{e}"
    );
    assert!(e.contains("save_file"), "conversion hint: {e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn truncated_and_corrupt_safetensors_are_named() {
    let dir = copy_of("tiny-llama", "lora_all", "truncated");
    let path = dir.join("adapter_model.safetensors");
    let full = std::fs::read(&path).unwrap();
    for cut in [full.len() - 100, 200, 7, 0] {
        std::fs::write(&path, &full[..cut]).unwrap();
        let e = load_err(&dir);
        assert!(e.contains(&format!("{}", path.display())), "cut {cut}: {e}");
        assert!(e.contains("truncated or corrupt"), "cut {cut}: {e}");
    }
    let mut junk = full.clone();
    junk[8..20].copy_from_slice(b"not json at ");
    std::fs::write(&path, &junk).unwrap();
    assert!(load_err(&dir).contains("truncated or corrupt"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_configs_are_named() {
    let dir = copy_of("tiny-gpt2", "prompt", "badcfg");
    let cfg_path = dir.join("adapter_config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();

    std::fs::write(&cfg_path, original.replace("PROMPT_TUNING", "P_TUNING")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains(&format!("{}", cfg_path.display())), "{e}");
    assert!(e.contains("unsupported peft_type \"P_TUNING\""), "{e}");
    for t in ["LORA", "PROMPT_TUNING", "PREFIX_TUNING"] {
        assert!(e.contains(t), "{e}");
    }

    std::fs::write(&cfg_path, &original[..original.len() / 2]).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains(&format!("{}", cfg_path.display())) && e.contains("not valid JSON"),
        "{e}"
    );

    std::fs::write(&cfg_path, original.replace("\"token_dim\": 64,", "")).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains(&format!("{}", cfg_path.display())) && e.contains("token_dim"),
        "{e}"
    );

    // a config that disagrees with the tensors: the weights file is named
    std::fs::write(
        &cfg_path,
        original.replace("\"num_virtual_tokens\": 8", "\"num_virtual_tokens\": 9"),
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("[8, 64]"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_overwrites_in_place_and_keeps_readme() {
    let dir = scratch("overwrite");
    let cfg = AdapterConfig::Prompt(PromptConfig {
        num_virtual_tokens: 2,
        token_dim: 4,
        num_attention_heads: 1,
        num_layers: 1,
        prompt_tuning_init: "RANDOM".into(),
        prompt_tuning_init_text: None,
        tokenizer_name_or_path: None,
        base_model_name_or_path: None,
    });
    save_adapter(&dir, &cfg, &[tensor(PROMPT_EMBEDDINGS, &[2, 4], 0.0)]).unwrap();
    std::fs::write(dir.join("README.md"), "my notes").unwrap();
    let second = tensor(PROMPT_EMBEDDINGS, &[2, 4], 5.0);
    save_adapter(&dir, &cfg, std::slice::from_ref(&second)).unwrap();
    assert_eq!(
        load_adapter(&dir).unwrap().tensors[PROMPT_EMBEDDINGS].1,
        second.2
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("README.md")).unwrap(),
        "my notes"
    );
    let cfg_json = read_json(&dir.join("adapter_config.json"));
    assert_eq!(cfg_json["prompt_tuning_init_text"], Value::Null);
    std::fs::remove_dir_all(&dir).unwrap();
}
