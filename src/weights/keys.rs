//! Every key-name conversion in lorafuse lives here.
//!
//! **Canonical form**: `(Component, module path)`, where the module path is the diffusers module
//! path *inside* that component, dotted, as PyTorch's `named_modules()` prints it:
//!
//! | component | canonical example | note |
//! |---|---|---|
//! | [`Component::Unet`] | `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` | `to_out.0`, `ff.net.0.proj` keep their list indices |
//! | [`Component::TextEncoder`] | `encoder.layers.0.self_attn.q_proj` | **no `text_model.` prefix**: transformers 4.x names it, 5.x state dicts and ONNX exports may not; both spellings are accepted on input and stripped |
//!
//! Dialects converted to and from it (docs/ARCHITECTURE.md §5):
//!
//! | dialect | module key (append the tensor suffix) |
//! |---|---|
//! | diffusers / PEFT in a pipeline file | `unet.<path>`, `text_encoder.text_model.<path>` + `.lora_A.weight` / `.lora_B.weight` |
//! | diffusers legacy | `unet.<path>.lora.down.weight`, `text_encoder.<path>.lora_linear_layer.down.weight` |
//! | PEFT raw (`get_peft_model(...).save_pretrained`) | `base_model.model.<path>` (+ optional adapter name: `.lora_A.default.weight`) |
//! | kohya / sd-scripts / LyCORIS | `lora_unet_<path with . → _>`, `lora_te_text_model_<path with . → _>` (`lora_te1_` from diffusers' converter) + `.lora_down.weight` / `.lora_up.weight` / `.alpha` |
//! | old attn-procs | `unet.<attn path>.processor.to_q_lora.down.weight` (`to_out_lora` = `to_out.0`); text encoder `...self_attn.to_q_lora` = `q_proj`, `to_out_lora` = `out_proj` |
//!
//! kohya's underscored names are ambiguous (`to_out_0`, `transformer_blocks`, `ff_net_0_proj`):
//! [`Resolver`] resolves them against a real module list ([`ModuleSet`]) and only falls back to
//! SD 1.x diffusers naming rules (a fixed vocabulary of multi-word module names) when no list is
//! given. Upstream references: diffusers `loaders/lora_conversion_utils.py`
//! (`_convert_non_diffusers_lora_to_diffusers`, `_convert_unet_lora_key`) and
//! `utils/state_dict_utils.py` (`convert_state_dict_to_kohya`, `UNET_TO_DIFFUSERS`).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use super::WeightFile;
use crate::Result;

/// A model component that LoRAs patch (SD 1.x).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
}

impl Component {
    pub const ALL: [Component; 2] = [Component::Unet, Component::TextEncoder];

    /// The diffusers pipeline sub-folder and LoRA key prefix: `unet` / `text_encoder`.
    pub fn diffusers_name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
        }
    }

    /// kohya's module-name prefix for SD 1.x (`lora_unet`, `lora_te`), without the trailing `_`.
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            Component::Unet => "lora_unet",
            Component::TextEncoder => "lora_te",
        }
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Component::Unet => "UNet",
            Component::TextEncoder => "text encoder",
        })
    }
}

// ------------------------------------------------------------------------------------------------
// Canonical paths and base-weight keys

/// The canonical spelling of a module path: the text encoder loses a leading `text_model.`.
pub fn canonical_path(component: Component, path: &str) -> &str {
    match component {
        Component::Unet => path,
        Component::TextEncoder => path.strip_prefix("text_model.").unwrap_or(path),
    }
}

/// `path` with every `.` replaced by `_` (kohya's module-name spelling).
pub fn underscored(path: &str) -> String {
    path.replace('.', "_")
}

/// Key of a module's parameter in the diffusers-layout base weights
/// (`unet/diffusion_pytorch_model.safetensors`, `text_encoder/model.safetensors` with transformers
/// 4.x naming): `<path>.<param>`, text encoder `text_model.<path>.<param>`.
pub fn weight_key(component: Component, path: &str, param: &str) -> String {
    match component {
        Component::Unet => format!("{path}.{param}"),
        Component::TextEncoder => format!("text_model.{path}.{param}"),
    }
}

