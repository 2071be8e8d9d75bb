//! `lora::write`: LoRA modules written in the diffusers and kohya layouts read back to the same
//! modules and scales (mixed ranks/alphas exercise diffusers' rank_pattern / alpha_pattern).

mod lora_support;

use std::path::PathBuf;

use lora_support::*;
use lorafuse::lora::{self, LoraKind, LoraModule, ReadOptions, WriteOptions, WriteStyle};
use lorafuse::weights::{Component, Dtype, ModuleList, ModuleSet, Tensor, WeightFile};

const Q: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
const OUT: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0";
const CONV1: &str = "down_blocks.0.resnets.0.conv1";
const TEQ: &str = "encoder.layers.0.self_attn.q_proj";

fn lora(
    c: Component,
    path: &str,
    down: &[usize],
    up: &[usize],
    scale: f32,
    seed: u64,
) -> LoraModule {
    let d = Tensor::new(down.to_vec(), rand(numel(down), seed)).unwrap();
    let u = Tensor::new(up.to_vec(), rand(numel(up), seed + 1)).unwrap();
    LoraModule {
        component: c,
        module_path: path.into(),
        kind: LoraKind::Lora {
            down: d,
            up: u,
            mid: None,
        },
        alpha: None,
        rank: down[0],
        scale,
        keys: vec![],
    }
}

fn sample() -> Vec<LoraModule> {
    vec![
        lora(Component::Unet, Q, &[4, 32], &[32, 4], 2.0, 1),
        lora(Component::Unet, OUT, &[2, 32], &[32, 2], 1.5, 3),
        lora(
            Component::Unet,
            CONV1,
            &[4, 32, 3, 3],
            &[32, 4, 1, 1],
            0.5,
            5,
        ),
        lora(Component::TextEncoder, TEQ, &[4, 24], &[24, 4], 2.0, 7),
    ]
}

fn data(m: &LoraModule) -> (&Tensor, &Tensor) {
    match &m.kind {
        LoraKind::Lora { down, up, .. } => (down, up),
        _ => panic!("not a LoRA"),
    }
}

#[test]
fn write_read_roundtrip_both_styles() {
    let dir = tempfile::tempdir().unwrap();
    let mods = sample();
    for (style, dtype, tol) in [
        (WriteStyle::Diffusers, Dtype::F32, 0.0),
        (WriteStyle::Kohya, Dtype::F32, 0.0),
        (WriteStyle::Diffusers, Dtype::F16, 1e-3),
        (WriteStyle::Kohya, Dtype::BF16, 1e-2),
    ] {
        let p = dir.path().join(format!("{style:?}_{dtype:?}.safetensors"));
        let mut opts = WriteOptions {
            style,
            dtype,
            ..Default::default()
        };
        opts.metadata.insert("ss_network_dim".into(), "4".into());
        lora::write(&p, &mods, &opts).unwrap();
        let a = lora::read(&p, &ReadOptions::default()).unwrap();
        assert!(a.unmapped.is_empty(), "{style:?}: {:?}", a.unmapped);
        assert_eq!(a.modules.len(), mods.len());
        assert_eq!(
            a.metadata.get("ss_network_dim").map(String::as_str),
            Some("4")
        );
        for m in &mods {
            let got = a
                .module(m.component, &m.module_path)
                .unwrap_or_else(|| panic!("{style:?}: {}", m.module_path));
            assert_eq!(
                got.scale, m.scale,
                "{style:?} {dtype:?}: {} scale",
                m.module_path
            );
            let ((d0, u0), (d1, u1)) = (data(m), data(got));
            assert_eq!((&d0.shape, &u0.shape), (&d1.shape, &u1.shape));
            assert_close(&d0.data, &d1.data, tol, "down");
            assert_close(&u0.data, &u1.data, tol, "up");
        }
        let f = WeightFile::open(&p).unwrap();
        match style {
            WriteStyle::Diffusers => {
                assert!(f.contains(&format!("unet.{Q}.lora_A.weight")));
                assert!(f.contains(&format!("text_encoder.text_model.{TEQ}.lora_B.weight")));
                let meta: serde_json::Value =
                    serde_json::from_str(&a.metadata["lora_adapter_metadata"]).unwrap();
                assert_eq!(meta["unet.r"], 4);
                assert_eq!(meta["unet.rank_pattern"][OUT], 2);
                assert_eq!(meta["unet.alpha_pattern"][CONV1], 2.0);
            }
            WriteStyle::Kohya => {
                let n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0";
                assert!(f.contains(&format!("{n}.lora_down.weight")));
                assert_eq!(f.scalar_f32(&format!("{n}.alpha")).unwrap(), 3.0);
                assert!(f.contains("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"));
            }
        }
    }
}

#[test]
fn only_standard_lora_can_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = sample().remove(0);
    m.kind = LoraKind::Full {
        diff: Tensor::new(vec![2, 2], vec![0.0; 4]).unwrap(),
    };
    let e = lora::write(
        dir.path().join("x.safetensors"),
        &[m],
        &WriteOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("only standard LoRA"), "{e}");
    let twice = vec![sample().remove(0), sample().remove(0)];
    assert!(
        lora::write(
            dir.path().join("y.safetensors"),
            &twice,
            &WriteOptions::default()
        )
        .is_err()
    );
    assert!(
        !dir.path().join("x.safetensors").exists() && !dir.path().join("y.safetensors").exists()
    );
}

/// A real fixture re-written in both layouts still reproduces diffusers' fused weights.
/// `LORAFUSE_KEEP_WRITTEN=<dir>` keeps the files (to load them in diffusers by hand).
#[test]
fn rewritten_fixture_keeps_its_effect() {
    let root = std::env::var_os("LORAFUSE_TINY")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models/tiny"));
    let src = root.join("loras/kohya_wide.safetensors");
    if !src.exists() {
        eprintln!("skip: tiny LoRA fixtures not generated yet");
        return;
    }
    let modules = ModuleList::from_diffusers_dir(root.join("diffusers")).unwrap();
    let opts = ReadOptions {
        modules: Some(&modules as &dyn ModuleSet),
        adapter_config: None,
    };
    let a = lora::read(&src, &opts).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = std::env::var_os("LORAFUSE_KEEP_WRITTEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&out_dir).unwrap();
    for style in [WriteStyle::Diffusers, WriteStyle::Kohya] {
        let p = out_dir.join(format!("written_{style:?}.safetensors").to_lowercase());
        lora::write(
            &p,
            &a.modules,
            &WriteOptions {
                style,
                ..Default::default()
            },
        )
        .unwrap();
        let b = lora::read(&p, &opts).unwrap();
        assert!(b.unmapped.is_empty(), "{:?}", b.unmapped);
        assert_eq!(b.modules.len(), a.modules.len());
        for m in &a.modules {
            let g = b.module(m.component, &m.module_path).unwrap();
            assert_eq!(g.scale, m.scale, "{}", m.module_path);
            let d0 = lora::delta(m).unwrap();
            let d1 = lora::delta(g).unwrap();
            assert_eq!(d0, d1, "{}", m.module_path);
        }
    }
}
