//! Reading the committed PyTorch reference outputs (tests/reference/data).

use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};

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
