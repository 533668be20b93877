// Lightning-indexer scores and streaming top-k (SPEC §7.2):
//   score[b,s,c] = sum_h w[b,s,h] * ReLU(<q[b,s,h,:], key[b,c,:]>),   -inf where c >= (t+1)//ratio
// over bf16/fp16/fp32, FP8 (e4m3 + per-128 scales) or FP4 (packed e2m1 + per-32 scales) keys.
//
// Keys are decoded to fp32 one tile (64 keys) at a time and shared by a block of queries. The
// score micro-kernel vectorises over heads (q transposed once per query, [dI, heads]) and
// broadcasts key elements, so the ReLU-weighted head reduction is a vector epilogue. indexer_topk
// never holds more than one score tile per query: every tile is streamed into a bounded min-heap
// of the best k (score, index) pairs. With few queries (decode) the key range is split across
// threads and the per-split heaps are merged at the end.
#include <algorithm>
#include <limits>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"
#include "kernels.h"

namespace v4k_cpu {
namespace {

constexpr int KT = 64;  // keys per tile
constexpr int NV = 4;   // head vectors per register block
constexpr int HC = NV * VW;  // heads per register block
#if defined(__AVX512F__)
constexpr int RJ = 6;   // keys per register block
#else
constexpr int RJ = 3;
#endif

template <int R>
inline void score_block(const float* __restrict Qt, int64_t HIp, const float* __restrict Kr, int64_t dI,
                        const float* __restrict w, float* __restrict sc) {
  vf acc[R][NV];
  for (int j = 0; j < R; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = vf{};
  for (int64_t d = 0; d < dI; ++d) {
    vf qv[NV];
    for (int v = 0; v < NV; ++v) qv[v] = vload(Qt + d * HIp + v * VW);
    for (int j = 0; j < R; ++j) {
      vf kb = vbcast(Kr[j * dI + d]);
      for (int v = 0; v < NV; ++v) acc[j][v] += qv[v] * kb;
    }
  }
  for (int j = 0; j < R; ++j) {
    vf s = vf{};
    // ReLU with NaN propagation: vmax(0, x) returns x when x is NaN (maxps semantics)
    for (int v = 0; v < NV; ++v) s += vmax(vf{}, acc[j][v]) * vload(w + v * VW);
    sc[j] += vsum(s);
  }
}

using BlockFn = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*);
template <int... Rs>
struct Table {
  static constexpr BlockFn fn[] = {nullptr, score_block<Rs>...};
};
#if defined(__AVX512F__)
using Fns = Table<1, 2, 3, 4, 5, 6>;
#else
using Fns = Table<1, 2, 3>;
#endif

// Scores of keys [0, kt) of the tile for one query (Qt/w padded to HIp heads).
inline void tile_scores(const float* Qt, const float* w, int64_t HIp, const float* Kr, int kt, int64_t dI, float* sc) {
  for (int j = 0; j < kt; ++j) sc[j] = 0.f;
  for (int64_t h0 = 0; h0 < HIp; h0 += HC)
    for (int j0 = 0; j0 < kt; j0 += RJ) {
      int rj = std::min(RJ, kt - j0);
      Fns::fn[rj](Qt + h0, HIp, Kr + j0 * dI, dI, w + h0, sc + j0);
    }
}

#if defined(__AVX512F__)
// FP4 key row -> fp32 (SPEC §4.1): per 32-element block, the 16 packed bytes are widened to
// int32 lanes, each nibble picks its e2m1 value from a 16-entry LUT in one vpermps (only the
// index's low 4 bits count, so the low nibble needs no mask), the low/high halves are interleaved
// back to element order and the block's power-of-two scale is applied (exact, as in the reference
// dequantisation).
inline void decode_fp4_row(const uint8_t* p, const float* s, int64_t dI, float* dst) {
  const __m512 lut = _mm512_loadu_ps(kFp4);
  const __m512i i0 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i i1 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t b = 0; b < dI / 32; ++b) {
    // (maskz forms: GCC 12 warns about the plain intrinsics' undefined pass-through operand)
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * b));
    const __m512i w = _mm512_maskz_cvtepu8_epi32(0xffff, bytes);
    const __m512 lo = _mm512_maskz_permutexvar_ps(0xffff, w, lut);  // elements 0, 2, 4, ...
    const __m512 hi = _mm512_maskz_permutexvar_ps(0xffff, (__m512i)((vu)w >> 4u), lut);  // 1, 3, 5, ...
    const __m512 sc = _mm512_set1_ps(s[b]);
    _mm512_storeu_ps(dst + 32 * b, _mm512_mul_ps(_mm512_permutex2var_ps(lo, i0, hi), sc));
    _mm512_storeu_ps(dst + 32 * b + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, i1, hi), sc));
  }
}
#else
// Portable path: a byte -> (low, high) e2m1 pair table, one 8-byte copy per packed byte.
struct Fp4PairTable {
  float v[256][2];
  Fp4PairTable() {
    for (int b = 0; b < 256; ++b) {
      v[b][0] = kFp4[b & 0xf];
      v[b][1] = kFp4[b >> 4];
    }
  }
};
inline void decode_fp4_row(const uint8_t* p, const float* s, int64_t dI, float* dst) {
  static const Fp4PairTable pairs;
  for (int64_t b = 0; b < dI / 32; ++b) {
    float* o = dst + 32 * b;
    for (int i = 0; i < 16; ++i) std::memcpy(o + 2 * i, pairs.v[p[16 * b + i]], 8);
    const vf sc = vbcast(s[b]);
    for (int i = 0; i < 32; i += VW) vstore(o + i, vload(o + i) * sc);
  }
}
#endif

