use crate::common::{assert_close, read, run, to64, up, zeros, Rng};

use wgtune::cpu;
use wgtune::gpu::ops::attention::{
    self, attention_backward_with, attention_forward_with, AttnConfig, AttnDims, AttnMask,
};
use wgtune::gpu::{Context, Plan};
use wgtune::Error;

/// (B, T, NH, KVH, HD, P)
type Shape = (usize, usize, usize, usize, usize, usize);

/// T=1, odd T, T not a multiple of the subgroup, GQA (NH=6, KVH=2) and MHA
/// (NH=KVH), with and without a prefix, HD 8/12/64/128, and one T large
/// enough for 2 and 4 rows per invocation on software adapters.
const SHAPES: &[Shape] = &[
    (1, 1, 2, 1, 8, 0),
    (1, 1, 4, 4, 8, 3),
    (2, 7, 6, 2, 8, 3),
    (2, 7, 3, 3, 64, 0),
    (2, 13, 6, 2, 64, 3),
    (1, 9, 4, 2, 12, 2),
    (1, 5, 2, 1, 128, 1),
    (1, 40, 6, 2, 64, 3),
];

fn dims((b, t, nh, kvh, hd, p): Shape) -> AttnDims {
    AttnDims {
        b,
        t,
        nh,
        kvh,
        hd,
        p,
    }
}

/// Forward then backward (onto non-zero gradients) on the GPU, compared with
/// the CPU twins. `cfg: None` goes through the public wrappers.
fn check(ctx: &Context, cfg: Option<AttnConfig>, shape: Shape) {
    check_masked(ctx, cfg, shape, None);
}

