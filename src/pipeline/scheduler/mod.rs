//! Noise schedulers ported line by line from diffusers 0.42.1 (`src/diffusers/schedulers/`,
//! https://github.com/huggingface/diffusers/tree/v0.42.1/src/diffusers/schedulers), configured
//! from a pipeline's `scheduler/scheduler_config.json` with diffusers' `from_config` semantics.
//!
//! Tensors are flat `f32` slices (any shape, batch-major; only their length matters), as torch
//! float32 tensors are in diffusers. Schedules (betas, alphas_cumprod, sigmas, timesteps) are
//! computed in the precision diffusers uses at each line (torch float32, numpy float64, Python
//! floats), with the casts where diffusers casts; [`numerics`] documents what is emulated and the
//! one thing that is not (MKL's float32 `sqrt`/`log`/`exp`, which are not correctly rounded).
//!
//! Usage, as `StableDiffusionPipeline.__call__` drives a scheduler:
//! ```no_run
//! # use lorafuse::pipeline::scheduler::*;
//! # fn unet(x: &[f32], t: f32) -> Vec<f32> { x.to_vec() }
//! let config = SchedulerConfig::from_file("sd15/scheduler/scheduler_config.json")?;
//! let mut s = make_scheduler(SchedulerKind::DpmSolverMultistep, &config)?;
//! s.set_timesteps(25)?;
//! let mut latents: Vec<f32> = vec![0.0; 4 * 64 * 64]; // randn · init_noise_sigma
//! for i in 0..s.timesteps().len() {
//!     let input = s.scale_model_input(&latents, i)?;
//!     let eps = unet(&input, s.timesteps()[i]);
//!     latents = s.step(&eps, i, &latents, None)?;
//! }
//! # Ok::<(), lorafuse::Error>(())
//! ```

pub mod config;
mod ddim;
mod ddpm;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod lms;
pub(crate) mod numerics;
mod pndm;
mod schedule;

use std::fmt;
use std::str::FromStr;

pub use config::SchedulerConfig;
pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use dpm_solver::DpmSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use lms::LmsDiscreteScheduler;
pub use pndm::PndmScheduler;

use crate::error::{Error, Result};

/// A diffusers noise scheduler.
///
/// `step_index` is the position in [`timesteps`](Scheduler::timesteps) (the pipeline's loop
/// counter `i`); multistep schedulers (PNDM, DPM-Solver, LMS) keep history and must be stepped in
/// order `0, 1, 2, ...` after each [`set_timesteps`](Scheduler::set_timesteps).
pub trait Scheduler: Send + Sync + fmt::Debug {
    /// Which scheduler this is.
    fn kind(&self) -> SchedulerKind;
    /// `config.num_train_timesteps`.
    fn num_train_timesteps(&self) -> usize;
    /// `set_timesteps(num_inference_steps)`; resets any multistep history.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;
    /// `scheduler.timesteps` as float32 (integer-valued for PNDM, DDIM, DDPM and DPM-Solver; PNDM
    /// with `skip_prk_steps` has one more entry than inference steps). This is the UNet's
    /// `timestep` input.
    fn timesteps(&self) -> &[f32];
    /// `scheduler.sigmas` (float32, one more than the timesteps) for the sigma-based schedulers.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
    /// `init_noise_sigma`: scale of the initial Gaussian latents.
    fn init_noise_sigma(&self) -> f32;
    /// `scale_model_input(sample, timesteps[step_index])`.
    fn scale_model_input(&self, sample: &[f32], step_index: usize) -> Result<Vec<f32>>;
    /// Whether `step(.., step_index, ..)` needs a noise tensor (ancestral and SDE samplers, DDIM
    /// with `eta > 0`, DDPM for `t > 0`).
    fn needs_noise(&self, _step_index: usize) -> bool {
        false
    }
    /// `step(model_output, timesteps[step_index], sample).prev_sample`. `noise` is the standard
    /// Gaussian diffusers would draw with `randn_tensor` (same length as `sample`); it is required
    /// exactly when [`needs_noise`](Scheduler::needs_noise) says so, and ignored otherwise.
    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        noise: Option<&[f32]>,
    ) -> Result<Vec<f32>>;
    /// `add_noise(original_samples, noise, timesteps)`: `timesteps` holds one timestep per batch
    /// item (`original.len()` must be a multiple of `timesteps.len()`), or a single timestep.
    fn add_noise(&self, original: &[f32], noise: &[f32], timesteps: &[f32]) -> Result<Vec<f32>>;
    /// DDIM's `eta` (0 = deterministic DDIM); other schedulers ignore it, as diffusers'
    /// pipelines only pass `eta` to schedulers whose `step` accepts it.
    fn set_eta(&mut self, _eta: f32) {}
}

/// The schedulers we implement, by diffusers class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `PNDMScheduler` (SD 1.5's default; PLMS when `skip_prk_steps`).
    Pndm,
    /// `DDIMScheduler`.
    Ddim,
    /// `DDPMScheduler` (training noise schedule, `add_noise`).
    Ddpm,
    /// `EulerDiscreteScheduler`.
    Euler,
    /// `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// `DPMSolverMultistepScheduler` (DPM-Solver++ 2M by default).
    DpmSolverMultistep,
    /// `LMSDiscreteScheduler`.
    Lms,
}

impl SchedulerKind {
    /// All kinds, in a stable order.
    pub const ALL: [SchedulerKind; 7] = [
        SchedulerKind::Pndm,
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::Lms,
    ];

