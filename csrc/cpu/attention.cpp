// sparse_attn (SPEC §9.2): online-softmax attention over gathered index tiles with a per-head
// sink logit in the denominator, for bf16/fp16/fp32 KV and the packed 584-byte FP8 layout
// (SPEC §13.1).
//
// Work unit = (batch b, query m, group of heads). All heads of a group share every gathered KV
// tile, so each tile is decoded to fp32 once and used by two small GEMMs:
//   S[h, j] = <q_h, kv_j> * scale   (register-blocked over heads x 64 keys, KV tile transposed)
//   O[h, :] = O[h, :] * alpha_h + sum_j P[h, j] kv_j   (register-blocked over heads x 64 dims)
// Extra memory per thread is one tile (64 rows) plus the q/o tiles of the head group; it does
// not depend on the number of indices. Any head dim: the V4 dims (512) run whole register blocks
// only; other dims finish the columns past the last whole block with a scalar loop.
#include "common.h"
#include "kernels.h"

namespace v4k_cpu {

const Fp8Table kFp8;

namespace {

constexpr int KT = 64;  // keys per tile
#if defined(__AVX512F__)
constexpr int RH = 6;   // heads per register block
#else
constexpr int RH = 3;
#endif
constexpr int NV = 4;             // vectors per register block
constexpr int CB = NV * VW;       // columns per register block
static_assert(KT % CB == 0, "tile must hold whole register blocks");

// S[r, j0:j0+CB] = sum_d Q[r, d] * Kt[d, j0:j0+CB] for r < R.
template <int R>
inline void qk_block(const float* __restrict Q, int64_t D, const float* __restrict Kt, float* __restrict S) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vf{};
  for (int64_t d = 0; d < D; ++d) {
    vf k[NV];
    for (int v = 0; v < NV; ++v) k[v] = vload(Kt + d * KT + v * VW);
    for (int r = 0; r < R; ++r) {
      vf qb = vbcast(Q[r * D + d]);
      for (int v = 0; v < NV; ++v) acc[r][v] += qb * k[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(S + r * KT + v * VW, acc[r][v]);
}

// O[r, d0:d0+CB] = O[r, d0:d0+CB] * alpha[r] + sum_{j<kt} P[r, j] * Kr[j, d0:d0+CB].
template <int R>
inline void pv_block(const float* __restrict P, const float* __restrict Kr, int kt, int64_t D,
                     const float* __restrict alpha, float* __restrict O) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r) {
    vf a = vbcast(alpha[r]);
    for (int v = 0; v < NV; ++v) acc[r][v] = vload(O + r * D + v * VW) * a;
  }
  for (int j = 0; j < kt; ++j) {
    vf k[NV];
    for (int v = 0; v < NV; ++v) k[v] = vload(Kr + j * D + v * VW);
    for (int r = 0; r < R; ++r) {
      vf p = vbcast(P[r * KT + j]);
      for (int v = 0; v < NV; ++v) acc[r][v] += p * k[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(O + r * D + v * VW, acc[r][v]);
}

template <int R>
void qk_rows(const float* Q, int64_t D, const float* Kt, float* S) {
  for (int j0 = 0; j0 < KT; j0 += CB) qk_block<R>(Q, D, Kt + j0, S + j0);
}
// Columns d0..D-1 past the last whole register block (head dims that are not a multiple of CB).
template <int R>
inline void pv_tail(const float* __restrict P, const float* __restrict Kr, int kt, int64_t D, int64_t d0,
                    const float* __restrict alpha, float* __restrict O) {
  for (int r = 0; r < R; ++r)
    for (int64_t d = d0; d < D; ++d) {
      float acc = O[r * D + d] * alpha[r];
      for (int j = 0; j < kt; ++j) acc += P[r * KT + j] * Kr[j * D + d];
      O[r * D + d] = acc;
    }
}

template <int R>
void pv_rows(const float* P, const float* Kr, int kt, int64_t D, const float* alpha, float* O) {
  const int64_t dv = D / CB * CB;
  for (int64_t d0 = 0; d0 < dv; d0 += CB) pv_block<R>(P, Kr + d0, kt, D, alpha, O + d0);
  if (dv < D) pv_tail<R>(P, Kr, kt, D, dv, alpha, O);
}

using QkFn = void (*)(const float*, int64_t, const float*, float*);
using PvFn = void (*)(const float*, const float*, int, int64_t, const float*, float*);

template <int... Rs>
struct Table {
  static constexpr QkFn qk[] = {nullptr, qk_rows<Rs>...};
  static constexpr PvFn pv[] = {nullptr, pv_rows<Rs>...};
};
#if defined(__AVX512F__)
using Fns = Table<1, 2, 3, 4, 5, 6>;
#else
using Fns = Table<1, 2, 3>;
#endif

// Decode one KV row to fp32.
inline void decode_kv_row(const void* kv, int kv_kind, int64_t row, int64_t D, float* dst) {
  if (kv_kind == KV_FP8_PACKED) {
    const uint8_t* p = static_cast<const uint8_t*>(kv) + row * kPackedRowBytes;
    // SPEC §13.1: 7 blocks of 64 e4m3 nope values, each scaled by its UE8M0 byte at 576+blk;
    // then the 64 rope values stored as little-endian bf16 at bytes 448..575.
    for (int blk = 0; blk < 7; ++blk) {
      float s = ue8m0_to_f32(p[576 + blk]);
      const uint8_t* e = p + blk * 64;
      float* o = dst + blk * 64;
      for (int i = 0; i < 64; ++i) o[i] = kFp8.v[e[i]] * s;
    }
    for (int i = 0; i < 64; ++i) {
      uint16_t h = static_cast<uint16_t>(p[448 + 2 * i] | (p[449 + 2 * i] << 8));
      dst[448 + i] = bf16_to_f32(h);
    }
  } else {
    const char* base = static_cast<const char*>(kv) + row * D * elem_size(kv_kind);
    load_row(base, kv_kind, dst, D);
  }
}

}  // namespace

void sparse_attn(const void* q, int q_dtype, const void* kv, int kv_kind, const float* sink,
                 const int32_t* idx, float scale, void* out, int64_t B, int64_t M, int64_t H,
                 int64_t D, int64_t N, int64_t K) {
  const int nthr = num_threads();
  const int64_t queries = B * M;
  // Few queries (decode): split each query's index list across threads (flash-decoding style,
  // merged below) so every thread still serves all heads from one gathered tile; then, if still
  // short of work, split the heads. Many queries: one unit per query, best tile reuse.
  int64_t splits = 1, groups = 1;
  if (queries < 2 * nthr) {
    splits = std::min<int64_t>((2 * nthr + queries - 1) / queries, std::max<int64_t>(1, K / (2 * KT)));
    if (queries * splits < 2 * nthr)
      groups = std::min<int64_t>((2 * nthr + queries * splits - 1) / (queries * splits), (H + RH - 1) / RH);
  }
  int64_t hg = (H + groups - 1) / groups;
  hg = (hg + RH - 1) / RH * RH;
  groups = (H + hg - 1) / hg;
  const int64_t units = queries * groups * splits;
  const int qes = elem_size(q_dtype);
  // split partials: unnormalised O, running max and denominator per (query, split, head)
  std::vector<float> part_o, part_m, part_l;
  if (splits > 1) {
    part_o.resize(queries * splits * H * D);
    part_m.resize(queries * splits * H);
    part_l.resize(queries * splits * H);
  }

#pragma omp parallel
  {
    Scratch s_kr, s_kt, s_q, s_o, s_s;
    float* Kr = s_kr.get(KT * D);
    float* Kt = s_kt.get(KT * D);
    float* Qf = s_q.get(hg * D);
    float* Obuf = s_o.get(hg * D);
    float* S = s_s.get(hg * KT);
    std::vector<float> mrow(hg), lrow(hg), alpha(hg);
    std::vector<int32_t> valid(K);

#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t sp = u % splits;
      const int64_t qi = u / (splits * groups);  // b * M + m
      const int64_t h0 = ((u / splits) % groups) * hg;
      const int64_t nh = std::min(hg, H - h0);
      const int64_t b = qi / M;
      const int32_t* ix = idx + qi * K;
      int64_t nv = 0;
      for (int64_t k = 0; k < K; ++k)
        if (ix[k] >= 0) valid[nv++] = ix[k];
      int64_t per = (nv + splits - 1) / splits;
      per = (per + KT - 1) / KT * KT;
      const int64_t v0 = std::min(nv, sp * per), v1 = std::min(nv, v0 + per);
      char* obase = static_cast<char*>(out) + (qi * H + h0) * D * qes;
      float* O = splits > 1 ? part_o.data() + ((qi * splits + sp) * H + h0) * D : Obuf;
      if (splits == 1 && nv == 0) {  // every index skipped: zero output (the sink has a zero value)
        std::memset(obase, 0, nh * D * qes);
        continue;
      }
      const char* qbase = static_cast<const char*>(q) + (qi * H + h0) * D * qes;
      for (int64_t r = 0; r < nh; ++r) {
        load_row(qbase + r * D * qes, q_dtype, Qf + r * D, D);
        for (int64_t d = 0; d < D; ++d) Qf[r * D + d] *= scale;
      }
      std::memset(O, 0, nh * D * sizeof(float));
      for (int64_t r = 0; r < nh; ++r) {
        mrow[r] = -std::numeric_limits<float>::infinity();
        lrow[r] = 0.f;
      }
      const int64_t kvbase = b * N;
      for (int64_t t0 = v0; t0 < v1; t0 += KT) {
        const int kt = static_cast<int>(std::min<int64_t>(KT, v1 - t0));
        for (int j = 0; j < kt; ++j) decode_kv_row(kv, kv_kind, kvbase + valid[t0 + j], D, Kr + j * D);
        if (kt < KT) std::memset(Kr + kt * D, 0, (KT - kt) * D * sizeof(float));
        for (int j = 0; j < KT; ++j) {
          const float* src = Kr + j * D;
          for (int64_t d = 0; d < D; ++d) Kt[d * KT + j] = src[d];
        }
        for (int64_t r0 = 0; r0 < nh; r0 += RH) {
          int rr = static_cast<int>(std::min<int64_t>(RH, nh - r0));
          Fns::qk[rr](Qf + r0 * D, D, Kt, S + r0 * KT);
        }
        // online softmax update (natural exp, fp32); padded columns get probability 0
        for (int64_t r = 0; r < nh; ++r) {
          float* srow = S + r * KT;
          float mx = mrow[r];
          for (int j = 0; j < kt; ++j) mx = std::max(mx, srow[j]);
          float a = std::exp(mrow[r] - mx);
          float sum = 0.f;
          for (int j = 0; j < kt; ++j) {
            float p = std::exp(srow[j] - mx);
            srow[j] = p;
            sum += p;
          }
          for (int j = kt; j < KT; ++j) srow[j] = 0.f;
          lrow[r] = lrow[r] * a + sum;
          mrow[r] = mx;
          alpha[r] = a;
        }
        for (int64_t r0 = 0; r0 < nh; r0 += RH) {
          int rr = static_cast<int>(std::min<int64_t>(RH, nh - r0));
          Fns::pv[rr](S + r0 * KT, Kr, kt, D, alpha.data() + r0, O + r0 * D);
        }
      }
      if (splits > 1) {
        for (int64_t r = 0; r < nh; ++r) {
          part_m[(qi * splits + sp) * H + h0 + r] = mrow[r];
          part_l[(qi * splits + sp) * H + h0 + r] = lrow[r];
        }
        continue;
      }
      for (int64_t r = 0; r < nh; ++r) {
        // SPEC §9.2: the sink is a virtual key with zero value, present only in the denominator.
        float den = lrow[r] + std::exp(sink[h0 + r] - mrow[r]);
        float* orow = O + r * D;
        for (int64_t d = 0; d < D; ++d) orow[d] /= den;
        store_row(orow, q_dtype, obase + r * D * qes, D);
      }
    }

    if (splits > 1) {
      // merge the split partials of each (query, head): rescale to the common max
      float* orow = Obuf;
#pragma omp for schedule(static)
      for (int64_t qh = 0; qh < queries * H; ++qh) {
        const int64_t qi = qh / H, h = qh % H;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t sp = 0; sp < splits; ++sp) mx = std::max(mx, part_m[(qi * splits + sp) * H + h]);
        char* dst = static_cast<char*>(out) + qh * D * qes;
        if (mx == -std::numeric_limits<float>::infinity()) {  // no valid index at all
          std::memset(dst, 0, D * qes);
          continue;
        }
        std::memset(orow, 0, D * sizeof(float));
        float den = std::exp(sink[h] - mx);
        for (int64_t sp = 0; sp < splits; ++sp) {
          const int64_t pi = (qi * splits + sp) * H + h;
          float w = part_m[pi] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(part_m[pi] - mx);
          if (w == 0.f) continue;
          den += part_l[pi] * w;
          const float* po = part_o.data() + pi * D;
          for (int64_t d = 0; d < D; ++d) orow[d] += po[d] * w;
        }
        for (int64_t d = 0; d < D; ++d) orow[d] /= den;
        store_row(orow, q_dtype, dst, D);
      }
    }
  }
}

}  // namespace v4k_cpu
