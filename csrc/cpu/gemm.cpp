// Block-scaled FP8 / FP4 weight decoding and the GEMMs used by fp8_gemm, fp4_gemm, moe_experts
// and compress_kv (SPEC §4.6, §4.7, §11.3). Weights stay in their storage format: small-M GEMMs
// on FP8/FP4 weights compute straight from the packed bytes (gemm_direct, at the end); otherwise
// each row is decoded to fp32 (with its block scales applied) right before it is used.
#include <algorithm>
#include <memory>
#include <type_traits>

#include "common.h"
#include "kernels.h"

namespace v4k_cpu {

// One weight row decoded to fp32; its block scales are w.scale(s0 + block).
void decode_fp8_row(const uint8_t* row, const WeightView& w, int64_t s0, int64_t K, float* dst) {
  for (int64_t k0 = 0; k0 < K; k0 += 128) {
    const float s = w.scale(s0 + k0 / 128);
    const int64_t k1 = std::min<int64_t>(K, k0 + 128);
    for (int64_t k = k0; k < k1; ++k) dst[k] = kFp8.v[row[k]] * s;
  }
}

void decode_fp4_row(const uint8_t* row, const WeightView& w, int64_t s0, int64_t K, float* dst) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const float s = w.scale(s0 + b);
    for (int64_t i = 16 * b; i < 16 * b + 16; ++i) {
      dst[2 * i] = kFp4[row[i] & 0xf] * s;
      dst[2 * i + 1] = kFp4[row[i] >> 4] * s;
    }
  }
}

void decode_weight_row(const WeightView& w, int64_t e, int64_t n, float* dst) {
  const int64_t R = w.rows, K = w.cols;
  if (w.kind == W_FP8) {
    const int64_t kb = (K + 127) / 128, rb = (R + 127) / 128;
    decode_fp8_row(static_cast<const uint8_t*>(w.data) + (e * R + n) * K, w, (e * rb + n / 128) * kb, K, dst);
  } else if (w.kind == W_FP4) {
    decode_fp4_row(static_cast<const uint8_t*>(w.data) + (e * R + n) * (K / 2), w, (e * R + n) * (K / 32), K, dst);
  } else {
    const int64_t es = w.expert_stride ? w.expert_stride : R * K;
    load_row(static_cast<const char*>(w.data) + (e * es + n * K) * elem_size(w.kind), w.kind, dst, K);
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
  if (w.kind == W_FP8 || w.kind == W_FP4) {  // straight from the packed weight
    const GemmJob job{A, M, w.cols, w, e, C, w.rows};
    gemm_direct(&job, 1);
    return;
  }
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

// k block of a panel sweep: KC x NR fp32 of the panel (16 KB with AVX2, 32 KB with AVX-512)
// stay in L1 while every MR-row tile of A passes over them.
constexpr int64_t KC = 256;

// C[r, :ncols] (+)= Σ_{k < kl} A[r, k] · P[k, :] for R rows (A and P start at the block's first
// k). `first` = false continues the FMA chain from the partial sums the previous k block stored
// in C (an exact fp32 store / reload), so every output element still sees its products in k
// order, one FMA each, whatever the blocking.
template <int R>
void panel_tile(const float* A, int64_t lda, const float* P, int64_t kl, float* C, int64_t ldc, int64_t ncols,
                bool first) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r) {
    if (first) {
      for (int v = 0; v < NV; ++v) acc[r][v] = vf{};
    } else if (ncols == NR) {
      for (int v = 0; v < NV; ++v) acc[r][v] = vload(C + r * ldc + v * VW);
    } else {
      float tmp[NR] = {};
      for (int64_t j = 0; j < ncols; ++j) tmp[j] = C[r * ldc + j];
      for (int v = 0; v < NV; ++v) acc[r][v] = vload(tmp + v * VW);
    }
  }
  for (int64_t k = 0; k < kl; ++k) {
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

// All M rows of A over one k block of np panels (panel q: [kl x NR] at P + q·pstride, output
// columns n0 + q·NR, nc[q] of them valid). Each MR-row tile of A passes over all np panels while
// it sits in L1, so A streams from memory once per np panels.
void panel_rows(const float* A, int64_t M, int64_t lda, const float* P, int64_t pstride, int np, int64_t kl,
                float* C, int64_t ldc, const int64_t* nc, bool first) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR)
    for (int q = 0; q < np; ++q)
      panel_tile<MR>(A + m * lda, lda, P + q * pstride, kl, C + m * ldc + q * NR, ldc, nc[q], first);
  const float* a = A + m * lda;
  float* c = C + m * ldc;
  for (int q = 0; q < np; ++q) {
    const float* pq = P + q * pstride;
    float* cq = c + q * NR;
    switch (M - m) {
      case 5: panel_tile<5>(a, lda, pq, kl, cq, ldc, nc[q], first); break;
      case 4: panel_tile<4>(a, lda, pq, kl, cq, ldc, nc[q], first); break;
      case 3: panel_tile<3>(a, lda, pq, kl, cq, ldc, nc[q], first); break;
      case 2: panel_tile<2>(a, lda, pq, kl, cq, ldc, nc[q], first); break;
      case 1: panel_tile<1>(a, lda, pq, kl, cq, ldc, nc[q], first); break;
      default: break;
    }
  }
}

