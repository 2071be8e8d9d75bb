//! `--cuda_graphs` on the CPU: the graph path's step flow (static input buffers refilled every
//! step, warm-up, capture, replays, partial steps eager before the capture and padded with
//! zero-weighted rows after it) with the captured function run eagerly at each "replay"
//! (`--cuda_graphs emulate`) gives the eager run's losses, gradient norms and LoRA bit for bit up
//! to the first padded step and to rounding after it; the configurations that cannot be captured
//! are named; `on` without CUDA is an error naming why; `--profile_steps` reports the phases. The capture and
//! replay themselves need a GPU (`scripts/gpu_train_bench.sh`'s check run).
#![cfg(feature = "train")]

mod common;

use std::path::Path;

use lorafuse::train::trainer::{
    CUDA_GRAPH_WARMUP_STEPS, CudaGraphs, Event, MixedPrecision, TrainConfig, TrainReport, train,
};
use lorafuse::weights::WeightFile;

/// tests/train_loop.rs's settings: 12 images, 64 px, CPU.
fn config(out: &Path) -> TrainConfig {
    let mut c = common::tiny_train_config(&common::tiny("dataset"), out, 11);
    c.learning_rate = 1e-3;
    c.report_to = lorafuse::train::trainer::ReportTo::Csv;
    c
}

/// A run's report, its info lines, and its CSV rows (`grad_norm` included).
fn run(c: &TrainConfig) -> (TrainReport, Vec<String>, Vec<Vec<String>>) {
    let mut info = Vec::new();
    let r = train(c, None, &mut |e| {
        if let Event::Info(s) | Event::Warning(s) = e {
            info.push(s)
        }
    })
    .unwrap_or_else(|e| panic!("{:?}: {e}", c.cuda_graphs));
    let csv = std::fs::read_to_string(c.output_dir.join("logs/train_log.csv")).expect("csv");
    let rows = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect();
    (r, info, rows)
}

fn lora_bytes(path: &Path) -> Vec<(String, Vec<f32>)> {
    let f = WeightFile::open(path).expect("lora");
    let mut names: Vec<String> = f.names().map(str::to_string).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| (n.clone(), f.tensor_f32(&n).expect("f32").1))
        .collect()
}

/// How closely the emulated run must give the eager one's losses, gradient norms and LoRA: bit
/// for bit, or bit for bit up to the first partial step that replays the graph padded with
/// zero-weighted rows (1-based `padded_from`; the batched kernels then sum in another order) and
/// within `tol`, relative, after it.
#[derive(Clone, Copy)]
enum Match {
    Exact,
    Padded { padded_from: usize, tol: f64 },
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * a.abs().max(b.abs()).max(1e-6)
}

