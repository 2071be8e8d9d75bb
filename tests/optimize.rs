//! `lorafuse::onnx::optimize` on the tiny pipeline's exports (made by torch's exporters through
//! optimum, `models/scripts/make_tiny.py`): the rewritten UNet computes diffusers' output
//! (`expected/unet_io.safetensors`) as closely as the export itself does on ONNX Runtime's CPU
//! provider, its LoRA-target weights map exactly as before, and patterns it does not know are
//! reported and left alone.

mod common;

use std::path::Path;

use bytes::Bytes;
use lorafuse::onnx::optimize::{OptimizeOptions, optimize};
use lorafuse::onnx::{OnnxModel, WeightIndex};
use lorafuse::runtime::session;
use ort::session::Session;

use common::{cpu, max_diff, run_unet, tiny, unet_fixture as fixture};

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
    let (bytes, report) = optimize(&model, &OptimizeOptions::for_cpu()).expect("optimize");
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
    assert_eq!(
        lorafuse::onnx::contrib_ops(opt.graph()).get("MultiHeadAttention"),
        Some(&8)
    );
    let (a, b) = (WeightIndex::build(&model), WeightIndex::build(&opt));
    let rows = |ix: &WeightIndex| {
        let mut v: Vec<String> = ix.iter().map(|m| format!("{m:?}")).collect();
        v.sort();
        v
    };
    assert_eq!(rows(&a), rows(&b));
    assert!(!a.is_empty());
}

#[test]
fn fp16_export_fuses_the_same_attention() {
    let model = OnnxModel::open(tiny("onnx-fp16/unet/model.onnx")).expect("open");
    let (_, report) = optimize(&model, &OptimizeOptions::default()).expect("optimize");
    eprintln!("{report}");
    assert_eq!(report.fused.get("MultiHeadAttention"), Some(&8), "{report}");
}

/// torch's dynamo exporter writes K's transpose as Reshape → Transpose(0,2,1) → Reshape and the
/// scale as a constant on both sides: fused as well, same output.
#[test]
fn dynamo_export_attention_is_fused_too() {
    let path = tiny("onnx-dynamo/unet/model.onnx");
    let model = OnnxModel::open(&path).expect("open");
    let (bytes, report) = optimize(&model, &OptimizeOptions::for_cpu()).expect("optimize");
    eprintln!("{report}");
    let fused = report.fused.get("MultiHeadAttention").copied().unwrap_or(0);
    let left = report
        .left_alone
        .iter()
        .filter(|l| l.fusion == "attention")
        .count();
    assert_eq!((fused, left), (8, 0), "{report}");
    // Whatever was fused or left alone, the graph still computes the export's output.
    let exported = run_unet(&mut session::open(&path, &cpu()).expect("session"));
    let got = run_unet(&mut optimized_session(&model, bytes));
    let scale = exported.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(max_diff(&got, &exported) <= 1e-5 * scale.max(1.0));
}

/// CLIP's causal attention (Softmax over MatMul + mask) is not a pattern we fuse: without the
/// residual norms (a pattern we do fuse there) the text encoder is reported and left exactly as it
/// was.
#[test]
fn unknown_patterns_are_reported_and_left_alone() {
    let model = OnnxModel::open(tiny("onnx/text_encoder/model.onnx")).expect("open");
    let opts = OptimizeOptions {
        skip_layer_norm: false,
        ..OptimizeOptions::default()
    };
    let (bytes, report) = optimize(&model, &opts).expect("optimize");
    eprintln!("{report}");
    assert!(report.fused.is_empty(), "{report}");
    assert_eq!(report.nodes_before, report.nodes_after);
    assert_eq!(report.left_alone.len(), 2, "{report}");
    assert!(
        report
            .left_alone
            .iter()
            .all(|l| l.reason.contains("Softmax input") && !l.node.is_empty())
    );
    // Same graph, re-encoded.
    let again = OnnxModel::from_bytes(model.path(), Bytes::from(bytes)).expect("reopen");
    assert_eq!(again.graph().node, model.graph().node);
}

/// Attention and GroupNorm without SkipGroupNorm and the bias fusions.
fn group_norm_only() -> OptimizeOptions {
    OptimizeOptions {
        skip_group_norm: false,
        bias: false,
        ..OptimizeOptions::for_cuda()
    }
}

