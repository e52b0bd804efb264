//! Frozen weights in their stored precision: the matmuls (forward NT,
//! backward-input NN) and the embedding gather over every compact format,
//! against the CPU twin over the dequantized weight, on odd shapes, with
//! and without subgroups, and over a texture split into layers.

use std::borrow::Cow;

use crate::common::{self, assert_close, read, run, to64, up, Rng};
use wgtune::cpu;
use wgtune::gpu::ops::matmul;
use wgtune::gpu::{Context, ContextOptions, MatmulKernel, Plan};
use wgtune::model::compact::{self, random_blocks, StoredMatrix, WeightsMode};
use wgtune::model::gguf::GgmlType;

const TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// A random stored (n, k) matrix of `ty`; k is 3 blocks (37 for plain floats).
fn stored(ty: GgmlType, n: usize, seed: u64) -> StoredMatrix<'static> {
    let (per, _) = ty.block().unwrap();
    let k = if per == 1 { 37 } else { 3 * per };
    StoredMatrix {
        name: format!("w.{}", ty.name()),
        ty,
        data: Cow::Owned(random_blocks(ty, n * k / per, seed)),
        rows: n,
        cols: k,
    }
}

/// The values the GPU must see for `m` under `mode`.
fn expected(m: &StoredMatrix, mode: WeightsMode) -> Vec<f32> {
    let w = m.rows_f32(0, m.rows);
    match compact::target_format(m.ty, mode) {
        wgtune::gpu::tensor::TexFormat::F16 => {
            w.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect()
        }
        wgtune::gpu::tensor::TexFormat::Bf16 => w
            .iter()
            .map(|x| half::bf16::from_f32(*x).to_f32())
            .collect(),
        _ => w,
    }
}

fn check(ctx: &Context, tag: &str, m: &StoredMatrix, mode: WeightsMode, rows: usize) {
    let (n, k) = (m.rows, m.cols);
    let fmt = compact::target_format(m.ty, mode);
    let w = compact::upload(ctx, m, fmt, &m.name).unwrap();
    let wv = expected(m, mode);
    let mut r = Rng::new((n * 31 + k) as u64);
    let (x, dy, dx0) = (
        r.vec(rows * k, 1.0),
        r.vec(rows * n, 1.0),
        r.vec(rows * k, 1.0),
    );
    let (tx, tdy) = (up(ctx, &x, &[rows, k], "x"), up(ctx, &dy, &[rows, n], "dy"));
    let out = up(ctx, &vec![0.0; rows * n], &[rows, n], "out");
    let dx = up(ctx, &dx0, &[rows, k], "dx");
    // Ids: first, last, an out-of-range one (a zero row) and some in between.
    let ids: Vec<i32> = vec![0, n as i32 - 1, n as i32, 3 % n as i32, (n / 2) as i32];
    let tids = wgtune::gpu::Tensor::from_i32(ctx, &ids, &[1, ids.len()], "ids").unwrap();
    let rows_out = up(
        ctx,
        &vec![7.0; (ids.len() + 2) * k],
        &[1, ids.len() + 2, k],
        "emb",
    );
    let mut plan = Plan::new("compact");
    matmul::matmul_forward_packed(ctx, &mut plan, &out, &tx, &w, None, 1.0, false).unwrap();
    matmul::matmul_backward_input_packed(ctx, &mut plan, &dx, &tdy, &w, 1.0).unwrap();
    matmul::matmul_gather(ctx, &mut plan, &rows_out, &tids, &w, 2, 1.0).unwrap();
    run(ctx, &plan);

    let w64 = to64(&wv);
    let mut ro = vec![0.0; rows * n];
    cpu::matmul::matmul_forward(&mut ro, &to64(&x), &w64, None, rows, k, n);
    let mut rdx = to64(&dx0);
    cpu::matmul::matmul_backward_input(&mut rdx, &to64(&dy), &w64, rows, k, n);
    let t = format!("{tag} {} as {fmt:?} M={rows} K={k} N={n}", m.ty.name());
    // f32 accumulation error grows like sqrt(reduction length) times the
    // terms' size (K-quant weights here reach ~100).
    let wmax = wv.iter().fold(1f32, |a, x| a.max(x.abs())) as f64;
    let tol = |red: usize| (2e-6 * (red as f64).sqrt()).max(1e-5) * wmax;
    assert_close(&format!("{t} forward"), &read(ctx, &out), &ro, tol(k), 1e-4);
    assert_close(
        &format!("{t} backward_input"),
        &read(ctx, &dx),
        &rdx,
        tol(n),
        1e-4,
    );
    // The gather is a copy: exact.
    let got = read(ctx, &rows_out);
    for (j, &id) in ids.iter().enumerate() {
        let row = &got[(2 + j) * k..(3 + j) * k];
        for (c, g) in row.iter().enumerate() {
            let want = if (id as usize) < n {
                wv[id as usize * k + c]
            } else {
                0.0
            };
            assert_eq!(*g, want, "{t} gather id {id} column {c}");
        }
    }
    assert!(
        got[..2 * k].iter().all(|v| *v == 7.0),
        "{t}: gather wrote outside its rows"
    );
    eprintln!("{t}: ok ({} GPU bytes)", w.bytes());
}

