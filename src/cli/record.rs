//! `<out>/train_args.json`: every run's options as resolved (clap ids,
//! which are also the config-file keys; defaults filled in; the other
//! methods' options left out), and the resume rule built on it.
//!
//! On `--resume` an option given (on the command line or in a config file)
//! whose value differs from the record is an error, except the ones a
//! continued run may change: how long it runs (`--steps`, `--epochs`),
//! how often it logs, evaluates and saves, `--max-bad-steps`, the
//! validation data, `--export`, and where and how it shows (`--backend`,
//! `--gpu`, `--no-progress`). Options not given take the recorded value,
//! except the device and display ones. Everything else (model,
//! data, method, adapter shape, optimizer, batch, sequence length,
//! weights) must match: changing it would train another run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use clap::{ArgMatches, CommandFactory, FromArgMatches};

use super::{Cli, MethodArg, TrainArgs};
use crate::error::{Error, Result};
use crate::train::options::Method;
use crate::train::resume::conflict_error;

/// The record's file name in the output folder.
pub use crate::train::outdir::ARGS_FILE as FILE;

/// Not recorded: they say how this invocation starts, not what the run is.
const NOT_RECORDED: [&str; 3] = ["config", "resume", "overwrite"];
/// May change on resume and are never taken from the record: the device
/// and display, and the initial adapter (which a resume cannot take).
const FREE: [&str; 4] = ["backend", "gpu", "no_progress", "init_adapter"];
/// May change on resume; taken from the record when not given.
const CHANGEABLE: [&str; 11] = [
    "export",
    "grad_checkpoint",
    "save_total_limit",
    "early_stopping_patience",
    "steps",
    "epochs",
    "log_every",
    "eval_every",
    "save_every",
    "max_bad_steps",
    "val_data",
];
/// Recorded as absolute paths when they exist, so a resume from another
/// folder compares and finds the same files.
const PATHS: [&str; 6] = [
    "model",
    "data",
    "val_data",
    "out",
    "init_adapter",
    "template",
];

/// Options of one method only, left out of the others' records.
const LORA_ONLY: [&str; 6] = [
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "rslora",
    "lora_init",
];
const PROMPT_ONLY: [&str; 2] = ["prompt_init", "prompt_init_text"];
const PREFIX_ONLY: [&str; 4] = [
    "prefix_projection",
    "encoder_hidden_size",
    "prefix_init",
    "prefix_init_text",
];

/// Numbers in one spelling (`1e-3` and `0.001` are the same value).
fn normalize(v: &str) -> String {
    if v.parse::<i128>().is_ok() {
        return v.to_string();
    }
    match v.parse::<f64>() {
        Ok(f) if f.is_finite() && !v.trim().is_empty() => f.to_string(),
        _ => v.to_string(),
    }
}

fn same(a: &str, b: &str) -> bool {
    a == b
        || match (a.parse::<f64>(), b.parse::<f64>()) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
}

/// Every train option that has a value (given or default), as text.
pub fn resolved(m: &ArgMatches, train: &clap::Command) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for arg in train.get_arguments() {
        let id = arg.get_id().as_str();
        let Ok(Some(raw)) = m.try_get_raw(id) else {
            continue;
        };
        let vals: Vec<String> = raw.map(|v| v.to_string_lossy().into_owned()).collect();
        let mut v = normalize(&vals.join(","));
        if PATHS.contains(&id) {
            if let Ok(p) = std::fs::canonicalize(&v) {
                v = p.display().to_string();
            }
        }
        out.insert(id.to_string(), v);
    }
    out
}

/// What train_args.json holds for `a`: its recorded options, typed (flags
/// as booleans, numbers as numbers).
pub fn to_json(a: &TrainArgs) -> serde_json::Value {
    let (skip, method): (Vec<&str>, Method) = match a.method {
        MethodArg::Lora => (
            [&PROMPT_ONLY[..], &PREFIX_ONLY[..], &["num_virtual_tokens"]].concat(),
            Method::Lora,
        ),
        MethodArg::Prompt => ([&LORA_ONLY[..], &PREFIX_ONLY[..]].concat(), Method::Prompt),
        MethodArg::Prefix => ([&LORA_ONLY[..], &PROMPT_ONLY[..]].concat(), Method::Prefix),
    };
    let lr_default = method.default_lr();
    let mut map = serde_json::Map::new();
    for (id, v) in &a.resolved {
        if NOT_RECORDED.contains(&id.as_str()) || skip.contains(&id.as_str()) {
            continue;
        }
        map.insert(id.clone(), typed(v));
    }
    // The learning rate in use, not "the method's default".
    map.entry("lr")
        .or_insert_with(|| typed(&lr_default.to_string()));
    serde_json::Value::Object(map)
}

fn typed(v: &str) -> serde_json::Value {
    use serde_json::Value;
    match v {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => {
            if let Ok(i) = v.parse::<i64>() {
                return Value::from(i);
            }
            if let Ok(u) = v.parse::<u64>() {
                return Value::from(u);
            }
            match v.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
                Some(n) if !v.is_empty() => Value::Number(n),
                _ => Value::String(v.to_string()),
            }
        }
    }
}

