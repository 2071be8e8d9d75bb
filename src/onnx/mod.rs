//! ONNX model files: the one owner of the ONNX protobuf format in lorafuse.
//!
//! - [`proto`]: the `onnx.proto` messages written by hand for `prost`
//!   (<https://github.com/onnx/onnx/blob/f7546912001bc31e92a238b17068a21b373d882e/onnx/onnx.proto>),
//!   `raw_data` as zero-copy [`bytes::Bytes`].
//! - [`model`]: [`OnnxModel`], an mmap'd, decoded model that knows where every initializer's
//!   bytes live (inline byte range, external file range, typed field), checks external data
//!   locations (<https://github.com/onnx/onnx/blob/f7546912001bc31e92a238b17068a21b373d882e/docs/ExternalData.md>),
//!   and converts float tensors to and from f32 ([`encode_like`] rounds like torch's `.to(dtype)`).
//! - [`index`]: [`WeightIndex`], module path → initializer (name, layout, dtype), following
//!   docs/ARCHITECTURE.md §4's recipe, with a JSON cache form.
//! - [`write`]: [`write_patched`], a patched copy of a model by byte-range patching (no re-encode).
//! - [`graphs`]: weights turned into graph inputs (fast LoRA switch) and the
//!   weight-update kernel graph.
//! - [`Inspection`]: the summary `lorafuse inspect` prints (serde + `Display`).
//!
//! ONNX Runtime sessions are not here: see [`crate::runtime`].

pub mod graphs;
pub mod index;
pub mod model;
pub mod optimize;
pub mod proto;
pub mod write;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

pub use index::{Layout, MappedWeight, Skipped, Via, WeightIndex, canonical_module_path};
pub use model::{OnnxModel, Storage, TensorInfo, decode_f32, encode_like};
pub use proto::tensor_proto::DataType;
pub use write::{WriteReport, write_patched};

use proto::tensor_shape_proto::dimension::Value as DimValue;
use proto::type_proto::Value as TypeValue;

/// One dimension of a graph input or output: a number, a symbolic name, or unknown (`null`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Dim {
    Value(i64),
    Param(String),
    Unknown,
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Value(v) => write!(f, "{v}"),
            Dim::Param(p) => f.write_str(p),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// A graph input or output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ValueSummary {
    pub name: String,
    /// Element type (`"FLOAT16"`), or the kind of a non-tensor type (`"sequence"`, …).
    pub dtype: String,
    /// `None` when the type has no shape (unknown rank).
    pub shape: Option<Vec<Dim>>,
}

/// An imported operator set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Opset {
    /// `""` is the default domain `ai.onnx`.
    pub domain: String,
    pub version: i64,
}

/// Count and bytes of the initializers of one dtype.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DtypeStats {
    pub count: usize,
    pub bytes: u64,
}

/// An external data file the model uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExternalFile {
    pub location: String,
    /// Bytes of the initializers stored there.
    pub bytes: u64,
    pub initializers: usize,
}

/// What `lorafuse inspect` reports about one `.onnx` file.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Inspection {
    pub path: PathBuf,
    pub ir_version: i64,
    pub producer_name: String,
    pub producer_version: String,
    pub opset_imports: Vec<Opset>,
    pub inputs: Vec<ValueSummary>,
    pub outputs: Vec<ValueSummary>,
    pub nodes: usize,
    pub initializers: usize,
    pub initializer_bytes: u64,
    /// Keyed by dtype name (`"FLOAT"`, `"FLOAT16"`, …).
    pub initializers_by_dtype: BTreeMap<String, DtypeStats>,
    pub external_data: Vec<ExternalFile>,
    /// Module paths a LoRA can land on ([`WeightIndex::len`]).
    pub lora_target_modules: usize,
    /// Candidates the index refused ([`WeightIndex::skipped`]).
    pub lora_targets_skipped: usize,
    /// Nodes of ops outside the standard domain, by op: ONNX Runtime's contrib (`com.microsoft`)
    /// ops by name (`MultiHeadAttention`, `GroupNorm`: the fusions a graph has), any other
    /// domain's as `domain:op`.
    pub contrib_ops: BTreeMap<String, usize>,
}

/// [`Inspection::contrib_ops`] of a graph.
pub fn contrib_ops(g: &proto::GraphProto) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for n in &g.node {
        let op = n.op_type.as_deref().unwrap_or_default();
        let key = match n.domain.as_deref().unwrap_or_default() {
            "" | "ai.onnx" => continue,
            optimize::MS_DOMAIN => op.to_string(),
            d => format!("{d}:{op}"),
        };
        *out.entry(key).or_default() += 1;
    }
    out
}

