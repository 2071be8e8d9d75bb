//! `DDIMScheduler`, ported from diffusers 0.42.1 `src/diffusers/schedulers/scheduling_ddim.py`
//! (https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_ddim.py).
//! `eta = 0` is deterministic DDIM; `eta > 0` adds `std_dev_t · noise` each step.

use super::config::{Common, Defaults, Prediction, SchedulerConfig};
use super::schedule::{
    BetaSet, add_noise_alphas, alphas_cumprod, betas, spaced_timesteps, velocity_alphas,
};
use super::{Scheduler, SchedulerKind, check_len, check_step_index, need_noise};
use crate::error::{Error, Result};

/// diffusers' `DDIMScheduler`.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    common: Common,
    clip_sample: bool,
    clip_sample_range: f32,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    timesteps_i: Vec<i64>,
    timesteps: Vec<f32>,
    eta: f32,
}

impl DdimScheduler {
    /// `DDIMScheduler.from_config(config)`.
    pub fn from_config(c: &SchedulerConfig) -> Result<Self> {
        let common = Common::resolve(
            c,
            Defaults {
                timestep_spacing: "leading",
                has_rescale: true,
            },
        )?;
        if c.thresholding.unwrap_or(false) {
            return Err(Error::InvalidArgument(
                "DDIMScheduler: thresholding is not supported".into(),
            ));
        }
        let b = betas(&common, BetaSet::Standard, "DDIMScheduler")?;
        let alphas_cumprod = alphas_cumprod(&b);
        let final_alpha_cumprod = if c.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            common,
            clip_sample: c.clip_sample.unwrap_or(true),
            clip_sample_range: c.clip_sample_range.unwrap_or(1.0) as f32,
            alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: 0,
            timesteps_i: Vec::new(),
            timesteps: Vec::new(),
            eta: 0.0,
        })
    }

    /// `alphas_cumprod` (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// `get_velocity(sample, noise, timesteps)` (v-prediction training target).
    pub fn get_velocity(
        &self,
        sample: &[f32],
        noise: &[f32],
        timesteps: &[f32],
    ) -> Result<Vec<f32>> {
        velocity_alphas(&self.alphas_cumprod, sample, noise, timesteps)
    }

    fn ac(&self, t: i64) -> Result<f32> {
        usize::try_from(t)
            .ok()
            .and_then(|i| self.alphas_cumprod.get(i).copied())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("timestep {t} outside the training schedule"))
            })
    }
}

impl Scheduler for DdimScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn num_train_timesteps(&self) -> usize {
        self.common.num_train_timesteps
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let ts = spaced_timesteps(&self.common, n)?;
        self.num_inference_steps = n;
        self.timesteps = ts.iter().map(|&x| x as f32).collect();
        self.timesteps_i = ts;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn scale_model_input(&self, sample: &[f32], _step_index: usize) -> Result<Vec<f32>> {
        Ok(sample.to_vec())
    }

    fn needs_noise(&self, _step_index: usize) -> bool {
        self.eta > 0.0
    }

    fn set_eta(&mut self, eta: f32) {
        self.eta = eta;
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        noise: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        check_step_index(step_index, self.timesteps_i.len())?;
        check_len("model_output", model_output.len(), sample.len())?;
        let timestep = self.timesteps_i[step_index];
        let prev_timestep =
            timestep - (self.common.num_train_timesteps / self.num_inference_steps) as i64;
        let apt = self.ac(timestep)?;
        let aptp = if prev_timestep >= 0 {
            self.ac(prev_timestep)?
        } else {
            self.final_alpha_cumprod
        };
        let bpt = 1.0 - apt;
        let (sa, sb) = (apt.sqrt(), bpt.sqrt());
        let (mut x0, eps): (Vec<f32>, Vec<f32>) = match self.common.prediction_type {
            Prediction::Epsilon => (
                sample
                    .iter()
                    .zip(model_output)
                    .map(|(&s, &m)| (s - sb * m) / sa)
                    .collect(),
                model_output.to_vec(),
            ),
            Prediction::Sample => {
                let x0 = model_output.to_vec();
                let eps = sample
                    .iter()
                    .zip(&x0)
                    .map(|(&s, &x)| (s - sa * x) / sb)
                    .collect();
                (x0, eps)
            }
            Prediction::VPrediction => (
                sample
                    .iter()
                    .zip(model_output)
                    .map(|(&s, &m)| sa * s - sb * m)
                    .collect(),
                sample
                    .iter()
                    .zip(model_output)
                    .map(|(&s, &m)| sa * m + sb * s)
                    .collect(),
            ),
        };
        if self.clip_sample {
            let r = self.clip_sample_range;
            for v in &mut x0 {
                *v = v.clamp(-r, r);
            }
        }
        // _get_variance
        let bptp = 1.0 - aptp;
        let variance = (bptp / bpt) * (1.0 - apt / aptp);
        let std_dev_t = self.eta * variance.sqrt();
        let dir_coeff = (1.0 - aptp - std_dev_t * std_dev_t).sqrt();
        let sap = aptp.sqrt();
        let mut prev: Vec<f32> = x0
            .iter()
            .zip(&eps)
            .map(|(&x, &e)| sap * x + dir_coeff * e)
            .collect();
        if self.eta > 0.0 {
            let noise = need_noise(noise, sample.len(), "DDIMScheduler (eta > 0)")?;
            for (p, &n) in prev.iter_mut().zip(noise) {
                *p += std_dev_t * n;
            }
        }
        Ok(prev)
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timesteps: &[f32]) -> Result<Vec<f32>> {
        add_noise_alphas(&self.alphas_cumprod, original, noise, timesteps)
    }
}
