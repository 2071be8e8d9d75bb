//! lorafuse's own CUDA kernels for training (issue 11), compiled with NVRTC for the device in use
//! and run as libtorch autograd functions by `fused.cpp` (built by build.rs with the CUDA shim,
//! cfg `lorafuse_cuda_graph`):
//! - [`group_norm`]: GroupNorm, optionally fused with the SiLU after it, on channels-last
//!   activations (`kernels/group_norm_nhwc.cu`): ATen's CUDA GroupNorm is NCHW-only and transposes
//!   a channels-last input there and back, which ate most of what channels-last convolutions save.
//!   Forward and input gradient; the affine parameters are frozen.
//! - [`geglu`]: GEGLU's `hidden * gelu(gate)` on the projection's output (`kernels/geglu.cu`), one
//!   kernel each way, keeping only the projection for the backward pass (`LORAFUSE_FUSED_GEGLU=0`
//!   turns it off, for comparisons).
//! - [`lora_linear`]: a linear layer with its LoRA as one autograd node whose input gradient
//!   accumulates the LoRA's part inside the GEMM that adds it (no separate add over the
//!   activations' gradient); ATen products only, so it runs on the CPU too
//!   (`LORAFUSE_LORA_LINEAR=0` turns it off, for comparisons).
//!
//! Each returns `None` where its kernels do not apply (a CPU tensor, a layout or dtype they do not
//! take, a build without the shim, `LORAFUSE_FUSED_GROUP_NORM=0`), and the caller runs ATen's
//! operations. If the kernels fail once (no NVRTC, an architecture it cannot compile for), they
//! stay off for the process and [`take_failure`] hands the reason to the trainer to report.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// The kernel source (shared helpers first), NUL-terminated for the shim.
#[cfg_attr(not(lorafuse_cuda_graph), allow(dead_code))]
const SOURCE: &str = concat!(
    include_str!("kernels/common.cuh"),
    include_str!("kernels/group_norm_nhwc.cu"),
    include_str!("kernels/geglu.cu"),
    "\0"
);

#[cfg(lorafuse_cuda_graph)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_void};
    unsafe extern "C" {
        pub fn lf_gn_nhwc(
            src: *const c_char,
            x: *const c_void,
            gamma: *const c_void,
            beta: *const c_void,
            groups: i64,
            eps: f64,
            silu: c_int,
            out: *mut *mut c_void,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn lf_geglu(
            src: *const c_char,
            hg: *const c_void,
            out: *mut *mut c_void,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn lf_lora_linear(
            x: *const c_void,
            w: *const c_void,
            bias: *const c_void,
            a: *const c_void,
            b: *const c_void,
            out: *mut *mut c_void,
            err: *mut *mut c_char,
        ) -> c_int;
        pub fn lf_sdp_backend(which: c_int, err: *mut *mut c_char) -> c_int;
        pub fn lf_gn_compile_check(
            src: *const c_char,
            arch: *const c_char,
            dtype: *const c_char,
            bytes: *mut usize,
            err: *mut *mut c_char,
        ) -> c_int;
    }
}

const UNKNOWN: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
static FAILURE: Mutex<Option<String>> = Mutex::new(None);

/// The environment switch for measuring with and without the kernels (`docs/benchmarks.md`).
pub const ENV: &str = "LORAFUSE_FUSED_GROUP_NORM";

fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on = cfg!(lorafuse_cuda_graph) && std::env::var(ENV).map_or(true, |v| v != "0");
            STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
    }
}

/// Whether `x` is a 4-D tensor laid out channels-last (NHWC), with torch's rule that dimensions of
/// size 1 may have any stride (c10's `is_channels_last_contiguous`).
pub fn is_channels_last(x: &Tensor) -> bool {
    let (size, stride) = (x.size(), x.stride());
    if size.len() != 4 {
        return false;
    }
    let mut expected = 1;
    for d in [1, 3, 2, 0] {
        if size[d] != 1 {
            if stride[d] != expected {
                return false;
            }
            expected *= size[d];
        }
    }
    true
}

fn applies(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    let k = x.kind();
    x.device().is_cuda()
        && matches!(k, Kind::Float | Kind::BFloat16 | Kind::Half)
        && [weight.kind(), bias.kind()]
            .iter()
            .all(|&w| w == k || w == Kind::Float)
        && !weight.requires_grad()
        && !bias.requires_grad()
        && is_channels_last(x)
        && enabled()
}

