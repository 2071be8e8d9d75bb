//! SD 1.x single-file checkpoints (the original LDM / CompVis key names that A1111 and Civitai
//! users hold, `.safetensors` only): the key conversion diffusers' single-file loader does
//! (diffusers 0.42.1 `src/diffusers/loaders/single_file_utils.py`: `convert_ldm_unet_checkpoint`,
//! `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`), as a [`WeightSource`] that
//! answers diffusers names from the LDM file.
//!
//! | LDM (prefix `model.diffusion_model.`) | diffusers UNet |
//! |---|---|
//! | `time_embed.0` / `.2` | `time_embedding.linear_1` / `linear_2` |
//! | `input_blocks.0.0` | `conv_in` |
//! | `input_blocks.{1+(L+1)i+j}.0` / `.1` (j < L) | `down_blocks.i.resnets.j` / `attentions.j` |
//! | `input_blocks.{(L+1)(i+1)}.0.op` | `down_blocks.i.downsamplers.0.conv` |
//! | `middle_block.0` / `.1` / `.2` | `mid_block.resnets.0` / `attentions.0` / `resnets.1` |
//! | `output_blocks.{(L+1)i+j}.0` / `.1` | `up_blocks.i.resnets.j` / `attentions.j` |
//! | `output_blocks.{…}.1.conv` or `.2.conv` | `up_blocks.i.upsamplers.0.conv` |
//! | `out.0` / `out.2` | `conv_norm_out` / `conv_out` |
//! | resnet `in_layers.0`, `in_layers.2`, `emb_layers.1`, `out_layers.0`, `out_layers.3`, `skip_connection` | `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut` |
//!
//! VAE (`first_stage_model.`): `encoder.down.I.block.J` → `encoder.down_blocks.I.resnets.J`,
//! `decoder.up.I` → `decoder.up_blocks.{N−1−I}` (reversed), `mid.block_1/2` → `mid_block.resnets.0/1`,
//! `mid.attn_1.{norm,q,k,v,proj_out}` → `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`
//! (1×1 conv kernels reshaped to Linear), `nin_shortcut` → `conv_shortcut`, `norm_out` → `conv_norm_out`.
//! Text encoder (`cond_stage_model.transformer.`): transformers' own names, `text_model.` added
//! when absent. SD 2.x (`cond_stage_model.model.`, OpenCLIP) and SDXL (`conditioner.`) are refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::clip::ClipTextConfig;
use super::unet_2d::{PerBlock, UNet2DConditionConfig};
use super::vae::AutoencoderKlConfig;
use super::weights::{WeightSource, read_tensor};
use crate::weights::WeightFile;
use crate::{Error, Result};

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const CLIP: &str = "cond_stage_model.transformer.";

/// Which part of a single-file checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Unet,
    Vae,
    TextEncoder,
}

/// One component of a single-file checkpoint, under diffusers names.
pub struct LdmSource {
    file: std::sync::Arc<WeightFile>,
    /// diffusers key → LDM key
    map: HashMap<String, String>,
}

fn resnet_rename(rest: &str) -> String {
    for (a, b) in [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ] {
        if let Some(r) = rest.strip_prefix(a) {
            return format!("{b}{r}");
        }
    }
    rest.to_string()
}

