//! GPU tensors: a buffer (or a byte range of one) plus a shape and a label.
//!
//! Tensors are allocated once per plan. Views share the buffer, so slices of
//! a flat parameter arena and row chunks of a large table cost nothing.

use std::sync::Arc;

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::gpu::context::{Allocation, Context};

/// Element type of a tensor (all 4 bytes wide).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    I32,
    U32,
}

/// A buffer range with a shape.
#[derive(Clone)]
pub struct Tensor {
    buffer: Arc<wgpu::Buffer>,
    /// Counts the buffer in `Context::memory` while any view lives.
    _mem: Arc<Allocation>,
    /// Byte offset of element 0 in `buffer`.
    offset: u64,
    shape: Vec<usize>,
    label: Arc<str>,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({} {:?} {:?})",
            self.label, self.shape, self.dtype
        )
    }
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

fn check_size(ctx: &Context, label: &str, bytes: u64) -> Result<()> {
    if bytes > ctx.limits.max_buffer_size {
        return Err(Error::Limits {
            what: format!("allocating tensor `{label}`"),
            need: bytes,
            have: ctx.limits.max_buffer_size,
        });
    }
    Ok(())
}

/// Bytes [`Tensor::zeros`] allocates for `numel` elements (the memory
/// planner counts with this too). wgpu rejects zero-sized bindings, so at
/// least one element; rounded to 16 bytes so kernels may bind any tensor as
/// array<vec4<f32>>.
pub fn alloc_bytes(numel: usize) -> u64 {
    ((numel.max(1) * 4) as u64).next_multiple_of(16)
}

