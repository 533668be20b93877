// CPU bindings of the lightning indexer scores and streaming top-k: validate the facts the raw-pointer kernels in
// indexer.cpp rely on, make inputs contiguous, allocate outputs. The schemas are the
// v4k_impl::<op> implementation schemas declared once in Python (v4kernels/ops/*/__init__.py);
// this file only implements them on the CPU key.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "aten_utils.h"

namespace {

using at::Tensor;
using namespace v4k_cpu::aten;

struct IndexerArgs {
  Tensor q, w, keys, scales, pos;
  int qd, wd, kind;
  int64_t B, S, HI, dI, N;
};

IndexerArgs indexer_args(const char* op, const Tensor& q, const Tensor& weights, const Tensor& keys,
                         const c10::optional<Tensor>& key_scales, const Tensor& positions, int64_t ratio) {
  IndexerArgs a;
  for (auto* p : {&q, &weights, &keys, &positions}) check_cpu(*p, op, "inputs");
  TORCH_CHECK(q.dim() == 4, "v4k_cpu::", op, ": q must be [B,S,HI,dI], got ", q.sizes());
  a.B = q.size(0), a.S = q.size(1), a.HI = q.size(2), a.dI = q.size(3);
  a.qd = float_code(q, op, "q");
  a.wd = float_code(weights, op, "weights");
  TORCH_CHECK(weights.dim() == 3 && weights.size(0) == a.B && weights.size(1) == a.S && weights.size(2) == a.HI,
              "v4k_cpu::", op, ": weights must be [B,S,HI], got ", weights.sizes());
  TORCH_CHECK(keys.dim() == 3 && keys.size(0) == a.B, "v4k_cpu::", op, ": keys must be [B,N,*], got ", keys.sizes());
  a.N = keys.size(1);
  TORCH_CHECK(ratio >= 1, "v4k_cpu::", op, ": ratio must be >= 1, got ", ratio);
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == a.B && positions.size(1) == a.S,
              "v4k_cpu::", op, ": positions must be [B,S], got ", positions.sizes());
  if (keys.scalar_type() == at::kFloat8_e4m3fn) {
    TORCH_CHECK(keys.size(2) == a.dI && a.dI % 128 == 0 && key_scales.has_value() &&
                    key_scales->numel() == a.B * a.N * (a.dI / 128),
                "v4k_cpu::", op, ": e4m3 keys need keys [B,N,dI] (dI % 128 == 0) and key_scales [B,N,dI/128]");
    a.kind = v4k_cpu::KEY_FP8;
    a.scales = scales_f32(*key_scales);
  } else if (keys.scalar_type() == at::kByte) {
    TORCH_CHECK(keys.size(2) * 2 == a.dI && a.dI % 32 == 0 && key_scales.has_value() &&
                    key_scales->numel() == a.B * a.N * (a.dI / 32),
                "v4k_cpu::", op, ": FP4 keys need packed keys [B,N,dI/2] and key_scales [B,N,dI/32]");
    a.kind = v4k_cpu::KEY_FP4;
    a.scales = scales_f32(*key_scales);
  } else {
    TORCH_CHECK(keys.size(2) == a.dI, "v4k_cpu::", op, ": keys must be [B,N,", a.dI, "], got ", keys.sizes());
    a.kind = float_code(keys, op, "keys");
  }
  a.q = q.contiguous();
  a.w = weights.contiguous();
  a.keys = keys.contiguous();
  a.pos = positions.to(at::kLong).contiguous();
  return a;
}

Tensor indexer_scores(const Tensor& q, const Tensor& weights, const Tensor& keys, const c10::optional<Tensor>& key_scales,
                      const Tensor& positions, int64_t ratio) {
  auto a = indexer_args("indexer_scores", q, weights, keys, key_scales, positions, ratio);
  auto out = at::empty({a.B, a.S, a.N}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  v4k_cpu::indexer(a.q.data_ptr(), a.qd, a.w.data_ptr(), a.wd, a.keys.data_ptr(), a.kind,
                   a.scales.defined() ? a.scales.data_ptr<float>() : nullptr, a.pos.data_ptr<int64_t>(), a.B, a.S,
                   a.HI, a.dI, a.N, ratio, out.data_ptr<float>(), nullptr, 0, 0);
  return out;
}

Tensor indexer_topk(const Tensor& q, const Tensor& weights, const Tensor& keys, const c10::optional<Tensor>& key_scales,
                    const Tensor& positions, int64_t topk, int64_t ratio, int64_t offset) {
  auto a = indexer_args("indexer_topk", q, weights, keys, key_scales, positions, ratio);
  TORCH_CHECK(topk >= 0, "v4k_cpu::indexer_topk: topk must be >= 0, got ", topk);
  TORCH_CHECK(offset >= 0 && offset + a.N <= (int64_t{1} << 31), "v4k_cpu::indexer_topk: offset + N must lie in [0, 2**31], got offset ",
              offset, ", N ", a.N);
  const int64_t kout = std::min(topk, a.N);
  auto out = at::empty({a.B, a.S, kout}, q.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  v4k_cpu::indexer(a.q.data_ptr(), a.qd, a.w.data_ptr(), a.wd, a.keys.data_ptr(), a.kind,
                   a.scales.defined() ? a.scales.data_ptr<float>() : nullptr, a.pos.data_ptr<int64_t>(), a.B, a.S,
                   a.HI, a.dI, a.N, ratio, nullptr, out.data_ptr<int32_t>(), kout, offset);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(v4k_impl, CPU, m) {
  m.impl("indexer_scores", &indexer_scores);
  m.impl("indexer_topk", &indexer_topk);
}