/// The same run with `--cuda_graphs off` and `emulate`: losses, norms (CSV columns loss, lr,
/// grad_norm) and LoRA as `m` says; returns the emulated run's info lines.
fn emulate_equals_eager(name: &str, m: Match, edit: impl Fn(&mut TrainConfig)) -> Vec<String> {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = config(&tmp.path().join("eager"));
    edit(&mut c);
    c.cuda_graphs = CudaGraphs::Off;
    let (eager, _, eager_rows) = run(&c);
    c.cuda_graphs = CudaGraphs::Emulate;
    c.output_dir = tmp.path().join("graph");
    let (graph, info, graph_rows) = run(&c);
    assert_eq!(eager.losses.len(), graph.losses.len(), "{name}: steps");
    assert_eq!(eager_rows.len(), graph_rows.len(), "{name}: CSV rows");
    let (exact_steps, tol) = match m {
        Match::Exact => (usize::MAX, 0.0),
        Match::Padded { padded_from, tol } => (padded_from - 1, tol),
    };
    for (i, (e, g)) in eager.losses.iter().zip(&graph.losses).enumerate() {
        if i < exact_steps {
            assert_eq!(e, g, "{name}: loss of step {}", i + 1);
        } else {
            assert!(
                close(*e, *g, tol),
                "{name}: loss of step {}: {e} vs {g}",
                i + 1
            );
        }
    }
    for (i, (e, g)) in eager_rows.iter().zip(&graph_rows).enumerate() {
        assert_eq!(e[3], g[3], "{name}: lr of step {}", i + 1);
        for col in [2, 4] {
            if i < exact_steps {
                assert_eq!(e[col], g[col], "{name}: column {col} of step {}", i + 1);
            } else {
                let (a, b): (f64, f64) =
                    (e[col].parse().expect("f64"), g[col].parse().expect("f64"));
                assert!(
                    close(a, b, tol),
                    "{name}: column {col} of step {}: {a} vs {b}",
                    i + 1
                );
            }
        }
    }
    let (le, lg) = (lora_bytes(&eager.output), lora_bytes(&graph.output));
    match m {
        Match::Exact => assert!(le == lg, "{name}: the LoRA differs"),
        Match::Padded { .. } => {
            assert_eq!(le.len(), lg.len(), "{name}: LoRA tensors");
            for ((n, a), (_, b)) in le.iter().zip(&lg) {
                let scale = a.iter().fold(0f32, |s, v| s.max(v.abs())) as f64;
                let diff = a.iter().zip(b).fold(0f32, |s, (x, y)| s.max((x - y).abs())) as f64;
                assert!(
                    diff <= tol * scale.max(1e-6),
                    "{name}: {n} differs by {diff} (max |w| {scale})"
                );
            }
        }
    }
    println!(
        "{name}: {} steps, losses and LoRA match",
        graph.losses.len()
    );
    info
}

/// Lines of `info` that contain `s`.
fn said(info: &[String], s: &str) -> usize {
    info.iter().filter(|l| l.contains(s)).count()
}

#[test]
fn emulated_graph_steps_equal_eager_steps() {
    // batch 5 of 12 images: batches of 5, 5 and 2, so every epoch ends with a partial batch:
    // eager before the capture (step 3: warm-up 1, 2, 4, capture 5), then replayed with three
    // zero-weighted padding rows (6, 9, 12); min-SNR and the noise offset are inside the
    // captured step
    let info = emulate_equals_eager(
        "fused, partial batches",
        Match::Padded {
            padded_from: 6,
            tol: 1e-4,
        },
        |c| {
            c.train_batch_size = 5;
            c.max_train_steps = Some(12);
            c.snr_gamma = Some(5.0);
            c.noise_offset = 0.1;
            c.lr_scheduler = lorafuse::train::optim::LrSchedule::Cosine;
        },
    );
    assert!(
        info.iter()
            .any(|l| l.starts_with("CUDA graphs on (--cuda_graphs emulate)")),
        "{info:?}"
    );
    assert_eq!(
        said(&info, "comes before the capture"),
        1,
        "said once: {info:?}"
    );
    assert_eq!(
        said(&info, "zero-weighted padding rows"),
        1,
        "said once: {info:?}"
    );
    // accumulation run as separate micro-batches, with a text encoder LoRA: token ids are the
    // static input and the text encoder runs (with gradients) inside the step
    emulate_equals_eager("micro-batches, text encoder LoRA", Match::Exact, |c| {
        c.train_batch_size = 2;
        c.gradient_accumulation_steps = 3;
        c.fuse_accumulation = false;
        c.max_train_steps = Some(6);
        c.text_encoder_lora = Some(lorafuse::train::LoraConfig {
            targets: ["q_proj", "v_proj"].map(String::from).to_vec(),
            ..c.lora.clone()
        });
    });
    // the same with 5 batches of 2 per epoch (10 images): every second step is a short
    // accumulation group of two micro-batches, replayed after the capture (step 7) as three
    // (the third one zero-weighted)
    emulate_equals_eager(
        "micro-batches, short groups padded",
        Match::Padded {
            padded_from: 8,
            tol: 1e-4,
        },
        |c| {
            c.train_batch_size = 2;
            c.gradient_accumulation_steps = 3;
            c.fuse_accumulation = false;
            c.max_train_steps = Some(10);
            c.max_train_samples = Some(10);
        },
    );
    // fused accumulation in bf16 (f32 master weights, bf16 compute copies and gradients),
    // with short accumulation groups at the end of each epoch (eager before the capture at
    // step 7, padded at 8)
    emulate_equals_eager(
        "bf16, fused accumulation",
        Match::Padded {
            padded_from: 8,
            tol: 2e-2,
        },
        |c| {
            c.train_batch_size = 2;
            c.gradient_accumulation_steps = 4;
            c.mixed_precision = MixedPrecision::Bf16;
            c.max_train_steps = Some(8);
        },
    );
}

