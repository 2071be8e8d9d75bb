//! Hostile and careless input, one test per hole a bad-input campaign found (docs/reliability.md):
//! each gets a clear error naming the file, key or argument, and nothing is written or changed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lorafuse::merge::{LoraSpec, MergeOptions, merge_pipeline};
use lorafuse::weights::{Dtype, TensorData, WeightFile, write_safetensors};

mod common;
use common::tiny;

fn lorafuse(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lorafuse"))
        .args(args)
        .output()
        .expect("run lorafuse");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    (out.status.success(), stderr)
}

fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for e in std::fs::read_dir(src).expect("read_dir").flatten() {
        let to = dst.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_tree(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).expect("copy");
        }
    }
}

/// Every file under `dir` (relative paths, sorted), with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).expect("rel").to_path_buf();
                out.push((rel, std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

fn spec(path: PathBuf, weight: f32) -> LoraSpec {
    LoraSpec { path, weight }
}

fn merge(src: &Path, out: &Path, loras: &[LoraSpec]) -> lorafuse::Result<()> {
    merge_pipeline(
        src,
        out,
        loras,
        &MergeOptions::default(),
        false,
        &mut |_, _, _| {},
    )
    .map(|_| ())
}

/// A pipeline folder whose UNet keeps its weights in an external data file.
fn extdata_pipeline(root: &Path) -> PathBuf {
    let p = root.join("pipe");
    copy_tree(&tiny("onnx"), &p);
    std::fs::remove_dir_all(p.join("unet")).expect("rm");
    copy_tree(&common::made("onnx-extdata/unet"), &p.join("unet"));
    p
}

#[cfg(unix)]
#[test]
fn item1_external_data_links_out_of_the_model_folder_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pipe = extdata_pipeline(tmp.path());
    let data = pipe.join("unet/model.onnx_data");
    let secret = tmp.path().join("secret.bin");
    std::fs::rename(&data, &secret).expect("move");
    std::os::unix::fs::symlink(&secret, &data).expect("link");
    let out = tmp.path().join("merged");
    let e = merge(
        &pipe,
        &out,
        &[spec(tiny("loras/diffusers.safetensors"), 1.0)],
    )
    .expect_err("refused")
    .to_string();
    assert!(
        e.contains("outside") && e.contains("model.onnx_data"),
        "{e}"
    );
    assert!(!out.exists());
    // The same data file inside the folder, reached through a link, is fine.
    std::fs::remove_file(&data).expect("rm");
    std::fs::rename(&secret, pipe.join("unet/real.bin")).expect("move");
    std::os::unix::fs::symlink("real.bin", &data).expect("link");
    lorafuse::onnx::model::OnnxModel::open(pipe.join("unet/model.onnx")).expect("inside");
}

#[cfg(unix)]
#[test]
fn item2_hub_cache_pipelines_merge_completely() {
    // models--x--y/{blobs/<n>, snapshots/<rev>/<every file a link into blobs>}
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = tmp.path().join("models--org--tiny");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(repo.join("blobs")).expect("mkdir");
    let src = snapshot(&tiny("onnx"));
    for (i, (rel, bytes)) in src.iter().enumerate() {
        let blob = repo.join("blobs").join(format!("{i:040x}"));
        std::fs::write(&blob, bytes).expect("blob");
        let link = snap.join(rel);
        std::fs::create_dir_all(link.parent().expect("parent")).expect("mkdir");
        let up = "../".repeat(rel.components().count() + 1);
        std::os::unix::fs::symlink(format!("{up}blobs/{i:040x}"), &link).expect("link");
    }
    let out = tmp.path().join("merged");
    merge(
        &snap,
        &out,
        &[spec(tiny("loras/diffusers.safetensors"), 1.0)],
    )
    .expect("merge");
    let got: Vec<PathBuf> = snapshot(&out).into_iter().map(|(p, _)| p).collect();
    let want: Vec<PathBuf> = src.into_iter().map(|(p, _)| p).collect();
    assert_eq!(got, want, "every file of the snapshot is in the output");
    // A link in the snapshot that leaves the repository is refused.
    std::fs::write(tmp.path().join("outside.txt"), b"secret").expect("write");
    std::os::unix::fs::symlink(
        tmp.path().join("outside.txt"),
        snap.join("tokenizer/extra.txt"),
    )
    .expect("link");
    let e = merge(
        &snap,
        &tmp.path().join("m2"),
        &[spec(tiny("loras/diffusers.safetensors"), 1.0)],
    )
    .expect_err("refused")
    .to_string();
    assert!(e.contains("extra.txt") && e.contains("outside"), "{e}");
    assert!(!tmp.path().join("m2").exists());
}

#[test]
fn item3_merge_never_writes_into_its_input() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pipe = tmp.path().join("pipe");
    copy_tree(&tiny("onnx"), &pipe);
    let before = snapshot(&pipe);
    for out in [
        pipe.join("newdir/merged"),
        pipe.join("merged"),
        pipe.join("unet/../x/y"),
        pipe.clone(),
    ] {
        let e = merge(
            &pipe,
            &out,
            &[spec(tiny("loras/diffusers.safetensors"), 1.0)],
        )
        .expect_err("refused")
        .to_string();
        assert!(
            e.contains("inside the input") || e.contains("exists"),
            "{e}"
        );
    }
    assert_eq!(snapshot(&pipe), before, "the input is unchanged");
    assert!(!pipe.join("newdir").exists());
}

