//! tch ports of the UNet, CLIP text encoder and VAE (encoder and decoder) against diffusers'
//! fp32 outputs on the tiny model (models/tiny/expected/*_io.safetensors; DESIGN.md section 7:
//! relative error ≤ 1e-4).
#![cfg(feature = "train")]

use std::path::{Path, PathBuf};

use lorafuse::train::{self, LoraConfig};
use lorafuse::weights::WeightFile;
use tch::{Device, Kind, Tensor};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny")
}

fn fixture(name: &str) -> WeightFile {
    WeightFile::open(tiny().join("expected").join(name)).expect("fixture")
}

fn t(file: &WeightFile, name: &str) -> Tensor {
    train::weights::read_tensor(file, name).expect("tensor")
}

/// max |a - b| / max |b|
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[]);
    let m = b.to_kind(Kind::Double).abs().max().double_value(&[]);
    d / m
}

#[test]
fn unet_matches_diffusers() {
    let dir = tiny().join("diffusers");
    let m = train::load_unet(&dir, Device::Cpu, Kind::Float, None).expect("load unet");
    assert!(m.unused_keys.is_empty(), "unused: {:?}", m.unused_keys);
    let f = fixture("unet_io.safetensors");
    let out = tch::no_grad(|| {
        m.model.forward(
            &t(&f, "sample"),
            &t(&f, "timestep"),
            &t(&f, "encoder_hidden_states"),
        )
    });
    let r = rel(&out, &t(&f, "out_sample"));
    println!("unet relative error {r:.3e}");
    assert!(r <= 1e-4, "relative error {r}");
}

#[test]
fn unet_with_zero_lora_matches_and_odd_sizes_run() {
    // LoRA layers start with B = 0, so the output is unchanged; a 6×10 input (not a multiple of
    // the overall factor 2) exercises the forwarded upsample sizes.
    let dir = tiny().join("diffusers");
    let m = train::load_unet(
        &dir,
        Device::Cpu,
        Kind::Float,
        Some(LoraConfig::script_default(4)),
    )
    .expect("load unet");
    assert_eq!(
        m.lora_modules.len(),
        32,
        "4 targets × 2 attentions × 4 transformer blocks (down, mid, 2 up)"
    );
    let f = fixture("unet_io.safetensors");
    let out = tch::no_grad(|| {
        m.model.forward(
            &t(&f, "sample"),
            &t(&f, "timestep"),
            &t(&f, "encoder_hidden_states"),
        )
    });
    assert!(rel(&out, &t(&f, "out_sample")) <= 1e-4);
    let odd = Tensor::randn([1, 4, 5, 7], (Kind::Float, Device::Cpu));
    let ehs = Tensor::randn([1, 77, 24], (Kind::Float, Device::Cpu));
    let o = tch::no_grad(|| m.model.forward(&odd, &Tensor::from(10.0f32), &ehs));
    assert_eq!(o.size(), vec![1, 4, 5, 7]);
}

#[test]
fn text_encoder_matches_transformers() {
    let dir = tiny().join("diffusers");
    let m =
        train::load_text_encoder(&dir, Device::Cpu, Kind::Float, None).expect("load text encoder");
    assert!(m.unused_keys.is_empty(), "unused: {:?}", m.unused_keys);
    let f = fixture("text_encoder_io.safetensors");
    let (last, pooled) = tch::no_grad(|| m.model.forward(&t(&f, "input_ids"))).expect("forward");
    let r1 = rel(&last, &t(&f, "last_hidden_state"));
    let r2 = rel(&pooled, &t(&f, "pooler_output"));
    println!("text encoder relative error: last_hidden_state {r1:.3e}, pooler_output {r2:.3e}");
    assert!(r1 <= 1e-4 && r2 <= 1e-4, "{r1} {r2}");
}

#[test]
fn vae_encoder_matches_diffusers() {
    let dir = tiny().join("diffusers");
    let m = train::load_vae_encoder(&dir, Device::Cpu, Kind::Float).expect("load vae");
    let f = fixture("vae_encoder_io.safetensors");
    let (mean, logvar) = tch::no_grad(|| m.model.encode(&t(&f, "sample")));
    let r1 = rel(&mean, &t(&f, "mean"));
    let r2 = rel(&logvar, &t(&f, "logvar"));
    println!("vae encoder relative error: mean {r1:.3e}, logvar {r2:.3e}");
    assert!(r1 <= 1e-4 && r2 <= 1e-4, "{r1} {r2}");
}

#[test]
fn vae_decoder_matches_diffusers() {
    let dir = tiny().join("diffusers");
    let m = train::load_vae_decoder(&dir, Device::Cpu, Kind::Float).expect("load vae");
    let f = fixture("vae_decoder_io.safetensors");
    let img = tch::no_grad(|| m.model.decode(&t(&f, "latent_sample")));
    let r = rel(&img, &t(&f, "sample"));
    println!("vae decoder relative error {r:.3e}");
    assert!(r <= 1e-4, "{r}");
}

#[test]
fn bad_weights_name_the_tensor() {
    // A UNet config with wider blocks than the file: the error names the tensor and both shapes.
    let tmp = tempfile::tempdir().expect("tmp");
    let unet = tmp.path().join("unet");
    std::fs::create_dir_all(&unet).expect("mkdir");
    let src = tiny().join("diffusers/unet");
    let cfg = std::fs::read_to_string(src.join("config.json")).expect("config");
    std::fs::write(
        unet.join("config.json"),
        cfg.replace("\"cross_attention_dim\": 24", "\"cross_attention_dim\": 32"),
    )
    .expect("write");
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        unet.join("diffusion_pytorch_model.safetensors"),
    )
    .expect("copy");
    let err = train::load_unet(tmp.path(), Device::Cpu, Kind::Float, None)
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("attn2.to_k.weight") && err.contains("[32, 32]") && err.contains("[32, 24]"),
        "{err}"
    );
}
