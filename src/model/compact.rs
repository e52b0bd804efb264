//! Frozen weights in the precision they were stored in: the host side of
//! [`TexFormat`]. A stored matrix (safetensors f32/f16/bf16 or a GGUF block
//! type) is re-laid into texture rows a few rows at a time, so no f32 copy
//! of a whole matrix exists on the host or the GPU.
//!
//! Block types become quants (4 per host-layout group of 4 elements, 32 or
//! 16 per GPU texel) plus one (scale, offset) pair per sub-block, with value = scale * q + offset. For every supported type
//! that is llama.cpp's formula evaluated in the same f32 operations (the
//! products are exact, see docs/compact-weights.md), so the GPU reproduces
//! `gguf.quants.dequantize` bit for bit. 5- and 6-bit quants take a byte
//! each on the GPU (quants there are 4 or 8 bits wide).

use std::borrow::Cow;

use crate::error::{Error, Result};
use crate::gpu::tensor::TexFormat;
use crate::gpu::{Context, TexMatrix};
use crate::model::gguf::{dequantize_into, scale_min_k4, GgmlType};

/// `--weights`: the precision frozen weights take on the GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightsMode {
    /// Everything expanded to f32 (exact, 4 bytes per weight).
    F32,
    /// Everything as f16 (rounded; GGUF blocks dequantized first).
    F16,
    /// Everything as bf16 (rounded).
    Bf16,
    /// As stored: f32, f16, bf16 or the GGUF block format.
    #[default]
    Stored,
}

impl std::str::FromStr for WeightsMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(WeightsMode::F32),
            "f16" => Ok(WeightsMode::F16),
            "bf16" => Ok(WeightsMode::Bf16),
            "stored" => Ok(WeightsMode::Stored),
            _ => Err(format!("`{s}` is not one of f32, f16, bf16, stored")),
        }
    }
}

impl std::fmt::Display for WeightsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightsMode::F32 => "f32",
            WeightsMode::F16 => "f16",
            WeightsMode::Bf16 => "bf16",
            WeightsMode::Stored => "stored",
        })
    }
}

/// The GPU format of a stored type under `mode`.
pub fn target_format(ty: GgmlType, mode: WeightsMode) -> TexFormat {
    match mode {
        WeightsMode::F32 => TexFormat::F32,
        WeightsMode::F16 => TexFormat::F16,
        WeightsMode::Bf16 => TexFormat::Bf16,
        WeightsMode::Stored => match ty {
            GgmlType::F16 => TexFormat::F16,
            GgmlType::BF16 => TexFormat::Bf16,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K => TexFormat::Q4,
            GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5K => {
                TexFormat::Q8 { sub: 32 }
            }
            GgmlType::Q6K => TexFormat::Q8 { sub: 16 },
            GgmlType::F32 | GgmlType::Other(_) => TexFormat::F32,
        },
    }
}

/// A stored row-major matrix (`rows` of `cols` elements) in its file's
/// encoding; rows are whole blocks.
pub struct StoredMatrix<'a> {
    pub name: String,
    pub ty: GgmlType,
    pub data: Cow<'a, [u8]>,
    pub rows: usize,
    pub cols: usize,
}

