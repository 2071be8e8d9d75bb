//! The LoRA files `lorafuse train` writes, on the tiny model:
//! - the exact key set and metadata diffusers' train_text_to_image_lora.py writes (always checked
//!   in Rust; also against diffusers itself when models/.venv-ref exists),
//! - alpha ≠ rank (`lora_adapter_metadata`), text-encoder LoRA, kohya with `ss_*` metadata,
//! - `pipeline.load_lora_weights` loads each with no missing/unexpected keys
//!   (models/scripts/check_lora_loads.py, when the venv exists),
//! - our reader and `lorafuse merge` accept each.
#![cfg(feature = "train")]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use lorafuse::merge::{LoraSpec, MergeOptions, merge_pipeline};
use lorafuse::train::output::SaveFormat;
use lorafuse::train::trainer::{TrainConfig, train};
use lorafuse::weights::WeightFile;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn tiny() -> PathBuf {
    root().join("models/tiny")
}

fn config(out: &Path) -> TrainConfig {
    let mut c = common::tiny_train_config(&tiny().join("dataset"), out, 5);
    c.random_flip = false;
    c.max_train_steps = Some(2);
    c.learning_rate = 1e-3;
    c
}

fn run(c: &TrainConfig) -> PathBuf {
    train(c, None, &mut |_| {}).expect("train").output
}

/// Module paths of the tiny UNet's attention projections, read from the base weights.
fn attention_modules() -> BTreeSet<String> {
    let f = WeightFile::open(tiny().join("diffusers/unet/diffusion_pytorch_model.safetensors"))
        .expect("unet");
    f.names()
        .filter_map(|k| k.strip_suffix(".weight"))
        .filter(|m| {
            [".to_q", ".to_k", ".to_v", ".to_out.0"]
                .iter()
                .any(|s| m.ends_with(s))
        })
        .map(str::to_string)
        .collect()
}

fn keys(
    path: &Path,
) -> (
    BTreeSet<String>,
    std::collections::BTreeMap<String, String>,
    WeightFile,
) {
    let f = WeightFile::open(path).expect("lora");
    (
        f.names().map(str::to_string).collect(),
        f.metadata().clone(),
        f,
    )
}

fn ref_python() -> Option<PathBuf> {
    let p = root().join("models/.venv-ref/bin/python");
    p.is_file().then_some(p)
}

/// `check_lora_loads.py` on `lora`; skipped (with a note) without the reference venv.
fn diffusers_loads(lora: &Path) {
    let Some(py) = ref_python() else {
        println!("skip: models/.venv-ref not found; diffusers load check not run");
        return;
    };
    let out = std::process::Command::new(py)
        .arg(root().join("models/scripts/check_lora_loads.py"))
        .args([
            "--model",
            tiny().join("diffusers").to_str().expect("utf8"),
            "--lora",
            lora.to_str().expect("utf8"),
            "--json",
        ])
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = stdout.lines().last().unwrap_or("");
    println!("{report}");
    let v: serde_json::Value = serde_json::from_str(report)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["ok"], true, "{report}");
}

fn merges(lora: &Path, tmp: &Path) {
    let r = merge_pipeline(
        &tiny().join("onnx"),
        &tmp.join("merged"),
        &[LoraSpec {
            path: lora.to_path_buf(),
            weight: 1.0,
        }],
        &MergeOptions {
            strict: true,
            ..Default::default()
        },
        true,
        &mut |_, _, _| {},
    )
    .expect("merge");
    let l = &r.loras[0];
    assert!(l.unmapped.is_empty(), "{:?}", l.unmapped);
    let n: usize = r.patched.values().sum();
    assert_eq!(
        n,
        l.unet_modules + l.text_encoder_modules,
        "every module patches one initializer"
    );
}

#[test]
fn default_output_is_exactly_what_the_script_writes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = run(&config(tmp.path()));
    assert_eq!(out, tmp.path().join("pytorch_lora_weights.safetensors"));
    let (names, meta, f) = keys(&out);
    let modules = attention_modules();
    assert_eq!(modules.len(), 32);
    let want: BTreeSet<String> = modules
        .iter()
        .flat_map(|m| {
            [
                format!("unet.{m}.lora.down.weight"),
                format!("unet.{m}.lora.up.weight"),
            ]
        })
        .collect();
    assert_eq!(names, want);
    assert_eq!(
        meta.into_iter().collect::<Vec<_>>(),
        vec![("format".to_string(), "pt".to_string())]
    );
    for m in &modules {
        let d = f.info(&format!("unet.{m}.lora.down.weight")).expect("down");
        let u = f.info(&format!("unet.{m}.lora.up.weight")).expect("up");
        assert_eq!((d.shape[0], u.shape[1]), (4, 4), "{m}");
        assert_eq!(d.dtype, lorafuse::weights::Dtype::F32);
    }
    // diffusers' own writer, when available, gives the same names
    if let Some(py) = ref_python() {
        let script = format!(
            r#"
import json
from diffusers import UNet2DConditionModel, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
import tempfile, os
from safetensors import safe_open
unet = UNet2DConditionModel.from_pretrained({unet:?})
unet.requires_grad_(False)
unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
d = tempfile.mkdtemp()
StableDiffusionPipeline.save_lora_weights(save_directory=d, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)), safe_serialization=True)
with safe_open(os.path.join(d, "pytorch_lora_weights.safetensors"), "pt") as f:
    print(json.dumps({{"keys": sorted(f.keys()), "metadata": f.metadata()}}))
