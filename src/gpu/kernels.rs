//! Kernel specs and pipeline construction.
//!
//! A kernel is (WGSL module, entry point, override constants, binding layout).
//! Layouts are explicit: binding 0 is the uniform block (`gpu::uniform`),
//! then one binding per tensor argument in the Rust wrapper's order
//! (outputs first).
//! Pipelines are built once per spec and cached in the `Context`.

use std::borrow::Cow;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::context::Context;

/// `shaders/common.wgsl`, prepended to every op-family module.
pub const COMMON: &str = include_str!("../../shaders/common.wgsl");

/// The op-family sources, `(name, text)`. Each is used as `COMMON + text`.
/// `matmul.wgsl` and `attention.wgsl` are not listed: they are templates
/// that `ops::matmul` and `ops::attention` instantiate per variant.
pub const FAMILIES: &[(&str, &str)] = &[
    ("embedding", include_str!("../../shaders/embedding.wgsl")),
    ("norm", include_str!("../../shaders/norm.wgsl")),
    ("rope", include_str!("../../shaders/rope.wgsl")),
    ("activation", include_str!("../../shaders/activation.wgsl")),
    ("loss", include_str!("../../shaders/loss.wgsl")),
    ("lora", include_str!("../../shaders/lora.wgsl")),
    ("adamw", include_str!("../../shaders/adamw.wgsl")),
    ("copy", include_str!("../../shaders/copy.wgsl")),
];

/// The full module text of an op family (common prelude included).
pub fn family_source(family: &str) -> Option<String> {
    FAMILIES
        .iter()
        .find(|(n, _)| *n == family)
        .map(|(_, s)| format!("{COMMON}\n{s}"))
}

/// How an argument is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// Read-only storage buffer.
    Read,
    /// Read-write storage buffer.
    ReadWrite,
    /// `texture_2d_array<f32>` read with `textureLoad` (a packed matrix).
    Texture,
    /// `texture_2d_array<u32>` read with `textureLoad` (compact weights).
    TextureUint,
    /// `texture_storage_2d_array<rgba32float, write>` (packing target).
    StorageTexture,
}

/// Where a kernel reads a matrix operand from. Kernel bodies are written
/// once; the WGSL reaches an operand through functions named after its
/// source's [`Source::tag`], so another source (f16, block-quantized) adds a
/// variant here and its loaders in the shader, not another body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// A storage buffer (`Tensor`).
    Storage,
    /// A packed rgba32float texture (`TexMatrix`).
    Texture,
    /// bf16 bits, 8 per rgba32uint texel (weights only).
    TexBf16,
    /// f16 bits, 8 per rgba32uint texel (weights only).
    TexF16,
    /// 4-bit quants with (scale, offset) per 32 (weights only).
    TexQ4,
    /// 8-bit quants with (scale, offset) per `sub` elements (weights only).
    TexQ8 { sub: u32 },
}

impl Source {
    /// Suffix of the source's WGSL functions.
    pub fn tag(self) -> &'static str {
        match self {
            Source::Storage => "st",
            Source::Texture => "tx",
            Source::TexBf16 => "tb",
            Source::TexF16 => "th",
            Source::TexQ4 | Source::TexQ8 { .. } => "tq",
        }
    }
    /// Part of module names: distinct for every source.
    pub fn name(self) -> String {
        match self {
            Source::TexQ4 => "q4".into(),
            Source::TexQ8 { sub } => format!("q8s{sub}"),
            s => s.tag().into(),
        }
    }
    /// How an operand of this source is bound for reading.
    pub fn access(self) -> Access {
        match self {
            Source::Storage => Access::Read,
            Source::Texture => Access::Texture,
            Source::TexBf16 | Source::TexF16 | Source::TexQ4 | Source::TexQ8 { .. } => {
                Access::TextureUint
            }
        }
    }
    /// Whether the operand is a texture.
    pub fn is_texture(self) -> bool {
        self != Source::Storage
    }
    /// Whether the operand has a second (scale, offset) texture.
    pub fn has_scales(self) -> bool {
        matches!(self, Source::TexQ4 | Source::TexQ8 { .. })
    }
    /// (bits, elements per scale) of quantized sources, for the template.
    pub fn quant(self) -> (u32, u32) {
        match self {
            Source::TexQ4 => (4, 32),
            Source::TexQ8 { sub } => (8, sub),
            _ => (8, 32),
        }
    }
}

/// The WGSL text of a [`KernelSpec`], made only when its pipeline is built:
/// a generated matmul module is tens of KB of text, and making it for every
/// recorded dispatch cost most of the recording of a prompt's plan.
#[derive(Clone)]
pub enum SpecSource {
    /// `COMMON` + one of the `shaders/` families.
    Family(&'static str),
    /// A generated module (the module name identifies it).
    Generated(Arc<dyn Fn() -> Result<String> + Send + Sync>),
}

impl SpecSource {
    /// The complete WGSL text.
    pub fn text(&self) -> Result<String> {
        match self {
            SpecSource::Family(f) => family_source(f)
                .ok_or_else(|| Error::invalid("kernel", format!("unknown shader family `{f}`"))),
            SpecSource::Generated(make) => make(),
        }
    }
}

impl std::fmt::Debug for SpecSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpecSource::Family(name) => write!(f, "Family({name})"),
            SpecSource::Generated(_) => write!(f, "Generated"),
        }
    }
}

