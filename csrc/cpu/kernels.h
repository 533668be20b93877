// Raw-pointer entry points of the CPU kernels and their capability limits. The <family>_ops.cpp
// bindings validate and allocate with ATen and call these; the kernel translation units never see
// a torch header. Storage codes and the packed KV row come from v4k_formats.h (generated from
// v4kernels/formats.py).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "v4k_formats.h"

namespace v4k_cpu {

using v4k::KEY_FP4;
using v4k::KEY_FP8;
using v4k::KV_FP8_PACKED;
using v4k::kPackedRowBytes;
using v4k::W_FP4;
using v4k::W_FP8;

// Capability limits of these kernels: the one place they are written. The bindings enforce them
// and torch.ops.v4k_cpu.limits() exposes them to Python (the adapters' refusals and the tests
// read them from there).
constexpr int64_t kHcPostMaxStreams = 64;     // hc_post: residual streams
constexpr int64_t kMoeMaxTopk = 64;           // moe_experts: experts per token

// sparse_attn KV storage: a float code (F32/BF16/F16) or KV_FP8_PACKED (584-byte rows, SPEC §13.1).
void sparse_attn(const void* q, int q_dtype, const void* kv, int kv_kind, const float* sink,
                 const int32_t* idx, float scale, void* out, int64_t B, int64_t M, int64_t H,
                 int64_t D, int64_t N, int64_t K);

// Indexer key storage: a float code, KEY_FP8 (e4m3 [B,N,dI] + fp32 scales [B,N,dI/128]) or
// KEY_FP4 (packed e2m1 [B,N,dI/2] + fp32 scales [B,N,dI/32]).

// scores: out [B,S,N] fp32 (nullptr to skip); topk: out_idx [B,S,kout] int32 (nullptr to skip).
void indexer(const void* q, int q_dtype, const void* w, int w_dtype, const void* keys, int key_kind,
             const float* key_scales, const int64_t* positions, int64_t B, int64_t S, int64_t HI,
             int64_t dI, int64_t N, int64_t ratio, float* scores_out, int32_t* topk_out,
             int64_t kout, int64_t offset);

void hc_split_sinkhorn(const float* mixes, const float* hc_scale, const float* hc_base, int64_t T,
                       int64_t hc, int64_t iters, float eps, float* pre, float* post, float* comb);

void hc_pre(const void* x, int x_dtype, const float* hc_fn, const float* hc_scale,
            const float* hc_base, int64_t T, int64_t hc, int64_t D, int64_t iters, float norm_eps,
            float hc_eps, void* x_in, float* post, float* comb);

void hc_post(const void* x, int x_dtype, const void* residual, const float* post,
             const float* comb, int64_t T, int64_t hc, int64_t D, bool bf16_mix, void* out);

// Weights [E, rows, cols] in one of: a float storage code (F32/BF16/F16), e4m3 with fp32 scales
// [E, ceil(rows/128), ceil(cols/128)], or packed e2m1 [E, rows, cols/2] with fp32 scales
// [E, rows, cols/32]. A plain 2-D weight is E = 1.
struct WeightView {
  const void* data;
  const float* scales;  // FP8 / FP4 kinds: fp32 block scales, read in place (or scales_e8m0)
  int kind;
  int64_t rows, cols;
  // float kinds: elements from one expert's matrix to the next (0 = rows·cols); lets a
  // [E, rows, cols] view with row-contiguous experts (e.g. one half of a fused gate_up weight)
  // be read in place
  int64_t expert_stride = 0;
  const uint8_t* scales_e8m0 = nullptr;  // UE8M0 block scales (one byte each) instead of fp32 ones

