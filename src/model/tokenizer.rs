//! The tokenizer of a Hugging Face model folder, resolved the way
//! transformers (v5) resolves it, so ids match `AutoTokenizer` exactly:
//!
//! - `tokenizer.json` (required) is run by the `tokenizers` crate, the same
//!   Rust code transformers' fast tokenizers call. Its post-processor decides
//!   whether `encode(.., true)` adds BOS/EOS; transformers ignores
//!   `add_bos_token`/`add_eos_token` when a `tokenizer.json` exists, and so do we.
//! - `tokenizer_config.json` (optional): `bos_token`, `eos_token`,
//!   `pad_token`, `unk_token` (a string or `{"content": ..}`) and the
//!   `chat_template` (a string, or a list of `{name, template}` of which we
//!   take `default`). `chat_template.jinja` beside it takes priority, as in
//!   transformers; `special_tokens_map.json` fills tokens the config lacks.
//! - `generation_config.json` (optional): `eos_token_id` (an int or a list:
//!   every id in it stops generation), `bos_token_id`, `pad_token_id`.
//!
//! Chat templates are Jinja, rendered by the engine in `chat_template.rs`
//! (configured like transformers').
//!
//! `StreamDecoder` turns generated ids into text incrementally without ever
//! emitting half of a multi-byte character.
//!
//! Length: about 600 lines of code; the rest is unit tests and the toy
//! model folder other modules' tests share.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::value::Value;
use serde::Deserialize;
use serde_json::Value as Json;

use crate::error::{Error, Result};

// A child module in its own file, so the model module map stays as it is.
#[path = "chat_template.rs"]
mod chat_template;
use chat_template::{compile_chat_template, describe, CHAT};

/// One chat turn: `{"role": "user", "content": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A special token: its text and its id.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Special {
    text: String,
    id: u32,
}

/// A model folder's tokenizer plus its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `tokenizer.json`, named in encode/decode errors.
    path: PathBuf,
    /// `tokenizer_config.json` (whether or not it exists), named in
    /// special-token and chat-template errors.
    config_path: PathBuf,
    bos: Option<Special>,
    eos: Option<Special>,
    pad: Option<Special>,
    unk: Option<Special>,
    /// Every id that ends generation: `eos` then `generation_config.json`'s.
    eos_ids: Vec<u32>,
    /// Whether `encode(.., true)` prepends BOS (measured, not configured).
    adds_bos: bool,
    /// The template source, as the model folder has it.
    chat_template: Option<String>,
    /// Where the template came from, for error messages.
    chat_template_path: PathBuf,
    /// The compiled template, or why it failed to compile (reported by
    /// `render_chat`, so a model with a template minijinja cannot parse is
    /// still usable for plain text).
    chat: Option<std::result::Result<minijinja::Environment<'static>, String>>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("eos_ids", &self.eos_ids)
            .field("adds_bos", &self.adds_bos)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// Reads an optional file: `Ok(None)` when it does not exist.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    if !path.exists() {
        return Ok(None);
    }
    std::fs::read(path).map(Some).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses an optional JSON file's bytes (`Null` when absent); `path` names
/// it in errors.
fn parse_optional_json(path: &Path, bytes: Option<&[u8]>) -> Result<Json> {
    let Some(bytes) = bytes else {
        return Ok(Json::Null);
    };
    serde_json::from_slice(bytes).map_err(|e| Error::Tokenizer {
        path: path.to_path_buf(),
        message: format!("malformed JSON: {e}"),
    })
}

/// The contents of a model folder's tokenizer files, the input of
/// [`Tokenizer::from_files`]. `dir` only names the files in errors.
#[derive(Clone, Debug, Default)]
pub struct TokenizerFiles {
    pub dir: PathBuf,
    /// `tokenizer.json` (required).
    pub tokenizer_json: Vec<u8>,
    pub tokenizer_config: Option<Vec<u8>>,
    pub special_tokens_map: Option<Vec<u8>>,
    pub generation_config: Option<Vec<u8>>,
    /// `chat_template.jinja`, which wins over the config's `chat_template`.
    pub chat_template_jinja: Option<String>,
}

