//! One optimiser step's forward and backward over its micro-batches.

#[allow(unused_imports)]
use super::*;

pub(super) struct StepCtx<'a> {
    pub(super) cfg: &'a TrainConfig,
    pub(super) cache: &'a Cache,
    pub(super) noise: &'a NoiseSchedule,
    pub(super) prediction: Prediction,
    pub(super) scaling_factor: f64,
    pub(super) latent_c: i64,
    pub(super) seed: u64,
    pub(super) device: Device,
    pub(super) kind: Kind,
    pub(super) train_text: bool,
}

/// The inputs of one micro-batch.
pub(super) struct MicroInputs {
    latents: Tensor,
    ehs: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    /// Per-sample loss weights `1 / (micro size · accumulation)`.
    weights: Tensor,
}

pub(super) fn micro_inputs(
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

    let params = latent_params(ctx, models, ds, ids, &flips, &mut rng)?;
    let parts = params.chunk(2, 1);
    let (mean, logvar) = (&parts[0], &parts[1]);
    let eps = randn(&mean.size());
    let latents = (mean + (logvar * 0.5).exp() * eps) * ctx.scaling_factor;
    let mut noise = randn(&latents.size());
    if cfg.noise_offset != 0.0 {
        noise += randn(&[b, ctx.latent_c, 1, 1]) * cfg.noise_offset;
    }
    let ehs = encoder_states(ctx, models, epoch, batch, &caps)?;
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

/// Latent distribution parameters `[b, 2c, h, w]` of examples `ids` (all of one bucket), from
/// the cache or encoded now (a new crop every step when it is random).
fn latent_params(
    ctx: &StepCtx,
    models: &Models,
    ds: &Dataset,
    ids: &[usize],
    flips: &[bool],
    rng: &mut ChaCha20Rng,
) -> Result<Tensor> {
    let cache = ctx.cache;
    if let Some(lat) = &cache.latents {
        let t = cache.slots[ids[0]].0;
        let mut idx = Vec::with_capacity(ids.len());
        for (&i, &f) in ids.iter().zip(flips) {
            let (ti, row) = cache.slots[i];
            if ti != t {
                return Err(Error::Internal("a batch mixes aspect-ratio buckets".into()));
            }
            idx.push((row * cache.flips + usize::from(f && cache.flips == 2)) as i64);
        }
        let lat = &lat[t];
        return Ok(lat
            .index_select(0, &Tensor::from_slice(&idx).to_device(lat.device()))
            .to_device(ctx.device));
    }
    let vae = models
        .vae
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("VAE not loaded".into()))?;
    let mut px = Vec::new();
    let mut shape = None;
    for (&i, &f) in ids.iter().zip(flips) {
        let (img, crop, size) =
            super::cache::prepare_image(ctx.cfg, ds, cache.buckets.as_ref(), i, rng)?;
        if *shape.get_or_insert(size) != size {
            return Err(Error::Internal("a batch mixes aspect-ratio buckets".into()));
        }
        px.extend(dataset::to_pixels_rect(&img, crop, size, f));
    }
    let (w, h) = shape.unwrap_or((ctx.cfg.resolution, ctx.cfg.resolution));
    let x = Tensor::from_slice(&px)
        .view([ids.len() as i64, 3, i64::from(h), i64::from(w)])
        .to_device(ctx.device)
        .to_kind(ctx.kind);
    let (m, lv) = tch::no_grad(|| vae.model.encode(&x));
    Ok(Tensor::cat(&[m, lv], 1).to_kind(Kind::Float))
}

/// The text encoder's hidden states for the captions `caps` (indices into the caption table)
/// after the caption controls: cached embeddings, or the text encoder run now (with gradients
/// when it carries a LoRA). Each example's caption randomness is seeded by
/// `(seed, epoch, batch, slot)`.
fn encoder_states(
    ctx: &StepCtx,
    models: &Models,
    epoch: i64,
    batch: usize,
    caps: &[usize],
) -> Result<Tensor> {
    let (cache, controls) = (ctx.cache, &ctx.cfg.captions);
    let caption_rng = |j: usize| {
        ChaCha20Rng::seed_from_u64(derive(&[
            ctx.seed,
            TAG_CAPTION,
            epoch as u64,
            batch as u64,
            j as u64,
        ]))
    };
    // per example: a row of the caption table, or token ids of a rewritten caption
    let ids_t = match &cache.tokenizer {
        Some(tok) => {
            let mut ids = Vec::new();
            for (j, &c) in caps.iter().enumerate() {
                let text = controls.process(&cache.texts[c], &mut caption_rng(j));
                ids.extend(tok.encode(&text)?.ids);
            }
            Tensor::from_slice(&ids).view([caps.len() as i64, -1])
        }
        None => {
            let rows: Vec<i64> = caps
                .iter()
                .enumerate()
                .map(|(j, &c)| match cache.empty {
                    Some(e) if controls.drops_caption(&mut caption_rng(j)) => e as i64,
                    _ => c as i64,
                })
                .collect();
            let rows = Tensor::from_slice(&rows);
            if let (Some(e), false) = (&cache.embeddings, ctx.train_text) {
                return Ok(e
                    .index_select(0, &rows.to_device(e.device()))
                    .to_device(ctx.device));
            }
            cache.ids.index_select(0, &rows)
        }
    };
    let text = models
        .text
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("text encoder not loaded".into()))?;
    let ids_t = ids_t.to_device(ctx.device);
    if ctx.train_text {
        Ok(text.model.forward(&ids_t)?.0)
    } else {
        tch::no_grad(|| text.model.forward(&ids_t)).map(|o| o.0)
    }
}

/// Forward + backward over one optimiser step's micro-batches; returns the step's loss.
pub(super) fn run_group(
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
    // Fused: one batch per latent shape (micro-batches of different buckets cannot be
    // concatenated; the per-sample weights make the summed losses the same gradient).
    let groups: Vec<Vec<&MicroInputs>> = if ctx.cfg.fuse_accumulation {
        let mut by_shape: Vec<(Vec<i64>, Vec<&MicroInputs>)> = Vec::new();
        for m in &inputs {
            let shape = m.latents.size()[1..].to_vec();
            match by_shape.iter_mut().find(|(s, _)| *s == shape) {
                Some((_, g)) => g.push(m),
                None => by_shape.push((shape, vec![m])),
            }
        }
        by_shape.into_iter().map(|(_, g)| g).collect()
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
