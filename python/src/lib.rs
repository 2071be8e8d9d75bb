//! `lorafuse._lorafuse`: the Python door of lorafuse. Like the CLI (`src/cli`) and the C ABI
//! (`src/ffi`), it converts arguments and calls the library (`lorafuse::api`, the pipeline); no
//! default or behaviour is defined here. `lorafuse/__init__.py` turns the raw results into PIL
//! images, numpy arrays and dicts.
//!
//! - [`errors`]: `lorafuse::Error` → the exception of its fault; panics → `InternalError`.
//! - [`pipeline`]: `Pipeline` (open, generate, set_loras, cancel), the GIL released while it works.
//! - [`files`]: `merge` and `inspect`.
//! - [`host`]: ONNX Runtime for a Python host (its own `onnxruntime` package) and warnings.

mod errors;
mod files;
mod host;
mod pipeline;

use pyo3::prelude::*;

#[pymodule]
fn _lorafuse(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    errors::register(m)?;
    m.add_class::<pipeline::Pipeline>()?;
    m.add_function(wrap_pyfunction!(files::merge, m)?)?;
    m.add_function(wrap_pyfunction!(files::inspect, m)?)?;
    m.add_function(wrap_pyfunction!(host::onnx_runtime, m)?)?;
    let defaults = lorafuse::api::ImageRequest::default();
    m.add("DEFAULT_STEPS", defaults.steps)?;
    m.add("DEFAULT_GUIDANCE_SCALE", defaults.guidance_scale)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    host::route_warnings(py);
    Ok(())
}