impl TokenizerFiles {
    /// Reads the tokenizer files of the model folder `dir`.
    pub fn read(dir: &Path) -> Result<TokenizerFiles> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Tokenizer {
                path,
                message: "not found; wgtune needs the fast-tokenizer file\n---> HINT: for a model \
                          that ships only tokenizer.model, run in Python: \
                          AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
                    .into(),
            });
        }
        let tokenizer_json = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let jinja = dir.join("chat_template.jinja");
        let chat_template_jinja = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|source| Error::Io {
                path: jinja.clone(),
                source,
            })?)
        } else {
            None
        };
        Ok(TokenizerFiles {
            dir: dir.to_path_buf(),
            tokenizer_json,
            tokenizer_config: read_optional(&dir.join("tokenizer_config.json"))?,
            special_tokens_map: read_optional(&dir.join("special_tokens_map.json"))?,
            generation_config: read_optional(&dir.join("generation_config.json"))?,
            chat_template_jinja,
        })
    }
}

/// A special-token entry: `"<s>"`, `{"content": "<s>", ..}` or `null`.
fn token_text(path: &Path, key: &str, v: Option<&Json>) -> Result<Option<String>> {
    match v {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(o)) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::Tokenizer {
                path: path.to_path_buf(),
                message: format!("`{key}` is an object without a string `content`"),
            }),
        },
        Some(other) => Err(Error::Tokenizer {
            path: path.to_path_buf(),
            message: format!("`{key}` must be a string or {{\"content\": ..}}, got {other}"),
        }),
    }
}

