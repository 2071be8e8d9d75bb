//! LoRA layers on a frozen base model, and the [`Paths`] that build both in lockstep.
//!
//! The maths is peft's (peft 0.21 `src/peft/tuners/lora/layer.py`, classes `Linear` and
//! `Conv2d`): `y = base(x) + lora_B(lora_A(x)) · scaling` with `scaling = lora_alpha / r`;
//! `lora_A` is `[r, in]` (conv: `[r, in, kh, kw]`, same stride/padding as the base conv),
//! `lora_B` is `[out, r]` (conv: `[out, r, 1, 1]`), both without bias. Initialisation
//! (`reset_lora_parameters`): `init_lora_weights="gaussian"` draws `lora_A ~ N(0, 1/r)`
//! (what train_text_to_image_lora.py asks for), `True` draws kaiming-uniform with `a = √5`
//! (`U(-1/√fan_in, 1/√fan_in)`); `lora_B` starts at zero either way.
//!
//! Targets match as peft's `check_target_module_exists` does for a list: a module is a target
//! when its full dotted name equals an entry or ends with `.` + entry (`to_out.0`, `ff.net.2`).

use std::cell::RefCell;
use std::collections::BTreeMap;

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::{Device, Kind, Tensor, nn};

use super::weights::WeightSource;
use crate::{Error, Result};

/// How LoRA A matrices start (B always starts at zero).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
pub enum LoraInit {
    /// peft `init_lora_weights="gaussian"`: `A ~ N(0, 1/r)` (the diffusers script's choice).
    Gaussian,
    /// peft `init_lora_weights=True`: kaiming-uniform with `a = √5`.
    Kaiming,
}

/// The script's UNet targets (`target_modules=["to_k", "to_q", "to_v", "to_out.0"]`).
pub const UNET_TARGETS: [&str; 4] = ["to_k", "to_q", "to_v", "to_out.0"];
/// The text encoder targets of diffusers' text-encoder LoRA scripts (CLIP attention).
pub const TEXT_ENCODER_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];
/// The script's `--rank` default.
pub const SCRIPT_RANK: i64 = 4;

/// `lorafuse train`'s LoRA flags: the script's `--rank` plus lorafuse's own; [`LoraFlags::configs`]
/// turns them into the UNet's and (with `--train_text_encoder`) the text encoder's [`LoraConfig`].
#[derive(Debug, Clone, clap::Args)]
pub struct LoraFlags {
    /// LoRA rank r.
    #[arg(long, default_value_t = SCRIPT_RANK)]
    pub rank: i64,
    /// LoRA alpha (default: the rank, as the script does). Scale = alpha / rank.
    #[arg(long = "lora_alpha")]
    pub lora_alpha: Option<f64>,
    /// Comma-separated target module names or dotted suffixes (peft `target_modules`), e.g.
    /// `to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,proj_in,proj_out,conv1,conv2`.
    #[arg(long = "lora_targets", value_delimiter = ',', default_values_t = UNET_TARGETS.map(String::from))]
    pub lora_targets: Vec<String>,
    /// peft init of lora_A: gaussian (the script's) or kaiming (peft's default).
    #[arg(long = "lora_init", value_enum, default_value_t = LoraInit::Gaussian)]
    pub lora_init: LoraInit,
    /// Also train a LoRA on the text encoder.
    #[arg(long = "train_text_encoder")]
    pub train_text_encoder: bool,
    /// Text encoder LoRA targets.
    #[arg(long = "text_encoder_targets", value_delimiter = ',', default_values_t = TEXT_ENCODER_TARGETS.map(String::from))]
    pub text_encoder_targets: Vec<String>,
}

