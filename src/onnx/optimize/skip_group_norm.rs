//! Add + GroupNorm → `com.microsoft.SkipGroupNorm` (CUDA only), on graphs whose group norms
//! [`super::group_norm`] already fused.
//!
//! Two sums feed diffusers' group norms (onnxruntime/python/tools/transformers/
//! fusion_skip_group_norm.py fuses both, using symbolic shape inference to tell them apart; we tell
//! them apart by what produces the operands):
//!
//! - the time embedding: `ResnetBlock2D` adds `time_emb_proj(temb)[:, :, None, None]` before
//!   `norm2`, exported as `Add(h, Unsqueeze(Gemm(…), [2, 3]))`: the skip is the `Gemm`'s `[N, C]`
//!   output, which the kernel broadcasts over H and W;
//! - residuals: `(input + h) / output_scale_factor` (the legacy exporter keeps the `/ 1`) and the
//!   transformer's `proj_out(h) + residual`, read by the next block's norm: both operands are full
//!   activations (made by convolutions), transposed to NHWC like the norm's input; when the sum
//!   is read elsewhere too, the kernel's second output gives it back (transposed to NCHW).
//!
//! The kernel (contrib_ops/cuda/diffusion/group_norm.cc) takes a skip of shape (N, H, W, C),
//! (N, 1, 1, C) or (N, C); sums of anything else are left as they are.

use super::Report;
use super::graph::{Graph, attr_ints, contrib_node, onnx_node, scope};

/// How deep [`full`] looks through elementwise ops for the convolution behind an operand.
const MAX_DEPTH: usize = 6;

enum SkipKind {
    /// Both operands are full activations: (input, skip), each transposed to NHWC.
    Full(String, String),
    /// A full activation and a `[N, C]` tensor broadcast over H and W.
    Broadcast(String, String),
}

struct Match {
    /// The `com.microsoft.GroupNorm` node.
    norm: usize,
    kind: SkipKind,
    /// The node writing the sum the norm reads (the Add, or the `/ 1` after it), and that sum.
    sum_node: usize,
    sum: String,
    /// The sum is also read by other nodes (or is a graph output).
    sum_used: bool,
}

pub(super) fn fuse(g: &mut Graph<'_>, report: &mut Report) {
    let mut found = Vec::new();
    for i in 0..g.len() {
        let n = g.node(i);
        if n.domain.as_deref() != Some(super::MS_DOMAIN)
            || n.op_type.as_deref() != Some("GroupNorm")
        {
            continue;
        }
        match find(g, i) {
            Ok(Some(m)) => found.push(m),
            Ok(None) => {}
            Err(why) => report.left_alone(g.node(i), "skip group norm", why),
        }
    }
    let mut taken = std::collections::HashSet::new();
    for m in found {
        // one sum read by two norms: the first one fuses, the other stays a GroupNorm
        if !taken.insert(m.sum_node) {
            continue;
        }
        let at = scope(g.node(m.norm));
        let nhwc = |g: &mut Graph<'_>, x: String, what: &str| {
            let out = g.fresh_name(&format!("{at}/SkipGroupNorm.{what}_nhwc"));
            g.push(onnx_node(
                "Transpose",
                format!("{at}/SkipGroupNorm.{what}_to_nhwc"),
                vec![x],
                vec![out.clone()],
                vec![attr_ints("perm", &[0, 2, 3, 1])],
            ));
            out
        };
        let (x, skip) = match m.kind {
            SkipKind::Full(a, b) => (nhwc(g, a, "input"), nhwc(g, b, "skip")),
            SkipKind::Broadcast(a, t) => (nhwc(g, a, "input"), t),
        };
        let norm = g.node(m.norm).clone();
        let mut outputs = vec![norm.output[0].clone()];
        if m.sum_used {
            // the sum, NHWC from the kernel, back to NCHW under its old name
            let sum_nhwc = g.fresh_name(&format!("{at}/SkipGroupNorm.sum_nhwc"));
            outputs.push(sum_nhwc.clone());
            g.replace(
                m.sum_node,
                onnx_node(
                    "Transpose",
                    format!("{at}/SkipGroupNorm.sum_to_nchw"),
                    vec![sum_nhwc],
                    vec![m.sum],
                    vec![attr_ints("perm", &[0, 3, 1, 2])],
                ),
            );
        }
        let inputs = vec![x, norm.input[1].clone(), norm.input[2].clone(), skip];
        g.replace(
            m.norm,
            contrib_node(
                "SkipGroupNorm",
                format!("{at}/SkipGroupNorm"),
                inputs,
                outputs,
                norm.attribute.clone(),
            ),
        );
        // the old transpose of the sum is read by nobody now; `finish` drops it (and the Add)
        report.refused("GroupNorm", "SkipGroupNorm");
    }
}

