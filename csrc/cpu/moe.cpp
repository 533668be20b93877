// Routed experts of the MoE layer (SPEC §11.3, §11.4), grouped over expert segments.
//
// The (token, slot) pairs are counting-sorted by expert (−1 ids dropped), so every expert owns a
// contiguous segment of rows and runs as three panel GEMMs (gemm.cpp) over its weights, which stay
// in their storage format (bf16 / FP8 / FP4) and are decoded one panel at a time. Experts without
// tokens are skipped. Numerics follow the reference: quantised weights see the FP8 act_quant of
// their input (block 128, power-of-two scales, SPEC §4.3/§4.8, bit-exact here), every linear
// output is rounded to x's dtype, SwiGLU with the clamp in fp32, the routing weight before w2
// ([OFF]) or after it, and the k rows of a token are summed in fp32 in expert order.
#include <algorithm>

#include "common.h"
#include "kernels.h"

namespace v4k_cpu {

namespace {

bool quantised(const WeightView& w) { return w.kind == W_FP8 || w.kind == W_FP4; }

// Rows of a linear's input as the reference's linear sees them: act_quant roundtrip for
// quantised weights (the rows already hold values of x's dtype).
void prepare_input(float* A, int64_t M, int64_t K, const WeightView& w, bool par) {
  if (!quantised(w)) return;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t m = 0; m < M; ++m) fp8_roundtrip_pow2(A + m * K, K, 128);
}

}  // namespace

void moe_experts(const void* x, int x_dtype, const float* topk_w, const int32_t* topk_ids, int64_t T, int64_t D,
                 int64_t k, const WeightView& w1, const WeightView& w3, const WeightView& w2, int64_t E, int64_t I,
                 float swiglu_limit, bool weight_after_w2, float* out) {
  // counting sort of the valid pairs by expert (stable: flat index order inside a segment)
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t p = 0; p < T * k; ++p)
    if (topk_ids[p] >= 0) ++start[topk_ids[p] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  const int64_t P = start[E];
  std::vector<int64_t> pair(P), rank(T * k, -1), fill(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < T * k; ++p)
    if (topk_ids[p] >= 0) {
      rank[p] = fill[topk_ids[p]]++;
      pair[rank[p]] = p;
    }
  const int xes = elem_size(x_dtype);
  const bool par = P * D > (int64_t(1) << 15);

  std::vector<float> ys(P * D);
  int64_t maxn = 0;
  for (int64_t e = 0; e < E; ++e) maxn = std::max(maxn, start[e + 1] - start[e]);
  std::vector<float> xa(maxn * D), xb(quantised(w3) != quantised(w1) ? maxn * D : 0), g(maxn * I), u(maxn * I);

  for (int64_t e = 0; e < E; ++e) {
    const int64_t s0 = start[e], n = start[e + 1] - s0;
    if (n == 0) continue;
#pragma omp parallel for schedule(static) if (par)
    for (int64_t i = 0; i < n; ++i)
      load_row(static_cast<const char*>(x) + (pair[s0 + i] / k) * D * xes, x_dtype, xa.data() + i * D, D);
    // w1 and w3 share one activation copy unless exactly one of them is quantised
    float* a3 = xa.data();
    if (!xb.empty()) {
      std::copy(xa.begin(), xa.begin() + n * D, xb.begin());
      a3 = xb.data();
      prepare_input(quantised(w1) ? xa.data() : xb.data(), n, D, quantised(w1) ? w1 : w3, par);
    } else {
      prepare_input(xa.data(), n, D, w1, par);
    }
    const GemmJob up[2] = {{xa.data(), n, D, w1, e, g.data(), I}, {a3, n, D, w3, e, u.data(), I}};
    gemm_panels(up, 2);
    // SwiGLU (SPEC §11.3): silu(min(g, L)) · clamp(u, −L, L) on the dtype-rounded outputs
#pragma omp parallel for schedule(static) if (par)
    for (int64_t i = 0; i < n; ++i) {
      float* gr = g.data() + i * I;
      float* ur = u.data() + i * I;
      round_through(gr, x_dtype, I);
      round_through(ur, x_dtype, I);
      const float wt = topk_w[pair[s0 + i]];
      for (int64_t j = 0; j < I; ++j) {
        float gv = gr[j], uv = ur[j];
        if (swiglu_limit > 0) {
          gv = std::min(gv, swiglu_limit);
          uv = std::min(std::max(uv, -swiglu_limit), swiglu_limit);
        }
        float h = gv / (1.0f + std::exp(-gv)) * uv;
        if (!weight_after_w2) h *= wt;  // [OFF]: the weight passes through w2's quantiser
        gr[j] = h;
      }
      round_through(gr, x_dtype, I);
    }
    prepare_input(g.data(), n, I, w2, par);
    const GemmJob down{g.data(), n, I, w2, e, ys.data() + s0 * D, D};
    gemm_panels(&down, 1);
#pragma omp parallel for schedule(static) if (par)
    for (int64_t i = 0; i < n; ++i) {
      float* y = ys.data() + (s0 + i) * D;
      round_through(y, x_dtype, D);
      if (weight_after_w2) {
        const float wt = topk_w[pair[s0 + i]];
        for (int64_t d = 0; d < D; ++d) y[d] *= wt;
      }
    }
  }
  // SPEC §11.4: out[t] = Σ over t's pairs in segment order, fp32
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < T; ++t) {
    float* o = out + t * D;
    for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
    int64_t rs[64];
    int nr = 0;
    for (int64_t j = 0; j < k; ++j)
      if (rank[t * k + j] >= 0) rs[nr++] = rank[t * k + j];
    std::sort(rs, rs + nr);
    for (int i = 0; i < nr; ++i) {
      const float* y = ys.data() + rs[i] * D;
      for (int64_t d = 0; d < D; ++d) o[d] += y[d];
    }
  }
}

}  // namespace v4k_cpu