#[cfg(unix)]
#[test]
fn item4_generate_replaces_only_regular_files() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fifo = tmp.path().join("fifo.png");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("c");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let dir = tmp.path().join("folder.png");
    std::fs::create_dir(&dir).expect("mkdir");
    let link = tmp.path().join("link.png");
    std::os::unix::fs::symlink(tmp.path().join("target.png"), &link).expect("link");
    let m = tiny("onnx");
    for target in [&fifo, &dir, &link] {
        let (ok, err) = lorafuse(&[
            "generate",
            "-m",
            m.to_str().expect("utf8"),
            "-p",
            "x",
            "-o",
            target.to_str().expect("utf8"),
        ]);
        assert!(!ok, "{}", target.display());
        assert!(err.contains(&*target.to_string_lossy()), "{err}");
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::symlink_metadata(&fifo)
            .expect("fifo")
            .file_type()
            .is_fifo()
    );
    assert!(dir.is_dir() && !tmp.path().join("target.png").exists());
}

fn npy(shape: &str, data: &[u8]) -> Vec<u8> {
    let mut h = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((h.len() as u16).to_le_bytes());
    out.extend(h.as_bytes());
    out.extend(data);
    out
}

#[test]
fn item5_sizes_from_input_are_checked_before_allocating() {
    let tmp = tempfile::tempdir().expect("tmp");
    let m = tiny("onnx");
    let m = m.to_str().expect("utf8");
    let o = tmp.path().join("x.png");
    let o = o.to_str().expect("utf8");
    let lat = tmp.path().join("lat.npy");
    std::fs::write(&lat, npy("(100000, 4, 100000, 100000)", &[0; 64])).expect("npy");
    let lat = lat.to_str().expect("utf8");
    for (args, want) in [
        (
            vec![
                "generate",
                "-m",
                m,
                "-p",
                "x",
                "--init-latents",
                lat,
                "-o",
                o,
            ],
            "lat.npy",
        ),
        (
            vec![
                "generate", "-m", m, "-p", "x", "-W", "100000", "-H", "100000", "-o", o,
            ],
            "at most 4096",
        ),
        (
            vec![
                "generate",
                "-m",
                m,
                "-p",
                "x",
                "--batch-size",
                "100000",
                "--num-images",
                "100000",
                "-o",
                "/tmp/never/{index}.png",
            ],
            "batch 100000",
        ),
        (
            vec!["bench", "-m", m, "-W", "100000", "-H", "100000"],
            "at most 4096",
        ),
    ] {
        let (ok, err) = lorafuse(&args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
    // Config values that size allocations.
    for (file, key, value, want) in [
        (
            "unet/config.json",
            "sample_size",
            "1000000000000",
            "sample_size",
        ),
        (
            "vae_decoder/config.json",
            "block_out_channels",
            "[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63,64,65,66]",
            "block_out_channels",
        ),
        (
            "scheduler/scheduler_config.json",
            "num_train_timesteps",
            "1000000000000",
            "num_train_timesteps",
        ),
    ] {
        let pipe = tmp.path().join(format!("pipe-{key}"));
        copy_tree(&tiny("onnx"), &pipe);
        let path = pipe.join(file);
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        v[key] = serde_json::from_str(value).expect("value");
        std::fs::write(&path, v.to_string()).expect("write");
        let (ok, err) = lorafuse(&[
            "generate",
            "-m",
            pipe.to_str().expect("utf8"),
            "-p",
            "x",
            "-o",
            o,
        ]);
        assert!(!ok && err.contains(want), "{key}: {err}");
    }
    assert!(!Path::new(o).exists());
}

/// A one-module kohya LoRA for the tiny UNet's first attention projection, with `down`/`up` of
/// the given dtype and values and an `alpha`.
fn kohya_lora(path: &Path, dtype: Dtype, down: &[f32], up: &[f32], alpha: f32) {
    // down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q: [32, 32] in the tiny UNet.
    let base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let t = |shape: Vec<usize>, v: &[f32]| match dtype {
        Dtype::I64 => TensorData::from_i64(shape, &v.iter().map(|x| *x as i64).collect::<Vec<_>>())
            .expect("i64"),
        _ => TensorData::from_f32(dtype, shape, v).expect("f32"),
    };
    let tensors = vec![
        (format!("{base}.lora_down.weight"), t(vec![1, 32], down)),
        (format!("{base}.lora_up.weight"), t(vec![32, 1], up)),
        (
            format!("{base}.alpha"),
            TensorData::from_f32(Dtype::F32, vec![], &[alpha]).expect("alpha"),
        ),
    ];
    write_safetensors(path, tensors, None).expect("write");
}

#[test]
fn item6_non_finite_and_non_float_loras_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pipe = tiny("onnx");
    let mut nan = vec![0.1f32; 32];
    nan[7] = f32::NAN;
    let ok = vec![0.1f32; 32];
    // (name, dtype, down, up, alpha, what the error says)
    type Case<'a> = (&'a str, Dtype, Vec<f32>, Vec<f32>, f32, &'a str);
    let cases: Vec<Case> = vec![
        (
            "nan",
            Dtype::F32,
            nan.clone(),
            ok.clone(),
            1.0,
            "element 7 is NaN",
        ),
        (
            "inf",
            Dtype::F32,
            ok.clone(),
            vec![f32::INFINITY; 32],
            1.0,
            "inf",
        ),
        ("int", Dtype::I64, ok.clone(), ok.clone(), 1.0, "dtype I64"),
        (
            "negalpha",
            Dtype::F32,
            ok.clone(),
            ok.clone(),
            -4.0,
            "alpha must be",
        ),
        (
            "nanalpha",
            Dtype::F32,
            ok.clone(),
            ok.clone(),
            f32::NAN,
            "alpha must be",
        ),
    ];
    for (name, dtype, down, up, alpha, want) in cases {
        let f = tmp.path().join(format!("{name}.safetensors"));
        kohya_lora(&f, dtype, &down, &up, alpha);
        let out = tmp.path().join(format!("out-{name}"));
        let e = merge(&pipe, &out, &[spec(f, 1.0)])
            .expect_err(name)
            .to_string();
        assert!(e.contains(want) && e.contains(name), "{name}: {e}");
        assert!(!out.exists());
    }
    // Huge values overflow an fp16 weight: refused, naming the weight.
    let f = tmp.path().join("huge.safetensors");
    kohya_lora(&f, Dtype::F32, &[300.0; 32], &[300.0; 32], 1.0);
    let out = tmp.path().join("out-huge");
    let e = merge(&common::made("onnx-fp16"), &out, &[spec(f.clone(), 1.0)])
        .expect_err("fp16 overflow")
        .to_string();
    assert!(
        e.contains("beyond what") && e.contains("huge.safetensors"),
        "{e}"
    );
    assert!(!out.exists());
    // Weights: finite and within ±1000, on the command line and in prompt tags.
    assert!("x.safetensors:1e30".parse::<LoraSpec>().is_err());
    assert!("x.safetensors:nan".parse::<LoraSpec>().is_err());
    assert!("x.safetensors:-2.5".parse::<LoraSpec>().is_ok());
    assert!(lorafuse::pipeline::prompt::extract_lora_tags("<lora:x:1e30>").is_err());
}

#[test]
fn item7_prompt_tags_stay_inside_the_lora_folder() {
    let tmp = tempfile::tempdir().expect("tmp");
    let m = tiny("onnx");
    let loras = tiny("loras");
    for tag in [
        "<lora:/etc/passwd:1>",
        "<lora:../loras/diffusers:1>",
        "<lora:../../../../../../etc/hostname>",
    ] {
        let o = tmp.path().join("x.png");
        let (ok, err) = lorafuse(&[
            "generate",
            "-m",
            m.to_str().expect("utf8"),
            "-p",
            tag,
            "--lora-dir",
            loras.to_str().expect("utf8"),
            "-o",
            o.to_str().expect("utf8"),
        ]);
        assert!(!ok && err.contains("LoRA folder"), "{tag}: {err}");
        assert!(!o.exists());
    }
}

#[cfg(unix)]
#[test]
fn item8_thread_counts_and_fifos() {
    let tmp = tempfile::tempdir().expect("tmp");
    let m = tiny("onnx");
    let m = m.to_str().expect("utf8");
    let o = tmp.path().join("x.png");
    let o = o.to_str().expect("utf8");
    for n in ["0", "100000"] {
        let (ok, err) = lorafuse(&["generate", "-m", m, "-p", "x", "--threads", n, "-o", o]);
        assert!(!ok && err.contains(&format!("threads {n}")), "{n}: {err}");
    }
    let fifo = tmp.path().join("lora.safetensors");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("c");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let lat = tmp.path().join("lat.npy");
    let c2 = std::ffi::CString::new(lat.as_os_str().as_encoded_bytes()).expect("c");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::mkfifo(c2.as_ptr(), 0o600) }, 0);
    let start = Instant::now();
    for args in [
        vec![
            "generate",
            "-m",
            m,
            "-p",
            "x",
            "--lora",
            fifo.to_str().expect("utf8"),
            "-o",
            o,
        ],
        vec![
            "generate",
            "-m",
            m,
            "-p",
            "x",
            "--init-latents",
            lat.to_str().expect("utf8"),
            "-o",
            o,
        ],
        vec!["inspect", fifo.to_str().expect("utf8")],
    ] {
        let (ok, err) = lorafuse(&args);
        assert!(!ok && err.contains("FIFO"), "{args:?}: {err}");
    }
    assert!(start.elapsed() < Duration::from_secs(60), "nothing blocked");
    let _ = WeightFile::open(&fifo).expect_err("FIFO");
}