/// Inverse of [`weight_key`]: `(canonical module path, param)` of a base-weight key, accepting
/// text encoder keys with or without `text_model.`. `None` for keys without a dot.
pub fn module_of_weight_key(component: Component, key: &str) -> Option<(String, String)> {
    let (path, param) = key.rsplit_once('.')?;
    Some((
        canonical_path(component, path).to_string(),
        param.to_string(),
    ))
}

// ------------------------------------------------------------------------------------------------
// Canonical → dialects (what training writes)

/// kohya module name: `lora_unet_down_blocks_0_..._to_q`, `lora_te_text_model_encoder_layers_0_self_attn_q_proj`
/// (sd-scripts' SD 1.x spelling). Tensor keys append `.lora_down.weight`, `.lora_up.weight`, `.alpha`.
pub fn to_kohya(component: Component, path: &str) -> String {
    let path = canonical_path(component, path);
    match component {
        Component::Unet => format!("lora_unet_{}", underscored(path)),
        Component::TextEncoder => format!("lora_te_text_model_{}", underscored(path)),
    }
}

/// diffusers pipeline-file module key (what `save_lora_weights` writes): `unet.<path>`,
/// `text_encoder.text_model.<path>`. Tensor keys append `.lora_A.weight` / `.lora_B.weight`.
pub fn to_diffusers(component: Component, path: &str) -> String {
    let path = canonical_path(component, path);
    match component {
        Component::Unet => format!("unet.{path}"),
        Component::TextEncoder => format!("text_encoder.text_model.{path}"),
    }
}

/// Raw PEFT module key (a `PeftModel` wrapping the component): `base_model.model.<path>`
/// (text encoder `base_model.model.text_model.<path>`). Tensor keys append `.lora_A.weight`.
pub fn to_peft(component: Component, path: &str) -> String {
    let path = canonical_path(component, path);
    match component {
        Component::Unet => format!("base_model.model.{path}"),
        Component::TextEncoder => format!("base_model.model.text_model.{path}"),
    }
}

/// The module name PEFT matches `rank_pattern` / `alpha_pattern` against: the module's name in
/// the component model (`text_model.<path>` for CLIP).
pub fn peft_module_name(component: Component, path: &str) -> String {
    let path = canonical_path(component, path);
    match component {
        Component::Unet => path.to_string(),
        Component::TextEncoder => format!("text_model.{path}"),
    }
}

// ------------------------------------------------------------------------------------------------
// Module lists

/// The modules that exist in a model, per component, as canonical paths. kohya names are
/// resolved against it, and dotted names are checked against it.
pub trait ModuleSet {
    /// Whether `path` (canonical) is a module of `component`.
    fn contains(&self, component: Component, path: &str) -> bool;
    /// Every canonical module path of `component`.
    fn paths(&self, component: Component) -> Vec<String>;
    /// The torch-layout shape of the module's `weight` (`[out, in]` or `[out, in, kh, kw]`) when
    /// known. LoRA readers then refuse adapters whose ΔW does not fit.
    fn weight_shape(&self, _component: Component, _path: &str) -> Option<Vec<usize>> {
        None
    }
}

/// A [`ModuleSet`] held in memory (with weight shapes when built from weight files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleList {
    unet: BTreeSet<String>,
    text_encoder: BTreeSet<String>,
    shapes: HashMap<(Component, String), Vec<usize>>,
}

impl ModuleList {
    pub fn new() -> Self {
        Self::default()
    }

    fn set(&self, component: Component) -> &BTreeSet<String> {
        match component {
            Component::Unet => &self.unet,
            Component::TextEncoder => &self.text_encoder,
        }
    }

    /// Add a module (canonicalised: a text encoder path loses `text_model.`).
    pub fn insert(&mut self, component: Component, path: &str) {
        let path = canonical_path(component, path).to_string();
        match component {
            Component::Unet => self.unet.insert(path),
            Component::TextEncoder => self.text_encoder.insert(path),
        };
    }