// P[k, i] = W_e[n0 + i, k0 + k] for k < kl, i < NR (zero for i >= nc) from a float-stored weight:
// read row by row, written into the L1-resident k block.
template <typename T>
void pack_block(const T* rows, int64_t ld, int64_t nc, int64_t kl, float* P) {
  for (int64_t i = 0; i < NR; ++i) {
    if (i < nc) {
      const T* src = rows + i * ld;
      for (int64_t k = 0; k < kl; ++k) {
        if constexpr (std::is_same_v<T, float>) {
          P[k * NR + i] = src[k];
        } else if constexpr (std::is_same_v<T, uint16_t>) {
          P[k * NR + i] = bf16_to_f32(src[k]);
        }
      }
    } else {
      for (int64_t k = 0; k < kl; ++k) P[k * NR + i] = 0.f;
    }
  }
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// pack_block for fp32 / bf16 rows on AVX2 (NR = 16): 8x8 blocks transposed in registers, so packing
// costs a few shuffles per 8 weights instead of one scattered store per weight (it is most of
// the work when M is small, e.g. the experts of a decode step). Same values as pack_block.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // bf16 -> fp32: the 16 bits shifted into the high half
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

template <typename T>
void pack_block_avx2(const T* rows, int64_t ld, int64_t nc, int64_t kl, float* P) {
  static_assert(NR == 16, "two 8-row halves per panel");
  if (nc < NR || kl % 8 != 0) {
    pack_block(rows, ld, nc, kl, P);
    return;
  }
  for (int h = 0; h < 2; ++h) {
    const T* r0 = rows + 8 * h * ld;
    for (int64_t k = 0; k < kl; k += 8) {
      __m256 t[8], u[8];
      for (int i = 0; i < 8; ++i) t[i] = load8(r0 + i * ld + k);
      for (int i = 0; i < 8; i += 2) {
        u[i] = _mm256_unpacklo_ps(t[i], t[i + 1]);
        u[i + 1] = _mm256_unpackhi_ps(t[i], t[i + 1]);
      }
      // u0 = a0 b0 a1 b1 | a4 b4 a5 b5, u1 = a2 b2 a3 b3 | a6 b6 a7 b7 (rows a, b = 0, 1), ...
      for (int i = 0; i < 8; i += 4) {
        t[i] = _mm256_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        t[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        t[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        t[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      // t0..t3: columns 0,1,2,3 | 4,5,6,7 of rows 0-3; t4..t7: the same for rows 4-7
      for (int c = 0; c < 4; ++c) {
        _mm256_storeu_ps(P + (k + c) * NR + 8 * h, _mm256_permute2f128_ps(t[c], t[4 + c], 0x20));
        _mm256_storeu_ps(P + (k + 4 + c) * NR + 8 * h, _mm256_permute2f128_ps(t[c], t[4 + c], 0x31));
      }
    }
  }
}
#endif

void pack_block_f16(const uint16_t* rows, int64_t ld, int64_t nc, int64_t kl, float* P) {
  for (int64_t i = 0; i < NR; ++i)
    for (int64_t k = 0; k < kl; ++k) P[k * NR + i] = i < nc ? f16_to_f32(rows[i * ld + k]) : 0.f;
}

}  // namespace

void gemm_panels(const GemmJob* jobs, int njobs) {
  // Work unit = NR·PU weight rows x at most MB rows of A: small enough that the last units of a
  // call end close together (a thread that loses its core for a while holds back one small unit,
  // not a share of the call), large enough that packing the weight block is a few % of the unit.
  constexpr int PU = 4;        // panels per work unit
  constexpr int64_t MB = 288;  // rows of A per work unit (a multiple of MR)
  std::vector<int64_t> first(njobs + 1, 0), nmb(njobs);  // first unit index / row blocks of each job
  for (int j = 0; j < njobs; ++j) {
    nmb[j] = (jobs[j].M + MB - 1) / MB;
    first[j + 1] = first[j] + (jobs[j].w.rows + NR * PU - 1) / (NR * PU) * nmb[j];
  }
  const int64_t total = first[njobs];
  if (total == 0) return;
  int64_t work = 0, kmax = 0;
  for (int j = 0; j < njobs; ++j) {
    work += jobs[j].M * jobs[j].w.rows * jobs[j].w.cols;
    kmax = std::max(kmax, jobs[j].w.cols);
  }
  // Below ~16M multiply-adds (a decode step's projections: a few ms on one thread) the call stays
  // on this thread: a fork/join gains little there and, when a core is shared with another
  // process, waits for a descheduled worker far longer than the GEMM itself takes.
#pragma omp parallel if (work >= (int64_t(1) << 24))
  {
    Scratch ps, rs;
    float* panel = nullptr;
    float* row = nullptr;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < total; ++u) {
      int j = 0;
      while (first[j + 1] <= u) ++j;
      const GemmJob& jb0 = jobs[j];
      const int64_t rg = (u - first[j]) / nmb[j], m0 = (u - first[j]) % nmb[j] * MB;
      GemmJob jb = jb0;  // this unit's rows of A and C
      jb.A = jb0.A + m0 * jb0.lda;
      jb.C = jb0.C + m0 * jb0.ldc;
      jb.M = std::min(MB, jb0.M - m0);
      const int64_t K = jb.w.cols, n0 = rg * NR * PU;
      int64_t nc[PU];
      int np = 0;
      for (; np < PU && n0 + np * NR < jb.w.rows; ++np) nc[np] = std::min<int64_t>(NR, jb.w.rows - n0 - np * NR);
      const int kind = jb.w.kind;
      if (kind == W_FP8 || kind == W_FP4) {  // whole rows decoded (block scales), then the k blocks
        if (!row) row = rs.get(kmax);
        float* pn = ps.get(PU * kmax * NR);
        for (int q = 0; q < np; ++q)
          for (int64_t i = 0; i < NR; ++i) {
            float* pq = pn + q * K * NR;
            if (i < nc[q]) {
              decode_weight_row(jb.w, jb.e, n0 + q * NR + i, row);
              for (int64_t k = 0; k < K; ++k) pq[k * NR + i] = row[k];
            } else {
              for (int64_t k = 0; k < K; ++k) pq[k * NR + i] = 0.f;
            }
          }
        for (int64_t k0 = 0; k0 < K; k0 += KC)
          panel_rows(jb.A + k0, jb.M, jb.lda, pn + k0 * NR, K * NR, np, std::min(KC, K - k0), jb.C + n0, jb.ldc, nc,
                     k0 == 0);
        continue;
      }
      // float weights: each k block of the unit's panels is packed right before the M rows sweep it
      if (!panel) panel = ps.get(PU * KC * NR);
      const int64_t es = jb.w.expert_stride ? jb.w.expert_stride : jb.w.rows * K;
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kl = std::min(KC, K - k0);
        for (int q = 0; q < np; ++q) {
          const int64_t off = jb.e * es + (n0 + q * NR) * K + k0;
          float* pq = panel + q * KC * NR;
          if (kind == F32) {
#if defined(__AVX2__) && !defined(__AVX512F__)
            pack_block_avx2(static_cast<const float*>(jb.w.data) + off, K, nc[q], kl, pq);
#else
            pack_block(static_cast<const float*>(jb.w.data) + off, K, nc[q], kl, pq);
#endif
          } else if (kind == BF16) {
#if defined(__AVX2__) && !defined(__AVX512F__)
            pack_block_avx2(static_cast<const uint16_t*>(jb.w.data) + off, K, nc[q], kl, pq);
#else
            pack_block(static_cast<const uint16_t*>(jb.w.data) + off, K, nc[q], kl, pq);
#endif
          } else {
            pack_block_f16(static_cast<const uint16_t*>(jb.w.data) + off, K, nc[q], kl, pq);
          }
        }
        panel_rows(jb.A + k0, jb.M, jb.lda, panel, KC * NR, np, kl, jb.C + n0, jb.ldc, nc, k0 == 0);
      }
    }
  }
}

}  // namespace v4k_cpu

// ------------------------------------------------------------------------------------------
// Direct small-M GEMM from packed FP8 / FP4 weights (fp8_gemm / fp4_gemm below M = 32, the
// quantised experts of moe_experts).
//
// At decode sizes the GEMM is bound by weight traffic, so weights are never written out as fp32:
// each tile decodes DRN weight rows block by block in registers and multiplies them straight into
// the accumulators of up to DMT activation rows; the packed rows stream from memory once per DMT
// activation rows. Decoded values equal the reference's dequantisation exactly (SPEC §4.6, §4.7):
// FP4 looks its nibbles up in the 16-entry e2m1 table pre-multiplied by the block's scale (the
// same product kFp4[c]·s); FP8 maps e4m3 onto fp16 bits (exponent re-biased by 2^-8, subnormals
// included) and multiplies by 256·s, one rounding of the same exact product as kFp8[b]·s.
//
// Summation order, per output element (m, n): one VW-lane fp32 accumulator takes FMAs in k order
// (FP4 blocks: the 16 low-nibble elements, then the 16 high-nibble ones, against activations
// stored in that order), then the lanes are summed in order (FP8: plus a scalar tail for K % VW).
// It depends only on (m, n), never on M, the tile shape, the job mix or the thread count, so a
// token's expert output does not change with the other tokens routed to the same expert.
namespace v4k_cpu {
namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define V4K_DIRECT_AVX512 1
#elif defined(__AVX2__) && defined(__F16C__) && !defined(__AVX512F__)
#define V4K_DIRECT_AVX2 1
#endif

// AVX-512 (32 registers, decodes of one or two instructions) runs register tiles of DRN weight
// rows x DMT activation rows over the whole K. Other ISAs (AVX2: 16 registers, decodes of several
// instructions) share each decoded weight vector among DMT = 8 activation rows instead, and sweep
// K in blocks of DKB so that those rows stay in L1 while every weight row of the work unit
// passes over them (direct_unit_blocked; the vector accumulators are parked in a small buffer
// between k blocks, which keeps each output's FMA chain exactly as in the register tiles).
constexpr int DRN = NREG >= 32 ? 4 : 1;  // weight rows per register tile
constexpr int DMT = NREG >= 32 ? 4 : 8;  // activation rows per tile
// k block of the blocked path: the MT activation rows of a block take at most 16 KiB of L1 (whole
// rows for a decode token, so each weight row then streams in one sequential pass), at least DKB
// columns; a multiple of 128 (FP8 scale block) and of 32 (FP4 block).
constexpr int64_t DKB = 256;
constexpr int64_t direct_k_block(int MT) { return std::max<int64_t>(DKB, 4096 / MT / 128 * 128); }
constexpr int64_t DRC = 32;  // weight rows per parallel work unit

#ifdef V4K_DIRECT_AVX2
// 8 e2m1 values (the low 4 bits of each 32-bit code) times the block scale, with lut = the
// positive half of the table times the scale: vpermps indexes 8 entries, so the magnitude
// (code & 7) is looked up and the sign flipped for codes >= 8 (kFp4[c + 8] = -kFp4[c], and
// (-a)·s = -(a·s) exactly, so the result is bit for bit the product kFp4[c]·s).
inline vf fp4_vec(__m256 lut, __m256i code) {
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(code, _mm256_set1_epi32(8)), 28);
  return (vf)_mm256_xor_ps(_mm256_permutevar8x32_ps(lut, code), _mm256_castsi256_ps(sign));
}
#endif

// The 32 weights of one FP4 block (16 packed bytes, scale s) as 32/VW vectors in nibble order.
inline void fp4_block(const uint8_t* p, float s, vf* out) {
#ifdef V4K_DIRECT_AVX512
  // (maskz forms: GCC 12 warns about the plain intrinsics' undefined pass-through operand)
  const __m512i c = _mm512_maskz_cvtepu8_epi32(0xffff, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512 lut = _mm512_mul_ps(_mm512_loadu_ps(kFp4), _mm512_set1_ps(s));
  out[0] = (vf)_mm512_maskz_permutexvar_ps(0xffff, c, lut);  // vpermps reads the index's low 4 bits
  out[1] = (vf)_mm512_maskz_permutexvar_ps(0xffff, (__m512i)((vu)c >> 4u), lut);
#else  // (AVX2 decodes inline in direct_unit_blocked, one vector at a time)
  alignas(64) float t[32];
  for (int j = 0; j < 16; ++j) {
    t[j] = kFp4[p[j] & 0xf] * s;
    t[16 + j] = kFp4[p[j] >> 4] * s;
  }
  for (int v = 0; v < 32 / VW; ++v) out[v] = vload(t + v * VW);
#endif
}

// Broadcast factor of an FP8 block scale for fp8_vec.
inline vf fp8_factor(float s) {
#if defined(V4K_DIRECT_AVX512) || defined(V4K_DIRECT_AVX2)
  return vbcast(256.0f * s);
#else
  return vbcast(s);
#endif
}

// Whether any of the n e4m3 bytes at p is a NaN code (0x7f / 0xff, i.e. |code| = 0x7f).
inline bool fp8_has_nan(const uint8_t* p, int64_t n) {
  int64_t i = 0;
  uint8_t mx = 0;
#ifdef V4K_DIRECT_AVX512
  const __m512i q = _mm512_set1_epi8(0x7f);
  __m512i v = _mm512_setzero_si512();
  for (; i + 64 <= n; i += 64)
    v = _mm512_max_epu8(v, _mm512_and_si512(_mm512_loadu_si512(reinterpret_cast<const void*>(p + i)), q));
  if (_mm512_cmpeq_epi8_mask(v, q) != 0) return true;
#elif defined(V4K_DIRECT_AVX2)
  const __m256i q = _mm256_set1_epi8(0x7f);
  __m256i v = _mm256_setzero_si256();
  for (; i + 32 <= n; i += 32)
    v = _mm256_max_epu8(v, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)), q));
  if (_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, q)) != 0) return true;
