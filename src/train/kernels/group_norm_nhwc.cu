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
// Every kernel reads V channels at a time (16-byte accesses; V = 1 where the channel count or an
// address does not allow it) and keeps what depends on the channel (group statistics, affine
// parameters) in registers while it walks pixels: thread t of a block owns the channel vectors
// t % TCV (+ TCV, ...) with TCV = min(C / V, blockDim.x), and the pixel rows t / TCV (+ R, ...)
// with R = blockDim.x / TCV (the host computes the same layout for the shared memory it gives).
// Frozen affine parameters only (LoRA training): no gamma/beta gradients.

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }

// ---- thread layout -----------------------------------------------------------------------------

struct Lanes {
  int tcv, rows, tc, tr;
  bool active;
};

__device__ __forceinline__ Lanes lanes(int CV) {
  Lanes l;
  l.tcv = min(CV, (int)blockDim.x);
  l.rows = blockDim.x / l.tcv;
  l.tc = threadIdx.x % l.tcv;
  l.tr = threadIdx.x / l.tcv;
  l.active = l.tr < l.rows;
  return l;
}

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

// ---- forward ----------------------------------------------------------------------------------

// Block (chunk, n): the pixels [chunk * P, min(HW, (chunk + 1) * P)) of sample n. Writes, for each
// group, the sum and the second moment about the chunk's own group mean to part[n][chunk][g][0..2].
// One pass: each thread sums d = x - K and d * d with K the chunk's first pixel in that channel
// (the shifted-data formula, exact enough in float for a chunk's few dozen pixels, even far from
// zero), then per channel mean = K + S / cnt and M2 = Q - S^2 / cnt, and per group Chan's formula.
// Shared memory: (2 * rows + 2) * C floats.
template <typename T, int V>
__device__ void stats(const T* __restrict__ x, float* __restrict__ part, int HW, int C, int G, int P,
                      int chunks) {
  extern __shared__ float sh[];
  const Lanes l = lanes(C / V);
  const int chunk = blockIdx.x, n = blockIdx.y, cg = C / G;
  const int p0 = chunk * P, p1 = min(p0 + P, HW);
  const T* xb = x + (long long)n * HW * C;
  float* cmean = sh + 2 * l.rows * C;
  float* cm2 = cmean + C;
  if (l.active) {
    for (int cv = l.tc; cv < C / V; cv += l.tcv) {
      const int c0 = cv * V;
      const Vec<T, V> k = load<T, V>(xb + (long long)p0 * C + c0);
      float s[V], q[V];
#pragma unroll
      for (int j = 0; j < V; ++j) s[j] = q[j] = 0.f;
      for (int p = p0 + l.tr; p < p1; p += l.rows) {
        const Vec<T, V> in = load<T, V>(xb + (long long)p * C + c0);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = to_f(in.v[j]) - to_f(k.v[j]);
          s[j] += d;
          q[j] += d * d;
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        sh[l.tr * C + c0 + j] = s[j];
        sh[(l.rows + l.tr) * C + c0 + j] = q[j];
      }
    }
  }
  __syncthreads();
  const float cnt = (float)(p1 - p0);
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float S = 0.f, Q = 0.f;
    for (int r = 0; r < l.rows; ++r) {
      S += sh[r * C + c];
      Q += sh[(l.rows + r) * C + c];
    }
    cmean[c] = to_f(xb[(long long)p0 * C + c]) + S / cnt;
    cm2[c] = fmaxf(Q - S * S / cnt, 0.f);
  }
  __syncthreads();
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    float m = 0.f;
    for (int c = g * cg; c < (g + 1) * cg; ++c) m += cmean[c];
    m /= (float)cg;
    float q = 0.f;
    for (int c = g * cg; c < (g + 1) * cg; ++c) {
      const float d = cmean[c] - m;
      q += cm2[c] + cnt * d * d;
    }
    float* o = part + (((long long)n * chunks + chunk) * G + g) * 2;
    o[0] = m * cnt * (float)cg;
    o[1] = q;
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

