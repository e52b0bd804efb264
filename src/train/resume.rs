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
/// module names, as PEFT saves it; sorted.
fn resolve_lora_targets(model: &Model, targets: &[String]) -> Vec<String> {
    let mut names: Vec<String> = if targets.iter().any(|t| t == "all-linear") {
        model
            .linears()
            .iter()
            .filter_map(|(_, l)| l.name.rsplit('.').next().map(str::to_string))
            .collect()
    } else {
        targets.to_vec()
    };
    names.sort();
    names.dedup();
    names
}

/// `--flag given (source: recorded)` for every option the user gave that
/// `cfg` (a checkpoint's or an initial adapter's) contradicts.
pub fn adapter_conflicts(o: &TrainOptions, model: &Model, cfg: &AdapterConfig) -> Vec<String> {
    let mut out = Vec::new();
    let mut differ = |id: &str, flag: &str, given: String, recorded: String| {
        if o.given(id) && given != recorded {
            out.push(format!("--{flag} {given} (recorded: {recorded})"));
        }
    };
    // Init options shape a new adapter only.
    let only_new = "applies only to a new adapter".to_string();
    match (&o.method, cfg) {
        (MethodOptions::Lora(l), AdapterConfig::Lora(c)) => {
            differ("lora_r", "lora-r", l.r.to_string(), c.r.to_string());
            differ(
                "lora_alpha",
                "lora-alpha",
                l.alpha.to_string(),
                c.lora_alpha.to_string(),
            );
            differ(
                "lora_dropout",
                "lora-dropout",
                l.dropout.to_string(),
                c.lora_dropout.to_string(),
            );
            let mut recorded = c.target_modules.clone();
            recorded.sort();
            differ(
                "lora_targets",
                "lora-targets",
                resolve_lora_targets(model, &l.targets).join(","),
                recorded.join(","),
            );
            differ(
                "rslora",
                "rslora",
                l.rslora.to_string(),
                c.use_rslora.to_string(),
            );
            differ(
                "lora_init",
                "lora-init",
                lora_init_name(l.init).into(),
                only_new.clone(),
            );
        }
        (MethodOptions::Prompt(p), AdapterConfig::Prompt(c)) => {
            differ(
                "num_virtual_tokens",
                "num-virtual-tokens",
                p.num_virtual_tokens.to_string(),
                c.num_virtual_tokens.to_string(),
            );
            differ(
                "prompt_init",
                "prompt-init",
                prompt_init_name(p.init).into(),
                only_new.clone(),
            );
            differ(
                "prompt_init_text",
                "prompt-init-text",
                p.init_text.clone().unwrap_or_default(),
                only_new.clone(),
            );
        }
        (MethodOptions::Prefix(p), AdapterConfig::Prefix(c)) => {
            differ(
                "num_virtual_tokens",
                "num-virtual-tokens",
                p.num_virtual_tokens.to_string(),
                c.num_virtual_tokens.to_string(),
            );
            differ(
                "prefix_projection",
                "prefix-projection",
                p.projection.to_string(),
                c.prefix_projection.to_string(),
            );
            differ(
                "encoder_hidden_size",
                "encoder-hidden-size",
                p.encoder_hidden_size.unwrap_or(0).to_string(),
                if c.prefix_projection {
                    c.encoder_hidden_size().to_string()
                } else {
                    "none (no projection)".into()
                },
            );
            differ(
                "prefix_init",
                "prefix-init",
                prefix_init_name(p.init).into(),
                only_new.clone(),
            );
            differ(
                "prefix_init_text",
                "prefix-init-text",
                p.init_text.clone().unwrap_or_default(),
                only_new,
            );
        }
        (m, _) => out.push(format!(
            "--method {} (recorded: {})",
            m.method().name(),
            init::method_name(cfg)
        )),
    }
    out
}

/// Options the user gave that the checkpoint's run settings contradict.
pub fn settings_conflicts(o: &TrainOptions, lr: f64, s: &RunSettings) -> Vec<String> {
    let mut out = Vec::new();
    let mut differ = |id: &str, flag: &str, given: String, recorded: String| {
        if o.given(id) && given != recorded {
            out.push(format!("--{flag} {given} (recorded: {recorded})"));
        }
    };
    differ("lr", "lr", lr.to_string(), s.lr.to_string());
    differ(
        "weight_decay",
        "weight-decay",
        o.weight_decay.to_string(),
        s.weight_decay.to_string(),
    );
    differ(
        "lr_schedule",
        "lr-schedule",
        schedule_name(o.schedule).into(),
        s.lr_schedule.clone(),
    );
    differ(
        "warmup_steps",
        "warmup-steps",
        o.warmup_steps.to_string(),
        s.warmup_steps.to_string(),
    );
    differ(
        "max_grad_norm",
        "max-grad-norm",
        o.max_grad_norm.to_string(),
        s.max_grad_norm.to_string(),
    );
    differ("seed", "seed", o.seed.to_string(), s.seed.to_string());
    differ(
        "batch_size",
        "batch-size",
        o.batch_size.to_string(),
        s.batch_size.to_string(),
    );
    differ(
        "grad_accum",
        "grad-accum",
        o.grad_accum.to_string(),
        s.grad_accum.to_string(),
    );
    let msl = |x: Option<usize>| x.map_or("auto".to_string(), |v| v.to_string());
    differ(
        "max_seq_len",
        "max-seq-len",
        msl(o.data_opts.max_seq_len),
        msl(s.max_seq_len),
    );
    differ(
        "train_on_prompt",
        "train-on-prompt",
        o.data_opts.train_on_prompt.to_string(),
        s.train_on_prompt.to_string(),
    );
    out
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
