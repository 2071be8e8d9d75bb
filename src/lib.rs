//! # lorafuse
//!
//! From "a folder of captioned images" to "images generated with my LoRA inside an ONNX Runtime app".
//!
//! ```text
//! images + captions ─► train (tch, feature `train`) ─► LoRA safetensors (diffusers/PEFT or kohya keys)
//!                                                          │
//! LoRA files (diffusers, kohya, attn-procs, PEFT) ──► lora:: parse → canonical {module, down, up, scale}
//!                                                          │
//! ONNX pipeline dir ─► onnx:: graph index: module path → initializer (name, layout, dtype, location)
//!                                                          │
//!               merge:: W' = W + Σ weight_i · scale_i · ΔW_i   (f32 accumulate, cast back)
//!                      ├─► new ONNX pipeline dir (CLI `merge`)
//!                      └─► runtime:: ORT sessions with overridden initializers (no files written)
//!                                                          │
//! prompt ─► pipeline::tokenizer ─► text encoder ─► UNet × steps (CFG, scheduler) ─► VAE ─► image:: PNG
//! ```
//!
//! One library, thin front doors: the CLI (the binary: `src/main.rs` → `src/cli/`) and the C ABI (`ffi`,
//! implementing `plugin-api`) convert their arguments and call [`api`] (the requests both share)
//! or the layers below; Rust users call the same. Each external format has exactly one owner
//! module: safetensors and `.npy` → [`weights`], LoRA dialects → [`lora`], ONNX protobuf →
//! [`onnx`], ONNX Runtime → [`runtime`], tokenizer and schedulers → [`pipeline`], pipeline folders
//! → [`layout`], PNG → [`image`]; untrusted paths are opened and resolved only through [`files`].
//! The layers and the module map are in docs/ARCHITECTURE.md (checked by `tests/architecture.rs`).
#![warn(clippy::unwrap_used)]

pub mod api;
pub mod dtype;
pub mod error;
pub mod ffi;
pub mod files;
pub mod hashes;
pub mod image;
pub mod layout;
pub mod lora;
pub mod merge;
pub mod onnx;
pub mod pipeline;
pub mod runtime;
#[cfg(feature = "train")]
pub mod train;
pub mod weights;

pub use error::{Error, Result};
