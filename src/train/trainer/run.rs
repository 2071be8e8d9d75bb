//! [`Trainer`]: one training run in phases: `prepare` (settings, resume point, data, models, LoRA
//! parameters, caches, optimiser), `run` (the epochs: one optimiser step per group of
//! micro-batches, the CSV log line, checkpoints, validation, cancel) and `finish` (the LoRA file
//! and the report). The maths of a step is in `step.rs`, mirroring diffusers'
//! train_text_to_image_lora.py (module documentation of `trainer`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tch::{Device, Kind, Tensor};

use super::batches::{batches_per_epoch, check_resume_batches, epoch_batches, record};
use super::cache::build_cache;
use super::checkpoint::{find_resume, fingerprint, restore, save_checkpoint, write_json};
use super::graph::{self, StepGraph, StepOut};
use super::logs::RunLog;
use super::meta::write_lora;
use super::profile::{Phase, PhaseClock};
use super::step::{StepCtx, apply_gradients, forward_backward, step_inputs};
use super::{
    Cache, Event, MixedPrecision, Models, StepLog, TAG_LORA, TrainConfig, TrainReport,
    TrainingState, check_settings, cuda_mem_used, derive, save_dtype, validate,
};
use crate::pipeline::scheduler::SchedulerConfig;
use crate::pipeline::tokenizer::ClipTokenizer;
use crate::train::dataset::{Dataset, DatasetOptions};
use crate::train::lora::init_lora;
use crate::train::noise::{NoiseSchedule, Prediction};
use crate::train::optim::{AdamW, FlatParams, LossScaler, LrScheduler};
use crate::train::validation::Validator;
use crate::{Error, Result};

/// Where the run is: optimiser steps done, the epoch and batch the next step starts at, and the
/// learning-rate scheduler's step (it does not advance on a skipped fp16 step).
struct Position {
    global_step: i64,
    epoch: i64,
    batch: usize,
    sched_step: i64,
}

/// The run's shape: accumulation, and how many steps and epochs it takes.
struct Plan {
    accum: usize,
    batches_per_epoch: usize,
    max_steps: i64,
    epochs: i64,
}

impl Plan {
    /// The script's step arithmetic for `batches_per_epoch` batches, and the learning-rate
    /// schedule over it.
    fn new(cfg: &TrainConfig, batches_per_epoch: usize) -> (Plan, LrScheduler) {
        let bs = cfg.train_batch_size;
        let accum = cfg.gradient_accumulation_steps;
        let steps_per_epoch = batches_per_epoch.div_ceil(accum) as i64;
        let max_steps = cfg
            .max_train_steps
            .unwrap_or(cfg.num_train_epochs * steps_per_epoch);
        let epochs = (max_steps + steps_per_epoch - 1) / steps_per_epoch;
        let lr = if cfg.scale_lr {
            cfg.learning_rate * (accum * bs) as f64
        } else {
            cfg.learning_rate
        };
        let lr_sched = LrScheduler {
            kind: cfg.lr_scheduler,
            base_lr: lr,
            warmup_steps: cfg.lr_warmup_steps,
            total_steps: max_steps,
        };
        (
            Plan {
                accum,
                batches_per_epoch,
                max_steps,
                epochs,
            },
            lr_sched,
        )
    }
}

/// Figures of the run so far, for the report.
struct Stats {
    started: Instant,
    losses: Vec<f64>,
    sps_sum: f64,
    sps_n: usize,
    peak_mem: Option<u64>,
}

/// A prepared training run (see the module documentation).
pub(super) struct Trainer<'a> {
    cfg: &'a TrainConfig,
    source: crate::train::ModelSource,
    ds: Dataset,
    tokenizer: ClipTokenizer,
    sched_cfg: SchedulerConfig,
    noise: NoiseSchedule,
    prediction: Prediction,
    scaling_factor: f64,
    latent_c: i64,
    models: Models,
    cache: Cache,
    flat: FlatParams,
    opt: AdamW,
    scaler: Option<LossScaler>,
    lr_sched: LrScheduler,
    fp: serde_json::Value,
    seed: u64,
    device: Device,
    kind: Kind,
    train_text: bool,
    plan: Plan,
    pos: Position,
    logs: RunLog,
    validator: Option<Validator>,
    stats: Stats,
    /// `--cuda_graphs`: the captured step, when the run uses one.
    graph: Option<StepGraph>,
    /// `--profile_steps`.
    clock: PhaseClock,
}

