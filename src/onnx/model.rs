//! `OnnxModel`: a decoded `.onnx` file plus where each initializer's bytes live.
//!
//! The file is mmap'd and decoded from a [`Bytes`] over the map, so `raw_data` fields are views
//! into the file and their byte ranges are known (pointer offset from the map's base). External
//! data follows the ONNX external-data convention (`data_location = EXTERNAL`, `external_data`
//! keys `location`/`offset`/`length`, paths relative to the model's folder:
//! <https://github.com/onnx/onnx/blob/f7546912001bc31e92a238b17068a21b373d882e/docs/ExternalData.md>).
//! Locations that are absolute or climb out of the folder, and ranges past the end of the data
//! file, are refused when the model is opened.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use prost::Message;
use serde::{Deserialize, Serialize};

use super::proto::tensor_proto::{DataLocation, DataType};
use super::proto::{GraphProto, ModelProto, TensorProto};
use crate::{Error, Result};

/// Where an initializer's element bytes are stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Storage {
    /// `raw_data` inside the model file: `len` bytes at byte `offset` of the `.onnx` file.
    Inline { offset: u64, len: u64 },
    /// `len` bytes at `offset` in `path` (= the model's folder joined with `location`).
    External {
        location: String,
        path: PathBuf,
        offset: u64,
        len: u64,
    },
    /// A typed repeated field (`float_data`, `int32_data`, ...) instead of `raw_data`.
    Typed { field: String },
}

/// An initializer of the main graph: its name, element type, shape and storage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DataType,
    pub dims: Vec<usize>,
    pub storage: Storage,
    /// Index into `graph.initializer`.
    pub index: usize,
}

impl TensorInfo {
    /// Number of elements (the product of `dims`; checked for overflow when the model was opened).
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Length of the element bytes in `raw_data` layout (little-endian, packed).
    pub fn byte_len(&self) -> u64 {
        self.dtype.raw_len(self.numel() as u64).unwrap_or(0)
    }
}

/// A decoded ONNX model file (memory-mapped; initializer data is not copied).
pub struct OnnxModel {
    path: PathBuf,
    dir: PathBuf,
    file: Bytes,
    proto: ModelProto,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("path", &self.path)
            .field("bytes", &self.file.len())
            .field("initializers", &self.tensors.len())
            .finish()
    }
}

pub(crate) fn onnx_err(file: &Path, msg: impl Into<String>) -> Error {
    Error::Onnx {
        file: file.to_path_buf(),
        msg: msg.into(),
    }
}

