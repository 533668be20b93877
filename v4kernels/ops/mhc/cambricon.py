"""Cambricon adapters of the mHC ops (SPEC §10) over ``torch_mlu_ops.hc_split_sinkhorn`` and
``torch_mlu_ops.fused_mhc_post``.

* ``hc_split_sinkhorn``: the op takes ``mixes`` as ``[B, S, mix]`` or ``[B, mix]``; any leading
  shape is flattened to ``[1, T, mix]`` (as the V4 deployment calls it) and restored after.
  Its Sinkhorn is V4's: a column pass first, then ``iters − 1`` (row, column) rounds.
* ``hc_pre``: ``mixes = fp32(X) @ hc_fnᵀ`` (a plain GEMM, as on MLU deployments), then the op
  with ``pre_scale = rsqrt(mean(X²) + eps)`` (it scales the mixes inside), then the weighted
  stream collapse in fp32 with one rounding.
* ``hc_post``: the op computes ``post·x + Σ_j comb[j, k]·residual[j]`` (the Cᵀ mixing of SPEC
  §10.4) and is documented for D = 4096, HC = 4 only: other shapes (e.g. V4-Pro's D = 7168) and
  the ``bf16_mix`` [HF] rounding variant are refused and fall back to Triton/the reference.
"""
from __future__ import annotations

import torch

from ..._registry import register_kernel
from ...backends.cambricon import BACKEND, LIMITS

_POST = LIMITS["hc_post"]
_POST_DTYPES = tuple(getattr(torch, d) for d in _POST["dtypes"])


def _split(tmo, mixes: torch.Tensor, hc_scale, hc_base, hc_mult: int, iters: int, eps: float,
           pre_scale: torch.Tensor | None = None):
    lead = mixes.shape[:-1]
    m = mixes.reshape(1, -1, mixes.shape[-1]).contiguous()
    ps = None if pre_scale is None else pre_scale.reshape(1, -1).contiguous()
    pre, post, comb = tmo.hc_split_sinkhorn(mixes=m, hc_scale=hc_scale, hc_base=hc_base, pre_scale=ps,
                                            hc_mult=hc_mult, sinkhorn_iter=iters, eps=eps)
    return pre.reshape(*lead, hc_mult), post.reshape(*lead, hc_mult), comb.reshape(*lead, hc_mult, hc_mult)


@register_kernel("cambricon", "hc_split_sinkhorn")
def hc_split_sinkhorn(mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc_mult: int,
                      sinkhorn_iters: int, eps: float):
    return _split(BACKEND.tmo(), mixes.float(), hc_scale, hc_base, hc_mult, sinkhorn_iters, eps)


@register_kernel("cambricon", "hc_pre")
def hc_pre(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, sinkhorn_iters: int,
           norm_eps: float, hc_eps: float):
    hc = x.shape[-2]
    xf = x.float()
    flat = xf.flatten(-2)
    rsqrt = torch.rsqrt(flat.square().mean(-1) + norm_eps)
    mixes = flat @ hc_fn.float().T
    pre, post, comb = _split(BACKEND.tmo(), mixes, hc_scale, hc_base, hc, sinkhorn_iters, hc_eps, pre_scale=rsqrt)
    y = (pre.unsqueeze(-1) * xf).sum(-2).to(x.dtype)
    return y, post, comb


def _post_refusals(x, residual, post, comb, bf16_mix) -> list[str]:
    reasons = []
    hc, d = residual.shape[-2], residual.shape[-1]
    if hc not in _POST["hc_mult"] or d not in _POST["dim"]:
        reasons.append(f"cambricon hc_post: torch_mlu_ops.fused_mhc_post takes only HC in {_POST['hc_mult']} and "
                       f"D in {_POST['dim']}, got HC={hc}, D={d}")
    if x.dtype not in _POST_DTYPES:
        reasons.append(f"cambricon hc_post: fused_mhc_post takes {_POST['dtypes']} activations, got {x.dtype}")
    if bf16_mix:
        reasons.append("cambricon hc_post: the bf16_mix rounding variant is not what fused_mhc_post computes")
    return reasons


@register_kernel("cambricon", "hc_post", refusals=_post_refusals)
def hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, bf16_mix: bool):
    tmo = BACKEND.tmo()
    hc, d = residual.shape[-2], residual.shape[-1]
    lead = x.shape[:-1]
    y = tmo.fused_mhc_post(x.reshape(-1, d), residual.reshape(-1, hc, d), post.reshape(-1, hc).float(),
                           comb.reshape(-1, hc, hc).float(), False, 0.0)
    return y.reshape(*lead, hc, d)