#[test]
fn compact_weights_stored_precision_vs_cpu() {
    let ctx = gpu!();
    for (i, &ty) in TYPES.iter().enumerate() {
        let m = stored(ty, 37, 100 + i as u64);
        check(ctx, "stored", &m, WeightsMode::Stored, 13);
        check(ctx, "stored", &m, WeightsMode::Stored, 1);
    }
    // bf16 rows of 36 end mid-texel (8 per texel): the upload pads them.
    let m = StoredMatrix {
        cols: 36,
        data: Cow::Owned(random_blocks(GgmlType::BF16, 37 * 36, 99)),
        ..stored(GgmlType::BF16, 37, 99)
    };
    check(ctx, "stored", &m, WeightsMode::Stored, 13);
    check(ctx, "stored", &m, WeightsMode::Stored, 1);
}

#[test]
fn compact_weights_converted_modes_vs_cpu() {
    let ctx = gpu!();
    for (i, &ty) in [GgmlType::F32, GgmlType::BF16, GgmlType::Q4K, GgmlType::Q6K]
        .iter()
        .enumerate()
    {
        let m = stored(ty, 21, 200 + i as u64);
        for mode in [WeightsMode::F32, WeightsMode::F16, WeightsMode::Bf16] {
            check(ctx, &format!("{mode}"), &m, mode, 9);
        }
    }
}

#[test]
fn compact_weights_without_subgroups_vs_cpu() {
    let Some(ctx) = common::ctx_with(ContextOptions {
        disable_subgroups: true,
        ..Default::default()
    }) else {
        return;
    };
    for (i, &ty) in TYPES.iter().enumerate() {
        let m = stored(ty, 19, 300 + i as u64);
        check(&ctx, "no-subgroups", &m, WeightsMode::Stored, 11);
    }
}

/// Both matmul kernel families over every stored format, whatever
/// `WGTUNE_MATMUL_KERNEL` says; 37 and 5 rows take the family's forward
/// (5: most row groups idle), 1 row the gemv one, and a weight taller than
/// a texture layer the layered row handles.
#[test]
fn compact_weights_each_matmul_kernel_vs_cpu() {
    for kern in [MatmulKernel::Register, MatmulKernel::Tiled] {
        let Some(ctx) = common::ctx_with(ContextOptions {
            matmul_kernel: Some(kern),
            ..Default::default()
        }) else {
            return;
        };
        assert_eq!(ctx.matmul_kernel(), kern);
        assert!(37 > matmul::gemv_max_rows());
        let tag = format!("{kern:?}");
        for (i, &ty) in TYPES.iter().enumerate() {
            let m = stored(ty, 23, 500 + i as u64);
            check(&ctx, &tag, &m, WeightsMode::Stored, 37);
            check(&ctx, &tag, &m, WeightsMode::Stored, 5);
            check(&ctx, &tag, &m, WeightsMode::Stored, 1);
        }
        let m = stored(GgmlType::Q4K, 21, 600);
        check(&ctx, &format!("{tag} bf16"), &m, WeightsMode::Bf16, 37);
        let n = ctx.limits.max_texture_dimension_2d as usize + 77;
        let m = StoredMatrix {
            name: "tall.q8_0".into(),
            ty: GgmlType::Q8_0,
            data: Cow::Owned(random_blocks(GgmlType::Q8_0, n, 601)),
            rows: n,
            cols: 32,
        };
        check(&ctx, &format!("{tag} layered"), &m, WeightsMode::Stored, 20);
    }
}

