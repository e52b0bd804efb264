//! `wgtune bench kernels`: GFLOP/s of the three matmul layouts and the
//! attention timings, on whatever adapter the context picks.
//!
//! Each case is one plan, run once to warm up (pipeline JIT) and then
//! `iters` times; the median wall time of submit + wait is reported.

use crate::clock::Stopwatch;

use crate::error::Result;
use crate::gpu::ops::matmul;
use crate::gpu::{plan::Profile, Context, ContextOptions, DType, MatmulKernel, Plan, Tensor};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `iters` runs of `plan` (after one warm-up run).
pub fn time_plan(ctx: &Context, plan: &Plan, iters: usize) -> Result<f64> {
    plan.run(ctx)?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Stopwatch::start();
        plan.run(ctx)?;
        times.push(t.secs());
    }
    Ok(median(times))
}

fn filled(ctx: &Context, shape: &[usize], label: &str) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    // Deterministic, bounded values; the content does not affect speed.
    let data: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    Tensor::from_f32(ctx, &data, shape, label)
}

/// One matmul case: `layout` is "forward", "backward_input" or "backward_weight".
/// Frozen weights are packed once, as at model load (outside the timing);
/// packing of the activations is timed.
pub fn matmul_case(
    ctx: &Context,
    layout: &str,
    m: usize,
    k: usize,
    n: usize,
    iters: usize,
) -> Result<(f64, f64)> {
    let mut plan = Plan::new(layout);
    let tex = matmul::use_textures(ctx, &[(m, k), (n, k), (m, n)]);
    match layout {
        "forward" => {
            let (x, w, y) = (
                filled(ctx, &[m, k], "x")?,
                filled(ctx, &[n, k], "w")?,
                Tensor::zeros(ctx, &[m, n], DType::F32, "y")?,
            );
            if tex {
                let mut load = Plan::new("pack weight");
                let wt = matmul::pack(ctx, &mut load, &w)?;
                load.run(ctx)?;
                matmul::matmul_forward_packed(ctx, &mut plan, &y, &x, &wt, None, 1.0, false)?;
            } else {
                matmul::matmul_forward(ctx, &mut plan, &y, &x, &w, None)?;
            }
        }
        "backward_input" => {
            let (dy, w, dx) = (
                filled(ctx, &[m, n], "dy")?,
                filled(ctx, &[n, k], "w")?,
                Tensor::zeros(ctx, &[m, k], DType::F32, "dx")?,
            );
            if tex {
                let mut load = Plan::new("pack weight");
                let wt = matmul::pack(ctx, &mut load, &w)?;
                load.run(ctx)?;
                matmul::matmul_backward_input_packed(ctx, &mut plan, &dx, &dy, &wt, 1.0)?;
            } else {
                matmul::matmul_backward_input(ctx, &mut plan, &dx, &dy, &w)?;
            }
        }
        _ => {
            let (dy, x, dw) = (
                filled(ctx, &[m, n], "dy")?,
                filled(ctx, &[m, k], "x")?,
                Tensor::zeros(ctx, &[n, k], DType::F32, "dw")?,
            );
            matmul::matmul_backward_weight(ctx, &mut plan, &dw, &dy, &x)?;
        }
    }
    let secs = time_plan(ctx, &plan, iters)?;
    Ok((secs, plan.flops() / secs / 1e9))
}

