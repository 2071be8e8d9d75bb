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
    /// A broken invariant of lorafuse itself (a bug), never caused by input.
    #[error("internal error (a bug in lorafuse, please report it): {0}")]
    Internal(String),
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
            Error::OrtLoad(_) | Error::Ort(_) | Error::Internal(_) => code::RUNTIME,
            Error::Cancelled => code::CANCELLED,
            Error::Dataset { .. } => code::INVALID_ARGUMENT,
            #[cfg(feature = "train")]
            Error::Torch(_) => code::RUNTIME,
        }
    }
}

/// Who is at fault for an [`Error`]: what a front door tells its user to fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// An argument, a request or the set-up (a flag value, a missing ONNX Runtime, Ctrl-C).
    User,
    /// A model, LoRA, config, tokenizer or image file: unreadable, malformed or not what it claims.
    File,
    /// lorafuse or a library it runs (ONNX Runtime, libtorch) failed on valid input.
    Program,
}

impl Error {
    /// Who is at fault (the C ABI's status codes stay as they are; this is the finer reading).
    pub fn fault(&self) -> Fault {
        match self {
            Error::InvalidArgument(_) | Error::Cancelled | Error::OrtLoad(_) => Fault::User,
            Error::Io { err, .. } if err.kind() == std::io::ErrorKind::NotFound => Fault::User,
            Error::Io { .. }
            | Error::MissingTensor { .. }
            | Error::Shape { .. }
            | Error::SafeTensors { .. }
            | Error::Onnx { .. }
            | Error::Lora { .. }
            | Error::LoraKey(_)
            | Error::Tokenizer(_)
            | Error::Config { .. }
            | Error::Dataset { .. } => Fault::File,
            Error::Ort(_) | Error::Internal(_) => Fault::Program,
            #[cfg(feature = "train")]
            Error::Torch(_) => Fault::Program,
        }
    }
}

/// The message of a panic payload (`&str` or `String`, as `panic!` and tch's `unwrap`s make
/// them); `None` for other payloads. Pass the payload itself (`p.as_ref()` of a caught
/// `Box<dyn Any + Send>`), not a reference to the box.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> Option<&str> {
    p.downcast_ref::<&str>()
        .copied()
        .or_else(|| p.downcast_ref::<String>().map(String::as_str))
}

/// [`panic_message`], or a placeholder for other payloads.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    panic_message(p)
        .unwrap_or("unknown panic payload")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_of_caught_panics() {
        let n = 3;
        let formatted = std::panic::catch_unwind(|| panic!("out of {n}")).unwrap_err();
        let literal = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(panic_message(formatted.as_ref()), Some("out of 3"));
        assert_eq!(panic_message(literal.as_ref()), Some("plain"));
        // the box itself is an `Any` too: a reference to it finds no message
        assert_eq!(panic_message(&formatted), None);
        assert_eq!(panic_text(&7u8), "unknown panic payload");
    }

    #[test]
    fn faults() {
        assert_eq!(Error::InvalidArgument("x".into()).fault(), Fault::User);
        assert_eq!(
            Error::io("a", std::io::Error::from(std::io::ErrorKind::NotFound)).fault(),
            Fault::User
        );
        assert_eq!(
            Error::io("a", std::io::Error::from(std::io::ErrorKind::InvalidData)).fault(),
            Fault::File
        );
        assert_eq!(
            Error::Onnx {
                file: "m.onnx".into(),
                msg: "x".into()
            }
            .fault(),
            Fault::File
        );
        let bug = Error::Internal("x".into());
        assert_eq!(bug.fault(), Fault::Program);
        assert!(bug.to_string().contains("bug"));
        assert_eq!(bug.code(), plugin_api::code::RUNTIME);
    }
}
