//! `EulerAncestralDiscreteScheduler`, ported from diffusers 0.42.1
//! `src/diffusers/schedulers/scheduling_euler_ancestral_discrete.py`
//! (https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_euler_ancestral_discrete.py).
//! Each step goes down to `sigma_down` deterministically and adds `noise · sigma_up`.

use super::config::{Common, Defaults, Prediction, SchedulerConfig};
use super::euler::{
    add_noise_sigmas, euler_family_timesteps, interp_sigmas, pred_original, scale_by_sigma,
    sigma_init_noise,
};
use super::numerics::{np_linspace, sigma_table};
use super::schedule::{BetaSet, alphas_cumprod, betas};
use super::{Scheduler, SchedulerKind, check_len, check_step_index, need_noise};
use crate::error::{Error, Result};

/// diffusers' `EulerAncestralDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    common: Common,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
}

impl EulerAncestralDiscreteScheduler {
    /// `EulerAncestralDiscreteScheduler.from_config(config)`.
    pub fn from_config(c: &SchedulerConfig) -> Result<Self> {
        let common = Common::resolve(
            c,
            Defaults {
                timestep_spacing: "linspace",
                has_rescale: true,
            },
        )?;
        if common.prediction_type == Prediction::Sample {
            return Err(Error::InvalidArgument(
                "EulerAncestralDiscreteScheduler: prediction_type sample is not implemented (as in diffusers)".into(),
            ));
        }
        let b = betas(
            &common,
            BetaSet::Standard,
            "EulerAncestralDiscreteScheduler",
        )?;
        let mut alphas_cumprod = alphas_cumprod(&b);
        if common.rescale_betas_zero_snr
            && let Some(last) = alphas_cumprod.last_mut()
        {
            *last = 2f32.powi(-24);
        }
        let table = sigma_table(&alphas_cumprod);
        let mut sigmas: Vec<f32> = table.iter().rev().copied().collect();
        sigmas.push(0.0);
        let t = common.num_train_timesteps;
        let timesteps = np_linspace(0.0, (t - 1) as f64, t)
            .into_iter()
            .rev()
            .map(|v| v as f32)
            .collect();
        Ok(Self {
            common,
            alphas_cumprod,
            timesteps,
            sigmas,
        })
    }

    /// `alphas_cumprod` (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// `(sigma_up, sigma_down)` of step `i`.
    fn up_down(&self, i: usize) -> (f32, f32) {
        let sigma_from = self.sigmas[i];
        let sigma_to = self.sigmas[i + 1];
        let sf2 = sigma_from * sigma_from;
        let st2 = sigma_to * sigma_to;
        let sigma_up = (st2 * (sf2 - st2) / sf2).sqrt();
        let sigma_down = (st2 - sigma_up * sigma_up).sqrt();
        (sigma_up, sigma_down)
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
    }

    fn num_train_timesteps(&self) -> usize {
        self.common.num_train_timesteps
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::InvalidArgument(
                "num_inference_steps must be at least 1".into(),
            ));
        }
        let timesteps = euler_family_timesteps(&self.common, n);
        let table = sigma_table(&self.alphas_cumprod);
        let mut sigmas: Vec<f32> = interp_sigmas(&timesteps, &table)
            .into_iter()
            .map(|s| s as f32)
            .collect();
        sigmas.push(0.0);
        self.sigmas = sigmas;
        self.timesteps = timesteps;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f32 {
        sigma_init_noise(&self.sigmas, self.common.timestep_spacing)
    }

    fn scale_model_input(&self, sample: &[f32], step_index: usize) -> Result<Vec<f32>> {
        check_step_index(step_index, self.timesteps.len())?;
        Ok(scale_by_sigma(sample, self.sigmas[step_index]))
    }

    fn needs_noise(&self, _step_index: usize) -> bool {
        true
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        noise: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        check_step_index(step_index, self.timesteps.len())?;
        check_len("model_output", model_output.len(), sample.len())?;
        let noise = need_noise(noise, sample.len(), "EulerAncestralDiscreteScheduler")?;
        let sigma = self.sigmas[step_index];
        let x0 = pred_original(self.common.prediction_type, sigma, sample, model_output);
        let (sigma_up, sigma_down) = self.up_down(step_index);
        let dt = sigma_down - sigma;
        Ok(sample
            .iter()
            .zip(&x0)
            .zip(noise)
            .map(|((&s, &p), &n)| {
                let derivative = (s - p) / sigma;
                let prev = s + derivative * dt;
                prev + n * sigma_up
            })
            .collect())
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timesteps: &[f32]) -> Result<Vec<f32>> {
        add_noise_sigmas(&self.timesteps, &self.sigmas, original, noise, timesteps)
    }
}
