//! Command line: clap definitions and the `run` entry that `main` calls.
//! Progress and results go to stdout; diagnostics go through `log`.

use clap::{Args, Parser, Subcommand};

use crate::error::Result;
use crate::gpu::context::{list_adapters, ContextOptions};

/// Fine-tune small language models with prompt tuning, prefix tuning or LoRA on any GPU.
#[derive(Parser, Debug)]
#[command(name = "wgtune", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Device selection shared by every subcommand.
#[derive(Args, Debug, Clone, Default)]
pub struct DeviceArgs {
    /// GPU backend: vulkan, metal, dx12 or gl (default: all; env WGPU_BACKEND)
    #[arg(long)]
    pub backend: Option<String>,
    /// Use the adapter whose name contains this text (env WGPU_ADAPTER_NAME)
    #[arg(long)]
    pub adapter: Option<String>,
}

impl DeviceArgs {
    pub fn options(&self) -> ContextOptions {
        ContextOptions {
            backend: self.backend.clone(),
            adapter: self.adapter.clone(),
            ..Default::default()
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List every GPU adapter with its backend, type, driver and key limits
    Devices(DeviceArgs),
    /// Benchmarks
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// GFLOP/s of the matmul layouts and attention timings
    Kernels {
        #[command(flatten)]
        device: DeviceArgs,
        /// Timed iterations per case (the median is reported)
        #[arg(long, default_value_t = 5)]
        iters: usize,
    },
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Devices(d) => devices(&d),
        Command::Bench {
            what: BenchCommand::Kernels { device, iters },
        } => crate::bench::kernels(&device.options(), iters),
    }
}

fn devices(d: &DeviceArgs) -> Result<()> {
    let list = list_adapters(d.backend.as_deref())?;
    if list.is_empty() {
        println!(
            "no GPU adapters found (on Linux: apt-get install -y mesa-vulkan-drivers libvulkan1)"
        );
    }
    for (i, a) in list.iter().enumerate() {
        let sub = if a.features.contains(wgpu::Features::SUBGROUP) {
            format!("{}..{}", a.info.subgroup_min_size, a.info.subgroup_max_size)
        } else {
            "none".to_string()
        };
        println!("[{i}] {}", a.info.name);
        println!(
            "    backend {:?}, type {:?}, driver {} {}",
            a.info.backend, a.info.device_type, a.info.driver, a.info.driver_info
        );
        println!(
            "    max storage binding {} MiB, max buffer {} MiB, workgroup storage {} KiB, storage buffers/stage {}",
            a.limits.max_storage_buffer_binding_size >> 20,
            a.limits.max_buffer_size >> 20,
            a.limits.max_compute_workgroup_storage_size >> 10,
            a.limits.max_storage_buffers_per_shader_stage
        );
        println!(
            "    subgroups {sub}, f16 {}, timestamps {}",
            a.features.contains(wgpu::Features::SHADER_F16),
            a.features.contains(wgpu::Features::TIMESTAMP_QUERY)
        );
    }
    Ok(())
}
