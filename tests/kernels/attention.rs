use crate::common::{assert_close, read, run, to64, up, zeros, Rng};

use wgtune::cpu;
use wgtune::gpu::ops::attention::{self, attention_backward_lanes, attention_forward_lanes, lanes};
use wgtune::gpu::{Context, Plan};
use wgtune::Error;

/// (B, T, NH, KVH, HD, P): T=1, odd T, T not a multiple of the subgroup,
/// GQA (NH=6, KVH=2) and MHA (NH=KVH), with and without a prefix, HD 8/12/64/128.
const SHAPES: &[(usize, usize, usize, usize, usize, usize)] = &[
    (1, 1, 2, 1, 8, 0),
    (1, 1, 4, 4, 8, 3),
    (2, 7, 6, 2, 8, 3),
    (2, 7, 3, 3, 64, 0),
    (2, 13, 6, 2, 64, 3),
    (1, 9, 4, 2, 12, 2),
    (1, 5, 2, 1, 128, 1),
];

/// Forward then backward (onto non-zero gradients) on the GPU with row-group
/// width `sg`, compared with the CPU twins.
fn check(ctx: &Context, sg: u32, (b, t, nh, kvh, hd, p): (usize, usize, usize, usize, usize, usize)) {
    let s = p + t;
    let (nq, nk, nl) = (b * t * nh * hd, b * s * kvh * hd, b * nh * t);
    let mut r = Rng::new((b * 1000 + t * 100 + nh * 10 + hd + p) as u64);
    let (q, k, v, dout) = (r.vec(nq, 1.5), r.vec(nk, 1.5), r.vec(nk, 1.0), r.vec(nq, 1.0));
    let (dq0, dk0, dv0) = (r.vec(nq, 1.0), r.vec(nk, 1.0), r.vec(nk, 1.0));
    let qs = [b, t, nh, hd];
    let ks = [b, s, kvh, hd];
    let (tq, tk, tv, tdout) = (up(ctx, &q, &qs, "q"), up(ctx, &k, &ks, "k"), up(ctx, &v, &ks, "v"), up(ctx, &dout, &qs, "dout"));
    let (out, lse, delta) = (zeros(ctx, &qs, "out"), zeros(ctx, &[b, nh, t], "lse"), up(ctx, &r.vec(nl, 1.0), &[b, nh, t], "delta"));
    // Backward accumulates: gradients start non-zero.
    let (dq, dk, dv) = (up(ctx, &dq0, &qs, "dq"), up(ctx, &dk0, &ks, "dk"), up(ctx, &dv0, &ks, "dv"));
    let mut plan = Plan::new("attention");
    attention_forward_lanes(ctx, &mut plan, &out, &lse, &tq, &tk, &tv, sg).unwrap();
    attention_backward_lanes(ctx, &mut plan, &dq, &dk, &dv, &delta, &tdout, &tq, &tk, &tv, &out, &lse, sg).unwrap();
    run(ctx, &plan);

    let (q64, k64, v64, dout64) = (to64(&q), to64(&k), to64(&v), to64(&dout));
    let (mut ro, mut rl) = (vec![0.0; nq], vec![0.0; nl]);
    cpu::attention::attention_forward(&mut ro, &mut rl, &q64, &k64, &v64, b, t, nh, kvh, hd, p);
    let (mut rdq, mut rdk, mut rdv) = (to64(&dq0), to64(&dk0), to64(&dv0));
    cpu::attention::attention_backward(&mut rdq, &mut rdk, &mut rdv, &dout64, &q64, &k64, &v64, &ro, &rl, b, t, nh, kvh, hd, p);
    let rdelta: Vec<f64> = (0..nl)
        .map(|i| {
            let (bh, ti) = (i / t, i % t);
            let base = (((bh / nh) * t + ti) * nh + bh % nh) * hd;
            (0..hd).map(|d| dout64[base + d] * ro[base + d]).sum()
        })
        .collect();

    let tag = format!("attention SG={sg} B={b} T={t} NH={nh} KVH={kvh} HD={hd} P={p}");
    assert_close(&format!("{tag} out"), &read(ctx, &out), &ro, 1e-5, 1e-4);
    assert_close(&format!("{tag} lse"), &read(ctx, &lse), &rl, 1e-5, 1e-4);
    assert_close(&format!("{tag} delta"), &read(ctx, &delta), &rdelta, 1e-5, 1e-4);
    assert_close(&format!("{tag} dq"), &read(ctx, &dq), &rdq, 1e-4, 1e-4);
    assert_close(&format!("{tag} dk"), &read(ctx, &dk), &rdk, 1e-4, 1e-4);
    assert_close(&format!("{tag} dv"), &read(ctx, &dv), &rdv, 1e-4, 1e-4);
}

#[test]
fn attention_forward_backward_vs_cpu() {
    let ctx = gpu!();
    eprintln!("row-group width on this adapter: {}", lanes(ctx));
    for &shape in SHAPES {
        check(ctx, lanes(ctx), shape);
    }
}

