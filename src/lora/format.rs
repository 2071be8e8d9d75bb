//! Reading a LoRA file of any supported dialect into one canonical [`LoraAdapter`].
//!
//! Steps: parse every key with [`keys::parse_lora_key`] (the key grammar lives in
//! `weights::keys`), detect SDXL files, resolve each module to canonical `(Component, path)`
//! with a [`Resolver`] (against the caller's module list when given), group a module's tensors,
//! decide its kind (LoRA / LoCon-Tucker, LoHa, LoKr, full diff), validate shapes, and compute
//! the scale each upstream loader would use:
//!
//! | source | scale |
//! |---|---|
//! | kohya / LyCORIS `.alpha` | `alpha / rank`; no alpha or `alpha == 0` → 1 (sd-scripts `networks/lora.py`, LyCORIS `modules/{loha,lokr}.py`) |
//! | LoKr with both factors full | 1 (LyCORIS: "use scale = 1") |
//! | diffusers `lora_adapter_metadata` / PEFT `adapter_config.json` | `lora_alpha / r` (or `/ sqrt(r)` with `use_rslora`), with `rank_pattern` / `alpha_pattern` matched as PEFT does (`get_pattern_key`: `^(.*\.)?(<pattern>)$` on the module name) |
//! | diffusers / attn-procs without either | `.alpha` keys if present (`alpha / rank`), else 1 |
//!
//! Every key that ends up in no module is reported in [`LoraAdapter::unmapped`] with its reason.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::weights::keys::{
    self, KeyDialect, LoraKey, ModuleName, Resolver, Role, Target, UnmappedReason,
};
use crate::weights::{
    Component, Dtype, ModuleSet, Tensor, TensorData, WeightFile, write_safetensors,
};
use crate::{Error, Result};

/// The dialect a LoRA file was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// `unet.<path>.lora_A.weight` (diffusers `save_lora_weights` today).
    Diffusers,
    /// `unet.<path>.lora.down.weight` / `text_encoder.<path>.lora_linear_layer.down.weight`.
    DiffusersLegacy,
    /// `base_model.model.<path>.lora_A[.<adapter>].weight` (PEFT `save_pretrained`).
    PeftRaw,
    /// `lora_unet_<name>.lora_down.weight` + `.alpha` (sd-scripts, A1111, Civitai).
    Kohya,
    /// kohya names with LyCORIS tensors (LoHa `hada_*`, LoKr `lokr_*`, LoCon `lora_mid`, `diff`).
    Lycoris,
    /// `unet.<path>.processor.to_q_lora.down.weight` (diffusers 0.17–0.20 `save_attn_procs`).
    AttnProcs,
}

impl std::fmt::Display for Dialect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dialect::Diffusers => "diffusers (lora_A/lora_B)",
            Dialect::DiffusersLegacy => "diffusers legacy (lora.down/lora.up, lora_linear_layer)",
            Dialect::PeftRaw => "PEFT (base_model.model.)",
            Dialect::Kohya => "kohya (lora_unet_/lora_te_)",
            Dialect::Lycoris => "LyCORIS (kohya names)",
            Dialect::AttnProcs => "diffusers attn-procs (to_q_lora)",
        })
    }
}

/// A factor of a LoKr Kronecker product: stored whole or as a low-rank product `a @ b`.
#[derive(Debug, Clone, PartialEq)]
pub enum KronFactor {
    Full(Tensor),
    LowRank { a: Tensor, b: Tensor },
}

/// The adapter tensors of one module (all f32, torch layout, shapes validated).
#[derive(Debug, Clone, PartialEq)]
pub enum LoraKind {
    /// Standard LoRA: `down` `[r,in]` or `[r,in,kh,kw]`; `up` `[out,r]` or `[out,r,1,1]`. With `mid`
    /// (LoCon Tucker): `down` `[r1,in,1,1]`, `mid` `[r2,r1,kh,kw]`, `up` `[out,r2,1,1]`.
    Lora {
        down: Tensor,
        up: Tensor,
        mid: Option<Tensor>,
    },
    /// LyCORIS LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b); w1a `[out,r]`, w1b `[r,in·kh·kw]`. With Tucker
    /// cores t1/t2 `[r,r,kh,kw]`: w1a `[r,out]`, w1b `[r,in]`.
    LoHa {
        w1a: Tensor,
        w1b: Tensor,
        w2a: Tensor,
        w2b: Tensor,
        t1: Option<Tensor>,
        t2: Option<Tensor>,
    },
    /// LyCORIS LoKr: ΔW = w1 ⊗ w2; with Tucker core `t2` `[r,r,kh,kw]`: w2 = t2 ×₁ w2a ×₂ w2b.
    LoKr {
        w1: KronFactor,
        w2: KronFactor,
        t2: Option<Tensor>,
    },
    /// LyCORIS "full": ΔW = diff.
    Full { diff: Tensor },
}

