//! Building ORT sessions for pipeline components, and describing their inputs and outputs.

use std::path::Path;

use ort::session::Session;
use ort::value::ValueType;
use serde::Serialize;

use crate::{Error, Result};

/// Where a session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// CUDA if its provider loads, else CPU with a warning.
    #[default]
    Auto,
    Cpu,
    /// ORT's CUDA execution provider on this device id; failing to load it is an error.
    Cuda(i32),
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<i32>) {
                Some(Ok(id)) if id >= 0 => Ok(Device::Cuda(id)),
                _ => Err(Error::InvalidArgument(format!(
                    "device `{s}`: expected auto, cpu, cuda or cuda:N"
                ))),
            },
        }
    }
}

/// Options shared by every component session of a pipeline.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    pub device: Device,
    /// Intra-op threads; `None` lets ORT decide (one per physical core).
    pub intra_threads: Option<usize>,
    /// Let CUDA run fp32 matrix products in TF32 (faster, ~1e-3 relative error). Off by default so
    /// fp32 pipelines give the CPU's results; fp16 pipelines are unaffected.
    pub tf32: bool,
}

/// Set when `Device::Auto` found a CUDA build of ONNX Runtime but could not register CUDA.
static AUTO_FELL_BACK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where sessions built with `opts` place their tensors (`Auto` resolved as [`open`] does).
pub fn placement(opts: &SessionOptions) -> super::switch::Placement {
    use super::switch::Placement;
    match opts.device {
        Device::Cpu => Placement::Cpu,
        Device::Cuda(id) => Placement::Cuda(id),
        Device::Auto => {
            use ort::ep::ExecutionProvider;
            if ort::ep::CUDA::is_available().unwrap_or(false)
                && !AUTO_FELL_BACK.load(std::sync::atomic::Ordering::Relaxed)
            {
                Placement::Cuda(0)
            } else {
                Placement::Cpu
            }
        }
    }
}

/// Open one ONNX model as a session.
pub fn open(path: &Path, opts: &SessionOptions) -> Result<Session> {
    let env = super::environment()?;
    if !path.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such ONNX model file"),
        ));
    }
    let mut builder = configure(Session::builder(env)?, opts)?;
    builder.commit_from_file(path).map_err(|e| Error::Onnx {
        file: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Apply threads and execution providers to a session builder.
fn configure(
    mut builder: ort::session::builder::SessionBuilder,
    opts: &SessionOptions,
) -> Result<ort::session::builder::SessionBuilder> {
    // Diagnostics knob: ORT's graph optimisation level (0 = off, 1 = basic, 2 = extended, 3 = all).
    if let Ok(level) = std::env::var("LORAFUSE_ORT_OPT_LEVEL") {
        use ort::session::builder::GraphOptimizationLevel as L;
        let l = match level.as_str() {
            "0" => L::Disable,
            "1" => L::Level1,
            "2" => L::Level2,
            "3" => L::Level3,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "LORAFUSE_ORT_OPT_LEVEL={other}: expected 0, 1, 2 or 3"
                )));
            }
        };
        builder = builder
            .with_optimization_level(l)
            .map_err(ort::Error::from)?;
    }
    if let Some(n) = opts.intra_threads {
        builder = builder.with_intra_threads(n).map_err(ort::Error::from)?;
    }
    match opts.device {
        Device::Cpu => {}
        Device::Auto => {
            // CUDA when this ONNX Runtime build has the provider and it registers; a CPU-only build
            // (the `onnxruntime` wheel) runs on the CPU silently, a GPU build that fails to set up
            // CUDA warns once per process and runs on the CPU.
            use ort::ep::ExecutionProvider;
            if ort::ep::CUDA::is_available().unwrap_or(false) {
                match builder.with_execution_providers([ort::ep::CUDA::default()
                    .with_tf32(opts.tf32)
                    .build()
                    .error_on_failure()])
                {
                    Ok(b) => builder = b,
                    Err(e) => {
                        AUTO_FELL_BACK.store(true, std::sync::atomic::Ordering::Relaxed);
                        static WARNED: std::sync::Once = std::sync::Once::new();
                        let msg = e.message().to_string();
                        WARNED.call_once(|| {
                            super::warn(&format!(
                                "CUDA is not available ({msg}); running on the CPU"
                            ))
                        });
                        builder = e.recover();
                    }
                }
            }
        }
        Device::Cuda(id) => {
            builder = builder
                .with_execution_providers([ort::ep::CUDA::default()
                    .with_device_id(id)
                    .with_tf32(opts.tf32)
                    .build()
                    .error_on_failure()])
                .map_err(|e| {
                    Error::OrtLoad(format!(
                        "CUDA execution provider (device {id}) failed to load: {e}"
                    ))
                })?;
        }
    }
    Ok(builder)
}

/// One graph input or output as ORT sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IoInfo {
    pub name: String,
    /// ONNX element type name, e.g. `float32`, `float16`, `int64`.
    pub dtype: String,
    /// Dimensions: a number, or the symbolic name (or `?`) of a dynamic one.
    pub shape: Vec<String>,
}

impl std::fmt::Display for IoInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}[{}]",
            self.name,
            self.dtype,
            self.shape.join(", ")
        )
    }
}

/// Inputs and outputs of a session.
pub fn describe(session: &Session) -> (Vec<IoInfo>, Vec<IoInfo>) {
    let conv = |o: &ort::value::Outlet| io_info(o.name(), o.dtype());
    (
        session.inputs().iter().map(conv).collect(),
        session.outputs().iter().map(conv).collect(),
    )
}

fn io_info(name: &str, ty: &ValueType) -> IoInfo {
    match ty {
        ValueType::Tensor {
            ty,
            shape,
            dimension_symbols,
        } => IoInfo {
            name: name.to_string(),
            dtype: ty.to_string(),
            shape: shape
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    if d >= 0 {
                        d.to_string()
                    } else {
                        dimension_symbols
                            .get(i)
                            .filter(|s| !s.is_empty())
                            .cloned()
                            .unwrap_or_else(|| "?".into())
                    }
                })
                .collect(),
        },
        other => IoInfo {
            name: name.to_string(),
            dtype: format!("{other:?}"),
            shape: Vec::new(),
        },
    }
}

/// Open a model from memory (a patched copy: LoRAs merged at run time), with its external data
/// files served from memory too. `path` names the original for messages.
pub fn open_from_memory(
    path: &Path,
    opts: &SessionOptions,
    patched: crate::onnx::write::PatchedInMemory,
) -> Result<Session> {
    let env = super::environment()?;
    let mut builder = configure(Session::builder(env)?, opts)?;
    for (location, data) in patched.data_files {
        builder = builder
            .with_external_initializer_file_in_memory(
                &location,
                std::sync::Arc::from(data.into_boxed_slice()),
            )
            .map_err(|e| Error::Onnx {
                file: path.to_path_buf(),
                msg: format!("serving external data `{location}`: {e}"),
            })?;
    }
    builder
        .commit_from_memory(&patched.model)
        .map_err(|e| Error::Onnx {
            file: path.to_path_buf(),
            msg: e.to_string(),
        })
}