impl StoredMatrix<'_> {
    /// Bytes of one stored row.
    pub fn row_bytes(&self) -> usize {
        let (per, bytes) = self.ty.block().unwrap_or((1, 4));
        self.cols / per * bytes
    }

    /// Check that the data holds `rows` whole rows of a supported type.
    pub fn check(&self) -> Result<()> {
        let ok = match self.ty.block() {
            Some((per, _)) => {
                self.cols.is_multiple_of(per) && self.data.len() == self.rows * self.row_bytes()
            }
            None => false,
        };
        if !ok {
            return Err(Error::invalid(
                "loading weights",
                format!(
                    "tensor `{}` ({} [{}, {}], {} bytes) is not whole rows of its type",
                    self.name,
                    self.ty.name(),
                    self.rows,
                    self.cols,
                    self.data.len()
                ),
            ));
        }
        Ok(())
    }

    /// Rows `r0..r1` as f32.
    pub fn rows_f32(&self, r0: usize, r1: usize) -> Vec<f32> {
        let rb = self.row_bytes();
        let mut out = vec![0f32; (r1 - r0) * self.cols];
        dequantize_into(self.ty, &self.data[r0 * rb..r1 * rb], &mut out);
        out
    }

    /// Every `stride`-th element of the flat matrix, as f32 (decoding only
    /// the rows that hold one).
    pub fn sample_f32(&self, stride: usize) -> Vec<f32> {
        let n = self.rows * self.cols;
        let mut out = Vec::with_capacity(n / stride.max(1) + 1);
        let mut cached: Option<(usize, Vec<f32>)> = None;
        for i in (0..n).step_by(stride.max(1)) {
            let r = i / self.cols;
            if cached.as_ref().is_none_or(|(cr, _)| *cr != r) {
                cached = Some((r, self.rows_f32(r, r + 1)));
            }
            if let Some((_, row)) = &cached {
                out.push(row[i % self.cols]);
            }
        }
        out
    }
}

