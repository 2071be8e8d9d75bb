// GroupNorm (optionally followed by SiLU) on channels-last activations, forward and input
// gradient, compiled at run time by NVRTC (src/train/fused.cpp) for the device in use.
//
// The maths are torch.nn.GroupNorm's (aten/src/ATen/native/cuda/group_norm_kernel.cu): per sample
// n and group g, mean and biased variance over the group's H*W*(C/G) values, rstd =
// 1/sqrt(var + eps), y = (x - mean) * rstd * gamma[c] + beta[c]; the input gradient with
// xhat = (x - mean) * rstd and u = gamma[c] * dy:  dx = rstd * (u - mean_g(u) - xhat * mean_g(u * xhat)).
// ATen's CUDA GroupNorm works on NCHW only (it makes a channels-last input contiguous, one transpose
// each way); these kernels read and write NHWC ([N, H*W, C] in memory) directly, as ONNX Runtime's
// GroupNorm does for inference (onnxruntime/contrib_ops/cuda/diffusion/group_norm_impl_kernel.cuh),
// and fuse the SiLU that follows every GroupNorm of a ResnetBlock2D (y = z * sigmoid(z), dz = dy *
// s * (1 + z * (1 - s))), so its activation is neither stored nor read back.
//
// Statistics are deterministic (no atomics): each block of (chunk of pixels, sample) writes its
// groups' sums and centred second moments, combined in double by Chan's parallel formula.
// Frozen affine parameters only (LoRA training): no gamma/beta gradients.

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }

// ---- forward ----------------------------------------------------------------------------------

// Block (chunk, n): the pixels [chunk * P, min(HW, (chunk + 1) * P)) of sample n. Writes, for each
// group, the sum and the second moment about the chunk's own group mean to part[n][chunk][g][0..2].
// Shared memory: 2 * C floats.
template <typename T>
__device__ void stats(const T* __restrict__ x, float* __restrict__ part, int HW, int C, int G, int P,
                      int chunks) {
  extern __shared__ float sh[];
  float* gmean = sh + C;  // G floats (G <= C), reused after the first pass
  const int chunk = blockIdx.x, n = blockIdx.y, cg = C / G;
  const int p0 = chunk * P, p1 = min(p0 + P, HW);
  const float cnt = (float)((p1 - p0) * cg);
  const T* xb = x + (long long)n * HW * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float s = 0.f;
    for (int p = p0; p < p1; ++p) s += to_f(xb[(long long)p * C + c]);
    sh[c] = s;
  }
  __syncthreads();
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    float s = 0.f;
    for (int c = g * cg; c < (g + 1) * cg; ++c) s += sh[c];
    gmean[g] = s / cnt;
    part[(((long long)n * chunks + chunk) * G + g) * 2] = s;
  }
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const float m = gmean[c / cg];
    float q = 0.f;
    for (int p = p0; p < p1; ++p) {
      const float d = to_f(xb[(long long)p * C + c]) - m;
      q += d * d;
    }
    sh[c] = q;
  }
  __syncthreads();
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    float q = 0.f;
    for (int c = g * cg; c < (g + 1) * cg; ++c) q += sh[c];
    part[(((long long)n * chunks + chunk) * G + g) * 2 + 1] = q;
  }
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One warp per (n, g): mean and rstd from the chunks' partial moments (Chan et al.: the total
// mean first, then each chunk's second moment moved to it).
extern "C" __global__ void gn_finalize(const float* __restrict__ part, float* __restrict__ mean,
                                       float* __restrict__ rstd, int N, int HW, int G, int cg, int P,
                                       int chunks, float eps) {
  const int i = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (i >= N * G) return;  // whole warps leave together
  const int n = i / G, g = i % G;
  const float* pp = part + (long long)n * chunks * G * 2 + g * 2;
  double total = 0.0;
  for (int k = lane; k < chunks; k += 32) total += (double)pp[(long long)k * G * 2];
  const double cnt_all = (double)HW * cg;
  const double m = warp_sum(total) / cnt_all;
  double m2 = 0.0;
  for (int k = lane; k < chunks; k += 32) {
    const int rows = min(P, HW - k * P);
    const double cnt = (double)rows * cg;
    const double d = (double)pp[(long long)k * G * 2] / cnt - m;
    m2 += (double)pp[(long long)k * G * 2 + 1] + cnt * d * d;
  }
  m2 = warp_sum(m2);
  if (lane == 0) {
    mean[i] = (float)m;
    rstd[i] = (float)(1.0 / sqrt(m2 / cnt_all + (double)eps));
  }
}

