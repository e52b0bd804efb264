//! The chat-template engine: Hugging Face chat templates are Jinja, and
//! they render here with `minijinja` configured like transformers'
//! `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`
//! plus loop controls, Python string/dict methods, `raise_exception`,
//! `strftime_now` and a `tojson` that writes what Python's `json.dumps`
//! writes. Finding the template in a model folder is the tokenizer's job.

use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Value, ValueKind};

use super::ChatMessage;

/// The name the compiled template is stored under.
pub(super) const CHAT: &str = "chat";

/// Compiles `source` in an environment configured like transformers'.
pub(super) fn compile_chat_template(
    source: &str,
) -> std::result::Result<minijinja::Environment<'static>, String> {
    let mut env = minijinja::Environment::new();
    // transformers: ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True);
    // keep_trailing_newline stays False (Jinja's default).
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| e.to_string())?;
    env.set_syntax(syntax);
    // Python methods on strings, lists and dicts: .strip(), .startswith(), .items() ...
    env.set_unknown_method_callback(python_methods);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.add_template_owned(CHAT, strip_generation_tags(source))
        .map_err(|e| describe(&e))?;
    Ok(env)
}

/// Python methods on template values: minijinja-contrib's, except
/// `str.title()`, which follows Python (a letter after any non-letter is
/// capitalized: `"quoted"` → `"Quoted"`, with the quotes).
fn python_methods(
    state: &mut minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    if let (Some(s), "title", true) = (value.as_str(), method, args.is_empty()) {
        let mut out = String::with_capacity(s.len());
        let mut prev_cased = false;
        for c in s.chars() {
            if prev_cased {
                out.extend(c.to_lowercase());
            } else {
                out.extend(c.to_uppercase());
            }
            prev_cased = c.is_alphabetic();
        }
        return Ok(Value::from(out));
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// A minijinja error with its cause chain on one line.
pub(super) fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(&format!(": {cause}"));
        src = cause.source();
    }
    s
}

/// `{% generation %}`..`{% endgeneration %}` (transformers' AssistantTracker
/// extension, which marks assistant text) becomes `{% if true %}`..`{% endif %}`:
/// the same output and the same whitespace control, in plain Jinja.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, trail) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// `raise_exception(message)`: templates call it to reject a conversation.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        message,
    ))
}

/// `strftime_now(format)`: the current date and time (UTC; transformers uses
/// local time) with the common `strftime` directives.
fn strftime_now(format: String) -> std::result::Result<Value, minijinja::Error> {
    Ok(Value::from(strftime_utc(
        &format,
        crate::clock::unix_secs(),
    )))
}

/// Formats the UTC time `secs` since the epoch with `%Y %m %d %e %H %M %S
/// %y %b %B %a %A %j %p %I %%`; other directives are copied verbatim.
fn strftime_utc(format: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (h, mi, s) = (tod / 3600, tod / 60 % 60, tod % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let d = doy_mar - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{:02}", (h + 11) % 12 + 1)),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// `tojson` as transformers defines it: Python's
/// `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`,
/// which, unlike Jinja's own filter, does not HTML-escape.
fn tojson(
    value: &Value,
    ensure_ascii: Option<bool>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii = match ensure_ascii {
        Some(b) => b,
        None => kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(v.as_usize().ok_or_else(|| {
                minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    "tojson: indent must be an int or a string",
                )
            })?)),
        },
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ))
        }
        // Python: (', ', ': ') without indent, (',', ': ') with it.
        None => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let style = PyJson {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    style.write(&mut out, value, 0)?;
    Ok(Value::from_safe_string(out))
}

/// The options of Python's `json.dumps`.
struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn write(
        &self,
        out: &mut String,
        v: &Value,
        depth: usize,
    ) -> std::result::Result<(), minijinja::Error> {
        let unsupported = |what: &str| {
            minijinja::Error::new(
                minijinja::ErrorKind::BadSerialization,
                format!("tojson: object of type {what} is not JSON serializable"),
            )
        };
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    let x = f64::try_from(v.clone())?;
                    out.push_str(&py_float(x));
                }
            }
            ValueKind::String => py_string(out, v.as_str().unwrap_or_default(), self.ensure_ascii),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.write(out, item, depth + 1)?;
                }
                self.newline(out, depth);
                out.push(']');
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = Vec::new();
                for key in v.try_iter()? {
                    let val = v.get_item(&key)?;
                    let key = match key.kind() {
                        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                        ValueKind::None => "null".into(),
                        ValueKind::Bool | ValueKind::Number => {
                            let mut s = String::new();
                            self.write(&mut s, &key, 0)?;
                            s
                        }
                        other => return Err(unsupported(&format!("{other} (as a key)"))),
                    };
                    entries.push((key, val));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                if entries.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, (key, val)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    py_string(out, key, self.ensure_ascii);
                    out.push_str(&self.key_sep);
                    self.write(out, val, depth + 1)?;
                }
                self.newline(out, depth);
                out.push('}');
            }
            other => return Err(unsupported(&other.to_string())),
        }
        Ok(())
    }
}

