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
mod graph;
mod logs;
mod meta;
mod profile;
mod run;
mod step;

pub use self::batches::bucket_epoch_batches;
pub use self::checkpoint::{TrainingState, list_checkpoints};
pub use self::graph::{CudaGraphs, WARMUP_STEPS as CUDA_GRAPH_WARMUP_STEPS};
pub use self::logs::{ReportTo, TENSORBOARD_RUN};
use self::meta::lora_modules_of;
pub use self::profile::PhaseTimes;
use self::run::Trainer;
pub use self::run::is_out_of_memory;

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

/// Everything a training run needs, and the command line of `lorafuse train` (clap reads the
/// fields' flags below; defaults from [`TrainConfig::new`], the script's `parse_args`). The LoRA
/// and validation settings come from [`LoraFlags`](super::lora::LoraFlags) and
/// [`ValidationFlags`](super::validation::ValidationFlags), which build them from the script's flags.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, clap::Args)]
pub struct TrainConfig {
    /// A local diffusers-layout pipeline folder (unet/, text_encoder/, vae/, tokenizer/, scheduler/),
    /// or an SD 1.x single-file `.safetensors` checkpoint (original LDM key names).
    #[arg(long = "pretrained_model_name_or_path", value_name = "DIR")]
    pub pretrained_model: PathBuf,
    /// The tokenizer folder (vocab.json + merges.txt) for a single-file checkpoint; default:
    /// `tokenizer/` beside the file.
    #[serde(default)]
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
    /// Folder with images + metadata.jsonl / metadata.csv / parquet files, or kohya-style image +
    /// caption-file pairs (--dataset_name: the same, a local folder).
    #[arg(
        long = "train_data_dir",
        visible_alias = "dataset_name",
        value_name = "DIR"
    )]
    pub train_data_dir: PathBuf,
    /// The metadata column with the caption (a string or a list of strings).
    #[arg(long = "caption_column", default_value_t = defaults().caption_column.clone())]
    pub caption_column: String,
    /// The image column of parquet files; in metadata.jsonl / metadata.csv the column naming the
    /// image file (`image` falls back to `file_name` there).
    #[arg(long = "image_column", default_value_t = defaults().image_column.clone())]
    pub image_column: String,
    /// Skip unreadable images and missing captions with a warning instead of failing.
    #[arg(long = "skip_bad_images")]
    pub skip_bad_images: bool,
    #[arg(long = "max_train_samples")]
    pub max_train_samples: Option<usize>,
    #[arg(long = "output_dir", default_value_os_t = defaults().output_dir.clone())]
    pub output_dir: PathBuf,
    #[arg(long, default_value_t = defaults().resolution)]
    pub resolution: u32,
    #[arg(long = "center_crop")]
    pub center_crop: bool,
    #[arg(long = "random_flip")]
    pub random_flip: bool,
    #[arg(long = "train_batch_size", default_value_t = defaults().train_batch_size)]
    pub train_batch_size: usize,
    #[arg(long = "gradient_accumulation_steps", default_value_t = defaults().gradient_accumulation_steps)]
    pub gradient_accumulation_steps: usize,
    /// Total optimiser steps (overrides --num_train_epochs).
    #[arg(long = "max_train_steps")]
    pub max_train_steps: Option<i64>,
    #[arg(long = "num_train_epochs", default_value_t = defaults().num_train_epochs)]
    pub num_train_epochs: i64,
    #[arg(long = "learning_rate", default_value_t = defaults().learning_rate)]
    pub learning_rate: f64,
    #[arg(long = "scale_lr")]
    pub scale_lr: bool,
    #[arg(long = "lr_scheduler", value_enum, default_value_t = defaults().lr_scheduler)]
    pub lr_scheduler: LrSchedule,
    #[arg(long = "lr_warmup_steps", default_value_t = defaults().lr_warmup_steps)]
    pub lr_warmup_steps: i64,
    #[command(flatten)]
    pub adam: AdamWConfig,
    #[arg(long = "max_grad_norm", default_value_t = defaults().max_grad_norm)]
    pub max_grad_norm: f64,
    /// The UNet's LoRA ([`LoraFlags`](super::lora::LoraFlags)).
    #[arg(skip = LoraConfig::script_default(super::lora::SCRIPT_RANK))]
    pub lora: LoraConfig,
    /// LoRA on the text encoder too (then text embeddings are not cached).
    #[arg(skip)]
    pub text_encoder_lora: Option<LoraConfig>,
    #[arg(long = "mixed_precision", value_enum, default_value_t = defaults().mixed_precision)]
    pub mixed_precision: MixedPrecision,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Min-SNR loss weighting γ (5.0 recommended).
    #[arg(long = "snr_gamma")]
    pub snr_gamma: Option<f64>,
    #[arg(long = "noise_offset", default_value_t = defaults().noise_offset)]
    pub noise_offset: f64,
    /// epsilon or v_prediction (default: the scheduler config's).
    #[arg(long = "prediction_type", value_enum)]
    pub prediction_type: Option<Prediction>,
    #[arg(long = "checkpointing_steps", default_value_t = defaults().checkpointing_steps)]
    pub checkpointing_steps: i64,
    #[arg(long = "checkpoints_total_limit")]
    pub checkpoints_total_limit: Option<usize>,
    /// `latest` or a checkpoint folder (OUTPUT_DIR/checkpoint-N).
    #[arg(long = "resume_from_checkpoint")]
    pub resume_from_checkpoint: Option<String>,
    /// Validation images ([`ValidationFlags`](super::validation::ValidationFlags)).
    #[arg(skip)]
    pub validation: Option<ValidationConfig>,
    /// diffusers (the script's file) or kohya (A1111 / ComfyUI, with ss_* metadata).
    #[arg(long = "save_format", value_enum, default_value_t = defaults().save_format)]
    pub save_format: SaveFormat,
    /// Storage dtype of the written LoRA: fp32 (the script's), fp16 or bf16.
    #[arg(long = "save_precision", default_value_t = defaults().save_dtype.clone(), value_parser = parse_save_precision)]
    pub save_dtype: String,
    /// Cache VAE latents and text embeddings (`--no_cache_latents` turns it off).
    #[arg(
        long = "no_cache_latents",
        action = clap::ArgAction::SetFalse,
        help = "Do not cache VAE latents / text embeddings (re-encode every step, new random crops)"
    )]
    pub cache_latents: bool,
    /// Run accumulated micro-batches as one batch (`--no_fuse_accumulation` turns it off).
    #[arg(
        long = "no_fuse_accumulation",
        action = clap::ArgAction::SetFalse,
        help = "Run accumulated micro-batches one at a time instead of as one batch"
    )]
    pub fuse_accumulation: bool,
    /// kohya: aspect-ratio buckets of about RESOLUTION² pixels; each batch holds images of one
    /// bucket, resized to cover it and centre-cropped (see --random_crop). Latents are cached
    /// per bucket.
    #[arg(long = "enable_bucket")]
    pub enable_bucket: bool,
    /// kohya's bucket settings (used with `enable_bucket`).
    #[command(flatten)]
    pub bucket: BucketConfig,
    /// kohya: with --enable_bucket, crop each resized image at a random offset instead of
    /// centred (with cached latents the offset is drawn once per image).
    #[arg(long = "random_crop")]
    pub random_crop: bool,
    /// kohya's caption controls.
    #[command(flatten)]
    pub captions: CaptionConfig,
    /// kohya: the caption file extension of image + caption folders (e.g. `.caption`; kohya's
    /// default). Default here: `.txt`, then `.caption`.
    #[arg(long = "caption_extension")]
    pub caption_extension: Option<String>,
    /// auto (CUDA when available), cpu, cuda, cuda:N.
    #[arg(long, default_value_t = defaults().device.clone(), value_parser = parse_device)]
    pub device: String,
    /// tensorboard (events + CSV, the script's default), all (the same), csv, or none.
    #[serde(default)]
    #[arg(long = "report_to", value_enum, default_value_t = defaults().report_to)]
    pub report_to: ReportTo,
    /// The logs' folder, relative to --output_dir: train_log.csv and, with TensorBoard, the
    /// event files in LOGGING_DIR/text2image-fine-tune (`tensorboard --logdir OUTPUT_DIR/logs`).
    #[serde(default = "default_logging_dir")]
    #[arg(long = "logging_dir", default_value_os_t = defaults().logging_dir.clone())]
    pub logging_dir: PathBuf,
    /// CUDA graphs over the training step: auto (when the device, the build and the settings
    /// allow a capture, else eagerly, saying why), on (a capture, or an error naming what
    /// prevents it), off. docs/training.md.
    #[serde(default)]
    #[arg(long = "cuda_graphs", value_enum, default_value_t = defaults().cuda_graphs)]
    pub cuda_graphs: CudaGraphs,
    /// The frozen UNet's convolution weights, and so its activations, in memory: auto
    /// (channels_last on CUDA, contiguous elsewhere), contiguous (NCHW, the script's layout) or
    /// channels_last (NHWC: cuDNN's tensor-core convolutions need no transposes, and lorafuse's
    /// own GroupNorm kernels work on NHWC where torch's CUDA GroupNorm transposes to NCHW and
    /// back). docs/training.md.
    #[serde(default)]
    #[arg(long = "memory_format", value_enum, default_value_t = defaults().memory_format)]
    pub memory_format: MemoryFormat,
    /// Time the phases of N steps after the warm-up (data, forward+backward, optimizer or graph
    /// replay, logging; the device synchronised at each boundary) and report the means at the end.
    #[serde(default)]
    #[arg(long = "profile_steps", value_name = "N")]
    pub profile_steps: Option<usize>,
    /// With `--profile_steps`: also record those steps with PyTorch's profiler (ATen operators,
    /// and on CUDA every kernel and copy) and write a Chrome trace to FILE
    /// (`scripts/torch_trace_summary.py FILE` sums the kernels by kind).
    #[serde(default)]
    #[arg(
        long = "torch_profile",
        value_name = "FILE",
        requires = "profile_steps"
    )]
    pub torch_profile: Option<PathBuf>,
    /// Testing: abort the process (like kill -9) right after this optimiser step.
    #[arg(long = "debug_abort_after_step", hide = true)]
    pub abort_after_step: Option<i64>,
    /// Testing: panic with this text inside the first optimiser step, as libtorch errors surface
    /// through tch (e.g. torch's "CUDA out of memory. Tried to allocate …").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long = "debug_panic_in_step", hide = true)]
    pub panic_in_step: Option<String>,
    /// Testing: fail with this text inside the first optimiser step, as libtorch errors surface
    /// through tch's `f_` calls (e.g. the backward's, `FlatParams::backward`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long = "debug_error_in_step", hide = true)]
    pub error_in_step: Option<String>,
}

