//! `AutoencoderKL` (encoder for training, decoder for validation images), after diffusers 0.42.1
//! `src/diffusers/models/autoencoders/vae.py` (`Encoder`, `Decoder`, `DiagonalGaussianDistribution`:
//! `mean, logvar = chunk(parameters, 2)`, `logvar.clamp(-30, 20)`, `sample = mean + exp(0.5·logvar)·ε`)
//! and `autoencoder_kl.py` (`quant_conv` after the encoder, `post_quant_conv` before the decoder).

use std::path::Path;

use serde::Deserialize;
use tch::Tensor;

use super::lora::{GroupNorm, LoraConv2d, Paths};
use super::unet_2d_blocks::{DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D};
use crate::{Error, Result};

/// `vae/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKlConfig {
    #[serde(default = "d3")]
    pub in_channels: i64,
    #[serde(default = "d3")]
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d1")]
    pub layers_per_block: i64,
    #[serde(default = "d4")]
    pub latent_channels: i64,
    #[serde(default = "d32")]
    pub norm_num_groups: i64,
    #[serde(default = "d_scale")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_silu")]
    pub act_fn: String,
}

fn d3() -> i64 {
    3
}
fn d1() -> i64 {
    1
}
fn d4() -> i64 {
    4
}
fn d32() -> i64 {
    32
}
fn d_scale() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}
fn d_silu() -> String {
    "silu".into()
}

impl AutoencoderKlConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let c: Self = serde_json::from_str(&text).map_err(|e| Error::Config {
            file: path.into(),
            msg: e.to_string(),
        })?;
        let bad = |msg: String| Error::Config {
            file: path.into(),
            msg,
        };
        if c.block_out_channels.is_empty() {
            return Err(bad("block_out_channels is empty".into()));
        }
        if let Some(t) = c
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(bad(format!("down block type {t} is not supported")));
        }
        if let Some(t) = c.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return Err(bad(format!("up block type {t} is not supported")));
        }
        if c.act_fn != "silu" {
            return Err(bad(format!("act_fn {} is not supported", c.act_fn)));
        }
        Ok(c)
    }

    /// SD 1.5's VAE.
    pub fn sd15() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            act_fn: "silu".into(),
        }
    }
}

/// `Encoder` + `quant_conv`: image `[b, 3, h, w]` in [-1, 1] → `(mean, logvar)` `[b, 4, h/8, w/8]`.
#[derive(Debug)]
pub struct VaeEncoder {
    conv_in: LoraConv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: LoraConv2d,
    quant_conv: Option<LoraConv2d>,
    pub config: AutoencoderKlConfig,
}

impl VaeEncoder {
    /// Build from the VAE root (`encoder.*`, `quant_conv.*`).
    pub fn new(p: &Paths, c: &AutoencoderKlConfig) -> Result<Self> {
        let e = p.sub("encoder");
        let boc = &c.block_out_channels;
        let n = boc.len();
        let g = c.norm_num_groups;
        let conv_in = LoraConv2d::new(&e.sub("conv_in"), c.in_channels, boc[0], 3, 1, 1)?;
        let mut down_blocks = Vec::new();
        let mut out_ch = boc[0];
        for (i, &ch) in boc.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = ch;
            down_blocks.push(DownEncoderBlock2D::new(
                &e.sub("down_blocks").sub(i),
                in_ch,
                out_ch,
                c.layers_per_block,
                g,
                i + 1 < n,
            )?);
        }
        let last = boc[n - 1];
        let mid_block =
            UNetMidBlock2D::new(&e.sub("mid_block"), last, g, c.mid_block_add_attention)?;
        let conv_norm_out = GroupNorm::new(&e.sub("conv_norm_out"), g, last, 1e-6)?;
        let conv_out = LoraConv2d::new(&e.sub("conv_out"), last, 2 * c.latent_channels, 3, 1, 1)?;
        let lc2 = 2 * c.latent_channels;
        let quant_conv = if c.use_quant_conv {
            Some(LoraConv2d::new(&p.sub("quant_conv"), lc2, lc2, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block,
            conv_norm_out,
            conv_out,
            quant_conv,
            config: c.clone(),
        })
    }

    /// `(mean, logvar)` of the latent distribution (logvar clamped to [-30, 20]).
    pub fn encode(&self, x: &Tensor) -> (Tensor, Tensor) {
        let mut h = self.conv_in.forward(x);
        for d in &self.down_blocks {
            h = d.forward(&h);
        }
        h = self.mid_block.forward(&h);
        h = self.conv_out.forward(&self.conv_norm_out.forward_silu(&h));
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h);
        }
        let parts = h.chunk(2, 1);
        (parts[0].shallow_clone(), parts[1].clamp(-30.0, 20.0))
    }
}

/// `post_quant_conv` + `Decoder`: latents (already divided by the scaling factor) → image in about [-1, 1].
#[derive(Debug)]
pub struct VaeDecoder {
    post_quant_conv: Option<LoraConv2d>,
    conv_in: LoraConv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: LoraConv2d,
    pub config: AutoencoderKlConfig,
}

impl VaeDecoder {
    /// Build from the VAE root (`decoder.*`, `post_quant_conv.*`).
    pub fn new(p: &Paths, c: &AutoencoderKlConfig) -> Result<Self> {
        let d = p.sub("decoder");
        let boc = &c.block_out_channels;
        let n = boc.len();
        let g = c.norm_num_groups;
        let lc = c.latent_channels;
        let post_quant_conv = if c.use_post_quant_conv {
            Some(LoraConv2d::new(&p.sub("post_quant_conv"), lc, lc, 1, 1, 0)?)
        } else {
            None
        };
        let last = boc[n - 1];
        let conv_in = LoraConv2d::new(&d.sub("conv_in"), lc, last, 3, 1, 1)?;
        let mid_block =
            UNetMidBlock2D::new(&d.sub("mid_block"), last, g, c.mid_block_add_attention)?;
        let mut up_blocks = Vec::new();
        let rev: Vec<i64> = boc.iter().rev().copied().collect();
        let mut out_ch = rev[0];
        for (i, &ch) in rev.iter().enumerate() {
            let prev = out_ch;
            out_ch = ch;
            up_blocks.push(UpDecoderBlock2D::new(
                &d.sub("up_blocks").sub(i),
                prev,
                out_ch,
                c.layers_per_block + 1,
                g,
                i + 1 < n,
            )?);
        }
        let conv_norm_out = GroupNorm::new(&d.sub("conv_norm_out"), g, boc[0], 1e-6)?;
        let conv_out = LoraConv2d::new(&d.sub("conv_out"), boc[0], c.out_channels, 3, 1, 1)?;
        Ok(Self {
            post_quant_conv,
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            config: c.clone(),
        })
    }

    pub fn decode(&self, z: &Tensor) -> Tensor {
        let mut h = match &self.post_quant_conv {
            Some(q) => q.forward(z),
            None => z.shallow_clone(),
        };
        h = self.conv_in.forward(&h);
        h = self.mid_block.forward(&h);
        for u in &self.up_blocks {
            h = u.forward(&h);
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h))
    }
}
