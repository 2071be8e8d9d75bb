//! Small ONNX graphs built in code, and the one rewrite the fast LoRA switch needs.
//!
//! - [`with_weights_as_inputs`]: a model whose chosen initializers become graph *inputs* that
//!   every run binds. (Kept as initializers listed among the inputs, ONNX IR ≥ 4's "overridable
//!   initializers", the session would hold a device copy of each beside the switch's own base
//!   and live buffers.)
//! - [`weight_update_graph`]: `out = cast(cast(base, f32) + reshape(a @ b, shape(base)), T)`, the
//!   per-weight kernel that recomputes a LoRA-target weight on the session's own device
//!   (W' = W + Σ wᵢ·ΔWᵢ with the sum handed over as stacked low-rank factors or as a full ΔW).

use prost::Message;

use super::proto::tensor_proto::DataType;
use super::proto::tensor_shape_proto::Dimension;
use super::proto::tensor_shape_proto::dimension::Value as DimValue;
use super::proto::type_proto::{Tensor as TensorType, Value as TypeValue};
use super::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto,
    TypeProto, ValueInfoProto, attribute_proto::AttributeType,
};
use super::write::PatchedInMemory;
use super::{OnnxModel, write::external_data_in_memory};
use crate::{Error, Result};

fn tensor_type(elem: DataType, dims: Option<&[Dim]>) -> TypeProto {
    TypeProto {
        value: Some(TypeValue::TensorType(TensorType {
            elem_type: Some(elem as i32),
            shape: dims.map(|d| TensorShapeProto {
                dim: d
                    .iter()
                    .map(|d| Dimension {
                        value: Some(match d {
                            Dim::Fixed(v) => DimValue::DimValue(*v as i64),
                            Dim::Named(n) => DimValue::DimParam((*n).to_string()),
                        }),
                        denotation: None,
                    })
                    .collect(),
            }),
        })),
        denotation: None,
    }
}

/// A dimension of a declared value.
#[derive(Clone, Copy, Debug)]
enum Dim {
    Fixed(usize),
    Named(&'static str),
}

fn value_info(name: &str, ty: TypeProto) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(ty),
        doc_string: None,
        metadata_props: Vec::new(),
    }
}

/// The in-memory model (and its external data) with the initializers `names` turned into graph
/// inputs of the same type and shape, so that every run binds them (the fast switch's live
/// buffers) and the session holds no copy of its own: the graph is re-encoded without those
/// initializers (their `raw_data` are views of the file, so the decoded model is not copied
/// twice). Every name must be an initializer of the main graph.
pub fn with_weights_as_inputs(model: &OnnxModel, names: &[String]) -> Result<PatchedInMemory> {
    let wanted: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
    let existing: std::collections::HashSet<&str> = model
        .graph()
        .input
        .iter()
        .filter_map(|i| i.name.as_deref())
        .collect();
    let mut inputs = Vec::with_capacity(names.len());
    for name in names {
        let info = model.require(name)?;
        if existing.contains(name.as_str()) {
            continue;
        }
        let dims: Vec<Dim> = info.dims.iter().map(|&d| Dim::Fixed(d)).collect();
        inputs.push(value_info(name, tensor_type(info.dtype, Some(&dims))));
    }
    let mut proto = model.proto().clone();
    let graph = proto.graph.as_mut().ok_or_else(|| Error::Onnx {
        file: model.path().to_path_buf(),
        msg: "the model has no graph".into(),
    })?;
    graph
        .initializer
        .retain(|t| !t.name.as_deref().is_some_and(|n| wanted.contains(n)));
    graph.input.extend(inputs);
    Ok(PatchedInMemory {
        model: proto.encode_to_vec(),
        data_files: external_data_in_memory(model)?,
    })
}

/// What a [`weight_update_graph`] adds to the base weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpdateKind {
    /// Inputs `base`, `a` `[M, R]`, `b` `[R, N]` (f32): out = base + a·b (M·N = numel).
    LowRank,
    /// Inputs `base`, `delta` (f32, numel of base): out = base + delta.
    Full,
    /// Input `base`: out = base (restores a weight bit for bit).
    Copy,
}

fn node(op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: Some(format!("{op}_{output}")),
        op_type: Some(op.to_string()),
        attribute: attrs,
        ..Default::default()
    }
}

fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

/// The serialized kernel that writes an updated weight of element type `dtype` (float, float16
/// or bfloat16). The sum is formed in f32 and rounded once, like [`crate::lora::merge`].
pub fn weight_update_graph(dtype: DataType, kind: UpdateKind) -> Result<Vec<u8>> {
    if !matches!(
        dtype,
        DataType::Float | DataType::Float16 | DataType::Bfloat16
    ) {
        return Err(Error::InvalidArgument(format!(
            "a LoRA can only update float, float16 or bfloat16 weights, not {}",
            dtype.name()
        )));
    }
    let f32_in = dtype == DataType::Float;
    let mut nodes = Vec::new();
    let mut inputs = vec![value_info("base", tensor_type(dtype, None))];
    let base32 = if f32_in {
        "base"
    } else {
        nodes.push(node(
            "Cast",
            &["base"],
            "base32",
            vec![int_attr("to", DataType::Float as i64)],
        ));
        "base32"
    };
    let addend = match kind {
        UpdateKind::Copy => None,
        UpdateKind::LowRank => {
            let m = [Dim::Named("M"), Dim::Named("R")];
            let n = [Dim::Named("R"), Dim::Named("N")];
            inputs.push(value_info("a", tensor_type(DataType::Float, Some(&m))));
            inputs.push(value_info("b", tensor_type(DataType::Float, Some(&n))));
            nodes.push(node("MatMul", &["a", "b"], "ab", vec![]));
            Some("ab")
        }
        UpdateKind::Full => {
            inputs.push(value_info("delta", tensor_type(DataType::Float, None)));
            Some("delta")
        }
    };
    let sum = match addend {
        None => base32,
        Some(x) => {
            nodes.push(node("Shape", &["base"], "shape", vec![]));
            nodes.push(node("Reshape", &[x, "shape"], "addend", vec![]));
            nodes.push(node("Add", &[base32, "addend"], "sum", vec![]));
            "sum"
        }
    };
    if f32_in || sum == "base" {
        nodes.push(node("Identity", &[sum], "out", vec![]));
    } else if kind == UpdateKind::Copy {
        // base → f32 → base is exact for f16/bf16, but skip the round trip anyway.
        nodes.clear();
        nodes.push(node("Identity", &["base"], "out", vec![]));
    } else {
        nodes.push(node(
            "Cast",
            &[sum],
            "out",
            vec![int_attr("to", dtype as i64)],
        ));
    }
    let model = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        producer_name: Some("lorafuse".into()),
        graph: Some(GraphProto {
            node: nodes,
            name: Some(format!("lora_weight_update_{}", dtype.name())),
            input: inputs,
            output: vec![value_info("out", tensor_type(dtype, None))],
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(model.encode_to_vec())
}
