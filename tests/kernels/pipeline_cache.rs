//! The on-disk pipeline cache: a second context loads what the first saved,
//! and a damaged file costs a cold compile, never a crash or a wrong result.

use std::path::{Path, PathBuf};

use crate::common::{assert_close, read, run, to64, up, zeros, Rng};

use wgtune::cpu;
use wgtune::gpu::ops::activation as act;
use wgtune::gpu::{Context, ContextOptions, Plan};

/// A fresh folder under the system temp dir (removed by the test).
fn fresh_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgtune-pipelines-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A context caching pipelines in `dir`, or `None` without an adapter or
/// without the feature (then the test has nothing to check).
fn ctx_in(dir: &Path) -> Option<Context> {
    let ctx = crate::common::ctx_with(ContextOptions {
        pipeline_cache_dir: Some(dir.to_path_buf()),
        ..Default::default()
    })?;
    if ctx.pipeline_stats().cache_file.is_none() {
        eprintln!("skipping: {} has no pipeline cache", ctx.info.name);
        return None;
    }
    Some(ctx)
}

/// Build and run one kernel, checked against its CPU twin.
fn gelu_matches_cpu(ctx: &Context, tag: &str) {
    let n = 1000;
    let x = Rng::new(5).vec(n, 4.0);
    let (inp, out) = (up(ctx, &x, &[n], "x"), zeros(ctx, &[n], "y"));
    let mut plan = Plan::new(tag);
    act::gelu_forward(ctx, &mut plan, &out, &inp).unwrap();
    run(ctx, &plan);
    let mut want = vec![0.0; n];
    cpu::activation::gelu_forward(&mut want, &to64(&x), n);
    assert_close(tag, &read(ctx, &out), &want, 1e-5, 1e-5);
    ctx.check(tag).unwrap();
}

/// Our file layout (see `gpu::context`): magic, length, FNV-1a, then the
/// driver's bytes; rebuilt here to hand wgpu damaged driver bytes.
fn wrap(data: &[u8]) -> Vec<u8> {
    let h = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut out = b"WGTPC\0\0\x01".to_vec();
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&h.to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// The cache file a context in `dir` saved after building the gelu kernel.
fn saved_file(dir: &Path) -> Option<(PathBuf, usize)> {
    let ctx = ctx_in(dir)?;
    gelu_matches_cpu(&ctx, "cold");
    let n = ctx.save_pipeline_cache().expect("new pipelines: saved");
    Some((ctx.pipeline_stats().cache_file.unwrap(), n))
}

#[test]
fn a_second_context_loads_the_saved_cache() {
    let dir = fresh_dir("reload");
    let Some(ctx) = ctx_in(&dir) else { return };
    let cold = ctx.pipeline_stats();
    assert_eq!(cold.cache_loaded_bytes, 0, "empty folder: nothing loaded");
    gelu_matches_cpu(&ctx, "cold");
    assert!(ctx.pipeline_stats().built > cold.built);
    let n = ctx.save_pipeline_cache().expect("new pipelines: saved");
    let file = ctx.pipeline_stats().cache_file.unwrap();
    assert!(file.is_file(), "{} written", file.display());
    assert_eq!(ctx.save_pipeline_cache(), None, "nothing new: no rewrite");
    drop(ctx);

    let warm = ctx_in(&dir).unwrap();
    let s = warm.pipeline_stats();
    assert_eq!(s.cache_loaded_bytes, n as u64, "the saved bytes were used");
    gelu_matches_cpu(&warm, "warm");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn damaged_cache_files_mean_a_cold_compile() {
    let dir = fresh_dir("damaged");
    let Some((file, _)) = saved_file(&dir) else {
        return;
    };
    let real = std::fs::read(&file).unwrap();
    let inner = &real[24..];
    let mut flipped = real.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x5a;
    let mut bad_header = inner.to_vec();
    bad_header[0] ^= 0xff;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("garbage", vec![0xab; 4096]),
        ("truncated", real[..real.len() / 2].to_vec()),
        ("one byte flipped", flipped),
        // Past our checksum: wgpu's own header checks must catch these.
        ("wgpu header damaged", wrap(&bad_header)),
        ("driver data cut", wrap(&inner[..inner.len() - 16])),
    ];
    for (what, bytes) in cases {
        std::fs::write(&file, &bytes).unwrap();
        let ctx = ctx_in(&dir).unwrap();
        // wgpu drops data it rejects without a word, so only our own checks
        // can be seen; the result must be right either way.
        if !what.starts_with("wgpu") && !what.starts_with("driver") {
            assert_eq!(
                ctx.pipeline_stats().cache_loaded_bytes,
                0,
                "{what}: ignored"
            );
        }
        gelu_matches_cpu(&ctx, what);
        // The damaged file is replaced by a good one.
        assert!(ctx.save_pipeline_cache().is_some(), "{what}: saved anew");
        assert_ne!(std::fs::read(&file).unwrap(), bytes, "{what}: rewritten");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
