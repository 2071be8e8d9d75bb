// CUDA graph capture and replay for the training step (issue 11): a C shim over libtorch's
// at::cuda::CUDAGraph (ATen/cuda/CUDAGraph.h; what torch.cuda.graph wraps in
// torch/cuda/graphs.py), which tch 0.24 does not wrap. Compiled by build.rs against the headers of
// the same PyPI torch wheel that torch-sys links, only with the `train` feature and a CUDA build
// of libtorch. As torch.cuda.graph does, capture runs on a side stream taken from the pool (a
// capture on the default stream is an error) after the device is synchronised; replay runs on
// the current stream. Every entry catches C++ exceptions and returns their text (malloc'd; the
// caller frees it with lf_free_error), so nothing unwinds into Rust.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>

namespace {

struct Graph {
  at::cuda::CUDAGraph graph;
  std::optional<c10::cuda::CUDAStreamGuard> guard;
};

char* copy_message(const char* what) {
  const size_t n = std::strlen(what);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out != nullptr) std::memcpy(out, what, n + 1);
  return out;
}

template <typename F>
int guarded(char** err, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    if (err != nullptr) *err = copy_message(e.what());
  } catch (...) {
    if (err != nullptr) *err = copy_message("unknown C++ exception");
  }
  return -1;
}

}  // namespace

extern "C" {

void* lf_graph_new(char** err) {
  Graph* g = nullptr;
  guarded(err, [&] { g = new Graph(); });
  return g;
}

int lf_graph_capture_begin(void* handle, char** err) {
  auto* g = static_cast<Graph*>(handle);
  return guarded(err, [&] {
    c10::cuda::device_synchronize();
    g->guard.emplace(c10::cuda::getStreamFromPool());
    g->graph.capture_begin();
  });
}

int lf_graph_capture_end(void* handle, char** err) {
  auto* g = static_cast<Graph*>(handle);
  int rc = guarded(err, [&] { g->graph.capture_end(); });
  // back on the stream that was current before the capture, even when the capture failed
  g->guard.reset();
  if (rc == 0) rc = guarded(err, [&] { c10::cuda::device_synchronize(); });
  return rc;
}

int lf_graph_replay(void* handle, char** err) {
  auto* g = static_cast<Graph*>(handle);
  return guarded(err, [&] { g->graph.replay(); });
}

void lf_graph_free(void* handle) {
  auto* g = static_cast<Graph*>(handle);
  try {
    g->guard.reset();
    delete g;
  } catch (...) {
  }
}

void lf_free_error(char* err) { std::free(err); }

}  // extern "C"
