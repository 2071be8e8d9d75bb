//! LoRA files: every dialect read into one canonical [`LoraAdapter`], and the merge maths.
//!
//! - [`format`](mod@format): read a LoRA safetensors file, detect its dialect, resolve every module to the
//!   canonical `(Component, module path)` of [`crate::weights::keys`], decide the adapter kind
//!   and its scale, and report every key that maps nowhere ([`LoraAdapter::unmapped`]).
//!   [`write()`] writes standard LoRA modules back in the diffusers or kohya layout (for trainers).
//! - [`merge`]: ΔW per kind, and W' = W + Σ wᵢ·ΔWᵢ in f32 into torch-layout or `[in, out]`
//!   weights ([`merge_into`]); [`merge_state_dict`] merges into a diffusers-layout safetensors
//!   file (what trainers need).
//!
//! ## Dialects (keys as observed with diffusers 0.42.1 / peft 0.21.2, plus older writers)
//!
//! | dialect | keys | scale |
//! |---|---|---|
//! | diffusers (`save_lora_weights` today) | `unet.<path>.lora_A.weight` `[r,in(,kh,kw)]` / `.lora_B.weight` `[out,r(,1,1)]`; `text_encoder.[text_model.]<path>.lora_A.weight` | header `lora_adapter_metadata` JSON (`unet.r`, `unet.lora_alpha`, `unet.rank_pattern`, `unet.alpha_pattern`, `unet.use_rslora`, `text_encoder.*`): `alpha / r` per module; none → 1 |
//! | diffusers legacy | `unet.<path>.lora.down.weight` / `.lora.up.weight`; `text_encoder.[text_model.]<path>.lora_linear_layer.down.weight` | `.alpha` keys if any, else 1 |
//! | PEFT raw | `base_model.model.<path>.lora_A[.<adapter>].weight` | `adapter_config.json` (explicit, `<stem>_adapter_config.json`, or beside the file) or `lora_adapter_metadata`; none → 1 with a note |
//! | kohya / sd-scripts / A1111 | `lora_unet_<path _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (any float or I64, shape `[]` or `[1]`); `lora_te_` / `lora_te1_` (diffusers' converter) + `text_model_encoder_layers_0_self_attn_q_proj` | `alpha / rank`, rank = rows of `lora_down`; no alpha or 0 → 1 |
//! | LyCORIS under kohya names | LoHa `hada_w1_a/b`, `hada_w2_a/b` (+ `hada_t1/t2`); LoKr `lokr_w1` or `lokr_w1_a/b`, `lokr_w2` or `lokr_w2_a/b` (+ `lokr_t2`); LoCon `lora_mid`; `diff` | `alpha / rank` (rank = rows of the `_b` factor); LoKr with both factors full → 1; no alpha → 1 |
//! | old attn-procs (diffusers 0.17–0.20) | `unet.<attn>.processor.to_q_lora.down.weight` (`to_out_lora` → `to_out.0`); text encoder `…self_attn.to_q_lora` → `q_proj`, `to_out_lora` → `out_proj` | 1 (or `.alpha`) |
//! | refused with a reason | SDXL (`lora_te2_`, `text_encoder_2.`, sgm `input_blocks`, or a UNet `transformer_blocks.N≥1` the model lacks): the whole file; DoRA (`dora_scale`, `lora_magnitude_vector`, `use_dora`), OFT/IA3/…, bias diffs: the module | — |
//!
//! kohya's underscored names are resolved against the caller's module list
//! ([`crate::weights::ModuleSet`], from the ONNX weight index or a diffusers safetensors key set),
//! with SD 1.x diffusers naming rules as the fallback when none is given. When the module set
//! knows weight shapes ([`crate::weights::ModuleSet::weight_shape`]), a module whose ΔW does not
//! fit the model's weight is reported instead of read.
//!
//! ## Upstream references (read for the maths and key rules; the code here is our own)
//! - diffusers `src/diffusers/loaders/lora_conversion_utils.py` (`_convert_non_diffusers_lora_to_diffusers`,
//!   `_convert_unet_lora_key`, `_convert_text_encoder_lora_key`) and `src/diffusers/utils/state_dict_utils.py`
//!   (`UNET_TO_DIFFUSERS`, `DIFFUSERS_OLD_TO_PEFT`, `convert_state_dict_to_kohya`: writes `lora_te1_` and
//!   an I64 `alpha = rank`), `src/diffusers/loaders/lora_base.py` (`lora_adapter_metadata`).
//! - peft `src/peft/tuners/lora/layer.py` (`scaling = lora_alpha / r`, rsLoRA `/ sqrt(r)`,
//!   `Conv2d.get_delta_weight`), `src/peft/utils/other.py` (`get_pattern_key`).
//! - kohya-ss sd-scripts `networks/lora.py` (`LoRAModule`: `scale = alpha / lora_dim`, alpha 0/None → dim;
//!   names `lora_unet_` + module path with `.` → `_`).
//! - KohakuBlueleaf/LyCORIS `lycoris/modules/loha.py`, `lycoris/modules/lokr.py`,
//!   `lycoris/functional/{loha,lokr,general}.py` (`rebuild_tucker`, `make_kron`, LoKr full-matrix scale 1).

pub mod format;
pub mod merge;
mod spec;

pub use self::spec::{LoraSpec, MAX_LORA_WEIGHT, check_lora_weight};

pub use self::format::{
    Dialect, KronFactor, LoraAdapter, LoraKind, LoraModule, PeftConfig, ReadOptions, Unmapped,
    WriteOptions, WriteStyle, read, read_file, write,
};
pub use self::merge::{
    Layout, MergeReport, add_delta, delta, delta_shape, merge_deltas_into, merge_into,
    merge_state_dict, shape_fits,
};
pub use crate::weights::keys::UnmappedReason;
