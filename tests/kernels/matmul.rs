use crate::common::{self, assert_close, read, run, to64, up, Rng};
use wgtune::cpu;
use wgtune::gpu::ops::matmul;
use wgtune::gpu::{Context, ContextOptions, MatmulKernel, Plan};

// (M, K, N): odd sizes that are no multiple of any tile or of 4, sizes that
// are multiples of 4 but not of a tile (vec4 path), M = 1, and one LLM-like
// shape.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 7, 5),
    (13, 33, 17),
    (7, 36, 20),
    (1, 64, 9),
    (45, 100, 132),
    (130, 96, 70),
    (37, 128, 64),
    // Two row tiles of the register family (256 rows), the second nearly
    // empty: its grid puts row tiles first.
    (261, 37, 70),
];

/// Run `f` on one context per matmul kernel family (register and tiled)
/// with `opts`, so that both families are tested on any adapter, whatever
/// `WGTUNE_MATMUL_KERNEL` says.
fn each_kernel(opts: ContextOptions, mut f: impl FnMut(&Context, &str)) {
    for k in [MatmulKernel::Register, MatmulKernel::Tiled] {
        let Some(ctx) = common::ctx_with(ContextOptions {
            matmul_kernel: Some(k),
            ..opts.clone()
        }) else {
            return;
        };
        // Every WebGPU adapter has the 256 invocations and 16 KiB of
        // workgroup memory that the tiled kernels need.
        assert_eq!(ctx.matmul_kernel(), k);
        assert_eq!(
            matmul::pick_variant(&ctx, true).tiled,
            k == MatmulKernel::Tiled
        );
        f(&ctx, &format!("{k:?}"));
    }
}

fn check_all(ctx: &Context, tag: &str, shapes: &[(usize, usize, usize)]) {
    for &(m, k, n) in shapes {
        let mut r = Rng::new((m * 1000 + k * 10 + n) as u64);
        let (x, w, b, dy) = (
            r.vec(m * k, 1.0),
            r.vec(n * k, 1.0),
            r.vec(n, 1.0),
            r.vec(m * n, 1.0),
        );
        let (dx0, dw0) = (r.vec(m * k, 1.0), r.vec(n * k, 1.0));
        let (tx, tw, tb, tdy) = (
            up(ctx, &x, &[m, k], "x"),
            up(ctx, &w, &[n, k], "w"),
            up(ctx, &b, &[n], "b"),
            up(ctx, &dy, &[m, n], "dy"),
        );
        let out = up(ctx, &vec![0.5; m * n], &[m, n], "out");
        let (dx, dw) = (up(ctx, &dx0, &[m, k], "dx"), up(ctx, &dw0, &[n, k], "dw"));
        let mut plan = Plan::new("matmul");
        matmul::matmul_forward(ctx, &mut plan, &out, &tx, &tw, Some(&tb)).unwrap();
        matmul::matmul_backward_input(ctx, &mut plan, &dx, &tdy, &tw).unwrap();
        matmul::matmul_backward_weight(ctx, &mut plan, &dw, &tdy, &tx).unwrap();
        run(ctx, &plan);

        let mut ro = vec![0.0; m * n];
        cpu::matmul::matmul_forward(&mut ro, &to64(&x), &to64(&w), Some(&to64(&b)), m, k, n);
        let mut rdx = to64(&dx0);
        cpu::matmul::matmul_backward_input(&mut rdx, &to64(&dy), &to64(&w), m, k, n);
        let mut rdw = to64(&dw0);
        cpu::matmul::matmul_backward_weight(&mut rdw, &to64(&dy), &to64(&x), m, k, n);
        let t = format!("{tag} M={m} K={k} N={n}");
        // f32 accumulation error grows like sqrt(reduction length).
        let tol = |red: usize| (2e-6 * (red as f64).sqrt()).max(1e-5);
        assert_close(&format!("{t} forward"), &read(ctx, &out), &ro, tol(k), 1e-4);
        assert_close(
            &format!("{t} backward_input"),
            &read(ctx, &dx),
            &rdx,
            tol(n),
            1e-4,
        );
        assert_close(
            &format!("{t} backward_weight"),
            &read(ctx, &dw),
            &rdw,
            tol(m),
            1e-4,
        );
    }
}

#[test]
fn matmul_all_layouts_vs_cpu() {
    each_kernel(ContextOptions::default(), |ctx, k| {
        eprintln!("variant: {:?}", matmul::pick_variant(ctx, true));
        check_all(ctx, &format!("{k} default"), SHAPES);
    });
}

