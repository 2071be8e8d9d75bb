//! Writing the trained LoRA.
//!
//! - **diffusers** (default), what `train_text_to_image_lora.py` writes at the end of training:
//!   `StableDiffusionPipeline.save_lora_weights(unet_lora_layers=convert_state_dict_to_diffusers(
//!   get_peft_model_state_dict(unet)))`, i.e. `unet.<module>.lora.down.weight` /
//!   `unet.<module>.lora.up.weight` (text encoder: `text_encoder.text_model.<module>.lora_linear_layer.down.weight`)
//!   with `__metadata__ = {"format": "pt"}` (checked against diffusers 0.42.1 on the tiny UNet).
//!   Those keys carry no alpha, so they are used only when every module has `alpha == rank` and
//!   only the script's targets (diffusers' `PEFT_TO_DIFFUSERS` table renames `to_q/to_k/to_v/to_out.0`
//!   and CLIP `q/k/v/out_proj` only). Otherwise the file is written by [`crate::lora::write`] in
//!   the current `save_lora_weights` layout (`lora_A` / `lora_B`) with `lora_adapter_metadata`,
//!   so diffusers restores the same `alpha / r` scale.
//! - **kohya** (`--save_format kohya`): [`crate::lora::write`]'s sd-scripts layout
//!   (`lora_unet_…​.lora_down.weight`, `.lora_up.weight`, `.alpha`) plus the `ss_*` training
//!   metadata A1111 / ComfyUI users see (sd-scripts `train_network.py`).

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::lora::{LoraKind, LoraModule, WriteOptions, WriteStyle};
use crate::weights::keys::{self, Component};
use crate::weights::{self, Dtype, TensorData};
use crate::{Error, Result};

/// `--save_format`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum SaveFormat {
    Diffusers,
    Kohya,
}

/// The modules diffusers' `PEFT_TO_DIFFUSERS` renames (the last path segments).
const SCRIPT_UNET: &[&str] = &["to_q", "to_k", "to_v", "to_out.0"];
const SCRIPT_TEXT: &[&str] = &["q_proj", "k_proj", "v_proj", "out_proj"];

fn to_host(t: &Tensor) -> Result<weights::Tensor> {
    let t = t
        .detach()
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let data: Vec<f32> = Vec::<f32>::try_from(t.flatten(0, -1))?;
    weights::Tensor::new(shape, data)
}

/// Canonical LoRA modules from a LoRA store's `(lora_A, lora_B)` pairs (see
/// [`super::lora::lora_pairs`]); text-encoder paths may carry `text_model.`.
pub fn modules_from(
    pairs: &BTreeMap<String, (Tensor, Tensor)>,
    component: Component,
    alpha: f64,
) -> Result<Vec<LoraModule>> {
    let mut out = Vec::new();
    for (path, (a, b)) in pairs {
        let down = to_host(a)?;
        let up = to_host(b)?;
        let rank = down.shape.first().copied().unwrap_or(0);
        if rank == 0 {
            return Err(Error::InvalidArgument(format!("{path}: LoRA rank 0")));
        }
        out.push(LoraModule {
            component,
            module_path: keys::canonical_path(component, path).to_string(),
            kind: LoraKind::Lora {
                down,
                up,
                mid: None,
            },
            alpha: Some(alpha as f32),
            rank,
            scale: (alpha / rank as f64) as f32,
            keys: Vec::new(),
        });
    }
    Ok(out)
}

fn script_layout_fits(modules: &[LoraModule]) -> bool {
    modules.iter().all(|m| {
        let names = if m.component == Component::Unet {
            SCRIPT_UNET
        } else {
            SCRIPT_TEXT
        };
        let alpha_is_rank = m
            .alpha
            .map(|a| (a as f64 - m.rank as f64).abs() < 1e-9)
            .unwrap_or(false);
        alpha_is_rank
            && names
                .iter()
                .any(|n| m.module_path == *n || m.module_path.ends_with(&format!(".{n}")))
    })
}

/// Write `modules` to `path` in `format` (tensors stored as `dtype`: F32, F16 or BF16).
pub fn save_lora(
    path: &Path,
    modules: &[LoraModule],
    format: SaveFormat,
    dtype: Dtype,
    metadata: BTreeMap<String, String>,
) -> Result<()> {
    match format {
        SaveFormat::Diffusers if script_layout_fits(modules) => {
            let mut tensors = Vec::new();
            for m in modules {
                let LoraKind::Lora { down, up, .. } = &m.kind else {
                    continue;
                };
                let (d, u) = match m.component {
                    Component::Unet => (".lora.down.weight", ".lora.up.weight"),
                    Component::TextEncoder => (
                        ".lora_linear_layer.down.weight",
                        ".lora_linear_layer.up.weight",
                    ),
                };
                let base = keys::to_diffusers(m.component, &m.module_path);
                tensors.push((
                    format!("{base}{d}"),
                    TensorData::from_f32(dtype, down.shape.clone(), &down.data)?,
                ));
                tensors.push((
                    format!("{base}{u}"),
                    TensorData::from_f32(dtype, up.shape.clone(), &up.data)?,
                ));
            }
            let mut meta = metadata;
            meta.insert("format".into(), "pt".into());
            weights::write_safetensors(path, tensors, Some(&meta))
        }
        SaveFormat::Diffusers => crate::lora::write(
            path,
            modules,
            &WriteOptions {
                style: WriteStyle::Diffusers,
                dtype,
                metadata,
            },
        ),
        SaveFormat::Kohya => crate::lora::write(
            path,
            modules,
            &WriteOptions {
                style: WriteStyle::Kohya,
                dtype,
                metadata,
            },
        ),
    }
}
