//! `DPMSolverMultistepScheduler`, ported from diffusers 0.42.1
//! `src/diffusers/schedulers/scheduling_dpmsolver_multistep.py`
//! (https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_dpmsolver_multistep.py).
//! Default: DPM-Solver++ 2M (`algorithm_type="dpmsolver++"`, `solver_order=2`, midpoint), the
//! "DPM++ 2M" of A1111; orders 1–3, `dpmsolver`, the SDE variants (they take noise), Karras,
//! exponential and Lu lambdas are ported too.

use super::config::{Common, Defaults, Prediction, SchedulerConfig, Spacing};
use super::euler::SigmaSpacing;
use super::numerics::CorrectlyRounded;
use super::numerics::{
    exponential_sigmas, karras_sigmas, np_arange_f64, np_linspace, np_log_f32, np_round,
    sigma_table, sigma_to_t,
};
use super::schedule::{BetaSet, alphas_cumprod, betas};
use super::{Scheduler, SchedulerKind, check_len, check_step_index, need_noise, per_item};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    DpmSolverPP,
    DpmSolver,
    SdeDpmSolverPP,
    SdeDpmSolver,
}

impl Algorithm {
    fn is_sde(self) -> bool {
        matches!(self, Algorithm::SdeDpmSolverPP | Algorithm::SdeDpmSolver)
    }
    fn is_data_prediction(self) -> bool {
        matches!(self, Algorithm::DpmSolverPP | Algorithm::SdeDpmSolverPP)
    }
}

/// diffusers' `DPMSolverMultistepScheduler`.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    common: Common,
    solver_order: usize,
    algorithm: Algorithm,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    lambda_min_clipped: f64,
    spacing: SigmaSpacing,
    lu_lambdas: bool,
    beta_schedule_cos: bool,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    // multistep state
    model_outputs: Vec<Option<Vec<f32>>>,
    lower_order_nums: usize,
    step_index: usize,
}

/// `_sigma_to_alpha_sigma_t` (non-flow): `alpha_t = 1 / (sigma**2 + 1) ** 0.5`, `sigma_t = sigma * alpha_t`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha_t, sigma * alpha_t)
}

/// `torch.log(alpha_t) - torch.log(sigma_t)`.
fn lambda(alpha_t: f32, sigma_t: f32) -> f32 {
    alpha_t.ln_cr() - sigma_t.ln_cr()
}