#[test]
fn matmul_portable_path_vs_cpu() {
    // No subgroups, operands from storage buffers: the path for adapters
    // without SUBGROUP and for matrices beyond the texture limits.
    let opts = ContextOptions {
        disable_subgroups: true,
        disable_textures: true,
        ..Default::default()
    };
    each_kernel(opts, |ctx, k| {
        assert_eq!(matmul::pick_variant(ctx, true).sg, 1);
        check_all(ctx, &format!("{k} no-subgroups/storage"), SHAPES);
    });
}

#[test]
fn matmul_storage_operands_vs_cpu() {
    let opts = ContextOptions {
        disable_textures: true,
        ..Default::default()
    };
    each_kernel(opts, |ctx, k| {
        check_all(ctx, &format!("{k} storage"), SHAPES)
    });
}

#[test]
fn matmul_textures_without_subgroups_vs_cpu() {
    let opts = ContextOptions {
        disable_subgroups: true,
        ..Default::default()
    };
    each_kernel(opts, |ctx, k| {
        check_all(ctx, &format!("{k} no-subgroups/textures"), SHAPES)
    });
}

#[test]
fn matmul_alpha_accumulate_and_long_reduction_vs_cpu() {
    // Many tokens force several split-K partials in backward_weight.
    each_kernel(ContextOptions::default(), |ctx, kern| {
        let (m, k, n) = (1037, 12, 8);
        assert!(
            matmul::split_count(ctx, m, n, k) > 1,
            "this shape should use split-K"
        );
        check_all(ctx, &format!("{kern} split-k"), &[(m, k, n)]);
        let mut r = Rng::new(3);
        let (x, w, o0) = (r.vec(m * k, 1.0), r.vec(n * k, 1.0), r.vec(m * n, 1.0));
        let (tx, tw, out) = (
            up(ctx, &x, &[m, k], "x"),
            up(ctx, &w, &[n, k], "w"),
            up(ctx, &o0, &[m, n], "out"),
        );
        let mut plan = Plan::new("alpha");
        matmul::matmul_forward_ex(ctx, &mut plan, &out, &tx, &tw, None, 0.25, true).unwrap();
        run(ctx, &plan);
        let mut ro = vec![0.0; m * n];
        cpu::matmul::matmul_forward(&mut ro, &to64(&x), &to64(&w), None, m, k, n);
        let want: Vec<f64> = ro
            .iter()
            .zip(&o0)
            .map(|(v, o)| 0.25 * v + *o as f64)
            .collect();
        assert_close(
            &format!("{kern} forward alpha=0.25 accumulate"),
            &read(ctx, &out),
            &want,
            1e-5,
            1e-4,
        );
    });
}

#[test]
fn matmul_chunks_tensors_larger_than_a_binding() {
    // An 8 KiB binding limit: the weight (200 x 16 floats = 12.5 KiB), the
    // output (70 x 200 floats) and the output gradient are split into row
    // chunks; the input rows (70 x 16) fit whole.
    for textures in [false, true] {
        let opts = ContextOptions {
            max_binding_bytes: Some(8192),
            disable_textures: !textures,
            ..Default::default()
        };
        each_kernel(opts, |ctx, kern| {
            for (m, k, n) in [(70, 16, 200), (23, 17, 192)] {
                let mut r = Rng::new(11);
                let (x, w, b, dy) = (
                    r.vec(m * k, 1.0),
                    r.vec(n * k, 1.0),
                    r.vec(n, 1.0),
                    r.vec(m * n, 1.0),
                );
                let (tx, tw, tb, tdy) = (
                    up(ctx, &x, &[m, k], "x"),
                    up(ctx, &w, &[n, k], "w"),
                    up(ctx, &b, &[n], "b"),
                    up(ctx, &dy, &[m, n], "dy"),
                );
                let out = up(ctx, &vec![0.0; m * n], &[m, n], "out");
                let dx = up(ctx, &vec![0.0; m * k], &[m, k], "dx");
                let mut plan = Plan::new("chunked");
                matmul::matmul_forward(ctx, &mut plan, &out, &tx, &tw, Some(&tb)).unwrap();
                matmul::matmul_backward_input(ctx, &mut plan, &dx, &tdy, &tw).unwrap();
                assert!(
                    plan.dispatches() >= 6,
                    "expected chunked dispatches, got {}",
                    plan.dispatches()
                );
                assert_eq!(matmul::use_textures(ctx, &[(m, k), (n, k)]), textures);
                eprintln!(
                    "M={m} K={k} N={n}: chunked into {} dispatches",
                    plan.dispatches()
                );
                run(ctx, &plan);
                let mut ro = vec![0.0; m * n];
                cpu::matmul::matmul_forward(
                    &mut ro,
                    &to64(&x),
                    &to64(&w),
                    Some(&to64(&b)),
                    m,
                    k,
                    n,
                );
                let mut rdx = vec![0.0; m * k];
                cpu::matmul::matmul_backward_input(&mut rdx, &to64(&dy), &to64(&w), m, k, n);
                assert_close(
                    &format!("{kern} chunked forward M={m} K={k} N={n}"),
                    &read(ctx, &out),
                    &ro,
                    1e-5,
                    1e-4,
                );
                assert_close(
                    &format!("{kern} chunked backward_input M={m} K={k} N={n}"),
                    &read(ctx, &dx),
                    &rdx,
                    1e-5,
                    1e-4,
                );
            }
        });
    }
}

