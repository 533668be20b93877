// Routed experts of the MoE layer (SPEC §11.3, §11.4), grouped over expert segments.
//
// The (token, slot) pairs are counting-sorted by expert (−1 ids dropped), so every expert owns a
// contiguous segment of rows and runs as three GEMMs (gemm.cpp) over its weights, which stay in
// their storage format: FP8 / FP4 weights are read straight from their packed bytes by the direct
// kernel (gemm_direct), bf16 / fp32 ones decoded one panel at a time (gemm_panels). Experts without
// tokens are skipped; the experts of a wave of segments share each GEMM call. Numerics follow the
// reference: quantised weights see the FP8 act_quant of their input (block 128, power-of-two
// scales, SPEC §4.3/§4.8, bit-exact here), every linear output is rounded to x's dtype, SwiGLU with
// the clamp in fp32, the routing weight before w2 ([OFF]) or after it, and the k rows of a token
// are summed in fp32 in expert order.
#include <algorithm>
#include <memory>

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

// Quantised weights go through the direct small-M kernel whatever the segment size (a row's result
// must not depend on how many other rows share its expert); float weights through the panels.
void run_gemms(const std::vector<GemmJob>& jobs) {
  std::vector<GemmJob> direct, panels;
  for (const GemmJob& j : jobs) (quantised(j.w) ? direct : panels).push_back(j);
  if (!direct.empty()) gemm_direct(direct.data(), static_cast<int>(direct.size()));
  if (!panels.empty()) gemm_panels(panels.data(), static_cast<int>(panels.size()));
}

}  // namespace

void moe_experts(const void* x, int x_dtype, const float* topk_w, const int32_t* topk_ids, int64_t T, int64_t D,
                 int64_t k, const WeightView& w1, const WeightView& w3, const WeightView& w2, int64_t E, int64_t I,
                 float swiglu_limit, bool weight_after_w2, float* out, bool hf_rounding, int out_dtype) {
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
  // every row is written by the w2 GEMM; left uninitialised (no serial zero fill of P·D floats)
  std::unique_ptr<float[]> ys_buf(new float[P * D]);
  float* ys = ys_buf.get();
  int64_t maxn = 0;
  for (int64_t e = 0; e < E; ++e) maxn = std::max(maxn, start[e + 1] - start[e]);
  // Experts run in waves of consecutive segments holding at most `budget` rows together (all of
  // them at decode), so one parallel GEMM call covers every expert of a wave.
  const int64_t budget = std::min<int64_t>(P, std::max<int64_t>(maxn, 512));
  std::vector<float> xa(budget * D), xb(quantised(w3) != quantised(w1) ? budget * D : 0), g(budget * I),
      u(budget * I);
  std::vector<GemmJob> up, down;

  for (int64_t e0 = 0, e1; e0 < E; e0 = e1) {
    e1 = e0 + 1;
    while (e1 < E && start[e1 + 1] - start[e0] <= budget) ++e1;
    const int64_t r0 = start[e0], n = start[e1] - r0;
    if (n == 0) continue;
    const bool par = n * D > (int64_t(1) << 15);
#pragma omp parallel for schedule(static) if (par)
    for (int64_t i = 0; i < n; ++i)
      load_row(static_cast<const char*>(x) + (pair[r0 + i] / k) * D * xes, x_dtype, xa.data() + i * D, D);
    // w1 and w3 share one activation copy unless exactly one of them is quantised
    float* a3 = xa.data();
    if (!xb.empty()) {
      std::copy(xa.begin(), xa.begin() + n * D, xb.begin());
      a3 = xb.data();
      prepare_input(quantised(w1) ? xa.data() : xb.data(), n, D, quantised(w1) ? w1 : w3, par);
    } else {
      prepare_input(xa.data(), n, D, w1, par);
    }
    up.clear();
    down.clear();
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t ne = start[e + 1] - start[e], off = start[e] - r0;
      if (ne == 0) continue;
      up.push_back({xa.data() + off * D, ne, D, w1, e, g.data() + off * I, I});
      up.push_back({a3 + off * D, ne, D, w3, e, u.data() + off * I, I});
      down.push_back({g.data() + off * I, ne, I, w2, e, ys + start[e] * D, D});
    }
    run_gemms(up);
    // SwiGLU (SPEC §11.3): silu(min(g, L)) · clamp(u, −L, L) on the dtype-rounded outputs
#pragma omp parallel for schedule(static) if (par)
    for (int64_t i = 0; i < n; ++i) {
      float* gr = g.data() + i * I;
      float* ur = u.data() + i * I;
      round_through(gr, x_dtype, I);
      round_through(ur, x_dtype, I);
      const float wt = topk_w[pair[r0 + i]];
      for (int64_t j = 0; j < I; ++j) {
        float gv = gr[j], uv = ur[j];
        if (swiglu_limit > 0) {
          gv = std::min(gv, swiglu_limit);
          uv = std::min(std::max(uv, -swiglu_limit), swiglu_limit);
        }
        float h;
        if (hf_rounding) {  // [HF]: silu(g) and its product with u each rounded to x.dtype
          float sg = gv / (1.0f + std::exp(-gv));
          round_through(&sg, x_dtype, 1);
          h = sg * uv;
        } else {
          h = gv / (1.0f + std::exp(-gv)) * uv;
          if (!weight_after_w2) h *= wt;  // [OFF]: the weight passes through w2's quantiser
        }
        gr[j] = h;
      }
      round_through(gr, x_dtype, I);
    }
    prepare_input(g.data(), n, I, w2, par);
    run_gemms(down);
#pragma omp parallel for schedule(static) if (par)
    for (int64_t i = 0; i < n; ++i) {
      float* y = ys + (r0 + i) * D;
      round_through(y, x_dtype, D);
      if (hf_rounding) {  // [HF]: times the routing weight in x.dtype, rounded to x.dtype
        float wt = topk_w[pair[r0 + i]];
        round_through(&wt, x_dtype, 1);
        for (int64_t d = 0; d < D; ++d) y[d] *= wt;
        round_through(y, x_dtype, D);
      } else if (weight_after_w2) {
        const float wt = topk_w[pair[r0 + i]];
        for (int64_t d = 0; d < D; ++d) y[d] *= wt;
      }
    }
  }
  // SPEC §11.4: out[t] = Σ over t's pairs in segment order, fp32
#pragma omp parallel for schedule(static) if (P * D > (int64_t(1) << 15))
  for (int64_t t = 0; t < T; ++t) {
    float* o = out + t * D;
    for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
    int64_t rs[kMoeMaxTopk];
    int nr = 0;
    for (int64_t j = 0; j < k; ++j)
      if (rank[t * k + j] >= 0) rs[nr++] = rank[t * k + j];
    std::sort(rs, rs + nr);
    for (int i = 0; i < nr; ++i) {
      const float* y = ys + rs[i] * D;
      for (int64_t d = 0; d < D; ++d) o[d] += y[d];
      // [HF]: the running sum is kept in the output dtype (a bf16 model sums its experts in bf16)
      if (hf_rounding) round_through(o, out_dtype, D);
    }
  }
}

}  // namespace v4k_cpu
