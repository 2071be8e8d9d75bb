//! Attention and transformer blocks, after diffusers 0.42.1:
//! - `src/diffusers/models/attention_processor.py` (`Attention` + `AttnProcessor2_0`: q/k/v
//!   projections, `scaled_dot_product_attention` over `[b, heads, n, head_dim]`, `to_out[0]`;
//!   the VAE's variant with `group_norm` and a residual connection),
//! - `src/diffusers/models/attention.py` (`BasicTransformerBlock` with `norm_type="layer_norm"`,
//!   `FeedForward` with `GEGLU`),
//! - `src/diffusers/models/transformers/transformer_2d.py` (`Transformer2DModel`, continuous input,
//!   1×1-conv or linear `proj_in` / `proj_out`).

use tch::Tensor;

use super::lora::{GroupNorm, LayerNorm, LoraConv2d, LoraLinear, PackedLinears, Paths};
use crate::Result;

/// `Attention`: `to_q`, `to_k`, `to_v`, `to_out.0` (`to_out.1` is dropout).
#[derive(Debug)]
pub struct Attention {
    pub to_q: LoraLinear,
    pub to_k: LoraLinear,
    pub to_v: LoraLinear,
    pub to_out: LoraLinear,
    pub heads: i64,
    /// The VAE's mid-block attention: GroupNorm over channels first, residual added after.
    pub group_norm: Option<GroupNorm>,
    /// The projections that read the same input, packed ([`PackedLinears`]): q/k/v of a self
    /// attention, k/v of a cross attention.
    packed: Packed,
}

#[derive(Debug)]
enum Packed {
    None,
    Qkv(PackedLinears),
    Kv(PackedLinears),
}

/// `LORAFUSE_PACKED_PROJECTIONS=0` keeps every attention projection its own product (for
/// comparisons, docs/benchmarks.md).
pub const PACKED_ENV: &str = "LORAFUSE_PACKED_PROJECTIONS";

fn packing_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var(PACKED_ENV).as_deref() != Ok("0"))
}

impl Attention {
    /// UNet attention: `query_dim` → `heads · dim_head`, keys/values from `context_dim` (cross
    /// attention) or `query_dim` (self attention); q/k/v without bias, `to_out.0` with bias.
    pub fn new(
        p: &Paths,
        query_dim: i64,
        context_dim: Option<i64>,
        heads: i64,
        dim_head: i64,
        qkv_bias: bool,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let ctx = context_dim.unwrap_or(query_dim);
        let mut to_q = LoraLinear::new(&p.sub("to_q"), query_dim, inner, qkv_bias)?;
        let mut to_k = LoraLinear::new(&p.sub("to_k"), ctx, inner, qkv_bias)?;
        let mut to_v = LoraLinear::new(&p.sub("to_v"), ctx, inner, qkv_bias)?;
        let packed = match (packing_enabled(), context_dim) {
            (false, _) => None,
            (true, None) => {
                PackedLinears::pack(&mut [&mut to_q, &mut to_k, &mut to_v]).map(Packed::Qkv)
            }
            (true, Some(_)) => PackedLinears::pack(&mut [&mut to_k, &mut to_v]).map(Packed::Kv),
        };
        Ok(Self {
            to_q,
            to_k,
            to_v,
            to_out: LoraLinear::new(&p.sub("to_out").sub(0), inner, query_dim, true)?, // Python: to_out[0]
            heads,
            group_norm: None,
            packed: packed.unwrap_or(Packed::None),
        })
    }

    /// q, k, v: packed where [`Self::packed`] allows, else each layer alone.
    fn project(&self, x: &Tensor, context: Option<&Tensor>) -> (Tensor, Tensor, Tensor) {
        let ctx = context.unwrap_or(x);
        match (&self.packed, context) {
            (Packed::Qkv(p), None) => {
                let mut qkv = p
                    .forward(&[&self.to_q, &self.to_k, &self.to_v], x)
                    .into_iter();
                if let (Some(q), Some(k), Some(v)) = (qkv.next(), qkv.next(), qkv.next()) {
                    return (q, k, v);
                }
            }
            (Packed::Kv(p), Some(c)) => {
                let mut kv = p.forward(&[&self.to_k, &self.to_v], c).into_iter();
                if let (Some(k), Some(v)) = (kv.next(), kv.next()) {
                    return (self.to_q.forward(x), k, v);
                }
            }
            _ => {}
        }
        (
            self.to_q.forward(x),
            self.to_k.forward(ctx),
            self.to_v.forward(ctx),
        )
    }

    /// The VAE mid block's `Attention(query_dim=c, heads=c // attention_head_dim, dim_head=attention_head_dim,
    /// bias=True, norm_num_groups=groups, eps=1e-6, residual_connection=True)`.
    pub fn new_vae(p: &Paths, channels: i64, head_dim: i64, groups: i64, eps: f64) -> Result<Self> {
        let heads = (channels / head_dim).max(1);
        let mut a = Self::new(p, channels, None, heads, head_dim, true)?;
        a.group_norm = Some(GroupNorm::new(&p.sub("group_norm"), groups, channels, eps)?);
        Ok(a)
    }

    /// `[b, n, c]` (+ `[b, m, ctx]` for cross attention) → `[b, n, c]`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let (b, n, _) = x.size3().unwrap_or((0, 0, 0));
        let (q, k, v) = self.project(x, context);
        let inner = k.size().last().copied().unwrap_or(0);
        let hd = inner / self.heads;
        let split = |t: Tensor| t.view([b, -1, self.heads, hd]).transpose(1, 2);
        let o = Tensor::scaled_dot_product_attention(
            &split(q),
            &split(k),
            &split(v),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let o = o.transpose(1, 2).reshape([b, n, self.heads * hd]);
        self.to_out.forward(&o)
    }

