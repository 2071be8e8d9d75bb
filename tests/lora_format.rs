//! `lora::format`: every dialect's key shapes on synthetic files, alpha dtypes, scale rules,
//! kohya ambiguity resolution, and the reasons given for keys that map nowhere.

mod lora_support;

use std::path::Path;

use lora_support::*;
use lorafuse::lora::{self, Dialect, KronFactor, LoraKind, ReadOptions, UnmappedReason};
use lorafuse::weights::{Component, Dtype, ModuleList};

const Q: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
const OUT: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0";
const FF: &str = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj";
const PROJ_IN: &str = "down_blocks.0.attentions.0.proj_in";
const CONV1: &str = "down_blocks.0.resnets.0.conv1";
const TEQ: &str = "encoder.layers.0.self_attn.q_proj";
const TEOUT: &str = "encoder.layers.0.self_attn.out_proj";

fn modules() -> ModuleList {
    let mut l = ModuleList::new();
    for p in [
        Q,
        OUT,
        FF,
        PROJ_IN,
        CONV1,
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    ] {
        l.insert(Component::Unet, p);
    }
    for p in [TEQ, TEOUT, "encoder.layers.0.mlp.fc1"] {
        l.insert(Component::TextEncoder, &format!("text_model.{p}"));
    }
    l
}

fn read(path: &Path, list: Option<&ModuleList>) -> lora::LoraAdapter {
    let opts = ReadOptions {
        modules: list.map(|l| l as &dyn lorafuse::weights::ModuleSet),
        adapter_config: None,
    };
    lora::read(path, &opts).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn scale_of(a: &lora::LoraAdapter, c: Component, p: &str) -> f32 {
    a.module(c, p)
        .unwrap_or_else(|| panic!("no module {p}; unmapped {:?}", a.unmapped))
        .scale
}

#[test]
fn diffusers_lora_a_b_with_adapter_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let meta = r#"{"text_encoder.lora_alpha": 8, "text_encoder.r": 4, "unet.lora_alpha": 8, "unet.r": 4,
        "unet.rank_pattern": {"to_k": 2}, "unet.alpha_pattern": {"attn1.to_k": 6}, "unet.target_modules": ["to_q", "to_k"]}"#;
    let p = FileBuilder::new()
        .f32(&format!("unet.{Q}.lora_A.weight"), &[4, 32], &rand(128, 1))
        .f32(&format!("unet.{Q}.lora_B.weight"), &[32, 4], &rand(128, 2))
        .f32(
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight",
            &[2, 32],
            &rand(64, 3),
        )
        .f32(
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight",
            &[32, 2],
            &rand(64, 4),
        )
        .f32(
            &format!("text_encoder.text_model.{TEQ}.lora_A.weight"),
            &[4, 24],
            &rand(96, 5),
        )
        .f32(
            &format!("text_encoder.text_model.{TEQ}.lora_B.weight"),
            &[24, 4],
            &rand(96, 6),
        )
        .meta("format", "pt")
        .meta("lora_adapter_metadata", meta)
        .write(&dir.path().join("d.safetensors"));
    let a = read(&p, Some(&modules()));
    assert_eq!(a.dialect, Dialect::Diffusers);
    assert!(a.unmapped.is_empty(), "{:?}", a.unmapped);
    assert_eq!(a.modules.len(), 3);
    assert_eq!(scale_of(&a, Component::Unet, Q), 2.0);
    // rank_pattern r=2 and alpha_pattern 6 → 3
    assert_eq!(
        scale_of(
            &a,
            Component::Unet,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
        ),
        3.0
    );
    assert_eq!(scale_of(&a, Component::TextEncoder, TEQ), 2.0);
    let m = a.module(Component::Unet, Q).unwrap();
    assert_eq!((m.rank, m.alpha), (4, Some(8.0)));
    assert!(
        matches!(&m.kind, LoraKind::Lora { down, up, mid: None } if down.shape == [4, 32] && up.shape == [32, 4])
    );
    assert_eq!(m.keys.len(), 2);
}

