//! A PEFT LoRA adapter as llama.cpp's GGUF LoRA (what its
//! `convert_lora_to_gguf.py` writes and `llama-adapter.cpp` reads), for
//! llama.cpp, Ollama and LM Studio next to the GGUF base:
//!
//! - metadata `general.type = "adapter"`, `general.architecture` (the
//!   base's), `adapter.type = "lora"`, `adapter.lora.alpha` (f32);
//! - per adapted module, `<gguf tensor>.weight.lora_a` (r, in) and
//!   `.lora_b` (out, r), e.g. `blk.0.attn_q.weight.lora_a`;
//! - lora_b's rows of q/k permuted as llama.cpp permutes the base's (llama,
//!   mistral), so B·A lands on the same rows;
//! - rsLoRA's alpha/√r scale baked into alpha (llama.cpp scales by alpha/r).

use std::path::Path;

use crate::adapters::merge::{lora_config, lora_updates, permuted_heads};
use crate::adapters::peft_io::LoadedAdapter;
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::gguf::GgmlType;
use crate::model::gguf_write::{GgufWriter, MetaValue};
use crate::model::import::{gguf_arch_name, gguf_module_name, permute_qk};

/// What an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraExport {
    /// `general.architecture`.
    pub arch: &'static str,
    /// Adapted modules (two tensors each).
    pub modules: usize,
    /// `adapter.lora.alpha` (rsLoRA folded in).
    pub alpha: f32,
    pub rank: usize,
}

/// The GGUF LoRA of `adapter` (read from `dir`) for a base of config `cfg`,
/// tensors stored as `ty` (F32, F16 or Q8_0).
pub fn gguf_lora(
    adapter: &LoadedAdapter,
    dir: &Path,
    cfg: &ModelConfig,
    ty: GgmlType,
) -> Result<(GgufWriter, LoraExport)> {
    let l = lora_config(adapter, dir)?;
    // llama.cpp scales by alpha/r: fold rsLoRA's alpha/sqrt(r) into alpha.
    let alpha = if l.use_rslora {
        l.lora_alpha * (l.r as f64).sqrt()
    } else {
        l.lora_alpha
    } as f32;
    let updates = lora_updates(adapter, dir, cfg)?;
    let mut w = GgufWriter::new();
    let arch = gguf_arch_name(cfg.arch);
    w.meta("general.architecture", MetaValue::Str(arch.into()));
    w.meta("general.type", MetaValue::Str("adapter".into()));
    let name = dir
        .file_name()
        .map_or("adapter".into(), |n| n.to_string_lossy().to_string());
    w.meta("general.name", MetaValue::Str(name));
    w.meta("adapter.type", MetaValue::Str("lora".into()));
    w.meta("adapter.lora.alpha", MetaValue::F32(alpha));
    for u in &updates {
        let gguf = gguf_module_name(cfg.arch, &u.module).ok_or_else(|| Error::Adapter {
            path: dir.to_path_buf(),
            message: format!(
                "module `{}` has no llama.cpp tensor in a {arch} model",
                u.module
            ),
        })?;
        let r = u.rank();
        let b = match permuted_heads(cfg, &u.module) {
            Some(heads) => permute_qk(&u.b, heads, r),
            None => u.b.clone(),
        };
        // Q8_0 blocks run along rows; a row of r values (lora_b) is stored
        // as F16 instead, as llama.cpp's converter falls back.
        let fit = |cols: usize| match ty {
            GgmlType::Q8_0 if !cols.is_multiple_of(32) => GgmlType::F16,
            t => t,
        };
        w.tensor(
            &format!("{gguf}.weight.lora_a"),
            &[r, u.in_f],
            &u.a,
            fit(u.in_f),
        )?;
        w.tensor(&format!("{gguf}.weight.lora_b"), &[u.out_f, r], &b, fit(r))?;
    }
    Ok((
        w,
        LoraExport {
            arch,
            modules: updates.len(),
            alpha,
            rank: l.r,
        },
    ))
}