impl Tensor {
    /// A zero-filled tensor.
    pub fn zeros(ctx: &Context, shape: &[usize], dtype: DType, label: &str) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let bytes = alloc_bytes(n);
        check_size(ctx, label, bytes)?;
        let buffer = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: USAGE,
            mapped_at_creation: false,
        });
        Ok(Tensor {
            buffer: Arc::new(buffer),
            _mem: Arc::new(ctx.memory.alloc(bytes)),
            offset: 0,
            shape: shape.to_vec(),
            label: label.into(),
            dtype,
        })
    }

    fn from_bytes(
        ctx: &Context,
        bytes: &[u8],
        shape: &[usize],
        dtype: DType,
        label: &str,
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if bytes.len() != n * 4 {
            return Err(Error::Shape {
                op: "upload".into(),
                tensor: label.into(),
                expected: format!("{} elements", bytes.len() / 4),
                got: shape.to_vec(),
            });
        }
        if n == 0 {
            return Tensor::zeros(ctx, shape, dtype, label);
        }
        check_size(ctx, label, bytes.len() as u64)?;
        let mut padded = bytes.to_vec();
        padded.resize(bytes.len().next_multiple_of(16), 0);
        let buffer = ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: &padded,
                usage: USAGE,
            });
        Ok(Tensor {
            buffer: Arc::new(buffer),
            _mem: Arc::new(ctx.memory.alloc(padded.len() as u64)),
            offset: 0,
            shape: shape.to_vec(),
            label: label.into(),
            dtype,
        })
    }

    /// Upload f32 data.
    pub fn from_f32(ctx: &Context, data: &[f32], shape: &[usize], label: &str) -> Result<Tensor> {
        Self::from_bytes(ctx, bytemuck::cast_slice(data), shape, DType::F32, label)
    }

    /// Upload i32 data (token ids, targets with -100 for "ignore").
    pub fn from_i32(ctx: &Context, data: &[i32], shape: &[usize], label: &str) -> Result<Tensor> {
        Self::from_bytes(ctx, bytemuck::cast_slice(data), shape, DType::I32, label)
    }

    /// Upload u32 data.
    pub fn from_u32(ctx: &Context, data: &[u32], shape: &[usize], label: &str) -> Result<Tensor> {
        Self::from_bytes(ctx, bytemuck::cast_slice(data), shape, DType::U32, label)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn label(&self) -> &str {
        &self.label
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn bytes(&self) -> u64 {
        self.numel() as u64 * 4
    }
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// A view of `shape` starting `elem_offset` elements into this tensor.
    /// The byte offset must meet the storage offset alignment (256 B).
    pub fn view(&self, elem_offset: usize, shape: &[usize], label: &str) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if elem_offset + n > self.numel() {
            return Err(Error::invalid(
                "view",
                format!(
                    "`{label}`: elements {elem_offset}..{} out of range for `{}` {:?}",
                    elem_offset + n,
                    self.label,
                    self.shape
                ),
            ));
        }
        let offset = self.offset + elem_offset as u64 * 4;
        Ok(Tensor {
            buffer: self.buffer.clone(),
            _mem: self._mem.clone(),
            offset,
            shape: shape.to_vec(),
            label: label.into(),
            dtype: self.dtype,
        })
    }

    /// Same data, another shape with the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(Error::Shape {
                op: "reshape".into(),
                tensor: self.label.to_string(),
                expected: format!("{} elements", shape.iter().product::<usize>()),
                got: self.shape.clone(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self.clone()
        })
    }

    /// Bytes a binding of this tensor covers: rounded up to 16 so vec4
    /// kernels see the last partial vec4 (buffers are padded to allow it).
    pub fn binding_bytes(&self) -> u64 {
        self.bytes()
            .max(4)
            .next_multiple_of(16)
            .min(self.buffer.size() - self.offset)
    }

    /// The binding that covers this tensor.
    pub fn binding(&self) -> wgpu::BufferBinding<'_> {
        wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset,
            size: std::num::NonZeroU64::new(self.binding_bytes()),
        }
    }

    /// Overwrite the tensor's contents from the host.
    pub fn write_f32(&self, ctx: &Context, data: &[f32]) -> Result<()> {
        self.write_raw(ctx, bytemuck::cast_slice(data), data.len())
    }

    /// Queue a write of i32 data (ids, targets) over the whole tensor.
    pub fn write_i32(&self, ctx: &Context, data: &[i32]) -> Result<()> {
        self.write_raw(ctx, bytemuck::cast_slice(data), data.len())
    }

    /// Queue a write of u32 data (positions, row starts) over the whole tensor.
    pub fn write_u32(&self, ctx: &Context, data: &[u32]) -> Result<()> {
        self.write_raw(ctx, bytemuck::cast_slice(data), data.len())
    }

    fn write_raw(&self, ctx: &Context, bytes: &[u8], len: usize) -> Result<()> {
        if len != self.numel() {
            return Err(Error::Shape {
                op: "write".into(),
                tensor: self.label.to_string(),
                expected: format!("{len} elements"),
                got: self.shape.clone(),
            });
        }
        ctx.queue.write_buffer(&self.buffer, self.offset, bytes);
        Ok(())
    }

    fn read_bytes(&self, ctx: &Context) -> Result<Vec<u8>> {
        let size = self.bytes().max(4);
        let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let _mem = ctx.memory.alloc(size);
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("readback"),
            });
        enc.copy_buffer_to_buffer(&self.buffer, self.offset, &staging, 0, size);
        ctx.queue.submit([enc.finish()]);
        let slice = staging.slice(..);
        ctx.map_read(slice, &self.label)?;
        let out = slice
            .get_mapped_range()
            .map_err(|e| Error::Gpu {
                context: Some(format!("mapping `{}`", self.label)),
                message: e.to_string(),
            })?
            .to_vec();
        staging.unmap();
        Ok(out[..self.bytes() as usize].to_vec())
    }

    /// Copy the tensor to the host as f32 (waits for queued work).
    pub fn read_f32(&self, ctx: &Context) -> Result<Vec<f32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(ctx)?))
    }

    /// Copy the tensor to the host as i32.
    pub fn read_i32(&self, ctx: &Context) -> Result<Vec<i32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(ctx)?))
    }
}

