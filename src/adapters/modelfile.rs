//! An Ollama Modelfile for an exported adapter (`FROM` base, `ADAPTER`
//! lora) or a merged GGUF (`FROM` it), with the chat format as a Go
//! `TEMPLATE` and its stop tokens where the model's Jinja chat template can
//! be expressed that way.
//!
//! The template is read off the Jinja template by rendering conversations
//! with marker contents and cutting around the markers: each role's prefix
//! and suffix, the generation prompt, a default system prompt. It is kept
//! only if those pieces, put back together, reproduce the Jinja renderings
//! of a test conversation exactly; otherwise the Modelfile has no TEMPLATE
//! and Ollama falls back to the chat template in the GGUF's metadata.

use std::path::Path;

use crate::model::tokenizer::{ChatMessage, Tokenizer};

/// A chat format as per-role text around each message.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatPieces {
    /// (prefix, suffix) of a system message; `None` when the template has
    /// no separate system turn (Gemma folds it into the first user turn).
    pub system: Option<(String, String)>,
    pub user: (String, String),
    pub assistant: (String, String),
    /// What the template adds to ask for the assistant's reply.
    pub generation: String,
    /// The system prompt the template inserts when none is given.
    pub default_system: Option<String>,
}

const SYS: &str = "WGTSYSTEMX";
const U1: &str = "WGTUSERONEX";
const A1: &str = "WGTASSISTANTX";
const U2: &str = "WGTUSERTWOX";

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

/// `s` without `prefix`, if it starts with it.
fn after<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    s.strip_prefix(prefix)
}

/// Text between the end of `a` and the start of `b`.
fn between<'a>(s: &'a str, a: &str, b: &str) -> Option<&'a str> {
    let i = s.find(a)? + a.len();
    let j = s[i..].find(b)? + i;
    Some(&s[i..j])
}

impl ChatPieces {
    /// The pieces of `tok`'s chat template, if it is a plain sequence of
    /// per-message blocks (verified by rendering).
    pub fn read(tok: &Tokenizer) -> Option<ChatPieces> {
        // llama.cpp adds BOS itself where the tokenizer does, so a template's
        // leading BOS is left out (SmolLM2's `<|im_start|>` is its BOS but is
        // not added, so it stays).
        let bos = tok
            .bos_id()
            .filter(|_| tok.adds_bos())
            .and_then(|id| tok.id_to_token(id))
            .unwrap_or_default();
        let render = |m: &[ChatMessage], gen: bool| -> Option<String> {
            let s = tok.render_chat(m, gen).ok()?;
            Some(match s.strip_prefix(bos.as_str()) {
                Some(rest) if !bos.is_empty() => rest.to_string(),
                _ => s,
            })
        };
        let three = [msg("user", U1), msg("assistant", A1), msg("user", U2)];
        let full = render(&three, true)?;
        let u = render(&three[..1], false)?;
        let ua = render(&three[..2], false)?;
        let pre = &full[..full.find(U1)?];
        let user_suffix = u.split_once(U1)?.1.to_string();
        let asst_prefix = after(between(&full, U1, A1)?, &user_suffix)?.to_string();
        let asst_suffix = ua.split_once(A1)?.1.to_string();
        let user_prefix = after(between(&full, A1, U2)?, &asst_suffix)?.to_string();
        let generation = after(full.split_once(U2)?.1, &user_suffix)?.to_string();
        let default_block = pre.strip_suffix(user_prefix.as_str())?.to_string();
        let mut p = ChatPieces {
            system: None,
            user: (user_prefix.clone(), user_suffix),
            assistant: (asst_prefix, asst_suffix),
            generation,
            default_system: None,
        };
        // A separate system turn: [system, user] renders as sys block, then
        // the user block.
        let system = render(&[msg("system", SYS), msg("user", U1)], true).and_then(|s| {
            let prefix = s[..s.find(SYS)?].to_string();
            let suffix = between(&s, SYS, U1)?
                .strip_suffix(user_prefix.as_str())?
                .to_string();
            Some((prefix, suffix))
        });
        if let Some((sp, ss)) = &system {
            p.system = Some((sp.clone(), ss.clone()));
            if !default_block.is_empty() {
                let text = default_block.strip_prefix(sp.as_str())?;
                p.default_system = Some(text.strip_suffix(ss.as_str())?.to_string());
            }
        } else if !default_block.is_empty() {
            return None;
        }
        // Put back together, the pieces must give the template's own text.
        let check = |m: &[ChatMessage]| render(m, true).is_some_and(|want| p.assemble(m) == want);
        let with_system = [
            msg("system", "Be brief."),
            msg("user", "Hi there"),
            msg("assistant", "Hello!"),
            msg("user", "What is 2+2?"),
        ];
        let ok = check(&with_system[1..]) && (p.system.is_none() || check(&with_system));
        ok.then_some(p)
    }