// y = (x - mean) * rstd * gamma + beta (then SiLU); V elements per thread, C % V == 0.
template <typename T, typename W, int V, bool SILU>
__device__ void apply(const T* __restrict__ x, const W* __restrict__ gamma,
                      const W* __restrict__ beta, const float* __restrict__ mean,
                      const float* __restrict__ rstd, T* __restrict__ y, long long total, long long HWC,
                      int C, int G) {
  const int cg = C / G;
  const long long stride = (long long)gridDim.x * blockDim.x * V;
  for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * V; i < total; i += stride) {
    const int n = (int)(i / HWC), c0 = (int)(i % C);
    Vec<T, V> in = *reinterpret_cast<const Vec<T, V>*>(x + i), out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = c0 + k, ng = n * G + c / cg;
      float z = (to_f(in.v[k]) - mean[ng]) * rstd[ng] * to_f(gamma[c]) + to_f(beta[c]);
      if (SILU) z = z * sigmoid(z);
      out.v[k] = from_f<T>(z);
    }
    *reinterpret_cast<Vec<T, V>*>(y + i) = out;
  }
}

// ---- input gradient ---------------------------------------------------------------------------

// u = gamma * dz (dz: the gradient at the GroupNorm's output, through the SiLU when fused)
template <typename T, typename W, bool SILU>
__device__ __forceinline__ float grad_u(T xv, T dyv, float m, float r, W gw, W bw, float* xhat) {
  const float xh = (to_f(xv) - m) * r, gam = to_f(gw);
  float dz = to_f(dyv);
  if (SILU) {
    const float z = xh * gam + to_f(bw), s = sigmoid(z);
    dz = dz * s * (1.f + z * (1.f - s));
  }
  *xhat = xh;
  return gam * dz;
}

// Block (chunk, n): per group, the sums of u and u * xhat over the chunk -> part[n][chunk][g][0..2].
template <typename T, typename W, bool SILU>
__device__ void bstats(const T* __restrict__ x, const T* __restrict__ dy, const W* __restrict__ gamma,
                       const W* __restrict__ beta, const float* __restrict__ mean,
                       const float* __restrict__ rstd, float* __restrict__ part, int HW, int C, int G,
                       int P, int chunks) {
  extern __shared__ float sh[];
  const int chunk = blockIdx.x, n = blockIdx.y, cg = C / G;
  const int p0 = chunk * P, p1 = min(p0 + P, HW);
  const long long base = (long long)n * HW * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const int ng = n * G + c / cg;
    const float m = mean[ng], r = rstd[ng];
    const W gw = gamma[c], bw = beta[c];
    float s1 = 0.f, s2 = 0.f;
    for (int p = p0; p < p1; ++p) {
      const long long o = base + (long long)p * C + c;
      float xh;
      const float u = grad_u<T, W, SILU>(x[o], dy[o], m, r, gw, bw, &xh);
      s1 += u;
      s2 += u * xh;
    }
    sh[c] = s1;
    sh[C + c] = s2;
  }
  __syncthreads();
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    float s1 = 0.f, s2 = 0.f;
    for (int c = g * cg; c < (g + 1) * cg; ++c) {
      s1 += sh[c];
      s2 += sh[C + c];
    }
    float* o = part + (((long long)n * chunks + chunk) * G + g) * 2;
    o[0] = s1;
    o[1] = s2;
  }
}

// One warp per (n, g): coef[n][g] = (mean_g(u), mean_g(u * xhat)).
extern "C" __global__ void gn_bfinalize(const float* __restrict__ part, float* __restrict__ coef,
                                        int N, int HW, int G, int cg, int chunks) {
  const int i = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (i >= N * G) return;  // whole warps leave together
  const int n = i / G, g = i % G;
  const float* pp = part + (long long)n * chunks * G * 2 + g * 2;
  double s1 = 0.0, s2 = 0.0;
  for (int k = lane; k < chunks; k += 32) {
    s1 += (double)pp[(long long)k * G * 2];
    s2 += (double)pp[(long long)k * G * 2 + 1];
  }
  s1 = warp_sum(s1);
  s2 = warp_sum(s2);
  if (lane == 0) {
    const double cnt = (double)HW * cg;
    coef[i * 2] = (float)(s1 / cnt);
    coef[i * 2 + 1] = (float)(s2 / cnt);
  }
}

