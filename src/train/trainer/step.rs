//! One optimiser step: its inputs (drawn on the host), the forward and backward over its
//! micro-batches, and the update (clip, AdamW), all on the device.

#[allow(unused_imports)]
use super::*;
use crate::train::optim::clip_grad_norm_device;

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

/// The text side of a micro-batch: hidden states (cached), or token ids `[b, 77]` that the text
/// encoder runs on inside the step (with gradients when it carries a LoRA).
pub(super) enum TextInput {
    States(Tensor),
    Ids(Tensor),
}

/// The inputs of one micro-batch, on the training device: what the host decides (examples,
/// flips, captions, timesteps, the Gaussian draws) and nothing computed from it yet, so the
/// device half of the step ([`forward_backward`]) is the same code whether it runs eagerly or is
/// replayed from a CUDA graph whose static copies of these tensors are refilled every step.
pub(super) struct MicroInputs {
    /// Latent distribution parameters mean ‖ logvar `[b, 2c, h, w]`, f32.
    params: Tensor,
    /// The draw that samples the latents from `params` `[b, c, h, w]`.
    eps: Tensor,
    /// The noise `[b, c, h, w]`, and with `--noise_offset` the offset's draw `[b, c, 1, 1]`.
    noise: Tensor,
    offset: Option<Tensor>,
    text: TextInput,
    timesteps: Tensor,
    /// Per-sample loss weights `1 / (micro size · accumulation)`.
    weights: Tensor,
}

impl MicroInputs {
    /// Every tensor, in a fixed order (the static copies of a CUDA graph pair up with these).
    pub(super) fn tensors(&self) -> Vec<&Tensor> {
        let text = match &self.text {
            TextInput::States(t) | TextInput::Ids(t) => t,
        };
        let mut v = vec![&self.params, &self.eps, &self.noise, text, &self.timesteps];
        v.extend(&self.offset);
        v.push(&self.weights);
        v
    }

    /// The micro-batch's rows (examples).
    pub(super) fn rows(&self) -> i64 {
        self.weights.size().first().copied().unwrap_or(0)
    }

    /// These inputs grown to `rows` rows by repeating the first row with loss weight zero, and
    /// with every weight zeroed when `silent` (a micro-batch the step does not have): a partial
    /// step as the captured full one's inputs. The padding rows add exact zeros to the loss and
    /// the gradients, so the step equals the unpadded one to rounding (the batched kernels sum in
    /// another order). `None` when there are more rows than `rows`.
    pub(super) fn padded(&self, rows: i64, silent: bool) -> Option<Self> {
        let b = self.rows();
        if b == 0 || b > rows {
            return None;
        }
        let device = self.weights.device();
        let idx: Vec<i64> = (0..rows).map(|r| if r < b { r } else { 0 }).collect();
        let idx = Tensor::from_slice(&idx).to_device(device);
        let take = |t: &Tensor| t.index_select(0, &idx.to_device(t.device()));
        let keep = Tensor::from_slice(
            &(0..rows)
                .map(|r| if r < b && !silent { 1f32 } else { 0.0 })
                .collect::<Vec<_>>(),
        )
        .to_device(device);
        let mut p = self.map(take);
        p.weights *= keep;
        Some(p)
    }

    /// A copy in new memory (the static inputs of a CUDA graph).
    pub(super) fn deep_copy(&self) -> Self {
        self.map(Tensor::copy)
    }

    /// Every tensor through `f`, each in its field.
    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        Self {
            params: f(&self.params),
            eps: f(&self.eps),
            noise: f(&self.noise),
            offset: self.offset.as_ref().map(&f),
            text: match &self.text {
                TextInput::States(t) => TextInput::States(f(t)),
                TextInput::Ids(t) => TextInput::Ids(f(t)),
            },
            timesteps: f(&self.timesteps),
            weights: f(&self.weights),
        }
    }
}

/// The inputs of the micro-batches `micro` (`(batch index, examples)`) of one optimiser step.
pub(super) fn step_inputs(
    ctx: &StepCtx,
    models: &Models,
    ds: &Dataset,
    epoch: i64,
    micro: &[(usize, Vec<usize>)],
) -> Result<Vec<MicroInputs>> {
    micro
        .iter()
        .map(|(bi, ids)| micro_inputs(ctx, models, ds, epoch, *bi, ids))
        .collect()
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

    let params = latent_params(ctx, models, ds, ids, &flips, &mut rng)?;
    let mut latent_shape = params.size();
    if latent_shape.len() != 4 || latent_shape[1] % 2 != 0 {
        return Err(Error::Internal(format!(
            "latent parameters of shape {latent_shape:?}"
        )));
    }
    latent_shape[1] /= 2;
    let eps = randn(&latent_shape);
    let noise = randn(&latent_shape);
    let offset = (cfg.noise_offset != 0.0).then(|| randn(&[b, ctx.latent_c, 1, 1]));
    let text = encoder_input(ctx, epoch, batch, &caps)?;
    let w = 1.0 / (b as f64 * cfg.gradient_accumulation_steps as f64);
    let weights = Tensor::full([b], w, (Kind::Float, ctx.device));
    Ok(MicroInputs {
        params,
        eps,
        noise,
        offset,
        text,
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
            .to_device(ctx.device)
            .to_kind(Kind::Float));
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

/// The text input for the captions `caps` (indices into the caption table) after the caption
/// controls: cached hidden states, or token ids for the text encoder. Each example's caption
/// randomness is seeded by `(seed, epoch, batch, slot)`.
fn encoder_input(ctx: &StepCtx, epoch: i64, batch: usize, caps: &[usize]) -> Result<TextInput> {
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
                return Ok(TextInput::States(
                    e.index_select(0, &rows.to_device(e.device()))
                        .to_device(ctx.device),
                ));
            }
            cache.ids.index_select(0, &rows)
        }
    };
    Ok(TextInput::Ids(ids_t.to_device(ctx.device)))
}

