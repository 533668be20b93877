"""Sparse attention with a per-head attention sink over a shared K = V cache, the 584-byte FP8
KV-cache row format and the grouped low-rank output projection (SPEC §9, §13.1).
"""
from __future__ import annotations

import math

import torch

from ... import _checks as C
from ..._registry import declare_op
from .. import _autograd
from . import reference as _reference  # noqa: F401  (registers the reference kernels)
from .backward import sparse_attn_math
from .reference import KV_DIM, PACKED_DIM

__all__ = ["sparse_attn", "pack_kv_fp8", "unpack_kv_fp8", "grouped_linear"]

#: default ``softmax_scale`` of V4: 512^-0.5 (SPEC §9.1); in general ``head_dim^-0.5``
DEFAULT_SOFTMAX_SCALE = KV_DIM**-0.5


# ----------------------------------------------------------------------------- fake kernels
def _fake_sparse_attn(q, kv, attn_sink, topk_idxs, softmax_scale):
    return torch.empty_like(q)


def _fake_pack(kv):
    return kv.new_empty((*kv.shape[:-1], PACKED_DIM), dtype=torch.uint8)


def _fake_unpack(packed, out_dtype):
    return torch.empty((*packed.shape[:-1], KV_DIM), dtype=out_dtype, device=packed.device)


def _fake_grouped_linear(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[1]))


