//! CUDA graphs for the training step (issue 11's groundwork): capture a sequence of libtorch
//! kernels once, replay it with one launch. A safe wrapper over `cuda_graph.cpp` (libtorch's
//! `at::cuda::CUDAGraph`, as `torch.cuda.graph` uses it in torch/cuda/graphs.py), built by
//! build.rs with the `train` feature and a CUDA libtorch.
//!
//! The rules are torch's: tensors a graph reads or writes keep their addresses (copy new inputs
//! into them before a replay), no host synchronisation and no CPU tensors inside a capture, and
//! warm-up iterations run eagerly on a side stream before capturing. [`CudaGraph::new`] fails
//! with a clear error where CUDA is unavailable (a CPU build or machine), so callers run eagerly.

use crate::{Error, Result};

#[cfg(lorafuse_cuda_graph)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_void};
    unsafe extern "C" {
        pub fn lf_graph_new(err: *mut *mut c_char) -> *mut c_void;
        pub fn lf_graph_capture_begin(g: *mut c_void, err: *mut *mut c_char) -> c_int;
        pub fn lf_graph_capture_end(g: *mut c_void, err: *mut *mut c_char) -> c_int;
        pub fn lf_graph_replay(g: *mut c_void, err: *mut *mut c_char) -> c_int;
        pub fn lf_graph_free(g: *mut c_void);
        pub fn lf_free_error(err: *mut c_char);
    }
}

/// A captured (or capturing) CUDA graph.
pub struct CudaGraph {
    #[cfg(lorafuse_cuda_graph)]
    handle: *mut std::os::raw::c_void,
    capturing: bool,
    captured: bool,
}

/// Whether this build has the shim and a CUDA device is present.
pub fn available() -> bool {
    cfg!(lorafuse_cuda_graph) && tch::Cuda::is_available()
}

#[cfg(lorafuse_cuda_graph)]
fn call(what: &str, f: impl FnOnce(*mut *mut std::os::raw::c_char) -> i32) -> Result<()> {
    let mut err: *mut std::os::raw::c_char = std::ptr::null_mut();
    if f(&mut err) == 0 {
        return Ok(());
    }
    let msg = if err.is_null() {
        "no message".to_string()
    } else {
        // SAFETY: the shim returns a NUL-terminated malloc'd copy of the exception's text.
        let s = unsafe { std::ffi::CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: allocated by the shim, freed once here.
        unsafe { ffi::lf_free_error(err) };
        s
    };
    Err(Error::Internal(format!("CUDA graph {what}: {msg}")))
}

impl CudaGraph {
    /// A new, empty graph; an error where CUDA graphs are unavailable.
    pub fn new() -> Result<Self> {
        if !available() {
            return Err(Error::InvalidArgument(
                "CUDA graphs need a CUDA device and a libtorch with CUDA (this build or machine has none)"
                    .into(),
            ));
        }
        #[cfg(lorafuse_cuda_graph)]
        {
            let mut handle = std::ptr::null_mut();
            // SAFETY: the shim allocates the graph or reports why not.
            call("create", |e| {
                handle = unsafe { ffi::lf_graph_new(e) };
                if handle.is_null() { -1 } else { 0 }
            })?;
            Ok(CudaGraph {
                handle,
                capturing: false,
                captured: false,
            })
        }
        #[cfg(not(lorafuse_cuda_graph))]
        unreachable!("available() is false without the shim")
    }

    /// Record the kernels `f` launches (on a side stream) into the graph; `f` runs once while
    /// recording, its work is not executed until [`replay`](Self::replay).
    pub fn capture<T>(&mut self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.capturing || self.captured {
            return Err(Error::Internal("CUDA graph captured twice".into()));
        }
        #[cfg(lorafuse_cuda_graph)]
        {
            let h = self.handle;
            // SAFETY: `h` is a live graph owned by self.
            call("capture_begin", |e| unsafe {
                ffi::lf_graph_capture_begin(h, e)
            })?;
            self.capturing = true;
            let out = f();
            // SAFETY: as above; ends the capture even when `f` failed.
            let end = call("capture_end", |e| unsafe {
                ffi::lf_graph_capture_end(h, e)
            });
            self.capturing = false;
            let out = out?;
            end?;
            self.captured = true;
            Ok(out)
        }
        #[cfg(not(lorafuse_cuda_graph))]
        {
            let _ = f;
            Err(Error::Internal("no CUDA graph shim in this build".into()))
        }
    }

    /// Launch the captured kernels once, on the current stream.
    pub fn replay(&mut self) -> Result<()> {
        if !self.captured {
            return Err(Error::Internal("CUDA graph replayed before capture".into()));
        }
        #[cfg(lorafuse_cuda_graph)]
        {
            let h = self.handle;
            // SAFETY: `h` is a live, captured graph owned by self.
            call("replay", |e| unsafe { ffi::lf_graph_replay(h, e) })
        }
        #[cfg(not(lorafuse_cuda_graph))]
        Err(Error::Internal("no CUDA graph shim in this build".into()))
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        #[cfg(lorafuse_cuda_graph)]
        // SAFETY: the handle came from lf_graph_new and is freed once.
        unsafe {
            ffi::lf_graph_free(self.handle)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_without_cuda_is_an_error_not_a_crash() {
        if available() {
            // on a GPU machine: a captured add replays onto the same buffers
            let x = tch::Tensor::ones([4], (tch::Kind::Float, tch::Device::Cuda(0)));
            let y = x.zeros_like();
            let mut g = CudaGraph::new().expect("graph");
            g.capture(|| {
                let _ = y.shallow_clone().g_add_(&x);
                Ok(())
            })
            .expect("capture");
            g.replay().expect("replay");
            g.replay().expect("replay");
            assert_eq!(y.sum(tch::Kind::Float).double_value(&[]), 8.0);
        } else {
            let e = CudaGraph::new().err().expect("no CUDA here");
            assert!(e.to_string().contains("CUDA"), "{e}");
        }
    }
}
