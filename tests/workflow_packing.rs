//! `train --packing`: rows packed into one sequence attend only to
//! themselves, at their own positions. The segmented attention kernels
//! against their CPU twins (and no key of another row changes a row's
//! output), the CPU twin's backward against finite differences, the
//! acceptance check (two rows packed in one sequence give the loss and the
//! adapter gradients of the same rows as a batch of two, for LoRA and prefix
//! tuning on the tiny llama, LoRA on the tiny GPT-2), and the CLI.

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use std::path::{Path, PathBuf};

use common::cli::root;
use common::reference::{data_dir, gradients_only};
use common::{assert_close, dot, fd_check, read, run, to64, up, zeros, Rng};
use wgtune::adapters::peft_io::load_adapter;
use wgtune::adapters::Adapter;
use wgtune::cpu::attention::{attention_backward_masked, attention_forward_masked, Mask};
use wgtune::gpu::ops::attention::{
    attention_backward_with, attention_forward_with, AttnConfig, AttnDims, AttnMask,
};
use wgtune::gpu::{Context, Plan, Tensor};
use wgtune::model::Model;
use wgtune::train::data::{Batch, Example, IGNORE};
use wgtune::train::packing::packed_batch;
use wgtune::train::trainer::Trainer;

/// (B, T, NH, KVH, HD, P)
type Shape = (usize, usize, usize, usize, usize, usize);

/// Row starts (B, T) from each sequence's row lengths (the rest padding).
fn starts_of(rows: &[&[usize]], t: usize) -> Vec<usize> {
    let mut v = Vec::new();
    for lens in rows {
        let mut at = 0;
        for &n in lens.iter() {
            v.extend(std::iter::repeat_n(at, n));
            at += n;
        }
        v.extend(std::iter::repeat_n(at, t - at));
    }
    v
}

fn u32_tensor(ctx: &Context, v: &[usize], shape: &[usize]) -> Tensor {
    let v: Vec<u32> = v.iter().map(|&x| x as u32).collect();
    Tensor::from_u32(ctx, &v, shape, "row_starts").unwrap()
}

/// GPU forward (out, lse) and backward (dq, dk, dv onto zeros).
#[allow(clippy::type_complexity)]
fn gpu_run(
    ctx: &Context,
    shape: Shape,
    (q, k, v, dout): (&[f32], &[f32], &[f32], &[f32]),
    starts: &[usize],
    m: AttnMask,
    cfg: AttnConfig,
) -> [Vec<f32>; 5] {
    let (b, t, nh, kvh, hd, p) = shape;
    let (qs, ks) = ([b, t, nh, hd], [b, p + t, kvh, hd]);
    let (tq, tk, tv, tg) = (
        up(ctx, q, &qs, "q"),
        up(ctx, k, &ks, "k"),
        up(ctx, v, &ks, "v"),
        up(ctx, dout, &qs, "dout"),
    );
    let (out, lse, delta) = (
        zeros(ctx, &qs, "out"),
        zeros(ctx, &[b, nh, t], "lse"),
        zeros(ctx, &[b, nh, t], "delta"),
    );
    let (dq, dk, dv) = (
        zeros(ctx, &qs, "dq"),
        zeros(ctx, &ks, "dk"),
        zeros(ctx, &ks, "dv"),
    );
    let segs = u32_tensor(ctx, starts, &[b, t]);
    let mut plan = Plan::new("segmented attention");
    attention_forward_with(
        ctx,
        &mut plan,
        &out,
        &lse,
        &tq,
        &tk,
        &tv,
        m,
        cfg,
        Some(&segs),
    )
    .unwrap();
    attention_backward_with(
        ctx,
        &mut plan,
        &dq,
        &dk,
        &dv,
        &delta,
        &tg,
        &tq,
        &tk,
        &tv,
        &out,
        &lse,
        m,
        cfg,
        Some(&segs),
    )
    .unwrap();
    run(ctx, &plan);
    [&out, &lse, &dq, &dk, &dv].map(|x| read(ctx, x))
}

