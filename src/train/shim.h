// What the C shims over libtorch (cuda_graph.cpp, torch_profiler.cpp) share: every extern "C"
// entry runs its body in lf_shim::guarded, which catches C++ exceptions and hands their text back
// as a malloc'd string (train::shim::call in Rust reads it and frees it with free()), so nothing
// unwinds into Rust.
#pragma once

#include <cstdlib>
#include <cstring>
#include <exception>

namespace lf_shim {

inline char* copy_message(const char* what) {
  const size_t n = std::strlen(what);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out != nullptr) std::memcpy(out, what, n + 1);
  return out;
}

// 0 when `f` returned, -1 with the exception's text in *err when it threw.
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

}  // namespace lf_shim
