//! fp32 → fp16 conversion of a whole graph (`lorafuse optimize --float16`), as ONNX Runtime's
//! Stable Diffusion optimizer converts every pipeline component after fusing it
//! (onnxruntime/python/tools/transformers/models/stable_diffusion/optimize_pipeline.py:
//! `convert_float_to_float16(keep_io_types=False, op_block_list=["RandomNormalLike"])`, whose
//! rules are in onnxruntime/python/tools/transformers/float16.py):
//!
//! - every float initializer, `Constant` and attribute tensor, graph input, output and value_info
//!   becomes float16, values clamped as ORT clamps them (finite magnitudes above 65504 to 65504,
//!   nonzero magnitudes below 5.96e-8 to 5.96e-8, then round to nearest even);
//! - `Cast(to=FLOAT)` casts to FLOAT16, and the ops whose output type is an attribute
//!   (`ConstantOfShape`, `RandomNormal`, …) make float16;
//! - the inputs ORT's kernels take in float only stay float (`Resize`'s scales, `GroupNorm`'s and
//!   `SkipGroupNorm`'s gamma and beta): an initializer or `Constant` read only there keeps its
//!   float values, anything else gets a `Cast(to=FLOAT)` in front of the input;
//! - `RandomNormalLike` (the VAE encoder's sampling) stays in float between casts.
//!
//! ORT's converter finds float tensors through shape inference; here every float is converted,
//! so the casts in front of float-only inputs are inserted without knowing the producer's type
//! (a `Cast` accepts any type). Model-local functions and ops of other domains than ONNX's and
//! ONNX Runtime's are refused by name: their float types cannot be followed without their
//! definitions.

use std::collections::{HashMap, HashSet};

use half::f16;
use serde::Serialize;

use super::MS_DOMAIN;
use super::graph::{Graph, attr_int, attr_tensor, onnx_node, subgraph_inputs};
use crate::onnx::proto::tensor_proto::{DataLocation, DataType};
use crate::onnx::proto::type_proto::Value as TypeValue;
use crate::onnx::proto::{GraphProto, ModelProto, NodeProto, TensorProto, TypeProto};

/// A main-graph initializer's values as f32, wherever they are stored.
type Reader<'a> = &'a dyn Fn(&str) -> Option<Vec<f32>>;

/// ORT's float16.py `max_finite_val` and `min_positive_val` defaults.
const MAX_FINITE: f32 = 65504.0;
const MIN_POSITIVE: f32 = 5.96e-8;

/// What a float16 conversion did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Float16Report {
    /// Float initializers stored as float16 now.
    pub initializers: usize,
    /// Float tensors in node attributes (`Constant` values, `ConstantOfShape` fills, …).
    pub attribute_tensors: usize,
    /// Float initializers and constants kept in float (read only by float-only inputs).
    pub kept_float: usize,
    /// `Cast`s inserted around float-only inputs and blocked nodes.
    pub casts: usize,
    /// Graph inputs, outputs and value_info entries whose type became float16.
    pub values: usize,
}

impl Float16Report {
    /// Nothing was float: the graph is unchanged.
    pub fn is_empty(&self) -> bool {
        self.initializers + self.attribute_tensors + self.casts + self.values == 0
    }
}

/// Input slots ONNX Runtime's kernels take in float whatever the other inputs are
/// (float16.py `ALWAYS_FLOAT_INPUTS`, opset-aware for `Resize`).
fn float_only_inputs(n: &NodeProto, onnx_opset: i64) -> &'static [usize] {
    let ms = n.domain.as_deref() == Some(MS_DOMAIN);
    match (ms, n.op_type.as_deref()) {
        (false, Some("Resize")) if onnx_opset <= 10 => &[1],
        (false, Some("Resize")) => &[2],
        (true, Some("GroupNorm" | "SkipGroupNorm")) => &[1, 2],
        _ => &[],
    }
}

/// Ops left in float between casts (optimize_pipeline.py's `op_block_list`).
fn blocked(n: &NodeProto) -> bool {
    is_onnx(n) && n.op_type.as_deref() == Some("RandomNormalLike")
}