/// Segmented attention on the GPU against the CPU twin, for each config
/// this adapter offers; then a row's output is unchanged by another row's
/// keys and values.
fn check_segments(ctx: &Context, shape: Shape, rows: &[&[usize]], window: Option<usize>) {
    let (b, t, nh, kvh, hd, p) = shape;
    let s = p + t;
    let (nq, nk) = (b * t * nh * hd, b * s * kvh * hd);
    let mut r = Rng::new((t * 31 + p * 7 + hd) as u64);
    let (q, k, v, dout) = (
        r.vec(nq, 1.5),
        r.vec(nk, 1.5),
        r.vec(nk, 1.0),
        r.vec(nq, 1.0),
    );
    let starts = starts_of(rows, t);
    let m = AttnMask { scale: 0.4, window };
    let cm = Mask { scale: 0.4, window };
    let (q64, k64, v64, g64) = (to64(&q), to64(&k), to64(&v), to64(&dout));
    let (mut ro, mut rl) = (vec![0.0; nq], vec![0.0; b * nh * t]);
    attention_forward_masked(
        &mut ro,
        &mut rl,
        &q64,
        &k64,
        &v64,
        b,
        t,
        nh,
        kvh,
        hd,
        p,
        cm,
        Some(&starts),
    );
    let (mut rdq, mut rdk, mut rdv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
    attention_backward_masked(
        &mut rdq,
        &mut rdk,
        &mut rdv,
        &g64,
        &q64,
        &k64,
        &v64,
        &ro,
        &rl,
        b,
        t,
        nh,
        kvh,
        hd,
        p,
        cm,
        Some(&starts),
    );
    let d = AttnDims {
        b,
        t,
        nh,
        kvh,
        hd,
        p,
    };
    let auto = AttnConfig::for_context(ctx, &d);
    // The picked config, and storage buffers with several rows per
    // invocation (rows past a segment boundary in one group).
    let several = AttnConfig {
        textures: false,
        lanes: 1,
        fwd_rows: 4,
        dq_rows: 2,
        dkv_rows: 2,
    };
    for cfg in [auto, several] {
        let tag = format!("segments {shape:?} rows {rows:?} window {window:?} {cfg:?}");
        let [out, lse, dq, dk, dv] = gpu_run(ctx, shape, (&q, &k, &v, &dout), &starts, m, cfg);
        assert_close(&format!("{tag} out"), &out, &ro, 1e-5, 1e-4);
        assert_close(&format!("{tag} lse"), &lse, &rl, 1e-5, 1e-4);
        assert_close(&format!("{tag} dq"), &dq, &rdq, 1e-4, 1e-4);
        assert_close(&format!("{tag} dk"), &dk, &rdk, 1e-4, 1e-4);
        assert_close(&format!("{tag} dv"), &dv, &rdv, 1e-4, 1e-4);
    }
    // Change the real keys and values of every sequence's first row: the
    // other rows' outputs stay bit-identical.
    let (mut k2, mut v2) = (k.clone(), v.clone());
    for (bi, lens) in rows.iter().enumerate() {
        for j in 0..lens[0] {
            let at = (bi * s + p + j) * kvh * hd;
            for x in &mut k2[at..at + kvh * hd] {
                *x += 0.5;
            }
            for x in &mut v2[at..at + kvh * hd] {
                *x -= 0.7;
            }
        }
    }
    let [o1, ..] = gpu_run(ctx, shape, (&q, &k, &v, &dout), &starts, m, auto);
    let [o2, ..] = gpu_run(ctx, shape, (&q, &k2, &v2, &dout), &starts, m, auto);
    let mut others = 0;
    for (bi, lens) in rows.iter().enumerate() {
        for ti in lens[0]..t {
            let at = (bi * t + ti) * nh * hd;
            assert_eq!(
                o1[at..at + nh * hd],
                o2[at..at + nh * hd],
                "batch {bi} token {ti} saw another row's keys"
            );
            others += 1;
        }
        let first = (bi * t) * nh * hd;
        assert_ne!(o1[first..first + nh * hd], o2[first..first + nh * hd]);
    }
    assert!(others > 0);
}

#[test]
fn segmented_attention_matches_cpu_twin_and_stays_inside_rows() {
    let ctx = gpu!();
    // Odd T, GQA, a prefix, rows of 1 token, trailing padding, and a T over
    // one row group of 4.
    check_segments(ctx, (2, 13, 4, 2, 8, 3), &[&[5, 4, 3], &[6, 1, 6]], None);
    check_segments(ctx, (1, 9, 2, 2, 12, 0), &[&[2, 7]], None);
    check_segments(ctx, (2, 11, 4, 1, 8, 2), &[&[4, 7], &[3, 3, 2]], Some(3));
}

/// The CPU twin's backward over packed rows against finite differences, with
/// a prefix and a window (the twin the GPU kernels are checked against).
#[test]
fn segmented_attention_backward_matches_finite_differences() {
    for (shape, rows, window) in [
        (
            (2usize, 7usize, 4usize, 2usize, 4usize, 2usize),
            [&[3usize, 4][..], &[2, 2, 1]],
            None,
        ),
        ((2, 7, 2, 1, 4, 2), [&[4, 3][..], &[1, 5]], Some(2)),
    ] {
        let (b, t, nh, kvh, hd, p) = shape;
        let starts = starts_of(&rows, t);
        let m = Mask { scale: 0.5, window };
        let (nq, nk) = (b * t * nh * hd, b * (p + t) * kvh * hd);
        let mut r = Rng::new(7);
        let (q, k, v, g) = (
            r.vec64(nq, 1.5),
            r.vec64(nk, 1.5),
            r.vec64(nk, 1.0),
            r.vec64(nq, 1.0),
        );
        let fwd = |q: &[f64], k: &[f64], v: &[f64]| {
            let (mut o, mut l) = (vec![0.0; nq], vec![0.0; b * nh * t]);
            attention_forward_masked(
                &mut o,
                &mut l,
                q,
                k,
                v,
                b,
                t,
                nh,
                kvh,
                hd,
                p,
                m,
                Some(&starts),
            );
            (o, l)
        };
        let (o, l) = fwd(&q, &k, &v);
        let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
        attention_backward_masked(
            &mut dq,
            &mut dk,
            &mut dv,
            &g,
            &q,
            &k,
            &v,
            &o,
            &l,
            b,
            t,
            nh,
            kvh,
            hd,
            p,
            m,
            Some(&starts),
        );
        let tag = format!("segments {shape:?} {window:?}");
        fd_check(&format!("{tag} dq"), &q, &dq, |x| {
            dot(&fwd(x, &k, &v).0, &g)
        });
        fd_check(&format!("{tag} dk"), &k, &dk, |x| {
            dot(&fwd(&q, x, &v).0, &g)
        });
        fd_check(&format!("{tag} dv"), &v, &dv, |x| {
            dot(&fwd(&q, &k, x).0, &g)
        });
    }
}

// ------------------------------------------------------------ acceptance

/// A row of `n` ids from `seed` whose first `prompt` labels are masked.
fn row(seed: u64, n: usize, prompt: usize, vocab: usize) -> Example {
    let mut r = Rng::new(seed);
    let ids: Vec<u32> = (0..n).map(|_| 5 + r.below(vocab - 5) as u32).collect();
    let labels = (ids.iter().enumerate())
        .map(|(j, &x)| if j < prompt { IGNORE } else { x as i32 })
        .collect();
    Example { ids, labels }
}

/// The loss and every adapter gradient of `batch`.
fn loss_and_grads(
    tr: &mut Trainer,
    ad: &Adapter,
    ctx: &Context,
    batch: &Batch,
) -> (f64, Vec<(String, Vec<f32>)>) {
    let loss = tr.gradients(batch).unwrap();
    let g = ad.flat.read(ctx, &ad.flat.grads).unwrap();
    (loss, g.into_iter().map(|(n, _, v)| (n, v)).collect())
}

/// Rows a, b packed in one sequence (and c alone, so the packed batch has a
/// padded sequence) against the batch of the three rows unpacked.
fn check_packed_equals_separate(model: &str, case: &str) {
    let ctx = gpu!();
    let m = Model::load(ctx, &data_dir(model)).unwrap();
    let loaded = load_adapter(&data_dir(&format!("{model}/peft/{case}/initial"))).unwrap();
    // Non-zero everywhere (PEFT starts LoRA's B at 0, which hides A's
    // gradient).
    let mut r = Rng::new(3);
    let tensors: Vec<_> = (loaded.sorted_tensors().into_iter())
        .map(|(n, s, v)| {
            let w = v.iter().map(|&x| x + 0.2 * r.uniform()).collect();
            (n, s, w)
        })
        .collect();
    let ad = Adapter::new(ctx, &m, loaded.config.clone(), tensors).unwrap();
    let vocab = m.cfg.vocab;
    let (a, b, c) = (
        row(1, 9, 3, vocab),
        row(2, 6, 2, vocab),
        row(3, 7, 0, vocab),
    );
    let separate = Batch::from_examples(&[&a, &b, &c], 0);
    let packed = packed_batch(&[vec![&a, &b], vec![&c]], 0);
    assert_eq!((packed.b, packed.t), (2, 15));
    assert_eq!(packed.n_targets, separate.n_targets);

    let mut tr = Trainer::new(ctx, &m, &ad, gradients_only()).unwrap();
    let (l0, g0) = loss_and_grads(&mut tr, &ad, ctx, &separate);
    tr.set_packing(true).unwrap();
    let (l1, g1) = loss_and_grads(&mut tr, &ad, ctx, &packed);
    // The packing trainer on unpacked rows is the plain one.
    let (l2, g2) = loss_and_grads(&mut tr, &ad, ctx, &separate);
    eprintln!("{model}/{case}: loss separate {l0} packed {l1} (packing trainer, unpacked {l2})");
    assert!(
        (l0 - l1).abs() < 1e-5 * l0.abs().max(1.0),
        "{model}/{case}: loss {l0} vs packed {l1}"
    );
    assert!(
        (l0 - l2).abs() < 1e-6 * l0.abs().max(1.0),
        "{model}/{case}: loss {l0} vs {l2}"
    );
    for ((name, x), ((_, y), (_, z))) in g0.iter().zip(g1.iter().zip(&g2)) {
        let scale = x.iter().fold(0f32, |acc, v| acc.max(v.abs())) as f64;
        assert!(scale > 0.0, "{model}/{case}: {name} has no gradient");
        let want = to64(x);
        let tol = 2e-5 * scale;
        assert_close(
            &format!("{model}/{case} {name} packed"),
            y,
            &want,
            tol,
            1e-4,
        );
        assert_close(&format!("{model}/{case} {name} plain"), z, &want, tol, 1e-4);
    }
    // A packed batch needs a packing trainer.
    tr.set_packing(false).unwrap();
    let err = tr.gradients(&packed).unwrap_err().to_string();
    assert!(err.contains("packing"), "{err}");
}

#[test]
fn packed_rows_give_the_loss_and_gradients_of_separate_rows_lora_llama() {
    check_packed_equals_separate("tiny-llama", "lora_qv");
}

#[test]
fn packed_rows_give_the_loss_and_gradients_of_separate_rows_prefix_llama() {
    check_packed_equals_separate("tiny-llama", "prefix");
}

#[test]
fn packed_rows_give_the_loss_and_gradients_of_separate_rows_lora_gpt2() {
    check_packed_equals_separate("tiny-gpt2", "lora_qv");
}

#[test]
fn packing_refuses_prompt_tuning_in_the_trainer() {
    let ctx = gpu!();
    let model = "tiny-llama";
    let m = Model::load(ctx, &data_dir(model)).unwrap();
    let loaded = load_adapter(&data_dir(&format!("{model}/peft/prompt/initial"))).unwrap();
    let ad = Adapter::new(ctx, &m, loaded.config.clone(), loaded.sorted_tensors()).unwrap();
    let mut tr = Trainer::new(ctx, &m, &ad, gradients_only()).unwrap();
    let err = tr.set_packing(true).unwrap_err().to_string();
    assert!(err.contains("prompt tuning"), "{err}");
}

// ------------------------------------------------------------------- CLI

fn wgtune(args: &[&str]) -> (bool, String) {
    let r = common::cli::run(args, "error");
    (r.ok(), r.text)
}

fn tmp(name: &str) -> PathBuf {
    common::cli::tmp("packing", name)
}

/// `N steps (M/epoch)` from the adapter line.
fn steps_per_epoch(text: &str) -> usize {
    let at = text.find("/epoch)").expect("adapter line");
    let open = text[..at].rfind('(').unwrap();
    text[open + 1..at].parse().unwrap()
}

/// The numbers of the `packing:` line.
fn packing_line(text: &str) -> Vec<usize> {
    let line = text
        .lines()
        .find(|l| l.starts_with("packing:"))
        .expect("packing line");
    line.split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().unwrap())
        .collect()
}