/// `GroupNorm(groups, eps)` with `weight`, `bias` on `x` (then SiLU when `silu`) by the fused
/// channels-last kernels, differentiable in `x`; `None` where they do not apply (see the module
/// documentation), and the caller runs ATen's.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: i64,
    eps: f64,
    silu: bool,
) -> Option<Tensor> {
    if !applies(x, weight, bias) {
        return None;
    }
    #[cfg(lorafuse_cuda_graph)]
    let y = call_kernel("fused GroupNorm", |out, err| {
        // SAFETY: the tensors outlive the call (autograd keeps its own references); SOURCE is
        // NUL-terminated; failures come back through `err`.
        unsafe {
            ffi::lf_gn_nhwc(
                SOURCE.as_ptr().cast(),
                x.as_ptr().cast(),
                weight.as_ptr().cast(),
                bias.as_ptr().cast(),
                groups,
                eps,
                i32::from(silu),
                out,
                err,
            )
        }
    });
    #[cfg(not(lorafuse_cuda_graph))]
    let y = {
        let _ = (groups, eps, silu);
        None
    };
    y
}

/// The switch for [`geglu`]: on unless `0` (docs/benchmarks.md: +3 % at the tutorial recipe, 0.4 GiB
/// fewer saved activations, on an H100).
pub const GEGLU_ENV: &str = "LORAFUSE_FUSED_GEGLU";

fn geglu_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var(GEGLU_ENV).as_deref() != Ok("0"))
}

/// Whether [`geglu`] would run its kernel for activations like `x` (device, dtype, switches):
/// callers decide up front whether to compute the projection whole.
pub fn geglu_applies(x: &Tensor) -> bool {
    x.device().is_cuda()
        && matches!(x.kind(), Kind::Float | Kind::BFloat16 | Kind::Half)
        && geglu_enabled()
        && enabled()
}

/// GEGLU's `hidden * gelu(gate)` (exact GELU) of `hg = [..., 2 * inner]` (`hidden | gate`, the
/// projection's output), differentiable in `hg`; `None` where the kernel does not apply
/// ([`geglu_applies`], a non-contiguous tensor or an odd last dimension) or failed.
pub fn geglu(hg: &Tensor) -> Option<Tensor> {
    let last = *hg.size().last()?;
    if !(geglu_applies(hg) && last % 2 == 0 && hg.is_contiguous()) {
        return None;
    }
    #[cfg(lorafuse_cuda_graph)]
    let y = call_kernel("fused GEGLU", |out, err| {
        // SAFETY: `hg` outlives the call (autograd keeps its own reference); SOURCE is
        // NUL-terminated; failures come back through `err`.
        unsafe { ffi::lf_geglu(SOURCE.as_ptr().cast(), hg.as_ptr().cast(), out, err) }
    });
    #[cfg(not(lorafuse_cuda_graph))]
    let y = None;
    y
}

/// The switch for [`lora_linear`]: on unless `0`.
pub const LORA_LINEAR_ENV: &str = "LORAFUSE_LORA_LINEAR";
static LORA_LINEAR: AtomicU8 = AtomicU8::new(UNKNOWN);

/// `x W^T + bias + (x A^T) B^T` for `x [M, in]`, frozen `w [out, in]` and `bias [out]`, `a [r, in]`
/// and `b [out, r]` (the LoRA's scaling already in `b`), differentiable in `x`, `a` and `b`, as
/// one autograd node (fused.cpp `LoraLinearFn`): the backward adds `(dy B) A` into `dy W` with
/// the GEMM's `beta = 1`, where the composed form writes it out and adds it in a pass of its own.
/// `None` where it does not apply (off, no shim, a base weight that needs a gradient) or failed
/// (then it stays off for the process, and [`take_failure`] says why); the caller composes it.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
) -> Option<Tensor> {
    let on = match LORA_LINEAR.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let on =
                cfg!(lorafuse_cuda_graph) && std::env::var(LORA_LINEAR_ENV).as_deref() != Ok("0");
            LORA_LINEAR.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
    };
    if !on || w.requires_grad() || bias.is_some_and(Tensor::requires_grad) {
        return None;
    }
    #[cfg(lorafuse_cuda_graph)]
    let y = call_entry("LoRA linear", &LORA_LINEAR, |out, err| {
        let bias = bias.map_or(std::ptr::null(), |t| t.as_ptr().cast());
        // SAFETY: the tensors outlive the call (autograd keeps its own references); a null
        // bias means none; failures come back through `err`.
        unsafe {
            ffi::lf_lora_linear(
                x.as_ptr().cast(),
                w.as_ptr().cast(),
                bias,
                a.as_ptr().cast(),
                b.as_ptr().cast(),
                out,
                err,
            )
        }
    });
    #[cfg(not(lorafuse_cuda_graph))]
    let y = {
        let _ = (x, a, b);
        None
    };
    y
}

