//! `lorafuse merge` against diffusers: every LoRA dialect merged into the tiny ONNX pipeline, then the
//! merged UNet and text encoder run in ONNX Runtime and compared with what diffusers computed after
//! `load_lora_weights` + `fuse_lora` (models/tiny/expected/lora_*.safetensors). Bar (docs/ARCHITECTURE.md
//! section 7): fp32 max abs diff ≤ 1e-4 and ≤ 1e-5 relative to the output's largest magnitude.

use std::path::{Path, PathBuf};

use lorafuse::merge::{LoraSpec, MergeOptions, merge_pipeline};
use lorafuse::runtime::session;
use lorafuse::runtime::tensor::{extract_f32, ids_value};
use ort::value::TensorElementType;

mod common;
use common::{cpu, tiny};

fn read(path: &Path) -> safetensors_owned::Owned {
    safetensors_owned::Owned::open(path)
}

/// A tiny owned safetensors reader for test fixtures.
mod safetensors_owned {
    use std::path::Path;
    pub struct Owned(Vec<u8>);
    impl Owned {
        pub fn open(p: &Path) -> Self {
            Owned(std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        }
        pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
            let st = safetensors::SafeTensors::deserialize(&self.0).expect("safetensors");
            let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (t.shape().to_vec(), v)
        }
        pub fn i64(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
            let st = safetensors::SafeTensors::deserialize(&self.0).expect("safetensors");
            let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            let v = t
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect();
            (t.shape().to_vec(), v)
        }
    }
}

/// The pipeline's UNet on the fixture inputs of `unet_io.safetensors`.
fn run_unet(pipeline: &Path) -> Vec<f32> {
    let mut s = session::open(&pipeline.join("unet/model.onnx"), &cpu()).expect("unet session");
    common::run_unet(&mut s)
}

fn run_text_encoder(pipeline: &Path) -> Vec<f32> {
    let io = read(&tiny("expected/text_encoder_io.safetensors"));
    let (shape, ids) = io.i64("input_ids");
    let mut s =
        session::open(&pipeline.join("text_encoder/model.onnx"), &cpu()).expect("te session");
    let out = s
        .run(ort::inputs!["input_ids" => ids_value(&ids, &shape, TensorElementType::Int64).expect("ids")])
        .expect("te run");
    extract_f32(&out[0], "last_hidden_state").expect("f32").1
}

/// (max abs diff, max abs diff / max |reference|)
fn diff(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    let m = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1e-12);
    (m, m / scale)
}

fn merge_to_tmp(src: &Path, loras: &[(&str, f32)]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("merged");
    let specs: Vec<LoraSpec> = loras
        .iter()
        .map(|(f, w)| LoraSpec {
            path: tiny(&format!("loras/{f}")),
            weight: *w,
        })
        .collect();
    let report = merge_pipeline(
        src,
        &out,
        &specs,
        &MergeOptions {
            strict: true,
            ..Default::default()
        },
        false,
        &mut |_, _, _| {},
    )
    .unwrap_or_else(|e| panic!("merging {loras:?}: {e}"));
    for l in &report.loras {
        assert!(
            l.unmapped.is_empty(),
            "{}: {:?}",
            l.path.display(),
            l.unmapped
        );
    }
    (tmp, out)
}

fn check(label: &str, got: &[f32], want: &[f32], abs_tol: f32, rel_tol: f32) {
    let (a, r) = diff(got, want);
    eprintln!("{label}: max abs {a:.3e}, rel {r:.3e}");
    assert!(
        a <= abs_tol && r <= rel_tol,
        "{label}: max abs diff {a:.3e} (tol {abs_tol:e}), rel {r:.3e} (tol {rel_tol:e})"
    );
}

const FP32_ABS: f32 = 1e-4;
const FP32_REL: f32 = 1e-5;

#[test]
fn base_pipeline_matches_diffusers() {
    // The unmerged export itself: the floor every merged comparison stands on.
    let (_, want) = read(&tiny("expected/unet_io.safetensors")).f32("out_sample");
    check(
        "base unet",
        &run_unet(&tiny("onnx")),
        &want,
        FP32_ABS,
        FP32_REL,
    );
    let (_, want) = read(&tiny("expected/text_encoder_io.safetensors")).f32("last_hidden_state");
    check(
        "base text encoder",
        &run_text_encoder(&tiny("onnx")),
        &want,
        FP32_ABS,
        FP32_REL,
    );
}

