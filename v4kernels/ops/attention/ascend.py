"""Ascend adapter for V4 sparse attention with an attention sink.

Our contract: ``q [B,M,H,512]``, ``kv [B,N,512]`` (q's dtype), ``attn_sink [H]`` fp32,
``topk_idxs [B,M,K]`` row ids into ``kv[b]`` with −1 anywhere; a row with no valid id gives 0;
the sink only enters the softmax denominator.

Route 1 — ``_C_ascend.npu_sparse_attn_sharedkv`` (+ ``_metadata``; A2/A3): the V4 deployment op.
It takes structure, not an index list: a sliding window read from ``ori_kv`` and a list of
*logical compressed positions* into ``cmp_kv`` (paged ``PA_ND [blocks, bs, 1, 512]`` with a
block table), causally masked by ``cmp_ratio`` against the query position ``seqused_kv − S + s``.
The adapter uses the compressed half only (``ori_kv=None``, ``has_ori_kv=False``):
- kv[b] becomes a paged cache (block size ``PAGE``, identity block table);
- each index row is compacted valid-first and padded with −1 to K = 512 (the op's only K);
- ``cmp_ratio=4`` with ``seqused_kv = 4·N + M`` so the causal mask admits every row
  (query s sits at position ``4N + s``: ``(pos+1)//4 >= N``) — the mask is the caller's list;
- ``sinks`` takes attn_sink as is (fp32 [H], concatenated into the softmax);
- rows with no valid index are set to 0 here (the op's result for them is not specified).
Limits: H = 64, K <= 512, D = 512, bf16/fp16 q and kv (no FP8 rows).

Route 2 — ``torch_npu.npu_sparse_flash_attention`` (A2/A3/950), the V3.2-era op that takes an
arbitrary index list. It needs ``sinks=`` (``aclnnSparseFlashAttentionV2``, newest torch_npu
only: older builds are refused, since without the sink the LSE the correction needs is not
returned at inference). D is 512 nope + a separate 64-dim rope: all 512 dims go as nope with a
zero rope (exact). Indices are compacted valid-first, ``sparse_mode=0`` (no positional mask),
``actual_seq_lengths_kv = N``; empty rows are zeroed as above. Limits: H <= 128, D = 512,
bf16/fp16 q and kv.

The native binding (csrc/ascend, ``v4k_impl::sparse_attn`` on PrivateUse1) calls
``aclnnSparseFlashAttentionV2`` directly for torch_npu builds whose Python API lacks ``sinks``.

Not used: 950's ``npu_kv_quant_sparse_attn_sharedkv`` reads 640-byte rope-first FP8 rows, not
V4's 584-byte ``pack_kv_fp8`` rows, so uint8 KV always goes to Triton or the reference.
"""
from __future__ import annotations

import torch

from ..._registry import register_kernel
from ...backends.ascend import BACKEND, VendorOp

SHAREDKV = VendorOp("_C_ascend.npu_sparse_attn_sharedkv", socs=("A2", "A3"), note="H=64, K=512, paged, sinks")
SHAREDKV_META = VendorOp("_C_ascend.npu_sparse_attn_sharedkv_metadata", socs=("A2", "A3"))
SFA = VendorOp("torch_npu.npu_sparse_flash_attention", needs_args=("sinks",), note="H<=128, D=512+64 rope, sinks")
NATIVE = VendorOp("v4k_impl.sparse_attn", note="csrc/ascend: aclnnSparseFlashAttentionV2 with sinks")
BACKEND.declare("sparse_attn", SHAREDKV, SFA, NATIVE, sharedkv_heads=64, sharedkv_topk=512, sfa_heads_max=128,
                head_dim=512, dtypes=("bfloat16", "float16"))

PAGE = 128
SHAREDKV_K = 512


def _common(q, kv):
    r = []
    if kv.dtype == torch.uint8:
        r.append("no Ascend attention op reads V4's 584-byte FP8 KV rows (950's op takes 640-byte rope-first rows)")
    if q.dtype not in (torch.bfloat16, torch.float16):
        r.append(f"Ascend sparse attention takes bf16/fp16 q, got {q.dtype}")
    if q.shape[-1] != 512:
        r.append(f"Ascend sparse attention needs head dim 512, got {q.shape[-1]}")
    return r


def _sharedkv_reasons(q, topk_idxs):
    r = []
    if q.shape[2] != 64:
        r.append(f"npu_sparse_attn_sharedkv supports 64 heads only, got {q.shape[2]}")
    if topk_idxs.shape[-1] > SHAREDKV_K:
        r.append(f"npu_sparse_attn_sharedkv takes K=512 indices, got K={topk_idxs.shape[-1]}")
    return r


