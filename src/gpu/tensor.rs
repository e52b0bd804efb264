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

/// A row-major f32 matrix packed into an `rgba32float` 2-D array texture:
/// texel (c, y, layer) holds columns 4c..4c+4 of row `layer * layer_rows + y`
/// (zero-padded). Kernels read it with `textureLoad`, which llvmpipe
/// compiles to a SIMD gather instead of a per-lane loop of checked loads
/// (about 10x cheaper per load there), and GPUs serve from the texture cache.
/// Not bound by the storage binding limit, only by texture dimensions.
pub struct TexMatrix {
    texture: wgpu::Texture,
    /// Counts the texture in `Context::memory`.
    _mem: Allocation,
    view: wgpu::TextureView,
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
        let max = ctx.limits.max_texture_dimension_2d as usize;
        let width = cols.div_ceil(4).max(1);
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

    /// An uninitialised packed matrix (filled by `matmul_pack`).
    pub fn new(ctx: &Context, rows: usize, cols: usize, label: &str) -> Result<TexMatrix> {
        let (w, h, layers, layer_shift) = Self::geometry(ctx, rows, cols).ok_or_else(|| Error::Limits {
            what: format!("packing `{label}` [{rows}, {cols}] into a texture (max dimension {}, {} layers)", ctx.limits.max_texture_dimension_2d, ctx.limits.max_texture_array_layers),
            need: (rows * cols * 4) as u64,
            have: 0,
        })?;
        let texture = ctx.device.create_texture(&wgpu::TextureDescriptor {
            label: Some(label),
            size: wgpu::Extent3d {
                width: w,
                height: h,
                depth_or_array_layers: layers,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba32Float,
            usage: wgpu::TextureUsages::TEXTURE_BINDING
                | wgpu::TextureUsages::STORAGE_BINDING
                | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        let view = texture.create_view(&wgpu::TextureViewDescriptor {
            dimension: Some(wgpu::TextureViewDimension::D2Array),
            ..Default::default()
        });
        Ok(TexMatrix {
            texture,
            _mem: ctx.memory.alloc(w as u64 * h as u64 * layers as u64 * 16),
            view,
            rows,
            cols,
            layer_shift,
            label: label.into(),
        })
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
}
