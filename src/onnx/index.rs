//! Module path → initializer index: where a LoRA for `down_blocks.1.attentions.0.…attn2.to_k`
//! lands in an exported graph.
//!
//! Follows docs/ARCHITECTURE.md §4's recipe, which was checked on optimum (legacy exporter) fp32
//! and fp16, torch dynamo, unfolded and external-data exports:
//! 1. an initializer `P.weight` (or `text_model.P.weight`) that feeds the weight input of a
//!    MatMul/Gemm/Conv is P's weight, in torch layout unless its consumer is a MatMul or a Gemm
//!    with `transB = 0` (each Transpose on the way toggles the layout);
//! 2. otherwise a MatMul/Gemm/Conv node whose name, minus the leading `/` and the trailing
//!    `/<Op>` (or `/<Op>_<n>`), with `/` → `.`, equals P — for dynamo exports the element [-2] of
//!    its `pkg.torch.onnx.name_scopes` metadata — has P's weight behind its weight input,
//!    followed back through Identity/Cast/Transpose to an initializer; a MatMul reached without
//!    a Transpose holds the weight as `[in, out]` ([`Layout::Transposed`]);
//! 3. callers check the LoRA's ΔW shape with [`MappedWeight::check_shape`] and refuse mismatches.
//!
//! Attention weights packed by ONNX Runtime's optimizer (one initializer for Q, K and V) are
//! mapped by structure, one [`Layout::Packed`] slice per projection (`packed.rs`, §4c).
//!
//! Dynamo exports of a wrapper module (`self.unet = UNet2DConditionModel(...)`) prefix every
//! path and initializer name with the wrapper's attribute (`unet.down_blocks.0…`): the prefix is
//! read from the `pkg.torch.onnx.class_hierarchy` metadata (the scope of the first `diffusers.` or
//! `transformers.` class) and stripped ([`WeightIndex::root_prefix`]).
//! An optional leading `text_model.` is stripped on both sides (transformers 4.x keeps it in
//! text-encoder paths, 5.x drops it). A weight that reaches more than one consumer (exporters
//! de-duplicate equal tensors behind Identity nodes), or a module path that two different
//! initializers claim, is not mapped and is listed in [`WeightIndex::skipped`] instead: patching
//! it would change another module too, and we never guess.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::model::OnnxModel;
use super::proto::tensor_proto::DataType;
use super::proto::{AttributeProto, NodeProto};
use crate::{Error, Result};

mod packed;

/// How an initializer stores a weight relative to torch's `nn.Linear`/`nn.Conv2d` `.weight`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Same as torch: `[out, in]` or `[out, in, kh, kw]`. Add ΔW as is.
    Torch,
    /// `[in, out]` (a MatMul's right operand). Add ΔWᵀ.
    Transposed,
    /// One projection inside a packed `[in, heads·parts·head_dim]` MatMul weight, as ONNX
    /// Runtime's transformer optimizer packs attention (docs/ARCHITECTURE.md §4c): torch row
    /// `n·head_dim + h` of projection `part` is column `(n·parts + part)·head_dim + h`. With
    /// `heads = 1` the projections are stacked (`Attention`'s `qkv_weight`, Q | K | V). Add ΔWᵀ
    /// into those columns only ([`MappedWeight::unpack`], [`MappedWeight::repack`]).
    Packed {
        parts: usize,
        part: usize,
        heads: usize,
        head_dim: usize,
    },
    /// A convolution weight stored `[out, kh, kw, in]`, as ONNX Runtime's optimizer stores the
    /// weights of the `com.microsoft.NhwcConv` nodes it makes (fusion_nhwc_conv.py,
    /// `update_weight=True`): torch element `[o, i, y, x]` is stored at `[o, y, x, i]`. Merged
    /// unpacked, in torch layout ([`MappedWeight::unpack`], [`MappedWeight::repack`]).
    Nhwc,
}

impl Layout {
    fn toggled(self, times: usize) -> Self {
        match (self, times % 2) {
            (l, 0) => l,
            (Layout::Torch, _) => Layout::Transposed,
            (Layout::Transposed, _) => Layout::Torch,
            (p @ (Layout::Packed { .. } | Layout::Nhwc), _) => p,
        }
    }

    /// The stored column of element `j` (`n·head_dim + h`) of a packed projection.
    pub(crate) fn packed_column(parts: usize, part: usize, head_dim: usize, j: usize) -> usize {
        (j / head_dim * parts + part) * head_dim + j % head_dim
    }
}

/// Which rule of the recipe found the mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// Rule 1: an initializer named `<module>.weight`.
    InitializerName,
    /// Rule 2: the consuming node's name (`/a/b.0/c/MatMul`).
    NodeName,
    /// Rule 2 for dynamo exports: the node's `pkg.torch.onnx.name_scopes` metadata.
    NameScope,
    /// Set by hand ([`WeightIndex::set`], e.g. from a `name_map.json`).
    Override,
    /// A slice of a packed attention weight, found from the structure around a
    /// `com.microsoft.MultiHeadAttention`/`Attention` node ([`Layout::Packed`]).
    PackedAttention,
}

