//! The GPU context: adapter choice, device with the adapter's real limits and
//! optional features, error capture, and the pipeline cache.
//!
//! Everything GPU-side takes `&Context`, so tests and the CLI share one device.
//!
//! Every blocking wait for the GPU lives here: [`block_on`] for wgpu's
//! futures, [`Context::sync`] for submitted work and [`Context::map_read`]
//! for buffer readback. The rest of `gpu` never blocks on its own.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::gpu::kernels::{self, Kernel};
use crate::gpu::tensor::TexMatrix;

/// How to pick and open the device. Empty fields fall back to the ranking
/// discrete > integrated > virtual > software. The library reads no
/// environment variable itself: [`ContextOptions::from_env`] takes wgpu's
/// `WGPU_BACKEND` / `WGPU_ADAPTER_NAME` for those who want them (the
/// command line does it through clap's `env`).
#[derive(Clone, Debug, Default)]
pub struct ContextOptions {
    /// `vulkan`, `metal`, `dx12` or `gl` (a comma list is accepted).
    pub backend: Option<String>,
    /// Case-insensitive substring of the adapter name.
    pub adapter: Option<String>,
    /// Pretend storage bindings are capped at this many bytes. Tests use it to
    /// prove that large tensors are processed in row chunks.
    pub max_binding_bytes: Option<u64>,
    /// Ignore `Features::SUBGROUP` even when present (portable kernel path).
    pub disable_subgroups: bool,
    /// Read matmul and attention operands from storage buffers instead of
    /// packed textures.
    pub disable_textures: bool,
    /// Force a matmul kernel family; `None` picks from the adapter
    /// ([`MatmulKernel`]), or from `WGTUNE_MATMUL_KERNEL` when set.
    pub matmul_kernel: Option<MatmulKernel>,
    /// Folder of the on-disk pipeline cache (`<key>.bin` per adapter kind),
    /// read at start and written by [`Context::save_pipeline_cache`]. `None`:
    /// pipelines are compiled afresh in every process.
    pub pipeline_cache_dir: Option<PathBuf>,
    /// Force the lanes per 8-row set of the one-row forward over wide
    /// texels (a power of two up to the subgroup size; see
    /// `ops::matmul::gemv_wide_shape`); `None`: `WGTUNE_GEMV_LPR`, else
    /// chosen per shape.
    pub gemv_lanes: Option<u32>,
}

/// The two matmul kernel families (docs/hardware-kernels.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulKernel {
    /// Register tiles, no workgroup memory: shaped for software adapters,
    /// where workgroup memory costs as much as a global load.
    Register,
    /// Workgroup-memory tiles staged per K-step: for hardware GPUs.
    Tiled,
}

impl MatmulKernel {
    /// `register` or `tiled` (the `WGTUNE_MATMUL_KERNEL` values).
    pub fn parse(s: &str) -> Option<MatmulKernel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "register" => Some(MatmulKernel::Register),
            "tiled" => Some(MatmulKernel::Tiled),
            _ => None,
        }
    }
}

impl ContextOptions {
    /// The defaults with `backend` and `adapter` from wgpu's `WGPU_BACKEND`
    /// and `WGPU_ADAPTER_NAME` variables (empty ones ignored).
    pub fn from_env() -> ContextOptions {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        ContextOptions {
            backend: var("WGPU_BACKEND"),
            adapter: var("WGPU_ADAPTER_NAME"),
            ..Default::default()
        }
    }
}

/// Workgroup invocations and bytes of workgroup memory the tiled matmul
/// needs at most (16 x 16 invocations; two 16-deep tiles of up to 128 rows).
pub const TILED_INVOCATIONS: u32 = 256;
pub const TILED_WORKGROUP_BYTES: u32 = 2 * 16 * 128 * 4;

