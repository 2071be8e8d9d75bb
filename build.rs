//! With the `train` feature: make libtorch's CUDA backend load and let binaries find libtorch.
//!
//! torch-sys links `torch_cuda` when the libtorch it found has it, but the linker's default
//! `--as-needed` drops it (nothing references its symbols directly), and then
//! `tch::Cuda::is_available()` is silently false. We force it in with
//! `--no-as-needed`, and add an rpath to libtorch's folder so binaries run without LD_LIBRARY_PATH.
//! The default build and the plugin (no `train`) never see libtorch.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_LIB");
    if std::env::var_os("CARGO_FEATURE_TRAIN").is_none() {
        return;
    }
    let lib_dir = std::env::var_os("LIBTORCH_LIB")
        .map(|l| PathBuf::from(l).join("lib"))
        .or_else(|| std::env::var_os("LIBTORCH").map(|l| PathBuf::from(l).join("lib")));
    let Some(lib_dir) = lib_dir else {
        println!(
            "cargo:warning=LIBTORCH is not set: run scripts/setup.sh --train (binaries will need LD_LIBRARY_PATH to libtorch)"
        );
        return;
    };
    // Every linked target (the CLI, the lib's unit-test harness, integration tests and, with
    // `train`, the cdylib too, which then links tch). The plain `rustc-link-arg` covers them all;
    // the per-kind variants miss the lib's unit tests and cargo rejects -examples/-benches
    // without such targets.
    let cuda = lib_dir.join("libtorch_cuda.so").exists();
    if cuda {
        println!("cargo:rustc-link-search=native={}", lib_dir.display());
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    if cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
