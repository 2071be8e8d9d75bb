//! The training-side DDPM maths on device tensors: `add_noise`, `get_velocity` (diffusers 0.42.1
//! `schedulers/scheduling_ddpm.py`) and `compute_snr` (`training_utils.py`), on the
//! `alphas_cumprod` of [`crate::pipeline::scheduler::DdpmScheduler`] (diffusers-exact f32 values).

use tch::{Device, Kind, Tensor};

use crate::pipeline::scheduler::{DdpmScheduler, SchedulerConfig};
use crate::{Error, Result};

/// What the UNet learns to predict (`prediction_type`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

impl Prediction {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            o => Err(Error::InvalidArgument(format!(
                "prediction_type {o:?}: expected epsilon or v_prediction"
            ))),
        }
    }
}

/// `DDPMScheduler` as the training loop uses it.
pub struct NoiseSchedule {
    /// `alphas_cumprod` (f32) on the training device.
    pub alphas_cumprod: Tensor,
    pub num_train_timesteps: i64,
    /// The scheduler config's `prediction_type` (epsilon when absent).
    pub prediction: Prediction,
}

impl NoiseSchedule {
    pub fn new(config: &SchedulerConfig, device: Device) -> Result<Self> {
        let s = DdpmScheduler::from_config(config)?;
        let ac = s.alphas_cumprod();
        let prediction = Prediction::parse(config.prediction_type.as_deref().unwrap_or("epsilon"))?;
        Ok(Self {
            alphas_cumprod: Tensor::from_slice(ac).to_device(device),
            num_train_timesteps: ac.len() as i64,
            prediction,
        })
    }

    fn gather(&self, timesteps: &Tensor, like: &Tensor) -> (Tensor, Tensor) {
        let a = self
            .alphas_cumprod
            .to_device(like.device())
            .index_select(0, &timesteps.to_kind(Kind::Int64).to_device(like.device()));
        let sa = a.sqrt().to_kind(like.kind());
        let sb = (-a + 1.0).sqrt().to_kind(like.kind());
        let mut shape = vec![-1i64];
        shape.extend(std::iter::repeat_n(1, like.dim() - 1));
        (sa.view(shape.as_slice()), sb.view(shape.as_slice()))
    }

    /// `sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε`, one timestep per batch item.
    pub fn add_noise(&self, x: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (sa, sb) = self.gather(timesteps, x);
        sa * x + sb * noise
    }

    /// `sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x` (the v-prediction target).
    pub fn velocity(&self, x: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (sa, sb) = self.gather(timesteps, x);
        sa * noise - sb * x
    }

    /// `compute_snr`: `(sqrt(ᾱ_t) / sqrt(1 − ᾱ_t))²` per timestep.
    pub fn snr(&self, timesteps: &Tensor) -> Tensor {
        let a = self.alphas_cumprod.index_select(
            0,
            &timesteps
                .to_kind(Kind::Int64)
                .to_device(self.alphas_cumprod.device()),
        );
        let alpha = a.sqrt();
        let sigma = (-a + 1.0).sqrt();
        (alpha / sigma).square()
    }

    /// The training target for `prediction`.
    pub fn target(
        &self,
        prediction: Prediction,
        x: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> Tensor {
        match prediction {
            Prediction::Epsilon => noise.shallow_clone(),
            Prediction::VPrediction => self.velocity(x, noise, timesteps),
        }
    }

    /// The script's loss: MSE (in f32), optionally min-SNR-γ weighted (arXiv 2303.09556 §3.4:
    /// `min(snr, γ) / snr` for epsilon, `/ (snr + 1)` for v-prediction).
    pub fn loss(
        &self,
        pred: &Tensor,
        target: &Tensor,
        timesteps: &Tensor,
        prediction: Prediction,
        snr_gamma: Option<f64>,
    ) -> Tensor {
        let pred = pred.to_kind(Kind::Float);
        let target = target.to_kind(Kind::Float);
        match snr_gamma {
            None => pred.mse_loss(&target, tch::Reduction::Mean),
            Some(g) => {
                let snr = self.snr(timesteps);
                let w = snr.clamp_max(g);
                let w = match prediction {
                    Prediction::Epsilon => w / &snr,
                    Prediction::VPrediction => w / (&snr + 1.0),
                };
                let per = (pred - target).square();
                let dims: Vec<i64> = (1..per.dim() as i64).collect();
                let per = per.mean_dim(dims.as_slice(), false, Kind::Float);
                let dev = per.device();
                (per * w.to_device(dev)).mean(Kind::Float)
            }
        }
    }
}
