//! Talking to a model from the command line: `generate` renders the chat
//! template by default and prints only the answer on stdout, reads
//! `--prompt -` from stdin, cuts at `--stop`; the prompt template saved with
//! an adapter is applied by `generate`, `eval` and `chat`; `chat` keeps its
//! KV cache across turns and answers exactly what `generate` would on the
//! whole conversation.

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::cli::{root, Run};
use wgtune::adapters::{peft_io, Adapter};
use wgtune::gpu::Context;
use wgtune::model::generate::{chat_prompt_ids, generate, GenOptions};
use wgtune::model::tokenizer::{ChatMessage, Tokenizer};
use wgtune::model::{Hooks, Model, NoHooks};
use wgtune::train::PromptTemplate;

/// `wgtune args` with `stdin` piped in.
fn wgtune_with(args: &[&str], stdin: &str) -> Run {
    let mut child = common::cli::command(args, "error")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run wgtune");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    Run::from(child.wait_with_output().unwrap())
}

fn wgtune(args: &[&str]) -> Run {
    wgtune_with(args, "")
}

fn tmp(name: &str) -> PathBuf {
    common::cli::tmp("talk", name)
}

fn tiny() -> PathBuf {
    root().join("tests/reference/data/tiny-llama")
}

/// The ids `--show-prompt` printed.
fn shown_ids(stderr: &str) -> Vec<u32> {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("prompt ids: "))
        .unwrap_or_else(|| panic!("no `prompt ids:` line in\n{stderr}"));
    serde_json::from_str(line).unwrap()
}

/// Greedy generation in the library, decoded as the CLI streams it.
fn greedy_text(
    ctx: &Context,
    model: &Model,
    hooks: &dyn Hooks,
    tok: &Tokenizer,
    ids: &[u32],
    n: usize,
) -> String {
    let opts = GenOptions {
        max_new_tokens: n,
        stop: tok.eos_ids().to_vec(),
        ..Default::default()
    };
    let mut dec = tok.stream_decoder(true);
    let mut text = String::new();
    generate(ctx, model, hooks, ids, &opts, |t| {
        text.push_str(&dec.push(t)?.unwrap_or_default());
        Ok(())
    })
    .unwrap();
    text + &dec.finish().unwrap()
}

#[test]
fn generate_prints_only_the_answer_with_the_chat_template_by_default() {
    let ctx = gpu!();
    let dir = tiny();
    let m = dir.to_str().unwrap();
    let model = Model::load(ctx, &dir).unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let (_, chat_ids) = chat_prompt_ids(&tok, &[ChatMessage::new("user", "Hello")]).unwrap();
    let want = greedy_text(ctx, &model, &NoHooks, &tok, &chat_ids, 12);

    let base = ["generate", "--model", m, "--max-new-tokens", "12"];
    let r = wgtune(&[&base[..], &["--prompt", "Hello", "--show-prompt"]].concat());
    assert!(r.ok(), "{}", r.stderr);
    // stdout: the answer and a newline; the banner and stats are on stderr.
    assert_eq!(r.stdout, format!("{want}\n"), "stderr:\n{}", r.stderr);
    assert!(r.stderr.contains("model: ") && r.stderr.contains("device: "));
    assert!(r.stderr.contains("chat template"), "{}", r.stderr);
    assert_eq!(shown_ids(&r.stderr), chat_ids);

    // --prompt - reads stdin (trailing newline dropped); --raw: no template.
    let r = wgtune_with(
        &[&base[..], &["--prompt", "-", "--raw", "--show-prompt"]].concat(),
        "Hello\n",
    );
    assert!(r.ok(), "{}", r.stderr);
    let raw_ids = tok.encode("Hello", true).unwrap();
    assert_eq!(shown_ids(&r.stderr), raw_ids);
    let raw = greedy_text(ctx, &model, &NoHooks, &tok, &raw_ids, 12);
    assert_eq!(r.stdout, format!("{raw}\n"));

    // --stop: the text up to the first occurrence, the stop text left out.
    // tiny-qwen2's answer has plain text early on (tiny-llama's is bytes
    // that decode only at the end).
    let dir = root().join("tests/reference/data/tiny-qwen2");
    let model = Model::load(ctx, &dir).unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let (_, ids) = chat_prompt_ids(&tok, &[ChatMessage::new("user", "Hello")]).unwrap();
    let want = greedy_text(ctx, &model, &NoHooks, &tok, &ids, 12);
    let chars: Vec<char> = want.chars().collect();
    let at = (3..chars.len().saturating_sub(1))
        .find(|&i| chars[i].is_ascii_alphanumeric() && chars[i + 1].is_ascii_alphanumeric())
        .unwrap_or_else(|| panic!("no plain text to stop at in {want:?}"));
    let stop: String = chars[at..at + 2].iter().collect();
    let cut = &want[..want.find(&stop).unwrap()];
    let q = dir.to_str().unwrap();
    let args = [
        "generate",
        "--model",
        q,
        "--max-new-tokens",
        "12",
        "--prompt",
        "Hello",
        "--stop",
        &stop,
        "--stop",
        "\u{1}",
    ];
    let r = wgtune(&args);
    assert!(r.ok(), "{}", r.stderr);
    assert_eq!(r.stdout, format!("{cut}\n"), "stop {stop:?} in {want:?}");
    assert!(r.stderr.contains("--stop string"), "{}", r.stderr);

    // Sampling filters: seeded runs repeat; a bad value is a usage error.
    let s = [
        "--prompt",
        "Hello",
        "--temperature",
        "0.9",
        "--top-k",
        "20",
        "--min-p",
        "0.05",
        "--top-p",
        "0.95",
        "--repetition-penalty",
        "1.3",
        "--seed",
        "3",
    ];
    let (a, b) = (
        wgtune(&[&base[..], &s[..]].concat()),
        wgtune(&[&base[..], &s[..]].concat()),
    );
    assert!(a.ok() && a.stdout == b.stdout, "{}\n{}", a.stderr, b.stderr);
    let r = wgtune(&[&base[..], &["--prompt", "x", "--min-p", "2"]].concat());
    assert!(!r.ok() && r.stderr.contains("[0, 1]"), "{}", r.stderr);
}