fn check_lora(file: &str, name: &str, scale: f32, abs_tol: f32, rel_tol: f32) {
    let (_tmp, out) = merge_to_tmp(&tiny("onnx"), &[(file, scale)]);
    let exp = read(&tiny(&format!(
        "expected/lora_{name}_s{scale:.1}.safetensors"
    )));
    let (_, want_u) = exp.f32("unet_out_sample");
    let (_, want_t) = exp.f32("text_encoder_last_hidden_state");
    check(
        &format!("{name} s{scale} unet"),
        &run_unet(&out),
        &want_u,
        abs_tol,
        rel_tol,
    );
    check(
        &format!("{name} s{scale} text encoder"),
        &run_text_encoder(&out),
        &want_t,
        abs_tol,
        rel_tol,
    );
}

macro_rules! dialect_tests {
    ($($test:ident: $file:expr, $name:expr;)*) => {$(
        #[test]
        fn $test() {
            for s in [1.0, 0.5] {
                check_lora($file, $name, s, FP32_ABS, FP32_REL);
            }
        }
    )*};
}

dialect_tests! {
    diffusers_lora_a_b: "diffusers.safetensors", "diffusers";
    diffusers_every_layer_type: "diffusers_wide.safetensors", "diffusers_wide";
    peft_raw: "peft.safetensors", "peft";
    kohya: "kohya.safetensors", "kohya";
    kohya_every_layer_type: "kohya_wide.safetensors", "kohya_wide";
    attn_procs: "attn_procs.safetensors", "attn_procs";
    diffusers_legacy: "diffusers_legacy.safetensors", "diffusers_legacy";
    diffusers_fp16_file: "diffusers_fp16.safetensors", "diffusers_fp16";
    kohya_bf16_file: "kohya_bf16.safetensors", "kohya_bf16";
    // Written and run by LyCORIS 4.1.3 itself (fixture_lycoris): every UNet and CLIP layer kind, Tucker
    // convs, LoKr with full, low-rank and Tucker factors; references from LyCORIS's forward at multiplier s.
    lycoris_loha: "lycoris_loha.safetensors", "lycoris_loha";
    lycoris_lokr: "lycoris_lokr.safetensors", "lycoris_lokr";
}

#[test]
fn two_loras_with_weights_match_set_adapters() {
    let (_tmp, out) = merge_to_tmp(
        &tiny("onnx"),
        &[
            ("diffusers.safetensors", 0.7),
            ("diffusers_wide.safetensors", 0.4),
        ],
    );
    let exp = read(&tiny("expected/lora_combo.safetensors"));
    check(
        "combo unet",
        &run_unet(&out),
        &exp.f32("unet_out_sample").1,
        FP32_ABS,
        FP32_REL,
    );
    check(
        "combo text encoder",
        &run_text_encoder(&out),
        &exp.f32("text_encoder_last_hidden_state").1,
        FP32_ABS,
        FP32_REL,
    );
}

/// A pipeline folder like models/tiny/onnx with its UNet taken from another export.
fn pipeline_with_unet(unet_dir: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&tiny("onnx"), tmp.path());
    std::fs::remove_dir_all(tmp.path().join("unet")).expect("rm unet");
    copy_dir(unet_dir, &tmp.path().join("unet"));
    tmp
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &dst.join(e.file_name()));
        } else {
            std::fs::copy(&p, dst.join(e.file_name())).expect("copy");
        }
    }
}

#[test]
fn external_data_unet() {
    let src = pipeline_with_unet(&common::made("onnx-extdata/unet"));
    for (file, name) in [
        ("diffusers_wide.safetensors", "diffusers_wide"),
        ("kohya.safetensors", "kohya"),
    ] {
        let (_tmp, out) = merge_to_tmp(src.path(), &[(file, 1.0)]);
        assert!(
            out.join("unet/model.onnx_data").is_file(),
            "external data carried over"
        );
        let exp = read(&tiny(&format!("expected/lora_{name}_s1.0.safetensors")));
        check(
            &format!("extdata {name}"),
            &run_unet(&out),
            &exp.f32("unet_out_sample").1,
            FP32_ABS,
            FP32_REL,
        );
    }
}

