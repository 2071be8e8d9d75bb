//! Reading: dialect detection, module grouping, each module's kind, factors and scale.

use std::collections::{BTreeMap, HashMap};

use super::config::{ConfigSource, load_config_source};
use super::*;
use crate::weights::keys::{
    self, KeyDialect, LoraKey, ModuleName, Resolver, Role, Target, UnmappedReason,
};
use crate::weights::{Component, Dtype, Tensor, WeightFile};
use crate::{Error, Result};

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
    let (parsed, mut unmapped) = parse_keys(file);
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
    let mut adapter = LoraAdapter {
        path: path.clone(),
        dialect,
        modules: Vec::new(),
        unmapped: Vec::new(),
        metadata: file.metadata().clone(),
        dtype: majority_dtype(file, &parsed),
        notes: Vec::new(),
    };

    // An SDXL file is refused as a whole: half of it (te1) would fit SD 1.x and mislead.
    let resolver = Resolver::new(opts.modules);
    let sdxl = sdxl_evidence(&parsed, opts, &resolver);
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

    let groups = group_keys(&parsed, &resolver, &mut unmapped);
    if groups.adapter_names.len() > 1 {
        adapter.notes.push(format!(
            "several PEFT adapter names in one file ({}): the first key of each module wins, the rest are reported as duplicates",
            groups.adapter_names.keys().cloned().collect::<Vec<_>>().join(", ")
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
    add_modules(file, opts, &config, groups, &mut adapter, &mut unmapped)?;
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

/// Every key parsed by the LoRA key grammar; those it does not know are unmapped.
fn parse_keys(file: &WeightFile) -> (Vec<(String, LoraKey)>, Vec<Unmapped>) {
    let mut unmapped = Vec::new();
    let mut parsed = Vec::new();
    for name in file.names() {
        match keys::parse_lora_key(name) {
            Some(k) => parsed.push((name.to_string(), k)),
            None => unmapped.push(Unmapped {
                key: name.to_string(),
                reason: UnmappedReason::UnknownKey,
            }),
        }
    }
    (parsed, unmapped)
}

/// The element type most factor tensors have.
fn majority_dtype(file: &WeightFile, parsed: &[(String, LoraKey)]) -> Option<Dtype> {
    let mut dtype_count: BTreeMap<String, (Dtype, usize)> = BTreeMap::new();
    for (name, k) in parsed {
        if k.role != Role::Alpha
            && let Some(info) = file.info(name)
        {
            dtype_count
                .entry(format!("{:?}", info.dtype))
                .or_insert((info.dtype, 0))
                .1 += 1;
        }
    }
    dtype_count
        .values()
        .max_by_key(|(_, n)| *n)
        .map(|(d, _)| *d)
}

/// Why keys look like SDXL's: SDXL-only prefixes (`lora_te2_`, `text_encoder_2.`, sgm
/// `input_blocks`), or a UNet `transformer_blocks.N` with N ≥ 1 that the model lacks (SD 1.x has
/// one transformer block per attention, SDXL 2 or 10).
fn sdxl_evidence(
    parsed: &[(String, LoraKey)],
    opts: &ReadOptions<'_>,
    resolver: &Resolver<'_>,
) -> Vec<String> {
    parsed
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
        .collect()
}

/// Keys grouped by the module they resolve to, in file order.
struct Groups {
    /// (component, path) → role → key
    by_module: BTreeMap<(Component, String), BTreeMap<Role, String>>,
    order: Vec<(Component, String)>,
    /// PEFT adapter names and their key counts.
    adapter_names: BTreeMap<String, usize>,
}

fn group_keys(
    parsed: &[(String, LoraKey)],
    resolver: &Resolver<'_>,
    unmapped: &mut Vec<Unmapped>,
) -> Groups {
    let mut resolved_cache: HashMap<
        (Target, ModuleName),
        std::result::Result<(Component, String), UnmappedReason>,
    > = HashMap::new();
    let mut g = Groups {
        by_module: BTreeMap::new(),
        order: Vec::new(),
        adapter_names: BTreeMap::new(),
    };
    for (name, k) in parsed {
        if let Some(a) = &k.adapter {
            *g.adapter_names.entry(a.clone()).or_default() += 1;
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
                let roles = g.by_module.entry(module.clone()).or_insert_with(|| {
                    g.order.push(module.clone());
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
    g
}

/// Build each grouped module; ΔW is checked against the model's weight shape where the module
/// list knows it. Modules that cannot be used are reported through `unmapped`, key by key.
fn add_modules(
    file: &WeightFile,
    opts: &ReadOptions<'_>,
    config: &ConfigSource,
    mut groups: Groups,
    adapter: &mut LoraAdapter,
    unmapped: &mut Vec<Unmapped>,
) -> Result<()> {
    for (component, module_path) in std::mem::take(&mut groups.order) {
        let Some(roles) = groups.by_module.remove(&(component, module_path.clone())) else {
            continue;
        };
        let all_keys: Vec<String> = roles.values().cloned().collect();
        let dora_cfg = config.get(component).is_some_and(|cfg| cfg.use_dora);
        let reason = match build_module(file, component, &module_path, &roles, config, dora_cfg)? {
            Ok(m) => {
                let target = opts
                    .modules
                    .and_then(|ms| ms.weight_shape(component, &module_path));
                let dshape = crate::lora::merge::delta_shape(&m.kind);
                match target {
                    Some(t) if !crate::lora::merge::shape_fits(&dshape, &t) => {
                        UnmappedReason::WrongShape {
                            component,
                            module: module_path.clone(),
                            delta: dshape.clone(),
                            weight: t.clone(),
                        }
                    }
                    _ => {
                        adapter.modules.push(m);
                        continue;
                    }
                }
            }
            Err(reason) => reason,
        };
        for key in all_keys {
            unmapped.push(Unmapped {
                key,
                reason: reason.clone(),
            });
        }
    }
    Ok(())
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

/// The tensors of one module, by role, and what every family builder needs from them.
struct ModuleParts<'a> {
    file: &'a WeightFile,
    component: Component,
    module_path: &'a str,
    roles: &'a BTreeMap<Role, String>,
    keys: Vec<String>,
    alpha: Option<f32>,
}

impl ModuleParts<'_> {
    fn get(&self, r: Role) -> Result<Option<Tensor>> {
        match self.roles.get(&r) {
            Some(k) => Ok(Some(read_factor(self.file, k)?)),
            None => Ok(None),
        }
    }

    fn has(&self, r: &[Role]) -> bool {
        r.iter().any(|r| self.roles.contains_key(r))
    }

    fn module(&self, kind: LoraKind, rank: usize, scale: f32, alpha: Option<f32>) -> Built {
        Ok(LoraModule {
            component: self.component,
            module_path: self.module_path.to_string(),
            kind,
            alpha,
            rank,
            scale,
            keys: self.keys.clone(),
        })
    }

    /// kohya / LyCORIS rule: no alpha (or 0) means alpha = rank.
    fn kohya_scale(&self, rank: usize) -> f32 {
        match self.alpha {
            Some(a) if a != 0.0 && rank > 0 => a / rank as f32,
            _ => 1.0,
        }
    }
}

/// Why a module's roles are an adapter type we do not merge, if they are.
fn unsupported(roles: &BTreeMap<Role, String>, dora_cfg: bool) -> Option<UnmappedReason> {
    if roles.contains_key(&Role::DoraScale) || dora_cfg {
        return Some(UnmappedReason::Unsupported(
            "DoRA (`dora_scale` / `lora_magnitude_vector` / use_dora): its weight-norm rescaling is not implemented".into(),
        ));
    }
    if let Some(other) = roles.keys().find_map(|r| match r {
        Role::Other(s) => Some(s.clone()),
        _ => None,
    }) {
        return Some(UnmappedReason::Unsupported(format!(
            "adapter tensor `{other}` (OFT, BOFT, IA3, GLoRA, DyLoRA and other non-LoRA/LoHa/LoKr types are not supported)"
        )));
    }
    if roles.contains_key(&Role::BiasDiff) {
        return Some(UnmappedReason::Unsupported(
            "bias difference (`diff_b` / PEFT `lora_B.bias`)".into(),
        ));
    }
    if roles.contains_key(&Role::LokrT1) {
        return Some(UnmappedReason::Unsupported(
            "LoKr `lokr_t1` (a Tucker core on w1)".into(),
        ));
    }
    None
}

/// The adapter families a module's tensors belong to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Lora,
    LoHa,
    LoKr,
    Diff,
}

fn build_module(
    file: &WeightFile,
    component: Component,
    module_path: &str,
    roles: &BTreeMap<Role, String>,
    config: &ConfigSource,
    dora_cfg: bool,
) -> Result<Built> {
    if let Some(reason) = unsupported(roles, dora_cfg) {
        return Ok(Err(reason));
    }
    let alpha = match roles.get(&Role::Alpha) {
        Some(k) => Some(read_alpha(file, k)?),
        None => None,
    };
    let parts = ModuleParts {
        file,
        component,
        module_path,
        roles,
        keys: roles.values().cloned().collect(),
        alpha,
    };
    let families: Vec<Family> = [
        (Family::Lora, &[Role::Down, Role::Up, Role::Mid][..]),
        (
            Family::LoHa,
            &[
                Role::HadaW1A,
                Role::HadaW1B,
                Role::HadaW2A,
                Role::HadaW2B,
                Role::HadaT1,
                Role::HadaT2,
            ][..],
        ),
        (
            Family::LoKr,
            &[
                Role::LokrW1,
                Role::LokrW1A,
                Role::LokrW1B,
                Role::LokrW2,
                Role::LokrW2A,
                Role::LokrW2B,
                Role::LokrT2,
            ][..],
        ),
        (Family::Diff, &[Role::Diff][..]),
    ]
    .into_iter()
    .filter(|(_, r)| parts.has(r))
    .map(|(f, _)| f)
    .collect();
    match families.as_slice() {
        [] => Ok(invalid("only an `alpha`, no weights".into())),
        [Family::Lora] => build_lora(&parts, config),
        [Family::LoHa] => build_loha(&parts),
        [Family::LoKr] => build_lokr(&parts),
        [Family::Diff] => {
            let Some(diff) = parts.get(Role::Diff)? else {
                return Ok(invalid("missing `diff`".into()));
            };
            Ok(parts.module(LoraKind::Full { diff }, 0, 1.0, alpha))
        }
        _ => Ok(invalid(
            "mixes tensors of several adapter types (LoRA, LoHa, LoKr, diff)".into(),
        )),
    }
}

/// LoRA / LoCon: down, up, optional mid (Tucker); scale from the PEFT config or kohya's alpha/r.
fn build_lora(parts: &ModuleParts<'_>, config: &ConfigSource) -> Result<Built> {
    let (Some(down), Some(up)) = (parts.get(Role::Down)?, parts.get(Role::Up)?) else {
        return Ok(invalid(
            "a LoRA needs both down (lora_A) and up (lora_B)".into(),
        ));
    };
    let mid = parts.get(Role::Mid)?;
    if let Err(msg) = check_lora_shapes(&down, &up, mid.as_ref()) {
        return Ok(invalid(msg));
    }
    let rank = down.shape[0];
    let module_path = parts.module_path;
    let (alpha, scale) = match config.get(parts.component) {
        Some(cfg) => {
            let (r, a) = cfg.r_alpha(&keys::peft_module_name(parts.component, module_path), rank);
            let scale = cfg.scale(r, a) as f32;
            if !(r > 0.0 && a.is_finite() && scale.is_finite()) {
                return Err(Error::Lora {
                    file: parts.file.path().to_path_buf(),
                    msg: format!(
                        "`{module_path}`: the adapter config gives r = {r}, lora_alpha = {a} \
                         (scale {scale}); r must be positive and both finite"
                    ),
                });
            }
            (Some(a as f32), scale)
        }
        None => (parts.alpha, parts.kohya_scale(rank)),
    };
    Ok(parts.module(LoraKind::Lora { down, up, mid }, rank, scale, alpha))
}

/// LyCORIS LoHa: two Hadamard-multiplied low-rank products, optional Tucker cores.
fn build_loha(parts: &ModuleParts<'_>) -> Result<Built> {
    let (Some(w1a), Some(w1b), Some(w2a), Some(w2b)) = (
        parts.get(Role::HadaW1A)?,
        parts.get(Role::HadaW1B)?,
        parts.get(Role::HadaW2A)?,
        parts.get(Role::HadaW2B)?,
    ) else {
        return Ok(invalid(
            "LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b".into(),
        ));
    };
    let (t1, t2) = (parts.get(Role::HadaT1)?, parts.get(Role::HadaT2)?);
    if t1.is_some() != t2.is_some() {
        return Ok(invalid("LoHa Tucker needs both hada_t1 and hada_t2".into()));
    }
    if let Err(msg) = check_loha_shapes(&w1a, &w1b, &w2a, &w2b, t1.as_ref(), t2.as_ref()) {
        return Ok(invalid(msg));
    }
    let rank = w1b.shape[0];
    let kind = LoraKind::LoHa {
        w1a,
        w1b,
        w2a,
        w2b,
        t1,
        t2,
    };
    Ok(parts.module(kind, rank, parts.kohya_scale(rank), parts.alpha))
}

/// LyCORIS LoKr: a Kronecker product of two factors, each full or low-rank.
fn build_lokr(parts: &ModuleParts<'_>) -> Result<Built> {
    let factor =
        |full: Role, a: Role, b: Role| -> Result<std::result::Result<KronFactor, String>> {
            Ok(match (parts.get(full)?, parts.get(a)?, parts.get(b)?) {
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
    let t2 = parts.get(Role::LokrT2)?;
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
    let scale = if rank == 0 {
        1.0
    } else {
        parts.kohya_scale(rank)
    };
    Ok(parts.module(LoraKind::LoKr { w1, w2, t2 }, rank, scale, parts.alpha))
}

pub(super) fn check_lora_shapes(
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

pub(super) fn check_loha_shapes(
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

pub(super) fn check_lokr_shapes(
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
