//! The LoRA key grammar and every &str key conversion.
//!
//! src/weights/keys.rs: `parse_lora_key`, `Resolver::resolve` (without and with a module list),
//! `from_kohya`, `from_dotted`, `split_sd1_underscored`, `canonical_path`, `underscored`,
//! `weight_key`, `module_of_weight_key`, `to_kohya`, `to_diffusers`, `to_peft`,
//! `peft_module_name`; src/onnx/index.rs: `canonical_module_path`.
//! The input is read as UTF-8 (lossy), whole and line by line.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use lorafuse::onnx::canonical_module_path;
use lorafuse::weights::keys::{
    self, Component, ModuleList, ModuleSet, Resolver, parse_lora_key, split_sd1_underscored,
};

/// A few real SD 1.x module paths (with the kohya-ambiguous spellings), for resolution against
/// a module list.
fn modules() -> &'static ModuleList {
    static M: OnceLock<ModuleList> = OnceLock::new();
    M.get_or_init(|| {
        let mut m = ModuleList::new();
        for p in [
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
            "down_blocks.0.attentions.0.proj_in",
            "mid_block.resnets.0.conv1",
            "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k",
        ] {
            m.insert_with_shape(Component::Unet, p, vec![32, 32]);
        }
        for p in [
            "encoder.layers.0.self_attn.q_proj",
            "encoder.layers.0.self_attn.out_proj",
            "encoder.layers.0.mlp.fc1",
        ] {
            m.insert(Component::TextEncoder, p);
        }
        m
    })
}

fn one(key: &str) {
    let listed: &dyn ModuleSet = modules();
    if let Some(k) = parse_lora_key(key) {
        let _ = Resolver::new(None).resolve(&k);
        let _ = Resolver::new(Some(listed)).resolve(&k);
    }
    let _ = keys::from_kohya(key, None);
    let _ = keys::from_kohya(key, Some(listed));
    let _ = keys::from_dotted(key, None);
    let _ = keys::from_dotted(key, Some(listed));
    let _ = split_sd1_underscored(key);
    let _ = canonical_module_path(key);
    for c in Component::ALL {
        let _ = keys::canonical_path(c, key);
        let _ = keys::weight_key(c, key, "weight");
        let _ = keys::module_of_weight_key(c, key);
        let _ = keys::to_kohya(c, key);
        let _ = keys::to_diffusers(c, key);
        let _ = keys::to_peft(c, key);
        let _ = keys::peft_module_name(c, key);
        let _ = Resolver::new(None).resolve_underscored(c, key);
        let _ = Resolver::new(Some(listed)).resolve_dotted(Some(c), key);
    }
    let _ = Resolver::new(None).resolve_dotted(None, key);
    let _ = keys::underscored(key);
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    one(&text);
    for line in text.lines() {
        one(line);
    }
});
