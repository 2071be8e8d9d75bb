//! Latents and text embeddings computed once before training (`--cache_latents`).

#[allow(unused_imports)]
use super::*;

/// Caches stay on the training device unless they are larger than this.
const CACHE_BUDGET: i64 = 4 << 30;

#[allow(clippy::too_many_arguments)]
pub(super) fn build_cache(
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
    // with caption dropout the empty caption is one more entry of the table
    let mut captions = captions;
    let empty = (cfg.captions.caption_dropout_rate > 0.0).then(|| {
        captions
            .iter()
            .position(|c| c.is_empty())
            .unwrap_or_else(|| {
                captions.push(String::new());
                captions.len() - 1
            })
    });
    let mut ids = Vec::new();
    for c in &captions {
        ids.extend(tokenizer.encode(c)?.ids);
    }
    let ids = Tensor::from_slice(&ids).view([captions.len() as i64, -1]);
    let budget = CACHE_BUDGET;
    let embeddings = if train_text || cfg.captions.rewrites_tags() {
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

    let buckets = super::batches::make_buckets(cfg, ds, on_event)?;
    let (latents, slots, flips) = if cfg.cache_latents {
        let (l, slots, flips) =
            encode_latents(cfg, ds, vae, seed, device, buckets.as_ref(), on_event)?;
        (Some(l), slots, flips)
    } else {
        // fail early on unreadable images instead of mid-run
        for e in &ds.examples {
            e.load_rgb()?;
        }
        ((None), (0..ds.len()).map(|i| (0, i)).collect(), 1)
    };
    Ok(Cache {
        latents,
        slots,
        flips,
        embeddings,
        ids,
        captions: per_example,
        texts: captions,
        empty,
        tokenizer: cfg.captions.rewrites_tags().then(|| tokenizer.clone()),
        buckets,
    })
}

/// The resized image of example `i` and its crop `(crop, width × height)`: the script's square
/// resize and crop, or the example's bucket.
pub(super) fn prepare_image(
    cfg: &TrainConfig,
    ds: &Dataset,
    buckets: Option<&Buckets>,
    i: usize,
    rng: &mut impl Rng,
) -> Result<(image::RgbImage, Crop, (u32, u32))> {
    let img = ds.examples[i].load_rgb()?;
    match buckets {
        Some(b) => {
            let a = b.assignment[i];
            let img = dataset::resize_exact(&img, a.resized);
            let (left, top) = if cfg.random_crop {
                (
                    rng.random_range(0..=a.resized.0 - a.bucket.0),
                    rng.random_range(0..=a.resized.1 - a.bucket.1),
                )
            } else {
                a.center_crop()
            };
            Ok((img, Crop { top, left }, a.bucket))
        }
        None => {
            let r = cfg.resolution;
            let img = dataset::resize_shorter(&img, r);
            let (w, h) = img.dimensions();
            let crop = if cfg.center_crop {
                dataset::center_crop(w, h, r)
            } else {
                Crop {
                    top: rng.random_range(0..=h - r),
                    left: rng.random_range(0..=w - r),
                }
            };
            Ok((img, crop, (r, r)))
        }
    }
}

/// Latent tensors, each example's `(tensor, row)`, and the number of flips.
type Latents = (Vec<Tensor>, Vec<(usize, usize)>, usize);

/// VAE latent parameters of every example (both flips with `random_flip`): one tensor, or one
/// per bucket; returns them, each example's `(tensor, row)` and the number of flips.
#[allow(clippy::too_many_arguments)]
fn encode_latents(
    cfg: &TrainConfig,
    ds: &Dataset,
    vae: &Loaded<VaeEncoder>,
    seed: u64,
    device: Device,
    buckets: Option<&Buckets>,
    on_event: &mut dyn FnMut(Event),
) -> Result<Latents> {
    let kind = cfg.mixed_precision.kind();
    let random = if buckets.is_some() {
        cfg.random_crop
    } else {
        !cfg.center_crop
    };
    if random {
        on_event(Event::Warning("random crop with cached latents: each image's crop is drawn once (use --no_cache_latents for a new crop every step)".into()));
    }
    let flips = if cfg.random_flip { 2 } else { 1 };
    // (examples, width × height) of each latent tensor
    let groups: Vec<(Vec<usize>, (u32, u32))> = match buckets {
        Some(b) => b
            .members
            .iter()
            .cloned()
            .zip(b.resos.iter().copied())
            .collect(),
        None => vec![((0..ds.len()).collect(), (cfg.resolution, cfg.resolution))],
    };
    let pixels: i64 = groups
        .iter()
        .map(|(m, (w, h))| m.len() as i64 * (i64::from(*w) / 8) * (i64::from(*h) / 8))
        .sum();
    // kept in the dtype the VAE computes in (diffusers' script also encodes in `weight_dtype`),
    // widened to f32 when a step gathers them: in bf16 half the device memory of f32 (the
    // tutorial's 833 images × 2 flips: 109 instead of 218 MiB)
    let lat_bytes = pixels
        * flips as i64
        * 2
        * vae.model.config.latent_channels
        * kind.elt_size_in_bytes() as i64;
    let store = if lat_bytes < CACHE_BUDGET {
        device
    } else {
        Device::Cpu
    };
    let mut crop_rng = ChaCha20Rng::seed_from_u64(derive(&[seed, TAG_CROP]));
    let mut slots = vec![(0, 0); ds.len()];
    let mut tensors = Vec::new();
    let mut done = 0;
    for (t, (members, (w, h))) in groups.iter().enumerate() {
        let mut parts = Vec::new();
        // images (flips counted) per VAE pass: at 512² each holds a few 128 × 512² activations in the
        // first block (64 MiB apiece in bf16), so 4 keep the caching phase under the step's memory
        let chunk = 4usize;
        let mut px: Vec<f32> = Vec::new();
        let mut pending = 0i64;
        for (row, &i) in members.iter().enumerate() {
            slots[i] = (t, row);
            let (img, crop, size) = prepare_image(cfg, ds, buckets, i, &mut crop_rng)?;
            for f in 0..flips {
                px.extend(dataset::to_pixels_rect(&img, crop, size, f == 1));
                pending += 1;
            }
            if pending as usize >= chunk || row + 1 == members.len() {
                let x = Tensor::from_slice(&px)
                    .view([pending, 3, i64::from(*h), i64::from(*w)])
                    .to_device(device)
                    .to_kind(kind);
                let (m, lv) = tch::no_grad(|| vae.model.encode(&x));
                parts.push(Tensor::cat(&[m, lv], 1).to_device(store));
                px.clear();
                pending = 0;
            }
            done += 1;
            if pending == 0 {
                on_event(Event::Caching {
                    what: "latents",
                    done,
                    total: ds.len(),
                });
            }
        }
        tensors.push(Tensor::cat(&parts, 0));
    }
    Ok((tensors, slots, flips))
}
