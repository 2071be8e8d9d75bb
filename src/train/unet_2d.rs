//! `UNet2DConditionModel` for the SD 1.x / 2.x family, after diffusers 0.42.1
//! `src/diffusers/models/unets/unet_2d_condition.py` (`__init__` channel bookkeeping and
//! `forward`: timestep broadcast, `Timesteps` + `TimestepEmbedding`, down path collecting
//! residuals, mid block, up path consuming them, forwarded upsample sizes for inputs that are not
//! multiples of `2 ** num_upsamplers`, GroupNorm → SiLU → `conv_out`).

use std::path::Path;

use serde::Deserialize;
use tch::Tensor;

use super::embeddings::{TimestepEmbedding, timestep_embedding};
use super::lora::{GroupNorm, LoraConv2d, Paths};
use super::unet_2d_blocks::{AttentionConfig, BlockConfig, DownBlock, MidBlockCrossAttn, UpBlock};
use crate::{Error, Result};

/// An int or a per-block list (diffusers accepts both for several fields).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    fn expand(&self, n: usize) -> Vec<T> {
        match self {
            PerBlock::One(v) => vec![v.clone(); n],
            PerBlock::Each(v) => v.clone(),
        }
    }
}

/// `unet/config.json` (the fields the SD 1.x/2.x family uses; others must keep their defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default = "d_in")]
    pub in_channels: i64,
    #[serde(default = "d_in")]
    pub out_channels: i64,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<i64>,
    #[serde(default = "d_one_f")]
    pub downsample_padding: i64,
    #[serde(default = "d_one_fl")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<i64>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<i64>,
    #[serde(default = "d_tl")]
    pub transformer_layers_per_block: PerBlock<i64>,
    pub attention_head_dim: PerBlock<i64>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<i64>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<i64>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<i64>,
    #[serde(default)]
    pub num_class_embeds: Option<i64>,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default = "d_three")]
    pub conv_in_kernel: i64,
    #[serde(default = "d_three")]
    pub conv_out_kernel: i64,
    #[serde(default)]
    pub sample_size: Option<i64>,
}

fn d_in() -> i64 {
    4
}
fn d_true() -> bool {
    true
}
fn d_layers() -> PerBlock<i64> {
    PerBlock::One(2)
}
fn d_one_f() -> i64 {
    1
}
fn d_one_fl() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}
fn d_groups() -> Option<i64> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_tl() -> PerBlock<i64> {
    PerBlock::One(1)
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_three() -> i64 {
    3
}

impl UNet2DConditionConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let c: Self = serde_json::from_str(&text).map_err(|e| Error::Config {
            file: path.into(),
            msg: e.to_string(),
        })?;
        c.check().map_err(|msg| Error::Config {
            file: path.into(),
            msg,
        })?;
        Ok(c)
    }

    /// SD 1.5's `unet/config.json` (runwayml/stable-diffusion-v1-5, diffusers 0.6 layout).
    pub fn sd15() -> Self {
        let text = r#"{"act_fn":"silu","attention_head_dim":8,"block_out_channels":[320,640,1280,1280],
            "center_input_sample":false,"cross_attention_dim":768,
            "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
            "downsample_padding":1,"flip_sin_to_cos":true,"freq_shift":0,"in_channels":4,"layers_per_block":2,
            "mid_block_scale_factor":1,"norm_eps":1e-05,"norm_num_groups":32,"out_channels":4,"sample_size":64,
            "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"]}"#;
        serde_json::from_str(text).expect("static SD 1.5 config parses")
    }

    /// Refuse configs outside the SD 1.x/2.x family, naming the field.
    fn check(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(
                "block_out_channels, down_block_types and up_block_types must have the same length"
                    .into(),
            );
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return Err(format!(
                    "down block type {t} is not supported (SD 1.x/2.x UNets only)"
                ));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return Err(format!(
                    "up block type {t} is not supported (SD 1.x/2.x UNets only)"
                ));
            }
        }
        if let Some(m) = &self.mid_block_type
            && m != "UNetMidBlock2DCrossAttn"
        {
            return Err(format!("mid block type {m} is not supported"));
        }
        let unsupported = [
            (
                "class_embed_type",
                self.class_embed_type.is_some() || self.num_class_embeds.is_some(),
            ),
            ("addition_embed_type", self.addition_embed_type.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("dual_cross_attention", self.dual_cross_attention),
            (
                "only_cross_attention",
                self.only_cross_attention.as_bool() == Some(true),
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift != "default",
            ),
            (
                "time_embedding_type",
                self.time_embedding_type != "positional",
            ),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            ("num_attention_heads", self.num_attention_heads.is_some()),
            ("act_fn", self.act_fn != "silu" && self.act_fn != "swish"),
            ("norm_num_groups", self.norm_num_groups.is_none()),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, bad)| *bad) {
            return Err(format!(
                "`{name}` is set to a value outside the SD 1.x/2.x family; not supported"
            ));
        }
        for (name, len) in [
            ("layers_per_block", self.layers_per_block.expand(n).len()),
            (
                "attention_head_dim",
                self.attention_head_dim.expand(n).len(),
            ),
            (
                "cross_attention_dim",
                self.cross_attention_dim.expand(n).len(),
            ),
            (
                "transformer_layers_per_block",
                self.transformer_layers_per_block.expand(n).len(),
            ),
        ] {
            if len != n {
                return Err(format!("`{name}` has {len} entries for {n} blocks"));
            }
        }
        Ok(())
    }
}