#endif
  for (; i < n; ++i) mx = std::max<uint8_t>(mx, p[i] & 0x7f);
  return mx == 0x7f;
}

// VW e4m3 weights times their block scale (f = fp8_factor(scale)); NaN codes decode to NaN only
// when `nan` is set (fp8_has_nan of the block), so the common case skips the fix-up.
inline vf fp8_vec(const uint8_t* p, vf f, bool nan) {
#ifdef V4K_DIRECT_AVX512
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  // sign-extend to 16 bits and shift by 7: bit 15 = sign, bits 13..7 = exponent and mantissa,
  // bit 14 (a copy of the sign) cleared -> the fp16 value 2^-8 times the e4m3 value
  const __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), _mm256_set1_epi16(-0x4001));
  const __m512 v = _mm512_mul_ps(_mm512_maskz_cvtph_ps(0xffff, h), (__m512)f);
  if (!nan) return (vf)v;
  const __m128i q = _mm_set1_epi8(0x7f);
  const __mmask16 bad = _mm_cmpeq_epi8_mask(_mm_and_si128(b, q), q);
  return (vf)_mm512_mask_mov_ps(v, bad, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
#elif defined(V4K_DIRECT_AVX2)
  // the same fp16 mapping on 8 lanes (F16C's vcvtph2ps)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7), _mm_set1_epi16(-0x4001));
  const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h), (__m256)f);
  if (!nan) return (vf)v;
  const __m128i q = _mm_set1_epi8(0x7f);
  const __m256 bad = _mm256_castsi256_ps(_mm256_cvtepi8_epi32(_mm_cmpeq_epi8(_mm_and_si128(b, q), q)));
  return (vf)_mm256_blendv_ps(v, _mm256_set1_ps(std::numeric_limits<float>::quiet_NaN()), bad);