#[test]
fn matmul_rejects_bad_shapes_and_oversized_bindings() {
    let ctx = gpu!();
    let x = up(ctx, &[0.0; 12], &[3, 4], "x");
    let w = up(ctx, &[0.0; 10], &[2, 5], "w.bad");
    let out = up(ctx, &[0.0; 6], &[3, 2], "out");
    let e = matmul::matmul_forward(ctx, &mut Plan::new("t"), &out, &x, &w, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("w.bad"), "{e}");
    let Some(small) = common::ctx_with(ContextOptions {
        max_binding_bytes: Some(1024),
        ..Default::default()
    }) else {
        return;
    };
    // backward_weight binds dweight whole: 32 x 16 floats = 2 KiB > 1 KiB.
    let (dw, dy, xi) = (
        up(&small, &[0.0; 512], &[32, 16], "dW"),
        up(&small, &[0.0; 64], &[2, 32], "dy"),
        up(&small, &[0.0; 32], &[2, 16], "x"),
    );
    let e = matmul::matmul_backward_weight(&small, &mut Plan::new("t"), &dw, &dy, &xi)
        .unwrap_err()
        .to_string();
    assert!(e.contains("dW") && e.contains("allows"), "{e}");
}

#[test]
fn matmul_is_deterministic() {
    each_kernel(ContextOptions::default(), |ctx, kern| {
        let (m, k, n) = (517, 40, 24);
        let mut r = Rng::new(5);
        let (x, dy) = (r.vec(m * k, 1.0), r.vec(m * n, 1.0));
        let (tx, tdy) = (up(ctx, &x, &[m, k], "x"), up(ctx, &dy, &[m, n], "dy"));
        let go = || {
            let dw = up(ctx, &vec![0.0; n * k], &[n, k], "dw");
            let mut plan = Plan::new("det");
            matmul::matmul_backward_weight(ctx, &mut plan, &dw, &tdy, &tx).unwrap();
            run(ctx, &plan);
            read(ctx, &dw)
        };
        let (a, b) = (go(), go());
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{kern} backward_weight differs between runs"
        );
    });
}

#[test]
fn matmul_layered_textures_vs_cpu() {
    // More rows than one texture layer holds (16384 on lavapipe): the packed
    // matrices are split into layers, through the packing kernel (K = 12)
    // and through the buffer-to-texture copy (K = 64).
    each_kernel(ContextOptions::default(), |ctx, kern| {
        let rows = ctx.limits.max_texture_dimension_2d as usize + 37;
        for k in [12, 64] {
            assert!(
                matmul::use_textures(ctx, &[(rows, k)]),
                "texture path expected"
            );
            check_all(ctx, &format!("{kern} layered"), &[(rows, k, 5)]);
        }
        // A layered weight read by the one-row (gemv) forward, and by a
        // register tile with all but one row group idle.
        assert!(1 <= matmul::gemv_max_rows());
        check_all(ctx, &format!("{kern} layered gemv"), &[(1, 12, rows)]);
        check_all(ctx, &format!("{kern} layered few rows"), &[(3, 12, rows)]);
        check_all(ctx, &format!("{kern} layered weight"), &[(40, 12, rows)]);
    });
}

