//! Hugging Face checkpoint names and shapes, one table per family. The
//! loader (`Model::from_weights`) and `weights::checkpoint_specs` both read
//! it, so supporting a new family means writing one function here.

use std::fmt::Display;

use crate::model::config::{Arch, ModelConfig};
use crate::model::layers::{Mlp, Qkv};
use crate::model::weights::Weights;

/// A dotted module path, scoped one level at a time in the style of
/// candle's `VarBuilder::pp`.
#[derive(Clone, Debug, Default)]
pub struct Scope(String);

impl Scope {
    /// The scope `name` (`""` for the checkpoint's top level).
    pub fn root(name: &str) -> Scope {
        Scope(name.to_string())
    }
    /// The sub-scope `self.name`.
    pub fn pp(&self, name: impl Display) -> Scope {
        if self.0.is_empty() {
            Scope(name.to_string())
        } else {
            Scope(format!("{}.{name}", self.0))
        }
    }
    pub fn name(&self) -> &str {
        &self.0
    }
}

/// A linear layer's entry: `{name}.weight` (out, in), or (in, out) for
/// GPT-2's `Conv1D`, and `{name}.bias` (out) when it has one.
#[derive(Clone, Debug)]
pub struct LinearSpec {
    pub name: String,
    pub out_f: usize,
    pub in_f: usize,
    pub bias: bool,
    pub conv1d: bool,
}

impl LinearSpec {
    pub fn weight(&self) -> String {
        format!("{}.weight", self.name)
    }
    pub fn bias(&self) -> Option<String> {
        self.bias.then(|| format!("{}.bias", self.name))
    }
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let shape = if self.conv1d {
            vec![self.in_f, self.out_f]
        } else {
            vec![self.out_f, self.in_f]
        };
        let mut v = vec![(self.weight(), shape)];
        v.extend(self.bias().map(|b| (b, vec![self.out_f])));
        v
    }
}

/// A norm's entry: `{name}.weight` (c), and `{name}.bias` (c) for LayerNorm.
#[derive(Clone, Debug)]
pub struct NormSpec {
    pub name: String,
    pub c: usize,
    pub bias: bool,
}

impl NormSpec {
    pub fn weight(&self) -> String {
        format!("{}.weight", self.name)
    }
    pub fn bias(&self) -> Option<String> {
        self.bias.then(|| format!("{}.bias", self.name))
    }
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = vec![(self.weight(), vec![self.c])];
        v.extend(self.bias().map(|b| (b, vec![self.c])));
        v
    }
}

/// One layer's entries, shaped like the loaded `Block`.
pub struct BlockSpec {
    pub ln1: NormSpec,
    pub qkv: Qkv<LinearSpec>,
    /// Per-head norms of q and k (width head_dim): qwen3, gemma3.
    pub q_norm: Option<NormSpec>,
    pub k_norm: Option<NormSpec>,
    pub o: LinearSpec,
    /// Norm of the attention output before the residual add (gemma3).
    pub post_attn: Option<NormSpec>,
    pub ln2: NormSpec,
    pub mlp: Mlp<LinearSpec>,
    /// Norm of the MLP output before the residual add (gemma3).
    pub post_mlp: Option<NormSpec>,
}

impl BlockSpec {
    /// The linear layers, in forward order (what LoRA can target).
    pub fn linears(&self) -> Vec<&LinearSpec> {
        let mut v = self.qkv.all();
        v.push(&self.o);
        v.extend(self.mlp.all());
        v
    }

    /// The optional norms, in table order.
    pub fn extra_norms(&self) -> impl Iterator<Item = &NormSpec> {
        [&self.q_norm, &self.k_norm, &self.post_attn, &self.post_mlp]
            .into_iter()
            .flatten()
    }
}

/// Every entry of a checkpoint for one config.
pub struct ModelSpec {
    /// Token embeddings (vocab, hidden).
    pub wte: (String, Vec<usize>),
    /// GPT-2's learned positions (max_positions, hidden).
    pub wpe: Option<(String, Vec<usize>)>,
    pub blocks: Vec<BlockSpec>,
    pub ln_f: NormSpec,
    /// `None` when tied to the embeddings (the config decides, whatever the
    /// checkpoint carries).
    pub lm_head: Option<LinearSpec>,
}

impl ModelSpec {
    /// The checkpoint of `cfg`, every name under `root` except `lm_head`.
    pub fn new(cfg: &ModelConfig, root: &Scope) -> ModelSpec {
        match cfg.arch {
            Arch::Gpt2 => gpt2(cfg, root),
            Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Qwen3 | Arch::Gemma3 => {
                llama(cfg, root)
            }
        }
    }

    /// The checkpoint of `cfg` as transformers saves it.
    pub fn saved(cfg: &ModelConfig) -> ModelSpec {
        let root = match cfg.arch {
            Arch::Gpt2 => "transformer",
            _ => "model",
        };
        ModelSpec::new(cfg, &Scope::root(root))
    }

    /// The checkpoint of `cfg` as `wts` names it: GPT-2 comes with or
    /// without the `transformer.` scope.
    pub fn of(cfg: &ModelConfig, wts: &Weights) -> ModelSpec {
        if cfg.arch == Arch::Gpt2 && !wts.contains("transformer.wte.weight") {
            ModelSpec::new(cfg, &Scope::root(""))
        } else {
            ModelSpec::saved(cfg)
        }
    }

