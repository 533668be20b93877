"""Ascend adapter for the lightning-indexer top-k (scores and top-k fused; no score matrix, so
``indexer_scores`` has no Ascend kernel).

``indexer_topk`` → ``torch_npu.npu_lightning_indexer(query [B,S,H,128], key [B,N,1,128],
weights [B,S,H], actual_seq_lengths_key, sparse_count, sparse_mode=0) -> indices [B,S,1,K]``
(A2/A3/950; bf16/fp16, H <= 64, D = 128, sparse_count <= 2048). Bridging:
- causality: the op has no compression ratio; with ``sparse_mode=0`` it scores the first
  ``actual_seq_lengths_key[b]`` keys, so the V4 limit ``min((t+1)//ratio, N)`` is passed per
  batch — exact whenever every query of a batch row sees the same count (decode, S = 1, or a
  chunk inside one compression window); other calls are refused;
- weights (fp32, scale folded) are cast to q's dtype (the op takes one dtype for q, k, w);
- FP8/FP4 keys are dequantised to q's dtype first (exact values, then one rounding);
- output: valid entries first, −1 tail, width ``sparse_count``: sliced to ``min(topk, N)`` and
  ``offset`` added to the valid entries.

``_C_ascend.npu_vllm_quant_lightning_indexer`` (the V4 deployment op, with ``cmp_ratio``) is
declared but refused: it takes a pre-quantised query (INT8 with fp16 scales on A2/A3, FP8 on
950), while this op's query is unquantised — quantising it here would change the selection.
"""
from __future__ import annotations

import torch

from ..._registry import register_kernel
from ...backends.ascend import BACKEND, VendorOp
from .reference import causal_limits, dequantize_keys

LI = VendorOp("torch_npu.npu_lightning_indexer", note="bf16/fp16, H<=64, D=128, no compression ratio")
QLI = VendorOp("_C_ascend.npu_vllm_quant_lightning_indexer", note="INT8 (A2/A3) / FP8 (950) q and k, cmp_ratio")
BACKEND.declare("indexer_topk", LI, QLI, heads_max=64, head_dim=128, sparse_count_max=2048, dtypes=("bfloat16", "float16"))

_QLI_REASON = ("npu_vllm_quant_lightning_indexer needs a pre-quantised query (INT8+fp16 scales on A2/A3, FP8 on 950); "
               "this op's query is unquantised")


def _limits(q, keys, positions, ratio):
    pos = positions if positions.dim() == 2 else positions.unsqueeze(0).expand(q.shape[0], -1)
    return causal_limits(pos, ratio, keys.shape[1])  # [B,S]


def _refusals(q, weights, keys, key_scales, positions, topk, ratio, offset):
    r = []
    b, s, h, d = q.shape
    if q.dtype not in (torch.bfloat16, torch.float16):
        r.append(f"npu_lightning_indexer takes bf16/fp16 q, got {q.dtype}")
    if h > 64:
        r.append(f"npu_lightning_indexer supports at most 64 heads, got {h}")
    if d != 128:
        r.append(f"npu_lightning_indexer needs head dim 128, got {d}")
    if topk > 2048:
        r.append(f"npu_lightning_indexer sparse_count is at most 2048, got topk={topk}")
    if not r and s > 1:
        lim = _limits(q, keys, positions, ratio)
        if bool((lim != lim[:, :1]).any()):
            r.append("npu_lightning_indexer has no compression ratio: queries of one sequence must see the same "
                     f"number of keys (ratio={ratio}, S={s})")
    if r:
        r.append(_QLI_REASON)
    return r


@register_kernel("ascend", "indexer_topk", refusals=_refusals)
def indexer_topk(q, weights, keys, key_scales, positions, topk, ratio, offset):
    b, s = q.shape[:2]
    n = keys.shape[1]
    k = min(topk, n)
    lens = _limits(q, keys, positions, ratio)[:, 0].to(torch.int32)
    key = dequantize_keys(keys, key_scales).to(q.dtype).unsqueeze(2)  # [B,N,1,128]
    idx, _ = BACKEND.vendor(LI)(q, key, weights.to(q.dtype), actual_seq_lengths_key=lens,
                                layout_query="BSND", layout_key="BSND", sparse_count=topk, sparse_mode=0)
    idx = idx[:, :, 0, :k]
    return torch.where(idx >= 0, idx + offset, -1).to(torch.int32)
