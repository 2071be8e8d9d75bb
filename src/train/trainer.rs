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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::Distribution;
use tch::{Device, Kind, Tensor};

use super::dataset::{self, Crop, Dataset, DatasetOptions};
use super::lora::{LoraConfig, init_lora, lora_pairs};
use super::noise::{NoiseSchedule, Prediction};
use super::optim::{
    AdamW, AdamWConfig, FlatParams, LossScaler, LrSchedule, LrScheduler, clip_grad_norm,
};
use super::output::{SaveFormat, modules_from, save_lora};
use super::validation::{ValidationConfig, Validator, write_images};
use super::{ClipTextModel, Loaded, UNet2DConditionModel, VaeEncoder};
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
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    pub device: String,
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
            device: "auto".into(),
            abort_after_step: None,
        }
    }
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
    /// `[n_examples · flips, 2 · latent_c, h, w]` (mean ‖ logvar), f32.
    latents: Option<Tensor>,
    flips: usize,
    /// `[n_captions, 77, d]`, f32, when the text encoder is frozen.
    embeddings: Option<Tensor>,
    /// Token ids `[n_captions, 77]` (for a trained text encoder).
    ids: Tensor,
    /// Per example: indices into the caption table.
    captions: Vec<Vec<usize>>,
}

struct Models {
    unet: Loaded<UNet2DConditionModel>,
    text: Option<Loaded<ClipTextModel>>,
    vae: Option<Loaded<VaeEncoder>>,
}

/// Training state saved in a checkpoint's `training_state.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TrainingState {
    pub version: u32,
    pub global_step: i64,
    /// The epoch and the index of the next batch in its order.
    pub epoch: i64,
    pub next_batch: usize,
    /// Completed LR-scheduler steps (differs from `global_step` only after skipped fp16 steps).
    pub scheduler_step: i64,
    pub adam_step: i64,
    pub loss_scaler: Option<LossScaler>,
    pub seed: u64,
    pub lr_scheduler: LrScheduler,
    /// The epoch's data order (derived from the seed; recorded for inspection).
    pub data_order: Vec<usize>,
    pub fingerprint: serde_json::Value,
}

/// Settings a checkpoint must share with the run that resumes it.
fn fingerprint(cfg: &TrainConfig, n_examples: usize, seed: u64) -> serde_json::Value {
    serde_json::json!({
        "lora": cfg.lora, "text_encoder_lora": cfg.text_encoder_lora, "examples": n_examples, "seed": seed,
        "resolution": cfg.resolution, "train_batch_size": cfg.train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "center_crop": cfg.center_crop,
        "random_flip": cfg.random_flip, "mixed_precision": cfg.mixed_precision,
    })
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

/// Checkpoint folders `checkpoint-<step>` under `dir`, sorted by step.
pub fn list_checkpoints(dir: &Path) -> Vec<(i64, PathBuf)> {
    let mut v: Vec<(i64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<i64>().ok()?;
            e.path()
                .join("training_state.json")
                .is_file()
                .then_some((step, e.path()))
        })
        .collect();
    v.sort();
    v
}

fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn tensors_to_file(path: &Path, named: &BTreeMap<String, Tensor>) -> Result<()> {
    let mut out = Vec::new();
    for (n, t) in named {
        let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let data: Vec<f32> = Vec::<f32>::try_from(t.flatten(0, -1))?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        out.push((
            n.clone(),
            crate::weights::TensorData::from_f32(Dtype::F32, shape, &data)?,
        ));
    }
    crate::weights::write_safetensors(path, out, None)
}

fn tensors_from_file(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let f = crate::weights::WeightFile::open(path)?;
    let names: Vec<String> = f.names().map(str::to_string).collect();
    names
        .into_iter()
        .map(|n| super::weights::read_tensor(&f, &n).map(|t| (n, t)))
        .collect()
}