    /// Add a module with the torch-layout shape of its `weight`.
    pub fn insert_with_shape(&mut self, component: Component, path: &str, shape: Vec<usize>) {
        self.insert(component, path);
        self.shapes.insert(
            (component, canonical_path(component, path).to_string()),
            shape,
        );
    }

    /// Add the module of every parameter key (`<path>.weight`, `<path>.bias`, ...).
    pub fn extend_from_weight_keys<'a>(
        &mut self,
        component: Component,
        keys: impl IntoIterator<Item = &'a str>,
    ) {
        for key in keys {
            if let Some((path, _)) = module_of_weight_key(component, key) {
                self.insert(component, &path);
            }
        }
    }

    /// Add the modules of a diffusers-layout weight file (keys `<module>.<param>`), with the
    /// shapes of their `weight` tensors.
    pub fn extend_from_weight_file(&mut self, component: Component, file: &WeightFile) {
        for (key, info) in file.tensors() {
            if let Some((path, param)) = module_of_weight_key(component, key) {
                if param == "weight" {
                    self.insert_with_shape(component, &path, info.shape.clone());
                } else {
                    self.insert(component, &path);
                }
            }
        }
    }

    /// Modules of a diffusers-layout weight file (keys `<module>.<param>`), with weight shapes.
    pub fn from_weight_file(component: Component, file: &WeightFile) -> Self {
        let mut list = Self::new();
        list.extend_from_weight_file(component, file);
        list
    }

    /// Modules of a diffusers pipeline folder: `unet/diffusion_pytorch_model.safetensors` and
    /// `text_encoder/model.safetensors` (whichever exist; at least one must).
    pub fn from_diffusers_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut list = Self::new();
        let mut found = false;
        for (component, rel) in [
            (Component::Unet, "unet/diffusion_pytorch_model.safetensors"),
            (Component::TextEncoder, "text_encoder/model.safetensors"),
        ] {
            let p = dir.join(rel);
            if p.exists() {
                let f = WeightFile::open(&p)?;
                list.extend_from_weight_file(component, &f);
                found = true;
            }
        }
        if !found {
            return Err(crate::Error::InvalidArgument(format!(
                "{}: no unet/diffusion_pytorch_model.safetensors or text_encoder/model.safetensors",
                dir.display()
            )));
        }
        Ok(list)
    }

    pub fn len(&self, component: Component) -> usize {
        self.set(component).len()
    }

    pub fn is_empty(&self) -> bool {
        self.unet.is_empty() && self.text_encoder.is_empty()
    }

    pub fn iter(&self, component: Component) -> impl Iterator<Item = &str> + '_ {
        self.set(component).iter().map(String::as_str)
    }
}

impl ModuleSet for ModuleList {
    fn contains(&self, component: Component, path: &str) -> bool {
        self.set(component)
            .contains(canonical_path(component, path))
    }

    fn paths(&self, component: Component) -> Vec<String> {
        self.set(component).iter().cloned().collect()
    }

    fn weight_shape(&self, component: Component, path: &str) -> Option<Vec<usize>> {
        self.shapes
            .get(&(component, canonical_path(component, path).to_string()))
            .cloned()
    }
}

// ------------------------------------------------------------------------------------------------
// LoRA key grammar

/// Which naming family a LoRA key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyDialect {
    /// `unet.<path>.lora_A.weight` (diffusers ≥ 0.26 / PEFT naming inside a pipeline file).
    Diffusers,
    /// `unet.<path>.lora.down.weight`, `text_encoder.<path>.lora_linear_layer.down.weight`.
    DiffusersLegacy,
    /// `base_model.model.<path>.lora_A[.<adapter>].weight`.
    PeftRaw,
    /// `lora_unet_<name>.lora_down.weight` / `.alpha` and LyCORIS tensors under kohya names.
    Kohya,
    /// `unet.<path>.processor.to_q_lora.down.weight`.
    AttnProcs,
}