#[cfg(lorafuse_cuda_graph)]
/// Run one kernel entry that returns a tensor through `out`; on failure turn the kernels off
/// for the process, keep the first reason for [`take_failure`], and return `None`.
fn call_kernel(
    what: &str,
    f: impl FnOnce(*mut *mut std::os::raw::c_void, *mut *mut std::os::raw::c_char) -> i32,
) -> Option<Tensor> {
    call_entry(what, &STATE, f)
}

#[cfg(lorafuse_cuda_graph)]
/// Run one shim entry that returns a tensor through `out`; on failure set `switch` off for the
/// process, keep the first reason for [`take_failure`], and return `None`.
fn call_entry(
    what: &str,
    switch: &AtomicU8,
    f: impl FnOnce(*mut *mut std::os::raw::c_void, *mut *mut std::os::raw::c_char) -> i32,
) -> Option<Tensor> {
    let mut out: *mut std::os::raw::c_void = std::ptr::null_mut();
    let r = crate::train::shim::call(what, |err| f(&mut out, err)).and_then(|()| {
        if out.is_null() {
            Err(Error::Internal(format!("{what} returned no tensor")))
        } else {
            // SAFETY: the shim returns a heap-allocated at::Tensor (`new at::Tensor`), which
            // tch's Tensor owns and frees with at_free's delete.
            Ok(unsafe { Tensor::from_ptr(out.cast()) })
        }
    });
    match r {
        Ok(t) => Some(t),
        Err(e) => {
            switch.store(OFF, Ordering::Relaxed);
            if let Ok(mut f) = FAILURE.lock() {
                f.get_or_insert_with(|| e.to_string());
            }
            None
        }
    }
}

/// Why a fused operation turned itself off, once (for the trainer's warning).
pub fn take_failure() -> Option<String> {
    FAILURE.lock().ok().and_then(|mut f| f.take())
}

/// The diagnostics switch for [`sdpa_backend_from_env`].
pub const SDPA_ENV: &str = "LORAFUSE_SDPA";

/// `LORAFUSE_SDPA=flash|efficient|cudnn`: restrict `scaled_dot_product_attention` to that fused
/// backend (plus the math fallback), for comparing them on the device; unset or `default` leaves
/// torch's choice. `Ok(None)` when nothing was changed, `Ok(Some(name))` when it was.
pub fn sdpa_backend_from_env() -> Result<Option<String>> {
    let Ok(v) = std::env::var(SDPA_ENV) else {
        return Ok(None);
    };
    let which = match v.as_str() {
        "" | "default" => return Ok(None),
        "flash" => 1,
        "efficient" => 2,
        "cudnn" => 3,
        other => {
            return Err(Error::InvalidArgument(format!(
                "{SDPA_ENV}={other:?}: expected flash, efficient, cudnn or default"
            )));
        }
    };
    #[cfg(lorafuse_cuda_graph)]
    {
        crate::train::shim::call("SDPA backend", |err| {
            // SAFETY: a plain integer; failures come back through `err`.
            unsafe { ffi::lf_sdp_backend(which, err) }
        })?;
        Ok(Some(v))
    }
    #[cfg(not(lorafuse_cuda_graph))]
    {
        let _ = which;
        Err(Error::InvalidArgument(format!(
            "{SDPA_ENV}: this build has no CUDA shim"
        )))
    }
}

