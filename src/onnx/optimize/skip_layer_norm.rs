//! Residual Add + LayerNormalization → `com.microsoft.SkipLayerNormalization` (CPU and CUDA
//! kernels).
//!
//! Transformer blocks normalise the residual stream right after adding a branch to it: diffusers'
//! `BasicTransformerBlock` does `h = attn1(norm1(h)) / 1 + h; norm2(h)` and again around `attn2`
//! before `norm3`; CLIP's encoder layers do `h = h + attn(ln1(h)); ln2(h)` and
//! `h = h + mlp(ln2(h))` before the next layer's `ln1` (or `final_layer_norm`). ONNX Runtime's
//! optimizer (onnxruntime/python/tools/transformers/fusion_skiplayernorm.py, with
//! fusion_bias_skiplayernorm for the branch's bias) makes each pair one kernel that also hands the
//! sum back (output 3) for the next residual: `SkipLayerNormalization(input, skip, γ, β, bias)`,
//! contrib_ops/{cpu,cuda}/skip_layer_norm.cc. It tells the operands' shapes by shape inference; we
//! tell them by structure: the sum is `branch + skip` where the branch starts at a
//! `LayerNormalization(skip)` (the block's previous norm), so it has the skip's shape, and the skip
//! is 3-D ([`rank`]). The branch's last `MatMul` (`to_out.0`, `out_proj`, `fc2`: LoRA targets)
//! stays as it is; its bias Add and the legacy exporter's `/ 1` go into the kernel.

use std::collections::{HashMap, HashSet};

use super::Report;
use super::graph::{Graph, attr_float, contrib_node, scope};

/// How deep [`rank`] follows producers (one step per node of the residual stream).
const MAX_RANK_DEPTH: usize = 128;

struct Match {
    norm: usize,
    add: usize,
    input: String,
    skip: String,
    bias: Option<String>,
    sum: String,
    sum_used: bool,
}

pub(super) fn fuse(g: &mut Graph<'_>, report: &mut Report) {
    let mut found = Vec::new();
    let mut ranks = HashMap::new();
    for i in 0..g.len() {
        if g.op(i) != Some("LayerNormalization") {
            continue;
        }
        match find(g, i, &mut ranks) {
            Ok(Some(m)) => found.push(m),
            Ok(None) => {}
            Err(why) => report.left_alone(g.node(i), "skip layer norm", why),
        }
    }
    let mut taken = HashSet::new();
    for m in found {
        // one sum read by two norms: the first one fuses, the other reads the kernel's sum
        if !taken.insert(m.add) {
            continue;
        }
        let norm = g.node(m.norm).clone();
        let eps = g.attr_float(m.norm, "epsilon").unwrap_or(1e-5);
        let beta = norm.input.get(2).cloned().unwrap_or_default();
        let mut inputs = vec![m.input, m.skip, norm.input[1].clone(), beta];
        inputs.extend(m.bias);
        if inputs.last().is_some_and(String::is_empty) {
            inputs.pop();
        }
        let mut outputs = vec![norm.output[0].clone()];
        if m.sum_used {
            outputs.extend([String::new(), String::new(), m.sum]);
        }
        g.remove(m.add);
        g.replace(
            m.norm,
            contrib_node(
                "SkipLayerNormalization",
                format!("{}/SkipLayerNormalization", scope(&norm)),
                inputs,
                outputs,
                // SkipLayerNormalization's own default ε is 1e-12: always written
                vec![attr_float("epsilon", eps)],
            ),
        );
        report.fused("SkipLayerNormalization");
    }
}

