//! Attention weights packed by ONNX Runtime's transformer optimizer (model type `unet`,
//! onnxruntime/python/tools/transformers/fusion_attention_unet.py), mapped structurally:
//! the fused weights are renamed (`MatMul_QKV_0_weight`), so the module path is read from the
//! attention's output projection, the `…/to_out.0/MatMul` that consumes the fused node's output
//! (possibly through Reshape/Transpose), which keeps its exported name.
//!
//! Patterns (docs/ARCHITECTURE.md §4c), each checked in full or skipped with a reason:
//! - `enable_packed_qkv`: `MatMul(x, W[C, N·3·H]) → Reshape [0, 0, N, 3, H] →
//!   MultiHeadAttention(qkv)` — `to_q`, `to_k`, `to_v` interleaved per head;
//! - `enable_packed_kv`: `MatMul(ctx, W[C_ctx, N·2·H]) → Reshape [0, 0, N, 2, H] →
//!   MultiHeadAttention(q, kv)` — `to_k`, `to_v`; `to_q` stays a MatMul of its own;
//! - packing off: `Attention(x, qkv_weight[C, 3·D])` — `to_q | to_k | to_v` stacked (`heads = 1`).
//!
//! `N` is the node's `num_heads` and must agree with the Reshape's constant shape.

use super::{Builder, Layout, MappedWeight, Skipped, Via, attr, path_from_node_name, scope_path};
use crate::onnx::proto::NodeProto;
use crate::onnx::proto::tensor_proto::DataType;

const QKV: [&str; 3] = ["to_q", "to_k", "to_v"];
const KV: [&str; 2] = ["to_k", "to_v"];

/// A packed weight found behind one fused attention node.
struct Found<'a> {
    init: &'a str,
    names: &'static [&'static str],
    heads: usize,
}

fn is_ms(n: &NodeProto) -> bool {
    n.domain() == "com.microsoft"
}

fn present(n: &NodeProto, i: usize) -> bool {
    n.input.get(i).is_some_and(|s| !s.is_empty())
}