/// How a [`TexMatrix`] stores its elements. Frozen weights keep the
/// precision they were stored in; kernels decode a texel into 4 f32 values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TexFormat {
    /// `rgba32float`, 4 elements per texel.
    F32,
    /// f16 bits, 8 elements per `rgba32uint` texel (as `Bf16`).
    F16,
    /// bf16 bits, 8 elements per `rgba32uint` texel (2 per u32, the lower
    /// column in the low half).
    Bf16,
    /// Block-quantized: 32 unsigned 4-bit values per `rgba32uint` texel (one
    /// block; each u32 holds 8 in column order, lowest nibble first), and a
    /// (scale, offset) pair per 32 elements in a second `rg32float` texture.
    Q4,
    /// 16 signed 8-bit values per `rgba32uint` texel (lowest byte first),
    /// (scale, offset) per `sub` elements (32, or 16 for Q6_K).
    Q8 { sub: u32 },
}

impl TexFormat {
    /// Bytes of 4 consecutive elements of a row (the host layout's unit;
    /// one texel of the 4-element formats).
    pub fn texel_bytes(self) -> u64 {
        match self {
            TexFormat::F32 => 16,
            TexFormat::F16 | TexFormat::Bf16 => 8,
            TexFormat::Q4 => 2,
            TexFormat::Q8 { .. } => 4,
        }
    }
    /// Elements per GPU texel. f16, bf16 and quants travel in wide
    /// `rgba32uint` texels: one fetch (a gather per lane on llvmpipe, where
    /// the one-row GEMV's time is its fetches) brings 8 f16 or bf16, 32
    /// 4-bit or 16 8-bit weights, not 4.
    pub fn texel_elems(self) -> usize {
        match self {
            TexFormat::Q4 => 32,
            TexFormat::Q8 { .. } => 16,
            TexFormat::Bf16 | TexFormat::F16 => 8,
            _ => 4,
        }
    }
    /// Bytes of one GPU texel.
    fn gpu_texel_bytes(self) -> u64 {
        self.texel_bytes() * self.texel_elems() as u64 / 4
    }
    /// Elements per (scale, offset) pair of block formats.
    pub fn sub_block(self) -> Option<u32> {
        match self {
            TexFormat::Q4 => Some(32),
            TexFormat::Q8 { sub } => Some(sub),
            _ => None,
        }
    }
    fn wgpu(self) -> wgpu::TextureFormat {
        match self {
            TexFormat::F32 => wgpu::TextureFormat::Rgba32Float,
            TexFormat::F16 | TexFormat::Bf16 | TexFormat::Q4 | TexFormat::Q8 { .. } => {
                wgpu::TextureFormat::Rgba32Uint
            }
        }
    }
    /// GPU bytes of a `rows x cols` matrix in this format (both textures).
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> u64 {
        let texels =
            rows as u64 * cols.div_ceil(self.texel_elems()) as u64 * self.gpu_texel_bytes();
        let scales = self
            .sub_block()
            .map_or(0, |s| rows as u64 * cols.div_ceil(s as usize) as u64 * 8);
        texels + scales
    }
}

/// A row-major matrix packed into a 2-D array texture: texel (c, y, layer)
/// holds columns 4c..4c+4 of row `layer * layer_rows + y` (zero-padded), in
/// the matrix's [`TexFormat`]. Kernels read it with `textureLoad`, which
/// llvmpipe compiles to a SIMD gather instead of a per-lane loop of checked
/// loads (about 10x cheaper per load there), and GPUs serve from the texture
/// cache. Not bound by the storage binding limit, only by texture dimensions.
/// Block formats carry a second texture of (scale, offset) pairs with the
/// same rows and layers.
pub struct TexMatrix {
    texture: wgpu::Texture,
    /// Counts the textures in `Context::memory`.
    _mem: Allocation,
    view: wgpu::TextureView,
    scales: Option<(wgpu::Texture, wgpu::TextureView)>,
    format: TexFormat,
    rows: usize,
    cols: usize,
    /// log2 of the rows per layer (31 when one layer holds everything).
    layer_shift: u32,
    label: Arc<str>,
}

impl std::fmt::Debug for TexMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TexMatrix({} [{}, {}])",
            self.label, self.rows, self.cols
        )
    }
}

