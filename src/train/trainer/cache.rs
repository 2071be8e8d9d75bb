//! Latents and text embeddings computed once before training (`--cache_latents`).

#[allow(unused_imports)]
use super::*;

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
