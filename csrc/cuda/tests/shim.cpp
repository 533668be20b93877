// Host shim of the compile check (tests/test_cuda_compile.py): calls every C launcher of
// csrc/cuda through launchers.h only, so linking proves each launcher is defined with C linkage
// and the exact declared signature. Run without a GPU, every launch must fail cleanly with a CUDA
// error code (no crash); on a GPU the calls below are valid tiny launches.
#include <stdio.h>

#include "../launchers.h"

int main() {
  int rc[7];
  rc[0] = v4k_topk_select(nullptr, 8, nullptr, 1, 8, 4, 0, nullptr, nullptr);
  rc[1] = v4k_indexer_scores(nullptr, V4K_BF16, nullptr, V4K_BF16, nullptr, V4K_KEYS_FP8, V4K_F32, nullptr, nullptr,
                             nullptr, 1, 16, 64, 128, nullptr, 16, nullptr);
  rc[2] = v4k_hc_pre(nullptr, V4K_BF16, nullptr, nullptr, nullptr, 1, 4096, 20, 1e-6f, 1e-6f, nullptr, nullptr, nullptr,
                     nullptr, nullptr, nullptr);
  rc[3] = v4k_hc_post(nullptr, nullptr, nullptr, nullptr, V4K_BF16, 1, 4, 4096, 0, nullptr, nullptr);
  rc[4] = v4k_compressor_proj(nullptr, V4K_BF16, nullptr, V4K_BF16, nullptr, nullptr, 1, 1024, 4096, 1, 4, nullptr,
                              nullptr);
  rc[5] = v4k_compressor_pool(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, V4K_F32, nullptr,
                              64, 1, 4, 4, 512, 1, V4K_QUANT_FP8, 1e-6f, V4K_BF16, nullptr, nullptr);
  rc[6] = v4k_compressor_state(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, 4, 4, 512, 1, nullptr,
                               nullptr, nullptr, nullptr, nullptr, nullptr);
  for (int i = 0; i < 7; ++i) printf("launcher %d -> %d\n", i, rc[i]);
  return 0;
}