#[test]
fn uncapturable_settings_are_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let err = |edit: &dyn Fn(&mut TrainConfig)| {
        let mut c = config(&tmp.path().join("out"));
        c.max_train_steps = Some(1);
        edit(&mut c);
        let mut cached = false;
        let r = train(&c, None, &mut |e| {
            cached |= matches!(e, Event::Caching { .. });
        });
        match r {
            Ok(_) => panic!("{:?} trained", c.cuda_graphs),
            // the settings are refused before anything is loaded or cached
            Err(e) => {
                assert!(!cached, "refused after caching: {e}");
                e.to_string()
            }
        }
    };
    // `on` needs CUDA: the error says so, before anything loads
    let e = err(&|c| c.cuda_graphs = CudaGraphs::On);
    assert!(e.contains("--cuda_graphs on") && e.contains("CUDA"), "{e}");
    // the settings a graph cannot capture, each named by its flag (emulate skips the CUDA
    // checks, so the settings' own rule is what fails)
    for (flag, edit) in [
        (
            "--mixed_precision fp16",
            &(|c: &mut TrainConfig| c.mixed_precision = MixedPrecision::Fp16)
                as &dyn Fn(&mut TrainConfig),
        ),
        ("--no_cache_latents", &|c: &mut TrainConfig| {
            c.cache_latents = false
        }),
    ] {
        let e = err(&|c: &mut TrainConfig| {
            c.cuda_graphs = CudaGraphs::Emulate;
            edit(c);
        });
        assert!(e.contains(flag), "{flag}: {e}");
    }
    // auto on the CPU: eager, and nothing said about graphs
    let mut c = config(&tmp.path().join("auto"));
    c.max_train_steps = Some(1);
    let (r, info, _) = run(&c);
    assert_eq!(r.losses.len(), 1);
    assert!(!info.iter().any(|l| l.contains("CUDA graph")), "{info:?}");
}

#[test]
fn several_aspect_ratio_buckets_cannot_be_captured() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    // a kohya folder with a square and a wide image: two buckets
    for (i, (w, h)) in [(64u32, 64u32), (128, 64)].into_iter().enumerate() {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 90]));
        img.save(data.join(format!("{i}.png"))).expect("png");
        std::fs::write(data.join(format!("{i}.txt")), "a shape").expect("caption");
    }
    let mut c = config(&tmp.path().join("out"));
    c.train_data_dir = data;
    c.enable_bucket = true;
    c.bucket.min_bucket_reso = 32;
    c.bucket.max_bucket_reso = 128;
    c.bucket.bucket_reso_steps = 16;
    c.train_batch_size = 1;
    c.max_train_steps = Some(1);
    c.cuda_graphs = CudaGraphs::Emulate;
    let e = match train(&c, None, &mut |_| {}) {
        Ok(_) => panic!("two buckets captured"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("--enable_bucket") && e.contains("2 aspect-ratio buckets"),
        "{e}"
    );
}