#[cfg(unix)]
#[test]
fn item9_leftovers_of_killed_merges_are_removed_and_ctrl_c_tells_the_truth() {
    let tmp = tempfile::tempdir().expect("tmp");
    // A dead process's temporary folder (its pid is free) goes; a live one's stays.
    let dead = {
        let mut c = Command::new("true").spawn().expect("spawn");
        let pid = c.id();
        c.wait().expect("wait");
        pid
    };
    let stale = tmp.path().join(format!(".merged.lorafuse-{dead}-abc123"));
    let live = tmp
        .path()
        .join(format!(".merged.lorafuse-{}-def456", std::process::id()));
    std::fs::create_dir_all(stale.join("unet")).expect("mkdir");
    std::fs::create_dir_all(&live).expect("mkdir");
    let out = tmp.path().join("merged");
    let lora = tiny("loras/diffusers.safetensors");
    let (ok, err) = lorafuse(&[
        "merge",
        "-m",
        tiny("onnx").to_str().expect("utf8"),
        "-l",
        lora.to_str().expect("utf8"),
        "-o",
        out.to_str().expect("utf8"),
    ]);
    assert!(ok, "{err}");
    assert!(!stale.exists(), "the dead merge's folder is removed");
    assert!(live.exists(), "a live process's folder is left alone");

    // Ctrl-C at assorted moments: either the output is complete and kept (and we say so), or
    // nothing is there; never a leftover temporary folder.
    for (i, delay_ms) in [0u64, 20, 50, 100, 200, 400].into_iter().enumerate() {
        let out = tmp.path().join(format!("m{i}"));
        let child = Command::new(env!("CARGO_BIN_EXE_lorafuse"))
            .args([
                "merge",
                "-m",
                tiny("onnx").to_str().expect("utf8"),
                "-l",
                lora.to_str().expect("utf8"),
                "-o",
                out.to_str().expect("utf8"),
            ])
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(delay_ms));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let res = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&res.stderr);
        if out.exists() {
            assert_eq!(snapshot(&out).len(), snapshot(&tiny("onnx")).len(), "{err}");
            assert!(!err.contains("nothing was written"), "{err}");
        } else {
            assert!(!res.status.success(), "no output, yet success: {err}");
        }
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("ls")
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!(".m{i}.lorafuse-"))
            })
            .collect();
        assert!(left.is_empty(), "leftover {left:?}: {err}");
    }
}

