//! `lorafuse train`: the command line of diffusers' `train_text_to_image_lora.py` (same option
//! names; their kebab-case spellings are accepted too, see [`super::kebab_to_snake`]), mapped
//! onto [`lorafuse::train::trainer::TrainConfig`].

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::GlobalArgs;
use lorafuse::train::buckets::BucketConfig;
use lorafuse::train::captions::CaptionConfig;
use lorafuse::train::lora::{LoraConfig, LoraInit};
use lorafuse::train::noise::Prediction;
use lorafuse::train::optim::{AdamWConfig, LrSchedule};
use lorafuse::train::output::SaveFormat;
use lorafuse::train::trainer::{Event, MixedPrecision, ReportTo, TrainConfig, train};
use lorafuse::train::validation::ValidationConfig;

/// The library's defaults (`TrainConfig::new`, the script's `parse_args`): every flag's default
/// is read from here, so it is written once (tests/defaults.rs).
fn defaults() -> &'static TrainConfig {
    static D: std::sync::OnceLock<TrainConfig> = std::sync::OnceLock::new();
    D.get_or_init(|| TrainConfig::new(PathBuf::new(), PathBuf::new()))
}

/// `--save_precision`, checked when the command line is parsed (not after the last step).
fn parse_save_precision(s: &str) -> Result<String, String> {
    lorafuse::train::trainer::check_save_precision(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

/// `--device`, checked when the command line is parsed.
fn parse_device(s: &str) -> Result<String, String> {
    lorafuse::train::parse_device(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InitArg {
    Gaussian,
    Kaiming,
}

/// The script's options (`parse_args`), plus lorafuse's own after them.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// A local diffusers-layout pipeline folder (unet/, text_encoder/, vae/, tokenizer/, scheduler/),
    /// or an SD 1.x single-file `.safetensors` checkpoint (original LDM key names).
    #[arg(long = "pretrained_model_name_or_path", value_name = "DIR")]
    pub pretrained_model_name_or_path: PathBuf,
    /// The tokenizer folder (vocab.json + merges.txt) for a single-file checkpoint; default:
    /// `tokenizer/` beside the file.
    #[arg(long, value_name = "DIR")]
    pub tokenizer: Option<PathBuf>,
    /// Accepted for compatibility (local folders have no revisions).
    #[arg(long, hide = true)]
    pub revision: Option<String>,
    /// Accepted for compatibility; `.fp16.safetensors` files are used when the plain ones are absent.
    #[arg(long, hide = true)]
    pub variant: Option<String>,
    /// A local data set folder (same as --train_data_dir).
    #[arg(long = "dataset_name", value_name = "DIR")]
    pub dataset_name: Option<PathBuf>,
    #[arg(long = "dataset_config_name", hide = true)]
    pub dataset_config_name: Option<String>,
    /// Folder with images + metadata.jsonl / metadata.csv (file_name + caption column), or kohya-style image + .txt pairs.
    #[arg(long = "train_data_dir", value_name = "DIR")]
    pub train_data_dir: Option<PathBuf>,
    /// The image column of parquet files; in metadata.jsonl / metadata.csv the column naming the
    /// image file (`image` falls back to `file_name` there).
    #[arg(long = "image_column", default_value_t = defaults().image_column.clone())]
    pub image_column: String,
    /// The metadata column with the caption (a string or a list of strings).
    #[arg(long = "caption_column", default_value_t = defaults().caption_column.clone())]
    pub caption_column: String,
    /// A prompt to sample while training (images land in OUTPUT_DIR/validation/).
    #[arg(long = "validation_prompt")]
    pub validation_prompt: Option<String>,
    #[arg(long = "num_validation_images", default_value_t = 4)]
    pub num_validation_images: usize,
    /// Validate every N epochs.
    #[arg(long = "validation_epochs", default_value_t = 1)]
    pub validation_epochs: i64,
    /// Validate every N optimiser steps instead of every N epochs.
    #[arg(long = "validation_steps")]
    pub validation_steps: Option<i64>,
    #[arg(long = "max_train_samples")]
    pub max_train_samples: Option<usize>,
    #[arg(long = "output_dir", default_value_os_t = defaults().output_dir.clone())]
    pub output_dir: PathBuf,
    #[arg(long = "cache_dir", hide = true)]
    pub cache_dir: Option<PathBuf>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = defaults().resolution)]
    pub resolution: u32,
    #[arg(long = "center_crop")]
    pub center_crop: bool,
    #[arg(long = "random_flip")]
    pub random_flip: bool,
    #[arg(long = "train_batch_size", default_value_t = defaults().train_batch_size)]
    pub train_batch_size: usize,
    #[arg(long = "num_train_epochs", default_value_t = defaults().num_train_epochs)]
    pub num_train_epochs: i64,
    /// Total optimiser steps (overrides --num_train_epochs).
    #[arg(long = "max_train_steps")]
    pub max_train_steps: Option<i64>,
    #[arg(long = "gradient_accumulation_steps", default_value_t = defaults().gradient_accumulation_steps)]
    pub gradient_accumulation_steps: usize,
    /// Accepted; not implemented (LoRA training fits without it).
    #[arg(long = "gradient_checkpointing")]
    pub gradient_checkpointing: bool,
    #[arg(long = "learning_rate", default_value_t = defaults().learning_rate)]
    pub learning_rate: f64,
    #[arg(long = "scale_lr")]
    pub scale_lr: bool,
    #[arg(long = "lr_scheduler", value_enum, default_value_t = defaults().lr_scheduler)]
    pub lr_scheduler: LrSchedule,
    #[arg(long = "lr_warmup_steps", default_value_t = defaults().lr_warmup_steps)]
    pub lr_warmup_steps: i64,
    /// Min-SNR loss weighting γ (5.0 recommended).
    #[arg(long = "snr_gamma")]
    pub snr_gamma: Option<f64>,
    #[arg(long = "use_8bit_adam", hide = true)]
    pub use_8bit_adam: bool,
    /// Accepted (libtorch's default matmul precision is used).
    #[arg(long = "allow_tf32")]
    pub allow_tf32: bool,
    #[arg(long = "dataloader_num_workers", hide = true, default_value_t = 0)]
    pub dataloader_num_workers: usize,
    #[arg(long = "adam_beta1", default_value_t = defaults().adam.beta1)]
    pub adam_beta1: f64,
    #[arg(long = "adam_beta2", default_value_t = defaults().adam.beta2)]
    pub adam_beta2: f64,
    #[arg(long = "adam_weight_decay", default_value_t = defaults().adam.weight_decay)]
    pub adam_weight_decay: f64,
    #[arg(long = "adam_epsilon", default_value_t = defaults().adam.eps)]
    pub adam_epsilon: f64,
    #[arg(long = "max_grad_norm", default_value_t = defaults().max_grad_norm)]
    pub max_grad_norm: f64,
    #[arg(long = "push_to_hub", hide = true)]
    pub push_to_hub: bool,
    #[arg(long = "hub_token", hide = true)]
    pub hub_token: Option<String>,
    #[arg(long = "hub_model_id", hide = true)]
    pub hub_model_id: Option<String>,
    /// epsilon or v_prediction (default: the scheduler config's).
    #[arg(long = "prediction_type", value_enum)]
    pub prediction_type: Option<Prediction>,
    /// The logs' folder, relative to --output_dir: train_log.csv and, with TensorBoard, the
    /// event files in LOGGING_DIR/text2image-fine-tune (`tensorboard --logdir OUTPUT_DIR/logs`).
    #[arg(long = "logging_dir", default_value_os_t = defaults().logging_dir.clone())]
    pub logging_dir: PathBuf,
    /// tensorboard (events + CSV, the script's default), all (the same), csv, or none.
    #[arg(long = "report_to", value_enum, default_value_t = defaults().report_to)]
    pub report_to: ReportTo,
    #[arg(long = "mixed_precision", value_enum, default_value_t = defaults().mixed_precision)]
    pub mixed_precision: MixedPrecision,
    #[arg(long = "local_rank", hide = true, default_value_t = -1)]
    pub local_rank: i64,
    #[arg(long = "checkpointing_steps", default_value_t = defaults().checkpointing_steps)]
    pub checkpointing_steps: i64,
    #[arg(long = "checkpoints_total_limit")]
    pub checkpoints_total_limit: Option<usize>,
    /// `latest` or a checkpoint folder (OUTPUT_DIR/checkpoint-N).
    #[arg(long = "resume_from_checkpoint")]
    pub resume_from_checkpoint: Option<String>,
    /// Accepted (attention always uses scaled_dot_product_attention).
    #[arg(long = "enable_xformers_memory_efficient_attention", hide = true)]
    pub enable_xformers_memory_efficient_attention: bool,
    #[arg(long = "noise_offset", default_value_t = defaults().noise_offset)]
    pub noise_offset: f64,
    /// LoRA rank r.
    #[arg(long, default_value_t = defaults().lora.rank)]
    pub rank: i64,
    /// Only lanczos (the script's default) is implemented.
    #[arg(long = "image_interpolation_mode", default_value = "lanczos")]
    pub image_interpolation_mode: String,

    // ---- lorafuse's own
    /// LoRA alpha (default: the rank, as the script does). Scale = alpha / rank.
    #[arg(long = "lora_alpha")]
    pub lora_alpha: Option<f64>,
    /// Comma-separated target module names or dotted suffixes (peft `target_modules`), e.g.
    /// `to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,proj_in,proj_out,conv1,conv2`.
    #[arg(
        long = "lora_targets",
        default_value = "to_k,to_q,to_v,to_out.0",
        value_delimiter = ','
    )]
    pub lora_targets: Vec<String>,
    /// peft init of lora_A: gaussian (the script's) or kaiming (peft's default).
    #[arg(long = "lora_init", value_enum, default_value = "gaussian")]
    pub lora_init: InitArg,
    /// Also train a LoRA on the text encoder (q/k/v/out_proj).
    #[arg(long = "train_text_encoder")]
    pub train_text_encoder: bool,
    /// Text encoder LoRA targets.
    #[arg(
        long = "text_encoder_targets",
        default_value = "q_proj,k_proj,v_proj,out_proj",
        value_delimiter = ','
    )]
    pub text_encoder_targets: Vec<String>,
    /// diffusers (the script's file) or kohya (A1111 / ComfyUI, with ss_* metadata).
    #[arg(long = "save_format", value_enum, default_value_t = defaults().save_format)]
    pub save_format: SaveFormat,
    /// Storage dtype of the written LoRA: fp32, fp16 or bf16.
    #[arg(long = "save_precision", default_value_t = defaults().save_dtype.clone(), value_parser = parse_save_precision)]
    pub save_precision: String,
    /// Do not cache VAE latents / text embeddings (re-encode every step, new random crops).
    #[arg(long = "no_cache_latents")]
    pub no_cache_latents: bool,
    /// Run accumulated micro-batches one at a time instead of as one batch.
    #[arg(long = "no_fuse_accumulation")]
    pub no_fuse_accumulation: bool,
    /// Skip unreadable images and missing captions with a warning instead of failing.
    #[arg(long = "skip_bad_images")]
    pub skip_bad_images: bool,
    /// auto (CUDA when available), cpu, cuda, cuda:N.
    #[arg(long, default_value_t = defaults().device.clone(), value_parser = parse_device)]
    pub device: String,
    /// Inference steps of validation images (the script's 30).
    #[arg(long = "validation_inference_steps", default_value_t = 30)]
    pub validation_inference_steps: usize,
    #[arg(long = "validation_guidance_scale", default_value_t = 7.5)]
    pub validation_guidance_scale: f64,
    /// Print one line per step (no progress bar), e.g. for logs.
    #[arg(long = "plain_log")]
    pub plain_log: bool,
    /// Testing: abort the process (like kill -9) right after this optimiser step.
    #[arg(long = "debug_abort_after_step", hide = true)]
    pub debug_abort_after_step: Option<i64>,

    // ---- kohya sd-scripts' options (train_util.py), with its meanings and defaults
    /// kohya: aspect-ratio buckets of about RESOLUTION² pixels; each batch holds images of one
    /// bucket, resized to cover it and centre-cropped (see --random_crop). Latents are cached
    /// per bucket.
    #[arg(long = "enable_bucket")]
    pub enable_bucket: bool,
    /// kohya: the smallest bucket side (rounded down to --bucket_reso_steps; ≤ --resolution).
    #[arg(long = "min_bucket_reso", default_value_t = defaults().bucket.min_bucket_reso)]
    pub min_bucket_reso: u32,
    /// kohya: the largest bucket side (rounded up to --bucket_reso_steps; ≥ --resolution).
    #[arg(long = "max_bucket_reso", default_value_t = defaults().bucket.max_bucket_reso)]
    pub max_bucket_reso: u32,
    /// kohya: the bucket sides' step (a multiple of 8; kohya recommends 64 for SD 1.x).
    #[arg(long = "bucket_reso_steps", default_value_t = defaults().bucket.bucket_reso_steps)]
    pub bucket_reso_steps: u32,
    /// kohya: never enlarge an image: its bucket is its own size (scaled down to RESOLUTION²
    /// pixels if larger) rounded down to --bucket_reso_steps; --min/max_bucket_reso are ignored.
    #[arg(long = "bucket_no_upscale")]
    pub bucket_no_upscale: bool,
    /// kohya: with --enable_bucket, crop each resized image at a random offset instead of
    /// centred (with cached latents the offset is drawn once per image).
    #[arg(long = "random_crop")]
    pub random_crop: bool,
    /// kohya: shuffle a caption's comma-separated tags every step (the kept ones stay first).
    /// Text embeddings are then not cached: the frozen text encoder runs every step.
    #[arg(long = "shuffle_caption")]
    pub shuffle_caption: bool,
    /// kohya: keep the first N tags in place when shuffling or dropping tags.
    #[arg(long = "keep_tokens", default_value_t = defaults().captions.keep_tokens)]
    pub keep_tokens: usize,
    /// kohya: tags before this separator (and after a second one) stay in place; overrides
    /// --keep_tokens for captions that contain it.
    #[arg(long = "keep_tokens_separator", default_value_t = defaults().captions.keep_tokens_separator.clone())]
    pub keep_tokens_separator: String,
    /// kohya: probability that a step's caption is empty (unconditional). Text embeddings stay
    /// cached (the empty caption's too).
    #[arg(long = "caption_dropout_rate", default_value_t = defaults().captions.caption_dropout_rate)]
    pub caption_dropout_rate: f64,
    /// kohya: probability that each tag (but the kept ones) is left out of a step's caption.
    /// Text embeddings are then not cached: the frozen text encoder runs every step.
    #[arg(long = "caption_tag_dropout_rate", default_value_t = defaults().captions.caption_tag_dropout_rate)]
    pub caption_tag_dropout_rate: f64,
    /// kohya: the caption file extension of image + caption folders (e.g. `.caption`; kohya's
    /// default). Default here: `.txt`, then `.caption`.
    #[arg(long = "caption_extension")]
    pub caption_extension: Option<String>,
}

