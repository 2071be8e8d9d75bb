//! The CLI front door: real runs on the tiny pipeline and clear errors for bad arguments and broken
//! model folders (never a panic, never a partial output file).

use std::path::Path;
use std::process::Command;

mod common;
use common::tiny;

fn lorafuse(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lorafuse"))
        .args(args)
        .output()
        .expect("run lorafuse");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A third-party reader of A1111 infotext (PyPI `sd-parsers` 0.6, installed by
/// `scripts/setup.sh --train`) reads the PNG's model hash, sampler and seed.
fn sd_parsers_read(png: &Path, model_hash: &str, seed: u64) {
    let script = r#"
import json, sys
from sd_parsers import ParserManager
info = ParserManager().parse(sys.argv[1])
s = info.samplers[0]
print(json.dumps({"generator": str(info.generator), "sampler": s.name, "hash": s.model.hash,
                  "model": s.model.name, "seed": s.parameters.get("seed")}))
"#;
    let out = common::venv_python(
        &[
            std::ffi::OsStr::new("-c"),
            std::ffi::OsStr::new(script),
            png.as_os_str(),
        ],
        "sd-parsers (scripts/setup.sh --train installs it)",
    );
    let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(v["hash"], model_hash, "{v}");
    assert_eq!(v["model"], "onnx", "{v}");
    assert_eq!(v["sampler"], "Euler a", "{v}");
    assert_eq!(
        v["seed"]
            .as_str()
            .map(String::from)
            .unwrap_or(v["seed"].to_string()),
        seed.to_string(),
        "{v}"
    );
    assert!(
        v["generator"]
            .as_str()
            .unwrap_or("")
            .contains("AUTOMATIC1111"),
        "{v}"
    );
}

#[test]
fn generate_writes_png_with_a1111_parameters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pattern = dir.path().join("{index}-{seed}.png");
    let model = tiny("onnx");
    let loras = tiny("loras");
    // any file stands for the checkpoint the pipeline was exported from
    let checkpoint = tiny("diffusers/unet/diffusion_pytorch_model.safetensors");
    let (ok, stdout, stderr) = lorafuse(&[
        "generate",
        "-m",
        model.to_str().unwrap_or_default(),
        "-p",
        "a photo of a cat <lora:kohya:0.5>",
        "-n",
        "blurry",
        "--steps",
        "3",
        "--seed",
        "7",
        "--num-images",
        "2",
        "--scheduler",
        "euler-a",
        "--lora-dir",
        loras.to_str().unwrap_or_default(),
        "--lora",
        &format!("{}:0.25", tiny("loras/lycoris_loha.safetensors").display()),
        "--model-hash",
        checkpoint.to_str().unwrap_or_default(),
        "--device",
        "cpu",
        "-o",
        pattern.to_str().unwrap_or_default(),
    ]);
    assert!(ok, "{stderr}");
    // A1111's hashes computed as modules/hashes.py does, by Python's hashlib: the checkpoint's
    // sha256[:10]; a LoRA's stored sshs_model_hash[:12] (LyCORIS stores `0x…`) or the sha256 of
    // its bytes after the safetensors header [:12]
    let reference = Command::new("python3")
        .args([
            "-c",
            r#"
import hashlib, json, struct, sys
print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest()[:10])
for p in sys.argv[2:]:
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]
    meta = json.loads(b[8:8 + n]).get("__metadata__", {})
    print(meta.get("sshs_model_hash") or hashlib.sha256(b[8 + n:]).hexdigest(), end="\n")
"#,
        ])
        .arg(&checkpoint)
        .arg(tiny("loras/lycoris_loha.safetensors"))
        .arg(tiny("loras/kohya.safetensors"))
        .output()
        .expect("python3");
    let lines: Vec<String> = String::from_utf8_lossy(&reference.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        lines.len(),
        3,
        "{}",
        String::from_utf8_lossy(&reference.stderr)
    );
    let want_model = format!("Model hash: {}, Model: onnx", lines[0]);
    let want_loras = format!(
        "Lora hashes: \"lycoris_loha: {}, kohya: {}\"",
        &lines[1][..12],
        &lines[2][..12]
    );
    for (i, seed) in [(0, 7), (1, 8)] {
        let p = dir.path().join(format!("{i}-{seed}.png"));
        assert!(stdout.contains(&p.display().to_string()), "{stdout}");
        let params = lorafuse::image::read_png_parameters(&p)
            .expect("png")
            .expect("parameters chunk");
        assert!(
            params.starts_with("a photo of a cat <lora:kohya:0.5>\nNegative prompt: blurry\n"),
            "{params}"
        );
        assert!(
            params.contains("Steps: 3, Sampler: Euler a, CFG scale: 7.5")
                && params.contains(&format!("Seed: {seed}")),
            "{params}"
        );
        assert!(
            params.contains("Size: 64x64")
                && params.contains("Lora weights: \"lycoris_loha: 0.25, kohya: 0.5\""),
            "{params}"
        );
        assert!(
            params.contains(&want_model) && params.contains(&want_loras),
            "{params}\nwant {want_model} and {want_loras}"
        );
        sd_parsers_read(&p, &lines[0], seed);
    }
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read_dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 2, "no temporary files left: {names:?}");
}

