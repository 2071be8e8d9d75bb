//! Feed-forward bias + residual → `com.microsoft.BiasAdd` (CUDA only: ONNX Runtime has no CPU
//! kernel).
//!
//! diffusers' `BasicTransformerBlock` ends with `hidden = ff(norm3(hidden)) + hidden`, which
//! exports as `Add(Add(MatMul(·, W), b[C]), hidden)`. ONNX Runtime's SD optimizer
//! (onnxruntime/python/tools/transformers/fusion_bias_add.py) turns the two Adds into
//! `BiasAdd(MatMul(·, W), b, hidden)`, one pass over the activations
//! (contrib_ops/cuda/diffusion/bias_add_impl.cu). The kernel takes 3-D input with 320, 640 or
//! 1280 channels and a skip of the *same* shape (contrib_ops/cuda/diffusion/bias_add.cc), so the
//! skip must be the tensor the feed-forward branch was computed from: ORT requires it to come
//! from a SkipLayerNormalization; we require the branch to start at a `LayerNormalization` of it
//! (norm3), which preserves its shape. The `MatMul` (`ff.net.2`, a LoRA target) stays as it is.

use super::Report;
use super::graph::{Graph, contrib_node, scope};

/// The channel counts ONNX Runtime's CUDA kernel accepts (bias_add.cc).
const KERNEL_CHANNELS: [i64; 3] = [320, 640, 1280];

struct Match {
    x: String,
    bias: String,
    skip: String,
    last: usize,
    out: String,
}

/// Fuse every feed-forward bias + residual pair of the graph.
pub(super) fn fuse(g: &mut Graph<'_>, report: &mut Report) {
    let mut found = Vec::new();
    for i in 0..g.len() {
        if g.op(i) != Some("MatMul") {
            continue;
        }
        match find(g, i) {
            Ok(Some(m)) => found.push((i, m)),
            Ok(None) => {}
            Err(why) => report.left_alone(g.node(i), "bias add", why),
        }
    }
    for (i, m) in found {
        let name = format!("{}/BiasAdd", scope(g.node(i)));
        g.replace(
            m.last,
            contrib_node(
                "BiasAdd",
                name,
                vec![m.x, m.bias, m.skip],
                vec![m.out],
                Vec::new(),
            ),
        );
        report.fused("BiasAdd");
    }
}

/// `Ok(None)`: the `MatMul` at `mm` is not followed by a bias and a residual Add at all.
fn find(g: &Graph<'_>, mm: usize) -> Result<Option<Match>, &'static str> {
    let x = g.node(mm).output[0].clone();
    let Some(add) = g.only_consumer(&x).filter(|&a| g.op(a) == Some("Add")) else {
        return Ok(None);
    };
    let Some(bias) = g.other_input(add, &x) else {
        return Ok(None);
    };
    let Some(c) = g.const_dims(&bias).filter(|d| d.len() == 1).map(|d| d[0]) else {
        return Ok(None);
    };
    let biased = g.node(add).output[0].clone();
    let Some(res) = g.only_consumer(&biased).filter(|&r| g.op(r) == Some("Add")) else {
        return Ok(None);
    };
    let Some(skip) = g
        .other_input(res, &biased)
        .filter(|s| g.const_dims(s).is_none())
    else {
        return Ok(None);
    };
    // a sum read by a LayerNormalization (the attention residuals; stacked transformer layers)
    // is left to ONNX Runtime's own SkipLayerNormalization fusion, one kernel for both
    let out = &g.node(res).output[0];
    if g.consumers(out)
        .iter()
        .any(|&c| g.op(c) == Some("LayerNormalization"))
    {
        return Ok(None);
    }
    // the branch must start at LayerNormalization(skip): then skip has the branch's shape
    if !g.branch_starts_at_norm(&g.node(mm).input[0], &skip) {
        return Ok(None);
    }
    let w = g.const_dims(&g.node(mm).input[1]);
    if w.as_deref().and_then(<[i64]>::last) != Some(&c) {
        return Err("the bias length is not the MatMul's output width");
    }
    if !KERNEL_CHANNELS.contains(&c) {
        return Err("channels are not 320, 640 or 1280 (the CUDA kernel's sizes)");
    }
    if g.is_graph_output(&biased) {
        return Err("the biased tensor is also a graph output");
    }
    Ok(Some(Match {
        x,
        bias,
        skip,
        last: res,
        out: g.node(res).output[0].clone(),
    }))
}
