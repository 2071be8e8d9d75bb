//! Graph rewrites into ONNX Runtime's fused contrib ops (`lorafuse optimize`, and the same rewrite
//! in memory when a pipeline is opened with `optimize`).
//!
//! The fusions follow what ONNX Runtime's own Stable Diffusion optimizer emits
//! (onnxruntime/python/tools/transformers/onnx_model_unet.py and the `fusion_*.py` files it runs)
//! with one rule of our own: **every LoRA-target weight stays a plain initializer in torch's
//! layout, read by its own `MatMul`/`Conv`**, so `merge`, run-time LoRAs and the fast switch work
//! on optimized graphs exactly as on exported ones (docs/ARCHITECTURE.md §4).
//!
//! - [`attention`]: scaled dot-product attention → `com.microsoft.MultiHeadAttention` with
//!   separate Q, K and V (flash / memory-efficient attention on CUDA; CPU kernel too).
//! - [`group_norm`]: GroupNorm (+ SiLU) → `com.microsoft.GroupNorm` between NHWC transposes
//!   (CUDA only).
//! - [`skip_group_norm`]: the sum in front of a fused GroupNorm → `com.microsoft.SkipGroupNorm`
//!   (CUDA only).
//! - [`bias_split_gelu`]: GEGLU's bias, split and gate → `com.microsoft.BiasSplitGelu` (CUDA only).
//! - [`bias_add`]: the feed-forward's bias + residual → `com.microsoft.BiasAdd` (CUDA only).
//! - [`float16`]: after the fusions, fp32 → fp16 as ONNX Runtime's optimizer converts Stable
//!   Diffusion components (`--float16`; LoRA targets stay plain initializers, now float16).
//!
//! A pattern that is only partly recognised is left as it was and reported (node name and reason)
//! in [`Report::left_alone`]; the rewritten graph computes the same function as the input.

mod attention;
mod bias_add;
mod bias_split_gelu;
pub mod float16;
mod graph;
mod group_norm;
mod skip_group_norm;
mod skip_layer_norm;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use bytes::Bytes;

use serde::Serialize;

use super::OnnxModel;
use super::model::onnx_err;
use super::proto::{ModelProto, NodeProto, OperatorSetIdProto};
use crate::Result;

/// The contrib-op domain of ONNX Runtime.
pub const MS_DOMAIN: &str = "com.microsoft";

/// Which rewrites to run. `Default` is [`OptimizeOptions::for_cuda`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptimizeOptions {
    /// Attention → `MultiHeadAttention` (CPU and CUDA kernels).
    pub attention: bool,
    /// GroupNorm (+ SiLU) → `GroupNorm` (CUDA kernel only).
    pub group_norm: bool,
    /// Add + GroupNorm → `SkipGroupNorm` (with `group_norm`; CUDA kernel only).
    pub skip_group_norm: bool,
    /// GEGLU → `BiasSplitGelu`, feed-forward bias + residual → `BiasAdd` (CUDA kernels only).
    pub bias: bool,
    /// Residual Add + LayerNormalization → `SkipLayerNormalization` (CPU and CUDA kernels).
    pub skip_layer_norm: bool,
    /// Convert float graphs to float16 after the fusions ([`float16`]); off by default (it
    /// changes the numbers, as exporting in fp16 does).
    pub float16: bool,
}

impl OptimizeOptions {
    /// Every fusion ONNX Runtime's CUDA provider has kernels for: attention, GroupNorm,
    /// SkipGroupNorm, BiasSplitGelu, BiasAdd and SkipLayerNormalization, checked against the
    /// export on a GPU (docs/benchmarks.md: SD 1.5 pixels within 2/255 of the exported graph).
    pub fn for_cuda() -> Self {
        Self {
            attention: true,
            group_norm: true,
            skip_group_norm: true,
            bias: true,
            skip_layer_norm: true,
            float16: false,
        }
    }

    /// The fusions ONNX Runtime's CPU provider has kernels for.
    pub fn for_cpu() -> Self {
        Self {
            attention: true,
            group_norm: false,
            skip_group_norm: false,
            bias: false,
            skip_layer_norm: true,
            float16: false,
        }
    }
}

impl Default for OptimizeOptions {
    fn default() -> Self {
        Self::for_cuda()
    }
}

/// A pattern the optimizer saw but did not rewrite.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LeftAlone {
    /// The node the pattern was anchored on.
    pub node: String,
    pub fusion: &'static str,
    pub reason: &'static str,
}

/// What one optimization did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Fused nodes created, by op type.
    pub fused: BTreeMap<String, usize>,
    pub left_alone: Vec<LeftAlone>,
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// What the float16 conversion changed (`None`: not asked for, or nothing was float).
    pub float16: Option<float16::Float16Report>,
}

impl Report {
    fn fused(&mut self, op: &str) {
        *self.fused.entry(op.to_string()).or_default() += 1;
    }

    /// A node fused before became a `to` node (GroupNorm → SkipGroupNorm).
    fn refused(&mut self, from: &str, to: &str) {
        if let Some(n) = self.fused.get_mut(from) {
            *n -= 1;
            if *n == 0 {
                self.fused.remove(from);
            }
        }
        self.fused(to);
    }

    fn left_alone(&mut self, node: &NodeProto, fusion: &'static str, reason: &'static str) {
        self.left_alone.push(LeftAlone {
            node: node.name.clone().unwrap_or_default(),
            fusion,
            reason,
        });
    }