/// Run the kernel benchmark and print one line per case.
pub fn kernels(opts: &ContextOptions, iters: usize) -> Result<()> {
    let ctx = Context::new(opts)?;
    println!(
        "adapter: {} ({:?}, {:?}); matmul kernel family in use: {:?}",
        ctx.info.name,
        ctx.info.backend,
        ctx.info.device_type,
        ctx.matmul_kernel()
    );
    // Both families on their own contexts, whichever one this adapter picks.
    let mut families = Vec::new();
    for kind in [MatmulKernel::Register, MatmulKernel::Tiled] {
        let c = Context::new(&ContextOptions {
            matmul_kernel: Some(kind),
            ..opts.clone()
        })?;
        let v = matmul::pick_variant(&c, true);
        println!(
            "{:?}: {}x{} outputs per invocation, {}x{} per workgroup, subgroup width {}{}",
            c.matmul_kernel(),
            v.tm,
            v.tn,
            v.tile().0,
            v.tile().1,
            v.sg,
            if c.matmul_kernel() == kind {
                ""
            } else {
                " (the limits refuse the tiled kernels)"
            }
        );
        families.push(c);
    }
    println!(
        "operands from {} ({} iterations, median; frozen weights packed once, untimed)",
        if ctx.textures() {
            "packed textures"
        } else {
            "storage buffers"
        },
        iters
    );
    println!(
        "{:<16} {:>6} {:>6} {:>6} {:>10} {:>9} {:>10} {:>9}",
        "layout", "M", "K", "N", "reg ms", "GFLOP/s", "tiled ms", "GFLOP/s"
    );
    let shapes = [
        (1024, 1024, 1024),
        (512, 576, 1536),
        (512, 1536, 576),
        (512, 576, 49152),
        (333, 577, 1031),
    ];
    for layout in ["forward", "backward_input", "backward_weight"] {
        for &(m, k, n) in &shapes {
            let mut line = format!("{layout:<16} {m:>6} {k:>6} {n:>6}");
            for c in &families {
                let (secs, gflops) = matmul_case(c, layout, m, k, n, iters)?;
                line += &format!(" {:>10.2} {gflops:>9.1}", secs * 1e3);
            }
            println!("{line}");
        }
    }
    weight_formats(&ctx, iters)?;
    attention(&ctx, iters)?;
    norms(&ctx, iters)?;
    Ok(())
}

/// RMSNorm forward and backward at training and decode shapes, in the
/// build `ops::norm::NormKernel::pick` takes here (`WGTUNE_NORM` forces one).
pub fn norms(ctx: &Context, iters: usize) -> Result<()> {
    use crate::gpu::ops::norm::{rmsnorm_backward, rmsnorm_forward, NormKernel};
    for (n, c) in [(512, 576), (16, 576), (1, 576)] {
        let x = filled(ctx, &[n, c], "x")?;
        let w = filled(ctx, &[c], "w")?;
        let out = filled(ctx, &[n, c], "out")?;
        let rstd = filled(ctx, &[n], "rstd")?;
        let mut fwd = Plan::new("rmsnorm fwd");
        let mut bwd = Plan::new("rmsnorm bwd");
        for _ in 0..10 {
            rmsnorm_forward(ctx, &mut fwd, &out, &rstd, &x, &w, 1e-5)?;
            rmsnorm_backward(ctx, &mut bwd, &out, &x, &x, &w, &rstd)?;
        }
        let (tf, tb) = (time_plan(ctx, &fwd, iters)?, time_plan(ctx, &bwd, iters)?);
        println!(
            "rmsnorm {:?} N={n} C={c}: forward {:.3} ms, backward {:.3} ms (per dispatch)",
            NormKernel::pick(ctx, n, c),
            tf * 1e2,
            tb * 1e2
        );
    }
    Ok(())
}

/// Forward and backward-input over a frozen weight in each storage format
/// (random blocks; speed does not depend on the values), with the ratio to
/// f32 and the weight's GPU bytes.
pub fn weight_formats(ctx: &Context, iters: usize) -> Result<()> {
    use crate::model::compact::{self, random_blocks, StoredMatrix, WeightsMode};
    use crate::model::gguf::GgmlType;
    if !ctx.textures() {
        println!("frozen weight formats: skipped (textures disabled; weights are f32 buffers)");
        return Ok(());
    }
    println!("frozen weight formats (decoded in the kernel; ms, GFLOP/s, x f32 time, weight MiB):");
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ];
    // K-quant rows are whole 256-element blocks.
    // M = 1: a decode step's matmuls (the few-row forward).
    for (m, k, n) in [
        (512, 768, 1536),
        (512, 1536, 768),
        (1, 768, 1536),
        (1, 1536, 768),
    ] {
        for layout in ["forward", "backward_input"] {
            if m == 1 && layout != "forward" {
                continue;
            }
            let mut base = None;
            for ty in types {
                let (per, _) = ty.block().unwrap_or((1, 4));
                let sm = StoredMatrix {
                    name: "w".into(),
                    ty,
                    data: std::borrow::Cow::Owned(random_blocks(ty, n * k / per, 5)),
                    rows: n,
                    cols: k,
                };
                let fmt = compact::target_format(ty, WeightsMode::Stored);
                let w = compact::upload(ctx, &sm, fmt, "w")?;
                let mut plan = Plan::new(layout);
                if layout == "forward" {
                    let (x, y) = (
                        filled(ctx, &[m, k], "x")?,
                        Tensor::zeros(ctx, &[m, n], DType::F32, "y")?,
                    );
                    matmul::matmul_forward_packed(ctx, &mut plan, &y, &x, &w, None, 1.0, false)?;
                } else {
                    let (dy, dx) = (
                        filled(ctx, &[m, n], "dy")?,
                        Tensor::zeros(ctx, &[m, k], DType::F32, "dx")?,
                    );
                    matmul::matmul_backward_input_packed(ctx, &mut plan, &dx, &dy, &w, 1.0)?;
                }
                let secs = time_plan(ctx, &plan, iters)?;
                let b = *base.get_or_insert(secs);
                println!(
                    "  {layout:<15} {m:>5} {k:>5} {n:>5} {:<5} {:>9.2} {:>7.1} {:>6.2}x {:>7.2}",
                    ty.name(),
                    secs * 1e3,
                    plan.flops() / secs / 1e9,
                    secs / b,
                    w.bytes() as f64 / (1 << 20) as f64
                );
            }
        }
    }
    Ok(())
}