#[test]
fn compact_weights_taller_than_a_texture_vs_cpu() {
    // More rows than one texture layer holds: rows are split over layers.
    let ctx = gpu!();
    let n = ctx.limits.max_texture_dimension_2d as usize + 77;
    for (i, &ty) in [GgmlType::Q4_0, GgmlType::Q6K, GgmlType::BF16]
        .iter()
        .enumerate()
    {
        let (per, _) = ty.block().unwrap();
        let k = if per == 1 { 12 } else { per };
        let m = StoredMatrix {
            name: format!("tall.{}", ty.name()),
            ty,
            data: Cow::Owned(random_blocks(ty, n * k / per, 400 + i as u64)),
            rows: n,
            cols: k,
        };
        check(ctx, "layered", &m, WeightsMode::Stored, 3);
    }
}

/// Every GGUF type of tests/reference/data/gguf/quants.gguf (written by
/// gguf-py), uploaded in its stored format and read back through the GPU
/// gather: equal to gguf-py's `dequantize` values (tests/reference/
/// gguf_generate.py), up to the sign of a zero.
#[test]
fn compact_weights_decode_like_gguf_py() {
    use crate::common::reference::{data_dir, Arrays};
    let ctx = gpu!();
    let g = wgtune::model::gguf::Gguf::open(&data_dir("gguf/quants.gguf")).unwrap();
    let want = Arrays::open("gguf/quants_expected.safetensors");
    for t in &g.tensors {
        let [rows, cols] = t.shape()[..] else {
            panic!("{} is not 2-D", t.name)
        };
        let m = StoredMatrix {
            name: t.name.clone(),
            ty: t.ty,
            data: Cow::Borrowed(g.raw(t).unwrap()),
            rows,
            cols,
        };
        let fmt = compact::target_format(t.ty, WeightsMode::Stored);
        let w = compact::upload(ctx, &m, fmt, &t.name).unwrap();
        let ids: Vec<i32> = (0..rows as i32).collect();
        let tids = wgtune::gpu::Tensor::from_i32(ctx, &ids, &[1, rows], "ids").unwrap();
        let out = up(ctx, &vec![0.0; rows * cols], &[1, rows, cols], "rows");
        let mut plan = Plan::new("gather");
        matmul::matmul_gather(ctx, &mut plan, &out, &tids, &w, 0, 1.0).unwrap();
        run(ctx, &plan);
        let got = read(ctx, &out);
        let exp = want.f32(&t.name);
        let bad = got.iter().zip(&exp).filter(|(a, b)| a != b).count();
        eprintln!("{} ({fmt:?}): {} values, {bad} differ", t.name, got.len());
        assert_eq!(bad, 0, "{}: GPU decode differs from gguf-py", t.name);
    }
}

/// The one-row forward over wide texels with every lanes-per-set split
/// (`ContextOptions::gemv_lanes`, 1 up to the subgroup size) against the
/// CPU twin: 23 rows (no multiple of a set's 8) and texel counts that no
/// split divides evenly.
#[test]
fn compact_weights_one_row_each_gemv_split_vs_cpu() {
    let Some(sg) = common::ctx().and_then(|c| c.subgroup_size()) else {
        return;
    };
    let mut lanes = 1;
    while lanes <= sg {
        let ctx = common::ctx_with(ContextOptions {
            gemv_lanes: Some(lanes),
            ..Default::default()
        })
        .expect("a context with the same adapter");
        assert_eq!(ctx.gemv_lanes(), Some(lanes));
        for (i, &ty) in [
            GgmlType::Q4_0,
            GgmlType::Q8_0,
            GgmlType::BF16,
            GgmlType::Q6K,
        ]
        .iter()
        .enumerate()
        {
            let m = stored(ty, 23, 700 + i as u64);
            check(
                &ctx,
                &format!("lanes per set {lanes}"),
                &m,
                WeightsMode::Stored,
                1,
            );
        }
        let m = stored(GgmlType::Q4_1, 9, 710);
        check(
            &ctx,
            &format!("lanes per set {lanes} f16"),
            &m,
            WeightsMode::F16,
            1,
        );
        lanes *= 2;
    }
}