/// GroupNorm + SiLU: each torch group_norm becomes Transpose → com.microsoft.GroupNorm →
/// Transpose with γ/β as fp32 [C] and the exporter's ε and group count (CUDA-only kernel: the
/// numbers are checked on the GPU by scripts/gpu_fused_bench.sh; here the structure and values).
#[test]
fn group_norm_fusion_keeps_gamma_beta_eps_and_groups() {
    for (variant, groups) in [("onnx", 8i64), ("onnx-fp16", 8)] {
        let path = tiny(&format!("{variant}/unet/model.onnx"));
        let model = OnnxModel::open(&path).expect("open");
        // GroupNorm alone (with SkipGroupNorm the sums in front of 15 become SkipGroupNorm)
        let (bytes, report) = optimize(&model, &group_norm_only()).expect("optimize");
        assert_eq!(
            report.fused.get("GroupNorm"),
            Some(&21),
            "{variant}: {report}"
        );
        let opt = OnnxModel::from_bytes(&path, Bytes::from(bytes)).expect("reopen");
        assert!(lorafuse::onnx::optimize::prefers_nhwc(opt.graph()));
        let nodes = &opt.graph().node;
        let exported_eps: std::collections::HashSet<u32> = model
            .graph()
            .node
            .iter()
            .filter(|n| n.op_type.as_deref() == Some("InstanceNormalization"))
            .filter_map(|n| {
                n.attribute
                    .iter()
                    .find(|a| a.name.as_deref() == Some("epsilon"))
            })
            .filter_map(|a| a.f.map(f32::to_bits))
            .collect();
        let mut silu = 0;
        for (i, n) in nodes.iter().enumerate() {
            if n.op_type.as_deref() != Some("GroupNorm") {
                continue;
            }
            let attr = |k: &str| n.attribute.iter().find(|a| a.name.as_deref() == Some(k));
            assert_eq!(attr("groups").and_then(|a| a.i), Some(groups));
            assert_eq!(attr("channels_last").and_then(|a| a.i), Some(1));
            let eps = attr("epsilon").and_then(|a| a.f).expect("epsilon");
            // diffusers: 1e-5 in ResNet blocks, 1e-6 in transformer blocks (as exported)
            assert!(exported_eps.contains(&eps.to_bits()), "{eps}");
            silu += attr("activation").and_then(|a| a.i).expect("activation");
            // fed by an NCHW→NHWC transpose, read by an NHWC→NCHW one
            let producer = nodes
                .iter()
                .find(|m| m.output.contains(&n.input[0]))
                .expect("producer");
            assert_eq!(producer.op_type.as_deref(), Some("Transpose"));
            let perm = |m: &lorafuse::onnx::proto::NodeProto| {
                m.attribute
                    .iter()
                    .find(|a| a.name.as_deref() == Some("perm"))
                    .map(|a| a.ints.clone())
            };
            assert_eq!(perm(producer), Some(vec![0, 2, 3, 1]));
            let reader = nodes[i + 1..]
                .iter()
                .find(|m| m.input.contains(&n.output[0]))
                .expect("reader");
            assert_eq!(perm(reader), Some(vec![0, 3, 1, 2]));
            for k in [1, 2] {
                let t = opt.initializer(&n.input[k]).expect("γ/β initializer");
                assert_eq!(t.dtype, lorafuse::onnx::DataType::Float, "γ/β are fp32");
                assert_eq!(t.dims.len(), 1);
            }
        }
        // diffusers' ResNet norms are followed by SiLU, the transformers' norms are not
        assert!(silu > 0 && silu < 21, "{silu}");
        // γ of the first norm equals the exporter's Mul constant (exact: fp16 widens losslessly)
        let first = nodes
            .iter()
            .find(|n| n.op_type.as_deref() == Some("GroupNorm"))
            .expect("a GroupNorm");
        let (_, gamma) = opt.initializer_f32(&first.input[1]).expect("γ");
        let (_, want) = model
            .initializer_f32(
                &model
                    .graph()
                    .node
                    .iter()
                    .find(|n| n.op_type.as_deref() == Some("InstanceNormalization"))
                    .and_then(|inorm| {
                        let out = &inorm.output[0];
                        let r = model.graph().node.iter().find(|m| m.input.contains(out))?;
                        let m = model
                            .graph()
                            .node
                            .iter()
                            .find(|m| m.input.contains(&r.output[0]))?;
                        m.input.get(1).cloned()
                    })
                    .expect("γ of the first exported norm"),
            )
            .expect("γ values");
        assert_eq!(gamma, want, "{variant}");
    }
}

/// The CPU provider has no GroupNorm kernel: `for_cpu` leaves norms alone and the graph runs.
#[test]
fn cpu_optimization_runs_on_the_cpu_provider() {
    let path = tiny("onnx/unet/model.onnx");
    let model = OnnxModel::open(&path).expect("open");
    let (bytes, report) = optimize(&model, &OptimizeOptions::for_cpu()).expect("optimize");
    assert_eq!(report.fused.get("GroupNorm"), None);
    let exported = run_unet(&mut session::open(&path, &cpu()).expect("session"));
    let got = run_unet(&mut optimized_session(&model, bytes));
    let scale = exported.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(max_diff(&got, &exported) <= 1e-5 * scale.max(1.0));
    let _ = Path::new("");
}

