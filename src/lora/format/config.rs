//! Where a dotted-key file's scale comes from: PEFT's `LoraConfig` (an `adapter_config.json` or
//! diffusers' `lora_adapter_metadata` header), matched per module as PEFT does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::*;
use crate::weights::{Component, WeightFile};
use crate::{Error, Result};

/// The scale-relevant part of a PEFT `LoraConfig`.
#[derive(Debug, Clone, Default)]
pub struct PeftConfig {
    pub r: Option<f64>,
    pub lora_alpha: Option<f64>,
    pub rank_pattern: Vec<(String, f64)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub use_rslora: bool,
    pub use_dora: bool,
}

impl PeftConfig {
    /// From a JSON object holding LoraConfig fields, optionally under `<prefix>.` keys
    /// (diffusers' `lora_adapter_metadata` packs `unet.r`, `text_encoder.lora_alpha`, ...).
    /// `None` when no field is present.
    pub fn from_json(
        obj: &serde_json::Map<String, serde_json::Value>,
        prefix: Option<&str>,
    ) -> Option<Self> {
        let get = |k: &str| match prefix {
            Some(p) => obj.get(&format!("{p}.{k}")),
            None => obj.get(k),
        };
        let num = |k: &str| get(k).and_then(serde_json::Value::as_f64);
        let pat = |k: &str| -> Vec<(String, f64)> {
            match get(k) {
                Some(serde_json::Value::Object(m)) => m
                    .iter()
                    .filter_map(|(p, v)| v.as_f64().map(|v| (p.clone(), v)))
                    .collect(),
                _ => Vec::new(),
            }
        };
        let flag = |k: &str| get(k).and_then(serde_json::Value::as_bool).unwrap_or(false);
        let cfg = Self {
            r: num("r"),
            lora_alpha: num("lora_alpha"),
            rank_pattern: pat("rank_pattern"),
            alpha_pattern: pat("alpha_pattern"),
            use_rslora: flag("use_rslora"),
            use_dora: flag("use_dora"),
        };
        let any = cfg.r.is_some()
            || cfg.lora_alpha.is_some()
            || !cfg.rank_pattern.is_empty()
            || !cfg.alpha_pattern.is_empty();
        any.then_some(cfg)
    }

    /// `(r, alpha)` for module `name` (its name in the component model), as PEFT's
    /// `_create_and_replace` picks them; `actual_rank` fills a missing `r`.
    pub fn r_alpha(&self, name: &str, actual_rank: usize) -> (f64, f64) {
        let r = pattern_value(&self.rank_pattern, name)
            .or(self.r)
            .unwrap_or(actual_rank as f64);
        let alpha = pattern_value(&self.alpha_pattern, name)
            .or(self.lora_alpha)
            .unwrap_or(r);
        (r, alpha)
    }

    pub(super) fn scale(&self, r: f64, alpha: f64) -> f64 {
        if r == 0.0 {
            return 1.0;
        }
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

/// PEFT `get_pattern_key`: the first pattern `p` with `^(.*\.)?(p)$` matching `name`.
fn pattern_value(patterns: &[(String, f64)], name: &str) -> Option<f64> {
    patterns.iter().find_map(|(p, v)| {
        let hit = match regex::Regex::new(&format!(r"^(?:.*\.)?(?:{p})$")) {
            Ok(re) => re.is_match(name),
            Err(_) => name == p || name.ends_with(&format!(".{p}")),
        };
        hit.then_some(*v)
    })
}

fn parse_json_object(text: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// Sibling adapter_config.json candidates of a PEFT weight file.
fn find_adapter_config(path: &Path) -> Option<PathBuf> {
    let dir = path.parent()?;
    let stem = path.file_stem()?.to_string_lossy();
    [
        format!("{stem}_adapter_config.json"),
        format!("{stem}.adapter_config.json"),
        "adapter_config.json".to_string(),
    ]
    .into_iter()
    .map(|n| dir.join(n))
    .find(|p| p.is_file())
}

/// Where alpha comes from for a dotted-key (diffusers / PEFT / attn-procs) file.
pub(super) enum ConfigSource {
    /// Per component (diffusers `lora_adapter_metadata` with `unet.` / `text_encoder.` keys).
    PerComponent(HashMap<Component, PeftConfig>),
    /// One config for every module (PEFT adapter_config.json, `save_lora_adapter` metadata).
    Global(PeftConfig),
    None,
}

impl ConfigSource {
    pub(super) fn get(&self, c: Component) -> Option<&PeftConfig> {
        match self {
            ConfigSource::PerComponent(m) => m.get(&c),
            ConfigSource::Global(cfg) => Some(cfg),
            ConfigSource::None => None,
        }
    }
}

pub(super) fn load_config_source(
    file: &WeightFile,
    dialect: Dialect,
    opts: &ReadOptions<'_>,
    notes: &mut Vec<String>,
) -> Result<ConfigSource> {
    if let Some(text) = file.metadata().get("lora_adapter_metadata") {
        let Some(obj) = parse_json_object(text) else {
            return Err(Error::Lora {
                file: file.path().to_path_buf(),
                msg: "header `lora_adapter_metadata` is not a JSON object".into(),
            });
        };
        let mut per = HashMap::new();
        for c in Component::ALL {
            if let Some(cfg) = PeftConfig::from_json(&obj, Some(c.diffusers_name())) {
                notes.push(format!(
                    "{c}: scale from lora_adapter_metadata (r={:?}, lora_alpha={:?}, {} rank / {} alpha patterns{})",
                    cfg.r,
                    cfg.lora_alpha,
                    cfg.rank_pattern.len(),
                    cfg.alpha_pattern.len(),
                    if cfg.use_rslora { ", rsLoRA" } else { "" }
                ));
                per.insert(c, cfg);
            }
        }
        if !per.is_empty() {
            return Ok(ConfigSource::PerComponent(per));
        }
        if let Some(cfg) = PeftConfig::from_json(&obj, None) {
            notes.push(format!(
                "scale from lora_adapter_metadata (r={:?}, lora_alpha={:?})",
                cfg.r, cfg.lora_alpha
            ));
            return Ok(ConfigSource::Global(cfg));
        }
    }
    let explicit = opts.adapter_config.map(Path::to_path_buf);
    let sibling = if explicit.is_none() && dialect == Dialect::PeftRaw {
        find_adapter_config(file.path())
    } else {
        None
    };
    if let Some(p) = explicit.or(sibling) {
        let text = crate::files::read_text(&p, crate::layout::MAX_CONFIG_BYTES)?;
        let obj = parse_json_object(&text).ok_or_else(|| Error::Config {
            file: p.clone(),
            msg: "not a JSON object".into(),
        })?;
        let cfg = PeftConfig::from_json(&obj, None).ok_or_else(|| Error::Config {
            file: p.clone(),
            msg: "no `r` or `lora_alpha` in the adapter config".into(),
        })?;
        notes.push(format!(
            "scale from {} (r={:?}, lora_alpha={:?})",
            p.display(),
            cfg.r,
            cfg.lora_alpha
        ));
        return Ok(ConfigSource::Global(cfg));
    }
    if dialect == Dialect::PeftRaw {
        notes.push("PEFT file without adapter_config.json or lora_adapter_metadata: lora_alpha unknown, scale 1 (alpha = r)".into());
    }
    Ok(ConfigSource::None)
}
