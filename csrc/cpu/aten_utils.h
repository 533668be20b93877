// ATen-side helpers shared by the CPU operator bindings (<family>_ops.cpp): dtype codes, device
// checks and scale conversion. The kernel translation units never include this (no torch headers).
#pragma once

#include <limits>

#include <ATen/ATen.h>

#include "kernels.h"

namespace v4k_cpu {
namespace aten {

using at::Tensor;

using at::Tensor;

inline int float_code(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return 0;
    case at::kBFloat16:
      return 1;
    case at::kHalf:
      return 2;
    default:
      TORCH_CHECK(false, "v4k_cpu::", op, ": ", name, " must be float32/bfloat16/float16, got ", t.scalar_type());
  }
  return -1;
}

inline void check_cpu(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "v4k_cpu::", op, ": ", name, " must be a CPU tensor, got ", t.device());
}

// Scales may arrive as fp32 or UE8M0 (float8_e8m0fnu); the kernels read fp32. An infinite scale
// (not representable in UE8M0) is treated as NaN so that every output it scales is NaN whatever
// the data (docs/numerics.md).
inline Tensor scales_f32(const Tensor& s) {
  auto f = s.to(at::kFloat).contiguous();
  return at::where(f.isinf(), std::numeric_limits<float>::quiet_NaN(), f).contiguous();
}

// Points v's block scales at s without converting them (WeightView::scale decodes each scale
// where a kernel uses it): fp32 and UE8M0 scales are read in place (a copy only when not
// contiguous), other float dtypes are converted to fp32 once. The returned tensor owns what v
// points at.
inline Tensor attach_scales(const Tensor& s, v4k_cpu::WeightView& v) {
  if (s.scalar_type() == at::kFloat8_e8m0fnu) {
    auto c = s.contiguous();
    v.scales = nullptr;
    v.scales_e8m0 = static_cast<const uint8_t*>(c.data_ptr());
    return c;
  }
  auto c = s.to(at::kFloat).contiguous();
  v.scales = c.data_ptr<float>();
  v.scales_e8m0 = nullptr;
  return c;
}

}  // namespace aten
}  // namespace v4k_cpu
