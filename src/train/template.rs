//! The `--template` prompt template: text (or a file of it) with
//! `{prompt}`, `{instruction}` and `{input}` placeholders, applied to every
//! prompt of a data set. It is saved beside the adapter it trained
//! ([`TEMPLATE_FILE`]) so that `eval`, `generate` and `chat` apply it too.

use std::path::Path;

use crate::error::{Error, Result};

/// One piece of a parsed prompt template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Prompt,
    Instruction,
    Input,
}

/// A user prompt template (`--template`): text with `{prompt}`,
/// `{instruction}` and `{input}` placeholders; `{{` and `}}` are literal
/// braces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptTemplate {
    pieces: Vec<Piece>,
}

const PLACEHOLDERS: &str = "{prompt}, {instruction}, {input}";

/// The file in an adapter folder that holds the prompt template the adapter
/// was trained with, as template text (see [`PromptTemplate::text`]).
pub const TEMPLATE_FILE: &str = "prompt_template.txt";

impl PromptTemplate {
    /// Reads the template from the file `text_or_file` names if it exists
    /// (verbatim, trailing newline included), else parses the argument itself.
    pub fn parse(text_or_file: &str) -> Result<PromptTemplate> {
        let path = Path::new(text_or_file);
        if path.is_file() {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
            return PromptTemplate::from_text(&text).map_err(|message| {
                Error::invalid(format!("prompt template {}", path.display()), message)
            });
        }
        PromptTemplate::from_text(text_or_file)
            .map_err(|message| Error::invalid("prompt template", message))
    }

    /// Parses template text; the error is a message for the caller to wrap.
    fn from_text(text: &str) -> std::result::Result<PromptTemplate, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let rest = &text[at + 1..];
                    let Some(close) = rest.find('}') else {
                        return Err(format!(
                            "unclosed `{{` at byte {at}; write `{{{{` for a literal brace"
                        ));
                    };
                    let name = &rest[..close];
                    let piece = match name {
                        "prompt" => Piece::Prompt,
                        "instruction" => Piece::Instruction,
                        "input" => Piece::Input,
                        _ => {
                            return Err(format!(
                                "unknown placeholder `{{{name}}}`; allowed: {PLACEHOLDERS} \
                                 (write `{{{{` and `}}}}` for literal braces)"
                            ))
                        }
                    };
                    if !lit.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut lit)));
                    }
                    pieces.push(piece);
                    // Skip the name and the closing brace.
                    for _ in 0..name.chars().count() + 1 {
                        chars.next();
                    }
                }
                '}' => {
                    return Err(format!(
                        "unmatched `}}` at byte {at}; write `}}}}` for a literal brace"
                    ))
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Text(lit));
        }
        if !pieces.iter().any(|p| !matches!(p, Piece::Text(_))) {
            return Err(format!(
                "the template uses no placeholder ({PLACEHOLDERS}), so it would drop every prompt"
            ));
        }
        Ok(PromptTemplate { pieces })
    }

    /// The template as text that parses back to it (literal braces
    /// doubled).
    pub fn text(&self) -> String {
        let mut s = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => s.push_str(&t.replace('{', "{{").replace('}', "}}")),
                Piece::Prompt => s.push_str("{prompt}"),
                Piece::Instruction => s.push_str("{instruction}"),
                Piece::Input => s.push_str("{input}"),
            }
        }
        s
    }

    /// Fills the template for a prompt typed at inference (`generate`,
    /// `chat`): `{prompt}` and `{instruction}` are the text, `{input}` is
    /// empty.
    pub fn apply_prompt(&self, prompt: &str) -> Result<String> {
        self.apply(prompt, Some(prompt), Some(""))
    }

    /// Fills the template. A placeholder the row has no value for (`None`:
    /// `{instruction}`/`{input}` on a prompt/completion row) is an error.
    pub fn apply(
        &self,
        prompt: &str,
        instruction: Option<&str>,
        input: Option<&str>,
    ) -> Result<String> {
        let missing = |name: &str| {
            Error::invalid(
                "prompt template",
                format!("the template uses {{{name}}}, which only alpaca rows have"),
            )
        };
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Prompt => out.push_str(prompt),
                Piece::Instruction => {
                    out.push_str(instruction.ok_or_else(|| missing("instruction"))?)
                }
                Piece::Input => out.push_str(input.ok_or_else(|| missing("input"))?),
            }
        }
        Ok(out)
    }
}

