//! Writing GGUF (version 3), the format llama.cpp reads: metadata
//! key/values, then tensor infos, then the 32-byte-aligned tensor data.
//! Shapes here are row-major (outermost first), as in the Hugging Face
//! checkpoint; GGUF stores them innermost first (`ne`).

use std::path::Path;

use crate::error::{Error, Result};
use crate::fsio::write_atomic;
use crate::model::gguf::{GgmlType, Value};

const ALIGNMENT: usize = 32;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
    F32Array(Vec<f32>),
    /// A value read from another GGUF, written back as it was typed.
    Copied(Value),
}

/// A GGUF file being assembled in memory.
#[derive(Default)]
pub struct GgufWriter {
    meta: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<usize>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Add (or replace) a metadata key.
    pub fn meta(&mut self, key: &str, value: MetaValue) {
        self.meta.retain(|(k, _)| k != key);
        self.meta.push((key.to_string(), value));
    }

    /// Add a tensor of row-major `shape` from f32 `data`, stored as `ty`
    /// (F32, F16 or Q8_0; Q8_0 needs rows that are whole 32-value blocks).
    pub fn tensor(
        &mut self,
        name: &str,
        shape: &[usize],
        data: &[f32],
        ty: GgmlType,
    ) -> Result<()> {
        let n: usize = shape.iter().product();
        let bad = |m: String| Error::invalid("gguf write", format!("tensor `{name}`: {m}"));
        if n != data.len() || shape.is_empty() {
            return Err(bad(format!("{} values for shape {shape:?}", data.len())));
        }
        let bytes = match ty {
            GgmlType::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            GgmlType::F16 => data
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            GgmlType::Q8_0 => {
                let cols = shape[shape.len() - 1];
                if !cols.is_multiple_of(32) {
                    return Err(bad(format!(
                        "Q8_0 needs rows of whole 32-value blocks, these have {cols}"
                    )));
                }
                quantize_q8_0(data)
            }
            other => return Err(bad(format!("{} is not written", other.name()))),
        };
        self.tensor_raw(name, shape, ty, bytes)
    }

    /// Add a tensor from bytes already encoded as `ty` (a copy from
    /// another GGUF).
    pub fn tensor_raw(
        &mut self,
        name: &str,
        shape: &[usize],
        ty: GgmlType,
        bytes: Vec<u8>,
    ) -> Result<()> {
        let bad = |m: String| Error::invalid("gguf write", format!("tensor `{name}`: {m}"));
        let n: usize = shape.iter().product();
        match ty.block() {
            Some((per, size)) if n.is_multiple_of(per) && n / per * size == bytes.len() => {}
            _ => {
                return Err(bad(format!(
                    "{} bytes do not hold {shape:?} as {}",
                    bytes.len(),
                    ty.name()
                )))
            }
        }
        if self.tensors.iter().any(|t| t.0 == name) {
            return Err(bad("written twice".into()));
        }
        self.tensors
            .push((name.to_string(), shape.to_vec(), ty, bytes));
        Ok(())
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.meta.len() as u64).to_le_bytes());
        for (k, v) in &self.meta {
            put_str(&mut out, k);
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for (name, shape, ty, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&ty.number().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + bytes.len()).next_multiple_of(ALIGNMENT);
        }
        out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        for (_, _, _, bytes) in &self.tensors {
            out.extend_from_slice(bytes);
            out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        }
        out
    }

    /// Write the file (temp file, then rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_bytes())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

// GGUF value type numbers.
const T_I32: u32 = 5;
const T_U32: u32 = 4;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARRAY: u32 = 9;

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    let array = |out: &mut Vec<u8>, ty: u32, n: usize| {
        out.extend_from_slice(&T_ARRAY.to_le_bytes());
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
    };
    match v {
        MetaValue::U32(x) => {
            out.extend_from_slice(&T_U32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        MetaValue::F32(x) => {
            out.extend_from_slice(&T_F32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        MetaValue::Bool(x) => {
            out.extend_from_slice(&T_BOOL.to_le_bytes());
            out.push(*x as u8);
        }
        MetaValue::Str(s) => {
            out.extend_from_slice(&T_STR.to_le_bytes());
            put_str(out, s);
        }
        MetaValue::StrArray(a) => {
            array(out, T_STR, a.len());
            for s in a {
                put_str(out, s);
            }
        }
        MetaValue::I32Array(a) => {
            array(out, T_I32, a.len());
            for x in a {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        MetaValue::F32Array(a) => {
            array(out, T_F32, a.len());
            for x in a {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        MetaValue::Copied(v) => {
            out.extend_from_slice(&value_type(v).to_le_bytes());
            put_copied(out, v);
        }
    }
}

/// The GGUF type number of a value read from a file.
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => T_U32,
        Value::I32(_) => T_I32,
        Value::F32(_) => T_F32,
        Value::Bool(_) => T_BOOL,
        Value::Str(_) => T_STR,
        Value::Array(_) => T_ARRAY,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// A copied value's payload (its type number already written).
fn put_copied(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::Str(s) => put_str(out, s),
        Value::Array(a) => {
            // An empty array's element type is lost on reading; any will do.
            let ty = a.first().map_or(T_U32, value_type);
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                put_copied(out, x);
            }
        }
    }
}

/// ggml's `quantize_row_q8_0_ref`: per 32 values, d = max|x| / 127 (stored
/// f16) and q = round(x / d).
fn quantize_q8_0(data: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 32 * 34);
    for block in data.chunks(32) {
        let amax = block.iter().fold(0f32, |a, x| a.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|x| (x * id).round() as i8 as u8));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::Gguf;

    #[test]
    fn written_files_read_back() {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", MetaValue::Str("llama".into()));
        w.meta("adapter.lora.alpha", MetaValue::F32(16.0));
        w.meta(
            "t.names",
            MetaValue::StrArray(vec!["a".into(), "bc".into()]),
        );
        let a: Vec<f32> = (0..3 * 64).map(|i| (i as f32 - 90.0) / 37.0).collect();
        w.tensor("x.lora_a", &[3, 64], &a, GgmlType::F32).unwrap();
        w.tensor("x.lora_b", &[3, 64], &a, GgmlType::F16).unwrap();
        w.tensor("x.q8", &[3, 64], &a, GgmlType::Q8_0).unwrap();
        assert!(w
            .tensor("x.bad", &[3, 7], &a[..21], GgmlType::Q8_0)
            .is_err());
        let g = Gguf::from_bytes(Path::new("mem.gguf"), w.to_bytes()).unwrap();
        assert_eq!(g.architecture().unwrap(), "llama");
        assert_eq!(
            g.get("adapter.lora.alpha").and_then(|v| v.as_f64()),
            Some(16.0)
        );
        let t = g.tensor("x.lora_a").unwrap();
        assert_eq!(t.shape(), vec![3, 64]);
        assert_eq!(g.dequantize(t).unwrap(), a);
        let h = g.dequantize(g.tensor("x.lora_b").unwrap()).unwrap();
        let q = g.dequantize(g.tensor("x.q8").unwrap()).unwrap();
        for i in 0..a.len() {
            assert!((h[i] - a[i]).abs() <= 2e-3 * a[i].abs().max(1e-3), "{i}");
            // Within one quantization step of its block (half a step, plus
            // the f16 rounding of the scale).
            let block = &a[i / 32 * 32..][..32];
            let step = block.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            assert!((q[i] - a[i]).abs() <= step, "{i}: {} vs {}", q[i], a[i]);
        }
    }
}
