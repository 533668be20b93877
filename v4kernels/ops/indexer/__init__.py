"""The lightning indexer of CSA layers (SPEC §7): weighted-ReLU scores of the current queries
against the compressed indexer keys, the causal limit on closed windows, and top-k selection with
a −1 sentinel. Also the indexer query path (RoPE, Hadamard, FP4 simulation) and its head-weight
scale, composed from the public quant and rope ops.
"""
from __future__ import annotations

import torch

from ... import _checks as C
from ..._registry import declare_op
from ..quant import fp4_act_roundtrip, hadamard_transform
from ..rope_norm import apply_rope
from . import reference as _reference  # noqa: F401  (registers the reference kernels)

__all__ = ["indexer_scores", "indexer_topk", "indexer_query", "indexer_scale"]

_SCALE_DTYPES = (torch.float32, torch.float8_e8m0fnu)
#: positions must stay below this so that ``(t + 1) // ratio`` cannot overflow int64
_MAX_POSITION = 2**62


# ----------------------------------------------------------------------------- fake kernels
def _fake_scores(q, weights, keys, key_scales, positions, ratio):
    return q.new_empty((q.shape[0], q.shape[1], keys.shape[1]), dtype=torch.float32)


def _fake_topk(q, weights, keys, key_scales, positions, topk, ratio, offset):
    return q.new_empty((q.shape[0], q.shape[1], min(topk, keys.shape[1])), dtype=torch.int32)