/// The tensor a key holds within its module's adapter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Down,
    Up,
    Alpha,
    /// LoCon / LyCORIS Tucker core `lora_mid`.
    Mid,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    LokrT1,
    LokrT2,
    /// DoRA magnitude (`dora_scale`, `lora_magnitude_vector`).
    DoraScale,
    /// LyCORIS "full" weight difference `diff`.
    Diff,
    /// A bias difference (`diff_b`, PEFT `lora_B.bias`).
    BiasDiff,
    /// A tensor name we do not know (OFT, IA3, GLoRA, ...): kept verbatim.
    Other(String),
}

/// Which component a key's prefix names, before resolution.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Unet,
    TextEncoder,
    /// No component prefix (PEFT raw, `save_lora_adapter`, old `save_attn_procs`): inferred later.
    Unknown,
    /// SDXL's second text encoder or sgm UNet naming; the string says what gave it away.
    Sdxl(String),
    /// Some other model (`transformer.`, `lora_transformer_`, ...); the string is the prefix.
    Other(String),
}

/// A module reference as spelled in the file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleName {
    /// A dotted module path (text encoder paths as written, possibly with `text_model.`).
    Dotted(String),
    /// A kohya underscored name without its `lora_unet_` / `lora_te_` prefix.
    Underscored(String),
}

/// A parsed LoRA tensor key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraKey {
    pub dialect: KeyDialect,
    pub target: Target,
    pub module: ModuleName,
    pub role: Role,
    /// PEFT adapter name when the key carries one (`lora_A.default.weight`).
    pub adapter: Option<String>,
}

fn kohya_role(suffix: &str) -> Role {
    match suffix {
        "lora_down.weight" => Role::Down,
        "lora_up.weight" => Role::Up,
        "alpha" => Role::Alpha,
        "lora_mid.weight" => Role::Mid,
        "hada_w1_a" => Role::HadaW1A,
        "hada_w1_b" => Role::HadaW1B,
        "hada_w2_a" => Role::HadaW2A,
        "hada_w2_b" => Role::HadaW2B,
        "hada_t1" => Role::HadaT1,
        "hada_t2" => Role::HadaT2,
        "lokr_w1" => Role::LokrW1,
        "lokr_w1_a" => Role::LokrW1A,
        "lokr_w1_b" => Role::LokrW1B,
        "lokr_w2" => Role::LokrW2,
        "lokr_w2_a" => Role::LokrW2A,
        "lokr_w2_b" => Role::LokrW2B,
        "lokr_t1" => Role::LokrT1,
        "lokr_t2" => Role::LokrT2,
        "dora_scale" => Role::DoraScale,
        "diff" => Role::Diff,
        "diff_b" => Role::BiasDiff,
        other => Role::Other(other.to_string()),
    }
}

/// sgm / LDM UNet block names (kohya SDXL LoRAs); SD 1.x kohya LoRAs use diffusers names.
const SGM_UNET_MARKERS: [&str; 5] = [
    "input_blocks_",
    "output_blocks_",
    "middle_block_",
    "label_emb_",
    "add_embedding_",
];

