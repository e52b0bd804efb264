//! The data set shared by `wgtune train`, `wgtune eval` and `wgtune data`:
//! rows (JSONL, or a JSON array; parsed in `rows.rs`, which lists the row
//! kinds) tokenized with the model's tokenizer into `Example`s (ids plus
//! unshifted labels, -100 = not trained), then shuffled per epoch with a
//! fixed seed and cut into right-padded `Batch`es with shifted targets.
//!
//! | row | ids | trained labels |
//! |---|---|---|
//! | chat (`messages`, ShareGPT `conversations`) | the chat template's rendering, segment by segment | assistant turns |
//! | prompt/completion, raw | `encode(prompt, true) ++ encode(completion, false) ++ [eos]` | the completion and EOS |
//! | alpaca, raw | as prompt/completion with prompt `"{instruction}\n\n{input}\n\n"` (or `"{instruction}\n\n"`), after any system and history text | the output, each history response, and EOS |
//! | prompt/completion and alpaca with the chat template | as chat rows | assistant turns |
//! | `{"text"}` | `encode(text, true) ++ [eos]` | all |
//!
//! EOS is appended only when the ids do not already end with it. With
//! `train_on_prompt` every label is trained. Rows longer than `max_seq_len`
//! keep their first `max_seq_len` tokens; rows left with no trained target
//! are dropped. Both are counted for the caller to report, and keys no row
//! kind reads are reported once per key per file.
//!
//! Chat rows: for the i-th assistant message, the text before it is
//! `render(messages[..i], add_generation_prompt=true)` and its own text is
//! what `render(messages[..=i], false)` adds to that. Every segment is
//! encoded with `add_special_tokens = false`; BOS is prepended once (not
//! trained) when the tokenizer adds BOS and the template did not write it.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::tokenizer::{ChatMessage, Tokenizer};
use crate::rng::Rng;
use crate::train::rows::{parse_row, row_prefix, split_rows, KeyTally, Row};
pub use crate::train::rows::{ChatTemplateMode, UnusedKey};
use crate::train::template::PromptTemplate;

/// The label of a position that is not trained (PyTorch's `ignore_index`).
pub const IGNORE: i32 = -100;

/// How rows become examples.
#[derive(Clone, Debug, Default)]
pub struct DataOptions {
    /// Rewrites the prompt of prompt/completion and alpaca rows.
    pub template: Option<PromptTemplate>,
    /// Train on every token, prompts included.
    pub train_on_prompt: bool,
    /// Truncate longer rows to this many tokens.
    pub max_seq_len: Option<usize>,
    /// Render prompt/completion and alpaca rows with the chat template.
    pub chat_template: ChatTemplateMode,
}

/// One tokenized row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// One label per id, unshifted: `labels[j]` is the token at `j` when it is
    /// trained, else -100. Position `j` is trained to predict `labels[j + 1]`.
    pub labels: Vec<i32>,
}

impl Example {
    /// The number of trained targets once shifted (`labels[1..]` not -100).
    pub fn n_targets(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
    }
}

/// How many rows of each kind a file had.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KindCounts {
    pub text: usize,
    pub prompt_completion: usize,
    pub alpaca: usize,
    pub messages: usize,
    /// ShareGPT `conversations` rows.
    pub sharegpt: usize,
}

/// What loading found besides the examples (`wgtune data` shows it).
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Keys no row kind reads, once per key, in the order first seen.
    pub unused_keys: Vec<UnusedKey>,
    /// Whether prompt/completion and alpaca rows were rendered with the
    /// chat template.
    pub chat_template: bool,
    /// The source line of each example, in `Dataset::examples` order.
    pub lines: Vec<usize>,
}

/// A tokenized JSONL file.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// The file it was read from.
    pub path: PathBuf,
    pub examples: Vec<Example>,
    /// Rows cut to `max_seq_len`.
    pub truncated: usize,
    /// Rows left without a trained target (after truncation), not in `examples`.
    pub dropped: usize,
    /// Rows read, by kind (dropped ones included).
    pub kinds: KindCounts,
    /// What batches pad with: the tokenizer's pad id, else EOS, else 0.
    pub pad_id: u32,
}

