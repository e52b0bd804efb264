//! Fresh adapters, initialized as PEFT does (LoRA: Kaiming-uniform A, zero
//! B; prompt tuning: text / vocab / random rows; prefix tuning: zero,
//! random, or the frozen model's own K/V for a text), plus the prefix
//! projection MLP's PyTorch default init.

use super::adapter::{
    HostTensors, PROJ_B1, PROJ_B2, PROJ_EMB, PROJ_W1, PROJ_W2, PROMPT_EMBEDDINGS,
};
use super::peft_io::{lora_names, AdapterConfig, LoraConfig, PrefixConfig, PromptConfig};
use crate::error::{Error, Result};
use crate::gpu::{Context, DType, Plan, Tensor};
use crate::model::kv::prefix_layout;
use crate::model::transformer::{Acts, FwdShape, Linear, Model, NoHooks};
use crate::rng::Rng;

/// How LoRA's A starts (B is always zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInit {
    /// PEFT's default: kaiming_uniform_(a = sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)).
    Kaiming,
    /// N(0, 1/r), PEFT's `init_lora_weights="gaussian"`.
    Gaussian,
}

/// Initial LoRA tensors for `linears`, the layers `cfg` targets (as
/// [`match_targets`](super::adapter::match_targets) returns them: sorted by
/// name, which fixes the order random numbers are drawn in).
pub fn init_lora(linears: &[&Linear], cfg: &LoraConfig, init: LoraInit, seed: u64) -> HostTensors {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for lin in linears {
        let (an, bn) = lora_names(&lin.name);
        let (r, k) = (cfg.r, lin.in_features);
        let a: Vec<f32> = match init {
            LoraInit::Kaiming => {
                let bound = 1.0 / (k as f64).sqrt();
                (0..r * k)
                    .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                    .collect()
            }
            LoraInit::Gaussian => (0..r * k)
                .map(|_| (rng.normal() / r as f64) as f32)
                .collect(),
        };
        out.push((an, vec![r, k], a));
        out.push((
            bn,
            vec![lin.out_features, r],
            vec![0.0; lin.out_features * r],
        ));
    }
    out
}

/// Rows `ids` of the frozen token-embedding table, gathered on the GPU.
pub fn embedding_rows(ctx: &Context, model: &Model, ids: &[u32]) -> Result<Vec<f32>> {
    let c = model.cfg.hidden;
    let ids: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    let idt = Tensor::from_i32(ctx, &ids, &[1, ids.len()], "init_ids")?;
    let out = Tensor::zeros(ctx, &[1, ids.len(), c], DType::F32, "init_rows")?;
    let mut plan = Plan::new("embedding rows");
    model.embed(ctx, &mut plan, &out, &idt, 0)?;
    plan.run(ctx)?;
    out.read_f32(ctx)
}

/// PEFT's TEXT init ids: the init text's ids repeated, then cut to `n`.
pub fn repeat_to(ids: &[u32], n: usize) -> Result<Vec<u32>> {
    if ids.is_empty() {
        return Err(Error::invalid("init", "the init text has no tokens"));
    }
    Ok(ids.iter().cycle().take(n).copied().collect())
}

/// How the virtual tokens of prompt tuning start.
#[derive(Clone, Debug)]
pub enum PromptInit {
    /// Embedding rows of these token ids (already repeated/cut to N).
    Text(Vec<u32>),
    /// Embedding rows of random token ids.
    Vocab,
    /// N(0, 1), as torch.nn.Embedding.
    Random,
}

pub fn init_prompt(
    ctx: &Context,
    model: &Model,
    cfg: &PromptConfig,
    init: &PromptInit,
    seed: u64,
) -> Result<HostTensors> {
    let (n, c) = (cfg.num_virtual_tokens, model.cfg.hidden);
    let mut rng = Rng::new(seed);
    let table = match init {
        PromptInit::Text(ids) => embedding_rows(ctx, model, &repeat_to(ids, n)?)?,
        PromptInit::Vocab => {
            let ids: Vec<u32> = (0..n)
                .map(|_| rng.below(model.cfg.vocab as u64) as u32)
                .collect();
            embedding_rows(ctx, model, &ids)?
        }
        PromptInit::Random => (0..n * c).map(|_| rng.normal() as f32).collect(),
    };
    Ok(vec![(PROMPT_EMBEDDINGS.to_string(), vec![n, c], table)])
}

