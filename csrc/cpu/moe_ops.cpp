// CPU bindings of the routed/shared experts: validate the facts the raw-pointer kernels in
// moe.cpp rely on, make inputs contiguous, allocate outputs. The schemas are the
// v4k_impl::<op> implementation schemas declared once in Python (v4kernels/ops/*/__init__.py);
// this file only implements them on the CPU key.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "aten_utils.h"

namespace {

using at::Tensor;
using namespace v4k_cpu::aten;

// An expert weight stack [E, rows, cols] (FP4: [E, rows, cols/2] packed) in its storage format,
// with the contiguous tensors it points into kept alive.
struct OwnedWeight {
  Tensor data, scales;
  v4k_cpu::WeightView view;
};

OwnedWeight expert_weight(const Tensor& w, const c10::optional<Tensor>& w_s, const char* name) {
  TORCH_CHECK(w.dim() == 3, "v4k_cpu::moe_experts: ", name, " must be [E, rows, cols], got ", w.sizes());
  check_cpu(w, "moe_experts", name);
  OwnedWeight o;
  const int64_t E = w.size(0), R = w.size(1);
  const auto st = w.scalar_type();
  if (st == at::kFloat8_e4m3fn) {
    const int64_t C = w.size(2);
    TORCH_CHECK(w_s.has_value() && w_s->numel() == E * ((R + 127) / 128) * ((C + 127) / 128),
                "v4k_cpu::moe_experts: e4m3 ", name, " needs scales [E, ceil(rows/128), ceil(cols/128)]");
    o.data = w.contiguous();
    o.view = {o.data.data_ptr(), nullptr, v4k_cpu::W_FP8, R, C};
    o.scales = attach_scales(*w_s, o.view);
  } else if (st == at::kByte || st == at::kChar || st == at::kFloat4_e2m1fn_x2) {
    const int64_t C = 2 * w.size(2);
    TORCH_CHECK(C % 32 == 0 && w_s.has_value() && w_s->numel() == E * R * (C / 32),
                "v4k_cpu::moe_experts: packed FP4 ", name, " needs scales [E, rows, cols/32]");
    o.data = w.contiguous().view(at::kByte);
    o.view = {o.data.data_ptr(), nullptr, v4k_cpu::W_FP4, R, C};
    o.scales = attach_scales(*w_s, o.view);
  } else {
    // float experts are read in place when each expert's [rows, cols] matrix is row-contiguous
    const int64_t C = w.size(2);
    const bool rows_contiguous = (w.stride(2) == 1 || C <= 1) && (w.stride(1) == C || R <= 1) && w.stride(0) >= R * C;
    o.data = rows_contiguous ? w : w.contiguous();
    o.view = {o.data.data_ptr(), nullptr, float_code(w, "moe_experts", name), R, C};
    o.view.expert_stride = rows_contiguous ? w.stride(0) : 0;
  }
  return o;
}

Tensor moe_experts(const Tensor& x, const Tensor& topk_weights, const Tensor& topk_ids, const Tensor& w1,
                   const c10::optional<Tensor>& w1_s, const Tensor& w3, const c10::optional<Tensor>& w3_s,
                   const Tensor& w2, const c10::optional<Tensor>& w2_s, double swiglu_limit, bool weight_after_w2,
                   at::ScalarType out_dtype, bool hf_rounding) {
  // [HF] roundings: to x.dtype inside the FFN, running sum over experts in out_dtype
  TORCH_CHECK(!hf_rounding || out_dtype == at::kFloat || out_dtype == x.scalar_type(),
              "v4k_cpu::moe_experts: hf_rounding needs out_dtype float32 or x.dtype, got ", out_dtype, " for x ",
              x.scalar_type());
  for (auto* p : {&x, &topk_weights, &topk_ids}) check_cpu(*p, "moe_experts", "inputs");
  TORCH_CHECK(x.dim() == 2, "v4k_cpu::moe_experts: x must be [T, D], got ", x.sizes());
  const int64_t T = x.size(0), D = x.size(1);
  const int xd = float_code(x, "moe_experts", "x");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == T && topk_ids.scalar_type() == at::kInt &&
                  topk_weights.sizes() == topk_ids.sizes(),
              "v4k_cpu::moe_experts: topk_ids int32 [T, k] and topk_weights [T, k], got ", topk_ids.sizes(), " ",
              topk_weights.sizes());
  const int64_t k = topk_ids.size(1);
  TORCH_CHECK(k <= v4k_cpu::kMoeMaxTopk, "v4k_cpu::moe_experts: at most ", v4k_cpu::kMoeMaxTopk, " experts per token, got ", k);
  auto o1 = expert_weight(w1, w1_s, "w1"), o3 = expert_weight(w3, w3_s, "w3"), o2 = expert_weight(w2, w2_s, "w2");
  const int64_t E = w1.size(0), I = o1.view.rows;
  TORCH_CHECK(o1.view.cols == D && o3.view.rows == I && o3.view.cols == D && o2.view.rows == D && o2.view.cols == I &&
                  w3.size(0) == E && w2.size(0) == E,
              "v4k_cpu::moe_experts: w1, w3 must be [E, I, D] and w2 [E, D, I]");
  for (const auto* o : {&o1, &o3, &o2})
    TORCH_CHECK((o->view.kind != v4k_cpu::W_FP8 && o->view.kind != v4k_cpu::W_FP4) || o->view.cols % 128 == 0,
                "v4k_cpu::moe_experts: quantised weights need an input dim that is a multiple of 128 (act_quant)");
  auto out = at::empty({T, D}, x.options().dtype(at::kFloat));
  if (T == 0 || D == 0) return out.to(out_dtype);
  auto xc = x.contiguous();
  auto wc = topk_weights.to(at::kFloat).contiguous();
  auto ic = topk_ids.contiguous();
  {
    const int32_t* ids = ic.data_ptr<int32_t>();
    for (int64_t i = 0; i < ic.numel(); ++i)
      TORCH_CHECK(ids[i] >= -1 && ids[i] < E, "v4k_cpu::moe_experts: expert id ", ids[i], " outside [-1, ", E, ")");
  }
  if (I == 0) return out.zero_().to(out_dtype);
  v4k_cpu::moe_experts(xc.data_ptr(), xd, wc.data_ptr<float>(), ic.data_ptr<int32_t>(), T, D, k, o1.view, o3.view,
                       o2.view, E, I, static_cast<float>(swiglu_limit), weight_after_w2, out.data_ptr<float>(),
                       hf_rounding, out_dtype == at::kFloat ? static_cast<int>(v4k::F32) : xd);
  return out_dtype == at::kFloat ? out : out.to(out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(v4k_impl, CPU, m) {
  m.impl("moe_experts", &moe_experts);
}
