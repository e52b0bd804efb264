//! The 2026 families without a GPU: tokenizers built from Gemma-style
//! SentencePiece and `default`-pre BPE GGUF files (with their add_bos /
//! add_eos flags) against transformers / llama.cpp's rules, the real Gemma 3
//! and Qwen3 chat templates against transformers' `apply_chat_template`, and
//! the default LoRA targets against PEFT. Reference data:
//! tests/reference/tokenizers_generate.py.

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use common::reference::{data_dir, json};
use serde_json::Value as Json;
use wgtune::adapters::adapter::{default_targets, resolve_targets};
use wgtune::adapters::peft_io::module_matches;
use wgtune::model::gguf::Gguf;
use wgtune::model::gguf_tokenizer::tokenizer_from_gguf;
use wgtune::model::names::ModelSpec;
use wgtune::model::tokenizer::{ChatMessage, Tokenizer, TokenizerFiles};
use wgtune::model::ModelConfig;

/// The tokenizer wgtune builds from a GGUF in tests/reference/data/tokenizers,
/// optionally with another chat template.
fn gguf_tokenizer(file: &str, template: Option<String>) -> Tokenizer {
    let path = data_dir(&format!("tokenizers/{file}"));
    let g = Gguf::open(&path).unwrap();
    let files = tokenizer_from_gguf(&g).unwrap_or_else(|e| panic!("{file}: {e}"));
    Tokenizer::from_files(&TokenizerFiles {
        dir: path.clone(),
        tokenizer_json: files.tokenizer_json.to_string().into_bytes(),
        tokenizer_config: Some(files.tokenizer_config.to_string().into_bytes()),
        chat_template_jinja: template,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn gemma_and_default_pre_gguf_tokenizers_match_the_reference() {
    let refs = json("tokenizers/tokens.json");
    let refs = refs.as_object().unwrap();
    assert_eq!(refs.len(), 4, "tokens.json: four files");
    let mut failures = Vec::new();
    for (file, r) in refs {
        let tok = gguf_tokenizer(file, None);
        let (bos, eos) = (
            r["add_bos"].as_bool().unwrap(),
            r["add_eos"].as_bool().unwrap(),
        );
        assert_eq!(tok.adds_bos(), bos, "{file}: adds BOS");
        let (bos_id, eos_id) = (tok.bos_id(), tok.eos_id());
        for case in r["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want = ids(&case["ids"]);
            let got = tok.encode(text, true).unwrap();
            if got != want {
                let toks: Vec<String> = got.iter().filter_map(|&i| tok.id_to_token(i)).collect();
                failures.push(format!(
                    "{file}: {text:?}\n  want {want:?} {}\n  got  {got:?} {toks:?}",
                    case["tokens"]
                ));
                continue;
            }
            // The flags add exactly one BOS in front and one EOS at the end.
            let mut body = &want[..];
            if bos {
                assert_eq!(
                    body.first().copied(),
                    bos_id,
                    "{file}: {text:?} starts with BOS"
                );
                body = &body[1..];
            }
            if eos {
                assert_eq!(
                    body.last().copied(),
                    eos_id,
                    "{file}: {text:?} ends with EOS"
                );
                body = &body[..body.len() - 1];
            }
            let back = tok.decode(body, false).unwrap();
            let expect = case["decoded"].as_str().unwrap();
            if back != expect {
                failures.push(format!(
                    "{file}: decode of {text:?} gives {back:?}, want {expect:?}"
                ));
            }
            // Every hard string here survives the round trip.
            assert_eq!(expect, text, "{file}: the reference decode is not the text");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn gemma_gguf_special_tokens_and_flags() {
    let tok = gguf_tokenizer("tok-gemma.gguf", None);
    let tokens = json("tokenizers/tokens.json");
    let added = &tokens["tok-gemma.gguf"]["added_tokens_decoder"];
    for (id, name) in [(0, "<pad>"), (1, "<eos>"), (2, "<bos>"), (3, "<unk>")] {
        assert_eq!(added[id.to_string()], name, "reference id of {name}");
        assert_eq!(tok.token_to_id(name), Some(id), "{name}");
    }
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(2), Some(1)));
    // The turn markers are control tokens: one id each, dropped by skip_special.
    let turn = added["4"].as_str().unwrap();
    assert_eq!(turn, "<start_of_turn>");
    let ids = tok.encode(&format!("{turn}hi"), false).unwrap();
    assert_eq!(ids[0], 4);
    assert_eq!(tok.decode(&ids, true).unwrap(), "hi");
    let eos = gguf_tokenizer("tok-gemma-eos.gguf", None);
    assert!(!eos.adds_bos());
    assert_eq!(
        eos.encode("", true).unwrap(),
        vec![1],
        "EOS alone for empty text"
    );
}

/// The templates in the GGUF and in tests/reference/data/tokenizers agree.
#[test]
fn gemma_gguf_carries_the_gemma3_template() {
    let tok = gguf_tokenizer("tok-gemma.gguf", None);
    let file = std::fs::read_to_string(data_dir("tokenizers/gemma3.jinja")).unwrap();
    assert_eq!(tok.chat_template(), Some(file.as_str()));
}

fn check_chat(family: &str, tok: &Tokenizer) {
    let chat = json("tokenizers/chat.json");
    let cases = chat[family].as_array().unwrap();
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for c in cases {
        let messages: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let want = c["rendered"].as_str().unwrap();
        match tok.render_chat(&messages, gen) {
            Ok(got) if got == want => {}
            Ok(got) => failures.push(format!(
                "{family} {} gen={gen}:\n  want {want:?}\n  got  {got:?}",
                c["name"]
            )),
            Err(e) => failures.push(format!("{family} {} gen={gen}: {e}", c["name"])),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn gemma3_chat_template_renders_as_transformers() {
    let tok = gguf_tokenizer("tok-gemma.gguf", None);
    let specials = json("tokenizers/chat.json")["specials"]["gemma3"].clone();
    assert_eq!(
        tok.id_to_token(tok.bos_id().unwrap()).as_deref(),
        specials["bos_token"].as_str()
    );
    check_chat("gemma3", &tok);
    // The template's own check: roles must alternate after the system turn.
    let bad = [
        ChatMessage::new("system", "s"),
        ChatMessage::new("assistant", "a"),
    ];
    let e = tok.render_chat(&bad, false).unwrap_err().to_string();
    assert!(e.contains("Conversation roles must alternate"), "{e}");
}

#[test]
fn qwen3_chat_template_renders_as_transformers() {
    let template = std::fs::read_to_string(data_dir("tokenizers/qwen3.jinja")).unwrap();
    // A vocabulary with Qwen's <|im_start|>/<|im_end|>/<|endoftext|>.
    let tok = gguf_tokenizer("tok-default.gguf", Some(template));
    let specials = json("tokenizers/chat.json")["specials"]["qwen3"].clone();
    assert_eq!(
        tok.id_to_token(tok.eos_id().unwrap()).as_deref(),
        specials["eos_token"].as_str()
    );
    check_chat("qwen3", &tok);
}

/// PEFT's default targets and `all-linear` on every tiny model.
#[test]
fn lora_default_targets_follow_peft() {
    let r = json("tokenizers/lora_targets.json");
    for (name, want) in r["models"].as_object().unwrap() {
        let cfg = ModelConfig::from_file(&data_dir(&format!("{name}/config.json"))).unwrap();
        let spec = ModelSpec::saved(&cfg);
        // The linears wgtune adapts: every block's (the output head is not one).
        let names: Vec<String> = spec.linears().iter().map(|l| l.name.clone()).collect();
        let targets = default_targets(names.iter().map(String::as_str)).unwrap();
        let peft: Vec<String> = serde_json::from_value(want["default"].clone()).unwrap();
        assert_eq!(targets, peft, "{name}: default targets");
        let mt = want["model_type"].as_str().unwrap();
        assert_eq!(
            r["mapping"][mt], want["default"],
            "{name}: PEFT's mapping for {mt}"
        );
        for t in &targets {
            assert!(
                names.iter().any(|n| module_matches(n, t)),
                "{name}: {t} matches nothing"
            );
        }
        assert_eq!(
            resolve_targets(&[], names.iter().map(String::as_str)).unwrap(),
            targets
        );
        let mut all = names.clone();
        all.sort();
        let peft_all: Vec<String> = serde_json::from_value(want["all-linear"].clone()).unwrap();
        // PEFT resolves all-linear to module paths, or (gemma3) to the
        // suffixes that match them: either way the same modules.
        let mut peft_modules: Vec<String> = names
            .iter()
            .filter(|n| peft_all.iter().any(|t| module_matches(n, t)))
            .cloned()
            .collect();
        peft_modules.sort();
        assert_eq!(
            all, peft_modules,
            "{name}: all-linear (output head excluded)"
        );
    }
    // Qwen3 and Gemma 3 use the q_proj/v_proj names, as llama does.
    for mt in ["qwen3", "gemma3_text"] {
        assert_eq!(r["mapping"][mt], r["mapping"]["llama"], "{mt}");
    }
    let e = default_targets(["model.layers.0.attn.qkv_proj"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--lora-targets") && e.contains("qkv_proj"),
        "{e}"
    );
}