inline void decode_key(const void* keys, int kind, const float* ks, int64_t row, int64_t dI, float* dst) {
  if (kind == KEY_FP8) {
    const uint8_t* p = static_cast<const uint8_t*>(keys) + row * dI;
    const float* s = ks + row * (dI / 128);
    for (int64_t d = 0; d < dI; ++d) dst[d] = kFp8.v[p[d]] * s[d / 128];
  } else if (kind == KEY_FP4) {
    decode_fp4_row(static_cast<const uint8_t*>(keys) + row * (dI / 2), ks + row * (dI / 32), dI, dst);
  } else {
    load_row(static_cast<const char*>(keys) + row * dI * elem_size(kind), kind, dst, dI);
  }
}

// A candidate is better when its score is larger, ties broken by the smaller index.
struct Cand {
  float s;
  int32_t i;
};
inline bool better(const Cand& a, const Cand& b) { return a.s > b.s || (a.s == b.s && a.i < b.i); }
// heap comparator: the root is the worst kept candidate
struct WorseFirst {
  bool operator()(const Cand& a, const Cand& b) const { return better(a, b); }
};

struct TopK {
  Cand* h;
  int64_t n = 0, cap = 0;
  void push(float s, int32_t i) {
    Cand c{s, i};
    if (n < cap) {
      h[n++] = c;
      std::push_heap(h, h + n, WorseFirst());
    } else if (better(c, h[0])) {
      std::pop_heap(h, h + n, WorseFirst());
      h[n - 1] = c;
      std::push_heap(h, h + n, WorseFirst());
    }
  }
  // admission threshold for a fast reject: candidates not better than this are dropped
  bool full() const { return n == cap; }
};

}  // namespace