/// Run a training job. `cancel`, when set, ends the run at the next optimiser step with a
/// checkpoint and [`Error::Cancelled`].
pub fn train(
    cfg: &TrainConfig,
    cancel: Option<&AtomicBool>,
    on_event: &mut dyn FnMut(Event),
) -> Result<TrainReport> {
    let device = super::parse_device(&cfg.device)?;
    // Checked before any work: a typo must not surface after the last step.
    save_dtype(&cfg.save_dtype)?;
    let kind = cfg.mixed_precision.kind();
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
    let source = super::ModelSource::open(&cfg.pretrained_model, cfg.tokenizer.as_deref())?;
    std::fs::create_dir_all(&cfg.output_dir).map_err(|e| Error::io(&cfg.output_dir, e))?;

    // ---- resume: which checkpoint, and its seed
    let resume_dir: Option<PathBuf> = match cfg.resume_from_checkpoint.as_deref() {
        None => None,
        Some("latest") => {
            let found = list_checkpoints(&cfg.output_dir).pop().map(|(_, p)| p);
            if found.is_none() {
                on_event(Event::Warning(
                    "Checkpoint 'latest' does not exist. Starting a new training run.".into(),
                ));
            }
            found
        }
        Some(p) => {
            let p = PathBuf::from(p);
            let p = if p.is_dir() {
                p
            } else {
                cfg.output_dir.join(&p)
            };
            if !p.join("training_state.json").is_file() {
                return Err(Error::InvalidArgument(format!(
                    "--resume_from_checkpoint {}: no training_state.json there",
                    p.display()
                )));
            }
            Some(p)
        }
    };
    let resumed: Option<TrainingState> = match &resume_dir {
        Some(d) => {
            let p = d.join("training_state.json");
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            Some(serde_json::from_str(&text).map_err(|e| Error::Config {
                file: p.clone(),
                msg: e.to_string(),
            })?)
        }
        None => None,
    };
    let seed = match (&resumed, cfg.seed) {
        (Some(s), _) => s.seed,
        (None, Some(s)) => s,
        (None, None) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    };

    // ---- data
    let ds = Dataset::open(
        &cfg.train_data_dir,
        &DatasetOptions {
            caption_column: cfg.caption_column.clone(),
            image_column: cfg.image_column.clone(),
            skip_bad: cfg.skip_bad_images,
            max_samples: cfg.max_train_samples,
        },
    )?;
    for w in &ds.warnings {
        on_event(Event::Warning(w.clone()));
    }
    let n = ds.len();
    on_event(Event::Info(format!(
        "{n} examples ({}) in {}",
        ds.layout,
        cfg.train_data_dir.display()
    )));

    // ---- models
    let sched_cfg = source.scheduler_config()?;
    let noise = NoiseSchedule::new(&sched_cfg, device)?;
    let prediction = cfg.prediction_type.unwrap_or(noise.prediction);
    let tokenizer = source.tokenizer()?;
    let unet = source.unet(device, kind, Some(cfg.lora.clone()))?;
    if unet.lora_modules.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "no UNet module matches the LoRA targets {:?}",
            cfg.lora.targets
        )));
    }
    for k in &unet.unused_keys {
        on_event(Event::Warning(format!(
            "UNet weight `{k}` is not used by the model"
        )));
    }
    let text = source.text_encoder(device, kind, cfg.text_encoder_lora.clone())?;
    if cfg.text_encoder_lora.is_some() && text.lora_modules.is_empty() {
        return Err(Error::InvalidArgument(
            "no text encoder module matches the text encoder LoRA targets".into(),
        ));
    }
    let vae = source.vae_encoder(device, kind)?;
    let scaling_factor = vae.model.config.scaling_factor;
    let latent_c = vae.model.config.latent_channels;
    init_lora(
        &unet.lora,
        cfg.lora.init,
        cfg.lora.rank,
        &mut ChaCha20Rng::seed_from_u64(derive(&[seed, TAG_LORA, 0])),
    )?;
    if let Some(tl) = &cfg.text_encoder_lora {
        init_lora(
            &text.lora,
            tl.init,
            tl.rank,
            &mut ChaCha20Rng::seed_from_u64(derive(&[seed, TAG_LORA, 1])),
        )?;
    }
    let mut all: BTreeMap<String, Tensor> = BTreeMap::new();
    for (k, v) in unet.lora.variables() {
        all.insert(format!("unet.{k}"), v);
    }
    for (k, v) in text.lora.variables() {
        all.insert(format!("text_encoder.{k}"), v);
    }
    let mut flat = FlatParams::adopt_as(&all, kind);
    let n_params = flat.numel();
    on_event(Event::Info(format!(
        "LoRA r={} alpha={} on {} UNet modules{} ({n_params} trainable parameters), device {device:?}, weights {kind:?}",
        cfg.lora.rank,
        cfg.lora.alpha,
        unet.lora_modules.len(),
        if text.lora_modules.is_empty() {
            String::new()
        } else {
            format!(" + {} text encoder modules", text.lora_modules.len())
        }
    )));

    // ---- caches
    let train_text = cfg.text_encoder_lora.is_some();
    let cache = build_cache(
        cfg, &ds, &tokenizer, &text, &vae, seed, device, train_text, on_event,
    )?;
    let mut models = Models {
        unet,
        text: Some(text),
        vae: Some(vae),
    };
    if !train_text && cfg.cache_latents {
        models.text = None; // frozen and fully cached: free it (validation reloads it)
    }
    if cfg.cache_latents {
        models.vae = None;
    }

    // ---- steps
    let bs = cfg.train_batch_size;
    let accum = cfg.gradient_accumulation_steps;
    let batches_per_epoch = n.div_ceil(bs);
    let steps_per_epoch = batches_per_epoch.div_ceil(accum) as i64;
    let max_steps = cfg
        .max_train_steps
        .unwrap_or(cfg.num_train_epochs * steps_per_epoch);
    let epochs = (max_steps + steps_per_epoch - 1) / steps_per_epoch;
    let lr = if cfg.scale_lr {
        cfg.learning_rate * (accum * bs) as f64
    } else {
        cfg.learning_rate
    };
    let lr_sched = LrScheduler {
        kind: cfg.lr_scheduler,
        base_lr: lr,
        warmup_steps: cfg.lr_warmup_steps,
        total_steps: max_steps,
    };
    let mut opt = AdamW::new(&flat, cfg.adam);
    let mut scaler = (cfg.mixed_precision == MixedPrecision::Fp16).then(LossScaler::default);
    let fp = fingerprint(cfg, n, seed);

    let (mut global_step, mut epoch0, mut batch0, mut sched_step) = (0i64, 0i64, 0usize, 0i64);
    if let (Some(st), Some(dir)) = (&resumed, &resume_dir) {
        if st.fingerprint.get("lora") != fp.get("lora")
            || st.fingerprint.get("text_encoder_lora") != fp.get("text_encoder_lora")
        {
            return Err(Error::InvalidArgument(format!(
                "{}: the checkpoint's LoRA layout differs from this run's",
                dir.display()
            )));
        }
        if st.fingerprint != fp {
            on_event(Event::Warning(format!(
                "{}: resuming with different settings than the checkpoint was made with",
                dir.display()
            )));
        }
        let lora_state = tensors_from_file(&dir.join("lora_state.safetensors"))?;
        let mut buf = flat.flat.shallow_clone();
        flat.fill(&mut buf, &lora_state, "lora_state.safetensors")?;
        flat.sync_compute();
        let o = tensors_from_file(&dir.join("optimizer.safetensors"))?;
        let pick = |prefix: &str| -> BTreeMap<String, Tensor> {
            o.iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix(prefix)
                        .map(|n| (n.to_string(), v.shallow_clone()))
                })
                .collect()
        };
        flat.fill(&mut opt.exp_avg, &pick("exp_avg."), "optimizer.safetensors")?;
        flat.fill(
            &mut opt.exp_avg_sq,
            &pick("exp_avg_sq."),
            "optimizer.safetensors",
        )?;
        opt.step = st.adam_step;
        scaler = st.loss_scaler;
        global_step = st.global_step;
        epoch0 = st.epoch;
        batch0 = st.next_batch;
        sched_step = st.scheduler_step;
        on_event(Event::Info(format!(
            "Resuming from checkpoint {} (step {global_step})",
            dir.display()
        )));
    }

    let log_path = cfg.output_dir.join("logs").join("train_log.csv");
    std::fs::create_dir_all(cfg.output_dir.join("logs"))
        .map_err(|e| Error::io(cfg.output_dir.join("logs"), e))?;
    if resumed.is_some() && log_path.is_file() {
        // drop the rows an interrupted run logged after the checkpoint
        let text = std::fs::read_to_string(&log_path).map_err(|e| Error::io(&log_path, e))?;
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.split(',')
                    .next()
                    .and_then(|s| s.parse::<i64>().ok())
                    .is_none_or(|s| s <= global_step)
            })
            .collect();
        std::fs::write(&log_path, kept.join("\n") + "\n").map_err(|e| Error::io(&log_path, e))?;
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io(&log_path, e))?;
    if log.metadata().map(|m| m.len() == 0).unwrap_or(true) {
        use std::io::Write;
        writeln!(
            log,
            "step,epoch,loss,lr,grad_norm,samples_per_s,elapsed_s,device_mem,skipped"
        )
        .map_err(|e| Error::io(&log_path, e))?;
    }
    write_json(&cfg.output_dir.join("train_config.json"), cfg)?;

    on_event(Event::Started {
        total_steps: max_steps,
        initial_step: global_step,
        examples: n,
        epochs,
    });
    let started = Instant::now();
    let mut losses = Vec::new();
    let mut sps_sum = 0.0;
    let mut sps_n = 0usize;
    let mut peak_mem: Option<u64> = None;
    let mut validator: Option<Validator> = None;

    let ctx = StepCtx {
        cfg,
        cache: &cache,
        noise: &noise,
        prediction,
        scaling_factor,
        latent_c,
        seed,
        device,
        kind,
        train_text,
    };
    'outer: for epoch in epoch0..epochs {
        let order = epoch_order(seed, epoch, n);
        let start_batch = if epoch == epoch0 { batch0 } else { 0 };
        let mut b = start_batch;
        while b < batches_per_epoch {
            if global_step >= max_steps {
                break 'outer;
            }
            let t0 = Instant::now();
            let group_end = (b + accum).min(batches_per_epoch);
            let micro: Vec<(usize, Vec<usize>)> = (b..group_end)
                .map(|bi| (bi, order[bi * bs..((bi + 1) * bs).min(n)].to_vec()))
                .collect();
            let samples: usize = micro.iter().map(|(_, m)| m.len()).sum();
            let loss_scale = scaler.map(|s| s.scale).unwrap_or(1.0);
            let loss = run_group(&ctx, &models, &ds, epoch, &micro, loss_scale)?;
            let mut g = flat.flat_grad();
            let finite = match scaler.as_mut() {
                Some(s) => s.unscale_and_update(&mut g),
                None => true,
            };
            let mut grad_norm = f64::NAN;
            let lr_now = lr_sched.lr(sched_step);
            if finite {
                grad_norm = clip_grad_norm(&mut g, cfg.max_grad_norm);
                opt.step(&mut flat, &g, lr_now);
                sched_step += 1;
            }
            flat.zero_grad();
            global_step += 1;
            b = group_end;
            let dt = t0.elapsed().as_secs_f64();
            let mem = if matches!(device, Device::Cuda(_)) {
                cuda_mem_used()
            } else {
                None
            };
            if let Some(m) = mem {
                peak_mem = Some(peak_mem.map_or(m, |p| p.max(m)));
            }
            let sps = samples as f64 / dt.max(1e-9);
            sps_sum += sps;
            sps_n += 1;
            let logline = StepLog {
                step: global_step,
                epoch,
                loss,
                lr: lr_now,
                grad_norm,
                samples_per_s: sps,
                elapsed_s: started.elapsed().as_secs_f64(),
                device_mem: mem,
                skipped: !finite,
            };
            {
                use std::io::Write;
                writeln!(
                    log,
                    "{},{},{},{},{},{:.3},{:.3},{},{}",
                    logline.step,
                    logline.epoch,
                    logline.loss,
                    logline.lr,
                    logline.grad_norm,
                    logline.samples_per_s,
                    logline.elapsed_s,
                    mem.map(|m| m.to_string()).unwrap_or_default(),
                    logline.skipped
                )
                .map_err(|e| Error::io(&log_path, e))?;
            }
            losses.push(loss);
            on_event(Event::Step(&logline));

            let (next_epoch, next_batch) = if b >= batches_per_epoch {
                (epoch + 1, 0)
            } else {
                (epoch, b)
            };
            let state = TrainingState {
                version: 1,
                global_step,
                epoch: next_epoch,
                next_batch,
                scheduler_step: sched_step,
                adam_step: opt.step,
                loss_scaler: scaler,
                seed,
                lr_scheduler: lr_sched,
                data_order: if next_epoch == epoch {
                    order.clone()
                } else {
                    epoch_order(seed, next_epoch, n)
                },
                fingerprint: fp.clone(),
            };
            let cancelled = cancel.map(|c| c.load(Ordering::Relaxed)).unwrap_or(false);
            if (cfg.checkpointing_steps > 0 && global_step % cfg.checkpointing_steps == 0)
                || cancelled
            {
                let dir = save_checkpoint(cfg, &models, &flat, &opt, &state)?;
                on_event(Event::Checkpoint(&dir));
            }
            if cancelled {
                return Err(Error::Cancelled);
            }
            if let Some(v) = &cfg.validation
                && let Some(every) = v.every_steps
                && every > 0
                && global_step % every == 0
            {
                validate(
                    &source,
                    cfg,
                    &models.unet.model,
                    &mut validator,
                    device,
                    kind,
                    &tokenizer,
                    &sched_cfg,
                    &format!("step-{global_step}"),
                    seed,
                    on_event,
                )?;
            }
            if cfg.abort_after_step == Some(global_step) {
                std::process::abort();
            }
        }
        if let Some(v) = &cfg.validation
            && v.every_steps.is_none()
            && let Some(every) = v.every_epochs
            && every > 0
            && epoch % every == 0
        {
            validate(
                &source,
                cfg,
                &models.unet.model,
                &mut validator,
                device,
                kind,
                &tokenizer,
                &sched_cfg,
                &format!("epoch-{epoch}"),
                seed,
                on_event,
            )?;
        }
    }

    // ---- final LoRA
    let out = cfg.output_dir.join("pytorch_lora_weights.safetensors");
    write_lora(cfg, &models, &out, &ds, global_step, seed)?;
    on_event(Event::Saved(&out));
    if cfg.validation.is_some() {
        validate(
            &source,
            cfg,
            &models.unet.model,
            &mut validator,
            device,
            kind,
            &tokenizer,
            &sched_cfg,
            "final",
            seed,
            on_event,
        )?;
    }
    Ok(TrainReport {
        output: out,
        steps: global_step,
        losses,
        mean_samples_per_s: if sps_n > 0 {
            sps_sum / sps_n as f64
        } else {
            0.0
        },
        peak_device_mem: peak_mem,
        seed,
    })
}

