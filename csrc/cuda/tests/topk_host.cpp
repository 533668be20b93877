// Host model of the CUDA radix top-k (csrc/cuda/indexer.cu, topk_select_kernel): the same
// passes, built on the same helpers (topk_select.h), executed sequentially. Exposed with C
// linkage for the tests (loaded with ctypes), which compare it to the reference selection.
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "../topk_select.h"

using namespace v4k_topk;

extern "C" void v4k_topk_select_host(const float* scores, const int64_t* limits, int64_t rows, int64_t n, int k,
                                     int64_t offset, int32_t* out) {
  std::vector<uint32_t> hist(kRadixSize);
  std::vector<uint32_t> sel_key;
  std::vector<int> sel_col;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = scores + r * n;
    int64_t lim = limits[r] < n ? limits[r] : n;
    if (lim < 0) lim = 0;
    const int keff = (int)std::min<int64_t>(k, lim);
    int32_t* o = out + r * k;
    if (keff == 0) {
      for (int i = 0; i < k; ++i) o[i] = -1;
      continue;
    }
    // radix passes: same digit order and bucket search as the kernel
    uint32_t prefix = 0, remaining = (uint32_t)keff;
    for (int pass = 0; pass < kPasses; ++pass) {
      std::fill(hist.begin(), hist.end(), 0u);
      const uint32_t mask = prefix_mask(pass);
      for (int64_t c = 0; c < lim; ++c) {
        const uint32_t key = float_key(row[c]);
        if ((key & mask) == prefix) hist[digit_of(key, pass)]++;
      }
      uint32_t above = 0;
      const int d = find_bucket(hist.data(), remaining, &above);
      remaining -= above;
      prefix |= (uint32_t)d << (32 - kRadixBits * (pass + 1));
    }
    const uint32_t thr = prefix;
    const uint32_t need = remaining;  // elements equal to thr to take, lowest columns first
    // selection pass in column order (the kernel assigns equal-key ranks with a block scan)
    sel_key.clear();
    sel_col.clear();
    uint32_t eq_taken = 0;
    for (int64_t c = 0; c < lim; ++c) {
      const uint32_t key = float_key(row[c]);
      if (key > thr || (key == thr && eq_taken++ < need)) {
        sel_key.push_back(key);
        sel_col.push_back((int)c);
      }
    }
    // final order (the kernel runs a bitonic sort with the same comparison)
    std::vector<int> order(sel_key.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = (int)i;
    std::sort(order.begin(), order.end(),
              [&](int a, int b) { return before(sel_key[a], sel_col[a], sel_key[b], sel_col[b]); });
    for (int i = 0; i < k; ++i) o[i] = i < (int)order.size() ? (int32_t)(sel_col[order[i]] + offset) : -1;
  }
}