  // Block scale i as fp32, decoded where it is used (a call touches only the scales of the
  // experts it runs, never a converted copy of all of them). UE8M0: 2^(b - 127), 0xff = NaN.
  // An infinite fp32 scale (not representable in UE8M0) reads as NaN, so every output it scales
  // is NaN whatever the data (docs/numerics.md).
  float scale(int64_t i) const {
    if (scales_e8m0) {
      const uint32_t b = scales_e8m0[i];
      if (b == 0xff) return std::numeric_limits<float>::quiet_NaN();
      const uint32_t bits = b ? b << 23 : 0x00400000u;  // b = 0: 2^-127, an fp32 subnormal
      float f;
      std::memcpy(&f, &bits, sizeof f);
      return f;
    }
    const float s = scales[i];
    return std::isinf(s) ? std::numeric_limits<float>::quiet_NaN() : s;
  }
};

void decode_weight_row(const WeightView& w, int64_t e, int64_t n, float* dst);
// out [rows, cols] fp32 = dequantised weight e
void dequant_weight(const WeightView& w, int64_t e, float* out);
// C [M, rows] fp32 = A [M, cols] fp32 · W_eᵀ, decoding each weight row once (small M)
void weight_gemm_small(const float* A, int64_t M, const WeightView& w, int64_t e, float* C);

// One GEMM of gemm_panels: C [M, w.rows] (row stride ldc) = A [M, w.cols] (row stride lda) · W_eᵀ,
// fp32, each output element one k-ordered FMA chain (independent of M and threading).
struct GemmJob {
  const float* A;
  int64_t M, lda;
  WeightView w;
  int64_t e;
  float* C;
  int64_t ldc;
};
// Runs all jobs in one parallel region (work split over panels of weight rows).
void gemm_panels(const GemmJob* jobs, int njobs);

// grouped_linear (SPEC §9.4): out [T, G, N] (x dtype) = x [T, G, K] · weight[g]ᵀ per group g,
// weight [G, N, K]; x and weight in float storage codes (F32/BF16/F16, may differ), fp32
// accumulation, one rounding. T below kGroupedDirectMaxT streams the weight once from its
// storage format (each output one fixed operation sequence, independent of T and threads);
// larger T runs gemm_panels per group.
constexpr int64_t kGroupedDirectMaxT = 96;
void grouped_linear(const void* x, int x_dtype, const void* w, int w_dtype, int64_t T, int64_t G, int64_t K,
                    int64_t N, void* out);

// moe_experts (SPEC §11.3-11.4): x [T,D] (float code), weights fp32 [T,k], ids int32 [T,k]
// (−1 = skip), w1/w3 [E,I,D], w2 [E,D,I]; out fp32 [T,D]. The input of every quantised (FP8/FP4)
// weight goes through the FP8 act_quant roundtrip (block 128, pow2 scales) first.
void moe_experts(const void* x, int x_dtype, const float* topk_w, const int32_t* topk_ids, int64_t T, int64_t D,
                 int64_t k, const WeightView& w1, const WeightView& w3, const WeightView& w2, int64_t E, int64_t I,
                 float swiglu_limit, bool weight_after_w2, float* out, bool hf_rounding,
                 int out_dtype);

// compress_kv (SPEC §6). quant: 0 none, 1 fp8 (block 64 on the nope dims), 2 fp4 (Hadamard +
// block 32). Inputs are contiguous; the state tensors are read from *_in and written to *_out.
struct CompressArgs {
  const void* x;
  int x_dtype;
  int64_t B, S, D, hd, ratio, nfreq;
  bool overlap;           // CSA overlapping windows (coff = 2)
  WeightView wkv, wgate;  // [coff·hd, D]
  const float* ape;       // [ratio, coff·hd]
  const float* norm_w;    // [hd]
  const float* freqs;     // [nfreq]
  const float* pkv_in;    // [B, ratio, coff·hd]
  const float* psc_in;
  const float* vkv_in;    // [B, ratio, hd] (CSA) or unused
  const float* vsc_in;
  const int64_t* n_tokens;  // [B]
  int quant;
  float eps;
  bool hf_rounding;  // [HF]: projections, softmax weights, products and RoPE tables rounded to x dtype
  void* entries;  // [B, ceil(S/ratio), hd] x dtype
  int32_t* num_new;
  float *pkv_out, *psc_out, *vkv_out, *vsc_out;
  int64_t* n_tokens_out;
};
void compress_kv(const CompressArgs& a);

void hc_head(const void* x, int x_dtype, const float* hc_fn, const float* hc_scale, const float* hc_base, int64_t T,
             int64_t hc, int64_t D, float norm_eps, float hc_eps, void* out);

struct Limit {
  const char* name;
  int64_t value;
};
constexpr Limit kLimits[] = {
    {"hc_post.max_streams", kHcPostMaxStreams},
    {"moe_experts.max_topk", kMoeMaxTopk},
    {"grouped_linear.direct_max_tokens", kGroupedDirectMaxT},
};

}  // namespace v4k_cpu
