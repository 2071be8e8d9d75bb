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

use super::WeightFile;

mod grammar;
mod modules;
mod resolve;

pub use self::grammar::{KeyDialect, LoraKey, ModuleName, Role, Target, parse_lora_key};
pub use self::modules::{ModuleList, ModuleSet};
pub use self::resolve::{Resolver, UnmappedReason, from_dotted, from_kohya, split_sd1_underscored};

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