"#,
            unet = tiny().join("diffusers/unet").display().to_string()
        );
        let o = std::process::Command::new(py)
            .args(["-c", &script])
            .output()
            .expect("python");
        let text = String::from_utf8_lossy(&o.stdout);
        let v: serde_json::Value =
            serde_json::from_str(text.lines().last().unwrap_or("")).expect("json from diffusers");
        let theirs: BTreeSet<String> = v["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| k.as_str().expect("str").to_string())
            .collect();
        assert_eq!(
            names, theirs,
            "key set differs from diffusers' save_lora_weights"
        );
        assert_eq!(v["metadata"], serde_json::json!({"format": "pt"}));
    } else {
        println!("skip: models/.venv-ref not found; compared with the built-in expectation only");
    }
    let a = lorafuse::lora::read(&out, &Default::default()).expect("our reader");
    assert_eq!(a.modules.len(), 32);
    assert!(a.unmapped.is_empty());
    assert!(a.modules.iter().all(|m| (m.scale - 1.0).abs() < 1e-6));
    diffusers_loads(&out);
    merges(&out, tmp.path());
}

#[test]
fn alpha_not_rank_and_text_encoder_keep_their_scale() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = config(tmp.path());
    c.lora.alpha = 8.0;
    c.text_encoder_lora = Some(lorafuse::train::LoraConfig {
        targets: ["q_proj", "k_proj", "v_proj", "out_proj"]
            .map(String::from)
            .to_vec(),
        ..c.lora.clone()
    });
    let out = run(&c);
    let (names, meta, _) = keys(&out);
    assert_eq!(names.len(), 2 * (32 + 8));
    assert!(
        names.contains(
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_A.weight"
        )
    );
    assert!(
        names.contains("text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight"),
        "{names:?}"
    );
    let m: serde_json::Value =
        serde_json::from_str(meta.get("lora_adapter_metadata").expect("metadata")).expect("json");
    assert_eq!(
        (m["unet.r"].as_f64(), m["unet.lora_alpha"].as_f64()),
        (Some(4.0), Some(8.0))
    );
    assert_eq!(m["text_encoder.lora_alpha"].as_f64(), Some(8.0));
    let a = lorafuse::lora::read(&out, &Default::default()).expect("our reader");
    assert_eq!(a.modules.len(), 40);
    assert!(
        a.modules.iter().all(|m| (m.scale - 2.0).abs() < 1e-6),
        "scale alpha/r = 2"
    );
    diffusers_loads(&out);
    merges(&out, tmp.path());
}

#[test]
fn kohya_output_has_alpha_and_ss_metadata() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = config(tmp.path());
    c.save_format = SaveFormat::Kohya;
    c.lora.alpha = 2.0;
    let out = run(&c);
    let (names, meta, f) = keys(&out);
    let modules = attention_modules();
    let want: BTreeSet<String> = modules
        .iter()
        .flat_map(|m| {
            let k = format!("lora_unet_{}", m.replace('.', "_"));
            [
                format!("{k}.lora_down.weight"),
                format!("{k}.lora_up.weight"),
                format!("{k}.alpha"),
            ]
        })
        .collect();
    assert_eq!(names, want);
    assert_eq!(
        f.scalar_f32("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
            .expect("alpha"),
        2.0
    );
    for (k, v) in [
        ("ss_network_dim", "4"),
        ("ss_network_alpha", "2"),
        ("ss_resolution", "(64, 64)"),
        ("ss_num_train_images", "12"),
        ("ss_steps", "2"),
        ("ss_enable_bucket", "False"),
        ("ss_min_bucket_reso", "None"),
        ("ss_shuffle_caption", "False"),
        ("ss_caption_dropout_rate", "0.0"),
    ] {
        assert_eq!(meta.get(k).map(String::as_str), Some(v), "{k}");
    }
    let tags: serde_json::Value =
        serde_json::from_str(&meta["ss_tag_frequency"]).expect("tag json");
    assert!(
        tags["dataset"]["a red circle on a white background"]
            .as_u64()
            .is_some(),
        "{tags}"
    );
    let a = lorafuse::lora::read(&out, &Default::default()).expect("our reader");
    assert_eq!(a.modules.len(), 32);
    assert!(a.modules.iter().all(|m| (m.scale - 0.5).abs() < 1e-6));
    diffusers_loads(&out);
    merges(&out, tmp.path());
}

#[test]
fn wide_targets_with_conv_lora_load() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = config(tmp.path());
    c.lora.rank = 2;
    c.lora.alpha = 2.0;
    c.lora.targets = [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
        "proj_in",
        "proj_out",
        "conv1",
        "conv2",
        "conv_shortcut",
        "time_emb_proj",
    ]
    .map(String::from)
    .to_vec();
    let out = run(&c);
    let f = WeightFile::open(&out).expect("lora");
    // 1×1 proj_in conv: down [r, in, 1, 1]; 3×3 conv1: down [r, in, 3, 3], up [out, r, 1, 1]
    assert_eq!(
        f.info("unet.down_blocks.0.resnets.0.conv1.lora_A.weight")
            .expect("conv1")
            .shape,
        vec![2, 32, 3, 3]
    );
    assert_eq!(
        f.info("unet.down_blocks.0.resnets.0.conv1.lora_B.weight")
            .expect("conv1")
            .shape,
        vec![32, 2, 1, 1]
    );
    assert_eq!(
        f.info("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight")
            .expect("proj_in")
            .shape,
        vec![2, 32, 1, 1]
    );
    diffusers_loads(&out);
    merges(&out, tmp.path());
}
