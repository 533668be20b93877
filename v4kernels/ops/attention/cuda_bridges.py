"""Layout bridges between v4kernels' tensors and the vendor kernels of the ``cuda`` backend.

Pure tensor code (any device), so every bridge is tested on the CPU against ``pack_kv_fp8`` and
the reference.

FlashMLA (V4 "MODEL1" FP8 KV cache, 584 bytes of information per token) stores a *page block*
of ``bs`` tokens as ``[bs × 576 B token data][bs × 8 B scales]``, the block padded to a multiple
of 576 bytes; its ``k_cache`` argument is a ``[num_blocks, bs, 1, 584]`` view of that buffer.
Our rows are ``[448 e4m3 | 128 B bf16 rope | 7 UE8M0 | 1 pad]`` = the same 576 + 8 bytes per token,
interleaved per row. FlashMLA's sparse indices are ``block_id · bs + offset`` (−1 = invalid, any
position); it also takes ``topk_length`` (valid prefix per row) and needs the index-list width
padded to a multiple of 64 (or 128).

DeepGEMM's paged indexer cache is ``[num_blocks, block_kv, 1, D + 4]`` uint8 viewing per block
``[block_kv × D e4m3][block_kv × fp32 scale]``: the fp32 scale of each key stored beside the block.
"""
from __future__ import annotations

import torch

from .reference import NOPE_DIM, PACKED_DIM, ROPE_DIM

#: bytes of token data (e4m3 nope + bf16 rope) and of scales per token in FlashMLA's block layout
FLASHMLA_DATA = NOPE_DIM + 2 * ROPE_DIM  # 576
FLASHMLA_SCALES = PACKED_DIM - FLASHMLA_DATA  # 8