// ------------------------------------------------------------------ rows

/// Tokenizes a row into (ids, labels) before truncation.
fn tokenize_row(
    row: Row,
    tok: &Tokenizer,
    train_on_prompt: bool,
) -> Result<(Vec<u32>, Vec<i32>), String> {
    let err = |e: Error| e.to_string();
    let eos = || {
        tok.eos_id().ok_or_else(|| {
            "the tokenizer has no EOS token (`eos_token` in tokenizer_config.json or `eos_token_id` \
             in generation_config.json), which text and completion rows end with"
                .to_string()
        })
    };
    let (ids, mut labels) = match row {
        Row::Text(text) => {
            let mut ids = tok.encode(&text, true).map_err(err)?;
            let eos = eos()?;
            if ids.last() != Some(&eos) {
                ids.push(eos);
            }
            let labels = ids.iter().map(|&i| i as i32).collect();
            (ids, labels)
        }
        Row::Segments(segments) => {
            let mut ids = Vec::new();
            let mut labels = Vec::new();
            for (i, (text, trained)) in segments.iter().enumerate() {
                let t = tok.encode(text, i == 0).map_err(err)?;
                if *trained {
                    labels.extend(t.iter().map(|&i| i as i32));
                } else {
                    labels.extend(std::iter::repeat_n(IGNORE, t.len()));
                }
                ids.extend(t);
            }
            let eos = eos()?;
            if ids.last() != Some(&eos) {
                ids.push(eos);
                labels.push(eos as i32);
            }
            (ids, labels)
        }
        Row::Messages(messages) => {
            let segments = chat_segments(tok, &messages).map_err(err)?;
            let mut ids = Vec::new();
            let mut labels = Vec::new();
            for (text, trained) in segments {
                if text.is_empty() {
                    continue;
                }
                let t = tok.encode(&text, false).map_err(err)?;
                if trained {
                    labels.extend(t.iter().map(|&i| i as i32));
                } else {
                    labels.extend(std::iter::repeat_n(IGNORE, t.len()));
                }
                ids.extend(t);
            }
            if let Some(bos) = tok.bos_id().filter(|_| tok.adds_bos()) {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                    labels.insert(0, IGNORE);
                }
            }
            (ids, labels)
        }
    };
    if train_on_prompt {
        labels = ids.iter().map(|&i| i as i32).collect();
    }
    Ok((ids, labels))
}

/// Splits a conversation's rendering into (text, trained) segments: each
/// assistant message's own text is trained, everything around it is not.
///
/// A turn is what the rendering gains when the message is added after the
/// generation prompt. Templates that change earlier text when messages are
/// added (Qwen3 drops the empty `<think>` block of all but the last
/// assistant turn) have no such prefix; for them each assistant message is
/// found in the full rendering by its (trimmed) text, and that text plus the
/// turn's closing markup (`<|im_end|>\n`) is trained: what TRL's
/// prefix-stable Qwen3 training template marks.
pub fn chat_segments(tok: &Tokenizer, messages: &[ChatMessage]) -> Result<Vec<(String, bool)>> {
    match chat_segments_by_prefix(tok, messages)? {
        Some(s) => Ok(s),
        None => chat_segments_by_content(tok, messages),
    }
}

/// [`chat_segments`] by growing prefixes; `None` when the template is not
/// prefix-stable.
fn chat_segments_by_prefix(
    tok: &Tokenizer,
    messages: &[ChatMessage],
) -> Result<Option<Vec<(String, bool)>>> {
    let mut segments = Vec::new();
    let mut done = String::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = tok.render_chat(&messages[..i], true)?;
        let with = tok.render_chat(&messages[..=i], false)?;
        let (Some(context), Some(answer)) = (
            before.strip_prefix(done.as_str()),
            with.strip_prefix(before.as_str()),
        ) else {
            return Ok(None);
        };
        segments.push((context.to_string(), false));
        segments.push((answer.to_string(), true));
        done = with;
    }
    let full = tok.render_chat(messages, false)?;
    let Some(rest) = full.strip_prefix(done.as_str()) else {
        return Ok(None);
    };
    segments.push((rest.to_string(), false));
    Ok(Some(segments))
}

