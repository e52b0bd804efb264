//! GGUF files (llama.cpp's format, versions 2 and 3): metadata, tensor
//! infos, and dequantization of the common types to f32. The file is
//! memory-mapped; every offset and size is checked against its length, so a
//! truncated or corrupt file is an error naming the file, never a panic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fsio::Bytes;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type as u64 (negative values are rejected).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    /// Any integer type as i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    /// Any number as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types. Only those listed in `SUPPORTED_TYPES` dequantize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    /// A type wgtune does not read; the number is ggml's.
    Other(u32),
}

/// For error messages.
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K";

/// ggml's names for type numbers, so an unsupported type is named in errors.
fn ggml_type_name(n: u32) -> &'static str {
    match n {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

impl GgmlType {
    fn from_u32(n: u32) -> GgmlType {
        match n {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            30 => GgmlType::BF16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            n => GgmlType::Other(n),
        }
    }

    /// ggml's number of the type.
    pub fn number(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::BF16 => 30,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Other(n) => n,
        }
    }

    /// ggml's name of the type.
    pub fn name(self) -> String {
        match self {
            GgmlType::F32 => "F32".into(),
            GgmlType::F16 => "F16".into(),
            GgmlType::BF16 => "BF16".into(),
            GgmlType::Q4_0 => "Q4_0".into(),
            GgmlType::Q4_1 => "Q4_1".into(),
            GgmlType::Q5_0 => "Q5_0".into(),
            GgmlType::Q5_1 => "Q5_1".into(),
            GgmlType::Q8_0 => "Q8_0".into(),
            GgmlType::Q4K => "Q4_K".into(),
            GgmlType::Q5K => "Q5_K".into(),
            GgmlType::Q6K => "Q6_K".into(),
            GgmlType::Other(n) => format!("{} (ggml type {n})", ggml_type_name(n)),
        }
    }

    /// (elements per block, bytes per block), None for unsupported types.
    pub fn block(self) -> Option<(usize, usize)> {
        Some(match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
            GgmlType::Other(_) => return None,
        })
    }
}

