//! Data files as people keep them, up to the parsed row: an mlx-lm data
//! folder (`train`, `valid`, `test` `.jsonl` or `.json`), JSONL or a JSON
//! array of rows, and the row kinds `data.rs` tokenizes.
//!
//! Row kinds (a row with the keys of several kinds is the first of this
//! list; the other kinds' keys are reported as unused):
//!
//! | row | kind |
//! |---|---|
//! | `{"messages": [{"role", "content"}..], "system"?}` | chat |
//! | `{"conversations": [{"from", "value"}..], "system"?}` | ShareGPT (`from`: human, gpt, system; or user, assistant) |
//! | `{"prompt", "completion"}` | prompt/completion |
//! | `{"instruction", "input"?, "output", "system"?, "history"?}` | alpaca (`history`: `[[instruction, response], ..]` earlier turns) |
//! | `{"text"}` | text |
//!
//! With the chat template on (`--chat-template`), a prompt/completion row
//! is a user turn and an assistant turn, and an alpaca row is its system
//! message, its history turns, then `"{instruction}\n\n{input}"` (or the
//! instruction alone) as the user turn and `output` as the assistant's.
//! Off, they are raw text: `prompt ++ completion`, and for alpaca
//! `"{system}\n\n"`, then `"{q}\n\n{a}\n\n"` per history turn, then
//! `"{instruction}\n\n{input}\n\n{output}"`. Either way the completion,
//! the output and each history response are the trained targets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value as Json};

use crate::error::{Error, Result};
use crate::model::tokenizer::{ChatMessage, Tokenizer};
use crate::train::data::{DataOptions, KindCounts};

/// Whether prompt/completion and alpaca rows are rendered with the
/// model's chat template. The library's default is `Off` (raw text, what
/// the PyTorch parity dumps were made with); the command line's is `Auto`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChatTemplateMode {
    /// On when the model has a chat template.
    Auto,
    /// On; an error when the model has none.
    On,
    /// Raw text.
    #[default]
    Off,
}

impl ChatTemplateMode {
    /// The `--chat-template` spelling.
    pub fn name(self) -> &'static str {
        match self {
            ChatTemplateMode::Auto => "auto",
            ChatTemplateMode::On => "on",
            ChatTemplateMode::Off => "off",
        }
    }

    pub fn from_name(s: &str) -> Option<ChatTemplateMode> {
        match s {
            "auto" => Some(ChatTemplateMode::Auto),
            "on" => Some(ChatTemplateMode::On),
            "off" => Some(ChatTemplateMode::Off),
            _ => None,
        }
    }

    /// `On` or `Off` for this tokenizer: `Auto` becomes what the model has.
    pub fn resolve(self, tok: &Tokenizer) -> Result<ChatTemplateMode> {
        let has = tok.chat_template().is_some();
        match self {
            ChatTemplateMode::Auto if has => Ok(ChatTemplateMode::On),
            ChatTemplateMode::Auto | ChatTemplateMode::Off => Ok(ChatTemplateMode::Off),
            ChatTemplateMode::On if has => Ok(ChatTemplateMode::On),
            ChatTemplateMode::On => Err(Error::invalid(
                "--chat-template on",
                "the model has no chat template (no `chat_template` in tokenizer_config.json \
                 and no chat_template.jinja)\n---> HINT: --chat-template off trains on the raw \
                 prompt and completion",
            )),
        }
    }
}

// ------------------------------------------------------------------ folders

/// An mlx-lm style data folder: `train`, `valid` and `test`, each
/// `.jsonl` or `.json`.
#[derive(Clone, Debug)]
pub struct DataFolder {
    pub dir: PathBuf,
    pub train: Option<PathBuf>,
    pub valid: Option<PathBuf>,
    pub test: Option<PathBuf>,
}