fn find(
    g: &Graph<'_>,
    norm: usize,
    ranks: &mut HashMap<String, Option<usize>>,
) -> Result<Option<Match>, &'static str> {
    let n = g.node(norm);
    if !(2..=3).contains(&n.input.len()) || n.output.iter().skip(1).any(|o| !o.is_empty()) {
        return Ok(None);
    }
    let sum = n.input[0].clone();
    let Some(add) = g.producer_op(&sum, "Add") else {
        return Ok(None);
    };
    let ins = &g.node(add).input;
    let (p, q) = (ins[0].clone(), ins[1].clone());
    let constant = |x: &str| g.const_dims(x).is_some() || g.values(x).is_some();
    if p == q || constant(&p) || constant(&q) {
        return Ok(None);
    }
    // which operand is the residual: the other one's branch starts at a norm of it
    let (branch, skip) = if g.branch_starts_at_norm(&p, &q) {
        (p, q)
    } else if g.branch_starts_at_norm(&q, &p) {
        (q, p)
    } else {
        return Ok(None);
    };
    let axis = g.attr_int(norm, "axis").unwrap_or(-1);
    if g.attr_int(norm, "stash_type").is_some_and(|s| s != 1) {
        return Err("the norm's stash_type is not float");
    }
    if rank(g, &skip, MAX_RANK_DEPTH, ranks) != Some(3) {
        return Err("the residual is not known to be 3-D");
    }
    if axis != -1 && axis != 2 {
        return Err("the norm is not over the last axis");
    }
    let (input, bias) = peel(g, &branch, add);
    let sum_used = g.is_graph_output(&sum) || g.consumers(&sum).len() > 1;
    Ok(Some(Match {
        norm,
        add,
        input,
        skip,
        bias,
        sum,
        sum_used,
    }))
}

/// The branch's end without what the kernel does itself: `/ 1` (diffusers'
/// `rescale_output_factor` as the legacy exporter keeps it) and `+ b` after a `MatMul` whose
/// weight's width is `b`'s length. Each peeled node must be read only by the next.
fn peel(g: &Graph<'_>, branch: &str, add: usize) -> (String, Option<String>) {
    let mut x = branch.to_string();
    let mut reader = add;
    if let Some(d) = g.producer_op(&x, "Div")
        && g.only_consumer(&x) == Some(reader)
        && g.scalar(&g.node(d).input[1]) == Some(1.0)
    {
        x = g.node(d).input[0].clone();
        reader = d;
    }
    let Some(b) = g
        .producer_op(&x, "Add")
        .filter(|_| g.only_consumer(&x) == Some(reader))
    else {
        return (x, None);
    };
    let ins = &g.node(b).input;
    for (mm, bias) in [(&ins[0], &ins[1]), (&ins[1], &ins[0])] {
        let Some(m) = g.producer_op(mm, "MatMul") else {
            continue;
        };
        let width = g
            .const_dims(&g.node(m).input[1])
            .and_then(|d| d.last().copied());
        let len = g.const_dims(bias).filter(|d| d.len() == 1).map(|d| d[0]);
        if width.is_some() && width == len {
            return (mm.clone(), Some(bias.clone()));
        }
    }
    (x, None)
}

/// The rank of `x` where the graph tells it without shape inference: graph inputs, constants,
/// `Reshape` to a shape of known length, `Transpose`, `Gather`, and ops whose output has their
/// first input's rank (elementwise ops take the largest of their operands').
fn rank(
    g: &Graph<'_>,
    x: &str,
    depth: usize,
    memo: &mut HashMap<String, Option<usize>>,
) -> Option<usize> {
    if let Some(&r) = memo.get(x) {
        return r;
    }
    let r = rank_of(g, x, depth, memo);
    memo.insert(x.to_string(), r);
    r
}

