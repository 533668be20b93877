"""Triton kernels for the number formats (SPEC §4): FP8/FP4 block quantisation, their
round-trips and dequantisers, the Hadamard rotation and the block-scaled FP8/FP4 GEMMs.

All codecs are integer bit operations from :mod:`v4kernels.triton_utils`, so quantised bytes and
scales are bit-exact against the reference on every target, the CPU interpreter included.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._registry import register_kernel
from ... import triton_utils as U
from ...triton_utils import (
    e2m1_decode,
    e2m1_encode,
    e4m3_decode,
    e4m3_encode,
    exp2_int,
    load_scale,
    pow2_scale_bits,
    store_out,
)

FP8_AMAX_MIN = 1e-4
FP4_AMAX_MIN = 6.0 * 2.0**-126


# --------------------------------------------------------------------------------------------
# FP8 block quantisation (SPEC §4.3): one quantisation block per row of a [rows, block] view
# --------------------------------------------------------------------------------------------


@triton.jit
def _act_quant_fwd_kernel(
    x_ptr, q_ptr, s_ptr, y_ptr, n_rows, block, inv_qmax,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ROUND_SCALE: tl.constexpr,
    ROUNDTRIP: tl.constexpr, OUT_KIND: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < block)
    offs = rows[:, None] * block + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
    if ROUND_SCALE:
        k = pow2_scale_bits(amax, inv_qmax)
        s = exp2_int(k)
        xs = x * exp2_int(-k)[:, None]  # x / 2^k, exact
    else:
        s = amax * inv_qmax
        xs = tl.div_rn(x, s[:, None])
    q = e4m3_encode(xs)
    if ROUNDTRIP:
        store_out(y_ptr + offs, e4m3_decode(q) * s[:, None], mask, OUT_KIND)
    else:
        tl.store(q_ptr + offs, q, mask=mask)
        tl.store(s_ptr + rows, s, mask=rows < n_rows)


def _rows_grid(n_rows: int, device: torch.device) -> tuple[int, int]:
    br = U.block_config("rows", device)["BLOCK_R"]
    return br, U.cdiv(n_rows, br)


def _act_quant_launch(x: torch.Tensor, block_size: int, round_scale: bool, roundtrip: bool):
    n_rows = x.numel() // block_size
    br, grid = _rows_grid(n_rows, x.device)
    bc = U.next_pow2(block_size)
    inv = float(torch.tensor(1.0 / U.FP8_MAX, dtype=torch.float32))
    if roundtrip:
        y = torch.empty_like(x)
        _act_quant_fwd_kernel[(grid,)](x, x, x, U.out_view(y), n_rows, block_size, inv, BLOCK_R=br, BLOCK_C=bc,
                                       ROUND_SCALE=round_scale, ROUNDTRIP=True, OUT_KIND=U.out_kind(x.dtype))
        return y
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((*x.shape[:-1], x.shape[-1] // block_size), dtype=torch.float32, device=x.device)
    _act_quant_fwd_kernel[(grid,)](x, U.as_u8(q), s, x, n_rows, block_size, inv, BLOCK_R=br, BLOCK_C=bc,
                                   ROUND_SCALE=round_scale, ROUNDTRIP=False, OUT_KIND=0)
    return q, s


@register_kernel("triton", "act_quant")
def act_quant(x: torch.Tensor, block_size: int, round_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _act_quant_launch(x, block_size, round_scale, roundtrip=False)


@register_kernel("triton", "act_quant_roundtrip")
def act_quant_roundtrip(x: torch.Tensor, block_size: int, round_scale: bool) -> torch.Tensor:
    return _act_quant_launch(x, block_size, round_scale, roundtrip=True)


@triton.jit
def _act_dequant_kernel(
    y_ptr, s_ptr, o_ptr, n_rows, block,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, S_UE8M0: tl.constexpr, OUT_KIND: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < block)
    offs = rows[:, None] * block + cols[None, :]
    v = e4m3_decode(tl.load(y_ptr + offs, mask=mask, other=0))
    s = load_scale(s_ptr + rows, rows < n_rows, S_UE8M0)
    store_out(o_ptr + offs, v * s[:, None], mask, OUT_KIND)


@register_kernel("triton", "act_dequant")
def act_dequant(y: torch.Tensor, scales: torch.Tensor, block_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    n_rows = y.numel() // block_size
    br, grid = _rows_grid(n_rows, y.device)
    out = torch.empty(y.shape, dtype=out_dtype, device=y.device)
    s, ue = U.scale_args(scales)
    _act_dequant_kernel[(grid,)](U.as_u8(y), s, U.out_view(out), n_rows, block_size, BLOCK_R=br,
                                 BLOCK_C=U.next_pow2(block_size), S_UE8M0=ue, OUT_KIND=U.out_kind(out_dtype))
    return out


# --------------------------------------------------------------------------------------------
# FP4 block quantisation (SPEC §4.4); even elements go to the low nibble
# --------------------------------------------------------------------------------------------


@triton.jit
def _fp4_quant_fwd_kernel(
    x_ptr, p_ptr, s_ptr, y_ptr, n_rows, block, inv_qmax,
    BLOCK_R: tl.constexpr, HALF_C: tl.constexpr, ROUNDTRIP: tl.constexpr, OUT_KIND: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, HALF_C)
    half = block // 2
    mask = (rows[:, None] < n_rows) & (j[None, :] < half)
    even = rows[:, None] * block + 2 * j[None, :]
    xe = tl.load(x_ptr + even, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + even + 1, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1)), 6.0 * 2.0**-126)
    k = pow2_scale_bits(amax, inv_qmax)
    s = exp2_int(k)
    inv = exp2_int(-k)[:, None]
    ce = e2m1_encode(xe * inv)
    co = e2m1_encode(xo * inv)
    if ROUNDTRIP:
        store_out(y_ptr + even, e2m1_decode(ce) * s[:, None], mask, OUT_KIND)
        store_out(y_ptr + even + 1, e2m1_decode(co) * s[:, None], mask, OUT_KIND)
    else:
        byte = (ce.to(tl.int32) | (co.to(tl.int32) << 4)).to(tl.uint8)
        tl.store(p_ptr + rows[:, None] * half + j[None, :], byte, mask=mask)
        tl.store(s_ptr + rows, s, mask=rows < n_rows)


def _fp4_launch(x: torch.Tensor, block_size: int, roundtrip: bool):
    n_rows = x.numel() // block_size
    br, grid = _rows_grid(n_rows, x.device)
    hc = U.next_pow2(max(block_size // 2, 1))
    inv = float(torch.tensor(1.0 / U.FP4_MAX, dtype=torch.float32))
    if roundtrip:
        y = torch.empty_like(x)
        _fp4_quant_fwd_kernel[(grid,)](x, x, x, U.out_view(y), n_rows, block_size, inv, BLOCK_R=br, HALF_C=hc,
                                       ROUNDTRIP=True, OUT_KIND=U.out_kind(x.dtype))
        return y
    p = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8, device=x.device)
    s = torch.empty((*x.shape[:-1], x.shape[-1] // block_size), dtype=torch.float32, device=x.device)
    _fp4_quant_fwd_kernel[(grid,)](x, p, s, x, n_rows, block_size, inv, BLOCK_R=br, HALF_C=hc, ROUNDTRIP=False, OUT_KIND=0)
    return p, s


def _fp4_refusals(x: torch.Tensor, block_size: int, *rest) -> list[str]:
    if block_size % 2:
        return [f"triton fp4 kernels need an even block_size (codes are packed in pairs), got {block_size}"]
    return []


@register_kernel("triton", "fp4_act_quant", refusals=_fp4_refusals)
def fp4_act_quant(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _fp4_launch(x, block_size, roundtrip=False)


@register_kernel("triton", "fp4_act_roundtrip", refusals=_fp4_refusals)
def fp4_act_roundtrip(x: torch.Tensor, block_size: int) -> torch.Tensor:
    return _fp4_launch(x, block_size, roundtrip=True)


@triton.jit
def _fp4_dequant_kernel(
    p_ptr, s_ptr, o_ptr, n_rows, block,
    BLOCK_R: tl.constexpr, HALF_C: tl.constexpr, S_UE8M0: tl.constexpr, OUT_KIND: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, HALF_C)
    half = block // 2
    mask = (rows[:, None] < n_rows) & (j[None, :] < half)
    byte = tl.load(p_ptr + rows[:, None] * half + j[None, :], mask=mask, other=0).to(tl.int32)
    s = load_scale(s_ptr + rows, rows < n_rows, S_UE8M0)[:, None]
    even = rows[:, None] * block + 2 * j[None, :]
    store_out(o_ptr + even, e2m1_decode(byte) * s, mask, OUT_KIND)
    store_out(o_ptr + even + 1, e2m1_decode(byte >> 4) * s, mask, OUT_KIND)


@register_kernel("triton", "fp4_act_dequant", refusals=lambda p, s, block_size, od: _fp4_refusals(p, block_size))
def fp4_act_dequant(packed: torch.Tensor, scales: torch.Tensor, block_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    n = packed.shape[-1] * 2
    n_rows = packed.numel() * 2 // block_size
    br, grid = _rows_grid(n_rows, packed.device)
    out = torch.empty((*packed.shape[:-1], n), dtype=out_dtype, device=packed.device)
    s, ue = U.scale_args(scales)
    _fp4_dequant_kernel[(grid,)](U.as_u8(packed), s, U.out_view(out), n_rows, block_size, BLOCK_R=br,
                                 HALF_C=U.next_pow2(block_size // 2), S_UE8M0=ue, OUT_KIND=U.out_kind(out_dtype))
    return out


# --------------------------------------------------------------------------------------------
# Hadamard rotation (SPEC §4.5)
# --------------------------------------------------------------------------------------------

HADAMARD_MAX = 256


@triton.jit
def hadamard_tile(N: tl.constexpr):
    """Sylvester Hadamard matrix ``H[i, j] = (-1)^popcount(i & j)`` as an fp32 [N, N] tile."""
    i = tl.arange(0, N)[:, None]
    j = tl.arange(0, N)[None, :]
    p = i & j
    p = p ^ (p >> 8)
    p = p ^ (p >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return 1.0 - 2.0 * (p & 1).to(tl.float32)


@triton.jit
def _hadamard_fwd_kernel(
    x_ptr, o_ptr, n_rows, scale,
    N: tl.constexpr, BLOCK_R: tl.constexpr, USE_DOT: tl.constexpr, DOT_BF16: tl.constexpr, OUT_KIND: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, N)
    mask = rows[:, None] < n_rows
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = hadamard_tile(N)
    if USE_DOT:
        if DOT_BF16:
            y = tl.dot(x.to(tl.bfloat16), h.to(tl.bfloat16), out_dtype=tl.float32)
        else:
            y = tl.dot(x, h, input_precision="ieee")
    else:
        y = tl.sum(x[:, :, None] * h[None, :, :], axis=1)
    store_out(o_ptr + offs, y * scale, mask, OUT_KIND)


def _hadamard_refusals(x: torch.Tensor) -> list[str]:
    if x.shape[-1] > HADAMARD_MAX:
        return [f"triton hadamard_transform holds the whole matrix in one tile: last dim must be <= {HADAMARD_MAX}, got {x.shape[-1]}"]
    return []


@register_kernel("triton", "hadamard_transform", refusals=_hadamard_refusals)
def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    n_rows = x.numel() // n
    use_dot = n >= 16
    br = U.block_config("hadamard", x.device)["BLOCK_R_DOT" if use_dot else "BLOCK_R"]
    out = torch.empty_like(x)
    _hadamard_fwd_kernel[(U.cdiv(n_rows, br),)](
        x, U.out_view(out), n_rows, n**-0.5, N=n, BLOCK_R=br, USE_DOT=use_dot,
        DOT_BF16=U.dot_bf16(x.device) and x.dtype == torch.bfloat16, OUT_KIND=U.out_kind(x.dtype))
    return out


# --------------------------------------------------------------------------------------------
# Block-scaled GEMMs (SPEC §4.6, §4.7): C = A · Bᵀ, fp32 partial product per scale block
# --------------------------------------------------------------------------------------------


@triton.jit
def _dot_nt(a, b, DOT_BF16: tl.constexpr):
    """a [M, K] · b[N, K]ᵀ in fp32; the decoded FP8/FP4 operands are exact in bf16."""
    if DOT_BF16:
        return tl.dot(a.to(tl.bfloat16), tl.trans(b.to(tl.bfloat16)), out_dtype=tl.float32)
    else:
        return tl.dot(a, tl.trans(b), input_precision="ieee")


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, KS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, AS_UE8M0: tl.constexpr, BS_UE8M0: tl.constexpr,
    DOT_BF16: tl.constexpr, OUT_KIND: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, 128)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, KS):
        kk = t * 128 + rk
        a = e4m3_decode(tl.load(a_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0))
        b = e4m3_decode(tl.load(b_ptr + rn[:, None] * K + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0))
        p = _dot_nt(a, b, DOT_BF16)
        sa = load_scale(as_ptr + rm * KS + t, rm < M, AS_UE8M0)
        sb = load_scale(bs_ptr + (rn // 128) * KS + t, rn < N, BS_UE8M0)
        acc += p * sa[:, None] * sb[None, :]
    store_out(c_ptr + rm[:, None] * N + rn[None, :], acc, (rm[:, None] < M) & (rn[None, :] < N), OUT_KIND)


@register_kernel("triton", "fp8_gemm")
def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    cfg = U.block_config("gemm", a.device)
    bm = min(cfg["BLOCK_M"], max(16, U.next_pow2(m)))
    bn = cfg["BLOCK_N"]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    sa, ua = U.scale_args(a_s)
    sb, ub = U.scale_args(b_s)
    grid = (U.cdiv(m, bm), U.cdiv(n, bn))
    _fp8_gemm_kernel[grid](U.as_u8(a), sa, U.as_u8(b), sb, U.out_view(c), m, n, k, U.cdiv(k, 128),
                           BLOCK_M=bm, BLOCK_N=bn, AS_UE8M0=ua, BS_UE8M0=ub, DOT_BF16=U.dot_bf16(a.device),
                           OUT_KIND=U.out_kind(out_dtype))
    return c


@triton.jit
def _fp4_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, AS_UE8M0: tl.constexpr, BS_UE8M0: tl.constexpr,
    DOT_BF16: tl.constexpr, OUT_KIND: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, 16)
    KA = (K + 127) // 128
    KB = K // 32
    mm = rm[:, None] < M
    nm = rn[:, None] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, KB):
        # 32-wide K slice t: A columns t*32 + [even | odd], B bytes t*16 + j (low nibble = even k)
        ka = t * 32 + 2 * j
        a_e = e4m3_decode(tl.load(a_ptr + rm[:, None] * K + ka[None, :], mask=mm, other=0))
        a_o = e4m3_decode(tl.load(a_ptr + rm[:, None] * K + ka[None, :] + 1, mask=mm, other=0))
        byte = tl.load(b_ptr + rn[:, None] * (K // 2) + t * 16 + j[None, :], mask=nm, other=0).to(tl.int32)
        p = _dot_nt(tl.join(a_e, a_o).reshape(BLOCK_M, 32), tl.join(e2m1_decode(byte), e2m1_decode(byte >> 4)).reshape(BLOCK_N, 32), DOT_BF16)
        sa = load_scale(as_ptr + rm * KA + t // 4, rm < M, AS_UE8M0)
        sb = load_scale(bs_ptr + rn * KB + t, rn < N, BS_UE8M0)
        acc += p * sa[:, None] * sb[None, :]
    store_out(c_ptr + rm[:, None] * N + rn[None, :], acc, mm & (rn[None, :] < N), OUT_KIND)


@register_kernel("triton", "fp4_gemm")
def fp4_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    cfg = U.block_config("gemm", a.device)
    bm = min(cfg["BLOCK_M"], max(16, U.next_pow2(m)))
    bn = cfg["BLOCK_N"]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    sa, ua = U.scale_args(a_s)
    sb, ub = U.scale_args(b_s)
    grid = (U.cdiv(m, bm), U.cdiv(n, bn))
    _fp4_gemm_kernel[grid](U.as_u8(a), sa, U.as_u8(b), sb, U.out_view(c), m, n, k,
                           BLOCK_M=bm, BLOCK_N=bn, AS_UE8M0=ua, BS_UE8M0=ub, DOT_BF16=U.dot_bf16(a.device),
                           OUT_KIND=U.out_kind(out_dtype))
    return c