/// Parse one key of a LoRA file. `None` when the key follows no known LoRA layout.
pub fn parse_lora_key(key: &str) -> Option<LoraKey> {
    // kohya / LyCORIS: `<name without dots>.<suffix>`, name starting with `lora_`.
    if let Some((name, suffix)) = key.split_once('.')
        && name.starts_with("lora_")
    {
        let role = kohya_role(suffix);
        let (target, rest) = if let Some(rest) = name.strip_prefix("lora_unet_") {
            let t = match SGM_UNET_MARKERS
                .iter()
                .find(|m| rest.starts_with(*m) || rest.contains(&format!("_{m}")))
            {
                Some(m) => Target::Sdxl(format!(
                    "sgm/LDM UNet naming `{}`, as kohya SDXL files use",
                    m.trim_end_matches('_')
                )),
                None => Target::Unet,
            };
            (t, rest)
        } else if let Some(rest) = name.strip_prefix("lora_te1_") {
            (Target::TextEncoder, rest)
        } else if let Some(rest) = name.strip_prefix("lora_te_") {
            (Target::TextEncoder, rest)
        } else if let Some(rest) = name.strip_prefix("lora_te2_") {
            (Target::Sdxl("second text encoder `lora_te2_`".into()), rest)
        } else {
            let prefix: String = name.splitn(3, '_').take(2).collect::<Vec<_>>().join("_");
            (Target::Other(prefix), name)
        };
        return Some(LoraKey {
            dialect: KeyDialect::Kohya,
            target,
            module: ModuleName::Underscored(rest.to_string()),
            role,
            adapter: None,
        });
    }

    let (body, role, mut dialect, adapter) = split_dotted_suffix(key)?;
    let (mut target, mut path) = split_component_prefix(body);
    if let Some(p) = body.strip_prefix("base_model.model.") {
        dialect = KeyDialect::PeftRaw;
        let (t, rest) = split_component_prefix(p);
        target = t;
        path = rest;
    }
    let mut path = path.to_string();
    // Old attn-procs: `<attn>.processor.to_q_lora` (or without `.processor`).
    if dialect == KeyDialect::AttnProcs {
        let (attn, proc_name) = path.rsplit_once('.')?;
        let attn = attn.strip_suffix(".processor").unwrap_or(attn);
        let te = match &target {
            Target::TextEncoder => true,
            Target::Unknown => attn.ends_with("self_attn"),
            _ => false,
        };
        let module = match (proc_name, te) {
            ("to_q_lora", false) => "to_q",
            ("to_k_lora", false) => "to_k",
            ("to_v_lora", false) => "to_v",
            ("to_out_lora", false) => "to_out.0",
            ("to_q_lora", true) => "q_proj",
            ("to_k_lora", true) => "k_proj",
            ("to_v_lora", true) => "v_proj",
            ("to_out_lora", true) => "out_proj",
            _ => return None,
        };
        path = format!("{attn}.{module}");
    } else if let Some(p) = path.strip_suffix(".processor") {
        path = p.to_string();
    }
    if path.is_empty() {
        return None;
    }
    if target == Target::Unet || target == Target::Unknown {
        for m in [
            "input_blocks.",
            "output_blocks.",
            "middle_block.",
            "label_emb.",
            "add_embedding.",
        ] {
            if path.starts_with(m) || path.contains(&format!(".{m}")) {
                target = Target::Sdxl(format!(
                    "sgm/LDM UNet naming `{}`, as kohya SDXL files use",
                    m.trim_end_matches('.')
                ));
            }
        }
    }
    Some(LoraKey {
        dialect,
        target,
        module: ModuleName::Dotted(path),
        role,
        adapter,
    })
}

/// `unet.` / `text_encoder.` / ... prefix of a dotted key body.
fn split_component_prefix(body: &str) -> (Target, &str) {
    if let Some(p) = body.strip_prefix("unet.") {
        (Target::Unet, p)
    } else if let Some(p) = body.strip_prefix("text_encoder_2.") {
        (
            Target::Sdxl("second text encoder `text_encoder_2.`".into()),
            p,
        )
    } else if let Some(p) = body.strip_prefix("text_encoder.") {
        (Target::TextEncoder, p)
    } else {
        for other in [
            "transformer.",
            "prior.",
            "decoder.",
            "controlnet.",
            "vae.",
            "model.diffusion_model.",
        ] {
            if let Some(p) = body.strip_prefix(other) {
                return (Target::Other(other.trim_end_matches('.').to_string()), p);
            }
        }
        (Target::Unknown, body)
    }
}

