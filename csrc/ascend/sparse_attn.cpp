// v4k_impl::sparse_attn on PrivateUse1 (Ascend NPU): V4 sparse attention with a sink through
// aclnnSparseFlashAttentionV2, for torch_npu builds whose Python npu_sparse_flash_attention
// lacks `sinks`. Same bridging as v4kernels/ops/attention/ascend.py (route 2): all 512 dims as
// nope with a zero 64-dim rope (exact), indices compacted valid-first, sparse_mode 0 (the index
// list is the mask), actual KV length N, rows with no valid index set to 0.
// Built by the ascend backend's build hook when torch_npu and CANN are present.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "op_plugin/utils/op_api_common.h"
#include "aclnn_v4k.h"

namespace v4k_ascend {

at::Tensor sparse_attn(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& attn_sink,
                       const at::Tensor& topk_idxs, double softmax_scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(3) == 512, "v4k_ascend::sparse_attn: q must be [B,M,H,512], got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "v4k_ascend::sparse_attn: q must be bf16/fp16, got ", q.scalar_type());
  TORCH_CHECK(kv.scalar_type() == q.scalar_type(),
              "v4k_ascend::sparse_attn: kv must have q's dtype (FP8 584-byte rows are not supported), got ",
              kv.scalar_type());
  TORCH_CHECK(q.size(2) <= 128, "v4k_ascend::sparse_attn: at most 128 heads, got ", q.size(2));
  const int64_t b = q.size(0), m = q.size(1), h = q.size(2), n = kv.size(1);

  // valid ids first (stable), −1 after: the kernel stops at the first −1
  auto invalid = topk_idxs.lt(0).to(at::kChar);
  auto order = std::get<1>(invalid.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/false));
  at::Tensor idx = topk_idxs.gather(-1, order).to(at::kInt).unsqueeze(2).contiguous();  // [B,M,1,K]
  at::Tensor query = q.contiguous();
  at::Tensor key = kv.unsqueeze(2).contiguous();  // [B,N,1,512]; value is the same tensor
  at::Tensor query_rope = at::zeros({b, m, h, 64}, q.options());
  at::Tensor key_rope = at::zeros({b, n, 1, 64}, kv.options());
  c10::optional<at::Tensor> block_table = c10::nullopt;
  c10::optional<at::Tensor> len_q = at::full({b}, m, q.options().dtype(at::kLong));
  c10::optional<at::Tensor> len_kv = at::full({b}, n, q.options().dtype(at::kLong));
  c10::optional<at::Tensor> rope_q = query_rope, rope_k = key_rope;
  c10::optional<at::Tensor> sinks = attn_sink.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(query);
  at::Tensor softmax_max = at::empty({0}, q.options().dtype(at::kFloat));
  at::Tensor softmax_sum = at::empty({0}, q.options().dtype(at::kFloat));
  double scale = softmax_scale;
  int64_t sparse_block_size = 1, sparse_mode = 0, attention_mode = 0;
  int64_t pre_tokens = INT64_MAX, next_tokens = INT64_MAX;
  bool return_lse = false;
  std::string layout = "BSND";
  char* layout_q = const_cast<char*>(layout.c_str());
  char* layout_kv = const_cast<char*>(layout.c_str());

  V4K_CHECK_ACLNN_CALL(aclnnSparseFlashAttentionV2, query, key, key, idx, block_table, len_q, len_kv, rope_q, rope_k,
                       sinks, scale, sparse_block_size, layout_q, layout_kv, sparse_mode, pre_tokens, next_tokens,
                       attention_mode, return_lse, out, softmax_max, softmax_sum);
  EXEC_NPU_CMD(aclnnSparseFlashAttentionV2, query, key, key, idx, block_table, len_q, len_kv, rope_q, rope_k, sinks,
               scale, sparse_block_size, layout_q, layout_kv, sparse_mode, pre_tokens, next_tokens, attention_mode,
               return_lse, out, softmax_max, softmax_sum);

  at::Tensor has_any = topk_idxs.ge(0).any(-1).view({b, m, 1, 1});
  return at::where(has_any, out, at::zeros({}, out.options()));
}

}  // namespace v4k_ascend

TORCH_LIBRARY_IMPL(v4k_impl, PrivateUse1, m) {
  m.impl("sparse_attn", &v4k_ascend::sparse_attn);
}