impl LoraKind {
    /// Check that the tensors fit together (what [`read`] guarantees; use it on hand-built
    /// modules). The message names the mismatch.
    pub fn check(&self) -> std::result::Result<(), String> {
        let tensors: Vec<&Tensor> = match self {
            LoraKind::Lora { down, up, mid } => [Some(down), Some(up), mid.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
            LoraKind::LoHa {
                w1a,
                w1b,
                w2a,
                w2b,
                t1,
                t2,
            } => [
                Some(w1a),
                Some(w1b),
                Some(w2a),
                Some(w2b),
                t1.as_ref(),
                t2.as_ref(),
            ]
            .into_iter()
            .flatten()
            .collect(),
            LoraKind::LoKr { w1, w2, t2 } => {
                let mut v = Vec::new();
                for f in [w1, w2] {
                    match f {
                        KronFactor::Full(w) => v.push(w),
                        KronFactor::LowRank { a, b } => v.extend([a, b]),
                    }
                }
                v.extend(t2.as_ref());
                v
            }
            LoraKind::Full { diff } => vec![diff],
        };
        for t in tensors {
            if t.shape.iter().product::<usize>() != t.data.len() {
                return Err(format!(
                    "tensor of shape {:?} holds {} values",
                    t.shape,
                    t.data.len()
                ));
            }
        }
        match self {
            LoraKind::Lora { down, up, mid } => check_lora_shapes(down, up, mid.as_ref()),
            LoraKind::LoHa { t1, t2, .. } if t1.is_some() != t2.is_some() => {
                Err("LoHa Tucker needs both hada_t1 and hada_t2".into())
            }
            LoraKind::LoHa {
                w1a,
                w1b,
                w2a,
                w2b,
                t1,
                t2,
            } => check_loha_shapes(w1a, w1b, w2a, w2b, t1.as_ref(), t2.as_ref()),
            LoraKind::LoKr { w1, w2, t2 } => check_lokr_shapes(w1, w2, t2.as_ref()),
            LoraKind::Full { diff } if diff.shape.len() < 2 => {
                Err(format!("diff {:?} must be 2-D or more", diff.shape))
            }
            LoraKind::Full { .. } => Ok(()),
        }
    }
}

/// One module's adapter, in canonical form.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    pub component: Component,
    /// Canonical module path (see `weights::keys`: text encoder without `text_model.`).
    pub module_path: String,
    pub kind: LoraKind,
    /// The alpha the file (or its config) gives for this module.
    pub alpha: Option<f32>,
    /// Rank (rows of `down`; LoHa/LoKr: rows of the `_b` factor; 0 for full matrices).
    pub rank: usize,
    /// Factor applied to the raw product: ΔW = scale · product.
    pub scale: f32,
    /// The file keys that made this module.
    pub keys: Vec<String>,
}

/// A key that maps to no module, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Unmapped {
    pub key: String,
    pub reason: UnmappedReason,
}

impl std::fmt::Display for Unmapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.key, self.reason)
    }
}

/// A LoRA file in canonical form.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub path: PathBuf,
    pub dialect: Dialect,
    pub modules: Vec<LoraModule>,
    pub unmapped: Vec<Unmapped>,
    /// The safetensors `__metadata__` (kohya `ss_*`, diffusers `lora_adapter_metadata`, ...).
    pub metadata: BTreeMap<String, String>,
    /// Storage dtype of the adapter tensors (the most common one).
    pub dtype: Option<Dtype>,
    /// How the scales were decided (which config, which fallbacks).
    pub notes: Vec<String>,
}

impl LoraAdapter {
    /// The module adapter for `(component, path)`, if any.
    pub fn module(&self, component: Component, path: &str) -> Option<&LoraModule> {
        let path = keys::canonical_path(component, path);
        self.modules
            .iter()
            .find(|m| m.component == component && m.module_path == path)
    }

    /// Whether the file was recognised as an SDXL LoRA.
    pub fn is_sdxl(&self) -> bool {
        !self.unmapped.is_empty()
            && self
                .unmapped
                .iter()
                .all(|u| matches!(u.reason, UnmappedReason::Sdxl(_)))
    }

    /// `Ok` when every key mapped; otherwise an error listing the unmapped keys.
    pub fn require_complete(&self) -> Result<()> {
        if self.unmapped.is_empty() {
            return Ok(());
        }
        let mut msg = format!(
            "{} of the LoRA's keys map to no module:",
            self.unmapped.len()
        );
        for u in self.unmapped.iter().take(10) {
            msg.push_str(&format!("\n  {u}"));
        }
        if self.unmapped.len() > 10 {
            msg.push_str(&format!("\n  ... and {} more", self.unmapped.len() - 10));
        }
        Err(Error::Lora {
            file: self.path.clone(),
            msg,
        })
    }
}

/// How to read a LoRA file.
#[derive(Default, Clone, Copy)]
pub struct ReadOptions<'a> {
    /// The model's modules: resolves kohya names and checks dotted ones. Without it, SD 1.x
    /// diffusers naming rules are used and module existence is not checked.
    pub modules: Option<&'a dyn ModuleSet>,
    /// A PEFT `adapter_config.json` to take `r` / `lora_alpha` from. Without it, a sibling
    /// `<stem>_adapter_config.json`, `<stem>.adapter_config.json` or `adapter_config.json` is used.
    pub adapter_config: Option<&'a Path>,
}

