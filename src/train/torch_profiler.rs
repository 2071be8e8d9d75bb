//! PyTorch's profiler around the `--profile_steps` steps (`--torch_profile FILE`): ATen operators
//! on the host and, on CUDA, every kernel and copy (CUPTI), written as a Chrome trace
//! (chrome://tracing, Perfetto; `scripts/torch_trace_summary.py` sums the kernels by kind). A safe
//! wrapper over `torch_profiler.cpp` (what `torch.profiler.profile` does), built by build.rs with
//! the `train` feature; without it [`Recording::start`] is an error saying so.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

#[cfg(lorafuse_torch_profiler)]
mod ffi {
    use std::os::raw::{c_char, c_int};
    unsafe extern "C" {
        pub fn lf_prof_start(cuda: c_int, err: *mut *mut c_char) -> c_int;
        pub fn lf_prof_stop(path: *const c_char, err: *mut *mut c_char) -> c_int;
    }
}

#[cfg(lorafuse_torch_profiler)]
fn call(what: &str, f: impl FnOnce(*mut *mut std::os::raw::c_char) -> i32) -> Result<()> {
    crate::train::shim::call(&format!("torch profiler {what}"), f)
}

/// A running profiler; [`Recording::finish`] writes the trace. Dropped unfinished, it stops
/// without writing.
pub struct Recording {
    path: PathBuf,
    running: bool,
}

impl Recording {
    /// Start recording (CUDA activity too when `cuda`); the trace will go to `path`.
    pub fn start(path: &Path, cuda: bool) -> Result<Self> {
        #[cfg(lorafuse_torch_profiler)]
        {
            // SAFETY: the shim reports failures through `err`.
            call("start", |err| unsafe {
                ffi::lf_prof_start(i32::from(cuda), err)
            })?;
            Ok(Self {
                path: path.to_path_buf(),
                running: true,
            })
        }
        #[cfg(not(lorafuse_torch_profiler))]
        {
            let _ = (path, cuda);
            Err(Error::InvalidArgument(
                "--torch_profile: this build has no torch profiler (libtorch's headers were not found at build time)"
                    .into(),
            ))
        }
    }

    /// Stop recording and write the trace; returns its path.
    pub fn finish(mut self) -> Result<PathBuf> {
        self.running = false;
        #[cfg(lorafuse_torch_profiler)]
        {
            use std::os::unix::ffi::OsStrExt;
            let c = std::ffi::CString::new(self.path.as_os_str().as_bytes()).map_err(|_| {
                Error::InvalidArgument(format!(
                    "--torch_profile {}: the path holds a NUL byte",
                    self.path.display()
                ))
            })?;
            // SAFETY: a NUL-terminated path; the shim reports failures through `err`.
            call("stop", |err| unsafe { ffi::lf_prof_stop(c.as_ptr(), err) })?;
            if !self.path.is_file() {
                return Err(Error::io(
                    &self.path,
                    std::io::Error::other("the profiler wrote no trace"),
                ));
            }
        }
        Ok(self.path.clone())
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        #[cfg(lorafuse_torch_profiler)]
        if self.running {
            // stop; the unfinished trace goes to a temporary file that is removed
            let tmp = std::env::temp_dir()
                .join(format!("lorafuse-unfinished-{}.json", std::process::id()));
            if let Ok(c) = std::ffi::CString::new(tmp.to_string_lossy().as_bytes()) {
                // SAFETY: as in `finish`; a failure here is ignored (nothing to report it to).
                let _ = call("stop", |err| unsafe { ffi::lf_prof_stop(c.as_ptr(), err) });
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }
}