impl LoraFlags {
    /// The UNet's LoRA and, with `--train_text_encoder`, the text encoder's (same rank, alpha, init).
    pub fn configs(&self) -> (LoraConfig, Option<LoraConfig>) {
        let alpha = self.lora_alpha.unwrap_or(self.rank as f64);
        let make = |targets: &[String]| LoraConfig {
            rank: self.rank,
            alpha,
            targets: targets.to_vec(),
            init: self.lora_init,
        };
        (
            make(&self.lora_targets),
            self.train_text_encoder
                .then(|| make(&self.text_encoder_targets)),
        )
    }
}

/// Which modules get a LoRA and how big it is (peft `LoraConfig` fields).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    /// `r`.
    pub rank: i64,
    /// `lora_alpha` (scaling = alpha / rank).
    pub alpha: f64,
    /// `target_modules`: names or dotted suffixes (`to_q`, `to_out.0`, `ff.net.0.proj`, `conv1`).
    pub targets: Vec<String>,
    pub init: LoraInit,
}

impl LoraConfig {
    /// The diffusers script's adapter: `LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
    /// target_modules=["to_k", "to_q", "to_v", "to_out.0"])`.
    pub fn script_default(rank: i64) -> Self {
        Self {
            rank,
            alpha: rank as f64,
            targets: UNET_TARGETS.map(String::from).to_vec(),
            init: LoraInit::Gaussian,
        }
    }

    /// `lora_alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// peft's list matching: exact name or `.`-suffix.
    pub fn is_target(&self, module: &str) -> bool {
        self.targets.iter().any(|t| {
            module == t
                || (module.len() > t.len()
                    && module.ends_with(t.as_str())
                    && module[..module.len() - t.len()].ends_with('.'))
        })
    }
}

/// What a LoRA-carrying module is, for saving and listing.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModuleInfo {
    /// Dotted module path inside the component (`down_blocks.0.attentions.0...to_q`).
    pub path: String,
    pub in_features: i64,
    pub out_features: i64,
    /// `None` for Linear, `Some((kh, kw))` for Conv2d.
    pub kernel: Option<(i64, i64)>,
}

/// Shared state while a model is built: where base weights come from, their dtype and device,
/// the LoRA config, and what has been loaded.
pub struct Builder<'a> {
    pub(crate) source: &'a dyn WeightSource,
    pub(crate) kind: Kind,
    pub(crate) device: Device,
    pub(crate) lora: Option<LoraConfig>,
    used: RefCell<Vec<String>>,
    modules: RefCell<Vec<LoraModuleInfo>>,
}

impl<'a> Builder<'a> {
    /// Base weights from `source`, stored as `kind` on `device`; LoRA layers where `lora` says.
    pub fn new(
        source: &'a dyn WeightSource,
        kind: Kind,
        device: Device,
        lora: Option<LoraConfig>,
    ) -> Self {
        Self {
            source,
            kind,
            device,
            lora,
            used: RefCell::new(Vec::new()),
            modules: RefCell::new(Vec::new()),
        }
    }

    /// The LoRA modules created so far, in construction order.
    pub fn lora_modules(&self) -> Vec<LoraModuleInfo> {
        self.modules.borrow().clone()
    }

    /// Source keys the model did not use (e.g. a checkpoint's EMA copy, or a wrong file).
    pub fn unused_keys(&self) -> Vec<String> {
        let used: std::collections::HashSet<String> = self.used.borrow().iter().cloned().collect();
        self.source
            .keys()
            .into_iter()
            .filter(|k| !used.contains(k))
            .collect()
    }
}

/// Walks the frozen base store and the trainable LoRA store in lockstep, so one dotted module
/// path names both `weight` (base) and `lora_A.weight` / `lora_B.weight` (LoRA). A list index is
/// its own segment (`sub(0)`), never a dotted string (tch panics on dots).
pub struct Paths<'a> {
    base: nn::Path<'a>,
    lora: nn::Path<'a>,
    name: Vec<String>,
    b: &'a Builder<'a>,
}