#[test]
fn dynamo_exported_unet() {
    let src = pipeline_with_unet(&tiny("onnx-dynamo/unet"));
    let (_tmp, out) = merge_to_tmp(src.path(), &[("diffusers_wide.safetensors", 1.0)]);
    let exp = read(&tiny("expected/lora_diffusers_wide_s1.0.safetensors"));
    check(
        "dynamo diffusers_wide",
        &run_unet(&out),
        &exp.f32("unet_out_sample").1,
        FP32_ABS,
        FP32_REL,
    );
}

#[test]
fn fp16_pipeline_within_fp16_rounding() {
    // An fp16 export cannot match fp32 diffusers to 1e-4; what must hold is that the merge adds the
    // LoRA's effect: the merged fp16 output is as close to diffusers' merged output as the unmerged
    // fp16 output is to diffusers' unmerged output (plus fp16 rounding of the larger weights).
    let (_, base_want) = read(&tiny("expected/unet_io.safetensors")).f32("out_sample");
    let fp16 = common::made("onnx-fp16");
    let (base_err, _) = diff(&run_unet(&fp16), &base_want);
    let (_tmp, out) = merge_to_tmp(&fp16, &[("diffusers_wide.safetensors", 1.0)]);
    let exp = read(&tiny("expected/lora_diffusers_wide_s1.0.safetensors"));
    let want = exp.f32("unet_out_sample").1;
    let (merged_err, rel) = diff(&run_unet(&out), &want);
    // The LoRA's own effect, to show the tolerance is far below it.
    let (effect, _) = diff(&want, &base_want);
    eprintln!(
        "fp16: base err {base_err:.3e}, merged err {merged_err:.3e} (rel {rel:.3e}), LoRA effect {effect:.3e}"
    );
    assert!(
        merged_err <= 3.0 * base_err + 2e-3,
        "merged fp16 error {merged_err} vs base fp16 error {base_err}"
    );
    assert!(
        merged_err < effect / 20.0,
        "tolerance must be far below the LoRA's effect ({effect})"
    );
}

// ---- bad input: a clear error naming the culprit, and nothing left in the output's folder ----

/// Merge into `<tmp>/out` and return the error text; assert the folder holds nothing new.
fn merge_error(src: &Path, lora: &Path) -> String {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let res = merge_pipeline(
        src,
        &out,
        &[LoraSpec {
            path: lora.to_path_buf(),
            weight: 1.0,
        }],
        &MergeOptions::default(),
        false,
        &mut |_, _, _| {},
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("read_dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "left behind after a failed merge: {left:?}"
    );
    match res {
        Ok(_) => panic!(
            "merging {} into {} should fail",
            lora.display(),
            src.display()
        ),
        Err(e) => e.to_string(),
    }
}

fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.to_string(),
                s.clone(),
                d.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bufs
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write");
}

/// A kohya LoRA for SD 1.x's 320-wide attn1.to_q: the tiny pipeline's is 32 wide.
fn wrong_shape_lora(dir: &Path) -> PathBuf {
    let p = dir.join("wrong_shape.safetensors");
    let m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    write_safetensors(
        &p,
        &[
            (
                &format!("{m}.lora_down.weight"),
                vec![4, 320],
                vec![0.01; 4 * 320],
            ),
            (
                &format!("{m}.lora_up.weight"),
                vec![320, 4],
                vec![0.01; 320 * 4],
            ),
        ],
    );
    p
}

#[test]
fn truncated_lora_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bytes = std::fs::read(tiny("loras/diffusers.safetensors")).expect("read");
    let cut = tmp.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    let err = merge_error(&tiny("onnx"), &cut);
    assert!(err.contains("cut.safetensors"), "{err}");
}

#[test]
fn header_offsets_past_the_end() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let header = br#"{"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":{"dtype":"F32","shape":[4,32],"data_offsets":[0,999999]}}"#;
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header);
    f.extend_from_slice(&[0u8; 64]);
    let p = tmp.path().join("liar.safetensors");
    std::fs::write(&p, f).expect("write");
    let err = merge_error(&tiny("onnx"), &p);
    assert!(err.contains("liar.safetensors"), "{err}");
}

