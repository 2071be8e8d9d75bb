// What the run-time compiled kernels share (src/train/fused.rs concatenates this file, then
// group_norm_nhwc.cu and geglu.cu, and NVRTC compiles the whole for the GPU in use): element
// types without the CUDA headers (NVRTC has none of its own here), float conversions, and
// 16-byte vector accesses.

typedef unsigned short u16;
struct bf16 { u16 v; };
struct f16 { u16 v; };

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __uint_as_float(((unsigned)x.v) << 16); }
__device__ __forceinline__ float to_f(f16 x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.v));
  return f;
}

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
// round to nearest even, as c10::BFloat16 does; NaN stays NaN
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) {
  unsigned u = __float_as_uint(x);
  bf16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r.v = 0x7fc0;
    return r;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  r.v = (u16)(u >> 16);
  return r;
}
template <> __device__ __forceinline__ f16 from_f<f16>(float x) {
  f16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.v) : "f"(x));
  return r;
}

// V consecutive elements, loaded and stored as one 16-byte access when V * sizeof(T) == 16
template <typename T, int V> struct __align__(16) Vec { T v[V]; };
template <typename T> struct Vec<T, 1> { T v[1]; };

