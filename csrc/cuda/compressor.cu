// KV compressor (SPEC §6): projection GEMM with a fixed per-element summation order (so entries
// do not depend on how a sequence is chunked), channel-wise softmax pooling of every window a
// call closes fused with the epilogue (round to the activation dtype, RMSNorm, RoPE at j*ratio,
// FP8 block-64 or Hadamard + FP4 block-32 simulation), and the canonical state update.
// Mirrors v4kernels/ops/compressor/reference.py; multiplies and adds that the reference rounds
// separately use __fmul_rn/__fadd_rn so nvcc does not contract them into FMAs.
#include "common.cuh"

namespace v4k {
namespace {

// ------------------------------------------------------------------------------ projection
constexpr int kTile = 64, kTk = 16, kProjThreads = 256;

__global__ void __launch_bounds__(kProjThreads) proj_kernel(const void* x, int x_dt, const void* w, int w_dt,
                                                             const float* ape, const int64_t* n_tokens, int64_t m,
                                                             int64_t n, int64_t d, int64_t seq, int ratio,
                                                             float* out) {
  __shared__ float xs[kTk][kTile + 1];
  __shared__ float wsm[kTk][kTile + 1];
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < d; k0 += kTk) {
    for (int i = threadIdx.x; i < kTk * kTile; i += blockDim.x) {
      const int kk = i % kTk, rr = i / kTk;
      const int64_t k = k0 + kk;
      xs[kk][rr] = (m0 + rr < m && k < d) ? load_any(x, (m0 + rr) * d + k, x_dt) : 0.0f;
      wsm[kk][rr] = (n0 + rr < n && k < d) ? load_any(w, (n0 + rr) * d + k, w_dt) : 0.0f;
    }
    __syncthreads();
    for (int kk = 0; kk < kTk; ++kk) {
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(xs[kk][ty * 4 + a], wsm[kk][tx * 4 + b], acc[a][b]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t row = m0 + ty * 4 + a;
    if (row >= m) continue;
    int64_t slot = 0;
    if (ape != nullptr) slot = (n_tokens[row / seq] + row % seq) % ratio;  // gate bias ape[p % ratio]
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t col = n0 + tx * 4 + b;
      if (col >= n) continue;
      out[row * n + col] = ape != nullptr ? __fadd_rn(acc[a][b], ape[slot * n + col]) : acc[a][b];
    }
  }
}

// ------------------------------------------------------------------------------ timeline
// Row t of a sequence's timeline (open-window pending rows, then the call's new rows), column c.
__device__ __forceinline__ float timeline(const float* pend, const float* fresh, int64_t b, int64_t t, int64_t k,
                                          int64_t seq, int ratio, int64_t width, int64_t c) {
  return t < k ? pend[(b * ratio + t) * width + c] : fresh[(b * seq + t - k) * width + c];
}

constexpr int kPoolThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kPoolThreads) pool_kernel(
    const float* pend_kv, const float* pend_sc, const float* new_kv, const float* new_sc, const float* prev_kv,
    const float* prev_sc, const int64_t* n_tokens, const void* norm_w, int nw_dt, const float* freqs, int rope_dim,
    int64_t seq, int ratio, int hd, int overlap, int quant, float eps, T* entries, int64_t n_rows) {
  extern __shared__ float y[];  // [hd] pooled / finished entry
  __shared__ float red[kPoolThreads / 32];
  __shared__ int s_exp[64];  // one scale exponent per quantisation block (hd <= 2048)
  const int64_t b = blockIdx.x / n_rows, w = blockIdx.x % n_rows;  // flat grid: sequences x output rows
  const int64_t n0 = n_tokens[b];
  const int64_t k = n0 % ratio;
  const int64_t nwin = (k + seq) / ratio;
  T* out = entries + (b * n_rows + w) * hd;
  if (w >= nwin) {  // rows past num_new are zeros
    for (int d = threadIdx.x; d < hd; d += blockDim.x) out[d] = from_f32<T>(0.0f);
    return;
  }
  const int64_t j = n0 / ratio + w;  // absolute window index
  const int64_t width = static_cast<int64_t>(overlap ? 2 : 1) * hd;
  const int64_t cb = overlap ? hd : 0;  // CSA: this window contributes its Cb / Zb halves
  // previous-window slots (CSA only): none for window 0, the timeline, or the stored Ca/Za halves
  const int n_prev = (overlap && j > 0) ? ratio : 0;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    auto prev_sc_at = [&](int i) {
      return w >= 1 ? timeline(pend_sc, new_sc, b, (w - 1) * ratio + i, k, seq, ratio, width, d)
                    : prev_sc[(b * ratio + i) * hd + d];
    };
    auto prev_kv_at = [&](int i) {
      return w >= 1 ? timeline(pend_kv, new_kv, b, (w - 1) * ratio + i, k, seq, ratio, width, d)
                    : prev_kv[(b * ratio + i) * hd + d];
    };
    float mx = -INFINITY;
    for (int i = 0; i < n_prev; ++i) mx = fmaxf(mx, prev_sc_at(i));
    for (int i = 0; i < ratio; ++i) mx = fmaxf(mx, timeline(pend_sc, new_sc, b, w * ratio + i, k, seq, ratio, width, cb + d));
    float den = 0.0f;
    for (int i = 0; i < n_prev; ++i) den = __fadd_rn(den, expf(prev_sc_at(i) - mx));
    for (int i = 0; i < ratio; ++i)
      den = __fadd_rn(den, expf(timeline(pend_sc, new_sc, b, w * ratio + i, k, seq, ratio, width, cb + d) - mx));
    // sum_i kv_i * (e_i / den), slot order as the reference (previous window first)
    float acc = 0.0f;
    for (int i = 0; i < n_prev; ++i)
      acc = __fadd_rn(acc, __fmul_rn(prev_kv_at(i), __fdiv_rn(expf(prev_sc_at(i) - mx), den)));
    for (int i = 0; i < ratio; ++i) {
      const int64_t t = w * ratio + i;
      const float e = expf(timeline(pend_sc, new_sc, b, t, k, seq, ratio, width, cb + d) - mx);
      acc = __fadd_rn(acc, __fmul_rn(timeline(pend_kv, new_kv, b, t, k, seq, ratio, width, cb + d), __fdiv_rn(e, den)));
    }
    y[d] = round_to<T>(acc);  // pooled vector rounded to the activation dtype
  }
  __syncthreads();
  // RMSNorm: y * rsqrt(mean(y^2) + eps) * weight, one rounding
  float ss = 0.0f;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) ss = fmaf(y[d], y[d], ss);
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
  __syncthreads();
  float tot = 0.0f;
  for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) tot += red[i];
  const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(tot, static_cast<float>(hd)), eps)));
  for (int d = threadIdx.x; d < hd; d += blockDim.x) y[d] = round_to<T>(__fmul_rn(__fmul_rn(y[d], inv), load_any(norm_w, d, nw_dt)));
  __syncthreads();
  // RoPE on the trailing rope_dim dims (interleaved pairs) at position j*ratio
  const int nope = hd - rope_dim;
  const float pos = static_cast<float>(j * ratio);
  for (int i = threadIdx.x; i < rope_dim / 2; i += blockDim.x) {
    const float ang = __fmul_rn(pos, freqs[i]);
    const float cs = cosf(ang), sn = sinf(ang);
    const float a = y[nope + 2 * i], bb = y[nope + 2 * i + 1];
    y[nope + 2 * i] = round_to<T>(__fsub_rn(__fmul_rn(a, cs), __fmul_rn(bb, sn)));
    y[nope + 2 * i + 1] = round_to<T>(__fadd_rn(__fmul_rn(a, sn), __fmul_rn(bb, cs)));
  }
  __syncthreads();
  if (quant == V4K_QUANT_FP8) {
    // FP8 e4m3 with a power-of-two scale per 64 dims, nope dims only
    for (int blk = threadIdx.x; blk < nope / 64; blk += blockDim.x) {
      float amax = 0.0f;
      for (int i = 0; i < 64; ++i) amax = fmaxf(amax, fabsf(y[blk * 64 + i]));
      s_exp[blk] = pow2_scale_exp(fmaxf(amax, 1e-4f), 1.0f / 448.0f);
    }
    __syncthreads();
    for (int d = threadIdx.x; d < nope; d += blockDim.x) {
      const int e = s_exp[d / 64];
      y[d] = round_to<T>(e4m3_decode(e4m3_encode(y[d] * exp2i(-e))) * exp2i(e));
    }
  } else if (quant == V4K_QUANT_FP4) {
    // Sylvester Hadamard of order hd (a power of two), scaled hd^-0.5, rounded once
    for (int h = 1; h < hd; h <<= 1) {
      for (int i = threadIdx.x; i < hd / 2; i += blockDim.x) {
        const int lo = (i / h) * 2 * h + (i % h), hi = lo + h;
        const float u = y[lo], v = y[hi];
        y[lo] = __fadd_rn(u, v);
        y[hi] = __fsub_rn(u, v);
      }
      __syncthreads();
    }
    const float hs = static_cast<float>(1.0 / sqrt(static_cast<double>(hd)));
    for (int d = threadIdx.x; d < hd; d += blockDim.x) y[d] = round_to<T>(__fmul_rn(y[d], hs));
    __syncthreads();
    // FP4 e2m1 with a power-of-two scale per 32 dims
    for (int blk = threadIdx.x; blk < hd / 32; blk += blockDim.x) {
      float amax = 0.0f;
      for (int i = 0; i < 32; ++i) amax = fmaxf(amax, fabsf(y[blk * 32 + i]));
      s_exp[blk] = pow2_scale_exp(fmaxf(amax, 6.0f * 1.1754943508222875e-38f), 1.0f / 6.0f);
    }
    __syncthreads();
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
      const int e = s_exp[d / 32];
      y[d] = round_to<T>(e2m1_decode(e2m1_encode(y[d] * exp2i(-e))) * exp2i(e));
    }
  }
  __syncthreads();
  for (int d = threadIdx.x; d < hd; d += blockDim.x) out[d] = from_f32<T>(y[d]);
}

