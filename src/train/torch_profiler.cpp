// PyTorch's profiler (libkineto: ATen operators on the host, CUDA kernels and copies through
// CUPTI) around the `--profile_steps` steps, for `--torch_profile FILE` (issue 11): a C shim over
// torch/csrc/autograd/profiler_kineto.h, which tch 0.24 does not wrap. What torch.profiler.profile
// does in torch/profiler/profiler.py: prepareProfiler + enableProfiler with a KINETO config and the
// activity set, then disableProfiler() and ProfilerResult::save (a Chrome trace JSON, what
// `export_chrome_trace` writes). Compiled by build.rs against the headers of the PyPI torch wheel
// torch-sys links, with the `train` feature. Every entry runs in lf_shim::guarded (shim.h), so
// nothing unwinds into Rust.
#include <torch/csrc/autograd/profiler_kineto.h>

#include "shim.h"

#include <set>
#include <stdexcept>
#include <string>

namespace {

namespace prof = torch::profiler::impl;

}  // namespace

extern "C" {

// Start recording host operators, and CUDA activity when `cuda` is non-zero.
int lf_prof_start(int cuda, char** err) {
  return lf_shim::guarded(err, [&] {
    std::set<prof::ActivityType> activities{prof::ActivityType::CPU};
    if (cuda != 0) activities.insert(prof::ActivityType::CUDA);
    // input shapes recorded (torch.profiler's record_shapes=True): the trace summary attributes
    // kernel time to operators and their shapes (scripts/torch_trace_summary.py --ops)
    const prof::ProfilerConfig config(prof::ProfilerState::KINETO, /*report_input_shapes=*/true);
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
  });
}

// Stop recording and write the Chrome trace to `path`.
int lf_prof_stop(const char* path, char** err) {
  return lf_shim::guarded(err, [&] {
    auto result = torch::autograd::profiler::disableProfiler();
    if (!result) throw std::runtime_error("the profiler returned no result");
    result->save(std::string(path));
  });
}

}  // extern "C"
