// GEGLU's activation, forward and gradient, on the projection's output: diffusers' GEGLU
// (src/diffusers/models/activations.py) computes hidden, gate = proj(x).chunk(2, -1) and
// hidden * gelu(gate) with the exact (erf) GELU. On hg = [rows, 2 * inner] (hidden | gate):
//   out = h * gelu(g);   dh = dout * gelu(g);   dg = dout * h * gelu'(g),
//   gelu(g) = g * Phi(g),  gelu'(g) = Phi(g) + g * phi(g)  (Phi, phi: the normal CDF and density).
// One kernel each way instead of torch's gelu, product and their backward kernels on strided
// halves, and autograd keeps only hg (torch's keeps hg through the hidden view plus gelu(g)).

__device__ __forceinline__ float normal_cdf(float g) { return 0.5f * (1.f + erff(g * 0.70710678118654752f)); }
__device__ __forceinline__ float normal_pdf(float g) { return 0.39894228040143268f * expf(-0.5f * g * g); }

// V elements per thread, inner % V == 0
template <typename T, int V>
__device__ void geglu_fwd(const T* __restrict__ hg, T* __restrict__ out, long long rows, int inner) {
  const long long total = rows * inner;
  const long long stride = (long long)gridDim.x * blockDim.x * V;
  for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * V; i < total; i += stride) {
    const long long r = i / inner;
    const int c = (int)(i % inner);
    const T* row = hg + r * 2 * inner;
    const Vec<T, V> h = *reinterpret_cast<const Vec<T, V>*>(row + c);
    const Vec<T, V> g = *reinterpret_cast<const Vec<T, V>*>(row + inner + c);
    Vec<T, V> o;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float gv = to_f(g.v[k]);
      o.v[k] = from_f<T>(to_f(h.v[k]) * gv * normal_cdf(gv));
    }
    *reinterpret_cast<Vec<T, V>*>(out + i) = o;
  }
}

template <typename T, int V>
__device__ void geglu_bwd(const T* __restrict__ hg, const T* __restrict__ dout, T* __restrict__ dhg,
                          long long rows, int inner) {
  const long long total = rows * inner;
  const long long stride = (long long)gridDim.x * blockDim.x * V;
  for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * V; i < total; i += stride) {
    const long long r = i / inner;
    const int c = (int)(i % inner);
    const T* row = hg + r * 2 * inner;
    const Vec<T, V> h = *reinterpret_cast<const Vec<T, V>*>(row + c);
    const Vec<T, V> g = *reinterpret_cast<const Vec<T, V>*>(row + inner + c);
    const Vec<T, V> d = *reinterpret_cast<const Vec<T, V>*>(dout + i);
    Vec<T, V> dh, dg;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float gv = to_f(g.v[k]), dv = to_f(d.v[k]), cdf = normal_cdf(gv);
      dh.v[k] = from_f<T>(dv * gv * cdf);
      dg.v[k] = from_f<T>(dv * to_f(h.v[k]) * (cdf + gv * normal_pdf(gv)));
    }
    T* drow = dhg + r * 2 * inner;
    *reinterpret_cast<Vec<T, V>*>(drow + c) = dh;
    *reinterpret_cast<Vec<T, V>*>(drow + inner + c) = dg;
  }
}

#define LF_GEGLU(TN, T, V)                                                                          \
  extern "C" __global__ void geglu_fwd_##TN##_v##V(const T* hg, T* out, long long rows, int inner) { \
    geglu_fwd<T, V>(hg, out, rows, inner);                                                          \
  }                                                                                                 \
  extern "C" __global__ void geglu_bwd_##TN##_v##V(const T* hg, const T* dout, T* dhg,             \
                                                   long long rows, int inner) {                     \
    geglu_bwd<T, V>(hg, dout, dhg, rows, inner);                                                    \
  }

#ifdef LF_WANT_F32
LF_GEGLU(f32, float, 4)
LF_GEGLU(f32, float, 1)
#endif
#ifdef LF_WANT_BF16
LF_GEGLU(bf16, bf16, 8)
LF_GEGLU(bf16, bf16, 1)
#endif
#ifdef LF_WANT_F16
LF_GEGLU(f16, f16, 8)
LF_GEGLU(f16, f16, 1)
#endif