/// A micro-batch's tensors for the UNet: latents sampled from their parameters, the noise (with
/// its offset) and the text encoder's hidden states.
struct Prepared {
    latents: Tensor,
    noise: Tensor,
    ehs: Tensor,
}

fn prepare(ctx: &StepCtx, models: &Models, m: &MicroInputs) -> Result<Prepared> {
    let parts = m.params.chunk(2, 1);
    let (mean, logvar) = (&parts[0], &parts[1]);
    let latents = (mean + (logvar * 0.5).exp() * &m.eps) * ctx.scaling_factor;
    let noise = match &m.offset {
        None => m.noise.shallow_clone(),
        Some(o) => &m.noise + o * ctx.cfg.noise_offset,
    };
    let ehs = match &m.text {
        TextInput::States(e) => e.shallow_clone(),
        TextInput::Ids(ids) => {
            let text = models
                .text
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("text encoder not loaded".into()))?;
            if ctx.train_text {
                text.model.forward(ids)?.0
            } else {
                tch::no_grad(|| text.model.forward(ids))?.0
            }
        }
    };
    Ok(Prepared {
        latents,
        noise,
        ehs,
    })
}

/// The device half of one optimiser step's forward and backward: each micro-batch's latents,
/// noise and text states, then per group of equal-shaped micro-batches (all of them when fused)
/// the UNet's prediction, the weighted loss and its backward (gradients accumulate into the flat
/// buffer). Returns the step's loss as a 0-d f32 tensor on the device (read it when logging).
/// No host reads and no host tensors: a CUDA graph captures exactly this (`graph.rs`).
pub(super) fn forward_backward(
    ctx: &StepCtx,
    models: &Models,
    flat: &mut FlatParams,
    inputs: &[MicroInputs],
    loss_scale: f64,
) -> Result<Tensor> {
    let inputs: Vec<(&MicroInputs, Prepared)> = inputs
        .iter()
        .map(|m| prepare(ctx, models, m).map(|p| (m, p)))
        .collect::<Result<_>>()?;
    // Fused: one batch per latent shape (micro-batches of different buckets cannot be
    // concatenated; the per-sample weights make the summed losses the same gradient).
    let groups: Vec<Vec<usize>> = if ctx.cfg.fuse_accumulation {
        let mut by_shape: Vec<(Vec<i64>, Vec<usize>)> = Vec::new();
        for (i, (_, p)) in inputs.iter().enumerate() {
            let shape = p.latents.size()[1..].to_vec();
            match by_shape.iter_mut().find(|(s, _)| *s == shape) {
                Some((_, g)) => g.push(i),
                None => by_shape.push((shape, vec![i])),
            }
        }
        by_shape.into_iter().map(|(_, g)| g).collect()
    } else {
        (0..inputs.len()).map(|i| vec![i]).collect()
    };
    let mut total = Tensor::zeros([], (Kind::Float, ctx.device));
    for g in groups {
        let cat = |f: &dyn Fn(&MicroInputs, &Prepared) -> Tensor| {
            let parts: Vec<Tensor> = g.iter().map(|&i| f(inputs[i].0, &inputs[i].1)).collect();
            Tensor::cat(&parts, 0)
        };
        let latents = cat(&|_, p| p.latents.shallow_clone());
        let noise = cat(&|_, p| p.noise.shallow_clone());
        let ts = cat(&|m, _| m.timesteps.shallow_clone());
        let ehs = cat(&|_, p| p.ehs.shallow_clone());
        let w = cat(&|m, _| m.weights.shallow_clone());
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
        flat.backward(&(&loss * loss_scale))?;
        total += loss.detach();
    }
    Ok(total)
}

/// After the backward: with fp16, unscale the gradients and skip the update on inf/NaN (a host
/// read: why fp16 is not captured); then clip, AdamW at the learning rate already in
/// [`AdamW::lr`], all on the device, and mark the gradients spent (the next backward overwrites
/// them). Returns the total gradient norm (a 0-d device tensor), or `None` for a skipped step.
/// The caller counts the update on the host (`opt.step`) once it has run. The CUDA graph captures this, without a scaler, after
/// [`forward_backward`].
pub(super) fn apply_gradients(
    flat: &mut FlatParams,
    opt: &AdamW,
    max_grad_norm: f64,
    scaler: Option<&mut LossScaler>,
) -> Option<Tensor> {
    let mut g = flat.flat_grad();
    let finite = scaler.is_none_or(|s| s.unscale_and_update(&mut g));
    let norm = finite.then(|| {
        let norm = clip_grad_norm_device(&mut g, max_grad_norm);
        opt.step_on_device(flat, &g);
        norm
    });
    flat.zero_grad();
    norm
}
