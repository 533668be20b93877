// Manifold-constrained hyper-connections (SPEC §10): Sinkhorn split of the mix logits, the
// fused pre step (RMS-scaled GEMV of the flattened streams + Sinkhorn + stream collapse) and the
// post step (stream expansion with the transposed comb mixing). fp32 math, one rounding.
#include <algorithm>

#include "common.h"
#include "kernels.h"

namespace v4k_cpu {
namespace {

inline float round_to(int dtype, float x) {
  if (dtype == BF16) return bf16_to_f32(f32_to_bf16(x));
  if (dtype == F16) return f16_to_f32(f32_to_f16(x));
  return x;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// One token: mixes [(2+hc)*hc] -> pre [hc], post [hc], comb [hc*hc] (SPEC §10.2 op order).
void split_one(const float* m, const float* s, const float* b, int64_t hc, int64_t iters, float eps, float* pre,
               float* post, float* c) {
  for (int64_t j = 0; j < hc; ++j) {
    pre[j] = sigmoid(m[j] * s[0] + b[j]) + eps;
    post[j] = 2.0f * sigmoid(m[hc + j] * s[1] + b[hc + j]);
  }
  const float* ml = m + 2 * hc;
  const float* bl = b + 2 * hc;
  for (int64_t j = 0; j < hc; ++j) {  // row softmax of the comb logits, then + eps
    float* row = c + j * hc;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t k = 0; k < hc; ++k) {
      row[k] = ml[j * hc + k] * s[2] + bl[j * hc + k];
      mx = std::max(mx, row[k]);
    }
    float sum = 0.f;
    for (int64_t k = 0; k < hc; ++k) {
      row[k] = std::exp(row[k] - mx);
      sum += row[k];
    }
    for (int64_t k = 0; k < hc; ++k) row[k] = row[k] / sum + eps;
  }
  auto col_norm = [&] {
    for (int64_t k = 0; k < hc; ++k) {
      float sum = 0.f;
      for (int64_t j = 0; j < hc; ++j) sum += c[j * hc + k];
      float den = sum + eps;
      for (int64_t j = 0; j < hc; ++j) c[j * hc + k] /= den;
    }
  };
  auto row_norm = [&] {
    for (int64_t j = 0; j < hc; ++j) {
      float sum = 0.f;
      for (int64_t k = 0; k < hc; ++k) sum += c[j * hc + k];
      float den = sum + eps;
      for (int64_t k = 0; k < hc; ++k) c[j * hc + k] /= den;
    }
  };
  col_norm();
  for (int64_t it = 0; it + 1 < iters; ++it) {
    row_norm();
    col_norm();
  }
}

}  // namespace

void hc_split_sinkhorn(const float* mixes, const float* hc_scale, const float* hc_base, int64_t T, int64_t hc,
                       int64_t iters, float eps, float* pre, float* post, float* comb) {
  const int64_t nm = (2 + hc) * hc;
#pragma omp parallel for schedule(static) if (T > 64)
  for (int64_t t = 0; t < T; ++t)
    split_one(mixes + t * nm, hc_scale, hc_base, hc, iters, eps, pre + t * hc, post + t * hc, comb + t * hc * hc);
}

namespace {

// Mix GEMV block (SPEC §10.1): R rows of hc_fn against TT tokens of the flattened streams, and
// (SQ) the tokens' sums of squares from the same x loads. Each (token, row) keeps one vector
// accumulator over the whole row; `acc` persists it across the K chunks, so a dot product's
// arithmetic is the same whatever the row grouping, chunking or thread count.
template <int DT, int R, int TT, bool SQ>
void mix_block(const void* x, int64_t L, const float* fn, int64_t e0, int64_t e1, vf* acc, vf* sq) {
  vf a[TT][R], s[TT];
  for (int i = 0; i < TT; ++i) {
    for (int r = 0; r < R; ++r) a[i][r] = acc[i * R + r];
    if (SQ) s[i] = sq[i];
  }
  for (int64_t e = e0; e < e1; e += VW) {
    vf xv[TT];
    for (int i = 0; i < TT; ++i) {
      xv[i] = vload_as(x, DT, i * L + e);
      if (SQ) s[i] += xv[i] * xv[i];
    }
    for (int r = 0; r < R; ++r) {
      const vf f = vload(fn + r * L + e);
      for (int i = 0; i < TT; ++i) a[i][r] += xv[i] * f;
    }
  }
  for (int i = 0; i < TT; ++i) {
    for (int r = 0; r < R; ++r) acc[i * R + r] = a[i][r];
    if (SQ) sq[i] = s[i];
  }
}

using MixFn = void (*)(const void*, int64_t, const float*, int64_t, int64_t, vf*, vf*);

// Row-block sizes: accumulators (R·TT, plus TT for the squares) stay within the register file.
constexpr int kRows[] = {12, 8, 4, 2, 1};
inline int max_rows(int64_t tt) { return tt == 1 ? 12 : tt == 2 ? 8 : 4; }

template <int DT, int TT, bool SQ>
MixFn mix_fn_r(int r) {
  switch (r) {
    case 12: return mix_block<DT, 12, TT, SQ>;
    case 8: return mix_block<DT, 8, TT, SQ>;
    case 4: return mix_block<DT, 4, TT, SQ>;
    case 2: return mix_block<DT, 2, TT, SQ>;
    default: return mix_block<DT, 1, TT, SQ>;
  }
}
template <int DT, bool SQ>
MixFn mix_fn_t(int tt, int r) {
  switch (tt) {
    case 4: return mix_fn_r<DT, 4, SQ>(r);
    case 3: return mix_fn_r<DT, 3, SQ>(r);
    case 2: return mix_fn_r<DT, 2, SQ>(r);
    default: return mix_fn_r<DT, 1, SQ>(r);
  }
}
inline MixFn mix_fn(int dt, int tt, int r, bool sq) {
  if (dt == BF16) return sq ? mix_fn_t<BF16, true>(tt, r) : mix_fn_t<BF16, false>(tt, r);
  return sq ? mix_fn_t<F32, true>(tt, r) : mix_fn_t<F32, false>(tt, r);
}

// hc_pre (head = false: nm = (2+hc)·hc mix rows, Sinkhorn split) and hc_head (head = true: nm = hc
// rows, pre = sigmoid(mix·s0 + b) + eps, SPEC §10.5) share the mix GEMV and the collapse.
//
// Work split: units of (up to 4 tokens) x (a range of mix rows); with few tokens (decode) the rows
// are split across the threads, so each thread streams its share of hc_fn once. Within a unit the
// K dimension runs in chunks that keep the tokens' x in L1 while the row blocks pass over it.
void mix_collapse(const void* x, int x_dtype, const float* hc_fn, const float* hc_scale, const float* hc_base,
                  int64_t T, int64_t hc, int64_t D, int64_t iters, float norm_eps, float hc_eps, void* x_in,
                  float* post, float* comb, bool head) {
  const int64_t nm = head ? hc : (2 + hc) * hc;
  const int64_t L = hc * D;
  const int64_t Lv = L / VW * VW;
  const int xes = elem_size(x_dtype);
  constexpr int64_t TB = 4;  // tokens sharing each pass over hc_fn
  const int64_t nb = (T + TB - 1) / TB;
  // fp16 streams are decoded once; bf16 and fp32 are read in place by the GEMV
  std::vector<float> xf(x_dtype == F16 ? T * L : 0);
  const void* X = x_dtype == F16 ? static_cast<const void*>(xf.data()) : x;
  const int xdt = x_dtype == F16 ? F32 : x_dtype;
  std::vector<float> mixes(T * nm), rs(T), pre(T * hc);
  // a team pays off once the token work is large (~2M multiply-adds); a decode step's GEMV over
  // hc_fn (V4: 1.5 MB) stays on this thread: a fork/join costs more than it saves, and much more
  // when a core is shared with another process
  const bool par = T * nm * L >= (int64_t(1) << 21);
  const int nthr = par ? num_threads() : 1;
  const int64_t nr = std::max<int64_t>(1, std::min<int64_t>(nm, (nthr + nb - 1) / nb));  // row ranges
  const int64_t units = nb * nr;
  constexpr int64_t KC = 2048;  // K chunk (x of 4 bf16 tokens: 16 KiB)

#pragma omp parallel num_threads(nthr) if (nthr > 1)
  {
    if (x_dtype == F16) {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < T; ++t)
        load_row(static_cast<const char*>(x) + t * L * xes, F16, xf.data() + t * L, L);
    }
    std::vector<vf> sq(TB);
    // SPEC §10.1: mixes = (xf @ fnᵀ) · rsqrt(mean(xf²) + eps); the last row range also sums x².
    auto unit = [&](int64_t u) {
      const int64_t bi = u / nr, ri = u % nr;
      const int64_t t0 = bi * TB, nt = std::min(TB, T - t0);
      const int64_t r0 = ri * nm / nr, r1 = (ri + 1) * nm / nr;
      const bool do_sq = ri == nr - 1;
      const int rmax = max_rows(nt);
      const char* xt = static_cast<const char*>(X) + t0 * L * elem_size(xdt);
      std::vector<vf> accs((r1 - r0) * nt, vf{});
      for (int64_t i = 0; i < nt; ++i) sq[i] = vf{};
      for (int64_t e0 = 0; e0 < Lv; e0 += KC) {
        const int64_t e1 = std::min(Lv, e0 + KC);
        bool sq_here = do_sq;  // the squares ride along with the first row block
        for (int64_t r = r0; r < r1;) {
          int rb = 1;
          for (int c : kRows)
            if (c <= rmax && c <= r1 - r) {
              rb = c;
              break;
            }
          vf* a = accs.data() + (r - r0) * nt;
          mix_fn(xdt, static_cast<int>(nt), rb, sq_here)(xt, L, hc_fn + r * L, e0, e1, a, sq.data());
          sq_here = false;
          r += rb;
        }
      }
      for (int64_t r = r0; r < r1;) {  // horizontal sums plus the scalar tail beyond Lv
        int rb = 1;
        for (int c : kRows)
          if (c <= rmax && c <= r1 - r) {
            rb = c;
            break;
          }
        const vf* a = accs.data() + (r - r0) * nt;
        for (int64_t i = 0; i < nt; ++i)
          for (int64_t k = 0; k < rb; ++k) {
            const float* xr = reinterpret_cast<const float*>(xt) + i * L;  // F32 only when a tail exists
            const uint16_t* xh = reinterpret_cast<const uint16_t*>(xt) + i * L;
            float tail = 0.f;
            for (int64_t e = Lv; e < L; ++e)
              tail += (xdt == F32 ? xr[e] : bf16_to_f32(xh[e])) * hc_fn[(r + k) * L + e];
            mixes[(t0 + i) * nm + r + k] = vsum(a[i * rb + k]) + tail;
          }
        r += rb;
      }
      if (do_sq)
        for (int64_t i = 0; i < nt; ++i) {
          const float* xr = reinterpret_cast<const float*>(xt) + i * L;
          const uint16_t* xh = reinterpret_cast<const uint16_t*>(xt) + i * L;
          float tail = 0.f;
          for (int64_t e = Lv; e < L; ++e) {
            const float v = xdt == F32 ? xr[e] : bf16_to_f32(xh[e]);
            tail += v * v;
          }
          rs[t0 + i] = 1.0f / std::sqrt((vsum(sq[i]) + tail) / L + norm_eps);
        }
    };
    const int team = team_size();
    if (units <= team) {  // one unit per thread, always the same one: its hc_fn rows stay in its cache
      if (thread_id() < units) unit(thread_id());
#pragma omp barrier
    } else {
#pragma omp for schedule(dynamic, 1)
      for (int64_t u = 0; u < units; ++u) unit(u);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      float* m = mixes.data() + t * nm;
      for (int64_t r = 0; r < nm; ++r) m[r] *= rs[t];
      if (head) {
        for (int64_t r = 0; r < hc; ++r)
          pre[t * hc + r] = 1.0f / (1.0f + std::exp(-(m[r] * hc_scale[0] + hc_base[r]))) + hc_eps;
      } else {
        split_one(m, hc_scale, hc_base, hc, iters, hc_eps, pre.data() + t * hc, post + t * hc, comb + t * hc * hc);
      }
    }
    // SPEC §10.3: x_in = Σ_j pre[j] · X[j], one rounding; parallel over (token, D chunk)
    constexpr int64_t DC = 1024;
    const int64_t nd = (D + DC - 1) / DC;
#pragma omp for collapse(2) schedule(static)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t dc = 0; dc < nd; ++dc) {
        const int64_t d0 = dc * DC, d1 = std::min(D, d0 + DC);
        const int64_t dv = d0 + (d1 - d0) / VW * VW;
        const float* p = pre.data() + t * hc;
        for (int64_t d = d0; d < dv; d += VW) {
          vf o = vf{};
          for (int64_t j = 0; j < hc; ++j) o += p[j] * vload_as(x, x_dtype, (t * hc + j) * D + d);
          vstore_as(x_in, x_dtype, t * D + d, o);
        }
        if (dv < d1) {
          float o[VW];
          for (int64_t d = dv; d < d1; ++d) o[d - dv] = 0.f;
          for (int64_t j = 0; j < hc; ++j) {
            float xr[VW];
            load_row(static_cast<const char*>(x) + ((t * hc + j) * D + dv) * xes, x_dtype, xr, d1 - dv);
            for (int64_t d = dv; d < d1; ++d) o[d - dv] += p[j] * xr[d - dv];
          }
          store_row(o, x_dtype, static_cast<char*>(x_in) + (t * D + dv) * xes, d1 - dv);
        }
      }
  }
}

}  // namespace