#[test]
fn chat_is_required_only_where_a_template_exists() {
    let _ctx = gpu!();
    // A copy of the tiny model without its chat template.
    let dir = tmp("no-chat-template");
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(tiny()).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
        }
    }
    let tc = dir.join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&tc, cfg.to_string()).unwrap();
    let m = dir.to_str().unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let gen = [
        "generate",
        "--model",
        m,
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "2",
    ];
    let r = wgtune(&[&gen[..], &["--show-prompt"]].concat());
    assert!(r.ok(), "{}", r.stderr);
    assert_eq!(shown_ids(&r.stderr), tok.encode("Hi", true).unwrap());
    let r = wgtune(&[&gen[..], &["--chat"]].concat());
    assert!(
        !r.ok() && r.stderr.contains("no chat template"),
        "{}",
        r.stderr
    );
    let r = wgtune_with(&["chat", "--model", m], "Hi\n");
    assert!(
        !r.ok() && r.stderr.contains("no chat template"),
        "{}",
        r.stderr
    );
}

/// Train a prompt-tuning adapter for 2 steps on prompt/completion rows.
fn train_prompt_adapter(out: &Path, template: Option<&str>) {
    let data = out.with_extension("jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"2+2?\", \"completion\": \" 4\"}\n\
         {\"prompt\": \"Capital of France?\", \"completion\": \" Paris\"}\n",
    )
    .unwrap();
    let mut args = vec![
        "train",
        "--method",
        "prompt",
        "--num-virtual-tokens",
        "4",
        "--model",
        tiny().to_str().unwrap().to_string().leak(),
        "--data",
        data.to_str().unwrap().to_string().leak(),
        "--out",
        out.to_str().unwrap().to_string().leak(),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--no-progress",
    ];
    if let Some(t) = template {
        args.extend(["--template", t.to_string().leak()]);
    }
    let r = wgtune(&args);
    assert!(r.ok(), "train: {}{}", r.stdout, r.stderr);
}

