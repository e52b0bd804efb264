//! `wgtune data --model M --data D`: what training will see of a data set,
//! from the tokenizer (and config.json's position limit) alone: no GPU, no
//! weights. Per file: rows per kind, token length percentiles of examples
//! and of their targets, rows truncated and dropped, unused keys, and one
//! example rendered with its target tokens marked.

use std::io::IsTerminal;
use std::path::PathBuf;

use super::DataCmdArgs;
use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::tokenizer::Tokenizer;
use crate::train::data::{Dataset, Example, LoadReport, IGNORE};
use crate::train::rows::DataFolder;

pub(super) fn data(a: &DataCmdArgs) -> Result<()> {
    let dir = crate::model::hub::resolve_model(&a.model)?;
    let tok = Tokenizer::load(&dir)?;
    let mut opts = a.data_args.options()?;
    // Training cuts rows to the model's positions unless told less.
    let positions = ModelConfig::from_file(&dir.join("config.json"))
        .ok()
        .map(|c| c.max_positions);
    let limit_from = match (opts.max_seq_len, positions) {
        (Some(m), Some(p)) if p < m => {
            opts.max_seq_len = Some(p);
            format!("{p} tokens (the model's positions; --max-seq-len {m} is more)")
        }
        (Some(m), _) => format!("{m} tokens (--max-seq-len)"),
        (None, Some(p)) => {
            opts.max_seq_len = Some(p);
            format!("{p} tokens (the model's positions)")
        }
        (None, None) => "none (no config.json)".to_string(),
    };
    println!(
        "model: {} (chat template: {})",
        a.model.display(),
        if tok.chat_template().is_some() {
            "yes"
        } else {
            "none"
        }
    );
    println!("max sequence length: {limit_from}");
    let files: Vec<(&str, PathBuf)> = if a.data.is_dir() {
        let f = DataFolder::open(&a.data)?;
        if f.train.is_none() && f.valid.is_none() && f.test.is_none() {
            return Err(f.missing("train.jsonl, valid.jsonl or test.jsonl"));
        }
        [("train", f.train), ("valid", f.valid), ("test", f.test)]
            .into_iter()
            .filter_map(|(n, p)| p.map(|p| (n, p)))
            .collect()
    } else {
        vec![("data", a.data.clone())]
    };
    let colour = std::io::stdout().is_terminal();
    for (i, (split, path)) in files.iter().enumerate() {
        let (ds, report) = Dataset::load_with_report(path, &tok, &opts)?;
        println!("\n== {split}: {}", path.display());
        print_summary(&ds, &report);
        // One example: from the first file (training's, in a folder).
        if i == 0 {
            print_example(&tok, &ds, &report, a.show, colour)?;
        }
    }
    Ok(())
}

fn print_summary(ds: &Dataset, report: &LoadReport) {
    let k = &ds.kinds;
    let rows = k.text + k.prompt_completion + k.alpaca + k.messages + k.sharegpt;
    println!(
        "rows: {rows} ({} chat, {} ShareGPT, {} prompt/completion, {} alpaca, {} text)",
        k.messages, k.sharegpt, k.prompt_completion, k.alpaca, k.text
    );
    if k.prompt_completion + k.alpaca > 0 {
        println!(
            "chat template for prompt/completion and alpaca rows: {}",
            if report.chat_template {
                "on (user and assistant turns)"
            } else {
                "off (raw text)"
            }
        );
    }
    println!(
        "examples: {} kept, {} truncated, {} dropped (no target token left)",
        ds.len(),
        ds.truncated,
        ds.dropped
    );
    let tokens: Vec<usize> = ds.examples.iter().map(|e| e.ids.len()).collect();
    let targets: Vec<usize> = ds.examples.iter().map(Example::n_targets).collect();
    println!("tokens per example:  {}", percentiles(tokens));
    println!("targets per example: {}", percentiles(targets));
    for key in &report.unused_keys {
        println!("warning: {}", key.message(&ds.path));
    }
}

/// `p50 N  p90 N  p99 N  max N  total N` (nearest rank).
fn percentiles(mut v: Vec<usize>) -> String {
    v.sort_unstable();
    let n = v.len();
    if n == 0 {
        return "none".into();
    }
    let p = |q: usize| v[((q * n).div_ceil(100)).clamp(1, n) - 1];
    format!(
        "p50 {}  p90 {}  p99 {}  max {}  total {}",
        p(50),
        p(90),
        p(99),
        v[n - 1],
        v.iter().sum::<usize>()
    )
}

/// Example `show` (1-based) decoded span by span, target tokens marked.
fn print_example(
    tok: &Tokenizer,
    ds: &Dataset,
    report: &LoadReport,
    show: usize,
    colour: bool,
) -> Result<()> {
    let Some(e) = ds.examples.get(show - 1) else {
        println!(
            "\nno example {show}: the file has {} examples",
            ds.examples.len()
        );
        return Ok(());
    };
    let (open, close, legend) = if colour {
        ("\x1b[1;32m", "\x1b[0m", "target tokens in green")
    } else {
        ("[[", "]]", "target tokens (what the loss trains) in [[ ]]")
    };
    println!(
        "\nexample {show} (line {}; {} tokens, {} targets; {legend}):",
        report.lines.get(show - 1).copied().unwrap_or(0),
        e.ids.len(),
        e.n_targets()
    );
    let mut out = String::new();
    for (trained, span) in spans(e) {
        let text = tok.decode(&e.ids[span], false)?;
        if trained {
            out.push_str(open);
            out.push_str(&text);
            out.push_str(close);
        } else {
            out.push_str(&text);
        }
    }
    println!("{out}");
    Ok(())
}

/// Runs of target and context tokens. Token 0 is never a target: nothing
/// before it predicts it.
fn spans(e: &Example) -> Vec<(bool, std::ops::Range<usize>)> {
    let mut out: Vec<(bool, std::ops::Range<usize>)> = Vec::new();
    for (j, &l) in e.labels.iter().enumerate() {
        let t = j > 0 && l != IGNORE;
        match out.last_mut() {
            Some((last, r)) if *last == t => r.end = j + 1,
            _ => out.push((t, j..j + 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<usize> = (1..=100).collect();
        assert_eq!(
            percentiles(v),
            "p50 50  p90 90  p99 99  max 100  total 5050"
        );
        assert_eq!(percentiles(vec![7]), "p50 7  p90 7  p99 7  max 7  total 7");
        assert_eq!(percentiles(vec![]), "none");
    }

    #[test]
    fn spans_mark_targets_but_never_the_first_token() {
        let e = Example {
            ids: vec![1, 2, 3, 4, 5],
            labels: vec![1, IGNORE, 3, 4, IGNORE],
        };
        assert_eq!(spans(&e), vec![(false, 0..2), (true, 2..4), (false, 4..5)]);
    }
}