/// Where a module's weight lives in the graph.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappedWeight {
    /// Canonical module path (diffusers/transformers attribute path without `text_model.`).
    pub module: String,
    /// Initializer name in the graph.
    pub initializer: String,
    pub layout: Layout,
    /// The weight's shape in torch layout (`[out, in]`, `[out, in, kh, kw]`).
    pub torch_shape: Vec<usize>,
    /// The initializer's element type (what merged values must be cast back to).
    pub dtype: DataType,
    /// The MatMul/Gemm/Conv node that consumes the weight (empty for overrides).
    #[serde(default)]
    pub node: String,
    /// Its op type.
    #[serde(default)]
    pub op: String,
    pub via: Via,
}

impl MappedWeight {
    /// The initializer's own dims (torch shape, reversed for [`Layout::Transposed`]).
    pub fn stored_shape(&self) -> Vec<usize> {
        match self.layout {
            Layout::Torch => self.torch_shape.clone(),
            Layout::Nhwc => match self.torch_shape[..] {
                [o, i, y, x] => vec![o, y, x, i],
                _ => self.torch_shape.clone(),
            },
            Layout::Transposed => self.torch_shape.iter().rev().copied().collect(),
            Layout::Packed {
                parts,
                heads,
                head_dim,
                ..
            } => vec![
                self.torch_shape.get(1).copied().unwrap_or(0),
                heads * parts * head_dim,
            ],
        }
    }

    /// This weight in torch layout (`[out, in]`, `[out, in, kh, kw]`) from the stored values of
    /// its initializer, whatever the layout (`None` on a size mismatch).
    pub fn to_torch(&self, stored: &[f32]) -> Option<Vec<f32>> {
        match self.layout {
            Layout::Torch => Some(stored.to_vec()),
            Layout::Transposed => {
                let &[out, inner] = self.torch_shape.as_slice() else {
                    return None;
                };
                (out.checked_mul(inner) == Some(stored.len())).then(|| {
                    (0..out * inner)
                        .map(|t| stored[(t % inner) * out + t / inner])
                        .collect()
                })
            }
            Layout::Packed { .. } | Layout::Nhwc => self.unpack(stored),
        }
    }

    /// This weight in torch layout (`[out, in]`, `[out, in, kh, kw]`), read out of the stored
    /// values of its initializer; for [`Layout::Packed`] and [`Layout::Nhwc`] only (`None`
    /// otherwise or on a size mismatch).
    pub fn unpack(&self, stored: &[f32]) -> Option<Vec<f32>> {
        let (numel, positions) = self.positions(stored.len())?;
        let mut w = vec![0f32; numel];
        for (t, s) in positions {
            w[t] = stored[s];
        }
        Some(w)
    }

    /// Write this weight's torch-layout values `torch` back into the stored values (a packed
    /// projection: its columns only); the inverse of [`unpack`](Self::unpack). `false` (nothing
    /// written) on a mismatch.
    pub fn repack(&self, stored: &mut [f32], torch: &[f32]) -> bool {
        let Some((numel, positions)) = self.positions(stored.len()) else {
            return false;
        };
        if torch.len() != numel {
            return false;
        }
        for (t, s) in positions {
            stored[s] = torch[t];
        }
        true
    }

    /// For [`Layout::Packed`] and [`Layout::Nhwc`] weights whose initializer has `len` elements:
    /// the torch-layout element count and (torch index, stored index) of each of those elements.
    fn positions(&self, len: usize) -> Option<(usize, Positions<'_>)> {
        if self.layout == Layout::Nhwc {
            return Some((len, Box::new(self.nhwc_positions(len)?)));
        }
        let (cols, out, inner) = self.packed_dims(len)?;
        let Layout::Packed {
            parts,
            part,
            head_dim,
            ..
        } = self.layout
        else {
            return None;
        };
        let walk = (0..out * inner).map(move |t| {
            let (j, c) = (t / inner, t % inner);
            (
                t,
                c * cols + Layout::packed_column(parts, part, head_dim, j),
            )
        });
        Some((out * inner, Box::new(walk)))
    }

    /// For an [`Layout::Nhwc`] weight `[o, i, y, x]`: the stored position (within a row of
    /// `y·x·i`) of each torch inner index `(i, y, x)`, so a row-wise update `A·B` in torch order
    /// becomes the stored one by moving B's columns. `None` for other layouts.
    pub fn nhwc_inner_order(&self) -> Option<Vec<usize>> {
        let &[o, i, y, x] = self.torch_shape.as_slice() else {
            return None;
        };
        let inner = i.checked_mul(y)?.checked_mul(x)?;
        let n = o.checked_mul(inner)?;
        Some(
            self.nhwc_positions(n)?
                .take(inner)
                .map(|(_, s)| s)
                .collect(),
        )
    }