def flashmla_block_bytes(block_size: int) -> int:
    """Bytes of one FlashMLA page block: ``block_size · 584`` rounded up to a multiple of 576."""
    return -(-block_size * PACKED_DIM // FLASHMLA_DATA) * FLASHMLA_DATA


def to_flashmla_cache(rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[R, 584]`` uint8 rows (pack_kv_fp8 layout) -> FlashMLA ``k_cache`` ``[ceil(R/bs), bs, 1, 584]``.

    Row ``g`` lands in block ``g // bs`` at offset ``g % bs``, so its FlashMLA index is ``g``.
    Rows past ``R`` in the last block are zero.
    """
    r = rows.shape[0]
    nb = max(1, -(-r // block_size))
    buf = torch.zeros(nb, flashmla_block_bytes(block_size), dtype=torch.uint8, device=rows.device)
    padded = torch.zeros(nb * block_size, PACKED_DIM, dtype=torch.uint8, device=rows.device)
    padded[:r] = rows
    padded = padded.view(nb, block_size, PACKED_DIM)
    buf[:, : block_size * FLASHMLA_DATA] = padded[:, :, :FLASHMLA_DATA].reshape(nb, -1)
    buf[:, block_size * FLASHMLA_DATA : block_size * PACKED_DIM] = padded[:, :, FLASHMLA_DATA:].reshape(nb, -1)
    # explicit strides: block stride = padded block bytes, even when a dim has size 1
    return torch.as_strided(buf, (nb, block_size, 1, PACKED_DIM), (buf.stride(0), PACKED_DIM, PACKED_DIM, 1))


def from_flashmla_cache(cache: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Inverse of :func:`to_flashmla_cache`: the first ``n_rows`` rows in the 584-byte row layout."""
    nb, bs = cache.shape[0], cache.shape[1]
    flat = torch.as_strided(cache, (nb, bs * PACKED_DIM), (cache.stride(0), 1))
    data = flat[:, : bs * FLASHMLA_DATA].reshape(nb, bs, FLASHMLA_DATA)
    scales = flat[:, bs * FLASHMLA_DATA :].reshape(nb, bs, FLASHMLA_SCALES)
    return torch.cat((data, scales), dim=-1).reshape(nb * bs, PACKED_DIM)[:n_rows]


def global_indices(topk_idxs: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-batch row ids ``[B, M, K]`` (−1 = skip) -> rows of the batch-flattened cache
    (``b · N + idx``), −1 kept."""
    b = topk_idxs.shape[0]
    base = (torch.arange(b, device=topk_idxs.device, dtype=torch.int64) * n_rows).view(b, 1, 1)
    idx = topk_idxs.to(torch.int64)
    return torch.where(idx >= 0, idx + base, -1).to(torch.int32)


def compact_indices(idx: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid entries first (their order kept), −1 after, width padded with −1 to a multiple of
    ``multiple``; returns ``(indices [..., Kp] int32, lengths [...] int32)`` = FlashMLA's
    ``indices`` / ``topk_length``. Attention over an index list does not depend on its order."""
    k = idx.shape[-1]
    kp = max(multiple, -(-k // multiple) * multiple)
    invalid = idx < 0
    order = torch.argsort(invalid.to(torch.int8), dim=-1, stable=True)
    out = torch.full((*idx.shape[:-1], kp), -1, dtype=torch.int32, device=idx.device)
    out[..., :k] = torch.where(invalid, -1, idx).gather(-1, order).to(torch.int32)
    return out, (~invalid).sum(-1).to(torch.int32)


def head_groups(h: int) -> list[tuple[int, int, int]]:
    """Split ``h`` query heads into FlashMLA launches: ``(start, count, padded)`` with padded in
    {64, 128}; counts below the padded size are zero-padded (their outputs dropped)."""
    out = []
    for s in range(0, h, 128):
        c = min(128, h - s)
        out.append((s, c, 64 if c <= 64 else 128))
    return out


def pad_heads(q: torch.Tensor, sink: torch.Tensor, start: int, count: int, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Heads ``start .. start+count`` of ``q [..., H, D]`` and ``sink [H]`` zero-padded to ``padded``."""
    qs = q[..., start : start + count, :]
    ss = sink[start : start + count].float()
    if padded == count:
        return qs.contiguous(), ss.contiguous()
    qp = q.new_zeros((*q.shape[:-2], padded, q.shape[-1]))
    qp[..., :count, :] = qs
    sp = torch.zeros(padded, dtype=torch.float32, device=sink.device)
    sp[:count] = ss
    return qp, sp


def gather_rows(kv_rows: torch.Tensor, gidx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact cache of only the referenced rows: ``kv_rows [R, C]``, global indices ``[Q, K]``
    -> (rows ``[Q·K, C]``, indices ``[Q, K]`` = ``q·K + slot`` or −1). Cheaper than repacking the
    whole cache when ``Q·K`` is below ``R``."""
    q, k = gidx.shape
    valid = gidx >= 0
    rows = kv_rows[torch.where(valid, gidx, 0).reshape(-1).long()]
    slot = torch.arange(q * k, device=gidx.device, dtype=torch.int32).view(q, k)
    return rows, torch.where(valid, slot, -1)


# ------------------------------------------------------------------------------ DeepGEMM indexer
def to_deepgemm_indexer_cache(keys: torch.Tensor, scales: torch.Tensor, block_kv: int) -> torch.Tensor:
    """FP8 indexer keys ``[R, D]`` e4m3 + one fp32 scale per key ``[R]`` -> DeepGEMM's paged cache
    ``[ceil(R/block_kv), block_kv, 1, D + 4]`` uint8 (per block: keys, then their fp32 scales).
    Key ``g`` is at block ``g // block_kv``, slot ``g % block_kv``."""
    r, d = keys.shape
    nb = max(1, -(-r // block_kv))
    kb = torch.zeros(nb * block_kv, d, dtype=torch.uint8, device=keys.device)
    kb[:r] = keys.view(torch.uint8)
    sb = torch.zeros(nb * block_kv, dtype=torch.float32, device=keys.device)
    sb[:r] = scales.float().reshape(r)
    buf = torch.empty(nb, block_kv * (d + 4), dtype=torch.uint8, device=keys.device)
    buf[:, : block_kv * d] = kb.view(nb, block_kv * d)
    buf[:, block_kv * d :] = sb.view(nb, block_kv).view(torch.uint8)
    return buf.view(nb, block_kv, 1, d + 4)


def from_deepgemm_indexer_cache(cache: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`to_deepgemm_indexer_cache`: (keys ``[n_rows, D]`` e4m3, scales ``[n_rows]`` fp32)."""
    nb, bkv, _, w = cache.shape
    d = w - 4
    flat = cache.reshape(nb, bkv * w)
    keys = flat[:, : bkv * d].reshape(nb * bkv, d)[:n_rows].contiguous().view(torch.float8_e4m3fn)
    scales = flat[:, bkv * d :].contiguous().view(torch.float32).reshape(nb * bkv)[:n_rows]
    return keys, scales


def fp8_exact_query(q: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Indexer queries ``[T, H, D]`` float -> (e4m3 ``[T, H, D]``, fp32 weights ``[T, H]`` with a
    power-of-two per-(token, head) scale folded in), or None when some value is not exactly
    representable. ``Σ_h w·ReLU(q·k)`` is unchanged: ``ReLU(s·x) = s·ReLU(x)`` for ``s > 0``."""
    qf = q.float()
    amax = qf.abs().amax(-1).clamp_min(2.0**-100)
    f = amax * torch.tensor(1.0 / 448.0, dtype=torch.float32)
    bits = f.view(torch.int32)
    k = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    s = torch.ldexp(torch.ones_like(f), k.float())
    q8 = (qf / s.unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    if not torch.equal(q8.float() * s.unsqueeze(-1), qf):
        return None
    return q8, (weights.float() * s).contiguous()
