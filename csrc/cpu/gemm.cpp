// Block-scaled FP8 / FP4 weight decoding and the small-M GEMM used by fp8_gemm, fp4_gemm and
// moe_experts (SPEC §4.6, §4.7, §11.3). Weights stay in their storage format; each row is
// decoded to fp32 (with its block scales applied) right before it is used.
#include <algorithm>

#include "common.h"
#include "kernels.h"

namespace v4k_cpu {

void decode_fp8_row(const uint8_t* row, const float* scale_row, int64_t K, float* dst) {
  for (int64_t k0 = 0; k0 < K; k0 += 128) {
    const float s = scale_row[k0 / 128];
    const int64_t k1 = std::min<int64_t>(K, k0 + 128);
    for (int64_t k = k0; k < k1; ++k) dst[k] = kFp8.v[row[k]] * s;
  }
}

void decode_fp4_row(const uint8_t* row, const float* scale_row, int64_t K, float* dst) {
  for (int64_t i = 0; i < K / 2; ++i) {
    const float s = scale_row[(2 * i) / 32];
    dst[2 * i] = kFp4[row[i] & 0xf] * s;
    dst[2 * i + 1] = kFp4[row[i] >> 4] * s;
  }
}

void decode_weight_row(const WeightView& w, int64_t e, int64_t n, float* dst) {
  const int64_t R = w.rows, K = w.cols;
  if (w.kind == W_FP8) {
    const int64_t kb = (K + 127) / 128, rb = (R + 127) / 128;
    decode_fp8_row(static_cast<const uint8_t*>(w.data) + (e * R + n) * K, w.scales + (e * rb + n / 128) * kb, K, dst);
  } else if (w.kind == W_FP4) {
    decode_fp4_row(static_cast<const uint8_t*>(w.data) + (e * R + n) * (K / 2), w.scales + (e * R + n) * (K / 32), K,
                   dst);
  } else {
    load_row(static_cast<const char*>(w.data) + (e * R + n) * K * elem_size(w.kind), w.kind, dst, K);
  }
}

// C[m, n] = sum_k A[m, k] * W_e[n, k] for n in [n0, n1): one decoded weight row serves all M rows.
void small_m_gemm_rows(const float* A, int64_t M, const WeightView& w, int64_t e, int64_t n0, int64_t n1, float* C,
                       int64_t ldc, float* rowbuf) {
  const int64_t K = w.cols, Kv = K / VW * VW;
  for (int64_t n = n0; n < n1; ++n) {
    decode_weight_row(w, e, n, rowbuf);
    for (int64_t m = 0; m < M; ++m) {
      const float* a = A + m * K;
      vf acc0 = vf{}, acc1 = vf{};
      int64_t k = 0;
      for (; k + 2 * VW <= Kv; k += 2 * VW) {
        acc0 += vload(a + k) * vload(rowbuf + k);
        acc1 += vload(a + k + VW) * vload(rowbuf + k + VW);
      }
      for (; k < Kv; k += VW) acc0 += vload(a + k) * vload(rowbuf + k);
      float s = vsum(acc0 + acc1);
      for (; k < K; ++k) s += a[k] * rowbuf[k];
      C[m * ldc + n] = s;
    }
  }
}

void dequant_weight(const WeightView& w, int64_t e, float* out) {
  const int64_t R = w.rows, K = w.cols;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < R; ++n) decode_weight_row(w, e, n, out + n * K);
}

void weight_gemm_small(const float* A, int64_t M, const WeightView& w, int64_t e, float* C) {
  const int64_t R = w.rows;
  constexpr int64_t NB = 16;
  const int64_t nb = (R + NB - 1) / NB;
#pragma omp parallel
  {
    Scratch s;
    float* rowbuf = s.get(w.cols);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nb; ++b) small_m_gemm_rows(A, M, w, e, b * NB, std::min(R, (b + 1) * NB), C, R, rowbuf);
  }
}

}  // namespace v4k_cpu
