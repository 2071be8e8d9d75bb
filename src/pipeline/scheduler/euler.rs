//! `EulerDiscreteScheduler`, ported from diffusers 0.42.1
//! `src/diffusers/schedulers/scheduling_euler_discrete.py`
//! (https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_euler_discrete.py).
//! Algorithm 2 of Karras et al. (2022) with `s_churn = 0`, optional Karras/exponential sigmas.
//! Also holds the sigma-schedule code the Euler-family schedulers share.

use super::config::{Common, Defaults, Prediction, SchedulerConfig, Spacing};
use super::numerics::CorrectlyRounded;
use super::numerics::{
    exponential_sigmas, karras_sigmas, np_arange_f64, np_interp_arange, np_linspace, np_log_f32,
    np_round, sigma_table, sigma_to_t, torch_linspace_f32,
};
use super::schedule::{BetaSet, alphas_cumprod, betas};
use super::{Scheduler, SchedulerKind, check_len, check_step_index, index_for_timestep, per_item};
use crate::error::{Error, Result};

/// The float32 timesteps of the Euler-family `set_timesteps` (Euler, Euler ancestral, LMS).
pub(crate) fn euler_family_timesteps(c: &Common, n: usize) -> Vec<f32> {
    let t = c.num_train_timesteps;
    match c.timestep_spacing {
        Spacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|v| v as f32)
            .collect(),
        Spacing::Leading => {
            let ratio = (t / n) as i64;
            // (arange(0, n) * ratio).round()[::-1].astype(float32); += steps_offset (float32)
            (0..n as i64)
                .rev()
                .map(|i| (i * ratio) as f32 + c.steps_offset as f32)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = t as f64 / n as f64;
            np_arange_f64(t as f64, 0.0, -ratio)
                .into_iter()
                .map(|x| np_round(x) as f32 - 1.0)
                .collect()
        }
    }
}

/// `np.interp(timesteps, arange(len(sigmas)), sigmas)` for float32 timesteps and sigma table.
pub(crate) fn interp_sigmas(timesteps: &[f32], table: &[f32]) -> Vec<f64> {
    let fp: Vec<f64> = table.iter().map(|&s| f64::from(s)).collect();
    timesteps
        .iter()
        .map(|&t| np_interp_arange(f64::from(t), &fp))
        .collect()
}

/// Which sigma spacing a config asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SigmaSpacing {
    Interp,
    Karras,
    Exponential,
}

impl SigmaSpacing {
    pub fn from_config(c: &SchedulerConfig, class: &str) -> Result<Self> {
        let karras = c.use_karras_sigmas.unwrap_or(false);
        let exp = c.use_exponential_sigmas.unwrap_or(false);
        let beta = c.use_beta_sigmas.unwrap_or(false);
        if [karras, exp, beta].iter().filter(|&&b| b).count() > 1 {
            return Err(Error::InvalidArgument(
                "Only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be used".into(),
            ));
        }
        if beta {
            return Err(Error::InvalidArgument(format!(
                "{class}: use_beta_sigmas (scipy.stats.beta.ppf) is not supported"
            )));
        }
        Ok(if karras {
            SigmaSpacing::Karras
        } else if exp {
            SigmaSpacing::Exponential
        } else {
            SigmaSpacing::Interp
        })
    }
}

/// Sample-space elementwise Euler update shared by the Euler family: `x0` for each prediction type.
pub(crate) fn pred_original(
    pred: Prediction,
    sigma: f32,
    sample: &[f32],
    model_output: &[f32],
) -> Vec<f32> {
    match pred {
        Prediction::Epsilon => sample
            .iter()
            .zip(model_output)
            .map(|(&s, &m)| s - sigma * m)
            .collect(),
        Prediction::VPrediction => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            let c_skip = sigma * sigma + 1.0;
            sample
                .iter()
                .zip(model_output)
                .map(|(&s, &m)| m * c_out + s / c_skip)
                .collect()
        }
        Prediction::Sample => model_output.to_vec(),
    }
}

/// `sample / ((sigma**2 + 1) ** 0.5)`.
pub(crate) fn scale_by_sigma(sample: &[f32], sigma: f32) -> Vec<f32> {
    let d = (sigma * sigma + 1.0).sqrt();
    sample.iter().map(|&s| s / d).collect()
}

/// `add_noise` of the sigma schedulers: `original + noise * sigmas[index_for_timestep(t)]`.
pub(crate) fn add_noise_sigmas(
    timesteps_sched: &[f32],
    sigmas: &[f32],
    original: &[f32],
    noise: &[f32],
    timesteps: &[f32],
) -> Result<Vec<f32>> {
    check_len("noise", noise.len(), original.len())?;
    let (per, ts) = per_item(original.len(), timesteps)?;
    let mut out = Vec::with_capacity(original.len());
    for (b, &t) in ts.iter().enumerate() {
        let i = index_for_timestep(timesteps_sched, t).ok_or_else(|| {
            Error::InvalidArgument(format!("timestep {t} is not in the schedule"))
        })?;
        let sigma = sigmas[i];
        let r = b * per..(b + 1) * per;
        out.extend(
            original[r.clone()]
                .iter()
                .zip(&noise[r])
                .map(|(&x, &n)| x + n * sigma),
        );
    }
    Ok(out)
}

