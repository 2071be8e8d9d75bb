//! Writing standard LoRA modules back in the diffusers/PEFT or kohya layout (for trainers).

use std::collections::BTreeMap;
use std::path::Path;

use super::*;
use crate::weights::keys::{self};
use crate::weights::{Component, Dtype, TensorData, write_safetensors};
use crate::{Error, Result};

/// Key layout of a LoRA file we write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStyle {
    /// diffusers `save_lora_weights` layout: `unet.<path>.lora_A.weight`,
    /// `text_encoder.text_model.<path>.lora_A.weight`, plus `lora_adapter_metadata` (per-component
    /// `r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`, `target_modules`) so diffusers applies
    /// the same scales. Loads with `pipeline.load_lora_weights(dir, weight_name=...)`.
    Diffusers,
    /// kohya / sd-scripts layout for A1111, ComfyUI and friends: `lora_unet_<path _>` /
    /// `lora_te_text_model_<path _>` + `.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
}

/// How to write a LoRA file.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub style: WriteStyle,
    /// Storage dtype of the weights (F32, F16 or BF16); kohya's `.alpha` uses it too.
    pub dtype: Dtype,
    /// Extra `__metadata__` entries (e.g. kohya `ss_*` training metadata).
    pub metadata: BTreeMap<String, String>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            style: WriteStyle::Diffusers,
            dtype: Dtype::F32,
            metadata: BTreeMap::new(),
        }
    }
}

/// Write standard LoRA modules (kind [`LoraKind::Lora`] without `mid`) to `path` atomically.
/// Each module's alpha is written as `scale · rank`, so any reader that applies `alpha / rank`
/// (kohya, PEFT/diffusers) reproduces [`LoraModule::scale`].
pub fn write(path: impl AsRef<Path>, modules: &[LoraModule], opts: &WriteOptions) -> Result<()> {
    let mut tensors: Vec<(String, TensorData<'static>)> = Vec::new();
    let mut metadata = opts.metadata.clone();
    // per component: (canonical path, rank, alpha)
    let mut per: BTreeMap<Component, Vec<(String, usize, f64)>> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for m in modules {
        let LoraKind::Lora {
            down,
            up,
            mid: None,
        } = &m.kind
        else {
            return Err(Error::InvalidArgument(format!(
                "{}: only standard LoRA modules (down/up) can be written, not LoHa/LoKr/Tucker/diff",
                m.module_path
            )));
        };
        m.kind
            .check()
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", m.module_path)))?;
        let path_c = keys::canonical_path(m.component, &m.module_path).to_string();
        if !seen.insert((m.component, path_c.clone())) {
            return Err(Error::InvalidArgument(format!(
                "{} `{path_c}` given twice",
                m.component
            )));
        }
        let rank = down.shape[0];
        let alpha = m.scale as f64 * rank as f64;
        let (kd, ku) = match opts.style {
            WriteStyle::Diffusers => {
                let base = keys::to_diffusers(m.component, &path_c);
                (
                    format!("{base}.lora_A.weight"),
                    format!("{base}.lora_B.weight"),
                )
            }
            WriteStyle::Kohya => {
                let base = keys::to_kohya(m.component, &path_c);
                let alpha_t = TensorData::from_f32(opts.dtype, vec![], &[alpha as f32])?;
                tensors.push((format!("{base}.alpha"), alpha_t));
                (
                    format!("{base}.lora_down.weight"),
                    format!("{base}.lora_up.weight"),
                )
            }
        };
        tensors.push((
            kd,
            TensorData::from_f32(opts.dtype, down.shape.clone(), &down.data)?,
        ));
        tensors.push((
            ku,
            TensorData::from_f32(opts.dtype, up.shape.clone(), &up.data)?,
        ));
        per.entry(m.component)
            .or_default()
            .push((path_c, rank, alpha));
    }
    if opts.style == WriteStyle::Diffusers {
        let mut obj = serde_json::Map::new();
        for (c, mods) in &per {
            let most_common = |vals: Vec<String>| -> Option<String> {
                let mut counts: BTreeMap<String, usize> = BTreeMap::new();
                for v in vals {
                    *counts.entry(v).or_default() += 1;
                }
                counts.into_iter().max_by_key(|(_, n)| *n).map(|(v, _)| v)
            };
            let r = most_common(mods.iter().map(|(_, r, _)| r.to_string()).collect())
                .and_then(|v| v.parse::<usize>().ok());
            let a = most_common(mods.iter().map(|(_, _, a)| a.to_string()).collect())
                .and_then(|v| v.parse::<f64>().ok());
            let (Some(r), Some(a)) = (r, a) else { continue };
            let rank_pattern: serde_json::Map<String, serde_json::Value> = mods
                .iter()
                .filter(|(_, mr, _)| *mr != r)
                .map(|(p, mr, _)| (p.clone(), (*mr).into()))
                .collect();
            let alpha_pattern: serde_json::Map<String, serde_json::Value> = mods
                .iter()
                .filter(|(_, _, ma)| *ma != a)
                .map(|(p, _, ma)| (p.clone(), (*ma).into()))
                .collect();
            // Canonical paths (text encoder without `text_model.`) match both CLIP spellings in
            // PEFT's suffix matching of target_modules and its `(.*\.)?(pattern)$` patterns.
            let targets: Vec<serde_json::Value> =
                mods.iter().map(|(p, _, _)| p.clone().into()).collect();
            let n = c.diffusers_name();
            obj.insert(format!("{n}.r"), r.into());
            obj.insert(format!("{n}.lora_alpha"), a.into());
            obj.insert(format!("{n}.rank_pattern"), rank_pattern.into());
            obj.insert(format!("{n}.alpha_pattern"), alpha_pattern.into());
            obj.insert(format!("{n}.target_modules"), targets.into());
            obj.insert(format!("{n}.use_dora"), false.into());
            obj.insert(format!("{n}.use_rslora"), false.into());
            obj.insert(format!("{n}.peft_type"), "LORA".into());
        }
        let text = serde_json::to_string_pretty(&obj)
            .map_err(|e| Error::InvalidArgument(format!("metadata: {e}")))?;
        metadata.insert("lora_adapter_metadata".into(), text);
        metadata
            .entry("format".into())
            .or_insert_with(|| "pt".into());
    }
    write_safetensors(path, tensors, (!metadata.is_empty()).then_some(&metadata))
}