impl<'a> Paths<'a> {
    /// The root of a component: `base` holds frozen weights, `lora` the trainable adapters.
    pub fn root(base: &'a nn::VarStore, lora: &'a nn::VarStore, b: &'a Builder<'a>) -> Self {
        Self {
            base: base.root(),
            lora: lora.root(),
            name: Vec::new(),
            b,
        }
    }

    pub fn sub<T: ToString>(&self, s: T) -> Paths<'a> {
        let s = s.to_string();
        let mut name = self.name.clone();
        name.push(s.clone());
        Paths {
            base: self.base.sub(&s),
            lora: self.lora.sub(&s),
            name,
            b: self.b,
        }
    }

    /// The dotted module path (`down_blocks.0.resnets.1`).
    pub fn name(&self) -> String {
        self.name.join(".")
    }

    fn key(&self, param: &str) -> String {
        if self.name.is_empty() {
            param.to_string()
        } else {
            format!("{}.{param}", self.name())
        }
    }

    pub fn device(&self) -> Device {
        self.b.device
    }

    /// The base weights' kind (the compute dtype of the frozen model).
    pub fn kind(&self) -> Kind {
        self.b.kind
    }

    /// A frozen base tensor `param` of this module, read from the weight source and checked
    /// against `shape`.
    pub fn base(&self, param: &str, shape: &[i64]) -> Result<Tensor> {
        let key = self.key(param);
        let (src_key, t) = self.b.source.tensor(&key)?;
        let got: Vec<i64> = t.size();
        if got != shape {
            return Err(Error::Shape {
                name: format!("{key} ({})", self.b.source.describe()),
                expected: shape.iter().map(|&d| d as usize).collect(),
                got: got.iter().map(|&d| d as usize).collect(),
            });
        }
        self.b.used.borrow_mut().push(src_key);
        let t = t.to_kind(self.b.kind).to_device(self.b.device);
        Ok(self.base.add(param, t, false))
    }

    /// Whether this module gets a LoRA adapter.
    fn lora_here(&self) -> Option<LoraConfig> {
        let cfg = self.b.lora.as_ref()?;
        cfg.is_target(&self.name()).then(|| cfg.clone())
    }

    fn lora_pair(
        &self,
        a_shape: &[i64],
        b_shape: &[i64],
        info: LoraModuleInfo,
    ) -> (Tensor, Tensor) {
        let opts = (Kind::Float, self.b.device);
        let a = self
            .lora
            .sub("lora_A")
            .add("weight", Tensor::zeros(a_shape, opts), true);
        let bm = self
            .lora
            .sub("lora_B")
            .add("weight", Tensor::zeros(b_shape, opts), true);
        self.b.modules.borrow_mut().push(info);
        (a, bm)
    }
}

/// `nn.Linear` with an optional peft LoRA adapter.
#[derive(Debug)]
pub struct LoraLinear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// `(lora_A [r, in], lora_B [out, r], scaling)`.
    pub lora: Option<(Tensor, Tensor, f64)>,
}

impl LoraLinear {
    pub fn new(p: &Paths, in_features: i64, out_features: i64, bias: bool) -> Result<Self> {
        let weight = p.base("weight", &[out_features, in_features])?;
        let bias = if bias {
            Some(p.base("bias", &[out_features])?)
        } else {
            None
        };
        let lora = p.lora_here().map(|cfg| {
            let info = LoraModuleInfo {
                path: p.name(),
                in_features,
                out_features,
                kernel: None,
            };
            let (a, b) = p.lora_pair(&[cfg.rank, in_features], &[out_features, cfg.rank], info);
            (a, b, cfg.scaling())
        });
        Ok(Self { weight, bias, lora })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match &self.lora {
            None => x.linear(&self.weight, self.bias.as_ref()),
            Some((a, b, s)) => {
                let (a, b) = in_kind(a, b, x.kind());
                let x2 = as_rows(x);
                let y = lora_product(&x2, &self.weight, self.bias.as_ref(), &a, &b, *s);
                y.view(out_shape(x, y.size()[1]).as_slice())
            }
        }
    }
}