/// The matmul family: the forced one (option, else `WGTUNE_MATMUL_KERNEL`),
/// otherwise tiled on hardware whose limits allow it and register on
/// software adapters. A tiled kernel the limits cannot hold falls back to
/// register with a warning.
fn choose_matmul_kernel(
    forced: Option<MatmulKernel>,
    env: Option<String>,
    software: bool,
    limits: &wgpu::Limits,
) -> MatmulKernel {
    let forced = forced.or_else(|| {
        let v = env.filter(|v| !v.is_empty())?;
        let k = MatmulKernel::parse(&v);
        if k.is_none() {
            log::warn!("WGTUNE_MATMUL_KERNEL={v} ignored: expected `register` or `tiled`");
        }
        k
    });
    let fits = limits.max_compute_invocations_per_workgroup >= TILED_INVOCATIONS
        && limits.max_compute_workgroup_size_x >= TILED_INVOCATIONS
        && limits.max_compute_workgroup_storage_size >= TILED_WORKGROUP_BYTES;
    match forced {
        Some(MatmulKernel::Tiled) if !fits => {
            log::warn!(
                "tiled matmul needs {TILED_INVOCATIONS} invocations and {TILED_WORKGROUP_BYTES} B of workgroup memory; using the register kernels"
            );
            MatmulKernel::Register
        }
        Some(k) => k,
        None if !software && fits => MatmulKernel::Tiled,
        None => MatmulKernel::Register,
    }
}

/// One adapter as `wgtune devices` lists it.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
}

/// Device, queue and the kernels built on them.
pub struct Context {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    binding_limit: u64,
    subgroup_size: Option<u32>,
    textures: bool,
    matmul_kernel: MatmulKernel,
    gemv_lanes: Option<u32>,
    pipelines: Mutex<HashMap<String, Arc<Kernel>>>,
    /// The driver's pipeline cache, when the adapter has one and a folder
    /// was given.
    disk_cache: Option<DiskCache>,
    /// Pipelines built and nanoseconds spent building them.
    built: AtomicUsize,
    build_nanos: AtomicU64,
    /// Packed copies of activation operands, one per (columns, slot), shared
    /// by every plan (see [`Context::scratch_texture`]).
    scratch: Mutex<HashMap<(usize, usize), Arc<TexMatrix>>>,
    /// Rows to give a new scratch texture at least (the largest batch).
    scratch_rows: std::sync::atomic::AtomicUsize,
    /// Errors raised outside an error scope (validation, device lost); the
    /// next `check()` turns them into `Error::Gpu`.
    pending: Arc<Mutex<Vec<String>>>,
    /// Bytes of every buffer and texture wgtune has created and not dropped.
    pub memory: Arc<MemoryCounter>,
}

/// The driver pipeline cache and the file it is loaded from and saved to.
struct DiskCache {
    cache: wgpu::PipelineCache,
    path: PathBuf,
    /// Bytes of driver data loaded at start (0: none, or rejected).
    loaded: u64,
    /// [`Context::built`] at the last save (or at start).
    saved_at: AtomicUsize,
    /// Checksum of the driver bytes in the file as last loaded or saved
    /// (0: none), so that an unchanged cache is not rewritten, while one
    /// wgpu silently refused is.
    on_disk: AtomicU64,
}

/// Pipeline build counts and times, for speed reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PipelineStats {
    /// Distinct pipelines built by this context.
    pub built: usize,
    /// Seconds spent building them: WGSL translation and what the driver
    /// compiles at creation (lavapipe compiles at first dispatch instead).
    pub build_secs: f64,
    /// The on-disk cache file, when one is in use.
    pub cache_file: Option<PathBuf>,
    /// Bytes of driver cache data loaded from it at start (0: none).
    pub cache_loaded_bytes: u64,
}

/// Our wrapper around the driver's cache bytes: wgpu checks its own header
/// (version, adapter, driver, length) but not the contents, and a driver
/// may trust them, so a checksum keeps a damaged file out.
const CACHE_MAGIC: &[u8; 8] = b"WGTPC\0\0\x01";

/// FNV-1a, 64 bits: enough to catch a damaged file, no dependency.
fn fnv1a(bytes: &[u8]) -> u64 {
    crate::hash::fnv1a(crate::hash::FNV_OFFSET, bytes)
}