#[test]
fn rslora_and_dora_in_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = FileBuilder::new()
        .f32(&format!("unet.{Q}.lora_A.weight"), &[4, 8], &rand(32, 1))
        .f32(&format!("unet.{Q}.lora_B.weight"), &[8, 4], &rand(32, 2))
        .meta(
            "lora_adapter_metadata",
            r#"{"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": true}"#,
        )
        .write(&dir.path().join("rs.safetensors"));
    assert_eq!(scale_of(&read(&p, None), Component::Unet, Q), 4.0);
    let p = FileBuilder::new()
        .f32(&format!("unet.{Q}.lora_A.weight"), &[4, 8], &rand(32, 1))
        .f32(&format!("unet.{Q}.lora_B.weight"), &[8, 4], &rand(32, 2))
        .f32(
            &format!("unet.{Q}.lora_magnitude_vector"),
            &[8],
            &rand(8, 3),
        )
        .write(&dir.path().join("dora.safetensors"));
    let a = read(&p, None);
    assert!(a.modules.is_empty());
    assert_eq!(a.unmapped.len(), 3);
    assert!(
        a.unmapped
            .iter()
            .all(|u| matches!(&u.reason, UnmappedReason::Unsupported(s) if s.contains("DoRA")))
    );
    assert!(
        a.require_complete()
            .unwrap_err()
            .to_string()
            .contains("DoRA")
    );
}

#[test]
fn diffusers_legacy_unet_and_text_encoder_spellings() {
    let dir = tempfile::tempdir().unwrap();
    let p = FileBuilder::new()
        .f32(
            &format!("unet.{Q}.lora.down.weight"),
            &[4, 32],
            &rand(128, 1),
        )
        .f32(&format!("unet.{Q}.lora.up.weight"), &[32, 4], &rand(128, 2))
        .f32(
            &format!("text_encoder.{TEQ}.lora_linear_layer.down.weight"),
            &[4, 24],
            &rand(96, 3),
        )
        .f32(
            &format!("text_encoder.{TEQ}.lora_linear_layer.up.weight"),
            &[24, 4],
            &rand(96, 4),
        )
        .f32(
            &format!("text_encoder.text_model.{TEOUT}.lora_linear_layer.down.weight"),
            &[4, 24],
            &rand(96, 5),
        )
        .f32(
            &format!("text_encoder.text_model.{TEOUT}.lora_linear_layer.up.weight"),
            &[24, 4],
            &rand(96, 6),
        )
        .write(&dir.path().join("legacy.safetensors"));
    let a = read(&p, Some(&modules()));
    assert_eq!(a.dialect, Dialect::DiffusersLegacy);
    assert!(a.unmapped.is_empty(), "{:?}", a.unmapped);
    for (c, m) in [
        (Component::Unet, Q),
        (Component::TextEncoder, TEQ),
        (Component::TextEncoder, TEOUT),
    ] {
        assert_eq!(scale_of(&a, c, m), 1.0);
    }
    assert!(a.notes.iter().any(|n| n.contains("scale 1")));
}

#[test]
fn peft_raw_with_adapter_config_and_adapter_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = FileBuilder::new()
        .f32(
            &format!("base_model.model.{Q}.lora_A.default.weight"),
            &[4, 32],
            &rand(128, 1),
        )
        .f32(
            &format!("base_model.model.{Q}.lora_B.default.weight"),
            &[32, 4],
            &rand(128, 2),
        )
        .write(&dir.path().join("peft.safetensors"));
    // No config: scale 1 and a note.
    let a = read(&p, Some(&modules()));
    assert_eq!(a.dialect, Dialect::PeftRaw);
    assert_eq!(scale_of(&a, Component::Unet, Q), 1.0);
    assert!(
        a.notes.iter().any(|n| n.contains("adapter_config")),
        "{:?}",
        a.notes
    );
    // Sibling `<stem>_adapter_config.json`.
    std::fs::write(
        dir.path().join("peft_adapter_config.json"),
        r#"{"r": 4, "lora_alpha": 16, "peft_type": "LORA"}"#,
    )
    .unwrap();
    let a = read(&p, Some(&modules()));
    assert_eq!(scale_of(&a, Component::Unet, Q), 4.0);
    // An explicit config wins.
    let cfg = dir.path().join("other.json");
    std::fs::write(&cfg, r#"{"r": 4, "lora_alpha": 2}"#).unwrap();
    let a = lora::read(
        &p,
        &ReadOptions {
            modules: None,
            adapter_config: Some(&cfg),
        },
    )
    .unwrap();
    assert_eq!(scale_of(&a, Component::Unet, Q), 0.5);
}