#[test]
fn item10_messages_and_outputs_that_misled() {
    let tmp = tempfile::tempdir().expect("tmp");
    let m = tiny("onnx");
    let m = m.to_str().expect("utf8");
    // Several images to one file.
    let o = tmp.path().join("one.png");
    let (ok, err) = lorafuse(&[
        "generate",
        "-m",
        m,
        "-p",
        "x",
        "--num-images",
        "2",
        "-o",
        o.to_str().expect("utf8"),
    ]);
    assert!(!ok && err.contains("{index}"), "{err}");
    assert!(!o.exists());
    // Seeds do not wrap to 0.
    let (ok, err) = lorafuse(&[
        "generate",
        "-m",
        m,
        "-p",
        "x",
        "--num-images",
        "2",
        "--seed",
        "18446744073709551615",
        "-o",
        tmp.path().join("{index}.png").to_str().expect("utf8"),
    ]);
    assert!(!ok && err.contains("largest seed"), "{err}");
    // A merge error names the output it was making, not only the input.
    let out = tmp.path().join("merged");
    let bad = tmp.path().join("bad.safetensors");
    std::fs::write(&bad, b"not a safetensors file").expect("write");
    let (ok, err) = lorafuse(&[
        "merge",
        "-m",
        m,
        "-l",
        bad.to_str().expect("utf8"),
        "-o",
        out.to_str().expect("utf8"),
    ]);
    assert!(
        !ok && err.contains("bad.safetensors") && err.contains("copy of"),
        "{err}"
    );
    assert!(!out.exists());
    // A diffusers folder whose UNet has no config.json merges (the error blamed a temp path).
    let src = tmp.path().join("diffusers");
    copy_tree(&tiny("diffusers"), &src);
    std::fs::remove_file(src.join("unet/config.json")).expect("rm");
    let lora = tiny("loras/diffusers.safetensors");
    let (ok, err) = lorafuse(&[
        "merge",
        "-m",
        src.to_str().expect("utf8"),
        "-l",
        lora.to_str().expect("utf8"),
        "-o",
        out.to_str().expect("utf8"),
    ]);
    assert!(
        ok && out
            .join("unet/diffusion_pytorch_model.safetensors")
            .is_file(),
        "{err}"
    );
}