#else
  (void)nan;
  vf v;
  for (int l = 0; l < VW; ++l) v[l] = kFp8.v[p[l]];
  return v * f;
#endif
}

// C[m, r] (row stride ldc) for RN weight rows and MT activation rows (A in nibble order).
template <int RN, int MT>
void fp4_tile(const float* A, int64_t lda, const uint8_t* W, const WeightView& wv, int64_t s0, int64_t K, float* C,
              int64_t ldc) {
  constexpr int NV = 32 / VW;
  const int64_t ldw = K / 2, lds = K / 32;
  vf acc[RN][MT];
  for (int r = 0; r < RN; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = vf{};
  for (int64_t b = 0; b < K / 32; ++b) {
    vf w[RN][NV];
    for (int r = 0; r < RN; ++r) fp4_block(W + r * ldw + 16 * b, wv.scale(s0 + r * lds + b), w[r]);
    for (int v = 0; v < NV; ++v)
      for (int m = 0; m < MT; ++m) {
        const vf a = vload(A + m * lda + 32 * b + v * VW);
        for (int r = 0; r < RN; ++r) acc[r][m] = vfma(w[r][v], a, acc[r][m]);
      }
  }
  for (int r = 0; r < RN; ++r)
    for (int m = 0; m < MT; ++m) C[m * ldc + r] = vsum(acc[r][m]);
}

// Columns [k0, k1) of one 128-column scale block of an fp8_tile.
template <int RN, int MT, bool NAN_CODES>
inline void fp8_steps(const float* A, int64_t lda, const uint8_t* W, int64_t K, int64_t k0, int64_t k1, const vf* f,
                      vf (*acc)[MT]) {
  for (int64_t k = k0; k < k1; k += VW) {
    vf w[RN];
    for (int r = 0; r < RN; ++r) w[r] = fp8_vec(W + r * K + k, f[r], NAN_CODES);
    for (int m = 0; m < MT; ++m) {
      const vf a = vload(A + m * lda + k);
      for (int r = 0; r < RN; ++r) acc[r][m] = vfma(w[r], a, acc[r][m]);
    }
  }
}

// Same for e4m3 rows W + r·K with scale rows S[r] (one scale per 128 columns).
template <int RN, int MT>
void fp8_tile(const float* A, int64_t lda, const uint8_t* W, const WeightView& wv, const int64_t* S, int64_t K, float* C,
              int64_t ldc) {
  const int64_t Kv = K / VW * VW;
  vf acc[RN][MT];
  for (int r = 0; r < RN; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = vf{};
  // rows holding a NaN code (never in a sane checkpoint) take the lane fix-up in every step
  const bool nan = fp8_has_nan(W, RN * K);
  for (int64_t k0 = 0; k0 < Kv; k0 += 128) {
    const int64_t k1 = std::min<int64_t>(Kv, k0 + 128);
    vf f[RN];
    for (int r = 0; r < RN; ++r) f[r] = fp8_factor(wv.scale(S[r] + k0 / 128));
    if (!nan) {
      fp8_steps<RN, MT, false>(A, lda, W, K, k0, k1, f, acc);
    } else {
      fp8_steps<RN, MT, true>(A, lda, W, K, k0, k1, f, acc);
    }
  }
  for (int r = 0; r < RN; ++r)
    for (int m = 0; m < MT; ++m) {
      float s = vsum(acc[r][m]);
      for (int64_t k = Kv; k < K; ++k) s = std::fma(A[m * lda + k], kFp8.v[W[r * K + k]] * wv.scale(S[r] + k / 128), s);
      C[m * ldc + r] = s;
    }
}

// One job as the tiles see it (A already in nibble order for FP4).
struct DirectJob {
  const float* A;
  int64_t M, lda;
  WeightView w;
  int64_t e;
  float* C;
  int64_t ldc;
};

template <int RN, int MT>
void direct_tile(const DirectJob& d, int64_t n, int64_t m) {
  const WeightView& w = d.w;
  const int64_t R = w.rows, K = w.cols;
  const float* A = d.A + m * d.lda;
  float* C = d.C + m * d.ldc + n;
  if (w.kind == W_FP4) {
    fp4_tile<RN, MT>(A, d.lda, static_cast<const uint8_t*>(w.data) + (d.e * R + n) * (K / 2), w, (d.e * R + n) * (K / 32),
                     K, C, d.ldc);
  } else {
    const int64_t kb = (K + 127) / 128, rb = (R + 127) / 128;
    int64_t S[RN];
    for (int r = 0; r < RN; ++r) S[r] = (d.e * rb + (n + r) / 128) * kb;
    fp8_tile<RN, MT>(A, d.lda, static_cast<const uint8_t*>(w.data) + (d.e * R + n) * K, w, S, K, C, d.ldc);
  }
}

// The last `left` (< DMT) activation rows in one tile of exactly that height.
template <int RN, int MT>
void direct_tail(const DirectJob& d, int64_t n, int64_t m, int64_t left) {
  if constexpr (MT > 0) {
    if (left == MT) {
      direct_tile<RN, MT>(d, n, m);
    } else {
      direct_tail<RN, MT - 1>(d, n, m, left);
    }
  }
}

template <int RN>
void direct_rows(const DirectJob& d, int64_t n) {
  int64_t m = 0;
  for (; m + DMT <= d.M; m += DMT) direct_tile<RN, DMT>(d, n, m);
  direct_tail<RN, DMT - 1>(d, n, m, d.M - m);
}

// Activation rows [m0, m0 + MT) of weight rows [n0, n1) (n1 - n0 <= DRC), k block by k block.
// Per output: one VW-lane accumulator, FMAs in k order (FP4 in nibble order), lanes summed in
// order, FP8's scalar tail: the summation order of fp8_tile / fp4_tile.
template <int MT>
void direct_unit_blocked(const DirectJob& d, int64_t n0, int64_t n1, int64_t m0, const bool* nan_rows, vf* park) {
  const WeightView& w = d.w;
  const int64_t R = w.rows, K = w.cols, lda = d.lda;
  const bool fp4 = w.kind == W_FP4;
  const int64_t Kv = fp4 ? K : K / VW * VW, kb = (K + 127) / 128, rb = (R + 127) / 128;
  const uint8_t* data = static_cast<const uint8_t*>(w.data);
  const float* A = d.A + m0 * lda;
  constexpr int64_t kblk = direct_k_block(MT);
  // the k block of the MT rows, vector-interleaved: vector j of row m at apack[(j·MT + m)·VW], so
  // the tile addresses all its activations from one pointer (no per-row base registers)
  alignas(64) float apack[kblk * MT];
  for (int64_t i = 0; i < (n1 - n0) * MT; ++i) park[i] = vf{};
  for (int64_t k0 = 0; k0 < Kv; k0 += kblk) {
    const int64_t k1 = std::min(Kv, k0 + kblk);
    for (int64_t j = 0; j < (k1 - k0) / VW; ++j)
      for (int m = 0; m < MT; ++m) vstore(apack + (j * MT + m) * VW, vload(A + m * lda + k0 + j * VW));
    for (int64_t n = n0; n < n1; ++n) {
      vf acc[MT];
      vf* slot = park + (n - n0) * MT;
      for (int m = 0; m < MT; ++m) acc[m] = slot[m];
      if (fp4) {
        const uint8_t* W = data + (d.e * R + n) * (K / 2);
        const int64_t s0 = (d.e * R + n) * (K / 32);
        const float* ap = apack;
        for (int64_t b = k0 / 32; b < k1 / 32; ++b) {
#ifdef V4K_DIRECT_AVX2
          // fp4_block's decode, one vector at a time (fewer live registers beside the MT accumulators)
          const __m256 lut = _mm256_mul_ps(_mm256_loadu_ps(kFp4), _mm256_set1_ps(w.scale(s0 + b)));
          const __m256i c0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(W + 16 * b)));
          const __m256i c1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(W + 16 * b + 8)));
          for (int v = 0; v < 4; ++v, ap += MT * VW) {
            const __m256i c = v == 0 ? c0 : v == 1 ? c1 : v == 2 ? _mm256_srli_epi32(c0, 4) : _mm256_srli_epi32(c1, 4);
            const vf wv = fp4_vec(lut, c);
            for (int m = 0; m < MT; ++m) acc[m] = vfma(wv, vload(ap + m * VW), acc[m]);
          }
#else
          vf wv[32 / VW];
          fp4_block(W + 16 * b, w.scale(s0 + b), wv);
          for (int v = 0; v < 32 / VW; ++v, ap += MT * VW)
            for (int m = 0; m < MT; ++m) acc[m] = vfma(wv[v], vload(ap + m * VW), acc[m]);
#endif
        }
      } else {
        const uint8_t* W = data + (d.e * R + n) * K;
        const int64_t s0 = (d.e * rb + n / 128) * kb;
        const bool nan = nan_rows[n - n0];
        const float* ap = apack;
        for (int64_t ks = k0; ks < k1; ks += 128) {
          const int64_t ke = std::min(k1, ks + 128);
          const vf f = fp8_factor(w.scale(s0 + ks / 128));
          for (int64_t k = ks; k < ke; k += VW, ap += MT * VW) {
            const vf wv = fp8_vec(W + k, f, nan);
            for (int m = 0; m < MT; ++m) acc[m] = vfma(wv, vload(ap + m * VW), acc[m]);
          }
        }
      }
      for (int m = 0; m < MT; ++m) slot[m] = acc[m];
    }
  }
  for (int64_t n = n0; n < n1; ++n)
    for (int m = 0; m < MT; ++m) {
      float s = vsum(park[(n - n0) * MT + m]);
      if (!fp4) {
        const uint8_t* W = data + (d.e * R + n) * K;
        const int64_t s0 = (d.e * rb + n / 128) * kb;
        for (int64_t k = Kv; k < K; ++k) s = std::fma(A[m * lda + k], kFp8.v[W[k]] * w.scale(s0 + k / 128), s);
      }
      d.C[(m0 + m) * d.ldc + n] = s;
    }
}

