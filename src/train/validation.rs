//! Validation images from the weights being trained: the script's `log_validation`
//! (`pipeline(validation_prompt, num_inference_steps=30, generator=seeded)`, guidance 7.5, the
//! pipeline's own scheduler, `sample_size · 8` pixels) run on the tch UNet (with its live LoRA
//! layers), the tch CLIP text encoder and VAE decoder, and [`crate::pipeline::scheduler`].

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_distr::Distribution;
use tch::{Device, Kind, Tensor};

use super::clip::ClipTextModel;
use super::unet_2d::UNet2DConditionModel;
use super::vae::VaeDecoder;
use crate::image::{
    GeneratedImage, a1111_parameters, a1111_sampler_name, unit_to_u8, vae_to_unit, write_png,
};
use crate::pipeline::scheduler::{SchedulerConfig, make_scheduler};
use crate::pipeline::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// What to generate.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ValidationConfig {
    pub prompt: String,
    /// `--num_validation_images` (the script's default 4).
    pub num_images: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    /// `--validation_epochs`: every N epochs (the script's default 1).
    pub every_epochs: Option<i64>,
    /// `--validation_steps`: every N optimiser steps.
    pub every_steps: Option<i64>,
}

impl ValidationConfig {
    /// The script's validation of `prompt`: 4 images (`--num_validation_images`), 30 steps and
    /// guidance 7.5 (`log_validation`), every epoch (`--validation_epochs 1`).
    pub fn new(prompt: String) -> Self {
        ValidationConfig {
            prompt,
            num_images: 4,
            steps: 30,
            guidance_scale: 7.5,
            every_epochs: Some(1),
            every_steps: None,
        }
    }
}

/// `lorafuse train`'s validation flags; [`ValidationFlags::config`] is `None` without a prompt.
#[derive(Debug, Clone, clap::Args)]
pub struct ValidationFlags {
    /// A prompt to sample while training (images and their grid land in OUTPUT_DIR/validation/).
    #[arg(long = "validation_prompt")]
    pub validation_prompt: Option<String>,
    #[arg(long = "num_validation_images", default_value_t = defaults().num_images)]
    pub num_validation_images: usize,
    /// Validate every N epochs.
    #[arg(long = "validation_epochs", default_value_t = defaults().every_epochs.unwrap_or(1))]
    pub validation_epochs: i64,
    /// Validate every N optimiser steps instead of every N epochs.
    #[arg(long = "validation_steps")]
    pub validation_steps: Option<i64>,
    /// Inference steps of validation images (the script's 30).
    #[arg(long = "validation_inference_steps", default_value_t = defaults().steps)]
    pub validation_inference_steps: usize,
    #[arg(long = "validation_guidance_scale", default_value_t = defaults().guidance_scale)]
    pub validation_guidance_scale: f64,
}

fn defaults() -> ValidationConfig {
    ValidationConfig::new(String::new())
}

impl ValidationFlags {
    pub fn config(&self) -> Option<ValidationConfig> {
        self.validation_prompt.as_ref().map(|p| ValidationConfig {
            prompt: p.clone(),
            num_images: self.num_validation_images,
            steps: self.validation_inference_steps,
            guidance_scale: self.validation_guidance_scale,
            every_epochs: Some(self.validation_epochs),
            every_steps: self.validation_steps,
        })
    }
}

/// The frozen models validation needs besides the UNet (loaded once, on first use).
pub struct Validator {
    pub text_encoder: ClipTextModel,
    pub vae: VaeDecoder,
    pub tokenizer: ClipTokenizer,
    pub scheduler: SchedulerConfig,
    pub device: Device,
    pub kind: Kind,
}