#[test]
fn kohya_alpha_dtypes_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let k = |p: &str| format!("lora_unet_{}", p.replace('.', "_"));
    let mut b = FileBuilder::new();
    let cases: [(&str, &str); 5] = [
        (Q, "i64"),
        (OUT, "f16"),
        (FF, "f32_1"),
        (PROJ_IN, "bf16"),
        (CONV1, "none"),
    ];
    for (i, (p, _)) in cases.iter().enumerate() {
        let (dshape, ushape): (Vec<usize>, Vec<usize>) = match *p {
            PROJ_IN => (vec![4, 32, 1, 1], vec![32, 4, 1, 1]),
            CONV1 => (vec![4, 32, 3, 3], vec![32, 4, 1, 1]),
            _ => (vec![4, 32], vec![32, 4]),
        };
        b = b
            .f32(
                &format!("{}.lora_down.weight", k(p)),
                &dshape,
                &rand(numel(&dshape), i as u64),
            )
            .f32(
                &format!("{}.lora_up.weight", k(p)),
                &ushape,
                &rand(numel(&ushape), 100 + i as u64),
            );
    }
    let p = b
        .i64(&format!("{}.alpha", k(Q)), &[], &[2])
        .typed(&format!("{}.alpha", k(OUT)), Dtype::F16, &[], &[8.0])
        .f32(&format!("{}.alpha", k(FF)), &[1], &[1.0])
        .typed(&format!("{}.alpha", k(PROJ_IN)), Dtype::BF16, &[], &[16.0])
        .write(&dir.path().join("kohya.safetensors"));
    for list in [Some(modules()), None] {
        let a = read(&p, list.as_ref());
        assert_eq!(a.dialect, Dialect::Kohya);
        assert!(a.unmapped.is_empty(), "{:?}", a.unmapped);
        assert_eq!(scale_of(&a, Component::Unet, Q), 0.5);
        assert_eq!(scale_of(&a, Component::Unet, OUT), 2.0);
        assert_eq!(scale_of(&a, Component::Unet, FF), 0.25);
        assert_eq!(scale_of(&a, Component::Unet, PROJ_IN), 4.0);
        assert_eq!(scale_of(&a, Component::Unet, CONV1), 1.0, "no alpha → 1");
        assert_eq!(a.module(Component::Unet, OUT).unwrap().alpha, Some(8.0));
    }
}

#[test]
fn kohya_alpha_zero_means_rank() {
    let dir = tempfile::tempdir().unwrap();
    let p = FileBuilder::new()
        .f32(
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            &[4, 24],
            &rand(96, 1),
        )
        .f32(
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
            &[24, 4],
            &rand(96, 2),
        )
        .f32(
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha",
            &[],
            &[0.0],
        )
        .f32(
            "lora_te1_text_model_encoder_layers_0_self_attn_out_proj.lora_down.weight",
            &[4, 24],
            &rand(96, 1),
        )
        .f32(
            "lora_te1_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight",
            &[24, 4],
            &rand(96, 2),
        )
        .typed(
            "lora_te1_text_model_encoder_layers_0_self_attn_out_proj.alpha",
            Dtype::F64,
            &[],
            &[2.0],
        )
        .write(&dir.path().join("te.safetensors"));
    let a = read(&p, Some(&modules()));
    assert_eq!(scale_of(&a, Component::TextEncoder, TEQ), 1.0);
    assert_eq!(scale_of(&a, Component::TextEncoder, TEOUT), 0.5);
}

#[test]
fn kohya_names_resolve_against_the_real_module_list() {
    // A module whose name the SD 1.x fallback cannot split: only the list resolves it.
    let mut list = modules();
    list.insert(
        Component::Unet,
        "down_blocks.0.attentions.0.extra_proj.to_out.0",
    );
    let dir = tempfile::tempdir().unwrap();
    let n = "lora_unet_down_blocks_0_attentions_0_extra_proj_to_out_0";
    let p = FileBuilder::new()
        .f32(&format!("{n}.lora_down.weight"), &[2, 8], &rand(16, 1))
        .f32(&format!("{n}.lora_up.weight"), &[8, 2], &rand(16, 2))
        .write(&dir.path().join("k.safetensors"));
    let a = read(&p, Some(&list));
    assert!(a.unmapped.is_empty(), "{:?}", a.unmapped);
    assert!(
        a.module(
            Component::Unet,
            "down_blocks.0.attentions.0.extra_proj.to_out.0"
        )
        .is_some()
    );
    let a = read(&p, None);
    assert!(a.modules.is_empty());
    assert_eq!(a.unmapped.len(), 2);
    assert!(
        a.unmapped
            .iter()
            .all(|u| matches!(&u.reason, UnmappedReason::Unresolved(s) if s == n))
    );
}

