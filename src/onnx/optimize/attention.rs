//! Scaled dot-product attention → `com.microsoft.MultiHeadAttention` with **separate** Q, K and V.
//!
//! The pattern is what torch's exporter writes for diffusers' `Attention` with
//! `AttnProcessor2_0` (`F.scaled_dot_product_attention`, torch/onnx/symbolic_opset14.py):
//!
//! ```text
//! q3 ─Reshape[b,-1,N,h]─Transpose(0,2,1,3)─Mul(√s)──────────────┐
//! k3 ─Reshape[b,-1,N,h]─Transpose(0,2,3,1)─Mul(√s)─────────── MatMul ─Softmax(-1)─┐
//! v3 ─Reshape[b,-1,N,h]─Transpose(0,2,1,3)──────────────────────────────────── MatMul
//!                                          ─Transpose(0,2,1,3)─Reshape[b,-1,N·h]─► out
//! ```
//!
//! with `s = 1/√h` computed from `Shape(q)[-1]` (or a constant), in fp32 or fp16. The whole
//! pattern becomes `MultiHeadAttention(q3, k3, v3, num_heads = N)` writing `out`, which is the
//! contrib op ORT's own SD optimizer emits (onnxruntime/python/tools/transformers/
//! fusion_attention_unet.py, `create_attention_node`), except that we never pack Q/K/V or K/V
//! into one weight: the projections stay plain `MatMul`s on their own initializers, so LoRA
//! merges and the fast switch keep addressing `to_q`/`to_k`/`to_v` (ORT's optimizer comments
//! that separate Q, K and V suit LoRA better). MHA's default scale is 1/√head_size
//! (onnxruntime/core/graph/contrib_ops/bert_defs.cc, MultiHeadAttention `scale`).

use super::Report;
use super::graph::{Graph, attr_float, attr_int, contrib_node, scope};

/// Fuse every attention block of the graph; patterns not recognised are reported, not touched.
pub(super) fn fuse(g: &mut Graph<'_>, report: &mut Report) {
    for i in 0..g.len() {
        if g.op(i) != Some("Softmax") {
            continue;
        }
        match find(g, i) {
            Ok(m) => {
                let node = g.node(i);
                let name = format!("{}/MultiHeadAttention", scope(node));
                let mut attrs = vec![attr_int("num_heads", m.heads)];
                if let Some(s) = m.scale {
                    attrs.push(attr_float("scale", s as f32));
                }
                let mha = contrib_node(
                    "MultiHeadAttention",
                    name,
                    vec![m.q, m.k, m.v],
                    vec![m.out],
                    attrs,
                );
                g.replace(m.last, mha);
                report.fused("MultiHeadAttention");
            }
            Err(why) => report.left_alone(g.node(i), "attention", why),
        }
    }
}

struct Match {
    q: String,
    k: String,
    v: String,
    /// The node whose output is the attention result (replaced by the MHA node).
    last: usize,
    out: String,
    heads: i64,
    /// `None`: MHA's default 1/√head_size.
    scale: Option<f64>,
}

