// lorafuse's own CUDA kernels for training (issue 11): GroupNorm (+ SiLU) on channels-last
// activations (kernels/group_norm_nhwc.cu; ATen's CUDA GroupNorm is NCHW-only and transposes a
// channels-last input there and back) and GEGLU's activation (kernels/geglu.cu), compiled at run
// time by NVRTC for the device in use (as ATen's jiterator compiles its kernels:
// aten/src/ATen/native/cuda/jit_utils.cpp), launched through the CUDA driver API on the current
// torch stream (so CUDA graphs capture them), and wrapped in torch::autograd::Functions so
// autograd calls their gradient kernels.
//
// NVRTC (libnvrtc.so.13, from the torch wheel's nvidia-cuda-nvrtc dependency) and the driver
// (libcuda.so.1) are opened with dlopen on first use, so the shim builds and links without them.
// Compiled by build.rs together with cuda_graph.cpp; every entry runs in lf_shim::guarded.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <link.h>
#include <torch/csrc/autograd/custom_function.h>

#include "shim.h"

#include <algorithm>
#include <cctype>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- NVRTC and the driver API, opened on first use --------------------------------------------

using nvrtcProgram = void*;
using CUmodule = void*;
using CUfunction = void*;

struct Nvrtc {
  int (*version)(int*, int*);
  int (*create)(nvrtcProgram*, const char*, const char*, int, const char* const*, const char* const*);
  int (*compile)(nvrtcProgram, int, const char* const*);
  int (*log_size)(nvrtcProgram, size_t*);
  int (*log)(nvrtcProgram, char*);
  int (*cubin_size)(nvrtcProgram, size_t*);
  int (*cubin)(nvrtcProgram, char*);
  int (*destroy)(nvrtcProgram*);
  const char* (*error)(int);
};

struct Driver {
  int (*load)(CUmodule*, const void*);
  int (*function)(CUfunction*, CUmodule, const char*);
  int (*launch)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                cudaStream_t, void**, void**);
  int (*error)(int, const char**);
};

template <typename F>
void bind(void* lib, const char* name, F& f) {
  f = reinterpret_cast<F>(dlsym(lib, name));
  if (f == nullptr) throw std::runtime_error(std::string("symbol ") + name + " not found");
}

void* open_first(const std::vector<std::string>& names) {
  std::string tried;
  for (const auto& n : names) {
    if (void* h = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL)) return h;
    tried += (tried.empty() ? "" : ", ") + n;
  }
  const char* why = dlerror();
  throw std::runtime_error("cannot open " + tried + " (" + std::string(why ? why : "") + ")");
}

// `load(api)` once per process (one instance per caller: each passes its own lambda); its failure,
// prefixed by `what`, is thrown again on every later call.
template <typename Api, typename F>
const Api& load_once(const char* what, F load) {
  static std::once_flag once;
  static Api api;
  static std::string failed;
  std::call_once(once, [&] {
    try {
      load(api);
    } catch (const std::exception& e) {
      failed = e.what();
    }
  });
  if (!failed.empty()) throw std::runtime_error(std::string(what) + ": " + failed);
  return api;
}

const Nvrtc& nvrtc() {
  return load_once<Nvrtc>("NVRTC", [](Nvrtc& api) {
    void* lib = open_first({"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"});
    bind(lib, "nvrtcVersion", api.version);
    bind(lib, "nvrtcCreateProgram", api.create);
    bind(lib, "nvrtcCompileProgram", api.compile);
    bind(lib, "nvrtcGetProgramLogSize", api.log_size);
    bind(lib, "nvrtcGetProgramLog", api.log);
    bind(lib, "nvrtcGetCUBINSize", api.cubin_size);
    bind(lib, "nvrtcGetCUBIN", api.cubin);
    bind(lib, "nvrtcDestroyProgram", api.destroy);
    bind(lib, "nvrtcGetErrorString", api.error);
    // NVRTC opens libnvrtc-builtins.so.<major>.<minor> itself, by name; load it from libnvrtc's
    // own folder first (then that name is found loaded), so no LD_LIBRARY_PATH is needed
    int major = 0, minor = 0;
    api.version(&major, &minor);
    char dir[4096] = {0};
    if (dlinfo(lib, RTLD_DI_ORIGIN, dir) == 0) {
      const std::string builtins = std::string(dir) + "/libnvrtc-builtins.so." +
                                   std::to_string(major) + "." + std::to_string(minor);
      dlopen(builtins.c_str(), RTLD_NOW | RTLD_GLOBAL);
    }
  });
}