impl OnnxModel {
    /// Memory-map and decode `path`; resolve and check every initializer's storage.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = crate::files::open_regular(path)?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            return Err(onnx_err(path, "the file is empty"));
        }
        // SAFETY: the map is read-only. Another process truncating or rewriting the file while it
        // is mapped is outside what this library can guard against (as with every mmap reader);
        // our own writer never modifies an input file (it writes a temp file and renames).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, Bytes::from_owner(map))
    }

    /// Decode a model held in memory. `path` names it in errors, and its parent folder is where
    /// external data locations are resolved.
    pub fn from_bytes(path: impl Into<PathBuf>, file: Bytes) -> Result<Self> {
        let path = path.into();
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let proto = ModelProto::decode(file.clone()).map_err(|e| {
            onnx_err(
                &path,
                format!("cannot decode the ModelProto (truncated or not an ONNX file?): {e}"),
            )
        })?;
        let Some(graph) = proto.graph.as_ref() else {
            return Err(onnx_err(
                &path,
                "the model has no graph (truncated or not an ONNX file?)",
            ));
        };
        if proto.ir_version.is_none() {
            return Err(onnx_err(
                &path,
                "the model has no ir_version (not an ONNX file?)",
            ));
        }
        let mut tensors = Vec::with_capacity(graph.initializer.len());
        let mut by_name = HashMap::with_capacity(graph.initializer.len());
        let mut data_sizes: HashMap<String, u64> = HashMap::new();
        let mut trust = None;
        for (index, t) in graph.initializer.iter().enumerate() {
            let info = tensor_info(&path, &dir, &file, t, index, &mut data_sizes, &mut trust)?;
            if by_name.insert(info.name.clone(), index).is_some() {
                return Err(onnx_err(
                    &path,
                    format!("initializer `{}` appears twice", info.name),
                ));
            }
            tensors.push(info);
        }
        Ok(Self {
            path,
            dir,
            file,
            proto,
            tensors,
            by_name,
        })
    }

    /// The `.onnx` file this model was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder external data locations are relative to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The whole model file (a view of the mmap).
    pub fn file_bytes(&self) -> &Bytes {
        &self.file
    }

    /// The decoded message (initializer `raw_data` fields are views of [`file_bytes`](Self::file_bytes)).
    pub fn proto(&self) -> &ModelProto {
        &self.proto
    }

    /// The main graph (present: `open` refuses models without one).
    pub fn graph(&self) -> &GraphProto {
        static EMPTY: std::sync::OnceLock<GraphProto> = std::sync::OnceLock::new();
        self.proto
            .graph
            .as_ref()
            .unwrap_or_else(|| EMPTY.get_or_init(GraphProto::default))
    }

    /// Every initializer of the main graph, in file order.
    pub fn initializers(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The initializer called `name`.
    pub fn initializer(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The external data files the initializers use (locations as written in the model, sorted).
    pub fn external_locations(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self
            .tensors
            .iter()
            .filter_map(|t| match &t.storage {
                Storage::External { location, .. } => Some(location.as_str()),
                _ => None,
            })
            .collect();
        set.into_iter().map(str::to_owned).collect()
    }

    /// Initializer `name`, or an error naming it and this model's file.
    pub fn require(&self, name: &str) -> Result<&TensorInfo> {
        self.initializer(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_owned(),
            file: self.path.clone(),
        })
    }

    /// The element bytes of initializer `name` in `raw_data` layout (little-endian): borrowed
    /// from the map when inline, read from the data file when external, converted from the typed
    /// field otherwise.
    pub fn initializer_bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let info = self.require(name)?;
        match &info.storage {
            Storage::Inline { offset, len } => {
                let (o, l) = (*offset as usize, *len as usize);
                Ok(Cow::Borrowed(&self.file[o..o + l]))
            }
            Storage::External {
                path, offset, len, ..
            } => {
                let mut f = crate::files::open_regular(path)?;
                f.seek(SeekFrom::Start(*offset))
                    .map_err(|e| Error::io(path, e))?;
                let mut buf = vec![0u8; *len as usize];
                f.read_exact(&mut buf).map_err(|e| {
                    onnx_err(
                        &self.path,
                        format!(
                            "initializer `{name}`: reading {} bytes at {offset} of {}: {e}",
                            len,
                            path.display()
                        ),
                    )
                })?;
                Ok(Cow::Owned(buf))
            }
            Storage::Typed { .. } => {
                let t = &self.graph().initializer[info.index];
                typed_to_raw(&self.path, info, t).map(Cow::Owned)
            }
        }
    }

    /// Initializer `name` as f32 (from FLOAT, FLOAT16, BFLOAT16 or DOUBLE), with its dims.
    pub fn initializer_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.require(name)?;
        let bytes = self.initializer_bytes(name)?;
        let v = decode_f32(info.dtype, &bytes)
            .map_err(|m| onnx_err(&self.path, format!("initializer `{name}`: {m}")))?;
        Ok((info.dims.clone(), v))
    }
}

/// The float element type of an ONNX data type (FLOAT, FLOAT16, BFLOAT16, DOUBLE).
pub fn float_type(dtype: DataType) -> Option<crate::dtype::Float> {
    use crate::dtype::Float;
    match dtype {
        DataType::Float => Some(Float::F32),
        DataType::Float16 => Some(Float::F16),
        DataType::Bfloat16 => Some(Float::BF16),
        DataType::Double => Some(Float::F64),
        _ => None,
    }
}

/// Element bytes (`raw_data` layout) of a float tensor → f32 ([`crate::dtype::decode`]).
pub fn decode_f32(dtype: DataType, bytes: &[u8]) -> std::result::Result<Vec<f32>, String> {
    let t = float_type(dtype).ok_or_else(|| {
        format!(
            "{} is not a float type this library converts (FLOAT, FLOAT16, BFLOAT16, DOUBLE)",
            dtype.name()
        )
    })?;
    crate::dtype::decode(t, bytes)
}

/// f32 values → element bytes of `dtype` (`raw_data` layout), rounding to nearest, ties to even,
/// as torch's `.to(dtype)` does. Supports FLOAT, FLOAT16, BFLOAT16 and DOUBLE.
pub fn encode_like(dtype: DataType, values: &[f32]) -> Result<Vec<u8>> {
    match float_type(dtype) {
        Some(t) => Ok(crate::dtype::encode(t, values)),
        None => Err(Error::InvalidArgument(format!(
            "cannot encode f32 values as {} (supported: FLOAT, FLOAT16, BFLOAT16, DOUBLE)",
            dtype.name()
        ))),
    }
}

