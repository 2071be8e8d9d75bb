//! Where base weights come from: a diffusers-layout safetensors file (through
//! [`crate::weights::WeightFile`], memory-mapped), with the key spellings real files use.

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::weights::Dtype;
use crate::weights::WeightFile;
use crate::{Error, Result};

/// A set of named tensors a model is built from.
pub trait WeightSource {
    /// The file (or files) behind it, for error messages.
    fn describe(&self) -> String;
    /// Every key the source holds.
    fn keys(&self) -> Vec<String>;
    /// The tensor the model calls `key` (a CPU tensor in the file's dtype), and the source key
    /// it was read from.
    fn tensor(&self, key: &str) -> Result<(String, Tensor)>;
}

/// The tch kind of a safetensors dtype.
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// A CPU tensor holding a copy of `file[name]`.
pub fn read_tensor(file: &WeightFile, name: &str) -> Result<Tensor> {
    let (dtype, shape, bytes) = file.view(name)?;
    let kind = kind_of(dtype).ok_or_else(|| Error::SafeTensors {
        file: file.path().to_path_buf(),
        msg: format!("tensor `{name}` has dtype {dtype:?}, which libtorch cannot hold"),
    })?;
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Tensor::f_from_data_size(bytes, &shape, kind).map_err(|e| Error::SafeTensors {
        file: file.path().to_path_buf(),
        msg: format!("tensor `{name}`: {e}"),
    })
}

/// One safetensors file. Keys are looked up as the model names them, then with an optional
/// prefix added or removed (CLIP text encoders are saved with or without `text_model.`).
pub struct FileSource {
    file: WeightFile,
    /// Tried second: `alias_prefix + key` when the key lacks it, `key - alias_prefix` when it has it.
    alias_prefix: Option<String>,
}

impl FileSource {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Ok(Self {
            file: WeightFile::open(path)?,
            alias_prefix: None,
        })
    }

    /// Accept keys with or without `prefix` (e.g. `text_model.`).
    pub fn with_alias_prefix(mut self, prefix: &str) -> Self {
        self.alias_prefix = Some(prefix.to_string());
        self
    }

    pub fn file(&self) -> &WeightFile {
        &self.file
    }

    pub fn path(&self) -> PathBuf {
        self.file.path().to_path_buf()
    }
}

impl WeightSource for FileSource {
    fn describe(&self) -> String {
        self.file.path().display().to_string()
    }

    fn keys(&self) -> Vec<String> {
        self.file.names().map(str::to_string).collect()
    }

    fn tensor(&self, key: &str) -> Result<(String, Tensor)> {
        let mut candidates = vec![key.to_string()];
        if let Some(p) = &self.alias_prefix {
            match key.strip_prefix(p.as_str()) {
                Some(rest) => candidates.push(rest.to_string()),
                None => candidates.push(format!("{p}{key}")),
            }
        }
        for c in candidates {
            if self.file.contains(&c) {
                let t = read_tensor(&self.file, &c)?;
                return Ok((c, t));
            }
        }
        Err(Error::MissingTensor {
            name: key.to_string(),
            file: self.file.path().to_path_buf(),
        })
    }
}
