//! UNet and VAE blocks, after diffusers 0.42.1 `src/diffusers/models/unets/unet_2d_blocks.py`:
//! `CrossAttnDownBlock2D`, `DownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D`,
//! `CrossAttnUpBlock2D` (the SD 1.x/2.x family) and the VAE's `DownEncoderBlock2D`,
//! `UpDecoderBlock2D`, `UNetMidBlock2D`.

use tch::Tensor;

use super::attention::{Attention, Transformer2DModel, TransformerConfig};
use super::lora::Paths;
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::Result;

/// What every UNet block shares.
#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    pub temb_channels: i64,
    pub groups: i64,
    pub eps: f64,
    /// `None` for blocks without attention.
    pub attention: Option<AttentionConfig>,
}

/// Cross-attention settings of a block.
#[derive(Debug, Clone, Copy)]
pub struct AttentionConfig {
    pub heads: i64,
    pub context_dim: i64,
    pub transformer_layers: i64,
    pub use_linear_projection: bool,
}

fn transformer(
    p: &Paths,
    channels: i64,
    a: AttentionConfig,
    groups: i64,
) -> Result<Transformer2DModel> {
    Transformer2DModel::new(
        p,
        TransformerConfig {
            heads: a.heads,
            dim_head: channels / a.heads,
            in_channels: channels,
            layers: a.transformer_layers,
            context_dim: a.context_dim,
            groups,
            use_linear_projection: a.use_linear_projection,
        },
    )
}

fn resnet_cfg(c: &BlockConfig, cin: i64, cout: i64, scale: f64) -> ResnetConfig {
    ResnetConfig {
        in_channels: cin,
        out_channels: cout,
        temb_channels: Some(c.temb_channels),
        groups: c.groups,
        eps: c.eps,
        output_scale_factor: scale,
    }
}

/// `DownBlock2D` / `CrossAttnDownBlock2D` (attentions present when `attention` is set).
#[derive(Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsamplers: Option<Downsample2D>,
}

impl DownBlock {
    pub fn new(
        p: &Paths,
        c: BlockConfig,
        cin: i64,
        cout: i64,
        layers: i64,
        add_downsample: bool,
        padding: i64,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let rin = if i == 0 { cin } else { cout };
            resnets.push(ResnetBlock2D::new(
                &p.sub("resnets").sub(i),
                resnet_cfg(&c, rin, cout, 1.0),
            )?);
            if let Some(a) = c.attention {
                attentions.push(transformer(&p.sub("attentions").sub(i), cout, a, c.groups)?);
            }
        }
        let downsamplers = if add_downsample {
            Some(Downsample2D::new(
                &p.sub("downsamplers").sub(0),
                cout,
                padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsamplers,
        })
    }

    /// Returns the block output and the residuals it hands to the up path.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> (Tensor, Vec<Tensor>) {
        let mut h = x.shallow_clone();
        let mut states = Vec::new();
        for (i, r) in self.resnets.iter().enumerate() {
            h = r.forward(&h, Some(temb));
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(&h, context);
            }
            states.push(h.shallow_clone());
        }
        if let Some(d) = &self.downsamplers {
            h = d.forward(&h);
            states.push(h.shallow_clone());
        }
        (h, states)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) × layers.
#[derive(Debug)]
pub struct MidBlockCrossAttn {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

impl MidBlockCrossAttn {
    pub fn new(p: &Paths, c: BlockConfig, channels: i64, scale: f64) -> Result<Self> {
        let a = c.attention.ok_or_else(|| {
            crate::Error::InvalidArgument("mid block needs attention settings".into())
        })?;
        let layers = 1;
        let mut resnets = vec![ResnetBlock2D::new(
            &p.sub("resnets").sub(0),
            resnet_cfg(&c, channels, channels, scale),
        )?];
        let mut attentions = Vec::new();
        for i in 0..layers {
            attentions.push(transformer(
                &p.sub("attentions").sub(i),
                channels,
                a,
                c.groups,
            )?);
            resnets.push(ResnetBlock2D::new(
                &p.sub("resnets").sub(i + 1),
                resnet_cfg(&c, channels, channels, scale),
            )?);
        }
        Ok(Self {
            resnets,
            attentions,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Tensor {
        let mut h = self.resnets[0].forward(x, Some(temb));
        for (a, r) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = a.forward(&h, context);
            h = r.forward(&h, Some(temb));
        }
        h
    }
}

/// `UpBlock2D` / `CrossAttnUpBlock2D`.
#[derive(Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsamplers: Option<Upsample2D>,
}

impl UpBlock {
    /// `in_channels` is the skip width of the last resnet, `prev_output_channel` the input width.
    pub fn new(
        p: &Paths,
        c: BlockConfig,
        in_channels: i64,
        out_channels: i64,
        prev_output_channel: i64,
        layers: i64,
        add_upsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip = if i == layers - 1 {
                in_channels
            } else {
                out_channels
            };
            let rin = if i == 0 {
                prev_output_channel
            } else {
                out_channels
            };
            resnets.push(ResnetBlock2D::new(
                &p.sub("resnets").sub(i),
                resnet_cfg(&c, rin + skip, out_channels, 1.0),
            )?);
            if let Some(a) = c.attention {
                attentions.push(transformer(
                    &p.sub("attentions").sub(i),
                    out_channels,
                    a,
                    c.groups,
                )?);
            }
        }
        let upsamplers = if add_upsample {
            Some(Upsample2D::new(&p.sub("upsamplers").sub(0), out_channels)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsamplers,
        })
    }

