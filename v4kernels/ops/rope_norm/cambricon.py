"""Cambricon adapters of ``apply_rope`` (SPEC §3) and ``rms_norm`` (SPEC §5.1) over
``torch_mlu_ops.apply_rotary`` and ``torch_mlu_ops.fused_rms_norm``.

apply_rope: our x is ``[B, S, *mid, L]`` with the rotary dims at the end (interleaved pairs);
``apply_rotary`` takes tokens ``[1, T, heads, rotary_dim]`` (as Cambricon's deployment calls it),
a sin/cos table in the input's dtype laid out like the pairs (interleaved: each angle repeated)
and, with ``discrete=True``, a table row per token. The adapter passes exactly the trailing ``r``
dims in fp32 (so where the op puts the rotary part of a wider head never matters, and the math is
the reference's fp32 with one rounding), a per-call fp32 table with one row per token
(``angle = fp32(position) · freqs``) and ``position_ids = arange(T)``; ``is_inverse`` gives the
de-rotation of SPEC §3.4.

rms_norm: ``fused_rms_norm(x, residual=None, gamma=weight, beta=None, bias=None, eps)``, fp32 math
and one rounding; gamma shares x's dtype, so a weight of another dtype (e.g. fp32 weight, bf16 x)
runs the op on fp32 rows with the fp32 weight, then rounds once. The [HF] ``hf_rounding`` variant
(normalise, round, then scale) is refused.
"""
from __future__ import annotations

import math

import torch

from ..._registry import register_kernel
from ...backends.cambricon import BACKEND, LIMITS

_ROPE_DTYPES = tuple(getattr(torch, d) for d in LIMITS["apply_rope"]["dtypes"])
_NORM_DTYPES = tuple(getattr(torch, d) for d in LIMITS["rms_norm"]["dtypes"])


def _rope_refusals(x, positions, freqs, inverse, round_tables) -> list[str]:
    if round_tables and x.dtype != torch.float32:
        return ["cambricon apply_rope: the adapter feeds fp32 tables; tables rounded to the activation dtype "
                "(round_tables) run elsewhere"]
    if x.dtype not in _ROPE_DTYPES:
        return [f"cambricon apply_rope: x dtype {x.dtype} not in {LIMITS['apply_rope']['dtypes']}"]
    return []


@register_kernel("cambricon", "apply_rope", refusals=_rope_refusals)
def apply_rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool,
               round_tables: bool) -> torch.Tensor:
    r = 2 * freqs.shape[0]
    y = x.clone()
    if x.numel() == 0 or r == 0:
        return y
    b, s, length = x.shape[0], x.shape[1], x.shape[-1]
    t = b * s
    heads = math.prod(x.shape[2:-1])
    # fp32 rotary part and fp32 tables: the op's input and tables share a dtype, and fp32 keeps the
    # reference numerics (fp32 math, one rounding); the part is r of L dims, so the copy is small
    part = x.reshape(1, t, heads, length)[..., length - r:].float().contiguous()
    pos = positions.expand(b, s) if positions.dim() == 2 else positions.view(1, s).expand(b, s)
    ang = pos.reshape(t).to(torch.float32).unsqueeze(-1) * freqs.to(torch.float32)  # [T, r/2]
    sin = torch.sin(ang).repeat_interleave(2, dim=-1)  # interleaved layout: θ0 θ0 θ1 θ1 ...
    cos = torch.cos(ang).repeat_interleave(2, dim=-1)
    ids = torch.arange(t, dtype=torch.int32, device=x.device)
    rot = BACKEND.tmo().apply_rotary(part, sin, cos, ids, None, True, True, False, t, is_inverse=bool(inverse))
    y.reshape(t, heads, length)[..., length - r:] = rot.view(t, heads, r).to(x.dtype)
    return y


def _norm_refusals(x, weight, eps, hf_rounding) -> list[str]:
    reasons = []
    if x.dtype not in _NORM_DTYPES:
        reasons.append(f"cambricon rms_norm: x dtype {x.dtype} not in {LIMITS['rms_norm']['dtypes']}")
    if hf_rounding:
        reasons.append("cambricon rms_norm: fused_rms_norm rounds once; the hf_rounding variant rounds before "
                       "the weight")
    return reasons


@register_kernel("cambricon", "rms_norm", refusals=_norm_refusals)
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, hf_rounding: bool) -> torch.Tensor:
    if x.numel() == 0:
        return x.clone()
    x2 = x.reshape(-1, x.shape[-1])
    if weight is not None and weight.dtype != x.dtype:
        # gamma must share x's dtype: run in fp32 with the fp32 weight (the reference's numerics)
        y = BACKEND.tmo().fused_rms_norm(x2.float(), None, weight.float(), None, None, float(eps), False)
        return y.to(x.dtype).reshape(x.shape)
    y = BACKEND.tmo().fused_rms_norm(x2, None, weight, None, None, float(eps), False)
    return y.reshape(x.shape)
