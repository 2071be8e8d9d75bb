//! Helpers shared by the `lora_*` and `keys` integration tests: synthetic safetensors files and
//! deterministic pseudo-random data.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lorafuse::weights::{Dtype, TensorData, write_safetensors};

/// Deterministic values in [-1, 1) (xorshift), different per seed.
pub fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// An f32 tensor of random data.
pub fn rt(shape: &[usize], seed: u64) -> (Vec<usize>, Vec<f32>) {
    (shape.to_vec(), rand(numel(shape), seed))
}

pub fn td(dtype: Dtype, shape: &[usize], data: &[f32]) -> TensorData<'static> {
    TensorData::from_f32(dtype, shape.to_vec(), data).expect("tensor")
}

/// Builder for a synthetic safetensors file.
#[derive(Default)]
pub struct FileBuilder {
    pub tensors: Vec<(String, TensorData<'static>)>,
    pub metadata: BTreeMap<String, String>,
}

impl FileBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn f32(mut self, name: &str, shape: &[usize], data: &[f32]) -> Self {
        self.tensors
            .push((name.to_string(), td(Dtype::F32, shape, data)));
        self
    }

    pub fn typed(mut self, name: &str, dtype: Dtype, shape: &[usize], data: &[f32]) -> Self {
        self.tensors
            .push((name.to_string(), td(dtype, shape, data)));
        self
    }

    pub fn i64(mut self, name: &str, shape: &[usize], data: &[i64]) -> Self {
        self.tensors.push((
            name.to_string(),
            TensorData::from_i64(shape.to_vec(), data).expect("i64"),
        ));
        self
    }

    pub fn meta(mut self, k: &str, v: &str) -> Self {
        self.metadata.insert(k.to_string(), v.to_string());
        self
    }

    pub fn write(self, path: &Path) -> PathBuf {
        let meta = (!self.metadata.is_empty()).then_some(&self.metadata);
        write_safetensors(path, self.tensors, meta).expect("write");
        path.to_path_buf()
    }
}

/// Repository root (tests run with the package root as cwd, but be explicit).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Naive matmul a [m,k] · b [k,n].
pub fn mm(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for t in 0..k {
                s += a[i * k + t] as f64 * b[t * n + j] as f64;
            }
            out[i * n + j] = s as f32;
        }
    }
    out
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    let d = max_abs_diff(a, b);
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
}
