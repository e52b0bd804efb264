//! `wgtune train` at the command-line edge: the library's options built
//! once from the arguments, the progress bar, and the signal handlers.

use std::sync::Arc;

use super::{LoraInitArg, MethodArg, PrefixInitArg, PromptInitArg, ScheduleArg, TrainArgs};
use crate::adapters::init::LoraInit;
use crate::error::{Error, Result};
use crate::gpu::Context;
use crate::train::options::{
    LoraOptions, MethodOptions, PrefixInitKind, PrefixOptions, PromptInitKind, PromptOptions,
    TrainOptions,
};
use crate::train::progress::{Lines, Progress, StepLog};
use crate::train::run::{train as train_run, Outcome, StopFlag};
use crate::train::trainer::Schedule;

/// SIGINT and SIGTERM ask the run to save and stop; a second one while it
/// saves exits at once (every file write is atomic, so nothing is torn).
#[cfg(not(target_arch = "wasm32"))]
fn install_stop_handlers() -> Arc<StopFlag> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(StopFlag::new(0));
    for sig in [SIGINT, SIGTERM] {
        let s = stop.clone();
        // SAFETY: the handler only does an atomic swap and `_exit`, both
        // async-signal-safe.
        let r = unsafe {
            signal_hook::low_level::register(sig, move || {
                if s.swap(sig, std::sync::atomic::Ordering::SeqCst) != 0 {
                    signal_hook::low_level::exit(128 + sig);
                }
            })
        };
        if let Err(e) = r {
            log::warn!("cannot handle signal {sig}: {e}; stopping will lose unsaved steps");
        }
    }
    stop
}

/// No process signals in a browser.
#[cfg(target_arch = "wasm32")]
fn install_stop_handlers() -> Arc<StopFlag> {
    Arc::new(StopFlag::new(0))
}

impl TrainArgs {
    /// The adapter settings of `--method`.
    fn method_options(&self) -> MethodOptions {
        match self.method {
            MethodArg::Lora => MethodOptions::Lora(LoraOptions {
                r: self.lora_r,
                alpha: self.lora_alpha,
                dropout: self.lora_dropout,
                targets: self
                    .lora_targets
                    .as_deref()
                    .unwrap_or_default()
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
                rslora: self.rslora,
                init: match self.lora_init {
                    LoraInitArg::Kaiming => LoraInit::Kaiming,
                    LoraInitArg::Gaussian => LoraInit::Gaussian,
                },
                num_layers: self.num_layers,
            }),
            MethodArg::Prompt => MethodOptions::Prompt(PromptOptions {
                num_virtual_tokens: self.num_virtual_tokens,
                init: match self.prompt_init {
                    PromptInitArg::Text => PromptInitKind::Text,
                    PromptInitArg::Vocab => PromptInitKind::Vocab,
                    PromptInitArg::Random => PromptInitKind::Random,
                },
                init_text: self.prompt_init_text.clone(),
            }),
            MethodArg::Prefix => MethodOptions::Prefix(PrefixOptions {
                num_virtual_tokens: self.num_virtual_tokens,
                projection: self.prefix_projection,
                encoder_hidden_size: self.encoder_hidden_size,
                init: match self.prefix_init {
                    PrefixInitArg::Text => PrefixInitKind::Text,
                    PrefixInitArg::Zero => PrefixInitKind::Zero,
                    PrefixInitArg::Random => PrefixInitKind::Random,
                },
                init_text: self.prefix_init_text.clone(),
            }),
        }
    }

    /// The library's options, built once from the arguments.
    pub fn options(&self) -> Result<TrainOptions> {
        if self.num_layers.is_some() && self.method != MethodArg::Lora {
            // PEFT has no layer choice for prompt or prefix tuning.
            return Err(Error::invalid(
                "--num-layers",
                "applies to --method lora only (prompt tuning adds tokens at the input; \
                 prefix tuning trains every layer's prefix, as PEFT does)",
            ));
        }
        Ok(TrainOptions {
            method: self.method_options(),
            model: self.model.clone(),
            weights: self.weights.weights,
            data: self.data.clone(),
            val_data: self.val_data.clone(),
            out: self.out.clone(),
            data_opts: self.data_args.options()?,
            epochs: self.epochs,
            steps: self.steps,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            lr: self.lr,
            weight_decay: self.weight_decay,
            schedule: match self.lr_schedule {
                ScheduleArg::Constant => Schedule::Constant,
                ScheduleArg::Linear => Schedule::Linear,
                ScheduleArg::Cosine => Schedule::Cosine,
            },
            warmup_steps: self.warmup_steps,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            log_every: self.log_every,
            eval_every: self.eval_every,
            save_every: self.save_every,
            save_total_limit: self.save_total_limit,
            keep_best: self.keep_best,
            early_stopping_patience: self.early_stopping_patience,
            init_adapter: self.init_adapter.clone(),
            resume: self.resume,
            overwrite: self.overwrite,
            record: Some(super::record::to_json(self)),
            max_bad_steps: self.max_bad_steps,
            grad_checkpoint: self.grad_checkpoint,
            packing: self.packing,
            explicit: self.explicit.clone(),
        })
    }
}

