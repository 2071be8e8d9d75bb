//! What a Python host process brings: its own `onnxruntime` package (the ONNX Runtime searched
//! right after `ORT_DYLIB_PATH`, `lorafuse::runtime::init_in_host`) and `warnings`, where the
//! library's warnings go.

use std::path::{Path, PathBuf};

use pyo3::prelude::*;

use crate::errors::{IntoPy, guard};

/// The `onnxruntime/capi` folder of the `onnxruntime` (or `onnxruntime-gpu`) package this
/// interpreter would import, found without importing it.
fn python_onnxruntime_capi(py: Python<'_>) -> Option<PathBuf> {
    let spec = py
        .import("importlib.util")
        .ok()?
        .call_method1("find_spec", ("onnxruntime",))
        .ok()?;
    let origin: PathBuf = spec.getattr("origin").ok()?.extract().ok()?;
    Some(origin.parent()?.join("capi"))
}

/// Load ONNX Runtime for this process (once; later calls check `explicit` against it).
pub(crate) fn ensure_ort(py: Python<'_>, explicit: Option<&Path>) -> PyResult<()> {
    let capi = python_onnxruntime_capi(py);
    py.detach(|| {
        guard("onnx_runtime", || {
            lorafuse::runtime::init_in_host(explicit, capi.as_deref()).map(|_| ())
        })
    })
    .py_err(py)
}

/// `onnx_runtime(ort_lib=None) -> (path, rule)`: load ONNX Runtime as a `Pipeline` would and say
/// which library it is and which rule of the search order found it.
#[pyfunction]
#[pyo3(signature = (ort_lib=None))]
pub(crate) fn onnx_runtime(
    py: Python<'_>,
    ort_lib: Option<PathBuf>,
) -> PyResult<(PathBuf, String)> {
    ensure_ort(py, ort_lib.as_deref())?;
    let lib = lorafuse::runtime::loaded()
        .ok_or_else(|| lorafuse::Error::Internal("ONNX Runtime not loaded after init".into()))
        .py_err(py)?;
    Ok((lib.path.clone(), lib.source.to_string()))
}

/// Library warnings (e.g. `device="auto"` falling back to the CPU) become Python `UserWarning`s.
pub(crate) fn route_warnings(_py: Python<'_>) {
    fn sink(msg: &str) -> bool {
        Python::attach(|py| {
            let warned = py
                .import("warnings")
                .and_then(|w| w.call_method1("warn", (msg,)));
            // A warnings filter set to "error" raises; the message then goes to stderr instead.
            warned.is_ok()
        })
    }
    lorafuse::runtime::set_warning_sink(Some(sink));
}
