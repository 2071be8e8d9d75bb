//! `lorafuse::onnx::optimize` on the tiny pipeline's exports (made by torch's exporters through
//! optimum, `models/scripts/make_tiny.py`): the rewritten UNet computes diffusers' output
//! (`expected/unet_io.safetensors`) as closely as the export itself does on ONNX Runtime's CPU
//! provider, its LoRA-target weights map exactly as before, and patterns it does not know are
//! reported and left alone.

mod common;

use std::path::Path;

use bytes::Bytes;
use lorafuse::onnx::optimize::{OptimizeOptions, fused_ops, optimize};
use lorafuse::onnx::{OnnxModel, WeightIndex};
use lorafuse::runtime::session::{self, Device, SessionOptions};
use lorafuse::runtime::tensor::{extract_f32, float_value};
use ort::session::Session;

use common::tiny;

fn cpu() -> SessionOptions {
    SessionOptions {
        device: Device::Cpu,
        intra_threads: Some(1),
        tf32: false,
        ..Default::default()
    }
}

fn fixture(name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(tiny("expected/unet_io.safetensors")).expect("unet_io");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let t = st.tensor(name).expect(name);
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), v)
}

fn run_unet(s: &mut Session) -> Vec<f32> {
    let ty = |s: &Session, name: &str| match s
        .inputs()
        .iter()
        .find(|i| i.name() == name)
        .map(|i| i.dtype().clone())
    {
        Some(ort::value::ValueType::Tensor { ty, .. }) => ty,
        other => panic!("{name}: {other:?}"),
    };
    let (sample_ty, t_ty, h_ty) = (
        ty(s, "sample"),
        ty(s, "timestep"),
        ty(s, "encoder_hidden_states"),
    );
    let (ss, sample) = fixture("sample");
    let (_, t) = fixture("timestep");
    let (hs, hidden) = fixture("encoder_hidden_states");
    let out = s
        .run(ort::inputs![
            "sample" => float_value(&sample, &ss, sample_ty).expect("sample"),
            "timestep" => float_value(&t, &[], t_ty).expect("t"),
            "encoder_hidden_states" => float_value(&hidden, &hs, h_ty).expect("hidden"),
        ])
        .expect("unet run");
    extract_f32(&out[0], "out_sample").expect("f32").1
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn optimized_session(model: &OnnxModel, bytes: Vec<u8>) -> Session {
    session::open_from_memory(
        model.path(),
        &cpu(),
        lorafuse::onnx::write::PatchedInMemory {
            model: bytes,
            data_files: Vec::new(),
        },
    )
    .expect("optimized session")
}

#[test]
fn attention_becomes_multi_head_attention_and_matches_diffusers() {
    let path = tiny("onnx/unet/model.onnx");
    let model = OnnxModel::open(&path).expect("open");
    let (bytes, report) = optimize(&model, &OptimizeOptions::default()).expect("optimize");
    eprintln!("{report}");
    // The tiny UNet has 4 transformer blocks, each with self- and cross-attention.
    assert_eq!(report.fused.get("MultiHeadAttention"), Some(&8), "{report}");
    assert!(
        report.left_alone.iter().all(|l| l.fusion != "attention"),
        "{report}"
    );
    assert!(report.nodes_after < report.nodes_before, "{report}");

    let (_, want) = fixture("out_sample");
    let exported = run_unet(&mut session::open(&path, &cpu()).expect("session"));
    let fused = run_unet(&mut optimized_session(&model, bytes.clone()));
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    let (d_exp, d_opt) = (max_diff(&exported, &want), max_diff(&fused, &want));
    eprintln!("max |diff| vs diffusers: export {d_exp:e}, optimized {d_opt:e} (scale {scale})");
    // fp32 on the CPU: the fused kernel sums in another order; stay at the export's accuracy.
    assert!(
        d_opt <= 1e-5 * scale.max(1.0) + 2.0 * d_exp,
        "{d_opt} vs {d_exp}"
    );
    assert!(max_diff(&fused, &exported) <= 1e-5 * scale.max(1.0));

    // The optimized model's LoRA targets map exactly as the export's.
    let opt = OnnxModel::from_bytes(&path, Bytes::from(bytes)).expect("reopen");
    assert_eq!(fused_ops(&opt).get("MultiHeadAttention"), Some(&8));
    let (a, b) = (WeightIndex::build(&model), WeightIndex::build(&opt));
    let rows = |ix: &WeightIndex| {
        let mut v: Vec<String> = ix.iter().map(|m| format!("{m:?}")).collect();
        v.sort();
        v
    };
    assert_eq!(rows(&a), rows(&b));
    assert!(a.len() > 0);
}

#[test]
fn fp16_export_fuses_the_same_attention() {
    let model = OnnxModel::open(tiny("onnx-fp16/unet/model.onnx")).expect("open");
    let (_, report) = optimize(&model, &OptimizeOptions::default()).expect("optimize");
    eprintln!("{report}");
    assert_eq!(report.fused.get("MultiHeadAttention"), Some(&8), "{report}");
}

#[test]
fn dynamo_export_is_reported_where_not_fused() {
    let path = tiny("onnx-dynamo/unet/model.onnx");
    let model = OnnxModel::open(&path).expect("open");
    let (bytes, report) = optimize(&model, &OptimizeOptions::default()).expect("optimize");
    eprintln!("{report}");
    let fused = report.fused.get("MultiHeadAttention").copied().unwrap_or(0);
    let left = report
        .left_alone
        .iter()
        .filter(|l| l.fusion == "attention")
        .count();
    assert_eq!(fused + left, 8, "{report}");
    // Whatever was fused or left alone, the graph still computes the export's output.
    let exported = run_unet(&mut session::open(&path, &cpu()).expect("session"));
    let got = run_unet(&mut optimized_session(&model, bytes));
    let scale = exported.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(max_diff(&got, &exported) <= 1e-5 * scale.max(1.0));
}

#[test]
fn a_model_without_patterns_is_unchanged() {
    let model = OnnxModel::open(tiny("onnx/vae_decoder/model.onnx")).expect("open");
    let opts = OptimizeOptions::default();
    let (_, report) = optimize(&model, &opts).expect("optimize");
    let _ = Path::new("");
    eprintln!("{report}");
    assert_eq!(report.nodes_before, report.nodes_after, "{report}");
}