/// diffusers' `EulerDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    common: Common,
    spacing: SigmaSpacing,
    log_linear: bool,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    final_sigma_min: bool,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
}

impl EulerDiscreteScheduler {
    /// `EulerDiscreteScheduler.from_config(config)`.
    pub fn from_config(c: &SchedulerConfig) -> Result<Self> {
        let common = Common::resolve(
            c,
            Defaults {
                timestep_spacing: "linspace",
                has_rescale: true,
            },
        )?;
        let spacing = SigmaSpacing::from_config(c, "EulerDiscreteScheduler")?;
        let log_linear = match c.interpolation_type.as_deref().unwrap_or("linear") {
            "linear" => false,
            "log_linear" => true,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "interpolation_type {other:?} is not implemented"
                )));
            }
        };
        if c.timestep_type.as_deref().unwrap_or("discrete") == "continuous"
            && common.prediction_type == Prediction::VPrediction
        {
            return Err(Error::InvalidArgument(
                "EulerDiscreteScheduler: timestep_type continuous with v_prediction is not supported".into(),
            ));
        }
        let final_sigma_min = match c.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => false,
            "sigma_min" => true,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "final_sigmas_type {other:?} (zero, sigma_min)"
                )));
            }
        };
        let b = betas(&common, BetaSet::Standard, "EulerDiscreteScheduler")?;
        let mut alphas_cumprod = alphas_cumprod(&b);
        if common.rescale_betas_zero_snr
            && let Some(last) = alphas_cumprod.last_mut()
        {
            *last = 2f32.powi(-24);
        }
        // __init__ state: sigmas of all training steps, descending, then 0.
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
            spacing,
            log_linear,
            sigma_min: c.sigma_min,
            sigma_max: c.sigma_max,
            final_sigma_min,
            alphas_cumprod,
            timesteps,
            sigmas,
        })
    }

    /// `alphas_cumprod` (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }
}

/// `init_noise_sigma` of the sigma schedulers (Euler, Euler ancestral, LMS): the largest sigma,
/// or `sqrt(max² + 1)` for "leading" spacing (`scheduling_euler_discrete.py`).
pub(crate) fn sigma_init_noise(sigmas: &[f32], spacing: Spacing) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        Spacing::Linspace | Spacing::Trailing => max,
        Spacing::Leading => (max * max + 1.0).sqrt(),
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
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
        let mut timesteps = euler_family_timesteps(&self.common, n);
        let table = sigma_table(&self.alphas_cumprod);
        let log_sigmas: Vec<f32> = table.iter().map(|&s| np_log_f32(s)).collect();
        let mut sigmas: Vec<f64> = if self.log_linear {
            // torch.linspace(log(sigmas[-1]), log(sigmas[0]), n + 1).exp()  (float32)
            let lo = f64::from(np_log_f32(table[table.len() - 1]));
            let hi = f64::from(np_log_f32(table[0]));
            torch_linspace_f32(lo, hi, n + 1)
                .into_iter()
                .map(|v| f64::from(v.exp_cr()))
                .collect()
        } else {
            interp_sigmas(&timesteps, &table)
        };
        match self.spacing {
            SigmaSpacing::Interp => {}
            SigmaSpacing::Karras | SigmaSpacing::Exponential => {
                let (Some(&first), Some(&last)) = (sigmas.first(), sigmas.last()) else {
                    return Err(Error::InvalidArgument("empty sigma schedule".into()));
                };
                let smin = self.sigma_min.unwrap_or(last);
                let smax = self.sigma_max.unwrap_or(first);
                sigmas = if self.spacing == SigmaSpacing::Karras {
                    karras_sigmas(smin, smax, n)
                } else {
                    exponential_sigmas(smin, smax, n)
                };
                timesteps = sigmas
                    .iter()
                    .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
                    .collect();
            }
        }
        let sigma_last = if self.final_sigma_min {
            let a = self.alphas_cumprod[0];
            ((1.0 - a) / a).sqrt()
        } else {
            0.0
        };
        let mut s32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        s32.push(sigma_last);
        self.sigmas = s32;
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

    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        _noise: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        check_step_index(step_index, self.timesteps.len())?;
        check_len("model_output", model_output.len(), sample.len())?;
        let sigma = self.sigmas[step_index];
        // s_churn = 0: gamma = 0 and sigma_hat = sigma * (gamma + 1) = sigma; epsilon uses sigma_hat.
        let sigma_hat = sigma;
        let x0 = pred_original(self.common.prediction_type, sigma_hat, sample, model_output);
        let dt = self.sigmas[step_index + 1] - sigma_hat;
        Ok(sample
            .iter()
            .zip(&x0)
            .map(|(&s, &p)| {
                let derivative = (s - p) / sigma_hat;
                s + derivative * dt
            })
            .collect())
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timesteps: &[f32]) -> Result<Vec<f32>> {
        add_noise_sigmas(&self.timesteps, &self.sigmas, original, noise, timesteps)
    }
}