/// One tensor's entry in the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (row) length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// The shape in PyTorch order (outermost first), as Hugging Face has it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file.
pub struct Gguf {
    /// Where it came from (messages name it).
    pub path: PathBuf,
    pub version: u32,
    pub meta: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    map: Bytes,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &str) -> Error {
        Error::Weights {
            path: self.path.to_path_buf(),
            message: format!(
                "not a valid GGUF file: {what} at byte {} of {}; is it truncated or corrupt?",
                self.pos,
                self.buf.len()
            ),
        }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(self.err(&format!("{what} runs past the end")));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1, "u8")?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2, "u16")?;
        Ok(u16::from_le_bytes(
            b.try_into()
                .expect("invariant: take(2) returns exactly 2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4, "u32")?;
        Ok(u32::from_le_bytes(
            b.try_into()
                .expect("invariant: take(4) returns exactly 4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8, "u64")?;
        Ok(u64::from_le_bytes(
            b.try_into()
                .expect("invariant: take(8) returns exactly 8 bytes"),
        ))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > (self.buf.len() - self.pos) as u64 {
            return Err(self.err(&format!("a string of {n} bytes runs past the end")));
        }
        let b = self.take(n as usize, "string")?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("a string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(self.u16()?),
            3 => Value::I16(self.u16()? as i16),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.err("arrays nested too deep"));
                }
                let ety = self.u32()?;
                let n = self.u64()?;
                // Every element takes at least one byte: bounds the allocation.
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(self.err(&format!("an array of {n} elements runs past the end")));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            t => return Err(self.err(&format!("unknown metadata value type {t}"))),
        })
    }
}

impl Gguf {
    /// Open and parse the header, metadata and tensor infos: a thin layer
    /// that maps the file and hands it to the parser.
    pub fn open(path: &Path) -> Result<Gguf> {
        let file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: read-only mapping; see Weights::from_files.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, Bytes::Mapped(map))
    }

    /// Parse a GGUF file held in memory; `name` is what messages call it.
    pub fn from_bytes(name: &Path, bytes: Vec<u8>) -> Result<Gguf> {
        Self::parse(name, Bytes::Owned(bytes))
    }

    fn parse(path: &Path, map: Bytes) -> Result<Gguf> {
        let mut r = Reader {
            buf: &map,
            pos: 0,
            path,
        };
        if r.take(4, "magic").ok() != Some(b"GGUF".as_slice()) {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                message: "not a GGUF file (no `GGUF` magic at the start)".into(),
            });
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                message: format!("GGUF version {version} is not supported (only 2 and 3)"),
            });
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        if n_tensors > map.len() as u64 || n_kv > map.len() as u64 {
            return Err(r.err("tensor or metadata count larger than the file"));
        }
        let mut meta = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            meta.insert(key, v);
        }
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()?;
            if nd == 0 || nd > 4 {
                return Err(r.err(&format!("tensor `{name}` has {nd} dimensions")));
            }
            let mut dims = Vec::new();
            for _ in 0..nd {
                dims.push(r.u64()?);
            }
            let ty = GgmlType::from_u32(r.u32()?);
            let offset = r.u64()?;
            infos.push((name, dims, ty, offset));
        }
        let align = match meta.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => return Err(r.err("general.alignment is not a power of two")),
            },
        };
        let data_start = (r.pos as u64).div_ceil(align) * align;
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, ty, rel) in infos {
            let n: Option<u64> = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let offset = data_start.checked_add(rel);
            let t = TensorInfo {
                name,
                dims,
                ty,
                offset: offset.unwrap_or(u64::MAX),
            };
            if let (Some(n), Some((per, bytes))) = (n, ty.block()) {
                if !t.dims[0].is_multiple_of(per as u64) {
                    return Err(Error::Weights {
                        path: path.to_path_buf(),
                        message: format!(
                            "tensor `{}` ({}) has rows of {} elements, not a multiple of the block size {per}",
                            t.name,
                            ty.name(),
                            t.dims[0]
                        ),
                    });
                }
                let size = n / per as u64 * bytes as u64;
                if t.offset
                    .checked_add(size)
                    .is_none_or(|e| e > map.len() as u64)
                {
                    return Err(Error::Weights {
                        path: path.to_path_buf(),
                        message: format!(
                            "tensor `{}` ({} bytes at {}) runs past the end of the file ({} bytes); is it truncated?",
                            t.name,
                            size,
                            t.offset,
                            map.len()
                        ),
                    });
                }
            } else if n.is_none() {
                return Err(r.err(&format!("tensor `{}` has an absurd size", t.name)));
            }
            tensors.push(t);
        }
        Ok(Gguf {
            path: path.to_path_buf(),
            version,
            meta,
            tensors,
            map,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::Config {
                path: self.path.clone(),
                message: "GGUF metadata has no `general.architecture`".into(),
            })
    }

    /// A tensor's bytes as stored (bounds were checked by `open`).
    pub fn raw(&self, t: &TensorInfo) -> Result<&[u8]> {
        let (per, bytes) = t.ty.block().ok_or_else(|| self.unsupported(t))?;
        let start = t.offset as usize;
        Ok(&self.map[start..start + t.n_elements() as usize / per * bytes])
    }

    fn unsupported(&self, t: &TensorInfo) -> Error {
        Error::Weights {
            path: self.path.clone(),
            message: format!(
                "tensor `{}` is of type {}, which wgtune cannot read; supported: {SUPPORTED_TYPES}",
                t.name,
                t.ty.name()
            ),
        }
    }

    /// A tensor dequantized to f32, in file order (row-major over the
    /// PyTorch shape `t.shape()`).
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let data = self.raw(t)?;
        let mut out = vec![0f32; t.n_elements() as usize];
        dequantize_into(t.ty, data, &mut out);
        Ok(out)
    }
}

fn f16(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantize whole blocks of `ty` from `data` into `out`. `out.len()` must
/// be the number of elements `data` holds.
///
/// # Panics
///
/// If `ty` is not a supported type (`ty.block()` is `None`). A file's
/// tensors reach this only through [`Gguf::dequantize`], whose
/// [`Gguf::raw`] turns an unsupported type into an error first.
/// The 5-bit values of a Q5_0/Q5_1 block: elements 0..16 and 16..32.
fn q5_pair(qh: &[u8], qs: &[u8]) -> [[u8; 16]; 2] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut out = [[0u8; 16]; 2];
    for j in 0..16 {
        let hi = |bit: usize| (((qh >> bit) & 1) << 4) as u8;
        out[0][j] = (qs[j] & 0xF) | hi(j);
        out[1][j] = (qs[j] >> 4) | hi(j + 16);
    }
    out
}