const Driver& driver() {
  return load_once<Driver>("CUDA driver", [](Driver& api) {
    void* lib = open_first({"libcuda.so.1", "libcuda.so"});
    bind(lib, "cuModuleLoadData", api.load);
    bind(lib, "cuModuleGetFunction", api.function);
    bind(lib, "cuLaunchKernel", api.launch);
    bind(lib, "cuGetErrorString", api.error);
  });
}

void check_driver(int rc, const char* what) {
  if (rc == 0) return;
  const char* msg = nullptr;
  driver().error(rc, &msg);
  throw std::runtime_error(std::string(what) + ": " + (msg ? msg : "CUDA driver error ") +
                           " (" + std::to_string(rc) + ")");
}

// The kernels compiled for `arch` (e.g. "sm_90") with LF_WANT_<dtype>; the log on failure.
std::string compile(const std::string& src, const std::string& arch, const std::string& dtype) {
  const Nvrtc& api = nvrtc();
  nvrtcProgram prog = nullptr;
  int rc = api.create(&prog, src.c_str(), "lorafuse_kernels.cu", 0, nullptr, nullptr);
  if (rc != 0) throw std::runtime_error(std::string("nvrtcCreateProgram: ") + api.error(rc));
  std::string d = "-DLF_WANT_" + dtype;
  std::transform(d.begin(), d.end(), d.begin(), [](unsigned char c) { return std::toupper(c); });
  const std::string a = "--gpu-architecture=" + arch;
  const char* opts[] = {a.c_str(), d.c_str(), "-std=c++17"};
  rc = api.compile(prog, 3, opts);
  std::string out;
  if (rc != 0) {
    size_t n = 0;
    api.log_size(prog, &n);
    std::string log(n, '\0');
    if (n > 0) api.log(prog, log.data());
    api.destroy(&prog);
    throw std::runtime_error("NVRTC could not compile the kernels for " + arch + ": " +
                             api.error(rc) + "\n" + log);
  }
  size_t n = 0;
  api.cubin_size(prog, &n);
  out.resize(n);
  api.cubin(prog, out.data());
  api.destroy(&prog);
  return out;
}

int attribute(cudaDeviceAttr a, int device) {
  int v = 0;
  const cudaError_t rc = cudaDeviceGetAttribute(&v, a, device);
  if (rc != cudaSuccess) throw std::runtime_error(std::string("cudaDeviceGetAttribute: ") + cudaGetErrorString(rc));
  return v;
}

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "f32";
    case at::kBFloat16: return "bf16";
    case at::kHalf: return "f16";
    default: throw std::runtime_error(std::string("no kernel for ") + c10::toString(t));
  }
}

// One module per (device, activation dtype), compiled on first use (before any CUDA graph capture:
// the trainer's eager warm-up steps come first); kernels looked up by name.
struct Module {
  CUmodule module = nullptr;
  std::map<std::string, CUfunction> functions;
};

CUfunction kernel(const char* src, int device, const std::string& dtype, const std::string& name) {
  static std::mutex mu;
  static std::map<std::pair<int, std::string>, Module> modules;
  std::lock_guard<std::mutex> lock(mu);
  Module& m = modules[{device, dtype}];
  if (m.module == nullptr) {
    const std::string arch = "sm_" + std::to_string(attribute(cudaDevAttrComputeCapabilityMajor, device)) +
                             std::to_string(attribute(cudaDevAttrComputeCapabilityMinor, device));
    const std::string cubin = compile(src, arch, dtype);
    CUmodule mod = nullptr;
    check_driver(driver().load(&mod, cubin.data()), "cuModuleLoadData");
    m.module = mod;
  }
  auto it = m.functions.find(name);
  if (it != m.functions.end()) return it->second;
  CUfunction f = nullptr;
  check_driver(driver().function(&f, m.module, name.c_str()), name.c_str());
  m.functions[name] = f;
  return f;
}

void launch(CUfunction f, dim3 grid, dim3 block, unsigned smem, std::vector<void*> args) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_driver(driver().launch(f, grid.x, grid.y, grid.z, block.x, block.y, block.z, smem, stream,
                               args.data(), nullptr),
               "cuLaunchKernel");
}