    /// (torch index, stored index) of every element of an [`Layout::Nhwc`] weight whose
    /// initializer has `len` elements.
    fn nhwc_positions(&self, len: usize) -> Option<impl Iterator<Item = (usize, usize)>> {
        let &[o, i, y, x] = self.torch_shape.as_slice() else {
            return None;
        };
        let n = o.checked_mul(i)?.checked_mul(y)?.checked_mul(x)?;
        (self.layout == Layout::Nhwc && n == len).then(|| {
            (0..n).map(move |t| {
                let (oo, r) = (t / (i * y * x), t % (i * y * x));
                let (ii, r) = (r / (y * x), r % (y * x));
                let (yy, xx) = (r / x, r % x);
                (t, ((oo * y + yy) * x + xx) * i + ii)
            })
        })
    }

    /// (stored columns, out, in) of a packed projection whose initializer has `len` elements.
    fn packed_dims(&self, len: usize) -> Option<(usize, usize, usize)> {
        let Layout::Packed {
            parts,
            part,
            heads,
            head_dim,
        } = self.layout
        else {
            return None;
        };
        let (&out, &inner) = (self.torch_shape.first()?, self.torch_shape.get(1)?);
        let cols = heads.checked_mul(parts)?.checked_mul(head_dim)?;
        let fits = self.torch_shape.len() == 2
            && part < parts
            && heads.checked_mul(head_dim) == Some(out)
            && cols.checked_mul(inner) == Some(len);
        fits.then_some((cols, out, inner))
    }

    /// Refuse a ΔW (or a replacement weight) whose torch-layout shape differs from this weight's.
    /// Trailing size-1 kernel dims are ignored, so a Linear-shaped `[out, in]` ΔW fits a 1×1 conv
    /// `[out, in, 1, 1]` (SD 1.x `proj_in` is a conv, SD 2.x's a Linear) and vice versa.
    pub fn check_shape(&self, torch_shape: &[usize]) -> Result<()> {
        fn squeeze(s: &[usize]) -> &[usize] {
            let mut n = s.len();
            while n > 2 && s[n - 1] == 1 {
                n -= 1;
            }
            &s[..n]
        }
        if squeeze(torch_shape) == squeeze(&self.torch_shape) {
            Ok(())
        } else {
            Err(Error::Shape {
                name: format!("{} (initializer `{}`)", self.module, self.initializer),
                expected: self.torch_shape.clone(),
                got: torch_shape.to_vec(),
            })
        }
    }
}

/// (torch index, stored index) pairs of a weight's elements ([`MappedWeight::unpack`]).
type Positions<'a> = Box<dyn Iterator<Item = (usize, usize)> + 'a>;

/// Something that looked like a LoRA target but was not mapped, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// The module path concerned, where one was derived.
    pub module: Option<String>,
    /// The initializer concerned, where one was found.
    pub initializer: Option<String>,
    pub reason: String,
}

/// Module path → initializer map for one model. Build it with [`WeightIndex::build`], cache it
/// with [`to_json`](WeightIndex::to_json)/[`from_json`](WeightIndex::from_json) and re-check a
/// cached or hand-written one against the model with [`validate`](WeightIndex::validate).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightIndex {
    #[serde(default = "format_tag")]
    format: String,
    #[serde(default = "format_version")]
    version: u32,
    /// Module path of the exported model inside a wrapper module (dynamo exports of
    /// `Wrapper(unet=UNet2DConditionModel)` name everything `unet.…`), stripped from every path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    root_prefix: Option<String>,
    modules: Vec<MappedWeight>,
    #[serde(default)]
    skipped: Vec<Skipped>,
    #[serde(skip)]
    by_module: BTreeMap<String, usize>,
}

const FORMAT_TAG: &str = "lorafuse.onnx.weight_index";
fn format_tag() -> String {
    FORMAT_TAG.to_owned()
}
fn format_version() -> u32 {
    1
}

/// Strip an optional leading `text_model.` (transformers 4.x vs 5.x CLIP paths).
pub fn canonical_module_path(path: &str) -> &str {
    path.strip_prefix("text_model.").unwrap_or(path)
}

fn canonical_with_root<'p>(root: Option<&str>, path: &'p str) -> &'p str {
    let path = match root {
        Some(r) => path
            .strip_prefix(r)
            .and_then(|p| p.strip_prefix('.'))
            .unwrap_or(path),
        None => path,
    };
    canonical_module_path(path)
}

impl WeightIndex {
    /// Derive the map from the model's graph (no file access beyond the decoded model).
    pub fn build(model: &OnnxModel) -> WeightIndex {
        Builder::new(model).run()
    }

    /// The mapping for `module_path` (with or without a leading `text_model.`, or the
    /// [`root_prefix`](Self::root_prefix)).
    pub fn lookup(&self, module_path: &str) -> Option<&MappedWeight> {
        self.by_module
            .get(&self.canonical(module_path))
            .map(|&i| &self.modules[i])
    }

