//! Folding a LoRA adapter into its base: W' = W + s·B·A, with s = alpha/r
//! (alpha/√r with rsLoRA), written as a new model.
//!
//! - [`merge_folder`]: a Hugging Face folder. From a safetensors base, every
//!   tensor keeps the base's dtype and shard; unadapted ones are copied byte
//!   for byte. From a GGUF base, the model is imported first (f32 where the
//!   sum needs it).
//! - [`merge_gguf`]: a GGUF from a GGUF base: the base's metadata (tokenizer
//!   and chat template included) and unadapted tensors are copied as they
//!   are; adapted matrices are written as the given type.
//!
//! Neither writes over its inputs.

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::adapters::peft_config::{AdapterConfig, LoraConfig};
use crate::adapters::peft_io::{lora_names, LoadedAdapter};
use crate::error::{Error, Result};
use crate::fsio::write_atomic;
use crate::model::config::{Arch, ModelConfig};
use crate::model::gguf::{GgmlType, Gguf};
use crate::model::gguf_write::{GgufWriter, MetaValue};
use crate::model::import::{convert_gguf, gguf_module_name, permute_qk, write_folder};
use crate::model::names::ModelSpec;
use crate::model::weights::{dtype_to_f32, linked_gguf};

/// One adapted linear layer.
pub struct LoraUpdate {
    /// The module path in the adapter (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// The base weight's name in the checkpoint.
    pub weight: String,
    pub out_f: usize,
    pub in_f: usize,
    /// GPT-2's Conv1D: the checkpoint stores the weight as (in, out).
    pub conv1d: bool,
    /// lora_A (r, in) and lora_B (out, r).
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// The adapter's LoRA config, or the error that prompt and prefix tuning
/// have no weights to merge or export (they add inputs, not weight updates).
pub fn lora_config<'a>(adapter: &'a LoadedAdapter, dir: &Path) -> Result<&'a LoraConfig> {
    match &adapter.config {
        AdapterConfig::Lora(l) => Ok(l),
        other => Err(Error::Adapter {
            path: dir.to_path_buf(),
            message: format!(
                "a {} adapter has no llama.cpp format and cannot be merged (llama.cpp's adapters \
                 are LoRA only, and virtual tokens are not a weight update); \
                 `wgtune generate --adapter {}` runs it",
                crate::adapters::init::method_name(other),
                dir.display()
            ),
        }),
    }
}

/// The factor llama.cpp and PEFT put on B·A: alpha/r, or alpha/√r with
/// rsLoRA.
pub fn lora_scale(l: &LoraConfig) -> f64 {
    if l.use_rslora {
        l.lora_alpha / (l.r as f64).sqrt()
    } else {
        l.lora_alpha / l.r as f64
    }
}