/// The progress bar of `wgtune train` (on stderr, as indicatif draws).
struct Bar(Option<indicatif::ProgressBar>);

impl Progress for Bar {
    fn start(&mut self, start: usize, total: usize) {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_position(start as u64);
        self.0 = Some(b);
    }

    fn step(&mut self, step: usize, _total: usize, log: Option<&StepLog>) {
        if let Some(b) = &self.0 {
            if let Some(l) = log {
                b.set_message(l.short());
            }
            b.set_position(step as u64);
        }
    }

    fn line(&mut self, line: &str) {
        match &self.0 {
            Some(b) => b.println(line),
            None => println!("{line}"),
        }
    }

    fn end(&mut self, completed: bool) {
        if let Some(b) = self.0.take() {
            if completed {
                b.finish();
            } else {
                b.abandon();
            }
        }
    }
}

pub(super) fn train(a: &TrainArgs) -> Result<u8> {
    // A resume takes the options not given from <out>/train_args.json.
    let resumed = if a.resume {
        super::record::resume_args(a)?
    } else {
        None
    };
    let a = resumed.as_ref().unwrap_or(a);
    if a.export.is_some() && a.method != MethodArg::Lora {
        // Refused before training, not after it.
        return Err(Error::invalid(
            "--export",
            "gguf-lora is llama.cpp's LoRA format; a prompt or prefix adapter has none \
             (`wgtune generate --adapter OUT` runs it)",
        ));
    }
    let stop = install_stop_handlers();
    let ctx = Context::new(&a.device.options())?;
    let o = a.options()?;
    let mut bar = Bar(None);
    let mut lines = Lines;
    // A bar redraws one line in place: in a file or a pipe only plain lines survive.
    use std::io::IsTerminal;
    let plain = a.no_progress || !std::io::stderr().is_terminal();
    let inner: &mut dyn Progress = if plain { &mut lines } else { &mut bar };
    let mut progress = SavePipelines {
        inner,
        ctx: &ctx,
        saved: false,
    };
    let outcome = train_run(&ctx, &o, &stop, &mut progress);
    // Validation may have built more since the first step.
    ctx.save_pipeline_cache();
    Ok(match outcome? {
        Outcome::Done { .. } | Outcome::NothingToDo { .. } | Outcome::EarlyStopped { .. } => {
            if a.export.is_some() {
                super::commands::export_as(
                    &a.out,
                    Some(&a.model),
                    super::ExportFormat::GgufLora,
                    &a.out.join("adapter.gguf"),
                    None,
                    true,
                )?;
            }
            0
        }
        Outcome::Interrupted { signal, saved_step } => {
            if saved_step.is_none() {
                println!("interrupted before any step was saved: nothing written");
            }
            (128 + signal).clamp(1, 255) as u8
        }
    })
}

/// Saves the pipeline cache after the first step, when every training
/// pipeline exists, so a run stopped later still leaves it for the next.
struct SavePipelines<'a> {
    inner: &'a mut dyn Progress,
    ctx: &'a Context,
    saved: bool,
}

impl Progress for SavePipelines<'_> {
    fn start(&mut self, start: usize, total: usize) {
        self.inner.start(start, total)
    }

    fn step(&mut self, step: usize, total: usize, log: Option<&StepLog>) {
        self.inner.step(step, total, log);
        if !self.saved {
            self.saved = true;
            self.ctx.save_pipeline_cache();
        }
    }

    fn line(&mut self, line: &str) {
        self.inner.line(line)
    }

    fn end(&mut self, completed: bool) {
        self.inner.end(completed)
    }
}