    /// `res` holds this block's skip connections in down-path order; they are used from the end.
    pub fn forward(
        &self,
        x: &Tensor,
        res: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(i64, i64)>,
    ) -> Tensor {
        let mut h = x.shallow_clone();
        for (i, r) in self.resnets.iter().enumerate() {
            let skip = &res[res.len() - 1 - i];
            h = Tensor::cat(&[&h, skip], 1);
            h = r.forward(&h, Some(temb));
            if let Some(a) = self.attentions.get(i) {
                h = a.forward(&h, context);
            }
        }
        match &self.upsamplers {
            Some(u) => u.forward(&h, upsample_size),
            None => h,
        }
    }
}

/// The VAE's `DownEncoderBlock2D` (resnets without time embedding, eps 1e-6, downsample padding 0).
#[derive(Debug)]
pub struct DownEncoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsamplers: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    pub fn new(
        p: &Paths,
        cin: i64,
        cout: i64,
        layers: i64,
        groups: i64,
        add_downsample: bool,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|i| {
                let rin = if i == 0 { cin } else { cout };
                ResnetBlock2D::new(&p.sub("resnets").sub(i), vae_resnet(rin, cout, groups))
            })
            .collect::<Result<Vec<_>>>()?;
        let downsamplers = if add_downsample {
            Some(Downsample2D::new(&p.sub("downsamplers").sub(0), cout, 0)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            downsamplers,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for r in &self.resnets {
            h = r.forward(&h, None);
        }
        match &self.downsamplers {
            Some(d) => d.forward(&h),
            None => h,
        }
    }
}

/// The VAE's `UpDecoderBlock2D`.
#[derive(Debug)]
pub struct UpDecoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsamplers: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    pub fn new(
        p: &Paths,
        cin: i64,
        cout: i64,
        layers: i64,
        groups: i64,
        add_upsample: bool,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|i| {
                let rin = if i == 0 { cin } else { cout };
                ResnetBlock2D::new(&p.sub("resnets").sub(i), vae_resnet(rin, cout, groups))
            })
            .collect::<Result<Vec<_>>>()?;
        let upsamplers = if add_upsample {
            Some(Upsample2D::new(&p.sub("upsamplers").sub(0), cout)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            upsamplers,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for r in &self.resnets {
            h = r.forward(&h, None);
        }
        match &self.upsamplers {
            Some(u) => u.forward(&h, None),
            None => h,
        }
    }
}

fn vae_resnet(cin: i64, cout: i64, groups: i64) -> ResnetConfig {
    ResnetConfig {
        in_channels: cin,
        out_channels: cout,
        temb_channels: None,
        groups,
        eps: 1e-6,
        output_scale_factor: 1.0,
    }
}

/// The VAE's `UNetMidBlock2D`: resnet, attention (one head over all channels), resnet.
#[derive(Debug)]
pub struct UNetMidBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Attention>,
}

impl UNetMidBlock2D {
    pub fn new(p: &Paths, channels: i64, groups: i64, add_attention: bool) -> Result<Self> {
        let resnets = vec![
            ResnetBlock2D::new(
                &p.sub("resnets").sub(0),
                vae_resnet(channels, channels, groups),
            )?,
            ResnetBlock2D::new(
                &p.sub("resnets").sub(1),
                vae_resnet(channels, channels, groups),
            )?,
        ];
        let attentions = if add_attention {
            vec![Attention::new_vae(
                &p.sub("attentions").sub(0),
                channels,
                channels,
                groups,
                1e-6,
            )?]
        } else {
            vec![]
        };
        Ok(Self {
            resnets,
            attentions,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnets[0].forward(x, None);
        if let Some(a) = self.attentions.first() {
            h = a.forward_spatial(&h);
        }
        self.resnets[1].forward(&h, None)
    }
}