// ------------------------------------------------------------------------------ state
__global__ void state_kernel(const float* pend_kv, const float* pend_sc, const float* new_kv, const float* new_sc,
                             const float* prev_kv, const float* prev_sc, const int64_t* n_tokens, int64_t seq,
                             int ratio, int hd, int overlap, float* o_pkv, float* o_psc, float* o_vkv, float* o_vsc,
                             int32_t* num_new) {
  const int64_t b = blockIdx.x / ratio;
  const int t = static_cast<int>(blockIdx.x % ratio);  // slot of the open window
  const int64_t n0 = n_tokens[b];
  const int64_t k = n0 % ratio;
  const int64_t nwin = (k + seq) / ratio;
  const int64_t rem = k + seq - nwin * ratio;
  const int64_t width = static_cast<int64_t>(overlap ? 2 : 1) * hd;
  const int64_t orow = b * ratio + t;
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
    const bool keep = t < rem;  // canonical 0 / -inf outside the open window
    o_pkv[orow * width + c] = keep ? timeline(pend_kv, new_kv, b, nwin * ratio + t, k, seq, ratio, width, c) : 0.0f;
    o_psc[orow * width + c] = keep ? timeline(pend_sc, new_sc, b, nwin * ratio + t, k, seq, ratio, width, c) : -INFINITY;
  }
  if (overlap) {  // Ca / Za halves of the last window this call closed; unchanged if none
    for (int64_t c = threadIdx.x; c < hd; c += blockDim.x) {
      if (nwin > 0) {
        o_vkv[orow * hd + c] = timeline(pend_kv, new_kv, b, (nwin - 1) * ratio + t, k, seq, ratio, width, c);
        o_vsc[orow * hd + c] = timeline(pend_sc, new_sc, b, (nwin - 1) * ratio + t, k, seq, ratio, width, c);
      } else {
        o_vkv[orow * hd + c] = prev_kv[orow * hd + c];
        o_vsc[orow * hd + c] = prev_sc[orow * hd + c];
      }
    }
  }
  if (t == 0 && threadIdx.x == 0) num_new[b] = static_cast<int32_t>(nwin);
}