impl Validator {
    /// One image as `StableDiffusionPipeline.__call__` makes it: prompt and negative prompt
    /// through the text encoder, `latents · init_noise_sigma`, per timestep a CFG batch of 2
    /// (`uncond + g·(cond − uncond)`) and a scheduler step, then `latents / scaling_factor`
    /// through the VAE decoder. `init_latents` are the N(0, 1) starting latents `[4, h/8, w/8]`;
    /// `rng` feeds schedulers that draw noise. Returns floats in [0, 1] laid out `[h, w, 3]`.
    #[allow(clippy::too_many_arguments)]
    pub fn txt2img(
        &self,
        unet: &UNet2DConditionModel,
        prompt: &str,
        negative_prompt: &str,
        steps: usize,
        guidance_scale: f64,
        init_latents: &[f32],
        height: i64,
        width: i64,
        rng: &mut impl rand::Rng,
    ) -> Result<Vec<f32>> {
        let (h, w) = (height / 8, width / 8);
        let n = (4 * h * w) as usize;
        if h <= 0 || w <= 0 || init_latents.len() != n {
            return Err(Error::InvalidArgument(format!(
                "{width}x{height} needs {n} starting latents (got {})",
                init_latents.len()
            )));
        }
        let kind_sched = self
            .scheduler
            .default_kind()
            .unwrap_or(crate::pipeline::scheduler::SchedulerKind::Pndm);
        let ids = |p: &str| -> Result<Tensor> {
            Ok(Tensor::from_slice(&self.tokenizer.encode(p)?.ids).unsqueeze(0))
        };
        let cond = Tensor::cat(&[ids(negative_prompt)?, ids(prompt)?], 0);
        tch::no_grad(|| {
            let (ehs, _) = self.text_encoder.forward(&cond.to_device(self.device))?;
            let ehs = ehs.to_kind(self.kind);
            let mut sched = make_scheduler(kind_sched, &self.scheduler)?;
            sched.set_timesteps(steps)?;
            let sigma = sched.init_noise_sigma();
            let mut lat: Vec<f32> = init_latents.iter().map(|z| z * sigma).collect();
            let timesteps = sched.timesteps().to_vec();
            for (si, &t) in timesteps.iter().enumerate() {
                let scaled = sched.scale_model_input(&lat, si)?;
                let x = Tensor::from_slice(&scaled)
                    .view([1, 4, h, w])
                    .to_device(self.device)
                    .to_kind(self.kind);
                let x2 = Tensor::cat(&[&x, &x], 0);
                let tt = Tensor::from(t).to_device(self.device);
                let pred = unet.forward(&x2, &tt, &ehs).to_kind(Kind::Float);
                let parts = pred.chunk(2, 0);
                let guided = &parts[0] + (&parts[1] - &parts[0]) * guidance_scale;
                let g: Vec<f32> =
                    Vec::<f32>::try_from(guided.to_device(Device::Cpu).flatten(0, -1))?;
                let noise: Option<Vec<f32>> = sched.needs_noise(si).then(|| {
                    (0..n)
                        .map(|_| {
                            let z: f32 = rand_distr::StandardNormal.sample(rng);
                            z
                        })
                        .collect()
                });
                lat = sched.step(&g, si, &lat, noise.as_deref())?;
            }
            let z = Tensor::from_slice(&lat)
                .view([1, 4, h, w])
                .to_device(self.device);
            let z = (z / self.vae.config.scaling_factor).to_kind(self.kind);
            let img = self
                .vae
                .decode(&z)
                .to_kind(Kind::Float)
                .to_device(Device::Cpu);
            let px: Vec<f32> = Vec::<f32>::try_from(img.flatten(0, -1))?;
            vae_to_unit(&px, 0, height as usize, width as usize)
        })
    }

    /// `cfg.num_images` images of `cfg.prompt` (`width`×`height` pixels) from `unet`, image `i`
    /// seeded by `seed + i`.
    pub fn generate(
        &self,
        unet: &UNet2DConditionModel,
        cfg: &ValidationConfig,
        width: i64,
        height: i64,
        seed: u64,
    ) -> Result<Vec<GeneratedImage>> {
        let kind_sched = self
            .scheduler
            .default_kind()
            .unwrap_or(crate::pipeline::scheduler::SchedulerKind::Pndm);
        let n = (4 * (height / 8) * (width / 8)).max(0) as usize;
        let mut out = Vec::new();
        for i in 0..cfg.num_images {
            let s = seed.wrapping_add(i as u64);
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(s);
            let init: Vec<f32> = (0..n)
                .map(|_| {
                    let z: f32 = rand_distr::StandardNormal.sample(&mut rng);
                    z
                })
                .collect();
            let unit = self.txt2img(
                unet,
                &cfg.prompt,
                "",
                cfg.steps,
                cfg.guidance_scale,
                &init,
                height,
                width,
                &mut rng,
            )?;
            let parameters = a1111_parameters(
                &cfg.prompt,
                "",
                &[
                    ("Steps", cfg.steps.to_string()),
                    ("Sampler", a1111_sampler_name(kind_sched.name())),
                    ("CFG scale", cfg.guidance_scale.to_string()),
                    ("Seed", s.to_string()),
                    ("Size", format!("{width}x{height}")),
                ],
            );
            out.push(GeneratedImage {
                width: width as u32,
                height: height as u32,
                rgb: unit_to_u8(&unit),
                parameters,
            });
        }
        Ok(out)
    }
}

/// Write validation images as `<dir>/<tag>-<i>.png`; returns the paths.
pub fn write_images(dir: &Path, tag: &str, images: &[GeneratedImage]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let p = dir.join(format!("{tag}-{i}.png"));
        write_png(&p, img)?;
        paths.push(p);
    }
    Ok(paths)
}
