//! GEGLU → `com.microsoft.BiasSplitGelu` (CUDA only: ONNX Runtime has no CPU kernel).
//!
//! diffusers' `GEGLU` (`hidden, gate = proj(x).chunk(2, -1); hidden * gelu(gate)`) exports as
//!
//! ```text
//! a = Add(MatMul(x, W), b[D])
//! left, right = Slice(a, 0, D/2), Slice(a, D/2, D)    (legacy exporter: indices from Shape(a))
//!             | Split(a, axis -1, 2 outputs)           (dynamo exporter)
//! out = Mul(left, 0.5 · right · (1 + Erf(right / √2)))  (the factors in either order)
//! ```
//!
//! and becomes `BiasSplitGelu(MatMul(x, W), b)`, as onnxruntime/python/tools/transformers/
//! fusion_biassplitgelu.py does: one kernel adds the bias, splits and gates
//! (contrib_ops/cuda/diffusion/bias_split_gelu_impl.cu). The `MatMul` and its weight stay as
//! they are, so LoRAs on `ff.net.0.proj` merge and switch as before. The kernel takes 3-D input
//! whose last dimension is 2560, 5120 or 10240 (contrib_ops/cuda/diffusion/bias_split_gelu.cc:
//! SD 1.x/2.x and SDXL feed-forwards); other sizes are left alone and reported.

use super::Report;
use super::graph::{Graph, contrib_node, scope};

/// The hidden sizes ONNX Runtime's CUDA kernel accepts (bias_split_gelu.cc).
const KERNEL_SIZES: [i64; 3] = [2560, 5120, 10240];

struct Match {
    /// `MatMul(x, W)`: the bias Add's other input.
    x: String,
    bias: String,
    /// The gating `Mul` (replaced by the fused node).
    last: usize,
    out: String,
}

/// Fuse every GEGLU of the graph; patterns only partly recognised are reported, not touched.
pub(super) fn fuse(g: &mut Graph<'_>, report: &mut Report) {
    let mut found = Vec::new();
    for i in 0..g.len() {
        let gelu_at = match g.op(i) {
            Some("Erf") => i,
            Some("Gelu")
                if g.attr(i, "approximate")
                    .is_none_or(|a| a.s.as_deref() == Some(b"none")) =>
            {
                i
            }
            _ => continue,
        };
        match find(g, gelu_at) {
            Ok(Some(m)) => found.push((i, m)),
            Ok(None) => {}
            Err(why) => report.left_alone(g.node(i), "bias split gelu", why),
        }
    }
    for (i, m) in found {
        let name = format!("{}/BiasSplitGelu", scope(g.node(i)));
        g.replace(
            m.last,
            contrib_node(
                "BiasSplitGelu",
                name,
                vec![m.x, m.bias],
                vec![m.out],
                Vec::new(),
            ),
        );
        report.fused("BiasSplitGelu");
    }
}

