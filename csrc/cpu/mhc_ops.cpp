// CPU bindings of the mHC split/Sinkhorn, pre, post and head: validate the facts the raw-pointer kernels in
// mhc.cpp rely on, make inputs contiguous, allocate outputs. The schemas are the
// v4k_impl::<op> implementation schemas declared once in Python (v4kernels/ops/*/__init__.py);
// this file only implements them on the CPU key.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "aten_utils.h"

namespace {

using at::Tensor;
using namespace v4k_cpu::aten;

std::tuple<Tensor, Tensor, Tensor> hc_split_sinkhorn(const Tensor& mixes, const Tensor& hc_scale, const Tensor& hc_base,
                                                     int64_t hc_mult, int64_t sinkhorn_iters, double eps) {
  const int64_t nm = (2 + hc_mult) * hc_mult;
  TORCH_CHECK(mixes.dim() >= 1 && mixes.size(-1) == nm, "v4k_cpu::hc_split_sinkhorn: mixes must be [..., ", nm, "], got ",
              mixes.sizes());
  TORCH_CHECK(hc_scale.numel() == 3 && hc_base.numel() == nm, "v4k_cpu::hc_split_sinkhorn: hc_scale [3], hc_base [", nm, "]");
  auto m = mixes.to(at::kFloat).contiguous();
  auto sc = hc_scale.to(at::kFloat).contiguous();
  auto bs = hc_base.to(at::kFloat).contiguous();
  auto lead = mixes.sizes().slice(0, mixes.dim() - 1).vec();
  const int64_t T = m.numel() / nm;
  auto v = lead;
  v.push_back(hc_mult);
  auto pre = at::empty(v, m.options()), post = at::empty(v, m.options());
  v.push_back(hc_mult);
  auto comb = at::empty(v, m.options());
  if (T > 0)
    v4k_cpu::hc_split_sinkhorn(m.data_ptr<float>(), sc.data_ptr<float>(), bs.data_ptr<float>(), T, hc_mult,
                               sinkhorn_iters, static_cast<float>(eps), pre.data_ptr<float>(), post.data_ptr<float>(),
                               comb.data_ptr<float>());
  return {pre, post, comb};
}

std::tuple<Tensor, Tensor, Tensor> hc_pre(const Tensor& x, const Tensor& hc_fn, const Tensor& hc_scale,
                                          const Tensor& hc_base, int64_t sinkhorn_iters, double norm_eps,
                                          double hc_eps) {
  TORCH_CHECK(x.dim() >= 2, "v4k_cpu::hc_pre: x must be [..., hc, D], got ", x.sizes());
  const int64_t hc = x.size(-2), D = x.size(-1), nm = (2 + hc) * hc;
  TORCH_CHECK(hc_fn.dim() == 2 && hc_fn.size(0) == nm && hc_fn.size(1) == hc * D, "v4k_cpu::hc_pre: hc_fn must be [", nm,
              ", ", hc * D, "], got ", hc_fn.sizes());
  TORCH_CHECK(hc_scale.numel() == 3 && hc_base.numel() == nm, "v4k_cpu::hc_pre: hc_scale [3], hc_base [", nm, "]");
  const int xd = float_code(x, "hc_pre", "x");
  auto xc = x.contiguous();
  auto fn = hc_fn.to(at::kFloat).contiguous();
  auto sc = hc_scale.to(at::kFloat).contiguous();
  auto bs = hc_base.to(at::kFloat).contiguous();
  auto lead = x.sizes().slice(0, x.dim() - 2).vec();
  const int64_t T = D > 0 && hc > 0 ? xc.numel() / (hc * D) : 0;
  auto v = lead;
  v.push_back(D);
  auto x_in = at::empty(v, x.options());
  v.back() = hc;
  auto fopt = x.options().dtype(at::kFloat);
  auto post = at::empty(v, fopt);
  v.push_back(hc);
  auto comb = at::empty(v, fopt);
  if (T > 0)
    v4k_cpu::hc_pre(xc.data_ptr(), xd, fn.data_ptr<float>(), sc.data_ptr<float>(), bs.data_ptr<float>(), T, hc, D,
                    sinkhorn_iters, static_cast<float>(norm_eps), static_cast<float>(hc_eps), x_in.data_ptr(),
                    post.data_ptr<float>(), comb.data_ptr<float>());
  return {x_in, post, comb};
}

Tensor hc_post(const Tensor& x, const Tensor& residual, const Tensor& post, const Tensor& comb, bool bf16_mix) {
  TORCH_CHECK(residual.dim() >= 2 && residual.dim() == x.dim() + 1, "v4k_cpu::hc_post: residual must be [..., hc, D]");
  const int64_t hc = residual.size(-2), D = residual.size(-1);
  TORCH_CHECK(hc <= v4k_cpu::kHcPostMaxStreams, "v4k_cpu::hc_post: at most ", v4k_cpu::kHcPostMaxStreams, " streams, got ", hc);
  TORCH_CHECK(x.size(-1) == D && residual.scalar_type() == x.scalar_type(),
              "v4k_cpu::hc_post: x [..., D] and residual [..., hc, D] must share D and dtype");
  const int xd = float_code(x, "hc_post", "x");
  auto xc = x.contiguous(), rc = residual.contiguous();
  auto pc = post.to(at::kFloat).contiguous(), cc = comb.to(at::kFloat).contiguous();
  const int64_t T = hc * D > 0 ? rc.numel() / (hc * D) : 0;
  TORCH_CHECK(pc.numel() == T * hc && cc.numel() == T * hc * hc, "v4k_cpu::hc_post: post [..., hc], comb [..., hc, hc]");
  auto out = at::empty_like(rc);
  if (T > 0)
    v4k_cpu::hc_post(xc.data_ptr(), xd, rc.data_ptr(), pc.data_ptr<float>(), cc.data_ptr<float>(), T, hc, D, bf16_mix,
                     out.data_ptr());
  return out;
}


Tensor hc_head(const Tensor& x, const Tensor& hc_fn, const Tensor& hc_scale, const Tensor& hc_base, double norm_eps,
               double hc_eps) {
  TORCH_CHECK(x.dim() >= 2, "v4k_cpu::hc_head: x must be [..., hc, D], got ", x.sizes());
  const int64_t hc = x.size(-2), D = x.size(-1);
  TORCH_CHECK(hc_fn.dim() == 2 && hc_fn.size(0) == hc && hc_fn.size(1) == hc * D, "v4k_cpu::hc_head: hc_fn must be [",
              hc, ", ", hc * D, "], got ", hc_fn.sizes());
  TORCH_CHECK(hc_scale.numel() >= 1 && hc_base.numel() == hc, "v4k_cpu::hc_head: hc_scale [1], hc_base [", hc, "]");
  const int xd = float_code(x, "hc_head", "x");
  auto xc = x.contiguous();
  auto fn = hc_fn.to(at::kFloat).contiguous();
  auto sc = hc_scale.to(at::kFloat).contiguous();
  auto bs = hc_base.to(at::kFloat).contiguous();
  auto v = x.sizes().slice(0, x.dim() - 2).vec();
  v.push_back(D);
  auto out = at::empty(v, x.options());
  const int64_t T = D > 0 && hc > 0 ? xc.numel() / (hc * D) : 0;
  if (T > 0)
    v4k_cpu::hc_head(xc.data_ptr(), xd, fn.data_ptr<float>(), sc.data_ptr<float>(), bs.data_ptr<float>(), T, hc, D,
                     static_cast<float>(norm_eps), static_cast<float>(hc_eps), out.data_ptr());
  else
    out.zero_();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(v4k_impl, CPU, m) {
  m.impl("hc_split_sinkhorn", &hc_split_sinkhorn);
  m.impl("hc_pre", &hc_pre);
  m.impl("hc_post", &hc_post);
  m.impl("hc_head", &hc_head);
}