fn train(out: &Path, method: &str, extra: &[&str]) -> (bool, String) {
    let model = root().join("tests/reference/data/tiny-llama");
    // Short rows of every kind (the pirate rows fill most of the tiny
    // model's 128 positions on their own).
    let data = root().join("tests/reference/data/sample.jsonl");
    let mut args = vec![
        "train",
        "--method",
        method,
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--no-progress",
    ];
    args.extend(extra);
    wgtune(&args)
}

#[test]
fn cli_packing_trains_with_fewer_steps_and_less_padding() {
    let _ctx = gpu!();
    let (ok, plain) = train(&tmp("plain"), "lora", &["--steps", "1"]);
    assert!(ok, "{plain}");
    let out = tmp("packed");
    let (ok, packed) = train(&out, "lora", &["--packing", "--max-seq-len", "128"]);
    assert!(ok, "{packed}");
    // rows, sequences, cap, batches before -> after, padding before -> after
    let n = packing_line(&packed);
    let (rows, seqs, cap, b0, b1, p0, p1) = (n[0], n[1], n[2], n[3], n[4], n[5], n[6]);
    assert_eq!(cap, 128);
    assert!(seqs < rows, "{packed}");
    assert!(b1 < b0 && p1 < p0, "{packed}");
    assert_eq!(b0, steps_per_epoch(&plain), "{plain}");
    assert_eq!(b1, steps_per_epoch(&packed), "{packed}");
    assert!(out.join("adapter_model.safetensors").exists());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = (metrics.lines())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect();
    assert!(
        !losses.is_empty() && losses.iter().all(|l| l.is_finite()),
        "{metrics}"
    );
}

#[test]
fn cli_packing_refuses_prompt_tuning() {
    let (ok, text) = train(&tmp("prompt"), "prompt", &["--packing"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("--packing does not work with --method prompt"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}

/// Gemma 3: sliding-window layers (window 4 < the rows) with their own
/// RoPE tables, for LoRA and for prefix keys seen through the window.
#[test]
fn packed_rows_give_the_loss_and_gradients_of_separate_rows_gemma3_windows() {
    check_packed_equals_separate("tiny-gemma3", "lora_qv");
    check_packed_equals_separate("tiny-gemma3", "prefix");
}