#[test]
fn attn_procs_unet_and_text_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1";
    let mut b = FileBuilder::new();
    for (i, proc_name) in ["to_q_lora", "to_out_lora"].iter().enumerate() {
        b = b
            .f32(
                &format!("unet.{attn}.processor.{proc_name}.down.weight"),
                &[4, 32],
                &rand(128, i as u64),
            )
            .f32(
                &format!("unet.{attn}.processor.{proc_name}.up.weight"),
                &[32, 4],
                &rand(128, 10 + i as u64),
            );
    }
    let p = b
        .f32(
            "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight",
            &[4, 24],
            &rand(96, 3),
        )
        .f32(
            "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight",
            &[24, 4],
            &rand(96, 4),
        )
        .f32(
            "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.down.weight",
            &[4, 24],
            &rand(96, 5),
        )
        .f32(
            "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.up.weight",
            &[24, 4],
            &rand(96, 6),
        )
        .write(&dir.path().join("ap.safetensors"));
    let a = read(&p, Some(&modules()));
    assert_eq!(a.dialect, Dialect::AttnProcs);
    assert!(a.unmapped.is_empty(), "{:?}", a.unmapped);
    for (c, m) in [
        (Component::Unet, Q),
        (Component::Unet, OUT),
        (Component::TextEncoder, TEQ),
        (Component::TextEncoder, TEOUT),
    ] {
        assert_eq!(scale_of(&a, c, m), 1.0);
    }
}

#[test]
fn lycoris_loha_lokr_kinds_and_scales() {
    let dir = tempfile::tempdir().unwrap();
    let k = |p: &str| format!("lora_unet_{}", p.replace('.', "_"));
    let p = FileBuilder::new()
        // LoHa r=2 on a [32, 32] Linear, alpha 1 → 0.5
        .f32(&format!("{}.hada_w1_a", k(Q)), &[32, 2], &rand(64, 1))
        .f32(&format!("{}.hada_w1_b", k(Q)), &[2, 32], &rand(64, 2))
        .f32(&format!("{}.hada_w2_a", k(Q)), &[32, 2], &rand(64, 3))
        .f32(&format!("{}.hada_w2_b", k(Q)), &[2, 32], &rand(64, 4))
        .f32(&format!("{}.alpha", k(Q)), &[], &[1.0])
        // LoKr both full → scale 1 regardless of alpha
        .f32(&format!("{}.lokr_w1", k(OUT)), &[4, 4], &rand(16, 5))
        .f32(&format!("{}.lokr_w2", k(OUT)), &[8, 8], &rand(64, 6))
        .f32(&format!("{}.alpha", k(OUT)), &[], &[7.0])
        // LoKr w2 low rank r=2, alpha 4 → 2
        .f32(&format!("{}.lokr_w1", k(FF)), &[4, 4], &rand(16, 7))
        .f32(&format!("{}.lokr_w2_a", k(FF)), &[8, 2], &rand(16, 8))
        .f32(&format!("{}.lokr_w2_b", k(FF)), &[2, 8], &rand(16, 9))
        .f32(&format!("{}.alpha", k(FF)), &[], &[4.0])
        .write(&dir.path().join("ly.safetensors"));
    let a = read(&p, Some(&modules()));
    assert_eq!(a.dialect, Dialect::Lycoris);
    assert!(a.unmapped.is_empty(), "{:?}", a.unmapped);
    let m = a.module(Component::Unet, Q).unwrap();
    assert!(matches!(m.kind, LoraKind::LoHa { t1: None, .. }));
    assert_eq!((m.rank, m.scale), (2, 0.5));
    let m = a.module(Component::Unet, OUT).unwrap();
    assert!(matches!(
        m.kind,
        LoraKind::LoKr {
            w1: KronFactor::Full(_),
            w2: KronFactor::Full(_),
            t2: None
        }
    ));
    assert_eq!(m.scale, 1.0);
    let m = a.module(Component::Unet, FF).unwrap();
    assert!(matches!(
        m.kind,
        LoraKind::LoKr {
            w2: KronFactor::LowRank { .. },
            ..
        }
    ));
    assert_eq!((m.rank, m.scale), (2, 2.0));
}

