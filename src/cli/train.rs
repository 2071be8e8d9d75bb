//! `lorafuse train`: the command line of diffusers' `train_text_to_image_lora.py` (same option
//! names; their kebab-case spellings are accepted too, see [`super::kebab_to_snake`]), declared
//! by the library's [`lorafuse::train::trainer::TrainConfig`] and its flag groups.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::GlobalArgs;
use lorafuse::train::lora::LoraFlags;
use lorafuse::train::trainer::{Event, TrainConfig, train};
use lorafuse::train::validation::ValidationFlags;

/// `lorafuse train`: the library's [`TrainConfig`] with its LoRA and validation flag groups (the
/// script's flags and their defaults live there), the script's flags lorafuse accepts without
/// using them, and how progress is printed.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: TrainConfig,
    #[command(flatten)]
    pub lora: LoraFlags,
    #[command(flatten)]
    pub validation: ValidationFlags,
    #[command(flatten)]
    pub script: ScriptOnlyFlags,
    /// Print one line per step (no progress bar), e.g. for logs.
    #[arg(long = "plain_log")]
    pub plain_log: bool,
}

/// Flags of the script that have no meaning here: accepted (ignored, with a note) or refused
/// with the reason.
#[derive(Debug, Args)]
pub struct ScriptOnlyFlags {
    /// Accepted for compatibility (local folders have no revisions).
    #[arg(long, hide = true)]
    pub revision: Option<String>,
    /// Accepted for compatibility; `.fp16.safetensors` files are used when the plain ones are absent.
    #[arg(long, hide = true)]
    pub variant: Option<String>,
    #[arg(long = "dataset_config_name", hide = true)]
    pub dataset_config_name: Option<String>,
    #[arg(long = "cache_dir", hide = true)]
    pub cache_dir: Option<PathBuf>,
    /// Accepted; not implemented (LoRA training fits without it).
    #[arg(long = "gradient_checkpointing")]
    pub gradient_checkpointing: bool,
    #[arg(long = "use_8bit_adam", hide = true)]
    pub use_8bit_adam: bool,
    /// Accepted (libtorch's default matmul precision is used).
    #[arg(long = "allow_tf32")]
    pub allow_tf32: bool,
    #[arg(long = "dataloader_num_workers", hide = true)]
    pub dataloader_num_workers: Option<usize>,
    #[arg(long = "push_to_hub", hide = true)]
    pub push_to_hub: bool,
    #[arg(long = "hub_token", hide = true)]
    pub hub_token: Option<String>,
    #[arg(long = "hub_model_id", hide = true)]
    pub hub_model_id: Option<String>,
    #[arg(long = "local_rank", hide = true)]
    pub local_rank: Option<i64>,
    /// Accepted (attention always uses scaled_dot_product_attention).
    #[arg(long = "enable_xformers_memory_efficient_attention", hide = true)]
    pub enable_xformers_memory_efficient_attention: bool,
    /// Only lanczos (the script's default) is implemented.
    #[arg(long = "image_interpolation_mode", default_value = "lanczos")]
    pub image_interpolation_mode: String,
}

impl TrainArgs {
    pub fn to_config(&self) -> anyhow::Result<TrainConfig> {
        let s = &self.script;
        if s.use_8bit_adam {
            anyhow::bail!(
                "--use_8bit_adam is not supported (bitsandbytes is a CUDA-Python library); drop the flag"
            );
        }
        if s.push_to_hub {
            anyhow::bail!("--push_to_hub is not supported: lorafuse never uploads anything");
        }
        if s.image_interpolation_mode != "lanczos" {
            anyhow::bail!(
                "--image_interpolation_mode {}: only lanczos is implemented",
                s.image_interpolation_mode
            );
        }
        let mut c = self.config.clone();
        (c.lora, c.text_encoder_lora) = self.lora.configs();
        c.validation = self.validation.config();
        Ok(c)
    }
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

pub fn run(_global: &GlobalArgs, a: TrainArgs) -> anyhow::Result<()> {
    let cfg = a.to_config()?;
    for (flag, on) in [
        ("--gradient_checkpointing", a.script.gradient_checkpointing),
        (
            "--enable_xformers_memory_efficient_attention",
            a.script.enable_xformers_memory_efficient_attention,
        ),
    ] {
        if on {
            eprintln!("note: {flag} is accepted and ignored");
        }
    }
    // The trainer turns libtorch's out-of-memory panics into an error naming the flags to lower;
    // the default hook would print them (with torch's C++ backtrace) first.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = lorafuse::error::panic_message(info.payload());
        if !text.is_some_and(lorafuse::train::trainer::is_out_of_memory) {
            default_hook(info)
        }
    }));
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
