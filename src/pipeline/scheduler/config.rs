//! `scheduler/scheduler_config.json` with diffusers' field names and `from_config` semantics
//! (diffusers 0.42.1 `configuration_utils.py`, `ConfigMixin.extract_init_dict`).
//!
//! Every field is optional: a key present in the file is used by each scheduler class that has
//! that `__init__` parameter, and a missing key takes *that class's* default, exactly as
//! `EulerDiscreteScheduler.from_config(pndm_config)` does (so SD 1.5's file, which has no
//! `timestep_spacing`, gives PNDM "leading" but Euler "linspace"). Keys listed in
//! `_use_default_values` are dropped, unknown keys are ignored, and Python's non-standard JSON
//! numbers (`-Infinity`, `Infinity`, `NaN`, written for `lambda_min_clipped`) are accepted.

use std::path::Path;

use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};

/// A diffusers scheduler config. Fields mirror `__init__` parameters of the supported classes;
/// `None` means "not in the file": each scheduler then applies its own default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// `_class_name`: the scheduler the pipeline was saved with (picks the default kind).
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    #[serde(deserialize_with = "de_opt_f64")]
    pub beta_start: Option<f64>,
    #[serde(deserialize_with = "de_opt_f64")]
    pub beta_end: Option<f64>,
    /// `linear`, `scaled_linear`, `squaredcos_cap_v2` (DDPM also `sigmoid`, `laplace`).
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub steps_offset: Option<i64>,
    /// `leading`, `trailing`, `linspace`.
    pub timestep_spacing: Option<String>,
    /// `epsilon`, `v_prediction`, `sample`.
    pub prediction_type: Option<String>,
    pub rescale_betas_zero_snr: Option<bool>,
    // DDIM / PNDM / DDPM
    pub set_alpha_to_one: Option<bool>,
    pub skip_prk_steps: Option<bool>,
    pub clip_sample: Option<bool>,
    #[serde(deserialize_with = "de_opt_f64")]
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    /// DDPM `fixed_small`, `fixed_small_log`, `fixed_large`, `fixed_large_log` (and DPM's
    /// `learned`/`learned_range`, unsupported).
    pub variance_type: Option<String>,
    // Euler / LMS / DPM sigma schedules
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    #[serde(deserialize_with = "de_opt_f64")]
    pub sigma_min: Option<f64>,
    #[serde(deserialize_with = "de_opt_f64")]
    pub sigma_max: Option<f64>,
    /// `zero` or `sigma_min`.
    pub final_sigmas_type: Option<String>,
    /// Euler: `linear` or `log_linear`.
    pub interpolation_type: Option<String>,
    /// Euler: `discrete` or `continuous`.
    pub timestep_type: Option<String>,
    // DPM-Solver multistep
    pub solver_order: Option<usize>,
    /// `dpmsolver++`, `dpmsolver`, `sde-dpmsolver++`, `sde-dpmsolver`.
    pub algorithm_type: Option<String>,
    /// `midpoint` or `heun`.
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    #[serde(deserialize_with = "de_opt_f64")]
    pub lambda_min_clipped: Option<f64>,
}

/// Accepts a number, `null`, or the strings our JSON sanitiser writes for Python's
/// `Infinity`/`-Infinity`/`NaN`.
fn de_opt_f64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(f64),
        Str(String),
    }
    match Option::<NumOrStr>::deserialize(d)? {
        None => Ok(None),
        Some(NumOrStr::Num(v)) => Ok(Some(v)),
        Some(NumOrStr::Str(s)) => match s.as_str() {
            "Infinity" | "inf" => Ok(Some(f64::INFINITY)),
            "-Infinity" | "-inf" => Ok(Some(f64::NEG_INFINITY)),
            "NaN" | "nan" => Ok(Some(f64::NAN)),
            _ => s
                .parse::<f64>()
                .map(Some)
                .map_err(|_| serde::de::Error::custom(format!("expected a number, got {s:?}"))),
        },
    }
}