    /// The wrapper module path stripped from every module path (`Some("unet")` for a dynamo
    /// export of a module holding the UNet as `self.unet`), detected from the dynamo exporter's
    /// `pkg.torch.onnx.class_hierarchy` metadata: the scope of the first diffusers or
    /// transformers class.
    pub fn root_prefix(&self) -> Option<&str> {
        self.root_prefix.as_deref()
    }

    fn canonical(&self, path: &str) -> String {
        canonical_with_root(self.root_prefix.as_deref(), path).to_owned()
    }

    /// Every mappable module path, sorted: what LoRA keys (kohya's underscored ones included)
    /// are resolved against.
    pub fn modules(&self) -> impl Iterator<Item = &str> + '_ {
        self.by_module.keys().map(String::as_str)
    }

    /// Every mapping, sorted by module path.
    pub fn iter(&self) -> impl Iterator<Item = &MappedWeight> + '_ {
        self.by_module.values().map(|&i| &self.modules[i])
    }

    pub fn len(&self) -> usize {
        self.by_module.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_module.is_empty()
    }

    /// Candidates that were not mapped, with the reason.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// Map `module` to `initializer` by hand (a `name_map.json` entry), replacing any derived
    /// mapping. The initializer must exist and be 2-D (any layout) or ≥3-D (torch layout).
    pub fn set(
        &mut self,
        model: &OnnxModel,
        module: &str,
        initializer: &str,
        layout: Layout,
    ) -> Result<()> {
        let t = model
            .initializer(initializer)
            .ok_or_else(|| Error::MissingTensor {
                name: initializer.to_owned(),
                file: model.path().to_path_buf(),
            })?;
        if layout == Layout::Transposed && t.dims.len() != 2 {
            return Err(Error::InvalidArgument(format!(
                "`{module}` → `{initializer}`: a transposed layout needs a 2-D initializer, it has dims {:?}",
                t.dims
            )));
        }
        let torch_shape = match layout {
            Layout::Torch => t.dims.clone(),
            Layout::Transposed => t.dims.iter().rev().copied().collect(),
            Layout::Nhwc => match t.dims[..] {
                [o, y, x, i] => vec![o, i, y, x],
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "`{module}` → `{initializer}`: an NHWC layout needs a 4-D initializer, it has dims {:?}",
                        t.dims
                    )));
                }
            },
            Layout::Packed {
                parts,
                part,
                heads,
                head_dim,
            } => {
                let cols = heads
                    .checked_mul(parts)
                    .and_then(|x| x.checked_mul(head_dim));
                if t.dims.len() != 2 || cols != Some(t.dims[1]) || part >= parts {
                    return Err(Error::InvalidArgument(format!(
                        "`{module}` → `{initializer}`: part {part} of {parts} × {heads} heads × {head_dim} does not fit dims {:?}",
                        t.dims
                    )));
                }
                vec![heads * head_dim, t.dims[0]]
            }
        };
        let module = self.canonical(module);
        let m = MappedWeight {
            module: module.clone(),
            initializer: initializer.to_owned(),
            layout,
            torch_shape,
            dtype: t.dtype,
            node: String::new(),
            op: String::new(),
            via: Via::Override,
        };
        match self.by_module.get(&module) {
            Some(&i) => self.modules[i] = m,
            None => {
                self.modules.push(m);
                self.by_module.insert(module, self.modules.len() - 1);
            }
        }
        Ok(())
    }

    /// JSON for a cache file beside the model (pretty-printed, stable order).
    pub fn to_json(&self) -> String {
        let mut sorted = self.clone();
        sorted.modules = self.iter().cloned().collect();
        sorted.reindex();
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(&sorted).unwrap_or_default()
    }

    /// Read JSON written by [`to_json`](Self::to_json) (or by hand). Check it against the model
    /// with [`validate`](Self::validate) before use.
    pub fn from_json(json: &str) -> Result<Self> {
        let mut idx: WeightIndex = serde_json::from_str(json)
            .map_err(|e| Error::InvalidArgument(format!("weight index JSON: {e}")))?;
        if idx.format != FORMAT_TAG || idx.version != 1 {
            return Err(Error::InvalidArgument(format!(
                "weight index JSON: format `{}` version {} (expected `{FORMAT_TAG}` version 1)",
                idx.format, idx.version
            )));
        }
        let root = idx.root_prefix.clone();
        for m in &mut idx.modules {
            m.module = canonical_with_root(root.as_deref(), &m.module).to_owned();
        }
        idx.reindex();
        if idx.by_module.len() != idx.modules.len() {
            return Err(Error::InvalidArgument(
                "weight index JSON: a module path appears twice".into(),
            ));
        }
        Ok(idx)
    }

    /// Check every mapping against `model`: the initializer exists with the recorded dtype and
    /// stored shape, and no initializer serves two modules (distinct parts of one packed weight
    /// excepted).
    pub fn validate(&self, model: &OnnxModel) -> Result<()> {
        let mut seen: HashMap<(&str, Option<usize>), &str> = HashMap::new();
        // an initializer's packing (parts, heads, head_dim), `None` when used whole
        type Packing = Option<(usize, usize, usize)>;
        let mut packing: HashMap<&str, Packing> = HashMap::new();
        for m in self.iter() {
            let t = model
                .initializer(&m.initializer)
                .ok_or_else(|| Error::MissingTensor {
                    name: m.initializer.clone(),
                    file: model.path().to_path_buf(),
                })?;
            if t.dtype != m.dtype {
                return Err(Error::Onnx {
                    file: model.path().to_path_buf(),
                    msg: format!(
                        "`{}` maps to `{}` recorded as {} but stored as {}",
                        m.module,
                        m.initializer,
                        m.dtype.name(),
                        t.dtype.name()
                    ),
                });
            }
            if t.dims != m.stored_shape() {
                return Err(Error::Shape {
                    name: format!("{} (initializer `{}`)", m.module, m.initializer),
                    expected: m.stored_shape(),
                    got: t.dims.clone(),
                });
            }
            let (part, how) = match m.layout {
                Layout::Packed {
                    parts,
                    part,
                    heads,
                    head_dim,
                } => (Some(part), Some((parts, heads, head_dim))),
                _ => (None, None),
            };
            let clash = *packing.entry(&m.initializer).or_insert(how) != how;
            let other = seen.insert((&m.initializer, part), &m.module);
            if let Some(other) = other.or(clash.then_some("another module")) {
                return Err(Error::Onnx {
                    file: model.path().to_path_buf(),
                    msg: format!(
                        "`{}` and `{}` both map to initializer `{}`",
                        other, m.module, m.initializer
                    ),
                });
            }
        }
        Ok(())
    }

    fn reindex(&mut self) {
        self.by_module = self
            .modules
            .iter()
            .enumerate()
            .map(|(i, m)| (m.module.clone(), i))
            .collect();
    }
}

