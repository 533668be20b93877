"""``cuda`` lightning indexer (SPEC §7.2).

Scores: DeepGEMM's ``fp8_fp4_mqa_logits`` for FP8 keys (one fp32 scale per key, dI = 128) when the
queries are exactly FP8-representable after a power-of-two scale per (token, head), which is
folded into the head weights (V4's FP4-simulated queries are); heads are zero-padded to the
counts DeepGEMM supports. Otherwise Triton's tensor-core scorer, or the native fp32 scorer
(``csrc/cuda/indexer.cu``) where Triton is unavailable.

Top-k: the native radix select (``csrc/cuda/indexer.cu``, ``topk_select.h``) over row chunks of
scores, which mirrors the reference's stable descending sort exactly (ties to the lower entry,
−1 past the visible count).
"""
from __future__ import annotations

import torch

from ... import _platform
from ...backends.cuda import Route, native_reasons, register_routes, sm_of, vendor
from ..attention.cuda_bridges import fp8_exact_query

TOPK_MAX = 4096  # V4K_TOPK_MAX in csrc/cuda/launchers.h
_ARCHS = ((9, -1), (10, -1))
#: fp32 score elements materialised per chunk (256 MiB)
_CHUNK_ELEMS = 1 << 26


def _limits(positions: torch.Tensor, ratio: int, n: int) -> torch.Tensor:
    return torch.clamp((positions.reshape(-1).long() + 1) // ratio, max=n)


def _dg_heads(h: int, major: int) -> int | None:
    allowed = (32, 64) if major == 9 else (8, 16, 32, 64)
    return next((a for a in allowed if a >= h), None)


def _dg_refusals(q, weights, keys, key_scales, positions, *rest) -> list[str]:
    out = []
    if keys.dtype != torch.float8_e4m3fn:
        out.append(f"DeepGEMM MQA logits need FP8 e4m3 keys, got {str(keys.dtype).replace('torch.', '')}")
    if q.shape[-1] != 128:
        out.append(f"FP8 keys with one scale per key need dI = 128, got {q.shape[-1]}")
    cc = sm_of(q)
    if cc is not None and _dg_heads(q.shape[2], cc[0]) is None:
        out.append(f"DeepGEMM supports up to 64 indexer heads, got {q.shape[2]}")
    return out


def _dg_scores(q, weights, keys, key_scales, positions, ratio):
    """Scores [B·S, N] fp32 (−inf past the causal limit) and limits [B·S], or None when the
    queries are not exactly FP8-representable."""
    dg = vendor("DeepGEMM").module
    b, s, h, d = q.shape
    n = keys.shape[1]
    conv = fp8_exact_query(q.reshape(b * s, h, d), weights.reshape(b * s, h))
    if conv is None:
        return None
    q8, w = conv
    hp = _dg_heads(h, sm_of(q)[0])
    if hp != h:  # zero heads with zero weight add exactly 0
        q8 = torch.cat((q8, q8.new_zeros(b * s, hp - h, d)), dim=1)
        w = torch.cat((w, w.new_zeros(b * s, hp - h)), dim=1)
    lim = _limits(positions, ratio, n)
    ks = (torch.arange(b, device=q.device).repeat_interleave(s) * n).to(torch.int32)
    ke = (ks + lim).to(torch.int32)
    fn = getattr(dg, "fp8_fp4_mqa_logits", None) or dg.fp8_mqa_logits
    kv = (keys.reshape(b * n, d).contiguous(), key_scales.float().reshape(b * n).contiguous())
    # max_seqlen_k = N: logits[i, j] is key ks[i] + j of the flattened keys, garbage past ke
    logits = fn((q8.contiguous(), None), kv, w.contiguous(), ks, ke, clean_logits=False, max_seqlen_k=n)
    col = torch.arange(n, device=q.device)
    return logits.masked_fill(col[None, :] >= lim[:, None], float("-inf")), lim


def _dg_scores_op(q, weights, keys, key_scales, positions, ratio):
    r = _dg_scores(q, weights, keys, key_scales, positions, ratio)
    if r is None:  # queries not FP8-exact: another scorer with the same semantics
        return _fallback_scores(q, weights, keys, key_scales, positions, ratio)
    return r[0].view(q.shape[0], q.shape[1], keys.shape[1])


def _fallback_scores(q, weights, keys, key_scales, positions, ratio):
    """Native fp32 scorer, else Triton's, else the reference (used when DeepGEMM cannot take the
    queries exactly)."""
    if not native_reasons():
        return torch.ops.v4k_impl.indexer_scores.default(q, weights, keys, key_scales, positions, ratio)
    if not _triton_usable(q):
        from . import triton as T

        return T.indexer_scores(q, weights, keys, key_scales, positions, ratio)
    from ..._registry import reference_kernel

    return reference_kernel("indexer_scores")(q, weights, keys, key_scales, positions, ratio)


def _triton_usable(q) -> list[str]:
    p = _platform.triton_probe()
    if not p.ok:
        return [p.detail]
    from . import triton as T

    return T._refusals(q, None, None, None, None)


def _native_scores_refusals(q, *rest) -> list[str]:
    if not _triton_usable(q):
        return ["Triton's tensor-core scorer is faster than the native fp32 scorer; native is used without Triton"]
    return []


def _topk_width(q, weights, keys, key_scales, positions, topk, ratio, offset) -> list[str]:
    k = min(topk, keys.shape[1])
    return [f"native radix top-k keeps <= {TOPK_MAX} candidates per row, got k={k}"] if k > TOPK_MAX else []


def _select(scores: torch.Tensor, lim: torch.Tensor, k: int, offset: int) -> torch.Tensor:
    return torch.ops.v4k_cuda.topk_select(scores, lim, k, offset)


def _chunked_topk(score_fn, q, weights, keys, key_scales, positions, topk, ratio, offset):
    """Score row chunks of at most _CHUNK_ELEMS fp32 and select each chunk's top-k natively."""
    b, s = q.shape[:2]
    n = keys.shape[1]
    k = min(topk, n)
    if b * s * n <= _CHUNK_ELEMS:  # one scoring launch for the whole batch (decode)
        sc, lim = score_fn(q, weights, keys, key_scales, positions, ratio)
        return _select(sc, lim, k, offset).view(b, s, k)
    out = torch.empty((b, s, k), dtype=torch.int32, device=q.device)
    step = max(1, min(s, _CHUNK_ELEMS // max(1, n)))
    for bi in range(b):
        for i0 in range(0, s, step):
            sl = slice(i0, min(s, i0 + step))
            sc, lim = score_fn(q[bi : bi + 1, sl].contiguous(), weights[bi : bi + 1, sl].contiguous(),
                               keys[bi : bi + 1], None if key_scales is None else key_scales[bi : bi + 1],
                               positions[bi : bi + 1, sl].contiguous(), ratio)
            out[bi, sl] = _select(sc, lim, k, offset)
    return out


def _dg_or_native(q, weights, keys, key_scales, positions, ratio):
    r = _dg_scores(q, weights, keys, key_scales, positions, ratio)
    if r is None:
        sc = _fallback_scores(q, weights, keys, key_scales, positions, ratio)
        return sc.reshape(-1, keys.shape[1]), _limits(positions, ratio, keys.shape[1])
    return r


def _triton_scores(q, weights, keys, key_scales, positions, ratio):
    from . import triton as T

    sc = T.indexer_scores(q, weights, keys, key_scales, positions, ratio)
    return sc.reshape(-1, keys.shape[1]), _limits(positions, ratio, keys.shape[1])


def _dg_topk(q, weights, keys, key_scales, positions, topk, ratio, offset):
    return _chunked_topk(_dg_or_native, q, weights, keys, key_scales, positions, topk, ratio, offset)


def _triton_topk(q, weights, keys, key_scales, positions, topk, ratio, offset):
    return _chunked_topk(_triton_scores, q, weights, keys, key_scales, positions, topk, ratio, offset)


def _dg_topk_refusals(*args) -> list[str]:
    return _dg_refusals(*args) + _topk_width(*args) + [f"native top-k: {r}" for r in native_reasons()]


def _triton_topk_refusals(q, *rest) -> list[str]:
    return _triton_usable(q) + _topk_width(q, *rest) + [f"native top-k: {r}" for r in native_reasons()]


def _native_scores(*args):
    return torch.ops.v4k_impl.indexer_scores.default(*args)


def _native_topk(*args):
    return torch.ops.v4k_impl.indexer_topk.default(*args)


_DG_LIMITS = ("FP8 keys + fp32 scale per key, dI 128, <= 64 heads (zero-padded to 32/64 on SM90, 8/16/32/64 "
              "on SM100), queries exactly FP8 after a pow2 scale per (token, head) (else native scorer)")

register_routes("indexer_scores", [
    Route("DeepGEMM fp8_fp4_mqa_logits", "DeepGEMM", _DG_LIMITS, _dg_scores_op, _dg_refusals, _ARCHS, "SM90/SM100"),
    Route("native fp32 scorer", "native", "any key format, any heads/dI", _native_scores,
          _native_scores_refusals),
])
register_routes("indexer_topk", [
    Route("DeepGEMM logits + native radix top-k", "DeepGEMM", _DG_LIMITS + f"; k <= {TOPK_MAX}", _dg_topk,
          _dg_topk_refusals, _ARCHS, "SM90/SM100"),
    Route("Triton scores + native radix top-k", "native", f"Triton scorer limits; k <= {TOPK_MAX}", _triton_topk,
          _triton_topk_refusals),
    Route("native fp32 scores + radix top-k", "native", f"any key format; k <= {TOPK_MAX}", _native_topk, _topk_width),
])
