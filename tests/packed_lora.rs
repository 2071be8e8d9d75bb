//! LoRAs on UNets optimized by ONNX Runtime's own transformer optimizer, which packs attention
//! weights (docs/ARCHITECTURE.md §4c). Fixtures made at test time by the reference tool
//! (`models/scripts/ort_optimize_unet.py`, onnxruntime 1.31.1's optimizer in the venv of
//! `scripts/setup.sh --train`) from the tiny UNet:
//! - `onnx-ortopt/unet`: packed QKV (self-attention) and packed KV (cross-attention)
//!   MultiHeadAttention, interleaved per head (CUDA only: no CPU kernel for packed QKV);
//! - `onnx-ortopt-attention/unet`: self-attention as `Attention` with a stacked
//!   `qkv_weight`, cross-attention K/V separate (runs on the CPU provider);
//! - `onnx-ortopt-nhwc/unet`: the same plus every convolution as `com.microsoft.NhwcConv` with
//!   its weight stored `[O, kH, kW, I]` (what the optimizer does for SD on CUDA; CUDA only);
//! - `onnx-olive/unet`, `onnx-olive-cuda/unet`: Olive's SD recipe (the optimizer, then fp16), with
//!   its "optimize" and "optimize_cuda" fusion options (CUDA only).
//!
//! The index maps the same module paths as on the export; every LoRA dialect merges into the
//! packed columns exactly as into the export's separate weights (f32 bit for bit); the merged
//! `Attention` graph computes the merged export's output on the CPU provider.

mod common;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use lorafuse::merge::{LoraSpec, MergeOptions, merge_pipeline};
use lorafuse::onnx::proto::ModelProto;
use lorafuse::onnx::{Layout, MappedWeight, OnnxModel, Via, WeightIndex};
use lorafuse::runtime::session;
use prost::Message;

use common::{cpu, tiny};

fn run_unet(path: &Path) -> Vec<f32> {
    common::run_unet(&mut session::open(path, &cpu()).expect("session"))
}

const PACKED: &str = "onnx-ortopt";
const STACKED: &str = "onnx-ortopt-attention";
const NHWC: &str = "onnx-ortopt-nhwc";

/// The UNet of fixture `variant`, made once per test process by ONNX Runtime's optimizer.
fn ort_fixture(variant: &str) -> PathBuf {
    common::made(&format!("{variant}/unet/model.onnx"))
}

/// A copy of the tiny pipeline whose UNet is the fixture `variant`.
fn pipeline_with(work: &Path, variant: &str) -> PathBuf {
    let dir = work.join(variant);
    common::copy_dir(&tiny("onnx"), &dir);
    std::fs::copy(ort_fixture(variant), dir.join("unet/model.onnx")).expect("swap unet");
    dir
}

