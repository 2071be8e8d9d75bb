//! The shipped tiny pipeline (models/tiny, made by models/scripts/make_tiny.py) opens where it must:
//! every ONNX component through ONNX Runtime on the CPU, with every input and output described
//! (name, element type, full shape with symbolic dim names) exactly as onnxruntime's Python API did
//! when the fixtures were made (`expected/onnx_check.json`), and the diffusers-layout weights
//! through safetensors. The external-data UNet is made at test time (tests/common `made`); its
//! `onnx_check.json` entry names it `test-time/onnx-extdata/unet/model.onnx`.

use std::path::{Path, PathBuf};

mod common;

use lorafuse::runtime::session::{self, Device, IoInfo, SessionOptions};

fn tiny(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/tiny")
        .join(rel)
}

fn io(path: &Path) -> (Vec<IoInfo>, Vec<IoInfo>) {
    let s = session::open(
        path,
        &SessionOptions {
            device: Device::Cpu,
            intra_threads: Some(1),
            tf32: false,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    session::describe(&s)
}

/// `onnx_check.json`'s description of one component, recorded by make_tiny.py with onnxruntime's
/// Python API (`sess.get_inputs()`/`get_outputs()`), mapped to [`IoInfo`]'s spelling.
fn reference(tag: &str) -> (Vec<IoInfo>, Vec<IoInfo>, String) {
    static CHECK: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    let check = CHECK.get_or_init(|| {
        serde_json::from_slice(&std::fs::read(tiny("expected/onnx_check.json")).expect("read"))
            .expect("onnx_check.json")
    });
    let entry = &check["ort_vs_diffusers"][tag];
    let list = |key: &str| -> Vec<IoInfo> {
        let Some(items) = entry[key].as_array() else {
            panic!("onnx_check.json: no {tag}.{key}");
        };
        items
            .iter()
            .map(|x| IoInfo {
                name: x["name"].as_str().expect("name").to_string(),
                dtype: match x["type"].as_str().expect("type") {
                    "tensor(float)" => "f32",
                    "tensor(float16)" => "f16",
                    "tensor(int64)" => "i64",
                    t => panic!("{tag}: unexpected type {t}"),
                }
                .to_string(),
                // A fixed dim is a number, a dynamic one its symbolic name.
                shape: x["shape"]
                    .as_array()
                    .expect("shape")
                    .iter()
                    .map(|d| d.as_str().map_or_else(|| d.to_string(), str::to_string))
                    .collect(),
            })
            .collect()
    };
    let path = entry["path"].as_str().expect("path").to_string();
    (list("inputs"), list("outputs"), path)
}

/// The tiny model's pinned I/O: (name, element type, shape); `F` is the export's float type
/// (f32 or f16), `_` a dynamic dim.
type Spec = &'static [(&'static str, &'static str, &'static [&'static str])];

/// optimum's names; latent channels 4, CLIP hidden size (= cross-attention dim) 24, RGB 3,
/// VAE mean ‖ logvar 8. The UNet timestep is a rank-0 float of the model's dtype (docs/ARCHITECTURE.md §3).
const UNET: (Spec, Spec) = (
    &[
        ("sample", "F", &["_", "4", "_", "_"]),
        ("timestep", "F", &[]),
        ("encoder_hidden_states", "F", &["_", "_", "24"]),
    ],
    &[("out_sample", "F", &["_", "4", "_", "_"])],
);
const TEXT_ENCODER: (Spec, Spec) = (
    &[("input_ids", "i64", &["_", "_"])],
    &[
        ("last_hidden_state", "F", &["_", "_", "24"]),
        ("pooler_output", "F", &["_", "24"]),
    ],
);
const VAE_DECODER: (Spec, Spec) = (
    &[("latent_sample", "F", &["_", "4", "_", "_"])],
    &[("sample", "F", &["_", "3", "_", "_"])],
);
const VAE_ENCODER: (Spec, Spec) = (
    &[("sample", "F", &["_", "3", "_", "_"])],
    &[("latent_parameters", "F", &["_", "8", "_", "_"])],
);

fn assert_spec(what: &str, got: &[IoInfo], spec: Spec, float: &str) {
    let shown: Vec<String> = got.iter().map(ToString::to_string).collect();
    assert_eq!(got.len(), spec.len(), "{what}: {shown:?}");
    for (io, (name, dtype, dims)) in got.iter().zip(spec) {
        assert_eq!(io.name, *name, "{what}: {shown:?}");
        assert_eq!(
            io.dtype,
            if *dtype == "F" { float } else { dtype },
            "{what}: {io}"
        );
        assert_eq!(io.shape.len(), dims.len(), "{what}: rank of {io}");
        for (d, want) in io.shape.iter().zip(dims.iter()) {
            if *want == "_" {
                assert!(
                    d.parse::<i64>().is_err(),
                    "{what}: {io}: {d} should be dynamic"
                );
            } else {
                assert_eq!(d, want, "{what}: {io}");
            }
        }
    }
}

/// ORT (through our session code) describes component `tag` exactly as onnxruntime's Python API
/// did when the fixture was made, symbolic dim names included, and both match the pinned spec.
/// `file` is in `models/tiny/` (`tiny/<file>` in onnx_check.json) or, for `onnx-extdata/`, made
/// at test time (`test-time/<file>`).
fn check(tag: &str, file: &str, (inputs, outputs): (Spec, Spec), float: &str) {
    let (want_i, want_o, recorded) = reference(tag);
    let (path, name) = if file.starts_with("onnx-extdata/") {
        (common::made(file), format!("test-time/{file}"))
    } else {
        (tiny(file), format!("tiny/{file}"))
    };
    assert_eq!(
        recorded, name,
        "onnx_check.json: {tag} describes another file"
    );
    let (i, o) = io(&path);
    assert_eq!(i, want_i, "{tag} inputs vs onnx_check.json");
    assert_eq!(o, want_o, "{tag} outputs vs onnx_check.json");
    assert_spec(&format!("{tag} inputs"), &i, inputs, float);
    assert_spec(&format!("{tag} outputs"), &o, outputs, float);
}

fn check_pipeline(tag: &str, dir: &str, float: &str) {
    for (component, spec) in [
        ("unet", UNET),
        ("text_encoder", TEXT_ENCODER),
        ("vae_decoder", VAE_DECODER),
        ("vae_encoder", VAE_ENCODER),
    ] {
        let file = format!("{dir}/{component}/model.onnx");
        check(&format!("{tag}/{component}"), &file, spec, float);
    }
}

#[test]
fn fp32_pipeline_opens_in_ort() {
    check_pipeline("fp32", "onnx", "f32");
}

#[test]
fn fp16_pipeline_opens_in_ort() {
    check_pipeline("fp16", "onnx-fp16", "f16");
}

#[test]
fn external_data_and_dynamo_unets_open_in_ort() {
    check("extdata/unet", "onnx-extdata/unet/model.onnx", UNET, "f32");
    assert!(common::made("onnx-extdata/unet/model.onnx_data").is_file());
    // The dynamo exporter names its own symbols (`s53`, `2*s62`), checked against the reference.
    check("dynamo/unet", "onnx-dynamo/unet/model.onnx", UNET, "f32");
}

#[test]
fn diffusers_weights_open_with_safetensors() {
    for (p, some_key) in [
        (
            "diffusers/unet/diffusion_pytorch_model.safetensors",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        ),
        (
            "diffusers/text_encoder/model.safetensors",
            "text_model.encoder.layers.0.self_attn.q_proj.weight",
        ),
        (
            "diffusers/vae/diffusion_pytorch_model.safetensors",
            "decoder.conv_in.weight",
        ),
    ] {
        let bytes = std::fs::read(tiny(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        let st =
            safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{p}: {e}"));
        let t = st
            .tensor(some_key)
            .unwrap_or_else(|e| panic!("{p}: {some_key}: {e}"));
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{p}");
        assert!(st.len() > 10, "{p}");
    }
    // The real SD 1.x CLIP vocabulary ships beside them.
    let vocab: serde_json::Value = serde_json::from_slice(
        &std::fs::read(tiny("diffusers/tokenizer/vocab.json")).expect("vocab"),
    )
    .expect("json");
    assert_eq!(vocab.as_object().map(|o| o.len()), Some(49408));
}

#[test]
fn inspect_describes_the_tiny_pipeline() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lorafuse"))
        .args(["inspect", "--json"])
        .arg(tiny("onnx"))
        .output()
        .expect("run lorafuse");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let models = v["models"].as_array().expect("models");
    let comps: Vec<&str> = models
        .iter()
        .filter_map(|m| m["component"].as_str())
        .collect();
    assert_eq!(
        comps,
        ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    );
}