/// `UNet2DConditionModel` (SD 1.x/2.x).
#[derive(Debug)]
pub struct UNet2DConditionModel {
    pub conv_in: LoraConv2d,
    pub time_embedding: TimestepEmbedding,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlockCrossAttn,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: LoraConv2d,
    pub config: UNet2DConditionConfig,
    num_upsamplers: u32,
}

impl UNet2DConditionModel {
    pub fn new(p: &Paths, config: &UNet2DConditionConfig) -> Result<Self> {
        config.check().map_err(Error::InvalidArgument)?;
        let c = config;
        let n = c.block_out_channels.len();
        let boc = &c.block_out_channels;
        let groups = c.norm_num_groups.unwrap_or(32);
        // num_attention_heads = num_attention_heads or attention_head_dim (the historical naming).
        let heads = c.attention_head_dim.expand(n);
        let layers = c.layers_per_block.expand(n);
        let ctx = c.cross_attention_dim.expand(n);
        let tl = c.transformer_layers_per_block.expand(n);
        let temb = boc[0] * 4;
        let block = |i: usize, attn: bool| BlockConfig {
            temb_channels: temb,
            groups,
            eps: c.norm_eps,
            attention: attn.then_some(AttentionConfig {
                heads: heads[i],
                context_dim: ctx[i],
                transformer_layers: tl[i],
                use_linear_projection: c.use_linear_projection,
            }),
        };
        let ck = c.conv_in_kernel;
        let conv_in = LoraConv2d::new(
            &p.sub("conv_in"),
            c.in_channels,
            boc[0],
            ck,
            1,
            (ck - 1) / 2,
        )?;
        let time_embedding = TimestepEmbedding::new(&p.sub("time_embedding"), boc[0], temb)?;

        let mut down_blocks = Vec::new();
        let mut out_ch = boc[0];
        for (i, t) in c.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = boc[i];
            let is_final = i == n - 1;
            let attn = t == "CrossAttnDownBlock2D";
            down_blocks.push(DownBlock::new(
                &p.sub("down_blocks").sub(i),
                block(i, attn),
                in_ch,
                out_ch,
                layers[i],
                !is_final,
                c.downsample_padding,
            )?);
        }
        let mid_block = MidBlockCrossAttn::new(
            &p.sub("mid_block"),
            block(n - 1, true),
            boc[n - 1],
            c.mid_block_scale_factor,
        )?;

        let rev: Vec<usize> = (0..n).rev().collect();
        let mut up_blocks = Vec::new();
        let mut num_upsamplers = 0;
        let mut out_ch = boc[n - 1];
        for (i, t) in c.up_block_types.iter().enumerate() {
            let is_final = i == n - 1;
            let prev = out_ch;
            out_ch = boc[rev[i]];
            let in_ch = boc[rev[(i + 1).min(n - 1)]];
            if !is_final {
                num_upsamplers += 1;
            }
            let attn = t == "CrossAttnUpBlock2D";
            up_blocks.push(UpBlock::new(
                &p.sub("up_blocks").sub(i),
                block(rev[i], attn),
                in_ch,
                out_ch,
                prev,
                layers[rev[i]] + 1,
                !is_final,
            )?);
        }
        let conv_norm_out = GroupNorm::new(&p.sub("conv_norm_out"), groups, boc[0], c.norm_eps)?;
        let ok = c.conv_out_kernel;
        let conv_out = LoraConv2d::new(
            &p.sub("conv_out"),
            boc[0],
            c.out_channels,
            ok,
            1,
            (ok - 1) / 2,
        )?;
        Ok(Self {
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            config: config.clone(),
            num_upsamplers,
        })
    }

    /// `unet(sample [b, c, h, w], timestep (0-d or [b]), encoder_hidden_states [b, n, ctx]).sample`.
    /// Runs in the dtype of the base weights: pass inputs of that dtype.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Tensor {
        let size = sample.size();
        let b = size[0];
        let factor = 1i64 << self.num_upsamplers;
        let forward_upsample_size = size[2..].iter().any(|d| d % factor != 0);

        let t = if timestep.dim() == 0 {
            timestep.unsqueeze(0)
        } else {
            timestep.shallow_clone()
        };
        let t = t.expand([b], false);
        let t_emb = timestep_embedding(
            &t,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )
        .to_kind(sample.kind());
        let emb = self.time_embedding.forward(&t_emb);

        let mut h = self.conv_in.forward(sample);
        let mut res: Vec<Tensor> = vec![h.shallow_clone()];
        for d in &self.down_blocks {
            let (out, states) = d.forward(&h, &emb, encoder_hidden_states);
            h = out;
            res.extend(states);
        }
        h = self.mid_block.forward(&h, &emb, encoder_hidden_states);
        let n_up = self.up_blocks.len();
        for (i, u) in self.up_blocks.iter().enumerate() {
            let k = u.resnets.len();
            let skips: Vec<Tensor> = res.split_off(res.len() - k);
            let up_size = if i + 1 < n_up && forward_upsample_size {
                res.last().map(|r| {
                    let s = r.size();
                    (s[2], s[3])
                })
            } else {
                None
            };
            h = u.forward(&h, &skips, &emb, encoder_hidden_states, up_size);
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h))
    }
}