impl<'a> Trainer<'a> {
    /// Check the settings, find the resume point, open the data and the models, initialise the
    /// LoRA parameters, fill the caches, build the optimiser and restore a checkpoint's state.
    pub(super) fn prepare(cfg: &'a TrainConfig, on_event: &mut dyn FnMut(Event)) -> Result<Self> {
        let device = crate::train::parse_device(&cfg.device)?;
        // Checked before any work: a typo must not surface after the last step.
        save_dtype(&cfg.save_dtype)?;
        let kind = cfg.mixed_precision.kind();
        check_settings(cfg, device, kind, on_event)?;
        graph::check_settings(cfg, device)?;
        let source =
            crate::train::ModelSource::open(&cfg.pretrained_model, cfg.tokenizer.as_deref())?;
        std::fs::create_dir_all(&cfg.output_dir).map_err(|e| Error::io(&cfg.output_dir, e))?;

        // ---- resume: which checkpoint, and its seed
        let (resume_dir, resumed) = match find_resume(cfg, on_event)? {
            Some((d, st)) => (Some(d), Some(st)),
            None => (None, None),
        };
        let seed = match (&resumed, cfg.seed) {
            (Some(s), _) => s.seed,
            (None, Some(s)) => s,
            (None, None) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
        };

        // ---- data
        let ds = open_dataset(cfg, on_event)?;
        let n = ds.len();
        // ---- models and LoRA parameters
        let sched_cfg = source.scheduler_config()?;
        let noise = NoiseSchedule::new(&sched_cfg, device)?;
        let prediction = cfg.prediction_type.unwrap_or(noise.prediction);
        let tokenizer = source.tokenizer()?;
        let (models, mut flat) = load_models(cfg, &source, device, kind, seed, on_event)?;
        let scaling_factor = models
            .vae
            .as_ref()
            .map_or(0.0, |v| v.model.config.scaling_factor);
        let latent_c = models
            .vae
            .as_ref()
            .map_or(4, |v| v.model.config.latent_channels);

        // ---- caches
        let train_text = cfg.text_encoder_lora.is_some();
        let mut models = models;
        let cache = match (&models.text, &models.vae) {
            (Some(text), Some(vae)) => build_cache(
                cfg, &ds, &tokenizer, text, vae, seed, device, train_text, on_event,
            )?,
            _ => {
                return Err(Error::Internal(
                    "text encoder or VAE missing before caching".into(),
                ));
            }
        };
        if cache.embeddings.is_some() && cfg.cache_latents {
            models.text = None; // frozen and fully cached: free it (validation reloads it)
        }
        if cfg.cache_latents {
            models.vae = None;
        }
        if device.is_cuda() {
            // the VAE's and text encoder's blocks back to the driver before the steps allocate
            crate::train::cuda_graph::empty_cache()?;
        }

        // ---- steps
        let (plan, lr_sched) = Plan::new(cfg, batches_per_epoch(cfg, &cache));
        let max_steps = plan.max_steps;
        let epochs = plan.epochs;
        let mut opt = AdamW::new(&flat, cfg.adam);
        let mut scaler = (cfg.mixed_precision == MixedPrecision::Fp16).then(LossScaler::default);
        let fp = fingerprint(cfg, n, seed, &cache);

        let mut pos = Position {
            global_step: 0,
            epoch: 0,
            batch: 0,
            sched_step: 0,
        };
        if let (Some(st), Some(dir)) = (&resumed, &resume_dir) {
            restore(st, dir, &fp, &mut flat, &mut opt, on_event)?;
            check_resume_batches(st, &epoch_batches(cfg, &cache, seed, st.epoch))?;
            scaler = st.loss_scaler;
            pos = Position {
                global_step: st.global_step,
                epoch: st.epoch,
                batch: st.next_batch,
                sched_step: st.scheduler_step,
            };
        }
        let graph = graph::setup(cfg, device, &cache, on_event)?;
        let logs = RunLog::open(cfg, resumed.is_some(), pos.global_step)?;
        write_json(&cfg.output_dir.join("train_config.json"), cfg)?;
        on_event(Event::Started {
            total_steps: max_steps,
            initial_step: pos.global_step,
            examples: n,
            epochs,
        });
        Ok(Trainer {
            cfg,
            source,
            ds,
            tokenizer,
            sched_cfg,
            noise,
            prediction,
            scaling_factor,
            latent_c,
            models,
            cache,
            flat,
            opt,
            scaler,
            lr_sched,
            fp,
            seed,
            device,
            kind,
            train_text,
            plan,
            pos,
            logs,
            validator: None,
            stats: Stats {
                started: Instant::now(),
                losses: Vec::new(),
                sps_sum: 0.0,
                sps_n: 0,
                peak_mem: None,
            },
            graph,
            clock: PhaseClock::new(cfg.profile_steps, cfg.torch_profile.clone(), device),
        })
    }