template <typename T>
int launch_pool(const float* pkv, const float* psc, const float* nkv, const float* nsc, const float* vkv,
                const float* vsc, const int64_t* n_tokens, const void* norm_w, int nw_dt, const float* freqs,
                int rope_dim, int64_t batch, int64_t seq, int ratio, int hd, int overlap, int quant, float eps,
                void* entries, cudaStream_t st) {
  const int64_t n_rows = (seq + ratio - 1) / ratio;
  pool_kernel<T><<<static_cast<unsigned>(batch * n_rows), kPoolThreads, sizeof(float) * hd, st>>>(pkv, psc, nkv, nsc, vkv, vsc, n_tokens, norm_w, nw_dt,
                                                                  freqs, rope_dim, seq, ratio, hd, overlap, quant, eps,
                                                                  static_cast<T*>(entries), n_rows);
  return cudaGetLastError();
}

}  // namespace
}  // namespace v4k

extern "C" int v4k_compressor_proj(const void* x, int x_dtype, const void* w, int w_dtype, const float* ape,
                                   const int64_t* n_tokens, int64_t m, int64_t n, int64_t d, int64_t seq, int ratio,
                                   float* out, void* stream) {
  if (m == 0 || n == 0) return 0;
  const dim3 grid(v4k::cdiv(n, v4k::kTile), v4k::cdiv(m, v4k::kTile));
  v4k::proj_kernel<<<grid, v4k::kProjThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, x_dtype, w, w_dtype, ape,
                                                                                        n_tokens, m, n, d, seq, ratio, out);
  return cudaGetLastError();
}

