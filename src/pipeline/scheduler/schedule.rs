//! The training noise schedule shared by every scheduler: `betas`, `alphas_cumprod`, as the
//! `__init__` of each diffusers 0.42.1 scheduler builds them (torch float32 tensors), and the
//! zero-terminal-SNR rescale (`rescale_zero_terminal_snr`, `scheduling_ddim.py`).

use super::config::{Common, Spacing};
use super::numerics::CorrectlyRounded;
use super::numerics::{
    np_arange_f64, np_linspace, np_round, torch_cumprod_f32, torch_linspace_f32,
};
use crate::error::{Error, Result};

/// `betas_for_alpha_bar` (`scheduling_ddpm.py` and copies): Python float64 math, then
/// `torch.tensor(betas, dtype=torch.float32)`.
fn betas_for_alpha_bar(n: usize, transform: AlphaBar) -> Vec<f32> {
    let max_beta = 0.999f64;
    let alpha_bar = |t: f64| -> f64 {
        match transform {
            AlphaBar::Cosine => {
                let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
                c * c
            }
            AlphaBar::Laplace => {
                let lmb = -0.5 * 1f64.copysign(0.5 - t) * (1.0 - 2.0 * (0.5 - t).abs() + 1e-6).ln();
                let snr = lmb.exp();
                (snr / (1.0 + snr)).sqrt()
            }
        }
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta) as f32
        })
        .collect()
}

#[derive(Clone, Copy)]
enum AlphaBar {
    Cosine,
    Laplace,
}

/// Which extra `beta_schedule` values a class accepts (DDPM knows `sigmoid` and `laplace`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum BetaSet {
    Standard,
    Ddpm,
}

/// `self.betas` of the scheduler `__init__`, including `rescale_betas_zero_snr` when asked.
pub(crate) fn betas(c: &Common, set: BetaSet, class: &str) -> Result<Vec<f32>> {
    let n = c.num_train_timesteps;
    let betas = if let Some(tb) = &c.trained_betas {
        tb.iter().map(|&b| b as f32).collect()
    } else {
        match c.beta_schedule.as_str() {
            "linear" => torch_linspace_f32(c.beta_start, c.beta_end, n),
            "scaled_linear" => torch_linspace_f32(c.beta_start.powf(0.5), c.beta_end.powf(0.5), n)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            "squaredcos_cap_v2" => betas_for_alpha_bar(n, AlphaBar::Cosine),
            "laplace" if set == BetaSet::Ddpm => betas_for_alpha_bar(n, AlphaBar::Laplace),
            "sigmoid" if set == BetaSet::Ddpm => {
                // torch.sigmoid(torch.linspace(-6, 6, n)) * (beta_end - beta_start) + beta_start;
                // torch's float32 sigmoid is vectorised (not bit-reproduced here).
                let scale = (c.beta_end - c.beta_start) as f32;
                let start = c.beta_start as f32;
                torch_linspace_f32(-6.0, 6.0, n)
                    .into_iter()
                    .map(|x| (1.0 / (1.0 + (-x).exp_cr())) * scale + start)
                    .collect()
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "beta_schedule {other:?} is not implemented for {class}"
                )));
            }
        }
    };
    Ok(if c.rescale_betas_zero_snr {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    })
}

/// `alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)`.
pub(crate) fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|&b| 1.0 - b).collect();
    torch_cumprod_f32(&alphas)
}

/// `rescale_zero_terminal_snr(betas)` (arXiv:2305.08891, algorithm 1), in float32 as torch does.
pub(crate) fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let ac = alphas_cumprod(betas);
    let mut s: Vec<f32> = ac.iter().map(|&a| a.sqrt()).collect();
    let (Some(&s0), Some(&st)) = (s.first(), s.last()) else {
        return betas.to_vec();
    };
    let scale = s0 / (s0 - st);
    for v in &mut s {
        *v -= st;
        *v *= scale;
    }
    let bar: Vec<f32> = s.iter().map(|&v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// `add_noise` of the alpha-parameterised schedulers (DDPM, DDIM, PNDM):
/// `alphas_cumprod[t] ** 0.5 * original + (1 - alphas_cumprod[t]) ** 0.5 * noise`.
pub(crate) fn add_noise_alphas(
    alphas_cumprod: &[f32],
    original: &[f32],
    noise: &[f32],
    timesteps: &[f32],
) -> Result<Vec<f32>> {
    super::check_len("noise", noise.len(), original.len())?;
    let (per, ts) = super::per_item(original.len(), timesteps)?;
    let mut out = Vec::with_capacity(original.len());
    for (b, &t) in ts.iter().enumerate() {
        let a = alphas_cumprod[super::train_index(t, alphas_cumprod.len())?];
        let sa = a.sqrt();
        let sb = (1.0 - a).sqrt();
        let r = b * per..(b + 1) * per;
        out.extend(
            original[r.clone()]
                .iter()
                .zip(&noise[r])
                .map(|(&x, &n)| sa * x + sb * n),
        );
    }
    Ok(out)
}

/// `get_velocity(sample, noise, timesteps)` (DDPM, DDIM): `sqrt(a) * noise - sqrt(1 - a) * sample`.
pub(crate) fn velocity_alphas(
    alphas_cumprod: &[f32],
    sample: &[f32],
    noise: &[f32],
    timesteps: &[f32],
) -> Result<Vec<f32>> {
    super::check_len("noise", noise.len(), sample.len())?;
    let (per, ts) = super::per_item(sample.len(), timesteps)?;
    let mut out = Vec::with_capacity(sample.len());
    for (b, &t) in ts.iter().enumerate() {
        let a = alphas_cumprod[super::train_index(t, alphas_cumprod.len())?];
        let sa = a.sqrt();
        let sb = (1.0 - a).sqrt();
        let r = b * per..(b + 1) * per;
        out.extend(
            sample[r.clone()]
                .iter()
                .zip(&noise[r])
                .map(|(&x, &n)| sa * n - sb * x),
        );
    }
    Ok(out)
}

/// The integer inference timesteps, descending, of DDIM/DDPM's `set_timesteps`
/// (`scheduling_ddim.py`; PNDM's `_timesteps` are the same, ascending) per `timestep_spacing`,
/// after checking `1 <= n <= num_train_timesteps`.
pub(crate) fn spaced_timesteps(c: &Common, n: usize) -> Result<Vec<i64>> {
    let t = c.num_train_timesteps;
    if n == 0 || n > t {
        return Err(Error::InvalidArgument(format!(
            "num_inference_steps must be in 1..={t}, got {n}"
        )));
    }
    Ok(match c.timestep_spacing {
        Spacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|v| np_round(v) as i64)
            .collect(),
        Spacing::Leading => {
            let ratio = (t / n) as i64;
            (0..n as i64)
                .rev()
                .map(|i| i * ratio + c.steps_offset)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = t as f64 / n as f64;
            np_arange_f64(t as f64, 0.0, -ratio)
                .into_iter()
                .map(|x| np_round(x) as i64 - 1)
                .collect()
        }
    })
}