/// Python's `json.dumps` writes `Infinity`, `-Infinity` and `NaN` bare; quote them so serde_json
/// can read the file (strings are left untouched).
fn quote_python_specials(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_str = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_str = true;
            out.push(c);
            rest = &rest[1..];
            continue;
        }
        let mut matched = false;
        for tok in ["-Infinity", "Infinity", "NaN"] {
            if rest.starts_with(tok) {
                out.push('"');
                out.push_str(tok);
                out.push('"');
                rest = &rest[tok.len()..];
                matched = true;
                break;
            }
        }
        if !matched {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

impl SchedulerConfig {
    /// Read `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = crate::files::read_text(path, crate::layout::MAX_CONFIG_BYTES)?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::Config { msg, .. } => Error::Config {
                file: path.to_path_buf(),
                msg,
            },
            other => other,
        })
    }

    /// Parse the JSON text of a scheduler config.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg_err = |msg: String| Error::Config {
            file: "scheduler_config.json".into(),
            msg,
        };
        let mut value: serde_json::Value = serde_json::from_str(&quote_python_specials(text))
            .map_err(|e| cfg_err(e.to_string()))?;
        let obj = value
            .as_object_mut()
            .ok_or_else(|| cfg_err("expected a JSON object".to_owned()))?;
        // extract_init_dict: keys that took default values in the saving class are not carried over.
        if let Some(serde_json::Value::Array(defaults)) = obj.remove("_use_default_values") {
            for k in defaults.iter().filter_map(|k| k.as_str()) {
                obj.remove(k);
            }
        }
        serde_json::from_value(value).map_err(|e| cfg_err(e.to_string()))
    }

    /// SD 1.5's `scheduler/scheduler_config.json` (runwayml/stable-diffusion-v1-5, verbatim).
    pub fn sd15() -> Self {
        SchedulerConfig {
            class_name: Some("PNDMScheduler".into()),
            num_train_timesteps: Some(1000),
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some("scaled_linear".into()),
            trained_betas: None,
            steps_offset: Some(1),
            set_alpha_to_one: Some(false),
            skip_prk_steps: Some(true),
            clip_sample: Some(false),
            ..Default::default()
        }
    }

    /// The scheduler `_class_name` names, if it is one we implement.
    pub fn default_kind(&self) -> Option<super::SchedulerKind> {
        self.class_name
            .as_deref()
            .and_then(super::SchedulerKind::from_class_name)
    }
}

/// Resolved common settings, with a class's defaults filled in.
#[derive(Debug, Clone)]
pub(crate) struct Common {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    pub steps_offset: i64,
    pub timestep_spacing: Spacing,
    pub prediction_type: Prediction,
    pub rescale_betas_zero_snr: bool,
}

/// Per-class defaults of the common `__init__` parameters.
/// The largest `num_train_timesteps` a scheduler config may give (SD uses 1000; the schedule's
/// tables are allocated from it).
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

pub(crate) struct Defaults {
    pub timestep_spacing: &'static str,
    /// Whether the class has a `rescale_betas_zero_snr` parameter (PNDM and LMS do not).
    pub has_rescale: bool,
}

impl Common {
    pub fn resolve(c: &SchedulerConfig, d: Defaults) -> Result<Self> {
        let n = c.num_train_timesteps.unwrap_or(1000);
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&n) {
            return Err(Error::InvalidArgument(format!(
                "num_train_timesteps must be 2 to {MAX_TRAIN_TIMESTEPS}, got {n}"
            )));
        }
        if let Some(tb) = &c.trained_betas
            && tb.len() != n
        {
            return Err(Error::InvalidArgument(format!(
                "trained_betas has {} entries but num_train_timesteps is {n}",
                tb.len()
            )));
        }
        Ok(Common {
            num_train_timesteps: n,
            beta_start: c.beta_start.unwrap_or(0.0001),
            beta_end: c.beta_end.unwrap_or(0.02),
            beta_schedule: c.beta_schedule.clone().unwrap_or_else(|| "linear".into()),
            trained_betas: c.trained_betas.clone(),
            steps_offset: c.steps_offset.unwrap_or(0),
            timestep_spacing: Spacing::parse(
                c.timestep_spacing.as_deref().unwrap_or(d.timestep_spacing),
            )?,
            prediction_type: Prediction::parse(c.prediction_type.as_deref().unwrap_or("epsilon"))?,
            rescale_betas_zero_snr: d.has_rescale && c.rescale_betas_zero_snr.unwrap_or(false),
        })
    }
}

/// `timestep_spacing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

impl Spacing {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "linspace" => Ok(Spacing::Linspace),
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            _ => Err(Error::InvalidArgument(format!(
                "timestep_spacing {s:?} is not supported (linspace, leading, trailing)"
            ))),
        }
    }
}

/// `prediction_type`.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

impl Prediction {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::VPrediction),
            "sample" | "original_sample" => Ok(Prediction::Sample),
            _ => Err(Error::InvalidArgument(format!(
                "prediction_type {s:?} is not supported (epsilon, v_prediction, sample)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_specials_and_defaults() {
        let cfg = SchedulerConfig::from_json_str(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                "note": "NaN stays a string", "timestep_spacing": "leading", "solver_order": 2,
                "_use_default_values": ["timestep_spacing"], "unknown_key": [1, 2]}"#,
        )
        .expect("config");
        assert_eq!(cfg.lambda_min_clipped, Some(f64::NEG_INFINITY));
        assert_eq!(cfg.timestep_spacing, None);
        assert_eq!(cfg.solver_order, Some(2));
        assert_eq!(
            cfg.default_kind(),
            Some(super::super::SchedulerKind::DpmSolverMultistep)
        );
    }

    #[test]
    fn nulls_are_missing() {
        let cfg = SchedulerConfig::from_json_str(r#"{"trained_betas": null, "sigma_min": null}"#)
            .expect("config");
        assert_eq!(cfg.trained_betas, None);
        assert_eq!(cfg.sigma_min, None);
    }
}
