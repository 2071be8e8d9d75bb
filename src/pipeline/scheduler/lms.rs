//! `LMSDiscreteScheduler`, ported from diffusers 0.42.1
//! `src/diffusers/schedulers/scheduling_lms_discrete.py`
//! (https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_lms_discrete.py).
//! Linear multistep (order ≤ 4) in sigma space. diffusers integrates each Lagrange basis
//! polynomial with `scipy.integrate.quad(f, sigma_t, sigma_{t+1}, epsrel=1e-4)`, evaluating the
//! integrand with float32 torch scalars; QUADPACK's `qags` accepts its first 21-point
//! Gauss–Kronrod estimate for these low-degree polynomials, which is what [`qk21`] computes
//! (same node order and summation as QUADPACK `dqk21`), with the integrand in float32 as there.

use super::config::{Common, Defaults, SchedulerConfig};
use super::euler::{
    SigmaSpacing, add_noise_sigmas, euler_family_timesteps, interp_sigmas, pred_original,
    scale_by_sigma, sigma_init_noise,
};
use super::numerics::{exponential_sigmas, karras_sigmas, np_log_f32, sigma_table, sigma_to_t};
use super::schedule::{BetaSet, alphas_cumprod, betas};
use super::{Scheduler, SchedulerKind, check_len, check_step_index};
use crate::error::{Error, Result};

#[allow(clippy::excessive_precision)] // QUADPACK's constants, verbatim
/// Kronrod nodes `xgk` (QUADPACK `dqk21`): odd indices (0-based) are the 10-point Gauss nodes.
const XGK: [f64; 11] = [
    0.995657163025808080735527280689003,
    0.973906528517171720077964012084452,
    0.930157491355708226001207180059508,
    0.865063366688984510732096688423493,
    0.780817726586416897063717578345042,
    0.679409568299024406234327365114874,
    0.562757134668604683339000099272694,
    0.433395394129247190799265943165784,
    0.294392862701460198131126603103866,
    0.148874338981631210884826001129720,
    0.000000000000000000000000000000000,
];
/// Kronrod weights `wgk`.
#[allow(clippy::excessive_precision)]
const WGK: [f64; 11] = [
    0.011694638867371874278064396062192,
    0.032558162307964727478818972459390,
    0.054755896574351996031381300244580,
    0.075039674810919952767043140916190,
    0.093125454583697605535065465083366,
    0.109387158802297641899210590325805,
    0.123491976262065851077208980759891,
    0.134709217311473325928054001771707,
    0.142775938577060080797094273138717,
    0.147739104901338491374841515972068,
    0.149445554002916905664936468389821,
];
/// 10-point Gauss weights `wg`.
#[allow(clippy::excessive_precision)]
const WG: [f64; 5] = [
    0.066671344308688137593568809893332,
    0.149451349150580593145776339657697,
    0.219086362515982043995534934228163,
    0.269266719309996355091226921569469,
    0.295524224714752870173892994651338,
];

/// QUADPACK `dqk21` on `[a, b]`: `(result, abserr)`.
pub(crate) fn qk21(f: impl Fn(f64) -> f64, a: f64, b: f64) -> (f64, f64) {
    let epmach = f64::EPSILON;
    let uflow = f64::MIN_POSITIVE;
    let centr = 0.5 * (a + b);
    let hlgth = 0.5 * (b - a);
    let dhlgth = hlgth.abs();
    let mut resg = 0.0;
    let fc = f(centr);
    let mut resk = WGK[10] * fc;
    let mut resabs = resk.abs();
    let mut fv1 = [0.0f64; 10];
    let mut fv2 = [0.0f64; 10];
    for j in 1..=5 {
        let jtw = 2 * j; // Fortran index
        let absc = hlgth * XGK[jtw - 1];
        let fval1 = f(centr - absc);
        let fval2 = f(centr + absc);
        fv1[jtw - 1] = fval1;
        fv2[jtw - 1] = fval2;
        let fsum = fval1 + fval2;
        resg += WG[j - 1] * fsum;
        resk += WGK[jtw - 1] * fsum;
        resabs += WGK[jtw - 1] * (fval1.abs() + fval2.abs());
    }
    for j in 1..=5 {
        let jtwm1 = 2 * j - 1;
        let absc = hlgth * XGK[jtwm1 - 1];
        let fval1 = f(centr - absc);
        let fval2 = f(centr + absc);
        fv1[jtwm1 - 1] = fval1;
        fv2[jtwm1 - 1] = fval2;
        let fsum = fval1 + fval2;
        resk += WGK[jtwm1 - 1] * fsum;
        resabs += WGK[jtwm1 - 1] * (fval1.abs() + fval2.abs());
    }
    let reskh = resk * 0.5;
    let mut resasc = WGK[10] * (fc - reskh).abs();
    for j in 0..10 {
        resasc += WGK[j] * ((fv1[j] - reskh).abs() + (fv2[j] - reskh).abs());
    }
    let result = resk * hlgth;
    resabs *= dhlgth;
    resasc *= dhlgth;
    let mut abserr = ((resk - resg) * hlgth).abs();
    if resasc != 0.0 && abserr != 0.0 {
        abserr = resasc * (200.0 * abserr / resasc).powf(1.5).min(1.0);
    }
    if resabs > uflow / (50.0 * epmach) {
        abserr = (epmach * 50.0 * resabs).max(abserr);
    }
    (result, abserr)
}