fn wrap_cache(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 24);
    out.extend_from_slice(CACHE_MAGIC);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv1a(data).to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// The driver bytes of a file written by [`wrap_cache`], or why not.
fn unwrap_cache(file: &[u8]) -> std::result::Result<&[u8], &'static str> {
    if file.len() < 24 || &file[..8] != CACHE_MAGIC {
        return Err("not a wgtune pipeline cache");
    }
    let word = |i: usize| {
        u64::from_le_bytes(
            file[i..i + 8]
                .try_into()
                .expect("invariant: an 8-byte slice"),
        )
    };
    let data = &file[24..];
    if word(8) != data.len() as u64 {
        return Err("truncated or extended");
    }
    if word(16) != fnv1a(data) {
        return Err("checksum mismatch");
    }
    Ok(data)
}

/// Live and peak bytes of GPU buffers and textures, counted where they are
/// created (tensor.rs, plan.rs) and released when the last handle drops.
#[derive(Debug, Default)]
pub struct MemoryCounter {
    live: std::sync::atomic::AtomicU64,
    peak: std::sync::atomic::AtomicU64,
}

impl MemoryCounter {
    /// Count `bytes` as allocated until the returned guard drops.
    pub fn alloc(self: &Arc<Self>, bytes: u64) -> Allocation {
        use std::sync::atomic::Ordering::Relaxed;
        let live = self.live.fetch_add(bytes, Relaxed) + bytes;
        self.peak.fetch_max(live, Relaxed);
        Allocation {
            bytes,
            counter: self.clone(),
        }
    }