/// The portable build (no subgroups) runs everywhere; check it even when the
/// adapter would pick the subgroup build.
#[test]
fn attention_portable_build_vs_cpu() {
    let ctx = gpu!();
    for &shape in SHAPES {
        check(ctx, 1, shape);
    }
}

/// The subgroup build is generated from the family source; naga must accept it.
#[test]
fn attention_subgroup_source_validates() {
    use naga::valid::{Capabilities, ValidationFlags, Validator};
    let src = attention::subgroup_source().unwrap();
    assert!(src.contains("subgroupShuffle"), "subgroup build lacks subgroupShuffle");
    let module = naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| panic!("{}", e.emit_to_string(&src)));
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
    shape_err(attention::attention_forward(ctx, &mut Plan::new("t"), &out, &bad_lse, &q, &k, &v).unwrap_err(), "lse");
    // v with a different KVH from k.
    let bad_v = zeros(ctx, &[b, p + t, 3, hd], "v");
    shape_err(attention::attention_forward(ctx, &mut Plan::new("t"), &out, &zeros(ctx, &[b, nh, t], "lse"), &q, &k, &bad_v).unwrap_err(), "v");
    // NH % KVH != 0 is reported on k.
    let bad_k = zeros(ctx, &[b, p + t, 4, hd], "k");
    let bad_v4 = zeros(ctx, &[b, p + t, 4, hd], "v");
    shape_err(attention::attention_forward(ctx, &mut Plan::new("t"), &out, &zeros(ctx, &[b, nh, t], "lse"), &q, &bad_k, &bad_v4).unwrap_err(), "k");
    // HD % 4 != 0 is reported on q.
    let q6 = zeros(ctx, &[b, t, nh, 6], "q");
    let k6 = zeros(ctx, &[b, p + t, kvh, 6], "k");
    let out6 = zeros(ctx, &[b, t, nh, 6], "out");
    shape_err(attention::attention_forward(ctx, &mut Plan::new("t"), &out6, &zeros(ctx, &[b, nh, t], "lse"), &q6, &k6, &k6).unwrap_err(), "q");
    // Backward: the delta scratch must be (B, NH, T).
    let lse = zeros(ctx, &[b, nh, t], "lse");
    let bad_delta = zeros(ctx, &[b, nh, t + 1], "delta");
    let (dq, dk, dv) = (zeros(ctx, &[b, t, nh, hd], "dq"), zeros(ctx, &[b, p + t, kvh, hd], "dk"), zeros(ctx, &[b, p + t, kvh, hd], "dv"));
    let e = attention::attention_backward(ctx, &mut Plan::new("t"), &dq, &dk, &dv, &bad_delta, &out, &q, &k, &v, &out, &lse).unwrap_err();
    shape_err(e, "delta");
}