// ---- the operation ----------------------------------------------------------------------------

struct Shape {
  int N, C, HW, G, P, chunks, sms;
};

// Every GroupNorm kernel runs 256 threads a block (group_norm_nhwc.cu's thread layout).
constexpr int kBlock = 256;

Shape plan(const at::Tensor& x, int64_t groups) {
  if (!x.is_cuda() || x.dim() != 4) throw std::runtime_error("a 4-D CUDA tensor is needed");
  if (!x.is_contiguous(at::MemoryFormat::ChannelsLast))
    throw std::runtime_error("the input is not channels-last contiguous");
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (groups <= 0 || C % groups != 0)
    throw std::runtime_error(std::to_string(C) + " channels do not split into " +
                             std::to_string(groups) + " groups");
  // the statistics kernels' shared memory (stats_smem) stays within the default 48 KiB
  if (N <= 0 || HW <= 0 || C > 3072 || N > 65535 || x.numel() > (int64_t{1} << 40))
    throw std::runtime_error("unsupported GroupNorm input size");
  const int sms = attribute(cudaDevAttrMultiProcessorCount, x.get_device());
  Shape s;
  s.N = (int)N;
  s.C = (int)C;
  s.HW = (int)HW;
  s.G = (int)groups;
  s.sms = sms;
  // about eight blocks per SM in all for the statistics passes (each thread then walks few
  // pixels: the passes are bound by memory latency, not by the partial sums' count)
  const int64_t per_sample = std::clamp<int64_t>((8 * sms + N - 1) / N, 1, HW);
  s.P = (int)((HW + per_sample - 1) / per_sample);
  s.chunks = (int)((HW + s.P - 1) / s.P);
  return s;
}

// The thread layout of the kernels for vector width v: pixel rows per block.
int rows(const Shape& s, int v) { return kBlock / std::min(s.C / v, kBlock); }

// The statistics kernels' shared memory: (2 * rows + 2) * C floats.
unsigned stats_smem(const Shape& s, int v) {
  return (unsigned)((2 * rows(s, v) + 2) * s.C * sizeof(float));
}

void check_affine(const at::Tensor& x, const at::Tensor& w, const char* what) {
  if (w.dim() != 1 || w.size(0) != x.size(1) || !w.is_contiguous() || w.device() != x.device())
    throw std::runtime_error(std::string(what) + ": a contiguous [C] tensor on the input's device is needed");
  if (w.scalar_type() != x.scalar_type() && w.scalar_type() != at::kFloat)
    throw std::runtime_error(std::string(what) + ": its dtype must be the input's or float32");
  if (w.requires_grad())
    throw std::runtime_error(std::string(what) + " needs a gradient: the fused kernels have none for it");
}

// 16-byte accesses where every address and the channel count allow them
int vector_width(const Shape& s, at::ScalarType t, std::initializer_list<const void*> ptrs) {
  const int v = 16 / (int)c10::elementSize(t);
  if (s.C % v != 0) return 1;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  return v;
}

std::string names(const at::Tensor& x, const at::Tensor& w) {
  return dtype_name(x.scalar_type()) + "_" + dtype_name(w.scalar_type());
}

// The elementwise passes' grid: (blocks along the pixels, samples), about sixteen blocks per SM.
dim3 apply_grid(const Shape& s, int v) {
  const int r = rows(s, v);
  const long long along = std::min<long long>((s.HW + r - 1) / r,
                                              std::max<long long>(1, (16LL * s.sms + s.N - 1) / s.N));
  return dim3((unsigned)along, (unsigned)s.N);
}