#[allow(clippy::too_many_arguments)]
fn validate(
    source: &super::ModelSource,
    cfg: &TrainConfig,
    unet: &UNet2DConditionModel,
    validator: &mut Option<Validator>,
    device: Device,
    kind: Kind,
    tokenizer: &ClipTokenizer,
    sched: &SchedulerConfig,
    tag: &str,
    seed: u64,
    on_event: &mut dyn FnMut(Event),
) -> Result<()> {
    let Some(v) = &cfg.validation else {
        return Ok(());
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
        return Ok(());
    };
    let size = unet.config.sample_size.unwrap_or(cfg.resolution as i64 / 8) * 8;
    let images = val.generate(unet, v, size, size, seed)?;
    let paths = write_images(&cfg.output_dir.join("validation"), tag, &images)?;
    on_event(Event::Validation(&paths));
    Ok(())
}

struct StepCtx<'a> {
    cfg: &'a TrainConfig,
    cache: &'a Cache,
    noise: &'a NoiseSchedule,
    prediction: Prediction,
    scaling_factor: f64,
    latent_c: i64,
    seed: u64,
    device: Device,
    kind: Kind,
    train_text: bool,
}

/// The inputs of one micro-batch.
struct MicroInputs {
    latents: Tensor,
    ehs: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    /// Per-sample loss weights `1 / (micro size · accumulation)`.
    weights: Tensor,
}

