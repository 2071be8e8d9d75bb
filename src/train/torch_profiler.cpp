// PyTorch's profiler (libkineto: ATen operators on the host, CUDA kernels and copies through
// CUPTI) around the `--profile_steps` steps, for `--torch_profile FILE` (issue 11): a C shim over
// torch/csrc/autograd/profiler_kineto.h, which tch 0.24 does not wrap. What torch.profiler.profile
// does in torch/profiler/profiler.py: prepareProfiler + enableProfiler with a KINETO config and the
// activity set, then disableProfiler() and ProfilerResult::save (a Chrome trace JSON, what
// `export_chrome_trace` writes). Compiled by build.rs against the headers of the PyPI torch wheel
// torch-sys links, with the `train` feature. Every entry catches C++ exceptions and returns their
// text (malloc'd; lf_prof_free_error frees it), so nothing unwinds into Rust.
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <set>
#include <string>

namespace {

namespace prof = torch::profiler::impl;

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

// Start recording host operators, and CUDA activity when `cuda` is non-zero.
int lf_prof_start(int cuda, char** err) {
  return guarded(err, [&] {
    std::set<prof::ActivityType> activities{prof::ActivityType::CPU};
    if (cuda != 0) activities.insert(prof::ActivityType::CUDA);
    const prof::ProfilerConfig config(prof::ProfilerState::KINETO);
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
  });
}

// Stop recording and write the Chrome trace to `path`.
int lf_prof_stop(const char* path, char** err) {
  return guarded(err, [&] {
    auto result = torch::autograd::profiler::disableProfiler();
    if (!result) throw std::runtime_error("the profiler returned no result");
    result->save(std::string(path));
  });
}

void lf_prof_free_error(char* err) { std::free(err); }

}  // extern "C"