    /// Bytes allocated now.
    pub fn live(&self) -> u64 {
        self.live.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The most bytes allocated at once since the last [`Self::reset_peak`].
    pub fn peak(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Start a new peak from what is allocated now.
    pub fn reset_peak(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.peak.store(self.live.load(Relaxed), Relaxed);
    }
}

/// One counted buffer or texture; uncounts it on drop.
#[derive(Debug)]
pub struct Allocation {
    bytes: u64,
    counter: Arc<MemoryCounter>,
}

impl Allocation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        self.counter
            .live
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The backends to search. By default Vulkan, Metal and DX12 only: OpenGL
/// lacks what the kernels need to be fast, and probing it on a headless
/// machine logs EGL errors. It is tried when nothing else exists, or on request.
fn backends_from(opt: Option<&str>) -> Result<wgpu::Backends> {
    match opt {
        None => Ok(wgpu::Backends::PRIMARY),
        Some(list) => {
            let mut b = wgpu::Backends::empty();
            for name in list.split(',') {
                b |= match name.trim().to_ascii_lowercase().as_str() {
                    "vulkan" | "vk" => wgpu::Backends::VULKAN,
                    "metal" | "mtl" => wgpu::Backends::METAL,
                    "dx12" | "d3d12" => wgpu::Backends::DX12,
                    "gl" | "gles" | "opengl" => wgpu::Backends::GL,
                    other => {
                        return Err(Error::invalid(
                            "backend",
                            format!(
                                "unknown backend `{other}`; expected vulkan, metal, dx12 or gl"
                            ),
                        ))
                    }
                };
            }
            Ok(b)
        }
    }
}

fn rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

/// Every adapter of the chosen backends, best first.
pub fn list_adapters(backend: Option<&str>) -> Result<Vec<AdapterSummary>> {
    let mut adapters = enumerate(backends_from(backend)?);
    adapters.sort_by_key(|a| rank(a.get_info().device_type));
    Ok(adapters
        .into_iter()
        .map(|a| AdapterSummary {
            info: a.get_info(),
            limits: a.limits(),
            features: a.features(),
        })
        .collect())
}

/// The adapters of `backends`; when the default (primary) backends have
/// none, OpenGL's.
fn enumerate(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    let found = block_on(instance(backends).enumerate_adapters(backends));
    if found.is_empty() && backends == wgpu::Backends::PRIMARY {
        let gl = wgpu::Backends::GL;
        return block_on(instance(gl).enumerate_adapters(gl));
    }
    found
}

/// Wait for one of wgpu's futures (adapter and device requests, error
/// scopes) on the calling thread.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    pollster::block_on(f)
}

/// A driver pipeline cache seeded from `path` when it holds a usable file.
/// Anything wrong with the file (missing, damaged, from another driver
/// version) is logged and costs only a cold compile.
fn open_disk_cache(device: &wgpu::Device, path: PathBuf) -> DiskCache {
    let file = match std::fs::read(&path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            log::warn!("pipeline cache {}: {e}; starting empty", path.display());
            None
        }
    };
    let data = file.as_deref().and_then(|f| {
        unwrap_cache(f)
            .map_err(|why| log::warn!("pipeline cache {}: {why}; starting empty", path.display()))
            .ok()
    });
    let create = |data: Option<&[u8]>| {
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        // SAFETY: `data` is only ever bytes that `PipelineCache::get_data`
        // returned (written by `save_pipeline_cache`, checked by our
        // checksum); wgpu validates its header against this adapter and
        // driver and, with `fallback`, ignores data it cannot use.
        let cache = unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("wgtune"),
                data,
                fallback: true,
            })
        };
        (cache, block_on(scope.pop()))
    };
    let (mut cache, err) = create(data);
    let mut loaded = data.map_or(0, |d| d.len() as u64);
    if let Some(e) = err {
        // Data from another device of the same key: start an empty cache.
        log::warn!("pipeline cache {}: {e}; starting empty", path.display());
        (cache, _) = create(None);
        loaded = 0;
    }
    // wgpu drops data it cannot use (outdated driver, damaged header)
    // without telling: then the cache starts smaller than what was given.
    if loaded > 0 && cache.get_data().map_or(0, |d| d.len() as u64) < loaded {
        log::info!(
            "pipeline cache {}: not usable with this driver; starting empty",
            path.display()
        );
        loaded = 0;
    }
    if loaded > 0 {
        log::info!(
            "pipeline cache: loaded {loaded} bytes from {}",
            path.display()
        );
    }
    DiskCache {
        cache,
        path,
        loaded,
        saved_at: AtomicUsize::new(0),
        on_disk: AtomicU64::new(data.map_or(0, fnv1a)),
    }
}

impl Context {
    /// Open the best adapter (see [`ContextOptions`]).
    pub fn new(opts: &ContextOptions) -> Result<Context> {
        let backends = backends_from(opts.backend.as_deref())?;
        let want = opts.adapter.as_ref().map(|s| s.to_lowercase());
        let mut adapters = enumerate(backends);
        if adapters.is_empty() {
            return Err(Error::NoAdapter(String::new()));
        }
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        if let Some(w) = &want {
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(w));
            if adapters.is_empty() {
                return Err(Error::NoAdapter(format!(
                    " whose name contains `{w}`; available: {}",
                    names.join(", ")
                )));
            }
        }
        // Stable sort: within a rank the backend order wgpu reports is kept.
        adapters.sort_by_key(|a| rank(a.get_info().device_type));
        let adapter = adapters.swap_remove(0);
        let info = adapter.get_info();
        log::info!(
            "adapter: {} ({:?}, {:?}, driver {} {})",
            info.name,
            info.backend,
            info.device_type,
            info.driver,
            info.driver_info
        );
        if info.device_type == wgpu::DeviceType::Cpu {
            log::warn!(
                "only a software adapter ({}) is in use: everything will work, but slowly",
                info.name
            );
        }

        let wanted = wgpu::Features::SUBGROUP
            | wgpu::Features::SHADER_F16
            | wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
            | wgpu::Features::PIPELINE_CACHE;
        let features = adapter.features() & wanted;
        // The adapter's real limits, not wgpu's WebGPU defaults (128 MiB
        // bindings, 8 storage buffers, 16 KiB workgroup memory).
        let limits = adapter.limits();
        let (device, queue) = block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("wgtune"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::RequestDevice {
            adapter: info.name.clone(),
            message: e.to_string(),
        })?;