impl LoraLinear {
    /// `forward(x).chunk(n, -1)`, each chunk computed as its own product with its rows of the
    /// weight (and of `lora_B`): contiguous outputs, so the elementwise work after them runs
    /// vectorised (GEGLU's `hidden * gelu(gate)` on `chunk`'s strided halves does not).
    pub fn forward_chunks(&self, x: &Tensor, n: i64) -> Vec<Tensor> {
        let rows = self.weight.size()[0] / n;
        let x2 = as_rows(x);
        // the LoRA's down-projection is shared by every chunk
        let lora = self.lora.as_ref().map(|(a, b, s)| {
            let (a, b) = in_kind(a, b, x.kind());
            (x2.linear::<Tensor>(&a, None), b, *s)
        });
        (0..n)
            .map(|i| {
                let w = self.weight.narrow(0, i * rows, rows);
                let bias = self.bias.as_ref().map(|b| b.narrow(0, i * rows, rows));
                let y = x2.linear(&w, bias.as_ref());
                let y = match &lora {
                    None => y,
                    Some((h, b, s)) => add_lora_up(y, h, &b.narrow(0, i * rows, rows), *s),
                };
                y.view(out_shape(x, rows).as_slice())
            })
            .collect()
    }
}

/// Linear layers that read the same input (an attention's q/k/v, or a cross attention's k/v),
/// run as one: their frozen weights (and biases) packed in one tensor whose rows the layers'
/// own weights now view, so the projections are one GEMM each way and the input's gradient
/// gathers two contributions instead of one per layer and LoRA. Their LoRAs run packed too:
/// the A matrices stacked (one down-projection) and the B matrices as a block diagonal (one
/// up-projection accumulated into the packed output). With equal widths and ranks (an
/// attention's) the block diagonal is the stacked B times a broadcast identity, whose backward
/// hands each B a contiguous gradient (`block_diag`'s hands out strided blocks, which
/// `FlatParams::backward` would have to copy one by one). The maths per output is the layers' own;
/// ONNX Runtime packs attention projections the same way (its MultiHeadAttention's packed QKV).
#[derive(Debug)]
pub struct PackedLinears {
    weight: Tensor,
    bias: Option<Tensor>,
    /// Each layer's output width, in packing order.
    widths: Vec<i64>,
    /// `eye(n)` as `[n, 1, n, 1]` in the weights' dtype: places row block i of the stacked B in
    /// column block i.
    eye: Tensor,
}

impl PackedLinears {
    /// Pack `layers` (same input width, dtype and device; all with a bias or none): their weights
    /// are copied into one tensor and rebound to views of it, in place (the base store's handles
    /// see the views too, and the separate copies are freed). `None` when they cannot be packed.
    pub fn pack(layers: &mut [&mut LoraLinear]) -> Option<Self> {
        let first = layers.first()?;
        let (inner, kind, device) = (
            first.weight.size().get(1).copied()?,
            first.weight.kind(),
            first.weight.device(),
        );
        let same = layers.iter().all(|l| {
            l.weight.dim() == 2
                && l.weight.size()[1] == inner
                && l.weight.kind() == kind
                && l.weight.device() == device
                && l.bias.is_some() == first.bias.is_some()
        });
        if !same || layers.len() < 2 {
            return None;
        }
        let _guard = tch::no_grad_guard();
        let widths: Vec<i64> = layers.iter().map(|l| l.weight.size()[0]).collect();
        let weight = Tensor::cat(&layers.iter().map(|l| &l.weight).collect::<Vec<_>>(), 0);
        let bias = first.bias.is_some().then(|| {
            Tensor::cat(
                &layers
                    .iter()
                    .filter_map(|l| l.bias.as_ref())
                    .collect::<Vec<_>>(),
                0,
            )
        });
        let mut offset = 0;
        for (l, &w) in layers.iter_mut().zip(&widths) {
            let _ = l.weight.set_source_tensor_storage_offset_(
                &weight,
                offset * inner,
                [w, inner],
                [inner, 1],
            );
            if let (Some(b), Some(packed)) = (l.bias.as_mut(), bias.as_ref()) {
                let _ = b.set_source_tensor_storage_offset_(packed, offset, [w], [1]);
            }
            offset += w;
        }
        let n = widths.len() as i64;
        let eye = Tensor::eye(n, (kind, device)).view([n, 1, n, 1]);
        Some(Self {
            weight,
            bias,
            widths,
            eye,
        })
    }

