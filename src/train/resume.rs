//! The resume rules: a run continued from a checkpoint (`--resume`) or
//! started from an adapter (`--init-adapter`) keeps what they record;
//! options given on the command line that contradict it are errors, and
//! options not given are filled in from the checkpoint.

use std::path::Path;

use crate::adapters::init::{self, LoraInit};
use crate::adapters::peft_io::{AdapterConfig, LoadedAdapter};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::train::checkpoint::RunSettings;
use crate::train::options::{
    schedule_name, MethodOptions, PrefixInitKind, PromptInitKind, TrainOptions,
};
use crate::train::trainer::Schedule;

fn lora_init_name(i: LoraInit) -> &'static str {
    match i {
        LoraInit::Kaiming => "kaiming",
        LoraInit::Gaussian => "gaussian",
    }
}

fn prompt_init_name(i: PromptInitKind) -> &'static str {
    match i {
        PromptInitKind::Text => "text",
        PromptInitKind::Vocab => "vocab",
        PromptInitKind::Random => "random",
    }
}

fn prefix_init_name(i: PrefixInitKind) -> &'static str {
    match i {
        PrefixInitKind::Text => "text",
        PrefixInitKind::Zero => "zero",
        PrefixInitKind::Random => "random",
    }
}

/// The LoRA target modules as saved: `all-linear` resolved to the model's
/// module names, as PEFT saves it, none to the default; sorted.
fn resolve_lora_targets(model: &Model, targets: &[String]) -> Vec<String> {
    let mut names: Vec<String> = if targets.iter().any(|t| t == "all-linear") {
        model
            .linears()
            .iter()
            .filter_map(|(_, l)| l.name.rsplit('.').next().map(str::to_string))
            .collect()
    } else {
        // No targets: the model's default, as a fresh run saves it.
        let lin = model.linears();
        crate::adapters::adapter::resolve_targets(targets, lin.iter().map(|(_, l)| l.name.as_str()))
            .unwrap_or_default()
    };
    names.sort();
    names.dedup();
    names
}

/// `--flag given (source: recorded)` for every option the user gave that
/// `cfg` (a checkpoint's or an initial adapter's) contradicts.
pub fn adapter_conflicts(o: &TrainOptions, model: &Model, cfg: &AdapterConfig) -> Vec<String> {
    // Init options shape a new adapter only.
    let new = || "applies only to a new adapter".to_string();
    let rows: Vec<(&str, String, String)> = match (&o.method, cfg) {
        (MethodOptions::Lora(l), AdapterConfig::Lora(c)) => {
            let mut recorded = c.target_modules.clone();
            recorded.sort();
            vec![
                ("lora_r", s(l.r), s(c.r)),
                ("lora_alpha", s(l.alpha), s(c.lora_alpha)),
                ("lora_dropout", s(l.dropout), s(c.lora_dropout)),
                (
                    "lora_targets",
                    resolve_lora_targets(model, &l.targets).join(","),
                    recorded.join(","),
                ),
                ("rslora", s(l.rslora), s(c.use_rslora)),
                ("lora_init", lora_init_name(l.init).into(), new()),
                (
                    "num_layers",
                    s(l.num_layers.unwrap_or(model.cfg.layers)),
                    recorded_num_layers(model, c),
                ),
            ]
        }
        (MethodOptions::Prompt(p), AdapterConfig::Prompt(c)) => vec![
            (
                "num_virtual_tokens",
                s(p.num_virtual_tokens),
                s(c.num_virtual_tokens),
            ),
            ("prompt_init", prompt_init_name(p.init).into(), new()),
            (
                "prompt_init_text",
                p.init_text.clone().unwrap_or_default(),
                new(),
            ),
        ],
        (MethodOptions::Prefix(p), AdapterConfig::Prefix(c)) => vec![
            (
                "num_virtual_tokens",
                s(p.num_virtual_tokens),
                s(c.num_virtual_tokens),
            ),
            ("prefix_projection", s(p.projection), s(c.prefix_projection)),
            (
                "encoder_hidden_size",
                s(p.encoder_hidden_size.unwrap_or(0)),
                if c.prefix_projection {
                    s(c.encoder_hidden_size())
                } else {
                    "none (no projection)".into()
                },
            ),
            ("prefix_init", prefix_init_name(p.init).into(), new()),
            (
                "prefix_init_text",
                p.init_text.clone().unwrap_or_default(),
                new(),
            ),
        ],
        (m, _) => {
            return vec![format!(
                "--method {} (recorded: {})",
                m.method().name(),
                init::method_name(cfg)
            )]
        }
    };
    given_and_different(o, rows)
}

