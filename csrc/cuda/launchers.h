// C launchers of the native CUDA kernels (csrc/cuda/*.cu). Plain C types only, so the binding
// unit (binding.cpp) and the compile-check shim need no CUDA or torch headers to call them.
// Every launcher enqueues on `stream` (a cudaStream_t) and returns a cudaError_t as int (0 = ok).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Float storage codes of activation tensors.
enum { V4K_F32 = 0, V4K_BF16 = 1, V4K_F16 = 2 };
// Indexer key storage: float (dtype code in key_dtype), e4m3 + fp32 scale per 128, packed e2m1 + fp32 per 32.
enum { V4K_KEYS_FLOAT = 0, V4K_KEYS_FP8 = 1, V4K_KEYS_FP4 = 2 };
// Compressor epilogue quantisation.
enum { V4K_QUANT_NONE = 0, V4K_QUANT_FP8 = 1, V4K_QUANT_FP4 = 2 };

// ---------------------------------------------------------------------------------- indexer
// scores[r, c] for rows r = 0..rows-1 of one chunk: sum_h w[r,h] * relu(q[r,h,:] . key[kb(r), c, :]),
// -inf for c >= limits[r]. q [rows, H, dI] (q_dtype), w [rows, H] (w_dtype), keys of batch
// `row_batch[r]` at keys + row_batch[r] * N * key_row_bytes. out [rows, N] fp32 with row stride ld.
int v4k_indexer_scores(const void* q, int q_dtype, const void* w, int w_dtype, const void* keys, int key_fmt,
                       int key_dtype, const float* key_scales, const int64_t* row_batch, const int64_t* limits,
                       int64_t rows, int64_t n_keys, int heads, int dim, float* out, int64_t ld, void* stream);

// Radix top-k per row of scores [rows, ld] among the first min(limits[r], n) columns: out
// [rows, k] int32 = column + offset, largest first, ties to the lower column, -1 past the
// visible count. k <= V4K_TOPK_MAX.
#define V4K_TOPK_MAX 4096
int v4k_topk_select(const float* scores, int64_t ld, const int64_t* limits, int64_t rows, int64_t n, int k,
                    int64_t offset, int32_t* out, void* stream);

// ---------------------------------------------------------------------------------- mHC
// Fused hc_pre for hc = 4: mixes = (x . fn^T) * rsqrt(mean(x^2) + norm_eps), Sinkhorn split,
// collapse. x [T, 4, D] (dtype), fn [24, 4D] fp32, scale [3], base [24] fp32 ->
// x_in [T, D] (dtype), post [T, 4], comb [T, 4, 4] fp32. When `pre_d` ([T, 24] fp32, x . fn^T)
// and `pre_sq` ([T] fp32, sum of x^2) are given, the GEMM is skipped (vendor prenorm GEMM).
int v4k_hc_pre(const void* x, int dtype, const float* fn, const float* scale, const float* base, int64_t tokens,
               int dim, int iters, float norm_eps, float hc_eps, const float* pre_d, const float* pre_sq, void* x_in,
               float* post, float* comb, void* stream);

// hc_post: out[t, k, :] = post[t,k] x[t,:] + sum_j comb[t,j,k] res[t,j,:] (fp32, one rounding),
// or the bf16_mix variant. x [T, D], res/out [T, hc, D] in `dtype`, post [T, hc], comb [T, hc, hc] fp32.
int v4k_hc_post(const void* x, const void* res, const float* post, const float* comb, int dtype, int64_t tokens,
                int hc, int dim, int bf16_mix, void* out, void* stream);

// ---------------------------------------------------------------------------------- compressor
// out[m, n] = sum_k x[m, k] w[n, k] (fp32, fixed k order per element: independent of M), plus
// ape[(n_tokens[m / S] + m % S) % ratio, n] when ape != NULL. x [M, D] (x_dtype), w [N, D] (w_dtype).
int v4k_compressor_proj(const void* x, int x_dtype, const void* w, int w_dtype, const float* ape,
                        const int64_t* n_tokens, int64_t m, int64_t n, int64_t d, int64_t seq, int ratio, float* out,
                        void* stream);

// Pooling of every window a call closes + RMSNorm + RoPE at j*ratio + quantisation epilogue.
// pending_* [B, ratio, W], new_* [B*S, W] (W = coff*hd), prev_* [B, ratio, hd] (overlap only),
// n_tokens [B], norm_w [hd] (nw_dtype), freqs [r/2] -> entries [B, ceil(S/ratio), hd] (dtype).
int v4k_compressor_pool(const float* pend_kv, const float* pend_sc, const float* new_kv, const float* new_sc,
                        const float* prev_kv, const float* prev_sc, const int64_t* n_tokens, const void* norm_w,
                        int nw_dtype, const float* freqs, int rope_dim, int64_t batch, int64_t seq, int ratio, int hd,
                        int overlap, int quant, float eps, int dtype, void* entries, void* stream);

// New canonical compressor state and per-sequence entry counts.
int v4k_compressor_state(const float* pend_kv, const float* pend_sc, const float* new_kv, const float* new_sc,
                         const float* prev_kv, const float* prev_sc, const int64_t* n_tokens, int64_t batch,
                         int64_t seq, int ratio, int hd, int overlap, float* out_pend_kv, float* out_pend_sc,
                         float* out_prev_kv, float* out_prev_sc, int32_t* num_new, void* stream);

#ifdef __cplusplus
}
#endif