/// Split a dotted key into `(module part, role, dialect, adapter name)`.
fn split_dotted_suffix(key: &str) -> Option<(&str, Role, KeyDialect, Option<String>)> {
    const FIXED: [(&str, Role, KeyDialect); 6] = [
        (".lora.down.weight", Role::Down, KeyDialect::DiffusersLegacy),
        (".lora.up.weight", Role::Up, KeyDialect::DiffusersLegacy),
        (
            ".lora_linear_layer.down.weight",
            Role::Down,
            KeyDialect::DiffusersLegacy,
        ),
        (
            ".lora_linear_layer.up.weight",
            Role::Up,
            KeyDialect::DiffusersLegacy,
        ),
        (".lora_down.weight", Role::Down, KeyDialect::Diffusers),
        (".lora_up.weight", Role::Up, KeyDialect::Diffusers),
    ];
    for (suffix, role, dialect) in FIXED {
        if let Some(body) = key.strip_suffix(suffix) {
            return Some((body, role, dialect, None));
        }
    }
    for proc_name in ["to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora"] {
        for (dir, role) in [("down", Role::Down), ("up", Role::Up)] {
            let suffix = format!(".{dir}.weight");
            if let Some(body) = key.strip_suffix(&suffix)
                && body.ends_with(&format!(".{proc_name}"))
            {
                return Some((body, role, KeyDialect::AttnProcs, None));
            }
        }
    }
    if let Some(body) = key.strip_suffix(".alpha") {
        return Some((body, Role::Alpha, KeyDialect::Diffusers, None));
    }
    // PEFT: `.lora_A.weight`, `.lora_A.<adapter>.weight`, `.lora_B.bias`, `.lora_magnitude_vector[.<adapter>][.weight]`.
    let segs: Vec<&str> = key.split('.').collect();
    let find = |name: &str| segs.iter().rposition(|s| *s == name);
    for (name, role) in [
        ("lora_A", Role::Down),
        ("lora_B", Role::Up),
        ("lora_magnitude_vector", Role::DoraScale),
    ] {
        let Some(i) = find(name) else { continue };
        if i == 0 {
            continue;
        }
        let tail = &segs[i + 1..];
        let (role, adapter) = match (tail, &role) {
            (["weight"], _) => (role, None),
            (["bias"], Role::Up) => (Role::BiasDiff, None),
            ([a, "weight"], _) => (role, Some(a.to_string())),
            ([a, "bias"], Role::Up) => (Role::BiasDiff, Some(a.to_string())),
            ([], Role::DoraScale) => (role, None),
            ([a], Role::DoraScale) => (role, Some(a.to_string())),
            _ => continue,
        };
        let body_len = segs[..i].iter().map(|s| s.len() + 1).sum::<usize>() - 1;
        return Some((&key[..body_len], role, KeyDialect::Diffusers, adapter));
    }
    None
}

// ------------------------------------------------------------------------------------------------
// Resolution

/// Why a key maps to no module.
#[derive(Debug, Clone, PartialEq)]
pub enum UnmappedReason {
    /// An SDXL LoRA (the detail names the evidence); lorafuse targets SD 1.x.
    Sdxl(String),
    /// Made for another model family (prefix given).
    OtherModel(String),
    /// Parsed to a module the model does not have.
    NoSuchModule { component: Component, path: String },
    /// A kohya name that matches no module (and SD 1.x naming rules could not split it).
    Unresolved(String),
    /// A kohya name that matches several modules.
    Ambiguous(Vec<String>),
    /// Not a LoRA key in any known layout.
    UnknownKey,
    /// A known but unsupported adapter type (DoRA, OFT, IA3, bias diffs...).
    Unsupported(String),
    /// The module's tensors are incomplete or inconsistent (missing `up`, shape mismatch...).
    Invalid(String),
    /// Another key already supplied this module.
    Duplicate(String),
    /// The module's ΔW does not have the shape of the model's weight (a LoRA for another model).
    WrongShape {
        component: Component,
        module: String,
        delta: Vec<usize>,
        weight: Vec<usize>,
    },
}

impl std::fmt::Display for UnmappedReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnmappedReason::Sdxl(why) => {
                write!(
                    f,
                    "SDXL LoRA ({why}); lorafuse merges into SD 1.x models only"
                )
            }
            UnmappedReason::OtherModel(p) => {
                write!(f, "targets another model family (prefix `{p}`), not SD 1.x")
            }
            UnmappedReason::NoSuchModule { component, path } => {
                write!(f, "the {component} has no module `{path}`")
            }
            UnmappedReason::Unresolved(n) => write!(f, "kohya name `{n}` matches no module"),
            UnmappedReason::Ambiguous(c) => {
                write!(f, "kohya name matches several modules: {}", c.join(", "))
            }
            UnmappedReason::UnknownKey => f.write_str(
                "not a LoRA key in any known layout (diffusers, PEFT, kohya, attn-procs)",
            ),
            UnmappedReason::Unsupported(what) => write!(f, "unsupported: {what}"),
            UnmappedReason::Invalid(what) => write!(f, "invalid: {what}"),
            UnmappedReason::Duplicate(other) => write!(f, "module already given by `{other}`"),
            UnmappedReason::WrongShape {
                component,
                module,
                delta,
                weight,
            } => write!(
                f,
                "ΔW {delta:?} does not fit the {component} weight `{module}` {weight:?}"
            ),
        }
    }
}

