//! The calls both front doors make: the CLI (`src/cli`) and the C ABI (`src/ffi`) convert their
//! arguments and call these; neither holds behaviour of its own (docs/ARCHITECTURE.md).
//!
//! - [`inspect()`]: one [`Inspection`] document for every kind of path (the CLI's `--json` and the
//!   C ABI's `inspect` print the same JSON).
//! - [`merge_into_folder`]: classify the input folder and merge into a new folder of its layout.

mod inspect;
mod merge;

pub use inspect::{
    DiffusersInspection, Inspection, LoraSummary, ModelInspection, PipelineInspection,
    SafetensorsInspection, inspect,
};
pub use merge::merge_into_folder;
