//! `generate` for both doors: N images in UNet batches, seeds, scheduler names, pixels and the
//! A1111 `parameters` text, in one place (`lorafuse generate` and the C ABI's `generate` call it).
//!
//! Seeds: image k of a request uses `seed + k`, so an image does not depend on the batch size; a
//! request whose last seed would pass `u64::MAX` is refused, never wrapped.
//!
//! LoRA tags (`<lora:name:weight>`, AUTOMATIC1111's syntax) are taken out of the text the model
//! sees by [`prompt_loras`] and stay in the parameters text. Which LoRAs a request then runs with
//! is the door's documented rule: `lorafuse generate` adds the tags to its `--lora` files; the C
//! ABI, when its request names a `lora_dir`, makes the tags the pipeline's active set (replacing
//! what `set_loras` set), and without one treats tags as plain text (plugin-api's header).

use std::path::Path;

use crate::image::{ImageSettings, generation_parameters, unit_to_u8};
use crate::merge::LoraSpec;
use crate::pipeline::prompt;
use crate::pipeline::txt2img::{GenerateParams, Txt2Img, check_seed_range};
use crate::{Error, Result};

/// One text-to-image request.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    /// The prompt as the user wrote it (tags included: the parameters text keeps them).
    pub prompt: String,
    pub negative_prompt: String,
    /// Pixels, multiples of 8; 0: the UNet's sample size.
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub guidance_scale: f32,
    /// Seed of the first image; image k uses seed + k.
    pub seed: u64,
    pub num_images: usize,
    /// Images per UNet batch.
    pub batch_size: usize,
    /// `dpmpp-2m-karras` or `dpmpp_2m_karras`, ...; `None`: the pipeline's scheduler config.
    pub scheduler: Option<String>,
    /// Starting latents `[b, 4, h/8, w/8]` (diffusers' `latents=`).
    pub init_latents: Option<(Vec<usize>, Vec<f32>)>,
    /// A1111's `Model hash` for the parameters text (see [`crate::hashes::model_hash_arg`]).
    pub model_hash: Option<String>,
}

impl Default for ImageRequest {
    fn default() -> Self {
        let g = GenerateParams::default();
        ImageRequest {
            prompt: g.prompt,
            negative_prompt: g.negative_prompt,
            width: g.width,
            height: g.height,
            steps: g.steps,
            guidance_scale: g.guidance_scale,
            seed: g.seed,
            num_images: 1,
            batch_size: g.batch,
            scheduler: g.scheduler,
            init_latents: g.init_latents,
            model_hash: None,
        }
    }
}

/// One finished image.
#[derive(Debug, Clone)]
pub struct Image {
    /// Its number in the request (0-based).
    pub index: usize,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    /// RGB, row-major, 3 bytes a pixel.
    pub rgb: Vec<u8>,
    /// AUTOMATIC1111's `parameters` text.
    pub parameters: String,
}

/// What a request did besides its images.
#[derive(Debug, Clone, Default)]
pub struct ImagesDone {
    /// The prompt (or negative prompt) had more than 77 CLIP tokens; the rest was ignored.
    pub prompt_truncated: bool,
}

/// The text the model sees and the LoRAs of the prompt's `<lora:name:weight>` tags, resolved
/// inside `lora_dir` (a tag without a folder is an error).
pub fn prompt_loras(prompt_text: &str, lora_dir: Option<&Path>) -> Result<(String, Vec<LoraSpec>)> {
    let tags = prompt::extract_lora_tags(prompt_text)?;
    let specs = prompt::tag_specs(&tags, lora_dir)?;
    Ok((tags.text, specs))
}

/// What the parameters text calls the model of the pipeline folder `dir`: the folder's name.
pub fn model_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A scheduler name as users write it (`dpmpp-2m-karras`) in lorafuse's form (`dpmpp_2m_karras`).
pub fn scheduler_name(name: &str) -> String {
    name.replace('-', "_")
}

/// Generate `req.num_images` images on `pipe` with its current LoRAs. `model_prompt` is the text
/// the model sees (the prompt without its tags), `loras` what the parameters text lists, `model`
/// the model's name there. `progress(done, total)` counts steps over the whole request; returning
/// `false` stops with [`Error::Cancelled`]. Each image goes to `emit` as soon as its batch is done.
#[allow(clippy::too_many_arguments)]
pub fn generate_images(
    pipe: &mut Txt2Img,
    req: &ImageRequest,
    model_prompt: &str,
    model: &str,
    loras: &[LoraSpec],
    progress: &mut dyn FnMut(usize, usize) -> bool,
    emit: &mut dyn FnMut(Image) -> Result<()>,
) -> Result<ImagesDone> {
    if req.num_images == 0 || req.batch_size == 0 {
        return Err(Error::InvalidArgument(
            "the number of images and the batch size must be at least 1".into(),
        ));
    }
    check_seed_range(req.seed, req.num_images)?;
    let scheduler = req.scheduler.as_deref().map(scheduler_name);
    let batches = req.num_images.div_ceil(req.batch_size);
    let lora_hashes = crate::hashes::lora_hashes(loras)?;
    let mut done = ImagesDone::default();
    let mut index = 0usize;
    let mut batch_no = 0usize;
    while index < req.num_images {
        let b = req.batch_size.min(req.num_images - index);
        let seed = req.seed + index as u64;
        let params = GenerateParams {
            prompt: model_prompt.to_string(),
            negative_prompt: req.negative_prompt.clone(),
            width: req.width,
            height: req.height,
            steps: req.steps,
            guidance_scale: req.guidance_scale,
            seed,
            scheduler: scheduler.clone(),
            init_latents: req.init_latents.clone(),
            batch: b,
        };
        let out = pipe.generate(&params, &mut |step, total| {
            progress(batch_no * total + step, total * batches)
        })?;
        done.prompt_truncated |= out.prompt_truncated;
        let sampler = pipe.scheduler_name(scheduler.as_deref());
        let per = (out.width * out.height * 3) as usize;
        for k in 0..out.batch {
            let image_seed = seed + k as u64;
            emit(Image {
                index: index + k,
                seed: image_seed,
                width: out.width,
                height: out.height,
                rgb: unit_to_u8(&out.pixels[k * per..(k + 1) * per]),
                parameters: generation_parameters(&ImageSettings {
                    prompt: &req.prompt,
                    negative_prompt: &req.negative_prompt,
                    steps: req.steps,
                    scheduler: &sampler,
                    guidance_scale: req.guidance_scale,
                    seed: image_seed,
                    width: out.width,
                    height: out.height,
                    model,
                    model_hash: req.model_hash.as_deref(),
                    loras,
                    lora_hashes: lora_hashes.as_deref(),
                }),
            })?;
        }
        index += b;
        batch_no += 1;
    }
    Ok(done)
}