    /// `[l.forward(x) for l in layers]` (the layers given to [`Self::pack`], same order) as one
    /// product: views of one `[…, Σ out]` output.
    pub fn forward(&self, layers: &[&LoraLinear], x: &Tensor) -> Vec<Tensor> {
        let x2 = as_rows(x);
        let y = if layers.iter().any(|l| l.lora.is_some()) {
            let (k, dev) = (x.kind(), x.device());
            let mut downs = Vec::new();
            let mut ups = Vec::new();
            for (l, &w) in layers.iter().zip(&self.widths) {
                match &l.lora {
                    Some((a, b, s)) => {
                        let (a, b) = in_kind(a, b, k);
                        downs.push(a);
                        ups.push(if *s == 1.0 { b } else { b * *s });
                    }
                    // no adapter: zero rows of the block diagonal, no columns
                    None => ups.push(Tensor::zeros([w, 0], (k, dev))),
                }
            }
            let (n, w0, r0) = (ups.len() as i64, ups[0].size()[0], ups[0].size()[1]);
            let b = if r0 > 0 && ups.iter().all(|u| u.size() == [w0, r0]) {
                // [n·w, r] → [n, w, 1, r] · [n, 1, n, 1] → [n·w, n·r]
                let eye = if self.eye.kind() == k {
                    self.eye.shallow_clone()
                } else {
                    self.eye.to_kind(k)
                };
                (Tensor::cat(&ups, 0).view([n, w0, 1, r0]) * eye).view([n * w0, n * r0])
            } else {
                Tensor::block_diag(&ups)
            };
            let a = Tensor::cat(&downs, 0);
            lora_product(&x2, &self.weight, self.bias.as_ref(), &a, &b, 1.0)
        } else {
            x2.linear(&self.weight, self.bias.as_ref())
        };
        y.split_with_sizes(self.widths.as_slice(), 1)
            .into_iter()
            .map(|part| {
                let w = part.size()[1];
                part.view(out_shape(x, w).as_slice())
            })
            .collect()
    }
}

/// `x W^T + bias + scaling · (x A^T) B^T` for rows `x`: one autograd node where the fused
/// operation applies (`fused::lora_linear`: the input gradient's two parts meet inside a GEMM),
/// else composed from ATen's products ([`add_lora_up`]).
fn lora_product(
    x2: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scaling: f64,
) -> Tensor {
    let b = if scaling == 1.0 {
        b.shallow_clone()
    } else {
        b * scaling
    };
    if let Some(y) = crate::train::fused::lora_linear(x2, w, bias, a, &b) {
        return y;
    }
    let y = x2.linear(w, bias);
    add_lora_up(y, &x2.linear::<Tensor>(a, None), &b, 1.0)
}

/// The LoRA weights in the activations' dtype: peft casts the input to the adapter dtype; in
/// mixed precision the f32 master weights are cast to the compute dtype instead (what autocast
/// does for matmul). FlatParams normally hands the model compute-dtype views already, so the
/// cast is the fallback.
fn in_kind(a: &Tensor, b: &Tensor, k: Kind) -> (Tensor, Tensor) {
    if a.kind() == k {
        (a.shallow_clone(), b.shallow_clone())
    } else {
        (a.to_kind(k), b.to_kind(k))
    }
}

/// `x` as a matrix of rows `[…, in]` → `[N, in]` (a view when `x` is contiguous).
fn as_rows(x: &Tensor) -> Tensor {
    let size = x.size();
    x.reshape([-1, size[size.len() - 1]])
}

