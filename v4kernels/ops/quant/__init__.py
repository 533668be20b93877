"""Number formats of DeepSeek-V4: FP8 e4m3 and FP4 e2m1 block quantisation with power-of-two
(UE8M0) scales, the 128-point Hadamard rotation and block-scaled FP8/FP4 GEMMs (SPEC §4).
"""
from __future__ import annotations

import torch

from ... import _checks as C
from ..._registry import declare_op
from . import reference as _reference  # noqa: F401  (registers the reference kernels)

__all__ = [
    "act_quant",
    "act_dequant",
    "act_quant_roundtrip",
    "fp4_act_quant",
    "fp4_act_dequant",
    "fp4_act_roundtrip",
    "hadamard_transform",
    "fp8_gemm",
    "fp4_gemm",
]

_SCALE_DTYPES = (torch.float32, torch.float8_e8m0fnu)


# ----------------------------------------------------------------------------- fake kernels
def _fake_act_quant(x, block_size, round_scale):
    return (
        torch.empty_like(x, dtype=torch.float8_e4m3fn),
        x.new_empty((*x.shape[:-1], x.shape[-1] // block_size), dtype=torch.float32),
    )


def _fake_roundtrip(x, block_size, *rest):
    return torch.empty_like(x)


def _fake_dequant(y, scales, block_size, out_dtype):
    return torch.empty(y.shape, dtype=out_dtype, device=y.device)


def _fake_fp4_quant(x, block_size):
    return (
        x.new_empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8),
        x.new_empty((*x.shape[:-1], x.shape[-1] // block_size), dtype=torch.float32),
    )


def _fake_fp4_dequant(packed, scales, block_size, out_dtype):
    return torch.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=out_dtype, device=packed.device)


def _fake_gemm(a, a_s, b, b_s, out_dtype):
    return torch.empty((a.shape[0], b.shape[0]), dtype=out_dtype, device=a.device)


# ----------------------------------------------------------------------------- checks
def _check_block_input(op: str, x: torch.Tensor, block_size: int) -> None:
    C.check_tensor(op, "x", x, dtypes=C.FLOAT_DTYPES)
    C.check_int(op, "block_size", block_size, minimum=1)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least 1 dim, got a scalar")
    if x.shape[-1] % block_size != 0:
        raise ValueError(
            f"{op}: x.shape[-1] must be a multiple of block_size={block_size}, got {x.shape[-1]} (shape {list(x.shape)})"
        )


def _check_scales(op: str, scales: torch.Tensor, expected: list[int]) -> None:
    C.check_tensor(op, "scales", scales, dtypes=_SCALE_DTYPES, shape=expected)


def _check_act_quant(x, block_size, round_scale) -> None:
    _check_block_input("act_quant", x, block_size)
    C.check_bool("act_quant", "round_scale", round_scale)


def _check_act_quant_roundtrip(x, block_size, round_scale) -> None:
    _check_block_input("act_quant_roundtrip", x, block_size)
    C.check_bool("act_quant_roundtrip", "round_scale", round_scale)


def _check_act_dequant(y, scales, block_size, out_dtype) -> None:
    op = "act_dequant"
    C.check_tensor(op, "y", y, dtypes=C.FP8_DTYPES)
    C.check_int(op, "block_size", block_size, minimum=1)
    if y.dim() == 0 or y.shape[-1] % block_size:
        raise ValueError(f"{op}: y.shape[-1] must be a multiple of block_size={block_size}, got shape {list(y.shape)}")
    _check_scales(op, scales, [*y.shape[:-1], y.shape[-1] // block_size])
    C.check_same_device(op, y=y, scales=scales)
    C.check_value(op, "out_dtype", out_dtype, out_dtype in C.FLOAT_DTYPES, "bf16/fp16/fp32")


def _check_fp4_act_quant(x, block_size) -> None:
    op = "fp4_act_quant"
    _check_block_input(op, x, block_size)
    if x.shape[-1] % 2:
        raise ValueError(f"{op}: x.shape[-1] must be even to pack two codes per byte, got {x.shape[-1]}")


def _check_fp4_act_roundtrip(x, block_size) -> None:
    _check_block_input("fp4_act_roundtrip", x, block_size)


def _check_fp4_act_dequant(packed, scales, block_size, out_dtype) -> None:
    op = "fp4_act_dequant"
    C.check_tensor(op, "packed", packed, dtypes=(torch.uint8, torch.int8, torch.float4_e2m1fn_x2))
    C.check_int(op, "block_size", block_size, minimum=1)
    if packed.dim() == 0 or (packed.shape[-1] * 2) % block_size:
        raise ValueError(f"{op}: 2*packed.shape[-1] must be a multiple of block_size={block_size}, got shape {list(packed.shape)}")
    _check_scales(op, scales, [*packed.shape[:-1], packed.shape[-1] * 2 // block_size])
    C.check_same_device(op, packed=packed, scales=scales)
    C.check_value(op, "out_dtype", out_dtype, out_dtype in C.FLOAT_DTYPES, "bf16/fp16/fp32")


def _check_hadamard_transform(x) -> None:
    op = "hadamard_transform"
    C.check_tensor(op, "x", x, dtypes=C.FLOAT_DTYPES)
    n = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or n < 1 or n & (n - 1):
        raise ValueError(f"{op}: x.shape[-1] must be a power of two, got shape {list(x.shape)}")


def _check_gemm_a(op: str, a: torch.Tensor, a_s: torch.Tensor) -> tuple[int, int]:
    C.check_tensor(op, "a", a, ndim=2, dtypes=C.FP8_DTYPES)
    m, k = a.shape
    C.check_tensor(op, "a_s", a_s, dtypes=_SCALE_DTYPES, shape=[m, (k + 127) // 128])
    return m, k


def _check_fp8_gemm(a, a_s, b, b_s, out_dtype) -> None:
    op = "fp8_gemm"
    m, k = _check_gemm_a(op, a, a_s)
    C.check_tensor(op, "b", b, ndim=2, dtypes=C.FP8_DTYPES)
    C.check_dim(op, "b", b, 1, k, "K of a")
    n = b.shape[0]
    C.check_tensor(op, "b_s", b_s, dtypes=_SCALE_DTYPES, shape=[(n + 127) // 128, (k + 127) // 128])
    C.check_same_device(op, a=a, a_s=a_s, b=b, b_s=b_s)
    C.check_value(op, "out_dtype", out_dtype, out_dtype in C.FLOAT_DTYPES, "bf16/fp16/fp32")


def _check_fp4_gemm(a, a_s, b, b_s, out_dtype) -> None:
    op = "fp4_gemm"
    m, k = _check_gemm_a(op, a, a_s)
    if k % 32:
        raise ValueError(f"{op}: K = a.shape[1] must be a multiple of 32, got {k}")
    C.check_tensor(op, "b", b, ndim=2, dtypes=(torch.uint8, torch.int8, torch.float4_e2m1fn_x2))
    C.check_dim(op, "b", b, 1, k // 2, "K/2 packed bytes")
    n = b.shape[0]
    C.check_tensor(op, "b_s", b_s, dtypes=_SCALE_DTYPES, shape=[n, k // 32])
    C.check_same_device(op, a=a, a_s=a_s, b=b, b_s=b_s)
    C.check_value(op, "out_dtype", out_dtype, out_dtype in C.FLOAT_DTYPES, "bf16/fp16/fp32")


_act_quant = declare_op("quant", "act_quant", "(Tensor x, int block_size, bool round_scale) -> (Tensor, Tensor)", _fake_act_quant,
                        check=_check_act_quant)
_act_quant_roundtrip = declare_op(
    "quant", "act_quant_roundtrip", "(Tensor x, int block_size, bool round_scale) -> Tensor", _fake_roundtrip,
    check=_check_act_quant_roundtrip, memoize_checks=True,
)
_act_dequant = declare_op(
    "quant", "act_dequant", "(Tensor y, Tensor scales, int block_size, ScalarType out_dtype) -> Tensor", _fake_dequant,
    check=_check_act_dequant,
)
_fp4_act_quant = declare_op("quant", "fp4_act_quant", "(Tensor x, int block_size) -> (Tensor, Tensor)", _fake_fp4_quant,
                            check=_check_fp4_act_quant)
_fp4_act_roundtrip = declare_op("quant", "fp4_act_roundtrip", "(Tensor x, int block_size) -> Tensor", _fake_roundtrip,
                                check=_check_fp4_act_roundtrip)
_fp4_act_dequant = declare_op(
    "quant", "fp4_act_dequant", "(Tensor packed, Tensor scales, int block_size, ScalarType out_dtype) -> Tensor", _fake_fp4_dequant,
    check=_check_fp4_act_dequant,
)
_hadamard = declare_op("quant", "hadamard_transform", "(Tensor x) -> Tensor", lambda x: torch.empty_like(x),
                       check=_check_hadamard_transform)
_fp8_gemm = declare_op("quant", "fp8_gemm", "(Tensor a, Tensor a_s, Tensor b, Tensor b_s, ScalarType out_dtype) -> Tensor", _fake_gemm,
                      check=_check_fp8_gemm, memoize_checks=True)
_fp4_gemm = declare_op("quant", "fp4_gemm", "(Tensor a, Tensor a_s, Tensor b, Tensor b_s, ScalarType out_dtype) -> Tensor", _fake_gemm,
                      check=_check_fp4_gemm, memoize_checks=True)



# ----------------------------------------------------------------------------- FP8
def act_quant(
    x: torch.Tensor,
    block_size: int = 128,
    scale_fmt: str | None = "ue8m0",
    scale_dtype: torch.dtype = torch.float32,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """FP8 e4m3 block quantisation along the last axis (SPEC §4.3).

    Per row and per block of ``block_size`` elements: ``amax = max(|x|, 1e-4)``; the scale is
    ``2^ceil(log2(amax/448))`` when ``scale_fmt="ue8m0"`` (the release setting) or ``amax/448``
    when ``scale_fmt=None``; ``q = e4m3(clamp(x / s, ±448))``.

    Parameters
    ----------
    x : [..., N] bf16/fp16/fp32, ``N % block_size == 0``
    block_size : 128 for GEMM inputs, 64 for the KV-cache nope dims
    scale_fmt : "ue8m0" (power-of-two scales) or None (plain amax/448)
    scale_dtype : torch.float32 or torch.float8_e8m0fnu (only with power-of-two scales)
    inplace : QAT simulation: overwrite ``x`` with ``dequant(quant(x))`` and return ``x``

    Returns
    -------
    (y [..., N] float8_e4m3fn, scales [..., N/block_size] scale_dtype), or ``x`` when inplace.

    Example
    -------
    >>> import torch, v4kernels
    >>> y, s = v4kernels.act_quant(torch.randn(4, 256, dtype=torch.bfloat16))
    >>> y.dtype, s.shape
    (torch.float8_e4m3fn, torch.Size([4, 2]))
    """
    op = "act_quant"
    C.check_value(op, "scale_fmt", scale_fmt, scale_fmt in (None, "ue8m0"), "'ue8m0' or None")
    C.check_value(op, "scale_dtype", scale_dtype, scale_dtype in _SCALE_DTYPES, "torch.float32 or torch.float8_e8m0fnu")
    C.check_bool(op, "inplace", inplace)
    if scale_dtype == torch.float8_e8m0fnu and scale_fmt is None:
        raise ValueError(f"{op}: scale_dtype=float8_e8m0fnu needs power-of-two scales (scale_fmt='ue8m0'), got scale_fmt=None")
    _check_act_quant(x, block_size, scale_fmt is not None)
    round_scale = scale_fmt is not None
    if inplace:
        if x.numel():
            x.copy_(_act_quant_roundtrip(x.contiguous(), block_size, round_scale))
        return x
    if x.numel() == 0:
        return _fake_act_quant(x, block_size, round_scale)[0], x.new_empty((*x.shape[:-1], x.shape[-1] // block_size), dtype=scale_dtype)
    q, s = _act_quant(x.contiguous(), block_size, round_scale)
    return q, s.to(scale_dtype)


def act_quant_roundtrip(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = "ue8m0") -> torch.Tensor:
    """``act_dequant(*act_quant(x))`` in ``x.dtype`` without materialising FP8: the QAT
    simulation applied to window KV and compressed KV (block 64) in V4 (SPEC §4.3, §5.3).

    x : [..., N] bf16/fp16/fp32 -> [..., N] same dtype.

    >>> import torch, v4kernels
    >>> v4kernels.act_quant_roundtrip(torch.ones(1, 64), 64).unique()
    tensor([1.])
    """
    C.check_value("act_quant_roundtrip", "scale_fmt", scale_fmt, scale_fmt in (None, "ue8m0"), "'ue8m0' or None")
    key = _act_quant_roundtrip.validate(x, block_size, scale_fmt is not None)
    if x.numel() == 0:
        return torch.empty_like(x)
    return _act_quant_roundtrip.run_as(key, x.contiguous(), block_size, scale_fmt is not None)


def act_dequant(y: torch.Tensor, scales: torch.Tensor, block_size: int = 128, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of :func:`act_quant`: ``y [..., N] e4m3`` times ``scales [..., N/block]`` -> ``out_dtype``.

    >>> import torch, v4kernels
    >>> x = torch.tensor([[1.0, -2.0, 0.5, 3.0] * 32])   # all on the e4m3 grid: exact round trip
    >>> bool(torch.equal(v4kernels.act_dequant(*v4kernels.act_quant(x), out_dtype=torch.float32), x))
    True
    """
    _check_act_dequant(y, scales, block_size, out_dtype)
    if y.numel() == 0:
        return torch.empty(y.shape, dtype=out_dtype, device=y.device)
    return _act_dequant(y.contiguous(), scales.contiguous(), block_size, out_dtype)


# ----------------------------------------------------------------------------- FP4
def fp4_act_quant(x: torch.Tensor, block_size: int = 32, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """FP4 e2m1 block quantisation with power-of-two scales (SPEC §4.4).

    ``amax = max(|x|, 6·2^-126)``, ``s = 2^ceil(log2(amax/6))``, ``q = e2m1(clamp(x/s, ±6))``
    rounded to nearest, ties to the even code. Codes are packed two per byte along the last
    axis (element ``2i`` in the low nibble).

    Parameters
    ----------
    x : [..., N] bf16/fp16/fp32, ``N`` even and ``N % block_size == 0``
    block_size : 32 in V4 (indexer queries and keys)
    inplace : QAT simulation: overwrite ``x`` with the dequantised values and return ``x``

    Returns
    -------
    (packed [..., N/2] uint8, scales [..., N/block_size] fp32), or ``x`` when inplace.

    >>> import torch, v4kernels
    >>> p, s = v4kernels.fp4_act_quant(torch.tensor([[0.5, -6.0] * 16]))
    >>> hex(int(p[0, 0])), float(s[0, 0])
    ('0xf1', 1.0)
    """
    C.check_bool("fp4_act_quant", "inplace", inplace)
    _check_fp4_act_quant(x, block_size)
    if inplace:
        if x.numel():
            x.copy_(_fp4_act_roundtrip(x.contiguous(), block_size))
        return x
    if x.numel() == 0:
        return _fake_fp4_quant(x, block_size)
    return _fp4_act_quant(x.contiguous(), block_size)


def fp4_act_roundtrip(x: torch.Tensor, block_size: int = 32) -> torch.Tensor:
    """``fp4_act_dequant(*fp4_act_quant(x))`` in ``x.dtype``: the indexer's FP4 QAT simulation.

    x : [..., N] -> [..., N] same dtype.

    >>> import torch, v4kernels
    >>> v4kernels.fp4_act_roundtrip(torch.tensor([[0.25, 0.75, 6.0] + [0.0] * 29]))[0, :3]
    tensor([0., 1., 6.])
    """
    _check_fp4_act_roundtrip(x, block_size)
    if x.numel() == 0:
        return torch.empty_like(x)
    return _fp4_act_roundtrip(x.contiguous(), block_size)


def fp4_act_dequant(packed: torch.Tensor, scales: torch.Tensor, block_size: int = 32, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Unpack e2m1 codes ``packed [..., N/2] uint8`` and apply ``scales [..., N/block]``.

    Accepts ``torch.float4_e2m1fn_x2`` as well as ``uint8``/``int8`` storage.

    >>> import torch, v4kernels
    >>> v4kernels.fp4_act_dequant(*v4kernels.fp4_act_quant(torch.full((1, 32), 3.0)), out_dtype=torch.float32).unique()
    tensor([3.])
    """
    _check_fp4_act_dequant(packed, scales, block_size, out_dtype)
    if packed.numel() == 0:
        return _fake_fp4_dequant(packed, scales, block_size, out_dtype)
    return _fp4_act_dequant(packed.contiguous().view(torch.uint8), scales.contiguous(), block_size, out_dtype)


# ----------------------------------------------------------------------------- Hadamard
def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x · H_n · n^-0.5`` along the last axis, ``H_n`` the Sylvester Hadamard matrix (SPEC §4.5).

    x : [..., n] bf16/fp16/fp32 with ``n`` a power of two (128 in V4) -> same shape and dtype.
    Computed in fp32, rounded once.

    >>> import torch, v4kernels
    >>> v4kernels.hadamard_transform(torch.eye(4))[0]
    tensor([0.5000, 0.5000, 0.5000, 0.5000])
    """
    _check_hadamard_transform(x)
    if x.numel() == 0:
        return torch.empty_like(x)
    return _hadamard(x.contiguous())


# ----------------------------------------------------------------------------- GEMMs
def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Block-scaled FP8 GEMM ``C = A · Bᵀ`` (SPEC §4.6).

    Parameters
    ----------
    a : [M, K] float8_e4m3fn activations, ``a_s`` [M, ceil(K/128)] scales (fp32 or e8m0)
    b : [N, K] float8_e4m3fn weight, ``b_s`` [ceil(N/128), ceil(K/128)] per 128x128 tile
    out_dtype : bf16 (default) / fp16 / fp32

    Returns
    -------
    c : [M, N] out_dtype; fp32 partial sums per 128-wide K tile, promoted with both scales.

    >>> import torch, v4kernels
    >>> a, a_s = v4kernels.act_quant(torch.randn(2, 128))
    >>> b, b_s = v4kernels.act_quant(torch.randn(128, 128))
    >>> v4kernels.fp8_gemm(a, a_s, b, b_s[:1, :1].clone()).shape
    torch.Size([2, 128])
    """
    key = _fp8_gemm.validate(a, a_s, b, b_s, out_dtype)
    (m, k), n = a.shape, b.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=out_dtype, device=a.device)
    return _fp8_gemm.run_as(key, a.contiguous(), a_s.contiguous(), b.contiguous(), b_s.contiguous(), out_dtype)


def fp4_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """FP8-activation × FP4-weight GEMM ``C = A · Bᵀ`` (SPEC §4.7).

    Parameters
    ----------
    a : [M, K] float8_e4m3fn, ``a_s`` [M, K/128]; ``K % 32 == 0``
    b : [N, K/2] packed e2m1 (uint8/int8/float4_e2m1fn_x2), ``b_s`` [N, K/32] scales
    out_dtype : bf16 (default) / fp16 / fp32

    Returns
    -------
    c : [M, N]; ``Σ_k A[m,k]·a_s[m,k/128] · B[n,k]·b_s[n,k/32]`` with fp32 sums per 32-wide K slice.

    >>> import torch, v4kernels
    >>> a, a_s = v4kernels.act_quant(torch.randn(2, 128))
    >>> b, b_s = v4kernels.fp4_act_quant(torch.randn(64, 128))
    >>> v4kernels.fp4_gemm(a, a_s, b, b_s).shape
    torch.Size([2, 64])
    """
    key = _fp4_gemm.validate(a, a_s, b, b_s, out_dtype)
    (m, k), n = a.shape, b.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=out_dtype, device=a.device)
    return _fp4_gemm.run_as(key, a.contiguous(), a_s.contiguous(), b.contiguous().view(torch.uint8), b_s.contiguous(),
                            out_dtype)
