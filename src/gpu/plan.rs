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
    /// FLOPs per op family ("matmul", "lora", "attention").
    flops_by: Vec<(&'static str, f64)>,
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
            flops_by: Vec::new(),
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
    /// FLOPs the ops of one family reported (`"matmul"`, `"lora"`,
    /// `"attention"`).
    pub fn flops_of(&self, family: &str) -> f64 {
        family_flops(&self.flops_by, family)
    }
    pub(crate) fn add_flops(&mut self, family: &'static str, f: f64) {
        self.flops += f;
        match self.flops_by.iter_mut().find(|(k, _)| *k == family) {
            Some((_, x)) => *x += f,
            None => self.flops_by.push((family, f)),
        }
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
        self.encode_with(encoder, None);
    }

    /// [`Plan::encode`], with a timestamp after each step when `stamps` is
    /// given (a profile: see [`Plan::profile`]).
    fn encode_with(&self, encoder: &mut wgpu::CommandEncoder, stamps: Option<&Stamps>) {
        if let Some(st) = stamps {
            st.write(|qs, i| encoder.write_timestamp(qs, i));
        }
        let mut open: Vec<&str> = Vec::new();
        let mut i = 0;
        while i < self.steps.len() {
            match &self.steps[i] {
                Step::Clear { tensor } => {
                    encoder.clear_buffer(tensor.buffer(), tensor.offset(), Some(tensor.bytes()));
                    if let Some(st) = stamps {
                        st.write(|qs, i| encoder.write_timestamp(qs, i));
                    }
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
                    if let Some(st) = stamps {
                        st.write(|qs, i| encoder.write_timestamp(qs, i));
                    }
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
                        if let Some(st) = stamps {
                            st.write(|qs, i| pass.write_timestamp(qs, i));
                        }
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

    /// Time per kind of step, largest first: (name, seconds, count), for
    /// finding the slow kernels of a schedule (`WGTUNE_PROFILE=1`), never for
    /// a result. It runs the plan's work once more. Where the adapter takes
    /// timestamps inside passes, the plan runs as it always does, in one
    /// submission, with a timestamp after each step; elsewhere each step
    /// runs alone (submit + wait), which adds a submission's cost to each.
    pub fn profile(&self, ctx: &Context) -> Result<Profile> {
        let inside = wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        let kinds = if ctx.features.contains(inside) {
            self.profile_in_place(ctx)?
        } else {
            self.profile_one_by_one(ctx)?
        };
        let mut kinds: Vec<_> = kinds.into_iter().map(|(k, (s, n))| (k, s, n)).collect();
        kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(Profile {
            kinds,
            in_place: ctx.features.contains(inside),
            flops_by: self.flops_by.clone(),
        })
    }

    fn step_name(step: &Step) -> Option<String> {
        match step {
            Step::Dispatch { kernel, .. } => Some(kernel.name.clone()),
            Step::Clear { .. } => Some("clear".into()),
            Step::Copy { .. } => Some("copy_to_texture".into()),
            _ => None,
        }
    }

    fn profile_in_place(&self, ctx: &Context) -> Result<Kinds> {
        let names: Vec<String> = self.steps.iter().filter_map(Self::step_name).collect();
        let stamps = Stamps::new(ctx, names.len() + 1);
        let mut enc = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some(&self.label),
            });
        self.encode_with(&mut enc, Some(&stamps));
        let ticks = stamps.read(ctx, enc)?;
        let period = ctx.queue.get_timestamp_period() as f64 * 1e-9;
        let mut acc = Kinds::default();
        for (name, w) in names.into_iter().zip(ticks.windows(2)) {
            let e = acc.entry(name).or_default();
            e.0 += w[1].saturating_sub(w[0]) as f64 * period;
            e.1 += 1;
        }
        Ok(acc)
    }

    fn profile_one_by_one(&self, ctx: &Context) -> Result<Kinds> {
        let mut acc = Kinds::default();
        for step in &self.steps {
            let Some(name) = Self::step_name(step) else {
                continue;
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
                flops_by: Vec::new(),
                uniforms: Vec::new(),
                packed: Vec::new(),
            };
            let t0 = crate::clock::Stopwatch::start();
            one.run(ctx)?;
            let e = acc.entry(name).or_default();
            e.0 += t0.secs();
            e.1 += 1;
        }
        Ok(acc)
    }

    /// Submit and wait for completion.
    pub fn run(&self, ctx: &Context) -> Result<()> {
        self.submit(ctx)?;
        ctx.sync()
    }
}

type Kinds = std::collections::HashMap<String, (f64, usize)>;

fn family_flops(by: &[(&'static str, f64)], family: &str) -> f64 {
    by.iter()
        .filter(|(f, _)| *f == family)
        .map(|(_, x)| x)
        .sum()
}

/// A profile's time per kind of step: (name, seconds, count), largest first.
pub struct Profile {
    pub kinds: Vec<(String, f64, usize)>,
    /// Timed inside one submission (timestamps), not step by step.
    pub in_place: bool,
    /// The plan's FLOPs per op family (see [`Plan::flops_of`]).
    pub flops_by: Vec<(&'static str, f64)>,
}

impl Profile {
    /// How the steps were timed, for a report's heading.
    pub fn how(&self) -> &'static str {
        if self.in_place {
            "timestamps inside one submission"
        } else {
            "each step run alone"
        }
    }

    /// FLOPs of one op family.
    pub fn flops_of(&self, family: &str) -> f64 {
        family_flops(&self.flops_by, family)
    }

    /// The kernels of an op family, by kernel name: matmul modules are
    /// named `matmul_<variant>::entry`, the others `<family>...::entry`.
    pub fn is_family(name: &str, family: &str) -> bool {
        name.starts_with(family)
    }

    /// Seconds and count of the kinds whose name `pred` accepts.
    pub fn sum(&self, pred: impl Fn(&str) -> bool) -> (f64, usize) {
        self.kinds
            .iter()
            .filter(|k| pred(&k.0))
            .fold((0.0, 0), |(s, n), k| (s + k.1, n + k.2))
    }
}

/// Timestamp queries written one after another, in sets of at most
/// wgpu's per-set maximum.
struct Stamps {
    sets: Vec<wgpu::QuerySet>,
    next: std::cell::Cell<u32>,
    total: u32,
}

const STAMPS_PER_SET: u32 = wgpu::QUERY_SET_MAX_QUERIES;

impl Stamps {
    fn new(ctx: &Context, total: usize) -> Stamps {
        let total = total as u32;
        let sets = (0..total.div_ceil(STAMPS_PER_SET))
            .map(|i| {
                ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("profile timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count: STAMPS_PER_SET.min(total - i * STAMPS_PER_SET),
                })
            })
            .collect();
        Stamps {
            sets,
            next: std::cell::Cell::new(0),
            total,
        }
    }

    /// Write the next timestamp with `f(set, index)`.
    fn write(&self, f: impl FnOnce(&wgpu::QuerySet, u32)) {
        let i = self.next.get();
        if i < self.total {
            f(
                &self.sets[(i / STAMPS_PER_SET) as usize],
                i % STAMPS_PER_SET,
            );
            self.next.set(i + 1);
        }
    }

    /// Resolve the written timestamps at the end of `enc`, submit, and read
    /// them back (ticks).
    fn read(&self, ctx: &Context, mut enc: wgpu::CommandEncoder) -> Result<Vec<u64>> {
        let n = self.next.get() as u64;
        let bytes = (n * 8).max(8);
        let usage = wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC;
        let resolved = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile timestamps"),
            size: bytes,
            usage,
            mapped_at_creation: false,
        });
        let host = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile timestamps (host)"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        for (i, set) in self.sets.iter().enumerate() {
            let first = i as u64 * STAMPS_PER_SET as u64;
            let count = n.saturating_sub(first).min(STAMPS_PER_SET as u64) as u32;
            if count > 0 {
                enc.resolve_query_set(set, 0..count, &resolved, first * 8);
            }
        }
        enc.copy_buffer_to_buffer(&resolved, 0, &host, 0, bytes);
        ctx.queue.submit([enc.finish()]);
        let slice = host.slice(..);
        ctx.map_read(slice, "profile timestamps")?;
        let bytes = slice
            .get_mapped_range()
            .map_err(|e| Error::Gpu {
                context: Some("mapping profile timestamps".into()),
                message: e.to_string(),
            })?
            .to_vec();
        let ticks = bytes
            .chunks_exact(8)
            .take(n as usize)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunk")))
            .collect();
        host.unmap();
        Ok(ticks)
    }
}
