//! safetensors reading (memory-mapped, validated up front) and atomic writing.
//!
//! Format: <https://github.com/huggingface/safetensors#format>: an 8-byte little-endian header
//! length `n`, `n` bytes of UTF-8 JSON (`{"name": {"dtype", "shape", "data_offsets": [b, e]}, ...,
//! "__metadata__": {str: str}}`), then the data section; offsets are relative to its start.
//!
//! The header is parsed here rather than through `safetensors::SafeTensors` so that every error
//! names the file and the tensor at fault (a truncated download says which tensor runs past the
//! end). Nothing here panics on input: lengths are checked with checked arithmetic before any
//! slice is taken.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub use ::safetensors::Dtype;

use crate::{Error, Result};

/// Headers larger than this are refused (the reference implementation's limit).
const MAX_HEADER_LEN: u64 = 100_000_000;

/// Where one tensor lives in a [`WeightFile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub range: Range<usize>,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar of shape `[]`).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A safetensors file, memory-mapped, with its header parsed and every tensor's byte range
/// checked against the file length.
///
/// The map is read-only; a file truncated by another process *while mapped* can still raise
/// SIGBUS (a property of mmap, not of this parser).
pub struct WeightFile {
    path: PathBuf,
    data: Backing,
    /// Tensors in data-offset order (the order they are stored in).
    tensors: Vec<(String, TensorInfo)>,
    index: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for WeightFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .field("metadata", &self.metadata)
            .finish()
    }
}

impl WeightFile {
    /// Open and memory-map `path`, parse and validate its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = crate::files::open_regular(path)?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(st_err(
                path,
                format!(
                    "{len} bytes is too short for a safetensors file (needs an 8-byte header length)"
                ),
            ));
        }
        // SAFETY: the map is read-only and private to this struct; we never hand out `&mut`.
        // Concurrent truncation by another process is the one hazard mmap cannot rule out.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_backing(path.to_path_buf(), Backing::Mmap(mmap))
    }

    /// Parse an in-memory safetensors image; `name` is used in error messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::from_backing(name.into(), Backing::Owned(bytes))
    }

    fn from_backing(path: PathBuf, data: Backing) -> Result<Self> {
        let (tensors, metadata) = parse_header(&path, data.bytes())?;
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        Ok(Self {
            path,
            data,
            tensors,
            index,
            metadata,
        })
    }

    /// The bytes after the header (the tensor data region), what A1111's "addnet" hash covers.
    pub fn data_region(&self) -> &[u8] {
        let bytes = self.data.bytes();
        let n = bytes
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_le_bytes);
        // parse_header checked that 8 + n lies within the file
        let start = usize::try_from(n).map_or(bytes.len(), |n| (8 + n).min(bytes.len()));
        &bytes[start..]
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in storage order.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.tensors.iter().map(|(n, _)| n.as_str())
    }

    /// `(name, info)` in storage order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorInfo)> + '_ {
        self.tensors.iter().map(|(n, i)| (n.as_str(), i))
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i].1)
    }

    /// The header's `__metadata__` (string values; non-string JSON values are kept as JSON text).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    fn require(&self, name: &str) -> Result<&TensorInfo> {
        self.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            file: self.path.clone(),
        })
    }

    /// The raw little-endian bytes of a tensor (a view into the map).
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.require(name)?;
        // Ranges were checked against the length at parse time.
        self.data.bytes().get(info.range.clone()).ok_or_else(|| {
            st_err(
                &self.path,
                format!("tensor `{name}`: byte range out of bounds"),
            )
        })
    }

    /// dtype, shape and bytes of a tensor.
    pub fn view(&self, name: &str) -> Result<(Dtype, &[usize], &[u8])> {
        let info = self.require(name)?;
        Ok((info.dtype, &info.shape, self.bytes(name)?))
    }

    /// A tensor converted to f32 (from F32, F16, BF16, F64, or any integer/bool dtype).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (dtype, shape, bytes) = self.view(name)?;
        let data = decode_f32(dtype, bytes).ok_or_else(|| {
            st_err(
                &self.path,
                format!("tensor `{name}`: dtype {dtype:?} cannot be read as f32"),
            )
        })?;
        Ok((shape.to_vec(), data))
    }

    /// A one-element tensor (shape `[]`, `[1]`, `[1, 1]`, ...) as f32: kohya's `.alpha`, which
    /// is stored as any float dtype or as I64 (diffusers' converter).
    pub fn scalar_f32(&self, name: &str) -> Result<f32> {
        let (shape, data) = self.tensor_f32(name)?;
        match data.as_slice() {
            [v] => Ok(*v),
            _ => Err(Error::Shape {
                name: format!("{} in {}", name, self.path.display()),
                expected: vec![],
                got: shape,
            }),
        }
    }
}