impl DataFolder {
    /// Finds the three files in `dir`; one split in both `.jsonl` and
    /// `.json` is an error (which one was meant is not clear).
    pub fn open(dir: &Path) -> Result<DataFolder> {
        let find = |split: &str| -> Result<Option<PathBuf>> {
            let found: Vec<PathBuf> = ["jsonl", "json"]
                .iter()
                .map(|ext| dir.join(format!("{split}.{ext}")))
                .filter(|p| p.is_file())
                .collect();
            if found.len() > 1 {
                return Err(Error::Data {
                    path: dir.to_path_buf(),
                    line: None,
                    message: format!("holds both {split}.jsonl and {split}.json; keep one of them"),
                });
            }
            Ok(found.into_iter().next())
        };
        Ok(DataFolder {
            dir: dir.to_path_buf(),
            train: find("train")?,
            valid: find("valid")?,
            test: find("test")?,
        })
    }

    /// The error for a folder without the file a command needs.
    pub fn missing(&self, what: &str) -> Error {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        let holds = if names.is_empty() {
            "nothing".to_string()
        } else if names.len() > 12 {
            format!("{}, ... ({} entries)", names[..12].join(", "), names.len())
        } else {
            names.join(", ")
        };
        Error::Data {
            path: self.dir.clone(),
            line: None,
            message: format!(
                "a data folder needs {what}; it holds: {holds}\n---> HINT: a data folder \
                 holds train.jsonl, and optionally valid.jsonl and test.jsonl (or .json)"
            ),
        }
    }
}

/// The training and validation files of `--data` and `--val-data`: a
/// folder gives its train file, and its valid file unless `val` is given.
pub fn train_and_valid(data: &Path, val: Option<&Path>) -> Result<(PathBuf, Option<PathBuf>)> {
    if !data.is_dir() {
        return Ok((data.to_path_buf(), val.map(Path::to_path_buf)));
    }
    let f = DataFolder::open(data)?;
    let train = f
        .train
        .clone()
        .ok_or_else(|| f.missing("train.jsonl or train.json"))?;
    let valid = val.map(Path::to_path_buf).or(f.valid);
    Ok((train, valid))
}

/// The file `wgtune eval --data` evaluates: a file as given, or a folder's
/// test file, else its valid file. The second value names the split taken
/// from a folder.
pub fn eval_file(data: &Path) -> Result<(PathBuf, Option<&'static str>)> {
    if !data.is_dir() {
        return Ok((data.to_path_buf(), None));
    }
    let f = DataFolder::open(data)?;
    match (f.test.clone(), f.valid.clone()) {
        (Some(t), _) => Ok((t, Some("test"))),
        (None, Some(v)) => Ok((v, Some("valid (the folder has no test file)"))),
        (None, None) => Err(f.missing("test.jsonl or valid.jsonl to evaluate")),
    }
}

// ------------------------------------------------------------------ files

/// One row of a file before parsing: its (1-based) line, its index when the
/// file is a JSON array, and its JSON text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RawRow<'a> {
    pub line: usize,
    pub index: Option<usize>,
    pub json: &'a str,
}

/// Splits a file into rows: a JSON array (the first character is `[`) or
/// JSON Lines. The error is (line, message).
pub(crate) fn split_rows(text: &str) -> std::result::Result<Vec<RawRow<'_>>, (usize, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if !text.trim_start().starts_with('[') {
        return Ok(text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, json)| RawRow {
                line: i + 1,
                index: None,
                json,
            })
            .collect());
    }
    // Checked whole first, so the scan below sees valid JSON.
    if let Err(e) = serde_json::from_str::<Json>(text) {
        return Err((e.line(), format!("malformed JSON array: {e}")));
    }
    let mut rows = Vec::new();
    let (mut depth, mut in_str, mut esc, mut line) = (0usize, false, false, 1usize);
    let mut start: Option<(usize, usize)> = None;
    let mut close = |start: &mut Option<(usize, usize)>, end: usize| {
        if let Some((at, l)) = start.take() {
            rows.push(RawRow {
                line: l,
                index: Some(rows.len()),
                json: text[at..end].trim_end(),
            });
        }
    };
    // Delimiters are ASCII, and UTF-8 continuation bytes never are.
    for (i, &b) in text.as_bytes().iter().enumerate() {
        if b == b'\n' {
            line += 1;
        }
        if in_str {
            match (esc, b) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        let opens = depth == 1 && start.is_none() && !b.is_ascii_whitespace();
        match b {
            b'[' | b'{' => {
                if opens {
                    start = Some((i, line));
                }
                depth += 1;
            }
            b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    close(&mut start, i);
                }
            }
            b',' if depth == 1 => close(&mut start, i),
            _ => {
                if b == b'"' {
                    in_str = true;
                }
                if opens {
                    start = Some((i, line));
                }
            }
        }
    }
    Ok(rows)
}