void indexer(const void* q, int q_dtype, const void* w, int w_dtype, const void* keys, int key_kind,
             const float* key_scales, const int64_t* positions, int64_t B, int64_t S, int64_t HI,
             int64_t dI, int64_t N, int64_t ratio, float* scores_out, int32_t* topk_out,
             int64_t kout, int64_t offset) {
  const int nthr = num_threads();
  const int64_t HIp = (HI + HC - 1) / HC * HC;
  const int64_t QB = 4;  // queries per block sharing each decoded key tile
  const int64_t nqb = (S + QB - 1) / QB;
  const int64_t blocks = B * nqb;
  // Split the key range when there are too few query blocks to occupy the threads (decode).
  int64_t splits = 1;
  if (blocks < 2 * nthr) {
    int64_t tiles = (N + KT - 1) / KT;
    splits = std::max<int64_t>(1, std::min<int64_t>((2 * nthr + blocks - 1) / blocks, tiles / 4));
  }
  int64_t per = (N + splits - 1) / splits;
  per = (per + KT - 1) / KT * KT;
  const int64_t units = blocks * splits;
  const bool want_topk = topk_out != nullptr && kout > 0;
  // per-split candidate lists (only when splitting), merged after the parallel loop
  std::vector<Cand> part;
  std::vector<int64_t> part_n;
  if (want_topk && splits > 1) {
    part.resize(B * S * splits * kout);
    part_n.assign(B * S * splits, 0);
  }
  const int qes = elem_size(q_dtype), wes = elem_size(w_dtype);
  const float ninf = -std::numeric_limits<float>::infinity();

  // a decode step's scoring (one query x a few thousand keys) stays on this thread: a fork/join
  // gains little there and waits long for a descheduled worker on a shared core
#pragma omp parallel if (B * S * N * HI * dI >= (int64_t(1) << 24))
  {
    Scratch s_q, s_k, s_w, s_row;
    float* Qt = s_q.get(QB * dI * HIp);
    float* Kr = s_k.get(KT * dI);
    float* Wt = s_w.get(QB * HIp);
    float* row = s_row.get(std::max<int64_t>(dI, HI));
    std::vector<Cand> heap_mem(want_topk && splits == 1 ? QB * kout : 0);
    float sc[KT];

#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t sp = u % splits;
      const int64_t blk = u / splits;
      const int64_t b = blk / nqb;
      const int64_t s0 = (blk % nqb) * QB;
      const int64_t nq = std::min(QB, S - s0);
      const int64_t c0 = std::min(N, sp * per), c1 = std::min(N, c0 + per);
      int64_t lim[QB];
      int64_t cmax = c0;
      TopK tk[QB];
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t qi = b * S + s0 + i;
        // SPEC §7.2 causal limit: entry c is visible to the query at t iff c < (t+1)//ratio
        // (negative or huge positions, possible with value checks off, clamp to [0, N])
        const int64_t t = positions[qi];
        int64_t vis = t < 0 ? 0 : (t == std::numeric_limits<int64_t>::max() ? t / ratio : (t + 1) / ratio);
        lim[i] = std::max<int64_t>(0, std::min(vis, N));
        cmax = std::max(cmax, std::min(lim[i], c1));
        // q transposed to [dI, HIp] (padding heads have q = 0 and weight 0)
        float* qt = Qt + i * dI * HIp;
        const char* qrow = static_cast<const char*>(q) + qi * HI * dI * qes;
        for (int64_t h = 0; h < HIp; ++h) {
          if (h < HI) {
            load_row(qrow + h * dI * qes, q_dtype, row, dI);
            for (int64_t d = 0; d < dI; ++d) qt[d * HIp + h] = row[d];
          } else {
            for (int64_t d = 0; d < dI; ++d) qt[d * HIp + h] = 0.f;
          }
        }
        load_row(static_cast<const char*>(w) + qi * HI * wes, w_dtype, Wt + i * HIp, HI);
        for (int64_t h = HI; h < HIp; ++h) Wt[i * HIp + h] = 0.f;
        if (want_topk) {
          if (splits == 1) {
            tk[i].h = heap_mem.data() + i * kout;
          } else {
            tk[i].h = part.data() + (qi * splits + sp) * kout;
          }
          tk[i].cap = kout;
        }
      }
      for (int64_t t0 = c0; t0 < cmax; t0 += KT) {
        const int kt = static_cast<int>(std::min<int64_t>(KT, cmax - t0));
        for (int j = 0; j < kt; ++j) decode_key(keys, key_kind, key_scales, b * N + t0 + j, dI, Kr + j * dI);
        for (int64_t i = 0; i < nq; ++i) {
          const int kv = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kt, lim[i] - t0)));
          if (kv > 0) tile_scores(Qt + i * dI * HIp, Wt + i * HIp, HIp, Kr, kv, dI, sc);
          const int64_t qi = b * S + s0 + i;
          if (scores_out) {
            float* dst = scores_out + qi * N + t0;
            for (int j = 0; j < kv; ++j) dst[j] = sc[j];
            for (int j = kv; j < kt; ++j) dst[j] = ninf;
          }
          if (want_topk) {
            TopK& h = tk[i];
            for (int j = 0; j < kv; ++j) {
              if (sc[j] != sc[j]) continue;  // a NaN score is never selected (docs/numerics.md)
              if (h.full() && sc[j] < h.h[0].s) continue;  // cheap reject before the heap
              h.push(sc[j], static_cast<int32_t>(t0 + j));
            }
          }
        }
      }
      if (scores_out) {  // keys of this split beyond every query's reach
        for (int64_t i = 0; i < nq; ++i) {
          float* dst = scores_out + (b * S + s0 + i) * N;
          for (int64_t c = cmax; c < c1; ++c) dst[c] = ninf;
        }
      }
      if (want_topk) {
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t qi = b * S + s0 + i;
          if (splits > 1) {
            part_n[qi * splits + sp] = tk[i].n;
            continue;
          }
          std::sort(tk[i].h, tk[i].h + tk[i].n, better);
          int32_t* dst = topk_out + qi * kout;
          for (int64_t k = 0; k < kout; ++k) dst[k] = k < tk[i].n ? static_cast<int32_t>(tk[i].h[k].i + offset) : -1;
        }
      }
    }

    if (want_topk && splits > 1) {
      std::vector<Cand> all;
#pragma omp for schedule(static)
      for (int64_t qi = 0; qi < B * S; ++qi) {
        all.clear();
        for (int64_t sp = 0; sp < splits; ++sp) {
          const Cand* p = part.data() + (qi * splits + sp) * kout;
          all.insert(all.end(), p, p + part_n[qi * splits + sp]);
        }
        const int64_t n = std::min<int64_t>(kout, all.size());
        std::partial_sort(all.begin(), all.begin() + n, all.end(), better);
        int32_t* dst = topk_out + qi * kout;
        for (int64_t k = 0; k < kout; ++k) dst[k] = k < n ? static_cast<int32_t>(all[k].i + offset) : -1;
      }
    }
  }
}

}  // namespace v4k_cpu
