//! LoRAs into an ONNX pipeline: plan which initializer receives which adapters, compute the merged
//! weights in f32 (W' = W + Σ weightᵢ · scaleᵢ · ΔWᵢ, cast back to the initializer's dtype), and
//! hand them out either as bytes for a new pipeline folder ([`merge_pipeline`]) or as ORT values
//! that override initializers when sessions are created (no files written).
//!
//! LoRA dialects are read by [`crate::lora`]; the module → initializer map is [`crate::onnx::index`];
//! the maths is [`crate::lora::merge`]. This module only joins them: `plan.rs` decides which
//! initializer takes which modules and computes merged weights and switch updates, `folder.rs`
//! writes merged copies of pipeline folders.

mod folder;
mod plan;

pub use self::folder::{
    MergeReport, OptimizeFolderReport, merge_diffusers_pipeline, merge_pipeline, optimize_pipeline,
};
pub use self::plan::{
    AdapterCache, ComponentPlan, IndexedModel, MergePlan, MergedWeight, PlannedUpdate,
    WeightUpdate, check_merged, index_pipeline, plan, plan_indexed, plan_indexed_cached,
};

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::{Error, Result};

pub use crate::lora::{LoraSpec, MAX_LORA_WEIGHT, check_lora_weight};

/// How to merge.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Multiplier on every LoRA's UNet part (A1111's "UNet weight").
    pub unet_scale: f32,
    /// Multiplier on every LoRA's text-encoder part.
    pub text_encoder_scale: f32,
    /// Treat keys that map nowhere as an error instead of reporting them.
    pub strict: bool,
    /// Set (e.g. by a Ctrl-C handler) to stop: the merge returns [`Error::Cancelled`] at the next
    /// file or weight and removes its temporary folder; the output never appears.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Follow symbolic links that leave the pipeline folder (by default they are refused, see
    /// [`crate::files::walk_files`]; links inside it, and a hub cache's links into its blobs,
    /// are always followed).
    pub follow_outside_links: bool,
}

impl MergeOptions {
    fn check_cancel(&self) -> Result<()> {
        match &self.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            unet_scale: 1.0,
            text_encoder_scale: 1.0,
            strict: false,
            cancel: None,
            follow_outside_links: false,
        }
    }
}

/// What one LoRA contributed.
#[derive(Debug, Clone, Serialize)]
pub struct LoraReport {
    pub path: PathBuf,
    pub weight: f32,
    pub dialect: String,
    /// Modules patched, per component.
    pub unet_modules: usize,
    pub text_encoder_modules: usize,
    /// Keys (or modules) that map nowhere, with the reason.
    pub unmapped: Vec<String>,
    pub notes: Vec<String>,
}

impl std::fmt::Display for LoraReport {
    /// The one-line summary both doors print or log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lora {} (weight {}): {}; modules: unet {}, text encoder {}",
            self.path.display(),
            self.weight,
            self.dialect,
            self.unet_modules,
            self.text_encoder_modules
        )
    }
}
