"""Reference FP8 / FP4 block quantisation, Hadamard rotation and block-scaled GEMMs (SPEC §4).

Everything is fp32 math on any device. The FP4 encoder rounds to nearest, ties to even code
(SPEC §15 #16); the FP8 encoder is torch's e4m3fn cast (round-to-nearest-even) after clamping to
±448, so values and scale bytes are bit-exact against DeepSeek's TileLang kernels.
"""
from __future__ import annotations

import functools

import torch

from ..._registry import register_kernel

FP8_MAX = 448.0
FP4_MAX = 6.0
#: smallest block amax for FP8 (SPEC §4.3) and FP4 (6 * 2^-126, SPEC §4.4)
FP8_AMAX_MIN = 1e-4
FP4_AMAX_MIN = 6.0 * 2.0**-126

#: e2m1 code -> value, codes 0..15 (bit 3 = sign)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def scale_f32(s: torch.Tensor) -> torch.Tensor:
    """Block scales as fp32; an infinite scale (not representable in UE8M0) is treated as NaN, so
    every output it scales is NaN whatever the data (docs/numerics.md)."""
    s = s.float()
    return torch.where(torch.isinf(s), float("nan"), s)



@functools.cache
def _fp4_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)


def pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Power-of-two scale ``2^ceil(log2(amax / qmax))`` computed on the fp32 bits (SPEC §4.2).

    ``amax / qmax`` is evaluated as ``amax * fp32(1 / qmax)`` like the released kernels.
    """
    f = amax.float() * torch.tensor(1.0 / qmax, dtype=torch.float32)
    bits = f.view(torch.int32)
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    k = exp - 127 + (mant != 0).to(torch.int32)
    return torch.ldexp(torch.ones_like(f), k.float())


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def _fp8_scales(xb: torch.Tensor, round_scale: bool) -> torch.Tensor:
    amax = xb.abs().amax(-1).clamp_min(FP8_AMAX_MIN)
    if round_scale:
        return pow2_scale(amax, FP8_MAX)
    return amax * torch.tensor(1.0 / FP8_MAX, dtype=torch.float32)


def fp8_encode(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> e4m3fn with saturation to ±448 (round to nearest even)."""
    return v.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp4_encode(v: torch.Tensor) -> torch.Tensor:
    """fp32 values (already divided by the scale) -> e2m1 codes 0..15 as uint8 (RNE, saturating).

    The e2m1 grid is uniform per range: step 0.5 on [0, 2), 1 on [2, 4), 2 on [4, 6], so rounding
    to nearest with ties to even *grid multiple* (``torch.round``) is ties-to-even-code.
    """
    a = v.abs().clamp_max(FP4_MAX)
    q = torch.where(a < 2, torch.round(a * 2) * 0.5, torch.where(a < 4, torch.round(a), torch.round(a * 0.5) * 2))
    code = torch.where(q < 2, q * 2, torch.where(q < 4, q + 2, q * 0.5 + 4)).to(torch.uint8)
    return code | (torch.signbit(v).to(torch.uint8) << 3)