#[test]
fn bad_arguments_give_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("x.png");
    let (m, o) = (tiny("onnx"), out.to_str().unwrap_or_default().to_string());
    let m = m.to_str().unwrap_or_default();
    for (args, want) in [
        (
            vec!["generate", "-m", m, "-p", "x", "-W", "60", "-o", &o],
            "multiples of 8",
        ),
        (
            vec![
                "generate",
                "-m",
                m,
                "-p",
                "x",
                "--scheduler",
                "foo",
                "-o",
                &o,
            ],
            "unknown scheduler \"foo\"",
        ),
        (
            vec!["generate", "-m", "/nonexistent/pipe", "-p", "x", "-o", &o],
            "/nonexistent/pipe",
        ),
        (
            vec!["generate", "-m", m, "-p", "x", "--device", "tpu", "-o", &o],
            "device `tpu`",
        ),
        (
            vec![
                "generate",
                "-m",
                m,
                "-p",
                "<lora:nothere>",
                "--lora-dir",
                m,
                "-o",
                &o,
            ],
            "nothere",
        ),
        (
            vec!["generate", "-m", m, "-p", "x", "--steps", "0", "-o", &o],
            "steps 0",
        ),
    ] {
        let (ok, _, stderr) = lorafuse(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!out.exists(), "no output after an error");
    }
}

#[test]
fn broken_model_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A pipeline folder without its UNet.
    for c in ["text_encoder", "vae_decoder", "tokenizer", "scheduler"] {
        let src = tiny(&format!("onnx/{c}"));
        let dst = dir.path().join(c);
        std::fs::create_dir_all(&dst).expect("mkdir");
        for e in std::fs::read_dir(&src).expect("read_dir").flatten() {
            std::fs::copy(e.path(), dst.join(e.file_name())).expect("copy");
        }
    }
    std::fs::create_dir_all(dir.path().join("unet")).expect("mkdir");
    let p = dir.path().to_str().unwrap_or_default();
    let (ok, _, stderr) = lorafuse(&["generate", "-m", p, "-p", "x", "-o", "/tmp/never.png"]);
    assert!(
        !ok && stderr.contains("missing unet/model.onnx"),
        "{stderr}"
    );
    // A UNet that is not an ONNX file.
    std::fs::write(dir.path().join("unet/model.onnx"), b"not a model").expect("write");
    let (ok, _, stderr) = lorafuse(&["generate", "-m", p, "-p", "x", "-o", "/tmp/never.png"]);
    assert!(!ok && stderr.contains("unet/model.onnx"), "{stderr}");
    assert!(!Path::new("/tmp/never.png").exists());
}