/// [`check`] with a score scale and sliding window (`None`: the causal
/// default through the unmasked wrappers).
fn check_masked(ctx: &Context, cfg: Option<AttnConfig>, shape: Shape, mask: Option<AttnMask>) {
    let (b, t, nh, kvh, hd, p) = shape;
    let s = p + t;
    let (nq, nk, nl) = (b * t * nh * hd, b * s * kvh * hd, b * nh * t);
    let mut r = Rng::new((b * 1000 + t * 100 + nh * 10 + hd + p) as u64);
    let (q, k, v, dout) = (
        r.vec(nq, 1.5),
        r.vec(nk, 1.5),
        r.vec(nk, 1.0),
        r.vec(nq, 1.0),
    );
    let (dq0, dk0, dv0) = (r.vec(nq, 1.0), r.vec(nk, 1.0), r.vec(nk, 1.0));
    let qs = [b, t, nh, hd];
    let ks = [b, s, kvh, hd];
    let (tq, tk, tv, tdout) = (
        up(ctx, &q, &qs, "q"),
        up(ctx, &k, &ks, "k"),
        up(ctx, &v, &ks, "v"),
        up(ctx, &dout, &qs, "dout"),
    );
    let (out, lse) = (zeros(ctx, &qs, "out"), zeros(ctx, &[b, nh, t], "lse"));
    // The delta scratch starts dirty: backward must overwrite it.
    let delta = up(ctx, &r.vec(nl, 1.0), &[b, nh, t], "delta");
    // Backward accumulates: gradients start non-zero.
    let (dq, dk, dv) = (
        up(ctx, &dq0, &qs, "dq"),
        up(ctx, &dk0, &ks, "dk"),
        up(ctx, &dv0, &ks, "dv"),
    );
    let started = std::time::Instant::now();
    let mut plan = Plan::new("attention");
    let used = cfg.unwrap_or_else(|| AttnConfig::for_context(ctx, &dims(shape)));
    let m = mask.unwrap_or(AttnMask::causal(hd));
    match (cfg, mask) {
        (None, None) => {
            attention::attention_forward(ctx, &mut plan, &out, &lse, &tq, &tk, &tv).unwrap();
            attention::attention_backward(
                ctx, &mut plan, &dq, &dk, &dv, &delta, &tdout, &tq, &tk, &tv, &out, &lse,
            )
            .unwrap();
        }
        (None, Some(m)) => {
            attention::attention_forward_masked(ctx, &mut plan, &out, &lse, &tq, &tk, &tv, m, None)
                .unwrap();
            attention::attention_backward_masked(
                ctx, &mut plan, &dq, &dk, &dv, &delta, &tdout, &tq, &tk, &tv, &out, &lse, m, None,
            )
            .unwrap();
        }
        (Some(c), _) => {
            attention_forward_with(ctx, &mut plan, &out, &lse, &tq, &tk, &tv, m, c, None).unwrap();
            attention_backward_with(
                ctx, &mut plan, &dq, &dk, &dv, &delta, &tdout, &tq, &tk, &tv, &out, &lse, m, c,
                None,
            )
            .unwrap();
        }
    }
    run(ctx, &plan);
    let elapsed = started.elapsed().as_secs_f64();

    let (q64, k64, v64, dout64) = (to64(&q), to64(&k), to64(&v), to64(&dout));
    let (mut ro, mut rl) = (vec![0.0; nq], vec![0.0; nl]);
    let cm = cpu::attention::Mask {
        scale: m.scale as f64,
        window: m.window,
    };
    cpu::attention::attention_forward_masked(
        &mut ro, &mut rl, &q64, &k64, &v64, b, t, nh, kvh, hd, p, cm, None,
    );
    let (mut rdq, mut rdk, mut rdv) = (to64(&dq0), to64(&dk0), to64(&dv0));
    cpu::attention::attention_backward_masked(
        &mut rdq, &mut rdk, &mut rdv, &dout64, &q64, &k64, &v64, &ro, &rl, b, t, nh, kvh, hd, p,
        cm, None,
    );
    // delta (B, NH, T) = rowsum(dout * out) of the (B, T, NH, HD) rows.
    let rdelta: Vec<f64> = (0..nl)
        .map(|i| {
            let (bh, ti) = (i / t, i % t);
            let base = (((bh / nh) * t + ti) * nh + bh % nh) * hd;
            (0..hd).map(|d| dout64[base + d] * ro[base + d]).sum()
        })
        .collect();

    let tag = format!(
        "attention {} lanes={} rows={}/{}/{} B={b} T={t} NH={nh} KVH={kvh} HD={hd} P={p} {m:?}",
        if used.textures { "tex" } else { "buf" },
        used.lanes,
        used.fwd_rows,
        used.dq_rows,
        used.dkv_rows
    );
    eprintln!("{tag}: ran in {elapsed:.2} s (includes any pipeline JIT)");
    assert_close(&format!("{tag} out"), &read(ctx, &out), &ro, 1e-5, 1e-4);
    assert_close(&format!("{tag} lse"), &read(ctx, &lse), &rl, 1e-5, 1e-4);
    assert_close(
        &format!("{tag} delta"),
        &read(ctx, &delta),
        &rdelta,
        1e-5,
        1e-4,
    );
    assert_close(&format!("{tag} dq"), &read(ctx, &dq), &rdq, 1e-4, 1e-4);
    assert_close(&format!("{tag} dk"), &read(ctx, &dk), &rdk, 1e-4, 1e-4);
    assert_close(&format!("{tag} dv"), &read(ctx, &dv), &rdv, 1e-4, 1e-4);
}

/// The public wrappers, with the configuration they pick on this adapter.
#[test]
fn attention_forward_backward_vs_cpu() {
    let ctx = gpu!();
    for &shape in SHAPES {
        check(ctx, None, shape);
    }
}