    /// Every block's linear layers (the output head is not one of them).
    pub fn linears(&self) -> Vec<&LinearSpec> {
        self.blocks.iter().flat_map(BlockSpec::linears).collect()
    }

    /// Every tensor name and its Hugging Face shape, in table order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = vec![self.wte.clone()];
        v.extend(self.wpe.clone());
        for b in &self.blocks {
            v.extend(b.ln1.tensors());
            v.extend(b.ln2.tensors());
            v.extend(b.extra_norms().flat_map(NormSpec::tensors));
            v.extend(b.linears().into_iter().flat_map(LinearSpec::tensors));
        }
        v.extend(self.ln_f.tensors());
        v.extend(self.lm_head.iter().flat_map(LinearSpec::tensors));
        v
    }
}

fn lm_head(cfg: &ModelConfig) -> Option<LinearSpec> {
    (!cfg.tie_embeddings).then(|| LinearSpec {
        name: "lm_head".into(),
        out_f: cfg.vocab,
        in_f: cfg.hidden,
        bias: false,
        conv1d: false,
    })
}

/// Llama, Mistral, Qwen2/3, Gemma 3: `model.layers.{i}.self_attn.q_proj`,
/// ... Gemma 3's `post_attention_layernorm` follows attention (its MLP's
/// input norm is `pre_feedforward_layernorm`); Llama's is the MLP's input
/// norm.
fn llama(cfg: &ModelConfig, root: &Scope) -> ModelSpec {
    let (c, ff, qd, kvd) = (
        cfg.hidden,
        cfg.intermediate,
        cfg.heads * cfg.head_dim,
        cfg.kv_dim(),
    );
    let norm_of = |s: Scope, c: usize| NormSpec {
        name: s.0,
        c,
        bias: false,
    };
    let norm = |s: Scope| norm_of(s, c);
    let lin = |s: Scope, out_f, in_f, bias| LinearSpec {
        name: s.0,
        out_f,
        in_f,
        bias,
        conv1d: false,
    };
    let sandwich = cfg.sandwich_norms;
    let block = |i: usize| {
        let p = root.pp("layers").pp(i);
        let (a, m) = (p.pp("self_attn"), p.pp("mlp"));
        let qk = |n: &str| cfg.qk_norm.then(|| norm_of(a.pp(n), cfg.head_dim));
        BlockSpec {
            ln1: norm(p.pp("input_layernorm")),
            qkv: Qkv::Split {
                q: lin(a.pp("q_proj"), qd, c, cfg.qkv_bias),
                k: lin(a.pp("k_proj"), kvd, c, cfg.qkv_bias),
                v: lin(a.pp("v_proj"), kvd, c, cfg.qkv_bias),
            },
            q_norm: qk("q_norm"),
            k_norm: qk("k_norm"),
            o: lin(a.pp("o_proj"), c, qd, false),
            post_attn: sandwich.then(|| norm(p.pp("post_attention_layernorm"))),
            post_mlp: sandwich.then(|| norm(p.pp("post_feedforward_layernorm"))),
            ln2: norm(p.pp(if sandwich {
                "pre_feedforward_layernorm"
            } else {
                "post_attention_layernorm"
            })),
            mlp: Mlp::SwiGlu {
                gate: lin(m.pp("gate_proj"), ff, c, false),
                up: lin(m.pp("up_proj"), ff, c, false),
                down: lin(m.pp("down_proj"), c, ff, false),
            },
        }
    };
    ModelSpec {
        wte: (root.pp("embed_tokens.weight").0, vec![cfg.vocab, c]),
        wpe: None,
        blocks: (0..cfg.layers).map(block).collect(),
        ln_f: norm(root.pp("norm")),
        lm_head: lm_head(cfg),
    }
}

/// GPT-2: `transformer.h.{i}.attn.c_attn`, ... (`Conv1D` weights).
fn gpt2(cfg: &ModelConfig, root: &Scope) -> ModelSpec {
    let (c, ff) = (cfg.hidden, cfg.intermediate);
    let norm = |s: Scope| NormSpec {
        name: s.0,
        c,
        bias: true,
    };
    let conv = |s: Scope, out_f, in_f| LinearSpec {
        name: s.0,
        out_f,
        in_f,
        bias: true,
        conv1d: true,
    };
    let block = |i: usize| {
        let p = root.pp("h").pp(i);
        BlockSpec {
            ln1: norm(p.pp("ln_1")),
            qkv: Qkv::Fused(conv(p.pp("attn.c_attn"), 3 * c, c)),
            q_norm: None,
            k_norm: None,
            o: conv(p.pp("attn.c_proj"), c, c),
            post_attn: None,
            post_mlp: None,
            ln2: norm(p.pp("ln_2")),
            mlp: Mlp::Gelu {
                fc: conv(p.pp("mlp.c_fc"), ff, c),
                proj: conv(p.pp("mlp.c_proj"), c, ff),
            },
        }
    };
    ModelSpec {
        wte: (root.pp("wte.weight").0, vec![cfg.vocab, c]),
        wpe: Some((root.pp("wpe.weight").0, vec![cfg.max_positions, c])),
        blocks: (0..cfg.layers).map(block).collect(),
        ln_f: norm(root.pp("ln_f")),
        lm_head: lm_head(cfg),
    }
}