fn st_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::SafeTensors {
        file: path.to_path_buf(),
        msg: msg.into(),
    }
}

#[derive(serde::Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

type Parsed = (Vec<(String, TensorInfo)>, BTreeMap<String, String>);

fn parse_header(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let file_len = bytes.len() as u64;
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(st_err(
            path,
            format!(
                "{file_len} bytes is too short for a safetensors file (needs an 8-byte header length)"
            ),
        ));
    };
    let mut buf = [0u8; 8];
    buf.copy_from_slice(len_bytes);
    let n = u64::from_le_bytes(buf);
    if n > MAX_HEADER_LEN {
        return Err(st_err(
            path,
            format!(
                "header length {n} exceeds the {MAX_HEADER_LEN}-byte limit: not a safetensors file?"
            ),
        ));
    }
    if 8 + n > file_len {
        return Err(st_err(
            path,
            format!(
                "header length {n} runs past the end of the file ({file_len} bytes): truncated, or not a safetensors file"
            ),
        ));
    }
    let n = n as usize;
    let header = &bytes[8..8 + n];
    let header = std::str::from_utf8(header)
        .map_err(|e| st_err(path, format!("header is not UTF-8: {e}")))?;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(header)
        .map_err(|e| st_err(path, format!("header is not a valid JSON object: {e}")))?;
    let data_start = 8 + n;
    let data_len = bytes.len() - data_start;

    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(map.len());
    for (name, value) in map {
        if name == "__metadata__" {
            let serde_json::Value::Object(m) = value else {
                return Err(st_err(path, "`__metadata__` is not a JSON object"));
            };
            for (k, v) in m {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                metadata.insert(k, v);
            }
            continue;
        }
        let raw: RawInfo = serde_json::from_value(value)
            .map_err(|e| st_err(path, format!("tensor `{name}`: bad header entry: {e}")))?;
        let dtype: Dtype = serde_json::from_value(serde_json::Value::String(raw.dtype.clone()))
            .map_err(|_| {
                st_err(
                    path,
                    format!("tensor `{name}`: unknown dtype `{}`", raw.dtype),
                )
            })?;
        let mut shape = Vec::with_capacity(raw.shape.len());
        for &d in &raw.shape {
            shape.push(usize::try_from(d).map_err(|_| {
                st_err(path, format!("tensor `{name}`: dimension {d} is too large"))
            })?);
        }
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let nbits = numel.and_then(|n| n.checked_mul(dtype.bitsize()));
        let Some(nbits) = nbits else {
            return Err(st_err(
                path,
                format!("tensor `{name}`: shape {shape:?} overflows"),
            ));
        };
        if nbits % 8 != 0 {
            return Err(st_err(
                path,
                format!("tensor `{name}`: {dtype:?} {shape:?} is not a whole number of bytes"),
            ));
        }
        let nbytes = (nbits / 8) as u64;
        let [b, e] = raw.data_offsets;
        if e < b {
            return Err(st_err(
                path,
                format!("tensor `{name}`: data_offsets [{b}, {e}] end before they start"),
            ));
        }
        if e > data_len as u64 {
            return Err(st_err(
                path,
                format!(
                    "tensor `{name}`: data_offsets [{b}, {e}] point past the end of the data section ({data_len} bytes): the file is truncated or corrupt"
                ),
            ));
        }
        if e - b != nbytes {
            return Err(st_err(
                path,
                format!(
                    "tensor `{name}`: {dtype:?} {shape:?} needs {nbytes} bytes but data_offsets [{b}, {e}] span {}",
                    e - b
                ),
            ));
        }
        let range = (data_start + b as usize)..(data_start + e as usize);
        tensors.push((
            name,
            TensorInfo {
                dtype,
                shape,
                range,
            },
        ));
    }
    tensors.sort_by(|a, b| {
        (a.1.range.start, a.1.range.end, &a.0).cmp(&(b.1.range.start, b.1.range.end, &b.0))
    });
    Ok((tensors, metadata))
}

