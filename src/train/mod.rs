//! LoRA training with libtorch (tch), behind the `train` feature: the recipe of diffusers'
//! `examples/text_to_image/train_text_to_image_lora.py`, on models whose module names mirror
//! diffusers so diffusers safetensors load by name.
//!
//! ```text
//! diffusers folder ─► weights::FileSource ─► Paths(base VarStore, frozen │ LoRA VarStore, trainable)
//!     unet_2d::UNet2DConditionModel (LoRA on to_q/to_k/to_v/to_out.0 by default)
//!     clip::ClipTextModel, vae::VaeEncoder (frozen; their outputs are cached once)
//! dataset::Dataset ─► trainer::Trainer (DDPM noise, MSE, AdamW, LR schedule, checkpoints)
//!     ─► output::save_lora (diffusers dialect, or kohya with ss_* metadata, through crate::lora)
//! ```
//!
//! Files are named like the diffusers modules they port; each cites its upstream file.

pub mod attention;
pub mod buckets;
pub mod captions;
pub mod clip;
pub mod cuda_graph;
pub mod dataset;
pub mod embeddings;
pub mod fused;
pub mod lora;
pub mod noise;
pub mod optim;
pub mod output;
pub mod resnet;
mod shim;
pub mod single_file;
pub mod tensorboard;
pub mod torch_profiler;
pub mod trainer;
pub mod unet_2d;
pub mod unet_2d_blocks;
pub mod vae;
pub mod validation;
pub mod weights;

use std::path::{Path, PathBuf};

use tch::{Device, Kind, nn};

pub use self::clip::{ClipTextConfig, ClipTextModel};
pub use self::lora::{Builder, LoraConfig, LoraInit, LoraModuleInfo, Paths};
pub use self::unet_2d::{UNet2DConditionConfig, UNet2DConditionModel};
pub use self::vae::{AutoencoderKlConfig, VaeDecoder, VaeEncoder};
pub use self::weights::{FileSource, WeightSource};
use crate::{Error, Result};

/// A model with the stores that hold its weights.
pub struct Loaded<M> {
    pub model: M,
    /// Frozen base weights (named as in the diffusers file).
    pub base: nn::VarStore,
    /// Trainable LoRA tensors (`<module>.lora_A.weight`, `<module>.lora_B.weight`), f32.
    pub lora: nn::VarStore,
    /// The modules that carry a LoRA, in construction order.
    pub lora_modules: Vec<LoraModuleInfo>,
    /// Keys of the weight file the model did not use.
    pub unused_keys: Vec<String>,
}

/// The weights file of a diffusers component folder: `<name>.safetensors`, else the `.fp16` variant.
pub fn component_weights(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::io(
        dir.join(format!("{stem}.safetensors")),
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no weights file (.safetensors or .fp16.safetensors)",
        ),
    ))
}

/// Store every 4-D tensor of `vs` (the frozen convolution weights) in channels-last order, in
/// place: `model.to(memory_format=torch.channels_last)` for frozen weights (torch's
/// docs "Channels Last Memory Format"). cuDNN then runs NHWC convolutions and keeps their outputs
/// NHWC; values are unchanged, only strides move. Returns how many tensors moved.
pub fn to_channels_last(vs: &nn::VarStore) -> Result<usize> {
    let _guard = tch::no_grad_guard();
    let mut n = 0;
    for (name, mut t) in vs.variables() {
        let size = t.size();
        let &[_, c, h, w] = size.as_slice() else {
            continue;
        };
        let strides = [c * h * w, 1, w * c, c];
        if t.stride() == strides {
            continue;
        }
        let moved = tch::Tensor::f_empty_strided(size.as_slice(), strides, (t.kind(), t.device()))
            .and_then(|mut cl| cl.f_copy_(&t).map(|()| cl))
            .and_then(|cl| t.f_set_source_tensor_(&cl).map(drop));
        moved.map_err(|e| Error::Internal(format!("{name}: channels-last copy: {e}")))?;
        n += 1;
    }
    Ok(n)
}

