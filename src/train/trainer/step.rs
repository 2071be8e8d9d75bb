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