fn split_idx(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// diffusers UNet name of an LDM UNet key (without the prefix); `layers` = layers_per_block.
pub fn unet_key(k: &str, layers: usize) -> Option<String> {
    let l1 = layers + 1;
    for (a, b) in [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ] {
        if let Some(r) = k.strip_prefix(a) {
            return Some(format!("{b}{r}"));
        }
    }
    if let Some(r) = k.strip_prefix("input_blocks.") {
        let (n, r) = split_idx(r)?;
        if n == 0 {
            return None;
        }
        let (i, j) = ((n - 1) / l1, (n - 1) % l1);
        let (m, r) = split_idx(r)?;
        return Some(if j == layers {
            format!(
                "down_blocks.{i}.downsamplers.0.conv.{}",
                r.strip_prefix("op.")?
            )
        } else if m == 0 {
            format!("down_blocks.{i}.resnets.{j}.{}", resnet_rename(r))
        } else {
            format!("down_blocks.{i}.attentions.{j}.{r}")
        });
    }
    if let Some(r) = k.strip_prefix("middle_block.") {
        let (m, r) = split_idx(r)?;
        return Some(match m {
            0 => format!("mid_block.resnets.0.{}", resnet_rename(r)),
            1 => format!("mid_block.attentions.0.{r}"),
            2 => format!("mid_block.resnets.1.{}", resnet_rename(r)),
            _ => return None,
        });
    }
    if let Some(r) = k.strip_prefix("output_blocks.") {
        let (n, r) = split_idx(r)?;
        let (i, j) = (n / l1, n % l1);
        let (m, r) = split_idx(r)?;
        return Some(match (m, r.strip_prefix("conv.")) {
            (0, _) => format!("up_blocks.{i}.resnets.{j}.{}", resnet_rename(r)),
            (1 | 2, Some(p)) => format!("up_blocks.{i}.upsamplers.0.conv.{p}"),
            (1, None) => format!("up_blocks.{i}.attentions.{j}.{r}"),
            _ => return None,
        });
    }
    None
}

/// diffusers VAE name of an LDM VAE key (without the prefix); `n` = number of blocks.
pub fn vae_key(k: &str, n: usize) -> Option<String> {
    let (side, r) = k
        .split_once('.')
        .filter(|(s, _)| *s == "encoder" || *s == "decoder")
        .unzip();
    let (Some(side), Some(r)) = (side, r) else {
        return ["quant_conv.", "post_quant_conv."]
            .iter()
            .any(|p| k.starts_with(p))
            .then(|| k.to_string());
    };
    let vres = |r: &str| r.replacen("nin_shortcut.", "conv_shortcut.", 1);
    let out = if let Some(r) = r.strip_prefix("down.") {
        let (i, r) = split_idx(r)?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, r) = split_idx(r)?;
            format!("down_blocks.{i}.resnets.{j}.{}", vres(r))
        } else {
            format!(
                "down_blocks.{i}.downsamplers.0.conv.{}",
                r.strip_prefix("downsample.conv.")?
            )
        }
    } else if let Some(r) = r.strip_prefix("up.") {
        let (i, r) = split_idx(r)?;
        let i = n.checked_sub(1 + i)?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, r) = split_idx(r)?;
            format!("up_blocks.{i}.resnets.{j}.{}", vres(r))
        } else {
            format!(
                "up_blocks.{i}.upsamplers.0.conv.{}",
                r.strip_prefix("upsample.conv.")?
            )
        }
    } else if let Some(r) = r.strip_prefix("mid.block_1.") {
        format!("mid_block.resnets.0.{}", vres(r))
    } else if let Some(r) = r.strip_prefix("mid.block_2.") {
        format!("mid_block.resnets.1.{}", vres(r))
    } else if let Some(r) = r.strip_prefix("mid.attn_1.") {
        let (m, p) = r.split_once('.')?;
        let m = match m {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        format!("mid_block.attentions.0.{m}.{p}")
    } else if let Some(r) = r.strip_prefix("norm_out.") {
        format!("conv_norm_out.{r}")
    } else {
        r.to_string()
    };
    Some(format!("{side}.{out}"))
}

