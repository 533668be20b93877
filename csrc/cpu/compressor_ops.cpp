// CPU bindings of the KV compressor: validate the facts the raw-pointer kernels in
// compressor.cpp rely on, make inputs contiguous, allocate outputs. The schemas are the
// v4k_impl::<op> implementation schemas declared once in Python (v4kernels/ops/*/__init__.py);
// this file only implements them on the CPU key.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "aten_utils.h"

namespace {

using at::Tensor;
using namespace v4k_cpu::aten;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> compress_kv(
    const Tensor& x, const Tensor& wkv, const Tensor& wgate, const Tensor& ape, const Tensor& norm_weight,
    const Tensor& freqs, const Tensor& pending_kv, const Tensor& pending_score, const Tensor& prev_kv,
    const Tensor& prev_score, const Tensor& n_tokens, int64_t ratio, c10::string_view quant, double eps,
    bool hf_rounding) {
  const char* op = "compress_kv";
  for (auto* p : {&x, &wkv, &wgate, &ape, &norm_weight, &freqs, &pending_kv, &pending_score, &prev_kv, &prev_score,
                  &n_tokens})
    check_cpu(*p, op, "inputs");
  TORCH_CHECK(x.dim() == 3, "v4k_cpu::compress_kv: x must be [B, S, D], got ", x.sizes());
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2), hd = norm_weight.numel();
  TORCH_CHECK(ratio >= 1, "v4k_cpu::compress_kv: ratio must be >= 1, got ", ratio);
  // overlapping (CSA) windows are recognised by the doubled projection width, wkv [2·hd, D]
  const bool overlap = hd > 0 && wkv.dim() == 2 && wkv.size(0) == 2 * hd;
  const int64_t coff = overlap ? 2 : 1, W = coff * hd, nf = freqs.numel();
  TORCH_CHECK(wkv.dim() == 2 && wkv.size(0) == W && wkv.size(1) == D && wgate.sizes() == wkv.sizes(),
              "v4k_cpu::compress_kv: wkv and wgate must be [", W, ", ", D, "], got ", wkv.sizes(), " ", wgate.sizes());
  TORCH_CHECK(ape.numel() == ratio * W, "v4k_cpu::compress_kv: ape must be [", ratio, ", ", W, "]");
  TORCH_CHECK(2 * nf <= hd, "v4k_cpu::compress_kv: 2*len(freqs) must be <= head dim");
  TORCH_CHECK(pending_kv.numel() == B * ratio * W && pending_score.numel() == B * ratio * W &&
                  pending_kv.scalar_type() == at::kFloat && pending_score.scalar_type() == at::kFloat,
              "v4k_cpu::compress_kv: pending state must be float32 [B, ratio, coff*hd]");
  TORCH_CHECK(prev_kv.numel() == (coff == 2 ? B * ratio * hd : 0) && prev_score.numel() == prev_kv.numel() &&
                  prev_kv.scalar_type() == at::kFloat && prev_score.scalar_type() == at::kFloat,
              "v4k_cpu::compress_kv: prev state must be float32 [B, ratio, hd] (CSA) or empty");
  TORCH_CHECK(n_tokens.numel() == B && n_tokens.scalar_type() == at::kLong, "v4k_cpu::compress_kv: n_tokens int64 [B]");
  int qc;
  if (quant == "none") qc = 0;
  else if (quant == "fp8") qc = 1;
  else if (quant == "fp4") qc = 2;
  else TORCH_CHECK(false, "v4k_cpu::compress_kv: quant must be none/fp8/fp4, got ", std::string(quant));
  TORCH_CHECK(qc != 1 || (hd - 2 * nf) % 64 == 0, "v4k_cpu::compress_kv: fp8 needs (hd - rope dims) % 64 == 0");
  TORCH_CHECK(qc != 2 || (hd > 0 && (hd & (hd - 1)) == 0 && hd % 32 == 0),
              "v4k_cpu::compress_kv: fp4 needs a power-of-two head dim >= 32");
  const int xd = float_code(x, op, "x");
  auto xc = x.contiguous(), wk = wkv.contiguous(), wg = wgate.contiguous();
  auto apef = ape.to(at::kFloat).contiguous(), nw = norm_weight.to(at::kFloat).contiguous();
  auto fr = freqs.to(at::kFloat).contiguous();
  auto pk = pending_kv.contiguous(), ps = pending_score.contiguous(), vk = prev_kv.contiguous(),
       vs = prev_score.contiguous(), nt = n_tokens.contiguous();
  {  // state counters index the pending window: never trust them unvalidated
    const int64_t* n = nt.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(n[b] >= 0 && n[b] < (int64_t{1} << 62) - S, "v4k_cpu::compress_kv: n_tokens[", b, "] must lie in [0, 2**62 - S), got ",
                  n[b]);
  }
  auto entries = at::empty({B, (S + ratio - 1) / ratio, hd}, x.options());
  auto num_new = at::empty({B}, n_tokens.options().dtype(at::kInt));
  auto pko = at::empty_like(pk), pso = at::empty_like(ps), vko = at::empty_like(vk), vso = at::empty_like(vs);
  auto nto = at::empty_like(nt);
  v4k_cpu::CompressArgs a{};
  a.x = xc.data_ptr();
  a.x_dtype = xd;
  a.B = B, a.S = S, a.D = D, a.hd = hd, a.ratio = ratio, a.nfreq = nf;
  a.overlap = overlap;
  a.hf_rounding = hf_rounding;  // exact no-ops for fp32 x, where [HF] equals the default
  a.wkv = {wk.data_ptr(), nullptr, float_code(wk, op, "wkv"), W, D};
  a.wgate = {wg.data_ptr(), nullptr, float_code(wg, op, "wgate"), W, D};
  a.ape = apef.data_ptr<float>();
  a.norm_w = nw.data_ptr<float>();
  a.freqs = fr.data_ptr<float>();
  a.pkv_in = pk.data_ptr<float>(), a.psc_in = ps.data_ptr<float>();
  a.vkv_in = vk.data_ptr<float>(), a.vsc_in = vs.data_ptr<float>();
  a.n_tokens = nt.data_ptr<int64_t>();
  a.quant = qc;
  a.eps = static_cast<float>(eps);
  a.entries = entries.data_ptr();
  a.num_new = num_new.data_ptr<int32_t>();
  a.pkv_out = pko.data_ptr<float>(), a.psc_out = pso.data_ptr<float>();
  a.vkv_out = vko.data_ptr<float>(), a.vsc_out = vso.data_ptr<float>();
  a.n_tokens_out = nto.data_ptr<int64_t>();
  if (B > 0) v4k_cpu::compress_kv(a);
  return {entries, num_new, pko, pso, vko, vso, nto};
}

}  // namespace

TORCH_LIBRARY_IMPL(v4k_impl, CPU, m) {
  m.impl("compress_kv", &compress_kv);
}
