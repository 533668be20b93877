"""Differentiable PyTorch forms of the mHC ops (SPEC §10), used by their recomputation
backwards (``v4kernels.ops._autograd``). Same math as the reference kernels, in fp32 (fp64 for
fp64 inputs), with the Sinkhorn iterations unrolled so autograd sees every step.
"""
from __future__ import annotations

import torch

from .._autograd import compute_dtype


def _mix_logits(x: torch.Tensor, hc_fn: torch.Tensor, norm_eps: float, dt: torch.dtype) -> torch.Tensor:
    xf = x.to(dt).flatten(-2)
    return (xf @ hc_fn.to(dt).T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)


def _split(m: torch.Tensor, s: torch.Tensor, b: torch.Tensor, hc: int, iters: int, eps: float):
    pre = torch.sigmoid(m[..., :hc] * s[0] + b[:hc]) + eps
    post = 2.0 * torch.sigmoid(m[..., hc : 2 * hc] * s[1] + b[hc : 2 * hc])
    cl = (m[..., 2 * hc :] * s[2] + b[2 * hc :]).unflatten(-1, (hc, hc))
    c = torch.softmax(cl, dim=-1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return pre, post, c


def hc_split_sinkhorn_math(mixes, hc_scale, hc_base, hc_mult, sinkhorn_iters, eps):
    dt = compute_dtype(mixes, hc_scale, hc_base)
    return _split(mixes.to(dt), hc_scale.to(dt), hc_base.to(dt), hc_mult, sinkhorn_iters, eps)


def hc_pre_math(x, hc_fn, hc_scale, hc_base, sinkhorn_iters, norm_eps, hc_eps):
    dt = compute_dtype(x, hc_fn, hc_scale, hc_base)
    hc = x.shape[-2]
    mixes = _mix_logits(x, hc_fn, norm_eps, dt)
    pre, post, comb = _split(mixes, hc_scale.to(dt), hc_base.to(dt), hc, sinkhorn_iters, hc_eps)
    return (pre.unsqueeze(-1) * x.to(dt)).sum(-2).to(x.dtype), post, comb


def hc_post_math(x, residual, post, comb, bf16_mix):
    dt = compute_dtype(x, residual, post, comb)
    xd = x.dtype
    xf, rf = x.to(dt), residual.to(dt)
    if bf16_mix:
        p, c = post.to(xd).to(dt), comb.to(xd).to(dt)
        a = (p.unsqueeze(-1) * xf.unsqueeze(-2)).to(xd).to(dt)
        r = (c.transpose(-1, -2) @ rf).to(xd).to(dt)
        return (a + r).to(xd)
    return (post.to(dt).unsqueeze(-1) * xf.unsqueeze(-2) + comb.to(dt).transpose(-1, -2) @ rf).to(xd)


def hc_head_math(x, hc_fn, hc_scale, hc_base, norm_eps, hc_eps):
    dt = compute_dtype(x, hc_fn, hc_scale, hc_base)
    mixes = _mix_logits(x, hc_fn, norm_eps, dt)
    pre = torch.sigmoid(mixes * hc_scale.to(dt)[0] + hc_base.to(dt)) + hc_eps
    return (pre.unsqueeze(-1) * x.to(dt)).sum(-2).to(x.dtype)