/// A dout too wide for a texture row (a 151,936-token vocabulary's dlogits:
/// more than 4 x max_texture_dimension floats) against a packed weight: the
/// dout stays in its buffer and the mixed-source variant reads both. Before,
/// packing it failed and no model with such a vocabulary could train.
#[test]
fn matmul_backward_input_wide_dout_with_packed_weight_vs_cpu() {
    each_kernel(ContextOptions::default(), |ctx, kern| {
        let n = 4 * ctx.limits.max_texture_dimension_2d as usize + 13;
        for (m, k) in [(3, 64), (5, 7)] {
            assert!(!matmul::use_textures(ctx, &[(m, n)]), "dout must not fit");
            let mut r = Rng::new((m * 7 + k) as u64);
            let (w, dy, dx0) = (r.vec(n * k, 1.0), r.vec(m * n, 1.0), r.vec(m * k, 1.0));
            let (tw, tdy) = (up(ctx, &w, &[n, k], "w"), up(ctx, &dy, &[m, n], "dy"));
            let dx = up(ctx, &dx0, &[m, k], "dx");
            let mut plan = Plan::new("wide dout");
            let packed = matmul::pack(ctx, &mut plan, &tw).unwrap();
            matmul::matmul_backward_input_packed(ctx, &mut plan, &dx, &tdy, &packed, 1.0).unwrap();
            run(ctx, &plan);
            let mut want = to64(&dx0);
            cpu::matmul::matmul_backward_input(&mut want, &to64(&dy), &to64(&w), m, k, n);
            let tol = (2e-6 * (n as f64).sqrt()).max(1e-5);
            assert_close(
                &format!("{kern} wide dout M={m} K={k} N={n}"),
                &read(ctx, &dx),
                &want,
                tol,
                1e-4,
            );
        }
    });
}

/// A backward_input reduction longer than 65535 steps of 4 (lm_head's
/// backward over a 262,144-token vocabulary): llvmpipe silently ends a shader
/// loop after 65535 iterations, which dropped the last 4 vocabulary columns
/// (the wide_vocab tests' gradients were 13-29% off). Storage and packed
/// weight, aligned and not.
#[test]
fn matmul_backward_input_reduction_over_65535_steps_vs_cpu() {
    each_kernel(ContextOptions::default(), |ctx, kern| {
        for (m, k, n) in [(2, 8, 262_144), (3, 5, 4 * 65_536 + 9)] {
            let mut r = Rng::new((m * 31 + k) as u64);
            let (w, dy) = (r.vec(n * k, 1.0), r.vec(m * n, 1.0));
            let (tw, tdy) = (up(ctx, &w, &[n, k], "w"), up(ctx, &dy, &[m, n], "dy"));
            let (dx1, dx2) = (
                common::zeros(ctx, &[m, k], "dx1"),
                common::zeros(ctx, &[m, k], "dx2"),
            );
            let mut plan = Plan::new("long reduction");
            matmul::matmul_backward_input(ctx, &mut plan, &dx1, &tdy, &tw).unwrap();
            let packed = matmul::pack(ctx, &mut plan, &tw).unwrap();
            matmul::matmul_backward_input_packed(ctx, &mut plan, &dx2, &tdy, &packed, 1.0).unwrap();
            run(ctx, &plan);
            let mut want = vec![0f64; m * k];
            cpu::matmul::matmul_backward_input(&mut want, &to64(&dy), &to64(&w), m, k, n);
            let tol = 2e-6 * (n as f64).sqrt();
            for (dx, how) in [(&dx1, "storage"), (&dx2, "packed")] {
                let what = format!("{kern} backward_input {how} M={m} K={k} N={n}");
                assert_close(&what, &read(ctx, dx), &want, tol, 1e-4);
            }
        }
    });
}

