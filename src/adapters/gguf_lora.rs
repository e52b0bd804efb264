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

use crate::adapters::peft_config::{AdapterConfig, LoraConfig};
use crate::adapters::peft_io::{lora_names, LoadedAdapter};
use crate::error::{Error, Result};
use crate::model::config::{Arch, ModelConfig};
use crate::model::gguf::GgmlType;
use crate::model::gguf_write::{GgufWriter, MetaValue};
use crate::model::import::{gguf_arch_name, gguf_module_name, permute_qk};
use crate::model::names::ModelSpec;

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

/// The adapter's LoRA config, or the error that prompt and prefix tuning
/// have no llama.cpp format.
pub fn lora_config<'a>(adapter: &'a LoadedAdapter, dir: &Path) -> Result<&'a LoraConfig> {
    match &adapter.config {
        AdapterConfig::Lora(l) => Ok(l),
        other => Err(Error::Adapter {
            path: dir.to_path_buf(),
            message: format!(
                "a {} adapter has no llama.cpp format (llama.cpp's adapters are LoRA only); \
                 `wgtune generate --adapter {}` runs it",
                crate::adapters::init::method_name(other),
                dir.display()
            ),
        }),
    }
}

/// The GGUF LoRA of `adapter` (read from `dir`) for a base of config `cfg`,
/// tensors stored as `ty` (F32, F16 or Q8_0).
pub fn gguf_lora(
    adapter: &LoadedAdapter,
    dir: &Path,
    cfg: &ModelConfig,
    ty: GgmlType,
) -> Result<(GgufWriter, LoraExport)> {
    let err = |message: String| Error::Adapter {
        path: dir.to_path_buf(),
        message,
    };
    let l = lora_config(adapter, dir)?;
    let alpha = if l.use_rslora {
        l.lora_alpha * (l.r as f64).sqrt()
    } else {
        l.lora_alpha
    } as f32;
    let spec = ModelSpec::saved(cfg);
    let lins = spec.linears();
    let modules = adapter.lora_modules();
    if modules.is_empty() {
        return Err(err("the adapter has no LoRA tensors".into()));
    }
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
    for module in &modules {
        let gguf = gguf_module_name(cfg.arch, module).ok_or_else(|| {
            err(format!(
                "module `{module}` has no llama.cpp tensor in a {arch} model"
            ))
        })?;
        let (an, bn) = lora_names(module);
        let get = |n: &str| {
            adapter
                .tensors
                .get(n)
                .ok_or_else(|| err(format!("tensor `{n}` is missing")))
        };
        let ((sa, a), (sb, b)) = (get(&an)?, get(&bn)?);
        // The base layer this module adapts, to check the shapes against.
        let lin = lins
            .iter()
            .find(|x| x.name == *module || x.name.ends_with(&format!(".{module}")))
            .ok_or_else(|| {
                err(format!(
                    "module `{module}` is not a linear layer of this model"
                ))
            })?;
        let r = l.r;
        if sa != &[r, lin.in_f] || sb != &[lin.out_f, r] {
            return Err(err(format!(
                "`{module}`: lora_A {sa:?} and lora_B {sb:?} do not fit a rank-{r} update of a \
                 [{}, {}] layer",
                lin.out_f, lin.in_f
            )));
        }
        let b = match permuted_heads(cfg, module) {
            Some(heads) => permute_qk(b, heads, r),
            None => b.clone(),
        };
        // Q8_0 blocks run along rows; a row of r values (lora_b) is stored
        // as F16 instead, as llama.cpp's converter falls back.
        let fit = |cols: usize| match ty {
            GgmlType::Q8_0 if !cols.is_multiple_of(32) => GgmlType::F16,
            t => t,
        };
        w.tensor(&format!("{gguf}.weight.lora_a"), sa, a, fit(lin.in_f))?;
        w.tensor(&format!("{gguf}.weight.lora_b"), sb, &b, fit(r))?;
    }
    Ok((
        w,
        LoraExport {
            arch,
            modules: modules.len(),
            alpha,
            rank: l.r,
        },
    ))
}

/// The heads whose rows llama.cpp permutes in the GGUF of this module's
/// base weight (q/k of llama and mistral, which GGUF stores as `llama`).
fn permuted_heads(cfg: &ModelConfig, module: &str) -> Option<usize> {
    if !matches!(cfg.arch, Arch::Llama | Arch::Mistral) {
        return None;
    }
    if module.ends_with("q_proj") {
        Some(cfg.heads)
    } else if module.ends_with("k_proj") {
        Some(cfg.kv_heads)
    } else {
        None
    }
}
