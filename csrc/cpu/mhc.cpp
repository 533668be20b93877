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

// hc_pre (head = false: nm = (2+hc)·hc mix rows, Sinkhorn split) and hc_head (head = true: nm = hc
// rows, pre = sigmoid(mix·s0 + b) + eps, SPEC §10.5) share the mix GEMV and the collapse.
void mix_collapse(const void* x, int x_dtype, const float* hc_fn, const float* hc_scale, const float* hc_base,
                  int64_t T, int64_t hc, int64_t D, int64_t iters, float norm_eps, float hc_eps, void* x_in,
                  float* post, float* comb, bool head) {
  const int64_t nm = head ? hc : (2 + hc) * hc;
  const int64_t L = hc * D;
  const int xes = elem_size(x_dtype);
  constexpr int64_t TB = 4;  // tokens sharing each pass over hc_fn
  const int64_t nb = (T + TB - 1) / TB;
  std::vector<float> xf(x_dtype == F32 ? 0 : T * L);
  std::vector<float> mixes(T * nm), rs(T), pre(T * hc);
  const float* X = x_dtype == F32 ? static_cast<const float*>(x) : xf.data();
  // decode-sized calls run on the calling thread: waking a team costs more than the work
  const bool par = T * (nm + 1) * L > (int64_t(1) << 22);

#pragma omp parallel if (par)
  {
    if (x_dtype != F32) {
#pragma omp for schedule(static)
      for (int64_t t = 0; t < T; ++t)
        load_row(static_cast<const char*>(x) + t * L * xes, x_dtype, xf.data() + t * L, L);
    }
    // SPEC §10.1: mixes = (xf @ fnᵀ) · rsqrt(mean(xf²) + eps); the sum of squares rides along
    // as an extra "row" (r == nm) of the same pass.
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t bi = 0; bi < nb; ++bi)
      for (int64_t r = 0; r <= nm; ++r) {
        const int64_t t0 = bi * TB, nt = std::min(TB, T - t0);
        vf acc[TB];
        for (int64_t i = 0; i < TB; ++i) acc[i] = vf{};
        const int64_t Lv = L / VW * VW;
        float tail[TB] = {0.f, 0.f, 0.f, 0.f};
        if (r < nm) {
          const float* f = hc_fn + r * L;
          for (int64_t e = 0; e < Lv; e += VW) {
            vf fv = vload(f + e);
            for (int64_t i = 0; i < nt; ++i) acc[i] += vload(X + (t0 + i) * L + e) * fv;
          }
          for (int64_t e = Lv; e < L; ++e)
            for (int64_t i = 0; i < nt; ++i) tail[i] += X[(t0 + i) * L + e] * f[e];
          for (int64_t i = 0; i < nt; ++i) mixes[(t0 + i) * nm + r] = vsum(acc[i]) + tail[i];
        } else {
          for (int64_t e = 0; e < Lv; e += VW)
            for (int64_t i = 0; i < nt; ++i) {
              vf xv = vload(X + (t0 + i) * L + e);
              acc[i] += xv * xv;
            }
          for (int64_t e = Lv; e < L; ++e)
            for (int64_t i = 0; i < nt; ++i) tail[i] += X[(t0 + i) * L + e] * X[(t0 + i) * L + e];
          for (int64_t i = 0; i < nt; ++i) rs[t0 + i] = 1.0f / std::sqrt((vsum(acc[i]) + tail[i]) / L + norm_eps);
        }
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
    std::vector<float> o(DC);
#pragma omp for collapse(2) schedule(static)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t dc = 0; dc < nd; ++dc) {
        const int64_t d0 = dc * DC, n = std::min(DC, D - d0);
        const float* p = pre.data() + t * hc;
        for (int64_t d = 0; d < n; ++d) o[d] = 0.f;
        for (int64_t j = 0; j < hc; ++j) {
          const float* xr = X + t * L + j * D + d0;
          for (int64_t d = 0; d < n; ++d) o[d] += p[j] * xr[d];
        }
        store_row(o.data(), x_dtype, static_cast<char*>(x_in) + (t * D + d0) * xes, n);
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

void hc_post(const void* x, int x_dtype, const void* residual, const float* post, const float* comb, int64_t T,
             int64_t hc, int64_t D, bool bf16_mix, void* out) {
  const int xes = elem_size(x_dtype);
  constexpr int64_t DC = 512;
  const int64_t nd = (D + DC - 1) / DC;
#pragma omp parallel if (T * hc * D > (int64_t(1) << 20))
  {
    std::vector<float> xa(DC), ra(hc * DC), o(DC);
#pragma omp for collapse(2) schedule(static)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t dc = 0; dc < nd; ++dc) {
        const int64_t d0 = dc * DC, n = std::min(DC, D - d0);
        load_row(static_cast<const char*>(x) + (t * D + d0) * xes, x_dtype, xa.data(), n);
        for (int64_t j = 0; j < hc; ++j)
          load_row(static_cast<const char*>(residual) + ((t * hc + j) * D + d0) * xes, x_dtype, ra.data() + j * DC, n);
        const float* pt = post + t * hc;
        const float* ct = comb + t * hc * hc;
        for (int64_t k = 0; k < hc; ++k) {
          if (!bf16_mix) {
            // SPEC §10.4: out[k] = post[k]·a + Σ_j C[j,k]·R[j] (C transposed), rounded once
            const float pk = pt[k];
            for (int64_t d = 0; d < n; ++d) o[d] = pk * xa[d];
            for (int64_t j = 0; j < hc; ++j) {
              const float cjk = ct[j * hc + k];
              const float* rj = ra.data() + j * DC;
              for (int64_t d = 0; d < n; ++d) o[d] += cjk * rj[d];
            }
          } else {
            // [HF] (SPEC §15 #4): post/comb cast to the activation dtype, and post·a and Cᵀ·R
            // each rounded to it before the final sum.
            const float pk = round_to(x_dtype, pt[k]);
            float cj[64];
            for (int64_t j = 0; j < hc; ++j) cj[j] = round_to(x_dtype, ct[j * hc + k]);
            for (int64_t d = 0; d < n; ++d) {
              float r = 0.f;
              for (int64_t j = 0; j < hc; ++j) r += cj[j] * ra[j * DC + d];
              o[d] = round_to(x_dtype, pk * xa[d]) + round_to(x_dtype, r);
            }
          }
          store_row(o.data(), x_dtype, static_cast<char*>(out) + ((t * hc + k) * D + d0) * xes, n);
        }
      }
  }
}

}  // namespace v4k_cpu