    /// diffusers' class name.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            SchedulerKind::Lms => "LMSDiscreteScheduler",
        }
    }

    /// The kind for a diffusers class name (`_class_name` in a config).
    pub fn from_class_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_name() == name)
    }

    /// Short name: `pndm`, `ddim`, `ddpm`, `euler`, `euler_ancestral`, `dpmpp_2m`, `lms`.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Ddpm => "ddpm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler_ancestral",
            SchedulerKind::DpmSolverMultistep => "dpmpp_2m",
            SchedulerKind::Lms => "lms",
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;
    /// Short names (and common aliases) or diffusers class names.
    fn from_str(s: &str) -> Result<Self> {
        if let Some(k) = Self::from_class_name(s) {
            return Ok(k);
        }
        let k = match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "pndm" | "plms" => SchedulerKind::Pndm,
            "ddim" => SchedulerKind::Ddim,
            "ddpm" => SchedulerKind::Ddpm,
            "euler" => SchedulerKind::Euler,
            "euler_a" | "euler_ancestral" => SchedulerKind::EulerAncestral,
            "dpmpp_2m"
            | "dpm++_2m"
            | "dpm++2m"
            | "dpmsolver++"
            | "dpm_solver"
            | "dpmsolver_multistep" => SchedulerKind::DpmSolverMultistep,
            "lms" => SchedulerKind::Lms,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown scheduler {s:?} (pndm, ddim, ddpm, euler, euler_ancestral, dpmpp_2m, lms; \
                     add _karras for Karras sigmas)"
                )));
            }
        };
        Ok(k)
    }
}

/// `<Class>.from_config(config)`: build `kind` from a pipeline's scheduler config.
pub fn make_scheduler(kind: SchedulerKind, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    Ok(match kind {
        SchedulerKind::Pndm => Box::new(PndmScheduler::from_config(config)?),
        SchedulerKind::Ddim => Box::new(DdimScheduler::from_config(config)?),
        SchedulerKind::Ddpm => Box::new(DdpmScheduler::from_config(config)?),
        SchedulerKind::Euler => Box::new(EulerDiscreteScheduler::from_config(config)?),
        SchedulerKind::EulerAncestral => {
            Box::new(EulerAncestralDiscreteScheduler::from_config(config)?)
        }
        SchedulerKind::DpmSolverMultistep => {
            Box::new(DpmSolverMultistepScheduler::from_config(config)?)
        }
        SchedulerKind::Lms => Box::new(LmsDiscreteScheduler::from_config(config)?),
    })
}

/// A scheduler by name, as a CLI flag gives it: a [`SchedulerKind`] name, optionally suffixed
/// `_karras` (= `from_config(config, use_karras_sigmas=True)`, for euler, dpmpp_2m and lms).
pub fn scheduler_from_name(name: &str, config: &SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    let (base, karras) = match name.strip_suffix("_karras") {
        Some(b) => (b, true),
        None => (name, false),
    };
    let kind: SchedulerKind = base.parse()?;
    let mut cfg = config.clone();
    if karras {
        if !matches!(
            kind,
            SchedulerKind::Euler | SchedulerKind::DpmSolverMultistep | SchedulerKind::Lms
        ) {
            return Err(Error::InvalidArgument(format!(
                "{kind} has no Karras sigmas in diffusers"
            )));
        }
        cfg.use_karras_sigmas = Some(true);
    }
    make_scheduler(kind, &cfg)
}

// ---------------------------------------------------------------------------------------------
// Elementwise helpers shared by the schedulers (float32, one rounding per torch op).

pub(crate) fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::InvalidArgument(format!(
            "{what} has {got} elements, expected {want}"
        )));
    }
    Ok(())
}

pub(crate) fn need_noise<'a>(noise: Option<&'a [f32]>, len: usize, who: &str) -> Result<&'a [f32]> {
    let n = noise.ok_or_else(|| {
        Error::InvalidArgument(format!("{who} needs a noise tensor for this step"))
    })?;
    check_len("noise", n.len(), len)?;
    Ok(n)
}

pub(crate) fn check_step_index(step_index: usize, n: usize) -> Result<()> {
    if step_index >= n {
        return Err(Error::InvalidArgument(format!(
            "step_index {step_index} out of range ({n} timesteps; call set_timesteps first)"
        )));
    }
    Ok(())
}

/// Batch index → timestep for `add_noise`: `timesteps.len()` is 1 or divides `len`.
pub(crate) fn per_item(len: usize, timesteps: &[f32]) -> Result<(usize, &[f32])> {
    if timesteps.is_empty() || !len.is_multiple_of(timesteps.len()) {
        return Err(Error::InvalidArgument(format!(
            "add_noise: {} timesteps do not divide a tensor of {len} elements",
            timesteps.len()
        )));
    }
    Ok((len / timesteps.len(), timesteps))
}

/// An integer training timestep in `0..n` from its float form.
pub(crate) fn train_index(t: f32, n: usize) -> Result<usize> {
    if t.fract() != 0.0 || t < 0.0 || t as usize >= n {
        return Err(Error::InvalidArgument(format!(
            "timestep {t} is not an integer in 0..{n}"
        )));
    }
    Ok(t as usize)
}

/// Float timesteps → position in the schedule (`index_for_timestep`: the second match when the
/// timestep repeats, the first otherwise).
pub(crate) fn index_for_timestep(schedule: &[f32], t: f32) -> Option<usize> {
    let mut hits = schedule
        .iter()
        .enumerate()
        .filter(|(_, s)| **s == t)
        .map(|(i, _)| i);
    let first = hits.next()?;
    Some(hits.next().unwrap_or(first))
}
