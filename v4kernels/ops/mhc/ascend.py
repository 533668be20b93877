"""Ascend adapters for mHC (CANN custom ops registered by vllm-ascend as ``torch.ops._C_ascend``).

``hc_pre`` → ``_C_ascend.npu_hc_pre_v2(x, hc_fn, hc_scale, hc_base, hc_mult, hc_sinkhorn_iters,
norm_eps, hc_eps) -> (y bf16 [T,D], post fp32 [T,hc], comb fp32 [T,hc,hc])``: the whole hc_pre
(RMS-scaled GEMV, split, Sinkhorn, collapse) in one op. Bridging: our ``x [..., hc, D]`` is
flattened to ``[T, hc, D]`` and the outputs reshaped back. Limits (the op's shape check):
hc = 4, D ∈ {4096, 7168} (V4-Flash / V4-Pro hidden sizes), x bf16, hc_fn fp32.

``hc_post`` → ``_C_ascend.npu_hc_post(x [b,s,d], residual [b,s,hc,d], post [b,s,hc], comb
[b,s,hc,hc])``. It computes ``out[k] = post[k]·x + Σ_j comb[j,k]·residual[j]`` — the residual
mixed with combᵀ, as V4 and this op define it — so comb is passed as is. Bridging: leading dims
flattened into ``s`` with ``b = 1``. Limits: hc = 4, bf16 activations; ``bf16_mix=True`` (the
[HF] per-product rounding) is refused since the fused op rounds once.

vllm-ascend disables its custom ops on A5/950 builds, so both are declared for A2/A3; a 950
install that registers them anyway can set ``V4K_ASCEND_SOC`` only if it has verified them.
"""
from __future__ import annotations

import torch

from ..._registry import register_kernel
from ...backends.ascend import BACKEND, VendorOp

PRE = VendorOp("_C_ascend.npu_hc_pre_v2", socs=("A2", "A3"), note="hc=4, D in {4096, 7168}, bf16")
POST = VendorOp("_C_ascend.npu_hc_post", socs=("A2", "A3"), note="hc=4, bf16; residual mixed with combᵀ")
BACKEND.declare("hc_pre", PRE, hc=4, dims=(4096, 7168), dtypes=("bfloat16",))
BACKEND.declare("hc_post", POST, hc=4, dtypes=("bfloat16",), bf16_mix=False)


def _pre_refusals(x, hc_fn, hc_scale, hc_base, sinkhorn_iters, norm_eps, hc_eps):
    r = []
    hc, d = x.shape[-2], x.shape[-1]
    if hc != 4:
        r.append(f"npu_hc_pre_v2 supports hc=4 only, got hc={hc}")
    if d not in (4096, 7168):
        r.append(f"npu_hc_pre_v2 supports D in {{4096, 7168}} only, got D={d}")
    if x.dtype != torch.bfloat16:
        r.append(f"npu_hc_pre_v2 takes bf16 x, got {x.dtype}")
    if hc_fn.dtype != torch.float32:
        r.append(f"npu_hc_pre_v2 takes fp32 hc_fn, got {hc_fn.dtype}")
    return r


@register_kernel("ascend", "hc_pre", refusals=_pre_refusals)
def hc_pre(x, hc_fn, hc_scale, hc_base, sinkhorn_iters, norm_eps, hc_eps):
    lead, hc, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    y, post, comb = BACKEND.vendor(PRE)(x.reshape(-1, hc, d), hc_fn, hc_scale.float(), hc_base.float(), hc,
                                        sinkhorn_iters, norm_eps, hc_eps)
    return y.reshape(*lead, d), post.float().reshape(*lead, hc), comb.float().reshape(*lead, hc, hc)


def _post_refusals(x, residual, post, comb, bf16_mix):
    r = []
    if bf16_mix:
        r.append("npu_hc_post rounds once; bf16_mix=True needs per-product rounding")
    if residual.shape[-2] != 4:
        r.append(f"npu_hc_post supports hc=4 only, got hc={residual.shape[-2]}")
    if x.dtype != torch.bfloat16 or residual.dtype != torch.bfloat16:
        r.append(f"npu_hc_post takes bf16 x and residual, got {x.dtype}, {residual.dtype}")
    return r


@register_kernel("ascend", "hc_post", refusals=_post_refusals)
def hc_post(x, residual, post, comb, bf16_mix):
    hc, d = residual.shape[-2], residual.shape[-1]
    out = BACKEND.vendor(POST)(x.reshape(1, -1, d), residual.reshape(1, -1, hc, d), post.float().reshape(1, -1, hc),
                               comb.float().reshape(1, -1, hc, hc))
    return out.reshape(residual.shape)