/// Read a LoRA safetensors file.
pub fn read(path: impl AsRef<Path>, opts: &ReadOptions<'_>) -> Result<LoraAdapter> {
    let file = WeightFile::open(path.as_ref())?;
    read_file(&file, opts)
}

// ------------------------------------------------------------------------------------------------
// PEFT LoraConfig subset

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

    fn scale(&self, r: f64, alpha: f64) -> f64 {
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
enum ConfigSource {
    /// Per component (diffusers `lora_adapter_metadata` with `unet.` / `text_encoder.` keys).
    PerComponent(HashMap<Component, PeftConfig>),
    /// One config for every module (PEFT adapter_config.json, `save_lora_adapter` metadata).
    Global(PeftConfig),
    None,
}

impl ConfigSource {
    fn get(&self, c: Component) -> Option<&PeftConfig> {
        match self {
            ConfigSource::PerComponent(m) => m.get(&c),
            ConfigSource::Global(cfg) => Some(cfg),
            ConfigSource::None => None,
        }
    }
}

fn load_config_source(
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

// ------------------------------------------------------------------------------------------------
// Reading

fn detect_dialect(parsed: &[(String, LoraKey)]) -> Option<Dialect> {
    let has = |d: KeyDialect| parsed.iter().any(|(_, k)| k.dialect == d);
    if has(KeyDialect::Kohya) {
        let lycoris = parsed.iter().any(|(_, k)| {
            !matches!(
                k.role,
                Role::Down
                    | Role::Up
                    | Role::Alpha
                    | Role::DoraScale
                    | Role::Other(_)
                    | Role::BiasDiff
            )
        });
        return Some(if lycoris {
            Dialect::Lycoris
        } else {
            Dialect::Kohya
        });
    }
    if has(KeyDialect::PeftRaw) {
        return Some(Dialect::PeftRaw);
    }
    if has(KeyDialect::AttnProcs) {
        return Some(Dialect::AttnProcs);
    }
    if parsed
        .iter()
        .any(|(_, k)| k.dialect == KeyDialect::Diffusers && matches!(k.role, Role::Down | Role::Up))
    {
        return Some(Dialect::Diffusers);
    }
    if has(KeyDialect::DiffusersLegacy) {
        return Some(Dialect::DiffusersLegacy);
    }
    parsed.first().map(|_| Dialect::Diffusers)
}

/// Read a LoRA from an opened safetensors file (see [`read`]).
pub fn read_file(file: &WeightFile, opts: &ReadOptions<'_>) -> Result<LoraAdapter> {
    let path = file.path().to_path_buf();
    let mut unmapped = Vec::new();
    let mut parsed: Vec<(String, LoraKey)> = Vec::new();
    for name in file.names() {
        match keys::parse_lora_key(name) {
            Some(k) => parsed.push((name.to_string(), k)),
            None => unmapped.push(Unmapped {
                key: name.to_string(),
                reason: UnmappedReason::UnknownKey,
            }),
        }
    }
    let Some(dialect) = detect_dialect(&parsed) else {
        let first = file.names().next().unwrap_or("(no tensors)");
        return Err(Error::Lora {
            file: path,
            msg: format!(
                "not a LoRA file: none of its {} keys follows a known LoRA layout (diffusers, PEFT, kohya, LyCORIS, attn-procs); first key `{first}`",
                file.len()
            ),
        });
    };
    let mut dtype_count: BTreeMap<String, (Dtype, usize)> = BTreeMap::new();
    for (name, k) in &parsed {
        if k.role != Role::Alpha
            && let Some(info) = file.info(name)
        {
            dtype_count
                .entry(format!("{:?}", info.dtype))
                .or_insert((info.dtype, 0))
                .1 += 1;
        }
    }
    let dtype = dtype_count
        .values()
        .max_by_key(|(_, n)| *n)
        .map(|(d, _)| *d);
    let mut adapter = LoraAdapter {
        path: path.clone(),
        dialect,
        modules: Vec::new(),
        unmapped: Vec::new(),
        metadata: file.metadata().clone(),
        dtype,
        notes: Vec::new(),
    };

    // An SDXL file is refused as a whole: half of it (te1) would fit SD 1.x and mislead.
    // Evidence: SDXL-only prefixes (`lora_te2_`, `text_encoder_2.`, sgm `input_blocks`), or a
    // UNet `transformer_blocks.N` with N ≥ 1 that the model lacks (SD 1.x has one transformer
    // block per attention, SDXL 2 or 10).
    let resolver = Resolver::new(opts.modules);
    let sdxl: Vec<String> = parsed
        .iter()
        .filter_map(|(_, k)| match &k.target {
            Target::Sdxl(why) => Some(why.clone()),
            Target::Unet | Target::Unknown
                if deep_transformer_block(&k.module)
                    && (opts.modules.is_none() || resolver.resolve(k).is_err()) =>
            {
                Some(
                    "UNet `transformer_blocks.N` with N ≥ 1 (SD 1.x has one per attention)"
                        .to_string(),
                )
            }
            _ => None,
        })
        .collect();
    if let Some(first) = sdxl.first() {
        let why = format!(
            "{first}; {} of {} keys use SDXL naming",
            sdxl.len(),
            file.len()
        );
        adapter.unmapped = file
            .names()
            .map(|n| Unmapped {
                key: n.to_string(),
                reason: UnmappedReason::Sdxl(why.clone()),
            })
            .collect();
        return Ok(adapter);
    }

    let mut resolved_cache: HashMap<
        (Target, ModuleName),
        std::result::Result<(Component, String), UnmappedReason>,
    > = HashMap::new();
    // (component, path) → role → key
    let mut groups: BTreeMap<(Component, String), BTreeMap<Role, String>> = BTreeMap::new();
    let mut group_order: Vec<(Component, String)> = Vec::new();
    let mut adapter_names: BTreeMap<String, usize> = BTreeMap::new();
    for (name, k) in &parsed {
        if let Some(a) = &k.adapter {
            *adapter_names.entry(a.clone()).or_default() += 1;
        }
        let res = resolved_cache
            .entry((k.target.clone(), k.module.clone()))
            .or_insert_with(|| resolver.resolve(k))
            .clone();
        match res {
            Err(reason) => unmapped.push(Unmapped {
                key: name.clone(),
                reason,
            }),
            Ok(module) => {
                let roles = groups.entry(module.clone()).or_insert_with(|| {
                    group_order.push(module.clone());
                    BTreeMap::new()
                });
                match roles.get(&k.role) {
                    Some(other) => unmapped.push(Unmapped {
                        key: name.clone(),
                        reason: UnmappedReason::Duplicate(other.clone()),
                    }),
                    None => {
                        roles.insert(k.role.clone(), name.clone());
                    }
                }
            }
        }
    }
    if adapter_names.len() > 1 {
        adapter.notes.push(format!(
            "several PEFT adapter names in one file ({}): the first key of each module wins, the rest are reported as duplicates",
            adapter_names.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    }

    let config = match dialect {
        Dialect::Kohya | Dialect::Lycoris => ConfigSource::None,
        _ => load_config_source(file, dialect, opts, &mut adapter.notes)?,
    };
    for c in Component::ALL {
        if config.get(c).is_some_and(|cfg| cfg.use_dora) {
            adapter
                .notes
                .push(format!("{c}: config says use_dora: DoRA is not supported"));
        }
    }

    for (component, module_path) in group_order {
        let Some(roles) = groups.remove(&(component, module_path.clone())) else {
            continue;
        };
        let all_keys: Vec<String> = roles.values().cloned().collect();
        let dora_cfg = config.get(component).is_some_and(|cfg| cfg.use_dora);
        match build_module(file, component, &module_path, &roles, &config, dora_cfg)? {
            Ok(m) => {
                // Check ΔW against the model's weight when the module list knows its shape.
                let target = opts
                    .modules
                    .and_then(|ms| ms.weight_shape(component, &module_path));
                let dshape = super::merge::delta_shape(&m.kind);
                match target {
                    Some(t) if !super::merge::shape_fits(&dshape, &t) => {
                        let reason = UnmappedReason::WrongShape {
                            component,
                            module: module_path.clone(),
                            delta: dshape.clone(),
                            weight: t.clone(),
                        };
                        for key in all_keys {
                            unmapped.push(Unmapped {
                                key,
                                reason: reason.clone(),
                            });
                        }
                    }
                    _ => adapter.modules.push(m),
                }
            }
            Err(reason) => {
                for key in all_keys {
                    unmapped.push(Unmapped {
                        key,
                        reason: reason.clone(),
                    });
                }
            }
        }
    }
    if matches!(config, ConfigSource::None)
        && !matches!(dialect, Dialect::Kohya | Dialect::Lycoris)
        && adapter.modules.iter().all(|m| m.alpha.is_none())
        && !adapter.modules.is_empty()
    {
        adapter.notes.push("no alpha stored: scale 1".into());
    }
    unmapped.sort_by(|a, b| a.key.cmp(&b.key));
    adapter.unmapped = unmapped;
    Ok(adapter)
}

/// Whether a module name has `transformer_blocks.N` / `transformer_blocks_N` with N ≥ 1.
fn deep_transformer_block(name: &ModuleName) -> bool {
    let s = match name {
        ModuleName::Dotted(s) | ModuleName::Underscored(s) => s,
    };
    s.match_indices("transformer_blocks").any(|(i, m)| {
        let rest = &s[i + m.len()..];
        let digits: String = rest
            .chars()
            .skip(1)
            .take_while(char::is_ascii_digit)
            .collect();
        matches!(rest.chars().next(), Some('.' | '_'))
            && digits.parse::<u32>().is_ok_and(|n| n >= 1)
    })
}

type Built = std::result::Result<LoraModule, UnmappedReason>;

/// A LoRA factor: a float tensor (F32, F16, BF16 or F64) whose every value is finite. An integer
/// or bool tensor, or one holding NaN/Inf, would merge into NaN weights and black images.
fn read_factor(file: &WeightFile, key: &str) -> Result<Tensor> {
    let bad = |msg: String| Error::Lora {
        file: file.path().to_path_buf(),
        msg: format!("tensor `{key}`: {msg}"),
    };
    let dtype = file
        .info(key)
        .map(|i| i.dtype)
        .ok_or_else(|| Error::MissingTensor {
            name: key.to_owned(),
            file: file.path().to_path_buf(),
        })?;
    if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
        return Err(bad(format!(
            "dtype {dtype:?}; LoRA factors are float tensors (F32, F16, BF16)"
        )));
    }
    let t = Tensor::read(file, key)?;
    if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!(
            "element {i} is {} (the file is damaged, or training diverged)",
            t.data[i]
        )));
    }
    Ok(t)
}