/// `x`'s shape with its last dimension `out`.
fn out_shape(x: &Tensor, out: i64) -> Vec<i64> {
    let mut size = x.size();
    if let Some(last) = size.last_mut() {
        *last = out;
    }
    size
}

/// `y + scaling · h Bᵀ` (peft's `lora.Linear.forward`: `result + lora_B(lora_A(x)) * scaling`) with
/// the up-projection accumulated into the base output `y [N, out]` by the GEMM itself (beta = 1),
/// instead of writing `h Bᵀ` out and adding it in a second pass over `[N, out]`. `y` is a fresh
/// matrix product that no autograd node saved (mm/addmm keep their inputs, not their output), so
/// updating it in place is allowed, and `addmm_`'s gradient with respect to `y` is the identity.
/// The scaling goes on the small `[out, r]` weight (1, the script's `alpha = rank`, costs nothing).
fn add_lora_up(mut y: Tensor, h: &Tensor, b: &Tensor, scaling: f64) -> Tensor {
    let bt = if scaling == 1.0 {
        b.tr()
    } else {
        b.tr() * scaling
    };
    let _ = y.addmm_(h, &bt);
    y
}

/// `nn.Conv2d` with an optional peft LoRA adapter.
#[derive(Debug)]
pub struct LoraConv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: i64,
    pub padding: i64,
    pub lora: Option<(Tensor, Tensor, f64)>,
}

