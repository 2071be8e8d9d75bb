//! `lorafuse generate`: text-to-image through ONNX Runtime, PNGs with A1111 `parameters`.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::GlobalArgs;
use lorafuse::api;
use lorafuse::image::{GeneratedImage, write_png};
use lorafuse::merge::{LoraSpec, MergeOptions};
use lorafuse::pipeline::txt2img::{GenerateParams, Txt2Img};
use lorafuse::runtime;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// ONNX pipeline folder (optimum layout: text_encoder/, unet/, vae_decoder/, tokenizer/, scheduler/).
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    #[arg(long, short = 'p')]
    pub prompt: String,
    #[arg(long, short = 'n', default_value = "")]
    pub negative_prompt: String,
    /// Image width in pixels, a multiple of 8 (default: the UNet's sample_size × 8).
    #[arg(long, short = 'W')]
    pub width: Option<u32>,
    /// Image height in pixels, a multiple of 8 (default: the UNet's sample_size × 8).
    #[arg(long, short = 'H')]
    pub height: Option<u32>,
    #[arg(long, default_value_t = GenerateParams::DEFAULT_STEPS)]
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance (and the negative prompt) off.
    #[arg(long = "guidance-scale", alias = "cfg", default_value_t = GenerateParams::DEFAULT_GUIDANCE_SCALE)]
    pub guidance_scale: f32,
    /// Seed of the first image; image k uses seed + k.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// pndm, ddim, euler, euler-a, dpmpp-2m, lms (+ "-karras" for euler, dpmpp-2m, lms).
    /// Default: the class in scheduler/scheduler_config.json.
    #[arg(long)]
    pub scheduler: Option<String>,
    /// How many images to make.
    #[arg(long = "num-images", default_value_t = 1)]
    pub num_images: usize,
    /// Images per UNet batch.
    #[arg(long = "batch-size", default_value_t = 1)]
    pub batch_size: usize,
    /// Starting latents [b, 4, h/8, w/8] (.npy, or .safetensors with one tensor), as diffusers' `latents=`.
    #[arg(long = "init-latents")]
    pub init_latents: Option<PathBuf>,
    /// A1111's `Model hash` in the PNG text (what Civitai links): the checkpoint this pipeline was
    /// exported from (hashed like A1111: SHA-256, first 10 hex digits) or its hash.
    #[arg(long = "model-hash", value_name = "CHECKPOINT|HASH")]
    pub model_hash: Option<String>,
    /// Output file pattern: {index} (image number), {seed}.
    #[arg(long, short = 'o', default_value = "outputs/{index}-{seed}.png")]
    pub output: String,
    #[command(flatten)]
    pub session: super::SessionArgs,
    /// Apply a LoRA at run time (no files written), FILE[:WEIGHT]. Repeat for several.
    #[arg(long = "lora", short = 'l', value_name = "FILE[:WEIGHT]")]
    pub loras: Vec<LoraSpec>,
    /// Folder where `<lora:name:weight>` tags in the prompt are looked up.
    #[arg(long)]
    pub lora_dir: Option<PathBuf>,
    /// Fail when a LoRA has keys that map to no module (default: report them).
    #[arg(long)]
    pub strict: bool,
    /// How LoRAs enter the sessions: `rebuild` (sessions built from merged weights: the fastest
    /// images for a one-shot run) or `switch` (weights as graph inputs updated on the device: what
    /// a live pipeline and the plugin switch with; gives the plugin's pixels bit for bit).
    #[arg(long = "lora-mode", default_value_t = lorafuse::pipeline::txt2img::LoraMode::ONE_SHOT)]
    pub lora_mode: lorafuse::pipeline::txt2img::LoraMode,
}

