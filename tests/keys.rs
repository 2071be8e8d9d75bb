//! `weights::keys`: canonical ↔ kohya ↔ PEFT ↔ diffusers key conversions, kohya ambiguity
//! resolution against a module list, SD 1.x fallback rules, and the LoRA key grammar.

mod lora_support;

use lora_support::repo;
use lorafuse::weights::keys::{
    self, KeyDialect, ModuleName, Resolver, Role, Target, UnmappedReason, from_dotted, from_kohya,
    parse_lora_key, split_sd1_underscored, to_diffusers, to_kohya, to_peft,
};
use lorafuse::weights::{Component, ModuleList, ModuleSet, WeightFile};

const Q: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
const OUT: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0";
const FF: &str = "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj";
const TEQ: &str = "encoder.layers.0.self_attn.q_proj";

#[test]
fn canonical_to_dialects() {
    use Component::*;
    assert_eq!(
        to_kohya(Unet, OUT),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    );
    assert_eq!(
        to_kohya(TextEncoder, TEQ),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    );
    // A text_model. spelling is normalised first.
    assert_eq!(
        to_kohya(TextEncoder, &format!("text_model.{TEQ}")),
        to_kohya(TextEncoder, TEQ)
    );
    assert_eq!(to_diffusers(Unet, Q), format!("unet.{Q}"));
    assert_eq!(
        to_diffusers(TextEncoder, TEQ),
        format!("text_encoder.text_model.{TEQ}")
    );
    assert_eq!(to_peft(Unet, Q), format!("base_model.model.{Q}"));
    assert_eq!(
        to_peft(TextEncoder, TEQ),
        format!("base_model.model.text_model.{TEQ}")
    );
    assert_eq!(
        keys::weight_key(TextEncoder, TEQ, "weight"),
        format!("text_model.{TEQ}.weight")
    );
    assert_eq!(
        keys::module_of_weight_key(TextEncoder, &format!("text_model.{TEQ}.bias")),
        Some((TEQ.to_string(), "bias".to_string()))
    );
    assert_eq!(
        keys::module_of_weight_key(TextEncoder, &format!("{TEQ}.weight")),
        Some((TEQ.to_string(), "weight".to_string()))
    );
}

#[test]
fn sd1_fallback_splits_ambiguous_underscores() {
    for p in [
        Q,
        OUT,
        FF,
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
        "down_blocks.0.attentions.0.proj_in",
        "mid_block.resnets.1.time_emb_proj",
        "down_blocks.1.resnets.0.conv_shortcut",
        "down_blocks.0.downsamplers.0.conv",
        "time_embedding.linear_1",
        "conv_norm_out",
        "text_model.encoder.layers.11.mlp.fc2",
        "text_model.final_layer_norm",
        "text_model.embeddings.token_embedding",
    ] {
        assert_eq!(
            split_sd1_underscored(&p.replace('.', "_")).as_deref(),
            Some(p),
            "{p}"
        );
    }
    assert_eq!(split_sd1_underscored("input_blocks_4_1_proj_in"), None);
    assert_eq!(split_sd1_underscored("my_custom_layer"), None);
}

#[test]
fn module_list_resolution_beats_string_surgery() {
    // A module whose name the SD 1.x rules would split wrongly.
    let mut list = ModuleList::new();
    list.insert(Component::Unet, "down_blocks.0.my_adapter_block.to_q");
    list.insert(Component::Unet, OUT);
    let r = Resolver::new(Some(&list));
    assert_eq!(
        r.resolve_underscored(Component::Unet, "down_blocks_0_my_adapter_block_to_q")
            .unwrap(),
        "down_blocks.0.my_adapter_block.to_q"
    );
    assert_eq!(
        r.resolve_underscored(Component::Unet, &OUT.replace('.', "_"))
            .unwrap(),
        OUT
    );
    // Without the list the fallback refuses the unknown words instead of guessing.
    assert!(from_kohya("lora_unet_down_blocks_0_my_adapter_block_to_q", None).is_err());
    // Not in the list → unresolved, naming the kohya name.
    // Spellable by SD 1.x rules but absent from the model → names the missing module.
    assert_eq!(
        r.resolve_underscored(Component::Unet, "up_blocks_3_attentions_2_proj_out"),
        Err(UnmappedReason::NoSuchModule {
            component: Component::Unet,
            path: "up_blocks.3.attentions.2.proj_out".into()
        })
    );
    match r.resolve_underscored(Component::Unet, "down_blocks_9_x") {
        Err(UnmappedReason::Unresolved(n)) => assert_eq!(n, "lora_unet_down_blocks_9_x"),
        other => panic!("{other:?}"),
    }
    // Two modules that underscore alike → ambiguous, both named.
    let mut list = ModuleList::new();
    list.insert(Component::Unet, "a_b.c");
    list.insert(Component::Unet, "a.b_c");
    match Resolver::new(Some(&list)).resolve_underscored(Component::Unet, "a_b_c") {
        Err(UnmappedReason::Ambiguous(c)) => assert_eq!(c.len(), 2),
        other => panic!("{other:?}"),
    }
}

