//! The one library error type. Every variant names the file, key or argument at fault;
//! `Error::code()` maps onto plugin-api's stable status codes for the C ABI.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // The source is part of the message (and not `#[source]`) so that the one-line text the C ABI
    // and the CLI print is complete without walking the chain twice.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("cannot find tensor `{name}` in {file}")]
    MissingTensor { name: String, file: PathBuf },
    #[error("shape mismatch for `{name}`: expected {expected:?}, got {got:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{file}: {msg}")]
    SafeTensors { file: PathBuf, msg: String },
    #[error("{file}: invalid ONNX model: {msg}")]
    Onnx { file: PathBuf, msg: String },
    #[error("{file}: {msg}")]
    Lora { file: PathBuf, msg: String },
    #[error("unrecognized LoRA key `{0}` (expected peft, kohya or diffusers layout)")]
    LoraKey(String),
    #[error("{0}")]
    OrtLoad(String),
    #[error(transparent)]
    Ort(#[from] ort::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{file}: {msg}")]
    Config { file: PathBuf, msg: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("cancelled")]
    Cancelled,
    /// A training data set problem (unreadable image, missing caption), naming the file.
    #[error("{file}: {msg}")]
    Dataset { file: PathBuf, msg: String },
    /// An error libtorch reported (training, feature `train`).
    #[cfg(feature = "train")]
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wrap an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }

    /// The stable numeric code the C ABI reports (plugin-api `code`).
    pub fn code(&self) -> u32 {
        use plugin_api::code;
        match self {
            Error::Io { err, .. } if err.kind() == std::io::ErrorKind::NotFound => {
                code::NO_SUCH_FILE
            }
            Error::Io { .. } => code::RUNTIME,
            Error::InvalidArgument(_) | Error::LoraKey(_) => code::INVALID_ARGUMENT,
            Error::MissingTensor { .. }
            | Error::Shape { .. }
            | Error::SafeTensors { .. }
            | Error::Onnx { .. }
            | Error::Lora { .. }
            | Error::Config { .. }
            | Error::Tokenizer(_) => code::MODEL,
            Error::OrtLoad(_) | Error::Ort(_) => code::RUNTIME,
            Error::Cancelled => code::CANCELLED,
            Error::Dataset { .. } => code::INVALID_ARGUMENT,
            #[cfg(feature = "train")]
            Error::Torch(_) => code::RUNTIME,
        }
    }
}