/// [`chat_segments`] by finding each assistant message's text in the full
/// rendering.
fn chat_segments_by_content(
    tok: &Tokenizer,
    messages: &[ChatMessage],
) -> Result<Vec<(String, bool)>> {
    let full = tok.render_chat(messages, false)?;
    let mut segments = Vec::new();
    let mut cursor = 0;
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let text = m.content.trim();
        let Some(at) = full[cursor..].find(text).map(|p| cursor + p) else {
            return Err(Error::invalid(
                "chat template",
                format!(
                    "assistant message {} is not in the rendered conversation as written, so its \
                     turn cannot be located",
                    i + 1
                ),
            ));
        };
        // The closing markup: what follows the text when it ends the rendering.
        let alone = tok.render_chat(&messages[..=i], false)?;
        let close = alone.rfind(text).map_or("", |p| &alone[p + text.len()..]);
        let mut end = at + text.len();
        if full[end..].starts_with(close) {
            end += close.len();
        }
        segments.push((full[cursor..at].to_string(), false));
        segments.push((full[at..end].to_string(), true));
        cursor = end;
    }
    segments.push((full[cursor..].to_string(), false));
    Ok(segments)
}

// ------------------------------------------------------------------ data set

impl Dataset {
    /// Reads and tokenizes the file `path` (JSONL or a JSON array), and
    /// warns once per key no row kind reads.
    pub fn load(path: &Path, tok: &Tokenizer, opts: &DataOptions) -> Result<Dataset> {
        let (ds, report) = Dataset::load_with_report(path, tok, opts)?;
        report.warn(path);
        Ok(ds)
    }

    /// [`Dataset::load`] without the warnings, which the report holds.
    pub fn load_with_report(
        path: &Path,
        tok: &Tokenizer,
        opts: &DataOptions,
    ) -> Result<(Dataset, LoadReport)> {
        if path.is_dir() {
            return Err(Error::Data {
                path: path.to_path_buf(),
                line: None,
                message: "is a folder, not a data file\n---> HINT: `--data` takes a folder \
                          (train.jsonl, valid.jsonl, test.jsonl); other options take a file"
                    .into(),
            });
        }
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Dataset::from_bytes(bytes, path, tok, opts)
    }

    /// Reads and tokenizes rows (JSONL or a JSON array) from `reader`;
    /// `path` names the source in messages and in [`Dataset::path`].
    pub fn from_reader(
        mut reader: impl BufRead,
        path: &Path,
        tok: &Tokenizer,
        opts: &DataOptions,
    ) -> Result<Dataset> {
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (ds, report) = Dataset::from_bytes(bytes, path, tok, opts)?;
        report.warn(path);
        Ok(ds)
    }