/// `scipy.integrate.quad(f, a, b, epsrel=1e-4)[0]` for the smooth low-degree integrands used
/// here: the first `dqk21` estimate when QUADPACK `dqagse` accepts it, else adaptive bisection
/// with `dqk21` (no extrapolation; never needed for LMS's polynomials).
fn quad(f: &dyn Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    let (epsabs, epsrel) = (1.49e-8f64, 1e-4f64);
    let (result, abserr) = qk21(f, a, b);
    let errbnd = epsabs.max(epsrel * result.abs());
    if abserr <= errbnd || abserr == 0.0 {
        return result;
    }
    // At most QUADPACK's default of 50 subintervals (scipy's `limit=50`): sigmas from a hostile
    // config (NaN, equal, huge) make the error estimate useless, and unbounded bisection would
    // evaluate ~2^30 rules.
    fn adapt(f: &dyn Fn(f64) -> f64, a: f64, b: f64, tol: f64, budget: &mut u32) -> f64 {
        let (r, e) = qk21(f, a, b);
        if e <= tol || !e.is_finite() || *budget < 2 {
            return r;
        }
        *budget -= 2;
        let m = 0.5 * (a + b);
        adapt(f, a, m, tol / 2.0, budget) + adapt(f, m, b, tol / 2.0, budget)
    }
    adapt(f, a, b, errbnd, &mut 50)
}

/// diffusers' `LMSDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct LmsDiscreteScheduler {
    common: Common,
    spacing: SigmaSpacing,
    alphas_cumprod: Vec<f32>,
    num_inference_steps: usize,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    derivatives: Vec<Vec<f32>>,
    step_index: usize,
}

const LMS_ORDER: usize = 4;

impl LmsDiscreteScheduler {
    /// `LMSDiscreteScheduler.from_config(config)` (its `__init__` runs `set_timesteps(T)`).
    pub fn from_config(c: &SchedulerConfig) -> Result<Self> {
        let common = Common::resolve(
            c,
            Defaults {
                timestep_spacing: "linspace",
                has_rescale: false,
            },
        )?;
        let spacing = SigmaSpacing::from_config(c, "LMSDiscreteScheduler")?;
        let b = betas(&common, BetaSet::Standard, "LMSDiscreteScheduler")?;
        let alphas_cumprod = alphas_cumprod(&b);
        let t = common.num_train_timesteps;
        let mut s = Self {
            common,
            spacing,
            alphas_cumprod,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            derivatives: Vec::new(),
            step_index: 0,
        };
        s.set_timesteps(t)?;
        Ok(s)
    }

    /// `alphas_cumprod` (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// `get_lms_coefficient(order, t, current_order)`.
    fn lms_coefficient(&self, order: usize, t: usize, current_order: usize) -> f64 {
        let s = &self.sigmas;
        let integrand = |tau: f64| -> f64 {
            // prod = 1.0; prod *= (tau - s[t-k]) / (s[t-cur] - s[t-k]) with float32 torch scalars
            let mut prod: Option<f32> = None;
            for k in 0..order {
                if current_order == k {
                    continue;
                }
                let factor = (tau as f32 - s[t - k]) / (s[t - current_order] - s[t - k]);
                prod = Some(match prod {
                    None => 1.0 * factor,
                    Some(p) => p * factor,
                });
            }
            prod.map_or(1.0, f64::from)
        };
        quad(&integrand, f64::from(s[t]), f64::from(s[t + 1]))
    }
}

