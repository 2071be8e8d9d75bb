//! Timestep embeddings, after diffusers 0.42.1 `src/diffusers/models/embeddings.py`
//! (`get_timestep_embedding`, `Timesteps`, `TimestepEmbedding`).

use tch::{Kind, Tensor};

use super::lora::{LoraLinear, Paths};
use crate::Result;

/// `get_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos, downscale_freq_shift,
/// scale=1, max_period=10000)`: sinusoidal features `[b, dim]` in f32.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: i64,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Tensor {
    let half = dim / 2;
    let max_period: f64 = 10000.0;
    // exponent = -log(max_period) * arange(half, float32) / (half - shift)
    let exponent = Tensor::arange(half, (Kind::Float, timesteps.device())) * (-max_period.ln());
    let exponent = exponent / (half as f64 - downscale_freq_shift);
    let freqs = exponent.exp();
    let emb = timesteps.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    let emb = Tensor::cat(&[emb.sin(), emb.cos()], -1);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[emb.narrow(1, half, half), emb.narrow(1, 0, half)], -1)
    } else {
        emb
    };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1])
    } else {
        emb
    }
}

/// `TimestepEmbedding`: `linear_2(silu(linear_1(x)))` (SD 1.x: no conditioning projection, no
/// post activation).
#[derive(Debug)]
pub struct TimestepEmbedding {
    pub linear_1: LoraLinear,
    pub linear_2: LoraLinear,
}

impl TimestepEmbedding {
    pub fn new(p: &Paths, in_channels: i64, time_embed_dim: i64) -> Result<Self> {
        Ok(Self {
            linear_1: LoraLinear::new(&p.sub("linear_1"), in_channels, time_embed_dim, true)?,
            linear_2: LoraLinear::new(&p.sub("linear_2"), time_embed_dim, time_embed_dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(x).silu())
    }
}