/// Every module the adapter (read from `dir`) adapts, matched to the base's
/// linear layers and checked against their shapes.
pub fn lora_updates(
    adapter: &LoadedAdapter,
    dir: &Path,
    cfg: &ModelConfig,
) -> Result<Vec<LoraUpdate>> {
    let err = |message: String| Error::Adapter {
        path: dir.to_path_buf(),
        message,
    };
    let l = lora_config(adapter, dir)?;
    let spec = ModelSpec::saved(cfg);
    let lins = spec.linears();
    let modules = adapter.lora_modules();
    if modules.is_empty() {
        return Err(err("the adapter has no LoRA tensors".into()));
    }
    let mut out = Vec::with_capacity(modules.len());
    for module in modules {
        let (an, bn) = lora_names(&module);
        let get = |n: &str| {
            adapter
                .tensors
                .get(n)
                .ok_or_else(|| err(format!("tensor `{n}` is missing")))
        };
        let ((sa, a), (sb, b)) = (get(&an)?, get(&bn)?);
        let lin = lins
            .iter()
            .find(|x| x.name == module || x.name.ends_with(&format!(".{module}")))
            .ok_or_else(|| {
                err(format!(
                    "module `{module}` is not a linear layer of this {:?} model",
                    cfg.arch
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
        out.push(LoraUpdate {
            module,
            weight: lin.weight(),
            out_f: lin.out_f,
            in_f: lin.in_f,
            conv1d: lin.conv1d,
            a: a.clone(),
            b: b.clone(),
        });
    }
    Ok(out)
}

impl LoraUpdate {
    pub fn rank(&self) -> usize {
        self.a.len() / self.in_f
    }

    /// scale·B·A as (out, in), row-major, accumulated in f64.
    pub fn delta(&self, scale: f64) -> Vec<f32> {
        let (r, n) = (self.rank(), self.in_f);
        let mut d = vec![0f32; self.out_f * n];
        let mut row = vec![0f64; n];
        for (o, drow) in d.chunks_exact_mut(n).enumerate() {
            row.iter_mut().for_each(|x| *x = 0.0);
            for k in 0..r {
                let bk = self.b[o * r + k] as f64;
                for (x, &a) in row.iter_mut().zip(&self.a[k * n..(k + 1) * n]) {
                    *x += bk * a as f64;
                }
            }
            for (y, x) in drow.iter_mut().zip(&row) {
                *y = (x * scale) as f32;
            }
        }
        d
    }

    /// The delta in the checkpoint's layout (transposed for Conv1D).
    pub fn delta_as_stored(&self, scale: f64) -> Vec<f32> {
        let d = self.delta(scale);
        if !self.conv1d {
            return d;
        }
        let (o, n) = (self.out_f, self.in_f);
        let mut t = vec![0f32; d.len()];
        for i in 0..o {
            for j in 0..n {
                t[j * o + i] = d[i * n + j];
            }
        }
        t
    }
}

/// The heads whose rows llama.cpp permutes in the GGUF of this module's
/// base weight (q/k of llama and mistral, which GGUF stores as `llama`).
pub fn permuted_heads(cfg: &ModelConfig, module: &str) -> Option<usize> {
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

/// Refuse an output that would write over an input: the adapter folder or
/// one of its files, or anything at or inside the base model's paths.
pub fn check_not_input(out: &Path, adapter: &Path, base: &[&Path]) -> Result<()> {
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    // The output may not exist yet: resolve its parent instead.
    let out_c = canon(out).or_else(|| {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
        let parent = match parent {
            Some(p) => canon(p)?,
            None => canon(Path::new("."))?,
        };
        Some(parent.join(out.file_name()?))
    });
    let Some(o) = out_c else { return Ok(()) };
    let adapter_files = [
        adapter.to_path_buf(),
        adapter.join("adapter_config.json"),
        adapter.join("adapter_model.safetensors"),
    ];
    let hit = adapter_files
        .iter()
        .filter_map(|p| Some((canon(p)?, p.clone())))
        .find(|(c, _)| &o == c)
        .map(|(_, p)| p)
        .or_else(|| {
            base.iter()
                .filter_map(|p| Some((canon(p)?, p.to_path_buf())))
                .find(|(c, _)| o.starts_with(c))
                .map(|(_, p)| p)
        });
    match hit {
        None => Ok(()),
        Some(input) => Err(Error::invalid(
            "export",
            format!(
                "--out {} would write over the input {}; an export never overwrites its input, \
                 choose another path",
                out.display(),
                input.display()
            ),
        )),
    }
}

/// What a merge wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    /// Base weights changed.
    pub merged: usize,
    /// Tensors copied unchanged.
    pub copied: usize,
}

/// The base folder's safetensors files, in a stable order.
fn shard_files(base: &Path) -> Result<Vec<String>> {
    if base.join("model.safetensors").exists() {
        return Ok(vec!["model.safetensors".into()]);
    }
    let index = base.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
        path: index.clone(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Weights {
        path: index.clone(),
        message: format!("not valid JSON: {e}"),
    })?;
    let mut files: Vec<String> = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Weights {
            path: index.clone(),
            message: "no `weight_map` object".into(),
        })?
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn from_f32(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        Dtype::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Files of a model folder that travel with a merged copy: config,
/// tokenizer, chat template, generation settings.
fn is_side_file(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !lower.ends_with(".safetensors")
        && (lower.ends_with(".json")
            || lower.ends_with(".jinja")
            || lower.ends_with(".model")
            || lower.ends_with(".txt")
            || lower.ends_with(".tiktoken"))
}

/// Merge `updates` (scaled by `scale`) into the model folder `base`,
/// writing a Hugging Face folder at `out`.
pub fn merge_folder(
    base: &Path,
    updates: &[LoraUpdate],
    scale: f64,
    out: &Path,
) -> Result<MergeReport> {
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let by_weight = |name: &str| updates.iter().find(|u| u.weight == name);
    if let Some(gguf) = linked_gguf(base)? {
        return merge_gguf_folder(&gguf, updates, scale, out);
    }
    let mut report = MergeReport {
        merged: 0,
        copied: 0,
    };
    let mut seen = std::collections::HashSet::new();
    for file in shard_files(base)? {
        let path = base.join(&file);
        let bytes = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Weights {
            path: path.clone(),
            message: format!("not a valid safetensors file ({e}); is it truncated or corrupt?"),
        })?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| Error::Weights {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, view) in st.tensors() {
            let (dtype, shape) = (view.dtype(), view.shape().to_vec());
            let data = match by_weight(&name) {
                None => {
                    report.copied += 1;
                    view.data().to_vec()
                }
                Some(u) => {
                    let mut w = dtype_to_f32(dtype, view.data()).ok_or_else(|| Error::Weights {
                        path: path.clone(),
                        message: format!(
                            "tensor `{name}` is {dtype:?}; a merge needs F32/F16/BF16"
                        ),
                    })?;
                    if w.len() != u.out_f * u.in_f {
                        return Err(Error::Weights {
                            path: path.clone(),
                            message: format!(
                                "tensor `{name}` has shape {shape:?}, not the [{}, {}] the \
                                 config gives",
                                u.out_f, u.in_f
                            ),
                        });
                    }
                    for (x, d) in w.iter_mut().zip(u.delta_as_stored(scale)) {
                        *x += d;
                    }
                    report.merged += 1;
                    seen.insert(name.clone());
                    from_f32(dtype, &w)
                }
            };
            owned.push((name, dtype, shape, data));
        }
        let mut views = Vec::with_capacity(owned.len());
        for (name, dtype, shape, data) in &owned {
            let v =
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).map_err(|e| {
                    Error::Weights {
                        path: out.join(&file),
                        message: format!("tensor `{name}`: {e}"),
                    }
                })?;
            views.push((name.clone(), v));
        }
        let meta = header.metadata().clone().unwrap_or_default();
        let st = crate::fsio::serialize_safetensors(views, meta.into_iter().collect()).map_err(
            |message| Error::Weights {
                path: out.join(&file),
                message,
            },
        )?;
        write_atomic(&out.join(&file), &st)?;
    }
    if let Some(u) = updates.iter().find(|u| !seen.contains(&u.weight)) {
        return Err(Error::Weights {
            path: base.to_path_buf(),
            message: format!("no tensor `{}` for the adapter's `{}`", u.weight, u.module),
        });
    }
    // Side files last, config.json at the very end: a folder with config.json
    // is a complete one.
    let mut side: Vec<PathBuf> = std::fs::read_dir(base)
        .map_err(|source| Error::Io {
            path: base.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| is_side_file(&n.to_string_lossy()))
        })
        .collect();
    side.sort_by_key(|p| p.file_name() == Some("config.json".as_ref()));
    for p in side {
        let bytes = std::fs::read(&p).map_err(|source| Error::Io {
            path: p.clone(),
            source,
        })?;
        let name = p
            .file_name()
            .expect("invariant: read_dir entries have names");
        write_atomic(&out.join(name), &bytes)?;
    }
    Ok(report)
}

/// A GGUF base (seen as a cache folder linking to the file) merged into a
/// Hugging Face folder: imported, summed in f32, written.
fn merge_gguf_folder(
    gguf: &Path,
    updates: &[LoraUpdate],
    scale: f64,
    out: &Path,
) -> Result<MergeReport> {
    let g = Gguf::open(gguf)?;
    let mut m = convert_gguf(&g)?;
    let copied = m.tensors.len() - updates.len();
    for u in updates {
        let (_, w) = m.tensors.get_mut(&u.weight).ok_or_else(|| Error::Weights {
            path: gguf.to_path_buf(),
            message: format!("no tensor for `{}`", u.weight),
        })?;
        for (x, d) in w.iter_mut().zip(u.delta_as_stored(scale)) {
            *x += d;
        }
    }
    write_folder(&m, out)?;
    Ok(MergeReport {
        merged: updates.len(),
        copied,
    })
}

/// Merge `updates` into the GGUF `base` (config `cfg`), the adapted matrices
/// stored as `ty` (F32, F16 or Q8_0; Q8_0 rows that are not whole blocks
/// fall back to F16).
pub fn merge_gguf(
    base: &Gguf,
    cfg: &ModelConfig,
    updates: &[LoraUpdate],
    scale: f64,
    ty: GgmlType,
) -> Result<(GgufWriter, MergeReport)> {
    let mut w = GgufWriter::new();
    for (k, v) in &base.meta {
        // This writer aligns to 32 bytes, which is the default.
        if k != "general.alignment" {
            w.meta(k, MetaValue::Copied(v.clone()));
        }
    }
    let mut targets = std::collections::BTreeMap::new();
    for u in updates {
        let name = gguf_module_name(cfg.arch, &u.module)
            .map(|n| format!("{n}.weight"))
            .ok_or_else(|| Error::Weights {
                path: base.path.clone(),
                message: format!("module `{}` has no llama.cpp tensor", u.module),
            })?;
        targets.insert(name, u);
    }
    let mut report = MergeReport {
        merged: 0,
        copied: 0,
    };
    for t in &base.tensors {
        let shape = t.shape();
        match targets.get(t.name.as_str()) {
            None => {
                w.tensor_raw(&t.name, &shape, t.ty, base.raw(t)?.to_vec())?;
                report.copied += 1;
            }
            Some(u) => {
                if shape != [u.out_f, u.in_f] {
                    return Err(Error::Weights {
                        path: base.path.clone(),
                        message: format!(
                            "tensor `{}` has shape {shape:?}, not the adapter's [{}, {}]",
                            t.name, u.out_f, u.in_f
                        ),
                    });
                }
                let mut x = base.dequantize(t)?;
                let d = u.delta(scale);
                let d = match permuted_heads(cfg, &u.module) {
                    Some(heads) => permute_qk(&d, heads, u.in_f),
                    None => d,
                };
                for (x, d) in x.iter_mut().zip(&d) {
                    *x += d;
                }
                let ty = match ty {
                    GgmlType::Q8_0 if !u.in_f.is_multiple_of(32) => GgmlType::F16,
                    t => t,
                };
                w.tensor(&t.name, &shape, &x, ty)?;
                report.merged += 1;
            }
        }
    }
    if report.merged != targets.len() {
        let missing = targets
            .keys()
            .find(|n| base.tensor(n).is_none())
            .cloned()
            .unwrap_or_default();
        return Err(Error::Weights {
            path: base.path.clone(),
            message: format!("the base has no tensor `{missing}` for the adapter"),
        });
    }
    Ok((w, report))
}