/// Which typed field holds a tensor of `dtype` when `raw_data` is absent (onnx.proto's comments
/// on each field), and how many entries `numel` elements take there.
fn typed_field(dtype: DataType, numel: u64) -> Option<(&'static str, u64)> {
    use DataType::*;
    Some(match dtype {
        Float => ("float_data", numel),
        Complex64 => ("float_data", numel * 2),
        Int32 | Int16 | Int8 | Uint16 | Uint8 | Bool | Float16 | Bfloat16 | Float8e4m3fn
        | Float8e4m3fnuz | Float8e5m2 | Float8e5m2fnuz | Float8e8m0 => ("int32_data", numel),
        Uint4 | Int4 | Float4e2m1 => ("int32_data", numel.div_ceil(2)),
        Uint2 | Int2 => ("int32_data", numel.div_ceil(4)),
        Int64 => ("int64_data", numel),
        Double => ("double_data", numel),
        Complex128 => ("double_data", numel * 2),
        Uint32 | Uint64 => ("uint64_data", numel),
        String => ("string_data", numel),
        Undefined => return None,
    })
}

fn typed_len(t: &TensorProto, field: &str) -> u64 {
    (match field {
        "float_data" => t.float_data.len(),
        "int32_data" => t.int32_data.len(),
        "int64_data" => t.int64_data.len(),
        "double_data" => t.double_data.len(),
        "uint64_data" => t.uint64_data.len(),
        "string_data" => t.string_data.len(),
        _ => 0,
    }) as u64
}

fn typed_to_raw(model: &Path, info: &TensorInfo, t: &TensorProto) -> Result<Vec<u8>> {
    use DataType::*;
    let n = info.numel();
    let mut out = Vec::with_capacity(info.byte_len() as usize);
    match info.dtype {
        Float | Complex64 => t
            .float_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Double | Complex128 => t
            .double_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Int64 => t
            .int64_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Int32 => t
            .int32_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        // 16-bit types keep their bit pattern in the low 16 bits of each int32.
        Int16 | Uint16 | Float16 | Bfloat16 => t
            .int32_data
            .iter()
            .for_each(|v| out.extend_from_slice(&(*v as u16).to_le_bytes())),
        Int8 | Uint8 | Bool | Float8e4m3fn | Float8e4m3fnuz | Float8e5m2 | Float8e5m2fnuz
        | Float8e8m0 => t.int32_data.iter().for_each(|v| out.push(*v as u8)),
        Uint32 => t
            .uint64_data
            .iter()
            .for_each(|v| out.extend_from_slice(&(*v as u32).to_le_bytes())),
        Uint64 => t
            .uint64_data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        other => {
            return Err(onnx_err(
                model,
                format!(
                    "initializer `{}`: reading {} values from typed fields is not supported",
                    info.name,
                    other.name()
                ),
            ));
        }
    }
    if out.len() as u64 != info.byte_len() {
        return Err(onnx_err(
            model,
            format!(
                "initializer `{}`: typed data has {} bytes, {} elements of {} need {}",
                info.name,
                out.len(),
                n,
                info.dtype.name(),
                info.byte_len()
            ),
        ));
    }
    Ok(out)
}

/// Check a location from `external_data`: relative, no `..`, no root or drive prefix.
fn check_location(location: &str) -> std::result::Result<PathBuf, String> {
    if location.is_empty() {
        return Err("empty external data location".into());
    }
    // Refuse Windows-style absolute paths and separators on every platform, too.
    if location.starts_with('\\') || location.contains(":") || location.contains('\0') {
        return Err(format!(
            "external data location `{location}` is not a plain relative path"
        ));
    }
    let p = Path::new(location);
    if p.is_absolute() {
        return Err(format!("external data location `{location}` is absolute"));
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => {
                if s.to_string_lossy().contains('\\') {
                    return Err(format!(
                        "external data location `{location}` contains a backslash"
                    ));
                }
                out.push(s)
            }
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!(
                    "external data location `{location}` climbs out of the model folder (`..`)"
                ));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("external data location `{location}` is absolute"));
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(format!("external data location `{location}` names no file"));
    }
    Ok(out)
}

