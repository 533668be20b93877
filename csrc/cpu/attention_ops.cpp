// CPU bindings of the sparse attention over the shared K=V rows and the grouped output projection: validate the facts the raw-pointer kernels in
// attention.cpp rely on, make inputs contiguous, allocate outputs. The schemas are the
// v4k_impl::<op> implementation schemas declared once in Python (v4kernels/ops/*/__init__.py);
// this file only implements them on the CPU key.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "aten_utils.h"

namespace {

using at::Tensor;
using namespace v4k_cpu::aten;

Tensor sparse_attn(const Tensor& q, const Tensor& kv, const Tensor& attn_sink, const Tensor& topk_idxs,
                   double softmax_scale) {
  const char* op = "sparse_attn";
  for (auto* p : {&q, &kv, &attn_sink, &topk_idxs}) check_cpu(*p, op, "inputs");
  TORCH_CHECK(q.dim() == 4, "v4k_cpu::sparse_attn: q must be [B,M,H,D], got ", q.sizes());
  const int64_t B = q.size(0), M = q.size(1), H = q.size(2), D = q.size(3);
  const int qd = float_code(q, op, "q");
  TORCH_CHECK(D >= 1, "v4k_cpu::sparse_attn: head dim must be >= 1, got ", D);
  TORCH_CHECK(kv.dim() == 3 && kv.size(0) == B, "v4k_cpu::sparse_attn: kv must be [B,N,D], got ", kv.sizes());
  int kind;
  if (kv.scalar_type() == at::kByte) {
    TORCH_CHECK(kv.size(2) == v4k_cpu::kPackedRowBytes && D == 512,
                "v4k_cpu::sparse_attn: packed FP8 kv must be uint8 [B,N,584] with D=512, got ", kv.sizes());
    kind = v4k_cpu::KV_FP8_PACKED;
  } else {
    TORCH_CHECK(kv.scalar_type() == q.scalar_type() && kv.size(2) == D,
                "v4k_cpu::sparse_attn: kv must be ", q.scalar_type(), " [B,N,", D, "], got ", kv.scalar_type(), " ", kv.sizes());
    kind = qd;
  }
  TORCH_CHECK(attn_sink.numel() == H && attn_sink.scalar_type() == at::kFloat,
              "v4k_cpu::sparse_attn: attn_sink must be float32 [H=", H, "]");
  TORCH_CHECK(topk_idxs.dim() == 3 && topk_idxs.size(0) == B && topk_idxs.size(1) == M &&
                  topk_idxs.scalar_type() == at::kInt,
              "v4k_cpu::sparse_attn: topk_idxs must be int32 [B,M,K], got ", topk_idxs.scalar_type(), " ", topk_idxs.sizes());
  auto qc = q.contiguous();
  auto kvc = kv.contiguous();
  auto sc = attn_sink.contiguous();
  auto ic = topk_idxs.contiguous();
  auto out = at::empty_like(qc);
  if (out.numel() == 0) return out;
  v4k_cpu::sparse_attn(qc.data_ptr(), qd, kvc.data_ptr(), kind, sc.data_ptr<float>(), ic.data_ptr<int32_t>(),
                       static_cast<float>(softmax_scale), out.data_ptr(), B, M, H, D, kv.size(1), ic.size(2));
  return out;
}



// ------------------------------------------------------------------------------ grouped_linear
// x [B,S,G,Din] float, weight [G,Dout,Din] float (any of fp32/bf16/fp16) -> [B,S,G,Dout] x.dtype.
Tensor grouped_linear(const Tensor& x, const Tensor& weight) {
  const char* op = "grouped_linear";
  check_cpu(x, op, "x");
  check_cpu(weight, op, "weight");
  TORCH_CHECK(x.dim() == 4, "v4k_cpu::grouped_linear: x must be [B,S,G,Din], got ", x.sizes());
  const int64_t B = x.size(0), S = x.size(1), G = x.size(2), K = x.size(3);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == G && weight.size(2) == K,
              "v4k_cpu::grouped_linear: weight must be [G=", G, ", Dout, Din=", K, "], got ", weight.sizes());
  const int xd = float_code(x, op, "x"), wd = float_code(weight, op, "weight");
  const int64_t N = weight.size(1);
  auto xc = x.contiguous();
  auto wc = weight.contiguous();
  auto out = at::empty({B, S, G, N}, x.options());
  if (out.numel() == 0) return out;
  v4k_cpu::grouped_linear(xc.data_ptr(), xd, wc.data_ptr(), wd, B * S, G, K, N, out.data_ptr());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(v4k_impl, CPU, m) {
  m.impl("sparse_attn", &sparse_attn);
  m.impl("grouped_linear", &grouped_linear);
}
