//! The Rust side of the C shims over libtorch (`cuda_graph.cpp`, `torch_profiler.cpp`, sharing
//! `shim.h`): an entry returns 0, or non-zero with the C++ exception's text in a malloc'd string.

use std::os::raw::c_char;

use crate::{Error, Result};

/// Run one shim entry `f` (it gets the error out-pointer); its failure as an error naming `what`.
#[cfg_attr(
    not(any(lorafuse_cuda_graph, lorafuse_torch_profiler)),
    allow(dead_code)
)]
pub(crate) fn call(what: &str, f: impl FnOnce(*mut *mut c_char) -> i32) -> Result<()> {
    let mut err: *mut c_char = std::ptr::null_mut();
    if f(&mut err) == 0 {
        return Ok(());
    }
    let msg = if err.is_null() {
        "no message".to_string()
    } else {
        // SAFETY: the shim returns a NUL-terminated copy of the exception's text made by malloc.
        let s = unsafe { std::ffi::CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: malloc'd by the shim (shim.h's copy_message), freed once here.
        unsafe { libc::free(err.cast()) };
        s
    };
    Err(Error::Internal(format!("{what}: {msg}")))
}