def _sfa_reasons(q):
    return [f"npu_sparse_flash_attention supports at most 128 heads, got {q.shape[2]}"] if q.shape[2] > 128 else []


def _pick(q, kv, topk_idxs):
    """The first route usable for this call, or (None, reasons)."""
    reasons = _common(q, kv)
    if reasons:
        return None, reasons
    usable = BACKEND.usable_routes("sparse_attn")
    for route, why in ((SHAREDKV, _sharedkv_reasons(q, topk_idxs)), (SFA, _sfa_reasons(q)), (NATIVE, _sfa_reasons(q))):
        if route not in usable:
            reasons += [f"{route.name}: {w}" for w in BACKEND.route_reasons(route)]
        elif why:
            reasons += why
        else:
            return route, []
    return None, reasons


def _refusals(q, kv, attn_sink, topk_idxs, softmax_scale):
    return _pick(q, kv, topk_idxs)[1]


def _valid_first(idx: torch.Tensor, width: int) -> torch.Tensor:
    """Stable compaction of each row's valid ids to the front, −1 after, padded to ``width``."""
    order = torch.sort((idx < 0).to(torch.int8), dim=-1, stable=True).indices
    out = torch.gather(idx, -1, order)
    if width > out.shape[-1]:
        out = torch.cat((out, out.new_full((*out.shape[:-1], width - out.shape[-1]), -1)), -1)
    return out.to(torch.int32).contiguous()


@register_kernel("ascend", "sparse_attn", refusals=_refusals)
def sparse_attn(q, kv, attn_sink, topk_idxs, softmax_scale):
    route, reasons = _pick(q, kv, topk_idxs)
    if route is None:
        raise RuntimeError("ascend sparse_attn: " + "; ".join(reasons))
    b, m, h, d = q.shape
    n = kv.shape[1]
    has_any = (topk_idxs >= 0).any(-1)  # [B,M]
    if route is SHAREDKV:
        nb = (n + PAGE - 1) // PAGE
        paged = kv.new_zeros(b, nb * PAGE, d)
        paged[:, :n] = kv
        cache = paged.view(b * nb, PAGE, 1, d)
        table = torch.arange(b * nb, dtype=torch.int32, device=q.device).view(b, nb)
        idx = _valid_first(topk_idxs, SHAREDKV_K).unsqueeze(2)  # [B,M,1,512]
        seqused = torch.full((b,), 4 * n + m, dtype=torch.int32, device=q.device)
        meta = BACKEND.vendor(SHAREDKV_META)(
            h, 1, d, seqused_kv=seqused, batch_size=b, max_seqlen_q=m, max_seqlen_kv=4 * n + m, ori_topk=0,
            cmp_topk=SHAREDKV_K, cmp_ratio=4, ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=127, ori_win_right=0,
            layout_q="BSND", layout_kv="PA_ND", has_ori_kv=False, has_cmp_kv=True, device=str(q.device.type))
        out, _ = BACKEND.vendor(SHAREDKV)(
            q, cmp_kv=cache, cmp_sparse_indices=idx, cmp_block_table=table, seqused_kv=seqused,
            sinks=attn_sink.float(), metadata=meta, softmax_scale=float(softmax_scale), cmp_ratio=4,
            ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=127, ori_win_right=0, layout_q="BSND",
            layout_kv="PA_ND", return_softmax_lse=False)
    elif route is SFA:
        k4 = kv.unsqueeze(2)  # [B,N,1,512]
        idx = _valid_first(topk_idxs, topk_idxs.shape[-1]).unsqueeze(2)
        out, _, _ = BACKEND.vendor(SFA)(
            q, k4, k4, idx, float(softmax_scale), query_rope=q.new_zeros(b, m, h, 64),
            key_rope=kv.new_zeros(b, n, 1, 64),
            actual_seq_lengths_query=torch.full((b,), m, dtype=torch.int32, device=q.device),
            actual_seq_lengths_kv=torch.full((b,), n, dtype=torch.int32, device=q.device), sparse_block_size=1,
            layout_query="BSND", layout_kv="BSND", sparse_mode=0, attention_mode=0, return_softmax_lse=False,
            sinks=attn_sink.float())
    else:
        out = BACKEND.vendor(NATIVE)(q, kv, attn_sink, topk_idxs, softmax_scale)
    return torch.where(has_any[:, :, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