impl<'a> Builder<'a> {
    /// Mappings of every recognised packed attention weight, and what was seen but refused.
    pub(super) fn packed(&self) -> (Vec<MappedWeight>, Vec<Skipped>) {
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if !is_ms(n) || !matches!(n.op_type(), "MultiHeadAttention" | "Attention") {
                continue;
            }
            match self.packed_at(i) {
                Ok(ms) => out.extend(ms),
                Err((initializer, reason)) => skipped.push(Skipped {
                    module: None,
                    initializer,
                    reason: format!("{} `{}`: {reason}", n.op_type(), n.name()),
                }),
            }
        }
        (out, skipped)
    }

    /// The projections packed into the weight behind attention node `i`; empty when its Q, K
    /// and V are separate (those MatMuls are mapped by name).
    fn packed_at(
        &self,
        i: usize,
    ) -> std::result::Result<Vec<MappedWeight>, (Option<String>, String)> {
        let n = &self.nodes[i];
        let heads = attr(n, "num_heads")
            .and_then(|a| a.i)
            .filter(|&h| h > 0)
            .ok_or((None, "no positive num_heads attribute".to_owned()))?
            as usize;
        let found = if n.op_type() == "Attention" {
            self.stacked(n)?
        } else if present(n, 0) && !present(n, 1) && !present(n, 2) {
            self.interleaved(&n.input[0], 3, heads)?
        } else if present(n, 0) && present(n, 1) && !present(n, 2) {
            self.interleaved(&n.input[1], 2, heads)?
        } else {
            return Ok(Vec::new());
        };
        let init = found.init.to_owned();
        let fail = |reason: String| (Some(init.clone()), reason);
        let attn = self
            .attention_path(n)
            .ok_or_else(|| fail("no `…to_out.0` MatMul reads its output".into()))?;
        let t = self
            .model
            .initializer(found.init)
            .ok_or_else(|| fail("not an initializer".into()))?;
        let parts = found.names.len();
        let cols = t.dims.get(1).copied().unwrap_or(0);
        if t.dims.len() != 2 || cols == 0 || cols % (parts * found.heads) != 0 {
            return Err(fail(format!(
                "dims {:?} do not split into {parts} parts × {} heads",
                t.dims, found.heads
            )));
        }
        let head_dim = cols / (parts * found.heads);
        Ok(found
            .names
            .iter()
            .enumerate()
            .map(|(part, name)| MappedWeight {
                module: format!("{attn}.{name}"),
                initializer: init.clone(),
                layout: Layout::Packed {
                    parts,
                    part,
                    heads: found.heads,
                    head_dim,
                },
                torch_shape: vec![found.heads * head_dim, t.dims[0]],
                dtype: t.dtype,
                node: n.name().to_owned(),
                op: n.op_type().to_owned(),
                via: Via::PackedAttention,
            })
            .collect())
    }

    /// `Attention(x, qkv_weight)`: the weight at input 1, read by this node only, in equal
    /// thirds (`qkv_hidden_sizes`, when given, must be equal).
    fn stacked(
        &self,
        n: &'a NodeProto,
    ) -> std::result::Result<Found<'a>, (Option<String>, String)> {
        let w = n
            .input
            .get(1)
            .filter(|s| !s.is_empty())
            .ok_or((None, "no weight input".to_owned()))?;
        let (init, transposes) = self
            .source(w)
            .ok_or((None, format!("weight `{w}` is not an initializer")))?;
        let fail = |reason: String| (Some(init.to_owned()), reason);
        if transposes != 0 {
            return Err(fail("weight passes a Transpose".into()));
        }
        if let Some(a) = attr(n, "qkv_hidden_sizes")
            && !(a.ints.len() == 3 && a.ints.iter().all(|&s| s == a.ints[0]))
        {
            return Err(fail(format!("unequal qkv_hidden_sizes {:?}", a.ints)));
        }
        self.sole_use(init)?;
        Ok(Found {
            init,
            names: &QKV,
            heads: 1,
        })
    }

    /// `MatMul(x, W) → Reshape [0, 0, N, parts, H] → value`: `W` interleaved per head.
    fn interleaved(
        &self,
        value: &str,
        parts: usize,
        heads: usize,
    ) -> std::result::Result<Found<'a>, (Option<String>, String)> {
        let reshape = self.producer_node(value, "Reshape");
        let Some(reshape) = reshape else {
            return Err((
                None,
                format!("packed input `{value}` is not a Reshape's output"),
            ));
        };
        let shape = reshape
            .input
            .get(1)
            .and_then(|s| self.const_ints(s))
            .ok_or((None, "the Reshape's shape is not a constant".to_owned()))?;
        let Some(mm) = reshape
            .input
            .first()
            .and_then(|x| self.producer_node(x, "MatMul"))
        else {
            return Err((None, "the Reshape does not read a MatMul".into()));
        };
        let w = mm.input.get(1).map(String::as_str).unwrap_or_default();
        let (init, transposes) = self.source(w).ok_or((
            None,
            format!("MatMul `{}` has no weight initializer", mm.name()),
        ))?;
        let fail = |reason: String| (Some(init.to_owned()), reason);
        if transposes != 0 {
            return Err(fail("weight passes a Transpose".into()));
        }
        let h = shape.get(4).copied().unwrap_or(0);
        let want = [0, 0, heads as i64, parts as i64, h];
        if shape.len() != 5 || shape != want || h <= 0 {
            return Err(fail(format!(
                "Reshape shape {shape:?}, expected [0, 0, {heads}, {parts}, H]"
            )));
        }
        let t = self
            .model
            .initializer(init)
            .ok_or_else(|| fail("gone".into()))?;
        if t.dims.len() != 2 || t.dims[1] as i64 != heads as i64 * parts as i64 * h {
            return Err(fail(format!(
                "dims {:?} do not match Reshape shape {shape:?}",
                t.dims
            )));
        }
        self.sole_use(init)?;
        Ok(Found {
            init,
            names: if parts == 3 { &QKV } else { &KV },
            heads,
        })
    }

    /// Refuse a weight read by more than one node (patching it would change others).
    fn sole_use(&self, init: &str) -> std::result::Result<(), (Option<String>, String)> {
        match self.uses(init, 2) {
            Ok(u) if u.len() == 1 => Ok(()),
            Ok(u) => Err((
                Some(init.to_owned()),
                format!("{} consumers (shared weight)", u.len()),
            )),
            Err(e) => Err((Some(init.to_owned()), e)),
        }
    }

    fn producer_node(&self, value: &str, op: &str) -> Option<&'a NodeProto> {
        let p = &self.nodes[*self.producer.get(value)?];
        (p.op_type() == op && super::is_onnx_domain(p)).then_some(p)
    }

    /// An int64 constant (initializer or `Constant` node), up to 8 elements.
    fn const_ints(&self, name: &str) -> Option<Vec<i64>> {
        let t = if self.model.initializer(name).is_some() {
            let info = self.model.initializer(name)?;
            if info.dtype != DataType::Int64 || info.numel() > 8 {
                return None;
            }
            let bytes = self.model.initializer_bytes(name).ok()?;
            return ints_le(&bytes, info.numel());
        } else {
            let p = self.producer_node(name, "Constant")?;
            attr(p, "value")?.t.as_ref()?
        };
        if t.data_type != Some(DataType::Int64 as i32) {
            return None;
        }
        let numel: usize = t.dims.iter().map(|&d| d.max(0) as usize).product();
        if numel > 8 {
            return None;
        }
        if t.int64_data.is_empty() {
            ints_le(t.raw_data.as_deref().unwrap_or_default(), numel)
        } else {
            (t.int64_data.len() == numel).then(|| t.int64_data.clone())
        }
    }

    /// The attention module path (`…transformer_blocks.0.attn1`) from the `to_out.0` MatMul
    /// reading node `n`'s output, through at most four Reshape/Transpose nodes.
    fn attention_path(&self, n: &NodeProto) -> Option<String> {
        let mut value = n.output.first()?.as_str();
        for _ in 0..5 {
            let uses = self.consumers.get(value)?;
            let [(next, _)] = uses.as_slice() else {
                return None;
            };
            let c = &self.nodes[*next];
            if !super::is_onnx_domain(c) {
                return None;
            }
            match c.op_type() {
                "MatMul" => {
                    let path = path_from_node_name(c.name(), "MatMul").or_else(|| scope_path(c))?;
                    let path = super::canonical_with_root(self.root.as_deref(), &path);
                    return path.strip_suffix(".to_out.0").map(str::to_owned);
                }
                "Reshape" | "Transpose" => value = c.output.first()?.as_str(),
                _ => return None,
            }
        }
        None
    }
}

fn ints_le(bytes: &[u8], numel: usize) -> Option<Vec<i64>> {
    (bytes.len() == numel * 8).then(|| {
        bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect()
    })
}
