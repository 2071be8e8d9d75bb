//! tch ports of the UNet, CLIP text encoder and VAE (encoder and decoder) against diffusers'
//! fp32 outputs on the tiny model (models/tiny/expected/*_io.safetensors; docs/ARCHITECTURE.md §7:
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

/// The tiny model's weights under the original LDM names, written by hand from the layout of
/// CompVis `ldm/modules/diffusionmodules/openaimodel.py` (`UNetModel`: input_blocks = conv, then per
/// level `num_res_blocks` × [ResBlock, SpatialTransformer] and a Downsample; output_blocks = per
/// level `num_res_blocks + 1` × [ResBlock, SpatialTransformer] with the Upsample appended to the
/// last) and `model.py` (`Encoder`/`Decoder`), independent of the converter under test.
fn tiny_as_ldm(out: &Path) {
    use lorafuse::weights::{TensorData, write_safetensors};
    let d = tiny().join("diffusers");
    let mut tensors: Vec<(String, TensorData<'static>)> = Vec::new();
    let mut add = |file: &WeightFile, from: &str, to: String, conv1x1: bool| {
        let (shape, data) = file.tensor_f32(from).expect(from);
        let shape = if conv1x1 && shape.len() == 2 {
            vec![shape[0], shape[1], 1, 1]
        } else {
            shape
        };
        tensors.push((
            to,
            TensorData::from_f32(lorafuse::weights::Dtype::F32, shape, &data).expect("data"),
        ));
    };
    let unet = WeightFile::open(d.join("unet/diffusion_pytorch_model.safetensors")).expect("unet");
    let res = |r: &str| {
        r.replace("norm1.", "in_layers.0.")
            .replace("conv1.", "in_layers.2.")
            .replace("time_emb_proj.", "emb_layers.1.")
            .replace("norm2.", "out_layers.0.")
            .replace("conv2.", "out_layers.3.")
            .replace("conv_shortcut.", "skip_connection.")
    };
    let unet_map: &[(&str, &str)] = &[
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("down_blocks.0.resnets.0.", "input_blocks.1.0."),
        ("down_blocks.0.attentions.0.", "input_blocks.1.1."),
        ("down_blocks.0.downsamplers.0.conv.", "input_blocks.2.0.op."),
        ("down_blocks.1.resnets.0.", "input_blocks.3.0."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
        ("up_blocks.0.resnets.0.", "output_blocks.0.0."),
        ("up_blocks.0.resnets.1.", "output_blocks.1.0."),
        ("up_blocks.0.upsamplers.0.conv.", "output_blocks.1.1.conv."),
        ("up_blocks.1.resnets.0.", "output_blocks.2.0."),
        ("up_blocks.1.attentions.0.", "output_blocks.2.1."),
        ("up_blocks.1.resnets.1.", "output_blocks.3.0."),
        ("up_blocks.1.attentions.1.", "output_blocks.3.1."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ];
    for k in unet.names() {
        let (from, to) = unet_map
            .iter()
            .find(|(a, _)| k.starts_with(a))
            .unwrap_or_else(|| panic!("unmapped {k}"));
        let rest = &k[from.len()..];
        let rest = if from.contains("resnets") {
            res(rest)
        } else {
            rest.to_string()
        };
        add(&unet, k, format!("model.diffusion_model.{to}{rest}"), false);
    }
    let vae = WeightFile::open(d.join("vae/diffusion_pytorch_model.safetensors")).expect("vae");
    for k in vae.names() {
        let mut l = k.to_string();
        for i in 0..4 {
            l = l.replace(
                &format!("encoder.down_blocks.{i}.resnets."),
                &format!("encoder.down.{i}.block."),
            );
            l = l.replace(
                &format!("encoder.down_blocks.{i}.downsamplers.0.conv."),
                &format!("encoder.down.{i}.downsample.conv."),
            );
            l = l.replace(
                &format!("decoder.up_blocks.{i}.resnets."),
                &format!("decoder.up.{}.block.", 3 - i),
            );
            l = l.replace(
                &format!("decoder.up_blocks.{i}.upsamplers.0.conv."),
                &format!("decoder.up.{}.upsample.conv.", 3 - i),
            );
        }
        for (a, b) in [
            ("mid_block.resnets.0.", "mid.block_1."),
            ("mid_block.resnets.1.", "mid.block_2."),
            ("mid_block.attentions.0.group_norm.", "mid.attn_1.norm."),
            ("mid_block.attentions.0.to_q.", "mid.attn_1.q."),
            ("mid_block.attentions.0.to_k.", "mid.attn_1.k."),
            ("mid_block.attentions.0.to_v.", "mid.attn_1.v."),
            ("mid_block.attentions.0.to_out.0.", "mid.attn_1.proj_out."),
            ("conv_norm_out.", "norm_out."),
            ("conv_shortcut.", "nin_shortcut."),
        ] {
            l = l.replace(a, b);
        }
        add(
            &vae,
            k,
            format!("first_stage_model.{l}"),
            k.contains("attentions.0.to_"),
        );
    }
    let te = WeightFile::open(d.join("text_encoder/model.safetensors")).expect("te");
    for k in te.names() {
        let name = if k.starts_with("text_model.") {
            k.to_string()
        } else {
            format!("text_model.{k}")
        };
        add(
            &te,
            k,
            format!("cond_stage_model.transformer.{name}"),
            false,
        );
    }
    write_safetensors(out, tensors, None).expect("write");
}

#[test]
fn single_file_checkpoint_matches_the_diffusers_folder() {
    use lorafuse::train::single_file::{Part, SingleFile};
    let tmp = tempfile::tempdir().expect("tmp");
    let ckpt = tmp.path().join("tiny.safetensors");
    tiny_as_ldm(&ckpt);
    let d = tiny().join("diffusers");
    let sf = SingleFile::with_configs(
        &ckpt,
        train::UNet2DConditionConfig::from_file(d.join("unet/config.json")).expect("cfg"),
        train::AutoencoderKlConfig::from_file(d.join("vae/config.json")).expect("cfg"),
        train::ClipTextConfig::from_file(d.join("text_encoder/config.json")).expect("cfg"),
    )
    .expect("open");
    let src = train::ModelSource::SingleFile {
        file: Box::new(sf),
        tokenizer: d.join("tokenizer"),
    };
    let unet = src.unet(Device::Cpu, Kind::Float, None).expect("unet");
    assert!(
        unet.unused_keys
            .iter()
            .all(|k| !k.starts_with("model.diffusion_model.")),
        "{:?}",
        unet.unused_keys
    );
    // The same weights as the diffusers folder: on this CPU the same kernels run on the same data,
    // so the outputs agree bit for bit. Against diffusers' fixture (computed on another machine,
    // whose CPU may pick other kernels) within DESIGN's tch-forward bar of 1e-5 relative.
    let folder = train::ModelSource::Diffusers(d.clone());
    let both = |name: &str, a: &tch::Tensor, b: &tch::Tensor, want: &tch::Tensor| {
        assert_eq!(rel(a, b), 0.0, "{name}: single file vs diffusers folder");
        let r = rel(a, want);
        assert!(r <= 1e-5, "{name}: {r} relative to diffusers' output");
    };
    let f = fixture("unet_io.safetensors");
    let unet_ref = folder.unet(Device::Cpu, Kind::Float, None).expect("unet");
    let (out, out_ref) = tch::no_grad(|| {
        let run = |m: &train::UNet2DConditionModel| {
            m.forward(
                &t(&f, "sample"),
                &t(&f, "timestep"),
                &t(&f, "encoder_hidden_states"),
            )
        };
        (run(&unet.model), run(&unet_ref.model))
    });
    both("unet", &out, &out_ref, &t(&f, "out_sample"));
    let f = fixture("text_encoder_io.safetensors");
    let te = src
        .text_encoder(Device::Cpu, Kind::Float, None)
        .expect("te");
    let te_ref = folder
        .text_encoder(Device::Cpu, Kind::Float, None)
        .expect("te");
    let (last, _) = tch::no_grad(|| te.model.forward(&t(&f, "input_ids"))).expect("forward");
    let (last_ref, _) =
        tch::no_grad(|| te_ref.model.forward(&t(&f, "input_ids"))).expect("forward");
    both(
        "text encoder",
        &last,
        &last_ref,
        &t(&f, "last_hidden_state"),
    );
    let f = fixture("vae_encoder_io.safetensors");
    let enc = src.vae_encoder(Device::Cpu, Kind::Float).expect("vae");
    let enc_ref = folder.vae_encoder(Device::Cpu, Kind::Float).expect("vae");
    let (mean, _) = tch::no_grad(|| enc.model.encode(&t(&f, "sample")));
    let (mean_ref, _) = tch::no_grad(|| enc_ref.model.encode(&t(&f, "sample")));
    both("vae encoder", &mean, &mean_ref, &t(&f, "mean"));
    let f = fixture("vae_decoder_io.safetensors");
    let dec = src.vae_decoder(Device::Cpu, Kind::Float).expect("vae");
    let dec_ref = folder.vae_decoder(Device::Cpu, Kind::Float).expect("vae");
    let img = tch::no_grad(|| dec.model.decode(&t(&f, "latent_sample")));
    let img_ref = tch::no_grad(|| dec_ref.model.decode(&t(&f, "latent_sample")));
    both("vae decoder", &img, &img_ref, &t(&f, "sample"));
    // every LDM key of the file found its diffusers name
    if let train::ModelSource::SingleFile { file, .. } = &src {
        use train::WeightSource;
        let n: usize = [Part::Unet, Part::Vae, Part::TextEncoder]
            .iter()
            .map(|p| file.source(*p).keys().len())
            .sum();
        assert_eq!(n, WeightFile::open(&ckpt).expect("ckpt").len());
    }
}

#[test]
fn validation_txt2img_matches_the_diffusers_pipeline() {
    // models/tiny/expected/txt2img_pndm: StableDiffusionPipeline, PNDM, 4 steps, CFG 7.5,
    // "a photo of a cat" / "blurry", 64×64, init latents given.
    use lorafuse::train::validation::Validator;
    let d = tiny().join("diffusers");
    let v = Validator {
        text_encoder: train::load_text_encoder(&d, Device::Cpu, Kind::Float, None)
            .expect("te")
            .model,
        vae: train::load_vae_decoder(&d, Device::Cpu, Kind::Float)
            .expect("vae")
            .model,
        tokenizer: lorafuse::pipeline::tokenizer::ClipTokenizer::from_dir(d.join("tokenizer"))
            .expect("tok"),
        scheduler: lorafuse::pipeline::scheduler::SchedulerConfig::from_file(
            d.join("scheduler/scheduler_config.json"),
        )
        .expect("sched"),
        device: Device::Cpu,
        kind: Kind::Float,
    };
    let unet = train::load_unet(&d, Device::Cpu, Kind::Float, None).expect("unet");
    let f = fixture("txt2img_pndm.safetensors");
    let (_, init) = f.tensor_f32("init_latents").expect("init");
    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(0);
    let img = v
        .txt2img(
            &unet.model,
            "a photo of a cat",
            "blurry",
            4,
            7.5,
            &init,
            64,
            64,
            &mut rng,
        )
        .expect("txt2img");
    let (_, want) = f.tensor_f32("image").expect("image");
    let diff = img
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    println!("validation txt2img vs diffusers: max |diff| {diff:.2e} (pixels in [0, 1])");
    assert!(diff <= 1e-4, "{diff}");
}