/// Where a row is, for messages: `row 3 of the array: ` or nothing.
pub(crate) fn row_prefix(r: &RawRow) -> String {
    r.index
        .map(|i| format!("row {i} of the array: "))
        .unwrap_or_default()
}

// ------------------------------------------------------------------ keys

/// A key that no row kind uses, reported once per file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnusedKey {
    pub key: String,
    /// The kind of the first row that had it.
    pub kind: &'static str,
    pub first_line: usize,
    /// Rows that have it.
    pub rows: usize,
}

impl UnusedKey {
    /// The warning, naming the file, the first line and the key.
    pub fn message(&self, path: &Path) -> String {
        format!(
            "{}:{}: key `{}` is not used by {} rows and is ignored ({} row{} of the file \
             have it)",
            path.display(),
            self.first_line,
            self.key,
            self.kind,
            self.rows,
            if self.rows == 1 { "" } else { "s" }
        )
    }
}

/// Unused keys of a file, by key.
#[derive(Default)]
pub(crate) struct KeyTally(BTreeMap<String, UnusedKey>);

impl KeyTally {
    pub fn add(&mut self, key: String, kind: &'static str, line: usize) {
        self.0
            .entry(key.clone())
            .or_insert(UnusedKey {
                key,
                kind,
                first_line: line,
                rows: 0,
            })
            .rows += 1;
    }

    /// In the order of their first line.
    pub fn into_list(self) -> Vec<UnusedKey> {
        let mut v: Vec<UnusedKey> = self.0.into_values().collect();
        v.sort_by_key(|k| (k.first_line, k.key.clone()));
        v
    }
}

// ------------------------------------------------------------------ rows

/// A parsed row, before tokenization.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Row {
    /// All trained.
    Text(String),
    /// Raw text as (text, trained) segments; the first is encoded with the
    /// tokenizer's special tokens, and EOS ends the row.
    Segments(Vec<(String, bool)>),
    /// Rendered with the chat template; assistant turns are trained.
    Messages(Vec<ChatMessage>),
}

/// A row field that must be a string.
fn string_field(obj: &Map<String, Json>, key: &str) -> std::result::Result<String, String> {
    match obj.get(key) {
        Some(Json::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!(
            "field `{key}` must be a string, got {}",
            json_type(other)
        )),
        None => Err(format!("missing field `{key}`")),
    }
}

/// A string field that may be missing or null (as "").
fn optional_string(obj: &Map<String, Json>, key: &str) -> std::result::Result<String, String> {
    match obj.get(key) {
        None | Some(Json::Null) => Ok(String::new()),
        Some(_) => string_field(obj, key),
    }
}

fn json_type(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// The chat roles a row may use, and what they become.
fn role(given: &str) -> Option<&'static str> {
    match given {
        "system" => Some("system"),
        "user" | "human" => Some("user"),
        "assistant" | "gpt" => Some("assistant"),
        "tool" => Some("tool"),
        _ => None,
    }
}