/// `Ok(None)`: not a GEGLU at all (a plain GELU, e.g. CLIP's or a `FeedForward` with "gelu").
fn find(g: &Graph<'_>, at: usize) -> Result<Option<Match>, &'static str> {
    let Some((right, gelu_out)) = gelu(g, at) else {
        return Ok(None);
    };
    // the gate: Mul(left, gelu(right)) reading the GELU's output only
    let Some(last) = g
        .only_consumer(&gelu_out)
        .filter(|&m| g.op(m) == Some("Mul"))
    else {
        return Ok(None);
    };
    let left = g
        .other_input(last, &gelu_out)
        .ok_or("the gating Mul multiplies the GELU by itself")?;
    let Some((a, halves)) = split_halves(g, &left, &right)? else {
        return Ok(None);
    };
    // a = Add(x, b) with b a constant of dims [D]
    let add = g
        .producer_op(&a, "Add")
        .ok_or("the split tensor is not a bias Add")?;
    let ins = &g.node(add).input;
    let (x, bias) = match (g.const_dims(&ins[0]), g.const_dims(&ins[1])) {
        (_, Some(d)) if d.len() == 1 => (&ins[0], &ins[1]),
        (Some(d), _) if d.len() == 1 => (&ins[1], &ins[0]),
        _ => return Err("the bias Add has no constant 1-D bias"),
    };
    let d = g
        .const_dims(bias)
        .and_then(|d| d.first().copied())
        .unwrap_or(0);
    if d != 2 * halves {
        return Err("the bias length is not twice the split size");
    }
    if !KERNEL_SIZES.contains(&d) {
        return Err("hidden size is not 2560, 5120 or 10240 (the CUDA kernel's sizes)");
    }
    if g.is_graph_output(&a) {
        return Err("the biased tensor is also a graph output");
    }
    Ok(Some(Match {
        x: x.clone(),
        bias: bias.clone(),
        last,
        out: g.node(last).output[0].clone(),
    }))
}

/// The GELU at node `at` (an `Erf` of the decomposed form, or a `Gelu` op): (its input, its
/// output). The decomposed form is `0.5 · y · (1 + Erf(y / √2))` with the two outer factors
/// multiplied in either order (torch's legacy and dynamo exporters differ).
fn gelu(g: &Graph<'_>, at: usize) -> Option<(String, String)> {
    if g.op(at) == Some("Gelu") {
        let n = g.node(at);
        return Some((n.input[0].clone(), n.output[0].clone()));
    }
    // y / √2 (or y · 1/√2)
    let scaled = g.producer(&g.node(at).input[0])?;
    let y = match g.op(scaled)? {
        "Div" => near(g, &g.node(scaled).input[1], std::f64::consts::SQRT_2)
            .then(|| g.node(scaled).input[0].clone())?,
        "Mul" => {
            let ins = &g.node(scaled).input;
            let (y, c) = if g.scalar(&ins[1]).is_some() {
                (&ins[0], &ins[1])
            } else {
                (&ins[1], &ins[0])
            };
            near(g, c, std::f64::consts::FRAC_1_SQRT_2).then(|| y.clone())?
        }
        _ => return None,
    };
    // 1 + erf
    let plus = g
        .only_consumer(&g.node(at).output[0])
        .filter(|&a| g.op(a) == Some("Add"))?;
    g.other_input(plus, &g.node(at).output[0])
        .filter(|c| near(g, c, 1.0))?;
    // two Muls by y and 0.5, in either order
    let m1 = g
        .only_consumer(&g.node(plus).output[0])
        .filter(|&m| g.op(m) == Some("Mul"))?;
    let f1 = g.other_input(m1, &g.node(plus).output[0])?;
    let m2 = g
        .only_consumer(&g.node(m1).output[0])
        .filter(|&m| g.op(m) == Some("Mul"))?;
    let f2 = g.other_input(m2, &g.node(m1).output[0])?;
    let ok = (f1 == y && near(g, &f2, 0.5)) || (f2 == y && near(g, &f1, 0.5));
    ok.then(|| (y, g.node(m2).output[0].clone()))
}

/// `left` and `right` as the two halves of one tensor along its last axis: (the tensor, the half
/// size). `Ok(None)` when they are not slices or split outputs at all.
fn split_halves(
    g: &Graph<'_>,
    left: &str,
    right: &str,
) -> Result<Option<(String, i64)>, &'static str> {
    // dynamo: Split(a, axis -1|2, num_outputs 2 | split [h, h]) → (left, right)
    if let (Some(s), Some(s2)) = (g.producer_op(left, "Split"), g.producer_op(right, "Split")) {
        if s != s2 {
            return Err("the two halves come from different Splits");
        }
        let n = g.node(s);
        if n.output.len() != 2 || n.output[0] != left || n.output[1] != right {
            return Err("the Split does not give (left, right) in order");
        }
        if !matches!(g.attr_int(s, "axis"), Some(-1 | 2)) {
            return Err("the Split is not along the last axis");
        }
        let a = n.input[0].clone();
        let d = bias_len(g, &a).ok_or("the split tensor is not a bias Add")?;
        let equal = match n.input.get(1).filter(|x| !x.is_empty()) {
            Some(sizes) => g
                .values(sizes)
                .is_some_and(|v| v.len() == 2 && v[0] == v[1] && v[0] * 2.0 == d as f64),
            None => {
                g.attr_int(s, "num_outputs") == Some(2)
                    || g.attr_ints(s, "split").is_some_and(|v| v == [d / 2, d / 2])
            }
        };
        if !equal || d % 2 != 0 {
            return Err("the Split does not cut the tensor in equal halves");
        }
        return Ok(Some((a, d / 2)));
    }
    // legacy: Slice(a, starts, ends, axes[, steps]) twice, indices computed from Shape(a)
    let (Some(l), Some(r)) = (g.producer_op(left, "Slice"), g.producer_op(right, "Slice")) else {
        return Ok(None);
    };
    let a = g.node(l).input[0].clone();
    if g.node(r).input[0] != a {
        return Err("the two halves slice different tensors");
    }
    let d = bias_len(g, &a).ok_or("the sliced tensor is not a bias Add")?;
    let span = |s: usize| -> Option<(i64, i64)> {
        let ins = &g.node(s).input;
        let axis = g.scalar(ins.get(3).filter(|x| !x.is_empty())?)? as i64;
        if !matches!(axis, -1 | 2) {
            return None;
        }
        if let Some(step) = ins.get(4).filter(|x| !x.is_empty())
            && g.scalar(step)? != 1.0
        {
            return None;
        }
        let start = index(g, &ins[1], &a, d, 8)?;
        let end = index(g, &ins[2], &a, d, 8)?.min(d);
        Some((start, end))
    };
    match (span(l), span(r)) {
        (Some((0, h)), Some((h2, e))) if d % 2 == 0 && h == d / 2 && h2 == h && e == d => {
            Ok(Some((a, h)))
        }
        _ => Err("the two Slices do not cut the last axis in equal halves"),
    }
}