/// Attention forward and backward for B=4, T=128, 9 query heads over 3 KV
/// heads, head_dim 64 (SmolLM2-135M's attention at a training batch).
pub fn attention(ctx: &Context, iters: usize) -> Result<()> {
    use crate::gpu::ops::attention as att;
    let (b, t, nh, kvh, hd) = (4, 128, 9, 3, 64);
    let z = |shape: &[usize], l: &str| Tensor::zeros(ctx, shape, DType::F32, l);
    let (q, k, v) = (
        filled(ctx, &[b, t, nh, hd], "q")?,
        filled(ctx, &[b, t, kvh, hd], "k")?,
        filled(ctx, &[b, t, kvh, hd], "v")?,
    );
    let (out, lse, dout) = (
        z(&[b, t, nh, hd], "out")?,
        z(&[b, nh, t], "lse")?,
        filled(ctx, &[b, t, nh, hd], "dout")?,
    );
    let (dq, dk, dv, delta) = (
        z(&[b, t, nh, hd], "dq")?,
        z(&[b, t, kvh, hd], "dk")?,
        z(&[b, t, kvh, hd], "dv")?,
        z(&[b, nh, t], "delta")?,
    );
    let mut fwd = Plan::new("attention_forward");
    att::attention_forward(ctx, &mut fwd, &out, &lse, &q, &k, &v)?;
    let mut bwd = Plan::new("attention_backward");
    att::attention_backward(
        ctx, &mut bwd, &dq, &dk, &dv, &delta, &dout, &q, &k, &v, &out, &lse,
    )?;
    let tf = time_plan(ctx, &fwd, iters)?;
    let tb = time_plan(ctx, &bwd, iters)?;
    println!("attention B={b} T={t} heads {nh}/{kvh} kv, head_dim {hd}, causal:");
    println!(
        "  forward  {:>8.2} ms  {:>6.1} GFLOP/s",
        tf * 1e3,
        fwd.flops() / tf / 1e9
    );
    println!(
        "  backward {:>8.2} ms  {:>6.1} GFLOP/s",
        tb * 1e3,
        bwd.flops() / tb / 1e9
    );
    Ok(())
}