/// A `generation_config.json` id entry: an int, a list of ints, or `null`.
fn id_list(path: &Path, key: &str, v: Option<&Json>) -> Result<Vec<u32>> {
    let bad = || Error::Tokenizer {
        path: path.to_path_buf(),
        message: format!("`{key}` must be a token id or a list of token ids"),
    };
    let one = |v: &Json| {
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(bad)
    };
    match v {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(a)) => a.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

impl Tokenizer {
    /// Loads the tokenizer files of the model folder `dir`.
    pub fn load(dir: &Path) -> Result<Tokenizer> {
        Tokenizer::from_files(&TokenizerFiles::read(dir)?)
    }

    /// A tokenizer from the contents of its files.
    pub fn from_files(files: &TokenizerFiles) -> Result<Tokenizer> {
        let dir = files.dir.as_path();
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_bytes(&files.tokenizer_json).map_err(|e| {
            Error::Tokenizer {
                path: path.clone(),
                message: format!("cannot load: {e}"),
            }
        })?;

        let config_path = dir.join("tokenizer_config.json");
        let config = parse_optional_json(&config_path, files.tokenizer_config.as_deref())?;
        let map_path = dir.join("special_tokens_map.json");
        let special_map = parse_optional_json(&map_path, files.special_tokens_map.as_deref())?;
        let gen_path = dir.join("generation_config.json");
        let gen = parse_optional_json(&gen_path, files.generation_config.as_deref())?;

        // A token named in tokenizer_config.json (else special_tokens_map.json)
        // must be in the vocabulary.
        let special = |key: &str| -> Result<Option<Special>> {
            let (file, text) = match token_text(&config_path, key, config.get(key))? {
                Some(t) => (&config_path, Some(t)),
                None => (&map_path, token_text(&map_path, key, special_map.get(key))?),
            };
            let Some(text) = text else { return Ok(None) };
            let id = inner.token_to_id(&text).ok_or_else(|| Error::Tokenizer {
                path: file.clone(),
                message: format!("{key} `{text}` is not in the vocabulary of tokenizer.json"),
            })?;
            Ok(Some(Special { text, id }))
        };
        // generation_config.json's ids fill what the tokenizer config lacks.
        let by_id = |id: u32| -> Result<Special> {
            let text = inner.id_to_token(id).ok_or_else(|| Error::Tokenizer {
                path: gen_path.clone(),
                message: format!("token id {id} is outside the vocabulary of tokenizer.json"),
            })?;
            Ok(Special { text, id })
        };
        let gen_eos = id_list(&gen_path, "eos_token_id", gen.get("eos_token_id"))?;
        let gen_bos = id_list(&gen_path, "bos_token_id", gen.get("bos_token_id"))?;
        let gen_pad = id_list(&gen_path, "pad_token_id", gen.get("pad_token_id"))?;

        let bos = match special("bos_token")? {
            Some(s) => Some(s),
            None => gen_bos.first().map(|&id| by_id(id)).transpose()?,
        };
        let eos = match special("eos_token")? {
            Some(s) => Some(s),
            None => gen_eos.first().map(|&id| by_id(id)).transpose()?,
        };
        let pad = match special("pad_token")? {
            Some(s) => Some(s),
            None => gen_pad.first().map(|&id| by_id(id)).transpose()?,
        };
        let unk = special("unk_token")?;
        let mut eos_ids: Vec<u32> = eos.iter().map(|s| s.id).collect();
        for id in gen_eos {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }

        let (chat_template, chat_template_path) = chat_template_source(
            dir,
            files.chat_template_jinja.as_deref(),
            &config_path,
            &config,
        )?;
        let chat = chat_template.as_ref().map(|src| compile_chat_template(src));
        if let Some(Err(e)) = &chat {
            log::warn!(
                "{}: the chat template does not compile: {e}",
                chat_template_path.display()
            );
        }

        let mut tok = Tokenizer {
            inner,
            path,
            config_path,
            bos,
            eos,
            pad,
            unk,
            eos_ids,
            adds_bos: false,
            chat_template,
            chat_template_path,
            chat,
        };
        // Measure what the post-processor does rather than trusting flags.
        if let Some(bos) = tok.bos_id() {
            let with = tok.encode("a", true)?;
            let without = tok.encode("a", false)?;
            tok.adds_bos = with.first() == Some(&bos) && without.first() != Some(&bos);
        }
        if let Some(flag) = config.get("add_bos_token").and_then(Json::as_bool) {
            if flag != tok.adds_bos {
                log::debug!(
                    "{}: add_bos_token is {flag} but tokenizer.json's post-processor {} BOS; \
                     following tokenizer.json as transformers does",
                    tok.config_path.display(),
                    if tok.adds_bos { "adds" } else { "does not add" }
                );
            }
        }
        Ok(tok)
    }

    /// Token ids of `text`. With `add_special_tokens` the post-processor runs
    /// (for Llama-style tokenizers: BOS is prepended). Special tokens written
    /// in `text` (`<|im_start|>`) are always recognized, as in transformers.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot encode {:?}: {e}", preview(text)),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`; with `skip_special` special tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot decode {} ids: {e}", ids.len()),
            })
    }

    /// An incremental decoder for generated ids.
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder::new(self, skip_special)
    }

    /// The BOS id (tokenizer config, else generation config).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|s| s.id)
    }

    /// The EOS id (tokenizer config, else generation config's first). Data
    /// rows end with it.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|s| s.id)
    }

    /// Every id that stops generation: the EOS id and all of
    /// `generation_config.json`'s `eos_token_id`.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The padding id, if the model defines one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad.as_ref().map(|s| s.id)
    }

    /// Whether `encode(.., true)` prepends BOS.
    pub fn adds_bos(&self) -> bool {
        self.adds_bos
    }

    /// The vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The token text of `id`, if it exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of the token text `token` (special tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The chat template source, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn raw(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Renders `messages` with the model's chat template, as transformers'
    /// `apply_chat_template(messages, add_generation_prompt=.., tokenize=False)`.
    /// The text still has to be encoded, with `add_special_tokens = false`
    /// (the template writes its own special tokens).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let env = match &self.chat {
            None => {
                return Err(Error::Tokenizer {
                    path: self.config_path.clone(),
                    message: "the model has no chat template (no `chat_template` here and no \
                              chat_template.jinja beside it)"
                        .into(),
                })
            }
            Some(Err(e)) => {
                return Err(Error::Tokenizer {
                    path: self.chat_template_path.clone(),
                    message: format!("the chat template does not compile: {e}"),
                })
            }
            Some(Ok(env)) => env,
        };
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| Value::from_object(m.clone()))
            .collect();
        ctx.insert("messages", Value::from(msgs));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        for (name, tok) in [
            ("bos_token", &self.bos),
            ("eos_token", &self.eos),
            ("pad_token", &self.pad),
            ("unk_token", &self.unk),
        ] {
            if let Some(t) = tok {
                ctx.insert(name, Value::from(t.text.as_str()));
            }
        }
        let ctx: BTreeMap<String, Value> =
            ctx.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let template = env.get_template(CHAT).map_err(|e| Error::Tokenizer {
            path: self.chat_template_path.clone(),
            message: format!("chat template: {e}"),
        })?;
        template
            .render(Value::from(ctx))
            .map_err(|e| Error::Tokenizer {
                path: self.chat_template_path.clone(),
                message: format!("rendering the chat template failed: {}", describe(&e)),
            })
    }
}