fn find(g: &Graph<'_>, softmax: usize) -> Result<Match, &'static str> {
    let axis = g.attr_int(softmax, "axis").unwrap_or(-1);
    if axis != -1 && axis != 3 {
        return Err("Softmax is not over the last axis");
    }
    let sm_in = &g.node(softmax).input[0];
    let sm_out = &g.node(softmax).output[0];
    let qk = g
        .producer_op(sm_in, "MatMul")
        .ok_or("Softmax input is not a MatMul")?;
    let av = g
        .only_consumer(sm_out)
        .filter(|&c| g.op(c) == Some("MatMul") && g.node(c).input[0] == *sm_out)
        .ok_or("Softmax output does not feed one MatMul with V")?;

    let (tq, sq) = split_scale(g, &g.node(qk).input[0]);
    let (tk, sk) = split_scale(g, &g.node(qk).input[1]);

    // Q: Transpose(0,2,1,3) of the head split.
    let tq_node = g
        .producer_op(&tq, "Transpose")
        .filter(|&t| g.attr_ints(t, "perm") == Some(&[0, 2, 1, 3]))
        .ok_or("Q is not transposed to [b, N, s, h]")?;
    let rq = g.node(tq_node).input[0].clone();
    let (q, nq) = head_split(g, &rq).ok_or("Q is not split into heads by a Reshape")?;

    // K: Transpose(0,2,3,1) of the head split, Transpose(0,1,3,2) of Transpose(0,2,1,3), or
    // (torch's dynamo exporter) the last two dims of Transpose(0,2,1,3) swapped through
    // Reshape[-1, L, h] → Transpose(0,2,1) → Reshape[b, N, h, L].
    let mut head_tensors = vec![tq.clone(), rq.clone()];
    let rk = if let Some(t) = swapped_last_two(g, &tk) {
        let inner = g
            .producer_op(&t, "Transpose")
            .filter(|&n| g.attr_ints(n, "perm") == Some(&[0, 2, 1, 3]))
            .ok_or("K is not transposed to [b, N, s, h]")?;
        head_tensors.push(t.clone());
        g.node(inner).input[0].clone()
    } else {
        let tk_node = g
            .producer_op(&tk, "Transpose")
            .ok_or("K is not transposed")?;
        match g.attr_ints(tk_node, "perm") {
            Some([0, 2, 3, 1]) => g.node(tk_node).input[0].clone(),
            Some([0, 1, 3, 2]) => {
                let inner = &g.node(tk_node).input[0];
                let t = g
                    .producer_op(inner, "Transpose")
                    .filter(|&t| g.attr_ints(t, "perm") == Some(&[0, 2, 1, 3]))
                    .ok_or("K is not transposed to [b, N, h, s]")?;
                head_tensors.push(inner.clone());
                g.node(t).input[0].clone()
            }
            _ => return Err("K is not transposed to [b, N, h, s]"),
        }
    };
    let (k, nk) = head_split(g, &rk).ok_or("K is not split into heads by a Reshape")?;
    head_tensors.push(rk);

    // V: Transpose(0,2,1,3) of the head split.
    let tv = g.node(av).input[1].clone();
    let tv_node = g
        .producer_op(&tv, "Transpose")
        .filter(|&t| g.attr_ints(t, "perm") == Some(&[0, 2, 1, 3]))
        .ok_or("V is not transposed to [b, N, s, h]")?;
    let rv = g.node(tv_node).input[0].clone();
    let (v, nv) = head_split(g, &rv).ok_or("V is not split into heads by a Reshape")?;
    head_tensors.extend([tv, rv]);

    if nq != nk || nq != nv {
        return Err("Q, K and V have different head counts");
    }

    // Output: Transpose(0,2,1,3) then a Reshape back to 3-D.
    let av_out = &g.node(av).output[0];
    let to = g
        .only_consumer(av_out)
        .filter(|&t| g.op(t) == Some("Transpose") && g.attr_ints(t, "perm") == Some(&[0, 2, 1, 3]))
        .ok_or("the attention output is not transposed back to [b, s, N, h]")?;
    let t_out = &g.node(to).output[0];
    let last = g
        .only_consumer(t_out)
        .filter(|&r| g.op(r) == Some("Reshape") && shape_len(g, &g.node(r).input[1]) == Some(3))
        .ok_or("the attention output is not merged back to [b, s, N·h]")?;

    // Scale: √s on both sides (or s on one), either a constant or 1/√h from a head tensor's shape.
    let s = match (sq, sk) {
        (None, None) => Sym::ONE,
        (Some(a), None) | (None, Some(a)) => a,
        (Some(a), Some(b)) => a
            .mul(&b)
            .ok_or("the Q and K scales read different shapes")?,
    };
    let scale = if s.p == 0.0 {
        Some(s.c)
    } else if s.p == -0.5
        && (s.c - 1.0).abs() < 1e-6
        && s.dim.as_ref().is_some_and(|d| head_tensors.contains(d))
    {
        None
    } else {
        return Err("the attention scale is neither constant nor 1/sqrt(head size)");
    };

    Ok(Match {
        q,
        k,
        v,
        last,
        out: g.node(last).output[0].clone(),
        heads: nq,
        scale,
    })
}

/// `x` = Reshape(x3, [b, s, N, h]) with a constant head count N: (x3, N).
fn head_split(g: &Graph<'_>, x: &str) -> Option<(String, i64)> {
    let r = g.producer_op(x, "Reshape")?;
    let shape = &g.node(r).input[1];
    let heads = if let Some(v) = g.values(shape) {
        (v.len() == 4).then(|| v[2])?
    } else {
        let c = g.producer_op(shape, "Concat")?;
        let parts = &g.node(c).input;
        if parts.len() != 4 {
            return None;
        }
        g.scalar(&parts[2])?
    };
    (heads >= 1.0 && heads.fract() == 0.0 && heads <= 65536.0)
        .then(|| (g.node(r).input[0].clone(), heads as i64))
}

/// `x` = the 4-D tensor `t` with its last two dims swapped the way torch's dynamo exporter writes
/// `k.transpose(-2, -1)`: Reshape(Transpose(Reshape(t, [-1, d₋₂, d₋₁]), (0,2,1)),
/// [d₀…d₋₃, d₋₁, d₋₂]) with every dᵢ sliced from Shape(t). Returns t.
fn swapped_last_two(g: &Graph<'_>, x: &str) -> Option<String> {
    let r2 = g.producer_op(x, "Reshape")?;
    let tr = g.producer_op(&g.node(r2).input[0], "Transpose")?;
    if g.attr_ints(tr, "perm") != Some(&[0, 2, 1]) {
        return None;
    }
    let r1 = g.producer_op(&g.node(tr).input[0], "Reshape")?;
    let t = g.node(r1).input[0].clone();
    let pieces = |shape: &str| -> Option<Vec<String>> {
        let c = g.producer_op(shape, "Concat")?;
        Some(g.node(c).input.clone())
    };
    let (p1, p2) = (pieces(&g.node(r1).input[1])?, pieces(&g.node(r2).input[1])?);
    const END: f64 = 1e18; // INT64_MAX / INT64_MIN as the exporter writes "to the end"
    let is = |piece: &str, lo: f64, hi: f64| -> bool {
        shape_slice(g, piece).is_some_and(|(of, s, e)| {
            of == t
                && (if lo <= -END {
                    s <= -END || s == 0.0
                } else {
                    s == lo
                })
                && (if hi >= END { e >= END } else { e == hi })
        })
    };
    let first_ok = p1.len() == 3
        && g.scalar(&p1[0]) == Some(-1.0)
        && is(&p1[1], -2.0, -1.0)
        && is(&p1[2], -1.0, END);
    let second_ok =
        p2.len() == 3 && is(&p2[0], -END, -2.0) && is(&p2[1], -1.0, END) && is(&p2[2], -2.0, -1.0);
    (first_ok && second_ok).then_some(t)
}

/// `x` = Slice(Shape(t), [start], [end]) on axis 0 with step 1: (t, start, end).
fn shape_slice(g: &Graph<'_>, x: &str) -> Option<(String, f64, f64)> {
    let s = g.producer_op(x, "Slice")?;
    let ins = &g.node(s).input;
    let shape = g.producer_op(&ins[0], "Shape")?;
    if g.attr_int(shape, "start").unwrap_or(0) != 0 || g.attr(shape, "end").is_some() {
        return None;
    }
    let start = g.scalar(ins.get(1)?)?;
    let end = g.scalar(ins.get(2)?)?;
    let axes_ok = ins
        .get(3)
        .is_none_or(|a| a.is_empty() || g.values(a) == Some(vec![0.0]));
    let steps_ok = ins
        .get(4)
        .is_none_or(|a| a.is_empty() || g.values(a) == Some(vec![1.0]));
    (axes_ok && steps_ok).then(|| (g.node(shape).input[0].clone(), start, end))
}

/// The length of a shape tensor: a constant's element count or a Concat's input count (each
/// piece one element, as the exporters write them).
fn shape_len(g: &Graph<'_>, shape: &str) -> Option<usize> {
    if let Some(v) = g.values(shape) {
        return Some(v.len());
    }
    let c = g.producer_op(shape, "Concat")?;
    Some(g.node(c).input.len())
}

/// `c · d^p` where `d` is the last dimension of tensor `dim` (`p = 0`: a plain constant).
#[derive(Clone, Debug, PartialEq)]
struct Sym {
    c: f64,
    p: f64,
    dim: Option<String>,
}

impl Sym {
    const ONE: Sym = Sym {
        c: 1.0,
        p: 0.0,
        dim: None,
    };

    fn mul(&self, o: &Sym) -> Option<Sym> {
        let dim = match (&self.dim, &o.dim) {
            (Some(a), Some(b)) if a != b => return None,
            (a, b) => a.clone().or_else(|| b.clone()),
        };
        let p = self.p + o.p;
        Some(Sym {
            c: self.c * o.c,
            p,
            dim: if p == 0.0 { None } else { dim },
        })
    }

    fn recip(&self) -> Option<Sym> {
        (self.c != 0.0).then(|| Sym {
            c: 1.0 / self.c,
            p: -self.p,
            dim: self.dim.clone(),
        })
    }
}

/// `x` = Mul(t, scale) or Div(t, scale) with a recognised scale: (t, scale); else (x, None).
fn split_scale(g: &Graph<'_>, x: &str) -> (String, Option<Sym>) {
    if let Some(m) = g.producer(x) {
        let ins = &g.node(m).input;
        match g.op(m) {
            Some("Mul") if ins.len() == 2 => {
                if let Some(s) = sym(g, &ins[1], 0) {
                    return (ins[0].clone(), Some(s));
                }
                if let Some(s) = sym(g, &ins[0], 0) {
                    return (ins[1].clone(), Some(s));
                }
            }
            Some("Div") if ins.len() == 2 => {
                if let Some(s) = sym(g, &ins[1], 0).and_then(|s| s.recip()) {
                    return (ins[0].clone(), Some(s));
                }
            }
            _ => {}
        }
    }
    (x.to_string(), None)
}

/// Evaluate a scalar expression built from constants and the last dimension of a tensor.
fn sym(g: &Graph<'_>, x: &str, depth: usize) -> Option<Sym> {
    if depth > 12 {
        return None;
    }
    if let Some(c) = g.scalar(x) {
        return c.is_finite().then_some(Sym {
            c,
            p: 0.0,
            dim: None,
        });
    }
    let n = g.producer(x)?;
    let ins = &g.node(n).input;
    let arg = |k: usize| ins.get(k).and_then(|i| sym(g, i, depth + 1));
    match g.op(n)? {
        "Cast" | "Identity" | "Unsqueeze" | "Squeeze" => arg(0),
        "Sqrt" => {
            let a = arg(0)?;
            (a.c >= 0.0).then(|| Sym {
                c: a.c.sqrt(),
                p: a.p / 2.0,
                dim: a.dim,
            })
        }
        "Reciprocal" => arg(0)?.recip(),
        "Mul" => arg(0)?.mul(&arg(1)?),
        "Div" => arg(0)?.mul(&arg(1)?.recip()?),
        "Slice" => {
            // Slice(Shape(t), [-1], [end]): t's last dimension
            let starts = g.values(ins.get(1)?)?;
            let axes_ok = ins.get(3).is_none_or(|a| g.values(a) == Some(vec![0.0]));
            let steps_ok = ins.get(4).is_none_or(|s| g.values(s) == Some(vec![1.0]));
            (starts == [-1.0] && axes_ok && steps_ok)
                .then(|| last_dim_of_shape(g, &ins[0], false))
                .flatten()
        }
        "Gather" => {
            let idx = g.values(ins.get(1)?)?;
            (idx == [-1.0] && g.attr_int(n, "axis").unwrap_or(0) == 0)
                .then(|| last_dim_of_shape(g, &ins[0], false))
                .flatten()
        }
        "Shape" => last_dim_of_shape(g, x, true),
        _ => None,
    }
}

/// `shape` = Shape(t) (with `start = -1` when `sliced_by_attr`): t's last dimension.
fn last_dim_of_shape(g: &Graph<'_>, shape: &str, sliced_by_attr: bool) -> Option<Sym> {
    let s = g.producer_op(shape, "Shape")?;
    let start = g.attr_int(s, "start");
    let end = g.attr_int(s, "end");
    let ok = if sliced_by_attr {
        start == Some(-1) && end.is_none()
    } else {
        start.unwrap_or(0) == 0 && end.is_none()
    };
    ok.then(|| Sym {
        c: 1.0,
        p: 1.0,
        dim: Some(g.node(s).input[0].clone()),
    })
}
