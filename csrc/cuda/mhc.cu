// Manifold-constrained hyper-connections (SPEC §10): hc_pre fused in one launch (mixes GEMM with
// the RMS square sum, Sinkhorn split, stream collapse) and hc_post, both sized for decode.
// Evaluation order follows v4kernels/ops/mhc/reference.py step by step in fp32.
#include "common.cuh"

namespace v4k {
namespace {

constexpr int kHc = 4;
constexpr int kMix = (2 + kHc) * kHc;  // 24
constexpr int kPreThreads = 256;
constexpr int kPreTok = 2;  // tokens per block: each fn element is loaded once for both

__device__ __forceinline__ float sigmoidf_(float v) { return 1.0f / (1.0f + expf(-v)); }

// Sinkhorn split of one token's mixes (reference.sinkhorn_split), fp32.
__device__ void sinkhorn_split(const float* m, const float* scale, const float* base, int iters, float eps, float* pre,
                               float* post, float* c) {
  for (int j = 0; j < kHc; ++j) {
    pre[j] = sigmoidf_(m[j] * scale[0] + base[j]) + eps;
    post[j] = 2.0f * sigmoidf_(m[kHc + j] * scale[1] + base[kHc + j]);
  }
  // comb logits row-major: Cl[j][k] = mixes[2hc + hc*j + k]; softmax over k, + eps
  for (int j = 0; j < kHc; ++j) {
    float l[kHc], mx = -INFINITY;
    for (int k = 0; k < kHc; ++k) {
      l[k] = m[2 * kHc + kHc * j + k] * scale[2] + base[2 * kHc + kHc * j + k];
      mx = fmaxf(mx, l[k]);
    }
    float s = 0.0f;
    for (int k = 0; k < kHc; ++k) {
      l[k] = expf(l[k] - mx);
      s += l[k];
    }
    for (int k = 0; k < kHc; ++k) c[j * kHc + k] = l[k] / s + eps;
  }
  auto col_norm = [&]() {
    for (int k = 0; k < kHc; ++k) {
      float s = 0.0f;
      for (int j = 0; j < kHc; ++j) s += c[j * kHc + k];
      s += eps;
      for (int j = 0; j < kHc; ++j) c[j * kHc + k] /= s;
    }
  };
  col_norm();  // columns first ...
  for (int it = 0; it < iters - 1; ++it) {  // ... then (row, column) pairs
    for (int j = 0; j < kHc; ++j) {
      float s = 0.0f;
      for (int k = 0; k < kHc; ++k) s += c[j * kHc + k];
      s += eps;
      for (int k = 0; k < kHc; ++k) c[j * kHc + k] /= s;
    }
    col_norm();
  }
}

template <typename T>
__global__ void __launch_bounds__(kPreThreads) hc_pre_kernel(const T* x, const float* fn, const float* scale,
                                                              const float* base, int64_t tokens, int dim, int iters,
                                                              float norm_eps, float hc_eps, const float* pre_d,
                                                              const float* pre_sq, T* x_in, float* post, float* comb) {
  constexpr int kAcc = kPreTok * (kMix + 1);  // per token: 24 dot products + the square sum
  __shared__ float red[kPreThreads / 32][kAcc];
  __shared__ float tot[kAcc];
  __shared__ float s_pre[kPreTok][kHc];
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kPreTok;
  const int64_t kdim = static_cast<int64_t>(kHc) * dim;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  if (pre_d == nullptr) {
    float acc[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;
    for (int64_t k = threadIdx.x; k < kdim; k += blockDim.x) {
      float xv[kPreTok];
#pragma unroll
      for (int t = 0; t < kPreTok; ++t) {
        xv[t] = t0 + t < tokens ? to_f32(x[(t0 + t) * kdim + k]) : 0.0f;
        acc[t * (kMix + 1) + kMix] = fmaf(xv[t], xv[t], acc[t * (kMix + 1) + kMix]);
      }
#pragma unroll
      for (int n = 0; n < kMix; ++n) {
        const float f = fn[n * kdim + k];
#pragma unroll
        for (int t = 0; t < kPreTok; ++t) acc[t * (kMix + 1) + n] = fmaf(xv[t], f, acc[t * (kMix + 1) + n]);
      }
    }
#pragma unroll
    for (int i = 0; i < kAcc; ++i) {
      float v = acc[i];
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) red[warp][i] = v;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kAcc; i += blockDim.x) {
      float v = 0.0f;
      for (int w = 0; w < kPreThreads / 32; ++w) v += red[w][i];
      tot[i] = v;
    }
  } else {
    for (int i = threadIdx.x; i < kAcc; i += blockDim.x) {
      const int t = i / (kMix + 1), n = i % (kMix + 1);
      const int64_t tok = t0 + t;
      tot[i] = tok < tokens ? (n < kMix ? pre_d[tok * kMix + n] : pre_sq[tok]) : 0.0f;
    }
  }
  __syncthreads();
  if (threadIdx.x < kPreTok && t0 + threadIdx.x < tokens) {
    const int t = threadIdx.x;
    const int64_t tok = t0 + t;
    // mixes = (x . fn^T) * rsqrt(mean(x^2) + eps)  (reference.mix_logits)
    const float rs = rsqrtf(tot[t * (kMix + 1) + kMix] / static_cast<float>(kdim) + norm_eps);
    float m[kMix], pre[kHc], po[kHc], c[kHc * kHc];
    for (int n = 0; n < kMix; ++n) m[n] = tot[t * (kMix + 1) + n] * rs;
    sinkhorn_split(m, scale, base, iters, hc_eps, pre, po, c);
    for (int j = 0; j < kHc; ++j) {
      s_pre[t][j] = pre[j];
      post[tok * kHc + j] = po[j];
    }
    for (int i = 0; i < kHc * kHc; ++i) comb[tok * kHc * kHc + i] = c[i];
  }
  __syncthreads();
  // collapse: x_in = sum_j pre[j] * x[j], rounded once (reference.collapse)
  for (int t = 0; t < kPreTok; ++t) {
    const int64_t tok = t0 + t;
    if (tok >= tokens) break;
    const T* xt = x + tok * kdim;
    for (int d = threadIdx.x; d < dim; d += blockDim.x) {
      float s = 0.0f;
#pragma unroll
      for (int j = 0; j < kHc; ++j) s += s_pre[t][j] * to_f32(xt[static_cast<int64_t>(j) * dim + d]);
      x_in[tok * dim + d] = from_f32<T>(s);
    }
  }
}

constexpr int kPostThreads = 256;
constexpr int kMaxHc = 8;

template <typename T>
__global__ void __launch_bounds__(kPostThreads) hc_post_kernel(const T* x, const T* res, const float* post,
                                                                const float* comb, int64_t tokens, int hc, int dim,
                                                                int bf16_mix, T* out) {
  const int dtiles = (dim + kPostThreads - 1) / kPostThreads;
  const int64_t tok = static_cast<int64_t>(blockIdx.x) / dtiles;  // one flat grid: tokens x dim tiles
  const int d = static_cast<int>(blockIdx.x % dtiles) * blockDim.x + threadIdx.x;
  if (tok >= tokens || d >= dim) return;
  const float xv = to_f32(x[tok * dim + d]);
  float r[kMaxHc];
  for (int j = 0; j < hc; ++j) r[j] = to_f32(res[(tok * hc + j) * dim + d]);
  const float* p = post + tok * hc;
  const float* c = comb + tok * hc * hc;
  for (int k = 0; k < hc; ++k) {
    float y;
    if (bf16_mix) {
      // [HF] variant: post/comb in the activation dtype, each product/sum rounded to it
      const float a = round_to<T>(round_to<T>(p[k]) * xv);
      float m = 0.0f;
      for (int j = 0; j < hc; ++j) m = fmaf(round_to<T>(c[j * hc + k]), r[j], m);
      y = a + round_to<T>(m);
    } else {
      // out[k] = post[k] x + sum_j C[j,k] R[j]: the residual is mixed with C^T
      float m = 0.0f;
      for (int j = 0; j < hc; ++j) m = fmaf(c[j * hc + k], r[j], m);
      y = p[k] * xv + m;
    }
    out[(tok * hc + k) * dim + d] = from_f32<T>(y);
  }
}

template <typename T>
int launch_pre(const void* x, const float* fn, const float* scale, const float* base, int64_t tokens, int dim,
               int iters, float norm_eps, float hc_eps, const float* pre_d, const float* pre_sq, void* x_in,
               float* post, float* comb, cudaStream_t st) {
  hc_pre_kernel<T><<<cdiv(tokens, kPreTok), kPreThreads, 0, st>>>(static_cast<const T*>(x), fn, scale, base, tokens,
                                                                  dim, iters, norm_eps, hc_eps, pre_d, pre_sq,
                                                                  static_cast<T*>(x_in), post, comb);
  return cudaGetLastError();
}

template <typename T>
int launch_post(const void* x, const void* res, const float* post, const float* comb, int64_t tokens, int hc, int dim,
                int bf16_mix, void* out, cudaStream_t st) {
  const int64_t blocks = tokens * cdiv(dim, kPostThreads);
  hc_post_kernel<T><<<static_cast<unsigned>(blocks), kPostThreads, 0, st>>>(static_cast<const T*>(x), static_cast<const T*>(res), post, comb,
                                                   tokens, hc, dim, bf16_mix, static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace
}  // namespace v4k

extern "C" int v4k_hc_pre(const void* x, int dtype, const float* fn, const float* scale, const float* base,
                          int64_t tokens, int dim, int iters, float norm_eps, float hc_eps, const float* pre_d,
                          const float* pre_sq, void* x_in, float* post, float* comb, void* stream) {
  if (tokens == 0) return 0;
  if ((pre_d == nullptr) != (pre_sq == nullptr)) return cudaErrorInvalidValue;
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case V4K_F32:
      return v4k::launch_pre<float>(x, fn, scale, base, tokens, dim, iters, norm_eps, hc_eps, pre_d, pre_sq, x_in,
                                    post, comb, st);
    case V4K_BF16:
      return v4k::launch_pre<__nv_bfloat16>(x, fn, scale, base, tokens, dim, iters, norm_eps, hc_eps, pre_d, pre_sq,
                                            x_in, post, comb, st);
    case V4K_F16:
      return v4k::launch_pre<__half>(x, fn, scale, base, tokens, dim, iters, norm_eps, hc_eps, pre_d, pre_sq, x_in,
                                     post, comb, st);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" int v4k_hc_post(const void* x, const void* res, const float* post, const float* comb, int dtype,
                           int64_t tokens, int hc, int dim, int bf16_mix, void* out, void* stream) {
  if (tokens == 0 || dim == 0) return 0;
  if (hc < 1 || hc > v4k::kMaxHc) return cudaErrorInvalidValue;
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case V4K_F32:
      return v4k::launch_post<float>(x, res, post, comb, tokens, hc, dim, bf16_mix, out, st);
    case V4K_BF16:
      return v4k::launch_post<__nv_bfloat16>(x, res, post, comb, tokens, hc, dim, bf16_mix, out, st);
    case V4K_F16:
      return v4k::launch_post<__half>(x, res, post, comb, tokens, hc, dim, bf16_mix, out, st);
    default:
      return cudaErrorInvalidValue;
  }
}