/// Quants (as i32) and (scale, offset) pairs of one block of a quantized
/// type. A missing offset is -0.0, which leaves every product (a -0.0
/// included) unchanged.
fn decode_block(ty: GgmlType, blk: &[u8], q: &mut [i32], sc: &mut [[f32; 2]]) {
    let f16 = |i: usize| half::f16::from_le_bytes([blk[i], blk[i + 1]]).to_f32();
    match ty {
        GgmlType::Q8_0 => {
            sc[0] = [f16(0), -0.0];
            for j in 0..32 {
                q[j] = blk[2 + j] as i8 as i32;
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (pair, qs) = if ty == GgmlType::Q4_0 {
                ([f16(0), -8.0 * f16(0)], &blk[2..18])
            } else {
                ([f16(0), f16(2)], &blk[4..20])
            };
            sc[0] = pair;
            for j in 0..16 {
                q[j] = (qs[j] & 0xF) as i32;
                q[j + 16] = (qs[j] >> 4) as i32;
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (pair, qh, qs, off) = if ty == GgmlType::Q5_0 {
                ([f16(0), -0.0], &blk[2..6], &blk[6..22], 16)
            } else {
                ([f16(0), f16(2)], &blk[4..8], &blk[8..24], 0)
            };
            sc[0] = pair;
            let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
            for j in 0..16 {
                let hi = |bit: usize| (((qh >> bit) & 1) << 4) as i32;
                q[j] = ((qs[j] & 0xF) as i32 | hi(j)) - off;
                q[j + 16] = ((qs[j] >> 4) as i32 | hi(j + 16)) - off;
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let (d, dmin) = (f16(0), f16(2));
            let scales = &blk[4..16];
            for (s, pair) in sc.iter_mut().enumerate().take(8) {
                let (a, m) = scale_min_k4(s, scales);
                *pair = [d * a as f32, -(dmin * m as f32)];
            }
            let (qh, qs) = if ty == GgmlType::Q4K {
                (None, &blk[16..144])
            } else {
                (Some(&blk[16..48]), &blk[48..176])
            };
            for (g, ql) in qs.chunks_exact(32).enumerate() {
                for l in 0..32 {
                    let (h1, h2) = match qh {
                        Some(qh) => (
                            if qh[l] & (1 << (2 * g)) != 0 { 16 } else { 0 },
                            if qh[l] & (2 << (2 * g)) != 0 { 16 } else { 0 },
                        ),
                        None => (0, 0),
                    };
                    q[g * 64 + l] = (ql[l] & 0xF) as i32 + h1;
                    q[g * 64 + 32 + l] = (ql[l] >> 4) as i32 + h2;
                }
            }
        }
        GgmlType::Q6K => {
            let d = f16(208);
            for s in 0..16 {
                sc[s] = [d * (blk[192 + s] as i8) as f32, -0.0];
            }
            for h in 0..2 {
                let ql = &blk[h * 64..];
                let qh = &blk[128 + h * 32..];
                for l in 0..32 {
                    let b = h * 128 + l;
                    q[b] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    q[b + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    q[b + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    q[b + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                }
            }
        }
        _ => unreachable!("invariant: decode_block is called for block types only"),
    }
}

/// Rows `r0..r1` of `m` in the texture layout of `fmt`: texel bytes and
/// (scale, offset) pairs.
pub fn encode_rows(
    m: &StoredMatrix,
    r0: usize,
    r1: usize,
    fmt: TexFormat,
) -> (Vec<u8>, Vec<[f32; 2]>) {
    let cols = m.cols;
    let w = cols.div_ceil(4);
    let n = r1 - r0;
    let quantized = fmt.sub_block().is_some();
    // Same type on both sides: the bits are copied.
    let copy16 = matches!(
        (m.ty, fmt),
        (GgmlType::F16, TexFormat::F16) | (GgmlType::BF16, TexFormat::Bf16)
    );
    if !quantized {
        let tb = fmt.texel_bytes() as usize;
        let eb = tb / 4;
        let mut out = vec![0u8; n * w * tb];
        let rb = m.row_bytes();
        for i in 0..n {
            let dst = &mut out[i * w * tb..i * w * tb + cols * eb];
            let r = r0 + i;
            if copy16 || (m.ty == GgmlType::F32 && fmt == TexFormat::F32) {
                dst.copy_from_slice(&m.data[r * rb..(r + 1) * rb]);
                continue;
            }
            let row = m.rows_f32(r, r + 1);
            match fmt {
                TexFormat::F32 => dst.copy_from_slice(bytemuck::cast_slice(&row)),
                TexFormat::F16 => {
                    for (d, x) in dst.chunks_exact_mut(2).zip(&row) {
                        d.copy_from_slice(&half::f16::from_f32(*x).to_le_bytes());
                    }
                }
                _ => {
                    for (d, x) in dst.chunks_exact_mut(2).zip(&row) {
                        d.copy_from_slice(&half::bf16::from_f32(*x).to_le_bytes());
                    }
                }
            }
        }
        return (out, Vec::new());
    }
    let sub = fmt.sub_block().unwrap_or(32) as usize;
    let (per, bytes) = m.ty.block().unwrap_or((32, 34));
    let tb = fmt.texel_bytes() as usize;
    let mut texels = vec![0u8; n * w * tb];
    let mut scales = vec![[0f32; 2]; n * cols / sub];
    let mut q = vec![0i32; per];
    let mut sc = vec![[0f32; 2]; per / sub];
    let rb = m.row_bytes();
    for i in 0..n {
        let row = &m.data[(r0 + i) * rb..(r0 + i + 1) * rb];
        for (b, blk) in row.chunks_exact(bytes).enumerate() {
            decode_block(m.ty, blk, &mut q, &mut sc);
            let s0 = i * cols / sub + b * per / sub;
            scales[s0..s0 + per / sub].copy_from_slice(&sc);
            let t0 = (i * w + b * per / 4) * tb;
            for (t, g) in q.chunks_exact(4).enumerate() {
                let o = t0 + t * tb;
                if tb == 2 {
                    let v = (g[0] | g[1] << 4 | g[2] << 8 | g[3] << 12) as u16;
                    texels[o..o + 2].copy_from_slice(&v.to_le_bytes());
                } else {
                    for (j, x) in g.iter().enumerate() {
                        texels[o + j] = *x as i8 as u8;
                    }
                }
            }
        }
    }
    (texels, scales)
}

/// Texture bytes uploaded at a time (the staging a load needs).
pub const UPLOAD_CHUNK_BYTES: u64 = 8 << 20;

/// Upload `m` as a texture of `fmt`, [`UPLOAD_CHUNK_BYTES`] of rows at a time.
pub fn upload(ctx: &Context, m: &StoredMatrix, fmt: TexFormat, label: &str) -> Result<TexMatrix> {
    m.check()?;
    let t = TexMatrix::with_format(ctx, m.rows, m.cols, fmt, label)?;
    let row = fmt.matrix_bytes(1, m.cols).max(1);
    let step = (UPLOAD_CHUNK_BYTES / row).max(1) as usize;
    for r0 in (0..m.rows).step_by(step) {
        let r1 = (r0 + step).min(m.rows);
        let (texels, scales) = encode_rows(m, r0, r1, fmt);
        t.write_rows(ctx, r0, &texels, &scales)?;
    }
    Ok(t)
}

/// Random but valid stored blocks for tests: quant bytes are random, f16
/// scale/min fields are small normal numbers of both signs.
#[doc(hidden)]
pub fn random_blocks(ty: GgmlType, n_blocks: usize, seed: u64) -> Vec<u8> {
    let (_, bytes) = ty.block().unwrap_or((1, 4));
    let mut s = seed | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut out: Vec<u8> = (0..n_blocks * bytes).map(|_| next() as u8).collect();
    let f16_at: &[usize] = match ty {
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q6K => &[208],
        GgmlType::F16 | GgmlType::BF16 | GgmlType::F32 => &[],
        GgmlType::Other(_) => &[],
    };
    for b in 0..n_blocks {
        for &o in f16_at {
            let v = ((next() % 2000) as f32 / 2000.0 + 0.01) * 0.05;
            let v = if next() % 2 == 0 { v } else { -v };
            out[b * bytes + o..b * bytes + o + 2]
                .copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
    }
    // Plain float types: values in [-1, 1).
    let floats = |i: u64| ((i >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
    match ty {
        GgmlType::F32 => {
            for c in out.chunks_exact_mut(4) {
                c.copy_from_slice(&floats(next()).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in out.chunks_exact_mut(2) {
                c.copy_from_slice(&half::f16::from_f32(floats(next())).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for c in out.chunks_exact_mut(2) {
                c.copy_from_slice(&half::bf16::from_f32(floats(next())).to_le_bytes());
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// scale * q + offset over the encoded rows equals the host dequantizer
    /// (llama.cpp's formulas) bit for bit, for every block type.
    #[test]
    fn encoded_blocks_decode_to_the_dequantized_values() {
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q4K,
            GgmlType::Q5K,
            GgmlType::Q6K,
        ] {
            let (per, _) = ty.block().unwrap();
            let (rows, cols) = (3, per * 2);
            let m = StoredMatrix {
                name: "w".into(),
                ty,
                data: Cow::Owned(random_blocks(ty, rows * 2, 0x9e37_79b9_7f4a_7c15)),
                rows,
                cols,
            };
            m.check().unwrap();
            let fmt = target_format(ty, WeightsMode::Stored);
            let (tex, sc) = encode_rows(&m, 0, rows, fmt);
            let want = m.rows_f32(0, rows);
            let sub = fmt.sub_block().unwrap() as usize;
            for (i, w) in want.iter().enumerate() {
                let q = if fmt == TexFormat::Q4 {
                    let t = u16::from_le_bytes([tex[(i / 4) * 2], tex[(i / 4) * 2 + 1]]);
                    ((t >> (4 * (i % 4))) & 15) as f32
                } else {
                    tex[i] as i8 as f32
                };
                let [s, o] = sc[i / sub];
                // Q4_0's d*q - 8d gives +0.0 where ggml's (q - 8)*d may give -0.0.
                assert_eq!(s * q + o, *w, "{} element {i}", ty.name());
                if *w != 0.0 {
                    assert_eq!(
                        (s * q + o).to_bits(),
                        w.to_bits(),
                        "{} element {i}",
                        ty.name()
                    );
                }
            }
        }
    }
}
