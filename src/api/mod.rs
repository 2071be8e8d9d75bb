//! The calls both front doors make: the CLI (`src/cli`) and the C ABI (`src/ffi`) convert their
//! arguments and call these; neither holds behaviour of its own (docs/ARCHITECTURE.md).
//!
//! - [`generate_images`]: N images from an [`ImageRequest`]: batches, seeds, scheduler names,
//!   pixels and the A1111 parameters text.
//! - [`inspect()`]: one [`Inspection`] document for every kind of path (the CLI's `--json` and the
//!   C ABI's `inspect` print the same JSON).
//! - [`merge_into_folder`]: classify the input folder and merge into a new folder of its layout.

mod generate;
mod inspect;
mod merge;

pub use generate::{
    Image, ImageRequest, ImagesDone, generate_images, model_name, prompt_loras, scheduler_name,
};
pub use inspect::{
    DiffusersInspection, Inspection, LoraSummary, ModelInspection, PipelineInspection,
    SafetensorsInspection, inspect,
};
pub use merge::merge_into_folder;