pub fn dequantize_into(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    let (per, bytes) = ty.block().expect(
        "invariant: callers pass a supported type (Gguf::dequantize rejects others via Gguf::raw)",
    );
    for (blk, y) in data.chunks_exact(bytes).zip(out.chunks_exact_mut(per)) {
        match ty {
            GgmlType::F32 => y[0] = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]),
            GgmlType::F16 => y[0] = f16(blk, 0),
            GgmlType::BF16 => y[0] = half::bf16::from_le_bytes([blk[0], blk[1]]).to_f32(),
            GgmlType::Q8_0 => {
                let d = f16(blk, 0);
                for (j, v) in y.iter_mut().enumerate() {
                    *v = d * (blk[2 + j] as i8) as f32;
                }
            }
            GgmlType::Q4_0 => {
                let d = f16(blk, 0);
                let qs = &blk[2..18];
                for j in 0..16 {
                    y[j] = d * ((qs[j] & 0xF) as i32 - 8) as f32;
                    y[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
                }
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16(blk, 0), f16(blk, 2));
                let qs = &blk[4..20];
                for j in 0..16 {
                    y[j] = d * (qs[j] & 0xF) as f32 + m;
                    y[j + 16] = d * (qs[j] >> 4) as f32 + m;
                }
            }
            // 5-bit: the low 4 bits in qs' nibbles, the 5th of element j
            // in bit j of the little-endian u32 qh.
            GgmlType::Q5_0 => {
                let d = f16(blk, 0);
                let [q0, q1] = q5_pair(&blk[2..6], &blk[6..22]);
                for j in 0..16 {
                    y[j] = d * (q0[j] as i32 - 16) as f32;
                    y[j + 16] = d * (q1[j] as i32 - 16) as f32;
                }
            }
            GgmlType::Q5_1 => {
                let (d, m) = (f16(blk, 0), f16(blk, 2));
                let [q0, q1] = q5_pair(&blk[4..8], &blk[8..24]);
                for j in 0..16 {
                    y[j] = d * q0[j] as f32 + m;
                    y[j + 16] = d * q1[j] as f32 + m;
                }
            }
            GgmlType::Q4K => {
                let (d, dmin) = (f16(blk, 0), f16(blk, 2));
                let scales = &blk[4..16];
                let qs = &blk[16..144];
                for (g, q) in qs.chunks_exact(32).enumerate() {
                    let [d1, m1, d2, m2] = k_scales(d, dmin, scales, g);
                    let y = &mut y[g * 64..g * 64 + 64];
                    for l in 0..32 {
                        y[l] = d1 * (q[l] & 0xF) as f32 - m1;
                        y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
                    }
                }
            }
            GgmlType::Q5K => {
                let (d, dmin) = (f16(blk, 0), f16(blk, 2));
                let scales = &blk[4..16];
                let qh = &blk[16..48];
                let qs = &blk[48..176];
                for (g, ql) in qs.chunks_exact(32).enumerate() {
                    let [d1, m1, d2, m2] = k_scales(d, dmin, scales, g);
                    let (u1, u2) = (1u8 << (2 * g), 2u8 << (2 * g));
                    let y = &mut y[g * 64..g * 64 + 64];
                    for l in 0..32 {
                        let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                        let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                        y[l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
                        y[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
                    }
                }
            }
            GgmlType::Q6K => {
                let ql_all = &blk[0..128];
                let qh_all = &blk[128..192];
                let sc_all = &blk[192..208];
                let d = f16(blk, 208);
                for half in 0..2 {
                    let ql = &ql_all[half * 64..];
                    let qh = &qh_all[half * 32..];
                    let sc = &sc_all[half * 8..];
                    let y = &mut y[half * 128..half * 128 + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let s = |k: usize| d * (sc[is + k] as i8) as f32;
                        y[l] = s(0) * q1 as f32;
                        y[l + 32] = s(2) * q2 as f32;
                        y[l + 64] = s(4) * q3 as f32;
                        y[l + 96] = s(6) * q4 as f32;
                    }
                }
            }
            GgmlType::Other(_) => {
                unreachable!("invariant: ty.block() above already rejected Other")
            }
        }
    }
}

/// Scales and mins of the two 32-element halves of 64-element group `g` of
/// a Q4_K/Q5_K super-block, multiplied out as ggml does (in f32).
fn k_scales(d: f32, dmin: f32, scales: &[u8], g: usize) -> [f32; 4] {
    let (s1, m1) = scale_min_k4(2 * g, scales);
    let (s2, m2) = scale_min_k4(2 * g + 1, scales);
    [
        d * s1 as f32,
        dmin * m1 as f32,
        d * s2 as f32,
        dmin * m2 as f32,
    ]
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K super-block.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}
