//! `wgtune train -c run.toml`: the file's table becomes command-line
//! tokens inserted right after `train`. The train command lets a later
//! flag override an earlier one, so the command line wins over the file,
//! every option (and alias) works as a key with no code of its own, and
//! options from the file count as given for the resume rules.
//!
//! Keys are long option names or aliases, with `_` or `-`. Values: a
//! string or number is the option's value; `true` gives a flag and `false`
//! leaves it out; an array of strings is joined with commas (`lora_targets
//! = ["q_proj", "v_proj"]`). Paths are taken as on the command line
//! (relative to the current folder): a key copied from a command line
//! means the same, and `model = "ORG/NAME"` is never mistaken for a path.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// (long option name, key as written) for each key of a config file.
type Keys = Vec<(String, String)>;

/// The config file of a command line and the option each key set.
#[derive(Debug)]
pub struct FromFile {
    path: PathBuf,
    keys: Keys,
}

impl FromFile {
    /// A line naming the file's key when clap's error is about an option
    /// the file set.
    pub fn note(&self, e: &clap::Error) -> Option<String> {
        let arg = match e.get(clap::error::ContextKind::InvalidArg)? {
            clap::error::ContextValue::String(s) => s.clone(),
            _ => return None,
        };
        let (_, key) = self.keys.iter().find(|(long, _)| {
            arg == format!("--{long}") || arg.starts_with(&format!("--{long} "))
        })?;
        Some(format!(
            "note: `{arg}` is set by key `{key}` in {} (unless the command line gives it too)",
            self.path.display()
        ))
    }
}

/// Find `-c FILE` / `--config FILE` in a `train` command line (after
/// [`super::normalize_args`]) and insert the file's options after `train`.
pub fn expand(args: &mut Vec<String>, cli: &clap::Command) -> Result<Option<FromFile>> {
    if args.get(1).map(String::as_str) != Some("train") {
        return Ok(None);
    }
    let mut path = None;
    let mut i = 2;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--" {
            break;
        }
        if a == "-c" || a == "--config" {
            path = args.get(i + 1).map(PathBuf::from);
            i += 1;
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(PathBuf::from(p));
        } else if let Some(p) = a.strip_prefix("-c").filter(|p| !p.is_empty()) {
            if !a.starts_with("--") {
                path = Some(PathBuf::from(p.strip_prefix('=').unwrap_or(p)));
            }
        }
        i += 1;
    }
    let Some(path) = path else {
        return Ok(None);
    };
    let train = super::train_command(cli);
    let (tokens, keys) = tokens(&path, train)?;
    let at = 2;
    args.splice(at..at, tokens);
    Ok(Some(FromFile { path, keys }))
}

/// The command-line tokens of the config file at `path`, and the long
/// option each key set.
pub fn tokens(path: &Path, train: &clap::Command) -> Result<(Vec<String>, Keys)> {
    let err = |message: String| Error::Config {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(format!("cannot read the config file: {e}")))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| err(format!("not valid TOML: {e}")))?;
    let mut out = Vec::new();
    let mut keys = Vec::new();
    for (key, value) in &table {
        let name = key.replace('_', "-");
        let arg = train
            .get_arguments()
            .find(|a| {
                a.get_long() == Some(name.as_str())
                    || a.get_all_aliases()
                        .is_some_and(|al| al.contains(&name.as_str()))
            })
            .ok_or_else(|| {
                err(format!(
                    "unknown key `{key}`: not an option of `wgtune train` (keys are the long \
                     option names of `wgtune train --help`, e.g. `lora_r = 8`)"
                ))
            })?;
        let long = arg
            .get_long()
            .expect("invariant: train options have long names");
        if long == "config" {
            return Err(err(format!(
                "key `{key}`: a config file cannot name another one"
            )));
        }
        let wrong = |want: &str| {
            err(format!(
                "key `{key}` (--{long}) takes {want}, not {} `{value}`",
                value.type_str()
            ))
        };
        let flag = format!("--{long}");
        if !arg.get_action().takes_values() {
            match value {
                toml::Value::Boolean(true) => out.push(flag),
                toml::Value::Boolean(false) => {}
                _ => return Err(wrong("true or false")),
            }
        } else {
            let v = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| wrong("a string, a number or an array of strings"))?
                    .join(","),
                _ => return Err(wrong("a string, a number or an array of strings")),
            };
            // `--opt=value`: a value may start with `-`.
            out.push(format!("{flag}={v}"));
        }
        keys.push((long.to_string(), key.clone()));
    }
    Ok((out, keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wgtune-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn expanded(cmdline: &[&str]) -> Result<Vec<String>> {
        let mut args: Vec<String> = cmdline.iter().map(|s| s.to_string()).collect();
        expand(&mut args, &crate::cli::Cli::command())?;
        Ok(args)
    }

    #[test]
    fn keys_and_aliases_become_tokens_before_the_command_line() {
        let p = write(
            "good.toml",
            "method = \"lora\"\nlora_rank = 4\nlearning-rate = 1e-3\nrslora = true\n\
             train_on_prompt = false\nlora_targets = [\"q_proj\", \"v_proj\"]\n",
        );
        let args = expanded(&[
            "wgtune",
            "train",
            "--model",
            "m",
            "--data",
            "d",
            "-c",
            p.to_str().unwrap(),
            "--lr",
            "5e-3",
        ])
        .unwrap();
        assert!(args.contains(&"--lr=0.001".to_string()), "{args:?}");
        assert!(args.contains(&"--lora-r=4".to_string()), "{args:?}");
        assert!(args.contains(&"--lora-targets=q_proj,v_proj".to_string()));
        assert!(args.contains(&"--rslora".to_string()));
        assert!(
            !args.iter().any(|a| a.contains("train-on-prompt")),
            "{args:?}"
        );
        // The command line comes after the file, so it wins.
        assert_eq!(&args[args.len() - 2..], ["--lr", "5e-3"]);
        // Parsed: the later --lr overrides the file's.
        let m = crate::cli::Cli::command()
            .try_get_matches_from(&args)
            .unwrap();
        let t = m.subcommand_matches("train").unwrap();
        assert_eq!(t.get_one::<f64>("lr"), Some(&5e-3));
        assert_eq!(t.get_one::<usize>("lora_r"), Some(&4));
    }

    #[test]
    fn bad_files_are_errors_naming_the_file_and_key() {
        for (name, text, needle) in [
            ("unknown.toml", "lora_rnk = 4\n", "unknown key `lora_rnk`"),
            (
                "flag.toml",
                "rslora = 1\n",
                "key `rslora` (--rslora) takes true or false",
            ),
            ("table.toml", "[lora]\nr = 4\n", "unknown key `lora`"),
            ("syntax.toml", "lr = = 3\n", "line 1"),
            (
                "nested.toml",
                "config = \"x.toml\"\n",
                "cannot name another",
            ),
        ] {
            let p = write(name, text);
            let e = expanded(&["wgtune", "train", "--config", p.to_str().unwrap()]);
            let msg = match e {
                Err(e) => e.to_string(),
                Ok(a) => panic!("{name}: accepted as {a:?}"),
            };
            assert!(msg.contains(name), "{name}: {msg}");
            assert!(msg.contains(needle), "{name}: want `{needle}`: {msg}");
        }
        let e = expanded(&["wgtune", "train", "-c", "/nonexistent/run.toml"]).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/run.toml: cannot read"),
            "{e}"
        );
    }
}