/// A module's `.alpha`: one finite, non-negative number (0 means "= rank", the kohya rule).
fn read_alpha(file: &WeightFile, key: &str) -> Result<f32> {
    let a = file.scalar_f32(key)?;
    if !a.is_finite() || a < 0.0 {
        return Err(Error::Lora {
            file: file.path().to_path_buf(),
            msg: format!("`{key}` is {a}; alpha must be a finite number ≥ 0"),
        });
    }
    Ok(a)
}

fn invalid(msg: String) -> Built {
    Err(UnmappedReason::Invalid(msg))
}

fn build_module(
    file: &WeightFile,
    component: Component,
    module_path: &str,
    roles: &BTreeMap<Role, String>,
    config: &ConfigSource,
    dora_cfg: bool,
) -> Result<Built> {
    if roles.contains_key(&Role::DoraScale) || dora_cfg {
        return Ok(Err(UnmappedReason::Unsupported(
            "DoRA (`dora_scale` / `lora_magnitude_vector` / use_dora): its weight-norm rescaling is not implemented".into(),
        )));
    }
    if let Some(other) = roles.keys().find_map(|r| {
        if let Role::Other(s) = r {
            Some(s.clone())
        } else {
            None
        }
    }) {
        return Ok(Err(UnmappedReason::Unsupported(format!(
            "adapter tensor `{other}` (OFT, BOFT, IA3, GLoRA, DyLoRA and other non-LoRA/LoHa/LoKr types are not supported)"
        ))));
    }
    if roles.contains_key(&Role::BiasDiff) {
        return Ok(Err(UnmappedReason::Unsupported(
            "bias difference (`diff_b` / PEFT `lora_B.bias`)".into(),
        )));
    }
    if roles.contains_key(&Role::LokrT1) {
        return Ok(Err(UnmappedReason::Unsupported(
            "LoKr `lokr_t1` (a Tucker core on w1)".into(),
        )));
    }
    let get = |r: Role| -> Result<Option<Tensor>> {
        match roles.get(&r) {
            Some(k) => Ok(Some(read_factor(file, k)?)),
            None => Ok(None),
        }
    };
    let alpha = match roles.get(&Role::Alpha) {
        Some(k) => Some(read_alpha(file, k)?),
        None => None,
    };
    let has = |r: &[Role]| r.iter().any(|r| roles.contains_key(r));
    let families = [
        has(&[Role::Down, Role::Up, Role::Mid]),
        has(&[
            Role::HadaW1A,
            Role::HadaW1B,
            Role::HadaW2A,
            Role::HadaW2B,
            Role::HadaT1,
            Role::HadaT2,
        ]),
        has(&[
            Role::LokrW1,
            Role::LokrW1A,
            Role::LokrW1B,
            Role::LokrW2,
            Role::LokrW2A,
            Role::LokrW2B,
            Role::LokrT2,
        ]),
        has(&[Role::Diff]),
    ];
    let n_fam = families.iter().filter(|f| **f).count();
    if n_fam == 0 {
        return Ok(invalid("only an `alpha`, no weights".into()));
    }
    if n_fam > 1 {
        return Ok(invalid(
            "mixes tensors of several adapter types (LoRA, LoHa, LoKr, diff)".into(),
        ));
    }
    let keys: Vec<String> = roles.values().cloned().collect();
    let mk = |kind: LoraKind, rank: usize, scale: f32, alpha: Option<f32>| -> Built {
        Ok(LoraModule {
            component,
            module_path: module_path.to_string(),
            kind,
            alpha,
            rank,
            scale,
            keys: keys.clone(),
        })
    };
    // kohya / LyCORIS rule: no alpha (or 0) means alpha = rank.
    let kohya_scale = |rank: usize| -> f32 {
        match alpha {
            Some(a) if a != 0.0 && rank > 0 => a / rank as f32,
            _ => 1.0,
        }
    };

    if families[0] {
        let (Some(down), Some(up)) = (get(Role::Down)?, get(Role::Up)?) else {
            return Ok(invalid(
                "a LoRA needs both down (lora_A) and up (lora_B)".into(),
            ));
        };
        let mid = get(Role::Mid)?;
        if let Err(msg) = check_lora_shapes(&down, &up, mid.as_ref()) {
            return Ok(invalid(msg));
        }
        let rank = down.shape[0];
        let (alpha, scale) = match config.get(component) {
            Some(cfg) => {
                let (r, a) = cfg.r_alpha(&keys::peft_module_name(component, module_path), rank);
                let scale = cfg.scale(r, a) as f32;
                if !(r > 0.0 && a.is_finite() && scale.is_finite()) {
                    return Err(Error::Lora {
                        file: file.path().to_path_buf(),
                        msg: format!(
                            "`{module_path}`: the adapter config gives r = {r}, lora_alpha = {a} \
                             (scale {scale}); r must be positive and both finite"
                        ),
                    });
                }
                (Some(a as f32), scale)
            }
            None => (alpha, kohya_scale(rank)),
        };
        return Ok(mk(LoraKind::Lora { down, up, mid }, rank, scale, alpha));
    }
    if families[1] {
        let (Some(w1a), Some(w1b), Some(w2a), Some(w2b)) = (
            get(Role::HadaW1A)?,
            get(Role::HadaW1B)?,
            get(Role::HadaW2A)?,
            get(Role::HadaW2B)?,
        ) else {
            return Ok(invalid(
                "LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b".into(),
            ));
        };
        let (t1, t2) = (get(Role::HadaT1)?, get(Role::HadaT2)?);
        if t1.is_some() != t2.is_some() {
            return Ok(invalid("LoHa Tucker needs both hada_t1 and hada_t2".into()));
        }
        if let Err(msg) = check_loha_shapes(&w1a, &w1b, &w2a, &w2b, t1.as_ref(), t2.as_ref()) {
            return Ok(invalid(msg));
        }
        let rank = w1b.shape[0];
        return Ok(mk(
            LoraKind::LoHa {
                w1a,
                w1b,
                w2a,
                w2b,
                t1,
                t2,
            },
            rank,
            kohya_scale(rank),
            alpha,
        ));
    }
    if families[2] {
        let factor =
            |full: Role, a: Role, b: Role| -> Result<std::result::Result<KronFactor, String>> {
                Ok(match (get(full)?, get(a)?, get(b)?) {
                    (Some(w), None, None) => Ok(KronFactor::Full(w)),
                    (None, Some(a), Some(b)) => Ok(KronFactor::LowRank { a, b }),
                    _ => Err(
                        "LoKr needs lokr_wN or both lokr_wN_a and lokr_wN_b for each factor"
                            .to_string(),
                    ),
                })
            };
        let w1 = match factor(Role::LokrW1, Role::LokrW1A, Role::LokrW1B)? {
            Ok(f) => f,
            Err(m) => return Ok(invalid(m)),
        };
        let w2 = match factor(Role::LokrW2, Role::LokrW2A, Role::LokrW2B)? {
            Ok(f) => f,
            Err(m) => return Ok(invalid(m)),
        };
        let t2 = get(Role::LokrT2)?;
        if let Err(msg) = check_lokr_shapes(&w1, &w2, t2.as_ref()) {
            return Ok(invalid(msg));
        }
        // LyCORIS: both factors full → scale 1; else alpha / rank, rank = rows of lokr_w2_b, else
        // of lokr_w1_b (diffusers `_bake_lokr_alpha_`, ComfyUI and A1111 read it so; LyCORIS's
        // `make_module_from_state_dict` agrees for non-Tucker files).
        let rank = match (&w2, &w1) {
            (KronFactor::LowRank { b, .. }, _) | (_, KronFactor::LowRank { b, .. }) => b.shape[0],
            _ => 0,
        };
        let scale = if rank == 0 { 1.0 } else { kohya_scale(rank) };
        return Ok(mk(LoraKind::LoKr { w1, w2, t2 }, rank, scale, alpha));
    }
    let Some(diff) = get(Role::Diff)? else {
        return Ok(invalid("missing `diff`".into()));
    };
    Ok(mk(LoraKind::Full { diff }, 0, 1.0, alpha))
}