/// A use of a value by a node input that does not pass the weight through.
#[derive(Clone, Copy, Debug)]
struct Use {
    node: usize,
    slot: usize,
    transposes: usize,
}

struct Builder<'a> {
    model: &'a OnnxModel,
    root: Option<String>,
    nodes: &'a [NodeProto],
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<(usize, usize)>>,
    graph_outputs: HashSet<&'a str>,
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name() == name)
}

fn is_onnx_domain(n: &NodeProto) -> bool {
    matches!(n.domain(), "" | "ai.onnx")
}

/// ONNX Runtime's `com.microsoft.NhwcConv` (contrib_defs.cc): a Conv on NHWC tensors whose weight
/// is `[O, kH, kW, I]`.
fn is_nhwc_conv(n: &NodeProto) -> bool {
    n.domain() == "com.microsoft" && n.op_type() == "NhwcConv"
}

/// The module path of an `NhwcConv` that ONNX Runtime's optimizer made from a Conv: it names the
/// node `NhwcConv_<k>-<the Conv's name>` (fusion_nhwc_conv.py), so the exporter's name follows.
fn path_from_nhwc_conv_name(name: &str) -> Option<String> {
    let (head, conv) = name.split_once('-')?;
    let k = head.strip_prefix("NhwcConv")?;
    let numbered = k.is_empty()
        || k.strip_prefix('_')
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    numbered
        .then(|| path_from_node_name(conv, "Conv"))
        .flatten()
}

/// Identity, Cast, and a 2-D Transpose pass a weight through unchanged (up to layout and dtype).
/// Returns `Some(toggles)` for those, `None` otherwise.
fn pass_through(n: &NodeProto, rank: usize) -> Option<usize> {
    if !is_onnx_domain(n) || n.output.is_empty() {
        return None;
    }
    match n.op_type() {
        "Identity" | "Cast" => Some(0),
        "Transpose" if rank == 2 => match attr(n, "perm") {
            None => Some(1),
            Some(a) if a.ints == [1, 0] => Some(1),
            Some(a) if a.ints == [0, 1] => Some(0),
            Some(_) => None,
        },
        _ => None,
    }
}

/// The layout a node expects at input `slot` when that slot is a LoRA-able weight.
fn weight_slot(n: &NodeProto, slot: usize) -> Option<Layout> {
    if is_nhwc_conv(n) && slot == 1 {
        return Some(Layout::Nhwc);
    }
    if !is_onnx_domain(n) || slot != 1 {
        return None;
    }
    match n.op_type() {
        "MatMul" => Some(Layout::Transposed),
        "Gemm" => match attr(n, "transB").and_then(|a| a.i) {
            Some(0) | None => Some(Layout::Transposed),
            Some(_) => Some(Layout::Torch),
        },
        "Conv" => Some(Layout::Torch),
        _ => None,
    }
}