        let pending = Arc::new(Mutex::new(Vec::new()));
        let sink = pending.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            log::error!("wgpu: {e}");
            if let Ok(mut p) = sink.lock() {
                p.push(e.to_string());
            }
        }));
        let lost = pending.clone();
        device.set_device_lost_callback(move |reason, msg| {
            if reason != wgpu::DeviceLostReason::Destroyed {
                if let Ok(mut p) = lost.lock() {
                    p.push(format!("device lost ({reason:?}): {msg}"));
                }
            }
        });

        let mut binding_limit = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        if let Some(b) = opts.max_binding_bytes {
            binding_limit = binding_limit.min(b);
        }
        let env_off = std::env::var("WGTUNE_NO_SUBGROUPS").is_ok_and(|v| v == "1");
        let subgroup_size = (features.contains(wgpu::Features::SUBGROUP)
            && !opts.disable_subgroups
            && !env_off
            && info.subgroup_min_size == info.subgroup_max_size
            && info.subgroup_min_size >= 4
            && info.subgroup_min_size <= 64)
            .then_some(info.subgroup_min_size);
        let software = info.device_type == wgpu::DeviceType::Cpu;
        let env_kernel = std::env::var("WGTUNE_MATMUL_KERNEL").ok();
        let matmul_kernel = choose_matmul_kernel(opts.matmul_kernel, env_kernel, software, &limits);
        log::info!(
            "limits: storage binding {} MiB (using {} B), buffer {} MiB, workgroup storage {} KiB, {} storage buffers/stage; subgroups: {}; matmul: {:?}",
            limits.max_storage_buffer_binding_size >> 20,
            binding_limit,
            limits.max_buffer_size >> 20,
            limits.max_compute_workgroup_storage_size >> 10,
            limits.max_storage_buffers_per_shader_stage,
            subgroup_size.map(|s| format!("fixed size {s}")).unwrap_or_else(|| "off".into()),
            matmul_kernel,
        );
        // wgpu's GL backend fixes a texture's view dimension from its layer
        // count at creation, so the one-layer `D2Array` views of every
        // texture operand read wrong there (garbage logits, no error):
        // operands stay in storage buffers on GL.
        let gl = info.backend == wgpu::Backend::Gl;
        if gl {
            log::info!("GL backend: matmul operands in storage buffers (no texture operands)");
            if info.device_type == wgpu::DeviceType::Cpu {
                // Measured: a LoRA step 25.6 tok/s on GL, 64.7 on lavapipe.
                log::warn!(
                    "running on wgpu's GL backend, 2-3x slower than Mesa's Vulkan driver here (Debian/Ubuntu: apt-get install mesa-vulkan-drivers)"
                );
            }
        }
        let disk_cache = opts
            .pipeline_cache_dir
            .as_ref()
            .filter(|_| features.contains(wgpu::Features::PIPELINE_CACHE))
            .and_then(|dir| {
                let key = wgpu::util::pipeline_cache_key(&info)?;
                Some(open_disk_cache(&device, dir.join(format!("{key}.bin"))))
            });
        if opts.pipeline_cache_dir.is_some() && disk_cache.is_none() {
            log::info!("pipeline cache: not supported by this adapter");
        }
        Ok(Context {
            disk_cache,
            built: AtomicUsize::new(0),
            build_nanos: AtomicU64::new(0),
            device,
            queue,
            info,
            limits,
            features,
            binding_limit,
            subgroup_size,
            matmul_kernel,
            gemv_lanes: opts.gemv_lanes.or_else(|| {
                std::env::var("WGTUNE_GEMV_LPR")
                    .ok()
                    .and_then(|v| v.parse().ok())
            }),
            textures: !gl
                && !opts.disable_textures
                && !std::env::var("WGTUNE_NO_TEXTURES").is_ok_and(|v| v == "1"),
            pipelines: Mutex::new(HashMap::new()),
            scratch: Mutex::new(HashMap::new()),
            scratch_rows: Default::default(),
            pending,
            memory: Arc::default(),
        })
    }

    /// Largest byte range one storage binding may cover on this context.
    pub fn binding_limit(&self) -> u64 {
        self.binding_limit
    }

    /// The fixed subgroup size when subgroup kernels may be used.
    pub fn subgroup_size(&self) -> Option<u32> {
        self.subgroup_size
    }

    /// Whether matmuls may read their operands from packed textures.
    pub fn textures(&self) -> bool {
        self.textures
    }

    /// The matmul kernel family this context uses (see [`MatmulKernel`]).
    pub fn matmul_kernel(&self) -> MatmulKernel {
        self.matmul_kernel
    }

    /// The forced lanes per set of the one-row forward, if any.
    pub fn gemv_lanes(&self) -> Option<u32> {
        self.gemv_lanes
    }

    /// Whether the adapter is a CPU implementation (lavapipe, WARP, SwiftShader).
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Turn errors that wgpu raised outside a scope into an `Error`.
    pub fn check(&self, context: &str) -> Result<()> {
        let mut p = self
            .pending
            .lock()
            .expect("invariant: error sink lock is held only to push/drain, never poisoned");
        if p.is_empty() {
            return Ok(());
        }
        let message = p.drain(..).collect::<Vec<_>>().join("; ");
        Err(Error::Gpu {
            context: Some(context.to_string()),
            message,
        })
    }

    /// Block until all submitted work is done, then report any GPU error.
    pub fn sync(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu {
                context: Some("poll".into()),
                message: e.to_string(),
            })?;
        self.check("sync")
    }

    /// Map `slice` for reading and wait until it is mapped (`what` names the
    /// buffer in errors).
    pub(crate) fn map_read(&self, slice: wgpu::BufferSlice<'_>, what: &str) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.sync()?;
        let err = |message: String| Error::Gpu {
            context: Some(format!("reading `{what}`")),
            message,
        };
        rx.recv()
            .map_err(|e| err(e.to_string()))?
            .map_err(|e| err(e.to_string()))
    }

    /// A texture of at least `rows` x `cols` for a packed copy of an
    /// activation operand. A packed copy is read only by the dispatch right
    /// after its pack and the queue orders dispatches, so one texture per
    /// width serves every matmul of every plan; `slot` tells apart the
    /// operands one dispatch reads together. A request for more rows
    /// replaces the pool's texture (plans recorded earlier keep theirs).
    pub fn scratch_texture(&self, rows: usize, cols: usize, slot: usize) -> Result<Arc<TexMatrix>> {
        let mut pool = self
            .scratch
            .lock()
            .expect("invariant: scratch lock is held only for a get/insert, never poisoned");
        if let Some(t) = pool.get(&(cols, slot)) {
            if t.rows() >= rows {
                return Ok(t.clone());
            }
        }
        let hint = self.scratch_rows.load(std::sync::atomic::Ordering::Relaxed);
        let want = if hint >= rows && TexMatrix::fits(self, hint, cols) {
            hint
        } else {
            rows
        };
        let t = Arc::new(TexMatrix::new(
            self,
            want,
            cols,
            &format!("scratch.{cols}.{slot}"),
        )?);
        pool.insert((cols, slot), t.clone());
        Ok(t)
    }

    /// Size scratch textures made from now on for `rows` rows (the largest
    /// batch a run will see), so that every plan shares them.
    pub fn reserve_scratch_rows(&self, rows: usize) {
        self.scratch_rows
            .fetch_max(rows, std::sync::atomic::Ordering::Relaxed);
    }

    /// The driver pipeline cache new pipelines go through, if any.
    pub(crate) fn pipeline_cache(&self) -> Option<&wgpu::PipelineCache> {
        self.disk_cache.as_ref().map(|c| &c.cache)
    }

    /// Pipelines built so far and the time spent on them.
    pub fn pipeline_stats(&self) -> PipelineStats {
        PipelineStats {
            built: self.built.load(Ordering::Relaxed),
            build_secs: self.build_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            cache_file: self.disk_cache.as_ref().map(|c| c.path.clone()),
            cache_loaded_bytes: self.disk_cache.as_ref().map_or(0, |c| c.loaded),
        }
    }

    /// Write the driver's pipeline cache to its file when pipelines were
    /// built since the last save. Best effort: a failure is a logged warning,
    /// since it only costs the next process a cold compile. Returns the bytes
    /// written. The write is atomic, so processes saving at once are safe
    /// (the last rename wins).
    pub fn save_pipeline_cache(&self) -> Option<usize> {
        let dc = self.disk_cache.as_ref()?;
        let built = self.built.load(Ordering::Relaxed);
        if dc.saved_at.swap(built, Ordering::Relaxed) == built {
            return None;
        }
        let data = dc.cache.get_data()?;
        let sum = fnv1a(&data);
        if dc.on_disk.load(Ordering::Relaxed) == sum {
            log::debug!("pipeline cache: nothing new to save");
            return None;
        }
        let write = || -> Result<()> {
            if let Some(dir) = dc.path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
            crate::fsio::write_atomic(&dc.path, &wrap_cache(&data))
        };
        match write() {
            Ok(()) => {
                dc.on_disk.store(sum, Ordering::Relaxed);
                log::info!(
                    "pipeline cache: saved {} bytes to {}",
                    data.len(),
                    dc.path.display()
                );
                Some(data.len())
            }
            Err(e) => {
                log::warn!("pipeline cache not saved: {e}");
                None
            }
        }
    }

    /// The cached pipeline for `spec`, built on first use.
    pub fn kernel(&self, spec: &kernels::KernelSpec) -> Result<Arc<Kernel>> {
        let key = spec.key();
        if let Some(k) = self
            .pipelines
            .lock()
            .expect("invariant: pipeline lock is held only for a get/insert, never poisoned")
            .get(&key)
        {
            return Ok(k.clone());
        }
        let started = crate::clock::Stopwatch::start();
        let k = Arc::new(kernels::build(self, spec)?);
        self.built.fetch_add(1, Ordering::Relaxed);
        self.build_nanos
            .fetch_add((started.secs() * 1e9) as u64, Ordering::Relaxed);
        self.pipelines
            .lock()
            .expect("invariant: pipeline lock is held only for a get/insert, never poisoned")
            .insert(key, k.clone());
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MatmulKernel::{Register, Tiled};

    #[test]
    fn matmul_kernel_from_device_type_limits_option_and_env() {
        let ok = wgpu::Limits::default();
        let small = wgpu::Limits {
            max_compute_workgroup_storage_size: 8192,
            ..ok.clone()
        };
        let env = |v: &str| Some(v.to_string());
        // Device type and limits.
        assert_eq!(choose_matmul_kernel(None, None, false, &ok), Tiled);
        assert_eq!(choose_matmul_kernel(None, None, true, &ok), Register);
        assert_eq!(choose_matmul_kernel(None, None, false, &small), Register);
        // The option wins over the variable; the variable over the default.
        assert_eq!(
            choose_matmul_kernel(Some(Tiled), env("register"), true, &ok),
            Tiled
        );
        assert_eq!(choose_matmul_kernel(None, env("tiled"), true, &ok), Tiled);
        assert_eq!(
            choose_matmul_kernel(None, env(" Register"), false, &ok),
            Register
        );
        // Unknown or empty values are ignored (with a warning).
        assert_eq!(choose_matmul_kernel(None, env("fast"), true, &ok), Register);
        assert_eq!(choose_matmul_kernel(None, env(""), false, &ok), Tiled);
        // Limits too small for tiled: register even when forced.
        assert_eq!(
            choose_matmul_kernel(Some(Tiled), None, false, &small),
            Register
        );
    }
}