/// Everything that identifies a pipeline.
#[derive(Clone, Debug)]
pub struct KernelSpec {
    /// Module name for the cache key and labels (`"matmul"` or a generated variant name).
    pub module: Cow<'static, str>,
    /// The WGSL text, made on a pipeline-cache miss.
    pub source: SpecSource,
    pub entry: &'static str,
    pub constants: Vec<(&'static str, f64)>,
    /// Access of bindings 1.. (binding 0 is always the uniform).
    pub layout: Vec<Access>,
}

impl KernelSpec {
    /// A kernel from one of the `shaders/` families.
    pub fn family(family: &'static str, entry: &'static str, layout: &[Access]) -> Result<Self> {
        if !FAMILIES.iter().any(|(n, _)| *n == family) {
            return Err(Error::invalid(
                "kernel",
                format!("unknown shader family `{family}`"),
            ));
        }
        Ok(KernelSpec {
            module: Cow::Borrowed(family),
            source: SpecSource::Family(family),
            entry,
            constants: Vec::new(),
            layout: layout.to_vec(),
        })
    }

    /// Set an `override` constant.
    pub fn with(mut self, name: &'static str, value: f64) -> Self {
        self.constants.push((name, value));
        self
    }

    pub(crate) fn key(&self) -> String {
        let c: Vec<String> = self
            .constants
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        let l: String = self
            .layout
            .iter()
            .map(|a| match a {
                Access::Read => 'r',
                Access::ReadWrite => 'w',
                Access::Texture => 't',
                Access::TextureUint => 'u',
                Access::StorageTexture => 's',
            })
            .collect();
        format!("{}::{}[{}]{}", self.module, self.entry, c.join(","), l)
    }
}

/// A built compute pipeline with its bind-group layout.
pub struct Kernel {
    pub name: String,
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    pub num_bindings: usize,
}

pub(crate) fn build(ctx: &Context, spec: &KernelSpec) -> Result<Kernel> {
    let name = format!("{}::{}", spec.module, spec.entry);
    let started = crate::clock::Stopwatch::start();
    let dev = &ctx.device;
    let scope = dev.push_error_scope(wgpu::ErrorFilter::Validation);
    let desc = wgpu::ShaderModuleDescriptor {
        label: Some(&name),
        source: wgpu::ShaderSource::Wgsl(Cow::Owned(spec.source.text()?)),
    };
    let module = dev.create_shader_module(desc);
    let mut entries = vec![wgpu::BindGroupLayoutEntry {
        binding: 0,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }];
    for (i, a) in spec.layout.iter().enumerate() {
        let ty = match a {
            Access::Read | Access::ReadWrite => wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage {
                    read_only: *a == Access::Read,
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            Access::Texture => wgpu::BindingType::Texture {
                sample_type: wgpu::TextureSampleType::Float { filterable: false },
                view_dimension: wgpu::TextureViewDimension::D2Array,
                multisampled: false,
            },
            Access::TextureUint => wgpu::BindingType::Texture {
                sample_type: wgpu::TextureSampleType::Uint,
                view_dimension: wgpu::TextureViewDimension::D2Array,
                multisampled: false,
            },
            Access::StorageTexture => wgpu::BindingType::StorageTexture {
                access: wgpu::StorageTextureAccess::WriteOnly,
                format: wgpu::TextureFormat::Rgba32Float,
                view_dimension: wgpu::TextureViewDimension::D2Array,
            },
        };
        entries.push(wgpu::BindGroupLayoutEntry {
            binding: i as u32 + 1,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty,
            count: None,
        });
    }
    let layout = dev.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(&name),
        entries: &entries,
    });
    let pl = dev.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(&name),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let pipeline = dev.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(&name),
        layout: Some(&pl),
        module: &module,
        entry_point: Some(spec.entry),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants: &spec.constants,
            // Every kernel writes its workgroup arrays before reading them.
            zero_initialize_workgroup_memory: false,
        },
        cache: ctx.pipeline_cache(),
    });
    if let Some(e) = crate::gpu::context::block_on(scope.pop()) {
        return Err(Error::Shader {
            kernel: name,
            message: e.to_string(),
        });
    }
    // The full key tells apart variants that share a name (constants, layout).
    log::debug!(
        "built kernel {} in {:.0} ms",
        spec.key(),
        started.secs() * 1e3
    );
    Ok(Kernel {
        name,
        pipeline,
        layout,
        num_bindings: spec.layout.len() + 1,
    })
}