/// `--memory_format`: how the frozen UNet's convolution weights are laid out.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum MemoryFormat {
    /// [`MemoryFormat::ChannelsLast`] on CUDA (with the fused GroupNorm kernels: +20 % samples/s
    /// at the tutorial recipe on an H100, docs/benchmarks.md), [`MemoryFormat::Contiguous`] on
    /// the CPU.
    #[default]
    Auto,
    /// NCHW, as loaded (`torch.contiguous_format`).
    Contiguous,
    /// NHWC (`torch.channels_last`).
    ChannelsLast,
}

impl MemoryFormat {
    /// Whether the UNet's weights are stored channels-last on `device`.
    pub fn channels_last_on(self, device: tch::Device) -> bool {
        match self {
            MemoryFormat::Auto => device.is_cuda(),
            MemoryFormat::Contiguous => false,
            MemoryFormat::ChannelsLast => true,
        }
    }
}

/// [`TrainConfig::new`]'s values, which clap shows and uses as the flags' defaults.
pub fn defaults() -> &'static TrainConfig {
    static D: std::sync::OnceLock<TrainConfig> = std::sync::OnceLock::new();
    D.get_or_init(|| TrainConfig::new(PathBuf::new(), PathBuf::new()))
}

/// `--save_precision`, checked when the command line is parsed (not after the last step).
fn parse_save_precision(s: &str) -> std::result::Result<String, String> {
    save_dtype(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// `--device`, checked when the command line is parsed.
fn parse_device(s: &str) -> std::result::Result<String, String> {
    super::parse_device(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
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
            lora: LoraConfig::script_default(super::lora::SCRIPT_RANK),
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
            bucket: BucketConfig::default(),
            random_crop: false,
            captions: CaptionConfig::default(),
            caption_extension: None,
            device: "auto".into(),
            report_to: ReportTo::Tensorboard,
            logging_dir: default_logging_dir(),
            cuda_graphs: CudaGraphs::default(),
            memory_format: MemoryFormat::default(),
            profile_steps: None,
            torch_profile: None,
            abort_after_step: None,
            panic_in_step: None,
            error_in_step: None,
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
    /// `--profile_steps`: the phases' mean times.
    pub phases: Option<PhaseTimes>,
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
        // fixed shapes every step: let cuDNN pick its fastest convolutions once. Diagnostics knob
        // `LORAFUSE_CUDNN_BENCHMARK=0`: cuDNN's heuristics instead (torch's default, and the
        // script's): the search tries workspaces beside the step's activations, a transient peak
        // the per-step memory readings do not see (docs/benchmarks.md)
        let benchmark = std::env::var("LORAFUSE_CUDNN_BENCHMARK").as_deref() != Ok("0");
        tch::Cuda::cudnn_set_benchmark(benchmark);
        if let Some(b) = crate::train::fused::sdpa_backend_from_env()? {
            on_event(Event::Warning(format!(
                "{}={b}: attention restricted to that backend (diagnostics)",
                crate::train::fused::SDPA_ENV
            )));
        }
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
    if let Some(f) = &cfg.torch_profile {
        if cfg.profile_steps.unwrap_or(0) == 0 {
            return Err(Error::InvalidArgument(
                "--torch_profile records the --profile_steps steps: give --profile_steps N (N ≥ 1)"
                    .into(),
            ));
        }
        if f.is_dir()
            || f.parent()
                .is_some_and(|d| !d.as_os_str().is_empty() && !d.is_dir())
        {
            return Err(Error::InvalidArgument(format!(
                "--torch_profile {}: expected a file in an existing folder",
                f.display()
            )));
        }
    }
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