pub fn run(global: &GlobalArgs, a: GenerateArgs) -> anyhow::Result<()> {
    runtime::init(global.ort_lib.as_deref())?;
    if a.batch_size == 0 || a.num_images == 0 {
        bail!("--num-images and --batch-size must be at least 1");
    }
    if a.num_images > 1 && !a.output.contains("{index}") && !a.output.contains("{seed}") {
        bail!(
            "-o {}: {} images would overwrite each other; put {{index}} or {{seed}} in the name",
            a.output,
            a.num_images
        );
    }
    lorafuse::pipeline::txt2img::check_seed_range(a.seed, a.num_images)?;
    // Nothing but regular files is replaced: the first name is checked before any work, every
    // other one by write_png.
    lorafuse::files::check_output_file(&output_path(&a.output, 0, a.seed))?;
    let init_latents = a.init_latents.as_deref().map(read_latents).transpose()?;
    let opts = a.session.options()?;
    let mut pipe = Txt2Img::open(&a.model, &opts)
        .with_context(|| format!("opening pipeline {}", a.model.display()))?;

    // LoRAs: --lora flags, then <lora:name:weight> tags (which leave the prompt text).
    let (prompt_text, tag_loras) = api::prompt_loras(&a.prompt, a.lora_dir.as_deref())?;
    let mut loras = a.loras.clone();
    loras.extend(tag_loras);
    if !loras.is_empty() {
        pipe.set_lora_mode(a.lora_mode)?;
        let reports = pipe.set_loras(
            &loras,
            &MergeOptions {
                strict: a.strict,
                ..Default::default()
            },
        )?;
        for r in &reports {
            eprintln!("{r}");
            for u in &r.unmapped {
                eprintln!("  unmapped: {u}");
            }
        }
    }

    let stop =
        super::ctrl_c_flag("interrupted: stopping after this step (Ctrl-C again to quit now)");

    let model_name = api::model_name(&a.model);
    let req = api::ImageRequest {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        width: a.width.unwrap_or(0),
        height: a.height.unwrap_or(0),
        steps: a.steps,
        guidance_scale: a.guidance_scale,
        seed: a.seed,
        num_images: a.num_images,
        batch_size: a.batch_size,
        scheduler: a.scheduler.clone(),
        init_latents,
        model_hash: a
            .model_hash
            .as_deref()
            .map(lorafuse::hashes::model_hash_arg)
            .transpose()?,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "images {msg} [{bar:30}] {pos}/{len} steps {elapsed_precise} ({per_sec})",
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .progress_chars("=> "),
    );
    bar.set_message(format!("1..{}", a.num_images));
    let done = api::generate_images(
        &mut pipe,
        &req,
        &prompt_text,
        &model_name,
        &loras,
        &mut |step, total| {
            bar.set_length(total as u64);
            bar.set_position(step as u64);
            !stop.load(Ordering::SeqCst)
        },
        &mut |img| {
            let path = output_path(&a.output, img.index, img.seed);
            write_png(
                &path,
                &GeneratedImage {
                    width: img.width,
                    height: img.height,
                    rgb: img.rgb,
                    parameters: img.parameters,
                },
            )?;
            bar.suspend(|| println!("{}", path.display()));
            Ok(())
        },
    );
    bar.finish_and_clear();
    if done?.prompt_truncated {
        eprintln!("warning: the prompt is longer than 77 CLIP tokens; the rest was ignored");
    }
    Ok(())
}

/// The file of image `index` (seed `seed`) for the `-o` pattern.
fn output_path(pattern: &str, index: usize, seed: u64) -> PathBuf {
    PathBuf::from(
        pattern
            .replace("{index}", &index.to_string())
            .replace("{seed}", &seed.to_string()),
    )
}

/// Latents from `.npy` (f32) or `.safetensors` (one tensor, any float dtype).
fn read_latents(path: &Path) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => Ok(lorafuse::weights::npy::read_f32(path)?),
        Some("safetensors") => {
            let w = lorafuse::weights::WeightFile::open(path)?;
            let names: Vec<&str> = w.names().collect();
            let name = match names.as_slice() {
                [one] => (*one).to_string(),
                _ => ["init_latents", "latents"]
                    .into_iter()
                    .find(|n| names.contains(n))
                    .map(String::from)
                    .with_context(|| {
                        format!(
                            "{}: holds {} tensors; name one `latents` or `init_latents`",
                            path.display(),
                            names.len()
                        )
                    })?,
            };
            Ok(w.tensor_f32(&name)?)
        }
        _ => bail!(
            "{}: --init-latents takes a .npy or .safetensors file",
            path.display()
        ),
    }
}