    fn from_bytes(
        bytes: Vec<u8>,
        path: &Path,
        tok: &Tokenizer,
        opts: &DataOptions,
    ) -> Result<(Dataset, LoadReport)> {
        let data_err = |line: Option<usize>, message: String| Error::Data {
            path: path.to_path_buf(),
            line,
            message,
        };
        let text = String::from_utf8(bytes).map_err(|e| {
            let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
            data_err(Some(line), "not UTF-8 text".into())
        })?;
        let rows = split_rows(&text).map_err(|(line, m)| data_err(Some(line), m))?;
        let chat = opts.chat_template.resolve(tok)? == ChatTemplateMode::On;
        let mut report = LoadReport {
            chat_template: chat,
            ..LoadReport::default()
        };
        let mut keys = KeyTally::default();
        let mut ds = Dataset {
            path: path.to_path_buf(),
            examples: Vec::new(),
            truncated: 0,
            dropped: 0,
            kinds: KindCounts::default(),
            pad_id: tok.pad_id().or(tok.eos_id()).unwrap_or(0),
        };
        for raw in &rows {
            let n = raw.line;
            let at = |m: String| data_err(Some(n), format!("{}{m}", row_prefix(raw)));
            let parsed = parse_row(raw.json, opts, chat, &mut ds.kinds).map_err(at)?;
            for k in parsed.unused {
                keys.add(k, parsed.kind, n);
            }
            let (mut ids, mut labels) =
                tokenize_row(parsed.row, tok, opts.train_on_prompt).map_err(at)?;
            if let Some(max) = opts.max_seq_len {
                if ids.len() > max {
                    ids.truncate(max);
                    labels.truncate(max);
                    ds.truncated += 1;
                }
            }
            let ex = Example { ids, labels };
            if ex.n_targets() == 0 {
                ds.dropped += 1;
                log::debug!("{}:{n}: dropped (no trained target)", path.display());
                continue;
            }
            ds.examples.push(ex);
            report.lines.push(n);
        }
        report.unused_keys = keys.into_list();
        if ds.examples.is_empty() {
            let why = match opts.max_seq_len {
                Some(max) if ds.dropped > 0 && ds.truncated > 0 => format!(
                    "no usable examples: cut to {max} tokens (the sequence length limit), \
                     all {} rows were dropped, with no trained token left\n---> HINT: raise \
                     --max-seq-len, or lower --num-virtual-tokens, which takes positions \
                     from the same budget",
                    ds.dropped
                ),
                _ if ds.dropped > 0 => format!(
                    "no usable examples: all {} rows have no trained token",
                    ds.dropped
                ),
                _ => "no examples (the file has no rows)".to_string(),
            };
            return Err(data_err(None, why));
        }
        Ok((ds, report))
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The longest example, in tokens.
    pub fn max_len(&self) -> usize {
        self.examples.iter().map(|e| e.ids.len()).max().unwrap_or(0)
    }

    /// A warning when the longest rows are far beyond the rest: a batch
    /// holding one costs memory and time out of proportion (attention grows
    /// with the square of its length). Suggests a `--max-seq-len` that cuts
    /// only them. None when no row is over 4x the median and 64 tokens.
    pub fn length_warning(&self) -> Option<String> {
        let mut lens: Vec<usize> = self.examples.iter().map(|e| e.ids.len()).collect();
        lens.sort_unstable();
        let (&max, n) = (lens.last()?, lens.len());
        let median = lens[n / 2].max(1);
        if max < 64 || max < 4 * median {
            return None;
        }
        let far = lens.iter().filter(|&&l| l >= 4 * median).count();
        let p95 = lens[(n * 95 / 100).min(n - 1)];
        let cut = if p95 < 4 * median {
            p95.max(2)
        } else {
            4 * median
        };
        let r = max as f64 / median as f64;
        Some(format!(
            "{}: {far} of {n} rows are over 4x the median length ({median} tokens); the \
             longest has {max}. A batch holding it takes about {r:.0}x the memory and time \
             of a typical batch, and its attention {:.0}x.\n---> HINT: --max-seq-len {cut} \
             truncates only those rows",
            self.path.display(),
            r * r
        ))
    }

    /// Trained targets over all examples.
    pub fn n_targets(&self) -> usize {
        self.examples.iter().map(Example::n_targets).sum()
    }

    /// The example order of `epoch`: a Fisher–Yates shuffle seeded by
    /// `(seed, epoch)`, the same on every run and platform.
    pub fn epoch_order(&self, epoch: usize, seed: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        Rng::with_stream(seed, epoch as u64).shuffle(&mut order);
        order
    }

    /// Batches of `batch_size` examples in file order (evaluation).
    pub fn in_order(&self, batch_size: usize) -> Vec<Batch> {
        self.examples
            .chunks(batch_size.max(1))
            .map(|c| Batch::from_examples(&c.iter().collect::<Vec<_>>(), self.pad_id))
            .collect()
    }

    /// The batches of `epoch` in order: `batch_size` examples each (the last
    /// may have fewer), each padded to its longest example.
    pub fn batches(&self, batch_size: usize, epoch: usize, seed: u64) -> Vec<Batch> {
        let batch_size = batch_size.max(1);
        self.epoch_order(epoch, seed)
            .chunks(batch_size)
            .map(|chunk| {
                let exs: Vec<&Example> = chunk.iter().map(|&i| &self.examples[i]).collect();
                Batch::from_examples(&exs, self.pad_id)
            })
            .collect()
    }
}

impl LoadReport {
    /// Logs each unused key once.
    pub fn warn(&self, path: &Path) {
        for k in &self.unused_keys {
            log::warn!("{}", k.message(path));
        }
    }
}

// ------------------------------------------------------------------ batches

/// A right-padded batch. Row `r` occupies `[r*t, (r+1)*t)` of both arrays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// B
    pub b: usize,
    /// T
    pub t: usize,
    /// (B, T) token ids, padding after each row's `lens[r]` tokens.
    pub ids: Vec<i32>,
    /// (B, T) SHIFTED targets: `targets[r*t + j]` is the label of token
    /// `j + 1` (what position `j` predicts), -100 when not trained or past
    /// the row's end.
    pub targets: Vec<i32>,
    /// (B) real length of each row.
    pub lens: Vec<usize>,
    /// Targets that are not -100 (the loss is their mean).
    pub n_targets: usize,
    /// (B) the label of each row's first token (-100 when not trained or
    /// for a padding row). Only prompt tuning predicts it: PEFT puts the
    /// virtual tokens' -100 labels in front, so the last virtual token's
    /// position is trained to predict it.
    pub first: Vec<i32>,
    /// (B, T) packed rows (train --packing): the index of the first token of
    /// each token's data row in its sequence; empty when every sequence is
    /// one row. See `train::packing`.
    pub starts: Vec<u32>,
}