/// The length of the 1-D constant bias that `a = Add(x, b)` adds, if `a` is such an Add.
fn bias_len(g: &Graph<'_>, a: &str) -> Option<i64> {
    let add = g.producer_op(a, "Add")?;
    g.node(add)
        .input
        .iter()
        .filter_map(|x| g.const_dims(x))
        .find(|d| d.len() == 1)
        .map(|d| d[0])
}

/// An integer index expression of the legacy exporter's `chunk`: constants, `Shape(a)[-1]`
/// (the last dimension, `d`), and `+ - * /` of those (ONNX integer division truncates).
fn index(g: &Graph<'_>, name: &str, a: &str, d: i64, depth: usize) -> Option<i64> {
    if let Some(v) = g.scalar(name) {
        return Some(v as i64);
    }
    let depth = depth.checked_sub(1)?;
    let p = g.producer(name)?;
    let ins = &g.node(p).input;
    match g.op(p)? {
        "Gather" => {
            let s = g.producer_op(&ins[0], "Shape")?;
            (g.whole_shape(s)
                && g.node(s).input[0] == a
                && matches!(g.scalar(&ins[1])?, -1.0 | 2.0))
            .then_some(d)
        }
        "Unsqueeze" | "Squeeze" | "Cast" | "Identity" => index(g, &ins[0], a, d, depth),
        op @ ("Add" | "Sub" | "Mul" | "Div") => {
            let x = index(g, &ins[0], a, d, depth)?;
            let y = index(g, &ins[1], a, d, depth)?;
            match op {
                "Add" => x.checked_add(y),
                "Sub" => x.checked_sub(y),
                "Mul" => x.checked_mul(y),
                _ => x.checked_div(y),
            }
        }
        _ => None,
    }
}

/// Whether `name` is a constant scalar within fp16 rounding of `want`.
fn near(g: &Graph<'_>, name: &str, want: f64) -> bool {
    g.scalar(name)
        .is_some_and(|v| (v - want).abs() <= 1e-3 * want.abs().max(1.0))
}