fn is_onnx(n: &NodeProto) -> bool {
    matches!(n.domain.as_deref(), None | Some("") | Some("ai.onnx"))
}

/// Convert `proto`'s graph to float16 in place. `read` gives a main-graph initializer's values
/// as f32 wherever they are stored (external data included); converted initializers are stored
/// inline (`raw_data`).
pub fn convert(proto: &mut ModelProto, read: Reader<'_>) -> Result<Float16Report, String> {
    if let Some(f) = proto.functions.first() {
        return Err(format!(
            "the model defines local functions (`{}`); float16 conversion needs them inlined",
            f.name.as_deref().unwrap_or("?")
        ));
    }
    let onnx_opset = proto
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("") | Some("ai.onnx")))
        .and_then(|o| o.version)
        .unwrap_or(11);
    let g = proto.graph.as_mut().ok_or("the model has no graph")?;
    let mut report = Float16Report::default();
    convert_graph(g, onnx_opset, Some(read), &mut report)?;
    Ok(report)
}

fn convert_graph(
    g: &mut GraphProto,
    onnx_opset: i64,
    read: Option<Reader<'_>>,
    report: &mut Float16Report,
) -> Result<(), String> {
    for n in &g.node {
        let domain = n.domain.as_deref().unwrap_or("");
        if !matches!(domain, "" | "ai.onnx" | MS_DOMAIN) {
            return Err(format!(
                "node `{}` is `{domain}.{}`: ops of that domain are not converted to float16",
                n.name.as_deref().unwrap_or("?"),
                n.op_type.as_deref().unwrap_or("?")
            ));
        }
    }
    // Which values are read where: by a float16 input, or only by float-only inputs.
    let mut fp16_use: HashSet<String> = HashSet::new();
    let mut fp32_use: HashSet<String> = HashSet::new();
    for n in &g.node {
        let keep = float_only_inputs(n, onnx_opset);
        for (i, x) in n.input.iter().enumerate() {
            if x.is_empty() {
                continue;
            }
            if keep.contains(&i) || blocked(n) {
                fp32_use.insert(x.clone());
            } else {
                fp16_use.insert(x.clone());
            }
        }
        // values a subgraph reads from this scope are float16 there (the names it makes
        // itself come along: converting more than needed only adds a cast)
        for a in &n.attribute {
            subgraph_inputs(a, &mut fp16_use);
        }
    }
    fp16_use.extend(g.output.iter().filter_map(|v| v.name.clone()));
    fp16_use.extend(g.input.iter().filter_map(|v| v.name.clone()));
    let convert_value = |name: &str| fp16_use.contains(name) || !fp32_use.contains(name);

    // Values that stay float: initializers and constants read only by float-only inputs.
    let mut kept: HashSet<String> = HashSet::new();
    for t in &mut g.initializer {
        if t.data_type != Some(DataType::Float as i32) {
            continue;
        }
        let name = t.name.clone().unwrap_or_default();
        if !convert_value(&name) {
            kept.insert(name);
            report.kept_float += 1;
            continue;
        }
        let values = if t.data_location == Some(DataLocation::External as i32) {
            read.and_then(|r| r(&name))
                .ok_or_else(|| format!("initializer `{name}`: cannot read its external data"))?
        } else {
            inline_f32(t).ok_or_else(|| format!("initializer `{name}`: malformed float data"))?
        };
        set_f16(t, &values);
        report.initializers += 1;
    }
    for n in &mut g.node {
        if blocked(n) {
            continue;
        }
        let is_const = is_onnx(n) && n.op_type.as_deref() == Some("Constant");
        if is_const && n.output.first().is_some_and(|o| !convert_value(o)) {
            kept.extend(n.output.first().cloned());
            report.kept_float += 1;
            continue;
        }
        convert_node(n, onnx_opset, report)?;
    }

    // Casts in front of float-only inputs that are not float-kept constants, and around
    // blocked nodes.
    let mut graph = Graph::new(g);
    let mut casts: HashMap<String, String> = HashMap::new();
    for i in 0..graph.len() {
        let n = graph.node(i);
        let keep = float_only_inputs(n, onnx_opset);
        let is_blocked = blocked(n);
        if !is_blocked && keep.is_empty() {
            continue;
        }
        let mut node = n.clone();
        let mut changed = false;
        for k in 0..node.input.len() {
            let x = &node.input[k];
            if x.is_empty() || kept.contains(x) || !(keep.contains(&k) || is_blocked) {
                continue;
            }
            // RandomNormalLike reads its input's shape and type: the cast makes it float
            node.input[k] = cast_name(&mut graph, &mut casts, &x.clone(), report);
            changed = true;
        }
        if is_blocked {
            let dtype = node
                .attribute
                .iter()
                .find(|a| a.name.as_deref() == Some("dtype"));
            if dtype.is_none_or(|a| a.i == Some(DataType::Float as i64)) {
                for o in &mut node.output {
                    if o.is_empty() {
                        continue;
                    }
                    let float_out = graph.fresh_name(&format!("{o}_fp32"));
                    let back = onnx_node(
                        "Cast",
                        graph.fresh_name(&format!("{o}_cast_to_fp16")),
                        vec![float_out.clone()],
                        vec![o.clone()],
                        vec![attr_int("to", DataType::Float16 as i64)],
                    );
                    *o = float_out;
                    graph.push(back);
                    report.casts += 1;
                    changed = true;
                }
            }
        }
        if changed {
            graph.replace(i, node);
        }
    }
    graph.finish();

    for v in g
        .input
        .iter_mut()
        .chain(&mut g.output)
        .chain(&mut g.value_info)
    {
        if v.name.as_deref().is_some_and(|n| kept.contains(n)) {
            continue;
        }
        if let Some(t) = v.r#type.as_mut() {
            report.values += usize::from(float_type_to_f16(t));
        }
    }
    Ok(())
}