    /// The epochs from the resume point to the last step.
    pub(super) fn run(
        &mut self,
        cancel: Option<&AtomicBool>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<()> {
        let epoch0 = self.pos.epoch;
        for epoch in epoch0..self.plan.epochs {
            let batches = epoch_batches(self.cfg, &self.cache, self.seed, epoch);
            let mut b = if epoch == epoch0 { self.pos.batch } else { 0 };
            while b < self.plan.batches_per_epoch {
                if self.pos.global_step >= self.plan.max_steps {
                    return Ok(());
                }
                // libtorch errors come as tch's panics or as errors: an out-of-memory becomes an
                // error naming the flags to lower; any other panic goes on unwinding
                let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.step(epoch, &batches, b, on_event)
                }));
                b = match stepped {
                    Ok(Ok(next)) => next,
                    Ok(Err(e)) => {
                        return Err(
                            out_of_memory(self.cfg, &self.plan, &e.to_string()).unwrap_or(e)
                        );
                    }
                    Err(p) => match crate::error::panic_message(p.as_ref())
                        .and_then(|text| out_of_memory(self.cfg, &self.plan, text))
                    {
                        Some(e) => return Err(e),
                        None => std::panic::resume_unwind(p),
                    },
                };
                self.after_step(epoch, &batches, b, cancel, on_event)?;
            }
            if let Some(v) = &self.cfg.validation
                && v.every_steps.is_none()
                && let Some(every) = v.every_epochs
                && every > 0
                && epoch % every == 0
            {
                self.validate(&format!("epoch-{epoch}"), false, on_event)?;
            }
        }
        Ok(())
    }

    /// One optimiser step over the micro-batches from batch `b` (accumulated), its CSV log line
    /// and event; returns the next batch. A full-shaped step goes through the CUDA graph when
    /// the run has one; the loss and gradient norm are read on the host once, after the step.
    fn step(
        &mut self,
        epoch: i64,
        batches: &[Vec<usize>],
        b: usize,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<usize> {
        let (cfg, plan) = (self.cfg, &self.plan);
        if let Some(text) = &cfg.panic_in_step {
            panic!("{text}");
        }
        if let Some(text) = &cfg.error_in_step {
            return Err(tch::TchError::Torch(text.clone()).into());
        }
        let t0 = Instant::now();
        self.clock.begin_step()?;
        let group_end = (b + plan.accum).min(plan.batches_per_epoch);
        let micro: Vec<(usize, Vec<usize>)> =
            (b..group_end).map(|bi| (bi, batches[bi].clone())).collect();
        let samples: usize = micro.iter().map(|(_, m)| m.len()).sum();
        let full =
            micro.len() == plan.accum && micro.iter().all(|(_, m)| m.len() == cfg.train_batch_size);
        let ctx = StepCtx {
            cfg,
            cache: &self.cache,
            noise: &self.noise,
            prediction: self.prediction,
            scaling_factor: self.scaling_factor,
            latent_c: self.latent_c,
            seed: self.seed,
            device: self.device,
            kind: self.kind,
            train_text: self.train_text,
        };
        let lr_now = self.lr_sched.lr(self.pos.sched_step);
        self.opt.set_lr(lr_now);
        let inputs = step_inputs(&ctx, &self.models, &self.ds, epoch, &micro)?;
        // a partial step replays the captured graph with padding rows when it can
        let (inputs, full) = match (&mut self.graph, &self.scaler) {
            (Some(g), None) if !full => match g.fit(inputs, self.pos.global_step + 1, on_event) {
                Ok(padded) => (padded, true),
                Err(inputs) => (inputs, false),
            },
            _ => (inputs, full),
        };
        self.clock.mark(Phase::Data);
        let out = match (&mut self.graph, self.scaler.as_mut()) {
            (Some(g), None) if full => {
                let out = g.step(
                    &ctx,
                    &self.models,
                    &mut self.flat,
                    &self.opt,
                    inputs,
                    on_event,
                )?;
                self.clock.mark(if out.replayed {
                    Phase::Replay
                } else {
                    Phase::ForwardBackward
                });
                out
            }
            (g, scaler) => {
                if let Some(g) = g {
                    g.eager_step_of_other_shape(self.pos.global_step + 1, on_event);
                }
                let loss_scale = scaler.as_ref().map_or(1.0, |s| s.scale);
                let loss =
                    forward_backward(&ctx, &self.models, &mut self.flat, &inputs, loss_scale)?;
                self.clock.mark(Phase::ForwardBackward);
                let norm = apply_gradients(&mut self.flat, &self.opt, cfg.max_grad_norm, scaler);
                self.clock.mark(Phase::Optimizer);
                StepOut {
                    loss,
                    norm,
                    replayed: false,
                    captured: false,
                }
            }
        };
        let finite = out.norm.is_some();
        if finite {
            // the update ran on the device (or in the replay): count it on the host
            self.opt.step += 1;
            self.pos.sched_step += 1;
        }
        self.pos.global_step += 1;
        let (loss, grad_norm) = read_on_host(&out)?;
        let dt = t0.elapsed().as_secs_f64();
        let mem = if matches!(self.device, Device::Cuda(_)) {
            cuda_mem_used()
        } else {
            None
        };
        if let Some(m) = mem {
            self.stats.peak_mem = Some(self.stats.peak_mem.map_or(m, |p| p.max(m)));
        }
        let sps = samples as f64 / dt.max(1e-9);
        self.stats.sps_sum += sps;
        self.stats.sps_n += 1;
        let line = StepLog {
            step: self.pos.global_step,
            epoch,
            loss,
            lr: lr_now,
            grad_norm,
            samples_per_s: sps,
            elapsed_s: self.stats.started.elapsed().as_secs_f64(),
            device_mem: mem,
            skipped: !finite,
        };
        self.logs.step(&line)?;
        self.stats.losses.push(loss);
        if let Some(why) = crate::train::fused::take_failure() {
            on_event(Event::Warning(format!(
                "{why}: that fused operation is off for the rest of the run; torch's own operations run instead"
            )));
        }
        on_event(Event::Step(&line));
        self.clock.mark(Phase::Log);
        self.clock.end_step(out.replayed, out.captured)?;
        Ok(group_end)
    }

    /// After a step: a checkpoint when due or cancelled, then cancel, step validation and the
    /// crash-test hook. `b` is the next batch of `epoch`.
    fn after_step(
        &mut self,
        epoch: i64,
        batches: &[Vec<usize>],
        b: usize,
        cancel: Option<&AtomicBool>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<()> {
        let cfg = self.cfg;
        let global_step = self.pos.global_step;
        let (next_epoch, next_batch) = if b >= self.plan.batches_per_epoch {
            (epoch + 1, 0)
        } else {
            (epoch, b)
        };
        let cancelled = cancel.map(|c| c.load(Ordering::Relaxed)).unwrap_or(false);
        if (cfg.checkpointing_steps > 0 && global_step % cfg.checkpointing_steps == 0) || cancelled
        {
            let (data_order, batch_lens) = if next_epoch == epoch {
                record(batches, self.cache.buckets.is_some())
            } else {
                let next = epoch_batches(cfg, &self.cache, self.seed, next_epoch);
                record(&next, self.cache.buckets.is_some())
            };
            let state = TrainingState {
                version: 1,
                global_step,
                epoch: next_epoch,
                next_batch,
                scheduler_step: self.pos.sched_step,
                adam_step: self.opt.step,
                loss_scaler: self.scaler,
                seed: self.seed,
                lr_scheduler: self.lr_sched,
                data_order,
                batch_lens,
                fingerprint: self.fp.clone(),
            };
            let dir = save_checkpoint(cfg, &self.models, &self.flat, &self.opt, &state)?;
            on_event(Event::Checkpoint(&dir));
        }
        if cancelled {
            return Err(Error::Cancelled);
        }
        if let Some(v) = &cfg.validation
            && let Some(every) = v.every_steps
            && every > 0
            && global_step % every == 0
        {
            self.validate(&format!("step-{global_step}"), false, on_event)?;
        }
        if cfg.abort_after_step == Some(global_step) {
            std::process::abort();
        }
        Ok(())
    }

    /// Validation images and their grid (`last`: the final validation), logged to TensorBoard.
    fn validate(&mut self, tag: &str, last: bool, on_event: &mut dyn FnMut(Event)) -> Result<()> {
        let step = self.pos.global_step;
        let grid = validate(
            &self.source,
            self.cfg,
            &self.models.unet.model,
            &mut self.validator,
            (self.device, self.kind),
            &self.tokenizer,
            &self.sched_cfg,
            (tag, step),
            self.seed,
            on_event,
        )?;
        match grid {
            Some(g) => self.logs.validation(&g, step, last),
            None => Ok(()),
        }
    }

    /// Write the final LoRA, validate once more, and report.
    pub(super) fn finish(mut self, on_event: &mut dyn FnMut(Event)) -> Result<TrainReport> {
        let out = self.cfg.output_dir.join("pytorch_lora_weights.safetensors");
        write_lora(
            self.cfg,
            &self.models,
            &out,
            &self.ds,
            self.pos.global_step,
            self.seed,
        )?;
        on_event(Event::Saved(&out));
        if self.cfg.validation.is_some() {
            self.validate("final", true, on_event)?;
        }
        let phases = self.clock.report();
        if let Some(p) = &phases {
            on_event(Event::Info(p.to_string()));
        }
        self.clock.finish_recording()?;
        if let Some(t) = self.clock.trace_written() {
            on_event(Event::Info(format!(
                "torch profile of the profiled steps: {}",
                t.display()
            )));
        }
        let s = &self.stats;
        Ok(TrainReport {
            output: out,
            steps: self.pos.global_step,
            losses: s.losses.clone(),
            mean_samples_per_s: if s.sps_n > 0 {
                s.sps_sum / s.sps_n as f64
            } else {
                0.0
            },
            peak_device_mem: s.peak_mem,
            seed: self.seed,
            phases,
        })
    }
}

/// A step's loss and gradient norm (NaN for a skipped step) on the host: its one
/// synchronising read, after the step (after the replay, for a captured one).
fn read_on_host(out: &StepOut) -> Result<(f64, f64)> {
    let loss = out.loss.to_kind(Kind::Double);
    let Some(norm) = &out.norm else {
        return Ok((loss.double_value(&[]), f64::NAN));
    };
    let both = Tensor::stack(&[loss, norm.to_kind(Kind::Double)], 0).to_device(Device::Cpu);
    match Vec::<f64>::try_from(both)?.as_slice() {
        &[l, n] => Ok((l, n)),
        v => Err(Error::Internal(format!("loss and norm read as {v:?}"))),
    }
}

/// The training data set, its warnings and a summary line sent as events.
fn open_dataset(cfg: &TrainConfig, on_event: &mut dyn FnMut(Event)) -> Result<Dataset> {
    let ds = Dataset::open(
        &cfg.train_data_dir,
        &DatasetOptions {
            caption_column: cfg.caption_column.clone(),
            image_column: cfg.image_column.clone(),
            skip_bad: cfg.skip_bad_images,
            max_samples: cfg.max_train_samples,
            caption_extension: cfg.caption_extension.clone(),
        },
    )?;
    for w in &ds.warnings {
        on_event(Event::Warning(w.clone()));
    }
    on_event(Event::Info(format!(
        "{} examples ({}) in {}",
        ds.len(),
        ds.layout,
        cfg.train_data_dir.display()
    )));
    Ok(ds)
}

/// Load the UNet (with its LoRA), the text encoder (with a LoRA when trained) and the VAE
/// encoder, initialise the LoRA weights from the seed, and gather them as flat parameters.
fn load_models(
    cfg: &TrainConfig,
    source: &crate::train::ModelSource,
    device: Device,
    kind: Kind,
    seed: u64,
    on_event: &mut dyn FnMut(Event),
) -> Result<(Models, FlatParams)> {
    let unet = source.unet(device, kind, Some(cfg.lora.clone()))?;
    if unet.lora_modules.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "no UNet module matches the LoRA targets {:?}",
            cfg.lora.targets
        )));
    }
    for k in &unet.unused_keys {
        on_event(Event::Warning(format!(
            "UNet weight `{k}` is not used by the model"
        )));
    }
    if cfg.memory_format.channels_last_on(device) {
        let n = crate::train::to_channels_last(&unet.base)?;
        on_event(Event::Info(format!(
            "--memory_format {}: {n} UNet weights stored NHWC (channels-last)",
            clap::ValueEnum::to_possible_value(&cfg.memory_format)
                .map_or_else(|| "?".to_string(), |v| v.get_name().to_string())
        )));
    }
    let text = source.text_encoder(device, kind, cfg.text_encoder_lora.clone())?;
    if cfg.text_encoder_lora.is_some() && text.lora_modules.is_empty() {
        return Err(Error::InvalidArgument(
            "no text encoder module matches the text encoder LoRA targets".into(),
        ));
    }
    let vae = source.vae_encoder(device, kind)?;
    init_lora(
        &unet.lora,
        cfg.lora.init,
        cfg.lora.rank,
        &mut ChaCha20Rng::seed_from_u64(derive(&[seed, TAG_LORA, 0])),
    )?;
    if let Some(tl) = &cfg.text_encoder_lora {
        init_lora(
            &text.lora,
            tl.init,
            tl.rank,
            &mut ChaCha20Rng::seed_from_u64(derive(&[seed, TAG_LORA, 1])),
        )?;
    }
    let mut all: BTreeMap<String, Tensor> = BTreeMap::new();
    for (k, v) in unet.lora.variables() {
        all.insert(format!("unet.{k}"), v);
    }
    for (k, v) in text.lora.variables() {
        all.insert(format!("text_encoder.{k}"), v);
    }
    let flat = FlatParams::adopt_as(&all, kind);
    on_event(Event::Info(format!(
        "LoRA r={} alpha={} on {} UNet modules{} ({} trainable parameters), device {device:?}, weights {kind:?}",
        cfg.lora.rank,
        cfg.lora.alpha,
        unet.lora_modules.len(),
        if text.lora_modules.is_empty() {
            String::new()
        } else {
            format!(" + {} text encoder modules", text.lora_modules.len())
        },
        flat.numel()
    )));
    Ok((
        Models {
            unet,
            text: Some(text),
            vae: Some(vae),
        },
        flat,
    ))
}

