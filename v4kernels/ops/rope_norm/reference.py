"""Reference interleaved RoPE (SPEC §3) and RMSNorm (SPEC §5.1); fp32 math, one rounding."""
from __future__ import annotations

import torch

from ..._registry import register_kernel


def rope_angles(positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``fp32(p) * fp32(θ')`` rounded to fp32, exactly as the released ``outer(arange, freqs)``."""
    return positions.to(torch.float32).unsqueeze(-1) * freqs.to(torch.float32)


@register_kernel("reference", "apply_rope")
def apply_rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool, round_tables: bool) -> torch.Tensor:
    # x [B, S, *mid, L]; positions [B, S]; rotate the trailing 2*len(freqs) dims as adjacent pairs.
    r = 2 * freqs.shape[0]
    b, s = x.shape[0], x.shape[1]
    ang = rope_angles(positions, freqs)  # [B, S, r/2]
    ang = ang.reshape(b, s, *([1] * (x.dim() - 3)), r // 2)
    cos, sin = torch.cos(ang), torch.sin(ang)
    if round_tables:
        # [HF] (transformers 5.23.0): the cos/sin tables are cast to the model dtype first
        cos, sin = cos.to(x.dtype).float(), sin.to(x.dtype).float()
    if inverse:
        sin = -sin
    xf = x[..., x.shape[-1] - r :].float()
    a, bb = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((a * cos - bb * sin, a * sin + bb * cos), dim=-1).flatten(-2)
    y = x.clone()
    y[..., x.shape[-1] - r :] = out.to(x.dtype)
    return y


@register_kernel("reference", "rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, hf_rounding: bool) -> torch.Tensor:
    xf = x.float()
    inv = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if hf_rounding and weight is None:
        # [HF] unweighted norm (transformers 5.23.0 DeepseekV4UnweightedRMSNorm):
        # x * rsqrt(...).to(x.dtype), i.e. the factor and the product are each rounded to x.dtype.
        return (xf * inv.to(x.dtype).float()).to(x.dtype)
    # The weighted [HF] norm (DeepseekV4RMSNorm: fp32 weight times the fp32 normalised value,
    # cast once) is the default order.
    y = xf * inv
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)
