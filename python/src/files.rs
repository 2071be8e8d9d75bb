//! `merge` and `inspect`: the library's `api::merge_into_folder` and `api::inspect`, their serde
//! documents returned as JSON (what `lorafuse merge`/`inspect --json` and the C ABI report).

use std::path::PathBuf;

use lorafuse::{Error, Result};
use pyo3::prelude::*;

use crate::errors::{IntoPy, guard};
use crate::pipeline::{lora_specs, merge_options};

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Internal(e.to_string()))
}

/// Merge `loras` into a new pipeline folder `out` made from `src`; returns the report as JSON.
#[pyfunction]
#[pyo3(signature = (src, out, loras, *, strict=None, unet_scale=None, text_encoder_scale=None,
    dry_run=false))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn merge(
    py: Python<'_>,
    src: PathBuf,
    out: PathBuf,
    loras: &Bound<'_, PyAny>,
    strict: Option<bool>,
    unet_scale: Option<f32>,
    text_encoder_scale: Option<f32>,
    dry_run: bool,
) -> PyResult<String> {
    let specs = lora_specs(loras).py_err(py)?;
    let opts = merge_options(strict, unet_scale, text_encoder_scale).py_err(py)?;
    py.detach(|| {
        guard("merge", || {
            let report = lorafuse::api::merge_into_folder(
                &src,
                &out,
                &specs,
                &opts,
                dry_run,
                &mut |_, _, _| {},
            )?;
            json(&report)
        })
    })
    .py_err(py)
}

/// What a pipeline folder, ONNX model or safetensors file holds, as JSON.
#[pyfunction]
pub(crate) fn inspect(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    crate::host::ensure_ort(py, None)?;
    py.detach(|| guard("inspect", || json(&lorafuse::api::inspect(&path)?)))
        .py_err(py)
}