#[test]
fn the_prompt_template_travels_with_the_adapter() {
    let _ctx = gpu!();
    let out = tmp("template-adapter");
    let text = "### Question:\n{prompt}\n### Answer:";
    train_prompt_adapter(&out, Some(text));
    let saved = std::fs::read_to_string(out.join("prompt_template.txt")).unwrap();
    assert_eq!(saved, text);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("prompt_template.txt"), "{card}");

    let tok = Tokenizer::load(&tiny()).unwrap();
    let templated = PromptTemplate::parse(text)
        .unwrap()
        .apply("2+2?", None, None)
        .unwrap();
    // Training tokenizes a templated prompt/completion prompt this way.
    let want = tok.encode(&templated, true).unwrap();
    let (m, ad) = (tiny(), out.to_str().unwrap().to_string());
    let gen = |extra: &[&str]| {
        let base = [
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--adapter",
            &ad,
            "--prompt",
            "2+2?",
            "--max-new-tokens",
            "1",
            "--show-prompt",
        ];
        let r = wgtune(&[&base[..], extra].concat());
        assert!(r.ok(), "{extra:?}: {}", r.stderr);
        r
    };
    // Not named, yet applied (and said so).
    let r = gen(&["--raw"]);
    assert_eq!(shown_ids(&r.stderr), want);
    assert!(r.stderr.contains("prompt_template.txt"), "{}", r.stderr);
    // With the chat template (the default), the templated text is the
    // user's message.
    let r = gen(&[]);
    let msgs = [ChatMessage::new("user", templated.clone())];
    assert_eq!(
        shown_ids(&r.stderr),
        chat_prompt_ids(&tok, &msgs).unwrap().1
    );
    // --no-template skips it; --template overrides it.
    let r = gen(&["--raw", "--no-template"]);
    assert_eq!(shown_ids(&r.stderr), tok.encode("2+2?", true).unwrap());
    let r = gen(&["--raw", "--template", "Q{prompt}A"]);
    assert_eq!(shown_ids(&r.stderr), tok.encode("Q2+2?A", true).unwrap());

    // eval applies it too: the same loss as naming it, another without.
    let data = out.with_extension("jsonl");
    let eval = |extra: &[&str]| {
        let base = [
            "eval",
            "--model",
            m.to_str().unwrap(),
            "--adapter",
            &ad,
            "--data",
            data.to_str().unwrap(),
        ];
        let r = wgtune(&[&base[..], extra].concat());
        assert!(r.ok(), "{extra:?}: {}", r.stderr);
        r.stdout
            .lines()
            .find_map(|l| l.strip_prefix("loss ")?.split_whitespace().next())
            .unwrap()
            .to_string()
    };
    let (saved, named, none) = (
        eval(&[]),
        eval(&["--template", text]),
        eval(&["--no-template"]),
    );
    assert_eq!(saved, named);
    assert_ne!(saved, none);
}

#[test]
fn chat_keeps_the_cache_and_answers_as_generate_on_the_whole_conversation() {
    let ctx = gpu!();
    // A prompt-tuning adapter: its virtual tokens lead the cache once.
    let out = tmp("chat-adapter");
    train_prompt_adapter(&out, None);
    let dir = tiny();
    let model = Model::load(ctx, &dir).unwrap();
    let tok = Tokenizer::load(&dir).unwrap();
    let loaded = peft_io::load_adapter(&out).unwrap();
    let ad = Adapter::new(ctx, &model, loaded.config.clone(), loaded.sorted_tensors()).unwrap();

    let n = 8;
    let (u1, u2) = ("Hello there", "And how are you?");
    let answer = |msgs: &[ChatMessage]| {
        let ids = chat_prompt_ids(&tok, msgs).unwrap().1;
        greedy_text(ctx, &model, &ad, &tok, &ids, n)
    };
    let sys = ChatMessage::new("system", "Be brief.");
    let a1 = answer(&[sys.clone(), ChatMessage::new("user", u1)]);
    let a2 = answer(&[
        sys.clone(),
        ChatMessage::new("user", u1),
        ChatMessage::new("assistant", a1.clone()),
        ChatMessage::new("user", u2),
    ]);
    let a3 = answer(&[sys.clone(), ChatMessage::new("user", u2)]);

    let r = wgtune_with(
        &[
            "chat",
            "--model",
            dir.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "--system",
            "Be brief.",
            "--max-new-tokens",
            &n.to_string(),
        ],
        &format!("{u1}\n{u2}\n/reset\n{u2}\n/exit\nnever read\n"),
    );
    assert!(r.ok(), "{}", r.stderr);
    assert_eq!(
        r.stdout,
        format!("{a1}\n{a2}\n{a3}\n"),
        "stderr:\n{}",
        r.stderr
    );
    // Turn 2 ran only what turn 1 had not cached; after /reset the virtual
    // tokens stay and the new conversation runs whole.
    let cached: Vec<usize> = r
        .stderr
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once(" run, ")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect();
    assert_eq!(cached.len(), 3, "{}", r.stderr);
    assert_eq!(cached[0], 0);
    assert!(cached[1] > 0, "turn 2 reused nothing:\n{}", r.stderr);
    assert_eq!(cached[2], 0);
}