/// The name of `x` cast to float, inserting the `Cast` once per value.
fn cast_name(
    graph: &mut Graph<'_>,
    casts: &mut HashMap<String, String>,
    x: &str,
    report: &mut Float16Report,
) -> String {
    if let Some(c) = casts.get(x) {
        return c.clone();
    }
    let out = graph.fresh_name(&format!("{x}_cast_to_fp32"));
    let node = onnx_node(
        "Cast",
        graph.fresh_name(&format!("{x}_cast_to_fp32_node")),
        vec![x.to_string()],
        vec![out.clone()],
        vec![attr_int("to", DataType::Float as i64)],
    );
    graph.push(node);
    report.casts += 1;
    casts.insert(x.to_string(), out.clone());
    out
}

/// One node's float attributes and output types, and its subgraphs.
fn convert_node(
    n: &mut NodeProto,
    onnx_opset: i64,
    report: &mut Float16Report,
) -> Result<(), String> {
    let op = n.op_type.clone().unwrap_or_default();
    let onnx = is_onnx(n);
    let float = Some(DataType::Float as i32);
    let half = DataType::Float16 as i64;
    for a in &mut n.attribute {
        let name = a.name.as_deref().unwrap_or("");
        match (onnx, op.as_str(), name) {
            (true, "Cast", "to") if a.i == float.map(i64::from) => a.i = Some(half),
            (
                true,
                "EyeLike" | "Multinomial" | "RandomNormal" | "RandomUniform" | "RandomUniformLike"
                | "Bernoulli",
                "dtype",
            ) if a.i == float.map(i64::from) => a.i = Some(half),
            _ => {}
        }
        if let Some(t) = a.t.as_mut() {
            report.attribute_tensors += convert_inline(t, n.name.as_deref())?;
        }
        for t in &mut a.tensors {
            report.attribute_tensors += convert_inline(t, n.name.as_deref())?;
        }
        for sg in a.g.as_deref_mut().into_iter().chain(a.graphs.iter_mut()) {
            convert_graph(sg, onnx_opset, None, report)?;
        }
    }
    if !onnx {
        return Ok(());
    }
    let has = |n: &NodeProto, a: &str| n.attribute.iter().any(|x| x.name.as_deref() == Some(a));
    match op.as_str() {
        // float by default: made float16 explicitly
        "RandomNormal" | "RandomUniform" if !has(n, "dtype") => {
            n.attribute.push(attr_int("dtype", half));
        }
        "ConstantOfShape" if !has(n, "value") => {
            n.attribute
                .push(attr_tensor("value", f16_tensor(&[1], &[0.0])));
        }
        "Constant" => {
            // value_float / value_floats make a float output: a float16 `value` instead
            let scalar = n
                .attribute
                .iter()
                .position(|a| matches!(a.name.as_deref(), Some("value_float" | "value_floats")));
            if let Some(k) = scalar {
                let a = n.attribute.remove(k);
                let t = if a.name.as_deref() == Some("value_float") {
                    f16_tensor(&[], &[a.f.unwrap_or(0.0)])
                } else {
                    f16_tensor(&[a.floats.len() as i64], &a.floats)
                };
                n.attribute.push(attr_tensor("value", t));
                report.attribute_tensors += 1;
            }
        }
        _ => {}
    }
    Ok(())
}