at::Tensor forward_impl(const char* src, const at::Tensor& x, const at::Tensor& gamma,
                        const at::Tensor& beta, int64_t groups, double eps, bool silu,
                        at::Tensor& mean, at::Tensor& rstd) {
  Shape s = plan(x, groups);
  check_affine(x, gamma, "weight");
  check_affine(x, beta, "bias");
  if (gamma.scalar_type() != beta.scalar_type())
    throw std::runtime_error("weight and bias differ in dtype");
  c10::cuda::CUDAGuard guard(x.device());
  const int dev = x.get_device();
  const std::string dt = dtype_name(x.scalar_type());
  const auto f32 = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor part = at::empty({s.N, s.chunks, s.G, 2}, f32);
  mean = at::empty({s.N, s.G}, f32);
  rstd = at::empty({s.N, s.G}, f32);
  at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  const void* xp = x.data_ptr();
  void* yp = y.data_ptr();
  float* pp = part.data_ptr<float>();
  const int vs = vector_width(s, x.scalar_type(), {xp});
  launch(kernel(src, dev, dt, "gn_stats_" + dt + "_v" + std::to_string(vs)), dim3(s.chunks, s.N),
         dim3(kBlock), stats_smem(s, vs), {(void*)&xp, (void*)&pp, &s.HW, &s.C, &s.G, &s.P, &s.chunks});
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  int cg = s.C / s.G;
  float e = (float)eps;
  // one warp per (n, g)
  launch(kernel(src, dev, dt, "gn_finalize"), dim3((s.N * s.G + 3) / 4), dim3(128), 0,
         {(void*)&pp, (void*)&mp, (void*)&rp, &s.N, &s.HW, &s.G, &cg, &s.P, &s.chunks, &e});
  const void* gp = gamma.data_ptr();
  const void* bp = beta.data_ptr();
  const int v = vector_width(s, x.scalar_type(), {xp, yp});
  const std::string name = "gn_apply_" + names(x, gamma) + "_v" + std::to_string(v) + (silu ? "_silu" : "");
  launch(kernel(src, dev, dt, name), apply_grid(s, v), dim3(kBlock), 0,
         {(void*)&xp, (void*)&gp, (void*)&bp, (void*)&mp, (void*)&rp, (void*)&yp, &s.HW, &s.C, &s.G});
  return y;
}

at::Tensor backward_impl(const char* src, const at::Tensor& x, const at::Tensor& dy_in,
                         const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                         const at::Tensor& rstd, int64_t groups, bool silu) {
  Shape s = plan(x, groups);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dy = dy_in.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  const int dev = x.get_device();
  const std::string dt = dtype_name(x.scalar_type());
  const auto f32 = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor part = at::empty({s.N, s.chunks, s.G, 2}, f32);
  at::Tensor coef = at::empty({s.N, s.G, 2}, f32);
  at::Tensor dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  const void* xp = x.data_ptr();
  const void* dyp = dy.data_ptr();
  const void* gp = gamma.data_ptr();
  const void* bp = beta.data_ptr();
  const float* mp = mean.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  float* pp = part.data_ptr<float>();
  float* cp = coef.data_ptr<float>();
  void* dxp = dx.data_ptr();
  const std::string sfx = silu ? "_silu" : "";
  const int v = vector_width(s, x.scalar_type(), {xp, dyp, dxp});
  const std::string vn = "_v" + std::to_string(v);
  launch(kernel(src, dev, dt, "gn_bstats_" + names(x, gamma) + vn + sfx), dim3(s.chunks, s.N),
         dim3(kBlock), stats_smem(s, v),
         {(void*)&xp, (void*)&dyp, (void*)&gp, (void*)&bp, (void*)&mp, (void*)&rp, (void*)&pp,
          &s.HW, &s.C, &s.G, &s.P, &s.chunks});
  int cg = s.C / s.G;
  launch(kernel(src, dev, dt, "gn_bfinalize"), dim3((s.N * s.G + 3) / 4), dim3(128), 0,
         {(void*)&pp, (void*)&cp, &s.N, &s.HW, &s.G, &cg, &s.chunks});
  launch(kernel(src, dev, dt, "gn_bapply_" + names(x, gamma) + vn + sfx), apply_grid(s, v),
         dim3(kBlock), 0,
         {(void*)&xp, (void*)&dyp, (void*)&gp, (void*)&bp, (void*)&mp, (void*)&rp, (void*)&cp,
          (void*)&dxp, &s.HW, &s.C, &s.G});
  return dx;
}

// The kernel source (owned by the Rust side, include_str!), set by each call.
const char* g_source = nullptr;

