"""``cuda`` sparse attention: FlashMLA's V4 ("MODEL1") sparse kernels (SPEC §9.2).

* packed FP8 KV (``[B, N, 584]``) with few queries per sequence: ``flash_mla_with_kvcache`` (sparse
  decode). Our rows are repacked into FlashMLA page blocks (:mod:`.cuda_bridges`): the whole cache,
  or only the rows the index lists reference when that is fewer.
* otherwise: ``flash_mla_sparse_fwd`` (sparse prefill) on the batch-flattened bf16 KV; packed rows
  are unpacked first (exact: e4m3 · power-of-two scale and the bf16 rope are bf16 values).

Both take bf16 queries, 512-dim heads, 64 or 128 heads per launch (other head counts are
zero-padded / split, padded outputs dropped) and index lists padded with −1 to a multiple of 64
(128 for the SM100 prefill kernel at 128 heads); our −1 sentinels become ``topk_length`` after
moving the valid entries first. FlashMLA applies the sink as ``o · e^lse / (e^lse + e^sink)``,
which is our ``Σ e^s v / (Σ e^s + e^sink)``, and returns 0 for rows with no valid entry.
"""
from __future__ import annotations

import torch

from ...backends.cuda import Route, register_routes, sm_of, vendor
from . import cuda_bridges as B
from .reference import KV_DIM

#: FlashMLA page block used for the repacked cache
BLOCK_SIZE = 64
#: packed-KV calls with at most this many queries per sequence use the decode kernel
DECODE_MAX_Q = 64
_ARCHS = ((9, 0), (10, -1))
_ARCH_TEXT = "SM90a/SM100f"


def _common_refusals(q, kv, attn_sink, topk_idxs, softmax_scale) -> list[str]:
    out = []
    if q.dtype != torch.bfloat16:
        out.append(f"FlashMLA takes bf16 queries, got {str(q.dtype).replace('torch.', '')}")
    if q.shape[-1] != KV_DIM:
        out.append(f"FlashMLA MODEL1 kernels need head_dim {KV_DIM}, got {q.shape[-1]}")
    return out


def _decode_refusals(q, kv, attn_sink, topk_idxs, softmax_scale) -> list[str]:
    out = _common_refusals(q, kv, attn_sink, topk_idxs, softmax_scale)
    if kv.dtype != torch.uint8:
        out.append("sparse decode reads the FP8 cache: kv must be packed uint8 [B, N, 584]")
    if q.shape[1] > DECODE_MAX_Q:
        out.append(f"more than {DECODE_MAX_Q} queries per sequence go to the prefill kernel, got {q.shape[1]}")
    return out


def _decode(q, kv, attn_sink, topk_idxs, softmax_scale):
    fm = vendor("FlashMLA").module
    b, m, h, _ = q.shape
    n, k = kv.shape[1], topk_idxs.shape[2]
    rows = kv.reshape(b * n, kv.shape[2])
    gidx = B.global_indices(topk_idxs, n)
    if b * m * k < b * n:  # cheaper to repack only the referenced rows
        rows, cidx = B.gather_rows(rows, gidx.reshape(b * m, k))
        gidx = cidx.view(b, m, k)
    cache = B.to_flashmla_cache(rows, BLOCK_SIZE)
    ind, lens = B.compact_indices(gidx, 64)
    topk_length = lens.amax(dim=1).contiguous()  # FlashMLA decode: one length per sequence
    out = torch.empty_like(q)
    for s0, c, p in B.head_groups(h):
        qp, sp = B.pad_heads(q, attn_sink, s0, c, p)
        meta, _ = fm.get_mla_metadata()
        o, _lse = fm.flash_mla_with_kvcache(
            qp, cache, None, None, KV_DIM, meta, softmax_scale=softmax_scale, causal=False, is_fp8_kvcache=True,
            indices=ind, attn_sink=sp, topk_length=topk_length)
        out[:, :, s0 : s0 + c] = o[:, :, :c]
    return out


def _prefill(q, kv, attn_sink, topk_idxs, softmax_scale):
    from . import unpack_kv_fp8

    fm = vendor("FlashMLA").module
    b, m, h, d = q.shape
    n, k = kv.shape[1], topk_idxs.shape[2]
    kvb = unpack_kv_fp8(kv, torch.bfloat16) if kv.dtype == torch.uint8 else kv
    kv_flat = kvb.reshape(b * n, 1, d).contiguous()
    gidx = B.global_indices(topk_idxs, n).reshape(b * m, 1, k)
    cc = sm_of(q)
    out = torch.empty_like(q)
    qf = q.reshape(b * m, h, d)
    for s0, c, p in B.head_groups(h):
        mult = 128 if (cc is not None and cc[0] == 10 and p == 128) else 64
        ind, lens = B.compact_indices(gidx, mult)
        qp, sp = B.pad_heads(qf, attn_sink, s0, c, p)
        o = fm.flash_mla_sparse_fwd(qp, kv_flat, ind, softmax_scale, KV_DIM, sp, lens.reshape(b * m))[0]
        out[:, :, s0 : s0 + c] = o[:, :c].view(b, m, c, d)
    return out


def _prefill_refusals(q, kv, attn_sink, topk_idxs, softmax_scale) -> list[str]:
    out = _common_refusals(q, kv, attn_sink, topk_idxs, softmax_scale)
    if kv.dtype not in (torch.bfloat16, torch.uint8):
        out.append(f"sparse prefill reads bf16 KV (or packed rows, unpacked exactly), got {kv.dtype}")
    return out


_LIMITS_DECODE = ("bf16 q, head_dim 512, packed FP8 KV, <= 64 queries/sequence; heads padded to 64/128 "
                  "(split above 128); top-k padded to a multiple of 64; -1 -> topk_length")
_LIMITS_PREFILL = ("bf16 q, head_dim 512, bf16 or packed KV (unpacked exactly), batch flattened; heads padded "
                   "to 64/128; top-k padded to 64 (128 on SM100 at 128 heads); -1 -> topk_length")

register_routes("sparse_attn", [
    Route("FlashMLA sparse decode", "FlashMLA", _LIMITS_DECODE, _decode, _decode_refusals, _ARCHS, _ARCH_TEXT),
    Route("FlashMLA sparse prefill", "FlashMLA", _LIMITS_PREFILL, _prefill, _prefill_refusals, _ARCHS, _ARCH_TEXT),
])