/// Sliding windows (Gemma 3, Mistral) shorter than the keys, with and
/// without a prefix (whose rows are positions the window can drop), odd T,
/// a window of 1, a scale other than 1/sqrt(HD), and HD=256 (Gemma's head
/// dim, a build with larger register rows).
#[test]
fn attention_sliding_window_vs_cpu() {
    let ctx = gpu!();
    let mask = |scale: f32, w| {
        Some(AttnMask {
            scale,
            window: Some(w),
        })
    };
    check_masked(ctx, None, (2, 13, 6, 2, 8, 3), mask(0.2, 4));
    check_masked(ctx, None, (1, 9, 4, 2, 12, 0), mask(0.3, 1));
    check_masked(ctx, None, (1, 40, 6, 2, 64, 3), mask(0.125, 7));
    check_masked(ctx, None, (2, 7, 6, 2, 8, 5), mask(0.35, 3));
    check_masked(ctx, None, (1, 5, 2, 1, 256, 1), mask(0.0625, 3));
    // A window past every key changes nothing (and is passed as none).
    check_masked(ctx, None, (2, 7, 6, 2, 8, 3), mask(0.35, 64));
    // Groups of several rows, where the window starts differ within a group.
    let lanes = ctx.subgroup_size().unwrap_or(1);
    for (textures, rows) in [(false, (4, 2, 2)), (false, (2, 4, 4)), (true, (4, 2, 4))] {
        let cfg = AttnConfig {
            textures,
            lanes,
            fwd_rows: rows.0,
            dq_rows: rows.1,
            dkv_rows: rows.2,
        };
        check_masked(ctx, Some(cfg), (1, 40, 6, 2, 8, 3), mask(0.3, 5));
    }
}

/// Sequences long enough that llvmpipe's cap of 65,535 loop iterations per
/// invocation would stop a kernel short (it did: forward at HD 256 after
/// ~480 keys, dq at HD 128 after ~980), so the keys (queries for dk/dv) are
/// split over several dispatches on software adapters. With a window of 100
/// the last rows see no key of the first block (the resume-from-nothing
/// case).
#[test]
fn attention_long_sequences_vs_cpu() {
    let ctx = gpu!();
    let window = |scale: f32, w| {
        Some(AttnMask {
            scale,
            window: Some(w),
        })
    };
    check_masked(ctx, None, (1, 600, 2, 1, 256, 2), window(0.0625, 100));
    check_masked(
        ctx,
        None,
        (1, 1000, 1, 1, 128, 0),
        Some(AttnMask::causal(128)),
    );
}

/// More packed rows than one texture layer holds (16384 on lavapipe): k, v
/// and q, dout are split into layers (B*S*KVH = B*T*NH = 16896 rows).
#[test]
fn attention_layered_textures_vs_cpu() {
    let ctx = gpu!();
    eprintln!(
        "max texture dimension {}",
        ctx.limits.max_texture_dimension_2d
    );
    check(ctx, None, (1, 512, 33, 33, 4, 0));
}

/// Storage-buffer kernels (textures off, as with WGTUNE_NO_TEXTURES=1), with
/// the subgroup build when the adapter has one, and with the 4/2/2 rows per
/// invocation that software adapters then use.
#[test]
fn attention_storage_build_vs_cpu() {
    let ctx = gpu!();
    let lanes = ctx.subgroup_size().unwrap_or(1);
    let cfg = |fwd_rows, dq_rows, dkv_rows| {
        Some(AttnConfig {
            textures: false,
            lanes,
            fwd_rows,
            dq_rows,
            dkv_rows,
        })
    };
    check(ctx, cfg(1, 1, 1), (2, 7, 6, 2, 8, 3));
    check(ctx, cfg(2, 2, 4), (1, 1, 4, 4, 8, 3));
    check(ctx, cfg(1, 1, 2), (2, 13, 6, 2, 64, 3));
    check(ctx, cfg(4, 2, 2), (1, 40, 6, 2, 64, 3));
}