/// Parses the turns of `messages` or `conversations`; each is
/// `{"role", "content"}` or ShareGPT's `{"from", "value"}`. Other keys of a
/// turn are added to `unused` as `<list>[].<key>`.
fn parse_turns(
    list_key: &str,
    list: &Json,
    unused: &mut Vec<String>,
) -> std::result::Result<Vec<ChatMessage>, String> {
    let sharegpt = list_key == "conversations";
    let Json::Array(list) = list else {
        return Err(if sharegpt {
            "field `conversations` must be an array of {\"from\", \"value\"}".into()
        } else {
            "field `messages` must be an array of {\"role\", \"content\"}".into()
        });
    };
    if list.is_empty() {
        return Err(format!("`{list_key}` is empty"));
    }
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Json::Object(m) = m else {
            return Err(format!(
                "{list_key}[{i}] must be an object with `role` and `content` (or `from` and \
                 `value`)"
            ));
        };
        let (rk, ck) = if m.contains_key("from") || (sharegpt && !m.contains_key("role")) {
            ("from", "value")
        } else {
            ("role", "content")
        };
        let given = string_field(m, rk).map_err(|e| format!("{list_key}[{i}]: {e}"))?;
        let content = string_field(m, ck).map_err(|e| format!("{list_key}[{i}]: {e}"))?;
        let Some(r) = role(&given) else {
            return Err(format!(
                "{list_key}[{i}]: unknown role `{given}`; expected system, user (or human), \
                 assistant (or gpt) or tool"
            ));
        };
        for k in m.keys().filter(|k| *k != rk && *k != ck) {
            unused.push(format!("{list_key}[].{k}"));
        }
        messages.push(ChatMessage::new(r, content));
    }
    Ok(messages)
}

/// Alpaca's `history`: `[[instruction, response], ..]`.
fn parse_history(v: Option<&Json>) -> std::result::Result<Vec<(String, String)>, String> {
    let list = match v {
        None | Some(Json::Null) => return Ok(Vec::new()),
        Some(Json::Array(l)) => l,
        Some(other) => {
            return Err(format!(
                "field `history` must be an array of [instruction, response] pairs, got {}",
                json_type(other)
            ))
        }
    };
    list.iter()
        .enumerate()
        .map(|(i, pair)| match pair {
            Json::Array(p) => match p.as_slice() {
                [Json::String(q), Json::String(a)] => Ok((q.clone(), a.clone())),
                _ => Err(format!(
                    "history[{i}] must be [instruction, response], two strings"
                )),
            },
            other => Err(format!(
                "history[{i}] must be [instruction, response], got {}",
                json_type(other)
            )),
        })
        .collect()
}

/// The keys each kind reads.
const PROMPT_KEYS: &[&str] = &["prompt", "completion"];
const ALPACA_KEYS: &[&str] = &["instruction", "input", "output", "system", "history"];
const TEXT_KEYS: &[&str] = &["text"];

/// A parsed row and the keys it has that its kind does not read.
pub(crate) struct Parsed {
    pub row: Row,
    pub kind: &'static str,
    pub unused: Vec<String>,
}