# ----------------------------------------------------------------------------- checks
def _check_common(op, q, weights, keys, key_scales, positions, ratio) -> None:
    """The arguments shared by both ops, in schema form (``positions`` [B, S])."""
    C.check_tensor(op, "q", q, ndim=4, dtypes=C.FLOAT_DTYPES)
    b, s, h, d = q.shape
    if h < 1 or d < 1:
        raise ValueError(f"{op}: q must be [B, S, HI, dI] with HI >= 1 and dI >= 1, got shape {list(q.shape)}")
    C.check_tensor(op, "weights", weights, dtypes=C.FLOAT_DTYPES, shape=[b, s, h])
    C.check_tensor(op, "keys", keys, ndim=3, dtypes=(*C.FLOAT_DTYPES, torch.float8_e4m3fn, torch.uint8))
    C.check_dim(op, "keys", keys, 0, b, "batch of q")
    fmt = _reference.key_format(keys)
    if fmt == "fp4":
        C.check_dim(op, "keys", keys, 2, d // 2, "dI/2 packed FP4 bytes")
        if d % _reference.FP4_KEY_BLOCK:
            raise ValueError(f"{op}: FP4 keys need dI % {_reference.FP4_KEY_BLOCK} == 0, got dI={d}")
        block = _reference.FP4_KEY_BLOCK
    else:
        C.check_dim(op, "keys", keys, 2, d, "dI of q")
        block = _reference.FP8_KEY_BLOCK
        if fmt == "fp8" and d % block:
            raise ValueError(f"{op}: FP8 keys need dI % {block} == 0, got dI={d}")
    if fmt == "float":
        if key_scales is not None:
            raise ValueError(f"{op}: key_scales must be None for {str(keys.dtype).replace('torch.', '')} keys, got a tensor")
    else:
        if key_scales is None:
            raise ValueError(f"{op}: key_scales [B, N, dI/{block}] is required for {fmt.upper()} keys, got None")
        C.check_tensor(op, "key_scales", key_scales, dtypes=_SCALE_DTYPES, shape=[b, keys.shape[1], d // block])
    C.check_tensor(op, "positions", positions, dtypes=C.INDEX_DTYPES, shape=[b, s])
    C.check_int(op, "ratio", ratio, minimum=1)
    C.check_same_device(op, q=q, weights=weights, keys=keys, key_scales=key_scales, positions=positions)


def _check_positions(op: str, positions: torch.Tensor) -> None:
    """The value check of both ops (run on every call; the structural ones once per signature)."""
    bounds = C.value_bounds(positions)
    if bounds is None or 0 <= bounds[0] and bounds[1] < _MAX_POSITION or not C.value_checks_on_failure():
        return
    lo, hi = bounds
    if lo < 0:
        raise ValueError(f"{op}: positions must be >= 0, got min {lo}")
    raise ValueError(f"{op}: positions must be < 2**62, got max {hi}")


def _check_indexer_scores(q, weights, keys, key_scales, positions, ratio) -> None:
    _check_common("indexer_scores", q, weights, keys, key_scales, positions, ratio)


def _check_indexer_scores_positions(q, weights, keys, key_scales, positions, ratio) -> None:
    _check_positions("indexer_scores", positions)


def _check_indexer_topk_positions(q, weights, keys, key_scales, positions, topk, ratio, offset) -> None:
    _check_positions("indexer_topk", positions)


def _check_indexer_topk(q, weights, keys, key_scales, positions, topk, ratio, offset) -> None:
    op = "indexer_topk"
    _check_common(op, q, weights, keys, key_scales, positions, ratio)
    C.check_int(op, "topk", topk, minimum=0)
    C.check_int(op, "offset", offset, minimum=0)
    n = keys.shape[1]
    if offset + n > 2**31:
        raise ValueError(f"{op}: offset + N must fit int32 (<= 2**31), got offset={offset}, N={n}")


def _public_positions(op: str, q: object, positions: object) -> torch.Tensor:
    """Positions as given to the public functions ([S] or [B, S]) -> the schema's [B, S]."""
    C.check_tensor(op, "positions", positions, ndim=(1, 2), dtypes=C.INDEX_DTYPES)
    if positions.dim() == 1 and isinstance(q, torch.Tensor) and q.dim() == 4:
        C.check_tensor(op, "positions", positions, shape=[q.shape[1]])
        positions = positions.unsqueeze(0).expand(q.shape[0], q.shape[1])
    return positions


_indexer_scores = declare_op(
    "indexer",
    "indexer_scores",
    "(Tensor q, Tensor weights, Tensor keys, Tensor? key_scales, Tensor positions, int ratio) -> Tensor",
    _fake_scores,
    check=_check_indexer_scores,
    value_check=_check_indexer_scores_positions,
    memoize_checks=True,
)
_indexer_topk = declare_op(
    "indexer",
    "indexer_topk",
    "(Tensor q, Tensor weights, Tensor keys, Tensor? key_scales, Tensor positions, int topk, int ratio, int offset) -> Tensor",
    _fake_topk,
    check=_check_indexer_topk,
    value_check=_check_indexer_topk_positions,
    memoize_checks=True,
)


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


# ----------------------------------------------------------------------------- public ops
def indexer_scores(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    *,
    ratio: int = 4,
    key_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lightning-indexer scores with the causal limit (SPEC §7.2).

    ``score[b,i,c] = Σ_h w[b,i,h] · ReLU(<q[b,i,h,:], K[b,c,:]>)`` in fp32, and ``−inf`` where
    ``c >= (t_i + 1) // ratio`` (entry ``c`` summarises tokens ``c·ratio … c·ratio+ratio−1``, so it
    is visible only once its window has closed). The scale ``dI^-0.5 · HI^-0.5`` is *not* applied
    here: fold it into ``weights`` (see :func:`indexer_scale`).

    Parameters
    ----------
    q : [B, S, HI, dI] bf16/fp16/fp32
        Indexer queries, normally from :func:`indexer_query` (HI = 64, dI = 128 in V4).
    weights : [B, S, HI] bf16/fp16/fp32
        Per-head weights with the scale folded in.
    keys : [B, N, dI] bf16/fp16/fp32, or [B, N, dI] float8_e4m3fn, or [B, N, dI/2] uint8
        Compressed indexer keys: float; FP8 with ``key_scales`` [B, N, dI/128]; or packed FP4
        (element ``2i`` in the low nibble) with ``key_scales`` [B, N, dI/32].
    positions : [B, S] (or [S]) int32/int64
        Absolute position ``t`` of every query (values >= 0; checked where values are readable,
        see ``v4kernels._checks``).
    ratio : int
        Compression ratio of the keys (4 for CSA).
    key_scales : [B, N, dI/block] fp32 (or float8_e8m0fnu), only with FP8/FP4 keys.

    Returns
    -------
    scores : [B, S, N] fp32

    Example
    -------
    >>> import torch, v4kernels
    >>> q = torch.ones(1, 2, 1, 4); w = torch.ones(1, 2, 1); k = torch.eye(4)[None, :3]
    >>> v4kernels.indexer_scores(q, w, k, torch.tensor([[3, 7]]))
    tensor([[[1., -inf, -inf],
             [1., 1., -inf]]])
    """
    positions = _public_positions("indexer_scores", q, positions)
    key = _indexer_scores.validate(q, weights, keys, key_scales, positions, ratio)
    b, s = q.shape[:2]
    n = keys.shape[1]
    if b * s * n == 0:
        return torch.empty((b, s, n), dtype=torch.float32, device=q.device)
    return _indexer_scores.run_as(key, q.contiguous(), weights.contiguous(), keys.contiguous(), _contig(key_scales),
                                  C.contiguous_as(positions, torch.int64), ratio)


def indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    topk: int,
    *,
    ratio: int = 4,
    offset: int = 0,
    key_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-k compressed entries per query for sparse attention (SPEC §7.2, §8).

    Scores as in :func:`indexer_scores`; each row keeps its ``min(topk, N)`` best *visible*
    entries (``c < (t_i + 1) // ratio``). Valid entries are returned as ``c + offset`` (their
    row in the attention KV buffer: ``S`` in prefill, ``window`` in decode, see
    :func:`compressed_indices`); rows with fewer visible entries than the width are padded with
    −1. Order: highest score first, equal scores by lower ``c`` (deterministic; downstream
    attention does not depend on order). Backends are compared by index-set recall.

    Parameters
    ----------
    q, weights, keys, positions, ratio, key_scales : as in :func:`indexer_scores`
    topk : int >= 0
        ``K_top`` (512 Flash, 1024 Pro).
    offset : int >= 0
        Added to every valid entry.

    Returns
    -------
    idx : [B, S, min(topk, N)] int32

    Example
    -------
    >>> import torch, v4kernels
    >>> q = torch.ones(1, 2, 1, 4); w = torch.ones(1, 2, 1)
    >>> k = torch.diag(torch.tensor([1.0, 3.0, 2.0, 0.5]))[None, :3]
    >>> v4kernels.indexer_topk(q, w, k, torch.tensor([[3, 11]]), 2, offset=10)
    tensor([[[10, -1],
             [11, 12]]], dtype=torch.int32)
    """
    positions = _public_positions("indexer_topk", q, positions)
    key = _indexer_topk.validate(q, weights, keys, key_scales, positions, topk, ratio, offset)
    b, s = q.shape[:2]
    k = min(topk, keys.shape[1])
    if b * s * k == 0:
        return torch.empty((b, s, k), dtype=torch.int32, device=q.device)
    return _indexer_topk.run_as(
        key,
        q.contiguous(), weights.contiguous(), keys.contiguous(), _contig(key_scales), C.contiguous_as(positions, torch.int64),
        topk, ratio, offset,
    )


def indexer_query(
    q: torch.Tensor,
    positions: torch.Tensor,
    freqs: torch.Tensor,
    *,
    rotate: bool = True,
    simulate_fp4: bool = True,
) -> torch.Tensor:
    """The indexer query path after ``wq_b`` (SPEC §7.2): RoPE, Hadamard-128, FP4 simulation.

    ``q[..., dI−r:] = RoPE(q, t)`` (interleaved pairs, ``r = 2·len(freqs)``; the compressed-layer
    table, :func:`v4_rope_frequencies(True) <v4kernels.v4_rope_frequencies>`), then
    ``q = hadamard_transform(q)`` and ``q = fp4_act_roundtrip(q, 32)``, each rounded to
    ``q.dtype`` like the released code. The [HF] variant (SPEC §15 #8) is
    ``rotate=False, simulate_fp4=False``. A composition of public ops, dispatched per step.

    Parameters
    ----------
    q : [B, S, HI, dI] bf16/fp16/fp32; ``dI`` a power of two if ``rotate``, a multiple of 32 if
        ``simulate_fp4``
    positions : [B, S] (or [S]) int32/int64 absolute positions
    freqs : [r/2] fp32 rotary frequencies, ``r <= dI``
    rotate : apply the Hadamard rotation
    simulate_fp4 : round to FP4 e2m1 with power-of-two block-32 scales

    Returns
    -------
    [B, S, HI, dI] same dtype as ``q``

    Example
    -------
    >>> import torch, v4kernels
    >>> q = torch.randn(1, 3, 2, 128, dtype=torch.bfloat16)
    >>> f = v4kernels.v4_rope_frequencies(compressed=True)
    >>> v4kernels.indexer_query(q, torch.arange(3), f).shape
    torch.Size([1, 3, 2, 128])
    """
    op = "indexer_query"
    C.check_tensor(op, "q", q, ndim=4, dtypes=C.FLOAT_DTYPES)
    C.check_bool(op, "rotate", rotate)
    C.check_bool(op, "simulate_fp4", simulate_fp4)
    d = q.shape[-1]
    C.check_tensor(op, "freqs", freqs, ndim=1, dtypes=(torch.float32,))
    r = 2 * freqs.shape[0]
    if r == 0 or r > d:
        raise ValueError(f"{op}: 2*len(freqs)={r} rope dims must be in [2, dI={d}]")
    if rotate and (d < 1 or d & (d - 1)):
        raise ValueError(f"{op}: rotate=True needs dI a power of two, got dI={d} (shape {list(q.shape)})")
    if simulate_fp4 and d % 32:
        raise ValueError(f"{op}: simulate_fp4=True needs dI % 32 == 0, got dI={d}")
    C.check_tensor(op, "positions", positions, ndim=(1, 2), dtypes=C.INDEX_DTYPES)
    exp = [q.shape[1]] if positions.dim() == 1 else [q.shape[0], q.shape[1]]
    C.check_tensor(op, "positions", positions, shape=exp)
    C.check_same_device(op, q=q, positions=positions, freqs=freqs)
    C.check_nonnegative(op, "positions", positions)
    if q.numel() == 0:
        return torch.empty_like(q)
    out = apply_rope(q, positions, freqs)
    if rotate:
        out = hadamard_transform(out)
    if simulate_fp4:
        out = fp4_act_roundtrip(out, 32)
    return out


def indexer_scale(index_heads: int = 64, index_dim: int = 128) -> float:
    """The factor ``dI^-0.5 · HI^-0.5`` folded into the indexer head weights (SPEC §7.2).

    ``weights = linear(x, weights_proj) * indexer_scale()``; equal to [HF]'s
    ``relu(s)·dI^-0.5`` times ``w·HI^-0.5`` and [LCPP]'s ``w / sqrt(dI·HI)``.

    >>> indexer_scale()
    0.011048543456039806
    """
    op = "indexer_scale"
    C.check_int(op, "index_heads", index_heads, minimum=1)
    C.check_int(op, "index_dim", index_dim, minimum=1)
    # same evaluation order as [OFF]: softmax_scale = dI**-0.5, then * HI**-0.5
    return index_dim**-0.5 * index_heads**-0.5
