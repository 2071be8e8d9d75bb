//! The training loop of diffusers' `examples/text_to_image/train_text_to_image_lora.py`
//! (https://github.com/huggingface/diffusers/blob/main/examples/text_to_image/train_text_to_image_lora.py),
//! with accelerate's gradient accumulation semantics:
//!
//! per micro-batch: `latents = vae.encode(pixels).latent_dist.sample() · scaling_factor`,
//! `noise = randn (+ noise_offset · randn[b, c, 1, 1])`, `t ~ U{0, T−1}`,
//! `noisy = add_noise(latents, noise, t)`, `ehs = text_encoder(ids)[0]`,
//! `target = noise | get_velocity(latents, noise, t)`, `loss = mse(pred, target)` (min-SNR-γ
//! weighted with `--snr_gamma`), `backward(loss / gradient_accumulation_steps)`;
//! per optimiser step (every `accumulation` micro-batches, and at the end of an epoch):
//! `clip_grad_norm_(lora, max_grad_norm)`, `AdamW.step()`, `lr_scheduler.step()`.
//!
//! Differences, all deliberate:
//! - The VAE and the text encoder are frozen, so their outputs are computed once (both flips;
//!   latent mean/logvar, sampled fresh every step) unless `cache_latents` is off. With a random
//!   crop the crop is then drawn once per image (kohya's caching does the same).
//! - Accumulated micro-batches run as one batch by default (`fuse_accumulation`): for a GroupNorm
//!   network this is the same gradient (each sample weighted `1 / (micro-batch size · accumulation)`).
//! - All randomness is a function of `(seed, epoch, batch index)` (shuffles, flips, timesteps,
//!   noise), drawn from our own generators (never libtorch's global one, so runs are
//!   reproducible in a multi-threaded host and CPU and CUDA see the same noise): a resumed run
//!   continues exactly where it stopped, bit-identical on the CPU.
//! - Resume continues inside the epoch (the script restarts the epoch's data order).
//!
//! Additions from kohya sd-scripts (docs/training.md):
//! - `enable_bucket`: aspect-ratio buckets (`super::buckets`); every batch holds images of one
//!   bucket, latents are cached per bucket, and a fused accumulation group whose micro-batches
//!   come from different buckets runs one forward/backward per bucket (same gradient).
//! - Caption controls (`super::captions`), drawn per example from `(seed, epoch, batch, slot)`.
//!   With shuffle or tag dropout the text embeddings are not cached (the frozen text encoder
//!   runs every step, without gradients); with caption dropout alone the empty caption's
//!   embedding is cached beside the others.

mod batches;
mod cache;
mod checkpoint;
mod logs;
mod meta;
mod run;
mod step;

pub use self::batches::bucket_epoch_batches;
pub use self::checkpoint::{TrainingState, list_checkpoints};
pub use self::logs::{ReportTo, TENSORBOARD_RUN};
use self::meta::lora_modules_of;
use self::run::Trainer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::Distribution;
use tch::{Device, Kind, Tensor};

use super::buckets::{BucketConfig, Buckets};
use super::captions::CaptionConfig;
use super::dataset::{self, Crop, Dataset};
use super::lora::{LoraConfig, lora_pairs};
use super::noise::{NoiseSchedule, Prediction};
use super::optim::{AdamW, AdamWConfig, FlatParams, LossScaler, LrSchedule, LrScheduler};
use super::output::{SaveFormat, modules_from, save_lora};
use super::validation::{ValidationConfig, Validator, write_images};
use super::{ClipTextModel, Loaded, UNet2DConditionModel, VaeEncoder};
use crate::image::{GeneratedImage, image_grid, write_png};
use crate::pipeline::scheduler::SchedulerConfig;
use crate::pipeline::tokenizer::ClipTokenizer;
use crate::weights::Dtype;
use crate::weights::keys::Component;
use crate::{Error, Result};

/// `--mixed_precision`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum MixedPrecision {
    No,
    Fp16,
    Bf16,
}

impl MixedPrecision {
    /// The dtype of the frozen weights and of the forward pass.
    pub fn kind(self) -> Kind {
        match self {
            MixedPrecision::No => Kind::Float,
            MixedPrecision::Fp16 => Kind::Half,
            MixedPrecision::Bf16 => Kind::BFloat16,
        }
    }
}

