//! Reading a LoRA file of any supported dialect into one canonical [`LoraAdapter`].
//!
//! Steps: parse every key with [`keys::parse_lora_key`] (the key grammar lives in
//! `weights::keys`), detect SDXL files, resolve each module to canonical `(Component, path)`
//! with a [`Resolver`] (against the caller's module list when given), group a module's tensors,
//! decide its kind (LoRA / LoCon-Tucker, LoHa, LoKr, full diff), validate shapes, and compute
//! the scale each upstream loader would use:
//!
//! | source | scale |
//! |---|---|
//! | kohya / LyCORIS `.alpha` | `alpha / rank`; no alpha or `alpha == 0` → 1 (sd-scripts `networks/lora.py`, LyCORIS `modules/{loha,lokr}.py`) |
//! | LoKr with both factors full | 1 (LyCORIS: "use scale = 1") |
//! | diffusers `lora_adapter_metadata` / PEFT `adapter_config.json` | `lora_alpha / r` (or `/ sqrt(r)` with `use_rslora`), with `rank_pattern` / `alpha_pattern` matched as PEFT does (`get_pattern_key`: `^(.*\.)?(<pattern>)$` on the module name) |
//! | diffusers / attn-procs without either | `.alpha` keys if present (`alpha / rank`), else 1 |
//!
//! Every key that ends up in no module is reported in [`LoraAdapter::unmapped`] with its reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::weights::keys::{self, UnmappedReason};
use crate::weights::{Component, Dtype, ModuleSet, Tensor, WeightFile};
use crate::{Error, Result};

mod config;
mod read;
mod write;

pub use self::config::PeftConfig;
pub use self::read::read_file;
use self::read::{check_loha_shapes, check_lokr_shapes, check_lora_shapes};
pub use self::write::{WriteOptions, WriteStyle, write};

/// The dialect a LoRA file was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// `unet.<path>.lora_A.weight` (diffusers `save_lora_weights` today).
    Diffusers,
    /// `unet.<path>.lora.down.weight` / `text_encoder.<path>.lora_linear_layer.down.weight`.
    DiffusersLegacy,
    /// `base_model.model.<path>.lora_A[.<adapter>].weight` (PEFT `save_pretrained`).
    PeftRaw,
    /// `lora_unet_<name>.lora_down.weight` + `.alpha` (sd-scripts, A1111, Civitai).
    Kohya,
    /// kohya names with LyCORIS tensors (LoHa `hada_*`, LoKr `lokr_*`, LoCon `lora_mid`, `diff`).
    Lycoris,
    /// `unet.<path>.processor.to_q_lora.down.weight` (diffusers 0.17–0.20 `save_attn_procs`).
    AttnProcs,
}

impl std::fmt::Display for Dialect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dialect::Diffusers => "diffusers (lora_A/lora_B)",
            Dialect::DiffusersLegacy => "diffusers legacy (lora.down/lora.up, lora_linear_layer)",
            Dialect::PeftRaw => "PEFT (base_model.model.)",
            Dialect::Kohya => "kohya (lora_unet_/lora_te_)",
            Dialect::Lycoris => "LyCORIS (kohya names)",
            Dialect::AttnProcs => "diffusers attn-procs (to_q_lora)",
        })
    }
}

/// A factor of a LoKr Kronecker product: stored whole or as a low-rank product `a @ b`.
#[derive(Debug, Clone, PartialEq)]
pub enum KronFactor {
    Full(Tensor),
    LowRank { a: Tensor, b: Tensor },
}

/// The adapter tensors of one module (all f32, torch layout, shapes validated).
#[derive(Debug, Clone, PartialEq)]
pub enum LoraKind {
    /// Standard LoRA: `down` `[r,in]` or `[r,in,kh,kw]`; `up` `[out,r]` or `[out,r,1,1]`. With `mid`
    /// (LoCon Tucker): `down` `[r1,in,1,1]`, `mid` `[r2,r1,kh,kw]`, `up` `[out,r2,1,1]`.
    Lora {
        down: Tensor,
        up: Tensor,
        mid: Option<Tensor>,
    },
    /// LyCORIS LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b); w1a `[out,r]`, w1b `[r,in·kh·kw]`. With Tucker
    /// cores t1/t2 `[r,r,kh,kw]`: w1a `[r,out]`, w1b `[r,in]`.
    LoHa {
        w1a: Tensor,
        w1b: Tensor,
        w2a: Tensor,
        w2b: Tensor,
        t1: Option<Tensor>,
        t2: Option<Tensor>,
    },
    /// LyCORIS LoKr: ΔW = w1 ⊗ w2; with Tucker core `t2` `[r,r,kh,kw]`: w2 = t2 ×₁ w2a ×₂ w2b.
    LoKr {
        w1: KronFactor,
        w2: KronFactor,
        t2: Option<Tensor>,
    },
    /// LyCORIS "full": ΔW = diff.
    Full { diff: Tensor },
}