#[test]
fn dora_scale_and_unknown_types_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let k = |p: &str| format!("lora_unet_{}", p.replace('.', "_"));
    let p = FileBuilder::new()
        .f32(
            &format!("{}.lora_down.weight", k(Q)),
            &[2, 32],
            &rand(64, 1),
        )
        .f32(&format!("{}.lora_up.weight", k(Q)), &[32, 2], &rand(64, 2))
        .f32(&format!("{}.dora_scale", k(Q)), &[1, 32], &rand(32, 3))
        .f32(&format!("{}.oft_blocks", k(OUT)), &[4, 8, 8], &rand(256, 4))
        .f32(
            &format!("{}.lora_down.weight", k(FF)),
            &[2, 32],
            &rand(64, 5),
        )
        .write(&dir.path().join("dora.safetensors"));
    let a = read(&p, Some(&modules()));
    assert!(a.modules.is_empty());
    let reason = |key: &str| {
        a.unmapped
            .iter()
            .find(|u| u.key == key)
            .map(|u| u.reason.to_string())
            .unwrap_or_default()
    };
    assert!(reason(&format!("{}.dora_scale", k(Q))).contains("DoRA"));
    assert!(reason(&format!("{}.lora_up.weight", k(Q))).contains("DoRA"));
    assert!(reason(&format!("{}.oft_blocks", k(OUT))).contains("oft_blocks"));
    assert!(reason(&format!("{}.lora_down.weight", k(FF))).contains("both down"));
}

#[test]
fn sdxl_kohya_is_refused_as_a_whole() {
    let dir = tempfile::tempdir().unwrap();
    let p = FileBuilder::new()
        .f32(
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            &[2, 24],
            &rand(48, 1),
        )
        .f32(
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
            &[24, 2],
            &rand(48, 2),
        )
        .f32(
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            &[2, 24],
            &rand(48, 3),
        )
        .f32(
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
            &[24, 2],
            &rand(48, 4),
        )
        .f32(
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
            &[2, 32],
            &rand(64, 5),
        )
        .f32(
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight",
            &[32, 2],
            &rand(64, 6),
        )
        .write(&dir.path().join("sdxl.safetensors"));
    let a = read(&p, Some(&modules()));
    assert!(a.modules.is_empty());
    assert_eq!(a.unmapped.len(), 6);
    assert!(a.is_sdxl());
    for u in &a.unmapped {
        assert!(u.to_string().contains("SDXL"), "{u}");
    }
}

#[test]
fn unknown_keys_missing_modules_and_non_lora_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = FileBuilder::new()
        .f32(&format!("unet.{Q}.lora_A.weight"), &[2, 32], &rand(64, 1))
        .f32(&format!("unet.{Q}.lora_B.weight"), &[32, 2], &rand(64, 2))
        .f32(
            "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v.lora_A.weight",
            &[2, 32],
            &rand(64, 3),
        )
        .f32(
            "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v.lora_B.weight",
            &[32, 2],
            &rand(64, 4),
        )
        .f32("some_random.tensor", &[1], &[1.0])
        .write(&dir.path().join("mixed.safetensors"));
    let a = read(&p, Some(&modules()));
    assert_eq!(a.modules.len(), 1);
    assert_eq!(a.unmapped.len(), 3);
    assert!(
        a.unmapped.iter().any(
            |u| matches!(u.reason, UnmappedReason::UnknownKey) && u.key == "some_random.tensor"
        )
    );
    assert!(a.unmapped.iter().any(|u| matches!(&u.reason, UnmappedReason::NoSuchModule { component: Component::Unet, path } if path.starts_with("up_blocks.3"))));
    // Without a list, existence is not checked.
    assert_eq!(read(&p, None).modules.len(), 2);

    let base = FileBuilder::new()
        .f32("conv_in.weight", &[4, 4, 3, 3], &rand(144, 1))
        .write(&dir.path().join("base.safetensors"));
    let e = lora::read(&base, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not a LoRA file") && e.contains("base.safetensors"),
        "{e}"
    );
}

#[test]
fn shape_mismatches_are_reported_not_merged() {
    let dir = tempfile::tempdir().unwrap();
    let p = FileBuilder::new()
        .f32(&format!("unet.{Q}.lora_A.weight"), &[4, 32], &rand(128, 1))
        .f32(&format!("unet.{Q}.lora_B.weight"), &[32, 2], &rand(64, 2))
        .write(&dir.path().join("bad.safetensors"));
    let a = read(&p, None);
    assert!(a.modules.is_empty());
    assert!(
        a.unmapped.iter().all(
            |u| matches!(&u.reason, UnmappedReason::Invalid(s) if s.contains("rank mismatch"))
        )
    );
}