// dx = rstd * (u - mean_g(u) - xhat * mean_g(u * xhat)); V elements per thread, C % V == 0.
template <typename T, typename W, int V, bool SILU>
__device__ void bapply(const T* __restrict__ x, const T* __restrict__ dy, const W* __restrict__ gamma,
                       const W* __restrict__ beta, const float* __restrict__ mean,
                       const float* __restrict__ rstd, const float* __restrict__ coef,
                       T* __restrict__ dx, long long total, long long HWC, int C, int G) {
  const int cg = C / G;
  const long long stride = (long long)gridDim.x * blockDim.x * V;
  for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * V; i < total; i += stride) {
    const int n = (int)(i / HWC), c0 = (int)(i % C);
    Vec<T, V> xv = *reinterpret_cast<const Vec<T, V>*>(x + i);
    Vec<T, V> gv = *reinterpret_cast<const Vec<T, V>*>(dy + i), out;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = c0 + k, ng = n * G + c / cg;
      const float r = rstd[ng];
      float xh;
      const float u = grad_u<T, W, SILU>(xv.v[k], gv.v[k], mean[ng], r, gamma[c], beta[c], &xh);
      out.v[k] = from_f<T>(r * (u - coef[ng * 2] - xh * coef[ng * 2 + 1]));
    }
    *reinterpret_cast<Vec<T, V>*>(dx + i) = out;
  }
}

// ---- entry points: gn_<kernel>_<x type>_<affine type>[_v<V>][_silu] ----------------------------

#define LF_STATS(TN, T)                                                                          \
  extern "C" __global__ void gn_stats_##TN(const T* x, float* part, int HW, int C, int G, int P, \
                                           int chunks) {                                         \
    stats<T>(x, part, HW, C, G, P, chunks);                                                      \
  }

#define LF_APPLY(TN, T, WN, W, V, SILU, SUFFIX)                                                   \
  extern "C" __global__ void gn_apply_##TN##_##WN##_v##V##SUFFIX(                                 \
      const T* x, const W* gamma, const W* beta, const float* mean, const float* rstd, T* y,     \
      long long total, long long HWC, int C, int G) {                                             \
    apply<T, W, V, SILU>(x, gamma, beta, mean, rstd, y, total, HWC, C, G);                        \
  }                                                                                               \
  extern "C" __global__ void gn_bapply_##TN##_##WN##_v##V##SUFFIX(                                \
      const T* x, const T* dy, const W* gamma, const W* beta, const float* mean,                 \
      const float* rstd, const float* coef, T* dx, long long total, long long HWC, int C,        \
      int G) {                                                                                    \
    bapply<T, W, V, SILU>(x, dy, gamma, beta, mean, rstd, coef, dx, total, HWC, C, G);            \
  }

#define LF_BSTATS(TN, T, WN, W, SILU, SUFFIX)                                                     \
  extern "C" __global__ void gn_bstats_##TN##_##WN##SUFFIX(                                       \
      const T* x, const T* dy, const W* gamma, const W* beta, const float* mean,                 \
      const float* rstd, float* part, int HW, int C, int G, int P, int chunks) {                  \
    bstats<T, W, SILU>(x, dy, gamma, beta, mean, rstd, part, HW, C, G, P, chunks);               \
  }

// V: 16 bytes per access, or 1 when C or an address does not allow it
#define LF_TYPE(TN, T, WN, W, V)           \
  LF_APPLY(TN, T, WN, W, V, false, )       \
  LF_APPLY(TN, T, WN, W, V, true, _silu)   \
  LF_APPLY(TN, T, WN, W, 1, false, )       \
  LF_APPLY(TN, T, WN, W, 1, true, _silu)   \
  LF_BSTATS(TN, T, WN, W, false, )         \
  LF_BSTATS(TN, T, WN, W, true, _silu)

// the C++ side defines LF_WANT_<x type> for the activations' dtype only (less to compile)
#ifdef LF_WANT_F32
LF_STATS(f32, float)
LF_TYPE(f32, float, f32, float, 4)
#endif
#ifdef LF_WANT_BF16
LF_STATS(bf16, bf16)
LF_TYPE(bf16, bf16, bf16, bf16, 8)
LF_TYPE(bf16, bf16, f32, float, 8)
#endif
#ifdef LF_WANT_F16
LF_STATS(f16, f16)
LF_TYPE(f16, f16, f16, f16, 8)
LF_TYPE(f16, f16, f32, float, 8)
#endif
