//! Data as people keep it (issue 15, part 2): an mlx-lm data folder, JSON
//! arrays, ShareGPT rows, alpaca's system and history, unused keys,
//! `--chat-template auto|on|off` and `wgtune data`. The loader is checked
//! through the library on the tiny models' tokenizers (no GPU), and the
//! commands through the binary.

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use std::path::{Path, PathBuf};

use common::cli::root;
use wgtune::model::tokenizer::Tokenizer;
use wgtune::train::data::{ChatTemplateMode, DataOptions, Dataset, Example};

/// `wgtune args` with `RUST_LOG` set: (success, stdout, stderr).
fn wgtune_log(args: &[&str], log: &str) -> (bool, String, String) {
    let r = common::cli::run(args, log);
    (r.ok(), r.stdout, r.stderr)
}

/// `wgtune args`: (success, stdout and stderr).
fn wgtune(args: &[&str]) -> (bool, String) {
    let r = common::cli::run(args, "error");
    (r.ok(), r.text)
}

fn tmp(name: &str) -> PathBuf {
    common::cli::tmp_created("workflow-data", name)
}

fn model(name: &str) -> PathBuf {
    root().join("tests/reference/data").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn write(path: &Path, lines: &[&str]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn load(tok: &Tokenizer, path: &Path, chat: ChatTemplateMode) -> wgtune::Result<Dataset> {
    let opts = DataOptions {
        chat_template: chat,
        ..DataOptions::default()
    };
    Dataset::load(path, tok, &opts)
}

fn examples(tok: &Tokenizer, path: &Path, chat: ChatTemplateMode) -> Vec<Example> {
    load(tok, path, chat)
        .unwrap_or_else(|e| panic!("{e}"))
        .examples
}

/// The first pirate rows, as chat rows.
fn pirate(n: usize) -> Vec<String> {
    std::fs::read_to_string(root().join("assets/data/pirate/train.jsonl"))
        .unwrap()
        .lines()
        .take(n)
        .map(String::from)
        .collect()
}

/// A JSON array file holds the same rows as JSONL, of every kind; its
/// errors name the file, the line and the row's index.
#[test]
fn json_arrays_load_like_jsonl_and_errors_name_the_row() {
    let tok = Tokenizer::load(&model("tiny-llama")).unwrap();
    let dir = tmp("array");
    let rows = [
        r#"{"text": "The sea is wide."}"#,
        r#"{"prompt": "Where?", "completion": " Here."}"#,
        r#"{"instruction": "Say hi.", "input": "", "output": "Hi!"}"#,
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}]}"#,
    ];
    let jsonl = dir.join("rows.jsonl");
    write(&jsonl, &rows);
    let array = dir.join("rows.json");
    std::fs::write(&array, format!("[\n  {}\n]\n", rows.join(",\n  "))).unwrap();
    for chat in [ChatTemplateMode::Off, ChatTemplateMode::On] {
        let want = examples(&tok, &jsonl, chat);
        assert_eq!(want.len(), 4);
        assert_eq!(examples(&tok, &array, chat), want, "{chat:?}");
    }
    // HF `to_json` writes JSON Lines even when the file is called .json.
    let lines_json = dir.join("lines.json");
    write(&lines_json, &rows);
    assert_eq!(
        examples(&tok, &lines_json, ChatTemplateMode::Off),
        examples(&tok, &jsonl, ChatTemplateMode::Off)
    );

    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        "[\n  {\"text\": \"ok\"},\n  {\"text\": \"ok\"},\n  {\"prompt\": 3, \"completion\": \"x\"}\n]",
    )
    .unwrap();
    let err = load(&tok, &bad, ChatTemplateMode::Off)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("{}:4: row 2 of the array: ", bad.display()))
            && err.contains("`prompt` must be a string"),
        "{err}"
    );
    std::fs::write(
        &bad,
        "[\n  {\"text\": \"ok\"},\n  {\"text\" \"no colon\"}\n]",
    )
    .unwrap();
    let err = load(&tok, &bad, ChatTemplateMode::Off)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("{}:3: malformed JSON array", bad.display())),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// ShareGPT rows are the chat rows they spell: `from`/`value` with
