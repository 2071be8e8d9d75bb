//! `merge` for both doors: the folder's layout picks the writer.

use std::path::Path;

use crate::layout::{PathKind, classify};
use crate::merge::{LoraSpec, MergeOptions, MergeReport, merge_diffusers_pipeline, merge_pipeline};
use crate::{Error, Result};

/// Merge `loras` into a new folder `out` made from the pipeline folder `src`: an ONNX pipeline
/// (optimum layout) gets patched ONNX weights, a diffusers folder merged safetensors. The
/// output appears whole or not at all; `src` is never modified.
pub fn merge_into_folder(
    src: &Path,
    out: &Path,
    loras: &[LoraSpec],
    opts: &MergeOptions,
    dry_run: bool,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<MergeReport> {
    match classify(src)? {
        PathKind::OnnxPipeline => merge_pipeline(src, out, loras, opts, dry_run, progress),
        PathKind::DiffusersPipeline => {
            merge_diffusers_pipeline(src, out, loras, opts, dry_run, progress)
        }
        kind => Err(Error::InvalidArgument(format!(
            "{}: a {kind:?}, not a pipeline folder; merge reads ONNX (optimum) or diffusers folders",
            src.display()
        ))),
    }
}