/// How the prefix starts.
#[derive(Clone, Debug)]
pub enum PrefixInit {
    Zero,
    /// N(0, std).
    Random(f64),
    /// The frozen model's own K/V (post-RoPE, as the prefix is stored) for
    /// these token ids at positions 0..N.
    Text(Vec<u32>),
}

/// The (N, L*2*kv_dim) prefix table the frozen model produces for `ids`.
pub fn kv_of_text(ctx: &Context, model: &Model, ids: &[u32], n: usize) -> Result<Vec<f32>> {
    let ids: Vec<i32> = repeat_to(ids, n)?.into_iter().map(|x| x as i32).collect();
    let cfg = &model.cfg;
    let shape = FwdShape {
        b: 1,
        t: n,
        n_virtual: 0,
        p: 0,
    };
    let acts = Acts::new(ctx, cfg, shape, true, false)?;
    let idt = Tensor::from_i32(ctx, &ids, &[1, n], "init_ids")?;
    let mut plan = Plan::new("prefix init");
    model.forward(ctx, &mut plan, &acts, &idt, &NoHooks, None)?;
    plan.run(ctx)?;
    let kvd = cfg.kv_dim();
    let width = prefix_layout(cfg, 0, 0).rs;
    let mut table = vec![0f32; n * width];
    for (l, a) in acts.layers.iter().enumerate() {
        for (j, t) in [&a.k, &a.v].into_iter().enumerate() {
            let data = t.read_f32(ctx)?;
            let at = prefix_layout(cfg, l, j);
            for i in 0..n {
                table[i * at.rs + at.off..][..kvd].copy_from_slice(&data[i * kvd..(i + 1) * kvd]);
            }
        }
    }
    Ok(table)
}

pub fn init_prefix(
    ctx: &Context,
    model: &Model,
    cfg: &PrefixConfig,
    init: &PrefixInit,
    seed: u64,
) -> Result<HostTensors> {
    let n = cfg.num_virtual_tokens;
    let width = prefix_layout(&model.cfg, 0, 0).rs;
    let mut rng = Rng::new(seed);
    if cfg.prefix_projection {
        // Embedding ~ N(0, 1); Linear weights and biases ~ U(-1/sqrt(in), 1/sqrt(in)).
        let (td, h) = (cfg.token_dim, cfg.encoder_hidden_size());
        let mut uni = |len: usize, fan_in: usize| -> Vec<f32> {
            let b = 1.0 / (fan_in as f64).sqrt();
            (0..len)
                .map(|_| ((rng.uniform() * 2.0 - 1.0) * b) as f32)
                .collect()
        };
        let w1 = uni(h * td, td);
        let b1 = uni(h, td);
        let w2 = uni(width * h, h);
        let b2 = uni(width, h);
        let emb: Vec<f32> = (0..n * td).map(|_| rng.normal() as f32).collect();
        return Ok(vec![
            (PROJ_EMB.into(), vec![n, td], emb),
            (PROJ_W1.into(), vec![h, td], w1),
            (PROJ_B1.into(), vec![h], b1),
            (PROJ_W2.into(), vec![width, h], w2),
            (PROJ_B2.into(), vec![width], b2),
        ]);
    }
    let table = match init {
        PrefixInit::Zero => vec![0.0; n * width],
        PrefixInit::Random(std) => (0..n * width)
            .map(|_| (rng.normal() * std) as f32)
            .collect(),
        PrefixInit::Text(ids) => kv_of_text(ctx, model, ids, n)?,
    };
    Ok(vec![(PROMPT_EMBEDDINGS.to_string(), vec![n, width], table)])
}

/// The adapter's config kind as a word (for messages).
pub fn method_name(cfg: &AdapterConfig) -> &'static str {
    match cfg {
        AdapterConfig::Lora(_) => "lora",
        AdapterConfig::Prompt(_) => "prompt",
        AdapterConfig::Prefix(_) => "prefix",
    }
}