/// Compile the kernels with NVRTC for `arch` (e.g. `sm_90`) and activation dtype `f32`, `bf16` or
/// `f16` without a GPU: the size of the binary. For tests and diagnostics.
pub fn compile_check(arch: &str, dtype: &str) -> Result<usize> {
    #[cfg(lorafuse_cuda_graph)]
    {
        let c = |s: &str| {
            std::ffi::CString::new(s)
                .map_err(|_| Error::InvalidArgument(format!("{s:?} holds a NUL byte")))
        };
        let (arch, dtype) = (c(arch)?, c(dtype)?);
        let mut bytes = 0usize;
        crate::train::shim::call("fused GroupNorm compile", |err| {
            // SAFETY: NUL-terminated strings; failures come back through `err`.
            unsafe {
                ffi::lf_gn_compile_check(
                    SOURCE.as_ptr().cast(),
                    arch.as_ptr(),
                    dtype.as_ptr(),
                    &mut bytes,
                    err,
                )
            }
        })?;
        Ok(bytes)
    }
    #[cfg(not(lorafuse_cuda_graph))]
    {
        let _ = (arch, dtype);
        Err(Error::InvalidArgument(
            "this build has no CUDA shim (fused GroupNorm)".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_last_follows_torchs_rule() {
        let x = Tensor::zeros([2, 8, 4, 4], (Kind::Float, tch::Device::Cpu));
        assert!(!is_channels_last(&x));
        let cl = x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
        assert!(is_channels_last(&cl));
        // a 1x1 image is both
        let px = Tensor::zeros([2, 8, 1, 1], (Kind::Float, tch::Device::Cpu));
        assert!(is_channels_last(&px));
        assert!(!is_channels_last(&Tensor::zeros(
            [8, 4],
            (Kind::Float, tch::Device::Cpu)
        )));
    }

    #[test]
    fn cpu_tensors_take_atens_path() {
        let x = Tensor::zeros([1, 4, 2, 2], (Kind::Float, tch::Device::Cpu));
        let w = Tensor::ones([4], (Kind::Float, tch::Device::Cpu));
        assert!(group_norm(&x, &w, &w, 2, 1e-5, true).is_none());
    }

    /// The LoRA linear node gives the composed products' output and gradients (x, A, B; none
    /// for the frozen weight), in f32 and bf16, with and without a bias, on the CPU.
    #[test]
    #[cfg(lorafuse_cuda_graph)]
    fn lora_linear_equals_the_composed_products() {
        let wave = |shape: &[i64], phase: f64| {
            let n: i64 = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| (0.5 * (i as f64 * 0.731 + phase).sin()) as f32)
                .collect();
            Tensor::from_slice(&v).reshape(shape)
        };
        let (m, inp, out, r) = (7, 12, 10, 3);
        for kind in [Kind::Float, Kind::BFloat16] {
            for with_bias in [true, false] {
                let w = wave(&[out, inp], 0.1).to_kind(kind);
                let bias = with_bias.then(|| wave(&[out], 0.2).to_kind(kind));
                let leaf = |t: Tensor| t.to_kind(kind).set_requires_grad(true);
                let (x1, a1, b1) = (
                    leaf(wave(&[m, inp], 0.3)),
                    leaf(wave(&[r, inp], 0.4)),
                    leaf(wave(&[out, r], 0.5)),
                );
                let (x2, a2, b2) = (
                    leaf(wave(&[m, inp], 0.3)),
                    leaf(wave(&[r, inp], 0.4)),
                    leaf(wave(&[out, r], 0.5)),
                );
                let dy = wave(&[m, out], 0.6).to_kind(kind);
                let y1 = lora_linear(&x1, &w, bias.as_ref(), &a1, &b1)
                    .unwrap_or_else(|| panic!("does not apply: {:?}", take_failure()));
                let y2 = x2.linear(&w, bias.as_ref())
                    + x2.linear::<Tensor>(&a2, None).linear::<Tensor>(&b2, None);
                let g1 = Tensor::run_backward(
                    &[(&y1 * &dy).sum(Kind::Float)],
                    &[&x1, &a1, &b1],
                    false,
                    false,
                );
                let g2 = Tensor::run_backward(
                    &[(&y2 * &dy).sum(Kind::Float)],
                    &[&x2, &a2, &b2],
                    false,
                    false,
                );
                let tol = if kind == Kind::Float { 1e-6 } else { 2e-2 };
                for (what, p, q) in [
                    ("y", &y1, &y2),
                    ("dx", &g1[0], &g2[0]),
                    ("dA", &g1[1], &g2[1]),
                    ("dB", &g1[2], &g2[2]),
                ] {
                    let d = (p.to_kind(Kind::Double) - q.to_kind(Kind::Double))
                        .abs()
                        .max()
                        .double_value(&[]);
                    let s = q.to_kind(Kind::Double).abs().max().double_value(&[]);
                    assert!(
                        d <= tol * s,
                        "{kind:?} bias {with_bias}: {what} differs by {d} (max {s})"
                    );
                }
            }
        }
        // a base weight that needs a gradient is not this node's job
        let w = Tensor::ones([2, 2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let t = Tensor::ones([2, 2], (Kind::Float, tch::Device::Cpu));
        assert!(lora_linear(&t, &w, None, &t, &t).is_none());
    }

    /// NVRTC compiles the kernels for Hopper and Ampere in every dtype, on any machine: what the
    /// GPU will run is at least valid CUDA (the numbers are checked on the device:
    /// tests/fused_cuda.rs).
    #[test]
    #[cfg(lorafuse_cuda_graph)]
    fn nvrtc_compiles_the_kernels() {
        for arch in ["sm_80", "sm_90"] {
            for dtype in ["f32", "bf16", "f16"] {
                let bytes =
                    compile_check(arch, dtype).unwrap_or_else(|e| panic!("{arch} {dtype}: {e}"));
                assert!(bytes > 1000, "{arch} {dtype}: {bytes} bytes");
            }
        }
    }
}