fn micro_inputs(
    ctx: &StepCtx,
    models: &Models,
    ds: &Dataset,
    epoch: i64,
    batch: usize,
    ids: &[usize],
) -> Result<MicroInputs> {
    let cfg = ctx.cfg;
    let b = ids.len() as i64;
    let mut rng =
        ChaCha20Rng::seed_from_u64(derive(&[ctx.seed, TAG_BATCH, epoch as u64, batch as u64]));
    let flips: Vec<bool> = ids
        .iter()
        .map(|_| cfg.random_flip && rng.random::<bool>())
        .collect();
    let caps: Vec<usize> = ids
        .iter()
        .map(|&i| {
            let c = &ctx.cache.captions[i];
            if c.len() > 1 {
                c[rng.random_range(0..c.len())]
            } else {
                c[0]
            }
        })
        .collect();
    let t: Vec<i64> = ids
        .iter()
        .map(|_| rng.random_range(0..ctx.noise.num_train_timesteps))
        .collect();
    let timesteps = Tensor::from_slice(&t).to_device(ctx.device);
    // Gaussian draws come from our own generator (not libtorch's global one), so concurrent runs
    // in one process stay reproducible and CPU and CUDA runs see the same noise.
    let mut normal_rng = rand_chacha::ChaCha8Rng::seed_from_u64(derive(&[
        ctx.seed,
        TAG_NORMAL,
        epoch as u64,
        batch as u64,
    ]));
    let mut randn = |shape: &[i64]| -> Tensor {
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let z: f32 = rand_distr::StandardNormal.sample(&mut normal_rng);
                z
            })
            .collect();
        Tensor::from_slice(&v).view(shape).to_device(ctx.device)
    };

    // latent distribution parameters [b, 2c, h, w]
    let params = match &ctx.cache.latents {
        Some(lat) => {
            let idx: Vec<i64> = ids
                .iter()
                .zip(&flips)
                .map(|(&i, &f)| {
                    (i * ctx.cache.flips + usize::from(f && ctx.cache.flips == 2)) as i64
                })
                .collect();
            lat.index_select(0, &Tensor::from_slice(&idx).to_device(lat.device()))
                .to_device(ctx.device)
        }
        None => {
            let vae = models
                .vae
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("VAE not loaded".into()))?;
            let mut px = Vec::new();
            for (&i, &f) in ids.iter().zip(&flips) {
                let img = dataset::resize_shorter(&ds.examples[i].load_rgb()?, cfg.resolution);
                let (w, h) = img.dimensions();
                let crop = if cfg.center_crop {
                    dataset::center_crop(w, h, cfg.resolution)
                } else {
                    Crop {
                        top: rng.random_range(0..=h - cfg.resolution),
                        left: rng.random_range(0..=w - cfg.resolution),
                    }
                };
                px.extend(dataset::to_pixels(&img, crop, cfg.resolution, f));
            }
            let r = cfg.resolution as i64;
            let x = Tensor::from_slice(&px)
                .view([b, 3, r, r])
                .to_device(ctx.device)
                .to_kind(ctx.kind);
            let (m, lv) = tch::no_grad(|| vae.model.encode(&x));
            Tensor::cat(&[m, lv], 1).to_kind(Kind::Float)
        }
    };
    let parts = params.chunk(2, 1);
    let (mean, logvar) = (&parts[0], &parts[1]);
    let eps = randn(&mean.size());
    let latents = (mean + (logvar * 0.5).exp() * eps) * ctx.scaling_factor;
    let mut noise = randn(&latents.size());
    if cfg.noise_offset != 0.0 {
        noise += randn(&[b, ctx.latent_c, 1, 1]) * cfg.noise_offset;
    }
    let ehs = match (&ctx.cache.embeddings, ctx.train_text) {
        (Some(e), false) => e
            .index_select(
                0,
                &Tensor::from_slice(&caps.iter().map(|&c| c as i64).collect::<Vec<_>>())
                    .to_device(e.device()),
            )
            .to_device(ctx.device),
        _ => {
            let text = models
                .text
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("text encoder not loaded".into()))?;
            let idx = Tensor::from_slice(&caps.iter().map(|&c| c as i64).collect::<Vec<_>>());
            let ids_t = ctx.cache.ids.index_select(0, &idx).to_device(ctx.device);
            if ctx.train_text {
                text.model.forward(&ids_t)?.0
            } else {
                tch::no_grad(|| text.model.forward(&ids_t)).map(|o| o.0)?
            }
        }
    };
    let w = 1.0 / (b as f64 * cfg.gradient_accumulation_steps as f64);
    let weights = Tensor::full([b], w, (Kind::Float, ctx.device));
    Ok(MicroInputs {
        latents,
        ehs,
        noise,
        timesteps,
        weights,
    })
}