/// `/down_blocks.1/attentions.0/transformer_blocks.0/attn2/to_k/MatMul` → `down_blocks.1.….to_k`.
fn path_from_node_name(name: &str, op: &str) -> Option<String> {
    let rest = name.strip_prefix('/')?;
    let (head, last) = rest.rsplit_once('/')?;
    let numbered = last
        .strip_prefix(op)
        .and_then(|s| s.strip_prefix('_'))
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    if head.is_empty() || !(last == op || numbered) {
        return None;
    }
    Some(head.replace('/', "."))
}

/// Parse a Python `repr` of a list of strings (`['', 'a', 'a.b', 'linear']`), as the dynamo
/// exporter writes into `pkg.torch.onnx.name_scopes`.
fn parse_py_str_list(s: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut it = s.trim().chars().peekable();
    if it.next()? != '[' {
        return None;
    }
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            it.next();
        }
        match it.next()? {
            ']' => return Some(out),
            q @ ('\'' | '"') => {
                let mut cur = String::new();
                loop {
                    match it.next()? {
                        c if c == q => break,
                        '\\' => match it.next()? {
                            'n' => cur.push('\n'),
                            't' => cur.push('\t'),
                            'r' => cur.push('\r'),
                            c => cur.push(c),
                        },
                        c => cur.push(c),
                    }
                }
                out.push(cur);
            }
            _ => return None,
        }
    }
}

fn metadata_list(n: &NodeProto, key: &str) -> Option<Vec<String>> {
    let meta = n.metadata_props.iter().find(|kv| kv.key() == key)?;
    parse_py_str_list(meta.value())
}

/// The scope of the exported diffusers/transformers model inside user wrappers, when every node
/// that carries dynamo metadata agrees on it; `None` when the model is the root.
fn root_prefix(nodes: &[NodeProto]) -> Option<String> {
    let mut found: Option<String> = None;
    for n in nodes {
        let (Some(scopes), Some(classes)) = (
            metadata_list(n, "pkg.torch.onnx.name_scopes"),
            metadata_list(n, "pkg.torch.onnx.class_hierarchy"),
        ) else {
            continue;
        };
        let Some(i) = classes
            .iter()
            .position(|c| c.starts_with("diffusers.") || c.starts_with("transformers."))
        else {
            continue;
        };
        let Some(scope) = scopes.get(i) else { continue };
        match &found {
            None => found = Some(scope.clone()),
            Some(f) if f == scope => {}
            Some(_) => return None, // several models in one graph: strip nothing
        }
    }
    found.filter(|s| !s.is_empty())
}

fn scope_path(n: &NodeProto) -> Option<String> {
    let list = metadata_list(n, "pkg.torch.onnx.name_scopes")?;
    let p = list.len().checked_sub(2).map(|i| list[i].clone())?;
    (!p.is_empty()).then_some(p)
}

