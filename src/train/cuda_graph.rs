//! CUDA graphs for the training step (issue 11's groundwork): capture a sequence of libtorch
//! kernels once, replay it with one launch. A safe wrapper over `cuda_graph.cpp` (libtorch's
//! `at::cuda::CUDAGraph`, as `torch.cuda.graph` uses it in torch/cuda/graphs.py), built by
//! build.rs with the `train` feature and a CUDA libtorch.
//!
//! The rules are torch's: tensors a graph reads or writes keep their addresses (copy new inputs
//! into them before a replay), no host synchronisation and no CPU tensors inside a capture, and
//! warm-up iterations run eagerly on the graph's side stream ([`CudaGraph::on_side_stream`])
//! before capturing. [`CudaGraph::new`] fails with a clear error where CUDA is unavailable (a CPU
//! build or machine), so callers run eagerly. A capture whose closure fails or panics (tch
//! panics on a libtorch error, e.g. an operation CUDA forbids during capture) ends the capture
//! and returns an error, so the caller can go on eagerly.

use crate::{Error, Result};

#[cfg(lorafuse_cuda_graph)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_void};
    unsafe extern "C" {
        pub fn lf_graph_new(device: c_int, err: *mut *mut c_char) -> *mut c_void;
        pub fn lf_graph_side_begin(g: *mut c_void, err: *mut *mut c_char) -> c_int;
        pub fn lf_graph_side_end(g: *mut c_void, err: *mut *mut c_char) -> c_int;
        pub fn lf_graph_capture_begin(g: *mut c_void, err: *mut *mut c_char) -> c_int;
        pub fn lf_graph_capture_end(g: *mut c_void, err: *mut *mut c_char) -> c_int;
        pub fn lf_graph_replay(g: *mut c_void, err: *mut *mut c_char) -> c_int;
        pub fn lf_graph_free(g: *mut c_void);
        pub fn lf_empty_cache(err: *mut *mut c_char) -> c_int;
    }
}

/// A captured (or capturing) CUDA graph.
pub struct CudaGraph {
    #[cfg(lorafuse_cuda_graph)]
    handle: *mut std::os::raw::c_void,
    capturing: bool,
    /// A capture was attempted (a graph is captured once; a failed one is not retried).
    attempted: bool,
    captured: bool,
}

/// Whether this build has the shim and a CUDA device is present.
pub fn available() -> bool {
    cfg!(lorafuse_cuda_graph) && tch::Cuda::is_available()
}

/// Return the caching allocator's unused device memory to the driver (`torch.cuda.empty_cache()`);
/// nothing where this build or machine has no CUDA.
pub fn empty_cache() -> Result<()> {
    if !available() {
        return Ok(());
    }
    #[cfg(lorafuse_cuda_graph)]
    // SAFETY: no arguments; the shim catches libtorch's exceptions.
    return call("empty_cache", |e| unsafe { ffi::lf_empty_cache(e) });
    #[cfg(not(lorafuse_cuda_graph))]
    Ok(())
}

#[cfg(lorafuse_cuda_graph)]
fn call(what: &str, f: impl FnOnce(*mut *mut std::os::raw::c_char) -> i32) -> Result<()> {
    crate::train::shim::call(&format!("CUDA graph {what}"), f)
}

impl CudaGraph {
    /// A new, empty graph for CUDA device `device` (with its own side stream); an error where
    /// CUDA graphs are unavailable.
    pub fn new(device: usize) -> Result<Self> {
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
            let device = i32::try_from(device)
                .map_err(|_| Error::InvalidArgument(format!("CUDA device {device}")))?;
            call("create", |e| {
                handle = unsafe { ffi::lf_graph_new(device, e) };
                if handle.is_null() { -1 } else { 0 }
            })?;
            Ok(CudaGraph {
                handle,
                capturing: false,
                attempted: false,
                captured: false,
            })
        }
        #[cfg(not(lorafuse_cuda_graph))]
        {
            let _ = device;
            Err(Error::Internal("no CUDA graph shim in this build".into()))
        }
    }

    /// Run `f` with the graph's side stream current (the device synchronised before and after,
    /// as `make_graphed_callables` brackets its warm-up): the eager warm-up iterations before
    /// [`capture`](Self::capture).
    pub fn on_side_stream<T>(&mut self, f: impl FnOnce() -> T) -> Result<T> {
        if self.capturing {
            return Err(Error::Internal(
                "side stream entered during a capture".into(),
            ));
        }
        #[cfg(lorafuse_cuda_graph)]
        {
            let h = self.handle;
            // SAFETY: `h` is a live graph owned by self.
            call("side stream", |e| unsafe { ffi::lf_graph_side_begin(h, e) })?;
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            // SAFETY: as above; restores the previous stream even when `f` panicked.
            let end = call("side stream end", |e| unsafe {
                ffi::lf_graph_side_end(h, e)
            });
            let out =
                out.map_err(|p| Error::Internal(format!("warm-up: {}", panic_text(p.as_ref()))))?;
            end?;
            Ok(out)
        }
        #[cfg(not(lorafuse_cuda_graph))]
        {
            let _ = f;
            Err(Error::Internal("no CUDA graph shim in this build".into()))
        }
    }

    /// Record the kernels `f` launches (on the side stream) into the graph; `f` runs once while
    /// recording, its work is not executed until [`replay`](Self::replay). Tensors `f` creates
    /// live in the graph's private memory pool: those it returns are the graph's outputs,
    /// rewritten in place by every replay.
    pub fn capture<T>(&mut self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.capturing || self.attempted {
            return Err(Error::Internal("CUDA graph captured twice".into()));
        }
        self.attempted = true;
        #[cfg(lorafuse_cuda_graph)]
        {
            let h = self.handle;
            // SAFETY: `h` is a live graph owned by self.
            call("capture_begin", |e| unsafe {
                ffi::lf_graph_capture_begin(h, e)
            })?;
            self.capturing = true;
            let out =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
                    Err(Error::Internal(format!(
                        "during capture: {}",
                        panic_text(p.as_ref())
                    )))
                });
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

/// The text of a caught panic (tch's `unwrap` of a libtorch error carries it).
#[cfg(lorafuse_cuda_graph)]
use crate::error::panic_text;

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
            let mut g = CudaGraph::new(0).expect("graph");
            // warm-up on the side stream, as the trainer does
            g.on_side_stream(|| {
                let _ = y.shallow_clone().g_add_(&x);
            })
            .expect("warm-up");
            let _ = y.shallow_clone().zero_();
            g.capture(|| {
                let _ = y.shallow_clone().g_add_(&x);
                Ok(())
            })
            .expect("capture");
            g.replay().expect("replay");
            g.replay().expect("replay");
            assert_eq!(y.sum(tch::Kind::Float).double_value(&[]), 8.0);
        } else {
            let e = CudaGraph::new(0).err().expect("no CUDA here");
            assert!(e.to_string().contains("CUDA"), "{e}");
        }
    }
}
