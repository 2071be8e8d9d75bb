//! `DDPMScheduler`, ported from diffusers 0.42.1 `src/diffusers/schedulers/scheduling_ddpm.py`
//! (https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_ddpm.py).
//! Mainly the training side (`betas`, `alphas_cumprod`, `add_noise`, `get_velocity`, what
//! `train_text_to_image_lora.py` uses); `step` covers the fixed variance types.

use super::config::{Common, Defaults, Prediction, SchedulerConfig};
use super::numerics::CorrectlyRounded;
use super::schedule::{
    BetaSet, add_noise_alphas, alphas_cumprod, betas, spaced_timesteps, velocity_alphas,
};
use super::{Scheduler, SchedulerKind, check_len, check_step_index, need_noise};
use crate::error::{Error, Result};

#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VarianceType {
    FixedSmall,
    FixedSmallLog,
    FixedLarge,
    FixedLargeLog,
}

/// diffusers' `DDPMScheduler`.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    common: Common,
    variance_type: VarianceType,
    clip_sample: bool,
    clip_sample_range: f32,
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    num_inference_steps: usize,
    timesteps_i: Vec<i64>,
    timesteps: Vec<f32>,
}

impl DdpmScheduler {
    /// `DDPMScheduler.from_config(config)`.
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
                "DDPMScheduler: thresholding is not supported".into(),
            ));
        }
        let variance_type = match c.variance_type.as_deref().unwrap_or("fixed_small") {
            "fixed_small" => VarianceType::FixedSmall,
            "fixed_small_log" => VarianceType::FixedSmallLog,
            "fixed_large" => VarianceType::FixedLarge,
            "fixed_large_log" => VarianceType::FixedLargeLog,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "DDPMScheduler: variance_type {other:?} is not supported"
                )));
            }
        };
        let betas = betas(&common, BetaSet::Ddpm, "DDPMScheduler")?;
        let alphas_cumprod = alphas_cumprod(&betas);
        let t = common.num_train_timesteps;
        Ok(Self {
            common,
            variance_type,
            clip_sample: c.clip_sample.unwrap_or(true),
            clip_sample_range: c.clip_sample_range.unwrap_or(1.0) as f32,
            betas,
            alphas_cumprod,
            num_inference_steps: 0,
            // __init__: timesteps = arange(0, T)[::-1]
            timesteps_i: (0..t as i64).rev().collect(),
            timesteps: (0..t).rev().map(|x| x as f32).collect(),
        })
    }

    /// `betas` (float32).
    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    /// `alphas_cumprod` (float32): the training noise schedule.
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

    fn previous_timestep(&self, step_index: usize) -> i64 {
        if self.num_inference_steps > 0 {
            self.timesteps_i.get(step_index + 1).copied().unwrap_or(-1)
        } else {
            self.timesteps_i[step_index] - 1
        }
    }
}

impl Scheduler for DdpmScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddpm
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

    fn needs_noise(&self, step_index: usize) -> bool {
        self.timesteps_i.get(step_index).is_some_and(|&t| t > 0)
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
        let t = self.timesteps_i[step_index];
        let prev_t = self.previous_timestep(step_index);
        let ac = |i: i64| -> Result<f32> {
            usize::try_from(i)
                .ok()
                .and_then(|i| self.alphas_cumprod.get(i).copied())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("timestep {i} outside the training schedule"))
                })
        };
        let apt = ac(t)?;
        let aptp = if prev_t >= 0 { ac(prev_t)? } else { 1.0 };
        let bpt = 1.0 - apt;
        let bptp = 1.0 - aptp;
        let current_alpha_t = apt / aptp;
        let current_beta_t = 1.0 - current_alpha_t;
        let (sa, sb) = (apt.sqrt(), bpt.sqrt());
        let mut x0: Vec<f32> = match self.common.prediction_type {
            Prediction::Epsilon => sample
                .iter()
                .zip(model_output)
                .map(|(&s, &m)| (s - sb * m) / sa)
                .collect(),
            Prediction::Sample => model_output.to_vec(),
            Prediction::VPrediction => sample
                .iter()
                .zip(model_output)
                .map(|(&s, &m)| sa * s - sb * m)
                .collect(),
        };
        if self.clip_sample {
            let r = self.clip_sample_range;
            for v in &mut x0 {
                *v = v.clamp(-r, r);
            }
        }
        let x0_coeff = (aptp.sqrt() * current_beta_t) / bpt;
        let cur_coeff = current_alpha_t.sqrt() * bptp / bpt;
        let mut prev: Vec<f32> = x0
            .iter()
            .zip(sample)
            .map(|(&x, &s)| x0_coeff * x + cur_coeff * s)
            .collect();
        if t > 0 {
            let noise = need_noise(noise, sample.len(), "DDPMScheduler")?;
            // _get_variance
            let variance = ((1.0 - aptp) / (1.0 - apt) * current_beta_t).max(1e-20);
            let scale = match self.variance_type {
                VarianceType::FixedSmall => variance.sqrt(),
                VarianceType::FixedSmallLog => (0.5 * variance.ln_cr()).exp_cr(),
                VarianceType::FixedLarge => current_beta_t.sqrt(),
                VarianceType::FixedLargeLog => current_beta_t.ln_cr().sqrt(),
            };
            for (p, &n) in prev.iter_mut().zip(noise) {
                *p += scale * n;
            }
        }
        Ok(prev)
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timesteps: &[f32]) -> Result<Vec<f32>> {
        add_noise_alphas(&self.alphas_cumprod, original, noise, timesteps)
    }
}