struct GroupNormNhwc : public torch::autograd::Function<GroupNormNhwc> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& gamma,
                            const at::Tensor& beta, int64_t groups, double eps, bool silu) {
    at::Tensor mean, rstd;
    at::Tensor y = forward_impl(g_source, x, gamma, beta, groups, eps, silu, mean, rstd);
    ctx->save_for_backward({x, gamma, beta});
    ctx->saved_data["mean"] = mean;
    ctx->saved_data["rstd"] = rstd;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["silu"] = silu;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor dx = backward_impl(g_source, saved[0], grads[0], saved[1], saved[2],
                                  ctx->saved_data["mean"].toTensor(),
                                  ctx->saved_data["rstd"].toTensor(),
                                  ctx->saved_data["groups"].toInt(), ctx->saved_data["silu"].toBool());
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// ---- GEGLU ------------------------------------------------------------------------------------

unsigned elementwise_blocks(long long work, int sms) {
  return (unsigned)std::max<long long>(1, std::min((work + 255) / 256, (long long)sms * 16));
}

at::Tensor geglu_forward(const char* src, const at::Tensor& hg) {
  if (!hg.is_cuda() || !hg.is_contiguous() || hg.dim() < 1 || hg.size(-1) % 2 != 0)
    throw std::runtime_error("GEGLU: a contiguous CUDA tensor with an even last dimension is needed");
  c10::cuda::CUDAGuard guard(hg.device());
  const int dev = hg.get_device();
  const std::string dt = dtype_name(hg.scalar_type());
  int inner = (int)(hg.size(-1) / 2);
  long long rows = hg.numel() / (2LL * inner);
  std::vector<int64_t> shape = hg.sizes().vec();
  shape.back() = inner;
  at::Tensor out = at::empty(shape, hg.options());
  const void* hp = hg.data_ptr();
  void* op = out.data_ptr();
  int v = 16 / (int)c10::elementSize(hg.scalar_type());
  if (inner % v != 0 || reinterpret_cast<uintptr_t>(hp) % 16 != 0 || reinterpret_cast<uintptr_t>(op) % 16 != 0) v = 1;
  const int sms = attribute(cudaDevAttrMultiProcessorCount, dev);
  launch(kernel(src, dev, dt, "geglu_fwd_" + dt + "_v" + std::to_string(v)),
         dim3(elementwise_blocks(rows * inner / v, sms)), dim3(256), 0,
         {(void*)&hp, (void*)&op, &rows, &inner});
  return out;
}

at::Tensor geglu_backward(const char* src, const at::Tensor& hg, const at::Tensor& dout_in) {
  c10::cuda::CUDAGuard guard(hg.device());
  const at::Tensor dout = dout_in.to(hg.scalar_type()).contiguous();
  const int dev = hg.get_device();
  const std::string dt = dtype_name(hg.scalar_type());
  int inner = (int)(hg.size(-1) / 2);
  long long rows = hg.numel() / (2LL * inner);
  at::Tensor dhg = at::empty_like(hg);
  const void* hp = hg.data_ptr();
  const void* dp = dout.data_ptr();
  void* gp = dhg.data_ptr();
  int v = 16 / (int)c10::elementSize(hg.scalar_type());
  for (const void* p : {hp, dp, (const void*)gp})
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) v = 1;
  if (inner % v != 0) v = 1;
  const int sms = attribute(cudaDevAttrMultiProcessorCount, dev);
  launch(kernel(src, dev, dt, "geglu_bwd_" + dt + "_v" + std::to_string(v)),
         dim3(elementwise_blocks(rows * inner / v, sms)), dim3(256), 0,
         {(void*)&hp, (void*)&dp, (void*)&gp, &rows, &inner});
  return dhg;
}

struct Geglu : public torch::autograd::Function<Geglu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hg) {
    at::Tensor out = geglu_forward(g_source, hg);
    ctx->save_for_backward({hg});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {geglu_backward(g_source, ctx->get_saved_variables()[0], grads[0])};
  }
};

// ---- LoRA linear --------------------------------------------------------------------------------