/// Everything a training run needs (the CLI maps the script's flags onto it).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// A diffusers-layout pipeline folder or an SD 1.x single-file `.safetensors` checkpoint.
    pub pretrained_model: PathBuf,
    /// The tokenizer folder for a single-file checkpoint (default: `tokenizer/` beside it).
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    pub train_data_dir: PathBuf,
    pub caption_column: String,
    pub image_column: String,
    pub skip_bad_images: bool,
    pub max_train_samples: Option<usize>,
    pub output_dir: PathBuf,
    pub resolution: u32,
    pub center_crop: bool,
    pub random_flip: bool,
    pub train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub max_train_steps: Option<i64>,
    pub num_train_epochs: i64,
    pub learning_rate: f64,
    pub scale_lr: bool,
    pub lr_scheduler: LrSchedule,
    pub lr_warmup_steps: i64,
    pub adam: AdamWConfig,
    pub max_grad_norm: f64,
    pub lora: LoraConfig,
    /// LoRA on the text encoder too (then text embeddings are not cached).
    pub text_encoder_lora: Option<LoraConfig>,
    pub mixed_precision: MixedPrecision,
    pub seed: Option<u64>,
    pub snr_gamma: Option<f64>,
    pub noise_offset: f64,
    pub prediction_type: Option<Prediction>,
    pub checkpointing_steps: i64,
    pub checkpoints_total_limit: Option<usize>,
    /// `latest` or a checkpoint folder.
    pub resume_from_checkpoint: Option<String>,
    pub validation: Option<ValidationConfig>,
    pub save_format: SaveFormat,
    /// Storage dtype of the written LoRA (F32 like the script, or F16/BF16).
    pub save_dtype: String,
    pub cache_latents: bool,
    pub fuse_accumulation: bool,
    /// kohya's `--enable_bucket`: aspect-ratio buckets of about `resolution²` pixels instead of
    /// the script's square resize and crop.
    pub enable_bucket: bool,
    /// kohya's bucket settings (used with `enable_bucket`).
    pub bucket: BucketConfig,
    /// kohya's `--random_crop` (with `enable_bucket`): a random instead of a centred crop.
    pub random_crop: bool,
    /// kohya's caption controls.
    pub captions: CaptionConfig,
    /// kohya's `--caption_extension` for image + caption-file folders (`None`: `.txt`, then
    /// `.caption`).
    pub caption_extension: Option<String>,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    pub device: String,
    /// `--report_to`: where the run's logs go.
    #[serde(default)]
    pub report_to: ReportTo,
    /// `--logging_dir`: the logs' folder, relative to `output_dir` (or absolute).
    #[serde(default = "default_logging_dir")]
    pub logging_dir: PathBuf,
    /// Testing hook: abort the process (like kill -9) right after this optimiser step.
    pub abort_after_step: Option<i64>,
}

impl TrainConfig {
    /// The script's defaults (`parse_args`), for `model` and `data`.
    pub fn new(pretrained_model: PathBuf, train_data_dir: PathBuf) -> Self {
        Self {
            pretrained_model,
            tokenizer: None,
            train_data_dir,
            caption_column: "text".into(),
            image_column: "image".into(),
            skip_bad_images: false,
            max_train_samples: None,
            output_dir: "sd-model-finetuned-lora".into(),
            resolution: 512,
            center_crop: false,
            random_flip: false,
            train_batch_size: 16,
            gradient_accumulation_steps: 1,
            max_train_steps: None,
            num_train_epochs: 100,
            learning_rate: 1e-4,
            scale_lr: false,
            lr_scheduler: LrSchedule::Constant,
            lr_warmup_steps: 500,
            adam: AdamWConfig::default(),
            max_grad_norm: 1.0,
            lora: LoraConfig::script_default(4),
            text_encoder_lora: None,
            mixed_precision: MixedPrecision::No,
            seed: None,
            snr_gamma: None,
            noise_offset: 0.0,
            prediction_type: None,
            checkpointing_steps: 500,
            checkpoints_total_limit: None,
            resume_from_checkpoint: None,
            validation: None,
            save_format: SaveFormat::Diffusers,
            save_dtype: "fp32".into(),
            cache_latents: true,
            fuse_accumulation: true,
            // kohya sd-scripts' defaults (train_util.py `add_dataset_arguments`)
            enable_bucket: false,
            bucket: BucketConfig {
                min_bucket_reso: 256,
                max_bucket_reso: 1024,
                bucket_reso_steps: 64,
                bucket_no_upscale: false,
            },
            random_crop: false,
            captions: CaptionConfig {
                shuffle_caption: false,
                keep_tokens: 0,
                keep_tokens_separator: String::new(),
                caption_dropout_rate: 0.0,
                caption_tag_dropout_rate: 0.0,
            },
            caption_extension: None,
            device: "auto".into(),
            report_to: ReportTo::Tensorboard,
            logging_dir: default_logging_dir(),
            abort_after_step: None,
        }
    }
}

/// The script's `--logging_dir` default.
fn default_logging_dir() -> PathBuf {
    "logs".into()
}