/// Residual sums read by a LayerNormalization: CLIP's `h + attn(ln1(h))` before `ln2` (and the
/// MLP's before the next `ln1`), the UNet transformer's `attn(norm(h)) / 1 + h` before `norm2`
/// and `norm3`. Each becomes one SkipLayerNormalization reading the branch's MatMul, its bias and
/// the residual, with the norm's γ, β and ε, handing the sum back when the next residual reads it;
/// the text encoder's and the UNet's outputs match the export on the CPU provider (fp32: to 1e-5
/// of the output's scale; fp16: to 4e-3 of it, measured one fp16 step).
#[test]
fn residual_sums_become_skip_layer_norms_and_match_the_export() {
    use lorafuse::runtime::tensor::{extract_f32, ids_value};
    let only = OptimizeOptions {
        attention: false,
        group_norm: false,
        skip_group_norm: false,
        bias: false,
        skip_layer_norm: true,
        float16: false,
    };
    let cases = [
        ("onnx", "text_encoder", 4, 1, 1e-5f32),
        ("onnx", "unet", 8, 4, 1e-5),
        ("onnx-fp16", "text_encoder", 4, 1, 4e-3),
        ("onnx-fp16", "unet", 8, 4, 4e-3),
        // torch's dynamo exporter builds the residual's shape from Shape slices
        ("onnx-dynamo", "unet", 8, 4, 1e-5),
    ];
    for (variant, component, fused, norms_left, tol) in cases {
        let path = tiny(&format!("{variant}/{component}/model.onnx"));
        let model = OnnxModel::open(&path).expect("open");
        let (bytes, report) = optimize(&model, &only).expect("optimize");
        assert_eq!(
            report.fused.get("SkipLayerNormalization"),
            Some(&fused),
            "{variant}/{component}: {report}"
        );
        assert!(
            report.left_alone.is_empty(),
            "{variant}/{component}: {report}"
        );
        let opt = OnnxModel::from_bytes(&path, Bytes::from(bytes.clone())).expect("reopen");
        let g = opt.graph();
        let producer = |x: &str| g.node.iter().find(|n| n.output.iter().any(|o| o == x));
        let count = |op: &str| {
            g.node
                .iter()
                .filter(|n| n.op_type.as_deref() == Some(op))
                .count()
        };
        assert_eq!(
            count("LayerNormalization"),
            norms_left,
            "{variant}/{component}"
        );
        for n in g
            .node
            .iter()
            .filter(|n| n.op_type.as_deref() == Some("SkipLayerNormalization"))
        {
            assert_eq!(n.input.len(), 5, "{variant}/{component}: {n:?}");
            assert_eq!(
                producer(&n.input[0]).and_then(|p| p.op_type.as_deref()),
                Some("MatMul"),
                "{variant}/{component}: the branch's MatMul (a LoRA target) stays"
            );
            assert!(n.input[4].ends_with(".bias"), "{:?}", n.input);
            let eps = n
                .attribute
                .iter()
                .find(|a| a.name.as_deref() == Some("epsilon"));
            assert_eq!(eps.and_then(|a| a.f), Some(1e-5), "{variant}/{component}");
        }
        // the numbers
        let run = |s: &mut Session| -> Vec<f32> {
            if component == "unet" {
                return run_unet(s);
            }
            let ids: Vec<i64> = [49406, 320, 1125, 539, 2368, 49407]
                .into_iter()
                .chain(std::iter::repeat(49407))
                .take(77)
                .collect();
            let ty = ort::value::TensorElementType::Int64;
            let out = s
                .run(ort::inputs!["input_ids" => ids_value(&ids, &[1, 77], ty).expect("ids")])
                .expect("run");
            extract_f32(&out[0], "last_hidden_state").expect("f32").1
        };
        let exported = run(&mut session::open(&path, &cpu()).expect("session"));
        let got = run(&mut optimized_session(&model, bytes));
        let scale = exported
            .iter()
            .map(|v| v.abs())
            .fold(0f32, f32::max)
            .max(1.0);
        let d = max_diff(&got, &exported);
        eprintln!("{variant}/{component}: max diff {d} at scale {scale}");
        assert!(
            d <= tol * scale,
            "{variant}/{component}: {d} at scale {scale}"
        );
    }
}