impl DpmSolverMultistepScheduler {
    /// `DPMSolverMultistepScheduler.from_config(config)`.
    pub fn from_config(c: &SchedulerConfig) -> Result<Self> {
        let common = Common::resolve(
            c,
            Defaults {
                timestep_spacing: "linspace",
                has_rescale: true,
            },
        )?;
        let solver_order = c.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(Error::InvalidArgument(format!(
                "solver_order must be 1, 2 or 3, got {solver_order}"
            )));
        }
        let algorithm = match c.algorithm_type.as_deref().unwrap_or("dpmsolver++") {
            "dpmsolver++" | "deis" => Algorithm::DpmSolverPP,
            "dpmsolver" => Algorithm::DpmSolver,
            "sde-dpmsolver++" => Algorithm::SdeDpmSolverPP,
            "sde-dpmsolver" => Algorithm::SdeDpmSolver,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "algorithm_type {other:?} is not implemented"
                )));
            }
        };
        let heun = match c.solver_type.as_deref().unwrap_or("midpoint") {
            "midpoint" | "logrho" | "bh1" | "bh2" => false,
            "heun" => true,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "solver_type {other:?} is not implemented"
                )));
            }
        };
        let final_sigma_zero = match c.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => true,
            "sigma_min" => false,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "final_sigmas_type {other:?} (zero, sigma_min)"
                )));
            }
        };
        if !algorithm.is_data_prediction() && final_sigma_zero {
            return Err(Error::InvalidArgument(format!(
                "final_sigmas_type zero is not supported for algorithm_type {:?}; use sigma_min",
                c.algorithm_type.as_deref().unwrap_or("")
            )));
        }
        if solver_order == 3 && algorithm == Algorithm::SdeDpmSolver {
            return Err(Error::InvalidArgument(
                "solver_order 3 is not defined for sde-dpmsolver (diffusers fails too)".into(),
            ));
        }
        if c.thresholding.unwrap_or(false) {
            return Err(Error::InvalidArgument(
                "DPMSolverMultistepScheduler: thresholding is not supported".into(),
            ));
        }
        if matches!(
            c.variance_type.as_deref(),
            Some("learned" | "learned_range")
        ) {
            return Err(Error::InvalidArgument(
                "DPMSolverMultistepScheduler: learned variance is not supported".into(),
            ));
        }
        if c.use_flow_sigmas.unwrap_or(false) {
            return Err(Error::InvalidArgument(
                "DPMSolverMultistepScheduler: use_flow_sigmas is not supported".into(),
            ));
        }
        let spacing = SigmaSpacing::from_config(c, "DPMSolverMultistepScheduler")?;
        let b = betas(&common, BetaSet::Standard, "DPMSolverMultistepScheduler")?;
        let mut alphas_cumprod = alphas_cumprod(&b);
        if common.rescale_betas_zero_snr
            && let Some(last) = alphas_cumprod.last_mut()
        {
            *last = 2f32.powi(-24);
        }
        let t = common.num_train_timesteps;
        let beta_schedule_cos = common.beta_schedule == "squaredcos_cap_v2";
        Ok(Self {
            solver_order,
            algorithm,
            heun,
            lower_order_final: c.lower_order_final.unwrap_or(true),
            euler_at_final: c.euler_at_final.unwrap_or(false),
            final_sigma_zero,
            lambda_min_clipped: c.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY),
            spacing,
            lu_lambdas: c.use_lu_lambdas.unwrap_or(false),
            beta_schedule_cos,
            sigmas: sigma_table(&alphas_cumprod),
            alphas_cumprod,
            timesteps: np_linspace(0.0, (t - 1) as f64, t)
                .into_iter()
                .rev()
                .map(|v| v as f32)
                .collect(),
            common,
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
            step_index: 0,
        })
    }

    /// `alphas_cumprod` (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// `convert_model_output`: x0 (data prediction) for `dpmsolver++`, epsilon for `dpmsolver`.
    fn convert_model_output(&self, model_output: &[f32], sample: &[f32]) -> Vec<f32> {
        let sigma = self.sigmas[self.step_index];
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        let pred = self.common.prediction_type;
        if self.algorithm.is_data_prediction() {
            match pred {
                Prediction::Epsilon => sample
                    .iter()
                    .zip(model_output)
                    .map(|(&s, &m)| (s - sigma_t * m) / alpha_t)
                    .collect(),
                Prediction::Sample => model_output.to_vec(),
                Prediction::VPrediction => sample
                    .iter()
                    .zip(model_output)
                    .map(|(&s, &m)| alpha_t * s - sigma_t * m)
                    .collect(),
            }
        } else {
            match pred {
                Prediction::Epsilon => model_output.to_vec(),
                Prediction::Sample => sample
                    .iter()
                    .zip(model_output)
                    .map(|(&s, &m)| (s - alpha_t * m) / sigma_t)
                    .collect(),
                Prediction::VPrediction => sample
                    .iter()
                    .zip(model_output)
                    .map(|(&s, &m)| alpha_t * m + sigma_t * s)
                    .collect(),
            }
        }
    }

    fn first_order(&self, m0: &[f32], sample: &[f32], noise: Option<&[f32]>) -> Vec<f32> {
        let i = self.step_index;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        let z = |k: usize| noise.map_or(0.0, |n| n[k]);
        match self.algorithm {
            Algorithm::DpmSolverPP => {
                let a = sigma_t / sigma_s;
                let b = alpha_t * ((-h).exp_cr() - 1.0);
                sample
                    .iter()
                    .zip(m0)
                    .map(|(&x, &m)| a * x - b * m)
                    .collect()
            }
            Algorithm::DpmSolver => {
                let a = alpha_t / alpha_s;
                let b = sigma_t * (h.exp_cr() - 1.0);
                sample
                    .iter()
                    .zip(m0)
                    .map(|(&x, &m)| a * x - b * m)
                    .collect()
            }
            Algorithm::SdeDpmSolverPP => {
                let a = sigma_t / sigma_s * (-h).exp_cr();
                let b = alpha_t * (1.0 - (-2.0 * h).exp_cr());
                let c = sigma_t * (1.0 - (-2.0 * h).exp_cr()).sqrt();
                (0..sample.len())
                    .map(|k| a * sample[k] + b * m0[k] + c * z(k))
                    .collect()
            }
            Algorithm::SdeDpmSolver => {
                let a = alpha_t / alpha_s;
                let b = 2.0 * (sigma_t * (h.exp_cr() - 1.0));
                let c = sigma_t * ((2.0 * h).exp_cr() - 1.0).sqrt();
                (0..sample.len())
                    .map(|k| a * sample[k] - b * m0[k] + c * z(k))
                    .collect()
            }
        }
    }

    fn second_order(&self, sample: &[f32], noise: Option<&[f32]>) -> Vec<f32> {
        let i = self.step_index;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let n = self.model_outputs.len();
        let (Some(m0), Some(m1)) = (
            self.model_outputs[n - 1].as_deref(),
            self.model_outputs[n - 2].as_deref(),
        ) else {
            return sample.to_vec();
        };
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let inv_r0 = 1.0 / r0;
        let d1 = |k: usize| inv_r0 * (m0[k] - m1[k]);
        let z = |k: usize| noise.map_or(0.0, |v| v[k]);
        let len = sample.len();
        match (self.algorithm, self.heun) {
            (Algorithm::DpmSolverPP, false) => {
                let a = sigma_t / sigma_s0;
                let b = alpha_t * ((-h).exp_cr() - 1.0);
                let c = 0.5 * (alpha_t * ((-h).exp_cr() - 1.0));
                (0..len)
                    .map(|k| a * sample[k] - b * m0[k] - c * d1(k))
                    .collect()
            }
            (Algorithm::DpmSolverPP, true) => {
                let a = sigma_t / sigma_s0;
                let b = alpha_t * ((-h).exp_cr() - 1.0);
                let c = alpha_t * (((-h).exp_cr() - 1.0) / h + 1.0);
                (0..len)
                    .map(|k| a * sample[k] - b * m0[k] + c * d1(k))
                    .collect()
            }
            (Algorithm::DpmSolver, false) => {
                let a = alpha_t / alpha_s0;
                let b = sigma_t * (h.exp_cr() - 1.0);
                let c = 0.5 * (sigma_t * (h.exp_cr() - 1.0));
                (0..len)
                    .map(|k| a * sample[k] - b * m0[k] - c * d1(k))
                    .collect()
            }
            (Algorithm::DpmSolver, true) => {
                let a = alpha_t / alpha_s0;
                let b = sigma_t * (h.exp_cr() - 1.0);
                let c = sigma_t * ((h.exp_cr() - 1.0) / h - 1.0);
                (0..len)
                    .map(|k| a * sample[k] - b * m0[k] - c * d1(k))
                    .collect()
            }
            (Algorithm::SdeDpmSolverPP, heun) => {
                let a = sigma_t / sigma_s0 * (-h).exp_cr();
                let b = alpha_t * (1.0 - (-2.0 * h).exp_cr());
                let c = if heun {
                    alpha_t * ((1.0 - (-2.0 * h).exp_cr()) / (-2.0 * h) + 1.0)
                } else {
                    0.5 * (alpha_t * (1.0 - (-2.0 * h).exp_cr()))
                };
                let e = sigma_t * (1.0 - (-2.0 * h).exp_cr()).sqrt();
                (0..len)
                    .map(|k| a * sample[k] + b * m0[k] + c * d1(k) + e * z(k))
                    .collect()
            }
            (Algorithm::SdeDpmSolver, heun) => {
                let a = alpha_t / alpha_s0;
                let b = 2.0 * (sigma_t * (h.exp_cr() - 1.0));
                let c = if heun {
                    2.0 * (sigma_t * ((h.exp_cr() - 1.0) / h - 1.0))
                } else {
                    sigma_t * (h.exp_cr() - 1.0)
                };
                let e = sigma_t * ((2.0 * h).exp_cr() - 1.0).sqrt();
                (0..len)
                    .map(|k| a * sample[k] - b * m0[k] - c * d1(k) + e * z(k))
                    .collect()
            }
        }
    }

    fn third_order(&self, sample: &[f32], noise: Option<&[f32]>) -> Vec<f32> {
        let i = self.step_index;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.sigmas[i - 2]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let lambda_s2 = lambda(alpha_s2, sigma_s2);
        let n = self.model_outputs.len();
        let (Some(m0), Some(m1), Some(m2)) = (
            self.model_outputs[n - 1].as_deref(),
            self.model_outputs[n - 2].as_deref(),
            self.model_outputs[n - 3].as_deref(),
        ) else {
            return sample.to_vec();
        };
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let h_1 = lambda_s1 - lambda_s2;
        let r0 = h_0 / h;
        let r1 = h_1 / h;
        let (inv_r0, inv_r1) = (1.0 / r0, 1.0 / r1);
        let c_d1 = r0 / (r0 + r1);
        let c_d2 = 1.0 / (r0 + r1);
        let z = |k: usize| noise.map_or(0.0, |v| v[k]);
        let len = sample.len();
        let mut out = Vec::with_capacity(len);
        for k in 0..len {
            let d1_0 = inv_r0 * (m0[k] - m1[k]);
            let d1_1 = inv_r1 * (m1[k] - m2[k]);
            let d1 = d1_0 + c_d1 * (d1_0 - d1_1);
            let d2 = c_d2 * (d1_0 - d1_1);
            let x = sample[k];
            let v = match self.algorithm {
                Algorithm::DpmSolverPP => {
                    let a = sigma_t / sigma_s0;
                    let e = (-h).exp_cr();
                    a * x - (alpha_t * (e - 1.0)) * m0[k] + (alpha_t * ((e - 1.0) / h + 1.0)) * d1
                        - (alpha_t * ((e - 1.0 + h) / (h * h) - 0.5)) * d2
                }
                Algorithm::DpmSolver => {
                    let a = alpha_t / alpha_s0;
                    let e = h.exp_cr();
                    a * x
                        - (sigma_t * (e - 1.0)) * m0[k]
                        - (sigma_t * ((e - 1.0) / h - 1.0)) * d1
                        - (sigma_t * ((e - 1.0 - h) / (h * h) - 0.5)) * d2
                }
                Algorithm::SdeDpmSolverPP | Algorithm::SdeDpmSolver => {
                    // sde-dpmsolver++ (third-order sde-dpmsolver is refused in from_config).
                    let e2 = (-2.0 * h).exp_cr();
                    (sigma_t / sigma_s0 * (-h).exp_cr()) * x
                        + (alpha_t * (1.0 - e2)) * m0[k]
                        + (alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0)) * d1
                        + (alpha_t * ((1.0 - e2 - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5)) * d2
                        + sigma_t * (1.0 - e2).sqrt() * z(k)
                }
            };
            out.push(v);
        }
        out
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmSolverMultistep
    }

    fn num_train_timesteps(&self) -> usize {
        self.common.num_train_timesteps
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let t = self.common.num_train_timesteps;
        if n == 0 {
            return Err(Error::InvalidArgument(
                "num_inference_steps must be at least 1".into(),
            ));
        }
        let table = sigma_table(&self.alphas_cumprod);
        // clipped_idx = searchsorted(flip(lambda_t), lambda_min_clipped)
        let clipped_idx = if self.lambda_min_clipped == f64::NEG_INFINITY {
            0
        } else {
            let clip = self.lambda_min_clipped as f32;
            self.alphas_cumprod
                .iter()
                .rev()
                .map(|&a| a.sqrt().ln_cr() - (1.0 - a).sqrt().ln_cr())
                .filter(|&l| l < clip)
                .count()
        };
        let last_timestep = t - clipped_idx;
        let mut timesteps: Vec<f64> = match self.common.timestep_spacing {
            Spacing::Linspace => {
                let mut v: Vec<f64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                    .into_iter()
                    .map(np_round)
                    .collect();
                v.reverse();
                v.pop();
                v
            }
            Spacing::Leading => {
                let ratio = (last_timestep / (n + 1)) as i64;
                let mut v: Vec<f64> = (0..=n as i64).map(|i| (i * ratio) as f64).collect();
                v.reverse();
                v.pop();
                v.into_iter()
                    .map(|x| x + self.common.steps_offset as f64)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = t as f64 / n as f64;
                np_arange_f64(last_timestep as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|x| np_round(x) - 1.0)
                    .collect()
            }
        };
        let log_sigmas: Vec<f32> = table.iter().map(|&s| np_log_f32(s)).collect();
        let sigmas: Vec<f64> = if self.spacing != SigmaSpacing::Interp || self.lu_lambdas {
            let (Some(&smin), Some(&smax)) = (table.first(), table.last()) else {
                return Err(Error::InvalidArgument("empty sigma schedule".into()));
            };
            let (smin, smax) = (f64::from(smin), f64::from(smax));
            // diffusers' order: karras, then lu lambdas, then exponential.
            let s = if self.spacing == SigmaSpacing::Karras {
                karras_sigmas(smin, smax, n)
            } else if self.lu_lambdas {
                // lambdas = flip(log_sigmas); _convert_to_lu (rho = 1); sigmas = exp(lambdas)
                let lmin = f64::from(log_sigmas[0]);
                let lmax = f64::from(log_sigmas[log_sigmas.len() - 1]);
                np_linspace(0.0, 1.0, n)
                    .into_iter()
                    .map(|r| (lmax + r * (lmin - lmax)).exp())
                    .collect()
            } else {
                exponential_sigmas(smin, smax, n)
            };
            timesteps = s.iter().map(|&x| sigma_to_t(x, &log_sigmas)).collect();
            let rounded = self.spacing == SigmaSpacing::Karras || self.lu_lambdas;
            if rounded && !self.beta_schedule_cos {
                timesteps = timesteps.into_iter().map(np_round).collect();
            }
            s
        } else {
            let fp: Vec<f64> = table.iter().map(|&x| f64::from(x)).collect();
            timesteps
                .iter()
                .map(|&x| super::numerics::np_interp_arange(x, &fp))
                .collect()
        };
        let sigma_last = if self.final_sigma_zero {
            0.0
        } else {
            let a = self.alphas_cumprod[0];
            ((1.0 - a) / a).sqrt()
        };
        let mut s32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        s32.push(sigma_last);
        self.sigmas = s32;
        // .to(dtype=torch.int64): truncation toward zero
        self.timesteps = timesteps.iter().map(|&x| (x as i64) as f32).collect();
        self.model_outputs = vec![None; self.solver_order];
        self.lower_order_nums = 0;
        self.step_index = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn scale_model_input(&self, sample: &[f32], _step_index: usize) -> Result<Vec<f32>> {
        Ok(sample.to_vec())
    }

    fn needs_noise(&self, _step_index: usize) -> bool {
        self.algorithm.is_sde()
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        noise: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let n_steps = self.timesteps.len();
        check_step_index(step_index, n_steps)?;
        check_len("model_output", model_output.len(), sample.len())?;
        if step_index != self.step_index {
            return Err(Error::InvalidArgument(format!(
                "DPMSolverMultistepScheduler is multistep: expected step_index {}, got {step_index}",
                self.step_index
            )));
        }
        let noise = if self.algorithm.is_sde() {
            Some(need_noise(
                noise,
                sample.len(),
                "DPMSolverMultistepScheduler (SDE)",
            )?)
        } else {
            None
        };
        let lower_order_final = step_index == n_steps - 1
            && (self.euler_at_final
                || (self.lower_order_final && n_steps < 15)
                || self.final_sigma_zero);
        let lower_order_second =
            step_index + 2 == n_steps && self.lower_order_final && n_steps < 15;
        let m = self.convert_model_output(model_output, sample);
        self.model_outputs.rotate_left(1);
        let last = self.model_outputs.len() - 1;
        self.model_outputs[last] = Some(m);
        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            let m0 = self.model_outputs[last].as_deref().unwrap_or(model_output);
            self.first_order(m0, sample, noise)
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(sample, noise)
        } else {
            self.third_order(sample, noise)
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index += 1;
        Ok(prev)
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timesteps: &[f32]) -> Result<Vec<f32>> {
        check_len("noise", noise.len(), original.len())?;
        let (per, ts) = per_item(original.len(), timesteps)?;
        let mut out = Vec::with_capacity(original.len());
        for (b, &t) in ts.iter().enumerate() {
            // index_for_timestep: no match → last index
            let i = super::index_for_timestep(&self.timesteps, t)
                .unwrap_or(self.timesteps.len().saturating_sub(1));
            let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
            let r = b * per..(b + 1) * per;
            out.extend(
                original[r.clone()]
                    .iter()
                    .zip(&noise[r])
                    .map(|(&x, &n)| alpha_t * x + sigma_t * n),
            );
        }
        Ok(out)
    }
}
