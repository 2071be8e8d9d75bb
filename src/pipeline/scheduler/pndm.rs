//! `PNDMScheduler`, ported from diffusers 0.42.1 `src/diffusers/schedulers/scheduling_pndm.py`
//! (https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_pndm.py).
//! SD 1.5's default: with `skip_prk_steps` it is the PLMS path (linear multistep, Adams–Bashforth
//! orders 1–4 with the doubled second timestep); otherwise 12 Runge–Kutta (PRK) steps come first.

use super::config::{Common, Defaults, Prediction, SchedulerConfig};
use super::schedule::{BetaSet, add_noise_alphas, alphas_cumprod, betas, spaced_timesteps};
use super::{Scheduler, SchedulerKind, check_len, check_step_index};
use crate::error::{Error, Result};

/// diffusers' `PNDMScheduler`.
#[derive(Debug, Clone)]
pub struct PndmScheduler {
    common: Common,
    skip_prk_steps: bool,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    prk_timesteps: Vec<i64>,
    timesteps_i: Vec<i64>,
    timesteps: Vec<f32>,
    // multistep state
    counter: usize,
    ets: Vec<Vec<f32>>,
    cur_model_output: Option<Vec<f32>>,
    cur_sample: Option<Vec<f32>>,
}

const PNDM_ORDER: usize = 4;