impl Batch {
    /// The targets the loss averages over with `n_virtual` virtual tokens in
    /// front (prompt tuning): the shifted targets, plus each row's first
    /// token when it is trained (as PEFT counts them).
    pub fn loss_targets(&self, n_virtual: usize) -> usize {
        self.n_targets
            + if n_virtual > 0 {
                self.first.iter().filter(|&&l| l != IGNORE).count()
            } else {
                0
            }
    }

    /// Pads `examples` to the longest of them.
    pub fn from_examples(examples: &[&Example], pad_id: u32) -> Batch {
        let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        Batch::build(examples, pad_id, examples.len(), t)
    }

    /// A batch of fixed shape `(b, t)` for static-shape training: rows past
    /// `examples.len()` are all padding with no targets. Errors if there are
    /// more than `b` examples or one is longer than `t`.
    pub fn from_examples_shaped(
        examples: &[&Example],
        pad_id: u32,
        b: usize,
        t: usize,
    ) -> Result<Batch> {
        if examples.len() > b {
            return Err(Error::invalid(
                "batch",
                format!("{} examples do not fit B = {b}", examples.len()),
            ));
        }
        if let Some(e) = examples.iter().find(|e| e.ids.len() > t) {
            return Err(Error::invalid(
                "batch",
                format!(
                    "an example of {} tokens does not fit T = {t}; truncate with max_seq_len",
                    e.ids.len()
                ),
            ));
        }
        Ok(Batch::build(examples, pad_id, b, t))
    }

