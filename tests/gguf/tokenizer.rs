//! Tokenizers built from GGUF `tokenizer.ggml.*` metadata against reference
//! ids: tokens.json (tests/reference/gguf_generate.py) holds, per tok-*.gguf,
//! the ids of the original tokenizer.json pipeline for byte-level files and
//! of transformers' GGUF loader for the SentencePiece file. The folder we
//! write is loaded through `Tokenizer::load`, as `wgtune import` users get it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value as Json;
use tokenizers::{NormalizedString, Normalizer};
use wgtune::model::gguf::Gguf;
use wgtune::model::gguf_tokenizer::{tokenizer_from_gguf, TokenizerFiles};
use wgtune::model::tokenizer::{ChatMessage, Tokenizer};

fn gguf_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference/data/gguf")
        .join(name)
}

/// A temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "wgtune-gguf-tok-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// Writes the files as a model folder and loads it as wgtune does.
fn load_files(files: &TokenizerFiles, tag: &str) -> (Tokenizer, TempDir) {
    let dir = TempDir::new(tag);
    for (name, json) in [
        ("tokenizer.json", &files.tokenizer_json),
        ("tokenizer_config.json", &files.tokenizer_config),
    ] {
        std::fs::write(
            dir.0.join(name),
            serde_json::to_string_pretty(json).unwrap(),
        )
        .unwrap();
    }
    let tok = Tokenizer::load(&dir.0).unwrap_or_else(|e| panic!("{tag}: {e}"));
    (tok, dir)
}

fn gguf_tokenizer(path: &Path) -> (Tokenizer, TokenizerFiles, TempDir) {
    let g = Gguf::open(path).unwrap();
    let files = tokenizer_from_gguf(&g).unwrap_or_else(|e| panic!("{e}"));
    let tag = path.file_stem().unwrap().to_string_lossy().to_string();
    let (tok, dir) = load_files(&files, &tag);
    (tok, files, dir)
}

/// The text `decode(ids, skip_special = true)` must give back, or None when
/// the reference tokens do not allow a round trip: special tokens written in
/// the text are dropped, and a SentencePiece decoder strips one leading space.
fn round_trip_text(tok: &Tokenizer, spm: bool, text: &str, tokens: &[Json]) -> Option<String> {
    let specials: Vec<String> = tok
        .raw()
        .get_added_tokens_decoder()
        .into_values()
        .filter(|t| t.special)
        .map(|t| t.content)
        .collect();
    let special = |t: &Json| t.as_str().is_some_and(|t| specials.iter().any(|s| s == t));
    let body = if tok.adds_bos() {
        tokens.get(1..).unwrap_or(&[])
    } else {
        tokens
    };
    if body.iter().any(special) || (spm && text.starts_with(' ')) {
        return None;
    }
    // Decoding gives the normalized text (NFC for Qwen2).
    Some(match tok.raw().get_normalizer() {
        Some(n) => {
            let mut s = NormalizedString::from(text);
            n.normalize(&mut s).unwrap();
            s.get().to_string()
        }
        None => text.to_string(),
    })
}

#[test]
fn tokenizer_ids_match_reference() {
    let refs: Json =
        serde_json::from_str(&std::fs::read_to_string(gguf_data("tokens.json")).unwrap()).unwrap();
    let refs = refs.as_object().unwrap();
    assert_eq!(refs.len(), 5, "tokens.json: expected five tok-*.gguf files");
    let mut failures = Vec::new();
    for (file, r) in refs {
        let (tok, files, _dir) = gguf_tokenizer(&gguf_data(file));
        let add_bos = r["add_bos"].as_bool().unwrap();
        assert_eq!(tok.adds_bos(), add_bos, "{file}: adds BOS");
        assert_eq!(
            files.tokenizer_config["add_bos_token"].as_bool(),
            Some(add_bos),
            "{file}: add_bos_token in tokenizer_config.json"
        );
        let spm = r["model"] == "llama";
        let cases = r["cases"].as_array().unwrap();
        let (mut same, mut trips, mut trippable) = (0, 0, 0);
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = tok.encode(text, true).unwrap();
            if got == want {
                same += 1;
            } else {
                let toks: Vec<String> = got.iter().filter_map(|&i| tok.id_to_token(i)).collect();
                failures.push(format!(
                    "{file}: {text:?}\n  want {want:?} {}\n  got  {got:?} {toks:?}",
                    case["tokens"]
                ));
            }
            let tokens = case["tokens"].as_array().unwrap();
            if let Some(expect) = round_trip_text(&tok, spm, text, tokens) {
                trippable += 1;
                let back = tok.decode(&want, true).unwrap();
                if back == expect {
                    trips += 1;
                } else {
                    failures.push(format!(
                        "{file}: decode of {text:?} gives {back:?}, want {expect:?}"
                    ));
                }
            }
        }
        eprintln!(
            "{file}: {same}/{} ids equal the reference, {trips}/{trippable} decodes round-trip",
            cases.len()
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn tokenizer_special_tokens_and_template() {
    let (tok, files, _dir) = gguf_tokenizer(&gguf_data("tok-smollm.gguf"));
    // SmolLM2-Instruct style: <|endoftext|> 0 pads, <|im_start|> 1, <|im_end|> 2.
    assert_eq!(
        (files.bos_token_id, files.eos_token_id, files.pad_token_id),
        (Some(1), Some(2), Some(0))
    );
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (Some(1), Some(2), Some(0))
    );
    let text = tok
        .render_chat(&[ChatMessage::new("user", "hi")], true)
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&text, false).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 2, "{ids:?}");

    let (tok, files, _dir) = gguf_tokenizer(&gguf_data("tok-llama-spm.gguf"));
    assert_eq!((files.bos_token_id, files.eos_token_id), (Some(1), Some(2)));
    assert_eq!(files.tokenizer_config["unk_token"], "<unk>");
    assert_eq!(tok.encode("", true).unwrap(), vec![1]);
}