/// Shortens `text` for error messages.
fn preview(text: &str) -> String {
    let mut s: String = text.chars().take(60).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

/// Finds the chat template: `chat_template.jinja` first (transformers gives
/// it priority), else `tokenizer_config.json`'s `chat_template`.
fn chat_template_source(
    dir: &Path,
    jinja: Option<&str>,
    config_path: &Path,
    config: &Json,
) -> Result<(Option<String>, PathBuf)> {
    if let Some(text) = jinja {
        return Ok((Some(text.to_string()), dir.join("chat_template.jinja")));
    }
    let bad = |message: String| Error::Tokenizer {
        path: config_path.to_path_buf(),
        message,
    };
    let template = match config.get("chat_template") {
        None | Some(Json::Null) => None,
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(list)) => {
            let mut names = Vec::new();
            let mut found = None;
            for entry in list {
                let name = entry.get("name").and_then(Json::as_str);
                let text = entry.get("template").and_then(Json::as_str);
                let (Some(name), Some(text)) = (name, text) else {
                    return Err(bad(
                        "each `chat_template` list entry needs string `name` and `template`".into(),
                    ));
                };
                names.push(name.to_string());
                if name == "default" {
                    found = Some(text.to_string());
                }
            }
            match found {
                Some(t) => Some(t),
                None => {
                    return Err(bad(format!(
                        "`chat_template` lists templates {names:?} but none is named `default`"
                    )))
                }
            }
        }
        Some(other) => {
            return Err(bad(format!(
                "`chat_template` must be a string or a list of {{name, template}}, got {}",
                other
            )))
        }
    };
    Ok((template, config_path.to_path_buf()))
}

// ------------------------------------------------------------------ streaming

/// Decodes generated ids incrementally. Each `push` returns the text that
/// became final with that id. Text is held back while the decoded tail ends
/// in U+FFFD (a multi-byte character split across byte-level tokens) and is
/// emitted once the character completes. Like transformers'
/// `TextStreamer`/tokenizers' `DecodeStream`, it re-decodes a short window of
/// previous ids as context, so SentencePiece leading spaces come out right.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    skip_special: bool,
    /// The ids of the context window and the pending ids.
    ids: Vec<u32>,
    /// `ids[..read]` has been emitted; `ids[..read]` decodes to `prefix`.
    read: usize,
    prefix: String,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer, skip_special: bool) -> StreamDecoder<'a> {
        StreamDecoder {
            tok,
            skip_special,
            ids: Vec::new(),
            read: 0,
            prefix: String::new(),
        }
    }

    /// Adds one id; returns the newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, self.skip_special)?;
        if text.len() <= self.prefix.len() || text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let Some(new) = new_suffix(&self.prefix, &text) else {
            return Ok(None);
        };
        let new = new.to_string();
        // The just-emitted ids become the context window for the next push.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        self.prefix = self.tok.decode(&self.ids, self.skip_special)?;
        Ok(Some(new))
    }

    /// Emits whatever is still held back (for example an incomplete character
    /// at the end of generation, as U+FFFD).
    pub fn finish(self) -> Result<String> {
        let text = self.tok.decode(&self.ids, self.skip_special)?;
        Ok(new_suffix(&self.prefix, &text)
            .unwrap_or_default()
            .to_string())
    }
}

/// The part of `text` after `prefix`; `None` when `text` does not extend it
/// (the window re-decoded differently; wait for more ids).
fn new_suffix<'t>(prefix: &str, text: &'t str) -> Option<&'t str> {
    text.strip_prefix(prefix)
}