    /// The text of `messages` (ending with a user turn) plus the generation
    /// prompt, as the Go template renders it.
    pub fn assemble(&self, messages: &[ChatMessage]) -> String {
        let mut s = String::new();
        if let (Some((sp, ss)), Some(d)) = (&self.system, &self.default_system) {
            if messages.first().is_none_or(|m| m.role != "system") {
                s += &format!("{sp}{d}{ss}");
            }
        }
        for m in messages {
            let (a, b) = match m.role.as_str() {
                "system" => match &self.system {
                    Some(x) => x,
                    None => continue,
                },
                "user" => &self.user,
                _ => &self.assistant,
            };
            s += &format!("{a}{}{b}", m.content);
        }
        s + &self.generation
    }

    /// Ollama's Go template for these pieces.
    pub fn go_template(&self) -> Option<String> {
        let all = [
            &self.user.0,
            &self.user.1,
            &self.assistant.0,
            &self.assistant.1,
            &self.generation,
        ];
        let sys = self.system.iter().flat_map(|(a, b)| [a, b]);
        // Literal text must not open a Go action or close the Modelfile's
        // triple-quoted string.
        if all
            .into_iter()
            .chain(sys)
            .any(|x| x.contains("{{") || x.contains("\"\"\""))
        {
            return None;
        }
        let (up, us) = &self.user;
        let (ap, asf) = &self.assistant;
        let mut t = String::from(
            "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}",
        );
        if let Some((sp, ss)) = &self.system {
            t += &format!("{{{{ if eq .Role \"system\" }}}}{sp}{{{{ .Content }}}}{ss}{{{{ else ");
        } else {
            t += "{{ ";
        }
        t += &format!(
            "if eq .Role \"user\" }}}}{up}{{{{ .Content }}}}{us}{{{{ if $last }}}}{}{{{{ end }}}}\
             {{{{ else if eq .Role \"assistant\" }}}}{ap}{{{{ .Content }}}}{{{{ if not $last }}}}{asf}\
             {{{{ end }}}}{{{{ end }}}}{{{{ end }}}}",
            self.generation
        );
        Some(t)
    }
}

/// Stop strings: the end of an assistant turn and the end-of-sequence
/// tokens, deduplicated.
fn stops(tok: &Tokenizer, pieces: Option<&ChatPieces>) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    if let Some(p) = pieces {
        let end = p.assistant.1.trim();
        if !end.is_empty() {
            v.push(end.to_string());
        }
    }
    for id in tok.eos_ids() {
        if let Some(t) = tok.id_to_token(*id) {
            if !v.contains(&t) {
                v.push(t);
            }
        }
    }
    v
}

/// A Modelfile: `FROM from`, `ADAPTER adapter` if given, the chat format.
/// Paths are written as given (the caller makes them absolute). The second
/// value says whether a TEMPLATE could be written.
pub fn modelfile(from: &Path, adapter: Option<&Path>, tok: &Tokenizer) -> (String, bool) {
    let pieces = ChatPieces::read(tok);
    let template = pieces.as_ref().and_then(ChatPieces::go_template);
    let mut s = String::from(
        "# Written by `wgtune export`. Build it with `ollama create NAME -f THIS_FILE`.\n",
    );
    s += &format!("FROM {}\n", from.display());
    if let Some(a) = adapter {
        s += &format!("ADAPTER {}\n", a.display());
    }
    match &template {
        Some(t) => s += &format!("TEMPLATE \"\"\"{t}\"\"\"\n"),
        None => {
            s += "# No TEMPLATE: the chat template is not a plain sequence of turns; Ollama \
                      uses the one in the GGUF's metadata.\n"
        }
    }
    if let Some(d) = pieces.as_ref().and_then(|p| p.default_system.as_ref()) {
        if !d.contains("\"\"\"") {
            s += &format!("SYSTEM \"\"\"{d}\"\"\"\n");
        }
    }
    for stop in stops(tok, pieces.as_ref()) {
        s += &format!("PARAMETER stop {}\n", serde_json::Value::String(stop));
    }
    (s, template.is_some())
}
