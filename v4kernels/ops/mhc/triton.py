"""Triton kernels for manifold-constrained hyper-connections (SPEC §10).

``hc_pre`` and ``hc_head`` are one launch each: the mix-logit GEMV and the sum of squares share
one pass over the streams (SPEC §10.1), the logits go through a small per-program scratch (a
barrier makes them visible to every lane), Sinkhorn runs in registers, and a second pass over
the streams collapses them with ``pre``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._registry import register_kernel
from ... import triton_utils as U
from ...triton_utils import round_to_out, store_out


@triton.jit
def _sinkhorn(mix_ptr, t, tm, scale_ptr, base_ptr, NMIX, iters, eps, HC: tl.constexpr, HCP: tl.constexpr):
    """SPEC §10.2 for the token rows ``t`` [BT] of a [T, NMIX] logits buffer -> (pre, post, comb)."""
    j = tl.arange(0, HCP)
    jm = j < HC
    m2 = tm[:, None] & jm[None, :]
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    row = t[:, None].to(tl.int64) * NMIX
    lp = tl.load(mix_ptr + row + j[None, :], mask=m2, other=0.0)
    pre = tl.sigmoid(lp * s0 + tl.load(base_ptr + j, mask=jm, other=0.0)[None, :]) + eps
    lq = tl.load(mix_ptr + row + HC + j[None, :], mask=m2, other=0.0)
    post = 2.0 * tl.sigmoid(lq * s1 + tl.load(base_ptr + HC + j, mask=jm, other=0.0)[None, :])
    # comb logits: row-major HC x HC block, Cl[j, k] = mixes[2HC + HC*j + k]
    jk = j[:, None] * HC + j[None, :]
    vm = jm[:, None] & jm[None, :]
    m3 = tm[:, None, None] & vm[None, :, :]
    cl = tl.load(mix_ptr + row[:, :, None] + 2 * HC + jk[None, :, :], mask=m3, other=0.0)
    cl = cl * s2 + tl.load(base_ptr + 2 * HC + jk, mask=vm, other=0.0)[None, :, :]
    cl = tl.where(vm[None, :, :], cl, -1e30)  # padding: finite, so no inf-inf
    e = tl.exp(cl - tl.max(cl, axis=2)[:, :, None])
    e = tl.where(vm[None, :, :], e, 0.0)
    c = e / tl.sum(e, axis=2)[:, :, None] + eps
    c = tl.where(vm[None, :, :], c, 0.0)
    c = c / (tl.sum(c, axis=1)[:, None, :] + eps)
    for _ in range(1, iters):
        c = c / (tl.sum(c, axis=2)[:, :, None] + eps)
        c = c / (tl.sum(c, axis=1)[:, None, :] + eps)
    return pre, post, c


@triton.jit
def _store_post_comb(post_ptr, comb_ptr, t, tm, post, c, HC: tl.constexpr, HCP: tl.constexpr):
    j = tl.arange(0, HCP)
    jm = j < HC
    tl.store(post_ptr + t[:, None] * HC + j[None, :], post, mask=tm[:, None] & jm[None, :])
    jk = j[:, None] * HC + j[None, :]
    vm = jm[:, None] & jm[None, :]
    tl.store(comb_ptr + t[:, None, None] * (HC * HC) + jk[None, :, :], c, mask=tm[:, None, None] & vm[None, :, :])


@triton.jit
def _hc_split_sinkhorn_kernel(
    mix_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, T, NMIX, iters, eps,
    HC: tl.constexpr, HCP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    pre, post, c = _sinkhorn(mix_ptr, t, tm, scale_ptr, base_ptr, NMIX, iters, eps, HC, HCP)
    j = tl.arange(0, HCP)
    tl.store(pre_ptr + t[:, None] * HC + j[None, :], pre, mask=tm[:, None] & (j[None, :] < HC))
    _store_post_comb(post_ptr, comb_ptr, t, tm, post, c, HC, HCP)


def _tok_block(device: torch.device) -> int:
    return U.block_config("mhc", device)["BLOCK_T_SPLIT"]


@register_kernel("triton", "hc_split_sinkhorn")
def hc_split_sinkhorn(mixes, hc_scale, hc_base, hc_mult, sinkhorn_iters, eps):
    lead = mixes.shape[:-1]
    t = mixes.numel() // mixes.shape[-1]
    dev = mixes.device
    pre = torch.empty((*lead, hc_mult), dtype=torch.float32, device=dev)
    post = torch.empty_like(pre)
    comb = torch.empty((*lead, hc_mult, hc_mult), dtype=torch.float32, device=dev)
    bt = _tok_block(dev)
    _hc_split_sinkhorn_kernel[(U.cdiv(t, bt),)](
        mixes.float().contiguous(), hc_scale.float().contiguous(), hc_base.float().contiguous(), pre, post, comb,
        t, mixes.shape[-1], sinkhorn_iters, eps, HC=hc_mult, HCP=U.next_pow2(hc_mult), BLOCK_T=bt)
    return pre, post, comb


@triton.jit
def _hc_pre_fwd_kernel(
    x_ptr, fn_ptr, scale_ptr, base_ptr, mix_ptr, y_ptr, post_ptr, comb_ptr,
    T, D, NMIX, iters, norm_eps, hc_eps,
    HC: tl.constexpr, HCP: tl.constexpr, NMIXP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD: tl.constexpr, DOT_PREC: tl.constexpr, OUT_KIND: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    n = tl.arange(0, NMIXP)
    nm = n < NMIX
    cd = tl.arange(0, BLOCK_D)
    FD = HC * D
    xrow = t[:, None].to(tl.int64) * FD
    # pass 1: mixes = x·fnᵀ and Σx² over the concatenated streams (SPEC §10.1)
    acc = tl.zeros((BLOCK_T, NMIXP), tl.float32)
    ss = tl.zeros((BLOCK_T,), tl.float32)
    for c0 in range(0, FD, BLOCK_D):
        c = c0 + cd
        cm = c < FD
        x = tl.load(x_ptr + xrow + c[None, :], mask=tm[:, None] & cm[None, :], other=0.0).to(tl.float32)
        f = tl.load(fn_ptr + n[:, None].to(tl.int64) * FD + c[None, :], mask=nm[:, None] & cm[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(f), input_precision=DOT_PREC)
        ss += tl.sum(x * x, axis=1)
    rs = tl.div_rn(1.0, tl.sqrt_rn(ss / FD + norm_eps))
    mixes = acc * rs[:, None]
    j = tl.arange(0, HCP)
    jm = j < HC
    if HEAD:
        s0 = tl.load(scale_ptr)
        b = tl.load(base_ptr + j, mask=jm, other=0.0)
        # mixes columns 0..HC-1 are the only ones (NMIX == HC): move them to a [BT, HCP] layout
        lp = tl.sum(tl.where(n[None, :, None] == j[None, None, :], mixes[:, :, None], 0.0), axis=1)
        pre = tl.sigmoid(lp * s0 + b[None, :]) + hc_eps
    else:
        tl.store(mix_ptr + t[:, None].to(tl.int64) * NMIX + n[None, :], mixes, mask=tm[:, None] & nm[None, :])
        tl.debug_barrier()
        pre, post, c = _sinkhorn(mix_ptr, t, tm, scale_ptr, base_ptr, NMIX, iters, hc_eps, HC, HCP)
        _store_post_comb(post_ptr, comb_ptr, t, tm, post, c, HC, HCP)
    # pass 2: collapse y = Σ_j pre[j] · x[j] (SPEC §10.3, §10.5)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + cd
        dm = tm[:, None] & (d[None, :] < D)
        y = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        for jj in tl.static_range(HC):
            pj = tl.sum(tl.where(j[None, :] == jj, pre, 0.0), axis=1)
            xj = tl.load(x_ptr + xrow + jj * D + d[None, :], mask=dm, other=0.0).to(tl.float32)
            y += pj[:, None] * xj
        store_out(y_ptr + t[:, None].to(tl.int64) * D + d[None, :], y, dm, OUT_KIND)


def _hc_pre_launch(x, hc_fn, hc_scale, hc_base, iters, norm_eps, hc_eps, head: bool):
    hc, d = x.shape[-2], x.shape[-1]
    lead = x.shape[:-2]
    t = x.numel() // (hc * d)
    dev = x.device
    nmix = hc_fn.shape[0]
    y = torch.empty((*lead, d), dtype=x.dtype, device=dev)
    post = torch.empty((*lead, hc), dtype=torch.float32, device=dev)
    comb = torch.empty((*lead, hc, hc), dtype=torch.float32, device=dev)
    mix = torch.empty((t, nmix), dtype=torch.float32, device=dev)
    bt = 16
    bd = min(U.block_config("mhc", dev)["BLOCK_D_PRE"], U.next_pow2(hc * d))
    _hc_pre_fwd_kernel[(U.cdiv(t, bt),)](
        x, hc_fn.float().contiguous(), hc_scale.float().contiguous(), hc_base.float().contiguous(), mix, U.out_view(y),
        post, comb, t, d, nmix, iters, norm_eps, hc_eps, HC=hc, HCP=U.next_pow2(hc), NMIXP=max(16, U.next_pow2(nmix)),
        BLOCK_T=bt, BLOCK_D=bd, HEAD=head, DOT_PREC="ieee", OUT_KIND=U.out_kind(x.dtype))
    return y, post, comb


@register_kernel("triton", "hc_pre")
def hc_pre(x, hc_fn, hc_scale, hc_base, sinkhorn_iters, norm_eps, hc_eps):
    return _hc_pre_launch(x, hc_fn, hc_scale, hc_base, sinkhorn_iters, norm_eps, hc_eps, head=False)


@register_kernel("triton", "hc_head")
def hc_head(x, hc_fn, hc_scale, hc_base, norm_eps, hc_eps):
    return _hc_pre_launch(x, hc_fn, hc_scale, hc_base, 0, norm_eps, hc_eps, head=True)[0]


@triton.jit
def _hc_post_fwd_kernel(
    x_ptr, r_ptr, post_ptr, comb_ptr, o_ptr, T, D,
    HC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BF16_MIX: tl.constexpr, OUT_KIND: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tm = t < T
    m = tm[:, None] & (d[None, :] < D)
    t64 = t[:, None].to(tl.int64)
    x = tl.load(x_ptr + t64 * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    for k in tl.static_range(HC):
        pk = tl.load(post_ptr + t * HC + k, mask=tm, other=0.0)
        if BF16_MIX:
            pk = round_to_out(pk, OUT_KIND)
        r = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        # out[k] = post[k]·x + Σ_j comb[j, k]·R[j]: the residual is mixed with Cᵀ (SPEC §10.4)
        for jj in tl.static_range(HC):
            cjk = tl.load(comb_ptr + t * (HC * HC) + jj * HC + k, mask=tm, other=0.0)
            if BF16_MIX:
                cjk = round_to_out(cjk, OUT_KIND)
            r += cjk[:, None] * tl.load(r_ptr + (t64 * HC + jj) * D + d[None, :], mask=m, other=0.0).to(tl.float32)
        a = pk[:, None] * x
        if BF16_MIX:
            # [HF] (SPEC §15 #4): bf16(bf16(post·a) + bf16(Cᵀ·R))
            a = round_to_out(a, OUT_KIND)
            r = round_to_out(r, OUT_KIND)
        store_out(o_ptr + (t64 * HC + k) * D + d[None, :], a + r, m, OUT_KIND)


@register_kernel("triton", "hc_post")
def hc_post(x, residual, post, comb, bf16_mix):
    hc, d = residual.shape[-2], residual.shape[-1]
    t = residual.numel() // (hc * d)
    out = torch.empty(residual.shape, dtype=x.dtype, device=x.device)
    cfg = U.block_config("mhc", x.device)
    bt = cfg["BLOCK_T_POST"]
    bd = min(cfg["BLOCK_D_POST"], U.next_pow2(d))
    _hc_post_fwd_kernel[(U.cdiv(t, bt), U.cdiv(d, bd))](
        x, residual, post.float().contiguous(), comb.float().contiguous(), U.out_view(out), t, d,
        HC=hc, BLOCK_T=bt, BLOCK_D=bd, BF16_MIX=bf16_mix, OUT_KIND=U.out_kind(x.dtype))
    return out