// Block (b, n): y = (x - mean) * rstd * gamma + beta (then SiLU) over the pixel rows
// b * R + tr, + gridDim.x * R, ... of sample n.
template <typename T, typename W, int V, bool SILU>
__device__ void apply(const T* __restrict__ x, const W* __restrict__ gamma,
                      const W* __restrict__ beta, const float* __restrict__ mean,
                      const float* __restrict__ rstd, T* __restrict__ y, int HW, int C, int G) {
  const Lanes l = lanes(C / V);
  if (!l.active) return;
  const int n = blockIdx.y, cg = C / G;
  const long long base = (long long)n * HW * C;
  for (int cv = l.tc; cv < C / V; cv += l.tcv) {
    const int c0 = cv * V;
    float m[V], a[V], b[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int ng = n * G + (c0 + j) / cg;
      m[j] = mean[ng];
      a[j] = rstd[ng] * to_f(gamma[c0 + j]);
      b[j] = to_f(beta[c0 + j]);
    }
    for (int p = blockIdx.x * l.rows + l.tr; p < HW; p += gridDim.x * l.rows) {
      const long long o = base + (long long)p * C + c0;
      const Vec<T, V> in = load<T, V>(x + o);
      Vec<T, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float z = (to_f(in.v[j]) - m[j]) * a[j] + b[j];
        if (SILU) z = z * sigmoid(z);
        out.v[j] = from_f<T>(z);
      }
      *reinterpret_cast<Vec<T, V>*>(y + o) = out;
    }
  }
}

// ---- input gradient ---------------------------------------------------------------------------

// u = gamma * dz (dz: the gradient at the GroupNorm's output, through the SiLU when fused)
template <bool SILU>
__device__ __forceinline__ float grad_u(float xv, float dyv, float m, float r, float gam, float bet,
                                        float* xhat) {
  const float xh = (xv - m) * r;
  float dz = dyv;
  if (SILU) {
    const float z = xh * gam + bet, s = sigmoid(z);
    dz = dz * s * (1.f + z * (1.f - s));
  }
  *xhat = xh;
  return gam * dz;
}

// The per-channel constants of the gradient kernels for channels c0 .. c0 + V of sample n.
template <typename W, int V>
__device__ __forceinline__ void channel_params(const W* __restrict__ gamma, const W* __restrict__ beta,
                                               const float* __restrict__ mean,
                                               const float* __restrict__ rstd, int n, int c0, int G,
                                               int cg, float* m, float* r, float* gam, float* bet) {
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int ng = n * G + (c0 + j) / cg;
    m[j] = mean[ng];
    r[j] = rstd[ng];
    gam[j] = to_f(gamma[c0 + j]);
    bet[j] = to_f(beta[c0 + j]);
  }
}

// Block (chunk, n): per group, the sums of u and u * xhat over the chunk -> part[n][chunk][g][0..2].
// Shared memory: (2 * rows + 2) * C floats.
template <typename T, typename W, int V, bool SILU>
__device__ void bstats(const T* __restrict__ x, const T* __restrict__ dy, const W* __restrict__ gamma,
                       const W* __restrict__ beta, const float* __restrict__ mean,
                       const float* __restrict__ rstd, float* __restrict__ part, int HW, int C, int G,
                       int P, int chunks) {
  extern __shared__ float sh[];
  const Lanes l = lanes(C / V);
  const int chunk = blockIdx.x, n = blockIdx.y, cg = C / G;
  const int p0 = chunk * P, p1 = min(p0 + P, HW);
  const long long base = (long long)n * HW * C;
  float* c1 = sh + 2 * l.rows * C;
  float* c2 = c1 + C;
  if (l.active) {
    for (int cv = l.tc; cv < C / V; cv += l.tcv) {
      const int c0 = cv * V;
      float m[V], r[V], gam[V], bet[V], s1[V], s2[V];
      channel_params<W, V>(gamma, beta, mean, rstd, n, c0, G, cg, m, r, gam, bet);
#pragma unroll
      for (int j = 0; j < V; ++j) s1[j] = s2[j] = 0.f;
      for (int p = p0 + l.tr; p < p1; p += l.rows) {
        const long long o = base + (long long)p * C + c0;
        const Vec<T, V> xv = load<T, V>(x + o), gv = load<T, V>(dy + o);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          float xh;
          const float u = grad_u<SILU>(to_f(xv.v[j]), to_f(gv.v[j]), m[j], r[j], gam[j], bet[j], &xh);
          s1[j] += u;
          s2[j] += u * xh;
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        sh[l.tr * C + c0 + j] = s1[j];
        sh[(l.rows + l.tr) * C + c0 + j] = s2[j];
      }
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float a = 0.f, b = 0.f;
    for (int k = 0; k < l.rows; ++k) {
      a += sh[k * C + c];
      b += sh[(l.rows + k) * C + c];
    }
    c1[c] = a;
    c2[c] = b;
  }
  __syncthreads();
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    float a = 0.f, b = 0.f;
    for (int c = g * cg; c < (g + 1) * cg; ++c) {
      a += c1[c];
      b += c2[c];
    }
    float* o = part + (((long long)n * chunks + chunk) * G + g) * 2;
    o[0] = a;
    o[1] = b;
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

// Block (b, n): dx = rstd * (u - mean_g(u) - xhat * mean_g(u * xhat)) over the pixel rows
// b * R + tr, + gridDim.x * R, ... of sample n.
template <typename T, typename W, int V, bool SILU>
__device__ void bapply(const T* __restrict__ x, const T* __restrict__ dy, const W* __restrict__ gamma,
                       const W* __restrict__ beta, const float* __restrict__ mean,
                       const float* __restrict__ rstd, const float* __restrict__ coef,
                       T* __restrict__ dx, int HW, int C, int G) {
  const Lanes l = lanes(C / V);
  if (!l.active) return;
  const int n = blockIdx.y, cg = C / G;
  const long long base = (long long)n * HW * C;
  for (int cv = l.tc; cv < C / V; cv += l.tcv) {
    const int c0 = cv * V;
    float m[V], r[V], gam[V], bet[V], k1[V], k2[V];
    channel_params<W, V>(gamma, beta, mean, rstd, n, c0, G, cg, m, r, gam, bet);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int ng = n * G + (c0 + j) / cg;
      k1[j] = coef[ng * 2];
      k2[j] = coef[ng * 2 + 1];
    }
    for (int p = blockIdx.x * l.rows + l.tr; p < HW; p += gridDim.x * l.rows) {
      const long long o = base + (long long)p * C + c0;
      const Vec<T, V> xv = load<T, V>(x + o), gv = load<T, V>(dy + o);
      Vec<T, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float xh;
        const float u = grad_u<SILU>(to_f(xv.v[j]), to_f(gv.v[j]), m[j], r[j], gam[j], bet[j], &xh);
        out.v[j] = from_f<T>(r[j] * (u - k1[j] - xh * k2[j]));
      }
      *reinterpret_cast<Vec<T, V>*>(dx + o) = out;
    }
  }
}