    /// Nothing was rewritten.
    pub fn is_empty(&self) -> bool {
        self.fused.is_empty() && self.float16.is_none()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.fused.is_empty() {
            f.write_str("no fusions")?;
        } else {
            let parts: Vec<String> = self.fused.iter().map(|(k, v)| format!("{v} {k}")).collect();
            f.write_str(&parts.join(", "))?;
        }
        write!(f, " ({} → {} nodes)", self.nodes_before, self.nodes_after)?;
        if let Some(h) = &self.float16 {
            write!(
                f,
                "\n  float16: {} initializers, {} attribute tensors; {} kept float for float-only inputs, {} casts",
                h.initializers, h.attribute_tensors, h.kept_float, h.casts
            )?;
        }
        if !self.left_alone.is_empty() {
            let mut by: BTreeMap<(&str, &str), usize> = BTreeMap::new();
            for l in &self.left_alone {
                *by.entry((l.fusion, l.reason)).or_default() += 1;
            }
            for ((fusion, reason), n) in by {
                write!(f, "\n  left alone: {n} {fusion} pattern(s): {reason}")?;
            }
        }
        Ok(())
    }
}

/// Rewrite `proto`'s main graph in place. `read` gives an initializer's values as f32 (the
/// model's external data is not in the proto).
pub fn optimize_proto(
    proto: &mut ModelProto,
    opts: &OptimizeOptions,
    read: &dyn Fn(&str) -> Option<Vec<f32>>,
) -> Report {
    let mut report = Report::default();
    let Some(g) = proto.graph.as_mut() else {
        return report;
    };
    report.nodes_before = g.node.len();
    let mut graph = graph::Graph::new(g);
    if opts.attention {
        attention::fuse(&mut graph, &mut report);
    }
    if opts.group_norm {
        group_norm::fuse(&mut graph, read, &mut report);
    }
    if opts.bias {
        // GEGLU first: BiasAdd's search for the feed-forward branch walks through it either way
        bias_split_gelu::fuse(&mut graph, &mut report);
        bias_add::fuse(&mut graph, &mut report);
    }
    if opts.skip_layer_norm {
        // after BiasAdd, which leaves the sums norms read to this fusion
        skip_layer_norm::fuse(&mut graph, &mut report);
    }
    graph.finish();
    if opts.group_norm && opts.skip_group_norm {
        // on the finished graph: the sums' readers are then only the nodes that stay
        let Some(g) = proto.graph.as_mut() else {
            return report;
        };
        let mut graph = graph::Graph::new(g);
        skip_group_norm::fuse(&mut graph, &mut report);
        graph.finish();
    }
    report.nodes_after = proto.graph.as_ref().map_or(0, |g| g.node.len());
    if !report.is_empty()
        && !proto
            .opset_import
            .iter()
            .any(|o| o.domain.as_deref() == Some(MS_DOMAIN))
    {
        proto.opset_import.push(OperatorSetIdProto {
            domain: Some(MS_DOMAIN.into()),
            version: Some(1),
        });
    }
    report
}

/// The optimized form of `model`, encoded (external data locations unchanged: they resolve
/// against the same folder), with the report.
pub fn optimize(model: &OnnxModel, opts: &OptimizeOptions) -> Result<(Vec<u8>, Report)> {
    let (proto, report) = optimize_model(model, opts)?;
    Ok((encode(model, &proto)?, report))
}

/// `proto` (a rewritten form of `model`) encoded ([`crate::onnx::write::encode_model`]).
pub fn encode(model: &OnnxModel, proto: &ModelProto) -> Result<Vec<u8>> {
    crate::onnx::write::encode_model(
        model.path(),
        proto,
        "; store its weights as external data first",
    )
}

/// The optimized form of `model` as a proto, with the report. Initializers converted to float16
/// are stored inline; the others keep their storage.
pub fn optimize_model(model: &OnnxModel, opts: &OptimizeOptions) -> Result<(ModelProto, Report)> {
    let mut proto = model.proto().clone();
    let read = |name: &str| model.initializer_f32(name).ok().map(|(_, v)| v);
    let mut report = optimize_proto(&mut proto, opts, &read);
    if opts.float16 {
        let r = float16::convert(&mut proto, &read)
            .map_err(|m| onnx_err(model.path(), format!("float16 conversion: {m}")))?;
        if !r.is_empty() {
            report.float16 = Some(r);
            report.nodes_after = proto.graph.as_ref().map_or(0, |g| g.node.len());
        }
    }
    Ok((proto, report))
}

/// Open the model at `path` and optimize it in memory: the returned model's bytes are the
/// rewritten graph, and its external data still resolves against `path`'s folder.
pub fn open_optimized(path: &Path, opts: &OptimizeOptions) -> Result<(OnnxModel, Report)> {
    let model = OnnxModel::open(path)?;
    let (bytes, report) = optimize(&model, opts)?;
    if report.is_empty() {
        return Ok((model, report));
    }
    Ok((OnnxModel::from_bytes(path, Bytes::from(bytes))?, report))
}

/// Whether a graph holds fused ops that take NHWC tensors (`GroupNorm`, `SkipGroupNorm`,
/// `NhwcConv`): convolutions then run faster in NHWC too (the CUDA provider's `prefer_nhwc`).
pub fn prefers_nhwc(graph: &super::proto::GraphProto) -> bool {
    graph.node.iter().any(|n| {
        n.domain.as_deref() == Some(MS_DOMAIN)
            && matches!(
                n.op_type.as_deref(),
                Some("GroupNorm" | "SkipGroupNorm" | "NhwcConv")
            )
    })
}