/// Little-endian bytes of `dtype` → f32. `None` for dtypes without an f32 reading (F8, F4, C64...).
pub fn decode_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    fn conv<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
        bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect()
    }
    if let Some(t) = float_type(dtype) {
        // whole elements only, as the integer conversions below (trailing bytes ignored)
        let whole = bytes.len() - bytes.len() % t.size();
        return crate::dtype::decode(t, &bytes[..whole]).ok();
    }
    Some(match dtype {
        Dtype::I64 => conv::<8>(bytes, |b| i64::from_le_bytes(b) as f32),
        Dtype::I32 => conv::<4>(bytes, |b| i32::from_le_bytes(b) as f32),
        Dtype::I16 => conv::<2>(bytes, |b| i16::from_le_bytes(b) as f32),
        Dtype::I8 => conv::<1>(bytes, |b| i8::from_le_bytes(b) as f32),
        Dtype::U64 => conv::<8>(bytes, |b| u64::from_le_bytes(b) as f32),
        Dtype::U32 => conv::<4>(bytes, |b| u32::from_le_bytes(b) as f32),
        Dtype::U16 => conv::<2>(bytes, |b| u16::from_le_bytes(b) as f32),
        Dtype::U8 => conv::<1>(bytes, |b| b[0] as f32),
        Dtype::BOOL => conv::<1>(bytes, |b| if b[0] != 0 { 1.0 } else { 0.0 }),
        _ => return None,
    })
}

/// f32 → little-endian bytes of `dtype` (F32, F16, BF16, F64; round to nearest even, as torch's
/// `.to(dtype)`). `None` for other dtypes.
pub fn encode_f32(dtype: Dtype, data: &[f32]) -> Option<Vec<u8>> {
    float_type(dtype).map(|t| crate::dtype::encode(t, data))
}

/// The float element type of a safetensors dtype (F32, F16, BF16, F64).
pub fn float_type(dtype: Dtype) -> Option<crate::dtype::Float> {
    use crate::dtype::Float;
    match dtype {
        Dtype::F32 => Some(Float::F32),
        Dtype::F16 => Some(Float::F16),
        Dtype::BF16 => Some(Float::BF16),
        Dtype::F64 => Some(Float::F64),
        _ => None,
    }
}

/// One tensor to write: dtype, shape and little-endian bytes (borrowed from a map or owned).
#[derive(Debug, Clone)]
pub struct TensorData<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl TensorData<'static> {
    /// An f32 tensor stored as `dtype` (F32, F16, BF16 or F64).
    pub fn from_f32(dtype: Dtype, shape: Vec<usize>, data: &[f32]) -> Result<Self> {
        check_numel(&shape, data.len())?;
        let bytes = encode_f32(dtype, data)
            .ok_or_else(|| Error::InvalidArgument(format!("cannot store f32 data as {dtype:?}")))?;
        Ok(Self {
            dtype,
            shape,
            data: Cow::Owned(bytes),
        })
    }

    /// An I64 tensor (kohya `.alpha` as diffusers' converter writes it: shape `[]`).
    pub fn from_i64(shape: Vec<usize>, data: &[i64]) -> Result<Self> {
        check_numel(&shape, data.len())?;
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(Self {
            dtype: Dtype::I64,
            shape,
            data: Cow::Owned(bytes),
        })
    }
}