#[test]
fn fp16_and_bf16_files_read_as_f32() {
    let dir = tempfile::tempdir().unwrap();
    let d = rand(128, 1);
    let p = FileBuilder::new()
        .typed(
            &format!("unet.{Q}.lora_A.weight"),
            Dtype::BF16,
            &[4, 32],
            &d,
        )
        .typed(
            &format!("unet.{Q}.lora_B.weight"),
            Dtype::BF16,
            &[32, 4],
            &d,
        )
        .write(&dir.path().join("bf.safetensors"));
    let a = read(&p, None);
    assert_eq!(a.dtype, Some(Dtype::BF16));
    let LoraKind::Lora { down, .. } = &a.module(Component::Unet, Q).unwrap().kind else {
        panic!()
    };
    assert_close(&down.data, &d, 1e-2, "bf16 down");
}

#[test]
fn sdxl_diffusers_unet_only_is_recognised_by_its_block_depth() {
    let dir = tempfile::tempdir().unwrap();
    let deep = "down_blocks.2.attentions.0.transformer_blocks.5.attn1.to_q";
    let p = FileBuilder::new()
        .f32(&format!("unet.{Q}.lora_A.weight"), &[2, 32], &rand(64, 1))
        .f32(&format!("unet.{Q}.lora_B.weight"), &[32, 2], &rand(64, 2))
        .f32(
            &format!("unet.{deep}.lora_A.weight"),
            &[2, 32],
            &rand(64, 3),
        )
        .f32(
            &format!("unet.{deep}.lora_B.weight"),
            &[32, 2],
            &rand(64, 4),
        )
        .write(&dir.path().join("sdxl_unet.safetensors"));
    for list in [Some(modules()), None] {
        let a = read(&p, list.as_ref());
        assert!(a.is_sdxl(), "{:?}", a.unmapped);
        assert!(
            a.unmapped[0].to_string().contains("transformer_blocks.N"),
            "{}",
            a.unmapped[0]
        );
    }
    // A model that really has a second transformer block takes it.
    let mut list = modules();
    list.insert(Component::Unet, deep);
    let a = read(&p, Some(&list));
    assert!(a.unmapped.is_empty(), "{:?}", a.unmapped);
    assert_eq!(a.modules.len(), 2);
}

#[test]
fn delta_shapes_are_checked_against_known_weight_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let mut list = ModuleList::new();
    list.insert_with_shape(Component::Unet, Q, vec![32, 32]);
    list.insert_with_shape(Component::Unet, PROJ_IN, vec![32, 32, 1, 1]);
    list.insert_with_shape(Component::Unet, OUT, vec![32, 32]);
    let k = |p: &str| format!("lora_unet_{}", p.replace('.', "_"));
    let p = FileBuilder::new()
        // fits
        .f32(
            &format!("{}.lora_down.weight", k(Q)),
            &[4, 32],
            &rand(128, 1),
        )
        .f32(&format!("{}.lora_up.weight", k(Q)), &[32, 4], &rand(128, 2))
        // Linear-shaped LoRA on a 1×1 conv: fits (same memory order)
        .f32(
            &format!("{}.lora_down.weight", k(PROJ_IN)),
            &[4, 32],
            &rand(128, 3),
        )
        .f32(
            &format!("{}.lora_up.weight", k(PROJ_IN)),
            &[32, 4],
            &rand(128, 4),
        )
        // a 2048-wide input (SDXL context) on a 32-wide weight: refused
        .f32(
            &format!("{}.lora_down.weight", k(OUT)),
            &[4, 2048],
            &rand(8192, 5),
        )
        .f32(
            &format!("{}.lora_up.weight", k(OUT)),
            &[32, 4],
            &rand(128, 6),
        )
        .write(&dir.path().join("shapes.safetensors"));
    let a = read(&p, Some(&list));
    assert_eq!(a.modules.len(), 2);
    assert_eq!(a.unmapped.len(), 2);
    for u in &a.unmapped {
        assert!(
            u.to_string().contains("does not fit") && u.to_string().contains("[32, 2048]"),
            "{u}"
        );
    }
}