    /// The VAE form on `[b, c, h, w]`: GroupNorm, attention over the `h·w` positions, residual.
    pub fn forward_spatial(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().unwrap_or((0, 0, 0, 0));
        let normed = match &self.group_norm {
            Some(g) => g.forward(&x.view([b, c, h * w])),
            None => x.view([b, c, h * w]),
        };
        let seq = normed.transpose(1, 2);
        let out = self.forward(&seq, None);
        let out = out.transpose(1, 2).reshape([b, c, h, w]);
        out + x
    }
}

/// `FeedForward(dim, activation_fn="geglu")`: `net.0` = GEGLU (`proj`: dim → 2·4·dim), `net.2` = Linear.
#[derive(Debug)]
pub struct FeedForward {
    pub proj: LoraLinear,
    pub out: LoraLinear,
}

impl FeedForward {
    pub fn new(p: &Paths, dim: i64, mult: i64) -> Result<Self> {
        let inner = dim * mult;
        Ok(Self {
            proj: LoraLinear::new(&p.sub("net").sub(0).sub("proj"), dim, inner * 2, true)?,
            out: LoraLinear::new(&p.sub("net").sub(2), inner, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        // GEGLU: hidden, gate = proj(x).chunk(2, -1); hidden * gelu(gate) (exact erf gelu): one
        // kernel each way on CUDA where enabled (train::fused::geglu), else each half its own
        // product (contiguous halves: vectorised gelu and product)
        let fused = super::fused::geglu_applies(x).then(|| self.proj.forward(x));
        let h = match fused.as_ref().and_then(super::fused::geglu) {
            Some(h) => h,
            None => {
                let parts = self.proj.forward_chunks(x, 2);
                &parts[0] * parts[1].gelu("none")
            }
        };
        self.out.forward(&h)
    }
}

/// `BasicTransformerBlock`: self attention, cross attention, GEGLU feed-forward, each after a
/// LayerNorm and with a residual.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(p: &Paths, dim: i64, heads: i64, dim_head: i64, context_dim: i64) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(&p.sub("norm1"), dim, 1e-5)?,
            attn1: Attention::new(&p.sub("attn1"), dim, None, heads, dim_head, false)?,
            norm2: LayerNorm::new(&p.sub("norm2"), dim, 1e-5)?,
            attn2: Attention::new(
                &p.sub("attn2"),
                dim,
                Some(context_dim),
                heads,
                dim_head,
                false,
            )?,
            norm3: LayerNorm::new(&p.sub("norm3"), dim, 1e-5)?,
            ff: FeedForward::new(&p.sub("ff"), dim, 4)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let x = self.attn1.forward(&self.norm1.forward(x), None) + x;
        let x = self.attn2.forward(&self.norm2.forward(&x), Some(context)) + x;
        self.ff.forward(&self.norm3.forward(&x)) + x
    }
}

/// `proj_in` / `proj_out`: a 1×1 conv (SD 1.x) or a Linear (`use_linear_projection`, SD 2.x).
#[derive(Debug)]
pub enum Projection {
    Conv(LoraConv2d),
    Linear(LoraLinear),
}

impl Projection {
    fn new(p: &Paths, cin: i64, cout: i64, linear: bool) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(LoraLinear::new(p, cin, cout, true)?)
        } else {
            Projection::Conv(LoraConv2d::new(p, cin, cout, 1, 1, 0)?)
        })
    }
}

/// `Transformer2DModel` on continuous input.
#[derive(Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
    pub inner_dim: i64,
}

/// Constructor arguments of `Transformer2DModel` that SD configs vary.
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub heads: i64,
    pub dim_head: i64,
    pub in_channels: i64,
    pub layers: i64,
    pub context_dim: i64,
    pub groups: i64,
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    pub fn new(p: &Paths, c: TransformerConfig) -> Result<Self> {
        let inner = c.heads * c.dim_head;
        let blocks = (0..c.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    &p.sub("transformer_blocks").sub(i),
                    inner,
                    c.heads,
                    c.dim_head,
                    c.context_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(&p.sub("norm"), c.groups, c.in_channels, 1e-6)?,
            proj_in: Projection::new(
                &p.sub("proj_in"),
                c.in_channels,
                inner,
                c.use_linear_projection,
            )?,
            transformer_blocks: blocks,
            proj_out: Projection::new(
                &p.sub("proj_out"),
                inner,
                c.in_channels,
                c.use_linear_projection,
            )?,
            inner_dim: inner,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let (b, _, h, w) = x.size4().unwrap_or((0, 0, 0, 0));
        let normed = self.norm.forward(x);
        // the pixels as a sequence of channel vectors, [b, h·w, c]: SD 1.x's 1×1 `proj_in` /
        // `proj_out` convolutions are the same matrix products as SD 2.x's Linear ones, so both
        // run as GEMMs on this layout (no NCHW↔NHWC transposes around cuDNN convolutions)
        let c = normed.size()[1];
        let seq = normed.permute([0, 2, 3, 1]).reshape([b, h * w, c]);
        let mut hs = match &self.proj_in {
            Projection::Conv(conv) => conv.forward_pointwise(&seq),
            Projection::Linear(l) => l.forward(&seq),
        };
        for blk in &self.transformer_blocks {
            hs = blk.forward(&hs, context);
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward_pointwise(&hs),
            Projection::Linear(l) => l.forward(&hs),
        };
        // back to [b, c, h, w] inside the residual sum (x first: the sum keeps x's layout)
        x + out.reshape([b, h, w, -1]).permute([0, 3, 1, 2])
    }
}
