//! Module names → canonical module paths, against a module list or SD 1.x naming rules.

use std::collections::HashMap;

use super::*;
use crate::Result;

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
