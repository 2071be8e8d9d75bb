//! The fast LoRA switch's device-side update (`runtime::switch`) against the Rust merge maths
//! that `lorafuse merge` uses (itself checked against diffusers' fused weights in tests/merge.rs):
//! every live weight equals the merged weight, for fp32 and fp16 exports, several LoRAs of two
//! dialects, the full-ΔW path, and a return to the base weights.

use lorafuse::layout::{OnnxComponent, OnnxPipelineDir};
use lorafuse::merge::{self, LoraSpec, MergeOptions, PlannedUpdate, WeightUpdate};
use lorafuse::onnx::OnnxModel;
use lorafuse::runtime::session::{Device, SessionOptions};
use lorafuse::runtime::switch::{LiveWeights, Placement};

mod common;
use common::tiny;

fn cpu() -> SessionOptions {
    SessionOptions {
        device: Device::Cpu,
        intra_threads: Some(1),
        tf32: false,
        ..Default::default()
    }
}

fn loras() -> Vec<LoraSpec> {
    vec![
        LoraSpec {
            path: tiny("loras/diffusers.safetensors"),
            weight: 0.8,
        },
        LoraSpec {
            path: tiny("loras/kohya_wide.safetensors"),
            weight: -0.5,
        },
    ]
}

/// Largest |a − b| / (|b| + floor) over two vectors.
fn worst_rel(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (y.abs() + floor))
        .fold(0f32, f32::max)
}

fn check_export(folder: &str, tol: f32) {
    lorafuse::runtime::init(None).expect("ONNX Runtime");
    let path = match folder {
        "onnx-fp16" => common::made(folder), // with its tokenizer (not stored in models/tiny)
        _ => tiny(folder),
    };
    let dir = OnnxPipelineDir::open(&path).expect("pipeline");
    let plan = merge::plan(&dir, &loras(), &MergeOptions::default()).expect("plan");
    for c in [OnnxComponent::Unet, OnnxComponent::TextEncoder] {
        let model = OnnxModel::open(dir.model_path(c)).expect("model");
        let names = plan.target_names(c);
        assert!(!names.is_empty(), "{folder} {c}: the LoRAs touch it");
        let mut live = LiveWeights::new(&model, &names, Placement::Cpu, &cpu()).expect("live");
        let updates = plan.updates(c).expect("updates");
        assert!(
            updates
                .iter()
                .all(|u| matches!(u.update, WeightUpdate::LowRank { .. })),
            "standard LoRAs stack into factors"
        );
        live.apply(&updates).expect("apply");
        let merged = plan.merged(c).expect("merged");
        assert_eq!(merged.len(), names.len());
        let mut worst = 0f32;
        for m in &merged {
            let got = live.live_f32(&m.initializer).expect("read back");
            worst = worst.max(worst_rel(&got, &m.values, 1e-2));
        }
        eprintln!(
            "{folder} {c}: {} weights, worst relative diff {worst:e}",
            merged.len()
        );
        assert!(worst <= tol, "{folder} {c}: {worst}");

        // Back to the base weights, bit for bit.
        live.reset().expect("reset");
        for m in merged.iter().take(5) {
            let (_, base) = model.initializer_f32(&m.initializer).expect("base");
            assert_eq!(live.live_f32(&m.initializer).expect("read"), base);
        }
    }
}

#[test]
fn live_weights_equal_merged_weights_fp32() {
    check_export("onnx", 1e-5);
}

#[test]
fn live_weights_equal_merged_weights_fp16() {
    // One fp16 rounding step apart at most (2^-10 relative), from summation order in f32.
    check_export("onnx-fp16", 1e-3);
}

