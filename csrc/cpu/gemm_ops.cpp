// CPU bindings of the block-scaled FP8/FP4 GEMMs: validate the facts the raw-pointer kernels in
// gemm.cpp rely on, make inputs contiguous, allocate outputs. The schemas are the
// v4k_impl::<op> implementation schemas declared once in Python (v4kernels/ops/*/__init__.py);
// this file only implements them on the CPU key.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "aten_utils.h"

namespace {

using at::Tensor;
using namespace v4k_cpu::aten;

// A [M,K] e4m3 + a_s [M, ceil(K/128)] -> fp32 [M,K]
Tensor dequant_act_fp8(const Tensor& a, const Tensor& a_s) {
  const int64_t M = a.size(0), K = a.size(1);
  auto s = scales_f32(a_s).repeat_interleave(128, 1).narrow(1, 0, K);
  return a.to(at::kFloat) * s;
}

Tensor weight_gemm(const Tensor& af, const v4k_cpu::WeightView& w, int64_t e) {
  const int64_t M = af.size(0);
  auto out = at::empty({M, w.rows}, af.options());
  if (M == 0 || w.rows == 0) return out;
  if (M >= 32) {  // compute bound: decode once to fp32 and use ATen's fp32 GEMM
    auto wf = at::empty({w.rows, w.cols}, af.options());
    v4k_cpu::dequant_weight(w, e, wf.data_ptr<float>());
    at::mm_out(out, af, wf.t());
  } else {  // memory bound: decode each weight row once, right before use
    v4k_cpu::weight_gemm_small(af.data_ptr<float>(), M, w, e, out.data_ptr<float>());
  }
  return out;
}

Tensor fp8_gemm(const Tensor& a, const Tensor& a_s, const Tensor& b, const Tensor& b_s, at::ScalarType out_dtype) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1) && a.scalar_type() == at::kFloat8_e4m3fn &&
                  b.scalar_type() == at::kFloat8_e4m3fn,
              "v4k_cpu::fp8_gemm: a [M,K] and b [N,K] must be float8_e4m3fn");
  const int64_t N = b.size(0), K = b.size(1);
  TORCH_CHECK(b_s.numel() == ((N + 127) / 128) * ((K + 127) / 128), "v4k_cpu::fp8_gemm: b_s must be [ceil(N/128), ceil(K/128)]");
  auto af = dequant_act_fp8(a.contiguous(), a_s).contiguous();
  auto bc = b.contiguous();
  v4k_cpu::WeightView w{bc.data_ptr(), nullptr, v4k_cpu::W_FP8, N, K};
  auto bs = attach_scales(b_s, w);
  return weight_gemm(af, w, 0).to(out_dtype);
}

Tensor fp4_gemm(const Tensor& a, const Tensor& a_s, const Tensor& b, const Tensor& b_s, at::ScalarType out_dtype) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == 2 * b.size(1) && a.scalar_type() == at::kFloat8_e4m3fn,
              "v4k_cpu::fp4_gemm: a [M,K] e4m3 and b [N,K/2] packed");
  const int64_t N = b.size(0), K = a.size(1);
  TORCH_CHECK(K % 32 == 0 && b_s.numel() == N * (K / 32), "v4k_cpu::fp4_gemm: b_s must be [N, K/32]");
  auto af = dequant_act_fp8(a.contiguous(), a_s).contiguous();
  auto bc = b.contiguous().view(at::kByte);
  v4k_cpu::WeightView w{bc.data_ptr(), nullptr, v4k_cpu::W_FP4, N, K};
  auto bs = attach_scales(b_s, w);
  return weight_gemm(af, w, 0).to(out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(v4k_impl, CPU, m) {
  m.impl("fp8_gemm", &fp8_gemm);
  m.impl("fp4_gemm", &fp4_gemm);
}
