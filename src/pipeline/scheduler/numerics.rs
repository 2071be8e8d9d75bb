//! Bit-level emulation of the torch (CPU) and numpy operations diffusers 0.42.1 uses to build
//! noise schedules, so our schedules match its float32/float64 values exactly where that is
//! possible (see the notes on each function).
//!
//! Observed on torch 2.11.0 (AVX2 build, MKL) and numpy 2.4.6, and checked against them:
//! - `torch.linspace(a, b, n, dtype=float32)` computes `start + step*i` (first half) and
//!   `end - step*(n-1-i)` (second half) with one FMA each (the AVX2 kernel is built with FMA).
//! - `torch.cumprod` of a float32 tensor accumulates in float64 and rounds each prefix.
//! - torch float32 `sqrt`/`log`/`exp` go through MKL VML (`VML_HA`), which is *not* correctly
//!   rounded and depends on the CPU: on an AMD EPYC (AVX2) 21% of `sqrt` results are off by one
//!   ulp (error up to 0.75 ulp; `log` 9%, up to 0.86 ulp), on an Intel Xeon (AVX-512) 0.7%, and the
//!   two machines disagree on 19% of SD 1.5's sigma table. We use correctly rounded results
//!   (`f32::sqrt`, [`CorrectlyRounded`]); with those substituted into diffusers our schedules and
//!   steps are bit-identical to it (tests/schedulers.rs). This is the one known source of
//!   last-bit differences against diffusers.
//! - `np.log` on a float32 array uses numpy's own AVX2/AVX512F kernel (`simd_log_FLOAT` in
//!   `numpy/_core/src/umath/loops_exponent_log.dispatch.c.src`), ported in [`np_log_f32`].

/// torch float32 `log`/`exp` stand-ins: correctly rounded (through f64). torch's CPU results come
/// from MKL VML and are not correctly rounded (see the module docs), so no choice reproduces them
/// on every CPU; correct rounding is what diffusers computes wherever MKL is exact.
pub(crate) trait CorrectlyRounded {
    /// `ln(x)` rounded once to f32.
    fn ln_cr(self) -> f32;
    /// `exp(x)` rounded once to f32.
    fn exp_cr(self) -> f32;
}

