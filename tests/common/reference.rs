//! Reading the committed PyTorch reference outputs (tests/reference/data).

use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};

/// The tiny reference model of every family (tests/reference/generate.py
/// and generate_more.py).
pub const TINY_MODELS: &[&str] = &[
    "tiny-llama",
    "tiny-qwen2",
    "tiny-mistral",
    "tiny-gpt2",
    "tiny-qwen3",
    "tiny-gemma3",
];

/// tests/reference/data/<rel>.
pub fn data_dir(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference/data")
        .join(rel)
}

pub fn json(rel: &str) -> serde_json::Value {
    let p = data_dir(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

/// Named f32/i32 arrays of a reference .safetensors, with shapes.
pub struct Arrays {
    bytes: Vec<u8>,
}

impl Arrays {
    pub fn open(rel: &str) -> Arrays {
        Arrays::open_path(&data_dir(rel))
    }
    /// A .safetensors anywhere (the real-model references live outside the
    /// repository).
    pub fn open_path(p: &std::path::Path) -> Arrays {
        Arrays {
            bytes: std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    pub fn names(&self) -> Vec<String> {
        self.st()
            .names()
            .into_iter()
            .map(|s| s.to_string())
            .collect()
    }
    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.st()
            .tensor(name)
            .unwrap_or_else(|_| panic!("no `{name}`"))
            .shape()
            .to_vec()
    }
    pub fn f32(&self, name: &str) -> Vec<f32> {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("no `{name}`"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    pub fn i32(&self, name: &str) -> Vec<i32> {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("no `{name}`"));
        match t.dtype() {
            Dtype::I32 => t
                .data()
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::I64 => t
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as i32)
                .collect(),
            d => panic!("{name}: {d:?}"),
        }
    }
}

/// transformers' shifted targets: row b, position j predicts labels[b, j + 1].
pub fn shift_targets(labels: &[i32], b: usize, t: usize) -> Vec<i32> {
    let mut out = vec![-100; b * t];
    for r in 0..b {
        for j in 0..t.saturating_sub(1) {
            out[r * t + j] = labels[r * t + j + 1];
        }
    }
    out
}

/// Max |a - b| over the rows where `mask` is set (`width` values per row).
pub fn max_diff_masked(a: &[f32], b: &[f32], mask: &[i32], width: usize) -> f64 {
    let mut m = 0f64;
    for (r, &keep) in mask.iter().enumerate() {
        if keep != 0 {
            for i in r * width..(r + 1) * width {
                m = m.max((a[i] as f64 - b[i] as f64).abs());
            }
        }
    }
    m
}

impl Arrays {
    /// A U8 tensor's bytes.
    pub fn u8(&self, name: &str) -> Vec<u8> {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("no `{name}`"));
        assert_eq!(t.dtype(), Dtype::U8, "{name}");
        t.data().to_vec()
    }
    /// The file's `__metadata__` value for `key`.
    pub fn meta(&self, key: &str) -> String {
        let (_, m) = SafeTensors::read_metadata(&self.bytes).unwrap();
        m.metadata()
            .as_ref()
            .and_then(|m| m.get(key).cloned())
            .unwrap_or_else(|| panic!("no metadata `{key}`"))
    }
}

/// The ggml types of tests/reference/data/quant/ (tests/reference/quant_generate.py), in its order.
pub const QUANT_TYPES: [wgtune::model::gguf::GgmlType; 11] = {
    use wgtune::model::gguf::GgmlType::*;
    [F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4K, Q5K, Q6K]
};

/// One per-format dequantization reference (tests/reference/data/quant/<type>.safetensors): a
/// [rows, cols] tensor of type `ty` (odd shapes: 5 or 7 rows, 37 columns or an odd number of
/// blocks), its bytes exactly as a GGUF file stores them (row-major), and the f32 values
/// `gguf.quants.dequantize` computes from those bytes.
pub struct QuantCase {
    pub ty: wgtune::model::gguf::GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub raw: Vec<u8>,
    pub expected: Vec<f32>,
}

/// The reference for `ty` (one of [`QUANT_TYPES`]), checked against its metadata and sizes.
pub fn quant_case(ty: wgtune::model::gguf::GgmlType) -> QuantCase {
    let name = ty.name();
    let a = Arrays::open(&format!("quant/{}.safetensors", name.to_lowercase()));
    assert_eq!(a.meta("ggml_type"), name);
    let rows: usize = a.meta("rows").parse().unwrap();
    let cols: usize = a.meta("cols").parse().unwrap();
    assert_eq!(a.shape("expected"), [rows, cols], "{name}");
    let (per, bytes) = ty.block().unwrap();
    assert_eq!(a.shape("raw"), [rows, cols / per * bytes], "{name}");
    QuantCase {
        ty,
        rows,
        cols,
        raw: a.u8("raw"),
        expected: a.f32("expected"),
    }
}

/// The batch of a PEFT reference step file (`input_ids`, `labels`,
/// `attention_mask` under `data/`), as the trainer takes it.
pub fn peft_batch(rel: &str) -> wgtune::train::data::Batch {
    let a = Arrays::open(rel);
    let sh = a.shape("input_ids");
    let (b, t) = (sh[0], sh[1]);
    let labels = a.i32("labels");
    let mask = a.i32("attention_mask");
    let targets = shift_targets(&labels, b, t);
    let lens = (0..b)
        .map(|r| mask[r * t..(r + 1) * t].iter().filter(|&&m| m != 0).count())
        .collect();
    let n_targets = targets.iter().filter(|&&x| x != -100).count();
    wgtune::train::data::Batch {
        b,
        t,
        ids: a.i32("input_ids"),
        targets,
        lens,
        n_targets,
        first: (0..b).map(|r| labels[r * t]).collect(),
        starts: Vec::new(),
    }
}

/// An optimizer config for a gradients-only step: lr 0, no clipping (the
/// gradients are compared before any update).
#[allow(dead_code)]
pub fn gradients_only() -> wgtune::train::trainer::OptimConfig {
    wgtune::train::trainer::OptimConfig {
        lr: 0.0,
        weight_decay: 0.0,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        max_grad_norm: 0.0,
        schedule: wgtune::train::trainer::Schedule::Constant,
        warmup_steps: 0,
        total_steps: 1,
    }
}
