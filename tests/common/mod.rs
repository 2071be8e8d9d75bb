//! Helpers every integration test crate shares (`mod common;`): where the repository, the tiny
//! fixtures and the plugin's cdylib are.
#![allow(dead_code)] // each test crate uses a part

use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A file or folder of the tiny pipeline's fixtures (`models/tiny/<rel>`).
pub fn tiny(rel: &str) -> PathBuf {
    root().join("models/tiny").join(rel)
}

/// A file or folder of the fixtures made at test time instead of committed (models/README.md,
/// "Made at test time"), in a folder that mirrors `models/tiny/`:
/// - `onnx-extdata/unet/`: the fp32 UNet with its weights in `model.onnx_data`, by onnx
///   (`models/scripts/onnx_extdata_unet.py`);
/// - `onnx-ortopt{,-attention,-nhwc}/unet/` (fp32) and `onnx-olive{,-cuda}/unet/` (fp16, Olive's
///   recipe): the UNet after ONNX Runtime's
///   transformer optimizer (`models/scripts/ort_optimize_unet.py`);
/// - `onnx-fp16/`: the complete fp16 pipeline, `models/tiny/onnx-fp16/` plus the tokenizer it
///   does not store (optimum writes the same bytes as `onnx/tokenizer/`; make_tiny.py checks).
///
/// The scripts run with the project venv (`scripts/setup.sh --train`: onnx, onnxruntime). Each
/// group is made once per test process (the first test to ask makes it, the others wait) into
/// `CARGO_TARGET_TMPDIR/made-<pid>/`, so concurrent test binaries never share or remove each
/// other's files; folders of processes that have exited are removed.
pub fn made(rel: &str) -> PathBuf {
    use std::collections::BTreeSet;
    use std::sync::{Mutex, OnceLock, PoisonError};

    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    static DONE: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let group: &'static str = match rel.split('/').next() {
        Some("onnx-extdata") => "onnx_extdata_unet.py",
        Some(
            "onnx-ortopt"
            | "onnx-ortopt-attention"
            | "onnx-ortopt-nhwc"
            | "onnx-olive"
            | "onnx-olive-cuda",
        ) => "ort_optimize_unet.py",
        Some("onnx-fp16") => "onnx-fp16",
        Some("onnx-ortfp16") => "ort_float16.py",
        _ => panic!("made({rel}): no such test-time fixture"),
    };
    let root = ROOT.get_or_init(|| {
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        remove_exited(tmp);
        let root = tmp.join(format!("made-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("made: mkdir");
        root
    });
    // Held while making: a test asking for the same group waits for it instead of racing.
    let mut done = DONE.lock().unwrap_or_else(PoisonError::into_inner);
    if !done.contains(group) {
        if group == "onnx-fp16" {
            let dir = root.join("onnx-fp16");
            copy_dir(&tiny("onnx-fp16"), &dir);
            copy_dir(&tiny("onnx/tokenizer"), &dir.join("tokenizer"));
        } else {
            reference_script(group, root);
        }
        done.insert(group);
    }
    root.join(rel)
}

/// Runs `models/scripts/<script> OUT` with the project venv's python.
fn reference_script(script: &str, out: &Path) {
    let path = root().join("models/scripts").join(script);
    venv_python(
        &[path.as_os_str(), out.as_os_str()],
        &format!(
            "models/scripts/{script} (scripts/setup.sh --train installs onnx, onnxruntime and numpy 2.2)"
        ),
    );
}

/// Runs the project venv's python (`.venv`, made by `scripts/setup.sh --train`) with `args` and
/// returns its stdout; panics naming `what` and python's stderr unless it succeeds.
pub fn venv_python<S: AsRef<std::ffi::OsStr>>(args: &[S], what: &str) -> Vec<u8> {
    let py = root().join(".venv/bin/python");
    let o = std::process::Command::new(&py)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh --train)", py.display()));
    assert!(
        o.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// The LoRA files the merge tests apply to every graph form: the tiny fixtures of each dialect
/// (`models/tiny/loras/`), plus the shipped stars LoRA (diffusers format, LoCon-style: conv1,
/// conv2, proj_in and proj_out carry LoRAs too).
pub fn lora_fixtures() -> Vec<(String, PathBuf)> {
    let mut v: Vec<(String, PathBuf)> =
        ["diffusers", "kohya", "attn_procs", "peft", "lycoris_loha"]
            .iter()
            .map(|d| (d.to_string(), tiny(&format!("loras/{d}.safetensors"))))
            .collect();
    v.push((
        "stars".into(),
        root().join("models/loras/stars.safetensors"),
    ));
    v
}

/// `merge_pipeline(src → out)` of the one LoRA `file` at weight 1, default options.
pub fn merge_one(src: &Path, file: &Path, out: &Path) {
    let spec: lorafuse::merge::LoraSpec = file.to_str().expect("utf-8").parse().expect("spec");
    lorafuse::merge::merge_pipeline(
        src,
        out,
        &[spec],
        &lorafuse::merge::MergeOptions::default(),
        false,
        &mut |_, _, _| {},
    )
    .unwrap_or_else(|e| panic!("merge {} into {}: {e}", file.display(), src.display()));
}

/// A `lorafuse train` command line: `model`, `data`, `out`, then `flags` (whitespace-separated).
pub fn train_cli(model: &Path, data: &Path, out: &Path, flags: &str) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "train".into(),
        "--pretrained_model_name_or_path".into(),
        model.display().to_string(),
        "--train_data_dir".into(),
        data.display().to_string(),
        "--output_dir".into(),
        out.display().to_string(),
    ];
    v.extend(flags.split_whitespace().map(String::from));
    v
}