template <int MT>
void direct_unit_tail(const DirectJob& d, int64_t n0, int64_t n1, int64_t m0, int64_t left, const bool* nan_rows,
                      vf* park) {
  if constexpr (MT > 0) {
    if (left == MT) {
      direct_unit_blocked<MT>(d, n0, n1, m0, nan_rows, park);
    } else {
      direct_unit_tail<MT - 1>(d, n0, n1, m0, left, nan_rows, park);
    }
  }
}

// Weight rows [n0, n1) of one job for all its activation rows.
void direct_unit(const DirectJob& d, int64_t n0, int64_t n1) {
#ifdef V4K_DIRECT_AVX512
  int64_t n = n0;
  for (; n + DRN <= n1; n += DRN) direct_rows<DRN>(d, n);
  for (; n < n1; ++n) direct_rows<1>(d, n);
#else
  bool nan_rows[DRC];  // FP8 rows holding a NaN code take the lane fix-up (never in a sane checkpoint)
  if (d.w.kind == W_FP8)
    for (int64_t n = n0; n < n1; ++n)
      nan_rows[n - n0] = fp8_has_nan(static_cast<const uint8_t*>(d.w.data) + (d.e * d.w.rows + n) * d.w.cols, d.w.cols);
  alignas(64) vf park[DRC * DMT];
  int64_t m = 0;
  for (; m + DMT <= d.M; m += DMT) direct_unit_blocked<DMT>(d, n0, n1, m, nan_rows, park);
  direct_unit_tail<DMT - 1>(d, n0, n1, m, d.M - m, nan_rows, park);
#endif
}

}  // namespace