impl LdmSource {
    /// The `part` of `file`, with diffusers names (`layers` and `blocks` from the config).
    pub fn new(file: std::sync::Arc<WeightFile>, part: Part, layers: usize, blocks: usize) -> Self {
        let mut map = HashMap::new();
        for k in file.names() {
            let d = match part {
                Part::Unet => k.strip_prefix(UNET).and_then(|r| unet_key(r, layers)),
                Part::Vae => k.strip_prefix(VAE).and_then(|r| vae_key(r, blocks)),
                Part::TextEncoder => k
                    .strip_prefix(CLIP)
                    .filter(|r| !r.ends_with("position_ids"))
                    .map(|r| {
                        if r.starts_with("text_model.") {
                            r.to_string()
                        } else {
                            format!("text_model.{r}")
                        }
                    }),
            };
            if let Some(d) = d {
                map.insert(d, k.to_string());
            }
        }
        Self { file, map }
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl WeightSource for LdmSource {
    fn describe(&self) -> String {
        self.file.path().display().to_string()
    }

    fn keys(&self) -> Vec<String> {
        self.map.values().cloned().collect()
    }

    fn tensor(&self, key: &str) -> Result<(String, Tensor)> {
        let ldm = self.map.get(key).ok_or_else(|| Error::MissingTensor {
            name: format!("{key} (diffusers name of a single-file checkpoint key)"),
            file: self.file.path().to_path_buf(),
        })?;
        let t = read_tensor(&self.file, ldm)?;
        // the VAE's attention projections are 1×1 convs in LDM files, Linear in diffusers
        let t = if key.contains("mid_block.attentions.0.to_")
            && key.ends_with(".weight")
            && t.dim() == 4
        {
            t.flatten(1, -1)
        } else {
            t
        };
        Ok((ldm.clone(), t))
    }
}

/// A single-file checkpoint opened for training: the three components' sources and configs.
pub struct SingleFile {
    pub path: PathBuf,
    pub file: std::sync::Arc<WeightFile>,
    pub unet: UNet2DConditionConfig,
    pub vae: AutoencoderKlConfig,
    pub text: ClipTextConfig,
}

impl SingleFile {
    /// Open `path` (an SD 1.x `.safetensors` checkpoint) and derive the configs from its shapes.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::sync::Arc::new(WeightFile::open(path)?);
        let bad = |msg: &str| Error::Config {
            file: path.to_path_buf(),
            msg: msg.into(),
        };
        if file.names().any(|k| k.starts_with("conditioner.")) {
            return Err(bad(
                "an SDXL checkpoint; only SD 1.x single files are supported",
            ));
        }
        if file
            .names()
            .any(|k| k.starts_with("cond_stage_model.model."))
        {
            return Err(bad(
                "an SD 2.x checkpoint (OpenCLIP text encoder); only SD 1.x single files are supported",
            ));
        }
        if !file.names().any(|k| k.starts_with(UNET)) || !file.names().any(|k| k.starts_with(CLIP))
        {
            return Err(bad(
                "not an SD 1.x single-file checkpoint (no model.diffusion_model.* / cond_stage_model.transformer.* keys)",
            ));
        }
        let shape = |k: &str| file.info(k).map(|i| i.shape.clone());
        let mut unet = UNet2DConditionConfig::sd15();
        let ctx = shape(&format!(
            "{UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        ))
        .and_then(|s| s.get(1).copied())
        .ok_or_else(|| bad("no input_blocks.1.1 cross attention"))?;
        unet.cross_attention_dim = PerBlock::One(ctx as i64);
        unet.use_linear_projection = shape(&format!("{UNET}input_blocks.1.1.proj_in.weight"))
            .map(|s| s.len() == 2)
            .unwrap_or(false);
        if let Some(s) = shape(&format!("{UNET}input_blocks.0.0.weight")) {
            unet.in_channels = s[1] as i64;
        }
        let mut vae = AutoencoderKlConfig::sd15();
        if let Some(s) = shape(&format!("{VAE}quant_conv.weight")) {
            vae.latent_channels = s[0] as i64 / 2;
        }
        let mut text = ClipTextConfig::sd15();
        text.eos_token_id = 2; // openai/clip-vit-large-patch14's config: legacy argmax pooling
        Ok(Self {
            path: path.to_path_buf(),
            file,
            unet,
            vae,
            text,
        })
    }

    /// Like [`SingleFile::open`] but with the configs given (checkpoints of non-SD-1.5 shapes).
    pub fn with_configs(
        path: &Path,
        unet: UNet2DConditionConfig,
        vae: AutoencoderKlConfig,
        text: ClipTextConfig,
    ) -> Result<Self> {
        let file = std::sync::Arc::new(WeightFile::open(path)?);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            unet,
            vae,
            text,
        })
    }

    pub fn source(&self, part: Part) -> LdmSource {
        let layers = match &self.unet.layers_per_block {
            PerBlock::One(l) => *l as usize,
            PerBlock::Each(v) => v.first().copied().unwrap_or(2) as usize,
        };
        let blocks = match part {
            Part::Vae => self.vae.block_out_channels.len(),
            _ => self.unet.block_out_channels.len(),
        };
        LdmSource::new(self.file.clone(), part, layers, blocks)
    }
}