fn check_lora_shapes(
    down: &Tensor,
    up: &Tensor,
    mid: Option<&Tensor>,
) -> std::result::Result<(), String> {
    let (ds, us) = (&down.shape, &up.shape);
    if !(ds.len() == 2 || ds.len() == 4) || !(us.len() == 2 || us.len() == 4) {
        return Err(format!(
            "down {ds:?} / up {us:?}: expected 2-D (Linear) or 4-D (Conv2d) tensors"
        ));
    }
    if us.len() == 4 && (us[2] != 1 || us[3] != 1) {
        return Err(format!("up {us:?}: a conv LoRA's up must be 1×1"));
    }
    let inner = match mid {
        None => ds[0],
        Some(m) => {
            if m.shape.len() != 4
                || m.shape[1] != ds[0]
                || (ds.len() == 4 && (ds[2] != 1 || ds[3] != 1))
            {
                return Err(format!(
                    "lora_mid {:?} does not fit down {ds:?} (expected [r2, r1, kh, kw] and 1×1 down)",
                    m.shape
                ));
            }
            m.shape[0]
        }
    };
    if us[1] != inner || ds[0] == 0 {
        return Err(format!("rank mismatch: down {ds:?}, up {us:?}"));
    }
    Ok(())
}

fn check_loha_shapes(
    w1a: &Tensor,
    w1b: &Tensor,
    w2a: &Tensor,
    w2b: &Tensor,
    t1: Option<&Tensor>,
    t2: Option<&Tensor>,
) -> std::result::Result<(), String> {
    let all2 = [w1a, w1b, w2a, w2b].iter().all(|t| t.shape.len() == 2);
    if !all2 {
        return Err("LoHa factors must be 2-D".into());
    }
    match (t1, t2) {
        (Some(t1), Some(t2)) => {
            // Tucker: w_a [r, out], w_b [r, in], t [r, r, kh, kw].
            let ok = t1.shape.len() >= 3
                && t1.shape == t2.shape
                && w1a.shape[0] == t1.shape[0]
                && w1b.shape[0] == t1.shape[1]
                && w2a.shape[0] == t2.shape[0]
                && w2b.shape[0] == t2.shape[1]
                && w1a.shape[1] == w2a.shape[1]
                && w1b.shape[1] == w2b.shape[1];
            if !ok {
                return Err(format!(
                    "LoHa Tucker shapes do not fit: w1a {:?} w1b {:?} t1 {:?} / w2a {:?} w2b {:?} t2 {:?}",
                    w1a.shape, w1b.shape, t1.shape, w2a.shape, w2b.shape, t2.shape
                ));
            }
        }
        _ => {
            let ok = w1a.shape[1] == w1b.shape[0]
                && w2a.shape[1] == w2b.shape[0]
                && w1a.shape[0] == w2a.shape[0]
                && w1b.shape[1] == w2b.shape[1];
            if !ok {
                return Err(format!(
                    "LoHa shapes do not fit: w1a {:?} w1b {:?} w2a {:?} w2b {:?}",
                    w1a.shape, w1b.shape, w2a.shape, w2b.shape
                ));
            }
        }
    }
    Ok(())
}