void gemm_direct(const GemmJob* jobs, int njobs) {
  std::vector<DirectJob> dj(njobs);
  std::vector<std::vector<float>> nib(njobs);  // FP4 activations in nibble order
  std::vector<int64_t> first(njobs + 1, 0);    // first work unit of each job
  int64_t work = 0;
  for (int j = 0; j < njobs; ++j) {
    const GemmJob& g = jobs[j];
    dj[j] = {g.A, g.M, g.lda, g.w, g.e, g.C, g.ldc};
    const int64_t K = g.w.cols;
    if (g.w.kind == W_FP4 && g.M > 0) {
      const GemmJob* prev = j > 0 ? &jobs[j - 1] : nullptr;
      if (prev && prev->w.kind == W_FP4 && prev->A == g.A && prev->M == g.M && prev->lda == g.lda &&
          prev->w.cols == K) {
        dj[j].A = dj[j - 1].A;  // w1 / w3 of one expert share their input
      } else {
        nib[j].resize(g.M * K);
        for (int64_t m = 0; m < g.M; ++m) {
          const float* a = g.A + m * g.lda;
          float* o = nib[j].data() + m * K;
          for (int64_t b = 0; b < K; b += 32)
            for (int64_t i = 0; i < 16; ++i) {
              o[b + i] = a[b + 2 * i];
              o[b + 16 + i] = a[b + 2 * i + 1];
            }
        }
        dj[j].A = nib[j].data();
      }
      dj[j].lda = K;
    }
    first[j + 1] = first[j] + (g.M > 0 ? (g.w.rows + DRC - 1) / DRC : 0);
    work += g.M * g.w.rows * K;
  }
  const int64_t total = first[njobs];
#pragma omp parallel for schedule(dynamic, 1) if (work > (int64_t(1) << 16))
  for (int64_t p = 0; p < total; ++p) {
    int j = 0;
    while (first[j + 1] <= p) ++j;
    const DirectJob& d = dj[j];
    const int64_t n0 = (p - first[j]) * DRC;
    direct_unit(d, n0, std::min(d.w.rows, n0 + DRC));
  }
}

}  // namespace v4k_cpu