impl TrainArgs {
    pub fn to_config(&self) -> anyhow::Result<TrainConfig> {
        let data = match (&self.train_data_dir, &self.dataset_name) {
            (Some(d), _) | (None, Some(d)) => d.clone(),
            (None, None) => anyhow::bail!(
                "Need either a dataset name or a training folder (--dataset_name or --train_data_dir)."
            ),
        };
        if self.use_8bit_adam {
            anyhow::bail!(
                "--use_8bit_adam is not supported (bitsandbytes is a CUDA-Python library); drop the flag"
            );
        }
        if self.push_to_hub {
            anyhow::bail!("--push_to_hub is not supported: lorafuse never uploads anything");
        }
        if self.image_interpolation_mode != "lanczos" {
            anyhow::bail!(
                "--image_interpolation_mode {}: only lanczos is implemented",
                self.image_interpolation_mode
            );
        }
        let init = match self.lora_init {
            InitArg::Gaussian => LoraInit::Gaussian,
            InitArg::Kaiming => LoraInit::Kaiming,
        };
        let alpha = self.lora_alpha.unwrap_or(self.rank as f64);
        let lora = LoraConfig {
            rank: self.rank,
            alpha,
            targets: self.lora_targets.clone(),
            init,
        };
        let text_encoder_lora = self.train_text_encoder.then(|| LoraConfig {
            rank: self.rank,
            alpha,
            targets: self.text_encoder_targets.clone(),
            init,
        });
        let validation = self.validation_prompt.as_ref().map(|p| ValidationConfig {
            prompt: p.clone(),
            num_images: self.num_validation_images,
            steps: self.validation_inference_steps,
            guidance_scale: self.validation_guidance_scale,
            every_epochs: Some(self.validation_epochs),
            every_steps: self.validation_steps,
        });
        let mut c = TrainConfig::new(self.pretrained_model_name_or_path.clone(), data);
        c.tokenizer = self.tokenizer.clone();
        c.caption_column = self.caption_column.clone();
        c.image_column = self.image_column.clone();
        c.skip_bad_images = self.skip_bad_images;
        c.max_train_samples = self.max_train_samples;
        c.output_dir = self.output_dir.clone();
        c.resolution = self.resolution;
        c.center_crop = self.center_crop;
        c.random_flip = self.random_flip;
        c.train_batch_size = self.train_batch_size;
        c.gradient_accumulation_steps = self.gradient_accumulation_steps;
        c.max_train_steps = self.max_train_steps;
        c.num_train_epochs = self.num_train_epochs;
        c.learning_rate = self.learning_rate;
        c.scale_lr = self.scale_lr;
        c.lr_scheduler = self.lr_scheduler;
        c.lr_warmup_steps = self.lr_warmup_steps;
        c.adam = AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            weight_decay: self.adam_weight_decay,
            eps: self.adam_epsilon,
        };
        c.max_grad_norm = self.max_grad_norm;
        c.lora = lora;
        c.text_encoder_lora = text_encoder_lora;
        c.mixed_precision = self.mixed_precision;
        c.seed = self.seed;
        c.snr_gamma = self.snr_gamma;
        c.noise_offset = self.noise_offset;
        c.prediction_type = self.prediction_type;
        c.checkpointing_steps = self.checkpointing_steps;
        c.checkpoints_total_limit = self.checkpoints_total_limit;
        c.resume_from_checkpoint = self.resume_from_checkpoint.clone();
        c.validation = validation;
        c.save_format = self.save_format;
        c.save_dtype = self.save_precision.clone();
        c.cache_latents = !self.no_cache_latents;
        c.fuse_accumulation = !self.no_fuse_accumulation;
        c.device = self.device.clone();
        c.abort_after_step = self.debug_abort_after_step;
        c.report_to = self.report_to;
        c.logging_dir = self.logging_dir.clone();
        c.enable_bucket = self.enable_bucket;
        c.bucket = BucketConfig {
            min_bucket_reso: self.min_bucket_reso,
            max_bucket_reso: self.max_bucket_reso,
            bucket_reso_steps: self.bucket_reso_steps,
            bucket_no_upscale: self.bucket_no_upscale,
        };
        c.random_crop = self.random_crop;
        c.captions = CaptionConfig {
            shuffle_caption: self.shuffle_caption,
            keep_tokens: self.keep_tokens,
            keep_tokens_separator: self.keep_tokens_separator.clone(),
            caption_dropout_rate: self.caption_dropout_rate,
            caption_tag_dropout_rate: self.caption_tag_dropout_rate,
        };
        c.caption_extension = self.caption_extension.clone();
        Ok(c)
    }
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

