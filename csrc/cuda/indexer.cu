// Lightning-indexer kernels (SPEC §7.2): fp32 weighted-ReLU scores with the causal limit, and a
// radix top-k select per row (topk_select.h) that mirrors the reference's stable descending sort.
#include "common.cuh"
#include "topk_select.h"

namespace v4k {
namespace {

constexpr int kScoreThreads = 256;
constexpr int kScoreKeys = 16;  // keys per score block

// Dequantised key element `d` of key row `row` (fp32, exact: codes times block scale).
__device__ __forceinline__ float key_elem(const void* keys, int fmt, int dt, const float* scales, int64_t row, int dim,
                                          int d) {
  if (fmt == V4K_KEYS_FP8) {
    const uint8_t b = static_cast<const uint8_t*>(keys)[row * dim + d];
    return e4m3_decode(b) * scales[row * (dim / 128) + d / 128];
  }
  if (fmt == V4K_KEYS_FP4) {
    const uint8_t b = static_cast<const uint8_t*>(keys)[row * (dim / 2) + d / 2];
    const uint32_t code = (d & 1) ? (b >> 4) : (b & 0xFu);  // element 2i in the low nibble
    return e2m1_decode(code) * scales[row * (dim / 32) + d / 32];
  }
  return load_any(keys, row * dim + d, dt);
}

// grid (ceil(N / kScoreKeys), rows). Shared: q [H, dI], key tile [kScoreKeys, dI + 1], w [H],
// per-(head, key) terms [H, kScoreKeys].
__global__ void __launch_bounds__(kScoreThreads) indexer_scores_kernel(
    const void* q, int q_dt, const void* w, int w_dt, const void* keys, int fmt, int k_dt, const float* scales,
    const int64_t* row_batch, const int64_t* limits, int64_t n_keys, int heads, int dim, float* out, int64_t ld) {
  extern __shared__ float smem[];
  const int64_t r = blockIdx.x;  // rows on x (up to 2^31 - 1), key tiles strided over y
  const int64_t lim = limits[r] < n_keys ? limits[r] : n_keys;
  float* orow = out + r * ld;
  const int kd = dim + 1;  // padded key rows: no bank conflicts between keys
  float* qs = smem;
  float* ks = qs + heads * dim;
  float* ws = ks + kScoreKeys * kd;
  float* terms = ws + heads;
  const int64_t kb = row_batch[r];
  bool q_loaded = false;
  for (int64_t n0 = static_cast<int64_t>(blockIdx.y) * kScoreKeys; n0 < n_keys;
       n0 += static_cast<int64_t>(gridDim.y) * kScoreKeys) {
    if (n0 >= lim) {  // the whole tile is past the causal limit (uniform over the block)
      for (int j = threadIdx.x; j < kScoreKeys; j += blockDim.x)
        if (n0 + j < n_keys) orow[n0 + j] = -INFINITY;
      continue;
    }
    if (!q_loaded) {
      for (int i = threadIdx.x; i < heads * dim; i += blockDim.x) qs[i] = load_any(q, r * heads * dim + i, q_dt);
      for (int i = threadIdx.x; i < heads; i += blockDim.x) ws[i] = load_any(w, r * heads + i, w_dt);
      q_loaded = true;
    }
    __syncthreads();  // the previous tile's readers are done with ks / terms
    for (int i = threadIdx.x; i < kScoreKeys * dim; i += blockDim.x) {
      const int j = i / dim, d = i % dim;
      const int64_t n = n0 + j;
      ks[j * kd + d] = n < lim ? key_elem(keys, fmt, k_dt, scales, kb * n_keys + n, dim, d) : 0.0f;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < heads * kScoreKeys; p += blockDim.x) {
      const int h = p / kScoreKeys, j = p % kScoreKeys;
      const float* qh = qs + h * dim;
      const float* kj = ks + j * kd;
      float acc = 0.0f;
      for (int d = 0; d < dim; ++d) acc = fmaf(qh[d], kj[d], acc);
      terms[h * kScoreKeys + j] = ws[h] * fmaxf(acc, 0.0f);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < kScoreKeys; j += blockDim.x) {
      const int64_t n = n0 + j;
      if (n >= n_keys) continue;
      float s = 0.0f;
      for (int h = 0; h < heads; ++h) s += terms[h * kScoreKeys + j];
      orow[n] = n < lim ? s : -INFINITY;
    }
  }
}

constexpr int kTopkThreads = 512;
constexpr int kTopkWarps = kTopkThreads / 32;

// Exclusive prefix sum of `v` over the block (thread order) and the block total; all threads
// must call it. `warp_tot` is kTopkWarps words of shared memory.
__device__ __forceinline__ uint32_t block_exclusive_sum(uint32_t v, uint32_t* warp_tot, uint32_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t inc = v;
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t up = __shfl_up_sync(0xffffffffu, inc, off);
    if (lane >= off) inc += up;
  }
  if (lane == 31) warp_tot[warp] = inc;
  __syncthreads();
  uint32_t before = 0, all = 0;
  for (int w = 0; w < kTopkWarps; ++w) {
    const uint32_t t = warp_tot[w];
    if (w < warp) before += t;
    all += t;
  }
  __syncthreads();  // warp_tot is reused by the next call
  *total = all;
  return before + inc - v;
}

// One block per row. Dynamic shared memory: kp keys + kp columns (kp = pow2 >= k).
__global__ void __launch_bounds__(kTopkThreads) topk_select_kernel(const float* scores, int64_t ld,
                                                                    const int64_t* limits, int64_t n, int k,
                                                                    int64_t offset, int32_t* out, int kp) {
  using namespace v4k_topk;
  __shared__ uint32_t warp_tot[kTopkWarps];
  __shared__ uint32_t hist[kRadixSize];
  __shared__ uint32_t s_prefix, s_remaining, s_gt;
  extern __shared__ uint32_t dyn[];
  uint32_t* s_key = dyn;
  int* s_col = reinterpret_cast<int*>(dyn + kp);

  const int64_t r = blockIdx.x;
  const float* row = scores + r * ld;
  int32_t* o = out + r * k;
  int64_t lim = limits[r] < n ? limits[r] : n;
  if (lim < 0) lim = 0;
  const int keff = static_cast<int>(lim < k ? lim : k);
  if (keff == 0) {
    for (int i = threadIdx.x; i < k; i += blockDim.x) o[i] = -1;
    return;
  }
  if (threadIdx.x == 0) {
    s_prefix = 0u;
    s_remaining = static_cast<uint32_t>(keff);
    s_gt = 0u;
  }
  // 1. radix select: the key of the keff-th largest element, and how many equal keys to take
  for (int pass = 0; pass < kPasses; ++pass) {
    for (int i = threadIdx.x; i < kRadixSize; i += blockDim.x) hist[i] = 0u;
    __syncthreads();
    const uint32_t prefix = s_prefix, mask = prefix_mask(pass);
    for (int64_t c = threadIdx.x; c < lim; c += blockDim.x) {
      const uint32_t key = float_key(row[c]);
      if ((key & mask) == prefix) atomicAdd(&hist[digit_of(key, pass)], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      uint32_t above = 0;
      const int d = find_bucket(hist, s_remaining, &above);
      s_remaining -= above;
      s_prefix = prefix | (static_cast<uint32_t>(d) << (32 - kRadixBits * (pass + 1)));
    }
    __syncthreads();
  }
  const uint32_t thr = s_prefix, need = s_remaining;
  const int n_gt = keff - static_cast<int>(need);
  // 2. gather: keys above the threshold in any order, equal keys by column order (block scan)
  uint32_t eq_base = 0;
  for (int64_t c0 = 0; c0 < lim; c0 += blockDim.x) {
    const int64_t c = c0 + threadIdx.x;
    uint32_t key = 0u;
    bool gt = false, eq = false;
    if (c < lim) {
      key = float_key(row[c]);
      gt = key > thr;
      eq = key == thr;
    }
    if (gt) {
      const uint32_t pos = atomicAdd(&s_gt, 1u);
      s_key[pos] = key;
      s_col[pos] = static_cast<int>(c);
    }
    uint32_t total = 0;
    const uint32_t rank = block_exclusive_sum(eq ? 1u : 0u, warp_tot, &total);
    if (eq && eq_base + rank < need) {
      const int pos = n_gt + static_cast<int>(eq_base + rank);
      s_key[pos] = key;
      s_col[pos] = static_cast<int>(c);
    }
    eq_base += total;
  }
  __syncthreads();
  for (int i = keff + threadIdx.x; i < kp; i += blockDim.x) {
    s_key[i] = 0u;
    s_col[i] = 0x7FFFFFFF;
  }
  __syncthreads();
  // 3. bitonic sort of the kp pairs into (key desc, column asc)
  for (int size = 2; size <= kp; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < kp; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const bool first_half = (i & size) == 0;
          const bool j_first = before(s_key[j], s_col[j], s_key[i], s_col[i]);
          if (first_half == j_first) {
            const uint32_t tk = s_key[i];
            s_key[i] = s_key[j];
            s_key[j] = tk;
            const int tc = s_col[i];
            s_col[i] = s_col[j];
            s_col[j] = tc;
          }
        }
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < k; i += blockDim.x)
    o[i] = i < keff ? static_cast<int32_t>(s_col[i] + offset) : -1;
}

}  // namespace
}  // namespace v4k