def fp4_decode(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes 0..15 -> fp32 values."""
    return _fp4_table(codes.device)[codes.long()]


def fp4_pack(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes; element 2i in the low nibble, 2i+1 in the high nibble."""
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (c[..., 0] | (c[..., 1] << 4)).to(torch.uint8)


def fp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] codes."""
    p = packed.view(torch.uint8)
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


# --------------------------------------------------------------------------------------------
# FP8 activations (SPEC §4.3)
# --------------------------------------------------------------------------------------------


@register_kernel("reference", "act_quant")
def act_quant(x: torch.Tensor, block_size: int, round_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xb = _blocks(x, block_size)
    s = _fp8_scales(xb, round_scale)
    q = fp8_encode(xb / s.unsqueeze(-1))
    return q.reshape(x.shape), s


@register_kernel("reference", "act_quant_roundtrip")
def act_quant_roundtrip(x: torch.Tensor, block_size: int, round_scale: bool) -> torch.Tensor:
    xb = _blocks(x, block_size)
    s = _fp8_scales(xb, round_scale).unsqueeze(-1)
    y = fp8_encode(xb / s).float() * s
    return y.reshape(x.shape).to(x.dtype)


@register_kernel("reference", "act_dequant")
def act_dequant(y: torch.Tensor, scales: torch.Tensor, block_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    yb = _blocks(y, block_size)
    return (yb * scale_f32(scales).unsqueeze(-1)).reshape(y.shape).to(out_dtype)


# --------------------------------------------------------------------------------------------
# FP4 activations (SPEC §4.4)
# --------------------------------------------------------------------------------------------


def _fp4_scales(xb: torch.Tensor) -> torch.Tensor:
    return pow2_scale(xb.abs().amax(-1).clamp_min(FP4_AMAX_MIN), FP4_MAX)


@register_kernel("reference", "fp4_act_quant")
def fp4_act_quant(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    xb = _blocks(x, block_size)
    s = _fp4_scales(xb)
    codes = fp4_encode(xb / s.unsqueeze(-1)).reshape(x.shape)
    return fp4_pack(codes), s


@register_kernel("reference", "fp4_act_roundtrip")
def fp4_act_roundtrip(x: torch.Tensor, block_size: int) -> torch.Tensor:
    xb = _blocks(x, block_size)
    s = _fp4_scales(xb).unsqueeze(-1)
    y = fp4_decode(fp4_encode(xb / s)) * s
    return y.reshape(x.shape).to(x.dtype)


@register_kernel("reference", "fp4_act_dequant")
def fp4_act_dequant(packed: torch.Tensor, scales: torch.Tensor, block_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    v = fp4_decode(fp4_unpack(packed))
    vb = v.reshape(*v.shape[:-1], v.shape[-1] // block_size, block_size)
    return (vb * scale_f32(scales).unsqueeze(-1)).reshape(v.shape).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Hadamard rotation (SPEC §4.5)
# --------------------------------------------------------------------------------------------


@functools.cache
def hadamard_matrix(n: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Sylvester Hadamard matrix of order ``n`` (natural order, entries ±1), fp32."""
    h = torch.ones(1, 1, dtype=torch.float32, device=device)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


@register_kernel("reference", "hadamard_transform")
def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    h = hadamard_matrix(n, x.device)
    return ((x.float() @ h) * (n**-0.5)).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Block-scaled GEMMs (SPEC §4.6, §4.7)
# --------------------------------------------------------------------------------------------


@register_kernel("reference", "fp8_gemm")
def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    # One fp32 partial product per 128-wide K tile, promoted with both scales into an fp32
    # accumulator (the "promotion every 128 K" of the released kernel).
    m, k = a.shape
    n = b.shape[0]
    af, bf = a.float(), b.float()
    asf, bsf = scale_f32(a_s), scale_f32(b_s)
    bs_rows = bsf.repeat_interleave(128, dim=0)[:n]  # [N, ceil(K/128)]
    acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    for t in range((k + 127) // 128):
        sl = slice(t * 128, min(k, (t + 1) * 128))
        p = af[:, sl] @ bf[:, sl].T
        acc += p * asf[:, t : t + 1] * bs_rows[:, t].unsqueeze(0)
    return acc.to(out_dtype)


@register_kernel("reference", "fp4_gemm")
def fp4_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    # fp32 partial sums per 32-wide K slice, each scaled by a_s[m, k/128] * b_s[n, k/32].
    m, k = a.shape
    n = b.shape[0]
    af = a.float()
    bf = fp4_decode(fp4_unpack(b))  # [N, K]
    asf, bsf = scale_f32(a_s), scale_f32(b_s)
    acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    for t in range(k // 32):
        sl = slice(t * 32, (t + 1) * 32)
        p = af[:, sl] @ bf[:, sl].T
        acc += p * asf[:, t // 4 : t // 4 + 1] * bsf[:, t].unsqueeze(0)
    return acc.to(out_dtype)
