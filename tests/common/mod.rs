//! Shared test helpers: the GPU context (or a skip), seeded data, tolerance
//! checks that print the max diff, and central finite differences.
#![allow(dead_code)]

pub mod cli;
pub mod reference;

use std::sync::OnceLock;

use wgtune::gpu::{Context, ContextOptions, Plan, Tensor};

static CTX: OnceLock<Option<Context>> = OnceLock::new();

/// The shared test context, or `None` (after printing why) when no adapter
/// exists. With `WGTUNE_REQUIRE_GPU=1` a missing adapter fails the test.
pub fn ctx() -> Option<&'static Context> {
    // RUST_LOG=wgtune=debug shows kernel build times.
    let _ = env_logger::builder().is_test(true).try_init();
    CTX.get_or_init(|| match Context::new(&ContextOptions::from_env()) {
        Ok(c) => {
            eprintln!("test adapter: {} ({:?})", c.info.name, c.info.backend);
            Some(c)
        }
        Err(e) => {
            if std::env::var("WGTUNE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("WGTUNE_REQUIRE_GPU=1 but no GPU context: {e}");
            }
            eprintln!("skipping: no wgpu adapter ({e})");
            None
        }
    })
    .as_ref()
}

/// `let ctx = gpu!();` returns from the test when there is no adapter.
#[allow(unused_macros)]
macro_rules! gpu {
    () => {
        match $crate::common::ctx() {
            Some(c) => c,
            None => return,
        }
    };
}

/// Deterministic xorshift64* generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// `n` values uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
    /// Same, in f64 (for finite-difference checks).
    pub fn vec64(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform() as f64 * scale).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

pub fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// `|got - want| <= atol + rtol*|want|` everywhere; prints the max diff.
pub fn assert_close(name: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(
        got.len(),
        want.len(),
        "{name}: length {} vs reference {}",
        got.len(),
        want.len()
    );
    let mut maxdiff = 0.0f64;
    let mut worst: Option<(usize, f64, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g as f64 - w).abs();
        maxdiff = maxdiff.max(d);
        // Written so that a NaN difference also counts as a mismatch.
        if !matches!(
            d.partial_cmp(&(atol + rtol * w.abs())),
            Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
        ) && worst.is_none()
        {
            worst = Some((i, g as f64, w));
        }
    }
    eprintln!("{name}: maxdiff {maxdiff:.3e} over {} values", got.len());
    if let Some((i, g, w)) = worst {
        panic!("{name}: mismatch at index {i}: gpu {g} vs reference {w} (atol {atol}, rtol {rtol}, maxdiff {maxdiff:.3e})");
    }
}

/// Upload f32 data.
pub fn up(ctx: &Context, data: &[f32], shape: &[usize], label: &str) -> Tensor {
    Tensor::from_f32(ctx, data, shape, label).expect("upload")
}

/// Zero tensor.
pub fn zeros(ctx: &Context, shape: &[usize], label: &str) -> Tensor {
    Tensor::zeros(ctx, shape, wgtune::gpu::DType::F32, label).expect("alloc")
}

/// Run a plan and wait.
pub fn run(ctx: &Context, plan: &Plan) {
    plan.run(ctx).expect("plan run");
}

pub fn read(ctx: &Context, t: &Tensor) -> Vec<f32> {
    t.read_f32(ctx).expect("readback")
}

/// Central finite differences of the scalar `loss` at `x` in every
/// coordinate, compared with `analytic` (rel. to max(1, |g|)).
pub fn fd_check(name: &str, x: &[f64], analytic: &[f64], mut loss: impl FnMut(&[f64]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let h = 1e-6;
    let mut xp = x.to_vec();
    let mut maxerr = 0.0f64;
    for i in 0..x.len() {
        xp[i] = x[i] + h;
        let lp = loss(&xp);
        xp[i] = x[i] - h;
        let lm = loss(&xp);
        xp[i] = x[i];
        let fd = (lp - lm) / (2.0 * h);
        let err = (fd - analytic[i]).abs() / analytic[i].abs().max(1.0);
        maxerr = maxerr.max(err);
        assert!(
            err < 1e-5,
            "{name}: d/dx[{i}] analytic {} vs finite difference {fd}",
            analytic[i]
        );
    }
    eprintln!(
        "{name}: max rel err {maxerr:.2e} over {} coordinates",
        x.len()
    );
}

/// `sum(a * b)`: the "fake loss" L = sum(out * dout).
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A separate context with special options (small binding limit, no
/// subgroups), following the same skip / WGTUNE_REQUIRE_GPU rule.
pub fn ctx_with(opts: ContextOptions) -> Option<Context> {
    ctx()?;
    match Context::new(&opts) {
        Ok(c) => Some(c),
        Err(e) => panic!("second context failed although the first worked: {e}"),
    }
}
