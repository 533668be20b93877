// Radix top-k selection shared by the CUDA kernel (indexer.cu) and its host model
// (tests/topk_host.cpp), so the host test exercises the exact digit logic the GPU runs.
//
// Semantics (v4kernels/ops/indexer/reference.py, select_topk): among the first `limit` scores of
// a row, the `min(k, limit)` largest, largest first; equal scores keep the lower column first
// (a stable descending sort); -0.0 and +0.0 are equal. Slots past `min(k, limit)` are -1.
//
// Scores map to order-preserving unsigned keys; an MSB-first radix select over 8-bit digits finds
// the key T of the k-th largest element and `need`, how many elements equal to T are taken
// (the lowest-index ones). Every element with key > T is taken. The k chosen (key, column)
// pairs are then sorted by (key desc, column asc).
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define V4K_HD __host__ __device__ __forceinline__
#else
#define V4K_HD inline
#endif

namespace v4k_topk {

constexpr int kRadixBits = 8;
constexpr int kRadixSize = 1 << kRadixBits;  // 256 buckets per digit
constexpr int kPasses = 32 / kRadixBits;     // 4 passes over a 32-bit key

// fp32 -> uint32 with a < b  <=>  key(a) < key(b); -0.0 is first made +0.0 (they compare equal).
V4K_HD uint32_t float_key(float f) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(f);
#else
  memcpy(&u, &f, sizeof(u));
#endif
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

V4K_HD uint32_t digit_of(uint32_t key, int pass) {
  return (key >> (32 - kRadixBits * (pass + 1))) & (kRadixSize - 1);
}

// Mask of the digits fixed before `pass` (pass 0: none).
V4K_HD uint32_t prefix_mask(int pass) {
  return pass == 0 ? 0u : ~0u << (32 - kRadixBits * pass);
}

// Given the histogram of digit `pass` among the elements matching the prefix, and `remaining`
// (1 <= remaining <= sum(hist)) elements still to pick from them, find the digit whose bucket
// holds the remaining-th largest element. Returns the digit; `*above` = elements in higher buckets.
V4K_HD int find_bucket(const uint32_t* hist, uint32_t remaining, uint32_t* above) {
  uint32_t cum = 0;
  for (int d = kRadixSize - 1; d >= 0; --d) {
    if (cum + hist[d] >= remaining) {
      *above = cum;
      return d;
    }
    cum += hist[d];
  }
  *above = cum;  // unreachable when remaining <= sum(hist)
  return 0;
}

// Sort order of the selected pairs: larger key first, then lower column first.
V4K_HD bool before(uint32_t ka, int ca, uint32_t kb, int cb) {
  return ka > kb || (ka == kb && ca < cb);
}

}  // namespace v4k_topk
