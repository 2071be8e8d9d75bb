//! Builders for small synthetic ONNX models (tests only).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use bytes::Bytes;
use lorafuse::onnx::proto::tensor_proto::DataLocation;
use lorafuse::onnx::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType, tensor_shape_proto,
    type_proto,
};
use lorafuse::onnx::{DataType, encode_like};
use prost::Message;

/// Deterministic values that differ per tensor (`seed`).
pub fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 20001) as f32 / 10000.0 - 1.0
        })
        .collect()
}

pub fn tensor(name: &str, dims: &[usize], dtype: DataType, vals: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(dtype as i32),
        raw_data: Some(Bytes::from(encode_like(dtype, vals).unwrap())),
        ..Default::default()
    }
}

pub fn f32_tensor(name: &str, dims: &[usize], seed: u32) -> TensorProto {
    let n = dims.iter().product();
    tensor(name, dims, DataType::Float, &values(n, seed))
}

pub fn external(
    name: &str,
    dims: &[usize],
    dtype: DataType,
    location: &str,
    offset: u64,
    len: u64,
) -> TensorProto {
    let kv = |k: &str, v: String| StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v),
    };
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(dtype as i32),
        data_location: Some(DataLocation::External as i32),
        external_data: vec![
            kv("location", location.into()),
            kv("offset", offset.to_string()),
            kv("length", len.to_string()),
        ],
        ..Default::default()
    }
}

pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

pub fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

pub fn with_scopes(mut n: NodeProto, scopes: &str) -> NodeProto {
    n.metadata_props.push(StringStringEntryProto {
        key: Some("pkg.torch.onnx.name_scopes".into()),
        value: Some(scopes.into()),
    });
    n
}

pub fn value_info(name: &str, dtype: DataType, dims: &[Result<i64, &str>]) -> ValueInfoProto {
    use tensor_shape_proto::{Dimension, dimension::Value};
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(dtype as i32),
                shape: Some(lorafuse::onnx::proto::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(match d {
                                Ok(v) => Value::DimValue(*v),
                                Err(p) => Value::DimParam(p.to_string()),
                            }),
                            denotation: None,
                        })
                        .collect(),
                }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

pub fn model(nodes: Vec<NodeProto>, inits: Vec<TensorProto>) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        producer_name: Some("lorafuse-tests".into()),
        producer_version: Some("0".into()),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(GraphProto {
            name: Some("g".into()),
            node: nodes,
            initializer: inits,
            input: vec![value_info("x", DataType::Float, &[Err("batch"), Ok(8)])],
            output: vec![value_info("y", DataType::Float, &[Err("batch"), Ok(8)])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn save(dir: &Path, file: &str, m: &ModelProto) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(&p, m.encode_to_vec()).unwrap();
    p
}