impl<'a> TensorData<'a> {
    /// Borrow a tensor of `file` unchanged (no copy until written).
    pub fn borrowed(file: &'a WeightFile, name: &str) -> Result<Self> {
        let (dtype, shape, bytes) = file.view(name)?;
        Ok(Self {
            dtype,
            shape: shape.to_vec(),
            data: Cow::Borrowed(bytes),
        })
    }
}

fn check_numel(shape: &[usize], len: usize) -> Result<()> {
    let numel: usize = shape.iter().product();
    if numel != len {
        return Err(Error::InvalidArgument(format!(
            "shape {shape:?} holds {numel} elements, data has {len}"
        )));
    }
    Ok(())
}

fn dtype_name(dtype: Dtype) -> Result<String> {
    match serde_json::to_value(dtype) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        _ => Err(Error::InvalidArgument(format!(
            "dtype {dtype:?} has no safetensors name"
        ))),
    }
}

/// Write `tensors` (+ optional `__metadata__`) to `path` atomically: a temporary file in the same
/// folder, fsync'd, then renamed over `path`. Tensors are laid out as the reference writer does
/// (by dtype alignment, largest first, then by name) so every tensor is aligned in the file.
pub fn write_safetensors<'a>(
    path: impl AsRef<Path>,
    tensors: impl IntoIterator<Item = (String, TensorData<'a>)>,
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    write_safetensors_with(path, tensors, metadata, &mut |_| Ok(None))
}

/// [`write_safetensors`], asking `replace(name)` for each tensor just before its data is written:
/// `Some(bytes)` (exactly the tensor's byte length) is written instead of its `data`. A merge
/// computes its replacements one at a time this way instead of holding them all.
pub fn write_safetensors_with<'a>(
    path: impl AsRef<Path>,
    tensors: impl IntoIterator<Item = (String, TensorData<'a>)>,
    metadata: Option<&BTreeMap<String, String>>,
    replace: &mut dyn FnMut(&str) -> Result<Option<Vec<u8>>>,
) -> Result<()> {
    let path = path.as_ref();
    let mut tensors: Vec<(String, TensorData<'a>)> = tensors.into_iter().collect();
    for (name, t) in &tensors {
        let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let nbytes = numel
            .and_then(|n| n.checked_mul(t.dtype.bitsize()))
            .map(|b| b.div_ceil(8));
        if nbytes != Some(t.data.len()) {
            return Err(Error::InvalidArgument(format!(
                "tensor `{name}`: {:?} {:?} does not match its {} data bytes",
                t.dtype,
                t.shape,
                t.data.len()
            )));
        }
    }
    tensors.sort_by(|a, b| {
        b.1.dtype
            .bitsize()
            .cmp(&a.1.dtype.bitsize())
            .then_with(|| a.0.cmp(&b.0))
    });
    for w in tensors.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(Error::InvalidArgument(format!(
                "tensor `{}` given twice",
                w[0].0
            )));
        }
    }

    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        let m: serde_json::Map<String, serde_json::Value> = m
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let mut offset = 0usize;
    for (name, t) in &tensors {
        let end = offset + t.data.len();
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype_name(t.dtype)?, "shape": t.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut header =
        serde_json::to_vec(&header).map_err(|e| Error::InvalidArgument(format!("header: {e}")))?;
    header.resize(header.len().next_multiple_of(8), b' ');

    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".lorafuse-")
        .suffix(".safetensors.tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file());
        let io = |e| Error::io(tmp.path(), e);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for (name, t) in &tensors {
            match replace(name)? {
                Some(b) if b.len() != t.data.len() => {
                    return Err(Error::InvalidArgument(format!(
                        "replacement for tensor `{name}` has {} bytes, not {}",
                        b.len(),
                        t.data.len()
                    )));
                }
                Some(b) => w.write_all(&b).map_err(io)?,
                None => w.write_all(&t.data).map_err(io)?,
            }
        }
        w.flush().map_err(io)?;
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}
