//! Weights on disk: the one owner of the safetensors format, and of every key-name convention.
//!
//! - [`WeightFile`] (`safetensors.rs`): memory-mapped reading with a validated header, f32
//!   conversion from F32/F16/BF16/F64/integer tensors, and [`write_safetensors`] (atomic: temp
//!   file in the same folder, fsync, rename).
//! - [`keys`]: ALL conversions between key dialects (diffusers, PEFT, kohya, old attn-procs) and
//!   the canonical `(Component, module path)` form, plus LoRA key grammar.
//!
//! Format reference: <https://github.com/huggingface/safetensors> (README "Format").

pub mod keys;
pub mod npy;
mod safetensors;

pub use self::keys::{Component, ModuleList, ModuleSet};
pub use self::safetensors::{
    Dtype, TensorData, TensorInfo, WeightFile, decode_f32, encode_f32, write_safetensors,
    write_safetensors_with,
};

use crate::{Error, Result};

/// An owned f32 tensor in torch (row-major) layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// Checks that `shape` holds exactly `data.len()` elements.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Error::InvalidArgument(format!(
                "shape {shape:?} holds {numel} elements, data has {}",
                data.len()
            )));
        }
        Ok(Self { shape, data })
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Read tensor `name` of `file` as f32.
    pub fn read(file: &WeightFile, name: &str) -> Result<Self> {
        let (shape, data) = file.tensor_f32(name)?;
        Ok(Self { shape, data })
    }
}