fn find(g: &Graph<'_>, norm: usize) -> Result<Option<Match>, &'static str> {
    let n = g.node(norm);
    if n.input.len() != 3 || n.output.len() != 1 {
        return Ok(None);
    }
    let Some(to_nhwc) = g
        .producer_op(&n.input[0], "Transpose")
        .filter(|&t| g.attr_ints(t, "perm") == Some(&[0, 2, 3, 1]))
        .filter(|_| g.only_consumer(&n.input[0]) == Some(norm))
    else {
        return Ok(None);
    };
    let sum = g.node(to_nhwc).input[0].clone();
    let Some(sum_node) = g.producer(&sum) else {
        return Ok(None);
    };
    // `(a + b) / 1` (diffusers' output_scale_factor as the legacy exporter keeps it)
    let mut add = sum_node;
    if g.op(sum_node) == Some("Div") {
        let ins = &g.node(sum_node).input;
        if g.scalar(&ins[1]) != Some(1.0) {
            return Ok(None);
        }
        let Some(a) = g.producer_op(&ins[0], "Add") else {
            return Ok(None);
        };
        if g.only_consumer(&ins[0]) != Some(sum_node) {
            return Err("the sum before `/ 1` is read elsewhere too");
        }
        add = a;
    } else if g.op(sum_node) != Some("Add") {
        return Ok(None);
    }
    let ins = &g.node(add).input;
    let (p, q) = (ins[0].clone(), ins[1].clone());
    let kind = match (full(g, &p, MAX_DEPTH), full(g, &q, MAX_DEPTH)) {
        (true, true) => SkipKind::Full(p, q),
        (true, false) => SkipKind::Broadcast(p, embedding(g, &q).ok_or(UNKNOWN)?),
        (false, true) => SkipKind::Broadcast(q, embedding(g, &p).ok_or(UNKNOWN)?),
        (false, false) => return Err(UNKNOWN),
    };
    let sum_used = g.is_graph_output(&sum) || g.consumers(&sum).len() > 1;
    Ok(Some(Match {
        norm,
        kind,
        sum_node,
        sum,
        sum_used,
    }))
}

const UNKNOWN: &str =
    "an operand of the sum is neither a full activation nor a broadcast [N, C] embedding";

/// Whether `x` is a full NCHW activation: a convolution's output, or an elementwise op, resize,
/// channel concat or NHWC→NCHW transpose of full activations (and scalar constants).
fn full(g: &Graph<'_>, x: &str, depth: usize) -> bool {
    let Some(p) = g.producer(x) else {
        return false;
    };
    let n = g.node(p);
    if n.domain.as_deref() == Some(super::MS_DOMAIN) {
        return false;
    }
    let Some(depth) = depth.checked_sub(1) else {
        return false;
    };
    match g.op(p) {
        Some("Conv") => n
            .input
            .get(1)
            .and_then(|w| g.const_dims(w))
            .is_some_and(|d| d.len() == 4),
        Some("Add" | "Sub" | "Mul" | "Div") => {
            let mut any = false;
            for i in &n.input {
                if g.scalar(i).is_some() {
                    continue;
                }
                if !full(g, i, depth) {
                    return false;
                }
                any = true;
            }
            any
        }
        Some("Resize") => full(g, &n.input[0], depth),
        Some("Concat") => {
            g.attr_int(p, "axis") == Some(1) && n.input.iter().all(|i| full(g, i, depth))
        }
        Some("Transpose") => {
            g.attr_ints(p, "perm") == Some(&[0, 3, 1, 2])
                && g.producer(&n.input[0]).is_some_and(|q| {
                    let m = g.node(q);
                    m.domain.as_deref() == Some(super::MS_DOMAIN)
                        && matches!(m.op_type.as_deref(), Some("GroupNorm" | "SkipGroupNorm"))
                })
        }
        _ => false,
    }
}

/// `x = Unsqueeze(t, [2, 3])` (one node or two) with `t` a `Gemm` output (2-D by the op's
/// definition): `t`, the skip the kernel broadcasts.
fn embedding(g: &Graph<'_>, x: &str) -> Option<String> {
    let mut axes = Vec::new();
    let mut v = x.to_string();
    for _ in 0..2 {
        let Some(u) = g.producer_op(&v, "Unsqueeze") else {
            break;
        };
        axes.extend(g.axes(u)?);
        v = g.node(u).input[0].clone();
    }
    axes.sort_unstable();
    (axes == [2, 3] && g.producer_op(&v, "Gemm").is_some()).then_some(v)
}