/// A copy of `src` with string metadata `key` set to `new` (the files have
/// no tensors, so nothing after the metadata moves with it).
fn patched(src: &str, key: &str, new: &str, dir: &TempDir) -> PathBuf {
    let bytes = std::fs::read(gguf_data(src)).unwrap();
    let g = Gguf::open(&gguf_data(src)).unwrap();
    assert!(g.tensors.is_empty(), "{src} has tensors");
    let old = g.get(key).and_then(|v| v.as_str()).unwrap();
    let entry = |v: &str| {
        let mut e = (key.len() as u64).to_le_bytes().to_vec();
        e.extend(key.as_bytes());
        e.extend(8u32.to_le_bytes());
        e.extend((v.len() as u64).to_le_bytes());
        e.extend(v.as_bytes());
        e
    };
    let (from, to) = (entry(old), entry(new));
    let at = bytes
        .windows(from.len())
        .position(|w| w == from.as_slice())
        .unwrap();
    let out = [&bytes[..at], &to, &bytes[at + from.len()..]].concat();
    let path = dir.0.join(format!("{new}.gguf"));
    std::fs::write(&path, out).unwrap();
    path
}

#[test]
fn tokenizer_unknown_pre_and_model_are_named() {
    let dir = TempDir::new("errors");
    for pre in ["deepseek-llm", "no-such-pre"] {
        let g = Gguf::open(&patched("tok-gpt2.gguf", "tokenizer.ggml.pre", pre, &dir)).unwrap();
        let e = tokenizer_from_gguf(&g).err().expect(pre).to_string();
        assert!(
            e.contains(&format!("`{pre}`")) && e.contains("smollm") && e.contains("qwen2"),
            "{pre}: {e}"
        );
        assert!(e.contains(&format!("{pre}.gguf")), "{pre}: no path in {e}");
    }
    for model in ["bert", "t5", "rwkv"] {
        let p = patched("tok-gpt2.gguf", "tokenizer.ggml.model", model, &dir);
        let g = Gguf::open(&p).unwrap();
        let e = tokenizer_from_gguf(&g).err().expect(model).to_string();
        assert!(
            e.contains(&format!("`{model}`")) && e.contains("gpt2") && e.contains("llama"),
            "{model}: {e}"
        );
    }
}

fn home_default(var: &str, rel: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(rel),
    }
}

/// The real SmolLM2-135M-Instruct GGUF against its Hugging Face tokenizer
/// (WGTUNE_SMOLLM2_GGUF, WGTUNE_SMOLLM2_DIR; skipped when absent).
#[test]
#[ignore = "needs the SmolLM2 GGUF and HF folder (~/.cache/wgtune-ref)"]
fn tokenizer_real_smollm2_matches_hf() {
    let gguf = home_default(
        "WGTUNE_SMOLLM2_GGUF",
        ".cache/wgtune-ref/gguf/SmolLM2-135M-Instruct.Q4_1.gguf",
    );
    let hf_dir = home_default(
        "WGTUNE_SMOLLM2_DIR",
        ".cache/wgtune-ref/smollm2-135m-instruct",
    );
    if !gguf.is_file() || !hf_dir.join("tokenizer.json").is_file() {
        eprintln!(
            "skipping: {} or {}/tokenizer.json is missing",
            gguf.display(),
            hf_dir.display()
        );
        return;
    }
    let (ours, _, _dir) = gguf_tokenizer(&gguf);
    let hf = Tokenizer::load(&hf_dir).unwrap();
    let texts = [
        "Hello world! The quick brown fox jumps over the lazy dog.",
        "In 2024, 12345 + 678 = 13023 and 3.14159e-10",
        "Phone: +1 (555) 010-9999, ZIP 90210",
        "emoji: 😀 👍🏽 🏳️‍🌈 ok🎉",
        "def add(a, b):\n    return a + b\n\nfor i in range(10):\n\tprint(i)\n",
        "fn main() {\n    let x: u32 = 42;\n        println!(\"{x}\");\n}",
        "東京は日本の首都です。你好，世界！한국어 텍스트",
        "  leading, trailing   and    multiple spaces  ",
        "line one\n\n\nline two\r\n\r\n",
        "I'M sure we've got it, don't you? WE'LL SEE.",
        "Café naïve Ünïcödé résumé — Ångström",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|><repo_name>wgtune<file_sep>src/main.rs",
        "",
        "Ⅻ ½ ² ٣ ۴ १२३ 𝟙𝟚",
    ];
    let mut same = 0;
    let mut diffs = Vec::new();
    for text in texts {
        let a = ours.encode(text, true).unwrap();
        let b = hf.encode(text, true).unwrap();
        if a == b {
            same += 1;
        } else {
            diffs.push(format!("{text:?}\n  gguf {a:?}\n  hf   {b:?}"));
        }
        assert_eq!(
            ours.decode(&a, false).unwrap(),
            hf.decode(&b, false).unwrap()
        );
    }
    eprintln!("SmolLM2: {same}/{} strings give the same ids", texts.len());
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    assert_eq!(ours.vocab_size(), hf.vocab_size());
    assert_eq!(
        (ours.bos_id(), ours.eos_id(), ours.pad_id(), ours.adds_bos()),
        (hf.bos_id(), hf.eos_id(), hf.pad_id(), hf.adds_bos())
    );
    let msgs = [ChatMessage::new("user", "Hi there")];
    assert_eq!(
        ours.render_chat(&msgs, true).unwrap(),
        hf.render_chat(&msgs, true).unwrap()
    );
}