/// Where an external initializer's bytes are: its location checked (inside the model's folder,
/// a regular file, links contained), its length matching dims × dtype, its range inside the file.
#[allow(clippy::too_many_arguments)]
fn external_storage(
    t: &TensorProto,
    dir: &Path,
    dtype: DataType,
    numel: u64,
    expected: Option<u64>,
    data_sizes: &mut HashMap<String, u64>,
    trust: &mut Option<PathBuf>,
    bad: &dyn Fn(String) -> Error,
) -> Result<Storage> {
    let mut location = None;
    let mut offset = 0u64;
    let mut length = None;
    for kv in &t.external_data {
        match kv.key() {
            "location" => location = Some(kv.value().to_owned()),
            "offset" => {
                offset = kv.value().trim().parse().map_err(|_| {
                    bad(format!(
                        "external data offset `{}` is not a number",
                        kv.value()
                    ))
                })?
            }
            "length" => {
                length = Some(kv.value().trim().parse::<u64>().map_err(|_| {
                    bad(format!(
                        "external data length `{}` is not a number",
                        kv.value()
                    ))
                })?)
            }
            _ => {}
        }
    }
    let location = location.ok_or_else(|| bad("external data without a `location`".into()))?;
    let rel = check_location(&location).map_err(bad)?;
    let expected = expected.ok_or_else(|| {
        bad(format!(
            "{} tensors cannot be stored externally",
            dtype.name()
        ))
    })?;
    let len = match length {
        Some(l) if l != expected => {
            return Err(bad(format!(
                "external data length {l} but {numel} elements of {} take {expected} bytes",
                dtype.name()
            )));
        }
        _ => expected,
    };
    let data_path = dir.join(&rel);
    let size = match data_sizes.get(&location) {
        Some(s) => *s,
        None => {
            let md = std::fs::metadata(&data_path)
                .map_err(|e| bad(format!("external data file {}: {e}", data_path.display())))?;
            // A data file that is a link must stay inside the model's folder (or its hub
            // cache repository): ONNX Runtime refuses such models, and a merge must not copy
            // whatever the link points at into its output.
            let root = match trust {
                Some(r) => r.clone(),
                None => trust.insert(crate::files::trust_root(dir)?).clone(),
            };
            crate::files::contained(&root, &data_path)
                .map_err(|e| bad(format!("external data: {e}")))?;
            if !md.is_file() {
                return Err(bad(format!(
                    "external data {} is not a regular file",
                    data_path.display()
                )));
            }
            data_sizes.insert(location.clone(), md.len());
            md.len()
        }
    };
    let end = offset
        .checked_add(len)
        .ok_or_else(|| bad("external data range overflows".into()))?;
    if end > size {
        return Err(bad(format!(
            "external data range {offset}..{end} is past the end of {} ({size} bytes)",
            data_path.display()
        )));
    }
    Ok(Storage::External {
        location,
        path: data_path,
        offset,
        len,
    })
}

fn tensor_info(
    path: &Path,
    dir: &Path,
    file: &Bytes,
    t: &TensorProto,
    index: usize,
    data_sizes: &mut HashMap<String, u64>,
    trust: &mut Option<PathBuf>,
) -> Result<TensorInfo> {
    let name = t.name().to_owned();
    let bad = |msg: String| onnx_err(path, format!("initializer `{name}`: {msg}"));
    let dtype = DataType::try_from(t.data_type())
        .map_err(|_| bad(format!("unknown data_type {}", t.data_type())))?;
    if dtype == DataType::Undefined {
        return Err(bad("data_type is UNDEFINED".into()));
    }
    let mut dims = Vec::with_capacity(t.dims.len());
    let mut numel: u64 = 1;
    for &d in &t.dims {
        let d = u64::try_from(d).map_err(|_| bad(format!("negative dimension in {:?}", t.dims)))?;
        numel = numel
            .checked_mul(d)
            .filter(|n| *n <= isize::MAX as u64)
            .ok_or_else(|| bad(format!("dims {:?} overflow", t.dims)))?;
        dims.push(d as usize);
    }
    let expected = dtype.raw_len(numel);
    let storage = if t.data_location() == DataLocation::External {
        external_storage(t, dir, dtype, numel, expected, data_sizes, trust, &bad)?
    } else if let Some(raw) = &t.raw_data {
        let expected =
            expected.ok_or_else(|| bad(format!("{} tensors cannot use raw_data", dtype.name())))?;
        if raw.len() as u64 != expected {
            return Err(bad(format!(
                "raw_data has {} bytes, {numel} elements of {} take {expected}",
                raw.len(),
                dtype.name()
            )));
        }
        let base = file.as_ptr() as usize;
        let at = raw.as_ptr() as usize;
        let offset = if raw.is_empty() {
            0
        } else if at >= base && at + raw.len() <= base + file.len() {
            (at - base) as u64
        } else {
            return Err(bad(
                "raw_data does not lie inside the model file (decoder copied it)".into(),
            ));
        };
        Storage::Inline {
            offset,
            len: raw.len() as u64,
        }
    } else {
        let (field, want) = typed_field(dtype, numel).ok_or_else(|| bad("no data".into()))?;
        let have = typed_len(t, field);
        if have != want {
            return Err(bad(format!(
                "{field} has {have} values, {numel} elements of {} need {want}",
                dtype.name()
            )));
        }
        Storage::Typed {
            field: field.to_owned(),
        }
    };
    Ok(TensorInfo {
        name,
        dtype,
        dims,
        storage,
        index,
    })
}