/// Forward + backward over one optimiser step's micro-batches; returns the step's loss.
fn run_group(
    ctx: &StepCtx,
    models: &Models,
    ds: &Dataset,
    epoch: i64,
    micro: &[(usize, Vec<usize>)],
    loss_scale: f64,
) -> Result<f64> {
    let inputs: Vec<MicroInputs> = micro
        .iter()
        .map(|(bi, ids)| micro_inputs(ctx, models, ds, epoch, *bi, ids))
        .collect::<Result<_>>()?;
    let groups: Vec<Vec<&MicroInputs>> = if ctx.cfg.fuse_accumulation {
        vec![inputs.iter().collect()]
    } else {
        inputs.iter().map(|m| vec![m]).collect()
    };
    let mut total = Tensor::zeros([], (Kind::Float, ctx.device));
    for g in groups {
        let cat = |f: &dyn Fn(&MicroInputs) -> &Tensor| {
            Tensor::cat(&g.iter().map(|m| f(m)).collect::<Vec<_>>(), 0)
        };
        let latents = cat(&|m| &m.latents);
        let noise = cat(&|m| &m.noise);
        let ts = cat(&|m| &m.timesteps);
        let ehs = cat(&|m| &m.ehs);
        let w = cat(&|m| &m.weights);
        let noisy = ctx.noise.add_noise(&latents, &noise, &ts);
        let target = ctx.noise.target(ctx.prediction, &latents, &noise, &ts);
        let pred = models
            .unet
            .model
            .forward(&noisy.to_kind(ctx.kind), &ts, &ehs.to_kind(ctx.kind));
        let per = (pred.to_kind(Kind::Float) - target).square().mean_dim(
            [1i64, 2, 3].as_slice(),
            false,
            Kind::Float,
        );
        let per = match ctx.cfg.snr_gamma {
            None => per,
            Some(gamma) => {
                let snr = ctx.noise.snr(&ts).to_device(ctx.device);
                let mw = snr.clamp_max(gamma);
                let mw = match ctx.prediction {
                    Prediction::Epsilon => mw / &snr,
                    Prediction::VPrediction => mw / (&snr + 1.0),
                };
                per * mw
            }
        };
        let loss = (per * w).sum(Kind::Float);
        (&loss * loss_scale).backward();
        total += loss.detach();
    }
    Ok(total.double_value(&[]))
}

