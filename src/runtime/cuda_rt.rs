//! The few CUDA runtime calls lorafuse makes itself (`cudaMemGetInfo`, `cudaMemcpy`), from the
//! `libcudart` that ONNX Runtime's CUDA provider already loaded (same soname: the same library and
//! the same primary context). Loaded on first use; `None`/an error where no CUDA runtime is found.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

use crate::{Error, Result};

type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;
type SetDevice = unsafe extern "C" fn(c_int) -> c_int;
type Memcpy = unsafe extern "C" fn(*mut c_void, *const c_void, usize, c_int) -> c_int;
type DeviceSynchronize = unsafe extern "C" fn() -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

/// `cudaMemcpyDefault`: the direction is inferred from the pointers (unified addressing).
const MEMCPY_DEFAULT: c_int = 4;

struct Runtime {
    _lib: libloading::Library,
    mem_get_info: MemGetInfo,
    set_device: SetDevice,
    memcpy: Memcpy,
    synchronize: DeviceSynchronize,
    error_string: GetErrorString,
}

fn runtime() -> Option<&'static Runtime> {
    static RT: OnceLock<Option<Runtime>> = OnceLock::new();
    RT.get_or_init(|| {
        ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
            .iter()
            .find_map(|name| {
                // SAFETY: loading the CUDA runtime runs no initialiser with preconditions; each
                // symbol has the signature of the CUDA runtime API function of its name.
                unsafe {
                    let lib = libloading::Library::new(*name).ok()?;
                    Some(Runtime {
                        mem_get_info: *lib.get::<MemGetInfo>(b"cudaMemGetInfo\0").ok()?,
                        set_device: *lib.get::<SetDevice>(b"cudaSetDevice\0").ok()?,
                        memcpy: *lib.get::<Memcpy>(b"cudaMemcpy\0").ok()?,
                        synchronize: *lib
                            .get::<DeviceSynchronize>(b"cudaDeviceSynchronize\0")
                            .ok()?,
                        error_string: *lib.get::<GetErrorString>(b"cudaGetErrorString\0").ok()?,
                        _lib: lib,
                    })
                }
            })
    })
    .as_ref()
}

fn check(rt: &Runtime, rc: c_int, what: &str) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: cudaGetErrorString returns a static NUL-terminated string for any code.
    let msg = unsafe { CStr::from_ptr((rt.error_string)(rc)) }.to_string_lossy();
    Err(Error::OrtLoad(format!("{what}: CUDA error {rc}: {msg}")))
}

/// The current device's free and total memory in bytes (`cudaMemGetInfo`).
pub fn mem_get_info() -> Option<(usize, usize)> {
    let rt = runtime()?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: two valid out-pointers.
    let rc = unsafe { (rt.mem_get_info)(&mut free, &mut total) };
    (rc == 0).then_some((free, total))
}

/// Copy `bytes` bytes from `src` to `dst` (host or device memory of CUDA device `device_id`, in
/// either direction) and wait until the device is idle, so the copy is complete whichever stream
/// reads or wrote the device side.
///
/// # Safety
/// `src` and `dst` must be valid for `bytes` bytes (host memory, or device memory of `device_id`)
/// and must not overlap; no kernel may be using them.
pub unsafe fn copy(
    dst: *mut c_void,
    src: *const c_void,
    bytes: usize,
    device_id: i32,
) -> Result<()> {
    let rt = runtime().ok_or_else(|| Error::OrtLoad("no CUDA runtime (libcudart) found".into()))?;
    // SAFETY: plain runtime calls; the caller vouches for the pointers.
    unsafe {
        check(rt, (rt.set_device)(device_id), "cudaSetDevice")?;
        check(
            rt,
            (rt.memcpy)(dst, src, bytes, MEMCPY_DEFAULT),
            "cudaMemcpy",
        )?;
        check(rt, (rt.synchronize)(), "cudaDeviceSynchronize")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_copy_without_a_cuda_device_is_an_error_not_a_crash() {
        let src = [1u8, 2, 3, 4];
        let mut dst = [0u8; 4];
        // SAFETY: two distinct 4-byte host buffers.
        let r = unsafe { super::copy(dst.as_mut_ptr().cast(), src.as_ptr().cast(), 4, 0) };
        // on a machine with a GPU the host-to-host copy simply happens
        match r {
            Ok(()) => assert_eq!(dst, src),
            Err(e) => assert!(e.to_string().contains("CUDA"), "{e}"),
        }
    }
}
