//! Finding ONNX Runtime: a missing or broken library gives an error that says what was tried and
//! how to fix it, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

fn lorafuse() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lorafuse"))
}

fn run_with_ort_lib(lib: &std::path::Path) -> (bool, String) {
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/tiny/onnx/unet/model.onnx"
    );
    let out = lorafuse()
        .arg("--ort-lib")
        .arg(lib)
        .arg("inspect")
        .arg(model)
        .output()
        .expect("run lorafuse");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_library_lists_what_was_tried() {
    let (ok, err) = run_with_ort_lib(std::path::Path::new(
        "/nonexistent/libonnxruntime.so.1.31.1",
    ));
    assert!(!ok);
    assert!(err.contains("cannot load ONNX Runtime"), "{err}");
    assert!(
        err.contains("--ort-lib: /nonexistent/libonnxruntime.so.1.31.1 (no such file)"),
        "{err}"
    );
    assert!(err.contains("scripts/setup.sh"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn file_that_is_not_a_library() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = dir.path().join("libonnxruntime.so.1.31.1");
    std::fs::write(&fake, b"this is not an ELF file").expect("write");
    let (ok, err) = run_with_ort_lib(&fake);
    assert!(!ok);
    assert!(
        err.contains("cannot load ONNX Runtime") && err.contains("failed to load from"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn library_without_the_ort_api() {
    // A real shared library that is not ONNX Runtime.
    let libm = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
    ]
    .iter()
    .map(std::path::Path::new)
    .find(|p| p.exists());
    let Some(libm) = libm else {
        eprintln!("skipped: no libm.so.6 found");
        return;
    };
    let (ok, err) = run_with_ort_lib(libm);
    assert!(!ok);
    assert!(err.contains("does not export `OrtGetApiBase`"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn search_order_puts_explicit_then_env_first() {
    let c = lorafuse::runtime::candidates(Some(std::path::Path::new("/x/lib.so")));
    assert_eq!(c.len(), 1, "an explicit path is final: {c:?}");
    // Without an explicit path the list ends with the system search path.
    let c = lorafuse::runtime::candidates(None);
    assert_eq!(c.last().map(|(s, _)| *s), Some("system library path"));
}

/// Set by [`candidates_in_child`]: the file where [`candidates_child`] writes its lists.
const CHILD_OUT: &str = "LORAFUSE_TEST_CANDIDATES_OUT";

/// The child half of the search-order test: `candidates` for the environment the parent set up
/// (a child process, so no other test thread sees that environment). A no-op in a normal run.
#[test]
fn candidates_child() {
    let Some(out) = std::env::var_os(CHILD_OUT) else {
        return;
    };
    let mut text = String::new();
    for (list, explicit) in [("none", None), ("explicit", Some(Path::new("/x/lib.so")))] {
        for (source, path) in lorafuse::runtime::candidates(explicit) {
            text += &format!("{list}\t{source}\t{}\n", path.display());
        }
    }
    std::fs::write(out, text).expect("write candidates");
}

type Candidates = Vec<(String, PathBuf)>;

/// (`candidates(None)`, `candidates(Some("/x/lib.so"))`) in a child with `envs` added.
fn candidates_in_child(envs: &[(&str, std::ffi::OsString)]) -> (Candidates, Candidates) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("candidates.tsv");
    let out = Command::new(std::env::current_exe().expect("current_exe"))
        .args(["--exact", "candidates_child", "--test-threads=1"])
        .env(CHILD_OUT, &file)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run child");
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&file).expect("child wrote no candidates");
    let (mut none, mut explicit) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let mut f = line.splitn(3, '\t');
        let (list, source, path) = (f.next(), f.next(), f.next());
        let entry = (
            source.expect("source").to_string(),
            PathBuf::from(path.expect("path")),
        );
        match list {
            Some("none") => none.push(entry),
            _ => explicit.push(entry),
        }
    }
    (none, explicit)
}

#[test]
#[cfg(unix)]
fn search_order_with_every_source() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let touch = |p: &Path| {
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, b"").expect("write");
    };
    // ORT_DYLIB_PATH need not exist to be listed (it is tried, and fails, at load time).
    let env_lib = tmp.path().join("env/libonnxruntime.so.1.31.1");
    // VIRTUAL_ENV: a wheel with the versioned library and a shorter link; versioned first.
    let venv = tmp.path().join("venv");
    let venv_capi = venv.join("lib/python3.11/site-packages/onnxruntime/capi");
    let venv_libs = [
        venv_capi.join("libonnxruntime.so.1.31.1"),
        venv_capi.join("libonnxruntime.so"),
    ];
    venv_libs.iter().for_each(|p| touch(p));
    // python3: a stand-in first on PATH that reports its own onnxruntime/capi folder.
    let py_lib = tmp
        .path()
        .join("py/onnxruntime/capi/libonnxruntime.so.1.31.1");
    touch(&py_lib);
    let python3 = tmp.path().join("bin/python3");
    touch(&python3);
    let script = format!(
        "#!/bin/sh\necho '{}'\n",
        py_lib.parent().expect("capi").display()
    );
    std::fs::write(&python3, script).expect("write python3");
    std::fs::set_permissions(&python3, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut path = std::ffi::OsString::from(tmp.path().join("bin"));
    if let Some(p) = std::env::var_os("PATH") {
        path.push(":");
        path.push(p);
    }

    let (got, explicit) = candidates_in_child(&[
        ("ORT_DYLIB_PATH", env_lib.clone().into()),
        ("VIRTUAL_ENV", venv.into()),
        ("PATH", path),
    ]);

    // The project .venv depends on this checkout (scripts/setup.sh): take its entries as found,
    // but they must sit together right after ORT_DYLIB_PATH, the build-time one first.
    let project: Candidates = got
        .iter()
        .filter(|(s, _)| s == "project .venv")
        .cloned()
        .collect();
    if let Some(lib) = option_env!("LORAFUSE_ORT_LIB") {
        assert_eq!(project.first().map(|e| e.1.as_path()), Some(Path::new(lib)));
    }
    let entry = |s: &str, p: &Path| (s.to_string(), p.to_path_buf());
    let mut want = vec![entry("ORT_DYLIB_PATH", &env_lib)];
    want.extend(project);
    want.extend(
        venv_libs
            .iter()
            .map(|p| entry("active Python (VIRTUAL_ENV)", p)),
    );
    want.push(entry("active Python (python3)", &py_lib));
    want.push(entry("system library path", Path::new("libonnxruntime.so")));
    want.push(entry(
        "system library path",
        Path::new("libonnxruntime.so.1"),
    ));
    assert_eq!(got, want);
    // An explicit path still overrides everything, ORT_DYLIB_PATH included.
    assert_eq!(explicit, vec![entry("--ort-lib", Path::new("/x/lib.so"))]);
}

/// The ONNX Runtime library `lorafuse inspect` reports using, with `ORT_DYLIB_PATH` set or unset.
fn runtime_used(ort_dylib_path: Option<&Path>) -> Result<PathBuf, String> {
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/tiny/onnx/vae_decoder/model.onnx"
    );
    let mut cmd = lorafuse();
    cmd.env_remove("ORT_DYLIB_PATH");
    if let Some(p) = ort_dylib_path {
        cmd.env("ORT_DYLIB_PATH", p);
    }
    let out = cmd
        .args(["inspect", "--json", model])
        .output()
        .expect("run lorafuse");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    Ok(PathBuf::from(
        v["onnx_runtime"].as_str().expect("onnx_runtime"),
    ))
}

#[test]
#[cfg(unix)]
fn ort_dylib_path_is_tried_before_the_default() {
    let default = match runtime_used(None) {
        Ok(p) if p.is_absolute() => p,
        other => {
            eprintln!("skipped: the default search found no ONNX Runtime file: {other:?}");
            return;
        }
    };
    // The same wheel folder under another name: the binary must take it from ORT_DYLIB_PATH.
    let tmp = tempfile::tempdir().expect("tempdir");
    let capi = tmp.path().join("capi");
    std::os::unix::fs::symlink(default.parent().expect("folder"), &capi).expect("symlink");
    let via_env = capi.join(default.file_name().expect("file name"));
    assert_eq!(runtime_used(Some(&via_env)), Ok(via_env));
    // A broken ORT_DYLIB_PATH is not final (unlike --ort-lib): the search goes on.
    let bogus = tmp.path().join("missing/libonnxruntime.so.1.31.1");
    assert_eq!(runtime_used(Some(&bogus)), Ok(default));
}
