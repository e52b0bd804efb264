//! A plan is a static list of GPU steps, built once and replayed.
//!
//! Bind groups and uniform blocks are created when a step is recorded, because
//! shapes and buffers never change afterwards. `encode` puts consecutive
//! dispatches in one compute pass (WebGPU orders them, so no barriers are
//! needed) and closes the pass only for buffer clears.

use std::sync::Arc;

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::gpu::context::Context;
use crate::gpu::kernels::{Access, Kernel, KernelSpec, Source};
use crate::gpu::tensor::{Tensor, TexFormat, TexMatrix};
use crate::gpu::uniform::Uniform;

enum Step {
    Dispatch {
        kernel: Arc<Kernel>,
        bind_group: wgpu::BindGroup,
        workgroups: [u32; 3],
    },
    Clear {
        tensor: Tensor,
    },
    /// Rows of `src` copied into texture rows starting at (y, layer).
    Copy {
        src: Tensor,
        texture: wgpu::Texture,
        width: u32,
        rows: u32,
        y: u32,
        layer: u32,
    },
    Group(String),
    EndGroup,
}

/// One bound argument, and the operand type of kernels that take either
/// source: a buffer tensor or a packed texture matrix.
#[derive(Clone, Copy)]
pub enum Bind<'a> {
    T(&'a Tensor),
    X(&'a TexMatrix),
    /// The (scale, offset) texture of a block-quantized matrix.
    S(&'a TexMatrix),
}

impl Bind<'_> {
    /// The operand source this argument is read from.
    pub fn source(&self) -> Source {
        match self {
            Bind::T(_) => Source::Storage,
            Bind::X(x) | Bind::S(x) => match x.format() {
                TexFormat::F32 => Source::Texture,
                TexFormat::F16 => Source::TexF16,
                TexFormat::Bf16 => Source::TexBf16,
                TexFormat::Q4 => Source::TexQ4,
                TexFormat::Q8 { sub } => Source::TexQ8 { sub },
            },
        }
    }
}

/// A recorded sequence of dispatches and clears.
pub struct Plan {
    label: String,
    steps: Vec<Step>,
    flops: f64,
    /// The uniform buffers' bytes in `Context::memory`, while the plan lives.
    uniforms: Vec<crate::gpu::context::Allocation>,
    /// Textures that hold a packed copy of a buffer range at this point of
    /// the recording: (texture, buffer, offset, bytes). A later pack of the
    /// same range is skipped (q, k and v read one input); any recorded write
    /// to the buffer or the texture drops the entry, so a pack is never stale.
    packed: Vec<(wgpu::Texture, wgpu::Buffer, u64, u64)>,
}

/// Split `n` workgroups into an x*y grid that respects the per-dimension cap.
/// Kernels recover the flat index as `wg.x + wg.y * nwg.x` and skip ids >= n.
pub fn grid_1d(ctx: &Context, n: u32) -> [u32; 3] {
    let cap = ctx.limits.max_compute_workgroups_per_dimension.max(1);
    if n <= cap {
        [n.max(1), 1, 1]
    } else {
        let y = n.div_ceil(cap);
        [n.div_ceil(y), y, 1]
    }
}

impl Plan {
    pub fn new(label: &str) -> Plan {
        Plan {
            label: label.to_string(),
            steps: Vec::new(),
            flops: 0.0,
            uniforms: Vec::new(),
            packed: Vec::new(),
        }
    }

    /// Whether `dst` holds the rows of `src`, packed earlier in this plan
    /// with no write to either since.
    pub(crate) fn holds_pack(&self, dst: &TexMatrix, src: &Tensor) -> bool {
        self.packed.iter().any(|(t, b, o, n)| {
            t == dst.texture() && b == src.buffer() && *o == src.offset() && *n == src.bytes()
        })
    }

    /// Record that `dst` now holds the rows of `src` (after its pack steps).
    pub(crate) fn note_pack(&mut self, dst: &TexMatrix, src: &Tensor) {
        self.packed.retain(|(t, ..)| t != dst.texture());
        self.packed.push((
            dst.texture().clone(),
            src.buffer().clone(),
            src.offset(),
            src.bytes(),
        ));
    }

    fn wrote_buffer(&mut self, buffer: &wgpu::Buffer) {
        self.packed.retain(|(_, b, ..)| b != buffer);
    }

    fn wrote_texture(&mut self, texture: &wgpu::Texture) {
        self.packed.retain(|(t, ..)| t != texture);
    }

    /// Number of recorded dispatches.
    pub fn dispatches(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Dispatch { .. }))
            .count()
    }

    /// Floating-point operations the ops reported, for benchmarks.
    pub fn flops(&self) -> f64 {
        self.flops
    }
    pub(crate) fn add_flops(&mut self, f: f64) {
        self.flops += f;
    }

    /// Open a debug group (`"layer 3"`), shown by GPU debuggers.
    pub fn push_group(&mut self, name: &str) {
        self.steps.push(Step::Group(name.to_string()));
    }
    pub fn pop_group(&mut self) {
        self.steps.push(Step::EndGroup);
    }

    /// Zero a tensor (a gradient buffer, say) at this point of the plan.
    pub fn clear(&mut self, t: &Tensor) {
        self.wrote_buffer(t.buffer());
        self.steps.push(Step::Clear { tensor: t.clone() });
    }

    /// Copy the `[rows, 4*width]` rows of `src` into `dst` rows y.. of
    /// `layer` (a memcpy; rows must be whole multiples of 256 bytes).
    pub fn copy_to_texture(
        &mut self,
        src: &Tensor,
        dst: &TexMatrix,
        y: u32,
        layer: u32,
    ) -> Result<()> {
        let cols = src.shape().last().copied().unwrap_or(0);
        let rows = src.numel() / cols.max(1);
        if cols % 64 != 0 || !src.offset().is_multiple_of(16) || cols != dst.cols() {
            return Err(Error::invalid(
                "copy_to_texture",
                format!(
                    "`{}` rows cannot be copied into `{}`",
                    src.label(),
                    dst.label()
                ),
            ));
        }
        self.wrote_texture(dst.texture());
        self.steps.push(Step::Copy {
            src: src.clone(),
            texture: dst.texture().clone(),
            width: (cols / 4) as u32,
            rows: rows as u32,
            y,
            layer,
        });
        Ok(())
    }

    /// Record one dispatch of `spec` over buffer `bindings` (in layout order).
    pub fn dispatch(
        &mut self,
        ctx: &Context,
        spec: &KernelSpec,
        params: &impl Uniform,
        bindings: &[&Tensor],
        workgroups: [u32; 3],
    ) -> Result<()> {
        let b: Vec<Bind> = bindings.iter().map(|t| Bind::T(t)).collect();
        self.dispatch_with(ctx, spec, params, &b, workgroups)
    }

    /// Record one dispatch whose arguments may include packed textures.
    pub fn dispatch_with(
        &mut self,
        ctx: &Context,
        spec: &KernelSpec,
        params: &impl Uniform,
        bindings: &[Bind],
        workgroups: [u32; 3],
    ) -> Result<()> {
        let kernel = ctx.kernel(spec)?;
        if bindings.len() + 1 != kernel.num_bindings {
            return Err(Error::invalid(
                kernel.name.clone(),
                format!(
                    "expected {} tensor bindings, got {}",
                    kernel.num_bindings - 1,
                    bindings.len()
                ),
            ));
        }
        let align = ctx.limits.min_storage_buffer_offset_alignment as u64;
        for t in bindings
            .iter()
            .filter_map(|b| if let Bind::T(t) = b { Some(*t) } else { None })
        {
            if t.binding_bytes() > ctx.binding_limit() {
                return Err(Error::Limits {
                    what: format!(
                        "{}: binding tensor `{}` {:?}",
                        kernel.name,
                        t.label(),
                        t.shape()
                    ),
                    need: t.binding_bytes(),
                    have: ctx.binding_limit(),
                });
            }
            if t.offset() % align != 0 {
                return Err(Error::invalid(
                    kernel.name.clone(),
                    format!(
                        "tensor `{}` starts at byte {} which is not {align}-aligned",
                        t.label(),
                        t.offset()
                    ),
                ));
            }
        }
        let mut bytes = bytemuck::bytes_of(params).to_vec();
        // At least 64 bytes, whole 16-byte rows (uniform buffer granularity).
        bytes.resize(bytes.len().max(64).next_multiple_of(16), 0);
        let uniform = ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(&kernel.name),
                contents: &bytes,
                usage: wgpu::BufferUsages::UNIFORM,
            });
        self.uniforms.push(ctx.memory.alloc(bytes.len() as u64));
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        for (i, b) in bindings.iter().enumerate() {
            let resource = match b {
                Bind::T(t) => wgpu::BindingResource::Buffer(t.binding()),
                Bind::X(x) => wgpu::BindingResource::TextureView(x.view()),
                Bind::S(x) => match x.scales_view() {
                    Some(v) => wgpu::BindingResource::TextureView(v),
                    None => {
                        return Err(Error::invalid(
                            kernel.name.clone(),
                            format!("`{}` has no scales to bind", x.label()),
                        ))
                    }
                },
            };
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource,
            });
        }
        let bind_group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&kernel.name),
            layout: &kernel.layout,
            entries: &entries,
        });
        let cap = ctx.limits.max_compute_workgroups_per_dimension;
        if workgroups.iter().any(|&w| w > cap) {
            return Err(Error::invalid(
                kernel.name.clone(),
                format!("grid {workgroups:?} exceeds {cap} per dimension"),
            ));
        }
        for (b, access) in bindings.iter().zip(&spec.layout) {
            match (b, access) {
                (Bind::T(t), Access::ReadWrite) => self.wrote_buffer(t.buffer()),
                (Bind::X(x), Access::StorageTexture) => self.wrote_texture(x.texture()),
                _ => {}
            }
        }
        if workgroups.iter().all(|&w| w > 0) {
            self.steps.push(Step::Dispatch {
                kernel,
                bind_group,
                workgroups,
            });
        }
        Ok(())
    }

    /// Record the plan into `encoder`. Debug groups stay balanced across the
    /// pass breaks that clears force.
    pub fn encode(&self, encoder: &mut wgpu::CommandEncoder) {
        let mut open: Vec<&str> = Vec::new();
        let mut i = 0;
        while i < self.steps.len() {
            match &self.steps[i] {
                Step::Clear { tensor } => {
                    encoder.clear_buffer(tensor.buffer(), tensor.offset(), Some(tensor.bytes()));
                    i += 1;
                    continue;
                }
                Step::Copy {
                    src,
                    texture,
                    width,
                    rows,
                    y,
                    layer,
                } => {
                    encoder.copy_buffer_to_texture(
                        wgpu::TexelCopyBufferInfo {
                            buffer: src.buffer(),
                            layout: wgpu::TexelCopyBufferLayout {
                                offset: src.offset(),
                                bytes_per_row: Some(width * 16),
                                rows_per_image: Some(*rows),
                            },
                        },
                        wgpu::TexelCopyTextureInfo {
                            texture,
                            mip_level: 0,
                            origin: wgpu::Origin3d {
                                x: 0,
                                y: *y,
                                z: *layer,
                            },
                            aspect: wgpu::TextureAspect::All,
                        },
                        wgpu::Extent3d {
                            width: *width,
                            height: *rows,
                            depth_or_array_layers: 1,
                        },
                    );
                    i += 1;
                    continue;
                }
                _ => {}
            }
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(&self.label),
                timestamp_writes: None,
            });
            for g in &open {
                pass.push_debug_group(g);
            }
            while i < self.steps.len() {
                match &self.steps[i] {
                    Step::Clear { .. } | Step::Copy { .. } => break,
                    Step::Dispatch {
                        kernel,
                        bind_group,
                        workgroups,
                    } => {
                        pass.set_pipeline(&kernel.pipeline);
                        pass.set_bind_group(0, bind_group, &[]);
                        pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
                    }
                    Step::Group(name) => {
                        pass.push_debug_group(name);
                        open.push(name);
                    }
                    Step::EndGroup => {
                        if open.pop().is_some() {
                            pass.pop_debug_group();
                        }
                    }
                }
                i += 1;
            }
            for _ in &open {
                pass.pop_debug_group();
            }
        }
    }

    /// Encode and submit in one command buffer (does not wait).
    pub fn submit(&self, ctx: &Context) -> Result<()> {
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some(&self.label),
            });
        self.encode(&mut enc);
        ctx.queue.submit([enc.finish()]);
        ctx.check(&self.label)
    }

    /// Run every step alone (submit + wait) and return the wall time per
    /// kind of step, largest first: (name, seconds, count). For finding the
    /// slow kernels of a schedule (`WGTUNE_PROFILE=1`), never for a result.
    pub fn profile(&self, ctx: &Context) -> Result<Vec<(String, f64, usize)>> {
        let mut acc: std::collections::HashMap<String, (f64, usize)> = Default::default();
        for step in &self.steps {
            let name = match step {
                Step::Dispatch { kernel, .. } => kernel.name.clone(),
                Step::Clear { .. } => "clear".into(),
                Step::Copy { .. } => "copy_to_texture".into(),
                _ => continue,
            };
            let one = Plan {
                label: self.label.clone(),
                steps: vec![match step {
                    Step::Dispatch {
                        kernel,
                        bind_group,
                        workgroups,
                    } => Step::Dispatch {
                        kernel: kernel.clone(),
                        bind_group: bind_group.clone(),
                        workgroups: *workgroups,
                    },
                    Step::Clear { tensor } => Step::Clear {
                        tensor: tensor.clone(),
                    },
                    Step::Copy {
                        src,
                        texture,
                        width,
                        rows,
                        y,
                        layer,
                    } => Step::Copy {
                        src: src.clone(),
                        texture: texture.clone(),
                        width: *width,
                        rows: *rows,
                        y: *y,
                        layer: *layer,
                    },
                    _ => unreachable!(),
                }],
                flops: 0.0,
                uniforms: Vec::new(),
                packed: Vec::new(),
            };
            let t0 = crate::clock::Stopwatch::start();
            one.run(ctx)?;
            let e = acc.entry(name).or_default();
            e.0 += t0.secs();
            e.1 += 1;
        }
        let mut v: Vec<_> = acc.into_iter().map(|(k, (s, n))| (k, s, n)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(v)
    }

    /// Submit and wait for completion.
    pub fn run(&self, ctx: &Context) -> Result<()> {
        self.submit(ctx)?;
        ctx.sync()
    }
}