#[allow(clippy::too_many_arguments)]
fn build_cache(
    cfg: &TrainConfig,
    ds: &Dataset,
    tokenizer: &ClipTokenizer,
    text: &Loaded<ClipTextModel>,
    vae: &Loaded<VaeEncoder>,
    seed: u64,
    device: Device,
    train_text: bool,
    on_event: &mut dyn FnMut(Event),
) -> Result<Cache> {
    let kind = cfg.mixed_precision.kind();
    let captions = ds.distinct_captions();
    let index: BTreeMap<&str, usize> = captions
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let per_example: Vec<Vec<usize>> = ds
        .examples
        .iter()
        .map(|e| e.captions.iter().map(|c| index[c.as_str()]).collect())
        .collect();
    let mut ids = Vec::new();
    for c in &captions {
        ids.extend(tokenizer.encode(c)?.ids);
    }
    let ids = Tensor::from_slice(&ids).view([captions.len() as i64, -1]);
    // Store caches on the training device unless they are large.
    let budget: i64 = 4 << 30;
    let embeddings = if train_text {
        None
    } else {
        let d = text.model.config.hidden_size;
        let bytes = captions.len() as i64 * ids.size()[1] * d * 4;
        let store = if bytes < budget { device } else { Device::Cpu };
        let mut parts = Vec::new();
        let chunk = 32usize;
        for (ci, start) in (0..captions.len()).step_by(chunk).enumerate() {
            let len = chunk.min(captions.len() - start) as i64;
            let x = ids.narrow(0, start as i64, len).to_device(device);
            let (h, _) = tch::no_grad(|| text.model.forward(&x))?;
            parts.push(h.to_kind(Kind::Float).to_device(store));
            on_event(Event::Caching {
                what: "text embeddings",
                done: ((ci + 1) * chunk).min(captions.len()),
                total: captions.len(),
            });
        }
        Some(Tensor::cat(&parts, 0))
    };

    let mut crop_rng = ChaCha20Rng::seed_from_u64(derive(&[seed, TAG_CROP]));
    let latents = if cfg.cache_latents {
        if !cfg.center_crop {
            on_event(Event::Warning("random crop with cached latents: each image's crop is drawn once (use --center_crop, or --no_cache_latents for a new crop every step)".into()));
        }
        let flips = if cfg.random_flip { 2 } else { 1 };
        let r = cfg.resolution;
        let lat_bytes = ds.len() as i64
            * flips as i64
            * 2
            * vae.model.config.latent_channels
            * (r as i64 / 8).pow(2)
            * 4;
        let store = if lat_bytes < budget {
            device
        } else {
            Device::Cpu
        };
        let mut parts = Vec::new();
        let chunk = 8usize;
        let mut px: Vec<f32> = Vec::new();
        let mut pending = 0i64;
        let ri = r as i64;
        for (i, e) in ds.examples.iter().enumerate() {
            let img = e.load_rgb()?;
            let img = dataset::resize_shorter(&img, r);
            let (w, h) = img.dimensions();
            let crop = if cfg.center_crop {
                dataset::center_crop(w, h, r)
            } else {
                Crop {
                    top: crop_rng.random_range(0..=h - r),
                    left: crop_rng.random_range(0..=w - r),
                }
            };
            for f in 0..flips {
                px.extend(dataset::to_pixels(&img, crop, r, f == 1));
                pending += 1;
            }
            if pending as usize >= chunk || i + 1 == ds.len() {
                let x = Tensor::from_slice(&px)
                    .view([pending, 3, ri, ri])
                    .to_device(device)
                    .to_kind(kind);
                let (m, lv) = tch::no_grad(|| vae.model.encode(&x));
                parts.push(
                    Tensor::cat(&[m, lv], 1)
                        .to_kind(Kind::Float)
                        .to_device(store),
                );
                px.clear();
                pending = 0;
                on_event(Event::Caching {
                    what: "latents",
                    done: i + 1,
                    total: ds.len(),
                });
            }
        }
        Some((Tensor::cat(&parts, 0), flips))
    } else {
        // fail early on unreadable images instead of mid-run
        for e in &ds.examples {
            e.load_rgb()?;
        }
        None
    };
    let (latents, flips) = match latents {
        Some((l, f)) => (Some(l), f),
        None => (None, 1),
    };
    Ok(Cache {
        latents,
        flips,
        embeddings,
        ids,
        captions: per_example,
    })
}

