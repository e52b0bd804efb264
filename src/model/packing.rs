//! Packed rows (`train --packing`): several data rows share one sequence,
//! and each attends only to itself at its own positions, as TRL's
//! padding-free packing does. Per token the forward needs its row start
//! (for the attention mask, see `shaders/attention.wgsl`) and its position
//! `P + t - start` (RoPE, GPT-2's learned positions). Unpacked sequences are
//! the special case start = 0.

use crate::error::{Error, Result};
use crate::gpu::{Context, DType, Tensor};
use crate::model::config::{Arch, LayerAttn, ModelConfig};

/// The per-step buffers of packed rows for a (B, S) forward.
#[derive(Clone)]
pub struct PackBufs {
    /// (B, S) u32: index of the first token of each token's row.
    pub starts: Tensor,
    /// RoPE tables gathered at each token's position, (B*S, D/2) cos and
    /// sin: the global ones, and the local ones of sliding layers.
    pub rope: Option<(Tensor, Tensor)>,
    pub rope_local: Option<(Tensor, Tensor)>,
}

/// The model's RoPE tables on the host (what `Model` uploads), to gather
/// from per step.
pub struct PackTables {
    half: usize,
    rope: Option<(Vec<f32>, Vec<f32>)>,
    rope_local: Option<(Vec<f32>, Vec<f32>)>,
}

impl PackTables {
    pub fn new(cfg: &ModelConfig) -> PackTables {
        PackTables {
            half: cfg.head_dim / 2,
            rope: (cfg.arch != Arch::Gpt2).then(|| cfg.rope_tables()),
            rope_local: cfg.rope_local_tables(),
        }
    }
}

/// Token positions of a (B, S) batch with row starts `starts` after `p`
/// prefix rows: token t of its sequence is at `p + t - start`.
pub fn positions(starts: &[u32], s: usize, p: usize) -> Vec<usize> {
    starts
        .iter()
        .enumerate()
        .map(|(i, &st)| p + i % s.max(1) - st as usize)
        .collect()
}

impl PackBufs {
    /// Buffers for a (B, S) forward of a model with `tables`.
    pub fn new(ctx: &Context, tables: &PackTables, b: usize, s: usize) -> Result<PackBufs> {
        let starts = Tensor::zeros(ctx, &[b, s], DType::U32, "row_starts")?;
        let shape = [b * s, tables.half];
        let pair = |on: bool, tag: &str| -> Result<Option<(Tensor, Tensor)>> {
            if !on {
                return Ok(None);
            }
            Ok(Some((
                Tensor::zeros(ctx, &shape, DType::F32, &format!("packed_rope{tag}.cos"))?,
                Tensor::zeros(ctx, &shape, DType::F32, &format!("packed_rope{tag}.sin"))?,
            )))
        };
        Ok(PackBufs {
            starts,
            rope: pair(tables.rope.is_some(), "")?,
            rope_local: pair(tables.rope_local.is_some(), "_local")?,
        })
    }

    /// Write one batch's row starts (B, S) and the RoPE rows at its
    /// positions (`p` prefix rows in front); returns the positions.
    pub fn write(
        &self,
        ctx: &Context,
        tables: &PackTables,
        starts: &[u32],
        p: usize,
    ) -> Result<Vec<usize>> {
        let [b, s] = [self.starts.shape()[0], self.starts.shape()[1]];
        if starts.len() != b * s || (0..starts.len()).any(|i| starts[i] as usize > i % s) {
            return Err(Error::invalid(
                "packing",
                format!("row starts must be (B={b}, S={s}) with each start at or before its token"),
            ));
        }
        // Same bytes as u32 (starts < S <= i32::MAX).
        let raw: Vec<i32> = starts.iter().map(|&x| x as i32).collect();
        self.starts.write_i32(ctx, &raw)?;
        let pos = positions(starts, s, p);
        let h = tables.half;
        let gather = |dst: &Option<(Tensor, Tensor)>, src: &Option<(Vec<f32>, Vec<f32>)>| {
            if let (Some((dc, ds)), Some((cos, sin))) = (dst, src) {
                let rows = |t: &[f32]| -> Vec<f32> {
                    pos.iter()
                        .flat_map(|&x| t[x * h..(x + 1) * h].iter().copied())
                        .collect()
                };
                dc.write_f32(ctx, &rows(cos))?;
                ds.write_f32(ctx, &rows(sin))?;
            }
            Ok::<_, Error>(())
        };
        gather(&self.rope, &tables.rope)?;
        gather(&self.rope_local, &tables.rope_local)?;
        Ok(pos)
    }

    /// The gathered RoPE tables of layer `l` (as `Model::rope_of` picks).
    pub fn rope_of(&self, cfg: &ModelConfig, l: usize) -> Option<&(Tensor, Tensor)> {
        match (&self.rope_local, cfg.layer_types.get(l)) {
            (Some(t), Some(LayerAttn::Sliding)) => Some(t),
            _ => self.rope.as_ref(),
        }
    }
}