fn check_lokr_shapes(
    w1: &KronFactor,
    w2: &KronFactor,
    t2: Option<&Tensor>,
) -> std::result::Result<(), String> {
    match w1 {
        KronFactor::Full(w) if w.shape.len() != 2 => {
            return Err(format!("lokr_w1 {:?} must be 2-D", w.shape));
        }
        KronFactor::LowRank { a, b }
            if a.shape.len() != 2 || b.shape.len() != 2 || a.shape[1] != b.shape[0] =>
        {
            return Err(format!(
                "lokr_w1_a {:?} / lokr_w1_b {:?} do not multiply",
                a.shape, b.shape
            ));
        }
        _ => {}
    }
    match (w2, t2) {
        (KronFactor::Full(w), None) if w.shape.len() < 2 => {
            Err(format!("lokr_w2 {:?} must be 2-D or more", w.shape))
        }
        (KronFactor::Full(_), Some(_)) => Err("lokr_t2 given with a full lokr_w2".into()),
        (KronFactor::LowRank { a, b }, None)
            if a.shape.len() != 2 || b.shape.len() < 2 || a.shape[1] != b.shape[0] =>
        {
            Err(format!(
                "lokr_w2_a {:?} / lokr_w2_b {:?} do not multiply",
                a.shape, b.shape
            ))
        }
        (KronFactor::LowRank { a, b }, Some(t))
            if a.shape.len() != 2
                || b.shape.len() != 2
                || t.shape.len() < 3
                || t.shape[0] != a.shape[0]
                || t.shape[1] != b.shape[0] =>
        {
            Err(format!(
                "LoKr Tucker shapes do not fit: t2 {:?} w2_a {:?} w2_b {:?}",
                t.shape, a.shape, b.shape
            ))
        }
        _ => Ok(()),
    }
}