fn work_dir(name: &str) -> PathBuf {
    let w = std::env::temp_dir().join(format!("lorafuse-packed-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&w);
    std::fs::create_dir_all(&w).expect("work dir");
    w
}

/// The module's weight in torch layout `[out, in]`, from the model's stored values.
fn torch_weight(model: &OnnxModel, w: &MappedWeight) -> Vec<f32> {
    let (_, v) = model.initializer_f32(&w.initializer).expect("values");
    w.to_torch(&v).expect("torch layout")
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every module mapped in `idx` holds the `reference` model's weight: same torch shape and dtype, the
/// same values bit for bit once read into torch layout.
fn assert_same_weights(
    what: &str,
    (model, idx): (&OnnxModel, &WeightIndex),
    (reference, ridx): (&OnnxModel, &WeightIndex),
) {
    for w in idx.iter() {
        let e = ridx.lookup(&w.module).expect("reference module");
        assert_eq!(
            (&w.torch_shape, w.dtype),
            (&e.torch_shape, e.dtype),
            "{what} {}",
            w.module
        );
        assert_eq!(
            bits(&torch_weight(model, w)),
            bits(&torch_weight(reference, e)),
            "{what} {}: not the reference's weight",
            w.module
        );
    }
}

fn attention_modules(idx: &WeightIndex) -> Vec<String> {
    idx.modules()
        .filter(|m| m.contains(".attn"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn index_maps_packed_slices_to_the_exports_modules() {
    let plain = OnnxModel::open(tiny("onnx/unet/model.onnx")).expect("export");
    let pidx = WeightIndex::build(&plain);
    let export_convs = pidx.iter().filter(|w| w.op == "Conv").count();
    assert!(
        export_convs > 20,
        "{export_convs} convolutions on the export"
    );
    for (variant, packed_modules) in [(PACKED, 20), (STACKED, 12), (NHWC, 12)] {
        let model = OnnxModel::open(ort_fixture(variant)).expect("opt");
        let idx = WeightIndex::build(&model);
        idx.validate(&model).expect("valid");
        // the same module paths as on the export
        assert_eq!(
            idx.modules().collect::<Vec<_>>(),
            pidx.modules().collect::<Vec<_>>(),
            "{variant}: skipped {:?}",
            idx.skipped()
        );
        let packed: Vec<&MappedWeight> = idx
            .iter()
            .filter(|w| w.via == Via::PackedAttention)
            .collect();
        // 4 transformer blocks: attn1 q/k/v (+ attn2 k/v when K/V are packed)
        assert_eq!(packed.len(), packed_modules, "{variant}");
        for w in &packed {
            assert!(
                w.module.contains(".attn1.") || variant == PACKED,
                "{}",
                w.module
            );
            assert!(!w.module.ends_with("attn2.to_q"), "{}", w.module);
        }
        // every convolution of the NHWC variant is an NhwcConv weight, found by the node's name
        let nhwc: Vec<&MappedWeight> = idx.iter().filter(|w| w.layout == Layout::Nhwc).collect();
        if variant == NHWC {
            assert_eq!(nhwc.len(), export_convs, "{variant}");
            for w in &nhwc {
                assert_eq!(
                    (w.op.as_str(), w.via),
                    ("NhwcConv", Via::NodeName),
                    "{}",
                    w.module
                );
                assert_eq!(w.torch_shape.len(), 4, "{}", w.module);
            }
        } else {
            assert!(nhwc.is_empty(), "{variant}");
        }
        // to_q of attn2 and every to_out.0 stay plain MatMuls
        for m in attention_modules(&idx) {
            if m.ends_with(".to_out.0") || m.ends_with("attn2.to_q") {
                assert_eq!(idx.lookup(&m).expect("m").via, Via::NodeName, "{m}");
            }
        }
        // the slices hold the export's weights, as the reference tool packed them
        assert_same_weights(variant, (&model, &idx), (&plain, &pidx));
        assert!(
            !idx.skipped().iter().any(|s| s.reason.contains("Attention")),
            "{:?}",
            idx.skipped()
        );
        // a cached index round-trips with its packed layouts
        let back = WeightIndex::from_json(&idx.to_json()).expect("json");
        back.validate(&model).expect("cached index valid");
        assert_eq!(back, idx);
    }
}

/// Every dialect merged into the packed weights equals the merged export's separate weights,
/// bit for bit, and the fast switch's update of a packed weight is the same ΔW.
#[test]
fn every_dialect_merges_into_packed_columns_like_into_the_export() {
    let work = work_dir("merge");
    let src = tiny("onnx");
    let variants: Vec<(&str, PathBuf)> = [PACKED, STACKED, NHWC]
        .into_iter()
        .map(|v| (v, pipeline_with(&work, v)))
        .collect();
    let (mut merged_somewhere, mut merged_nhwc) = (0, 0);
    for (lora, file) in common::lora_fixtures() {
        assert!(file.is_file(), "{lora}");
        let a = work.join(format!("{lora}-export"));
        common::merge_one(&src, &file, &a);
        let ma = OnnxModel::open(a.join("unet/model.onnx")).expect("a");
        let ia = WeightIndex::build(&ma);
        let base = OnnxModel::open(tiny("onnx/unet/model.onnx")).expect("base");
        let ibase = WeightIndex::build(&base);
        for (variant, dir) in &variants {
            let b = work.join(format!("{lora}-{variant}"));
            common::merge_one(dir, &file, &b);
            let mb = OnnxModel::open(b.join("unet/model.onnx")).expect("b");
            let ib = WeightIndex::build(&mb);
            for w in ib.iter() {
                let e = ia.lookup(&w.module).expect("module");
                let (x, y) = (torch_weight(&mb, w), torch_weight(&ma, e));
                assert_eq!(bits(&x), bits(&y), "{lora} {variant} {}", w.module);
                let changed =
                    x != torch_weight(&base, ibase.lookup(&w.module).expect("base module"));
                match w.layout {
                    Layout::Packed { .. } if changed => merged_somewhere += 1,
                    Layout::Nhwc if changed => merged_nhwc += 1,
                    _ => {}
                }
            }
        }
    }
    assert!(merged_somewhere > 0, "no LoRA changed a packed slice");
    assert!(
        merged_nhwc > 0,
        "no LoRA changed an NHWC convolution weight"
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// Olive-style fp16 graphs (Olive's SD recipe: ORT's optimizer, then fp16; `onnx-olive`: packed
/// QKV/KV and GroupNorm; `onnx-olive-cuda`: the optimizer's defaults, NhwcConv included) map the
/// fp16 export's modules with the same fp16 values, and every LoRA merges into them bit for bit as
/// into the fp16 export (both read fp16, add ΔW in f32, round back once).
#[test]
fn olive_style_fp16_graphs_merge_like_the_fp16_export() {
    let work = work_dir("olive");
    let export = common::made("onnx-fp16");
    let read = |dir: &Path| -> (OnnxModel, WeightIndex) {
        let m = OnnxModel::open(dir.join("unet/model.onnx")).expect("unet");
        let i = WeightIndex::build(&m);
        (m, i)
    };
    let (base, ibase) = read(&export);
    let mut variants = Vec::new();
    for variant in ["onnx-olive", "onnx-olive-cuda"] {
        let dir = work.join(variant);
        common::copy_dir(&export, &dir);
        std::fs::copy(ort_fixture(variant), dir.join("unet/model.onnx")).expect("swap unet");
        let (m, idx) = read(&dir);
        idx.validate(&m).expect("valid");
        assert_eq!(
            idx.modules().collect::<Vec<_>>(),
            ibase.modules().collect::<Vec<_>>(),
            "{variant}: skipped {:?}",
            idx.skipped()
        );
        assert!(
            idx.iter().any(|w| w.via == Via::PackedAttention),
            "{variant}"
        );
        assert_same_weights(variant, (&m, &idx), (&base, &ibase));
        variants.push((variant, dir));
    }
    let mut changed = 0;
    for (lora, file) in common::lora_fixtures() {
        let merge = |src: &Path, name: &str| -> (OnnxModel, WeightIndex) {
            let out = work.join(format!("{lora}-{name}"));
            common::merge_one(src, &file, &out);
            read(&out)
        };
        let (ma, ia) = merge(&export, "export");
        for (variant, dir) in &variants {
            let (mb, ib) = merge(dir, variant);
            for w in ib.iter() {
                let e = ia.lookup(&w.module).expect("module");
                let x = torch_weight(&mb, w);
                assert_eq!(
                    bits(&x),
                    bits(&torch_weight(&ma, e)),
                    "{lora} {variant} {}",
                    w.module
                );
                if x != torch_weight(&base, ibase.lookup(&w.module).expect("base")) {
                    changed += 1;
                }
            }
        }
    }
    assert!(changed > 0, "no LoRA changed a weight");
    let _ = std::fs::remove_dir_all(&work);
}

/// The fast switch: base + the update of a packed initializer = the merged weight, in the plan
/// and in the switch's live weights.
#[test]
fn switch_updates_of_packed_weights_equal_the_merge() {
    use lorafuse::layout::{OnnxComponent, OnnxPipelineDir};
    use lorafuse::merge::WeightUpdate;
    let work = work_dir("switch");
    for variant in [PACKED, STACKED, NHWC] {
        let dir = pipeline_with(&work, variant);
        let pd = OnnxPipelineDir::open(&dir).expect("pipeline");
        let specs: Vec<LoraSpec> = [
            tiny("loras/diffusers.safetensors"),
            common::root().join("models/loras/stars.safetensors:0.7"),
        ]
        .iter()
        .map(|f| f.to_str().expect("utf-8").parse().expect("spec"))
        .collect();
        let plan = lorafuse::merge::plan(&pd, &specs, &MergeOptions::default()).expect("plan");
        let model = OnnxModel::open(dir.join("unet/model.onnx")).expect("unet");
        let idx = WeightIndex::build(&model);
        // packed attention slices (the projections' factors stacked, B's columns at the packed
        // columns) and NHWC convolution weights (B's columns in the stored order): low-rank
        let packed: std::collections::BTreeSet<&str> = idx
            .iter()
            .filter(|w| w.via == Via::PackedAttention)
            .map(|w| w.initializer.as_str())
            .collect();
        let nhwc: std::collections::BTreeSet<&str> = idx
            .iter()
            .filter(|w| w.layout == Layout::Nhwc)
            .map(|w| w.initializer.as_str())
            .collect();
        let ups = plan.updates(OnnxComponent::Unet).expect("updates");
        let (mut seen, mut low_rank_nhwc, mut low_rank_packed) = (0, 0, 0);
        for u in ups.iter().filter(|u| {
            packed.contains(u.initializer.as_str()) || nhwc.contains(u.initializer.as_str())
        }) {
            let (_, mut w) = model.initializer_f32(&u.initializer).expect("base");
            match &u.update {
                WeightUpdate::Full { delta } => {
                    for (x, d) in w.iter_mut().zip(delta) {
                        *x += d;
                    }
                }
                WeightUpdate::LowRank { a, b, m, r, n } => {
                    assert_eq!(m * n, w.len(), "{}", u.initializer);
                    if nhwc.contains(u.initializer.as_str()) {
                        low_rank_nhwc += 1;
                    } else {
                        low_rank_packed += 1;
                    }
                    for i in 0..*m {
                        for j in 0..*n {
                            w[i * n + j] +=
                                (0..*r).map(|k| a[i * r + k] * b[k * n + j]).sum::<f32>();
                        }
                    }
                }
            }
            let merged = plan
                .merged_weight(OnnxComponent::Unet, &u.initializer)
                .expect("merged");
            let diff = w
                .iter()
                .zip(&merged.values)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff <= 1e-6, "{variant} {}: {diff}", u.initializer);
            seen += 1;
        }
        assert!(seen > 0, "{variant}: no packed or NHWC weight updated");
        assert_eq!(
            low_rank_nhwc > 0,
            variant == NHWC,
            "{variant}: low-rank NHWC updates"
        );
        // standard LoRAs only: every packed update is low-rank (a switch uploads factors, not ΔW)
        assert_eq!(
            low_rank_packed,
            ups.iter()
                .filter(|u| packed.contains(u.initializer.as_str()))
                .count(),
            "{variant}: low-rank packed updates"
        );
        assert!(
            low_rank_packed > 0 || variant == NHWC,
            "{variant}: no packed update"
        );
        // and the switch's live weights (CPU) take them like any other weight
        lorafuse::runtime::init(None).expect("ONNX Runtime");
        let names = plan.target_names(OnnxComponent::Unet);
        let mut live = lorafuse::runtime::switch::LiveWeights::new(
            &model,
            &names,
            lorafuse::runtime::switch::Placement::Cpu,
            &cpu(),
        )
        .expect("live weights");
        live.apply(&ups).expect("apply");
        for m in plan.merged(OnnxComponent::Unet).expect("merged") {
            let got = live.live_f32(&m.initializer).expect("live");
            let diff = got
                .iter()
                .zip(&m.values)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff <= 1e-6, "{variant} live {}: {diff}", m.initializer);
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// The merged `Attention` graph (stacked QKV) computes the merged export's output on the CPU
/// provider. (The packed-QKV graph has no CPU kernel; its weights are checked above.)
#[test]
fn merged_stacked_attention_unet_matches_the_merged_export_on_cpu() {
    let work = work_dir("run");
    let none = &mut |_: usize, _: usize, _: &str| {};
    let dir = pipeline_with(&work, STACKED);
    let spec: LoraSpec = tiny("loras/kohya.safetensors")
        .to_str()
        .expect("utf-8")
        .parse()
        .expect("spec");
    let (a, b) = (work.join("export"), work.join("stacked"));
    let opts = MergeOptions::default();
    merge_pipeline(
        &tiny("onnx"),
        &a,
        std::slice::from_ref(&spec),
        &opts,
        false,
        none,
    )
    .expect("export merge");
    merge_pipeline(&dir, &b, &[spec], &opts, false, none).expect("stacked merge");
    let base = run_unet(&tiny("onnx/unet/model.onnx"));
    let want = run_unet(&a.join("unet/model.onnx"));
    let got = run_unet(&b.join("unet/model.onnx"));
    let diff = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max)
    };
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1.0);
    // the LoRA changes the output far beyond the tolerance, the fusion does not
    assert!(diff(&base, &want) > 1e-3 * scale, "{}", diff(&base, &want));
    assert!(diff(&got, &want) <= 1e-5 * scale, "{}", diff(&got, &want));
    let _ = std::fs::remove_dir_all(&work);
}

/// Patterns recognised only in part leave their weights unmapped, with a reason; never a panic.
#[test]
fn partial_patterns_are_skipped_with_a_reason() {
    let path = ort_fixture(PACKED);
    let good = OnnxModel::open(&path).expect("model");
    type Edit = (&'static str, fn(&mut ModelProto));
    let edits: [Edit; 4] = [
        ("num_heads removed", |m| {
            for n in graph(m).node.iter_mut() {
                if n.op_type() == "MultiHeadAttention" {
                    n.attribute.retain(|a| a.name() != "num_heads");
                }
            }
        }),
        ("reshape shape wrong", |m| {
            for t in graph(m).initializer.iter_mut() {
                if t.name().ends_with("_reshape_shape") {
                    // [0, 0, N, P, H] → [0, 0, N, P, H + 1]
                    let mut v: Vec<i64> = match &t.raw_data {
                        Some(raw) => raw
                            .chunks_exact(8)
                            .map(|c| i64::from_le_bytes(c.try_into().expect("8")))
                            .collect(),
                        None => t.int64_data.clone(),
                    };
                    assert_eq!(v.len(), 5);
                    v[4] += 1;
                    t.raw_data = None;
                    t.int64_data = v;
                }
            }
        }),
        ("to_out renamed", |m| {
            for n in graph(m).node.iter_mut() {
                if n.name().contains("attn1/to_out.0") {
                    n.name = Some(format!("renamed_{}", n.op_type()));
                }
            }
        }),
        ("weight shared", |m| {
            let g = graph(m);
            let w = g
                .node
                .iter()
                .find(|n| n.name() == "MatMul_QKV_0")
                .map(|n| n.input[1].clone())
                .expect("MatMul_QKV_0");
            let mut extra = g.node.iter().find(|n| n.name() == "MatMul_QKV_0").cloned();
            if let Some(e) = extra.as_mut() {
                e.name = Some("extra".into());
                e.output = vec!["extra_out".into()];
                e.input[1] = w;
            }
            g.node.extend(extra);
            g.output.push(lorafuse::onnx::proto::ValueInfoProto {
                name: Some("extra_out".into()),
                ..Default::default()
            });
        }),
    ];
    let full = WeightIndex::build(&good);
    for (what, edit) in edits {
        let mut proto = good.proto().clone();
        edit(&mut proto);
        let m = OnnxModel::from_bytes(&path, Bytes::from(proto.encode_to_vec())).expect(what);
        let idx = WeightIndex::build(&m);
        idx.validate(&m).expect(what);
        let lost = full.len() - idx.len();
        assert!(lost > 0, "{what}: nothing unmapped");
        assert!(
            idx.iter().all(|w| full.lookup(&w.module) == Some(w)),
            "{what}: a mapping changed"
        );
        assert!(
            idx.skipped()
                .iter()
                .any(|s| s.reason.contains("Attention") || s.reason.contains("consumers")),
            "{what}: {:?}",
            idx.skipped()
        );
    }
}

fn graph(m: &mut ModelProto) -> &mut lorafuse::onnx::proto::GraphProto {
    m.graph.as_mut().expect("graph")
}