fn f16_tensor(dims: &[i64], values: &[f32]) -> TensorProto {
    let mut t = TensorProto {
        dims: dims.to_vec(),
        ..Default::default()
    };
    set_f16(&mut t, values);
    t
}

/// Convert an inline float tensor (an attribute's); 1 if it was float, 0 otherwise.
fn convert_inline(t: &mut TensorProto, node: Option<&str>) -> Result<usize, String> {
    if t.data_type != Some(DataType::Float as i32) {
        return Ok(0);
    }
    let v = inline_f32(t).ok_or_else(|| {
        format!(
            "node `{}`: a float tensor attribute with external or malformed data",
            node.unwrap_or("?")
        )
    })?;
    set_f16(t, &v);
    Ok(1)
}

/// The values of a float tensor stored in the proto (`raw_data` or `float_data`).
fn inline_f32(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_location == Some(DataLocation::External as i32) {
        return None;
    }
    match t.raw_data.as_deref() {
        Some(raw) => crate::dtype::decode(crate::dtype::Float::F32, raw).ok(),
        None => Some(t.float_data.clone()),
    }
}

/// Store `values` in `t` as float16 `raw_data` (ORT's clamping, then round to nearest even).
fn set_f16(t: &mut TensorProto, values: &[f32]) {
    let h: Vec<f16> = values
        .iter()
        .map(|&v| f16::from_f32(clamp_like_ort(v)))
        .collect();
    t.data_type = Some(DataType::Float16 as i32);
    t.raw_data = Some(bytemuck::cast_slice::<f16, u8>(&h).to_vec().into());
    t.float_data.clear();
    t.int32_data.clear();
    t.external_data.clear();
    t.data_location = None;
}

/// float16.py `convert_np_to_float16`: magnitudes strictly between 0 and 5.96e-8 become
/// 5.96e-8, finite magnitudes above 65504 become 65504; zeros, infinities and NaN unchanged.
pub(crate) fn clamp_like_ort(v: f32) -> f32 {
    let a = v.abs();
    if a > 0.0 && a < MIN_POSITIVE {
        MIN_POSITIVE.copysign(v)
    } else if a > MAX_FINITE && a.is_finite() {
        MAX_FINITE.copysign(v)
    } else {
        v
    }
}

/// A value type's float element type (tensor, or a sequence's tensors) → float16; whether it
/// was float.
fn float_type_to_f16(t: &mut TypeProto) -> bool {
    match t.value.as_mut() {
        Some(TypeValue::TensorType(tt)) if tt.elem_type == Some(DataType::Float as i32) => {
            tt.elem_type = Some(DataType::Float16 as i32);
            true
        }
        Some(TypeValue::SequenceType(s)) => {
            s.elem_type.as_mut().is_some_and(|e| float_type_to_f16(e))
        }
        _ => false,
    }
}
