"""Triton kernels for interleaved RoPE / inverse RoPE (SPEC §3) and RMSNorm (SPEC §5.1)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._registry import register_kernel
from ... import triton_utils as U
from ...triton_utils import round_to_out, store_out


@triton.jit
def _apply_rope_fwd_kernel(
    x_ptr, xraw_ptr, yraw_ptr, y_ptr, pos_ptr, f_ptr, n_rows, mid, L, R,
    BLOCK_R: tl.constexpr, BLOCK_NOPE: tl.constexpr, HALF: tl.constexpr, INVERSE: tl.constexpr, OUT_KIND: tl.constexpr,
    ROUND_TABLES: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    # untouched leading dims: bit copy
    c = tl.arange(0, BLOCK_NOPE)
    nope = L - R
    for c0 in range(0, nope, BLOCK_NOPE):
        m = rmask[:, None] & (c0 + c[None, :] < nope)
        o = rows[:, None] * L + c0 + c[None, :]
        tl.store(yraw_ptr + o, tl.load(xraw_ptr + o, mask=m, other=0), mask=m)
    # trailing R dims as adjacent (re, im) pairs; angle = fp32(p) * fp32(theta) (SPEC §3.4)
    i = tl.arange(0, HALF)
    pm = rmask[:, None] & (i[None, :] < R // 2)
    p = tl.load(pos_ptr + rows // mid, mask=rmask, other=0).to(tl.float32)
    f = tl.load(f_ptr + i, mask=i < R // 2, other=0.0)
    ang = p[:, None] * f[None, :]
    cs = tl.cos(ang)
    sn = tl.sin(ang)
    if ROUND_TABLES:
        # [HF] (transformers 5.23.0): tables rounded to the model dtype before the fp32 rotation
        cs = round_to_out(cs, OUT_KIND)
        sn = round_to_out(sn, OUT_KIND)
    if INVERSE:
        sn = -sn
    o = rows[:, None] * L + nope + 2 * i[None, :]
    a = tl.load(x_ptr + o, mask=pm, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + o + 1, mask=pm, other=0.0).to(tl.float32)
    store_out(y_ptr + o, a * cs - b * sn, pm, OUT_KIND)
    store_out(y_ptr + o + 1, a * sn + b * cs, pm, OUT_KIND)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@register_kernel("triton", "apply_rope")
def apply_rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool, round_tables: bool) -> torch.Tensor:
    L = x.shape[-1]
    r = 2 * freqs.shape[0]
    n_rows = x.numel() // L
    mid = n_rows // max(positions.numel(), 1)
    y = torch.empty_like(x)
    br = U.block_config("rows", x.device)["BLOCK_R"]
    _apply_rope_fwd_kernel[(U.cdiv(n_rows, br),)](
        x, _raw(x), _raw(y), U.out_view(y), positions, freqs.float().contiguous(), n_rows, mid, L, r,
        BLOCK_R=br, BLOCK_NOPE=min(512, U.next_pow2(max(L - r, 1))), HALF=U.next_pow2(max(r // 2, 1)),
        INVERSE=inverse, OUT_KIND=U.out_kind(x.dtype), ROUND_TABLES=round_tables)
    return y


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, n_rows, D, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr, HF: tl.constexpr, OUT_KIND: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ms = tl.sum(x * x, axis=1) / D
    inv = tl.div_rn(1.0, tl.sqrt_rn(ms + eps))
    y = x * inv[:, None]
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        # [HF] weighted norm (transformers 5.23.0): fp32 weight multiply, one rounding = default
        y = y * w[None, :]
    elif HF:
        # [HF] unweighted norm (transformers 5.23.0): x * dtype(rsqrt), product rounded
        y = x * round_to_out(inv, OUT_KIND)[:, None]
    store_out(y_ptr + offs, y, mask, OUT_KIND)


_RMS_MAX_D = 16384


@register_kernel(
    "triton", "rms_norm",
    refusals=lambda x, w, eps, hf: [] if x.shape[-1] <= _RMS_MAX_D
    else [f"triton rms_norm keeps a row in one tile: last dim must be <= {_RMS_MAX_D}, got {x.shape[-1]}"],
)
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, hf_rounding: bool) -> torch.Tensor:
    d = x.shape[-1]
    n_rows = x.numel() // d
    y = torch.empty_like(x)
    bd = U.next_pow2(d)
    cfg = U.block_config("rows", x.device)
    br = max(1, min(cfg["BLOCK_R"], cfg["ROW_ELEMS"] // bd))
    w = weight.contiguous() if weight is not None else x
    _rms_norm_fwd_kernel[(U.cdiv(n_rows, br),)](
        x, w, U.out_view(y), n_rows, d, eps, BLOCK_R=br, BLOCK_D=bd, HAS_W=weight is not None,
        HF=hf_rounding, OUT_KIND=U.out_kind(x.dtype))
    return y
