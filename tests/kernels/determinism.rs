//! Every kernel, run twice on the same inputs, gives identical bits: no
//! atomics, no order-dependent reductions. One plan records a small model's
//! worth of forward and backward calls; it runs on two fresh sets of outputs.

use crate::common::{read, run, up, zeros, Rng};
use wgtune::cpu::rope::{default_inv_freq, rope_tables};
use wgtune::gpu::ops::{activation, attention, embedding, lora, loss, matmul, norm, rope};
use wgtune::gpu::{Plan, Tensor};

#[test]
fn every_kernel_is_bit_reproducible() {
    let ctx = gpu!();
    let (b, t, p, c, nh, kvh, hd, v, r) = (2, 7, 3, 24, 4, 2, 8, 37, 4);
    let (n, s) = (b * t, p + t);
    let mut rng = Rng::new(42);
    let mut rand = |shape: &[usize], label: &str| {
        let len: usize = shape.iter().product();
        up(ctx, &rng.vec(len, 1.0), shape, label)
    };
    let x = rand(&[n, c], "x");
    let w = rand(&[c, c], "w");
    let g = rand(&[c], "gamma");
    let bias = rand(&[c], "beta");
    let table = rand(&[v, c], "table");
    let prompt = rand(&[p, c], "prompt");
    let q = rand(&[b, t, nh, hd], "q");
    let k = rand(&[b, s, kvh, hd], "k");
    let vv = rand(&[b, s, kvh, hd], "v");
    let dy = rand(&[n, c], "dy");
    let dq_in = rand(&[b, t, nh, hd], "dattn");
    let logits = rand(&[n, v], "logits");
    let logits_host = read(ctx, &logits);
    let la = rand(&[r, c], "lora_A");
    let lb = rand(&[c, r], "lora_B");
    let (cos, sin) = rope_tables(&default_inv_freq(hd, 10_000.0), s);
    let (cos, sin) = (
        up(ctx, &cos, &[s, hd / 2], "cos"),
        up(ctx, &sin, &[s, hd / 2], "sin"),
    );
    let ids: Vec<i32> = (0..n as i32).map(|i| (i * 7) % v as i32).collect();
    let ids = Tensor::from_i32(ctx, &ids, &[b, t], "ids").unwrap();
    let targets: Vec<i32> = (0..n as i32)
        .map(|i| if i % 5 == 0 { -100 } else { (i * 3) % v as i32 })
        .collect();
    let (_, dl) = wgtune::cpu::loss::mean_loss_scale(&targets);
    let targets = Tensor::from_i32(ctx, &targets, &[n], "targets").unwrap();
    let dlosses = up(
        ctx,
        &dl.iter().map(|&d| d as f32).collect::<Vec<_>>(),
        &[n],
        "dlosses",
    );

    let go = || -> Vec<Vec<f32>> {
        let o = |shape: &[usize], label: &str| zeros(ctx, shape, label);
        let (y, rstd, dx) = (o(&[n, c], "y"), o(&[n], "rstd"), o(&[n, c], "dx"));
        let (y2, mean2, rstd2, dx2) = (
            o(&[n, c], "ln.y"),
            o(&[n], "ln.mean"),
            o(&[n], "ln.rstd"),
            o(&[n, c], "ln.dx"),
        );
        let (mm, dmm, dw) = (o(&[n, c], "mm"), o(&[n, c], "dmm"), o(&[c, c], "dw"));
        let (sw, dg, du, ge, dge) = (
            o(&[n, c], "sw"),
            o(&[n, c], "dg"),
            o(&[n, c], "du"),
            o(&[n, c], "gelu"),
            o(&[n, c], "dgelu"),
        );
        let (emb, dprompt) = (o(&[b, s, c], "emb"), o(&[p, c], "dprompt"));
        let qr = o(&[b, t, nh, hd], "q.rot");
        let (att, lse, dq, dk, dv, delta) = (
            o(&[b, t, nh, hd], "att"),
            o(&[b, nh, t], "lse"),
            o(&[b, t, nh, hd], "dq"),
            o(&[b, s, kvh, hd], "dk"),
            o(&[b, s, kvh, hd], "dv"),
            o(&[b, nh, t], "delta"),
        );
        let (losses, dlogits) = (o(&[n], "losses"), o(&[n, v], "dlogits"));
        // Overwritten in place: a fresh copy of the logits per run.
        let ws = up(ctx, &logits_host, &[n, v], "logits_ws");
        let (lo, h, da, db, dh, ldx) = (
            o(&[n, c], "lora.out"),
            o(&[n, r], "h"),
            o(&[r, c], "dA"),
            o(&[c, r], "dB"),
            o(&[n, r], "dh"),
            o(&[n, c], "lora.dx"),
        );
        let mut plan = Plan::new("determinism");
        norm::rmsnorm_forward(ctx, &mut plan, &y, &rstd, &x, &g, 1e-5).unwrap();
        norm::rmsnorm_backward(ctx, &mut plan, &dx, &dy, &x, &g, &rstd).unwrap();
        norm::layernorm_forward(ctx, &mut plan, &y2, &mean2, &rstd2, &x, &g, &bias, 1e-5).unwrap();
        norm::layernorm_backward(ctx, &mut plan, &dx2, &dy, &x, &g, &mean2, &rstd2).unwrap();
        matmul::matmul_forward(ctx, &mut plan, &mm, &x, &w, Some(&bias)).unwrap();
        matmul::matmul_backward_input(ctx, &mut plan, &dmm, &dy, &w).unwrap();
        matmul::matmul_backward_weight(ctx, &mut plan, &dw, &dy, &x).unwrap();
        activation::swiglu_forward(ctx, &mut plan, &sw, &x, &dy).unwrap();
        activation::swiglu_backward(ctx, &mut plan, &dg, &du, &dy, &x, &mm).unwrap();
        activation::gelu_forward(ctx, &mut plan, &ge, &x).unwrap();
        activation::gelu_backward(ctx, &mut plan, &dge, &dy, &x).unwrap();
        embedding::prompt_forward(ctx, &mut plan, &emb, &prompt).unwrap();
        embedding::embedding_forward(ctx, &mut plan, &emb, &ids, &table, p).unwrap();
        embedding::prompt_backward(ctx, &mut plan, &dprompt, &emb).unwrap();
        activation::residual_forward(ctx, &mut plan, &qr, &q, &dq_in).unwrap();
        rope::rope_forward(ctx, &mut plan, &qr, &cos, &sin, b, t, p).unwrap();
        attention::attention_forward(ctx, &mut plan, &att, &lse, &qr, &k, &vv).unwrap();
        attention::attention_backward(
            ctx, &mut plan, &dq, &dk, &dv, &delta, &dq_in, &qr, &k, &vv, &att, &lse,
        )
        .unwrap();
        rope::rope_backward(ctx, &mut plan, &dq, &cos, &sin, b, t, p).unwrap();
        loss::crossentropy_forward(ctx, &mut plan, &losses, &logits, &targets).unwrap();
        loss::crossentropy_softmax_backward(ctx, &mut plan, &dlogits, &dlosses, &logits, &targets)
            .unwrap();
        loss::crossentropy_softmax_backward_inplace(ctx, &mut plan, &ws, &dlosses, &targets, 0)
            .unwrap();
        lora::lora_forward(ctx, &mut plan, &lo, &h, &x, &la, &lb, 2.0).unwrap();
        lora::lora_backward(
            ctx,
            &mut plan,
            Some(&ldx),
            &da,
            &db,
            &dh,
            &dy,
            &h,
            &x,
            &la,
            &lb,
            2.0,
        )
        .unwrap();
        run(ctx, &plan);
        [
            &y, &rstd, &dx, &y2, &dx2, &mm, &dmm, &dw, &sw, &dg, &du, &ge, &dge, &emb, &dprompt,
            &att, &lse, &dq, &dk, &dv, &losses, &dlogits, &ws, &lo, &da, &db, &ldx,
        ]
        .iter()
        .map(|t| read(ctx, t))
        .collect()
    };
    let (first, second) = (go(), go());
    for (i, (a, b)) in first.iter().zip(&second).enumerate() {
        assert!(
            a.iter().any(|v| *v != 0.0),
            "output {i} is all zeros: the plan did not run"
        );
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "output {i} differs between two identical runs");
    }
    eprintln!("{} outputs bit-identical across two runs", first.len());
}
