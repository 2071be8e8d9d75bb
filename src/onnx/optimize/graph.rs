//! An editable view of a `GraphProto` for pattern rewrites: who produces and who consumes each
//! value, small constant values, node replacement, and dead-node removal at the end.
//!
//! Rewrites replace the *last* node of a pattern in place (so the graph stays in topological
//! order: the new node's inputs are produced before the pattern began) and leave the rest of the
//! pattern to [`Graph::finish`], which drops every node whose outputs nobody reads. A pattern
//! node that something outside the pattern still reads therefore stays, and the graph computes
//! the same values either way.

use std::collections::{HashMap, HashSet};

use half::f16;

use crate::onnx::proto::tensor_proto::{DataLocation, DataType};
use crate::onnx::proto::{
    AttributeProto, GraphProto, NodeProto, TensorProto, attribute_proto::AttributeType,
};

/// Constant tensors larger than this are not decoded by [`Graph::values`] (shape pieces and
/// scalars are what patterns look at).
const MAX_CONST_ELEMS: usize = 64;

/// How many values back [`Graph::branch_starts_at_norm`] looks (a decomposed GEGLU feed-forward:
/// about 40 values; an attention block about 60).
const MAX_BRANCH: usize = 256;

pub(crate) struct Graph<'a> {
    pub g: &'a mut GraphProto,
    producer: HashMap<String, usize>,
    consumers: HashMap<String, Vec<usize>>,
    inits: HashMap<String, usize>,
    outputs: HashSet<String>,
    dead: Vec<bool>,
    /// Names handed out by [`Graph::fresh_name`].
    reserved: HashSet<String>,
}