/// A model folder with random weights for `config` (speed does not depend
/// on the values), so the benchmark runs where no checkpoint exists.
fn random_model_dir(config: &std::path::Path) -> Result<std::path::PathBuf> {
    use crate::error::Error;
    let cfg = crate::model::ModelConfig::from_file(config)?;
    let dir = std::env::temp_dir().join(format!("wgtune-bench-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
        path: dir.clone(),
        source: e,
    })?;
    std::fs::copy(config, dir.join("config.json")).map_err(|e| Error::Io {
        path: config.to_path_buf(),
        source: e,
    })?;
    let mut rng = crate::rng::Rng::new(1);
    let specs = crate::model::weights::checkpoint_specs(&cfg);
    let data: Vec<Vec<u8>> = specs
        .iter()
        .map(|(_, sh)| {
            let n: usize = sh.iter().product();
            (0..n)
                .flat_map(|_| (((rng.uniform() * 2.0 - 1.0) * 0.05) as f32).to_le_bytes())
                .collect()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = specs
        .iter()
        .zip(&data)
        .map(|((n, sh), d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, sh.clone(), d)
                    .expect("invariant: `d` holds 4 bytes per element of `sh`"),
            )
        })
        .collect();
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path).map_err(|e| Error::Weights {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(dir)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// `wgtune bench train`: tokens/s and GFLOP/s of full training steps
/// (forward, loss at every position, backward, AdamW) for each method.
#[allow(clippy::too_many_arguments)]
pub fn train(
    opts: &ContextOptions,
    model: Option<&std::path::Path>,
    config: Option<&std::path::Path>,
    methods: &[&str],
    b: usize,
    t: usize,
    steps: usize,
    weights: crate::model::compact::WeightsMode,
    grad_checkpoint: bool,
    num_layers: Option<usize>,
) -> Result<()> {
    use crate::adapters::adapter::match_targets;
    use crate::adapters::init::{
        init_lora, init_prefix, init_prompt, LoraInit, PrefixInit, PromptInit,
    };
    use crate::adapters::peft_io::{AdapterConfig, LoraConfig, PrefixConfig, PromptConfig};
    use crate::adapters::Adapter;
    use crate::error::Error;
    use crate::train::data::Batch;
    use crate::train::trainer::{OptimConfig, Schedule, Trainer};
    let ctx = Context::new(opts)?;
    let (dir, tmp) = match (model, config) {
        (Some(m), _) => (crate::model::hub::resolve_model(m)?, false),
        (None, Some(c)) => (random_model_dir(c)?, true),
        (None, None) => {
            return Err(Error::invalid(
                "bench train",
                "give --model DIR or --config config.json",
            ))
        }
    };
    let m = crate::model::Model::load_with(&ctx, &dir, weights)?;
    let frozen = crate::train::memory::FrozenTensors::of_folder(&m.cfg, &dir)?;
    if tmp {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let cfg = m.cfg.clone();
    let weights_gpu = ctx.memory.live();
    println!(
        "bench train: {:?} {} layers hidden {}, weights {weights} ({:.0} MiB), batch {b} x {t}, {steps} timed steps, {} ({:?}); {:.0} MiB of GPU buffers after loading",
        cfg.arch, cfg.layers, cfg.hidden, mib(m.weight_bytes()), ctx.info.name, ctx.info.backend, mib(weights_gpu)
    );
    let from = crate::train::memory::lora_first_layer(&cfg, num_layers)?;
    // LoRA on the top layers only (`--num-layers`).
    let top = |mut lc: LoraConfig| {
        if num_layers.is_some() {
            lc.layers_to_transform = Some((from..cfg.layers).collect());
        }
        lc
    };
    let lora_layers = |lc: &LoraConfig| -> Result<Vec<&crate::model::transformer::Linear>> {
        let mut v = match_targets(&m, &lc.target_modules)?;
        v.retain(|l| lc.transforms_layer(&l.name));
        Ok(v)
    };
    if num_layers.is_some() {
        println!("LoRA methods adapt layers {from}..{} only", cfg.layers);
    }
    let mut rng = crate::rng::Rng::new(7);
    let ids: Vec<i32> = (0..b * t)
        .map(|_| rng.below(cfg.vocab as u64) as i32)
        .collect();
    let mut targets = vec![-100; b * t];
    for r in 0..b {
        for j in 0..t - 1 {
            targets[r * t + j] = ids[r * t + j + 1];
        }
    }
    let n_targets = b * (t - 1);
    let batch = Batch {
        b,
        t,
        ids,
        targets,
        lens: vec![t; b],
        n_targets,
        first: vec![-100; b],
        starts: Vec::new(),
    };
    let mut in_step: Vec<(String, f64, bool)> = Vec::new();
    for &method in methods {
        let n = 20;
        let (acfg, tensors) = match method {
            "lora" => {
                let lc = LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]);
                let lc = top(if cfg.arch == crate::model::Arch::Gpt2 {
                    LoraConfig::new(8, 16.0, &["c_attn"])
                } else {
                    lc
                });
                let t = init_lora(&lora_layers(&lc)?, &lc, LoraInit::Kaiming, 1);
                (AdapterConfig::Lora(lc), t)
            }
            "lora-all" => {
                let mut names: Vec<String> = m
                    .linears()
                    .iter()
                    .map(|(_, l)| {
                        l.name
                            .rsplit('.')
                            .next()
                            .expect("invariant: rsplit yields at least one piece")
                            .to_string()
                    })
                    .collect();
                names.sort();
                names.dedup();
                let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
                let lc = top(LoraConfig::new(8, 16.0, &refs));
                let t = init_lora(&lora_layers(&lc)?, &lc, LoraInit::Kaiming, 1);
                (AdapterConfig::Lora(lc), t)
            }
            "prompt" => {
                let pc = PromptConfig {
                    num_virtual_tokens: n,
                    token_dim: cfg.hidden,
                    num_attention_heads: cfg.heads,
                    num_layers: cfg.layers,
                    prompt_tuning_init: "SAMPLE_VOCAB".into(),
                    prompt_tuning_init_text: None,
                    tokenizer_name_or_path: None,
                    base_model_name_or_path: None,
                };
                let t = init_prompt(&ctx, &m, &pc, &PromptInit::Vocab, 1)?;
                (AdapterConfig::Prompt(pc), t)
            }
            "prefix" | "prefix-proj" => {
                let pc = PrefixConfig {
                    num_virtual_tokens: n,
                    token_dim: cfg.kv_dim(),
                    num_attention_heads: cfg.kv_heads,
                    num_layers: cfg.layers,
                    encoder_hidden_size: Some(cfg.hidden),
                    prefix_projection: method == "prefix-proj",
                    base_model_name_or_path: None,
                };
                let t = init_prefix(&ctx, &m, &pc, &PrefixInit::Zero, 1)?;
                (AdapterConfig::Prefix(pc), t)
            }
            other => {
                return Err(Error::invalid(
                    "bench train",
                    format!(
                        "unknown method `{other}` (lora, lora-all, prompt, prefix, prefix-proj)"
                    ),
                ))
            }
        };
        for gc in [false, true]
            .into_iter()
            .take(1 + usize::from(grad_checkpoint))
        {
            let (planned, load_temp) = bench_plan(
                &m.cfg,
                &frozen,
                method,
                b,
                t,
                &batch,
                weights,
                (num_layers, gc),
            )?;
            ctx.memory.reset_peak();
            let built = ctx.pipeline_stats();
            let ad = Adapter::new(&ctx, &m, acfg.clone(), tensors.clone())?;
            let opt = OptimConfig {
                lr: 1e-4,
                weight_decay: 0.0,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                max_grad_norm: 1.0,
                schedule: Schedule::Constant,
                warmup_steps: 0,
                total_steps: steps + 1,
            };
            let mut tr = Trainer::new(&ctx, &m, &ad, opt)?;
            tr.set_grad_checkpoint(gc);
            let t0 = Stopwatch::start();
            let first = tr
                .train_step(std::slice::from_ref(&batch), true)?
                .map(|s| s.loss)
                .unwrap_or(f64::NAN);
            let warm = t0.secs();
            let after = ctx.pipeline_stats();
            ctx.save_pipeline_cache();
            let t1 = Stopwatch::start();
            for i in 0..steps {
                tr.train_step(std::slice::from_ref(&batch), i + 1 == steps)?;
            }
            // Before the profile below, which would otherwise count in the rate.
            let secs = t1.secs() / steps.max(1) as f64;
            if std::env::var("WGTUNE_PROFILE").is_ok_and(|v| v == "1") {
                let prof = tr.profile(&batch)?;
                let total: f64 = prof.kinds.iter().map(|k| k.1).sum();
                eprintln!("profile {method}: {total:.2} s ({})", prof.how());
                for (name, secs, k) in prof.kinds.iter().take(14) {
                    eprintln!("  {name:<58} {k:>5}x {:8.1} ms", secs * 1e3);
                }
                // Each family's FLOP rate over its own dispatches, to set
                // against `bench kernels`; the line below divides by the
                // whole step.
                for fam in ["matmul", "lora", "attention"] {
                    let (s, n) = prof.sum(|k| Profile::is_family(k, fam));
                    let f = prof.flops_of(fam);
                    if n > 0 && f > 0.0 {
                        eprintln!(
                            "  {fam} dispatches: {n}, {s:.2} s of {total:.2} s ({:.0}%), {:.1} GFLOP/s",
                            100.0 * s / total,
                            f / s / 1e9
                        );
                        if fam == "matmul" {
                            in_step.push((label_of(method, gc), f / s / 1e9, prof.in_place));
                        }
                    }
                }
            }
            let label = label_of(method, gc);
            println!(
            "  {label:<12} {:>8.1} tok/s  {:>7.1} GFLOP/s (matmuls)  {:.2} s/step  {} dispatches/step  (first step {warm:.1} s incl. building {} new pipelines in {:.1} s, {} distinct in all; loss {first:.3}), {} trainable, GPU bytes allocated {:.0} MiB at peak ({:.0} MiB weights; memory plan {:.0} MiB, {:.0} MiB without the load-time temporary the peak here excludes), peak RSS {:.0} MiB",
            (b * t) as f64 / secs,
            tr.last_flops / secs / 1e9,
            secs,
            tr.last_dispatches,
            after.built - built.built,
            after.build_secs - built.build_secs,
            after.built,
            ad.num_params(),
            mib(ctx.memory.peak()),
            mib(weights_gpu),
            mib(planned),
            mib(planned - load_temp),
            peak_rss_mib().unwrap_or(f64::NAN)
        );
        }
    }
    if !in_step.is_empty() {
        // The same run's best matmul rate at this model's shapes, with
        // weights packed once as at load (f32): what the step's matmuls are
        // set against.
        let bt = b * t;
        let (c, i) = (cfg.hidden, cfg.intermediate);
        let mut best = (0.0, String::new());
        for (layout, k, n) in [
            ("forward", c, i),
            ("forward", i, c),
            ("backward_input", c, i),
            ("backward_input", i, c),
        ] {
            let (_, g) = matmul_case(&ctx, layout, bt, k, n, 3)?;
            if g > best.0 {
                best = (g, format!("{layout} {bt} x {k} x {n}"));
            }
        }
        eprintln!(
            "best matmul kernel rate at this model's shapes, this run: {:.1} GFLOP/s ({})",
            best.0, best.1
        );
        for (label, g, in_place) in in_step {
            eprintln!(
                "  {label:<12} the step's matmul dispatches at {g:.1} GFLOP/s: {:.0}% of it{}",
                100.0 * g / best.0,
                if in_place {
                    ""
                } else {
                    " (each step timed alone)"
                }
            );
        }
    }
    Ok(())
}

fn label_of(method: &str, gc: bool) -> String {
    if gc {
        format!("{method}+gc")
    } else {
        method.to_string()
    }
}

/// The memory plan's total for one `bench train` method and batch, with
/// (`--num-layers`, gradient checkpointing).
#[allow(clippy::too_many_arguments)]
fn bench_plan(
    cfg: &crate::model::ModelConfig,
    frozen: &crate::train::memory::FrozenTensors,
    method: &str,
    b: usize,
    t: usize,
    batch: &crate::train::data::Batch,
    weights: crate::model::compact::WeightsMode,
    (num_layers, gc): (Option<usize>, bool),
) -> Result<(u64, u64)> {
    use crate::adapters::init::LoraInit;
    use crate::train::memory::{Budget, MemoryPlan, PlanInput};
    use crate::train::options::{LoraOptions, MethodOptions, PrefixInitKind, PrefixOptions};
    use crate::train::options::{PromptInitKind, PromptOptions};
    let n = 20;
    let lora = |targets: &[&str]| {
        MethodOptions::Lora(LoraOptions {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: targets.iter().map(|s| s.to_string()).collect(),
            rslora: false,
            init: LoraInit::Kaiming,
            num_layers,
        })
    };
    let (mo, nv, p) = match method {
        "lora" if cfg.arch == crate::model::Arch::Gpt2 => (lora(&["c_attn"]), 0, 0),
        "lora" => (lora(&["q_proj", "v_proj"]), 0, 0),
        "lora-all" => (lora(&["all-linear"]), 0, 0),
        "prompt" => (
            MethodOptions::Prompt(PromptOptions {
                num_virtual_tokens: n,
                init: PromptInitKind::Vocab,
                init_text: None,
            }),
            n,
            0,
        ),
        _ => (
            MethodOptions::Prefix(PrefixOptions {
                num_virtual_tokens: n,
                projection: method == "prefix-proj",
                encoder_hidden_size: None,
                init: PrefixInitKind::Zero,
                init_text: None,
            }),
            0,
            n,
        ),
    };
    let cap_t = cfg.max_positions.saturating_sub(nv + p);
    let (b, t, r) = crate::train::trainer::bucket_shape(b, t, batch.loss_targets(nv), nv, cap_t);
    let input = PlanInput {
        cfg,
        frozen,
        mode: weights,
        method: &mo,
        b,
        t,
        r,
        nv,
        p,
        keep: crate::train::memory::plan_keep(cfg, &mo, gc)?,
    };
    let plan = MemoryPlan::new(&input, Budget::of(None, None))?;
    Ok((plan.total(), plan.line("largest temporary")))
}

/// `wgtune bench generate`: greedy generation on the model's weights with
/// no adapter: `prompt` random token ids, then `new` tokens (no stop
/// token), `runs` times on one session. Prints prefill and decode tokens/s
/// per run (the first run includes building the pipelines and recording
/// the decode step), the decode step's dispatches and GFLOP/s, GPU bytes
/// and peak RSS.
pub fn generate(
    opts: &ContextOptions,
    model: &std::path::Path,
    weights: crate::model::compact::WeightsMode,
    prompt: usize,
    new: usize,
    runs: usize,
) -> Result<()> {
    use crate::model::generate::{GenOptions, Session};
    use crate::model::NoHooks;
    let t0 = crate::clock::Stopwatch::start();
    let ctx = Context::new(opts)?;
    let dir = crate::model::hub::resolve_model(model)?;
    let m = crate::model::Model::load_with(&ctx, &dir, weights)?;
    let cfg = m.cfg.clone();
    let load_s = t0.secs();
    let cap = (prompt + new + 1).min(cfg.max_positions);
    println!(
        "bench generate: {:?} {} layers hidden {} vocab {}, weights {weights} ({:.0} MiB), {prompt} prompt + {new} new tokens, greedy, {} ({:?}); loaded in {load_s:.2} s",
        cfg.arch,
        cfg.layers,
        cfg.hidden,
        cfg.vocab,
        mib(m.weight_bytes()),
        ctx.info.name,
        ctx.info.backend
    );
    let mut rng = crate::rng::Rng::new(11);
    let ids: Vec<u32> = (0..prompt)
        .map(|_| rng.below(cfg.vocab as u64) as u32)
        .collect();
    let opts = GenOptions {
        max_new_tokens: new,
        stop: Vec::new(),
        ..Default::default()
    };
    let mut session = Session::new(&ctx, &m, &NoHooks, cap)?;
    let mut decode = Vec::new();
    for run in 0..runs {
        session.reset();
        let st = session.generate(&ids, &opts, |_, _| {
            Ok(crate::model::generate::Flow::Continue)
        })?;
        let first = if run == 0 {
            format!(
                " (first run: pipelines built; time to first token {:.2} s after start)",
                t0.secs() - st.decode_s
            )
        } else {
            String::new()
        };
        println!(
            "  run {}: prefill {:7.1} tok/s ({:.3} s)   decode {:6.2} tok/s ({:.1} ms/token){first}",
            run + 1,
            st.prefilled as f64 / st.prefill_s,
            st.prefill_s,
            st.decode_tokens_per_s(),
            1e3 / st.decode_tokens_per_s().max(1e-9),
        );
        if run > 0 || runs == 1 {
            decode.push(st.decode_tokens_per_s());
        }
    }
    if let Some((n, flops)) = session.decode_step_cost() {
        let tps = median(decode);
        println!(
            "  decode step: {n} dispatches, {:.2} GFLOP/s at {tps:.2} tok/s (median of warm runs)",
            flops * tps / 1e9
        );
    }
    println!(
        "  GPU buffers: {:.0} MiB live, {:.0} MiB peak; peak RSS {}",
        mib(ctx.memory.live()),
        mib(ctx.memory.peak()),
        peak_rss_mib().map_or("n/a".into(), |r| format!("{r:.0} MiB"))
    );
    Ok(())
}