/// SD 1.x diffusers module names made of several `_`-joined words (UNet and CLIP text encoder).
/// Used only when no module list is available to split kohya names.
const COMPOUNDS: &[&str] = &[
    // UNet2DConditionModel
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "proj_in",
    "proj_out",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "time_emb_proj",
    "conv_shortcut",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "linear_1",
    "linear_2",
    // CLIPTextModel
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "layer_norm1",
    "layer_norm2",
    "final_layer_norm",
    "token_embedding",
    "position_embedding",
];

/// Single-word SD 1.x module names.
const WORDS: &[&str] = &[
    "attentions",
    "resnets",
    "downsamplers",
    "upsamplers",
    "attn1",
    "attn2",
    "ff",
    "net",
    "proj",
    "conv",
    "conv1",
    "conv2",
    "norm",
    "norm1",
    "norm2",
    "norm3",
    "encoder",
    "layers",
    "mlp",
    "fc1",
    "fc2",
    "embeddings",
];

/// Split a kohya underscored name by SD 1.x diffusers naming rules: `to_out_0` → `to_out.0`,
/// `ff_net_0_proj` → `ff.net.0.proj`. `None` when a word is not an SD 1.x module name.
pub fn split_sd1_underscored(name: &str) -> Option<String> {
    let toks: Vec<&str> = name.split('_').collect();
    let mut segs: Vec<String> = Vec::new();
    let mut i = 0;
    'outer: while i < toks.len() {
        for len in (2..=3).rev() {
            if i + len <= toks.len() {
                let cand = toks[i..i + len].join("_");
                if COMPOUNDS.contains(&cand.as_str()) {
                    segs.push(cand);
                    i += len;
                    continue 'outer;
                }
            }
        }
        let t = toks[i];
        let numeric = !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !(numeric || WORDS.contains(&t)) {
            return None;
        }
        segs.push(t.to_string());
        i += 1;
    }
    if segs.is_empty() {
        None
    } else {
        Some(segs.join("."))
    }
}

/// First path segments that identify a component when a key has no prefix.
fn infer_component(path: &str) -> Option<Component> {
    let first = path.split('.').next().unwrap_or("");
    match first {
        "down_blocks" | "up_blocks" | "mid_block" | "conv_in" | "conv_out" | "conv_norm_out"
        | "time_embedding" => Some(Component::Unet),
        "text_model" | "encoder" | "embeddings" | "final_layer_norm" => {
            Some(Component::TextEncoder)
        }
        _ => None,
    }
}

/// Resolves parsed module names to canonical `(Component, path)`, against a module list when one
/// is given (built once per LoRA file: the kohya index is a hash map over every module).
pub struct Resolver<'a> {
    modules: Option<&'a dyn ModuleSet>,
    kohya: HashMap<(Component, String), Vec<String>>,
}

impl<'a> Resolver<'a> {
    pub fn new(modules: Option<&'a dyn ModuleSet>) -> Self {
        let mut kohya: HashMap<(Component, String), Vec<String>> = HashMap::new();
        if let Some(m) = modules {
            for c in Component::ALL {
                for p in m.paths(c) {
                    let p = canonical_path(c, &p).to_string();
                    kohya.entry((c, underscored(&p))).or_default().push(p);
                }
            }
        }
        Self { modules, kohya }
    }