impl<'a> Graph<'a> {
    pub fn new(g: &'a mut GraphProto) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for o in &n.output {
                if !o.is_empty() {
                    producer.insert(o.clone(), i);
                }
            }
            for x in &n.input {
                if !x.is_empty() {
                    consumers.entry(x.clone()).or_default().push(i);
                }
            }
        }
        let inits = g
            .initializer
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.name.clone().map(|n| (n, i)))
            .collect();
        let outputs = g.output.iter().filter_map(|o| o.name.clone()).collect();
        let dead = vec![false; g.node.len()];
        Self {
            g,
            producer,
            consumers,
            inits,
            outputs,
            dead,
            reserved: HashSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.g.node.len()
    }

    pub fn node(&self, i: usize) -> &NodeProto {
        &self.g.node[i]
    }

    /// Op type of node `i` in the default domain (`None` for contrib ops, removed nodes, and nodes
    /// whose input/output count is not what the op has: patterns index inputs freely, and a
    /// hostile file must not make them panic).
    pub fn op(&self, i: usize) -> Option<&str> {
        let n = &self.g.node[i];
        if self.dead[i] || !matches!(n.domain.as_deref(), None | Some("") | Some("ai.onnx")) {
            return None;
        }
        let op = n.op_type.as_deref()?;
        let (ins, outs) = (n.input.len(), n.output.len());
        let ok = match op {
            "Constant" => ins == 0 && outs == 1,
            "MatMul" | "Mul" | "Div" | "Add" | "Reshape" | "Gather" => ins == 2 && outs == 1,
            "Slice" => (3..=5).contains(&ins) && outs == 1,
            "InstanceNormalization" => ins == 3 && outs == 1,
            "Concat" => ins >= 1 && outs == 1,
            "Unsqueeze" | "Squeeze" => (1..=2).contains(&ins) && outs == 1,
            _ => ins >= 1 && outs >= 1,
        };
        ok.then_some(op)
    }

    /// The live node producing `name`.
    pub fn producer(&self, name: &str) -> Option<usize> {
        self.producer.get(name).copied().filter(|&i| !self.dead[i])
    }

    /// The live node producing `name` if its op type is `op`.
    pub fn producer_op(&self, name: &str, op: &str) -> Option<usize> {
        self.producer(name).filter(|&i| self.op(i) == Some(op))
    }

    /// Live nodes reading `name`.
    pub fn consumers(&self, name: &str) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .consumers
            .get(name)
            .map(|c| c.iter().copied().filter(|&i| !self.dead[i]).collect())
            .unwrap_or_default();
        v.dedup();
        v
    }

    /// The one live node reading `name`, when `name` is not also a graph output.
    pub fn only_consumer(&self, name: &str) -> Option<usize> {
        match self.consumers(name).as_slice() {
            [one] if !self.outputs.contains(name) => Some(*one),
            _ => None,
        }
    }

    pub fn is_graph_output(&self, name: &str) -> bool {
        self.outputs.contains(name)
    }

    pub fn attr(&self, i: usize, name: &str) -> Option<&AttributeProto> {
        self.g.node[i]
            .attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
    }

    pub fn attr_int(&self, i: usize, name: &str) -> Option<i64> {
        self.attr(i, name).and_then(|a| a.i)
    }

    pub fn attr_ints(&self, i: usize, name: &str) -> Option<&[i64]> {
        self.attr(i, name).map(|a| a.ints.as_slice())
    }

    pub fn attr_float(&self, i: usize, name: &str) -> Option<f32> {
        self.attr(i, name).and_then(|a| a.f)
    }

    /// Node `i`'s input other than `x`, for a two-input node that reads `x` once.
    pub fn other_input(&self, i: usize, x: &str) -> Option<String> {
        let ins = &self.g.node[i].input;
        match (ins.first(), ins.get(1)) {
            (Some(a), Some(b)) if a == x && b != x => Some(b.clone()),
            (Some(a), Some(b)) if b == x && a != x => Some(a.clone()),
            _ => None,
        }
    }

    /// Whether `Shape` node `i` gives the whole shape (no `end`, `start` absent or 0: torch's
    /// dynamo exporter writes `start = 0`).
    pub fn whole_shape(&self, i: usize) -> bool {
        self.attr_int(i, "start").unwrap_or(0) == 0 && self.attr(i, "end").is_none()
    }

    /// The values of a small constant: a `Constant` node's output or an initializer that is not
    /// also a graph input (an overridable initializer is not a constant).
    pub fn values(&self, name: &str) -> Option<Vec<f64>> {
        if let Some(&i) = self.inits.get(name) {
            if self.g.input.iter().any(|v| v.name.as_deref() == Some(name)) {
                return None;
            }
            return tensor_values(&self.g.initializer[i]);
        }
        let p = self.producer_op(name, "Constant")?;
        let a = self.g.node[p].attribute.first()?;
        match a.name.as_deref()? {
            "value" => tensor_values(a.t.as_ref()?),
            "value_float" => a.f.map(|f| vec![f64::from(f)]),
            "value_floats" => Some(a.floats.iter().map(|&f| f64::from(f)).collect()),
            "value_int" => a.i.map(|i| vec![i as f64]),
            "value_ints" => Some(a.ints.iter().map(|&i| i as f64).collect()),
            _ => None,
        }
    }

    /// One constant scalar (a one-element constant of any rank).
    pub fn scalar(&self, name: &str) -> Option<f64> {
        match self.values(name)?.as_slice() {
            [v] => Some(*v),
            _ => None,
        }
    }

    /// The element type and dims of an initializer (for weight shapes).
    pub fn initializer(&self, name: &str) -> Option<&TensorProto> {
        self.inits.get(name).map(|&i| &self.g.initializer[i])
    }

    /// Replace node `i` with `node` (same position), keeping the maps current.
    pub fn replace(&mut self, i: usize, node: NodeProto) {
        for o in &node.output {
            self.producer.insert(o.clone(), i);
        }
        for x in &node.input {
            if !x.is_empty() {
                self.consumers.entry(x.clone()).or_default().push(i);
            }
        }
        self.g.node[i] = node;
    }

    /// Drop node `i` now: a node written again by a fused node (which takes over its outputs).
    pub fn remove(&mut self, i: usize) {
        self.dead[i] = true;
    }

    /// The `axes` of `Squeeze`/`Unsqueeze` node `i`: its constant second input (opset ≥ 13) or its
    /// attribute (older opsets); `None` when absent or computed.
    pub fn axes(&self, i: usize) -> Option<Vec<i64>> {
        match self.g.node[i].input.get(1).filter(|s| !s.is_empty()) {
            Some(a) => Some(self.values(a)?.into_iter().map(|f| f as i64).collect()),
            None => self.attr_ints(i, "axes").map(<[i64]>::to_vec),
        }
    }

    /// Whether a `LayerNormalization` reading `skip` lies among the producers of `from` (a
    /// backward search over at most [`MAX_BRANCH`] values): a transformer branch computed from
    /// `norm(skip)`, which then has `skip`'s shape.
    pub fn branch_starts_at_norm(&self, from: &str, skip: &str) -> bool {
        let mut work = vec![from.to_string()];
        let mut seen = HashSet::new();
        while let Some(v) = work.pop() {
            if seen.len() >= MAX_BRANCH || !seen.insert(v.clone()) {
                continue;
            }
            let Some(p) = self.producer(&v) else { continue };
            if self.op(p) == Some("Constant") {
                continue;
            }
            let n = self.node(p);
            if self.op(p) == Some("LayerNormalization")
                && n.input.first().map(String::as_str) == Some(skip)
            {
                return true;
            }
            work.extend(n.input.iter().filter(|x| !x.is_empty()).cloned());
        }
        false
    }

    /// A name not used by any value or node yet, built from `base`.
    pub fn fresh_name(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut k = 1;
        while self.producer.contains_key(&name)
            || self.consumers.contains_key(&name)
            || self.inits.contains_key(&name)
            || self.reserved.contains(&name)
        {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.reserved.insert(name.clone());
        name
    }

    /// Append `node`; [`Graph::finish`] puts the nodes back in topological order.
    pub fn push(&mut self, node: NodeProto) -> usize {
        let i = self.g.node.len();
        for o in &node.output {
            self.producer.insert(o.clone(), i);
        }
        for x in &node.input {
            if !x.is_empty() {
                self.consumers.entry(x.clone()).or_default().push(i);
            }
        }
        self.g.node.push(node);
        self.dead.push(false);
        i
    }

    /// Add an initializer.
    pub fn add_initializer(&mut self, t: TensorProto) {
        if let Some(n) = t.name.clone() {
            self.inits.insert(n, self.g.initializer.len());
        }
        self.g.initializer.push(t);
    }

    /// The values of a constant of any size as f32: a `Constant` node's tensor, or an initializer
    /// (not a graph input) read through `read` (which knows where external data lives).
    pub fn float_values(
        &self,
        name: &str,
        read: &dyn Fn(&str) -> Option<Vec<f32>>,
    ) -> Option<Vec<f32>> {
        if self.inits.contains_key(name) {
            if self.g.input.iter().any(|v| v.name.as_deref() == Some(name)) {
                return None;
            }
            return read(name);
        }
        let p = self.producer_op(name, "Constant")?;
        let a = self.g.node[p].attribute.first()?;
        match a.name.as_deref()? {
            "value" => tensor_values_upto(a.t.as_ref()?, usize::MAX)
                .map(|v| v.into_iter().map(|x| x as f32).collect()),
            _ => self
                .values(name)
                .map(|v| v.into_iter().map(|x| x as f32).collect()),
        }
    }

    /// The dims of a constant (initializer or `Constant` node tensor).
    pub fn const_dims(&self, name: &str) -> Option<Vec<i64>> {
        if let Some(t) = self.initializer(name) {
            return Some(t.dims.clone());
        }
        let p = self.producer_op(name, "Constant")?;
        let a = self.g.node[p].attribute.first()?;
        match a.name.as_deref()? {
            "value" => a.t.as_ref().map(|t| t.dims.clone()),
            _ => None,
        }
    }

    /// Drop every node none of whose outputs is read (by a node that stays, a subgraph or the
    /// graph's outputs), then initializers and value_info entries nothing refers to any more.
    /// Returns how many nodes were removed.
    pub fn finish(self) -> usize {
        let g = self.g;
        let mut alive = self.dead.iter().map(|d| !d);
        g.node.retain(|_| alive.next().unwrap_or(true));
        topological_order(&mut g.node);
        // Live nodes: those a graph output needs, found from the outputs back through producers
        // (a worklist, so a graph stored out of order — ONNX Runtime's optimizer leaves some —
        // loses nothing); nodes without outputs are kept.
        let producer: HashMap<&str, usize> = g
            .node
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
            .filter(|(o, _)| !o.is_empty())
            .collect();
        let mut used: HashSet<String> = g.output.iter().filter_map(|o| o.name.clone()).collect();
        let mut keep = vec![false; g.node.len()];
        let mut work: Vec<usize> = (0..g.node.len())
            .filter(|&i| {
                let n = &g.node[i];
                n.output.is_empty() || n.output.iter().any(|o| used.contains(o))
            })
            .collect();
        while let Some(i) = work.pop() {
            if std::mem::replace(&mut keep[i], true) {
                continue;
            }
            let n = &g.node[i];
            let mut reads: HashSet<String> =
                n.input.iter().filter(|x| !x.is_empty()).cloned().collect();
            for a in &n.attribute {
                subgraph_inputs(a, &mut reads);
            }
            for x in reads {
                if let Some(&p) = producer.get(x.as_str())
                    && !keep[p]
                {
                    work.push(p);
                }
                used.insert(x);
            }
        }
        let before = g.node.len();
        let mut k = keep.iter();
        g.node.retain(|_| *k.next().unwrap_or(&true));
        let removed = before - g.node.len();
        if removed > 0 {
            let inputs: HashSet<&str> = g.input.iter().filter_map(|v| v.name.as_deref()).collect();
            g.initializer.retain(|t| {
                t.name
                    .as_deref()
                    .is_none_or(|n| used.contains(n) || inputs.contains(n))
            });
            let produced: HashSet<&str> = g
                .node
                .iter()
                .flat_map(|n| n.output.iter().map(String::as_str))
                .collect();
            g.value_info
                .retain(|v| v.name.as_deref().is_some_and(|n| produced.contains(n)));
        }
        removed
    }
}