/// A throwaway model folder with a word-level tokenizer (whitespace split;
/// `<eos>`=0, `<s>`=1 prepended by the post-processor, `<pad>`=2, then the
/// words of `VOCAB` from 3) and a ChatML-like template, for unit tests.
#[cfg(test)]
pub(crate) fn toy_model_dir(tag: &str) -> PathBuf {
    const VOCAB: &str = "<unk> a b c d e f g h user assistant system : | hi there";
    let dir = std::env::temp_dir().join(format!("wgtune-toy-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["<eos>", "<s>", "<pad>"]
        .into_iter()
        .chain(VOCAB.split(' '))
        .enumerate()
    {
        vocab.insert(w.to_string(), Json::from(i));
    }
    let added: Vec<Json> = ["<eos>", "<s>", "<pad>"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).expect("write");
    let config = serde_json::json!({
        "bos_token": "<s>", "eos_token": {"content": "<eos>"}, "pad_token": "<pad>",
        "chat_template": "{% for m in messages %}{{ m.role }} : {{ m.content }} | {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).expect("write");
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [0, 2]}"#,
    )
    .expect("write");
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
    }

    #[test]
    fn tokenizer_toy_folder_special_tokens() {
        let dir = toy_model_dir("special");
        let tok = Tokenizer::load(&dir).unwrap();
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.pad_id()),
            (Some(1), Some(0), Some(2))
        );
        assert_eq!(tok.eos_ids(), &[0, 2]);
        assert!(tok.adds_bos());
        assert_eq!(tok.encode("a b", true).unwrap(), vec![1, 4, 5]);
        assert_eq!(tok.encode("a b", false).unwrap(), vec![4, 5]);
        assert_eq!(tok.decode(&[1, 4, 5], true).unwrap(), "a b");
        let chat = tok
            .render_chat(&[ChatMessage::new("user", "hi")], true)
            .unwrap();
        assert_eq!(chat, "user : hi | assistant : ");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tokenizer_config_errors_name_the_file() {
        let dir = toy_model_dir("badcfg");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"eos_token": "<nope>"}"#,
        )
        .unwrap();
        let err = Tokenizer::load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("<nope>"),
            "{err}"
        );
        std::fs::write(dir.join("tokenizer_config.json"), "{").unwrap();
        let err = Tokenizer::load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("malformed"),
            "{err}"
        );
        // No config at all: generation_config.json supplies EOS; no chat template.
        std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
        let tok = Tokenizer::load(&dir).unwrap();
        assert_eq!(tok.eos_id(), Some(0));
        assert_eq!(tok.bos_id(), None);
        let err = tok
            .render_chat(&[ChatMessage::new("user", "hi")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no chat template"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn chat_template_list_takes_default_and_jinja_file_wins() {
        let dir = toy_model_dir("list");
        let cfg = r#"{"eos_token": "<eos>", "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}]}"#;
        std::fs::write(dir.join("tokenizer_config.json"), cfg).unwrap();
        let tok = Tokenizer::load(&dir).unwrap();
        assert_eq!(
            tok.render_chat(&[ChatMessage::new("user", "x")], false)
                .unwrap(),
            "D1"
        );
        std::fs::write(dir.join("chat_template.jinja"), "J{{ eos_token }}\n").unwrap();
        let tok = Tokenizer::load(&dir).unwrap();
        // A single trailing newline is dropped, as Jinja does (keep_trailing_newline=False).
        assert_eq!(tok.render_chat(&[], false).unwrap(), "J<eos>");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stream_decoder_holds_back_split_characters() {
        // A byte-level BPE whose vocabulary has the single bytes of "é" (C3 A9)
        // as separate tokens: decoding C3 alone gives U+FFFD.
        let dir = std::env::temp_dir().join(format!("wgtune-toy-bytes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let byte_char = |b: u8| -> String {
            // GPT-2's bytes_to_unicode for the bytes used here.
            match b {
                0x21..=0x7e => (b as char).to_string(),
                0xa1..=0xac | 0xae..=0xff => char::from_u32(b as u32).unwrap().to_string(),
                _ => unreachable!(),
            }
        };
        let mut vocab = serde_json::Map::new();
        for (i, b) in [b'a', b'b', 0xc3, 0xa9].into_iter().enumerate() {
            vocab.insert(byte_char(b), Json::from(i));
        }
        let tokenizer = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": []}
        });
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
        let tok = Tokenizer::load(&dir).unwrap();
        assert_eq!(tok.encode("aéb", false).unwrap(), vec![0, 2, 3, 1]);
        let mut sd = tok.stream_decoder(false);
        let out: Vec<Option<String>> = [0, 2, 3, 1]
            .iter()
            .map(|&id| sd.push(id).unwrap())
            .collect();
        assert_eq!(
            out,
            vec![Some("a".into()), None, Some("é".into()), Some("b".into())]
        );
        assert_eq!(sd.finish().unwrap(), "");
        // A character cut off at the end comes out of finish() as U+FFFD.
        let mut sd = tok.stream_decoder(false);
        assert_eq!(sd.push(0).unwrap().as_deref(), Some("a"));
        assert_eq!(sd.push(2).unwrap(), None);
        assert_eq!(sd.finish().unwrap(), "\u{FFFD}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tokenizer_from_files_needs_no_folder() {
        let dir = toy_model_dir("files");
        let mut files = TokenizerFiles::read(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let tok = Tokenizer::from_files(&files).unwrap();
        assert_eq!(tok.encode("a b", true).unwrap(), [1, 4, 5]);
        assert_eq!(tok.eos_ids(), [0, 2]);
        files.chat_template_jinja = Some("{{ messages[0].content }}!".into());
        let tok = Tokenizer::from_files(&files).unwrap();
        let text = tok
            .render_chat(&[ChatMessage::new("user", "hi")], false)
            .unwrap();
        assert_eq!(text, "hi!");
    }

    #[test]
    fn tokenizer_load_names_the_missing_file() {
        let dir = std::env::temp_dir().join(format!("wgtune-tok-missing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = Tokenizer::load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("not found"),
            "{err}"
        );
        std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
        let err = Tokenizer::load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("cannot load"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
