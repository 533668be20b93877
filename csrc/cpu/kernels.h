// Raw-pointer entry points of the CPU kernels. register.cpp validates and allocates with ATen
// and calls these; the kernel translation units never see a torch header.
#pragma once

#include <cstdint>

namespace v4k_cpu {

// KV storage kinds of sparse_attn: the float codes of common.h (F32/BF16/F16) or the packed
// 584-byte FP8 rows of SPEC §13.1.
constexpr int KV_FP8_PACKED = 100;
constexpr int64_t kPackedRowBytes = 584;

void sparse_attn(const void* q, int q_dtype, const void* kv, int kv_kind, const float* sink,
                 const int32_t* idx, float scale, void* out, int64_t B, int64_t M, int64_t H,
                 int64_t D, int64_t N, int64_t K);

// Indexer key storage: float codes, or these.
constexpr int KEY_FP8 = 101;  // e4m3 [B,N,dI] + fp32 scales [B,N,dI/128]
constexpr int KEY_FP4 = 102;  // packed e2m1 [B,N,dI/2] + fp32 scales [B,N,dI/32]

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
constexpr int W_FP8 = 201;
constexpr int W_FP4 = 202;
struct WeightView {
  const void* data;
  const float* scales;
  int kind;
  int64_t rows, cols;
};

void decode_weight_row(const WeightView& w, int64_t e, int64_t n, float* dst);
// out [rows, cols] fp32 = dequantised weight e
void dequant_weight(const WeightView& w, int64_t e, float* out);
// C [M, rows] fp32 = A [M, cols] fp32 · W_eᵀ, decoding each weight row once (small M)
void weight_gemm_small(const float* A, int64_t M, const WeightView& w, int64_t e, float* C);

}  // namespace v4k_cpu