/// `optimize_pipeline` writes a complete optimized copy (the input untouched, an existing output
/// refused), and every LoRA dialect merges into the optimized copy exactly as into the export:
/// the LoRA-target initializers come out byte for byte the same.
#[test]
fn loras_merge_into_optimized_pipelines_like_into_exports() {
    use lorafuse::merge::{MergeOptions, optimize_pipeline};
    let work = std::env::temp_dir().join(format!("lorafuse-optimize-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).expect("work dir");
    let src = tiny("onnx");
    let opt = work.join("opt");
    let none = &mut |_: usize, _: usize, _: &str| {};
    let report = optimize_pipeline(
        &src,
        &opt,
        &OptimizeOptions::for_cuda(),
        &MergeOptions::default(),
        none,
    )
    .expect("optimize_pipeline");
    assert_eq!(
        report.components["unet"].fused.get("MultiHeadAttention"),
        Some(&8)
    );
    assert!(
        opt.join("tokenizer/vocab.json").is_file()
            && opt.join("scheduler/scheduler_config.json").is_file()
    );
    // the tiny export stores its weights inline; the rewritten graphs keep theirs beside them
    for c in ["unet", "text_encoder", "vae_decoder"] {
        let m = OnnxModel::open(opt.join(c).join("model.onnx")).expect("optimized model");
        assert_eq!(m.external_locations(), ["model.onnx_data"], "{c}");
    }
    // `inspect` names the fusions each component has
    let lorafuse::api::Inspection::Onnx(ins) = lorafuse::api::inspect(&opt).expect("inspect")
    else {
        panic!("not a pipeline");
    };
    let ops = |c: &str| {
        ins.models
            .iter()
            .find(|m| {
                m.path
                    .parent()
                    .and_then(|p| p.file_name())
                    .is_some_and(|n| n == c)
            })
            .map(|m| m.graph.contrib_ops.clone())
            .unwrap_or_else(|| panic!("no {c}"))
    };
    assert_eq!(ops("unet").get("MultiHeadAttention"), Some(&8));
    assert!(ops("unet").contains_key("GroupNorm"), "{:?}", ops("unet"));
    assert_eq!(
        ops("text_encoder").into_iter().collect::<Vec<_>>(),
        [("SkipLayerNormalization".to_string(), 4)]
    );
    let again = optimize_pipeline(
        &src,
        &opt,
        &OptimizeOptions::for_cuda(),
        &MergeOptions::default(),
        none,
    );
    assert!(
        again
            .expect_err("existing output")
            .to_string()
            .contains("exists")
    );
    for (lora, file) in common::lora_fixtures() {
        let (a, b) = (
            work.join(format!("{lora}-export")),
            work.join(format!("{lora}-opt")),
        );
        common::merge_one(&src, &file, &a);
        common::merge_one(&opt, &file, &b);
        for c in ["unet", "text_encoder"] {
            let ma = OnnxModel::open(a.join(c).join("model.onnx")).expect("a");
            let mb = OnnxModel::open(b.join(c).join("model.onnx")).expect("b");
            let ix = WeightIndex::build(&ma);
            assert!(!ix.is_empty());
            for w in ix.iter() {
                let (x, y) = (
                    ma.initializer_bytes(&w.initializer).expect("a bytes"),
                    mb.initializer_bytes(&w.initializer).expect("b bytes"),
                );
                assert!(
                    x == y,
                    "{lora} {c} {}: merged weights differ",
                    w.initializer
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// Graphs that ONNX Runtime's optimizer (and Olive's recipe) already rewrote go through
/// `optimize` without losing a live node: they use "" for absent optional inputs and outputs and
/// are not always stored in topological order, which once made the rewrite drop over a hundred
/// live nodes (a GroupNorm fusion on such a graph wrote a broken model). Every graph output is
/// still computed, every node reads only graph inputs, initializers or earlier outputs, and a
/// graph with nothing to fuse keeps all its nodes.
#[test]
fn graphs_optimized_by_onnx_runtime_lose_no_node() {
    use std::collections::HashSet;
    for variant in [
        "onnx-ortopt-attention",
        "onnx-ortopt-nhwc",
        "onnx-olive-cuda",
    ] {
        let path = common::made(&format!("{variant}/unet/model.onnx"));
        let model = OnnxModel::open(&path).expect("model");
        for (opts, what) in [
            (OptimizeOptions::for_cpu(), "cpu"),
            (group_norm_only(), "cuda, attention and GroupNorm"),
            (OptimizeOptions::for_cuda(), "cuda, all fusions"),
        ] {
            let (bytes, report) = optimize(&model, &opts).expect("optimize");
            let out = OnnxModel::from_bytes(&path, Bytes::from(bytes)).expect("reopen");
            let g = out.proto().graph.as_ref().expect("graph");
            let mut known: HashSet<&str> = g
                .input
                .iter()
                .filter_map(|v| v.name.as_deref())
                .chain(g.initializer.iter().filter_map(|t| t.name.as_deref()))
                .collect();
            for n in &g.node {
                for x in n.input.iter().filter(|x| !x.is_empty()) {
                    assert!(
                        known.contains(x.as_str()),
                        "{variant} ({what}): `{}` reads `{x}` before it is made",
                        n.name()
                    );
                }
                known.extend(n.output.iter().map(String::as_str));
            }
            for o in &g.output {
                let name = o.name.as_deref().unwrap_or_default();
                assert!(
                    known.contains(name),
                    "{variant} ({what}): output {name} lost"
                );
            }
            if report.fused.is_empty() {
                assert_eq!(
                    report.nodes_after, report.nodes_before,
                    "{variant} ({what}): nothing fused, yet nodes removed"
                );
            }
            // each fusion replaces its pattern: the rest of the graph is all there
            let fused: usize = report.fused.values().sum();
            assert!(
                report.nodes_after + 16 * fused >= report.nodes_before,
                "{variant} ({what}): {} → {} nodes for {fused} fusions",
                report.nodes_before,
                report.nodes_after
            );
        }
    }
}

/// GEGLU → BiasSplitGelu and the feed-forward's bias + residual → BiasAdd (CUDA-only kernels:
/// their numbers are checked on the GPU by `scripts/gpu_fused_bench.sh fusions`). The tiny UNet's
/// feed-forwards are narrower than the kernels accept (2560/5120/10240 and 320/640/1280), so
/// every pattern of all three exports is found and reported as left alone for that reason; with
/// the biases' (and the last MatMul's) declared widths set to SD 1.5's, the same graphs fuse:
/// the MatMuls (LoRA targets) stay, the fused node reads their outputs and the exported bias.
#[test]
fn feed_forward_biases_fuse_at_the_cuda_kernels_sizes() {
    use lorafuse::onnx::optimize::optimize_proto;
    for variant in ["onnx", "onnx-fp16", "onnx-dynamo"] {
        let model = OnnxModel::open(tiny(&format!("{variant}/unet/model.onnx"))).expect("open");
        let read = |name: &str| model.initializer_f32(name).ok().map(|(_, v)| v);
        let mut proto = model.proto().clone();
        let report = optimize_proto(&mut proto, &OptimizeOptions::for_cuda(), &read);
        for (fusion, why) in [("bias split gelu", "2560"), ("bias add", "320")] {
            let left: Vec<_> = report
                .left_alone
                .iter()
                .filter(|l| l.fusion == fusion)
                .collect();
            assert_eq!(left.len(), 4, "{variant}: {report}");
            assert!(
                left.iter().all(|l| l.reason.contains(why)),
                "{variant}: {report}"
            );
        }
        assert_eq!(report.fused.get("BiasSplitGelu"), None);

        // SD 1.5's widths (320 channels, GEGLU 2·1280): only dims change, values are never read
        let mut proto = model.proto().clone();
        let g = proto.graph.as_mut().expect("graph");
        let mut widened = 0;
        for t in &mut g.initializer {
            let name = t.name.clone().unwrap_or_default();
            if name.ends_with("ff.net.0.proj.bias") {
                t.dims = vec![2560];
                widened += 1;
            } else if name.ends_with("ff.net.2.bias") {
                t.dims = vec![320];
                widened += 1;
            }
        }
        assert_eq!(widened, 8, "{variant}");
        let ff2_weights: Vec<String> = g
            .node
            .iter()
            .filter(|n| n.op_type.as_deref() == Some("MatMul") && n.name().contains("ff/net.2"))
            .map(|n| n.input[1].clone())
            .chain(
                g.node
                    .iter()
                    .filter(|n| n.op_type.as_deref() == Some("MatMul"))
                    .filter(|n| {
                        // dynamo names: find the MatMul read by the ff.net.2 bias Add
                        g.node.iter().any(|a| {
                            a.input.contains(&n.output[0])
                                && a.input.iter().any(|x| x.ends_with("ff.net.2.bias"))
                        })
                    })
                    .map(|n| n.input[1].clone()),
            )
            .collect();
        for t in &mut g.initializer {
            if ff2_weights.contains(&t.name.clone().unwrap_or_default()) {
                let last = t.dims.len() - 1;
                t.dims[last] = 320;
            }
        }
        let report = optimize_proto(&mut proto, &OptimizeOptions::for_cuda(), &read);
        eprintln!("{variant}: {report}");
        assert_eq!(
            report.fused.get("BiasSplitGelu"),
            Some(&4),
            "{variant}: {report}"
        );
        assert_eq!(report.fused.get("BiasAdd"), Some(&4), "{variant}: {report}");
        assert!(
            report
                .left_alone
                .iter()
                .all(|l| !l.fusion.starts_with("bias")),
            "{variant}: {report}"
        );
        let g = proto.graph.as_ref().expect("graph");
        let producer = |x: &str| g.node.iter().find(|n| n.output.iter().any(|o| o == x));
        for n in g
            .node
            .iter()
            .filter(|n| n.domain.as_deref() == Some("com.microsoft"))
        {
            match n.op_type.as_deref() {
                Some("BiasSplitGelu") => {
                    assert_eq!(n.input.len(), 2);
                    assert_eq!(
                        producer(&n.input[0]).and_then(|p| p.op_type.as_deref()),
                        Some("MatMul")
                    );
                    assert!(n.input[1].ends_with("ff.net.0.proj.bias"), "{:?}", n.input);
                    // read by the feed-forward's second MatMul
                    assert!(g.node.iter().any(
                        |m| m.op_type.as_deref() == Some("MatMul") && m.input[0] == n.output[0]
                    ));
                }
                Some("BiasAdd") => {
                    assert_eq!(n.input.len(), 3);
                    assert_eq!(
                        producer(&n.input[0]).and_then(|p| p.op_type.as_deref()),
                        Some("MatMul")
                    );
                    assert!(n.input[1].ends_with("ff.net.2.bias"), "{:?}", n.input);
                    // the skip is what norm3 normalised (the sum SkipLayerNormalization gives
                    // back, output 3)
                    assert!(
                        g.node.iter().any(|m| {
                            m.op_type.as_deref() == Some("SkipLayerNormalization")
                                && m.output.get(3) == Some(&n.input[2])
                        }),
                        "{variant}"
                    );
                }
                _ => {}
            }
        }
        // no Erf is left: every GELU was a GEGLU's
        assert!(
            !g.node.iter().any(|n| n.op_type.as_deref() == Some("Erf")),
            "{variant}"
        );
    }
}

/// ONNX Runtime's CPU provider has no GroupNorm/SkipGroupNorm kernels, so to check on the CPU
/// that the rewrite *wires* the fused nodes right (which operands, which outputs, NHWC in and
/// out, the sum handed back to its other readers), each fused norm is lowered back to standard
/// opset-17 ops with the kernel's documented semantics (contrib_ops/cuda/diffusion/group_norm.cc:
/// NHWC input, `x + skip (+ bias)` with an `[N, C]` skip broadcast over H and W, the sum as the
/// optional second output, per-group normalisation, fp32 γ/β, optional SiLU), and the lowered
/// graph must compute the export's output. The kernels' own numbers are checked on the GPU
/// (`scripts/gpu_fused_bench.sh fusions`).
fn lower_group_norms(proto: &mut lorafuse::onnx::proto::ModelProto) -> usize {
    use lorafuse::onnx::proto::{AttributeProto, NodeProto, TensorProto};
    let g = proto.graph.as_mut().expect("graph");
    let ints = |name: &str, v: &[i64]| AttributeProto {
        name: Some(name.into()),
        r#type: Some(7),
        ints: v.to_vec(),
        ..Default::default()
    };
    let node = |op: &str,
                name: String,
                ins: Vec<String>,
                outs: Vec<String>,
                attrs: Vec<AttributeProto>| NodeProto {
        op_type: Some(op.into()),
        name: Some(name),
        input: ins,
        output: outs,
        attribute: attrs,
        ..Default::default()
    };
    // a 1-D initializer of element type `dtype` (1 = float, 7 = int64) from its little-endian bytes
    let tensor = |name: String, dtype: i32, len: usize, bytes: Vec<u8>| TensorProto {
        dims: vec![len as i64],
        data_type: Some(dtype),
        name: Some(name),
        raw_data: Some(bytes.into()),
        ..Default::default()
    };
    let i64s = |name: String, v: &[i64]| {
        tensor(
            name,
            7,
            v.len(),
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    };
    let f32s = |name: String, v: &[f32]| {
        tensor(
            name,
            1,
            v.len(),
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    };
    let gemm_outputs: std::collections::HashSet<String> = g
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("Gemm"))
        .flat_map(|n| n.output.clone())
        .collect();
    let mut lowered = 0;
    let mut out_nodes = Vec::new();
    let mut inits = Vec::new();
    for (k, n) in std::mem::take(&mut g.node).into_iter().enumerate() {
        let op = n.op_type.as_deref().unwrap_or_default();
        if n.domain.as_deref() != Some("com.microsoft")
            || !matches!(op, "GroupNorm" | "SkipGroupNorm")
        {
            out_nodes.push(n);
            continue;
        }
        lowered += 1;
        let attr = |a: &str| {
            n.attribute
                .iter()
                .find(|x| x.name.as_deref() == Some(a))
                .cloned()
        };
        let groups = attr("groups").and_then(|a| a.i).expect("groups");
        let eps = attr("epsilon").and_then(|a| a.f).expect("epsilon");
        let silu = attr("activation").and_then(|a| a.i) == Some(1);
        let p = |s: &str| format!("lower{k}.{s}");
        let mut x = n.input[0].clone();
        if op == "SkipGroupNorm" {
            let mut skip = n.input[3].clone();
            if gemm_outputs.contains(&skip) {
                inits.push(i64s(p("skip_axes"), &[1, 2]));
                out_nodes.push(node(
                    "Unsqueeze",
                    p("u"),
                    vec![skip, p("skip_axes")],
                    vec![p("skip4")],
                    vec![],
                ));
                skip = p("skip4");
            }
            let sum = n.output.get(1).cloned().unwrap_or_else(|| p("sum"));
            out_nodes.push(node(
                "Add",
                p("add"),
                vec![x, skip],
                vec![sum.clone()],
                vec![],
            ));
            x = sum;
        }
        let c = {
            let gamma = g
                .initializer
                .iter()
                .find(|t| t.name.as_deref() == Some(n.input[1].as_str()))
                .expect("γ");
            gamma.dims[0]
        };
        inits.push(i64s(p("groups_shape"), &[0, groups, -1]));
        inits.push(i64s(p("cshape"), &[c, 1, 1]));
        inits.push(f32s(p("ones"), &vec![1.0; groups as usize]));
        inits.push(f32s(p("zeros"), &vec![0.0; groups as usize]));
        let eps_attr = AttributeProto {
            name: Some("epsilon".into()),
            r#type: Some(1),
            f: Some(eps),
            ..Default::default()
        };
        out_nodes.extend([
            node(
                "Transpose",
                p("t1"),
                vec![x],
                vec![p("nchw")],
                vec![ints("perm", &[0, 3, 1, 2])],
            ),
            node(
                "Reshape",
                p("r1"),
                vec![p("nchw"), p("groups_shape")],
                vec![p("grouped")],
                vec![],
            ),
            node(
                "InstanceNormalization",
                p("in"),
                vec![p("grouped"), p("ones"), p("zeros")],
                vec![p("normed")],
                vec![eps_attr],
            ),
            node("Shape", p("sh"), vec![p("nchw")], vec![p("shape")], vec![]),
            node(
                "Reshape",
                p("r2"),
                vec![p("normed"), p("shape")],
                vec![p("back")],
                vec![],
            ),
            node(
                "Reshape",
                p("rg"),
                vec![n.input[1].clone(), p("cshape")],
                vec![p("gamma")],
                vec![],
            ),
            node(
                "Reshape",
                p("rb"),
                vec![n.input[2].clone(), p("cshape")],
                vec![p("beta")],
                vec![],
            ),
            node(
                "Mul",
                p("mul"),
                vec![p("back"), p("gamma")],
                vec![p("scaled")],
                vec![],
            ),
            node(
                "Add",
                p("badd"),
                vec![p("scaled"), p("beta")],
                vec![p("affine")],
                vec![],
            ),
        ]);
        let mut y = p("affine");
        if silu {
            out_nodes.push(node(
                "Sigmoid",
                p("sig"),
                vec![y.clone()],
                vec![p("sigm")],
                vec![],
            ));
            out_nodes.push(node(
                "Mul",
                p("silu"),
                vec![y, p("sigm")],
                vec![p("act")],
                vec![],
            ));
            y = p("act");
        }
        out_nodes.push(node(
            "Transpose",
            p("t2"),
            vec![y],
            vec![n.output[0].clone()],
            vec![ints("perm", &[0, 2, 3, 1])],
        ));
    }
    g.node = out_nodes;
    g.initializer.extend(inits);
    lowered
}

#[test]
fn fused_group_norms_are_wired_like_the_export() {
    use lorafuse::onnx::optimize::optimize_proto;
    use lorafuse::runtime::tensor::{extract_f32, float_value};
    for variant in ["onnx", "onnx-dynamo"] {
        // UNet: diffusers' fixture inputs; VAE decoder (legacy export only): a fixed latent
        let mut parts = vec![("unet", tiny(&format!("{variant}/unet/model.onnx")))];
        if variant == "onnx" {
            parts.push(("vae_decoder", tiny("onnx/vae_decoder/model.onnx")));
        }
        for (part, path) in parts {
            let model = OnnxModel::open(&path).expect("open");
            let read = |name: &str| model.initializer_f32(name).ok().map(|(_, v)| v);
            let mut proto = model.proto().clone();
            let report = optimize_proto(&mut proto, &OptimizeOptions::for_cuda(), &read);
            eprintln!("{variant} {part}: {report}");
            let skip = report.fused.get("SkipGroupNorm").copied().unwrap_or(0);
            assert!(skip >= 4, "{variant} {part}: {report}");
            let lowered = lower_group_norms(&mut proto);
            assert_eq!(
                lowered,
                skip + report.fused.get("GroupNorm").copied().unwrap_or(0)
            );
            use prost::Message;
            let bytes = proto.encode_to_vec();
            let run = |s: &mut Session| -> Vec<f32> {
                if part == "unet" {
                    return run_unet(s);
                }
                let latent: Vec<f32> = (0..4 * 8 * 8)
                    .map(|i| ((i * 37 % 97) as f32 / 48.5) - 1.0)
                    .collect();
                let out = s
                    .run(ort::inputs![
                        "latent_sample" => float_value(&latent, &[1, 4, 8, 8], ort::value::TensorElementType::Float32).expect("latent"),
                    ])
                    .expect("vae run");
                extract_f32(&out[0], "sample").expect("f32").1
            };
            let exported = run(&mut session::open(&path, &cpu()).expect("session"));
            let got = run(&mut optimized_session(&model, bytes));
            let scale = exported.iter().map(|v| v.abs()).fold(0f32, f32::max);
            let d = max_diff(&got, &exported);
            eprintln!("{variant} {part}: max |diff| {d:e} (scale {scale})");
            assert!(
                d <= 1e-5 * scale.max(1.0),
                "{variant} {part}: {d} (scale {scale})"
            );
        }
    }
}

/// Hostile graphs: the tiny UNet (legacy and dynamo exports, SD 1.5 widths so every fusion's
/// pattern is live) with one node mangled at a time — an input or output dropped, the op type
/// swapped for another pattern op, attributes cleared, an input rewired — goes through every
/// rewrite without a panic, and what comes out still encodes (the fuzz target fuzz/onnx.rs does
/// the same on arbitrary bytes; this runs in CI).
#[test]
fn mangled_graphs_never_panic_the_rewrites() {
    use lorafuse::onnx::optimize::optimize_proto;
    use prost::Message;
    use rand::{Rng, SeedableRng};
    const OPS: [&str; 14] = [
        "Add",
        "Mul",
        "Div",
        "Slice",
        "Split",
        "Erf",
        "Gelu",
        "Conv",
        "Unsqueeze",
        "Gemm",
        "Transpose",
        "Reshape",
        "InstanceNormalization",
        "LayerNormalization",
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for variant in ["onnx", "onnx-dynamo"] {
        let model = OnnxModel::open(tiny(&format!("{variant}/unet/model.onnx"))).expect("open");
        let read = |name: &str| model.initializer_f32(name).ok().map(|(_, v)| v);
        let mut base = model.proto().clone();
        for t in &mut base.graph.as_mut().expect("graph").initializer {
            let name = t.name.clone().unwrap_or_default();
            if name.ends_with("ff.net.0.proj.bias") {
                t.dims = vec![2560];
            } else if name.ends_with("ff.net.2.bias") {
                t.dims = vec![320];
            }
        }
        let n = base.graph.as_ref().map_or(0, |g| g.node.len());
        for round in 0..300 {
            let mut proto = base.clone();
            let g = proto.graph.as_mut().expect("graph");
            for _ in 0..1 + round % 3 {
                let i = rng.random_range(0..n);
                let other = g.node[rng.random_range(0..n)]
                    .output
                    .first()
                    .cloned()
                    .unwrap_or_default();
                let node = &mut g.node[i];
                match rng.random_range(0..5) {
                    0 => {
                        node.input.pop();
                    }
                    1 => {
                        node.output.pop();
                    }
                    2 => node.op_type = Some(OPS[rng.random_range(0..OPS.len())].into()),
                    3 => node.attribute.clear(),
                    _ => {
                        if !node.input.is_empty() {
                            let k = rng.random_range(0..node.input.len());
                            node.input[k] = other;
                        }
                    }
                }
            }
            let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let report = optimize_proto(&mut proto, &OptimizeOptions::for_cuda(), &read);
                // converted or refused with a message, never a panic
                let _ = lorafuse::onnx::optimize::float16::convert(&mut proto, &read);
                report
            }))
            .unwrap_or_else(|_| panic!("{variant} round {round}: a rewrite panicked"));
            let bytes = proto.encode_to_vec();
            assert!(
                lorafuse::onnx::proto::ModelProto::decode(bytes.as_slice()).is_ok(),
                "{variant} round {round}: {report}"
            );
        }
    }
}