#[test]
fn lora_whose_shapes_do_not_match_the_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = wrong_shape_lora(tmp.path());
    let err = merge_error(&tiny("onnx"), &p);
    assert!(
        err.contains("wrong_shape.safetensors") && err.contains("attn1.to_q"),
        "{err}"
    );
}

#[test]
fn sdxl_lora_on_sd1_pipeline() {
    let err = merge_error(&tiny("onnx"), &tiny("loras/sdxl_kohya.safetensors"));
    assert!(
        err.contains("SDXL") && err.contains("sdxl_kohya.safetensors"),
        "{err}"
    );
}

#[test]
fn onnx_file_cut_in_half() {
    let src = tempfile::tempdir().expect("tempdir");
    copy_dir(&tiny("onnx"), src.path());
    let unet = src.path().join("unet/model.onnx");
    let bytes = std::fs::read(&unet).expect("read");
    std::fs::write(&unet, &bytes[..bytes.len() / 2]).expect("write");
    let err = merge_error(src.path(), &tiny("loras/diffusers.safetensors"));
    assert!(err.contains("unet/model.onnx"), "{err}");
}

#[test]
fn hostile_external_data_location() {
    // Same length as "model.onnx_data", so the protobuf stays valid: one climbs out, one is absolute.
    for hostile in ["../../etc/passw", "/etc/passwd.bin"] {
        assert_eq!(hostile.len(), "model.onnx_data".len());
        let src = pipeline_with_unet(&common::made("onnx-extdata/unet"));
        let unet = src.path().join("unet/model.onnx");
        let bytes = std::fs::read(&unet).expect("read");
        let needle = b"model.onnx_data";
        let mut patched = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i..].starts_with(needle) {
                patched.extend_from_slice(hostile.as_bytes());
                i += needle.len();
            } else {
                patched.push(bytes[i]);
                i += 1;
            }
        }
        std::fs::write(&unet, patched).expect("write");
        let err = merge_error(src.path(), &tiny("loras/diffusers.safetensors"));
        assert!(
            err.contains("unet/model.onnx") && err.contains(hostile),
            "{hostile}: {err}"
        );
    }
}

#[test]
fn output_inside_input_or_existing_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let specs = [LoraSpec {
        path: tiny("loras/diffusers.safetensors"),
        weight: 1.0,
    }];
    let err = merge_pipeline(
        &tiny("onnx"),
        tmp.path(),
        &specs,
        &MergeOptions::default(),
        false,
        &mut |_, _, _| {},
    )
    .expect_err("existing output");
    assert!(err.to_string().contains("already exists"), "{err}");
}

#[test]
fn dry_run_writes_nothing_and_reports() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("out");
    let specs = [LoraSpec {
        path: tiny("loras/kohya_wide.safetensors"),
        weight: 0.5,
    }];
    let r = merge_pipeline(
        &tiny("onnx"),
        &out,
        &specs,
        &MergeOptions::default(),
        true,
        &mut |_, _, _| {},
    )
    .expect("dry run");
    assert!(!out.exists());
    assert_eq!(r.loras[0].unet_modules, 77);
    assert_eq!(r.loras[0].text_encoder_modules, 12);
    assert_eq!(r.patched.get("unet"), Some(&77));
}

#[test]
fn lora_spec_parsing() {
    let s: LoraSpec = "a/b.safetensors:0.7".parse().expect("parse");
    assert_eq!((s.path, s.weight), (PathBuf::from("a/b.safetensors"), 0.7));
    let s: LoraSpec = "c:/x/y.safetensors".parse().expect("parse");
    assert_eq!(
        (s.path, s.weight),
        (PathBuf::from("c:/x/y.safetensors"), 1.0)
    );
    assert!("x.safetensors:inf".parse::<LoraSpec>().is_err());
}