/// Reorder `nodes` so every node comes after the producers of its inputs, keeping the given
/// order wherever it already is one (nodes appended by a rewrite move up to where they are
/// first needed).
fn topological_order(nodes: &mut Vec<NodeProto>) {
    // "" names an absent optional input or output (ONNX IR): never a dependency
    let producer: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .filter(|(o, _)| !o.is_empty())
        .collect();
    let deps: Vec<Vec<usize>> = nodes
        .iter()
        .map(|n| {
            n.input
                .iter()
                .filter(|x| !x.is_empty())
                .filter_map(|x| producer.get(x.as_str()).copied())
                .collect()
        })
        .collect();
    let mut state = vec![0u8; nodes.len()]; // 0 new, 1 on the stack, 2 placed
    let mut order = Vec::with_capacity(nodes.len());
    for root in 0..nodes.len() {
        let mut stack = vec![(root, 0usize)];
        while let Some((i, k)) = stack.pop() {
            if state[i] == 2 {
                continue;
            }
            state[i] = 1;
            if let Some(&d) = deps[i].get(k) {
                stack.push((i, k + 1));
                if state[d] == 0 {
                    stack.push((d, 0));
                }
                // state 1: a cycle (not a valid graph); leave its order as it is
            } else {
                state[i] = 2;
                order.push(i);
            }
        }
    }
    let mut taken: Vec<Option<NodeProto>> = std::mem::take(nodes).into_iter().map(Some).collect();
    nodes.extend(order.into_iter().filter_map(|i| taken[i].take()));
}

