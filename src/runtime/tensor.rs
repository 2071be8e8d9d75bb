//! Host tensors ↔ ORT values in the element type a graph declares (f32, f16, bf16, f64, int64/32).
//! Pipelines compute in f32 on the host and convert at the session boundary, as diffusers' ONNX
//! pipelines do for fp16 exports.

use half::{bf16, f16};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};

use crate::{Error, Result};

fn shape_i64(shape: &[usize]) -> Vec<i64> {
    shape.iter().map(|&d| d as i64).collect()
}

/// A float tensor as an ORT value of element type `ty`.
pub fn float_value(data: &[f32], shape: &[usize], ty: TensorElementType) -> Result<DynValue> {
    let s = shape_i64(shape);
    Ok(match ty {
        TensorElementType::Float32 => Tensor::from_array((s, data.to_vec()))?.into_dyn(),
        TensorElementType::Float16 => Tensor::from_array((
            s,
            data.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(),
        ))?
        .into_dyn(),
        TensorElementType::Bfloat16 => Tensor::from_array((
            s,
            data.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(),
        ))?
        .into_dyn(),
        TensorElementType::Float64 => {
            Tensor::from_array((s, data.iter().map(|&v| f64::from(v)).collect::<Vec<_>>()))?
                .into_dyn()
        }
        TensorElementType::Int64 => Tensor::from_array((
            s,
            data.iter().map(|&v| v.round() as i64).collect::<Vec<_>>(),
        ))?
        .into_dyn(),
        TensorElementType::Int32 => Tensor::from_array((
            s,
            data.iter().map(|&v| v.round() as i32).collect::<Vec<_>>(),
        ))?
        .into_dyn(),
        other => {
            return Err(Error::InvalidArgument(format!(
                "cannot feed float data to a {other} input"
            )));
        }
    })
}

/// Integer ids (token ids) as an ORT value of element type `ty` (int64 or int32).
pub fn ids_value(ids: &[i64], shape: &[usize], ty: TensorElementType) -> Result<DynValue> {
    let s = shape_i64(shape);
    Ok(match ty {
        TensorElementType::Int64 => Tensor::from_array((s, ids.to_vec()))?.into_dyn(),
        TensorElementType::Int32 => {
            Tensor::from_array((s, ids.iter().map(|&v| v as i32).collect::<Vec<_>>()))?.into_dyn()
        }
        other => {
            return Err(Error::InvalidArgument(format!(
                "token ids need an int64/int32 input, model wants {other}"
            )));
        }
    })
}

/// Any float output as (shape, f32 data).
pub fn extract_f32(value: &DynValue, what: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let ty = match value.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => {
            return Err(Error::InvalidArgument(format!(
                "{what}: expected a tensor, got {other:?}"
            )));
        }
    };
    let (shape, data): (Vec<usize>, Vec<f32>) = match ty {
        TensorElementType::Float32 => {
            let (s, d) = value.try_extract_tensor::<f32>()?;
            (s.iter().map(|&d| d as usize).collect(), d.to_vec())
        }
        TensorElementType::Float16 => {
            let (s, d) = value.try_extract_tensor::<f16>()?;
            (
                s.iter().map(|&d| d as usize).collect(),
                d.iter().map(|v| v.to_f32()).collect(),
            )
        }
        TensorElementType::Bfloat16 => {
            let (s, d) = value.try_extract_tensor::<bf16>()?;
            (
                s.iter().map(|&d| d as usize).collect(),
                d.iter().map(|v| v.to_f32()).collect(),
            )
        }
        TensorElementType::Float64 => {
            let (s, d) = value.try_extract_tensor::<f64>()?;
            (
                s.iter().map(|&d| d as usize).collect(),
                d.iter().map(|&v| v as f32).collect(),
            )
        }
        other => {
            return Err(Error::InvalidArgument(format!(
                "{what}: expected a float tensor, got {other}"
            )));
        }
    };
    Ok((shape, data))
}
