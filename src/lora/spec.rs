//! `FILE[:WEIGHT]`: a LoRA file and the weight it is applied with, as users write it on the
//! command line, in prompt tags and through the C ABI; and the one check of a weight.

use std::path::PathBuf;

use crate::{Error, Result};

/// The largest |weight| a LoRA may be given (A1111 users go to ±2 or so; beyond this the weights
/// only overflow).
pub const MAX_LORA_WEIGHT: f32 = 1000.0;

/// A LoRA weight must be finite and within ±[`MAX_LORA_WEIGHT`] (the CLI's `FILE:W`, prompt tags
/// and the C ABI all check it here).
pub fn check_lora_weight(w: f32) -> std::result::Result<(), String> {
    if w.is_finite() && w.abs() <= MAX_LORA_WEIGHT {
        Ok(())
    } else {
        Err(format!("{w} is not a number within ±{MAX_LORA_WEIGHT}"))
    }
}

/// One LoRA file and its weight, as written on the command line: `FILE[:WEIGHT]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub weight: f32,
}

impl std::str::FromStr for LoraSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        // Split at the last ':' only when what follows is a number, so paths with ':' still work.
        if let Some((p, w)) = s.rsplit_once(':')
            && let Ok(weight) = w.parse::<f32>()
        {
            check_lora_weight(weight)
                .map_err(|m| Error::InvalidArgument(format!("LoRA weight in `{s}`: {m}")))?;
            return Ok(LoraSpec {
                path: PathBuf::from(p),
                weight,
            });
        }
        if s.is_empty() {
            return Err(Error::InvalidArgument(
                "empty LoRA argument (expected FILE[:WEIGHT])".into(),
            ));
        }
        Ok(LoraSpec {
            path: PathBuf::from(s),
            weight: 1.0,
        })
    }
}