/// `--num-layers` as an adapter records it: N when it adapts the top N
/// layers, else its list of layers.
fn recorded_num_layers(model: &Model, c: &crate::adapters::peft_io::LoraConfig) -> String {
    let n = model.cfg.layers;
    match c.layers_to_transform.as_deref() {
        None | Some([]) => n.to_string(),
        Some(l) => {
            let mut v = l.to_vec();
            v.sort_unstable();
            v.dedup();
            let top: Option<Vec<usize>> = n.checked_sub(v.len()).map(|f| (f..n).collect());
            if top.as_ref() == Some(&v) {
                v.len().to_string()
            } else {
                format!("layers_to_transform {v:?}")
            }
        }
    }
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

/// `--flag given (recorded: value)` for each (clap id, given, recorded) row
/// whose option the user gave with another value than the recorded one.
fn given_and_different(o: &TrainOptions, rows: Vec<(&str, String, String)>) -> Vec<String> {
    rows.into_iter()
        .filter(|(id, given, recorded)| o.given(id) && given != recorded)
        .map(|(id, given, recorded)| {
            format!("--{} {given} (recorded: {recorded})", id.replace('_', "-"))
        })
        .collect()
}

/// Options the user gave that the checkpoint's run settings contradict.
pub fn settings_conflicts(o: &TrainOptions, lr: f64, st: &RunSettings) -> Vec<String> {
    let msl = |x: Option<usize>| x.map_or("auto".to_string(), s);
    let d = &o.data_opts;
    let rows = vec![
        ("lr", s(lr), s(st.lr)),
        ("weight_decay", s(o.weight_decay), s(st.weight_decay)),
        (
            "lr_schedule",
            schedule_name(o.schedule).into(),
            st.lr_schedule.clone(),
        ),
        ("warmup_steps", s(o.warmup_steps), s(st.warmup_steps)),
        ("max_grad_norm", s(o.max_grad_norm), s(st.max_grad_norm)),
        ("seed", s(o.seed), s(st.seed)),
        ("batch_size", s(o.batch_size), s(st.batch_size)),
        ("grad_accum", s(o.grad_accum), s(st.grad_accum)),
        ("max_seq_len", msl(d.max_seq_len), msl(st.max_seq_len)),
        (
            "train_on_prompt",
            s(d.train_on_prompt),
            s(st.train_on_prompt),
        ),
        (
            "chat_template",
            d.chat_template.name().into(),
            st.chat_template.clone(),
        ),
    ];
    given_and_different(o, rows)
}

/// The run's settings with the checkpoint's filled in where the user gave
/// none (so a resume continues the run it resumes).
pub fn adopt_settings(o: &mut TrainOptions, s: &RunSettings, c: &AdapterConfig) {
    if !o.given("lr") {
        o.lr = Some(s.lr);
    }
    if !o.given("weight_decay") {
        o.weight_decay = s.weight_decay;
    }
    if !o.given("lr_schedule") {
        o.schedule = match s.lr_schedule.as_str() {
            "constant" => Schedule::Constant,
            "linear" => Schedule::Linear,
            _ => Schedule::Cosine,
        };
    }
    if !o.given("warmup_steps") {
        o.warmup_steps = s.warmup_steps;
    }
    if !o.given("max_grad_norm") {
        o.max_grad_norm = s.max_grad_norm;
    }
    if !o.given("seed") {
        o.seed = s.seed;
    }
    if !o.given("batch_size") {
        o.batch_size = s.batch_size;
    }
    if !o.given("grad_accum") {
        o.grad_accum = s.grad_accum;
    }
    if !o.given("max_seq_len") {
        o.data_opts.max_seq_len = s.max_seq_len;
    }
    if !o.given("train_on_prompt") {
        o.data_opts.train_on_prompt = s.train_on_prompt;
    }
    if !o.given("chat_template") {
        if let Some(m) = crate::train::data::ChatTemplateMode::from_name(&s.chat_template) {
            o.data_opts.chat_template = m;
        }
    }
    if let (MethodOptions::Lora(lo), AdapterConfig::Lora(l)) = (&mut o.method, c) {
        lo.dropout = l.lora_dropout;
    }
}

pub fn conflict_error(path: &Path, what: &str, list: &[String], hint: &str) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!(
            "these options contradict the {what}:\n  {}\n---> HINT: {hint}",
            list.join("\n  ")
        ),
    }
}

/// Checks that an adapter loaded from `dir` was made for `model`. wgtune
/// records the base model's fingerprint, and a mismatch is an error. A PEFT
/// adapter records only a name or path, so a different one is a warning.
pub fn check_adapter_base(
    model: &Model,
    model_arg: &Path,
    loaded: &LoadedAdapter,
    dir: &Path,
) -> Result<()> {
    if let Some(fp) = loaded.base_fingerprint() {
        if fp != model.fingerprint {
            return Err(Error::Adapter {
                path: dir.to_path_buf(),
                message: format!(
                    "was trained on another base model ({}) than `{}`: its weights differ\n\
                     ---> HINT: pass the model it was trained on as --model",
                    loaded.config.base_model_name_or_path().unwrap_or("unnamed"),
                    model_arg.display()
                ),
            });
        }
        return Ok(());
    }
    if let Some(base) = loaded.config.base_model_name_or_path() {
        let last = |s: &str| {
            s.trim_end_matches(['/', '\\'])
                .rsplit(['/', '\\'])
                .next()
                .unwrap_or("")
                .to_lowercase()
        };
        let given = model_arg.display().to_string();
        if last(base) != last(&given) {
            log::warn!(
                "{}: adapter made for `{base}`, used with `{given}`; it loads because the \
                 shapes fit, but on another base model it is not what was trained",
                dir.display()
            );
        }
    }
    Ok(())
}
