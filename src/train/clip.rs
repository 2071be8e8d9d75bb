//! `CLIPTextModel`, after transformers 5.x `src/transformers/models/clip/modeling_clip.py`
//! (`CLIPTextEmbeddings`, `CLIPAttention` with a causal mask, `CLIPMLP` with quick_gelu,
//! `CLIPEncoderLayer` pre-norm residuals, `final_layer_norm`, pooled output at the first EOS).
//! Built under `text_model.` like transformers; [`super::weights::FileSource`] accepts files
//! saved with or without that prefix.

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use super::lora::{LayerNorm, LoraLinear, Paths};
use crate::{Error, Result};

/// `text_encoder/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_eos")]
    pub eos_token_id: i64,
}

fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_eos() -> i64 {
    49407
}

impl ClipTextConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let c: Self = serde_json::from_str(&text).map_err(|e| Error::Config {
            file: path.into(),
            msg: e.to_string(),
        })?;
        if c.hidden_size % c.num_attention_heads != 0 {
            return Err(Error::Config {
                file: path.into(),
                msg: "hidden_size is not a multiple of num_attention_heads".into(),
            });
        }
        if !matches!(c.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(Error::Config {
                file: path.into(),
                msg: format!("hidden_act {} is not supported", c.hidden_act),
            });
        }
        Ok(c)
    }

    /// SD 1.5's text encoder (openai/clip-vit-large-patch14 text tower).
    pub fn sd15() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

#[derive(Debug)]
struct ClipAttention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    out_proj: LoraLinear,
    heads: i64,
}

impl ClipAttention {
    fn new(p: &Paths, d: i64, heads: i64) -> Result<Self> {
        Ok(Self {
            q_proj: LoraLinear::new(&p.sub("q_proj"), d, d, true)?,
            k_proj: LoraLinear::new(&p.sub("k_proj"), d, d, true)?,
            v_proj: LoraLinear::new(&p.sub("v_proj"), d, d, true)?,
            out_proj: LoraLinear::new(&p.sub("out_proj"), d, d, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, d) = x.size3().unwrap_or((0, 0, 0));
        let hd = d / self.heads;
        let split = |t: Tensor| t.view([b, n, self.heads, hd]).transpose(1, 2);
        let q = split(self.q_proj.forward(x));
        let k = split(self.k_proj.forward(x));
        let v = split(self.v_proj.forward(x));
        // scale = head_dim ** -0.5 (SDPA's default), causal mask
        let o = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            true,
            None,
            false,
        );
        self.out_proj.forward(&o.transpose(1, 2).reshape([b, n, d]))
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: LoraLinear,
    fc2: LoraLinear,
    quick_gelu: bool,
}

impl EncoderLayer {
    fn forward(&self, x: &Tensor) -> Tensor {
        let x = self.self_attn.forward(&self.layer_norm1.forward(x)) + x;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x));
        let h = if self.quick_gelu {
            &h * (&h * 1.702).sigmoid()
        } else {
            h.gelu("none")
        };
        self.fc2.forward(&h) + x
    }
}

/// `CLIPTextModel`.
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    pub config: ClipTextConfig,
}

impl ClipTextModel {
    /// Build from `p` (the component root); the weights live under `text_model.`.
    pub fn new(p: &Paths, c: &ClipTextConfig) -> Result<Self> {
        let t = p.sub("text_model");
        let e = t.sub("embeddings");
        let d = c.hidden_size;
        let token_embedding = e
            .sub("token_embedding")
            .base("weight", &[c.vocab_size, d])?;
        let position_embedding = e
            .sub("position_embedding")
            .base("weight", &[c.max_position_embeddings, d])?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = t.sub("encoder").sub("layers").sub(i);
                Ok(EncoderLayer {
                    layer_norm1: LayerNorm::new(&l.sub("layer_norm1"), d, c.layer_norm_eps)?,
                    self_attn: ClipAttention::new(&l.sub("self_attn"), d, c.num_attention_heads)?,
                    layer_norm2: LayerNorm::new(&l.sub("layer_norm2"), d, c.layer_norm_eps)?,
                    fc1: LoraLinear::new(&l.sub("mlp").sub("fc1"), d, c.intermediate_size, true)?,
                    fc2: LoraLinear::new(&l.sub("mlp").sub("fc2"), c.intermediate_size, d, true)?,
                    quick_gelu: c.hidden_act == "quick_gelu",
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm: LayerNorm::new(&t.sub("final_layer_norm"), d, c.layer_norm_eps)?,
            config: c.clone(),
        })
    }

    /// `(last_hidden_state [b, n, d], pooler_output [b, d])` for `input_ids` `[b, n]` (int64).
    pub fn forward(&self, input_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, n) = input_ids
            .size2()
            .map_err(|e| Error::InvalidArgument(format!("input_ids: {e}")))?;
        if n > self.config.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "input_ids has {n} tokens; the text encoder takes at most {}",
                self.config.max_position_embeddings
            )));
        }
        let ids = input_ids
            .to_device(self.token_embedding.device())
            .to_kind(Kind::Int64);
        let tok = Tensor::embedding(&self.token_embedding, &ids, -1, false, false);
        let pos = self.position_embedding.narrow(0, 0, n).unsqueeze(0);
        let mut h = tok + pos;
        for l in &self.layers {
            h = l.forward(&h);
        }
        let h = self.final_layer_norm.forward(&h);
        // pooled: the first EOS position (eos_token_id 2 means the legacy argmax of the ids)
        let idx = if self.config.eos_token_id == 2 {
            ids.argmax(-1, false)
        } else {
            ids.eq(self.config.eos_token_id)
                .to_kind(Kind::Int)
                .argmax(-1, false)
        };
        let rows = Tensor::arange(b, (Kind::Int64, h.device()));
        let pooled = h.index(&[Some(rows), Some(idx)]);
        Ok((h, pooled))
    }
}