fn value_summary(v: &proto::ValueInfoProto) -> ValueSummary {
    let (dtype, shape) = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(TypeValue::TensorType(t)) => (elem_name(t.elem_type()), t.shape.as_ref()),
        Some(TypeValue::SparseTensorType(t)) => (
            format!("sparse {}", elem_name(t.elem_type())),
            t.shape.as_ref(),
        ),
        Some(TypeValue::SequenceType(_)) => ("sequence".into(), None),
        Some(TypeValue::MapType(_)) => ("map".into(), None),
        Some(TypeValue::OptionalType(_)) => ("optional".into(), None),
        Some(TypeValue::OpaqueType(_)) => ("opaque".into(), None),
        None => ("?".into(), None),
    };
    let shape = shape.map(|s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(DimValue::DimValue(v)) => Dim::Value(*v),
                Some(DimValue::DimParam(p)) => Dim::Param(p.clone()),
                None => Dim::Unknown,
            })
            .collect()
    });
    ValueSummary {
        name: v.name().to_owned(),
        dtype,
        shape,
    }
}

fn elem_name(t: i32) -> String {
    DataType::try_from(t)
        .map(|d| d.name().to_owned())
        .unwrap_or_else(|_| format!("type {t}"))
}

impl Inspection {
    /// Summarise `model`, counting LoRA targets with an already built `index`.
    pub fn new(model: &OnnxModel, index: &WeightIndex) -> Self {
        let p = model.proto();
        let g = model.graph();
        let mut by_dtype: BTreeMap<String, DtypeStats> = BTreeMap::new();
        let mut external: BTreeMap<String, ExternalFile> = BTreeMap::new();
        let mut total = 0;
        for t in model.initializers() {
            let bytes = t.byte_len();
            total += bytes;
            let s = by_dtype.entry(t.dtype.name().to_owned()).or_default();
            s.count += 1;
            s.bytes += bytes;
            if let Storage::External { location, .. } = &t.storage {
                let e = external
                    .entry(location.clone())
                    .or_insert_with(|| ExternalFile {
                        location: location.clone(),
                        bytes: 0,
                        initializers: 0,
                    });
                e.bytes += bytes;
                e.initializers += 1;
            }
        }
        Inspection {
            path: model.path().to_path_buf(),
            ir_version: p.ir_version(),
            producer_name: p.producer_name().to_owned(),
            producer_version: p.producer_version().to_owned(),
            opset_imports: p
                .opset_import
                .iter()
                .map(|o| Opset {
                    domain: o.domain().to_owned(),
                    version: o.version(),
                })
                .collect(),
            inputs: g.input.iter().map(value_summary).collect(),
            outputs: g.output.iter().map(value_summary).collect(),
            nodes: g.node.len(),
            initializers: model.initializers().len(),
            initializer_bytes: total,
            initializers_by_dtype: by_dtype,
            external_data: external.into_values().collect(),
            lora_target_modules: index.len(),
            lora_targets_skipped: index.skipped().len(),
            contrib_ops: contrib_ops(g),
        }
    }
}

/// Summarise `model` (builds its [`WeightIndex`]).
pub fn inspect(model: &OnnxModel) -> Inspection {
    Inspection::new(model, &WeightIndex::build(model))
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opsets: Vec<String> = self
            .opset_imports
            .iter()
            .map(|o| {
                let d = if o.domain.is_empty() {
                    "ai.onnx"
                } else {
                    &o.domain
                };
                format!("{d} {}", o.version)
            })
            .collect();
        writeln!(f, "{}", self.path.display())?;
        writeln!(
            f,
            "  ONNX IR {}, producer {} {}, opsets: {}",
            self.ir_version,
            if self.producer_name.is_empty() {
                "?"
            } else {
                &self.producer_name
            },
            self.producer_version,
            opsets.join(", ")
        )?;
        for (title, vals) in [("inputs", &self.inputs), ("outputs", &self.outputs)] {
            writeln!(f, "  {title}:")?;
            let w = vals.iter().map(|v| v.name.len()).max().unwrap_or(0);
            for v in vals {
                let shape = match &v.shape {
                    Some(s) => format!(
                        "[{}]",
                        s.iter().map(Dim::to_string).collect::<Vec<_>>().join(", ")
                    ),
                    None => "(no shape)".into(),
                };
                writeln!(f, "    {:<w$}  {} {}", v.name, v.dtype, shape)?;
            }
        }
        writeln!(f, "  nodes: {}", self.nodes)?;
        let by: Vec<String> = self
            .initializers_by_dtype
            .iter()
            .map(|(d, s)| format!("{d} {} ({})", s.count, human_bytes(s.bytes)))
            .collect();
        writeln!(
            f,
            "  initializers: {} ({}): {}",
            self.initializers,
            human_bytes(self.initializer_bytes),
            by.join(", ")
        )?;
        if self.external_data.is_empty() {
            writeln!(f, "  external data: none")?;
        } else {
            for e in &self.external_data {
                writeln!(
                    f,
                    "  external data: {} ({} initializers, {})",
                    e.location,
                    e.initializers,
                    human_bytes(e.bytes)
                )?;
            }
        }
        write!(
            f,
            "  LoRA target modules: {} mappable, {} skipped",
            self.lora_target_modules, self.lora_targets_skipped
        )
    }
}