impl Scheduler for LmsDiscreteScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Lms
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
        self.num_inference_steps = n;
        let mut timesteps = euler_family_timesteps(&self.common, n);
        let table = sigma_table(&self.alphas_cumprod);
        let log_sigmas: Vec<f32> = table.iter().map(|&s| np_log_f32(s)).collect();
        let mut sigmas = interp_sigmas(&timesteps, &table);
        if self.spacing != SigmaSpacing::Interp {
            let (Some(&first), Some(&last)) = (sigmas.first(), sigmas.last()) else {
                return Err(Error::InvalidArgument("empty sigma schedule".into()));
            };
            sigmas = if self.spacing == SigmaSpacing::Karras {
                karras_sigmas(last, first, self.num_inference_steps)
            } else {
                exponential_sigmas(last, first, n)
            };
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
                .collect();
        }
        let mut s32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        s32.push(0.0);
        self.sigmas = s32;
        self.timesteps = timesteps;
        self.derivatives.clear();
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
        if step_index != self.step_index {
            return Err(Error::InvalidArgument(format!(
                "LMSDiscreteScheduler is multistep: expected step_index {}, got {step_index}",
                self.step_index
            )));
        }
        let sigma = self.sigmas[step_index];
        let x0 = pred_original(self.common.prediction_type, sigma, sample, model_output);
        let derivative: Vec<f32> = sample
            .iter()
            .zip(&x0)
            .map(|(&s, &p)| (s - p) / sigma)
            .collect();
        self.derivatives.push(derivative);
        if self.derivatives.len() > LMS_ORDER {
            self.derivatives.remove(0);
        }
        let order = (step_index + 1).min(LMS_ORDER);
        let coeffs: Vec<f32> = (0..order)
            .map(|c| self.lms_coefficient(order, step_index, c) as f32)
            .collect();
        let mut acc: Option<Vec<f32>> = None;
        for (coeff, d) in coeffs.iter().zip(self.derivatives.iter().rev()) {
            match acc.as_mut() {
                None => acc = Some(d.iter().map(|&v| coeff * v).collect()),
                Some(a) => {
                    for (x, &v) in a.iter_mut().zip(d) {
                        *x += coeff * v;
                    }
                }
            }
        }
        self.step_index += 1;
        Ok(match acc {
            Some(a) => sample.iter().zip(&a).map(|(&s, &v)| s + v).collect(),
            None => sample.to_vec(),
        })
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timesteps: &[f32]) -> Result<Vec<f32>> {
        add_noise_sigmas(&self.timesteps, &self.sigmas, original, noise, timesteps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kronrod_constants_integrate_polynomials() {
        // 21-point Kronrod is exact to degree 31, the embedded 10-point Gauss to degree 19.
        for deg in [0usize, 1, 2, 5, 10, 19, 30] {
            let exact = if deg % 2 == 1 {
                0.0
            } else {
                2.0 / (deg as f64 + 1.0)
            };
            let (r, _) = qk21(|x| x.powi(deg as i32), -1.0, 1.0);
            assert!((r - exact).abs() < 1e-14, "deg {deg}: {r} vs {exact}");
            let mut g = 0.0;
            for j in 0..5 {
                let x = XGK[2 * j + 1];
                g += WG[j] * (x.powi(deg as i32) + (-x).powi(deg as i32));
            }
            if deg <= 19 {
                assert!((g - exact).abs() < 1e-14, "gauss deg {deg}: {g} vs {exact}");
            }
        }
    }

    #[test]
    fn quad_gives_up_on_hostile_integrands() {
        // Found by the scheduler_config fuzz target: a config whose sigmas make the LMS
        // integrand NaN or singular bisected ~2^30 times (a hang). Now at most 50 subintervals.
        let t = std::time::Instant::now();
        assert!(quad(&|_| f64::NAN, 0.0, 1.0).is_nan());
        let _ = quad(&|x| 1.0 / (x - 0.5), 0.0, 1.0);
        let _ = quad(&|x| (1.0 / x).sin(), 0.0, 1.0);
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn quad_of_line() {
        let r = quad(&|x| 3.0 * x + 1.0, 2.0, 0.5);
        assert!((r - (-(1.5 * 4.0 + 2.0) + (1.5 * 0.25 + 0.5))).abs() < 1e-12);
    }
}