fn rank_of(
    g: &Graph<'_>,
    x: &str,
    depth: usize,
    memo: &mut HashMap<String, Option<usize>>,
) -> Option<usize> {
    if let Some(d) = g.const_dims(x) {
        return Some(d.len());
    }
    let Some(p) = g.producer(x) else {
        return input_rank(g, x);
    };
    let depth = depth.checked_sub(1)?;
    let n = g.node(p);
    let first = n.input.first()?;
    let contrib = n.domain.as_deref() == Some(super::MS_DOMAIN);
    match n.op_type.as_deref()? {
        "SkipLayerNormalization" | "MultiHeadAttention" | "BiasAdd" if contrib => {
            rank(g, first, depth, memo)
        }
        _ if contrib => None,
        "Reshape" => shape_len(g, n.input.get(1)?, depth, memo),
        "Shape" => Some(1),
        "Transpose" => g.attr_ints(p, "perm").map(<[i64]>::len),
        "Gather" => {
            let data = rank(g, first, depth, memo)?;
            let idx = rank(g, n.input.get(1)?, depth, memo)?;
            (data + idx).checked_sub(1)
        }
        "Squeeze" | "Unsqueeze" => {
            let axes = match g.axes(p) {
                Some(a) => a.len(),
                // every 1 squeezed: a one-element 1-D piece becomes a scalar
                None if n.op_type.as_deref() == Some("Squeeze")
                    && n.input.len() == 1
                    && piece_len(g, first, depth, memo) == Some(1) =>
                {
                    1
                }
                None => return None,
            };
            let r = rank(g, first, depth, memo)?;
            if n.op_type.as_deref() == Some("Squeeze") {
                r.checked_sub(axes)
            } else {
                Some(r + axes)
            }
        }
        "Add" | "Sub" | "Mul" | "Div" | "MatMul" => {
            let a = rank(g, first, depth, memo)?;
            let b = rank(g, n.input.get(1)?, depth, memo)?;
            Some(a.max(b))
        }
        "LayerNormalization" | "Softmax" | "Cast" | "Identity" | "Sigmoid" | "Erf" | "Gelu"
        | "Relu" | "Tanh" | "Sqrt" | "Slice" | "Where"
            if n.output[0] == x =>
        {
            rank(g, first, depth, memo)
        }
        _ => None,
    }
}

/// The rank a graph input or initializer declares.
fn input_rank(g: &Graph<'_>, x: &str) -> Option<usize> {
    use crate::onnx::proto::type_proto::Value;
    let v = g.g.input.iter().find(|v| v.name.as_deref() == Some(x))?;
    match v.r#type.as_ref()?.value.as_ref()? {
        Value::TensorType(t) => t.shape.as_ref().map(|s| s.dim.len()),
        _ => None,
    }
}

/// The number of elements of a `Reshape`'s shape input: a constant, or a `Concat` of 1-D pieces
/// of known length, as exporters build dynamic shapes: constants, scalars made 1-D (`Unsqueeze`,
/// or `Reshape` to `[1]`), and `Shape` slices with both ends given.
fn shape_len(
    g: &Graph<'_>,
    shape: &str,
    depth: usize,
    memo: &mut HashMap<String, Option<usize>>,
) -> Option<usize> {
    if let Some(v) = g.values(shape) {
        return Some(v.len());
    }
    let c = g.producer_op(shape, "Concat")?;
    let mut len = 0;
    for piece in &g.node(c).input {
        len += piece_len(g, piece, depth, memo)?;
    }
    Some(len)
}

fn piece_len(
    g: &Graph<'_>,
    piece: &str,
    depth: usize,
    memo: &mut HashMap<String, Option<usize>>,
) -> Option<usize> {
    if let Some(v) = g.values(piece) {
        return Some(v.len());
    }
    let p = g.producer(piece)?;
    let n = g.node(p);
    match g.op(p)? {
        "Unsqueeze" => {
            (g.axes(p)?.len() == 1 && rank(g, &n.input[0], depth, memo) == Some(0)).then_some(1)
        }
        "Reshape" => match g.values(&n.input[1])?.as_slice() {
            [k] if *k >= 1.0 => Some(*k as usize),
            [k] if *k == -1.0 && rank(g, &n.input[0], depth, memo) == Some(0) => Some(1),
            _ => None,
        },
        "Shape" => {
            let start = g.attr_int(p, "start").unwrap_or(0);
            let end = g.attr_int(p, "end")?;
            (0 <= start && start < end).then(|| (end - start) as usize)
        }
        _ => None,
    }
}
