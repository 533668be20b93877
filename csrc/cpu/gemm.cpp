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

// ------------------------------------------------------------------------------------------
// Panel GEMM with a fixed summation order (moe_experts, compress_kv).
//
// C[m, n] = Σ_k A[m, k] · W_e[n, k], accumulated strictly in k order by one FMA chain per output
// element, so a row's result never depends on M, on its position in the call or on the thread
// count (the compressor's chunking invariance rests on this). Each thread decodes a panel of NR
// weight rows into a k-major [K, NR] fp32 buffer (the weight stays in its storage format in
// memory) and sweeps all M rows over it in MR-row register tiles.
namespace v4k_cpu {
namespace {

constexpr int NV = NREG >= 32 ? 4 : 2;  // vectors per panel row
constexpr int64_t NR = NV * VW;         // panel width (weight rows)
constexpr int MR = 6;                   // activation rows per register tile

template <int R>
void panel_tile(const float* A, int64_t lda, const float* P, int64_t K, float* C, int64_t ldc, int64_t ncols) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload(P + k * NR + v * VW);
    for (int r = 0; r < R; ++r) {
      const vf a = vbcast(A[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    if (ncols == NR) {
      for (int v = 0; v < NV; ++v) vstore(C + r * ldc + v * VW, acc[r][v]);
    } else {
      float tmp[NR];
      for (int v = 0; v < NV; ++v) vstore(tmp + v * VW, acc[r][v]);
      for (int64_t j = 0; j < ncols; ++j) C[r * ldc + j] = tmp[j];
    }
  }
}

void panel_rows(const float* A, int64_t M, int64_t lda, const float* P, int64_t K, float* C, int64_t ldc,
                int64_t ncols) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) panel_tile<MR>(A + m * lda, lda, P, K, C + m * ldc, ldc, ncols);
  const float* a = A + m * lda;
  float* c = C + m * ldc;
  switch (M - m) {
    case 5: panel_tile<5>(a, lda, P, K, c, ldc, ncols); break;
    case 4: panel_tile<4>(a, lda, P, K, c, ldc, ncols); break;
    case 3: panel_tile<3>(a, lda, P, K, c, ldc, ncols); break;
    case 2: panel_tile<2>(a, lda, P, K, c, ldc, ncols); break;
    case 1: panel_tile<1>(a, lda, P, K, c, ldc, ncols); break;
    default: break;
  }
}

}  // namespace

void gemm_panels(const GemmJob* jobs, int njobs) {
  std::vector<int64_t> first(njobs + 1, 0);  // first panel index of each job
  for (int j = 0; j < njobs; ++j) first[j + 1] = first[j] + (jobs[j].w.rows + NR - 1) / NR;
  const int64_t total = first[njobs];
  if (total == 0) return;
  int64_t work = 0;
  for (int j = 0; j < njobs; ++j) work += jobs[j].M * jobs[j].w.rows * jobs[j].w.cols;
#pragma omp parallel if (work > (int64_t(1) << 18))
  {
    Scratch ps, rs;
    float* panel = nullptr;
    float* row = nullptr;
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < total; ++p) {
      int j = 0;
      while (first[j + 1] <= p) ++j;
      const GemmJob& jb = jobs[j];
      const int64_t K = jb.w.cols, n0 = (p - first[j]) * NR, nc = std::min<int64_t>(NR, jb.w.rows - n0);
      if (jb.M == 0) continue;
      if (!panel) {
        int64_t kmax = 0;
        for (int i = 0; i < njobs; ++i) kmax = std::max(kmax, jobs[i].w.cols);
        panel = ps.get(kmax * NR);
        row = rs.get(kmax);
      }
      for (int64_t i = 0; i < NR; ++i) {
        if (i < nc) {
          decode_weight_row(jb.w, jb.e, n0 + i, row);
          for (int64_t k = 0; k < K; ++k) panel[k * NR + i] = row[k];
        } else {
          for (int64_t k = 0; k < K; ++k) panel[k * NR + i] = 0.f;
        }
      }
      panel_rows(jb.A, jb.M, jb.lda, panel, K, jb.C + n0, jb.ldc, nc);
    }
  }
}

}  // namespace v4k_cpu