extern "C" int v4k_indexer_scores(const void* q, int q_dtype, const void* w, int w_dtype, const void* keys,
                                  int key_fmt, int key_dtype, const float* key_scales, const int64_t* row_batch,
                                  const int64_t* limits, int64_t rows, int64_t n_keys, int heads, int dim, float* out,
                                  int64_t ld, void* stream) {
  if (rows == 0 || n_keys == 0) return 0;
  const size_t smem = sizeof(float) * (static_cast<size_t>(heads) * dim + v4k::kScoreKeys * (dim + 1) + heads +
                                       static_cast<size_t>(heads) * v4k::kScoreKeys);
  cudaError_t err = cudaFuncSetAttribute(v4k::indexer_scores_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const int tiles = v4k::cdiv(n_keys, v4k::kScoreKeys);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(tiles < 65535 ? tiles : 65535));
  v4k::indexer_scores_kernel<<<grid, v4k::kScoreThreads, smem, static_cast<cudaStream_t>(stream)>>>(
      q, q_dtype, w, w_dtype, keys, key_fmt, key_dtype, key_scales, row_batch, limits, n_keys, heads, dim, out, ld);
  return cudaGetLastError();
}

extern "C" int v4k_topk_select(const float* scores, int64_t ld, const int64_t* limits, int64_t rows, int64_t n, int k,
                               int64_t offset, int32_t* out, void* stream) {
  if (rows == 0 || k == 0) return 0;
  if (k < 0 || k > V4K_TOPK_MAX) return cudaErrorInvalidValue;
  int kp = 1;
  while (kp < k) kp <<= 1;
  const size_t smem = static_cast<size_t>(kp) * (sizeof(uint32_t) + sizeof(int));
  v4k::topk_select_kernel<<<static_cast<unsigned>(rows), v4k::kTopkThreads, smem,
                            static_cast<cudaStream_t>(stream)>>>(scores, ld, limits, n, k, offset, out, kp);
  return cudaGetLastError();
}