extern "C" int v4k_compressor_pool(const float* pend_kv, const float* pend_sc, const float* new_kv,
                                   const float* new_sc, const float* prev_kv, const float* prev_sc,
                                   const int64_t* n_tokens, const void* norm_w, int nw_dtype, const float* freqs,
                                   int rope_dim, int64_t batch, int64_t seq, int ratio, int hd, int overlap, int quant,
                                   float eps, int dtype, void* entries, void* stream) {
  if (batch == 0 || seq == 0) return 0;
  if (hd > 2048 || (quant == V4K_QUANT_FP8 && (hd - rope_dim) % 64) || (quant == V4K_QUANT_FP4 && (hd & (hd - 1))))
    return cudaErrorInvalidValue;
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case V4K_F32:
      return v4k::launch_pool<float>(pend_kv, pend_sc, new_kv, new_sc, prev_kv, prev_sc, n_tokens, norm_w, nw_dtype,
                                     freqs, rope_dim, batch, seq, ratio, hd, overlap, quant, eps, entries, st);
    case V4K_BF16:
      return v4k::launch_pool<__nv_bfloat16>(pend_kv, pend_sc, new_kv, new_sc, prev_kv, prev_sc, n_tokens, norm_w,
                                             nw_dtype, freqs, rope_dim, batch, seq, ratio, hd, overlap, quant, eps,
                                             entries, st);
    case V4K_F16:
      return v4k::launch_pool<__half>(pend_kv, pend_sc, new_kv, new_sc, prev_kv, prev_sc, n_tokens, norm_w, nw_dtype,
                                      freqs, rope_dim, batch, seq, ratio, hd, overlap, quant, eps, entries, st);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" int v4k_compressor_state(const float* pend_kv, const float* pend_sc, const float* new_kv,
                                    const float* new_sc, const float* prev_kv, const float* prev_sc,
                                    const int64_t* n_tokens, int64_t batch, int64_t seq, int ratio, int hd, int overlap,
                                    float* out_pend_kv, float* out_pend_sc, float* out_prev_kv, float* out_prev_sc,
                                    int32_t* num_new, void* stream) {
  if (batch == 0) return 0;
  v4k::state_kernel<<<static_cast<unsigned>(batch * ratio), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      pend_kv, pend_sc, new_kv, new_sc, prev_kv, prev_sc, n_tokens, seq, ratio, hd, overlap, out_pend_kv, out_pend_sc,
      out_prev_kv, out_prev_sc, num_new);
  return cudaGetLastError();
}
