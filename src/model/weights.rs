//! Weights from safetensors buffers: owned bytes (`from_bytes`, a reader),
//! or the files of a Hugging Face folder (`model.safetensors`, or shards
//! listed in `model.safetensors.index.json`), memory-mapped; or a GGUF file,
//! memory-mapped, under the tensors' Hugging Face names. Every fetch checks
//! the tensor's shape. Small tensors are fetched as f32 (`get_f32`), matrices
//! in their stored encoding (`matrix`). Errors name the file (or the
//! buffer's label) and the tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use std::borrow::Cow;

use crate::error::{Error, Result};
use crate::fsio::Bytes;
use crate::model::compact::StoredMatrix;
use crate::model::gguf::{GgmlType, Gguf};
use crate::model::import::{
    convert_tensor, gguf_meta, is_conv1d, permuted_heads, unpermute_qk, GgufMeta,
};

/// A set of safetensors buffers, each labelled by its file (or a name given
/// with the bytes), and which tensor lives where; or one GGUF file.
pub struct Weights {
    files: Vec<(PathBuf, Bytes)>,
    /// tensor name -> index into `files`
    owner: HashMap<String, usize>,
    gguf: Option<(Gguf, GgufMeta)>,
}

/// The file in a model folder that points at a GGUF whose weights the
/// folder uses (written by `--model file.gguf`, instead of a converted copy).
pub const GGUF_LINK: &str = "weights.gguf.json";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        message: format!("not a valid safetensors file ({e}); is it truncated or corrupt?"),
    }
}

/// The GGUF file a cache folder of `wgtune --model file.gguf` links to, if
/// `dir` is such a folder.
pub fn linked_gguf(dir: &Path) -> Result<Option<PathBuf>> {
    let link = dir.join(GGUF_LINK);
    if !link.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&link).map_err(io(&link))?;
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("gguf")?.as_str().map(PathBuf::from))
        .map(Some)
        .ok_or_else(|| Error::Weights {
            path: link.clone(),
            message: "expected {\"gguf\": \"<path of the .gguf file>\"}".into(),
        })
}

