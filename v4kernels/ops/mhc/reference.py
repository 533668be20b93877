"""Reference manifold-constrained hyper-connections (SPEC §10): Sinkhorn split of the mix
logits, stream collapse (pre), stream expansion with the comb mixing (post) and the final head.

fp32 math on any device; activations are rounded once to their own dtype at the end, exactly
as the released model code does ([OFF]).
"""
from __future__ import annotations

import torch

from ..._registry import register_kernel


def mix_logits(x: torch.Tensor, hc_fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """``(fp32(X).view(hc·D) @ fnᵀ) · rsqrt(mean(xf²) + eps)`` per token (SPEC §10.1)."""
    xf = x.float().flatten(-2)  # [..., hc*D]
    rs = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    return (xf @ hc_fn.float().T) * rs


def sinkhorn_split(
    mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc: int, iters: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, s, b = mixes.float(), hc_scale.float(), hc_base.float()
    pre = torch.sigmoid(m[..., :hc] * s[0] + b[:hc]) + eps
    post = 2.0 * torch.sigmoid(m[..., hc : 2 * hc] * s[1] + b[hc : 2 * hc])
    # comb logits are a row-major hc x hc block: Cl[j, k] = mixes[2hc + hc*j + k] (SPEC §10.2)
    cl = (m[..., 2 * hc :] * s[2] + b[2 * hc :]).unflatten(-1, (hc, hc))
    c = torch.softmax(cl, dim=-1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)  # columns first ...
    for _ in range(iters - 1):  # ... then (row, column) pairs; the last step is a column one
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return pre, post, c


def collapse(x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """``Σ_j pre[j] · fp32(X[j])`` rounded once to ``x.dtype`` (SPEC §10.3, §10.5)."""
    return (pre.unsqueeze(-1) * x.float()).sum(-2).to(x.dtype)


@register_kernel("reference", "hc_split_sinkhorn")
def hc_split_sinkhorn(
    mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc_mult: int, sinkhorn_iters: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sinkhorn_split(mixes, hc_scale, hc_base, hc_mult, sinkhorn_iters, eps)


@register_kernel("reference", "hc_pre")
def hc_pre(
    x: torch.Tensor,
    hc_fn: torch.Tensor,
    hc_scale: torch.Tensor,
    hc_base: torch.Tensor,
    sinkhorn_iters: int,
    norm_eps: float,
    hc_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hc = x.shape[-2]
    mixes = mix_logits(x, hc_fn, norm_eps)
    pre, post, comb = sinkhorn_split(mixes, hc_scale, hc_base, hc, sinkhorn_iters, hc_eps)
    return collapse(x, pre), post, comb


@register_kernel("reference", "hc_post")
def hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, bf16_mix: bool) -> torch.Tensor:
    dt = x.dtype
    xf, rf = x.float(), residual.float()
    if bf16_mix:
        # [HF] variant (SPEC §15 #4): post and comb are cast to the activation dtype and each
        # product/sum is rounded to it: bf16(bf16(post·a) + bf16(Cᵀ @ R)).
        p = post.to(dt).float()
        c = comb.to(dt).float()
        a = (p.unsqueeze(-1) * xf.unsqueeze(-2)).to(dt).float()
        r = (c.transpose(-1, -2) @ rf).to(dt).float()
        return (a + r).to(dt)
    # out[k] = post[k]·a + Σ_j C[j,k]·R[j]: the residual is mixed with Cᵀ (SPEC §10.4)
    y = post.float().unsqueeze(-1) * xf.unsqueeze(-2) + comb.float().transpose(-1, -2) @ rf
    return y.to(dt)


@register_kernel("reference", "hc_head")
def hc_head(
    x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, norm_eps: float, hc_eps: float
) -> torch.Tensor:
    mixes = mix_logits(x, hc_fn, norm_eps)
    pre = torch.sigmoid(mixes * hc_scale.float()[0] + hc_base.float()) + hc_eps
    return collapse(x, pre)
