//! Real-model checks, outside CI (ignored by default): wgtune against
//! transformers on a Hugging Face folder such as the SmolLM2-135M-Instruct
//! conversion of ../shared/reference/get-smollm2.sh.
//!
//!   python tests/real/smollm2_reference.py DIR /tmp/ref.safetensors
//!   WGTUNE_REAL_MODEL=DIR WGTUNE_REAL_REF=/tmp/ref.safetensors \
//!     cargo test --release --test real_model -- --ignored --nocapture

#[path = "common/mod.rs"]
#[macro_use]
mod common;

use std::path::PathBuf;

use safetensors::SafeTensors;
use wgtune::gpu::{DType, Plan, Tensor};
use wgtune::model::generate::{generate, GenOptions};
use wgtune::model::{Acts, FwdShape, Model, NoHooks};

fn arrays() -> Option<(PathBuf, Vec<u8>)> {
    let dir = std::env::var("WGTUNE_REAL_MODEL").ok()?;
    let refp = std::env::var("WGTUNE_REAL_REF").ok()?;
    Some((PathBuf::from(dir), std::fs::read(refp).expect("reference file")))
}

fn get_i32(st: &SafeTensors, n: &str) -> Vec<i32> {
    st.tensor(n).unwrap().data().chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect()
}
fn get_f32(st: &SafeTensors, n: &str) -> Vec<f32> {
    st.tensor(n).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

#[test]
#[ignore = "needs WGTUNE_REAL_MODEL and WGTUNE_REAL_REF"]
fn real_model_matches_transformers() {
    let ctx = gpu!();
    let Some((dir, bytes)) = arrays() else {
        panic!("set WGTUNE_REAL_MODEL and WGTUNE_REAL_REF");
    };
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t0 = std::time::Instant::now();
    let m = Model::load(ctx, &dir).unwrap();
    eprintln!("loaded in {:.1} s, {} params", t0.elapsed().as_secs_f64(), m.params);
    let (c, v) = (m.cfg.hidden, m.cfg.vocab);
    let mut worst = 0f64;
    for i in 0.. {
        let name = format!("p{i}.ids");
        if st.tensor(&name).is_err() {
            break;
        }
        let ids = get_i32(&st, &name);
        let want = get_f32(&st, &format!("p{i}.logits"));
        let t = ids.len();
        let acts = Acts::new(ctx, &m.cfg, FwdShape { b: 1, t, n_virtual: 0, p: 0 }, false, false).unwrap();
        let idt = Tensor::from_i32(ctx, &ids, &[1, t], "ids").unwrap();
        let rows: Vec<i32> = (0..t as i32).collect();
        let rows = Tensor::from_i32(ctx, &rows, &[1, t], "rows").unwrap();
        let g = Tensor::zeros(ctx, &[1, t, c], DType::F32, "g").unwrap();
        let logits = Tensor::zeros(ctx, &[t, v], DType::F32, "logits").unwrap();
        let mut plan = Plan::new("fwd");
        m.forward(ctx, &mut plan, &acts, &idt, &NoHooks, None).unwrap();
        m.logits_rows(ctx, &mut plan, &logits, &g, &acts, &rows).unwrap();
        plan.run(ctx).unwrap();
        let got = logits.read_f32(ctx).unwrap();
        let d = got.iter().zip(&want).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0, f64::max);
        eprintln!("prompt {i}: {t} tokens, max |logits diff| {d:.3e}");
        worst = worst.max(d);
    }
    let ids: Vec<u32> = get_i32(&st, "chat.ids").iter().map(|&x| x as u32).collect();
    let want: Vec<u32> = get_i32(&st, "chat.greedy").iter().map(|&x| x as u32).collect();
    let opts = GenOptions { max_new_tokens: want.len(), stop: vec![2], ..Default::default() };
    let mut got = Vec::new();
    let stats = generate(ctx, &m, &NoHooks, &ids, &opts, |t| {
        got.push(t);
        Ok(())
    })
    .unwrap();
    eprintln!(
        "greedy: {} new tokens, prefill {:.2} s, decode {:.2} tok/s",
        stats.new_tokens,
        stats.prefill_s,
        stats.decode_tokens_per_s()
    );
    assert_eq!(got, want[..got.len()], "greedy tokens");
    assert!(worst <= 1e-3, "logits differ by {worst}");
}