#[test]
fn diffusers_layout_merge_matches_fuse_lora_weights() {
    // Trainers merge into a diffusers folder: the merged safetensors must hold diffusers' fused weights.
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("merged");
    let specs = [LoraSpec {
        path: tiny("loras/diffusers_wide.safetensors"),
        weight: 1.0,
    }];
    let r = lorafuse::merge::merge_diffusers_pipeline(
        &tiny("diffusers"),
        &out,
        &specs,
        &MergeOptions::default(),
        false,
        &mut |_, _, _| {},
    )
    .expect("merge");
    assert_eq!(
        r.patched.get("unet/diffusion_pytorch_model.safetensors"),
        Some(&77)
    );
    let fused = read(&tiny("expected/fused_diffusers_wide.safetensors"));
    let unet = read(&out.join("unet/diffusion_pytorch_model.safetensors"));
    let te = read(&out.join("text_encoder/model.safetensors"));
    let bytes = std::fs::read(tiny("expected/fused_diffusers_wide.safetensors")).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("st");
    let mut n = 0;
    for name in st.names() {
        let (_, want) = fused.f32(name);
        let (got_file, key) = match name.strip_prefix("unet.") {
            Some(k) => (&unet, k.to_string()),
            None => (
                &te,
                name.strip_prefix("text_encoder.")
                    .expect("prefix")
                    .to_string(),
            ),
        };
        let (_, got) = got_file.f32(&key);
        let (a, _) = diff(&got, &want);
        assert!(a <= 1e-5, "{name}: {a}");
        n += 1;
    }
    assert_eq!(n, 89);
    assert!(
        out.join("vae/diffusion_pytorch_model.safetensors")
            .is_file()
            && out.join("tokenizer/vocab.json").is_file()
    );
}

#[test]
fn unet_and_text_encoder_multipliers_from_the_cli() {
    // `--unet-scale` / `--text-encoder-scale` multiply the FILE:WEIGHT weight per component:
    // 0.5 × 1 on the UNet and 0.5 × 2 on the text encoder must give diffusers' fuse_lora at 0.5
    // and 1.0 (the UNet fixture's hidden states are fixed, so the components are independent).
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("merged");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_lorafuse"))
        .args([
            "merge",
            "--strict",
            "--unet-scale",
            "1",
            "--text-encoder-scale",
            "2",
            "-m",
        ])
        .arg(tiny("onnx"))
        .arg("-l")
        .arg(format!(
            "{}:0.5",
            tiny("loras/diffusers.safetensors").display()
        ))
        .arg("-o")
        .arg(&out)
        .output()
        .expect("run lorafuse merge");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let half = read(&tiny("expected/lora_diffusers_s0.5.safetensors"));
    let full = read(&tiny("expected/lora_diffusers_s1.0.safetensors"));
    check(
        "unet at 0.5 × 1",
        &run_unet(&out),
        &half.f32("unet_out_sample").1,
        FP32_ABS,
        FP32_REL,
    );
    check(
        "text encoder at 0.5 × 2",
        &run_text_encoder(&out),
        &full.f32("text_encoder_last_hidden_state").1,
        FP32_ABS,
        FP32_REL,
    );
}

#[test]
fn cancelled_merge_leaves_nothing() {
    // A Ctrl-C (the CLI sets `cancel`) after the first copied file: `Cancelled`, and neither the
    // output nor the temporary folder beside it remains.
    for src in [tiny("onnx"), tiny("diffusers")] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let out = tmp.path().join("out");
        let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let opts = MergeOptions {
            cancel: Some(cancel.clone()),
            ..Default::default()
        };
        let specs = [LoraSpec {
            path: tiny("loras/diffusers_wide.safetensors"),
            weight: 1.0,
        }];
        let mut progress =
            |_: usize, _: usize, _: &str| cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        let res = if src.ends_with("diffusers") {
            lorafuse::merge::merge_diffusers_pipeline(
                &src,
                &out,
                &specs,
                &opts,
                false,
                &mut progress,
            )
        } else {
            merge_pipeline(&src, &out, &specs, &opts, false, &mut progress)
        };
        assert!(
            matches!(res, Err(lorafuse::Error::Cancelled)),
            "{}: {:?}",
            src.display(),
            res.map(|r| r.out)
        );
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("read_dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

#[test]
fn merged_folder_has_the_source_folder_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    copy_dir(&tiny("onnx"), &src);
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    let out = tmp.path().join("merged");
    merge_pipeline(
        &src,
        &out,
        &[LoraSpec {
            path: tiny("loras/diffusers.safetensors"),
            weight: 1.0,
        }],
        &MergeOptions::default(),
        false,
        &mut |_, _, _| {},
    )
    .expect("merge");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode(&out), 0o750, "the temporary folder's 0700 leaked");
    assert_eq!(
        mode(&out.join("unet/model.onnx")),
        mode(&src.join("unet/model.onnx"))
    );
}

