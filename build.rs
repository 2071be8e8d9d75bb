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
    println!("cargo::rustc-check-cfg=cfg(lorafuse_cuda_graph)");
    println!("cargo::rustc-check-cfg=cfg(lorafuse_torch_profiler)");
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
        cuda_graph_shim(&lib_dir);
    }
    torch_profiler_shim(&lib_dir);
}

/// `src/train/cuda_graph.cpp` (libtorch's `at::cuda::CUDAGraph`, which tch does not wrap) and
/// `src/train/fused.cpp` (channels-last GroupNorm kernels compiled at run time by NVRTC),
/// compiled against the headers of the same torch wheel and CUDA 13's runtime headers (PyPI
/// `nvidia-cuda-runtime`, a torch dependency, plus `nvidia-cuda-crt` for `crt/`, both installed by
/// `scripts/setup.sh --train`; or CUDA_HOME). Without them the build goes on without the shim and
/// `train::cuda_graph` says so at run time (cfg `lorafuse_cuda_graph`).
fn cuda_graph_shim(lib_dir: &std::path::Path) {
    println!("cargo:rerun-if-changed=src/train/cuda_graph.cpp");
    println!("cargo:rerun-if-changed=src/train/fused.cpp");
    println!("cargo:rerun-if-changed=src/train/shim.h");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let Some(torch) = lib_dir.parent() else {
        return;
    };
    let site = torch.parent().map(PathBuf::from).unwrap_or_default();
    let cuda_include = [
        site.join("nvidia/cu13/include"),
        site.join("nvidia/cuda_runtime/include"),
    ]
    .into_iter()
    .chain(std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include")))
    .chain([PathBuf::from("/usr/local/cuda/include")])
    .find(|d| d.join("cuda_runtime_api.h").is_file() && d.join("crt/host_config.h").is_file());
    let header = torch.join("include/ATen/cuda/CUDAGraph.h");
    let (Some(cuda_include), true) = (cuda_include, header.is_file()) else {
        println!(
            "cargo:warning=CUDA graph shim not built: no CUDA runtime headers or ATen/cuda/CUDAGraph.h"
        );
        return;
    };
    // c10's inline CUDA helpers (stream guards, events) call the CUDA runtime directly
    let Some(cudart) = [
        site.join("nvidia/cu13/lib"),
        site.join("nvidia/cuda_runtime/lib"),
    ]
    .into_iter()
    .chain(std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("lib64")))
    .find_map(|d| {
        ["libcudart.so.13", "libcudart.so.12"]
            .into_iter()
            .find(|n| d.join(n).is_file())
            .map(|n| (d.clone(), n))
    }) else {
        println!("cargo:warning=CUDA graph shim not linked: no libcudart.so.13/12 found");
        return;
    };
    let built = cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("src/train/cuda_graph.cpp")
        .file("src/train/fused.cpp")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .include(cuda_include)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .try_compile("lorafuse_cuda_graph");
    if let Err(e) = built {
        println!("cargo:warning=CUDA graph shim not built: {e}");
        return;
    }
    println!("cargo:rustc-link-search=native={}", cudart.0.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", cudart.0.display());
    println!("cargo:rustc-link-lib=dylib:+verbatim={}", cudart.1);
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-cfg=lorafuse_cuda_graph");
}

/// `src/train/torch_profiler.cpp` (PyTorch's profiler, `torch::autograd::profiler`, which tch does
/// not wrap) for `--torch_profile`, compiled against the torch wheel's headers (CPU or CUDA
/// libtorch: the profiler lives in libtorch_cpu). Without them `train::torch_profiler` says so at
/// run time (cfg `lorafuse_torch_profiler`).
fn torch_profiler_shim(lib_dir: &std::path::Path) {
    println!("cargo:rerun-if-changed=src/train/torch_profiler.cpp");
    println!("cargo:rerun-if-changed=src/train/shim.h");
    let Some(torch) = lib_dir.parent() else {
        return;
    };
    if !torch
        .join("include/torch/csrc/autograd/profiler_kineto.h")
        .is_file()
    {
        println!("cargo:warning=torch profiler shim not built: no profiler_kineto.h");
        return;
    }
    let built = cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("src/train/torch_profiler.cpp")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .try_compile("lorafuse_torch_profiler");
    if let Err(e) = built {
        println!("cargo:warning=torch profiler shim not built: {e}");
        return;
    }
    println!("cargo:rustc-cfg=lorafuse_torch_profiler");
}