/// A plan packs an input once for the matmuls that read it (q, k and v
/// share one), and packs again after anything wrote the input or another
/// input took its texture: never a stale pack. K = 64 packs by a copy,
/// K = 36 by a kernel.
#[test]
fn matmul_reuses_a_pack_only_while_it_is_current() {
    each_kernel(ContextOptions::default(), |ctx, tag| {
        for (m, k, n) in [(5, 64, 12), (7, 36, 9)] {
            let mut r = Rng::new((m * 100 + k) as u64);
            let (x, y, w, wz, z) = (
                r.vec(m * k, 1.0),
                r.vec(m * k, 1.0),
                r.vec(n * k, 1.0),
                r.vec(k * 20, 1.0),
                r.vec(m * 20, 1.0),
            );
            let (tx, ty, tw) = (
                up(ctx, &x, &[m, k], "x"),
                up(ctx, &y, &[m, k], "y"),
                up(ctx, &w, &[n, k], "w"),
            );
            let (twz, tz) = (up(ctx, &wz, &[k, 20], "wz"), up(ctx, &z, &[m, 20], "z"));
            let outs: Vec<_> = (0..6)
                .map(|i| common::zeros(ctx, &[m, n], &format!("o{i}")))
                .collect();
            let fw = |plan: &mut Plan, o: &wgtune::gpu::Tensor, a: &wgtune::gpu::Tensor| {
                matmul::matmul_forward(ctx, plan, o, a, &tw, None).unwrap()
            };
            let mut plan = Plan::new("pack reuse");
            fw(&mut plan, &outs[0], &tx);
            fw(&mut plan, &outs[1], &tx); // the same pack
            fw(&mut plan, &outs[2], &ty); // y takes the scratch texture
            fw(&mut plan, &outs[3], &tx); // x again: packed again
            matmul::matmul_forward(ctx, &mut plan, &tx, &tz, &twz, None).unwrap(); // x = z . wz^T
            fw(&mut plan, &outs[4], &tx); // the new x
            plan.clear(&tx);
            fw(&mut plan, &outs[5], &tx); // zeros
            run(ctx, &plan);

            let cpu_fw = |a: &[f32], wt: &[f32], kk: usize, nn: usize| {
                let mut o = vec![0.0; m * nn];
                cpu::matmul::matmul_forward(&mut o, &to64(a), &to64(wt), None, m, kk, nn);
                o
            };
            let x2: Vec<f32> = cpu_fw(&z, &wz, 20, k).iter().map(|v| *v as f32).collect();
            let want = [
                cpu_fw(&x, &w, k, n),
                cpu_fw(&x, &w, k, n),
                cpu_fw(&y, &w, k, n),
                cpu_fw(&x, &w, k, n),
                cpu_fw(&x2, &w, k, n),
                vec![0.0; m * n],
            ];
            for (i, (o, want)) in outs.iter().zip(&want).enumerate() {
                let what = format!("{tag} K={k} output {i}");
                assert_close(&what, &read(ctx, o), want, 1e-4, 1e-4);
            }
        }
    });
}

/// The profile times every step of a plan, in one submission where the
/// adapter takes timestamps inside passes, and carries the plan's FLOPs per
/// op family.
#[test]
fn plan_profile_counts_every_step_and_family() {
    let Some(ctx) = common::ctx() else { return };
    let (m, k, n) = (9, 36, 20);
    let mut r = Rng::new(7);
    let (x, w) = (
        up(ctx, &r.vec(m * k, 1.0), &[m, k], "x"),
        up(ctx, &r.vec(n * k, 1.0), &[n, k], "w"),
    );
    let outs: Vec<_> = (0..3)
        .map(|i| common::zeros(ctx, &[m, n], &format!("o{i}")))
        .collect();
    let mut plan = Plan::new("profile");
    for o in &outs {
        matmul::matmul_forward(ctx, &mut plan, o, &x, &w, None).unwrap();
    }
    plan.clear(&outs[0]);
    let prof = plan.profile(ctx).unwrap();
    let inside = wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
        | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
    assert_eq!(prof.in_place, ctx.features.contains(inside));
    let (secs, count) = prof.sum(|name| wgtune::gpu::plan::Profile::is_family(name, "matmul"));
    // The family holds the packs of x too (part of a matmul's cost).
    assert_eq!(count, plan.dispatches(), "{:?}", prof.kinds);
    let forwards = prof.sum(|name| name.ends_with("::matmul_forward")).1;
    assert_eq!(forwards, 3, "{:?}", prof.kinds);
    assert!(secs.is_finite() && secs >= 0.0, "{secs}");
    assert_eq!(prof.sum(|name| name == "clear").1, 1, "{:?}", prof.kinds);
    assert_eq!(prof.flops_of("matmul"), 3.0 * 2.0 * (m * n * k) as f64);
    assert_eq!(prof.flops_of("attention"), 0.0);
    // A profile runs the plan's work once more: the outputs are what a run gives.
    let want = {
        let mut o = vec![0.0; m * n];
        cpu::matmul::matmul_forward(
            &mut o,
            &to64(&read(ctx, &x)),
            &to64(&read(ctx, &w)),
            None,
            m,
            k,
            n,
        );
        o
    };
    assert_close("profiled output", &read(ctx, &outs[1]), &want, 1e-4, 1e-4);
    assert_close(
        "cleared output",
        &read(ctx, &outs[0]),
        &vec![0.0; m * n],
        0.0,
        0.0,
    );
}