/// One optimiser step, as logged.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepLog {
    pub step: i64,
    pub epoch: i64,
    /// Mean loss of the step's samples (the script's `train_loss`).
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub samples_per_s: f64,
    pub elapsed_s: f64,
    /// CUDA memory in use on the device (bytes; includes the caching allocator's reserve).
    pub device_mem: Option<u64>,
    /// fp16: the step was skipped for inf/NaN gradients.
    pub skipped: bool,
}

/// What the trainer reports while it runs (the CLI draws these; the library prints nothing).
#[derive(Debug)]
pub enum Event<'a> {
    Info(String),
    Warning(String),
    /// Caching latents / text embeddings: `done` of `total`.
    Caching {
        what: &'static str,
        done: usize,
        total: usize,
    },
    Started {
        total_steps: i64,
        initial_step: i64,
        examples: usize,
        epochs: i64,
    },
    Step(&'a StepLog),
    Checkpoint(&'a Path),
    Validation(&'a [PathBuf]),
    Saved(&'a Path),
}

/// What a finished run produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    pub output: PathBuf,
    pub steps: i64,
    pub losses: Vec<f64>,
    pub mean_samples_per_s: f64,
    pub peak_device_mem: Option<u64>,
    pub seed: u64,
}

/// splitmix64 over the words: a seed for one stream of randomness.
fn derive(words: &[u64]) -> u64 {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for &w in words {
        x ^= w
            .wrapping_add(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(x << 6)
            .wrapping_add(x >> 2);
        let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x = z ^ (z >> 31);
    }
    x
}

const TAG_SHUFFLE: u64 = 1;
const TAG_BATCH: u64 = 2;
const TAG_NORMAL: u64 = 3;
const TAG_LORA: u64 = 4;
const TAG_CROP: u64 = 5;
const TAG_BUCKET: u64 = 6;
const TAG_CAPTION: u64 = 7;

/// The data order of `epoch`: a permutation of `0..n` (a `DataLoader(shuffle=True)`).
pub fn epoch_order(seed: u64, epoch: i64, n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut ChaCha20Rng::seed_from_u64(derive(&[
        seed,
        TAG_SHUFFLE,
        epoch as u64,
    ])));
    v
}

/// CUDA memory in use on the current device (`cudaMemGetInfo`: total − free), through the
/// `libcudart` libtorch already loaded. `None` off CUDA.
pub fn cuda_mem_used() -> Option<u64> {
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    static FN: std::sync::OnceLock<Option<MemGetInfo>> = std::sync::OnceLock::new();
    let f = (*FN.get_or_init(|| {
        const RTLD_NOLOAD: i32 = 4;
        for name in ["libcudart.so.13", "libcudart.so.12", "libcudart.so"] {
            // SAFETY: RTLD_NOLOAD only returns a library that is already loaded (by
            // libtorch_cuda); nothing is initialised by this call.
            let lib = unsafe {
                libloading::os::unix::Library::open(
                    Some(name),
                    libloading::os::unix::RTLD_NOW | RTLD_NOLOAD,
                )
            };
            let Ok(lib) = lib else { continue };
            // SAFETY: cudaMemGetInfo has this C signature in every CUDA runtime.
            let Ok(sym) = (unsafe { lib.get::<MemGetInfo>(b"cudaMemGetInfo\0") }) else {
                continue;
            };
            let f = *sym;
            // keep the (already loaded) library mapped for the process lifetime
            std::mem::forget(lib);
            return Some(f);
        }
        None
    }))?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: two valid out-pointers.
    let rc = unsafe { f(&mut free, &mut total) };
    (rc == 0).then(|| total.saturating_sub(free) as u64)
}

struct Cache {
    /// `[examples · flips, 2 · latent_c, h, w]` (mean ‖ logvar), f32: one tensor, or one per
    /// bucket.
    latents: Option<Vec<Tensor>>,
    /// Per example: its latent tensor and row (before flips).
    slots: Vec<(usize, usize)>,
    flips: usize,
    /// `[n_captions, 77, d]`, f32, when the text encoder is frozen and captions are not
    /// rewritten per step.
    embeddings: Option<Tensor>,
    /// Token ids `[n_captions, 77]` (for a trained text encoder).
    ids: Tensor,
    /// Per example: indices into the caption table.
    captions: Vec<Vec<usize>>,
    /// The caption table (the texts behind `ids` and `embeddings`).
    texts: Vec<String>,
    /// The empty caption's index in the table (with caption dropout).
    empty: Option<usize>,
    /// Captions are rewritten per step (shuffle or tag dropout): tokenized every step.
    tokenizer: Option<ClipTokenizer>,
    /// The aspect-ratio buckets (`enable_bucket`).
    buckets: Option<Buckets>,
}

struct Models {
    unet: Loaded<UNet2DConditionModel>,
    text: Option<Loaded<ClipTextModel>>,
    vae: Option<Loaded<VaeEncoder>>,
}

/// Check a `--save_precision` value (fp32, fp16, bf16 or their long names).
pub fn check_save_precision(s: &str) -> Result<()> {
    save_dtype(s).map(|_| ())
}

fn save_dtype(s: &str) -> Result<Dtype> {
    match s {
        "fp32" | "float32" | "no" => Ok(Dtype::F32),
        "fp16" | "float16" => Ok(Dtype::F16),
        "bf16" | "bfloat16" => Ok(Dtype::BF16),
        o => Err(Error::InvalidArgument(format!(
            "--save_precision {o}: expected fp32, fp16 or bf16"
        ))),
    }
}

/// Run a training job. `cancel`, when set, ends the run at the next optimiser step with a
/// checkpoint and [`Error::Cancelled`].
pub fn train(
    cfg: &TrainConfig,
    cancel: Option<&AtomicBool>,
    on_event: &mut dyn FnMut(Event),
) -> Result<TrainReport> {
    let mut t = Trainer::prepare(cfg, on_event)?;
    t.run(cancel, on_event)?;
    t.finish(on_event)
}

/// Validation images at `(tag, step)` as `validation/<tag>-<i>.png` and their grid
/// `validation/<tag>-grid.png` (prompt, seeds, settings and the training step in the PNG text);
/// returns the grid.
#[allow(clippy::too_many_arguments)]
fn validate(
    source: &super::ModelSource,
    cfg: &TrainConfig,
    unet: &UNet2DConditionModel,
    validator: &mut Option<Validator>,
    (device, kind): (Device, Kind),
    tokenizer: &ClipTokenizer,
    sched: &SchedulerConfig,
    (tag, step): (&str, i64),
    seed: u64,
    on_event: &mut dyn FnMut(Event),
) -> Result<Option<GeneratedImage>> {
    let Some(v) = &cfg.validation else {
        return Ok(None);
    };
    if validator.is_none() {
        *validator = Some(Validator {
            text_encoder: source.text_encoder(device, kind, None)?.model,
            vae: source.vae_decoder(device, kind)?.model,
            tokenizer: tokenizer.clone(),
            scheduler: sched.clone(),
            device,
            kind,
        });
    }
    let Some(val) = validator.as_ref() else {
        return Ok(None);
    };
    let size = unet.config.sample_size.unwrap_or(cfg.resolution as i64 / 8) * 8;
    let mut images = val.generate(unet, v, size, size, seed)?;
    for img in &mut images {
        img.parameters.push_str(&format!(", Training step: {step}"));
    }
    let dir = cfg.output_dir.join("validation");
    let mut paths = write_images(&dir, tag, &images)?;
    let grid = image_grid(&images);
    if let Some(g) = &grid {
        let p = dir.join(format!("{tag}-grid.png"));
        write_png(&p, g)?;
        paths.push(p);
    }
    on_event(Event::Validation(&paths));
    Ok(grid)
}

/// Refuse settings that cannot train; warn about ones that train slowly.
fn check_settings(
    cfg: &TrainConfig,
    device: Device,
    kind: Kind,
    on_event: &mut dyn FnMut(Event),
) -> Result<()> {
    if matches!(device, Device::Cuda(_)) {
        // fixed shapes every step: let cuDNN pick its fastest convolutions once
        tch::Cuda::cudnn_set_benchmark(true);
    }
    if device == Device::Cpu && kind != Kind::Float {
        on_event(Event::Warning(format!(
            "mixed precision {:?} on the CPU is slow; consider --mixed_precision no",
            cfg.mixed_precision
        )));
    }
    if cfg.train_batch_size == 0
        || cfg.gradient_accumulation_steps == 0
        || cfg.resolution == 0
        || !cfg.resolution.is_multiple_of(8)
    {
        return Err(Error::InvalidArgument("train_batch_size and gradient_accumulation_steps must be ≥ 1, resolution a multiple of 8".into()));
    }
    if cfg.lora.rank <= 0 {
        return Err(Error::InvalidArgument("--rank must be ≥ 1".into()));
    }
    cfg.captions.check()?;
    if cfg.enable_bucket {
        let b = &cfg.bucket;
        if b.bucket_reso_steps == 0 || !b.bucket_reso_steps.is_multiple_of(8) {
            return Err(Error::InvalidArgument(format!(
                "--bucket_reso_steps {}: must be a multiple of 8 (the VAE's factor)",
                b.bucket_reso_steps
            )));
        }
    } else if cfg.random_crop {
        return Err(Error::InvalidArgument(
            "--random_crop applies to buckets (--enable_bucket); without them the crop is random unless --center_crop".into(),
        ));
    }
    Ok(())
}
