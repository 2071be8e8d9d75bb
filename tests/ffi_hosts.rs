//! Hosts driving `target/<profile>/liblorafuse.so` (built by `cargo test` with the package): a Rust
//! host through plugin-api's loader, the C host `plugin-api/examples/host.c` compiled with the
//! system `cc`, and the ctypes host `plugin-api/examples/host.py`. Each opens the tiny pipeline,
//! applies a LoRA, generates, switches to another LoRA on the live pipeline, generates again and
//! writes images; every image must be bit-identical to `lorafuse generate` with the same settings.

use std::path::Path;
use std::process::Command;

use plugin_api::LORAFUSE_DEVICE_CPU;
use plugin_api::loader::{GenerateParams, PipelineOptions, Plugin};

mod common;
use common::{cdylib, root, tiny};

const PROMPT: &str = "a photo of a cat";
const NEGATIVE: &str = "blurry";
const STEPS: u32 = 4;
const SEED: u64 = 42;

/// An RGB8 image and its A1111 text.
#[derive(Debug, PartialEq)]
struct Rgb {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
    parameters: Option<String>,
}

fn read_png(path: &Path) -> Rgb {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    assert_eq!(
        (info.color_type, info.bit_depth),
        (png::ColorType::Rgb, png::BitDepth::Eight),
        "{}",
        path.display()
    );
    buf.truncate(info.buffer_size());
    let parameters = lorafuse::image::read_png_parameters(path).expect("parameters");
    Rgb {
        width: info.width,
        height: info.height,
        rgb: buf,
        parameters,
    }
}

fn read_ppm(path: &Path) -> Rgb {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // "P6\n<w> <h>\n255\n" then the pixels.
    let mut fields = Vec::new();
    let mut pos = 0;
    while fields.len() < 4 {
        let end = pos
            + bytes[pos..]
                .iter()
                .position(|b| b.is_ascii_whitespace())
                .expect("ppm header");
        fields.push(String::from_utf8_lossy(&bytes[pos..end]).into_owned());
        pos = end + 1;
    }
    assert_eq!((fields[0].as_str(), fields[3].as_str()), ("P6", "255"));
    let txt = path.with_extension("txt");
    Rgb {
        width: fields[1].parse().expect("w"),
        height: fields[2].parse().expect("h"),
        rgb: bytes[pos..].to_vec(),
        parameters: std::fs::read_to_string(txt).ok(),
    }
}

/// `lorafuse generate` with the hosts' settings; returns the images it wrote, in order.
fn cli(dir: &Path, loras: &[&str], num_images: u32, batch_size: u32) -> Vec<Rgb> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lorafuse"));
    cmd.arg("generate")
        .args(["-m", tiny("onnx").to_str().expect("utf-8")])
        .args(["-p", PROMPT, "-n", NEGATIVE])
        .args(["--steps", &STEPS.to_string(), "--seed", &SEED.to_string()])
        .args([
            "--num-images",
            &num_images.to_string(),
            "--batch-size",
            &batch_size.to_string(),
        ])
        .args(["--device", "cpu", "--threads", "1"])
        // The plugin hot-swaps LoRAs (switch mode); the CLI's one-shot default is rebuild.
        .args(["--lora-mode", "switch"])
        .arg("-o")
        .arg(dir.join("{index}.png"));
    for l in loras {
        cmd.args(["--lora", l]);
    }
    let out = cmd.output().expect("run lorafuse generate");
    assert!(
        out.status.success(),
        "lorafuse generate failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (0..num_images)
        .map(|i| read_png(&dir.join(format!("{i}.png"))))
        .collect()
}

fn lora_arg(rel: &str, weight: Option<f32>) -> String {
    let p = tiny(rel).to_str().expect("utf-8").to_string();
    match weight {
        Some(w) => format!("{p}:{w}"),
        None => p,
    }
}

fn host_params() -> GenerateParams {
    GenerateParams {
        prompt: PROMPT.into(),
        negative_prompt: NEGATIVE.into(),
        steps: STEPS,
        seed: SEED,
        guidance_scale: 7.5,
        ..Default::default()
    }
}

fn assert_same(host: &Rgb, cli: &Rgb, what: &str) {
    assert_eq!(
        (host.width, host.height),
        (cli.width, cli.height),
        "{what}: size"
    );
    let differing = host
        .rgb
        .iter()
        .zip(&cli.rgb)
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        host.rgb.len() == cli.rgb.len() && differing == 0,
        "{what}: {differing} bytes differ from the CLI's image"
    );
    if let (Some(h), Some(c)) = (&host.parameters, &cli.parameters) {
        assert_eq!(h, c, "{what}: parameters text");
    }
}