/// Python's `repr(float)` as `json.dumps` writes it.
fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let a = x.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        // Shortest round-trip digits in exponent form: 1e+20, 1.5e-05.
        let s = format!("{x:e}");
        let (mant, exp) = s
            .split_once('e')
            .expect("invariant: `{:e}` of a finite f64 always writes an `e`");
        let exp: i32 = exp
            .parse()
            .expect("invariant: `{:e}` writes the exponent as a small decimal integer");
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let s = format!("{x}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

/// A JSON string literal as Python writes it.
fn py_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Messages are maps with keys in Python's insertion order (`role`, then
/// `content`), so `tojson(message)` matches transformers.
impl Object for ChatMessage {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.role.as_str())),
            "content" => Some(Value::from(self.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn render(template: &str, messages: &[ChatMessage], gen: bool) -> String {
        let env = compile_chat_template(template).expect("compiles");
        let ctx: BTreeMap<String, Value> = [
            (
                "messages".to_string(),
                Value::from(
                    messages
                        .iter()
                        .map(|m| Value::from_object(m.clone()))
                        .collect::<Vec<_>>(),
                ),
            ),
            ("add_generation_prompt".to_string(), Value::from(gen)),
            ("bos_token".to_string(), Value::from("<s>")),
            ("eos_token".to_string(), Value::from("</s>")),
        ]
        .into_iter()
        .collect();
        env.get_template(CHAT)
            .unwrap()
            .render(Value::from(ctx))
            .expect("renders")
    }

    #[test]
    fn chat_template_chatml_with_trim_blocks() {
        let t = "{% for message in messages %}\n<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}\n{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let m = [ChatMessage::new("user", "hi")];
        assert_eq!(
            render(t, &m, true),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(render(t, &m, false), "<|im_start|>user\nhi<|im_end|>\n");
    }

    #[test]
    fn chat_template_python_methods_loop_controls_and_raise() {
        let t = "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}\
                 [{{ m['content'] | trim }}|{{ m.content.strip().upper() }}|{{ m.role.startswith('us') }}]\
                 {% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}";
        let m = [
            ChatMessage::new("system", "sys"),
            ChatMessage::new("user", "  a b "),
            ChatMessage::new("assistant", "c"),
        ];
        assert_eq!(render(t, &m, false), "<s>[a b|A B|True][c|C|False]");
        // Python prints None; a missing key is an empty string.
        assert_eq!(
            render(
                "{{ none }}|{{ messages[0].nope }}|{{ [1, none] }}",
                &m,
                false
            ),
            "None||[1, None]"
        );
        assert_eq!(
            render("{{ 'say \\'hi\\' o\\'neil x2y'.title() }}", &m, false),
            "Say 'Hi' O'Neil X2Y"
        );
        let env = compile_chat_template("{{ raise_exception('roles must alternate') }}").unwrap();
        let err = env.get_template(CHAT).unwrap().render(()).unwrap_err();
        assert!(
            describe(&err).contains("roles must alternate"),
            "{}",
            describe(&err)
        );
    }

    #[test]
    fn chat_template_tojson_matches_python() {
        let t = "{{ messages[0] | tojson }}|{{ {'a': [1, 2.5, none, true], 'b': '<é>\"\\n'} | tojson }}|{{ [] | tojson(indent=2) }}|{{ {'k': [1]} | tojson(indent=2) }}";
        let m = [ChatMessage::new("user", "x")];
        assert_eq!(
            render(t, &m, false),
            "{\"role\": \"user\", \"content\": \"x\"}|{\"a\": [1, 2.5, null, true], \"b\": \"<é>\\\"\\n\"}|[]|{\n  \"k\": [\n    1\n  ]\n}"
        );
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(1e20), "1e+20");
        assert_eq!(py_float(1.5e-5), "1.5e-05");
        assert_eq!(py_float(0.1), "0.1");
        let mut s = String::new();
        py_string(&mut s, "é😀", true);
        assert_eq!(s, "\"\\u00e9\\ud83d\\ude00\"");
    }

    #[test]
    fn chat_template_generation_tags_become_plain_blocks() {
        assert_eq!(
            strip_generation_tags("a{%- generation -%}b{% endgeneration %}{{ x }}{% if y %}"),
            "a{%- if true -%}b{% endif %}{{ x }}{% if y %}"
        );
        let t = "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}";
        let m = [
            ChatMessage::new("user", "q"),
            ChatMessage::new("assistant", "a"),
        ];
        assert_eq!(render(t, &m, false), "qa");
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(
            strftime_utc("%d %b %Y %H:%M:%S %A %j %%", t),
            "29 Feb 2024 13:05:09 Thursday 060 %"
        );
        assert_eq!(strftime_utc("%Y-%m-%d %a", 0), "1970-01-01 Thu");
    }
}