// ---- entry points: gn_<kernel>_<x type>[_<affine type>]_v<V>[_silu] ----------------------------

#define LF_STATS(TN, T, V)                                                                       \
  extern "C" __global__ void gn_stats_##TN##_v##V(const T* x, float* part, int HW, int C, int G, \
                                                  int P, int chunks) {                           \
    stats<T, V>(x, part, HW, C, G, P, chunks);                                                   \
  }

#define LF_APPLY(TN, T, WN, W, V, SILU, SUFFIX)                                                   \
  extern "C" __global__ void gn_apply_##TN##_##WN##_v##V##SUFFIX(                                 \
      const T* x, const W* gamma, const W* beta, const float* mean, const float* rstd, T* y,     \
      int HW, int C, int G) {                                                                     \
    apply<T, W, V, SILU>(x, gamma, beta, mean, rstd, y, HW, C, G);                                \
  }                                                                                               \
  extern "C" __global__ void gn_bapply_##TN##_##WN##_v##V##SUFFIX(                                \
      const T* x, const T* dy, const W* gamma, const W* beta, const float* mean,                 \
      const float* rstd, const float* coef, T* dx, int HW, int C, int G) {                        \
    bapply<T, W, V, SILU>(x, dy, gamma, beta, mean, rstd, coef, dx, HW, C, G);                    \
  }                                                                                               \
  extern "C" __global__ void gn_bstats_##TN##_##WN##_v##V##SUFFIX(                                \
      const T* x, const T* dy, const W* gamma, const W* beta, const float* mean,                 \
      const float* rstd, float* part, int HW, int C, int G, int P, int chunks) {                  \
    bstats<T, W, V, SILU>(x, dy, gamma, beta, mean, rstd, part, HW, C, G, P, chunks);            \
  }

// V: 16 bytes per access, or 1 when C or an address does not allow it
#define LF_TYPE(TN, T, WN, W, V)         \
  LF_APPLY(TN, T, WN, W, V, false, )     \
  LF_APPLY(TN, T, WN, W, V, true, _silu) \
  LF_APPLY(TN, T, WN, W, 1, false, )     \
  LF_APPLY(TN, T, WN, W, 1, true, _silu)

// the C++ side defines LF_WANT_<x type> for the activations' dtype only (less to compile)
#ifdef LF_WANT_F32
LF_STATS(f32, float, 4)
LF_STATS(f32, float, 1)
LF_TYPE(f32, float, f32, float, 4)
#endif
#ifdef LF_WANT_BF16
LF_STATS(bf16, bf16, 8)
LF_STATS(bf16, bf16, 1)
LF_TYPE(bf16, bf16, bf16, bf16, 8)
LF_TYPE(bf16, bf16, f32, float, 8)
#endif
#ifdef LF_WANT_F16
LF_STATS(f16, f16, 8)
LF_STATS(f16, f16, 1)
LF_TYPE(f16, f16, f16, f16, 8)
LF_TYPE(f16, f16, f32, float, 8)
#endif