/// A recorded value as option text.
fn untyped(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        serde_json::Value::Number(n) => Some(normalize(&n.to_string())),
        _ => None,
    }
}

/// Read `<out>/train_args.json`; None when there is none.
pub fn read(out: &Path) -> Result<Option<BTreeMap<String, String>>> {
    let path = out.join(FILE);
    if !path.exists() {
        return Ok(None);
    }
    let bad = |message: String| Error::Checkpoint {
        path: path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("expected a JSON object of options".into()))?;
    obj.iter()
        .map(|(k, v)| {
            untyped(v)
                .map(|s| (k.clone(), s))
                .ok_or_else(|| bad(format!("`{k}`: expected a string, number or boolean")))
        })
        .collect::<Result<_>>()
        .map(Some)
}

/// `--flag given (recorded: value)` for each option given that the record
/// contradicts and that a resume may not change.
pub fn conflicts(
    given: &BTreeMap<String, String>,
    explicit: &BTreeSet<String>,
    rec: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut list = Vec::new();
    for id in explicit {
        let id = id.as_str();
        if NOT_RECORDED.contains(&id) || FREE.contains(&id) || CHANGEABLE.contains(&id) {
            continue;
        }
        let Some(g) = given.get(id) else { continue };
        let r = rec.get(id).map(String::as_str);
        if r.is_some_and(|r| same(g, r)) {
            continue;
        }
        // A flag not recorded is off.
        if r.is_none() && g == "false" {
            continue;
        }
        list.push(format!(
            "--{} {g} (recorded: {})",
            id.replace('_', "-"),
            r.unwrap_or("not set")
        ));
    }
    list
}

/// The options of a `--resume` run: those given, and the recorded ones
/// for the rest. Contradictions are errors. Unchanged when `--out` has no
/// record (a run of an older wgtune): the checkpoint's checks remain.
pub fn resume_args(a: &TrainArgs) -> Result<Option<TrainArgs>> {
    let Some(rec) = read(&a.out)? else {
        return Ok(None);
    };
    let path = a.out.join(FILE);
    let list = conflicts(&a.resolved, &a.explicit, &rec);
    if !list.is_empty() {
        return Err(conflict_error(
            &path,
            "arguments the run was started with",
            &list,
            "drop them to continue the run as it was, or start a new run from the saved \
             adapter with --init-adapter and another --out",
        ));
    }
    let cmd = Cli::command();
    let train = super::train_command(&cmd).clone();
    // --steps and --epochs are one choice: given either, the other is not adopted.
    let length_given = a.explicit.contains("steps") || a.explicit.contains("epochs");
    let mut tokens = vec!["train".to_string()];
    let mut push = |id: &str, v: &str| {
        let Some(arg) = train.get_arguments().find(|x| x.get_id() == id) else {
            return;
        };
        let Some(long) = arg.get_long() else { return };
        if !arg.get_action().takes_values() {
            if v == "true" {
                tokens.push(format!("--{long}"));
            }
        } else {
            tokens.push(format!("--{long}={v}"));
        }
    };
    for (id, v) in &rec {
        let adopt = !a.explicit.contains(id)
            && !NOT_RECORDED.contains(&id.as_str())
            && !FREE.contains(&id.as_str())
            && !(length_given && (id == "steps" || id == "epochs"));
        if adopt {
            push(id, v);
        }
    }
    for id in &a.explicit {
        if let Some(v) = a.resolved.get(id) {
            push(id, v);
        }
    }
    let bad = |e: clap::Error| Error::Checkpoint {
        path: path.clone(),
        message: format!("the recorded options do not parse: {e}"),
    };
    let m = train.try_get_matches_from(&tokens).map_err(bad)?;
    let mut b = TrainArgs::from_arg_matches(&m).map_err(bad)?;
    b.explicit = a.explicit.clone();
    b.resolved = resolved(&m, super::train_command(&cmd));
    Ok(Some(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn resume_conflicts_follow_the_rule() {
        let rec = map(&[
            ("lr", "0.002"),
            ("lora_r", "4"),
            ("steps", "2"),
            ("seed", "42"),
        ]);
        let given = map(&[
            ("lr", "0.001"),
            ("lora_r", "4"),
            ("steps", "8"),
            ("seed", "42"),
            ("gpu", "x"),
            ("rslora", "false"),
            ("max_seq_len", "64"),
        ]);
        let explicit: BTreeSet<String> = ["lr", "lora_r", "steps", "gpu", "rslora", "max_seq_len"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let list = conflicts(&given, &explicit, &rec);
        assert_eq!(
            list,
            [
                "--lr 0.001 (recorded: 0.002)",
                "--max-seq-len 64 (recorded: not set)"
            ]
        );
        // 1e-3 and 0.001 are one value.
        assert!(same(&normalize("1e-3"), "0.001"));
        assert_eq!(untyped(&typed("0.002")).unwrap(), "0.002");
        assert_eq!(typed("true"), serde_json::Value::Bool(true));
        assert_eq!(typed("q_proj,v_proj"), serde_json::json!("q_proj,v_proj"));
    }
}