impl TexMatrix {
    /// Whether a `rows x cols` matrix fits the texture limits.
    pub fn fits(ctx: &Context, rows: usize, cols: usize) -> bool {
        Self::geometry(ctx, rows, cols).is_some()
    }

    fn geometry(ctx: &Context, rows: usize, cols: usize) -> Option<(u32, u32, u32, u32)> {
        Self::geometry_of(ctx, rows, cols.div_ceil(4))
    }

    /// (width, height, layers, layer shift) of `rows` rows of `width` texels.
    fn geometry_of(ctx: &Context, rows: usize, width: usize) -> Option<(u32, u32, u32, u32)> {
        let max = ctx.limits.max_texture_dimension_2d as usize;
        let width = width.max(1);
        if width > max || rows == 0 {
            return None;
        }
        if rows <= max {
            return Some((width as u32, rows as u32, 1, 31));
        }
        // Power-of-two layer height so kernels split a row index with a shift.
        let shift = usize::BITS - 1 - max.leading_zeros();
        let h = 1usize << shift;
        let layers = rows.div_ceil(h);
        if layers > ctx.limits.max_texture_array_layers as usize {
            return None;
        }
        Some((width as u32, h as u32, layers as u32, shift))
    }

    /// An uninitialised packed f32 matrix (filled by `matmul_pack`).
    pub fn new(ctx: &Context, rows: usize, cols: usize, label: &str) -> Result<TexMatrix> {
        Self::with_format(ctx, rows, cols, TexFormat::F32, label)
    }

    /// An uninitialised matrix of `format` (filled by [`TexMatrix::write_rows`],
    /// or by `matmul_pack` for f32).
    pub fn with_format(
        ctx: &Context,
        rows: usize,
        cols: usize,
        format: TexFormat,
        label: &str,
    ) -> Result<TexMatrix> {
        let gw = cols.div_ceil(format.texel_elems());
        let (w, h, layers, layer_shift) = Self::geometry_of(ctx, rows, gw).ok_or_else(|| Error::Limits {
            what: format!("packing `{label}` [{rows}, {cols}] into a texture (max dimension {}, {} layers)", ctx.limits.max_texture_dimension_2d, ctx.limits.max_texture_array_layers),
            need: format.matrix_bytes(rows, cols),
            have: 0,
        })?;
        if let Some(sub) = format.sub_block() {
            if !cols.is_multiple_of(sub as usize) {
                return Err(Error::invalid(
                    "texture",
                    format!("`{label}`: {cols} columns are not whole blocks of {sub}"),
                ));
            }
        }
        let storage = if format == TexFormat::F32 {
            wgpu::TextureUsages::STORAGE_BINDING
        } else {
            wgpu::TextureUsages::empty()
        };
        let make = |width: u32,
                    fmt: wgpu::TextureFormat,
                    usage: wgpu::TextureUsages,
                    label: &str| {
            let texture = ctx.device.create_texture(&wgpu::TextureDescriptor {
                label: Some(label),
                size: wgpu::Extent3d {
                    width,
                    height: h,
                    depth_or_array_layers: layers,
                },
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format: fmt,
                usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST | usage,
                view_formats: &[],
            });
            let view = texture.create_view(&wgpu::TextureViewDescriptor {
                dimension: Some(wgpu::TextureViewDimension::D2Array),
                ..Default::default()
            });
            (texture, view)
        };
        let (texture, view) = make(w, format.wgpu(), storage, label);
        let mut bytes = w as u64 * h as u64 * layers as u64 * format.gpu_texel_bytes();
        let scales = format.sub_block().map(|sub| {
            let sw = (cols / sub as usize).max(1) as u32;
            bytes += sw as u64 * h as u64 * layers as u64 * 8;
            make(
                sw,
                wgpu::TextureFormat::Rg32Float,
                wgpu::TextureUsages::empty(),
                &format!("{label}.scales"),
            )
        });
        Ok(TexMatrix {
            texture,
            _mem: ctx.memory.alloc(bytes),
            view,
            scales,
            format,
            rows,
            cols,
            layer_shift,
            label: label.into(),
        })
    }