// ------------------------------------------------------------------------------------------
// grouped_linear (SPEC §9.4): y[t, g] = W_g · x[t, g] for the grouped output projection wo_a.
//
// Decode and short chunks (T < kGroupedDirectMaxT) are bound by weight traffic (Flash: 64 MiB of
// bf16 per call), so the weight is never converted as a whole: each tile loads GRN weight rows VW
// values at a time from their storage format (bf16 -> fp32 is a 16-bit shift, fp16 one vcvtph2ps) and FMAs them
// into the accumulators of up to GMT tokens; the weight streams from memory once per GMT tokens.
// Work units are (group, 32-row block) pairs shared dynamically by all threads.
//
// Summation order of an output (t, g, n) on that path: one VW-lane accumulator takes FMAs in k
// order over the first K - K % VW columns, its lanes are summed in order, then the K % VW tail
// columns are FMA'd in k order. It depends only on (t, g, n): never on T, the tile shape or the
// thread count, so a token's output does not change with the other tokens of the step.
// Larger T runs the panel GEMM per group (its own fixed k-ordered chain per output); the switch
// point is where the panel GEMM's register tiling outweighs its weight repacking (Flash shape,
// 2 threads, bf16: T = 64 direct 15.7 ms vs panels 20.1 ms; T = 128 34.6 ms vs 29.4 ms).
namespace v4k_cpu {
namespace {

constexpr int GRN = 4;                    // weight rows per tile
constexpr int GMT = NREG >= 32 ? 4 : 2;   // tokens per tile (accumulators stay in registers)
constexpr int64_t GRC = 32;               // weight rows per parallel work unit

template <int KIND>
inline vf gl_wload(const void* w, int64_t i) {
  if (KIND == F32) return vload(static_cast<const float*>(w) + i);
  if (KIND == BF16) return vload_bf16(static_cast<const uint16_t*>(w) + i);
  return vload_f16(static_cast<const uint16_t*>(w) + i);
}

template <int KIND>
inline float gl_wscalar(const void* w, int64_t i) {
  if (KIND == F32) return static_cast<const float*>(w)[i];
  if (KIND == BF16) return bf16_to_f32(static_cast<const uint16_t*>(w)[i]);
  return f16_to_f32(static_cast<const uint16_t*>(w)[i]);
}

// C[m * ldc + r] for RN weight rows W + r·K (storage KIND) and MT token rows A + m·lda (fp32).
template <int KIND, int RN, int MT>
void gl_tile(const float* A, int64_t lda, const void* W, int64_t K, float* C, int64_t ldc) {
  const int64_t Kv = K / VW * VW;
  vf acc[RN][MT];
  for (int r = 0; r < RN; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = vf{};
  for (int64_t k = 0; k < Kv; k += VW) {
    vf w[RN];
    for (int r = 0; r < RN; ++r) w[r] = gl_wload<KIND>(W, r * K + k);
    for (int m = 0; m < MT; ++m) {
      const vf a = vload(A + m * lda + k);
      for (int r = 0; r < RN; ++r) acc[r][m] = vfma(w[r], a, acc[r][m]);
    }
  }
  for (int r = 0; r < RN; ++r)
    for (int m = 0; m < MT; ++m) {
      float s = vsum(acc[r][m]);
      for (int64_t k = Kv; k < K; ++k) s = std::fma(A[m * lda + k], gl_wscalar<KIND>(W, r * K + k), s);
      C[m * ldc + r] = s;
    }
}

// Rows [n, n + RN) of one group for all T tokens.
template <int KIND, int RN>
void gl_rows(const float* A, int64_t T, int64_t lda, const void* W, int64_t K, float* C, int64_t ldc) {
  int64_t m = 0;
  for (; m + GMT <= T; m += GMT) gl_tile<KIND, RN, GMT>(A + m * lda, lda, W, K, C + m * ldc, ldc);
  for (; m < T; ++m) gl_tile<KIND, RN, 1>(A + m * lda, lda, W, K, C + m * ldc, ldc);
}

template <int KIND>
void gl_direct(const float* xf, const void* w, int64_t T, int64_t G, int64_t K, int64_t N, float* C) {
  const int64_t nb = (N + GRC - 1) / GRC, es = elem_size(KIND);
  const char* wb = static_cast<const char*>(w);
#pragma omp parallel for schedule(dynamic, 1) if (T * G * N * K > (int64_t(1) << 16))
  for (int64_t p = 0; p < G * nb; ++p) {
    const int64_t g = p / nb, n0 = (p % nb) * GRC, n1 = std::min(N, n0 + GRC);
    const float* A = xf + g * K;
    float* c = C + g * N;
    int64_t n = n0;
    for (; n + GRN <= n1; n += GRN) gl_rows<KIND, GRN>(A, T, G * K, wb + (g * N + n) * K * es, K, c + n, G * N);
    for (; n < n1; ++n) gl_rows<KIND, 1>(A, T, G * K, wb + (g * N + n) * K * es, K, c + n, G * N);
  }
}

}  // namespace

void grouped_linear(const void* x, int x_dtype, const void* w, int w_dtype, int64_t T, int64_t G, int64_t K,
                    int64_t N, void* out) {
  const int64_t rows = T * G;
  if (rows == 0 || N == 0) return;
  // uninitialised: no serial zero fill of up to T·G·K floats; the parallel loops below touch them first
  std::unique_ptr<float[]> xbuf, obuf;
  const float* xf = static_cast<const float*>(x);
  if (x_dtype != F32) {
    xbuf.reset(new float[rows * K]);
#pragma omp parallel for schedule(static) if (rows * K > (int64_t(1) << 16))
    for (int64_t i = 0; i < rows; ++i)
      load_row(static_cast<const char*>(x) + i * K * elem_size(x_dtype), x_dtype, xbuf.get() + i * K, K);
    xf = xbuf.get();
  }
  float* of = static_cast<float*>(out);
  if (x_dtype != F32) {
    obuf.reset(new float[rows * N]);
    of = obuf.get();
  }
  if (T < kGroupedDirectMaxT) {
    if (w_dtype == F32) {
      gl_direct<F32>(xf, w, T, G, K, N, of);
    } else if (w_dtype == BF16) {
      gl_direct<BF16>(xf, w, T, G, K, N, of);
    } else {
      gl_direct<F16>(xf, w, T, G, K, N, of);
    }
  } else {
    std::vector<GemmJob> jobs(G);
    for (int64_t g = 0; g < G; ++g)
      jobs[g] = GemmJob{xf + g * K, T, G * K, WeightView{w, nullptr, w_dtype, N, K}, g, of + g * N, G * N};
    gemm_panels(jobs.data(), static_cast<int>(G));
  }
  if (x_dtype != F32) {
#pragma omp parallel for schedule(static) if (rows * N > (int64_t(1) << 16))
    for (int64_t i = 0; i < rows; ++i)
      store_row(of + i * N, x_dtype, static_cast<char*>(out) + i * N * elem_size(x_dtype), N);
  }
}

}  // namespace v4k_cpu
