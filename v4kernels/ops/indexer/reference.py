"""Reference lightning-indexer scores and top-k selection (SPEC §7); fp32 math on any device.

The work is tiled so that peak memory stays bounded at long context: per sequence, per block of
queries, per block of keys and per block of heads, never more than about ``_TILE_ELEMS`` fp32
logits exist at once, and keys are dequantised one key block at a time. Keys past the largest
causal limit of a query block are never touched (prefill does about half the work of a dense
``[S, N]`` product). That skip reads the causal limits on the host (a synchronisation on
accelerators; native kernels mask inside the tile instead).

Numerics: [OFF] evaluates ``q·k`` and the weighted head sum with bf16 tensors; this reference
upcasts everything to fp32 (SPEC §7.2, §15 #8), so near-tied selections can differ from [OFF] and
are compared by index-set recall.
"""
from __future__ import annotations

import torch

from ..._registry import register_kernel
from ..quant import reference as _quant

#: fp32 elements of the largest temporary logits tile ([queries, heads, keys]); 4 Mi = 16 MiB
_TILE_ELEMS = 1 << 22
#: keys dequantised (fp32) at a time
_KEY_BLOCK = 1 << 15
#: FP8 keys carry one scale per 128 dims, FP4 keys one per 32 (SPEC §4.3, §4.4, §13.1)
FP8_KEY_BLOCK = 128
FP4_KEY_BLOCK = 32


def key_format(keys: torch.Tensor) -> str:
    """``"float"``, ``"fp8"`` (e4m3 [B,N,dI]) or ``"fp4"`` (packed uint8 [B,N,dI/2])."""
    if keys.dtype == torch.float8_e4m3fn:
        return "fp8"
    if keys.dtype == torch.uint8:
        return "fp4"
    return "float"


def dequantize_keys(keys: torch.Tensor, key_scales: torch.Tensor | None) -> torch.Tensor:
    """Indexer keys in any accepted storage -> fp32 ``[..., dI]`` (exact: block scales are powers
    of two or plain fp32 multipliers, applied with the quant reference helpers)."""
    fmt = key_format(keys)
    if fmt == "fp8":
        assert key_scales is not None
        return _quant.act_dequant(keys, key_scales, FP8_KEY_BLOCK, torch.float32)
    if fmt == "fp4":
        assert key_scales is not None
        return _quant.fp4_act_dequant(keys, key_scales, FP4_KEY_BLOCK, torch.float32)
    return keys.float()


def causal_limits(positions: torch.Tensor, ratio: int, n_keys: int) -> torch.Tensor:
    """Visible entry count per query: ``min((t + 1) // ratio, N)`` (SPEC §6.3, §7.2)."""
    return torch.clamp((positions.long() + 1) // ratio, max=n_keys)


def _block_scores(
    q: torch.Tensor,
    w: torch.Tensor,
    keys: torch.Tensor,
    key_scales: torch.Tensor | None,
    limits: torch.Tensor,
    n_keys: int,
) -> torch.Tensor:
    """Scores of one sequence's query block: q [s,H,dI], w [s,H], limits [s] -> [s, N] fp32."""
    s, h, _ = q.shape
    out = torch.full((s, n_keys), float("-inf"), dtype=torch.float32, device=q.device)
    n_end = int(limits.max()) if s else 0
    if n_end == 0:
        return out
    qf, wf = q.float(), w.float()
    for k0 in range(0, n_end, _KEY_BLOCK):
        k1 = min(n_end, k0 + _KEY_BLOCK)
        kf = dequantize_keys(keys[k0:k1], None if key_scales is None else key_scales[k0:k1])
        acc = torch.zeros(s, 1, k1 - k0, dtype=torch.float32, device=q.device)
        hc = max(1, min(h, _TILE_ELEMS // max(1, s * (k1 - k0))))
        for h0 in range(0, h, hc):
            h1 = min(h, h0 + hc)
            # logits [s, hc, n] = q_h · k, then Σ_h w_h · ReLU(logit_h) as a batched GEMV (SPEC §7.2)
            logits = torch.matmul(qf[:, h0:h1], kf.T).relu_()
            acc = torch.baddbmm(acc, wf[:, None, h0:h1], logits)
        out[:, k0:k1] = acc[:, 0]
    # −inf for entries whose window has not closed: c >= (t + 1) // ratio (SPEC §7.2)
    col = torch.arange(n_keys, device=q.device)
    out.masked_fill_(col[None, :] >= limits[:, None], float("-inf"))
    return out


def _query_block(s_total: int, h: int, n: int) -> int:
    """Queries per block so that one [s, H, key-block] logits tile stays within budget."""
    return max(1, min(s_total, _TILE_ELEMS // max(1, h * min(n, _KEY_BLOCK))))


def _iter_blocks(q, weights, keys, key_scales, positions, ratio):
    b, s, h, _ = q.shape
    n = keys.shape[1]
    sq = _query_block(s, h, n)
    for bi in range(b):
        lim_b = causal_limits(positions[bi], ratio, n)
        ks = None if key_scales is None else key_scales[bi]
        for i0 in range(0, s, sq):
            i1 = min(s, i0 + sq)
            lim = lim_b[i0:i1]
            yield bi, i0, i1, lim, _block_scores(q[bi, i0:i1], weights[bi, i0:i1], keys[bi], ks, lim, n)


@register_kernel("reference", "indexer_scores")
def indexer_scores(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    key_scales: torch.Tensor | None,
    positions: torch.Tensor,
    ratio: int,
) -> torch.Tensor:
    b, s = q.shape[:2]
    out = torch.empty((b, s, keys.shape[1]), dtype=torch.float32, device=q.device)
    for bi, i0, i1, _, sc in _iter_blocks(q, weights, keys, key_scales, positions, ratio):
        out[bi, i0:i1] = sc
    return out


def select_topk(scores: torch.Tensor, limits: torch.Tensor, k: int, offset: int) -> torch.Tensor:
    """Top-``k`` columns of ``scores [s, N]`` among the first ``limits[i]`` of each row.

    Largest first; equal scores keep the lower index first (a stable sort), so the result is
    deterministic. Slots past a row's visible count are −1; valid entries get ``+ offset``.
    """
    nan = torch.isnan(scores)
    order = torch.sort(scores.masked_fill(nan, float("-inf")), dim=-1, descending=True, stable=True).indices
    # a NaN score ranks below every score, −inf included, and is never selected (docs/numerics.md)
    order = order.gather(-1, torch.sort(nan.gather(-1, order).to(torch.uint8), dim=-1, stable=True).indices)[:, :k]
    slot = torch.arange(k, device=scores.device)
    # masked entries are −inf and sort after the visible ones, so the first min(k, limit − #NaN)
    # slots are the selectable visible entries
    count = limits - nan.sum(-1)
    return torch.where(slot[None, :] < count[:, None], order + offset, -1).to(torch.int32)


@register_kernel("reference", "indexer_topk")
def indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    key_scales: torch.Tensor | None,
    positions: torch.Tensor,
    topk: int,
    ratio: int,
    offset: int,
) -> torch.Tensor:
    b, s = q.shape[:2]
    k = min(topk, keys.shape[1])
    out = torch.empty((b, s, k), dtype=torch.int32, device=q.device)
    for bi, i0, i1, lim, sc in _iter_blocks(q, weights, keys, key_scales, positions, ratio):
        out[bi, i0:i1] = select_topk(sc, lim, k, offset)
    return out