/// Save `template` beside the adapter in `dir` ([`TEMPLATE_FILE`],
/// atomically) and name the file in the folder's README.md; with `None`,
/// remove a stale file from an earlier run.
pub fn save_beside_adapter(dir: &Path, template: Option<&PromptTemplate>) -> Result<()> {
    let path = dir.join(TEMPLATE_FILE);
    let Some(t) = template else {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::Io { path, source: e })
            }
            _ => Ok(()),
        };
    };
    crate::fsio::write_atomic(&path, t.text().as_bytes())?;
    let readme = dir.join(crate::adapters::peft_io::README_FILE);
    if let Ok(card) = std::fs::read_to_string(&readme) {
        if !card.contains(TEMPLATE_FILE) {
            let note = format!(
                "\n## Prompt template\n\n`{TEMPLATE_FILE}` holds the prompt template this adapter \
                 was trained with (`{{prompt}}` stands for the prompt). `wgtune eval`, `generate` \
                 and `chat` apply it by default; with PEFT, fill it in before tokenizing.\n"
            );
            crate::fsio::write_atomic(&readme, (card + &note).as_bytes())?;
        }
    }
    Ok(())
}

/// The prompt template saved beside the adapter in `dir`, if there is one.
pub fn load_beside_adapter(dir: &Path) -> Result<Option<PromptTemplate>> {
    let path = dir.join(TEMPLATE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => PromptTemplate::from_text(&text)
            .map(Some)
            .map_err(|m| Error::invalid(format!("prompt template {}", path.display()), m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io { path, source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_template_placeholders_and_escapes() {
        let t = PromptTemplate::parse("{{sys}} ### Q: {prompt}\n### A:").unwrap();
        assert_eq!(
            t.apply("2+2?", None, None).unwrap(),
            "{sys} ### Q: 2+2?\n### A:"
        );
        let t = PromptTemplate::parse("{instruction}|{input}|{prompt}").unwrap();
        assert_eq!(t.apply("P", Some("I"), Some("")).unwrap(), "I||P");
        let err = t.apply("P", None, None).unwrap_err().to_string();
        assert!(err.contains("{instruction}"), "{err}");
    }

    #[test]
    fn prompt_template_errors_name_the_placeholder() {
        let err = PromptTemplate::parse("Q: {question}")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("{question}") && err.contains("{prompt}, {instruction}, {input}"),
            "{err}"
        );
        let err = PromptTemplate::parse("a { b").unwrap_err().to_string();
        assert!(err.contains("unclosed"), "{err}");
        let err = PromptTemplate::parse("a } {prompt}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unmatched"), "{err}");
        let err = PromptTemplate::parse("no placeholder {{here}}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no placeholder"), "{err}");
    }

    #[test]
    fn prompt_template_reads_a_file() {
        let path = std::env::temp_dir().join(format!("wgtune-template-{}.txt", std::process::id()));
        std::fs::write(&path, "### Instruction:\n{instruction}\n### Response:\n").unwrap();
        let t = PromptTemplate::parse(path.to_str().unwrap()).unwrap();
        assert_eq!(
            t.apply("", Some("Sing"), Some("")).unwrap(),
            "### Instruction:\nSing\n### Response:\n"
        );
        std::fs::write(&path, "{oops}").unwrap();
        let err = PromptTemplate::parse(path.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(path.to_str().unwrap()) && err.contains("{oops}"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn prompt_template_round_trips_beside_the_adapter() {
        let dir = std::env::temp_dir().join(format!("wgtune-tpl-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let readme = dir.join("README.md");
        std::fs::write(&readme, "# card\n").unwrap();
        let t = PromptTemplate::parse("{{json}} Q: {prompt}\n{instruction}|{input}\nA:").unwrap();
        assert_eq!(PromptTemplate::parse(&t.text()).unwrap(), t);
        assert_eq!(load_beside_adapter(&dir).unwrap(), None);
        save_beside_adapter(&dir, Some(&t)).unwrap();
        assert_eq!(load_beside_adapter(&dir).unwrap(), Some(t.clone()));
        assert_eq!(t.apply_prompt("hi").unwrap(), "{json} Q: hi\nhi|\nA:");
        // The README names the file, once.
        save_beside_adapter(&dir, Some(&t)).unwrap();
        let card = std::fs::read_to_string(&readme).unwrap();
        assert_eq!(card.matches(TEMPLATE_FILE).count(), 1, "{card}");
        // A run without a template removes the stale file.
        save_beside_adapter(&dir, None).unwrap();
        assert!(!dir.join(TEMPLATE_FILE).exists());
        save_beside_adapter(&dir, None).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
