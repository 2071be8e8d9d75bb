//! Finding ONNX Runtime: a missing or broken library gives an error that says what was tried and
//! how to fix it, never a panic.

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