impl PndmScheduler {
    /// `PNDMScheduler.from_config(config)` (`clip_sample`, `rescale_betas_zero_snr` and other keys
    /// PNDM has no parameter for are ignored, as there).
    pub fn from_config(c: &SchedulerConfig) -> Result<Self> {
        let common = Common::resolve(
            c,
            Defaults {
                timestep_spacing: "leading",
                has_rescale: false,
            },
        )?;
        if common.prediction_type == Prediction::Sample {
            return Err(Error::InvalidArgument(
                "PNDMScheduler supports prediction_type epsilon or v_prediction".into(),
            ));
        }
        let b = betas(&common, BetaSet::Standard, "PNDMScheduler")?;
        let alphas_cumprod = alphas_cumprod(&b);
        let final_alpha_cumprod = if c.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            common,
            skip_prk_steps: c.skip_prk_steps.unwrap_or(false),
            alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: 0,
            prk_timesteps: Vec::new(),
            timesteps_i: Vec::new(),
            timesteps: Vec::new(),
            counter: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
        })
    }

    /// `alphas_cumprod` (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    fn ratio(&self) -> i64 {
        (self.common.num_train_timesteps / self.num_inference_steps) as i64
    }

    fn ac(&self, t: i64) -> Result<f32> {
        usize::try_from(t)
            .ok()
            .and_then(|i| self.alphas_cumprod.get(i).copied())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("timestep {t} outside the training schedule"))
            })
    }

    /// `_get_prev_sample` (formula (9) of the PNDM paper).
    fn get_prev_sample(
        &self,
        sample: &[f32],
        timestep: i64,
        prev_timestep: i64,
        model_output: &[f32],
    ) -> Result<Vec<f32>> {
        let apt = self.ac(timestep)?;
        let aptp = if prev_timestep >= 0 {
            self.ac(prev_timestep)?
        } else {
            self.final_alpha_cumprod
        };
        let bpt = 1.0 - apt;
        let bptp = 1.0 - aptp;
        let v_mo: Vec<f32>;
        let mo = if self.common.prediction_type == Prediction::VPrediction {
            let (sa, sb) = (apt.sqrt(), bpt.sqrt());
            v_mo = model_output
                .iter()
                .zip(sample)
                .map(|(&m, &s)| sa * m + sb * s)
                .collect();
            &v_mo[..]
        } else {
            model_output
        };
        let sample_coeff = (aptp / apt).sqrt();
        let denom = apt * bptp.sqrt() + (apt * bpt * aptp).sqrt();
        let diff = aptp - apt;
        Ok(sample
            .iter()
            .zip(mo)
            .map(|(&s, &m)| sample_coeff * s - diff * m / denom)
            .collect())
    }

    fn step_prk(
        &mut self,
        model_output: &[f32],
        timestep: i64,
        sample: &[f32],
    ) -> Result<Vec<f32>> {
        let half = self.ratio() / 2;
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { half };
        let prev_timestep = timestep - diff_to_prev;
        let timestep = self.prk_timesteps[self.counter / 4 * 4];
        let sixth = (1.0f64 / 6.0) as f32;
        let third = (1.0f64 / 3.0) as f32;
        let mut mo_owned: Option<Vec<f32>> = None;
        match self.counter % 4 {
            0 => {
                // cur_model_output (0) += 1/6 * model_output
                self.cur_model_output = Some(model_output.iter().map(|&m| sixth * m).collect());
                self.ets.push(model_output.to_vec());
                self.cur_sample = Some(sample.to_vec());
            }
            1 | 2 => {
                let cur = self
                    .cur_model_output
                    .get_or_insert_with(|| vec![0.0; model_output.len()]);
                for (c, &m) in cur.iter_mut().zip(model_output) {
                    *c += third * m;
                }
            }
            _ => {
                let cur = self
                    .cur_model_output
                    .take()
                    .unwrap_or_else(|| vec![0.0; model_output.len()]);
                mo_owned = Some(
                    cur.iter()
                        .zip(model_output)
                        .map(|(&c, &m)| c + sixth * m)
                        .collect(),
                );
            }
        }
        let mo = mo_owned.as_deref().unwrap_or(model_output);
        let cur_sample = self.cur_sample.as_deref().unwrap_or(sample);
        let prev = self.get_prev_sample(cur_sample, timestep, prev_timestep, mo)?;
        self.counter += 1;
        Ok(prev)
    }

    fn step_plms(
        &mut self,
        model_output: &[f32],
        timestep: i64,
        sample: &[f32],
    ) -> Result<Vec<f32>> {
        if !self.skip_prk_steps && self.ets.len() < 3 {
            return Err(Error::InvalidArgument(
                "PNDMScheduler can only run PLMS steps after 12 PRK steps (step in order)".into(),
            ));
        }
        let ratio = self.ratio();
        let mut prev_timestep = timestep - ratio;
        let mut timestep = timestep;
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.to_vec());
        } else {
            prev_timestep = timestep;
            timestep += ratio;
        }
        let n = self.ets.len();
        let first = n == 1 && self.counter == 0;
        let second = n == 1 && self.counter == 1;
        let mo: Vec<f32> = {
            let ets = &self.ets;
            let e = |k: usize| &ets[n - k];
            if first {
                model_output.to_vec()
            } else if second {
                model_output
                    .iter()
                    .zip(e(1))
                    .map(|(&m, &e1)| (m + e1) / 2.0)
                    .collect()
            } else if n == 2 {
                e(1).iter()
                    .zip(e(2))
                    .map(|(&e1, &e2)| (3.0 * e1 - e2) / 2.0)
                    .collect()
            } else if n == 3 {
                (0..model_output.len())
                    .map(|i| (23.0 * e(1)[i] - 16.0 * e(2)[i] + 5.0 * e(3)[i]) / 12.0)
                    .collect()
            } else {
                let c = (1.0f64 / 24.0) as f32;
                (0..model_output.len())
                    .map(|i| c * (55.0 * e(1)[i] - 59.0 * e(2)[i] + 37.0 * e(3)[i] - 9.0 * e(4)[i]))
                    .collect()
            }
        };
        let mut sample_owned: Option<Vec<f32>> = None;
        if first {
            self.cur_sample = Some(sample.to_vec());
        } else if second {
            sample_owned = self.cur_sample.take();
        }
        let sample = sample_owned.as_deref().unwrap_or(sample);
        let prev = self.get_prev_sample(sample, timestep, prev_timestep, &mo)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Scheduler for PndmScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Pndm
    }

    fn num_train_timesteps(&self) -> usize {
        self.common.num_train_timesteps
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let t = self.common.num_train_timesteps;
        // `_timesteps`, ascending.
        let mut ts = spaced_timesteps(&self.common, n)?;
        ts.reverse();
        self.num_inference_steps = n;
        let len = ts.len();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if self.skip_prk_steps {
            // concatenate([_ts[:-1], _ts[-2:-1], _ts[-1:]])[::-1]
            let mut v: Vec<i64> = ts[..len.saturating_sub(1)].to_vec();
            if len >= 2 {
                v.push(ts[len - 2]);
            }
            v.extend(ts.last());
            v.reverse();
            (Vec::new(), v)
        } else {
            if len < PNDM_ORDER {
                return Err(Error::InvalidArgument(format!(
                    "PNDMScheduler with skip_prk_steps=false needs at least {PNDM_ORDER} inference steps"
                )));
            }
            let half = (t / n / 2) as i64;
            let mut prk: Vec<i64> = Vec::with_capacity(2 * PNDM_ORDER);
            for &x in &ts[len - PNDM_ORDER..] {
                prk.push(x);
                prk.push(x + half);
            }
            // (prk[:-1].repeat(2)[1:-1])[::-1]
            let mut rep: Vec<i64> = prk[..prk.len() - 1].iter().flat_map(|&x| [x, x]).collect();
            rep = rep[1..rep.len() - 1].to_vec();
            rep.reverse();
            let mut plms: Vec<i64> = ts[..len.saturating_sub(3)].to_vec();
            plms.reverse();
            (rep, plms)
        };
        self.timesteps_i = prk.iter().chain(&plms).copied().collect();
        self.timesteps = self.timesteps_i.iter().map(|&x| x as f32).collect();
        self.prk_timesteps = prk;
        self.ets.clear();
        self.counter = 0;
        self.cur_model_output = None;
        self.cur_sample = None;
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

    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        _noise: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        check_step_index(step_index, self.timesteps_i.len())?;
        check_len("model_output", model_output.len(), sample.len())?;
        if step_index != self.counter {
            return Err(Error::InvalidArgument(format!(
                "PNDMScheduler is multistep: expected step_index {}, got {step_index}",
                self.counter
            )));
        }
        let t = self.timesteps_i[step_index];
        if self.counter < self.prk_timesteps.len() && !self.skip_prk_steps {
            self.step_prk(model_output, t, sample)
        } else {
            self.step_plms(model_output, t, sample)
        }
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timesteps: &[f32]) -> Result<Vec<f32>> {
        add_noise_alphas(&self.alphas_cumprod, original, noise, timesteps)
    }
}
