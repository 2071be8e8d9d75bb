//! The shipped tiny pipeline (models/tiny, made by models/scripts/make_tiny.py) opens where it must:
//! every ONNX component through ONNX Runtime on the CPU with optimum's input/output names, dtypes and
//! shapes, and the diffusers-layout weights through safetensors.

use std::path::{Path, PathBuf};

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

fn names_types(v: &[IoInfo]) -> Vec<(String, String, usize)> {
    v.iter()
        .map(|i| (i.name.clone(), i.dtype.clone(), i.shape.len()))
        .collect()
}

fn check_pipeline(dir: &str, float: &str) {
    let f = float.to_string();
    let (i, o) = io(&tiny(&format!("{dir}/unet/model.onnx")));
    assert_eq!(
        names_types(&i),
        vec![
            ("sample".into(), f.clone(), 4),
            // optimum exports the timestep as a rank-0 float of the model's dtype (DESIGN.md section 4).
            ("timestep".into(), f.clone(), 0),
            ("encoder_hidden_states".into(), f.clone(), 3),
        ],
        "{dir} unet inputs"
    );
    assert_eq!(
        names_types(&o),
        vec![("out_sample".into(), f.clone(), 4)],
        "{dir} unet outputs"
    );
    assert_eq!(i[0].shape[1], "4", "latent channels");
    assert_eq!(
        i[2].shape[2], "24",
        "cross-attention dim of the tiny text encoder"
    );

    let (i, o) = io(&tiny(&format!("{dir}/text_encoder/model.onnx")));
    assert_eq!(
        names_types(&i),
        vec![("input_ids".into(), "i64".into(), 2)],
        "{dir} text encoder inputs"
    );
    assert_eq!(o[0].name, "last_hidden_state");
    assert_eq!(o[0].dtype, f);
    assert!(o.iter().any(|x| x.name == "pooler_output"), "{dir}: {o:?}");

    let (i, o) = io(&tiny(&format!("{dir}/vae_decoder/model.onnx")));
    assert_eq!(
        names_types(&i),
        vec![("latent_sample".into(), f.clone(), 4)]
    );
    assert_eq!(names_types(&o), vec![("sample".into(), f.clone(), 4)]);

    let (i, o) = io(&tiny(&format!("{dir}/vae_encoder/model.onnx")));
    assert_eq!(names_types(&i), vec![("sample".into(), f.clone(), 4)]);
    assert_eq!(names_types(&o), vec![("latent_parameters".into(), f, 4)]);
}

#[test]
fn fp32_pipeline_opens_in_ort() {
    check_pipeline("onnx", "f32");
}

#[test]
fn fp16_pipeline_opens_in_ort() {
    check_pipeline("onnx-fp16", "f16");
}

#[test]
fn external_data_and_dynamo_unets_open_in_ort() {
    for p in [
        "onnx-extdata/unet/model.onnx",
        "onnx-dynamo/unet/model.onnx",
    ] {
        let (i, o) = io(&tiny(p));
        assert_eq!(
            i.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
            ["sample", "timestep", "encoder_hidden_states"],
            "{p}"
        );
        assert_eq!(o[0].name, "out_sample", "{p}");
    }
    assert!(tiny("onnx-extdata/unet/model.onnx_data").is_file());
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