#[test]
fn lora_key_grammar() {
    let k = parse_lora_key(&format!("unet.{Q}.lora_A.weight")).unwrap();
    assert_eq!(
        (k.dialect, k.target.clone(), k.role.clone()),
        (KeyDialect::Diffusers, Target::Unet, Role::Down)
    );
    assert_eq!(k.module, ModuleName::Dotted(Q.into()));
    let k = parse_lora_key(&format!("base_model.model.{Q}.lora_B.default.weight")).unwrap();
    assert_eq!(
        (k.dialect, k.target.clone(), k.role.clone()),
        (KeyDialect::PeftRaw, Target::Unknown, Role::Up)
    );
    assert_eq!(k.adapter.as_deref(), Some("default"));
    let k = parse_lora_key(&format!("unet.{Q}.lora.down.weight")).unwrap();
    assert_eq!(
        (k.dialect, k.role.clone()),
        (KeyDialect::DiffusersLegacy, Role::Down)
    );
    let k = parse_lora_key(&format!("text_encoder.{TEQ}.lora_linear_layer.up.weight")).unwrap();
    assert_eq!(
        (k.dialect, k.target.clone(), k.role.clone()),
        (KeyDialect::DiffusersLegacy, Target::TextEncoder, Role::Up)
    );
    let k = parse_lora_key("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight").unwrap();
    assert_eq!(k.dialect, KeyDialect::AttnProcs);
    assert_eq!(k.module, ModuleName::Dotted(OUT.into()));
    let k = parse_lora_key(
        "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.down.weight",
    )
    .unwrap();
    assert_eq!(
        k.module,
        ModuleName::Dotted("text_model.encoder.layers.0.self_attn.out_proj".into())
    );
    let k = parse_lora_key("lora_unet_mid_block_attentions_0_proj_in.alpha").unwrap();
    assert_eq!(
        (k.dialect, k.target.clone(), k.role.clone()),
        (KeyDialect::Kohya, Target::Unet, Role::Alpha)
    );
    let k = parse_lora_key("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight").unwrap();
    assert_eq!(k.target, Target::TextEncoder);
    assert_eq!(
        parse_lora_key("lora_unet_x.hada_w1_a").unwrap().role,
        Role::HadaW1A
    );
    assert_eq!(
        parse_lora_key("lora_unet_x.lokr_t2").unwrap().role,
        Role::LokrT2
    );
    assert_eq!(
        parse_lora_key("lora_unet_x.dora_scale").unwrap().role,
        Role::DoraScale
    );
    assert_eq!(
        parse_lora_key(&format!("unet.{Q}.lora_magnitude_vector"))
            .unwrap()
            .role,
        Role::DoraScale
    );
    assert_eq!(
        parse_lora_key("lora_unet_x.oft_blocks").unwrap().role,
        Role::Other("oft_blocks".into())
    );
    // SDXL evidence.
    assert!(matches!(
        parse_lora_key("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha")
            .unwrap()
            .target,
        Target::Sdxl(_)
    ));
    assert!(matches!(
        parse_lora_key(
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"
        )
        .unwrap()
        .target,
        Target::Sdxl(_)
    ));
    assert!(matches!(
        parse_lora_key("text_encoder_2.text_model.x.lora_A.weight")
            .unwrap()
            .target,
        Target::Sdxl(_)
    ));
    assert!(matches!(
        parse_lora_key("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight")
            .unwrap()
            .target,
        Target::Other(_)
    ));
    assert_eq!(parse_lora_key("model.diffusion_model.weight_garbage"), None);
    assert_eq!(parse_lora_key("conv_in.weight"), None);
}

fn tiny_modules() -> Option<ModuleList> {
    let dir = repo().join("models/tiny/diffusers");
    if !dir
        .join("unet/diffusion_pytorch_model.safetensors")
        .exists()
    {
        eprintln!("skip: models/tiny/diffusers not generated yet");
        return None;
    }
    Some(ModuleList::from_diffusers_dir(&dir).expect("tiny module list"))
}