/// The training settings the CPU training tests share: the tiny pipeline, the data set `data`
/// (`models/tiny/dataset` in most), its `file_name` / `caption` columns, 64 px centre-cropped and
/// flipped, batch 4, no warm-up, no checkpoints before step 1000, `seed`, output to `out`, CPU.
#[cfg(feature = "train")]
pub fn tiny_train_config(
    data: &Path,
    out: &Path,
    seed: u64,
) -> lorafuse::train::trainer::TrainConfig {
    let mut c = lorafuse::train::trainer::TrainConfig::new(tiny("diffusers"), data.to_path_buf());
    c.caption_column = "caption".into();
    c.image_column = "file_name".into();
    c.output_dir = out.to_path_buf();
    c.resolution = 64;
    c.center_crop = true;
    c.random_flip = true;
    c.train_batch_size = 4;
    c.lr_warmup_steps = 0;
    c.checkpointing_steps = 1000;
    c.seed = Some(seed);
    c.device = "cpu".into();
    c
}

/// Removes the `made-<pid>` folders of processes that no longer run (Linux: `/proc/<pid>`).
fn remove_exited(tmp: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    for e in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("made-")) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Copies a folder tree (regular files and folders).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap_or_else(|e| panic!("{}: {e}", dst.display()));
    for e in std::fs::read_dir(src).unwrap_or_else(|e| panic!("{}: {e}", src.display())) {
        let e = e.expect("read_dir entry");
        let to = dst.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to)
                .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
        }
    }
}

/// The cdylib this `cargo test` run built. `cargo test` compiles the package's lib as rlib +
/// cdylib into `deps/`, beside the test binary, on every run (it copies it up to
/// `target/<profile>/` only on `cargo build`).
pub fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let deps = exe.parent().expect("deps");
    let name = format!(
        "{}lorafuse{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    [
        deps.join(&name),
        deps.parent().expect("target/<profile>").join(&name),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .unwrap_or_else(|| {
        panic!(
            "{name} is missing beside {}: build it with `cargo build --lib`",
            deps.display()
        )
    })
}

/// CPU session options for fixtures: one thread, no TF32.
pub fn cpu() -> lorafuse::runtime::session::SessionOptions {
    lorafuse::runtime::session::SessionOptions {
        device: lorafuse::runtime::session::Device::Cpu,
        intra_threads: Some(1),
        tf32: false,
        ..Default::default()
    }
}

/// The largest element-wise difference of two equally long vectors.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// A tensor of the tiny UNet's diffusers input/output fixture (`expected/unet_io.safetensors`).
pub fn unet_fixture(name: &str) -> (Vec<usize>, Vec<f32>) {
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

/// The tiny UNet session's `out_sample` for the fixture inputs (fed in the session's dtypes).
pub fn run_unet(s: &mut ort::session::Session) -> Vec<f32> {
    use lorafuse::runtime::tensor::{extract_f32, float_value};
    let ty = |s: &ort::session::Session, name: &str| match s
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
    let (ss, sample) = unet_fixture("sample");
    let (_, t) = unet_fixture("timestep");
    let (hs, hidden) = unet_fixture("encoder_hidden_states");
    let out = s
        .run(ort::inputs![
            "sample" => float_value(&sample, &ss, sample_ty).expect("sample"),
            "timestep" => float_value(&t, &[], t_ty).expect("t"),
            "encoder_hidden_states" => float_value(&hidden, &hs, h_ty).expect("hidden"),
        ])
        .expect("unet run");
    extract_f32(&out[0], "out_sample").expect("f32").1
}