impl LoraKind {
    /// Check that the tensors fit together (what [`read`] guarantees; use it on hand-built
    /// modules). The message names the mismatch.
    pub fn check(&self) -> std::result::Result<(), String> {
        let tensors: Vec<&Tensor> = match self {
            LoraKind::Lora { down, up, mid } => [Some(down), Some(up), mid.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
            LoraKind::LoHa {
                w1a,
                w1b,
                w2a,
                w2b,
                t1,
                t2,
            } => [
                Some(w1a),
                Some(w1b),
                Some(w2a),
                Some(w2b),
                t1.as_ref(),
                t2.as_ref(),
            ]
            .into_iter()
            .flatten()
            .collect(),
            LoraKind::LoKr { w1, w2, t2 } => {
                let mut v = Vec::new();
                for f in [w1, w2] {
                    match f {
                        KronFactor::Full(w) => v.push(w),
                        KronFactor::LowRank { a, b } => v.extend([a, b]),
                    }
                }
                v.extend(t2.as_ref());
                v
            }
            LoraKind::Full { diff } => vec![diff],
        };
        for t in tensors {
            if t.shape.iter().product::<usize>() != t.data.len() {
                return Err(format!(
                    "tensor of shape {:?} holds {} values",
                    t.shape,
                    t.data.len()
                ));
            }
        }
        match self {
            LoraKind::Lora { down, up, mid } => check_lora_shapes(down, up, mid.as_ref()),
            LoraKind::LoHa { t1, t2, .. } if t1.is_some() != t2.is_some() => {
                Err("LoHa Tucker needs both hada_t1 and hada_t2".into())
            }
            LoraKind::LoHa {
                w1a,
                w1b,
                w2a,
                w2b,
                t1,
                t2,
            } => check_loha_shapes(w1a, w1b, w2a, w2b, t1.as_ref(), t2.as_ref()),
            LoraKind::LoKr { w1, w2, t2 } => check_lokr_shapes(w1, w2, t2.as_ref()),
            LoraKind::Full { diff } if diff.shape.len() < 2 => {
                Err(format!("diff {:?} must be 2-D or more", diff.shape))
            }
            LoraKind::Full { .. } => Ok(()),
        }
    }
}

/// One module's adapter, in canonical form.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    pub component: Component,
    /// Canonical module path (see `weights::keys`: text encoder without `text_model.`).
    pub module_path: String,
    pub kind: LoraKind,
    /// The alpha the file (or its config) gives for this module.
    pub alpha: Option<f32>,
    /// Rank (rows of `down`; LoHa/LoKr: rows of the `_b` factor; 0 for full matrices).
    pub rank: usize,
    /// Factor applied to the raw product: ΔW = scale · product.
    pub scale: f32,
    /// The file keys that made this module.
    pub keys: Vec<String>,
}

/// A key that maps to no module, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Unmapped {
    pub key: String,
    pub reason: UnmappedReason,
}

impl std::fmt::Display for Unmapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.key, self.reason)
    }
}

/// A LoRA file in canonical form.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub path: PathBuf,
    pub dialect: Dialect,
    pub modules: Vec<LoraModule>,
    pub unmapped: Vec<Unmapped>,
    /// The safetensors `__metadata__` (kohya `ss_*`, diffusers `lora_adapter_metadata`, ...).
    pub metadata: BTreeMap<String, String>,
    /// Storage dtype of the adapter tensors (the most common one).
    pub dtype: Option<Dtype>,
    /// How the scales were decided (which config, which fallbacks).
    pub notes: Vec<String>,
}

impl LoraAdapter {
    /// The module adapter for `(component, path)`, if any.
    pub fn module(&self, component: Component, path: &str) -> Option<&LoraModule> {
        let path = keys::canonical_path(component, path);
        self.modules
            .iter()
            .find(|m| m.component == component && m.module_path == path)
    }

    /// Whether the file was recognised as an SDXL LoRA.
    pub fn is_sdxl(&self) -> bool {
        !self.unmapped.is_empty()
            && self
                .unmapped
                .iter()
                .all(|u| matches!(u.reason, UnmappedReason::Sdxl(_)))
    }

    /// `Ok` when every key mapped; otherwise an error listing the unmapped keys.
    pub fn require_complete(&self) -> Result<()> {
        if self.unmapped.is_empty() {
            return Ok(());
        }
        let mut msg = format!(
            "{} of the LoRA's keys map to no module:",
            self.unmapped.len()
        );
        for u in self.unmapped.iter().take(10) {
            msg.push_str(&format!("\n  {u}"));
        }
        if self.unmapped.len() > 10 {
            msg.push_str(&format!("\n  ... and {} more", self.unmapped.len() - 10));
        }
        Err(Error::Lora {
            file: self.path.clone(),
            msg,
        })
    }
}

/// How to read a LoRA file.
#[derive(Default, Clone, Copy)]
pub struct ReadOptions<'a> {
    /// The model's modules: resolves kohya names and checks dotted ones. Without it, SD 1.x
    /// diffusers naming rules are used and module existence is not checked.
    pub modules: Option<&'a dyn ModuleSet>,
    /// A PEFT `adapter_config.json` to take `r` / `lora_alpha` from. Without it, a sibling
    /// `<stem>_adapter_config.json`, `<stem>.adapter_config.json` or `adapter_config.json` is used.
    pub adapter_config: Option<&'a Path>,
}

/// Read a LoRA safetensors file.
pub fn read(path: impl AsRef<Path>, opts: &ReadOptions<'_>) -> Result<LoraAdapter> {
    let file = WeightFile::open(path.as_ref())?;
    read_file(&file, opts)
}