impl<'a> Builder<'a> {
    fn new(model: &'a OnnxModel) -> Self {
        let g = model.graph();
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for o in &n.output {
                if !o.is_empty() {
                    producer.insert(o.as_str(), i);
                }
            }
            for (slot, inp) in n.input.iter().enumerate() {
                if !inp.is_empty() {
                    consumers.entry(inp.as_str()).or_default().push((i, slot));
                }
            }
        }
        let graph_outputs = g.output.iter().map(|v| v.name()).collect();
        Builder {
            model,
            root: root_prefix(&g.node),
            nodes: &g.node,
            producer,
            consumers,
            graph_outputs,
        }
    }

    /// Every final use of `value` (a weight of rank `rank`), looking through pass-through nodes.
    /// `Err` when the value (or a pass-through copy) is a graph output.
    fn uses(&self, value: &'a str, rank: usize) -> std::result::Result<Vec<Use>, String> {
        let mut out = Vec::new();
        let mut stack = vec![(value, 0usize)];
        let mut seen = HashSet::new();
        while let Some((v, t)) = stack.pop() {
            if !seen.insert(v) {
                continue;
            }
            if self.graph_outputs.contains(v) {
                return Err(format!("`{v}` is also a graph output"));
            }
            for &(node, slot) in self.consumers.get(v).map(Vec::as_slice).unwrap_or(&[]) {
                let n = &self.nodes[node];
                match pass_through(n, rank) {
                    Some(toggles) if slot == 0 => stack.push((n.output[0].as_str(), t + toggles)),
                    _ => out.push(Use {
                        node,
                        slot,
                        transposes: t,
                    }),
                }
            }
        }
        Ok(out)
    }

    /// Follow `value` back through pass-through nodes to an initializer.
    fn source(&self, mut value: &'a str) -> Option<(&'a str, usize)> {
        let mut transposes = 0;
        for _ in 0..=self.nodes.len() {
            if self.model.initializer(value).is_some() {
                return Some((value, transposes));
            }
            let p = &self.nodes[*self.producer.get(value)?];
            transposes += pass_through(p, 2)?;
            value = p.input.first()?.as_str();
        }
        None
    }

    /// The mapping of initializer `init` used by exactly one weight slot, or why not.
    fn mapping(
        &self,
        module: &str,
        init: &str,
        via: Via,
    ) -> std::result::Result<Option<(MappedWeight, usize)>, String> {
        let Some(t) = self.model.initializer(init) else {
            return Ok(None);
        };
        let uses = self.uses(init, t.dims.len())?;
        let weight_uses: Vec<(Use, Layout)> = uses
            .iter()
            .filter_map(|u| weight_slot(&self.nodes[u.node], u.slot).map(|l| (*u, l)))
            .collect();
        if weight_uses.is_empty() {
            return Ok(None);
        }
        if uses.len() > 1 {
            return Err(format!(
                "initializer `{init}` has {} consumers (shared weight): patching it would change other modules",
                uses.len()
            ));
        }
        let (u, expected) = weight_uses[0];
        let n = &self.nodes[u.node];
        let layout = expected.toggled(u.transposes);
        let rank = t.dims.len();
        let op = n.op_type();
        let ok = match op {
            "Conv" => rank >= 3 && layout == Layout::Torch,
            "NhwcConv" => rank == 4 && layout == Layout::Nhwc,
            _ => rank == 2,
        };
        if !ok {
            return Err(format!(
                "initializer `{init}` (dims {:?}) reaches {op} `{}` with an unexpected rank or layout",
                t.dims,
                n.name()
            ));
        }
        let torch_shape = match (layout, &t.dims[..]) {
            (Layout::Torch, _) => t.dims.clone(),
            (Layout::Nhwc, &[o, y, x, i]) => vec![o, i, y, x],
            // weight_slot gives Torch, Transposed (2-D, checked above) or Nhwc (4-D) only
            _ => vec![t.dims[1], t.dims[0]],
        };
        let m = MappedWeight {
            module: module.to_owned(),
            initializer: init.to_owned(),
            layout,
            torch_shape,
            dtype: t.dtype,
            node: n.name().to_owned(),
            op: op.to_owned(),
            via,
        };
        Ok(Some((m, u.node)))
    }

    fn run(self) -> WeightIndex {
        let mut skipped = Vec::new();
        // module → candidate mappings, per rule; a module decided by rule 1 is not looked at again.
        let mut decided: BTreeMap<String, Vec<MappedWeight>> = BTreeMap::new();
        let mut rule1_tried: HashSet<String> = HashSet::new();

        // Rule 1: `<P>.weight` initializers.
        for t in self.model.initializers() {
            let Some(p) = t.name.strip_suffix(".weight") else {
                continue;
            };
            let module = canonical_with_root(self.root.as_deref(), p);
            if module.is_empty() {
                continue;
            }
            match self.mapping(module, &t.name, Via::InitializerName) {
                Ok(Some((m, _))) => {
                    rule1_tried.insert(module.to_owned());
                    decided.entry(module.to_owned()).or_default().push(m);
                }
                Ok(None) => {}
                Err(reason) => {
                    rule1_tried.insert(module.to_owned());
                    skipped.push(Skipped {
                        module: Some(module.to_owned()),
                        initializer: Some(t.name.clone()),
                        reason,
                    });
                }
            }
        }

        let rule1_inits: HashSet<&str> = decided
            .values()
            .flatten()
            .map(|m| m.initializer.as_str())
            .collect();
        let rule1_inits: HashSet<String> = rule1_inits.into_iter().map(str::to_owned).collect();

        // Rule 2: the consuming node's name or name scope.
        let mut rule2: BTreeMap<String, Vec<MappedWeight>> = BTreeMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let op = n.op_type();
            let named = if is_nhwc_conv(n) {
                path_from_nhwc_conv_name(n.name())
            } else if matches!(op, "MatMul" | "Gemm" | "Conv") && is_onnx_domain(n) {
                path_from_node_name(n.name(), op)
            } else {
                continue;
            };
            let (path, via) = match named {
                Some(p) => (p, Via::NodeName),
                None => match scope_path(n) {
                    Some(p) => (p, Via::NameScope),
                    None => continue,
                },
            };
            let module = canonical_with_root(self.root.as_deref(), &path).to_owned();
            if rule1_tried.contains(&module) {
                continue;
            }
            let Some(w) = n.input.get(1) else { continue };
            let Some((init, _)) = self.source(w) else {
                continue; // an activation, not a weight (e.g. attention's q·kᵀ)
            };
            if rule1_inits.contains(init) {
                continue; // rule 1 placed this initializer by its own name
            }
            match self.mapping(&module, init, via) {
                Ok(Some((m, node))) if node == i => rule2.entry(module).or_default().push(m),
                Ok(_) => {}
                Err(reason) => skipped.push(Skipped {
                    module: Some(module),
                    initializer: Some(init.to_owned()),
                    reason,
                }),
            }
        }
        for (module, cands) in rule2 {
            decided.entry(module).or_default().extend(cands);
        }

        // Slices of attention weights that ONNX Runtime's optimizer packed (packed.rs).
        let (packed, packed_skipped) = self.packed();
        skipped.extend(packed_skipped);
        for m in packed {
            decided.entry(m.module.clone()).or_default().push(m);
        }

        // One initializer per module, one module per initializer.
        let mut modules = Vec::new();
        for (module, mut cands) in decided {
            cands.dedup_by(|a, b| a.initializer == b.initializer);
            if cands.len() == 1 {
                modules.extend(cands);
            } else {
                let names: Vec<&str> = cands.iter().map(|c| c.initializer.as_str()).collect();
                skipped.push(Skipped {
                    module: Some(module),
                    initializer: None,
                    reason: format!("several initializers claim this module: {names:?}"),
                });
            }
        }
        // An initializer has one owner, or only packed owners of distinct parts of one packing.
        let mut owners: HashMap<String, Vec<Layout>> = HashMap::new();
        for m in &modules {
            owners
                .entry(m.initializer.clone())
                .or_default()
                .push(m.layout);
        }
        let sole = |ls: &[Layout]| match ls {
            [_] => true,
            [
                Layout::Packed {
                    parts,
                    heads,
                    head_dim,
                    ..
                },
                ..,
            ] => {
                let mut seen = HashSet::new();
                ls.iter().all(|l| match *l {
                    Layout::Packed {
                        parts: p,
                        part,
                        heads: h,
                        head_dim: d,
                    } => (p, h, d) == (*parts, *heads, *head_dim) && seen.insert(part),
                    _ => false,
                })
            }
            _ => false,
        };
        let (modules, dup): (Vec<_>, Vec<_>) = modules
            .into_iter()
            .partition(|m| sole(&owners[&m.initializer]));
        for m in dup {
            skipped.push(Skipped {
                reason: format!(
                    "initializer `{}` is claimed by several modules",
                    m.initializer
                ),
                module: Some(m.module),
                initializer: Some(m.initializer),
            });
        }
        let mut idx = WeightIndex {
            format: format_tag(),
            version: format_version(),
            root_prefix: self.root.clone(),
            modules,
            skipped,
            by_module: BTreeMap::new(),
        };
        idx.reindex();
        idx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        assert_eq!(
            path_from_node_name(
                "/down_blocks.1/attentions.0/transformer_blocks.0/attn2/to_k/MatMul",
                "MatMul"
            )
            .as_deref(),
            Some("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
        );
        assert_eq!(
            path_from_node_name("/a/b/MatMul_12", "MatMul").as_deref(),
            Some("a.b")
        );
        assert_eq!(path_from_node_name("/a/b/MatMulX", "MatMul"), None);
        assert_eq!(path_from_node_name("/MatMul", "MatMul"), None);
        assert_eq!(path_from_node_name("node_linear_19", "MatMul"), None);
        assert_eq!(
            path_from_node_name("/conv_in/Conv", "Conv").as_deref(),
            Some("conv_in")
        );
    }

    /// Column `(n·parts + part)·head_dim + h` of `[in, N·parts·H]` is row `n·H + h` of the part.
    #[test]
    fn packed_slices_round_trip() {
        let (parts, heads, head_dim, inner) = (3, 2, 2, 3);
        let cols = parts * heads * head_dim;
        let stored: Vec<f32> = (0..inner * cols).map(|i| i as f32).collect();
        let mut rebuilt = vec![-1f32; stored.len()];
        for part in 0..parts {
            let m = MappedWeight {
                module: format!("p{part}"),
                initializer: "w".into(),
                layout: Layout::Packed {
                    parts,
                    part,
                    heads,
                    head_dim,
                },
                torch_shape: vec![heads * head_dim, inner],
                dtype: DataType::Float,
                node: String::new(),
                op: String::new(),
                via: Via::PackedAttention,
            };
            assert_eq!(m.stored_shape(), vec![inner, cols]);
            let w = m.unpack(&stored).expect("fits");
            // row 3 (head 1, h 1), input 2 → column (1·3 + part)·2 + 1
            assert_eq!(w[3 * inner + 2], stored[2 * cols + (3 + part) * 2 + 1]);
            assert!(m.repack(&mut rebuilt, &w));
            assert!(m.unpack(&stored[1..]).is_none());
            assert!(!m.repack(&mut rebuilt, &w[1..]));
        }
        assert_eq!(rebuilt, stored);
    }

    #[test]
    fn py_lists() {
        assert_eq!(
            parse_py_str_list("['', 'network', 'network.0', 'linear']"),
            Some(vec![
                "".into(),
                "network".into(),
                "network.0".into(),
                "linear".into()
            ])
        );
        assert_eq!(
            parse_py_str_list(r#"["it's", 'a\'b']"#),
            Some(vec!["it's".into(), "a'b".into()])
        );
        assert_eq!(parse_py_str_list("[]"), Some(vec![]));
        assert_eq!(parse_py_str_list("['unterminated"), None);
        assert_eq!(parse_py_str_list("x"), None);
    }
}