fn lora_modules_of(models: &Models, cfg: &TrainConfig) -> Result<Vec<crate::lora::LoraModule>> {
    let mut modules = modules_from(
        &lora_pairs(&models.unet.lora),
        Component::Unet,
        cfg.lora.alpha,
    )?;
    if let (Some(t), Some(tl)) = (&models.text, &cfg.text_encoder_lora) {
        modules.extend(modules_from(
            &lora_pairs(&t.lora),
            Component::TextEncoder,
            tl.alpha,
        )?);
    }
    Ok(modules)
}

/// kohya `ss_*` metadata (sd-scripts `train_network.py`), plus the `modelspec.*` basics.
fn kohya_metadata(
    cfg: &TrainConfig,
    ds: &Dataset,
    steps: i64,
    seed: u64,
) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let s = |v: &dyn std::fmt::Display| v.to_string();
    let model_name = cfg
        .pretrained_model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    m.insert("ss_network_module".into(), "networks.lora".into());
    m.insert("ss_network_dim".into(), s(&cfg.lora.rank));
    m.insert("ss_network_alpha".into(), s(&cfg.lora.alpha));
    m.insert(
        "ss_network_args".into(),
        serde_json::json!({"target_modules": cfg.lora.targets}).to_string(),
    );
    m.insert("ss_base_model_version".into(), "sd_v1".into());
    m.insert("ss_v2".into(), "False".into());
    m.insert("ss_sd_model_name".into(), model_name.clone());
    m.insert(
        "ss_resolution".into(),
        format!("({}, {})", cfg.resolution, cfg.resolution),
    );
    m.insert("ss_num_train_images".into(), s(&ds.len()));
    m.insert(
        "ss_max_train_steps".into(),
        s(&cfg.max_train_steps.unwrap_or(steps)),
    );
    m.insert("ss_steps".into(), s(&steps));
    m.insert("ss_learning_rate".into(), s(&cfg.learning_rate));
    m.insert("ss_unet_lr".into(), s(&cfg.learning_rate));
    m.insert(
        "ss_text_encoder_lr".into(),
        if cfg.text_encoder_lora.is_some() {
            s(&cfg.learning_rate)
        } else {
            "0".into()
        },
    );
    m.insert(
        "ss_lr_scheduler".into(),
        serde_json::to_value(cfg.lr_scheduler)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
    );
    m.insert("ss_lr_warmup_steps".into(), s(&cfg.lr_warmup_steps));
    m.insert("ss_batch_size_per_device".into(), s(&cfg.train_batch_size));
    m.insert(
        "ss_gradient_accumulation_steps".into(),
        s(&cfg.gradient_accumulation_steps),
    );
    m.insert(
        "ss_mixed_precision".into(),
        serde_json::to_value(cfg.mixed_precision)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
    );
    m.insert("ss_max_grad_norm".into(), s(&cfg.max_grad_norm));
    m.insert("ss_seed".into(), s(&seed));
    m.insert("ss_noise_offset".into(), s(&cfg.noise_offset));
    m.insert(
        "ss_min_snr_gamma".into(),
        cfg.snr_gamma
            .map(|g| g.to_string())
            .unwrap_or_else(|| "None".into()),
    );
    m.insert(
        "ss_random_crop".into(),
        if cfg.center_crop {
            "False".into()
        } else {
            "True".into()
        },
    );
    m.insert(
        "ss_flip_aug".into(),
        if cfg.random_flip {
            "True".into()
        } else {
            "False".into()
        },
    );
    m.insert(
        "ss_cache_latents".into(),
        if cfg.cache_latents {
            "True".into()
        } else {
            "False".into()
        },
    );
    // As sd-scripts writes it (`optimizer_name(args)`), from the settings this run used.
    let a = &cfg.adam;
    m.insert(
        "ss_optimizer".into(),
        format!(
            "torch.optim.AdamW(weight_decay={},betas=({}, {}),eps={})",
            py_float(a.weight_decay),
            py_float(a.beta1),
            py_float(a.beta2),
            py_float(a.eps)
        ),
    );
    m.insert(
        "ss_dataset_dirs".into(),
        serde_json::json!({ds.root.display().to_string(): {"n_repeats": 1, "img_count": ds.len()}})
            .to_string(),
    );
    m.insert(
        "ss_tag_frequency".into(),
        serde_json::to_string(&ds.tag_frequency()).unwrap_or_default(),
    );
    m.insert(
        "ss_training_finished_at".into(),
        s(&std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)),
    );
    m.insert("ss_output_name".into(), "pytorch_lora_weights".into());
    m.insert("modelspec.sai_model_spec".into(), "1.0.0".into());
    m.insert(
        "modelspec.architecture".into(),
        "stable-diffusion-v1/lora".into(),
    );
    m.insert("modelspec.implementation".into(), "diffusers".into());
    m.insert("modelspec.title".into(), "lorafuse LoRA".into());
    m.insert(
        "modelspec.resolution".into(),
        format!("{}x{}", cfg.resolution, cfg.resolution),
    );
    m.insert("lorafuse_version".into(), env!("CARGO_PKG_VERSION").into());
    m
}