impl LoraConv2d {
    pub fn new(p: &Paths, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> Result<Self> {
        let weight = p.base("weight", &[cout, cin, k, k])?;
        let bias = Some(p.base("bias", &[cout])?);
        let lora = p.lora_here().map(|cfg| {
            let info = LoraModuleInfo {
                path: p.name(),
                in_features: cin,
                out_features: cout,
                kernel: Some((k, k)),
            };
            let (a, b) = p.lora_pair(&[cfg.rank, cin, k, k], &[cout, cfg.rank, 1, 1], info);
            (a, b, cfg.scaling())
        });
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            lora,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_with_bias(x, self.bias.as_ref())
    }

    /// [`Self::forward`] with `bias` in place of the layer's own (`None`: without one): callers
    /// fold the bias into a per-channel term they add anyway (ATen adds a cuDNN convolution's
    /// bias in a pass of its own over the output, aten/src/ATen/native/Convolution.cpp).
    pub fn forward_with_bias(&self, x: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let (s, pd) = ([self.stride, self.stride], [self.padding, self.padding]);
        let y = x.conv2d(&self.weight, bias, s, pd, [1, 1], 1);
        match &self.lora {
            None => y,
            Some((a, b, sc)) => {
                let (a, b) = in_kind(a, b, x.kind());
                let h = x.conv2d::<Tensor>(&a, None, s, pd, [1, 1], 1);
                let d = h.conv2d::<Tensor>(&b, None, [1, 1], [0, 0], [1, 1], 1);
                if *sc == 1.0 { y + d } else { y + d * *sc }
            }
        }
    }
}

impl LoraConv2d {
    /// This 1×1, stride-1, unpadded convolution as the matrix product it is, over the channels of
    /// `x`'s last dimension (`[…, cin]` → `[…, cout]`): what the convolution computes for each
    /// pixel, without cuDNN's NCHW↔NHWC transposes around it. The LoRA as in [`Self::forward`].
    pub fn forward_pointwise(&self, x: &Tensor) -> Tensor {
        let size = self.weight.size();
        debug_assert!(
            size[2..] == [1, 1] && self.stride == 1 && self.padding == 0,
            "a pointwise convolution"
        );
        let as_matrix = |t: &Tensor| t.reshape([t.size()[0], t.size()[1]]);
        let w = as_matrix(&self.weight);
        match &self.lora {
            None => x.linear(&w, self.bias.as_ref()),
            Some((a, b, sc)) => {
                let (a, b) = in_kind(&as_matrix(a), &as_matrix(b), x.kind());
                let x2 = as_rows(x);
                let y = x2.linear(&w, self.bias.as_ref());
                let y = add_lora_up(y, &x2.linear::<Tensor>(&a, None), &b, *sc);
                y.view(out_shape(x, y.size()[1]).as_slice())
            }
        }
    }
}

/// `nn.GroupNorm` (affine).
#[derive(Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: i64,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(p: &Paths, groups: i64, channels: i64, eps: f64) -> Result<Self> {
        if groups <= 0 || channels % groups != 0 {
            return Err(Error::InvalidArgument(format!(
                "{}: {channels} channels do not split into {groups} groups",
                p.name()
            )));
        }
        Ok(Self {
            weight: p.base("weight", &[channels])?,
            bias: p.base("bias", &[channels])?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_act(x, false)
    }

    /// GroupNorm then SiLU (every ResnetBlock2D's and the UNet's `conv_norm_out` pattern), fused
    /// on channels-last CUDA activations ([`super::fused`]).
    pub fn forward_silu(&self, x: &Tensor) -> Tensor {
        self.forward_act(x, true)
    }

    fn forward_act(&self, x: &Tensor, silu: bool) -> Tensor {
        let (w, b) = (&self.weight, &self.bias);
        if let Some(y) = super::fused::group_norm(x, w, b, self.groups, self.eps, silu) {
            return y;
        }
        let y = x.group_norm(self.groups, Some(w), Some(b), self.eps, true);
        if silu { y.silu() } else { y }
    }
}

/// `nn.LayerNorm` over the last dimension (affine).
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub dim: i64,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(p: &Paths, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: p.base("weight", &[dim])?,
            bias: p.base("bias", &[dim])?,
            dim,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// Initialise every LoRA pair of `lora_vs` as peft does, visiting tensors in sorted name order
/// with one generator (so the result does not depend on construction order).
pub fn init_lora(
    lora_vs: &nn::VarStore,
    init: LoraInit,
    rank: i64,
    rng: &mut impl Rng,
) -> Result<()> {
    let vars: BTreeMap<String, Tensor> = lora_vs.variables().into_iter().collect();
    tch::no_grad(|| -> Result<()> {
        for (name, t) in &vars {
            let mut t = t.shallow_clone();
            if name.ends_with(".lora_B.weight") {
                let _ = t.zero_();
                continue;
            }
            let size = t.size();
            let n: i64 = size.iter().product();
            let fan_in: i64 = size.iter().skip(1).product();
            let vals: Vec<f32> = match init {
                LoraInit::Gaussian => {
                    let std = 1.0 / rank as f64;
                    (0..n)
                        .map(|_| {
                            let z: f64 = StandardNormal.sample(rng);
                            (z * std) as f32
                        })
                        .collect()
                }
                LoraInit::Kaiming => {
                    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
                    (0..n)
                        .map(|_| rng.random_range(-bound..bound) as f32)
                        .collect()
                }
            };
            let src = Tensor::from_slice(&vals)
                .reshape(&size)
                .to_device(t.device());
            t.copy_(&src);
        }
        Ok(())
    })
}

/// The LoRA tensors of `lora_vs` by module path: `path → (lora_A, lora_B)`.
pub fn lora_pairs(lora_vs: &nn::VarStore) -> BTreeMap<String, (Tensor, Tensor)> {
    let mut a: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut b: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, t) in lora_vs.variables() {
        if let Some(p) = name.strip_suffix(".lora_A.weight") {
            a.insert(p.to_string(), t);
        } else if let Some(p) = name.strip_suffix(".lora_B.weight") {
            b.insert(p.to_string(), t);
        }
    }
    a.into_iter()
        .filter_map(|(p, ta)| b.remove(&p).map(|tb| (p, (ta, tb))))
        .collect()
}
