// CUDA graph capture and replay for the training step (issue 11): a C shim over libtorch's
// at::cuda::CUDAGraph (ATen/cuda/CUDAGraph.h; what torch.cuda.graph wraps in
// torch/cuda/graphs.py), which tch 0.24 does not wrap. Compiled by build.rs against the headers of
// the same PyPI torch wheel that torch-sys links, only with the `train` feature and a CUDA build
// of libtorch.
//
// As torch/cuda/graphs.py does it:
// - every graph owns one side stream of its device, taken from the pool once; the warm-up
//   iterations (lf_graph_side_begin/end, make_graphed_callables' `with torch.cuda.stream(...)`
//   between two synchronisations) and the capture run on it, since a capture on the default
//   stream is an error and warm-up and capture should see the same stream;
// - capture_begin (torch.cuda.graph.__enter__) synchronises the device, empties the caching
//   allocator's cache (memory for the graph's private pool), makes the side stream current and
//   captures into a new private memory pool in cudaStreamCaptureModeGlobal (the default
//   `capture_error_mode="global"`: an unsafe call from any thread during capture is an error);
// - capture_end (__exit__) ends the capture and restores the stream that was current before
//   (also when the capture failed), then synchronises;
// - replay launches on the stream current at the call (the caller's, where it copied the inputs).
// CUDAStreamGuard also sets the current device to the graph's, so work on `cuda:N` is captured.
// Every entry runs in lf_shim::guarded (shim.h), so nothing unwinds into Rust.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "shim.h"

#include <optional>
#include <stdexcept>

namespace {

struct Graph {
  explicit Graph(c10::DeviceIndex d)
      : device(d), side(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, d)) {}
  c10::DeviceIndex device;
  c10::cuda::CUDAStream side;
  at::cuda::CUDAGraph graph;
  // set while the side stream is current (warm-up or capture)
  std::optional<c10::cuda::CUDAStreamGuard> guard;
};

void synchronize(const Graph* g) {
  c10::cuda::CUDAGuard device_guard(g->device);
  c10::cuda::device_synchronize();
}

void enter_side_stream(Graph* g) {
  if (g->guard.has_value()) throw std::runtime_error("the side stream is already current");
  synchronize(g);  // the side stream sees everything queued before
  g->guard.emplace(g->side);
}

}  // namespace

extern "C" {

void* lf_graph_new(int device, char** err) {
  Graph* g = nullptr;
  lf_shim::guarded(err, [&] {
    if (device < 0 || device >= c10::cuda::device_count())
      throw std::runtime_error("no such CUDA device");
    g = new Graph(static_cast<c10::DeviceIndex>(device));
  });
  return g;
}

// Warm-up: make the graph's side stream current (after synchronising the device).
int lf_graph_side_begin(void* handle, char** err) {
  auto* g = static_cast<Graph*>(handle);
  return lf_shim::guarded(err, [&] { enter_side_stream(g); });
}

// End of warm-up: back to the previous stream, then synchronise (make_graphed_callables).
int lf_graph_side_end(void* handle, char** err) {
  auto* g = static_cast<Graph*>(handle);
  g->guard.reset();
  return lf_shim::guarded(err, [&] { synchronize(g); });
}

int lf_graph_capture_begin(void* handle, char** err) {
  auto* g = static_cast<Graph*>(handle);
  int rc = lf_shim::guarded(err, [&] {
    enter_side_stream(g);
    c10::cuda::CUDACachingAllocator::emptyCache();
    g->graph.capture_begin();
  });
  if (rc != 0) g->guard.reset();
  return rc;
}

int lf_graph_capture_end(void* handle, char** err) {
  auto* g = static_cast<Graph*>(handle);
  int rc = lf_shim::guarded(err, [&] { g->graph.capture_end(); });
  // back on the stream that was current before the capture, even when the capture failed
  g->guard.reset();
  // a failed capture leaves its error as the runtime's last error: clear it, or the next
  // kernel launch check (C10_CUDA_KERNEL_LAUNCH_CHECK) would report it for an eager step
  if (rc != 0) (void)cudaGetLastError();
  if (rc == 0) rc = lf_shim::guarded(err, [&] { synchronize(g); });
  return rc;
}

// Hand the caching allocator's unused blocks back to the driver (torch.cuda.empty_cache): after
// the latent cache is built, so the VAE's large transient blocks neither stay reserved nor split
// into the training step's.
int lf_empty_cache(char** err) {
  return lf_shim::guarded(err, [] { c10::cuda::CUDACachingAllocator::emptyCache(); });
}

int lf_graph_replay(void* handle, char** err) {
  auto* g = static_cast<Graph*>(handle);
  return lf_shim::guarded(err, [&] { g->graph.replay(); });
}

void lf_graph_free(void* handle) {
  auto* g = static_cast<Graph*>(handle);
  try {
    g->guard.reset();
    delete g;
  } catch (...) {
  }
}

}  // extern "C"