/// Whether a panic's text is an allocation failure of libtorch: CUDA's caching allocator
/// ("CUDA out of memory. Tried to allocate …", c10/cuda/CUDACachingAllocator.cpp) or the CPU
/// allocator ("DefaultCPUAllocator: not enough memory" / "can't allocate memory",
/// c10/core/impl/alloc_cpu.cpp).
pub fn is_out_of_memory(text: &str) -> bool {
    [
        "out of memory",
        "not enough memory",
        "can't allocate memory",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// A step that ran out of memory (libtorch's message `text`), as an error that says which flags
/// lower the step's memory; `None` for any other failure.
fn out_of_memory(cfg: &TrainConfig, plan: &Plan, text: &str) -> Option<Error> {
    if !is_out_of_memory(text) {
        return None;
    }
    let fused = cfg.fuse_accumulation && plan.accum > 1;
    let batch = if fused {
        format!(
            "a batch of {} ({} × {} accumulated micro-batches, fused into one)",
            cfg.train_batch_size * plan.accum,
            cfg.train_batch_size,
            plan.accum
        )
    } else {
        format!("a batch of {}", cfg.train_batch_size)
    };
    let mut lower = vec!["--train_batch_size".to_string()];
    if fused {
        lower.push(
            "--no_fuse_accumulation (micro-batches one at a time: the memory of one, slower)"
                .into(),
        );
    }
    lower.push(format!("--resolution (now {})", cfg.resolution));
    if !cfg.cache_latents {
        lower.push("caching latents (drop --no_cache_latents)".into());
    }
    let first = text.lines().next().unwrap_or_default();
    Some(Error::InvalidArgument(format!(
        "out of memory in a training step with {batch} at {} px: lower {}. libtorch said: {first}",
        cfg.resolution,
        lower.join(", or ")
    )))
}