impl CorrectlyRounded for f32 {
    fn ln_cr(self) -> f32 {
        f64::from(self).ln() as f32
    }
    fn exp_cr(self) -> f32 {
        f64::from(self).exp() as f32
    }
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on CPU
/// (`aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp`, `linspace_kernel`, FMA-contracted).
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    if steps == 0 {
        return Vec::new();
    }
    let start = start as f32;
    let end = end as f32;
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / ((steps - 1) as f32);
    let halfway = steps / 2;
    (0..steps)
        .map(|idx| {
            if idx < halfway {
                step.mul_add(idx as f32, start)
            } else {
                (-step).mul_add((steps - idx - 1) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod(x, 0)` for float32 on CPU: float64 accumulator, each prefix rounded to f32.
pub(crate) fn torch_cumprod_f32(x: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    x.iter()
        .map(|&v| {
            acc *= f64::from(v);
            acc as f32
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in float64 (`numpy/_core/function_base.py`):
/// `y = arange(num) * step + start`, last element set to `stop`.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f64> = if num > 1 && step == 0.0 {
        (0..num).map(|i| (i as f64 / div) * delta + start).collect()
    } else if num > 1 {
        (0..num).map(|i| i as f64 * step + start).collect()
    } else {
        vec![start]
    };
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` for float arguments: length `ceil((stop - start) / step)`,
/// `y[0] = start`, `y[1] = start + step`, `y[i] = start + i * (y[1] - y[0])` (numpy's `DOUBLE_fill`).
pub(crate) fn np_arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let next = start + step;
    let delta = next - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => next,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.round` / `ndarray.round()`: round half to even.
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, arange(len(fp)), fp)` in float64 (`numpy/_core/src/multiarray/compiled_base.c`,
/// `arr_interp`), for `xp = 0, 1, 2, ...`.
pub(crate) fn np_interp_arange(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if n == 0 {
        return f64::NAN;
    }
    if x.is_nan() {
        return x;
    }
    // binary_search_with_guess: index j with xp[j] <= x < xp[j+1]; -1 below, n above.
    if x < 0.0 {
        return fp[0];
    }
    if x > (n - 1) as f64 {
        return fp[n - 1];
    }
    let j = (x.floor() as usize).min(n - 1);
    if j == n - 1 {
        return fp[j];
    }
    let xj = j as f64;
    if xj == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / ((j + 1) as f64 - xj);
    let r = slope * (x - xj) + fp[j];
    if r.is_nan() {
        let r2 = slope * (x - (j + 1) as f64) + fp[j + 1];
        if r2.is_nan() && fp[j] == fp[j + 1] {
            return fp[j];
        }
        return r2;
    }
    r
}

const NPY_SQRT1_2F: f32 = std::f32::consts::FRAC_1_SQRT_2; // NPY_SQRT1_2f
const NPY_LOGE2F: f32 = std::f32::consts::LN_2; // NPY_LOGE2f
#[allow(clippy::excessive_precision)] // numpy's constants, verbatim
const LOG_P: [f32; 6] = [
    0.000000000000000000000e+00,
    9.999999999999998702752e-01,
    2.112677543073053063722e+00,
    1.480000633576506585156e+00,
    3.808837741388407920751e-01,
    2.589979117907922693523e-02,
];
#[allow(clippy::excessive_precision)]
const LOG_Q: [f32; 6] = [
    1.000000000000000000000e+00,
    2.612677543073109236779e+00,
    2.453006071784736363091e+00,
    9.864942958519418960339e-01,
    1.546476374983906719538e-01,
    5.875095403124574342950e-03,
];

/// `np.log` of a float32 value as numpy's SIMD kernel computes it (AVX2+FMA3 / AVX512F paths of
/// `simd_log_FLOAT`; the two agree for normal inputs): mantissa in [½, 1), doubled below √½,
/// rational minimax P5/Q5 for `log(1+x)`, plus `exponent·ln 2`, all with FMAs.
pub(crate) fn np_log_f32(x_in: f32) -> f32 {
    if x_in.is_nan() {
        return f32::NAN;
    }
    if x_in < 0.0 {
        return -f32::NAN;
    }
    if x_in == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x_in == f32::INFINITY {
        return f32::INFINITY;
    }
    // fma_get_exponent / fma_get_mantissa, including the denormal pre-scale by 2^100.
    let denormal = x_in < f32::MIN_POSITIVE;
    let x = if denormal {
        x_in * f32::from_bits(0x7180_0000)
    } else {
        x_in
    };
    let bits = x.to_bits();
    let mut exponent = ((bits >> 23) as i32 - 0x7E) as f32;
    if denormal {
        exponent -= 100.0;
    }
    let mut m = f32::from_bits((bits & 0x007f_ffff) | (126 << 23));
    if m <= NPY_SQRT1_2F {
        m += m;
        exponent -= 1.0;
    }
    let x = m - 1.0;
    let mut num = LOG_P[5].mul_add(x, LOG_P[4]);
    num = num.mul_add(x, LOG_P[3]);
    num = num.mul_add(x, LOG_P[2]);
    num = num.mul_add(x, LOG_P[1]);
    num = num.mul_add(x, LOG_P[0]);
    let mut den = LOG_Q[5].mul_add(x, LOG_Q[4]);
    den = den.mul_add(x, LOG_Q[3]);
    den = den.mul_add(x, LOG_Q[2]);
    den = den.mul_add(x, LOG_Q[1]);
    den = den.mul_add(x, LOG_Q[0]);
    exponent.mul_add(NPY_LOGE2F, num / den)
}

/// diffusers' `_sigma_to_t(sigma, log_sigmas)` for one float64 sigma against the float32
/// `log_sigmas` table (`scheduling_euler_discrete.py` and copies): float64 except `low - high`,
/// which numpy computes in float32.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // cumsum(dists >= 0).argmax(): the last index with log_sigmas[i] <= log_sigma, else 0.
    let mut low_idx = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - f64::from(ls) >= 0.0 {
            low_idx = i;
        }
    }
    low_idx = low_idx.min(n.saturating_sub(2));
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = (f64::from(low) - log_sigma) / f64::from(low - high);
    let w = w.clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// diffusers' `_convert_to_karras` (rho = 7) in float64.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let ramp = np_linspace(0.0, 1.0, n);
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    ramp.iter()
        .map(|&r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// diffusers' `_convert_to_exponential`: `exp(linspace(log(sigma_max), log(sigma_min), n))`.
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// The float32 sigma table `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`, ascending in t.
pub(crate) fn sigma_table(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn np_linspace_endpoints() {
        let v = np_linspace(0.0, 999.0, 4);
        assert_eq!(v, vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(np_linspace(1.0, 1.0, 3), vec![1.0, 1.0, 1.0]);
    }

    #[test]
    fn np_arange_trailing() {
        let v = np_arange_f64(1000.0, 0.0, -250.0);
        assert_eq!(v, vec![1000.0, 750.0, 500.0, 250.0]);
        assert_eq!(np_arange_f64(1000.0, 0.0, -1000.0 / 3.0).len(), 3);
    }

    #[test]
    fn interp_on_grid_is_exact() {
        let fp = [1.0, 2.0, 4.0];
        assert_eq!(np_interp_arange(1.0, &fp), 2.0);
        assert_eq!(np_interp_arange(1.5, &fp), 3.0);
        assert_eq!(np_interp_arange(-1.0, &fp), 1.0);
        assert_eq!(np_interp_arange(9.0, &fp), 4.0);
    }

    #[test]
    fn np_log_close_to_ln() {
        for &x in &[1e-30f32, 0.001, 0.5, 0.75, 1.0, 2.0, 14.6, 1e30] {
            let a = np_log_f32(x);
            let b = x.ln();
            assert!(
                (a - b).abs() <= 4.0 * f32::EPSILON * b.abs().max(1.0),
                "{x}: {a} vs {b}"
            );
        }
        assert_eq!(np_log_f32(0.0), f32::NEG_INFINITY);
        assert!(np_log_f32(-1.0).is_nan());
    }

    #[test]
    fn torch_linspace_ends() {
        let v = torch_linspace_f32(0.0001, 0.02, 1000);
        assert_eq!(v[0], 0.0001f32);
        assert_eq!(v[999], 0.02f32);
        assert_eq!(torch_linspace_f32(3.0, 5.0, 1), vec![3.0]);
    }
}
