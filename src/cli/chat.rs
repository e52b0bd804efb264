//! `wgtune chat`: a multi-turn conversation with the model's chat template.
//! Lines come from stdin (a terminal or a pipe); each answer goes to stdout
//! followed by a newline, everything else to stderr.
//!
//! The KV cache is kept across turns: each turn renders the whole
//! conversation and runs only the tokens after the longest prefix already
//! cached (usually the end of the last answer and the new user message).
//! When the conversation no longer fits the context, the turn is refused
//! with a message and `/reset` starts over; nothing is dropped silently.

use std::io::{BufRead, IsTerminal, Write};

use super::commands::{
    load_adapter, load_model, prompt_template, show_prompt, stop_reason, Printer,
};
use super::ChatArgs;
use crate::error::{Error, Result};
use crate::gpu::Context;
use crate::model::generate::{chat_prompt_ids, Session};
use crate::model::tokenizer::ChatMessage;
use crate::model::{Hooks, NoHooks};
use crate::train::template::PromptTemplate;

/// The default context when `--max-context` is not given: the model's, at
/// most this (the cache takes layers x 2 x positions x kv_dim floats).
const DEFAULT_CONTEXT: usize = 4096;

pub(super) fn chat(a: &ChatArgs) -> Result<()> {
    let ctx = Context::new(&a.device.options())?;
    let (model, tok) = load_model(&ctx, &a.model, a.weights.weights)?;
    if tok.chat_template().is_none() {
        return Err(Error::invalid(
            "chat",
            "the model has no chat template; use `wgtune generate --raw --prompt ...`",
        ));
    }
    let adapter = load_adapter(&ctx, &model, &a.model, a.adapter.as_ref())?;
    let hooks: &dyn Hooks = adapter.as_ref().map_or(&NoHooks, |ad| ad as &dyn Hooks);
    let given = a.template.template.as_deref().map(PromptTemplate::parse);
    let template = prompt_template(
        given.transpose()?,
        a.template.no_template,
        a.adapter.as_ref(),
    )?;
    let cap = a
        .max_context
        .unwrap_or(DEFAULT_CONTEXT)
        .min(model.cfg.max_positions);
    let mut session = Session::new(&ctx, &model, hooks, cap)?;
    let system: Vec<ChatMessage> = a
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.clone()))
        .collect();
    let mut history = system.clone();
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "chatting with {} in a context of {cap} positions: /reset clears the conversation, \
             /exit or Ctrl-D ends",
            a.model.display()
        );
    }
    let mut lines = std::io::stdin().lock().lines();
    let mut turn = 0u64;
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|source| Error::Io {
            path: "<stdin>".into(),
            source,
        })?;
        let line = line.trim_end_matches('\r');
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.clone_from(&system);
                session.reset();
                eprintln!("[conversation cleared]");
                continue;
            }
            cmd if cmd.starts_with('/') && !cmd.contains(' ') => {
                eprintln!("[unknown command {cmd}: /reset clears the conversation, /exit ends]");
                continue;
            }
            _ => {}
        }
        let content = match &template {
            Some(t) => t.apply_prompt(line)?,
            None => line.to_string(),
        };
        history.push(ChatMessage::new("user", content));
        let (text, ids) = chat_prompt_ids(&tok, &history)?;
        let need = session.positions_for(ids.len());
        if need >= cap {
            history.pop();
            eprintln!(
                "[the conversation would need {need} of the context's {cap} positions: not \
                 answered; /reset to start over{}]",
                if cap < model.cfg.max_positions {
                    format!(
                        " or raise --max-context (the model allows {})",
                        model.cfg.max_positions
                    )
                } else {
                    String::new()
                }
            );
            continue;
        }
        if a.show_prompt {
            show_prompt(&text, &ids);
        }
        let mut opts = a.sampling.options(a.max_new_tokens, tok.eos_ids());
        opts.seed = opts.seed.wrapping_add(turn);
        turn += 1;
        let mut printer = Printer::new(&tok, &a.sampling.stop);
        let stats = session.generate(&ids, &opts, |t, _| printer.push(t))?;
        let answer = printer.finish()?;
        println!();
        let _ = std::io::stdout().flush();
        // A no-op once nothing new was built (the first turn builds all).
        ctx.save_pipeline_cache();
        history.push(ChatMessage::new("assistant", answer));
        eprintln!(
            "[{} prompt tokens: {} run, {} from the cache; {} new tokens, {:.2} tok/s{}]",
            stats.prompt_tokens,
            stats.prefilled,
            stats.prompt_tokens - stats.prefilled,
            stats.new_tokens,
            stats.decode_tokens_per_s(),
            stop_reason(&stats, cap, a.max_new_tokens)
        );
        if stats.stopped_at_context {
            eprintln!("[the context is full: /reset to start over]");
        }
    }
    Ok(())
}
