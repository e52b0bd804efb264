//! The `--template` prompt template: text (or a file of it) with
//! `{prompt}`, `{instruction}` and `{input}` placeholders, applied to every
//! prompt of a data set.

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
}