#[test]
fn full_delta_and_unknown_weights() {
    lorafuse::runtime::init(None).expect("ONNX Runtime");
    let dir = OnnxPipelineDir::open(&common::made("onnx-fp16")).expect("pipeline");
    let model = OnnxModel::open(dir.model_path(OnnxComponent::Unet)).expect("model");
    let plan = merge::plan(&dir, &loras()[..1], &MergeOptions::default()).expect("plan");
    let name = plan.target_names(OnnxComponent::Unet).remove(0);
    let (dims, base) = model.initializer_f32(&name).expect("base");
    let mut live = LiveWeights::new(&model, std::slice::from_ref(&name), Placement::Cpu, &cpu())
        .expect("live");
    let delta: Vec<f32> = (0..base.len()).map(|i| (i % 7) as f32 * 0.125).collect();
    live.apply(&[PlannedUpdate {
        initializer: name.clone(),
        module: "test".into(),
        update: WeightUpdate::Full {
            delta: delta.clone(),
        },
    }])
    .expect("full update");
    let want: Vec<f32> = base
        .iter()
        .zip(&delta)
        .map(|(b, d)| half::f16::from_f32(b + d).to_f32())
        .collect();
    assert_eq!(live.live_f32(&name).expect("read"), want, "dims {dims:?}");

    // A weight the session does not expose, or a wrong size, is refused before anything changes.
    let err = live
        .apply(&[PlannedUpdate {
            initializer: "no_such_weight".into(),
            module: "x".into(),
            update: WeightUpdate::Full { delta: vec![0.0] },
        }])
        .expect_err("unknown weight");
    assert!(err.to_string().contains("no_such_weight"), "{err}");
    let err = live
        .apply(&[PlannedUpdate {
            initializer: name.clone(),
            module: "x".into(),
            update: WeightUpdate::Full {
                delta: vec![0.0; 3],
            },
        }])
        .expect_err("wrong size");
    assert!(err.to_string().contains(&name), "{err}");
    assert_eq!(
        live.live_f32(&name).expect("read"),
        want,
        "unchanged after refusals"
    );
}

/// The rewritten model declares the chosen initializers as inputs of the same type and shape and
/// no longer stores them (the session holds no copy: the switch binds its live buffers).
#[test]
fn weights_as_inputs_keep_the_model_valid() {
    lorafuse::runtime::init(None).expect("ONNX Runtime");
    let dir = OnnxPipelineDir::open(&tiny("onnx")).expect("pipeline");
    let path = dir.model_path(OnnxComponent::TextEncoder);
    let model = OnnxModel::open(&path).expect("model");
    let plan = merge::plan(&dir, &loras(), &MergeOptions::default()).expect("plan");
    let names = plan.target_names(OnnxComponent::TextEncoder);
    assert!(!names.is_empty());
    let patched = lorafuse::onnx::graphs::with_weights_as_inputs(&model, &names).expect("rewrite");
    let decoded = <lorafuse::onnx::proto::ModelProto as prost::Message>::decode(&patched.model[..])
        .expect("decodes");
    let graph = decoded.graph.expect("graph");
    let session = lorafuse::runtime::session::open_from_memory(&path, &cpu(), patched)
        .expect("ORT accepts the rewritten model");
    let inputs: Vec<String> = session
        .inputs()
        .iter()
        .map(|o| o.name().to_string())
        .collect();
    assert!(session.overridable_initializers().is_empty());
    for n in &names {
        assert!(inputs.contains(n), "{n} is not an input");
        assert!(
            !graph
                .initializer
                .iter()
                .any(|t| t.name.as_deref() == Some(n.as_str())),
            "{n} is still stored"
        );
        let info = model.require(n).expect("info");
        let input = graph
            .input
            .iter()
            .find(|i| i.name.as_deref() == Some(n.as_str()))
            .expect("declared");
        assert!(
            format!("{input:?}").contains(&format!("{:?}", info.dims[0])),
            "{n}"
        );
    }
    // every other initializer is kept
    assert_eq!(
        graph.initializer.len() + names.len(),
        model.graph().initializer.len()
    );
    // A name that is not an initializer is refused, naming it.
    let err = lorafuse::onnx::graphs::with_weights_as_inputs(&model, &["nope".into()])
        .err()
        .expect("unknown initializer");
    assert!(err.to_string().contains("nope"), "{err}");
}