// y = x W^T + bias + (x A^T) B^T as one autograd node (W and bias frozen), so that the input
// gradient takes the LoRA's part in the GEMM that adds it (dx = dy W, then dx += (dy B) A with
// beta = 1) instead of autograd writing (dy B) A out and adding it to dy W in a pass of its own
// (torch/csrc/autograd/input_buffer.cpp accumulates a tensor's gradients that way). The products
// are ATen's, the ones peft's Linear (peft/tuners/lora/layer.py) runs through autograd.
struct LoraLinearFn : public torch::autograd::Function<LoraLinearFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const std::optional<at::Tensor>& bias, const at::Tensor& a,
                            const at::Tensor& b) {
    at::Tensor y = bias ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
    at::Tensor h = at::mm(x, a.t());
    y.addmm_(h, b.t());
    ctx->save_for_backward({x, w, a, b, h});
    ctx->saved_data["bias"] = bias.has_value();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &a = saved[2], &b = saved[3], &h = saved[4];
    const at::Tensor& dy = grads[0];
    at::Tensor dx, da, db;
    // needs_input_grad counts the tensor inputs only: a missing bias has no edge
    const size_t ia = ctx->saved_data["bias"].toBool() ? 3 : 2;
    const bool need_x = ctx->needs_input_grad(0), need_a = ctx->needs_input_grad(ia);
    if (need_x || need_a) {
      at::Tensor dh = at::mm(dy, b);
      if (need_x) {
        dx = at::mm(dy, w);
        dx.addmm_(dh, a);
      }
      if (need_a) da = at::mm(dh.t(), x);
    }
    if (ctx->needs_input_grad(ia + 1)) db = at::mm(dy.t(), h);
    return {dx, at::Tensor(), at::Tensor(), da, db};
  }
};

}  // namespace

extern "C" {

// LoraLinearFn on x [M, in], w [out, in], bias [out] (or null), a [r, in], b [out, r] (scaling
// already applied): y [M, out], differentiable in x, a and b.
int lf_lora_linear(const at::Tensor* x, const at::Tensor* w, const at::Tensor* bias,
                   const at::Tensor* a, const at::Tensor* b, at::Tensor** out, char** err) {
  return lf_shim::guarded(err, [&] {
    if (x->dim() != 2 || w->dim() != 2 || a->dim() != 2 || b->dim() != 2 ||
        w->size(1) != x->size(1) || a->size(1) != x->size(1) || b->size(0) != w->size(0) ||
        b->size(1) != a->size(0) || (bias && bias->numel() != w->size(0)))
      throw std::runtime_error("LoRA linear: shapes do not chain");
    if (w->requires_grad() || (bias && bias->requires_grad()))
      throw std::runtime_error("LoRA linear: the base weight and bias must be frozen");
    *out = new at::Tensor(LoraLinearFn::apply(*x, *w, bias ? std::optional<at::Tensor>(*bias) : std::nullopt, *a, *b));
  });
}

// hidden * gelu(gate) of hg = [..., 2 * inner] (hidden | gate), differentiable in hg.
int lf_geglu(const char* src, const at::Tensor* hg, at::Tensor** out, char** err) {
  return lf_shim::guarded(err, [&] {
    g_source = src;
    *out = new at::Tensor(Geglu::apply(*hg));
  });
}

// y = GroupNorm(x) (then SiLU when `silu`), differentiable in x; `src` is the kernel source.
int lf_gn_nhwc(const char* src, const at::Tensor* x, const at::Tensor* gamma, const at::Tensor* beta,
               int64_t groups, double eps, int silu, at::Tensor** out, char** err) {
  return lf_shim::guarded(err, [&] {
    g_source = src;
    at::Tensor y = GroupNormNhwc::apply(*x, *gamma, *beta, groups, eps, silu != 0);
    *out = new at::Tensor(std::move(y));
  });
}

// Which fused backend scaled_dot_product_attention may pick (torch.backends.cuda's
// enable_flash_sdp / enable_mem_efficient_sdp / enable_cudnn_sdp, at::Context's flags that
// sdp_utils.cpp reads): `which` 1 = flash only, 2 = memory-efficient only, 3 = cuDNN only; the
// math backend stays on as the fallback for shapes the chosen one rejects.
int lf_sdp_backend(int which, char** err) {
  return lf_shim::guarded(err, [&] {
    if (which < 1 || which > 3) throw std::runtime_error("unknown SDPA backend");
    auto& ctx = at::globalContext();
    ctx.setSDPUseFlash(which == 1);
    ctx.setSDPUseMemEfficient(which == 2);
    ctx.setSDPUseCuDNN(which == 3);
    ctx.setSDPUseMath(true);
  });
}

// Compile the kernels for `arch` (e.g. "sm_90") and activation dtype "f32", "bf16" or "f16"
// without running them (no GPU needed): the size of the cubin in *bytes.
int lf_gn_compile_check(const char* src, const char* arch, const char* dtype, size_t* bytes,
                        char** err) {
  return lf_shim::guarded(err, [&] { *bytes = compile(src, arch, dtype).size(); });
}

}  // extern "C"