/// The portable build (no subgroups) runs everywhere; check it with 1, 2 and
/// 4 rows per invocation, from storage buffers and from textures.
#[test]
fn attention_portable_build_vs_cpu() {
    let ctx = gpu!();
    let cfg = |textures, fwd_rows, dq_rows, dkv_rows| {
        Some(AttnConfig {
            textures,
            lanes: 1,
            fwd_rows,
            dq_rows,
            dkv_rows,
        })
    };
    check(ctx, cfg(false, 1, 1, 1), (2, 7, 6, 2, 8, 3));
    check(ctx, cfg(false, 2, 2, 2), (2, 7, 6, 2, 8, 3));
    check(ctx, cfg(false, 4, 4, 4), (2, 7, 6, 2, 8, 3));
    check(ctx, cfg(false, 4, 4, 4), (1, 1, 4, 4, 8, 3));
    check(ctx, cfg(false, 4, 2, 4), (1, 9, 4, 2, 12, 2));
    check(ctx, cfg(false, 2, 1, 1), (2, 13, 6, 2, 64, 3));
    check(ctx, cfg(true, 1, 1, 1), (2, 7, 6, 2, 8, 3));
    check(ctx, cfg(true, 4, 2, 4), (1, 9, 4, 2, 12, 2));
    check(ctx, cfg(true, 1, 1, 1), (2, 13, 6, 2, 64, 3));
    // HD=128 runs in the default build above; its portable storage
    // pipelines take over a minute of lavapipe JIT on a cold shader cache.
}

/// Subgroup build with row counts the default would not pick at these
/// sizes: groups much larger than T, so most rows are padding.
#[test]
fn attention_subgroup_build_row_configs_vs_cpu() {
    let ctx = gpu!();
    let Some(lanes) = ctx.subgroup_size() else {
        eprintln!("skipping: no fixed-size subgroups on this adapter");
        return;
    };
    let textures = ctx.textures();
    check(
        ctx,
        Some(AttnConfig {
            textures,
            lanes,
            fwd_rows: 4,
            dq_rows: 4,
            dkv_rows: 2,
        }),
        (2, 7, 6, 2, 8, 3),
    );
    check(
        ctx,
        Some(AttnConfig {
            textures,
            lanes,
            fwd_rows: 2,
            dq_rows: 2,
            dkv_rows: 4,
        }),
        (1, 1, 4, 4, 8, 3),
    );
}

/// The subgroup build is generated from the family source; naga must accept it.
#[test]
fn attention_subgroup_source_validates() {
    use naga::valid::{Capabilities, ValidationFlags, Validator};
    let src = attention::subgroup_source().unwrap();
    assert!(
        src.contains("subgroupShuffle"),
        "subgroup build lacks subgroupShuffle"
    );
    let module =
        naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| panic!("{}", e.emit_to_string(&src)));
    Validator::new(ValidationFlags::all(), Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}", e.emit_to_string(&src)));
}

#[test]
fn attention_rejects_wrong_shapes() {
    let ctx = gpu!();
    let (b, t, nh, kvh, hd, p) = (2, 5, 6, 2, 8, 3);
    let q = zeros(ctx, &[b, t, nh, hd], "q");
    let k = zeros(ctx, &[b, p + t, kvh, hd], "k");
    let v = zeros(ctx, &[b, p + t, kvh, hd], "v");
    let out = zeros(ctx, &[b, t, nh, hd], "out");
    let shape_err = |e: Error, name: &str| match e {
        Error::Shape { ref tensor, .. } if tensor == name => {}
        other => panic!("expected Error::Shape naming `{name}`, got {other}"),
    };
    // lse with T and NH swapped.
    let bad_lse = zeros(ctx, &[b, t, nh], "lse");
    shape_err(
        attention::attention_forward(ctx, &mut Plan::new("t"), &out, &bad_lse, &q, &k, &v)
            .unwrap_err(),
        "lse",
    );
    // v with a different KVH from k.
    let bad_v = zeros(ctx, &[b, p + t, 3, hd], "v");
    shape_err(
        attention::attention_forward(
            ctx,
            &mut Plan::new("t"),
            &out,
            &zeros(ctx, &[b, nh, t], "lse"),
            &q,
            &k,
            &bad_v,
        )
        .unwrap_err(),
        "v",
    );
    // NH % KVH != 0 is reported on k.
    let bad_k = zeros(ctx, &[b, p + t, 4, hd], "k");
    let bad_v4 = zeros(ctx, &[b, p + t, 4, hd], "v");
    shape_err(
        attention::attention_forward(
            ctx,
            &mut Plan::new("t"),
            &out,
            &zeros(ctx, &[b, nh, t], "lse"),
            &q,
            &bad_k,
            &bad_v4,
        )
        .unwrap_err(),
        "k",
    );
    // HD % 4 != 0 is reported on q.
    let q6 = zeros(ctx, &[b, t, nh, 6], "q");
    let k6 = zeros(ctx, &[b, p + t, kvh, 6], "k");
    let out6 = zeros(ctx, &[b, t, nh, 6], "out");
    shape_err(
        attention::attention_forward(
            ctx,
            &mut Plan::new("t"),
            &out6,
            &zeros(ctx, &[b, nh, t], "lse"),
            &q6,
            &k6,
            &k6,
        )
        .unwrap_err(),
        "q",
    );
    // Backward: the delta scratch must be (B, NH, T).
    let lse = zeros(ctx, &[b, nh, t], "lse");
    let bad_delta = zeros(ctx, &[b, nh, t + 1], "delta");
    let (dq, dk, dv) = (
        zeros(ctx, &[b, t, nh, hd], "dq"),
        zeros(ctx, &[b, p + t, kvh, hd], "dk"),
        zeros(ctx, &[b, p + t, kvh, hd], "dv"),
    );
    let e = attention::attention_backward(
        ctx,
        &mut Plan::new("t"),
        &dq,
        &dk,
        &dv,
        &bad_delta,
        &out,
        &q,
        &k,
        &v,
        &out,
        &lse,
    )
    .unwrap_err();
    shape_err(e, "delta");
}

