"""Cambricon adapter of ``indexer_topk`` (SPEC §7) over
``torch_mlu_ops.masked_indexer_select_paged_kv`` (scoring and top-k fused; decode form).

Layout bridge:

* every query token is its own sequence (decode form, ``seq_q = 1``):
  ``q [B, S, HI, dI] -> [B·S, 1, HI, dI]``, ``weights [B, S, HI] -> [B·S, 1, HI, 1]``;
* the keys stay where they are: ``keys [B, N, dI]`` is a paged cache with one block per sequence
  (block size N), so both block tables have a single column, ``b`` for the key table and 0 for
  the output table (with ``kv_cache_block_size = N`` the op then emits ``c + offset``, our row
  ids; ``kv_cache_block_table_offset`` carries ``offset``);
* causality (SPEC §7.2: entry c visible iff ``c < (t+1) // ratio``) is the per-token
  ``k_context_lens = min((t+1) // ratio, N)``;
* our weights already carry the ``dI^-0.5 · HI^-0.5`` scale, so ``softmax_scale = 1``; scores in
  fp32 (``is_score_float``);
* the op returns a compact table + lengths; entries past each length are unspecified and become
  −1 here (our contract), and the width is ``min(topk, N)``;
* FP8 (e4m3 + 1x128 fp32 scales) and FP4 (packed e2m1 + 1x32 scales) keys are dequantised to
  ``q.dtype`` (TMO scores bf16/half/float keys).

Selection order may differ from the reference's (ties, and bf16 rounding of dequantised keys);
the parity suite compares index sets.
"""
from __future__ import annotations

import torch

from ..._registry import register_kernel
from ...backends.cambricon import BACKEND, LIMITS

_LIM = LIMITS["indexer_topk"]
_DTYPES = tuple(getattr(torch, d) for d in _LIM["dtypes"])


def _refusals(q, weights, keys, key_scales, positions, topk, ratio, offset) -> list[str]:
    if q.dtype not in _DTYPES:
        return [f"cambricon indexer_topk: q dtype {q.dtype} not in {_LIM['dtypes']}"]
    return []


@register_kernel("cambricon", "indexer_topk", refusals=_refusals)
def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, key_scales: torch.Tensor | None,
                 positions: torch.Tensor, topk: int, ratio: int, offset: int) -> torch.Tensor:
    tmo = BACKEND.tmo()
    b, s, h, d = q.shape
    n = keys.shape[1]
    k = min(topk, n)
    out = torch.full((b, s, k), -1, dtype=torch.int32, device=q.device)
    if b * s == 0 or k == 0:
        return out
    if keys.dtype != q.dtype:
        from .reference import dequantize_keys

        keys = dequantize_keys(keys, key_scales).to(q.dtype)
    pos = positions.reshape(b, s) if positions.dim() == 2 else positions.view(1, s).expand(b, s)
    t = b * s
    dev = q.device
    lens = torch.clamp((pos.reshape(t).long() + 1) // ratio, max=n).to(torch.int32)
    k_table = (torch.arange(t, device=dev, dtype=torch.int32) // s).view(t, 1)
    kv_table = torch.zeros((t, 1), dtype=torch.int32, device=dev)
    sparse = torch.empty((t, 1, k), dtype=torch.int32, device=dev)
    sparse_lens = torch.empty((t,), dtype=torch.int32, device=dev)
    tmo.masked_indexer_select_paged_kv(
        query=q.reshape(t, 1, h, d), k_cache=keys.contiguous(), weights=weights.reshape(t, 1, h, 1),
        kv_cache_block_table=kv_table, cu_seq_q_lens=None, cu_seq_k_lens=None, k_context_lens=lens,
        k_cache_block_table=k_table, is_prefill=False, index_topk=k, kv_cache_block_size=n, softmax_scale=1.0,
        q_scale=None, k_scale_cache=None, sparse_block_table=sparse, sparse_context_lens=sparse_lens,
        is_score_float=True, compress_ratio=ratio,
        kv_cache_block_table_offset=torch.full((t,), offset, dtype=torch.int32, device=dev),
    )
    slot = torch.arange(k, device=dev).unsqueeze(0)
    out = torch.where(slot < sparse_lens.unsqueeze(1), sparse.view(t, k), -1)
    return out.view(b, s, k).to(torch.int32)