/// Parses one row (a JSON object's text). `chat`: render prompt/completion
/// and alpaca rows with the chat template. The error is the message for
/// `Error::Data`.
pub(crate) fn parse_row(
    json: &str,
    opts: &DataOptions,
    chat: bool,
    kinds: &mut KindCounts,
) -> std::result::Result<Parsed, String> {
    let json: Json = serde_json::from_str(json).map_err(|e| format!("malformed JSON: {e}"))?;
    let Json::Object(obj) = json else {
        return Err(format!("expected a JSON object, got {}", json_type(&json)));
    };
    let template = opts.template.as_ref();
    let mut unused = Vec::new();
    let (row, kind, keys) = if let Some(list_key) = ["messages", "conversations"]
        .into_iter()
        .find(|k| obj.contains_key(*k))
    {
        let kind = if list_key == "messages" {
            kinds.messages += 1;
            "chat"
        } else {
            kinds.sharegpt += 1;
            "ShareGPT"
        };
        let mut messages = parse_turns(list_key, &obj[list_key], &mut unused)?;
        let system = optional_string(&obj, "system")?;
        // `system` is read only when the conversation has no system turn.
        let mut keys = vec![list_key];
        let own = messages[0].role == "system";
        if system.is_empty() || !own {
            keys.push("system");
        }
        if !system.is_empty() && !own {
            messages.insert(0, ChatMessage::new("system", system));
        }
        (Row::Messages(messages), kind, keys)
    } else if obj.contains_key("prompt") || obj.contains_key("completion") {
        kinds.prompt_completion += 1;
        let prompt = string_field(&obj, "prompt")?;
        let completion = string_field(&obj, "completion")?;
        if completion.is_empty() {
            return Err("`completion` is empty".into());
        }
        let prompt = match template {
            Some(t) => t.apply(&prompt, None, None).map_err(|e| e.to_string())?,
            None => prompt,
        };
        let row = if chat {
            Row::Messages(vec![
                ChatMessage::new("user", prompt),
                ChatMessage::new("assistant", completion),
            ])
        } else {
            Row::Segments(vec![(prompt, false), (completion, true)])
        };
        (row, "prompt/completion", PROMPT_KEYS.to_vec())
    } else if obj.contains_key("instruction") || obj.contains_key("output") {
        kinds.alpaca += 1;
        let instruction = string_field(&obj, "instruction")?;
        let input = optional_string(&obj, "input")?;
        let output = string_field(&obj, "output")?;
        if output.is_empty() {
            return Err("`output` is empty".into());
        }
        let system = optional_string(&obj, "system")?;
        let history = parse_history(obj.get("history"))?;
        (
            alpaca_row(&instruction, &input, output, &system, history, opts, chat)?,
            "alpaca",
            ALPACA_KEYS.to_vec(),
        )
    } else if obj.contains_key("text") {
        kinds.text += 1;
        (
            Row::Text(string_field(&obj, "text")?),
            "text",
            TEXT_KEYS.to_vec(),
        )
    } else {
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        return Err(format!(
            "the row matches no kind; expected {{\"text\"}}, {{\"prompt\", \"completion\"}}, \
             {{\"instruction\", \"input\"?, \"output\"}}, {{\"messages\"}} or \
             {{\"conversations\"}}, found keys {keys:?}"
        ));
    };
    unused.extend(obj.keys().filter(|k| !keys.contains(&k.as_str())).cloned());
    Ok(Parsed { row, kind, unused })
}