/// attention_decode: one plan recorded for a cache of CAP rows, replayed at
/// several positions (the position is read on the GPU), against the CPU
/// twin; GQA and MHA, odd head dims, chunk boundaries (64 keys) crossed,
/// with and without a sliding window.
#[test]
fn attention_decode_reads_the_position_when_replayed() {
    let ctx = gpu!();
    // (CAP, NH, KVH, HD, window)
    for (cap, nh, kvh, hd, window) in [
        (5, 2, 1, 8, None),
        (150, 6, 2, 12, None),
        (150, 3, 3, 64, Some(70)),
        (70, 4, 2, 128, Some(3)),
    ] {
        let mut r = Rng::new((cap * 10 + hd) as u64);
        let nk = cap * kvh * hd;
        let (k, v) = (r.vec(nk, 1.5), r.vec(nk, 1.0));
        let ks = [1, cap, kvh, hd];
        let (tk, tv) = (up(ctx, &k, &ks, "k"), up(ctx, &v, &ks, "v"));
        let q = r.vec(nh * hd, 1.5);
        let tq = up(ctx, &q, &[1, 1, nh, hd], "q");
        let (out, lse) = (
            zeros(ctx, &[1, 1, nh, hd], "out"),
            zeros(ctx, &[1, nh, 1], "lse"),
        );
        let part = zeros(ctx, &attention::decode_part_shape(nh, hd, cap), "part");
        let pos = wgtune::gpu::Tensor::zeros(ctx, &[1], wgtune::gpu::DType::U32, "pos").unwrap();
        let mask = AttnMask { scale: 0.3, window };
        let mut plan = Plan::new("decode");
        attention::attention_decode(ctx, &mut plan, &out, &lse, &part, &tq, &tk, &tv, &pos, mask)
            .unwrap();
        for p in [0, 1, cap / 2, cap - 1] {
            pos.write_u32(ctx, &[p as u32]).unwrap();
            run(ctx, &plan);
            let (mut wo, mut wl) = (vec![0.0; nh * hd], vec![0.0; nh]);
            let m = cpu::attention::Mask { scale: 0.3, window };
            cpu::attention::attention_decode(
                &mut wo,
                &mut wl,
                &to64(&q),
                &to64(&k),
                &to64(&v),
                p,
                nh,
                kvh,
                hd,
                m,
            );
            let tag = format!("cap {cap} hd {hd} window {window:?} pos {p}");
            assert_close(&format!("{tag} out"), &read(ctx, &out), &wo, 1e-5, 1e-4);
            assert_close(&format!("{tag} lse"), &read(ctx, &lse), &wl, 1e-5, 1e-4);
        }
    }
}