    fn build(examples: &[&Example], pad_id: u32, b: usize, t: usize) -> Batch {
        let mut ids = vec![pad_id as i32; b * t];
        let mut targets = vec![IGNORE; b * t];
        let mut lens = vec![0; b];
        let mut first = vec![IGNORE; b];
        let mut n_targets = 0;
        for (r, e) in examples.iter().enumerate() {
            let n = e.ids.len();
            debug_assert_eq!(n, e.labels.len(), "invariant: one label per id");
            lens[r] = n;
            first[r] = e.labels.first().copied().unwrap_or(IGNORE);
            let row = r * t;
            for (j, &id) in e.ids.iter().enumerate() {
                ids[row + j] = id as i32;
            }
            for j in 0..n.saturating_sub(1) {
                let l = e.labels[j + 1];
                targets[row + j] = l;
                n_targets += usize::from(l != IGNORE);
            }
        }
        Batch {
            b,
            t,
            ids,
            targets,
            lens,
            n_targets,
            first,
            starts: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], labels: &[i32]) -> Example {
        Example {
            ids: ids.to_vec(),
            labels: labels.to_vec(),
        }
    }

    #[test]
    fn data_error_names_file_and_line() {
        let e = Error::Data {
            path: PathBuf::from("train.jsonl"),
            line: Some(7),
            message: "malformed JSON".into(),
        };
        assert_eq!(e.to_string(), "train.jsonl:7: malformed JSON");
        let e = Error::Data {
            path: PathBuf::from("train.jsonl"),
            line: None,
            message: "no examples".into(),
        };
        assert_eq!(e.to_string(), "train.jsonl: no examples");
    }

    #[test]
    fn batch_pads_right_and_shifts_targets() {
        let a = ex(&[5, 6, 7, 8], &[-100, -100, 7, 8]);
        let b = ex(&[9, 10], &[9, 10]);
        let batch = Batch::from_examples(&[&a, &b], 0);
        assert_eq!((batch.b, batch.t), (2, 4));
        assert_eq!(batch.ids, vec![5, 6, 7, 8, 9, 10, 0, 0]);
        assert_eq!(batch.targets, vec![-100, 7, 8, -100, 10, -100, -100, -100]);
        assert_eq!(batch.lens, vec![4, 2]);
        assert_eq!(batch.n_targets, 3);

        let shaped = Batch::from_examples_shaped(&[&b], 3, 2, 3).unwrap();
        assert_eq!(shaped.ids, vec![9, 10, 3, 3, 3, 3]);
        assert_eq!(shaped.targets, vec![10, -100, -100, -100, -100, -100]);
        assert_eq!(shaped.lens, vec![2, 0]);
        assert!(Batch::from_examples_shaped(&[&a], 0, 1, 3).is_err());
        assert!(Batch::from_examples_shaped(&[&a, &b], 0, 1, 4).is_err());
    }

