//! The tokenizer of a GGUF file, rebuilt as the `tokenizer.json` and
//! `tokenizer_config.json` of a Hugging Face folder from the
//! `tokenizer.ggml.*` metadata, so `Tokenizer::load` runs it like any other.
//!
//! Two vocabulary kinds (`tokenizer.ggml.model`) are supported:
//!
//! - `gpt2`: byte-level BPE. Vocabulary, merges and token types come from
//!   the file; the pre-tokenizer is chosen by `tokenizer.ggml.pre` and
//!   reproduces llama.cpp's regexes (and the `tokenizer.json` the original
//!   model ships). A pre-tokenizer we cannot reproduce exactly is an error,
//!   since a silently different split gives ids the model never saw.
//! - `llama`: SentencePiece-style BPE with byte fallback, built the way
//!   transformers 5 (`integrations/gguf/gguf_tokenizer_mapping.py`,
//!   `LlamaTokenizer`) builds it: merges recovered from the scores when the
//!   file has none, `Metaspace(prepend_scheme="first")`. Gemma files
//!   (`general.architecture` gemma*) follow Gemma's own tokenizer.json
//!   instead: `Replace(" ", "▁")` normalizer, no dummy prefix.
//!
//! `tokenizer.ggml.add_bos_token` / `add_eos_token` become the
//! post-processor (defaults as llama.cpp: BOS for SentencePiece and the
//! Llama 3 group, no EOS).
//!
//! Control tokens (type 3) become special added tokens and user-defined ones
//! (type 4) plain added tokens, so that `<|im_start|>` written in text is one
//! token, as llama.cpp and transformers both do.
//!
//! Length: about 730 lines of code plus tests, one per vocabulary kind and
//! pre-tokenizer table; each piece is only meaningful next to the others.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;

use serde_json::{json, Value as Json};

use super::gguf::{Gguf, Value};
use crate::error::{Error, Result};

/// The tokenizer files of a Hugging Face folder, built from GGUF
/// `tokenizer.ggml.*` metadata.
pub struct TokenizerFiles {
    /// `tokenizer.json`.
    pub tokenizer_json: Json,
    /// `tokenizer_config.json`: special token strings, `add_bos_token` /
    /// `add_eos_token` (agreeing with the post-processor), the chat template
    /// and `model_max_length` when the file has them.
    pub tokenizer_config: Json,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

/// `tokenizer.ggml.pre` values supported, for error messages.
pub const SUPPORTED_PRE: &str = "default; gpt-2 (alias gpt2), phi-2; smollm, starcoder, refact, \
     codeshell; llama3, llama-v3, llama-bpe, falcon3, falcon-h1, pixtral, midm-2.0, lfm2, \
     jina-v5-nano, dbrx, smaug-bpe; qwen2, deepseek-r1-qwen, kormo, f2llmv2, megrez";

/// `tokenizer.ggml.model` values supported, for error messages.
pub const SUPPORTED_MODELS: &str = "gpt2 (byte-level BPE), llama (SentencePiece BPE)";

/// llama.cpp's token types (`llama_token_type`).
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// The Llama 3 split regex, as in Llama 3's tokenizer.json.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT: these split one after the
/// other, each cutting the previous pieces into matches and the text
/// between them (`unicode_regex_split`). The second is GPT-2's, whose
/// trailing `|\s+` the kept gaps make unnecessary.
const DEFAULT_SPLITS: [&str; 4] = [
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];
/// Qwen2's: Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a byte-level vocabulary splits text before BPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pre {
    /// GPT-2's regex (`ByteLevel(use_regex=True)`).
    Gpt2,
    /// Every digit alone, then GPT-2's regex (llama.cpp's STARCODER group).
    DigitsGpt2,
    /// Llama 3's regex; `ignore_merges` per llama.cpp.
    Llama3 { ignore_merges: bool },
    /// Qwen2's regex, NFC first as Qwen2's tokenizer.json does.
    Qwen2,
    /// llama.cpp's generic split ([`DEFAULT_SPLITS`]).
    Default,
}