/// A float as Python's `repr` writes it (`0.01`, `1e-08`), for sd-scripts' metadata strings.
fn py_float(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-4 || x.abs() >= 1e16) {
        let e = format!("{x:e}");
        let (m, exp) = e.split_once('e').unwrap_or((&e, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    } else {
        format!("{x:?}")
    }
}

fn write_lora(
    cfg: &TrainConfig,
    models: &Models,
    path: &Path,
    ds: &Dataset,
    steps: i64,
    seed: u64,
) -> Result<()> {
    let modules = lora_modules_of(models, cfg)?;
    let meta = match cfg.save_format {
        SaveFormat::Kohya => kohya_metadata(cfg, ds, steps, seed),
        SaveFormat::Diffusers => BTreeMap::new(),
    };
    save_lora(
        path,
        &modules,
        cfg.save_format,
        save_dtype(&cfg.save_dtype)?,
        meta,
    )
}

/// Write `checkpoint-<step>` atomically (a `.partial` folder renamed into place) and enforce
/// `checkpoints_total_limit`.
fn save_checkpoint(
    cfg: &TrainConfig,
    models: &Models,
    flat: &FlatParams,
    opt: &AdamW,
    state: &TrainingState,
) -> Result<PathBuf> {
    let out = &cfg.output_dir;
    if let Some(limit) = cfg.checkpoints_total_limit {
        let existing = list_checkpoints(out);
        if limit > 0 && existing.len() >= limit {
            for (_, p) in &existing[..existing.len() + 1 - limit] {
                std::fs::remove_dir_all(p).map_err(|e| Error::io(p, e))?;
            }
        }
    }
    let final_dir = out.join(format!("checkpoint-{}", state.global_step));
    let tmp = out.join(format!(".checkpoint-{}.partial", state.global_step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    // the loadable LoRA, as the script's checkpoints hold one
    let modules = lora_modules_of(models, cfg)?;
    save_lora(
        &tmp.join("pytorch_lora_weights.safetensors"),
        &modules,
        SaveFormat::Diffusers,
        Dtype::F32,
        BTreeMap::new(),
    )?;
    // exact trainable state
    tensors_to_file(&tmp.join("lora_state.safetensors"), &flat.split(&flat.flat))?;
    let mut o = BTreeMap::new();
    for (k, v) in flat.split(&opt.exp_avg) {
        o.insert(format!("exp_avg.{k}"), v);
    }
    for (k, v) in flat.split(&opt.exp_avg_sq) {
        o.insert(format!("exp_avg_sq.{k}"), v);
    }
    tensors_to_file(&tmp.join("optimizer.safetensors"), &o)?;
    write_json(&tmp.join("training_state.json"), state)?;
    sync_dir(&tmp);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    sync_dir(out);
    Ok(final_dir)
}

#[cfg(test)]
mod tests {
    #[test]
    fn floats_print_as_python_repr() {
        for (x, want) in [
            (0.01, "0.01"),
            (0.9, "0.9"),
            (0.999, "0.999"),
            (1e-8, "1e-08"),
            (1e-10, "1e-10"),
            (0.0, "0.0"),
            (2e-5, "2e-05"),
        ] {
            assert_eq!(super::py_float(x), want);
        }
    }
}