/// human/gpt/system (or user/assistant), and a top-level `system`. An
/// unknown role is an error naming the file and line.
#[test]
fn sharegpt_rows_equal_chat_rows_and_unknown_roles_fail() {
    let tok = Tokenizer::load(&model("tiny-llama")).unwrap();
    let dir = tmp("sharegpt");
    let chat = dir.join("chat.jsonl");
    write(
        &chat,
        &[
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Arr"}]}"#,
        ],
    );
    let sharegpt = dir.join("sharegpt.jsonl");
    write(
        &sharegpt,
        &[
            r#"{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Ahoy"}, {"from": "user", "value": "Bye"}, {"from": "assistant", "value": "Arr"}]}"#,
            r#"{"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Ahoy"}, {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Arr"}]}"#,
        ],
    );
    let want = examples(&tok, &chat, ChatTemplateMode::Off);
    let ds = load(&tok, &sharegpt, ChatTemplateMode::Off).unwrap();
    assert_eq!(ds.kinds.sharegpt, 2);
    assert_eq!(ds.examples, vec![want[0].clone(), want[0].clone()]);
    // Both assistant turns are trained.
    let trained: Vec<u32> = (want[0].ids.iter().zip(&want[0].labels))
        .filter(|(_, &l)| l != -100)
        .map(|(&t, _)| t)
        .collect();
    assert_eq!(
        tok.decode(&trained, false).unwrap(),
        "Ahoy<|im_end|>\nArr<|im_end|>\n"
    );

    let bad = dir.join("bad.jsonl");
    write(
        &bad,
        &[
            r#"{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Ahoy"}]}"#,
            r#"{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Ahoy"}]}"#,
        ],
    );
    let err = load(&tok, &bad, ChatTemplateMode::Off)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "{}:2: conversations[1]: unknown role `bot`",
            bad.display()
        )),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Alpaca's `system` and `history` are used: as chat turns with the chat