    /// Upload rows `r0..r0 + n` from host data in the texture layout: `texels`
    /// holds `n * ceil(cols / 4)` texels of the format, `scales` (block
    /// formats) `n * cols / sub` (scale, offset) pairs.
    pub fn write_rows(
        &self,
        ctx: &Context,
        r0: usize,
        texels: &[u8],
        scales: &[[f32; 2]],
    ) -> Result<()> {
        let width = self.cols.div_ceil(4);
        let tb = self.format.texel_bytes() as usize;
        let n = texels.len() / (width * tb).max(1);
        let sw = self
            .format
            .sub_block()
            .map_or(0, |s| self.cols / s as usize);
        if texels.len() != n * width * tb || scales.len() != n * sw || r0 + n > self.rows {
            return Err(Error::invalid(
                "texture upload",
                format!(
                    "`{}`: {} texel bytes and {} scales do not make whole rows at row {r0} of {}",
                    self.label,
                    texels.len(),
                    scales.len(),
                    self.rows
                ),
            ));
        }
        // A wide texel may end past the row's last 4 elements (36 bf16
        // columns: 9 groups of 4, 72 bytes, in 5 texels of 8, 80 bytes):
        // pad each row with zeros.
        let gw = self.cols.div_ceil(self.format.texel_elems());
        let grb = gw * self.format.gpu_texel_bytes() as usize;
        let padded;
        let (texels, rb) = if grb == width * tb {
            (texels, grb)
        } else {
            let mut p = vec![0u8; n * grb];
            for (d, s) in p.chunks_exact_mut(grb).zip(texels.chunks_exact(width * tb)) {
                d[..s.len()].copy_from_slice(s);
            }
            padded = p;
            (&padded[..], grb)
        };
        let h = if self.layer_shift >= 31 {
            self.rows
        } else {
            1usize << self.layer_shift
        };
        let write = |tex: &wgpu::Texture,
                     data: &[u8],
                     texels: usize,
                     row_bytes: usize,
                     rr: usize,
                     y: usize,
                     layer: usize| {
            ctx.queue.write_texture(
                wgpu::TexelCopyTextureInfo {
                    texture: tex,
                    mip_level: 0,
                    origin: wgpu::Origin3d {
                        x: 0,
                        y: y as u32,
                        z: layer as u32,
                    },
                    aspect: wgpu::TextureAspect::All,
                },
                data,
                wgpu::TexelCopyBufferLayout {
                    offset: 0,
                    bytes_per_row: Some(row_bytes as u32),
                    rows_per_image: Some(rr as u32),
                },
                wgpu::Extent3d {
                    width: texels as u32,
                    height: rr as u32,
                    depth_or_array_layers: 1,
                },
            );
        };
        let mut i = 0;
        while i < n {
            let r = r0 + i;
            let (y, layer) = (r % h, r / h);
            let rr = (n - i).min(h - y);
            write(
                &self.texture,
                &texels[i * rb..(i + rr) * rb],
                gw,
                rb,
                rr,
                y,
                layer,
            );
            if let Some((st, _)) = &self.scales {
                let sc: &[u8] = bytemuck::cast_slice(&scales[i * sw..(i + rr) * sw]);
                write(st, sc, sw, sw * 8, rr, y, layer);
            }
            i += rr;
        }
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn layer_shift(&self) -> u32 {
        self.layer_shift
    }
    pub fn label(&self) -> &str {
        &self.label
    }
    pub fn view(&self) -> &wgpu::TextureView {
        &self.view
    }
    pub fn texture(&self) -> &wgpu::Texture {
        &self.texture
    }
    pub fn format(&self) -> TexFormat {
        self.format
    }
    /// The (scale, offset) texture of block formats.
    pub fn scales_view(&self) -> Option<&wgpu::TextureView> {
        self.scales.as_ref().map(|(_, v)| v)
    }
    /// GPU bytes of this matrix.
    pub fn bytes(&self) -> u64 {
        self._mem.bytes()
    }
}