fn build<M>(
    source: &dyn WeightSource,
    kind: Kind,
    device: Device,
    lora: Option<LoraConfig>,
    f: impl FnOnce(&Paths) -> Result<M>,
) -> Result<Loaded<M>> {
    let base = nn::VarStore::new(device);
    let lora_vs = nn::VarStore::new(device);
    let b = Builder::new(source, kind, device, lora);
    let model = {
        let p = Paths::root(&base, &lora_vs, &b);
        f(&p)?
    };
    let mut base = base;
    base.freeze();
    Ok(Loaded {
        model,
        base,
        lora: lora_vs,
        lora_modules: b.lora_modules(),
        unused_keys: b.unused_keys(),
    })
}

/// `UNet2DConditionModel.from_pretrained(dir, subfolder="unet")`, base weights as `kind`,
/// LoRA layers per `lora`.
pub fn load_unet(
    root: &Path,
    device: Device,
    kind: Kind,
    lora: Option<LoraConfig>,
) -> Result<Loaded<UNet2DConditionModel>> {
    let dir = root.join("unet");
    let cfg = UNet2DConditionConfig::from_file(dir.join("config.json"))?;
    let src = FileSource::open(component_weights(&dir, "diffusion_pytorch_model")?)?;
    build(&src, kind, device, lora, |p| {
        UNet2DConditionModel::new(p, &cfg)
    })
}

/// `CLIPTextModel.from_pretrained(dir, subfolder="text_encoder")` (keys with or without `text_model.`).
pub fn load_text_encoder(
    root: &Path,
    device: Device,
    kind: Kind,
    lora: Option<LoraConfig>,
) -> Result<Loaded<ClipTextModel>> {
    let dir = root.join("text_encoder");
    let cfg = ClipTextConfig::from_file(dir.join("config.json"))?;
    let src = FileSource::open(component_weights(&dir, "model")?)?.with_alias_prefix("text_model.");
    build(&src, kind, device, lora, |p| ClipTextModel::new(p, &cfg))
}

/// The encoder half of `AutoencoderKL.from_pretrained(dir, subfolder="vae")`.
pub fn load_vae_encoder(root: &Path, device: Device, kind: Kind) -> Result<Loaded<VaeEncoder>> {
    let dir = root.join("vae");
    let cfg = AutoencoderKlConfig::from_file(dir.join("config.json"))?;
    let src = FileSource::open(component_weights(&dir, "diffusion_pytorch_model")?)?;
    build(&src, kind, device, None, |p| VaeEncoder::new(p, &cfg))
}

/// The decoder half of `AutoencoderKL.from_pretrained(dir, subfolder="vae")`.
pub fn load_vae_decoder(root: &Path, device: Device, kind: Kind) -> Result<Loaded<VaeDecoder>> {
    let dir = root.join("vae");
    let cfg = AutoencoderKlConfig::from_file(dir.join("config.json"))?;
    let src = FileSource::open(component_weights(&dir, "diffusion_pytorch_model")?)?;
    build(&src, kind, device, None, |p| VaeDecoder::new(p, &cfg))
}

/// Where the base model comes from: a diffusers folder or an SD 1.x single-file checkpoint.
pub enum ModelSource {
    Diffusers(PathBuf),
    SingleFile {
        file: Box<single_file::SingleFile>,
        tokenizer: PathBuf,
    },
}