/// canonical → kohya / PEFT / diffusers → canonical for every module of the tiny UNet and text
/// encoder, with the module list and with the SD 1.x fallback rules.
#[test]
fn roundtrip_every_tiny_module() {
    let Some(list) = tiny_modules() else { return };
    // Sanity: the list holds canonical paths (text encoder without `text_model.`).
    assert!(
        list.contains(Component::TextEncoder, TEQ),
        "tiny TE lacks {TEQ}"
    );
    assert!(
        list.iter(Component::TextEncoder)
            .all(|p| !p.starts_with("text_model."))
    );
    assert!(list.contains(Component::Unet, OUT));
    let mut n = 0;
    for c in Component::ALL {
        for p in list.paths(c) {
            n += 1;
            let kohya = to_kohya(c, &p);
            assert_eq!(
                from_kohya(&kohya, Some(&list)),
                Ok((c, p.clone())),
                "kohya {kohya} with list"
            );
            assert_eq!(
                from_kohya(&kohya, None),
                Ok((c, p.clone())),
                "kohya {kohya} by SD 1.x rules"
            );
            // diffusers' converter spelling `lora_te1_`
            if c == Component::TextEncoder {
                let te1 = kohya.replacen("lora_te_", "lora_te1_", 1);
                assert_eq!(from_kohya(&te1, Some(&list)), Ok((c, p.clone())), "{te1}");
                let bare = te1.replacen("text_model_", "", 1);
                assert_eq!(from_kohya(&bare, Some(&list)), Ok((c, p.clone())), "{bare}");
            }
            let peft = to_peft(c, &p);
            assert_eq!(
                from_dotted(&peft, Some(&list)),
                Ok((c, p.clone())),
                "peft {peft}"
            );
            assert_eq!(
                from_dotted(&peft, None),
                Ok((c, p.clone())),
                "peft {peft} inferred"
            );
            let diff = to_diffusers(c, &p);
            assert_eq!(
                from_dotted(&diff, Some(&list)),
                Ok((c, p.clone())),
                "diffusers {diff}"
            );
            assert_eq!(
                from_dotted(&diff, None),
                Ok((c, p.clone())),
                "diffusers {diff} unchecked"
            );
            // Full tensor keys parse back too.
            for key in [
                format!("{kohya}.lora_down.weight"),
                format!("{peft}.lora_A.default.weight"),
                format!("{diff}.lora_B.weight"),
            ] {
                let k = parse_lora_key(&key).unwrap_or_else(|| panic!("{key}"));
                assert_eq!(
                    Resolver::new(Some(&list)).resolve(&k),
                    Ok((c, p.clone())),
                    "{key}"
                );
            }
        }
    }
    assert!(n > 100, "only {n} modules in the tiny model?");
}

#[test]
fn module_list_from_weight_file_strips_text_model() {
    let Some(_) = tiny_modules() else { return };
    let f = WeightFile::open(repo().join("models/tiny/diffusers/text_encoder/model.safetensors"))
        .unwrap();
    assert!(
        f.names().all(|n| n.starts_with("text_model.")),
        "fixture TE keys carry text_model."
    );
    let l = ModuleList::from_weight_file(Component::TextEncoder, &f);
    assert!(l.contains(Component::TextEncoder, TEQ));
    assert!(l.contains(Component::TextEncoder, &format!("text_model.{TEQ}")));
}

#[test]
fn dotted_checks_against_module_list() {
    let mut list = ModuleList::new();
    list.insert(Component::Unet, Q);
    assert_eq!(
        from_dotted("unet.down_blocks.5.nothing", Some(&list)),
        Err(UnmappedReason::NoSuchModule {
            component: Component::Unet,
            path: "down_blocks.5.nothing".into()
        })
    );
    // A bare path is placed by the list.
    assert_eq!(
        from_dotted(Q, Some(&list)),
        Ok((Component::Unet, Q.to_string()))
    );
}

/// Random keys assembled from LoRA-ish tokens never panic the parser or the resolver.
#[test]
fn fuzz_key_grammar_never_panics() {
    const TOKS: &[&str] = &[
        ".",
        "_",
        "..",
        "lora_A",
        "lora_B",
        "weight",
        "bias",
        "unet",
        "text_encoder",
        "text_model",
        "lora_unet_",
        "lora_te_",
        "lora_te1_",
        "lora_te2_",
        "base_model.model.",
        "processor",
        "to_q_lora",
        "to_out_lora",
        "down",
        "up",
        "lora",
        "lora_linear_layer",
        "alpha",
        "lora_down",
        "lora_up",
        "hada_w1_a",
        "lokr_w2",
        "0",
        "12",
        "to_out",
        "self_attn",
        "transformer_blocks",
        "input_blocks",
        "default",
        "lora_magnitude_vector",
        "",
    ];
    let mut list = ModuleList::new();
    list.insert(Component::Unet, Q);
    list.insert(Component::TextEncoder, TEQ);
    let with = Resolver::new(Some(&list));
    let without = Resolver::new(None);
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..20_000 {
        let mut key = String::new();
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let n = 1 + (s % 9) as usize;
        for i in 0..n {
            let t = (s >> (i * 5)) as usize % TOKS.len();
            key.push_str(TOKS[t]);
        }
        if let Some(k) = parse_lora_key(&key) {
            let _ = with.resolve(&k);
            let _ = without.resolve(&k);
        }
        let _ = split_sd1_underscored(&key);
        let _ = from_kohya(&key, Some(&list));
        let _ = from_dotted(&key, None);
    }
}