void hc_pre(const void* x, int x_dtype, const float* hc_fn, const float* hc_scale, const float* hc_base, int64_t T,
            int64_t hc, int64_t D, int64_t iters, float norm_eps, float hc_eps, void* x_in, float* post,
            float* comb) {
  mix_collapse(x, x_dtype, hc_fn, hc_scale, hc_base, T, hc, D, iters, norm_eps, hc_eps, x_in, post, comb, false);
}

void hc_head(const void* x, int x_dtype, const float* hc_fn, const float* hc_scale, const float* hc_base, int64_t T,
             int64_t hc, int64_t D, float norm_eps, float hc_eps, void* out) {
  mix_collapse(x, x_dtype, hc_fn, hc_scale, hc_base, T, hc, D, 0, norm_eps, hc_eps, out, nullptr, nullptr, true);
}

namespace {

// SPEC §10.4 on D elements [d0, d1) of token t: out[k] = post[k]·a + Σ_j C[j,k]·R[j] (C transposed),
// in fp32, rounded once; bf16_mix is the [HF] variant (SPEC §15 #4): post/comb cast to the
// activation dtype, and post·a and Cᵀ·R each rounded to it before the final sum. HC > 0 fixes
// the stream count at compile time (V4: 4), HC = 0 reads it from hc.
template <int DT, int HC>
void post_range(const void* x, const void* residual, const float* pt, const float* ct, int64_t t, int64_t hc_rt,
                int64_t D, int64_t d0, int64_t d1, bool bf16_mix, void* out) {
  const int64_t hc = HC > 0 ? HC : hc_rt;
  float pk[kHcPostMaxStreams], cjk[kHcPostMaxStreams * kHcPostMaxStreams];  // cjk[k][j] = C[j,k]
  for (int64_t k = 0; k < hc; ++k) {
    pk[k] = bf16_mix ? round_to(DT, pt[k]) : pt[k];
    for (int64_t j = 0; j < hc; ++j) cjk[k * hc + j] = bf16_mix ? round_to(DT, ct[j * hc + k]) : ct[j * hc + k];
  }
  const void* rt = static_cast<const char*>(residual) + t * hc * D * elem_size(DT);
  void* ot = static_cast<char*>(out) + t * hc * D * elem_size(DT);
  const int64_t dv = d0 + (d1 - d0) / VW * VW;
  vf rv[HC > 0 ? HC : kHcPostMaxStreams];
  for (int64_t d = d0; d < dv; d += VW) {
    const vf a = vload_as(x, DT, t * D + d);
    for (int64_t j = 0; j < hc; ++j) rv[j] = vload_as(rt, DT, j * D + d);
    for (int64_t k = 0; k < hc; ++k) {
      const float* c = cjk + k * hc;
      vf o;
      if (!bf16_mix) {
        o = pk[k] * a;
        for (int64_t j = 0; j < hc; ++j) o += c[j] * rv[j];
      } else {
        vf r = vf{};
        for (int64_t j = 0; j < hc; ++j) r += c[j] * rv[j];
        o = vround_as(DT, pk[k] * a) + vround_as(DT, r);
      }
      vstore_as(ot, DT, k * D + d, o);
    }
  }
  if (dv == d1) return;
  const int64_t n = d1 - dv;
  const int es = elem_size(DT);
  float a[VW], rr[kHcPostMaxStreams * VW], o[VW];
  load_row(static_cast<const char*>(x) + (t * D + dv) * es, DT, a, n);
  for (int64_t j = 0; j < hc; ++j) load_row(static_cast<const char*>(rt) + (j * D + dv) * es, DT, rr + j * VW, n);
  for (int64_t k = 0; k < hc; ++k) {
    const float* c = cjk + k * hc;
    for (int64_t d = 0; d < n; ++d) {
      if (!bf16_mix) {
        o[d] = pk[k] * a[d];
        for (int64_t j = 0; j < hc; ++j) o[d] += c[j] * rr[j * VW + d];
      } else {
        float r = 0.f;
        for (int64_t j = 0; j < hc; ++j) r += c[j] * rr[j * VW + d];
        o[d] = round_to(DT, pk[k] * a[d]) + round_to(DT, r);
      }
    }
    store_row(o, DT, static_cast<char*>(ot) + (k * D + dv) * es, n);
  }
}

using PostFn = void (*)(const void*, const void*, const float*, const float*, int64_t, int64_t, int64_t, int64_t,
                        int64_t, bool, void*);
template <int DT>
PostFn post_fn_hc(int64_t hc) {
  return hc == 4 ? post_range<DT, 4> : post_range<DT, 0>;
}

}  // namespace

void hc_post(const void* x, int x_dtype, const void* residual, const float* post, const float* comb, int64_t T,
             int64_t hc, int64_t D, bool bf16_mix, void* out) {
  const PostFn fn = x_dtype == BF16 ? post_fn_hc<BF16>(hc) : x_dtype == F16 ? post_fn_hc<F16>(hc) : post_fn_hc<F32>(hc);
  constexpr int64_t DC = 1024;
  const int64_t nd = (D + DC - 1) / DC;
  // a team pays off from about two decode tokens of V4 width (32K outputs, several microseconds)
#pragma omp parallel for collapse(2) schedule(static) if (T * hc * D >= (int64_t(1) << 15))
  for (int64_t t = 0; t < T; ++t)
    for (int64_t dc = 0; dc < nd; ++dc)
      fn(x, residual, post + t * hc, comb + t * hc * hc, t, hc, D, dc * DC, std::min(D, dc * DC + DC), bf16_mix, out);
}

}  // namespace v4k_cpu