    /// Resolve a kohya underscored name (prefix removed) of `component`.
    pub fn resolve_underscored(
        &self,
        component: Component,
        name: &str,
    ) -> Result<String, UnmappedReason> {
        let name = match component {
            Component::TextEncoder => name.strip_prefix("text_model_").unwrap_or(name),
            Component::Unet => name,
        };
        match self.modules {
            Some(_) => match self
                .kohya
                .get(&(component, name.to_string()))
                .map(Vec::as_slice)
            {
                Some([one]) => Ok(one.clone()),
                Some(many) if many.len() > 1 => Err(UnmappedReason::Ambiguous(many.to_vec())),
                // Not in the model: name the module when SD 1.x rules can spell it.
                _ => Err(match split_sd1_underscored(name) {
                    Some(path) => UnmappedReason::NoSuchModule { component, path },
                    None => {
                        UnmappedReason::Unresolved(format!("{}_{name}", component.kohya_prefix()))
                    }
                }),
            },
            None => split_sd1_underscored(name).ok_or_else(|| {
                UnmappedReason::Unresolved(format!("{}_{name}", component.kohya_prefix()))
            }),
        }
    }

    /// Resolve a dotted path with a known or unknown component.
    pub fn resolve_dotted(
        &self,
        target: Option<Component>,
        path: &str,
    ) -> Result<(Component, String), UnmappedReason> {
        let candidates: Vec<Component> = match target {
            Some(c) => vec![c],
            None => match self.modules {
                Some(m) => Component::ALL
                    .into_iter()
                    .filter(|&c| m.contains(c, canonical_path(c, path)))
                    .collect(),
                None => infer_component(path).into_iter().collect(),
            },
        };
        match candidates.as_slice() {
            [c] => {
                let p = canonical_path(*c, path).to_string();
                match self.modules {
                    Some(m) if !m.contains(*c, &p) => Err(UnmappedReason::NoSuchModule {
                        component: *c,
                        path: p,
                    }),
                    _ => Ok((*c, p)),
                }
            }
            [] => match target.or_else(|| infer_component(path)) {
                Some(c) => Err(UnmappedReason::NoSuchModule {
                    component: c,
                    path: canonical_path(c, path).to_string(),
                }),
                None => Err(UnmappedReason::Unresolved(path.to_string())),
            },
            many => Err(UnmappedReason::Ambiguous(
                many.iter().map(|c| format!("{c} `{path}`")).collect(),
            )),
        }
    }

    /// Resolve the module of a parsed key.
    pub fn resolve(&self, key: &LoraKey) -> Result<(Component, String), UnmappedReason> {
        let component = match &key.target {
            Target::Unet => Some(Component::Unet),
            Target::TextEncoder => Some(Component::TextEncoder),
            Target::Unknown => None,
            Target::Sdxl(why) => return Err(UnmappedReason::Sdxl(why.clone())),
            Target::Other(p) => return Err(UnmappedReason::OtherModel(p.clone())),
        };
        match &key.module {
            ModuleName::Dotted(p) => self.resolve_dotted(component, p),
            ModuleName::Underscored(n) => {
                let c = component.ok_or_else(|| UnmappedReason::Unresolved(n.clone()))?;
                Ok((c, self.resolve_underscored(c, n)?))
            }
        }
    }
}

/// Canonical `(Component, path)` of a kohya module name (`lora_unet_...`, `lora_te_...`,
/// `lora_te1_...`), resolved against `modules` when given, else by SD 1.x naming rules.
pub fn from_kohya(
    name: &str,
    modules: Option<&dyn ModuleSet>,
) -> Result<(Component, String), UnmappedReason> {
    let key =
        parse_lora_key(&format!("{name}.lora_down.weight")).ok_or(UnmappedReason::UnknownKey)?;
    Resolver::new(modules).resolve(&key)
}

/// Canonical `(Component, path)` of a dotted module key (`unet.<path>`, `text_encoder.<path>`,
/// `base_model.model.<path>`, or a bare path whose component is inferred).
pub fn from_dotted(
    name: &str,
    modules: Option<&dyn ModuleSet>,
) -> Result<(Component, String), UnmappedReason> {
    let key = parse_lora_key(&format!("{name}.lora_A.weight")).ok_or(UnmappedReason::UnknownKey)?;
    Resolver::new(modules).resolve(&key)
}
