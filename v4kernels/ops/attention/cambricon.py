"""Cambricon adapter of ``sparse_attn`` (SPEC §9.2) over
``torch_mlu_ops.single_query_cached_kv_attn(..., learnable_sink=)``.

Layout bridge (the V4 deployment on MLU does the same, with token-granular paging):

* every query token is its own sequence: ``q [B, M, H, 512] -> [B·M, 1, H, 512]``;
* the KV rows are a paged cache with block size 1 and one KV head:
  ``kv [B, N, 512] -> k_cache [B·N, 1, 1, 512]``, ``v_cache=None`` (V = K);
* our index rows ``topk_idxs [B, M, K]`` (row ids into ``kv[b]``, −1 anywhere) become a compact
  block table: the valid entries of each row, in order, as slots ``b·N + idx``, then
  ``context_lens [B·M]`` = how many there are (TMO has no −1: padding past the length is never read);
* the sink goes to ``learnable_sink`` (fp32 [H]); the op adds ``exp(sink)`` to each head's
  denominator, which is exactly SPEC §9.2;
* a row whose entries are all −1 has ``context_lens = 0``, for which the op's output is not
  specified: those rows are zeroed afterwards (our contract);
* packed FP8 rows (uint8 ``[B, N, 584]``): TMO's caches are bf16 or per-token/MX quantised, never
  V4's 584-byte rows, so the rows are dequantised to ``q.dtype`` first: the whole buffer when
  ``B·N <= B·M·K`` (prefill), else only the referenced rows, gathered into a compact cache whose
  table is then ``arange`` (decode);
* more than 256 heads (the op's limit of query heads per KV head for bf16 caches, 128 for others)
  are run in head groups.
"""
from __future__ import annotations

import torch

from ..._registry import register_kernel
from ...backends.cambricon import BACKEND, LIMITS

_LIM = LIMITS["sparse_attn"]
_DTYPES = tuple(getattr(torch, d) for d in _LIM["dtypes"])


def _refusals(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
              softmax_scale: float) -> list[str]:
    reasons = []
    if q.dtype not in _DTYPES:
        reasons.append(f"cambricon sparse_attn: q dtype {q.dtype} not in {_LIM['dtypes']}")
    if q.shape[-1] != _LIM["head_dim"]:
        reasons.append(f"cambricon sparse_attn: head dim must be {_LIM['head_dim']}, got {q.shape[-1]}")
    return reasons


def compact_block_table(topk_idxs: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, M, K]`` row ids with −1 -> (block_tables ``[B·M, K]`` int32 with the valid slots
    ``b·N + idx`` first, in their original order, context_lens ``[B·M]`` int32)."""
    b, m, k = topk_idxs.shape
    idx = topk_idxs.reshape(b * m, k).long()
    valid = idx >= 0
    # stable sort on "invalid" moves the valid entries to the front, keeping their order
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    base = (torch.arange(b * m, device=idx.device) // m * n).unsqueeze(1)
    slots = torch.where(valid, idx + base, 0).gather(1, order)
    return slots.to(torch.int32), valid.sum(1).to(torch.int32)


def _paged_cache(q: torch.Tensor, kv: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor):
    """The cache the op reads, ``[slots, 1, 1, 512]`` in ``q.dtype``, and the table into it."""
    b, n, _ = kv.shape
    if kv.dtype != torch.uint8:
        return kv.reshape(b * n, 1, 1, kv.shape[-1]), tables
    from ..attention.reference import dequant_kv_rows

    rows = kv.reshape(b * n, kv.shape[-1])
    if b * n <= tables.numel():
        return dequant_kv_rows(rows).to(q.dtype).view(b * n, 1, 1, -1), tables
    # decode: dequantise only what is referenced (slot entries past each length are unused)
    k = tables.shape[1]
    used = torch.arange(k, device=tables.device).unsqueeze(0) < lens.unsqueeze(1)
    gathered = dequant_kv_rows(rows[torch.where(used, tables, 0).reshape(-1).long()]).to(q.dtype)
    compact = torch.arange(tables.numel(), device=tables.device, dtype=torch.int32).view_as(tables)
    return gathered.view(tables.numel(), 1, 1, -1), compact


@register_kernel("cambricon", "sparse_attn", refusals=_refusals)
def sparse_attn(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                softmax_scale: float) -> torch.Tensor:
    tmo = BACKEND.tmo()
    b, m, h, d = q.shape
    k = topk_idxs.shape[2]
    out = torch.zeros((b * m, 1, h, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0 or k == 0 or kv.shape[1] == 0:
        return out.view(b, m, h, d)
    tables, lens = compact_block_table(topk_idxs, kv.shape[1])
    cache, tables = _paged_cache(q, kv, tables, lens)
    qt = q.reshape(b * m, 1, h, d)
    sink = attn_sink.float()
    cap = _LIM["heads_per_call"] if cache.dtype == torch.bfloat16 else _LIM["heads_per_call"] // 2
    for h0 in range(0, h, cap):
        h1 = min(h, h0 + cap)
        # the op writes a contiguous out: a head group gets its own buffer
        o = out if h1 - h0 == h else torch.empty((b * m, 1, h1 - h0, d), dtype=q.dtype, device=q.device)
        tmo.single_query_cached_kv_attn(
            qt[:, :, h0:h1].contiguous(), cache, None, o, tables, lens,
            None, None, None, k, -1, -1, float(softmax_scale),
            compute_dtype=torch.float32, learnable_sink=sink[h0:h1].contiguous(),
        )
        if o is not out:
            out[:, :, h0:h1] = o
    # rows with no valid entry: the op leaves them unspecified, our contract says zeros
    out.masked_fill_((lens == 0).view(b * m, 1, 1, 1), 0)
    return out.view(b, m, h, d)