fn pre_type(pre: &str) -> Option<Pre> {
    Some(match pre {
        // "gpt2" is not a llama.cpp name but an obvious spelling of "gpt-2".
        "gpt-2" | "gpt2" | "phi-2" => Pre::Gpt2,
        "smollm" | "starcoder" | "refact" | "codeshell" => Pre::DigitsGpt2,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => Pre::Llama3 {
            ignore_merges: true,
        },
        // Same regex, but llama.cpp keeps the merges for these two.
        "dbrx" | "smaug-bpe" => Pre::Llama3 {
            ignore_merges: false,
        },
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => Pre::Qwen2,
        "default" => Pre::Default,
        _ => return None,
    })
}

/// GPT-2's byte-to-character table (`bytes_to_unicode`).
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            next += 1;
            next - 1
        };
        // Every value is below 256 + 68, a valid scalar.
        table[b as usize] = char::from_u32(c).unwrap_or('\0');
    }
    table
}

/// The metadata this module reads, checked once.
struct Meta<'a> {
    g: &'a Gguf,
    tokens: Vec<&'a str>,
    types: Vec<i64>,
}

impl Meta<'_> {
    fn err(&self, message: String) -> Error {
        err(self.g, message)
    }

    /// An optional `tokenizer.ggml.*_token_id`, checked against the vocabulary.
    fn token_id(&self, key: &str) -> Result<Option<u32>> {
        let full = format!("tokenizer.ggml.{key}");
        let Some(v) = self.g.get(&full) else {
            return Ok(None);
        };
        // llama.cpp writes -1 (as u32 0xFFFFFFFF in old files) for "none".
        if matches!(v.as_i64(), Some(-1)) || v.as_u64() == Some(u32::MAX as u64) {
            return Ok(None);
        }
        let id = v
            .as_u64()
            .ok_or_else(|| self.err(format!("`{full}` is not a token id: {v:?}")))?;
        if id >= self.tokens.len() as u64 {
            return Err(self.err(format!(
                "`{full}` is {id}, outside the vocabulary of {} tokens",
                self.tokens.len()
            )));
        }
        Ok(Some(id as u32))
    }

    fn flag(&self, key: &str) -> Result<Option<bool>> {
        match self.g.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{key}` is not a bool: {v:?}"))),
        }
    }
}

fn err(g: &Gguf, message: String) -> Error {
    Error::Tokenizer {
        path: g.path.clone(),
        message,
    }
}

/// A metadata array of strings.
fn str_array<'a>(g: &'a Gguf, key: &str) -> Result<Option<Vec<&'a str>>> {
    let Some(v) = g.get(key) else { return Ok(None) };
    let a = v
        .as_array()
        .ok_or_else(|| err(g, format!("`{key}` is not an array")))?;
    a.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .ok_or_else(|| err(g, format!("`{key}`[{i}] is not a string: {v:?}")))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// A metadata array of numbers, of the vocabulary's length.
fn num_array<T>(
    g: &Gguf,
    key: &str,
    n: usize,
    get: impl Fn(&Value) -> Option<T>,
) -> Result<Option<Vec<T>>> {
    let Some(v) = g.get(key) else { return Ok(None) };
    let a = v
        .as_array()
        .ok_or_else(|| err(g, format!("`{key}` is not an array")))?;
    if a.len() != n {
        return Err(err(
            g,
            format!(
                "`{key}` has {} entries but `tokenizer.ggml.tokens` has {n}",
                a.len()
            ),
        ));
    }
    a.iter()
        .enumerate()
        .map(|(i, v)| get(v).ok_or_else(|| err(g, format!("`{key}`[{i}] is not a number: {v:?}"))))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// One `added_tokens` entry of tokenizer.json.
fn added(id: usize, content: &str, special: bool) -> Json {
    json!({
        "id": id,
        "content": content,
        "single_word": false,
        "lstrip": false,
        "rstrip": false,
        "normalized": false,
        "special": special,
    })
}

/// transformers' `TemplateProcessing` for `add_bos`/`add_eos`
/// (`TokenizersBackend.update_post_processor`).
fn template(bos: Option<(&str, u32)>, eos: Option<(&str, u32)>) -> Json {
    let tok = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (s, type_id) in [("A", 0), ("B", 1)] {
        let out = if s == "A" { &mut single } else { &mut pair };
        if let Some((t, _)) = bos {
            out.push(tok(t, type_id));
        }
        out.push(seq(s, type_id));
        if let Some((t, _)) = eos {
            out.push(tok(t, type_id));
        }
    }
    let pair: Vec<Json> = single.iter().cloned().chain(pair).collect();
    let mut special = serde_json::Map::new();
    for (t, id) in bos.into_iter().chain(eos) {
        special.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special,
    })
}

/// Merges recovered from a SentencePiece vocabulary, exactly as
/// transformers' `generate_merges(vocab, vocab_scores)`: every split of a
/// piece into two pieces of the vocabulary, ordered by the piece's score
/// (descending), then by the lengths of the left and right parts
/// (descending); ties keep vocabulary order.
fn merges_from_scores(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    // Python dicts: the last duplicate's value, the first one's position.
    let mut vocab: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut score: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (i, (&t, &s)) in tokens.iter().zip(scores).enumerate() {
        if vocab.insert(t, i).is_none() {
            order.push(t);
        }
        score.insert(t, s);
    }
    struct M<'a> {
        l: &'a str,
        r: &'a str,
        score: f32,
        ll: usize,
        lr: usize,
    }
    let mut merges: Vec<M> = Vec::new();
    let mut local: Vec<M> = Vec::new();
    for &piece in &order {
        local.clear();
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(_), Some(_)) = (vocab.get(l), vocab.get(r)) {
                local.push(M {
                    l,
                    r,
                    score: score[piece],
                    ll: l.chars().count(),
                    lr: r.chars().count(),
                });
            }
        }
        local.sort_by_key(|m| (vocab[m.l], vocab[m.r]));
        merges.append(&mut local);
    }
    // Stable, descending, as Python's `sorted(.., reverse=True)`.
    merges.sort_by(|a, b| {
        (b.score, b.ll, b.lr)
            .partial_cmp(&(a.score, a.ll, a.lr))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    merges
        .into_iter()
        .map(|m| (m.l.to_string(), m.r.to_string()))
        .collect()
}

/// `tokenizer.ggml.merges` ("left right") as pairs.
fn file_merges(g: &Gguf, merges: &[&str]) -> Result<Vec<(String, String)>> {
    merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split(' ').collect::<Vec<_>>()[..] {
            [l, r] if !l.is_empty() && !r.is_empty() => Ok((l.to_string(), r.to_string())),
            _ => Err(err(
                g,
                format!(
                    "`tokenizer.ggml.merges`[{i}] is {m:?}, not two tokens separated by a space"
                ),
            )),
        })
        .collect()
}

/// Builds the tokenizer files of `g` from its `tokenizer.ggml.*` metadata.
pub fn tokenizer_from_gguf(g: &Gguf) -> Result<TokenizerFiles> {
    let model = match g.get("tokenizer.ggml.model") {
        None => {
            return Err(err(
                g,
                "GGUF metadata has no `tokenizer.ggml.model`; the file carries no tokenizer".into(),
            ))
        }
        Some(v) => v
            .as_str()
            .ok_or_else(|| err(g, format!("`tokenizer.ggml.model` is not a string: {v:?}")))?,
    };
    if !matches!(model, "gpt2" | "llama") {
        return Err(err(
            g,
            format!(
                "tokenizer.ggml.model `{model}` is not supported; supported: {SUPPORTED_MODELS}"
            ),
        ));
    }
    let tokens = str_array(g, "tokenizer.ggml.tokens")?.unwrap_or_default();
    if tokens.is_empty() {
        return Err(err(
            g,
            "GGUF metadata has no (or an empty) `tokenizer.ggml.tokens`".into(),
        ));
    }
    if u32::try_from(tokens.len()).is_err() {
        return Err(err(g, format!("{} tokens is too many", tokens.len())));
    }
    let types = num_array(g, "tokenizer.ggml.token_type", tokens.len(), Value::as_i64)?
        .unwrap_or_else(|| vec![TYPE_NORMAL; tokens.len()]);
    let m = Meta { g, tokens, types };
    match model {
        "gpt2" => byte_level(&m),
        _ => sentencepiece(&m),
    }
}

/// Special token ids and the add-BOS/EOS flags, common to both kinds.
struct Specials {
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

impl Specials {
    fn read(m: &Meta, default_add_bos: bool) -> Result<Specials> {
        let s = Specials {
            bos: m.token_id("bos_token_id")?,
            eos: m.token_id("eos_token_id")?,
            unk: m.token_id("unknown_token_id")?,
            pad: m.token_id("padding_token_id")?,
            add_bos: m
                .flag("tokenizer.ggml.add_bos_token")?
                .unwrap_or(default_add_bos),
            add_eos: m.flag("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        };
        // llama.cpp refuses these files too.
        if s.add_bos && s.bos.is_none() {
            return Err(m.err(
                "BOS is to be added (tokenizer.ggml.add_bos_token, or the vocabulary's default) \
                 but `tokenizer.ggml.bos_token_id` is not set"
                    .into(),
            ));
        }
        if s.add_eos && s.eos.is_none() {
            return Err(m.err(
                "tokenizer.ggml.add_eos_token is true but `tokenizer.ggml.eos_token_id` is not set"
                    .into(),
            ));
        }
        Ok(s)
    }
}

/// Assembles and validates the files. `name(id)` is the string under which
/// tokenizer.json knows token `id`.
fn finish(
    m: &Meta,
    mut tokenizer_json: Json,
    s: &Specials,
    name: &dyn Fn(u32) -> String,
) -> Result<TokenizerFiles> {
    let bos = s.bos.map(|id| (name(id), id));
    let eos = s.eos.map(|id| (name(id), id));
    tokenizer_json["post_processor"] = template(
        bos.as_ref()
            .filter(|_| s.add_bos)
            .map(|(t, id)| (t.as_str(), *id)),
        eos.as_ref()
            .filter(|_| s.add_eos)
            .map(|(t, id)| (t.as_str(), *id)),
    );
    // Refuse here, naming the GGUF, rather than write a folder that fails to load.
    if let Err(e) = tokenizers::Tokenizer::from_str(&tokenizer_json.to_string()) {
        return Err(m.err(format!(
            "the tokenizer built from `tokenizer.ggml.*` does not load: {e}"
        )));
    }
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": s.add_bos,
        "add_eos_token": s.add_eos,
        "bos_token": bos.map(|b| b.0),
        "eos_token": eos.map(|e| e.0),
        "pad_token": s.pad.map(name),
        "unk_token": s.unk.map(name),
        "clean_up_tokenization_spaces": false,
    });
    if let Some(v) = m.g.get("tokenizer.chat_template") {
        let t = v
            .as_str()
            .ok_or_else(|| m.err("`tokenizer.chat_template` is not a string".into()))?;
        config["chat_template"] = json!(t);
    }
    if let Some(arch) = m.g.get("general.architecture").and_then(Value::as_str) {
        if let Some(n) =
            m.g.get(&format!("{arch}.context_length"))
                .and_then(Value::as_u64)
        {
            config["model_max_length"] = json!(n);
        }
    }
    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config: config,
        bos_token_id: s.bos,
        eos_token_id: s.eos,
        pad_token_id: s.pad,
    })
}

/// `tokenizer.ggml.model == "gpt2"`.
fn byte_level(m: &Meta) -> Result<TokenizerFiles> {
    let pre_name = match m.g.get("tokenizer.ggml.pre") {
        None => {
            return Err(m.err(format!(
            "GGUF metadata has no `tokenizer.ggml.pre`, so how this byte-level vocabulary splits \
                 text is unknown (llama.cpp falls back to a generic regex and warns that quality \
                 degrades); supported values: {SUPPORTED_PRE}"
        )))
        }
        Some(v) => v
            .as_str()
            .ok_or_else(|| m.err(format!("`tokenizer.ggml.pre` is not a string: {v:?}")))?,
    };
    let Some(pre) = pre_type(pre_name) else {
        return Err(m.err(format!(
            "tokenizer.ggml.pre `{pre_name}` is not supported; supported: {SUPPORTED_PRE}"
        )));
    };
    // llama.cpp adds BOS by default only for the Llama 3 group (the one
    // that also ignores merges).
    let s = Specials::read(
        m,
        pre == Pre::Llama3 {
            ignore_merges: true,
        },
    )?;

    let Some(merges) = str_array(m.g, "tokenizer.ggml.merges")? else {
        return Err(m.err(
            "GGUF metadata has no `tokenizer.ggml.merges`, which a byte-level BPE vocabulary needs"
                .into(),
        ));
    };
    let merges = file_merges(m.g, &merges)?;

    // Tokens outside the byte alphabet (added tokens stored as plain text)
    // are respelled byte by byte, as transformers does.
    let spelling = bytes_to_unicode();
    let alphabet: HashSet<char> = spelling.iter().copied().collect();
    let spelled: Vec<String> = m
        .tokens
        .iter()
        .map(|t| {
            if t.chars().all(|c| alphabet.contains(&c)) {
                t.to_string()
            } else {
                t.bytes().map(|b| spelling[b as usize]).collect()
            }
        })
        .collect();
    let mut vocab = serde_json::Map::new();
    for (i, t) in spelled.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
    }

    // Control tokens are special; a control token with characters outside
    // the byte alphabet is a mislabel that transformers skips, and so do we.
    // User-defined tokens are plain added tokens. The named specials are
    // special added tokens, as transformers registers them.
    let mut added_tokens: BTreeMap<usize, Json> = BTreeMap::new();
    for (i, (t, &ty)) in m.tokens.iter().zip(&m.types).enumerate() {
        let in_alphabet = spelled[i] == *t;
        if ty == TYPE_CONTROL && in_alphabet {
            added_tokens.insert(i, added(i, t, true));
        } else if ty == TYPE_USER_DEFINED && in_alphabet {
            added_tokens.insert(i, added(i, t, false));
        }
    }
    for id in [s.bos, s.eos, s.unk, s.pad].into_iter().flatten() {
        let i = id as usize;
        added_tokens
            .entry(i)
            .or_insert_with(|| added(i, &spelled[i], true));
    }
    // An unknown token only if the vocabulary declares one.
    let unk = m
        .types
        .iter()
        .position(|&t| t == TYPE_UNKNOWN)
        .map(|i| spelled[i].clone());

    let byte_level_pre = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    let (normalizer, pre_tokenizer, ignore_merges) = match pre {
        Pre::Gpt2 => (Json::Null, byte_level_pre(true), false),
        Pre::DigitsGpt2 => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level_pre(true),
            ]}),
            false,
        ),
        Pre::Llama3 { ignore_merges } => (
            Json::Null,
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level_pre(false)]}),
            ignore_merges,
        ),
        Pre::Qwen2 => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level_pre(false)]}),
            false,
        ),
        Pre::Default => {
            let mut seq: Vec<Json> = DEFAULT_SPLITS.iter().map(|re| split(re)).collect();
            seq.push(byte_level_pre(false));
            (
                Json::Null,
                json!({"type": "Sequence", "pretokenizers": seq}),
                false,
            )
        }
    };
    let tokenizer_json = tokenizer_json(
        added_tokens.into_values().collect(),
        normalizer,
        pre_tokenizer,
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        bpe_model(unk, false, ignore_merges, Json::Object(vocab), &merges),
    );
    finish(m, tokenizer_json, &s, &|id| spelled[id as usize].clone())
}

/// `tokenizer.ggml.model == "llama"`.
fn sentencepiece(m: &Meta) -> Result<TokenizerFiles> {
    let arch =
        m.g.get("general.architecture")
            .and_then(Value::as_str)
            .unwrap_or("");
    // Gemma: no dummy prefix (the file says add_space_prefix false), spaces
    // turned into "▁" by a normalizer, as Gemma's tokenizer.json does; its
    // user-defined whitespace tokens ("  ", "\n\n") are written with spaces
    // by llama.cpp's converter and match the raw text as added tokens, as
    // llama.cpp's partition does. (Text that itself contains "▁▁" differs:
    // transformers' Gemma matches its "▁▁" token there, llama.cpp and we
    // cannot, the file spelling it with spaces.)
    let gemma = arch.starts_with("gemma");
    // llama.cpp and transformers add BOS to a SentencePiece vocabulary that
    // does not say otherwise.
    let s = Specials::read(m, true)?;
    let merges = match str_array(m.g, "tokenizer.ggml.merges")? {
        Some(merges) => file_merges(m.g, &merges)?,
        None => {
            let Some(scores) = num_array(m.g, "tokenizer.ggml.scores", m.tokens.len(), |v| {
                v.as_f64().map(|f| f as f32)
            })?
            else {
                return Err(m.err(
                    "GGUF metadata has neither `tokenizer.ggml.merges` nor `tokenizer.ggml.scores`; \
                     a SentencePiece vocabulary needs one of them"
                        .into(),
                ));
            };
            merges_from_scores(&m.tokens, &scores)
        }
    };
    let mut vocab = serde_json::Map::new();
    for (i, t) in m.tokens.iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    let mut added_tokens: BTreeMap<usize, Json> = BTreeMap::new();
    for (i, (t, &ty)) in m.tokens.iter().zip(&m.types).enumerate() {
        if ty == TYPE_CONTROL {
            added_tokens.insert(i, added(i, t, true));
        } else if ty == TYPE_USER_DEFINED {
            added_tokens.insert(i, added(i, t, false));
        }
    }
    for id in [s.bos, s.eos, s.unk, s.pad].into_iter().flatten() {
        let i = id as usize;
        added_tokens
            .entry(i)
            .or_insert_with(|| added(i, m.tokens[i], true));
    }
    let unk = s
        .unk
        .map(|id| m.tokens[id as usize].to_string())
        .or_else(|| {
            m.types
                .iter()
                .position(|&t| t == TYPE_UNKNOWN)
                .map(|i| m.tokens[i].to_string())
        });
    // transformers ignores `add_space_prefix`; llama.cpp honours it, and so
    // do we (it only ever says false on purpose).
    let prefix = m.flag("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let (normalizer, pre_tokenizer) = if arch == "phi3" || gemma {
        // transformers' `phi3_tokenizer` and Gemma's tokenizer.json: the
        // prefix (if any) and the spaces come from a normalizer.
        let mut n = Vec::new();
        if prefix {
            n.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
        }
        n.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
        (json!({"type": "Sequence", "normalizers": n}), Json::Null)
    } else {
        (
            Json::Null,
            json!({
                "type": "Metaspace",
                "replacement": "\u{2581}",
                "prepend_scheme": if prefix { "first" } else { "never" },
                "split": false,
            }),
        )
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let tokenizer_json = tokenizer_json(
        added_tokens.into_values().collect(),
        normalizer,
        pre_tokenizer,
        json!({"type": "Sequence", "decoders": decoders}),
        bpe_model(unk, true, false, Json::Object(vocab), &merges),
    );
    finish(m, tokenizer_json, &s, &|id| {
        m.tokens[id as usize].to_string()
    })
}

/// A tokenizer.json with no post-processor yet (`finish` adds it).
fn tokenizer_json(
    added_tokens: Vec<Json>,
    normalizer: Json,
    pre_tokenizer: Json,
    decoder: Json,
    model: Json,
) -> Json {
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": decoder,
        "model": model,
    })
}

/// The BPE model: byte-level (no byte fallback) or SentencePiece-style
/// (byte fallback, fused unknowns), each as its original tokenizer.json has it.
fn bpe_model(
    unk: Option<String>,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: Json,
    merges: &[(String, String)],
) -> Json {
    let affix = if byte_fallback {
        json!(null)
    } else {
        json!("")
    };
    json!({
        "type": "BPE",
        "dropout": null,
        "unk_token": unk,
        "continuing_subword_prefix": affix,
        "end_of_word_suffix": affix,
        "fuse_unk": byte_fallback,
        "byte_fallback": byte_fallback,
        "ignore_merges": ignore_merges,
        "vocab": vocab,
        "merges": merges.iter().map(|(l, r)| json!([l, r])).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A metadata-only GGUF v3 file.
    fn write_gguf(path: &std::path::Path, kv: &[(&str, Value)]) {
        fn val(out: &mut Vec<u8>, v: &Value) {
            match v {
                Value::U32(x) => out.extend(x.to_le_bytes()),
                Value::I32(x) => out.extend(x.to_le_bytes()),
                Value::F32(x) => out.extend(x.to_le_bytes()),
                Value::Bool(b) => out.push(*b as u8),
                Value::Str(s) => {
                    out.extend((s.len() as u64).to_le_bytes());
                    out.extend(s.as_bytes());
                }
                Value::Array(a) => {
                    out.extend(a.first().map_or(8, ty).to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    for x in a {
                        val(out, x);
                    }
                }
                other => panic!("test writer: unsupported {other:?}"),
            }
        }
        fn ty(v: &Value) -> u32 {
            match v {
                Value::U32(_) => 4,
                Value::I32(_) => 5,
                Value::F32(_) => 6,
                Value::Bool(_) => 7,
                Value::Str(_) => 8,
                Value::Array(_) => 9,
                _ => unreachable!(),
            }
        }
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        out.extend((kv.len() as u64).to_le_bytes());
        for (k, v) in kv {
            val(&mut out, &Value::Str(k.to_string()));
            out.extend(ty(v).to_le_bytes());
            val(&mut out, v);
        }
        std::fs::write(path, out).unwrap();
    }

    fn strs(v: &[&str]) -> Value {
        Value::Array(v.iter().map(|s| Value::Str(s.to_string())).collect())
    }

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "wgtune-gguf-tok-{}-{name}.gguf",
            std::process::id()
        ))
    }

    fn load(files: &TokenizerFiles) -> tokenizers::Tokenizer {
        tokenizers::Tokenizer::from_str(&files.tokenizer_json.to_string()).unwrap()
    }

    fn ids(t: &tokenizers::Tokenizer, s: &str) -> Vec<u32> {
        t.encode(s, true).unwrap().get_ids().to_vec()
    }

    /// A byte-level vocabulary: two control tokens, the 256 byte characters,
    /// then merged tokens.
    fn byte_level_gguf(name: &str, pre: &str, extra: &[(&str, Value)]) -> Gguf {
        let spelling = bytes_to_unicode();
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into()];
        tokens.extend(spelling.iter().map(|c| c.to_string()));
        let merged = ["Ġt", "he", "Ġthe", "12", "123"];
        tokens.extend(merged.iter().map(|s| s.to_string()));
        let mut types = vec![Value::I32(3), Value::I32(3)];
        types.extend((2..tokens.len()).map(|_| Value::I32(1)));
        let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let mut kv = vec![
            ("general.architecture", Value::Str("llama".into())),
            ("llama.context_length", Value::U32(2048)),
            ("tokenizer.ggml.model", Value::Str("gpt2".into())),
            ("tokenizer.ggml.pre", Value::Str(pre.into())),
            ("tokenizer.ggml.tokens", strs(&tokens)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            (
                "tokenizer.ggml.merges",
                strs(&["Ġ t", "h e", "Ġt he", "1 2", "12 3"]),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(0)),
            ("tokenizer.chat_template", Value::Str("{{ x }}".into())),
        ];
        kv.extend(extra.iter().cloned());
        let path = tmp(name);
        write_gguf(&path, &kv);
        let g = Gguf::open(&path).unwrap();
        std::fs::remove_file(&path).ok();
        g
    }

    #[test]
    fn byte_level_pre_tokenizers() {
        let byte = |c: char| 2 + c as u32; // printable ASCII keeps its byte
        let g = byte_level_gguf("smollm", "smollm", &[]);
        let f = tokenizer_from_gguf(&g).unwrap();
        let t = load(&f);
        // Digits split one by one, so the 12/123 merges never apply.
        assert_eq!(
            ids(&t, " the 123"),
            vec![260, byte(' '), byte('1'), byte('2'), byte('3')]
        );
        assert_eq!(ids(&t, "<|im_start|>the"), vec![1, byte('t'), 259]);
        assert_eq!(f.tokenizer_config["add_bos_token"], json!(false));
        assert_eq!(f.tokenizer_config["bos_token"], json!("<|im_start|>"));
        assert_eq!(f.tokenizer_config["model_max_length"], json!(2048));
        assert_eq!(f.tokenizer_config["chat_template"], json!("{{ x }}"));
        assert_eq!((f.bos_token_id, f.eos_token_id), (Some(1), Some(0)));

        let g = byte_level_gguf("gpt2", "gpt-2", &[]);
        let t = load(&tokenizer_from_gguf(&g).unwrap());
        assert_eq!(ids(&t, " the 123"), vec![260, byte(' '), 262]);

        // Llama 3: BOS by default, at most three digits together.
        let g = byte_level_gguf("llama3", "llama-bpe", &[]);
        let f = tokenizer_from_gguf(&g).unwrap();
        assert_eq!(f.tokenizer_config["add_bos_token"], json!(true));
        let t = load(&f);
        assert_eq!(ids(&t, "1234"), vec![1, 262, byte('4')]);

        let g = byte_level_gguf(
            "qwen2",
            "qwen2",
            &[("tokenizer.ggml.add_eos_token", Value::Bool(true))],
        );
        let t = load(&tokenizer_from_gguf(&g).unwrap());
        assert_eq!(ids(&t, "12"), vec![byte('1'), byte('2'), 0]);
    }

    #[test]
    fn unsupported_values_are_named() {
        for pre in ["deepseek-llm", "no-such-pre"] {
            let g = byte_level_gguf(pre, pre, &[]);
            let e = tokenizer_from_gguf(&g).err().unwrap().to_string();
            assert!(
                e.contains(&format!("`{pre}`")) && e.contains("smollm"),
                "{e}"
            );
        }
        let g = byte_level_gguf(
            "bert",
            "smollm",
            &[("tokenizer.ggml.model", Value::Str("bert".into()))],
        );
        let e = tokenizer_from_gguf(&g).err().unwrap().to_string();
        assert!(e.contains("`bert`"), "{e}");
    }

    #[test]
    fn sentencepiece_merges_follow_transformers() {
        // Scores: "ab" best, then "abc" via ("ab","c") and ("a","bc") tied,
        // the longer left part first.
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let scores = [0.0, 0.0, 0.0, -1.0, -3.0, -2.0];
        let merges = merges_from_scores(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        assert_eq!(pairs, [("a", "b"), ("ab", "c"), ("a", "bc"), ("b", "c")]);
    }

    #[test]
    fn sentencepiece_vocabulary() {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        tokens.extend((0..256).map(|b| format!("<0x{b:02X}>")));
        let pieces = [
            "▁", "H", "e", "l", "o", "He", "ll", "llo", "Hello", "▁Hello",
        ];
        tokens.extend(pieces.iter().map(|s| s.to_string()));
        let mut types = vec![Value::I32(2), Value::I32(3), Value::I32(3)];
        types.extend((0..256).map(|_| Value::I32(6)));
        types.extend(pieces.iter().map(|_| Value::I32(1)));
        let mut scores: Vec<Value> = (0..259).map(|_| Value::F32(0.0)).collect();
        scores.extend((0..pieces.len()).map(|i| Value::F32(-(i as f32))));
        let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let path = tmp("spm");
        write_gguf(
            &path,
            &[
                ("general.architecture", Value::Str("llama".into())),
                ("tokenizer.ggml.model", Value::Str("llama".into())),
                ("tokenizer.ggml.tokens", strs(&tokens)),
                ("tokenizer.ggml.token_type", Value::Array(types)),
                ("tokenizer.ggml.scores", Value::Array(scores)),
                ("tokenizer.ggml.bos_token_id", Value::U32(1)),
                ("tokenizer.ggml.eos_token_id", Value::U32(2)),
                ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
            ],
        );
        let g = Gguf::open(&path).unwrap();
        std::fs::remove_file(&path).ok();
        let f = tokenizer_from_gguf(&g).unwrap();
        assert_eq!(f.tokenizer_config["add_bos_token"], json!(true));
        let t = load(&f);
        // "▁Hello" is id 268; "x" is not in the vocabulary: byte fallback.
        let hello = 259 + 9;
        assert_eq!(ids(&t, "Hello"), vec![1, hello]);
        assert_eq!(ids(&t, "Hellox"), vec![1, hello, 3 + b'x' as u32]);
        assert_eq!(t.decode(&ids(&t, "Hellox"), true).unwrap(), "Hellox");
    }
}