    /// Writes `lines` to a JSONL file beside a toy tokenizer folder.
    fn toy_jsonl(tag: &str, lines: &[&str]) -> (Tokenizer, PathBuf) {
        let dir = crate::model::tokenizer::toy_model_dir(tag);
        let tok = Tokenizer::load(&dir).unwrap();
        let path = dir.join("data.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        (tok, path)
    }

    /// Removes the folder `toy_jsonl` made for `path`.
    fn cleanup(path: &Path) {
        let _ = std::fs::remove_dir_all(path.parent().expect("invariant: a file in a folder"));
    }

    #[test]
    fn from_reader_reads_rows_without_a_file_and_names_the_source() {
        let dir = crate::model::tokenizer::toy_model_dir("reader");
        let tok = Tokenizer::load(&dir).unwrap();
        let name = Path::new("inline.jsonl");
        let rows: &[u8] = b"{\"text\": \"a b\"}\n\n{\"prompt\": \"a\", \"completion\": \"c\"}\n";
        let ds = Dataset::from_reader(rows, name, &tok, &DataOptions::default()).unwrap();
        assert_eq!((ds.len(), ds.path.as_path()), (2, name));
        let bad: &[u8] = b"{\"text\": \"a\"}\n[1]\n";
        let err = Dataset::from_reader(bad, name, &tok, &DataOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("inline.jsonl:2:"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn load_rows_of_every_kind() {
        // Toy ids: <eos>=0 <s>=1 <pad>=2 <unk>=3 a=4 b=5 c=6 d=7 e=8 ... user=12
        // assistant=13 system=14 :=15 |=16; BOS is prepended with special tokens.
        let (tok, path) = toy_jsonl(
            "kinds",
            &[
                r#"{"text": "a b"}"#,
                "",
                r#"{"prompt": "a", "completion": "b c"}"#,
                r#"{"instruction": "a", "input": "b", "output": "c"}"#,
                r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}"#,
            ],
        );
        let ds = Dataset::load(&path, &tok, &DataOptions::default()).unwrap();
        assert_eq!(
            ds.kinds,
            KindCounts {
                text: 1,
                prompt_completion: 1,
                alpaca: 1,
                messages: 1,
                sharegpt: 0,
            }
        );
        assert_eq!(ds.pad_id, 2);
        let e = &ds.examples;
        assert_eq!(e[0], ex(&[1, 4, 5, 0], &[1, 4, 5, 0]));
        assert_eq!(e[1], ex(&[1, 4, 5, 6, 0], &[-100, -100, 5, 6, 0]));
        // Alpaca: "a\n\nb\n\n" splits on whitespace to "a b".
        assert_eq!(e[2], ex(&[1, 4, 5, 6, 0], &[-100, -100, -100, 6, 0]));
        // "user : a | assistant : " | "b | " | "user : c | assistant : " | "d | "
        let i = -100;
        assert_eq!(
            e[3],
            ex(
                &[1, 12, 15, 4, 16, 13, 15, 5, 16, 12, 15, 6, 16, 13, 15, 7, 16],
                &[i, i, i, i, i, i, i, 5, 16, i, i, i, i, i, i, 7, 16]
            )
        );
        let all = Dataset::load(
            &path,
            &tok,
            &DataOptions {
                train_on_prompt: true,
                ..DataOptions::default()
            },
        )
        .unwrap();
        for x in &all.examples {
            assert_eq!(
                x.labels,
                x.ids.iter().map(|&i| i as i32).collect::<Vec<_>>()
            );
        }
        cleanup(&path);
    }

    #[test]
    fn load_truncates_and_drops() {
        let (tok, path) = toy_jsonl(
            "trunc",
            &[
                r#"{"text": "a b c d e"}"#,
                r#"{"prompt": "a b c d", "completion": "e"}"#,
                r#"{"prompt": "a", "completion": "b c d e"}"#,
            ],
        );
        let opts = DataOptions {
            max_seq_len: Some(4),
            ..DataOptions::default()
        };
        let ds = Dataset::load(&path, &tok, &opts).unwrap();
        // Row 2's completion starts at position 5: nothing trained is left, dropped.
        assert_eq!((ds.truncated, ds.dropped, ds.len()), (3, 1, 2));
        assert_eq!(ds.examples[0], ex(&[1, 4, 5, 6], &[1, 4, 5, 6]));
        assert_eq!(ds.examples[1], ex(&[1, 4, 5, 6], &[-100, -100, 5, 6]));
        let opts = DataOptions {
            max_seq_len: Some(3),
            ..DataOptions::default()
        };
        let (_, only) = toy_jsonl("trunc-all", &[r#"{"prompt": "a b c", "completion": "d"}"#]);
        let err = Dataset::load(&only, &tok, &opts).unwrap_err().to_string();
        assert!(
            err.contains("data.jsonl:") && err.contains("dropped"),
            "{err}"
        );
        cleanup(&path);
        cleanup(&only);
    }

    #[test]
    fn load_errors_name_file_and_line() {
        let (tok, path) = toy_jsonl(
            "errors",
            &[
                r#"{"text": "a"}"#,
                "",
                r#"{"prompt": "a", "completion": ""}"#,
            ],
        );
        let err = Dataset::load(&path, &tok, &DataOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(&format!("{}:3: ", path.display())), "{err}");
        assert!(err.contains("`completion` is empty"), "{err}");

        cleanup(&path);

        let (tok, path) = toy_jsonl("errors2", &[r#"{"text": "a"}"#, r#"{"text": "a""#]);
        let err = Dataset::load(&path, &tok, &DataOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("{}:2: malformed JSON", path.display())),
            "{err}"
        );

        cleanup(&path);

        let (tok, path) = toy_jsonl("empty", &["", "  "]);
        let err = Dataset::load(&path, &tok, &DataOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("{}: no examples", path.display())),
            "{err}"
        );

        cleanup(&path);

        // A chat row when the model has no chat template names the line too.
        let (_, path) = toy_jsonl(
            "nochat",
            &[
                r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
            ],
        );
        std::fs::write(
            path.with_file_name("tokenizer_config.json"),
            r#"{"eos_token": "<eos>"}"#,
        )
        .unwrap();
        let tok = Tokenizer::load(path.parent().unwrap()).unwrap();
        let err = Dataset::load(&path, &tok, &DataOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("{}:1: ", path.display())) && err.contains("no chat template"),
            "{err}"
        );
        cleanup(&path);
    }

    fn toy_dataset(n: usize) -> Dataset {
        Dataset {
            path: PathBuf::from("toy.jsonl"),
            examples: (0..n)
                .map(|i| ex(&vec![i as u32; 2 + i % 3], &vec![i as i32; 2 + i % 3]))
                .collect(),
            truncated: 0,
            dropped: 0,
            kinds: KindCounts::default(),
            pad_id: 0,
        }
    }

    #[test]
    fn epoch_order_is_deterministic_and_varies_by_epoch() {
        let ds = toy_dataset(50);
        let o0 = ds.epoch_order(0, 1234);
        assert_eq!(o0, ds.epoch_order(0, 1234));
        assert_ne!(o0, ds.epoch_order(1, 1234));
        assert_ne!(o0, ds.epoch_order(0, 1235));
        let mut sorted = o0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        // Pinned: a change to the shuffle or the PRNG changes training runs.
        assert_eq!(toy_dataset(6).epoch_order(0, 42), vec![5, 2, 4, 3, 1, 0]);
    }

    #[test]
    fn batches_cover_the_epoch() {
        let ds = toy_dataset(7);
        let batches = ds.batches(3, 2, 9);
        assert_eq!(
            batches.iter().map(|b| b.b).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        let order = ds.epoch_order(2, 9);
        // Row r of batch k is example order[3k + r]: its first id is its index.
        for (k, batch) in batches.iter().enumerate() {
            for r in 0..batch.b {
                assert_eq!(batch.ids[r * batch.t] as usize, order[3 * k + r]);
            }
            assert_eq!(batch.t, (0..batch.b).map(|r| batch.lens[r]).max().unwrap());
        }
    }

    /// Issue defect 9: one 10,000-token row among short ones is named
    /// before training, with a --max-seq-len that cuts only it.
    #[test]
    fn a_row_far_longer_than_the_rest_is_warned_about() {
        let mut ds = toy_dataset(40);
        assert_eq!(ds.length_warning(), None, "even lengths: no warning");
        ds.examples[7] = ex(&vec![1; 10_000], &vec![1; 10_000]);
        let w = ds.length_warning().expect("a warning");
        assert!(
            w.contains("toy.jsonl") && w.contains("10000") && w.contains("--max-seq-len 4"),
            "{w}"
        );
        // Long rows that are the norm are not outliers.
        for e in ds.examples.iter_mut() {
            *e = ex(&vec![1; 9_000], &vec![1; 9_000]);
        }
        assert_eq!(ds.length_warning(), None);
        // Batches carry each row's first label for prompt tuning.
        let mut ds = toy_dataset(3);
        ds.examples[1].labels[0] = IGNORE;
        let b = &ds.batches(3, 0, 1)[0];
        let mut first = b.first.clone();
        first.sort();
        assert_eq!(first, vec![IGNORE, 0, 2]);
        assert_eq!(b.loss_targets(0), b.n_targets);
        assert_eq!(b.loss_targets(5), b.n_targets + 2);
    }
}