/// template (equal to the `messages` row they describe), and in the raw
/// layout without it; the history responses are trained either way.
#[test]
fn alpaca_system_and_history_are_used() {
    let tok = Tokenizer::load(&model("tiny-llama")).unwrap();
    let dir = tmp("alpaca");
    let alpaca = dir.join("alpaca.jsonl");
    write(
        &alpaca,
        &[
            r#"{"system": "Be a pirate.", "history": [["Hi", "Ahoy"]], "instruction": "Name a sea.", "input": "Be short.", "output": "The Red Sea."}"#,
        ],
    );
    let chat = dir.join("chat.jsonl");
    write(
        &chat,
        &[
            r#"{"messages": [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ahoy"}, {"role": "user", "content": "Name a sea.\n\nBe short."}, {"role": "assistant", "content": "The Red Sea."}]}"#,
        ],
    );
    assert_eq!(
        examples(&tok, &alpaca, ChatTemplateMode::On),
        examples(&tok, &chat, ChatTemplateMode::On)
    );
    let raw = &examples(&tok, &alpaca, ChatTemplateMode::Off)[0];
    let all = tok.decode(&raw.ids, false).unwrap();
    assert_eq!(
        all,
        "<s> Be a pirate.\n\nHi\n\nAhoy\n\nName a sea.\n\nBe short.\n\nThe Red Sea.<|im_end|>"
            .replace("<s> ", &tok.decode(&raw.ids[..1], false).unwrap()),
        "the documented raw layout"
    );
    let trained: Vec<u32> = (raw.ids.iter().zip(&raw.labels))
        .filter(|(_, &l)| l != -100)
        .map(|(&t, _)| t)
        .collect();
    let trained = tok.decode(&trained, false).unwrap();
    assert!(
        trained.contains("Ahoy") && trained.contains("The Red Sea.") && !trained.contains("Hi"),
        "{trained}"
    );
    // Without system and history, the raw row is what it always was.
    let plain = dir.join("plain.jsonl");
    write(
        &plain,
        &[r#"{"instruction": "Name a sea.", "input": "Be short.", "output": "The Red Sea."}"#],
    );
    let pc = dir.join("pc.jsonl");
    write(
        &pc,
        &[r#"{"prompt": "Name a sea.\n\nBe short.\n\n", "completion": "The Red Sea."}"#],
    );
    assert_eq!(
        examples(&tok, &plain, ChatTemplateMode::Off),
        examples(&tok, &pc, ChatTemplateMode::Off)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--chat-template`: auto is on for a model with a template (a
/// prompt/completion row is then the user/assistant chat row) and off for
/// one without; on without a template is an error; off is raw text.
#[test]
fn chat_template_auto_on_off() {
    let dir = tmp("chat-template");
    let tok = Tokenizer::load(&model("tiny-llama")).unwrap();
    let pc = dir.join("pc.jsonl");
    write(&pc, &[r#"{"prompt": "Where?", "completion": "Here."}"#]);
    let chat = dir.join("chat.jsonl");
    write(
        &chat,
        &[
            r#"{"messages": [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "Here."}]}"#,
        ],
    );
    let as_chat = examples(&tok, &chat, ChatTemplateMode::On);
    assert_eq!(examples(&tok, &pc, ChatTemplateMode::Auto), as_chat);
    assert_eq!(examples(&tok, &pc, ChatTemplateMode::On), as_chat);
    let raw = examples(&tok, &pc, ChatTemplateMode::Off);
    assert_ne!(raw, as_chat);
    assert_eq!(
        tok.decode(&raw[0].ids[1..], false).unwrap(),
        "Where?Here.<|im_end|>"
    );

    // The same tokenizer without a chat template.
    let bare = dir.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(
        model("tiny-llama").join("tokenizer.json"),
        bare.join("tokenizer.json"),
    )
    .unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model("tiny-llama").join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(bare.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let bare_tok = Tokenizer::load(&bare).unwrap();
    assert_eq!(examples(&bare_tok, &pc, ChatTemplateMode::Auto), raw);
    let err = load(&bare_tok, &pc, ChatTemplateMode::On)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--chat-template on") && err.contains("no chat template"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An unknown or unused key is warned about once per key per file, naming
/// the file, the first line and the key; a row of no kind is an error.
#[test]
fn unused_keys_warn_once_per_key_and_unknown_rows_fail() {
    let dir = tmp("keys");
    let data = dir.join("d.jsonl");
    write(
        &data,
        &[
            r#"{"text": "a b", "id": 1}"#,
            r#"{"text": "c d", "id": 2}"#,
            r#"{"instruction": "x", "output": "y", "text": "x y", "id": 3}"#,
        ],
    );
    let m = model("tiny-llama");
    let (ok, out, err) = wgtune_log(&["data", "--model", s(&m), "--data", s(&data)], "warn");
    assert!(ok, "{out}{err}");
    let id = format!("{}:1: key `id` is not used by text rows", data.display());
    assert_eq!(out.matches(&id).count(), 1, "{out}");
    assert!(out.contains("(3 rows of the file have it)"), "{out}");
    let text = format!(
        "{}:3: key `text` is not used by alpaca rows",
        data.display()
    );
    assert_eq!(out.matches(&text).count(), 1, "{out}");
    // `data` reports them on stdout, and does not log them twice.
    assert!(!err.contains("key `id`"), "{err}");

    let bad = dir.join("bad.jsonl");
    write(
        &bad,
        &[r#"{"text": "a"}"#, r#"{"question": "a", "answer": "b"}"#],
    );
    let (ok, text) = wgtune(&["data", "--model", s(&m), "--data", s(&bad)]);
    assert!(!ok);
    assert!(
        text.contains(&format!("{}:2: the row matches no kind", bad.display())),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `wgtune data` on a folder: every split it holds, rows per kind, length
/// percentiles, truncation, and one example with its targets in [[ ]].
#[test]
fn data_command_shows_what_training_sees() {
    let dir = tmp("data-cmd");
    let rows = pirate(10);
    let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
    write(&dir.join("train.jsonl"), &rows);
    write(
        &dir.join("valid.jsonl"),
        &[r#"{"prompt": "Where is the treasure?", "completion": "Under the palm tree."}"#],
    );
    let m = model("tiny-llama");
    let (ok, text) = wgtune(&["data", "--model", s(&m), "--data", s(&dir)]);
    assert!(ok, "{text}");
    for want in [
        "== train: ",
        "rows: 10 (10 chat, 0 ShareGPT, 0 prompt/completion, 0 alpaca, 0 text)",
        "examples: 10 kept, 0 truncated, 0 dropped",
        "tokens per example:  p50 ",
        "targets per example: p50 ",
        "== valid: ",
        "chat template for prompt/completion and alpaca rows: on",
        "example 1 (line 1;",
        "[[Arr, matey!",
        "Yo-ho-ho!<|im_end|>\n]]",
    ] {
        assert!(text.contains(want), "no `{want}` in:\n{text}");
    }
    // Cut two tokens off the raw row: truncated, its target partly kept.
    let valid = dir.join("valid.jsonl");
    let off = [
        "data",
        "--model",
        s(&m),
        "--data",
        s(&valid),
        "--chat-template",
        "off",
    ];
    let (ok, text) = wgtune(&off);
    assert!(ok, "{text}");
    assert!(
        text.contains("chat template for prompt/completion and alpaca rows: off"),
        "{text}"
    );
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("tokens per example:  p50 "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no length in:\n{text}"));
    let cut = (len - 2).to_string();
    let (ok, text) = wgtune(&[&off[..], &["--max-seq-len", &cut]].concat());
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!(
            "max sequence length: {cut} tokens (--max-seq-len)"
        )) && text.contains("examples: 1 kept, 1 truncated")
            && text.contains(&format!("tokens per example:  p50 {cut} ")),
        "{text}"
    );
    let empty = tmp("data-cmd-empty");
    std::fs::write(empty.join("notes.txt"), "x").unwrap();
    let (ok, text) = wgtune(&["data", "--model", s(&m), "--data", s(&empty)]);
    assert!(!ok && text.contains("it holds: notes.txt"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&empty);
}

/// `--data DIR`: train.jsonl trains, valid.jsonl validates; `eval --data
/// DIR` takes test.jsonl, else valid.jsonl and says so; a folder without
/// train.jsonl is an error listing what it holds.
#[test]
fn data_folder_trains_validates_and_evaluates() {
    let _ctx = gpu!();
    let dir = tmp("folder");
    let rows = pirate(12);
    let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
    write(&dir.join("train.jsonl"), &rows[..8]);
    write(&dir.join("valid.jsonl"), &rows[8..10]);
    let out = dir.join("out");
    let m = model("tiny-llama");
    let (ok, text) = wgtune(&[
        "train",
        "--method",
        "lora",
        "--model",
        s(&m),
        "--data",
        s(&dir),
        "--out",
        s(&out),
        "--steps",
        "2",
        "--no-progress",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("data: 8 examples"), "{text}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"val_loss\""), "{metrics}");

    let (ok, text) = wgtune(&["eval", "--model", s(&m), "--data", s(&dir)]);
    assert!(ok, "{text}");
    assert!(
        text.contains("valid.jsonl (valid (the folder has no test file))")
            && text.contains("2 examples"),
        "{text}"
    );
    write(&dir.join("test.jsonl"), &rows[10..]);
    let (ok, text) = wgtune(&["eval", "--model", s(&m), "--data", s(&dir)]);
    assert!(ok, "{text}");
    assert!(text.contains("test.jsonl (test)"), "{text}");

    // `--raw` is `--chat-template off`: another rendering, another loss.
    let pc = dir.join("pc.jsonl");
    write(
        &pc,
        &[r#"{"prompt": "Where is the treasure?", "completion": "Under the palm tree."}"#],
    );
    let loss = |extra: &[&str]| {
        let mut args = vec!["eval", "--model", s(&m), "--data", s(&pc)];
        args.extend_from_slice(extra);
        let (ok, text) = wgtune(&args);
        assert!(ok, "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix("loss "))
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(loss(&["--raw"]), loss(&["--chat-template", "off"]));
    assert_ne!(loss(&[]), loss(&["--raw"]));
    let (ok, text) = wgtune(&[
        "eval",
        "--model",
        s(&m),
        "--data",
        s(&pc),
        "--raw",
        "--chat-template",
        "on",
    ]);
    assert!(!ok && text.contains("cannot be used with"), "{text}");

    let no_train = tmp("folder-no-train");
    write(&no_train.join("valid.jsonl"), &rows[..2]);
    let (ok, text) = wgtune(&[
        "train",
        "--method",
        "lora",
        "--model",
        s(&m),
        "--data",
        s(&no_train),
        "--out",
        s(&no_train.join("out")),
        "--steps",
        "1",
    ]);
    assert!(!ok);
    assert!(
        text.contains("needs train.jsonl or train.json; it holds: valid.jsonl"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&no_train);
}

/// The resolved `--chat-template` is recorded in the checkpoint: a resume
/// that asks for the other one is refused, one that says nothing keeps it.
#[test]
fn resume_keeps_the_chat_template_choice() {
    let _ctx = gpu!();
    let dir = tmp("resume");
    let data = dir.join("pc.jsonl");
    write(
        &data,
        &[
            r#"{"prompt": "Where is the treasure?", "completion": "Under the palm tree."}"#,
            r#"{"prompt": "Who are you?", "completion": "A pirate."}"#,
        ],
    );
    let out = dir.join("out");
    let m = model("tiny-llama");
    let base = [
        "train",
        "--method",
        "lora",
        "--model",
        s(&m),
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--no-progress",
    ];
    let run = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        wgtune(&args)
    };
    let (ok, text) = run(&["--steps", "1", "--chat-template", "off"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("chat template for prompt/completion and alpaca rows: off"),
        "{text}"
    );
    let (ok, text) = run(&["--steps", "2", "--resume", "--chat-template", "on"]);
    assert!(!ok);
    assert!(
        text.contains("--chat-template on (recorded: off)"),
        "{text}"
    );
    let (ok, text) = run(&["--steps", "2", "--resume"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("chat template for prompt/completion and alpaca rows: off"),
        "the resumed run keeps the recorded choice:\n{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