def _dtname(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# ----------------------------------------------------------------------------- checks
# One function per op over its schema arguments (docs/op_contracts.md): it runs inside the custom
# op (``torch.ops.v4k.<op>``) and once in the public function, before any work.
def _check_sparse_attn(q, kv, attn_sink, topk_idxs, softmax_scale) -> None:
    op = "sparse_attn"
    C.check_tensor(op, "q", q, ndim=4, dtypes=C.FLOAT_DTYPES)
    b, m, h, d = q.shape
    if d < 1:
        raise ValueError(f"{op}: q.shape[3] (head dim) must be >= 1, got shape {list(q.shape)}")
    C.check_tensor(op, "kv", kv, ndim=3)
    if kv.dtype == torch.uint8:
        if d != KV_DIM:
            raise ValueError(
                f"{op}: packed FP8 kv rows ({PACKED_DIM} B) hold V4's {KV_DIM}-dim heads only; got head dim {d} "
                f"(q shape {list(q.shape)}); pass kv in q.dtype for other head dims"
            )
        C.check_tensor(op, "kv", kv, shape=[b, None, PACKED_DIM])
    elif kv.dtype == q.dtype:
        C.check_tensor(op, "kv", kv, shape=[b, None, d])
    else:
        raise TypeError(
            f"{op}: kv must have dtype {_dtname(q.dtype)} (same as q) or uint8 (packed FP8 rows), "
            f"got {_dtname(kv.dtype)}"
        )
    n = kv.shape[1]
    C.check_tensor(op, "attn_sink", attn_sink, dtypes=C.FLOAT_DTYPES, shape=[h])
    C.check_tensor(op, "topk_idxs", topk_idxs, ndim=3, dtypes=C.INDEX_DTYPES)
    C.check_tensor(op, "topk_idxs", topk_idxs, shape=[b, m, None])
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not math.isfinite(softmax_scale):
        raise TypeError(f"{op}: softmax_scale must be a finite float, got {type(softmax_scale).__name__} {softmax_scale!r}")
    C.check_same_device(op, q=q, kv=kv, attn_sink=attn_sink, topk_idxs=topk_idxs)


def _check_sparse_attn_indices(q, kv, attn_sink, topk_idxs, softmax_scale) -> None:
    C.check_index_range("sparse_attn", "topk_idxs", topk_idxs, kv.shape[1])


def _check_pack_kv_fp8(kv) -> None:
    op = "pack_kv_fp8"
    C.check_tensor(op, "kv", kv, dtypes=C.FLOAT_DTYPES)
    if kv.dim() == 0 or kv.shape[-1] != KV_DIM:
        raise ValueError(f"{op}: kv must have shape [..., {KV_DIM}], got {list(kv.shape)}")


def _check_unpack_kv_fp8(packed, out_dtype) -> None:
    op = "unpack_kv_fp8"
    C.check_tensor(op, "packed", packed, dtypes=(torch.uint8,))
    if packed.dim() == 0 or packed.shape[-1] != PACKED_DIM:
        raise ValueError(f"{op}: packed must have shape [..., {PACKED_DIM}], got {list(packed.shape)}")
    C.check_value(op, "out_dtype", out_dtype, out_dtype in C.FLOAT_DTYPES, "torch.bfloat16/float16/float32")


def _check_grouped_linear(x, weight) -> None:
    op = "grouped_linear"
    C.check_tensor(op, "x", x, ndim=4, dtypes=C.FLOAT_DTYPES)
    C.check_tensor(op, "weight", weight, ndim=3, dtypes=C.FLOAT_DTYPES)
    g, din = x.shape[2], x.shape[3]
    C.check_dim(op, "weight", weight, 0, g, "G = x.shape[2]")
    C.check_dim(op, "weight", weight, 2, din, "Din = x.shape[3]")
    C.check_same_device(op, x=x, weight=weight)


_sparse_attn = declare_op(
    "attention",
    "sparse_attn",
    "(Tensor q, Tensor kv, Tensor attn_sink, Tensor topk_idxs, float softmax_scale) -> Tensor",
    _fake_sparse_attn,
    check=_check_sparse_attn,
    value_check=_check_sparse_attn_indices,
    memoize_checks=True,
    autograd=_autograd.recompute_backward(sparse_attn_math, (0, 1, 2)),
)
_pack_kv_fp8 = declare_op("attention", "pack_kv_fp8", "(Tensor kv) -> Tensor", _fake_pack, check=_check_pack_kv_fp8)
_unpack_kv_fp8 = declare_op("attention", "unpack_kv_fp8", "(Tensor packed, ScalarType out_dtype) -> Tensor", _fake_unpack,
                            check=_check_unpack_kv_fp8)
_grouped_linear = declare_op("attention", "grouped_linear", "(Tensor x, Tensor weight) -> Tensor", _fake_grouped_linear,
                             check=_check_grouped_linear)


# ----------------------------------------------------------------------------- sparse attention
def sparse_attn(
    q: torch.Tensor,
    kv: torch.Tensor,
    attn_sink: torch.Tensor,
    topk_idxs: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Sparse attention over an index list with a per-head attention sink (SPEC §9.1–9.2).

    For every batch ``b``, query ``i`` and head ``h``, with ``I`` the entries of
    ``topk_idxs[b, i]`` that are not −1 (duplicates count as many times as they appear)::

        s_k = softmax_scale · <q[b,i,h], kv[b, k]>          (all head dims, fp32)
        mx  = max_{k∈I} s_k
        o   = Σ_{k∈I} exp(s_k − mx) · kv[b, k] / (Σ_{k∈I} exp(s_k − mx) + exp(attn_sink[h] − mx))

    K and V are the same tensor; the sink is a virtual key with a zero value vector, so it only
    enlarges the denominator. Rows whose index list is all −1 (or empty) give zeros, never NaN.
    There is no mask beyond the index list. Prefill (``M > 1``) and decode (``M == 1``) share
    this entry point. Any head dim ``hd`` is accepted (V4: 512; the packed FP8 rows only exist
    for 512).

    Parameters
    ----------
    q : [B, M, H, hd] bf16/fp16/fp32
    kv : [B, N, hd] same dtype as ``q``, **or** (``hd == 512`` only) [B, N, 584] uint8 rows in
        the :func:`pack_kv_fp8` layout (dequantised on the fly)
    attn_sink : [H] fp32 per-head sink logits (bf16/fp16 are upcast)
    topk_idxs : [B, M, K] int32 (int64 accepted and narrowed) row numbers into ``kv[b]``;
        −1 = skip. Any ``K`` >= 0 (not only multiples of 64).
    softmax_scale : logit scale; default ``hd**-0.5`` (V4: ``512**-0.5``)

    Returns
    -------
    o : [B, M, H, hd] ``q.dtype`` (fp32 math, one rounding)

    Notes
    -----
    Indices must lie in ``[-1, N)``. The range is verified by reading ``topk_idxs`` when the
    tensors are on the CPU, or on any device under ``V4K_CHECKS=full`` (off on accelerators by
    default, to avoid a device synchronisation; ``V4K_CHECKS=off`` disables it everywhere).

    Example
    -------
    >>> import torch, v4kernels
    >>> q = torch.randn(1, 2, 4, 512, dtype=torch.bfloat16)
    >>> kv = torch.randn(1, 10, 512, dtype=torch.bfloat16)
    >>> idx = torch.tensor([[[0, 3, 7, -1], [-1, -1, -1, -1]]], dtype=torch.int32)
    >>> o = v4kernels.sparse_attn(q, kv, torch.zeros(4), idx)
    >>> o.shape, o.dtype, bool(o[0, 1].eq(0).all())
    (torch.Size([1, 2, 4, 512]), torch.bfloat16, True)
    """
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5 if isinstance(q, torch.Tensor) and q.dim() == 4 else DEFAULT_SOFTMAX_SCALE
    key = _sparse_attn.validate(q, kv, attn_sink, topk_idxs, softmax_scale)
    if key not in _sparse_attn.plain:
        if q.numel() == 0:
            return torch.empty_like(q)
        if topk_idxs.shape[2] == 0 or kv.shape[1] == 0:
            # No key can be selected (every entry of a non-empty list must then be -1): all zeros.
            return torch.zeros_like(q)
        if attn_sink.dtype is torch.float32 and topk_idxs.dtype is torch.int32:
            _sparse_attn.remember_plain(key)
        else:
            attn_sink, topk_idxs = attn_sink.float(), topk_idxs.int()
    return _sparse_attn.run_as(
        key, q.contiguous(), kv.contiguous(), attn_sink.contiguous(), topk_idxs.contiguous(), float(softmax_scale)
    )


# ----------------------------------------------------------------------------- FP8 KV rows
def pack_kv_fp8(kv: torch.Tensor) -> torch.Tensor:
    """Pack 512-dim KV rows into the 584-byte FP8 cache layout (SPEC §13.1).

    Byte layout of each row:

    ========== ===========================================================================
    0 .. 447   nope dims ``kv[..., :448]`` as float8_e4m3fn, seven blocks of 64 values, each
               quantised like ``act_quant(block_size=64, scale_fmt="ue8m0")``
               (``amax = max(|x|, 1e-4)``, power-of-two scale, SPEC §4.2–4.3)
    448 .. 575 rope dims ``kv[..., 448:]`` as 64 bf16 values, little endian (exact for bf16 input,
               round-to-nearest-even for fp16/fp32 input)
    576 .. 582 the seven block scales as UE8M0 bytes (``log2(scale) + 127``)
    583        zero padding
    ========== ===========================================================================

    ``unpack_kv_fp8(pack_kv_fp8(kv))`` equals ``act_quant_roundtrip(kv[..., :448], 64)`` on the
    nope dims and ``kv[..., 448:]`` on the rope dims (for bf16 ``kv``), i.e. exactly the values the
    released model attends over.

    Parameters
    ----------
    kv : [..., 512] bf16/fp16/fp32

    Returns
    -------
    packed : [..., 584] uint8

    Example
    -------
    >>> import torch, v4kernels
    >>> p = v4kernels.pack_kv_fp8(torch.ones(2, 512, dtype=torch.bfloat16))
    >>> p.shape, p.dtype, p[0, 576:].tolist()
    (torch.Size([2, 584]), torch.uint8, [119, 119, 119, 119, 119, 119, 119, 0])
    """
    _check_pack_kv_fp8(kv)
    if kv.numel() == 0:
        return _fake_pack(kv)
    return _pack_kv_fp8(kv.contiguous())


def unpack_kv_fp8(packed: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Decode 584-byte FP8 KV rows (the :func:`pack_kv_fp8` layout) into 512-dim rows (SPEC §13.1).

    Nope dims are ``e4m3 · 2^(scale_byte − 127)`` (a scale byte 0xFF is UE8M0 NaN), rope dims
    are the stored bf16 values; both are exact in bf16 and fp32.

    Parameters
    ----------
    packed : [..., 584] uint8
    out_dtype : bf16 (default) / fp16 / fp32

    Returns
    -------
    kv : [..., 512] ``out_dtype``

    Example
    -------
    >>> import torch, v4kernels
    >>> kv = torch.randn(3, 512, dtype=torch.bfloat16)
    >>> back = v4kernels.unpack_kv_fp8(v4kernels.pack_kv_fp8(kv))
    >>> bool(torch.equal(back[:, 448:], kv[:, 448:]))
    True
    """
    _check_unpack_kv_fp8(packed, out_dtype)
    if packed.numel() == 0:
        return _fake_unpack(packed, out_dtype)
    return _unpack_kv_fp8(packed.contiguous(), out_dtype)


# ----------------------------------------------------------------------------- output projection
def grouped_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-group linear map ``y[b,s,g] = weight[g] · x[b,s,g]`` (SPEC §9.4).

    The grouped low-rank output projection ``wo_a`` of V4: the attention output
    ``[B,S,H,512]`` viewed as ``[B,S,G,(H/G)·512]`` (heads ``g·H/G … (g+1)·H/G − 1`` in group
    ``g``) times ``wo_a`` viewed as ``[G, o_lora, (H/G)·512]`` (Flash: G=8, 4096 → 1024; Pro:
    G=16). A batched GEMM with a block-diagonal weight; fp32 accumulation, one rounding.
    An FP8 checkpoint weight must be dequantised with its block scales first (SPEC §15 #12).

    Parameters
    ----------
    x : [B, S, G, Din] bf16/fp16/fp32
    weight : [G, Dout, Din] bf16/fp16/fp32 (may differ from ``x.dtype``)

    Returns
    -------
    y : [B, S, G, Dout] ``x.dtype``

    Example
    -------
    >>> import torch, v4kernels
    >>> x = torch.ones(1, 1, 2, 3)
    >>> w = torch.stack([torch.eye(3)[:2], 2 * torch.eye(3)[:2]])
    >>> v4kernels.grouped_linear(x, w)
    tensor([[[[1., 1.],
              [2., 2.]]]])
    """
    _check_grouped_linear(x, weight)
    if x.numel() == 0 or weight.numel() == 0:
        # Empty output, or Din == 0: an empty sum is zero.
        return torch.zeros((*x.shape[:-1], weight.shape[1]), dtype=x.dtype, device=x.device)
    return _grouped_linear(x.contiguous(), weight.contiguous())