pub fn run(_global: &GlobalArgs, a: TrainArgs) -> anyhow::Result<()> {
    let cfg = a.to_config()?;
    for (flag, on) in [
        ("--gradient_checkpointing", a.gradient_checkpointing),
        (
            "--enable_xformers_memory_efficient_attention",
            a.enable_xformers_memory_efficient_attention,
        ),
    ] {
        if on {
            eprintln!("note: {flag} is accepted and ignored");
        }
    }
    let cancel = super::ctrl_c_flag(
        "interrupt: saving a checkpoint after this step (press Ctrl-C again to quit now)",
    );
    let bar = ProgressBar::hidden();
    let plain = a.plain_log;
    // Lines go above the bar once it is drawn, straight to stderr before that.
    let say = |bar: &ProgressBar, s: String| {
        if bar.is_hidden() {
            eprintln!("{s}")
        } else {
            bar.println(s)
        }
    };
    let last_decile = std::cell::Cell::new(usize::MAX);
    let mut on_event = |e: Event| match e {
        Event::Info(s) => say(&bar, s),
        Event::Warning(s) => say(&bar, format!("warning: {s}")),
        Event::Caching { what, done, total } => {
            // about every 10%, and the end
            let decile = done * 10 / total.max(1);
            if done == total || decile != last_decile.replace(decile) {
                say(&bar, format!("caching {what}: {done}/{total}"));
            }
        }
        Event::Started {
            total_steps,
            initial_step,
            examples,
            epochs,
        } => {
            say(
                &bar,
                format!(
                    "***** Running training *****\n  Num examples = {examples}\n  Num Epochs = {epochs}\n  Instantaneous batch size per device = {}\n  Gradient Accumulation steps = {}\n  Total optimization steps = {total_steps}",
                    cfg.train_batch_size, cfg.gradient_accumulation_steps
                ),
            );
            if !plain {
                bar.set_length(total_steps as u64);
                bar.set_position(initial_step as u64);
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                if let Ok(style) = ProgressStyle::with_template(
                    "Steps {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                ) {
                    bar.set_style(style.progress_chars("=> "));
                }
            }
        }
        Event::Step(l) => {
            let mem = l
                .device_mem
                .map(|m| format!(", mem {}", gib(m)))
                .unwrap_or_default();
            let msg = format!(
                "loss={:.4}, lr={:.3e}, {:.2} samples/s{mem}{}",
                l.loss,
                l.lr,
                l.samples_per_s,
                if l.skipped { " (skipped: inf/NaN)" } else { "" }
            );
            if plain {
                println!("step {} epoch {} {msg}", l.step, l.epoch);
            } else {
                bar.set_position(l.step as u64);
                bar.set_message(msg);
            }
        }
        Event::Checkpoint(p) => say(&bar, format!("Saved state to {}", p.display())),
        Event::Validation(ps) => say(
            &bar,
            format!(
                "validation images: {}",
                ps.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Event::Saved(p) => say(&bar, format!("LoRA written to {}", p.display())),
    };
    let report = train(&cfg, Some(&cancel), &mut on_event);
    bar.finish_and_clear();
    let report = report.with_context(|| format!("training on {}", cfg.train_data_dir.display()))?;
    println!(
        "done: {} steps, mean {:.2} samples/s{}, LoRA {}",
        report.steps,
        report.mean_samples_per_s,
        report
            .peak_device_mem
            .map(|m| format!(", peak device memory {}", gib(m)))
            .unwrap_or_default(),
        report.output.display()
    );
    Ok(())
}