impl ModelSource {
    /// `path` is a diffusers pipeline folder or a `.safetensors` single-file checkpoint; single
    /// files carry no tokenizer, so `tokenizer` (or a `tokenizer/` folder beside the file) names one.
    pub fn open(path: &Path, tokenizer: Option<&Path>) -> Result<Self> {
        if path.is_dir() {
            if !path.join("unet").is_dir() {
                return Err(Error::InvalidArgument(format!(
                    "{}: not a diffusers pipeline folder (no unet/) nor a single-file checkpoint",
                    path.display()
                )));
            }
            return Ok(Self::Diffusers(path.to_path_buf()));
        }
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such model folder or file"),
            ));
        }
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            return Err(Error::InvalidArgument(format!(
                "{}: only .safetensors single-file checkpoints are read (pickled .ckpt files are not)",
                path.display()
            )));
        }
        let file = Box::new(single_file::SingleFile::open(path)?);
        let beside = path.parent().map(|p| p.join("tokenizer"));
        let tokenizer = match (tokenizer, beside) {
            (Some(t), _) => t.to_path_buf(),
            (None, Some(b)) if b.is_dir() => b,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "{}: single-file checkpoints carry no tokenizer; pass --tokenizer DIR (vocab.json + merges.txt, e.g. a diffusers pipeline's tokenizer/)",
                    path.display()
                )));
            }
        };
        Ok(Self::SingleFile { file, tokenizer })
    }

    pub fn unet(
        &self,
        device: Device,
        kind: Kind,
        lora: Option<LoraConfig>,
    ) -> Result<Loaded<UNet2DConditionModel>> {
        match self {
            Self::Diffusers(root) => load_unet(root, device, kind, lora),
            Self::SingleFile { file, .. } => {
                let src = file.source(single_file::Part::Unet);
                build(&src, kind, device, lora, |p| {
                    UNet2DConditionModel::new(p, &file.unet)
                })
            }
        }
    }

    pub fn text_encoder(
        &self,
        device: Device,
        kind: Kind,
        lora: Option<LoraConfig>,
    ) -> Result<Loaded<ClipTextModel>> {
        match self {
            Self::Diffusers(root) => load_text_encoder(root, device, kind, lora),
            Self::SingleFile { file, .. } => {
                let src = file.source(single_file::Part::TextEncoder);
                build(&src, kind, device, lora, |p| {
                    ClipTextModel::new(p, &file.text)
                })
            }
        }
    }

    pub fn vae_encoder(&self, device: Device, kind: Kind) -> Result<Loaded<VaeEncoder>> {
        match self {
            Self::Diffusers(root) => load_vae_encoder(root, device, kind),
            Self::SingleFile { file, .. } => {
                let src = file.source(single_file::Part::Vae);
                build(&src, kind, device, None, |p| VaeEncoder::new(p, &file.vae))
            }
        }
    }

    pub fn vae_decoder(&self, device: Device, kind: Kind) -> Result<Loaded<VaeDecoder>> {
        match self {
            Self::Diffusers(root) => load_vae_decoder(root, device, kind),
            Self::SingleFile { file, .. } => {
                let src = file.source(single_file::Part::Vae);
                build(&src, kind, device, None, |p| VaeDecoder::new(p, &file.vae))
            }
        }
    }

    pub fn tokenizer(&self) -> Result<crate::pipeline::tokenizer::ClipTokenizer> {
        match self {
            Self::Diffusers(root) => {
                crate::pipeline::tokenizer::ClipTokenizer::from_dir(root.join("tokenizer"))
            }
            Self::SingleFile { tokenizer, .. } => {
                crate::pipeline::tokenizer::ClipTokenizer::from_dir(tokenizer)
            }
        }
    }

    /// `scheduler/scheduler_config.json`, or SD 1.5's for a single file.
    pub fn scheduler_config(&self) -> Result<crate::pipeline::scheduler::SchedulerConfig> {
        match self {
            Self::Diffusers(root) => crate::pipeline::scheduler::SchedulerConfig::from_file(
                root.join("scheduler/scheduler_config.json"),
            ),
            Self::SingleFile { .. } => Ok(crate::pipeline::scheduler::SchedulerConfig::sd15()),
        }
    }
}

/// `--device auto|cpu|cuda|cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(Error::InvalidArgument(
                    "--device cuda: libtorch sees no CUDA device".into(),
                ))
            }
        }
        s => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) if (n as i64) < tch::Cuda::device_count() => Ok(Device::Cuda(n)),
            Some(n) => Err(Error::InvalidArgument(format!(
                "--device cuda:{n}: only {} CUDA devices",
                tch::Cuda::device_count()
            ))),
            None => Err(Error::InvalidArgument(format!(
                "--device {s}: expected auto, cpu, cuda or cuda:N"
            ))),
        },
    }
}