impl Weights {
    /// Open the weights of a model folder.
    pub fn open(dir: &Path) -> Result<Weights> {
        if let Some(target) = linked_gguf(dir)? {
            return Self::from_gguf(Gguf::open(&target)?);
        }
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let shards: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io(&index))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Weights {
                path: index.clone(),
                message: format!("not valid JSON: {e}"),
            })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Weights {
                    path: index.clone(),
                    message: "no `weight_map` object".into(),
                })?;
            let mut files: Vec<PathBuf> = Vec::new();
            for f in map.values() {
                let f = f.as_str().ok_or_else(|| Error::Weights {
                    path: index.clone(),
                    message: "weight_map values must be file names".into(),
                })?;
                let p = dir.join(f);
                if !files.contains(&p) {
                    if !p.exists() {
                        return Err(Error::Weights {
                            path: index.clone(),
                            message: format!("names shard `{f}`, which does not exist"),
                        });
                    }
                    files.push(p);
                }
            }
            files
        } else {
            return Err(Error::Weights {
                path: dir.to_path_buf(),
                message: "no model.safetensors or model.safetensors.index.json in this folder"
                    .into(),
            });
        };
        Self::from_files(&shards)
    }

    /// Map the given safetensors files.
    pub fn from_files(paths: &[PathBuf]) -> Result<Weights> {
        let mut w = Weights::empty();
        for path in paths {
            let file = std::fs::File::open(path).map_err(io(path))?;
            // SAFETY: the mapping is read-only; a file changed underneath
            // while mapped is the caller's problem, as with any mmap reader.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(path))?;
            w.add(path.clone(), Bytes::Mapped(map))?;
        }
        Ok(w)
    }

    /// Weights from in-memory safetensors buffers, each `(label, bytes)`;
    /// errors name a buffer by its label.
    pub fn from_bytes(buffers: Vec<(String, Vec<u8>)>) -> Result<Weights> {
        let mut w = Weights::empty();
        for (label, bytes) in buffers {
            w.add(PathBuf::from(label), Bytes::Owned(bytes))?;
        }
        Ok(w)
    }

    /// Weights from one safetensors stream, read to its end.
    pub fn from_reader(label: &str, mut reader: impl std::io::Read) -> Result<Weights> {
        let mut bytes = Vec::new();
        reader
            .read_to_end(&mut bytes)
            .map_err(io(Path::new(label)))?;
        Self::from_bytes(vec![(label.to_string(), bytes)])
    }

    /// The tensors of a GGUF under their Hugging Face names.
    pub fn from_gguf(g: Gguf) -> Result<Weights> {
        let meta = gguf_meta(&g)?;
        Ok(Weights {
            gguf: Some((g, meta)),
            ..Weights::empty()
        })
    }

    fn empty() -> Weights {
        Weights {
            files: Vec::new(),
            owner: HashMap::new(),
            gguf: None,
        }
    }

    /// Check a buffer's header and note which tensors live in it.
    fn add(&mut self, label: PathBuf, bytes: Bytes) -> Result<()> {
        let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(&label, e))?;
        for name in st.names() {
            self.owner.insert(name.to_string(), self.files.len());
        }
        self.files.push((label, bytes));
        Ok(())
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        if let Some((_, m)) = &self.gguf {
            return m.names.keys().map(|s| s.as_str()).collect();
        }
        let mut v: Vec<&str> = self.owner.keys().map(|s| s.as_str()).collect();
        v.sort_unstable();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.gguf {
            Some((_, m)) => m.names.contains_key(name),
            None => self.owner.contains_key(name),
        }
    }

    /// The GGUF tensor under HF name `name`.
    fn gguf_tensor<'a>(
        g: &'a Gguf,
        m: &GgufMeta,
        name: &str,
    ) -> Result<&'a crate::model::gguf::TensorInfo> {
        let i = m.names.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            file: g.path.display().to_string(),
        })?;
        Ok(&g.tensors[*i])
    }

    fn shape_error(path: &Path, name: &str, expected: &[usize], got: Vec<usize>) -> Error {
        Error::Shape {
            op: format!("loading {}", path.display()),
            tensor: name.to_string(),
            expected: format!("{expected:?} for this config"),
            got,
        }
    }

    /// Matrix `name` as `rows` x `cols` (out, in) in its stored encoding. A
    /// GPT-2 `Conv1D` weight (`conv1d`, stored [in, out] by transformers) is
    /// transposed; llama.cpp's q/k row permutation is undone.
    pub fn matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        conv1d: bool,
    ) -> Result<StoredMatrix<'_>> {
        if let Some((g, m)) = &self.gguf {
            let t = Self::gguf_tensor(g, m, name)?;
            // GGUF keeps Conv1D weights as [out, in] already.
            if t.shape() != [rows, cols] {
                let hf = if is_conv1d(m.arch, name) {
                    vec![cols, rows]
                } else {
                    vec![rows, cols]
                };
                let got = if is_conv1d(m.arch, name) {
                    t.shape().into_iter().rev().collect()
                } else {
                    t.shape()
                };
                return Err(Self::shape_error(&g.path, name, &hf, got));
            }
            let raw = g.raw(t)?;
            let mut sm = StoredMatrix {
                name: name.to_string(),
                ty: t.ty,
                data: Cow::Borrowed(raw),
                rows,
                cols,
            };
            if let Some(h) = permuted_heads(m.arch, &m.model, name) {
                sm.data = Cow::Owned(unpermute_qk(raw, h, sm.row_bytes()));
            }
            return Ok(sm);
        }
        let (path, view) = self.view(name)?;
        let expected = if conv1d { [cols, rows] } else { [rows, cols] };
        if view.shape() != expected {
            return Err(Self::shape_error(
                path,
                name,
                &expected,
                view.shape().to_vec(),
            ));
        }
        let ty = match view.dtype() {
            Dtype::F32 => GgmlType::F32,
            Dtype::F16 => GgmlType::F16,
            Dtype::BF16 => GgmlType::BF16,
            other => {
                return Err(Error::Weights {
                    path: path.to_path_buf(),
                    message: format!(
                        "tensor `{name}` has dtype {other:?}; supported: F32, F16, BF16"
                    ),
                })
            }
        };
        let data = view.data();
        let data = if conv1d {
            let eb = data.len() / (rows * cols).max(1);
            let mut t = vec![0u8; data.len()];
            for i in 0..cols {
                for o in 0..rows {
                    let (src, dst) = ((i * rows + o) * eb, (o * cols + i) * eb);
                    t[dst..dst + eb].copy_from_slice(&data[src..src + eb]);
                }
            }
            Cow::Owned(t)
        } else {
            Cow::Borrowed(data)
        };
        let sm = StoredMatrix {
            name: name.to_string(),
            ty,
            data,
            rows,
            cols,
        };
        sm.check()?;
        Ok(sm)
    }

    fn view(&self, name: &str) -> Result<(&Path, safetensors::tensor::TensorView<'_>)> {
        let i = *self.owner.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            file: self
                .files
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        let (path, map) = &self.files[i];
        let st = SafeTensors::deserialize(map).map_err(|e| corrupt(path, e))?;
        let view = st.tensor(name).map_err(|e| corrupt(path, e))?;
        Ok((path, view))
    }

    /// How a tensor is stored.
    /// How tensor `name` is stored (safetensors F32/F16/BF16, or a GGUF type;
    /// other safetensors dtypes read as `Other`).
    pub fn stored_type(&self, name: &str) -> Result<GgmlType> {
        if let Some((g, m)) = &self.gguf {
            return Ok(Self::gguf_tensor(g, m, name)?.ty);
        }
        Ok(match self.view(name)?.1.dtype() {
            Dtype::F32 => GgmlType::F32,
            Dtype::F16 => GgmlType::F16,
            Dtype::BF16 => GgmlType::BF16,
            _ => GgmlType::Other(u32::MAX),
        })
    }

    /// Whether the tensors come from a GGUF file.
    pub fn is_gguf(&self) -> bool {
        self.gguf.is_some()
    }

    /// Shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        if let Some((g, m)) = &self.gguf {
            let s = Self::gguf_tensor(g, m, name)?.shape();
            return Ok(if is_conv1d(m.arch, name) {
                s.into_iter().rev().collect()
            } else {
                s
            });
        }
        Ok(self.view(name)?.1.shape().to_vec())
    }

    /// A tensor as f32, checked against `expected` (its shape for this config).
    pub fn get_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        if let Some((g, m)) = &self.gguf {
            let t = Self::gguf_tensor(g, m, name)?;
            let (shape, data) = convert_tensor(g, m.arch, &m.model, t, name)?;
            if shape != expected {
                return Err(Self::shape_error(&g.path, name, expected, shape));
            }
            return Ok(data);
        }
        let (path, view) = self.view(name)?;
        if view.shape() != expected {
            return Err(Error::Shape {
                op: format!("loading {}", path.display()),
                tensor: name.to_string(),
                expected: format!("{expected:?} for this config"),
                got: view.shape().to_vec(),
            });
        }
        if let Some(v) = dtype_to_f32(view.dtype(), view.data()) {
            return Ok(v);
        }
        Err(Error::Weights {
            path: path.to_path_buf(),
            message: format!(
                "tensor `{name}` has dtype {:?}; supported: F32, F16, BF16",
                view.dtype()
            ),
        })
    }
}

/// Hugging Face tensor names and shapes of a checkpoint for `cfg`, as
/// transformers saves it (the table in `names.rs`).
pub fn checkpoint_specs(cfg: &crate::model::ModelConfig) -> Vec<(String, Vec<usize>)> {
    crate::model::names::ModelSpec::saved(cfg).tensors()
}

/// Safetensors F32/F16/BF16 bytes as f32; `None` for other dtypes.
pub fn dtype_to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}