#[test]
fn merge_cli_reports_and_writes_a_pipeline_that_generates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("merged");
    let m = tiny("onnx");
    let l = tiny("loras/kohya_wide.safetensors");
    let (ok, stdout, stderr) = lorafuse(&[
        "merge",
        "-m",
        m.to_str().unwrap_or_default(),
        "-l",
        &format!("{}:0.6", l.display()),
        "-o",
        out.to_str().unwrap_or_default(),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("kohya") && stdout.contains("unet 77, text encoder 12"),
        "{stdout}"
    );
    let png = dir.path().join("a.png");
    let (ok, _, stderr) = lorafuse(&[
        "generate",
        "-m",
        out.to_str().unwrap_or_default(),
        "-p",
        "x",
        "--steps",
        "2",
        "-o",
        png.to_str().unwrap_or_default(),
    ]);
    assert!(ok && png.is_file(), "{stderr}");
}

#[test]
fn inspect_lora_files_and_models() {
    let p = tiny("loras/kohya_wide.safetensors");
    let (ok, stdout, stderr) = lorafuse(&["inspect", "--json", p.to_str().unwrap_or_default()]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(v["lora"]["dialect"], "kohya (lora_unet_/lora_te_)");
    assert_eq!(
        (
            v["lora"]["unet_modules"].as_u64(),
            v["lora"]["text_encoder_modules"].as_u64()
        ),
        (Some(77), Some(12))
    );
    assert_eq!(v["lora"]["ranks"]["2"], 89);
    assert_eq!(
        v["lora"]["alphas"]["3"], 89,
        "alpha 3 at rank 2 (scale 1.5)"
    );
    let p = tiny("loras/diffusers.safetensors");
    let (_, stdout, _) = lorafuse(&["inspect", "--json", p.to_str().unwrap_or_default()]);
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert!(
        v["metadata"]["lora_adapter_metadata"]
            .as_str()
            .is_some_and(|m| m.contains("lora_alpha")),
        "{v}"
    );
    let p = common::made("onnx-extdata/unet/model.onnx");
    let (ok, stdout, stderr) = lorafuse(&["inspect", "--json", p.to_str().unwrap_or_default()]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let g = &v["models"][0]["graph"];
    assert_eq!(g["lora_target_modules"], 83);
    assert_eq!(g["external_data"][0]["location"], "model.onnx_data");
    assert_eq!(g["opset_imports"][0]["version"], 17);
}

/// `train` takes the script's snake_case options and their kebab-case spellings (rewritten before
/// parsing, `cli::kebab_to_snake`), in both `--flag value` and `--flag=value` forms; other
/// commands' flags are left alone.
#[cfg(feature = "train")]
#[test]
fn train_accepts_snake_and_kebab_spellings() {
    for args in [
        &[
            "train",
            "--train_data_dir",
            "/nonexistent-data",
            "--pretrained_model_name_or_path",
            "/nonexistent-model",
        ][..],
        &[
            "train",
            "--train-data-dir",
            "/nonexistent-data",
            "--pretrained-model-name-or-path",
            "/nonexistent-model",
        ][..],
        &[
            "train",
            "--train-data-dir=/nonexistent-data",
            "--pretrained-model-name-or-path=/nonexistent-model",
            "--max-train-steps",
            "3",
        ][..],
    ] {
        let (ok, _, err) = lorafuse(args);
        assert!(!ok);
        // parsed: the error is about the model folder, not an unknown argument
        assert!(err.contains("/nonexistent-model"), "{args:?}: {err}");
        assert!(!err.contains("unexpected argument"), "{args:?}: {err}");
    }
    let (ok, _, err) = lorafuse(&["train", "--no-such-flag", "1"]);
    assert!(!ok && err.contains("no-such-flag"), "{err}");
}