// ------------------------------------------------------------------------------------------------
// Writing

/// Key layout of a LoRA file we write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStyle {
    /// diffusers `save_lora_weights` layout: `unet.<path>.lora_A.weight`,
    /// `text_encoder.text_model.<path>.lora_A.weight`, plus `lora_adapter_metadata` (per-component
    /// `r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`, `target_modules`) so diffusers applies
    /// the same scales. Loads with `pipeline.load_lora_weights(dir, weight_name=...)`.
    Diffusers,
    /// kohya / sd-scripts layout for A1111, ComfyUI and friends: `lora_unet_<path _>` /
    /// `lora_te_text_model_<path _>` + `.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
}

/// How to write a LoRA file.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub style: WriteStyle,
    /// Storage dtype of the weights (F32, F16 or BF16); kohya's `.alpha` uses it too.
    pub dtype: Dtype,
    /// Extra `__metadata__` entries (e.g. kohya `ss_*` training metadata).
    pub metadata: BTreeMap<String, String>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            style: WriteStyle::Diffusers,
            dtype: Dtype::F32,
            metadata: BTreeMap::new(),
        }
    }
}

/// Write standard LoRA modules (kind [`LoraKind::Lora`] without `mid`) to `path` atomically.
/// Each module's alpha is written as `scale · rank`, so any reader that applies `alpha / rank`
/// (kohya, PEFT/diffusers) reproduces [`LoraModule::scale`].
pub fn write(path: impl AsRef<Path>, modules: &[LoraModule], opts: &WriteOptions) -> Result<()> {
    let mut tensors: Vec<(String, TensorData<'static>)> = Vec::new();
    let mut metadata = opts.metadata.clone();
    // per component: (canonical path, rank, alpha)
    let mut per: BTreeMap<Component, Vec<(String, usize, f64)>> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for m in modules {
        let LoraKind::Lora {
            down,
            up,
            mid: None,
        } = &m.kind
        else {
            return Err(Error::InvalidArgument(format!(
                "{}: only standard LoRA modules (down/up) can be written, not LoHa/LoKr/Tucker/diff",
                m.module_path
            )));
        };
        m.kind
            .check()
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", m.module_path)))?;
        let path_c = keys::canonical_path(m.component, &m.module_path).to_string();
        if !seen.insert((m.component, path_c.clone())) {
            return Err(Error::InvalidArgument(format!(
                "{} `{path_c}` given twice",
                m.component
            )));
        }
        let rank = down.shape[0];
        let alpha = m.scale as f64 * rank as f64;
        let (kd, ku) = match opts.style {
            WriteStyle::Diffusers => {
                let base = keys::to_diffusers(m.component, &path_c);
                (
                    format!("{base}.lora_A.weight"),
                    format!("{base}.lora_B.weight"),
                )
            }
            WriteStyle::Kohya => {
                let base = keys::to_kohya(m.component, &path_c);
                let alpha_t = TensorData::from_f32(opts.dtype, vec![], &[alpha as f32])?;
                tensors.push((format!("{base}.alpha"), alpha_t));
                (
                    format!("{base}.lora_down.weight"),
                    format!("{base}.lora_up.weight"),
                )
            }
        };
        tensors.push((
            kd,
            TensorData::from_f32(opts.dtype, down.shape.clone(), &down.data)?,
        ));
        tensors.push((
            ku,
            TensorData::from_f32(opts.dtype, up.shape.clone(), &up.data)?,
        ));
        per.entry(m.component)
            .or_default()
            .push((path_c, rank, alpha));
    }
    if opts.style == WriteStyle::Diffusers {
        let mut obj = serde_json::Map::new();
        for (c, mods) in &per {
            let most_common = |vals: Vec<String>| -> Option<String> {
                let mut counts: BTreeMap<String, usize> = BTreeMap::new();
                for v in vals {
                    *counts.entry(v).or_default() += 1;
                }
                counts.into_iter().max_by_key(|(_, n)| *n).map(|(v, _)| v)
            };
            let r = most_common(mods.iter().map(|(_, r, _)| r.to_string()).collect())
                .and_then(|v| v.parse::<usize>().ok());
            let a = most_common(mods.iter().map(|(_, _, a)| a.to_string()).collect())
                .and_then(|v| v.parse::<f64>().ok());
            let (Some(r), Some(a)) = (r, a) else { continue };
            let rank_pattern: serde_json::Map<String, serde_json::Value> = mods
                .iter()
                .filter(|(_, mr, _)| *mr != r)
                .map(|(p, mr, _)| (p.clone(), (*mr).into()))
                .collect();
            let alpha_pattern: serde_json::Map<String, serde_json::Value> = mods
                .iter()
                .filter(|(_, _, ma)| *ma != a)
                .map(|(p, _, ma)| (p.clone(), (*ma).into()))
                .collect();
            // Canonical paths (text encoder without `text_model.`) match both CLIP spellings in
            // PEFT's suffix matching of target_modules and its `(.*\.)?(pattern)$` patterns.
            let targets: Vec<serde_json::Value> =
                mods.iter().map(|(p, _, _)| p.clone().into()).collect();
            let n = c.diffusers_name();
            obj.insert(format!("{n}.r"), r.into());
            obj.insert(format!("{n}.lora_alpha"), a.into());
            obj.insert(format!("{n}.rank_pattern"), rank_pattern.into());
            obj.insert(format!("{n}.alpha_pattern"), alpha_pattern.into());
            obj.insert(format!("{n}.target_modules"), targets.into());
            obj.insert(format!("{n}.use_dora"), false.into());
            obj.insert(format!("{n}.use_rslora"), false.into());
            obj.insert(format!("{n}.peft_type"), "LORA".into());
        }
        let text = serde_json::to_string_pretty(&obj)
            .map_err(|e| Error::InvalidArgument(format!("metadata: {e}")))?;
        metadata.insert("lora_adapter_metadata".into(), text);
        metadata
            .entry("format".into())
            .or_insert_with(|| "pt".into());
    }
    write_safetensors(path, tensors, (!metadata.is_empty()).then_some(&metadata))
}