#[test]
fn profile_steps_reports_the_phases() {
    let tmp = tempfile::tempdir().expect("tmp");
    let steps = CUDA_GRAPH_WARMUP_STEPS + 1 + 3;
    for mode in [CudaGraphs::Off, CudaGraphs::Emulate] {
        let mut c = config(&tmp.path().join(format!("{mode:?}")));
        c.train_batch_size = 3; // 12 images: every batch full
        c.max_train_steps = Some(steps as i64 + 2);
        c.profile_steps = Some(3);
        c.cuda_graphs = mode;
        let (r, info, _) = run(&c);
        let p = r.phases.expect("phases");
        // the first steps (warm-up and capture) are not profiled, then 3 steps
        assert_eq!(p.steps, 3, "{mode:?}");
        assert!(p.data_ms > 0.0 && p.log_ms > 0.0, "{p:?}");
        if mode == CudaGraphs::Emulate {
            assert_eq!(p.replays, 3);
            assert!(p.replay_ms > 0.0 && p.forward_backward_ms == 0.0, "{p:?}");
        } else {
            assert_eq!(p.replays, 0);
            assert!(p.forward_backward_ms > 0.0 && p.optimizer_ms > 0.0, "{p:?}");
        }
        assert!(
            info.iter().any(|l| l.starts_with("phases over 3 steps")),
            "{info:?}"
        );
    }
    // batches of 5, 5 and 2: warm-up at steps 1, 2 and 4, the capture at step 5 (not profiled,
    // though past the first four), then replays at 6 (the partial step, padded), 7 and 8
    let mut c = config(&tmp.path().join("late"));
    c.train_batch_size = 5;
    c.max_train_steps = Some(8);
    c.profile_steps = Some(3);
    c.cuda_graphs = CudaGraphs::Emulate;
    let p = run(&c).0.phases.expect("phases");
    assert_eq!((p.steps, p.replays), (3, 3), "{p:?}");
}

/// `--torch_profile FILE` records the profiled steps with PyTorch's profiler: a Chrome trace
/// whose events name the ATen operators the UNet ran (on the CPU here; CUDA kernels on a GPU);
/// without `--profile_steps`, or into a missing folder, it is refused before training.
#[test]
fn torch_profile_writes_a_chrome_trace_of_the_profiled_steps() {
    let tmp = tempfile::tempdir().expect("tmp");
    let trace = tmp.path().join("trace.json");
    let mut c = config(&tmp.path().join("run"));
    c.train_batch_size = 3;
    c.max_train_steps = Some(CUDA_GRAPH_WARMUP_STEPS as i64 + 1 + 2);
    c.profile_steps = Some(2);
    c.torch_profile = Some(trace.clone());
    let (r, info, _) = run(&c);
    assert_eq!(r.phases.expect("phases").steps, 2);
    assert!(
        info.iter()
            .any(|l| l.contains("torch profile") && l.contains("trace.json")),
        "{info:?}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&trace).expect("trace written")).expect("JSON");
    let names: Vec<&str> = json["traceEvents"]
        .as_array()
        .expect("traceEvents")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for op in [
        "aten::conv2d",
        "aten::scaled_dot_product_attention",
        "aten::group_norm",
    ] {
        assert!(names.contains(&op), "no {op} among {} events", names.len());
    }
    // refused before any step
    let mut bad = config(&tmp.path().join("bad"));
    bad.torch_profile = Some(tmp.path().join("trace2.json"));
    let e = train(&bad, None, &mut |_| {}).expect_err("no --profile_steps");
    assert!(e.to_string().contains("--profile_steps"), "{e}");
    bad.profile_steps = Some(1);
    bad.torch_profile = Some(tmp.path().join("missing/trace.json"));
    let e = train(&bad, None, &mut |_| {}).expect_err("missing folder");
    assert!(e.to_string().contains("existing folder"), "{e}");
    assert!(
        !bad.output_dir
            .join("pytorch_lora_weights.safetensors")
            .exists()
    );
}

#[test]
fn a_graph_run_resumes_exactly() {
    // checkpoint at step 5 (after the capture), resume: warm-up and capture again, same result
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = config(&tmp.path().join("full"));
    c.train_batch_size = 3;
    c.max_train_steps = Some(9);
    c.cuda_graphs = CudaGraphs::Emulate;
    let (full, _, _) = run(&c);
    c.output_dir = tmp.path().join("split");
    c.checkpointing_steps = 5;
    c.max_train_steps = Some(5);
    run(&c);
    c.max_train_steps = Some(9);
    c.resume_from_checkpoint = Some("latest".into());
    let (resumed, _, _) = run(&c);
    assert_eq!(&full.losses[5..], &resumed.losses[..]);
    assert!(lora_bytes(&full.output) == lora_bytes(&resumed.output));
}