#[test]
fn rust_host_matches_the_cli_bit_for_bit() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cli_a = cli(
        &tmp.path().join("cli_a"),
        &[&lora_arg("loras/diffusers.safetensors", None)],
        1,
        1,
    );
    let cli_b = cli(
        &tmp.path().join("cli_b"),
        &[&lora_arg("loras/kohya_wide.safetensors", Some(0.6))],
        1,
        1,
    );
    let cli_batch = cli(&tmp.path().join("cli_batch"), &[], 3, 2);

    let plugin = Plugin::open(cdylib()).expect("plugin");
    let opts = PipelineOptions {
        device: LORAFUSE_DEVICE_CPU,
        intra_threads: 1,
        ..PipelineOptions::new(tiny("onnx"))
    };
    let mut pipe = plugin.create_pipeline(&opts).expect("pipeline");
    let a = plugin
        .load_lora(tiny("loras/diffusers.safetensors"))
        .expect("a");
    let b = plugin
        .load_lora(tiny("loras/kohya_wide.safetensors"))
        .expect("b");

    // Several images in UNet batches: the same images, seeds and texts as the CLI's (before any
    // LoRA: the pipeline still runs the sessions of the model files).
    let images = pipe
        .generate(
            &GenerateParams {
                num_images: 3,
                batch_size: 2,
                ..host_params()
            },
            None,
        )
        .expect("batch");
    assert_eq!(images.len(), 3);
    for (i, c) in cli_batch.iter().enumerate() {
        let img = images.get(i).expect("image");
        assert_eq!(img.seed, SEED + i as u64);
        let shot = Rgb {
            width: img.width,
            height: img.height,
            rgb: img.rgb.to_vec(),
            parameters: Some(img.parameters.into()),
        };
        assert_same(&shot, c, &format!("batch image {i}"));
    }

    let out = tmp.path().join("rust_host");
    std::fs::create_dir_all(&out).expect("mkdir");
    let mut shots = Vec::new();
    for (name, lora, weight) in [("a", &a, 1.0f32), ("b", &b, 0.6)] {
        pipe.set_loras(&[(lora, weight)], None).expect("set_loras");
        let images = pipe.generate(&host_params(), None).expect("generate");
        let img = images.get(0).expect("one image");
        assert_eq!(img.seed, SEED);
        let shot = Rgb {
            width: img.width,
            height: img.height,
            rgb: img.rgb.to_vec(),
            parameters: Some(img.parameters.into()),
        };
        let png_path = out.join(format!("{name}.png"));
        lorafuse::image::write_png(
            &png_path,
            &lorafuse::image::GeneratedImage {
                width: img.width,
                height: img.height,
                rgb: img.rgb.to_vec(),
                parameters: img.parameters.into(),
            },
        )
        .expect("png");
        assert_eq!(read_png(&png_path), shot, "the PNG round trip");
        shots.push(shot);
    }
    assert_same(&shots[0], &cli_a[0], "Rust host, LoRA a");
    assert_same(&shots[1], &cli_b[0], "Rust host, LoRA b after a switch");

    // Back to no LoRA on the live pipeline: the base weights return bit for bit, but the session
    // now takes them as inputs, so ORT runs other kernels: equal to rounding (≤ 1/255).
    pipe.set_loras(&[], None).expect("none");
    let images = pipe
        .generate(
            &GenerateParams {
                num_images: 1,
                ..host_params()
            },
            None,
        )
        .expect("after none");
    let img = images.get(0).expect("image");
    let worst = img
        .rgb
        .iter()
        .zip(&cli_batch[0].rgb)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(255);
    assert!(
        worst <= 1,
        "no LoRA after a switch: {worst}/255 off the CLI's image"
    );

    assert!(images.get(1).is_none());
}

#[test]
fn c_host_matches_the_cli() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    if Command::new(&cc).arg("--version").output().is_err() {
        eprintln!("skipped: no C compiler `{cc}`");
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let exe = tmp.path().join("host");
    let out = Command::new(&cc)
        .args([
            "-std=c99",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-O1",
        ])
        .arg("-I")
        .arg(root().join("plugin-api/include"))
        .arg(root().join("plugin-api/examples/host.c"))
        .arg("-o")
        .arg(&exe)
        .arg("-ldl")
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let images = tmp.path().join("out");
    std::fs::create_dir_all(&images).expect("mkdir");
    let run = Command::new(&exe)
        .arg(cdylib())
        .arg(tiny("onnx"))
        .arg(tiny("loras/diffusers.safetensors"))
        .arg(tiny("loras/kohya_wide.safetensors"))
        .arg("0.6")
        .arg(&images)
        .output()
        .expect("run host");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "C host failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("report:"), "{stdout}");

    let cli_a = cli(
        &tmp.path().join("cli_a"),
        &[&lora_arg("loras/diffusers.safetensors", None)],
        1,
        1,
    );
    let cli_b = cli(
        &tmp.path().join("cli_b"),
        &[&lora_arg("loras/kohya_wide.safetensors", Some(0.6))],
        1,
        1,
    );
    assert_same(
        &read_ppm(&images.join("a.ppm")),
        &cli_a[0],
        "C host, LoRA a",
    );
    assert_same(
        &read_ppm(&images.join("b.ppm")),
        &cli_b[0],
        "C host, LoRA b after a switch",
    );
}

#[test]
fn python_host_matches_the_cli() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    if Command::new(&python).arg("--version").output().is_err() {
        eprintln!("skipped: no `{python}`");
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let images = tmp.path().join("out");
    std::fs::create_dir_all(&images).expect("mkdir");
    let run = Command::new(&python)
        .arg(root().join("plugin-api/examples/host.py"))
        .arg(cdylib())
        .arg(tiny("onnx"))
        .arg(tiny("loras/diffusers.safetensors"))
        .arg(tiny("loras/kohya_wide.safetensors"))
        .arg("0.6")
        .arg(&images)
        .output()
        .expect("run python host");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "Python host failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("NULL prompt -> 1"), "{stdout}");

    let cli_a = cli(
        &tmp.path().join("cli_a"),
        &[&lora_arg("loras/diffusers.safetensors", None)],
        1,
        1,
    );
    let cli_b = cli(
        &tmp.path().join("cli_b"),
        &[&lora_arg("loras/kohya_wide.safetensors", Some(0.6))],
        1,
        1,
    );
    assert_same(
        &read_png(&images.join("a.png")),
        &cli_a[0],
        "Python host, LoRA a",
    );
    assert_same(
        &read_png(&images.join("b.png")),
        &cli_b[0],
        "Python host, LoRA b after a switch",
    );
}
