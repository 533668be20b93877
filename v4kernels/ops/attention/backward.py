"""Differentiable PyTorch form of ``sparse_attn`` (SPEC §9.2) for its recomputation backward
(``v4kernels.ops._autograd``): gathers the listed KV rows, softmax over them plus the sink
logit, in fp32 (fp64 for fp64 inputs). Gradients flow to ``q``, to a float ``kv`` (scattered back
to the listed rows, duplicates accumulate) and to ``attn_sink``; packed FP8 ``kv`` is constant.
"""
from __future__ import annotations

import torch

from .._autograd import compute_dtype
from .reference import dequant_kv_rows


def sparse_attn_math(q, kv, attn_sink, topk_idxs, softmax_scale):
    packed = kv.dtype == torch.uint8
    dt = compute_dtype(q, None if packed else kv, attn_sink)
    b, m, h, d = q.shape
    n, k = kv.shape[1], topk_idxs.shape[2]
    kvf = dequant_kv_rows(kv).to(dt) if packed else kv.to(dt)  # [B, N, D]
    idx = topk_idxs.long()
    valid = (idx >= 0) & (idx < n)  # [B, M, K]
    flat = torch.where(valid, idx, 0).reshape(b, m * k, 1).expand(b, m * k, d)
    rows = torch.gather(kvf, 1, flat).reshape(b, m, k, d)
    s = torch.einsum("bmhd,bmkd->bmhk", q.to(dt), rows) * softmax_scale
    s = s.masked_fill(~valid.unsqueeze(2), float("-inf"))
    any_valid = valid.any(-1)  # [B, M]
    sink = attn_sink.to(dt).reshape(1, 1, h, 1).expand(b, m, h, 1)
    # a row without keys gives 0 (not NaN): give its sink logit 0 so the softmax is defined
    sink = torch.where(any_valid.reshape(b, m, 1, 1), sink, torch.zeros_like(sink))
    p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :k]
    o = torch.einsum("bmhk,bmkd->bmhd", p, rows)
    return o.to(q.dtype)