/// Names a node's subgraph attributes read (outer-scope values stay alive).
pub(crate) fn subgraph_inputs(a: &AttributeProto, used: &mut HashSet<String>) {
    let graphs = a.g.iter().map(|g| g.as_ref()).chain(a.graphs.iter());
    for sg in graphs {
        for n in &sg.node {
            used.extend(n.input.iter().filter(|x| !x.is_empty()).cloned());
            for a in &n.attribute {
                subgraph_inputs(a, used);
            }
        }
    }
}

/// The elements of a small inline tensor as f64 (integer and float types).
pub(crate) fn tensor_values(t: &TensorProto) -> Option<Vec<f64>> {
    tensor_values_upto(t, MAX_CONST_ELEMS)
}

/// [`tensor_values`] for tensors of at most `max` elements.
fn tensor_values_upto(t: &TensorProto, max: usize) -> Option<Vec<f64>> {
    if t.data_location == Some(DataLocation::External as i32) {
        return None;
    }
    let numel: usize = t
        .dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(usize::try_from(d).ok()?))?;
    if numel > max {
        return None;
    }
    let dt = DataType::try_from(t.data_type?).ok()?;
    let v: Vec<f64> = if let Some(raw) = t.raw_data.as_deref() {
        if let Some(ft) = crate::onnx::model::float_type(dt) {
            // floats through the one codec (crate::dtype)
            let v = crate::dtype::decode(ft, raw).ok()?;
            v.into_iter().map(f64::from).collect()
        } else {
            let w = dt.bits()? as usize / 8;
            if w == 0 || raw.len() != numel * w {
                return None;
            }
            let c = raw.chunks_exact(w);
            match dt {
                DataType::Int64 => c
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f64)
                    .collect(),
                DataType::Int32 => c
                    .map(|b| f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                    .collect(),
                _ => return None,
            }
        }
    } else {
        match dt {
            DataType::Float => t.float_data.iter().map(|&f| f64::from(f)).collect(),
            DataType::Double => t.double_data.clone(),
            DataType::Int64 => t.int64_data.iter().map(|&i| i as f64).collect(),
            DataType::Int32 => t.int32_data.iter().map(|&i| f64::from(i)).collect(),
            // fp16/bf16 in int32_data hold the 16-bit pattern (onnx.proto)
            DataType::Float16 => t
                .int32_data
                .iter()
                .map(|&i| f64::from(f16::from_bits(i as u16)))
                .collect(),
            _ => return None,
        }
    };
    (v.len() == numel).then_some(v)
}

/// An attribute with one int.
pub(crate) fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

/// An attribute with one float.
pub(crate) fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

/// An attribute with one tensor.
pub(crate) fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(t),
        ..Default::default()
    }
}

/// An attribute with a list of ints.
pub(crate) fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// A `com.microsoft` node.
pub(crate) fn contrib_node(
    op: &str,
    name: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        domain: Some(super::MS_DOMAIN.into()),
        ..onnx_node(op, name, inputs, outputs, attribute)
    }
}

/// A default-domain node.
pub(crate) fn onnx_node(
    op: &str,
    name: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        input: inputs,
        output: outputs,
        name: Some(name),
        op_type: Some(op.into()),
        attribute,
        ..Default::default()
    }
}

/// The name prefix of a node (`/down_blocks.0/attentions.0/…/attn1/Softmax` →
/// `/down_blocks.0/attentions.0/…/attn1`), for naming the nodes that replace it.
pub(crate) fn scope(n: &NodeProto) -> String {
    let name = n.name.as_deref().unwrap_or("");
    match name.rsplit_once('/') {
        Some((s, _)) if !s.is_empty() => s.to_string(),
        _ => name.to_string(),
    }
}