#[test]
fn diffusers_layout_refuses_a_lora_for_another_model() {
    // Same rule as for ONNX pipelines: a ΔW that does not fit its weight is an error naming the
    // file and module, not an unmapped key; nothing is written.
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = wrong_shape_lora(tmp.path());
    let out = tmp.path().join("out");
    let err = lorafuse::merge::merge_diffusers_pipeline(
        &tiny("diffusers"),
        &out,
        &[LoraSpec {
            path: p.clone(),
            weight: 1.0,
        }],
        &MergeOptions::default(),
        false,
        &mut |_, _, _| {},
    )
    .expect_err("a LoRA for another model must be refused")
    .to_string();
    assert!(
        err.contains("wrong_shape.safetensors") && err.contains("attn1.to_q"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Spacing of fp16 numbers at `x` (subnormals: 2⁻²⁴).
fn ulp16(x: f32) -> f32 {
    let a = x.abs();
    if a < 2f32.powi(-14) {
        return 2f32.powi(-24);
    }
    2f32.powi(a.log2().floor() as i32 - 10)
}

#[test]
fn fp16_merged_weights_are_diffusers_fused_weights_rounded() {
    // "Within fp16 rounding", element by element: the fp16 export holds r(W); we store
    // r(r(W) + ΔW), diffusers fuses W + ΔW in fp32. So |ours − diffusers| ≤ ½ulp(r(W)) + ½ulp(ours)
    // (+ f32 noise) for every merged weight of the UNet and the text encoder.
    use lorafuse::layout::OnnxPipelineDir;
    let fp16 = common::made("onnx-fp16");
    let (_tmp, out) = merge_to_tmp(&fp16, &[("diffusers_wide.safetensors", 1.0)]);
    let base = lorafuse::merge::index_pipeline(&OnnxPipelineDir::open(&fp16).expect("open"), None)
        .expect("index base");
    let merged = lorafuse::merge::index_pipeline(&OnnxPipelineDir::open(&out).expect("open"), None)
        .expect("index merged");
    let fused = read(&tiny("expected/fused_diffusers_wide.safetensors"));
    let bytes = std::fs::read(tiny("expected/fused_diffusers_wide.safetensors")).expect("read");
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
        .expect("st")
        .names()
        .into_iter()
        .map(str::to_string)
        .collect();
    let (mut n, mut worst) = (0, 0f32);
    for name in names {
        let (comp, module) = match name.strip_prefix("unet.") {
            Some(m) => ("unet", m),
            None => (
                "text_encoder",
                name.strip_prefix("text_encoder.text_model.")
                    .expect("prefix"),
            ),
        };
        let module = module.strip_suffix(".weight").expect("weight");
        let find = |set: &[lorafuse::merge::IndexedModel]| {
            let im = set
                .iter()
                .find(|m| m.component.dir_name() == comp)
                .unwrap_or_else(|| panic!("no {comp}"));
            let w = im
                .index
                .lookup(module)
                .unwrap_or_else(|| panic!("{module} not in the {comp} index"))
                .clone();
            let (_, v) = im.model.initializer_f32(&w.initializer).expect("read");
            w.to_torch(&v).expect("torch layout")
        };
        let (ours, b) = (find(&merged), find(&base));
        let (_, want) = fused.f32(&name);
        assert_eq!(ours.len(), want.len(), "{name}");
        for ((o, w), b) in ours.iter().zip(&want).zip(&b) {
            let bound = 0.5 * ulp16(*b) + 0.5 * ulp16(*o) + 1e-6 * w.abs();
            let e = (o - w).abs();
            assert!(
                e <= bound,
                "{name}: ours {o}, diffusers {w}, base {b}: {e} > {bound}"
            );
            worst = worst.max(e / bound);
        }
        n += 1;
    }
    eprintln!("fp16: {n} merged weights, worst error {worst:.3} of its rounding bound");
    assert_eq!(n, 89);
}