/// `cargo test --release --test kernels attention_bench -- --ignored --nocapture`:
/// median wall time of forward and backward at the `wgtune bench` shape.
#[test]
#[ignore]
fn attention_bench() {
    let ctx = gpu!();
    let (b, t, nh, kvh, hd, p) = (4, 128, 9, 3, 64, 0);
    let (qs, ks) = ([b, t, nh, hd], [b, p + t, kvh, hd]);
    let mut r = Rng::new(7);
    let n = |s: &[usize]| s.iter().product::<usize>();
    let (q, k, v, dout) = (up(ctx, &r.vec(n(&qs), 1.0), &qs, "q"), up(ctx, &r.vec(n(&ks), 1.0), &ks, "k"), up(ctx, &r.vec(n(&ks), 1.0), &ks, "v"), up(ctx, &r.vec(n(&qs), 1.0), &qs, "dout"));
    let (out, lse, delta) = (zeros(ctx, &qs, "out"), zeros(ctx, &[b, nh, t], "lse"), zeros(ctx, &[b, nh, t], "delta"));
    let (dq, dk, dv) = (zeros(ctx, &qs, "dq"), zeros(ctx, &ks, "dk"), zeros(ctx, &ks, "dv"));
    let mut widths = vec![lanes(ctx)];
    if lanes(ctx) > 1 {
        widths.push(1);
    }
    for sg in widths {
        let mut fwd = Plan::new("fwd");
        attention_forward_lanes(ctx, &mut fwd, &out, &lse, &q, &k, &v, sg).unwrap();
        let mut bwd = Plan::new("bwd");
        attention_backward_lanes(ctx, &mut bwd, &dq, &dk, &dv, &delta, &dout, &q, &k, &v, &out, &lse, sg).unwrap();
        for (name, plan) in [("forward", &fwd), ("backward", &bwd)] {
            run(ctx, plan); // JIT warm-up
            let mut ms: Vec<f64> = (0..15)
                .map(|_| {
                    let t0 = std::time::Instant::now();
                    run(ctx, plan);
                    t0.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
            eprintln!(
                "attention {name} SG={sg} B={b} T={t} NH={nh} KVH={kvh} HD={hd} P={p}: median {:.2} ms (min {:.2}), {:.2} GFLOP/s",
                ms[7], ms[0], plan.flops() / ms[7] * 1e-6
            );
        }
    }
}

// TEMP experiment harness (removed before hand-off).
#[test]
#[ignore]
fn attention_experiment() {
    use std::borrow::Cow;
    use wgtune::gpu::kernels::{Access::Read as R, Access::ReadWrite as W, KernelSpec, COMMON};
    use wgtune::gpu::ops::grid_1d;
    use wgtune::gpu::Params;
    let ctx = gpu!();
    let path = std::env::var("ATTN_WGSL").unwrap();
    let sg: u32 = std::env::var("ATTN_SG").unwrap().parse().unwrap();
    let rr: usize = std::env::var("ATTN_R").unwrap_or("1".into()).parse().unwrap();
    let src = format!("{COMMON}\n{}", std::fs::read_to_string(&path).unwrap());
    let (b, t, nh, kvh, hd, p) = (4usize, 128usize, 9usize, 3usize, 64usize, 0usize);
    let s = p + t;
    let (qs, ks) = ([b, t, nh, hd], [b, s, kvh, hd]);
    let mut r = Rng::new(7);
    let n = |s: &[usize]| s.iter().product::<usize>();
    let (qv, kv, vv, dov) = (r.vec(n(&qs), 1.0), r.vec(n(&ks), 1.0), r.vec(n(&ks), 1.0), r.vec(n(&qs), 1.0));
    let (q, k, v, dout) = (up(ctx, &qv, &qs, "q"), up(ctx, &kv, &ks, "k"), up(ctx, &vv, &ks, "v"), up(ctx, &dov, &qs, "dout"));
    let (out, lse, delta) = (zeros(ctx, &qs, "out"), zeros(ctx, &[b, nh, t], "lse"), zeros(ctx, &[b, nh, t], "delta"));
    let (dq, dk, dv) = (zeros(ctx, &qs, "dq"), zeros(ctx, &ks, "dk"), zeros(ctx, &ks, "dv"));
    let wg = sg.max(64);
    let mk = |entry: &'static str, layout: &[wgtune::gpu::kernels::Access]| KernelSpec {
        module: Cow::Owned(path.clone()),
        source: Cow::Owned(src.clone()),
        entry,
        constants: if std::env::var("ATTN_CONST").is_ok() { vec![("WG", wg as f64)] } else { vec![("WG", wg as f64), ("SG", sg as f64), ("R", rr as f64), ("HD4", (hd / 4) as f64)] },
        layout: layout.to_vec(),
    };
    let prm = |groups: usize| Params::new().u(b).u(t).u(nh).u(kvh).u(p).u(s).u(groups).f(1.0 / (hd as f32).sqrt());
    let gq = b * nh * t.div_ceil(sg as usize * rr);
    let gk = b * kvh * s.div_ceil(sg as usize * rr);
    let grid = |g: usize| grid_1d(ctx, (g * sg as usize).div_ceil(wg as usize) as u32);
    let mut fwd = Plan::new("fwd");
    fwd.dispatch(ctx, &mk("attention_forward", &[W, W, R, R, R]), &prm(gq), &[&out, &lse, &q, &k, &v], grid(gq)).unwrap();
    let mut bq = Plan::new("dq");
    bq.dispatch(ctx, &mk("attention_backward_dq", &[W, R, R, R, R, R, R]), &prm(gq), &[&dq, &dout, &q, &k, &v, &lse, &delta], grid(gq)).unwrap();
    let mut bkv = Plan::new("dkv");
    bkv.dispatch(ctx, &mk("attention_backward_dkv", &[W, W, R, R, R, R, R, R]), &prm(gk), &[&dk, &dv, &dout, &q, &k, &v, &lse, &delta], grid(gk)).unwrap();
    for (name, plan) in [("forward", &fwd), ("dq", &bq), ("dkv", &bkv)] {
        let t0 = std::time::Instant::now();
        run(ctx, plan);
        let jit = t0.elapsed().as_secs_f64() * 1e3;
        let mut ms: Vec<f64> = (0..9).map(|_| { let t0 = std::time::Instant::now(); run(ctx, plan); t0.elapsed().as_secs_f64() * 1e3 }).collect();
        ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
        eprintln!("EXP {path} SG={sg} R={rr} {name}: first {jit:.1} ms, median {:.2} ms, min {:.2}", ms[4], ms[0]);
    }
    let mut ro = vec![0.0; n(&qs)];
    let mut rl = vec![0.0; b * nh * t];
    cpu::attention::attention_forward(&mut ro, &mut rl, &to64(&qv), &to64(&kv), &to64(&vv), b, t, nh, kvh, hd, p);
    let got = read(ctx, &out);
    let md = got.iter().zip(&ro).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
    eprintln!("EXP forward out maxdiff {md:.3e}");
}