/// An alpaca row, raw or as chat turns (see the module doc).
fn alpaca_row(
    instruction: &str,
    input: &str,
    output: String,
    system: &str,
    history: Vec<(String, String)>,
    opts: &DataOptions,
    chat: bool,
) -> std::result::Result<Row, String> {
    let templated = |prompt: &str| match opts.template.as_ref() {
        Some(t) => t
            .apply(prompt, Some(instruction), Some(input))
            .map_err(|e| e.to_string()),
        None => Ok(prompt.to_string()),
    };
    if chat {
        let user = if input.is_empty() {
            instruction.to_string()
        } else {
            format!("{instruction}\n\n{input}")
        };
        let mut m = Vec::new();
        if !system.is_empty() {
            m.push(ChatMessage::new("system", system));
        }
        for (q, a) in history {
            m.push(ChatMessage::new("user", q));
            m.push(ChatMessage::new("assistant", a));
        }
        m.push(ChatMessage::new("user", templated(&user)?));
        m.push(ChatMessage::new("assistant", output));
        return Ok(Row::Messages(m));
    }
    let prompt = if input.is_empty() {
        format!("{instruction}\n\n")
    } else {
        format!("{instruction}\n\n{input}\n\n")
    };
    let mut segments = Vec::new();
    let mut context = if system.is_empty() {
        String::new()
    } else {
        format!("{system}\n\n")
    };
    for (q, a) in history {
        context.push_str(&q);
        context.push_str("\n\n");
        segments.push((std::mem::take(&mut context), false));
        segments.push((a, true));
        context.push_str("\n\n");
    }
    context.push_str(&templated(&prompt)?);
    segments.push((context, false));
    segments.push((output, true));
    Ok(Row::Segments(segments))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::template::PromptTemplate;

    fn parse(line: &str, opts: &DataOptions, chat: bool) -> std::result::Result<Parsed, String> {
        parse_row(line, opts, chat, &mut KindCounts::default())
    }

    fn seg(s: &[(&str, bool)]) -> Row {
        Row::Segments(s.iter().map(|&(t, b)| (t.to_string(), b)).collect())
    }

    fn msgs(m: &[(&str, &str)]) -> Row {
        Row::Messages(m.iter().map(|&(r, c)| ChatMessage::new(r, c)).collect())
    }

    #[test]
    fn parse_row_errors() {
        let opts = DataOptions::default();
        let err = |line: &str| match parse(line, &opts, false) {
            Ok(_) => panic!("{line} parsed"),
            Err(e) => e,
        };
        assert!(err("{\"text\": ").contains("malformed JSON"));
        assert!(err("[1, 2]").contains("expected a JSON object"));
        assert!(err("{\"foo\": 1}").contains("matches no kind"));
        assert!(err("{\"text\": 3}").contains("`text` must be a string"));
        assert!(err("{\"prompt\": \"a\"}").contains("missing field `completion`"));
        assert!(err("{\"prompt\": \"a\", \"completion\": \"\"}").contains("`completion` is empty"));
        assert!(err("{\"instruction\": \"a\", \"output\": \"\"}").contains("`output` is empty"));
        assert!(
            err("{\"instruction\": \"a\", \"input\": 1, \"output\": \"b\"}")
                .contains("`input` must be a string")
        );
        assert!(err("{\"messages\": []}").contains("empty"));
        assert!(err("{\"messages\": [{\"role\": \"user\"}]}")
            .contains("messages[0]: missing field `content`"));
        assert!(err("{\"messages\": \"hi\"}").contains("must be an array"));
        assert!(err(r#"{"conversations": [{"from": "bot", "value": "x"}]}"#)
            .contains("conversations[0]: unknown role `bot`"));
        assert!(err(r#"{"conversations": [{"from": "human"}]}"#)
            .contains("conversations[0]: missing field `value`"));
        assert!(
            err(r#"{"instruction": "a", "output": "b", "history": [["q"]]}"#)
                .contains("history[0] must be [instruction, response]")
        );
        assert!(
            err(r#"{"instruction": "a", "output": "b", "history": "q"}"#)
                .contains("`history` must be an array")
        );
    }

    #[test]
    fn parse_row_kinds_precedence_and_unused_keys() {
        let opts = DataOptions::default();
        let mut k = KindCounts::default();
        let p = parse_row(
            r#"{"instruction": "Do", "input": "x", "output": "y", "text": "z"}"#,
            &opts,
            false,
            &mut k,
        )
        .unwrap();
        assert_eq!(p.row, seg(&[("Do\n\nx\n\n", false), ("y", true)]));
        assert_eq!((p.kind, p.unused), ("alpaca", vec!["text".to_string()]));
        let p = parse_row(
            r#"{"instruction": "Do", "input": null, "output": "y"}"#,
            &opts,
            false,
            &mut k,
        )
        .unwrap();
        assert_eq!(p.row, seg(&[("Do\n\n", false), ("y", true)]));
        let t = DataOptions {
            template: Some(PromptTemplate::parse("<{prompt}>").unwrap()),
            ..DataOptions::default()
        };
        let p = parse_row(
            r#"{"prompt": "a", "completion": "b", "id": 3}"#,
            &t,
            false,
            &mut k,
        )
        .unwrap();
        assert_eq!(p.row, seg(&[("<a>", false), ("b", true)]));
        assert_eq!(p.unused, vec!["id".to_string()]);
        let p = parse_row(
            r#"{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q", "weight": 0}, {"from": "gpt", "value": "a"}]}"#,
            &opts,
            false,
            &mut k,
        )
        .unwrap();
        assert_eq!(
            p.row,
            msgs(&[("system", "S"), ("user", "q"), ("assistant", "a")])
        );
        assert_eq!(p.unused, vec!["conversations[].weight".to_string()]);
        // A top-level system message goes first when the turns have none.
        let p = parse_row(
            r#"{"conversations": [{"role": "user", "content": "q"}], "system": "S"}"#,
            &opts,
            false,
            &mut k,
        )
        .unwrap();
        assert_eq!(p.row, msgs(&[("system", "S"), ("user", "q")]));
        assert!(p.unused.is_empty());
        assert_eq!(
            k,
            KindCounts {
                text: 0,
                prompt_completion: 1,
                alpaca: 2,
                messages: 0,
                sharegpt: 2,
            }
        );
    }

    #[test]
    fn alpaca_system_and_history_raw_and_chat() {
        let opts = DataOptions::default();
        let row = r#"{"system": "S", "history": [["q1", "a1"], ["q2", "a2"]], "instruction": "I", "input": "x", "output": "o"}"#;
        let p = parse(row, &opts, false).unwrap();
        assert_eq!(
            p.row,
            seg(&[
                ("S\n\nq1\n\n", false),
                ("a1", true),
                ("\n\nq2\n\n", false),
                ("a2", true),
                ("\n\nI\n\nx\n\n", false),
                ("o", true),
            ])
        );
        assert!(p.unused.is_empty());
        let p = parse(row, &opts, true).unwrap();
        assert_eq!(
            p.row,
            msgs(&[
                ("system", "S"),
                ("user", "q1"),
                ("assistant", "a1"),
                ("user", "q2"),
                ("assistant", "a2"),
                ("user", "I\n\nx"),
                ("assistant", "o"),
            ])
        );
        let p = parse(r#"{"prompt": "p", "completion": "c"}"#, &opts, true).unwrap();
        assert_eq!(p.row, msgs(&[("user", "p"), ("assistant", "c")]));
    }

    #[test]
    fn json_arrays_split_into_rows_with_lines() {
        let text = "[\n  {\"text\": \"a, ]} \\\" [\"},\n  {\"text\": \"é\"}\n  ,\"s\", 3, [1, {\"x\": 2}]\n]\n";
        let rows = split_rows(text).unwrap();
        let got: Vec<(usize, Option<usize>, &str)> =
            rows.iter().map(|r| (r.line, r.index, r.json)).collect();
        assert_eq!(
            got,
            vec![
                (2, Some(0), "{\"text\": \"a, ]} \\\" [\"}"),
                (3, Some(1), "{\"text\": \"é\"}"),
                (4, Some(2), "\"s\""),
                (4, Some(3), "3"),
                (4, Some(4), "[1, {\"x\": 2}]"),
            ]
        );
        assert_eq!(split_rows("[]").unwrap(), vec![]);
        let (line, msg) = split_rows("[\n{\"text\": 1},\n{\"text\" 2}\n]").unwrap_err();
        assert_eq!(line, 3, "{msg}");
        let rows = split_rows("\u{feff}{\"text\": \"a\"}\n\n{\"text\": \"b\"}").unwrap();
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn unused_keys_are_tallied_once_per_key() {
        let mut t = KeyTally::default();
        t.add("b".into(), "text", 5);
        t.add("a".into(), "alpaca", 2);
        t.add("b".into(), "text", 7);
        let l = t.into_list();
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].key.as_str(), l[0].first_line, l[0].rows), ("a", 2, 1));
        assert_eq!((l[1].key.as_str(), l[1].first_line, l[1].rows), ("b", 5, 2));
        let m = l[1].message(Path::new("d.jsonl"));
        assert!(
            m.starts_with("d.jsonl:5: key `b`") && m.contains("2 rows"),
            "{m}"
        );
    }
}
