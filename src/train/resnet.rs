//! `ResnetBlock2D` and the samplers, after diffusers 0.42.1 `src/diffusers/models/resnet.py`
//! (`ResnetBlock2D`, time_embedding_norm "default") and `models/downsampling.py` /
//! `models/upsampling.py` (`Downsample2D`, `Upsample2D` with `use_conv=True`).

use tch::Tensor;

use super::lora::{GroupNorm, LoraConv2d, LoraLinear, Paths};
use crate::Result;

/// `ResnetBlock2D`: GroupNorm → SiLU → conv1 (+ time embedding) → GroupNorm → SiLU → conv2,
/// plus a 1×1 `conv_shortcut` when the channel count changes; `(x + h) / output_scale_factor`.
#[derive(Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: LoraConv2d,
    pub time_emb_proj: Option<LoraLinear>,
    pub norm2: GroupNorm,
    pub conv2: LoraConv2d,
    pub conv_shortcut: Option<LoraConv2d>,
    pub output_scale_factor: f64,
}

/// The constructor arguments of `ResnetBlock2D` that SD 1.x configs vary.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// `None` in the VAE (no time embedding).
    pub temb_channels: Option<i64>,
    pub groups: i64,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(p: &Paths, c: ResnetConfig) -> Result<Self> {
        let time_emb_proj = match c.temb_channels {
            Some(t) => Some(LoraLinear::new(
                &p.sub("time_emb_proj"),
                t,
                c.out_channels,
                true,
            )?),
            None => None,
        };
        let conv_shortcut = if c.in_channels != c.out_channels {
            Some(LoraConv2d::new(
                &p.sub("conv_shortcut"),
                c.in_channels,
                c.out_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(&p.sub("norm1"), c.groups, c.in_channels, c.eps)?,
            conv1: LoraConv2d::new(&p.sub("conv1"), c.in_channels, c.out_channels, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::new(&p.sub("norm2"), c.groups, c.out_channels, c.eps)?,
            conv2: LoraConv2d::new(&p.sub("conv2"), c.out_channels, c.out_channels, 3, 1, 1)?,
            conv_shortcut,
            output_scale_factor: c.output_scale_factor,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let normed = self.norm1.forward_silu(x);
        // conv1's bias joins the time embedding's per-channel term ([b, c] + [c]) and conv2's
        // joins the shortcut convolution's: one broadcast pass over the activations each instead
        // of two (LoraConv2d::forward_with_bias)
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let shift = proj.forward(&t.silu());
                let shift = match &self.conv1.bias {
                    Some(b) => shift + b,
                    None => shift,
                };
                self.conv1.forward_with_bias(&normed, None) + shift.unsqueeze(-1).unsqueeze(-1)
            }
            _ => self.conv1.forward(&normed),
        };
        // dropout is 0 (the SD configs), so it is omitted.
        let normed = self.norm2.forward_silu(&h);
        let (shortcut, h) = match &self.conv_shortcut {
            Some(c) => {
                let bias = match (&c.bias, &self.conv2.bias) {
                    (Some(a), Some(b)) => Some(a + b),
                    (a, b) => a.as_ref().or(b.as_ref()).map(Tensor::shallow_clone),
                };
                (
                    c.forward_with_bias(x, bias.as_ref()),
                    self.conv2.forward_with_bias(&normed, None),
                )
            }
            None => (x.shallow_clone(), self.conv2.forward(&normed)),
        };
        let out = shortcut + h;
        if self.output_scale_factor != 1.0 {
            out / self.output_scale_factor
        } else {
            out
        }
    }
}

/// `Downsample2D(use_conv=True)`: a stride-2 3×3 conv named `conv`. With `padding == 0` (the VAE)
/// the input is first padded by one on the right and bottom, as diffusers does.
#[derive(Debug)]
pub struct Downsample2D {
    pub conv: LoraConv2d,
    pub padding: i64,
}

impl Downsample2D {
    pub fn new(p: &Paths, channels: i64, padding: i64) -> Result<Self> {
        Ok(Self {
            conv: LoraConv2d::new(&p.sub("conv"), channels, channels, 3, 2, padding)?,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.padding == 0 {
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D(use_conv=True)`: nearest ×2 (or to `size` when the UNet forwards an upsample
/// size for inputs that are not multiples of its overall factor), then a 3×3 conv.
#[derive(Debug)]
pub struct Upsample2D {
    pub conv: LoraConv2d,
}

impl Upsample2D {
    pub fn new(p: &Paths, channels: i64) -> Result<Self> {
        Ok(Self {
            conv: LoraConv2d::new(&p.sub("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(i64, i64)>) -> Tensor {
        let (_, _, h, w) = x.size4().unwrap_or((0, 0, 0, 0));
        let up = match size {
            None => x.upsample_nearest2d([h * 2, w * 2], Some(2.0), Some(2.0)),
            Some((oh, ow)) => x.upsample_nearest2d([oh, ow], None, None),
        };
        self.conv.forward(&up)
    }
}
