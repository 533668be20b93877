"""Triton kernels for the KV compressor (SPEC §6): fused projections, incremental state update,
gated softmax pooling of every closed window, RMSNorm, RoPE at ``j·ratio`` and the FP8 / FP4
quantisation simulation.

Three launches per call, none of which reads ``n_tokens`` on the host (sequences of one batch may
sit at different positions; every kernel loads its row's position from the device tensor):

1. ``_proj_kernel`` (twice: kv, gate): ``[B·S, D] · [W, D]ᵀ`` tiles with ``tl.dot`` and fp32
   accumulation; the gate pass adds ``ape[p % ratio]`` (SPEC §6.2).
2. ``_pool_kernel``, one program per (sequence, output row): the slots of window ``j`` are read
   from the *timeline* of the sequence (the open window's pending rows, then the call's new
   rows) and, for CSA, the Ca/Za halves of window ``j − 1`` (from the timeline, or from
   ``prev_*`` when ``j − 1`` closed in an earlier call; nothing for window 0). Two passes over
   slot tiles (max, then exp-weighted sums) give the channel-wise softmax pooling (SPEC §6.3);
   the pooled vector is then rounded to ``x.dtype``, RMS-normalised, rotated and quantised in
   registers. Rows past the sequence's ``num_new`` are written as zeros.
3. ``_state_kernel``: the new canonical state (open-window rows, ``0`` / ``−inf`` elsewhere; the
   Ca/Za halves of the last closed window) and ``num_new``.

The head dimension is processed as (even, odd) lanes: lane ``i`` holds dims ``2i`` and ``2i+1``,
so RoPE pairs are lane-local, FP8 blocks of 64 dims are 32 lanes, FP4 blocks of 32 dims are 16
lanes, and the Sylvester Hadamard of order ``hd`` is a butterfly over an order ``hd/2`` matrix:
``y[2a] = Σ_c H[a,c]·(x[2c] + x[2c+1])``, ``y[2a+1] = Σ_c H[a,c]·(x[2c] − x[2c+1])``.
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
    pow2_scale_bits,
    round_to_out,
    store_out,
)
from ..quant.triton import HADAMARD_MAX, hadamard_tile

_QUANT_CODE = {"none": 0, "fp8": 1, "fp4": 2}
FP8_AMAX_MIN = tl.constexpr(1e-4)
FP4_AMAX_MIN = tl.constexpr(6.0 * 2.0**-126)


# --------------------------------------------------------------------------------------------
# 1. projections
# --------------------------------------------------------------------------------------------


@triton.jit
def _proj_kernel(
    x_ptr, w_ptr, ape_ptr, n_ptr, o_ptr, M, S, D, W, ratio,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IS_GATE: tl.constexpr,
    DOT_BF16: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = rm < M
    nm = rn < W
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + rk
        km = kk < D
        a = tl.load(x_ptr + rm[:, None].to(tl.int64) * D + kk[None, :], mask=mm[:, None] & km[None, :], other=0.0).to(tl.float32)
        # the weight tile is loaded as [BLOCK_K, BLOCK_N] (Wᵀ) directly: no transpose op
        bt = tl.load(w_ptr + rn[None, :].to(tl.int64) * D + kk[:, None], mask=km[:, None] & nm[None, :], other=0.0).to(tl.float32)
        if DOT_BF16:  # bf16 inputs are exact in bf16: full-rate MMA, fp32 accumulation
            acc += tl.dot(a.to(tl.bfloat16), bt.to(tl.bfloat16), out_dtype=tl.float32)
        else:
            acc += tl.dot(a, bt, input_precision="ieee")
    if IS_GATE:
        # gate logits carry the in-window position bias ape[p % ratio] (SPEC §6.2)
        n0 = tl.load(n_ptr + rm // S, mask=mm, other=0)
        slot = ((n0 + (rm % S)) % ratio).to(tl.int32)
        acc += tl.load(ape_ptr + slot[:, None] * W + rn[None, :], mask=mm[:, None] & nm[None, :], other=0.0)
    tl.store(o_ptr + rm[:, None].to(tl.int64) * W + rn[None, :], acc, mask=mm[:, None] & nm[None, :])


# --------------------------------------------------------------------------------------------
# timeline access shared by the pooling and state kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _timeline_rows(pend_ptr, new_ptr, b, ti, valid, col, cmask, k, S, ratio, W, other):
    """Rows ``ti`` of sequence ``b``'s timeline at columns ``col``: timeline row ``i`` is pending
    slot ``i`` for ``i < k`` (positions ``n0 − k … n0 − 1``), else new row ``i − k``; ``other``
    where ``valid`` is false."""
    fp = valid & (ti < k)
    fn = valid & (ti >= k)
    rp = (b * ratio + ti).to(tl.int64)
    rn = (b * S + ti - k).to(tl.int64)
    a = tl.load(pend_ptr + rp[:, None] * W + col[None, :], mask=fp[:, None] & cmask[None, :], other=other)
    c = tl.load(new_ptr + rn[:, None] * W + col[None, :], mask=fn[:, None] & cmask[None, :], other=other)
    return tl.where(fp[:, None], a, c)


@triton.jit
def _slot_addr(b, w, j, t, tv, col, cmask, k, S, ratio, W, hd, PREV: tl.constexpr):
    """Where the slots ``t [BLOCK_S]`` of one pooling segment of windows ``w [BW]`` (absolute
    index ``j``) live, at columns ``col [HALF, 2]``: the Cb (or HCA) rows of each window itself,
    or (``PREV``) the Ca rows of window w−1, which sit in the timeline or, for the first window
    of the call, in ``prev_*`` (none for window 0). ``tv [BW, BLOCK_S]`` marks real slots.

    Returns masks and offsets ``(in_pending, in_new, off_pending, off_new, in_prev, off_prev)``,
    all ``[BW, BLOCK_S, HALF, 2]``."""
    c4 = col[None, None, :, :]
    m4 = cmask[None, None, :, :]
    if PREV:
        in_tl = tv & (w > 0)[:, None]
        ti = (w[:, None] - 1) * ratio + t[None, :]
    else:
        in_tl = tv
        ti = w[:, None] * ratio + t[None, :]
    fp = (in_tl & (ti < k))[:, :, None, None] & m4
    fn = (in_tl & (ti >= k))[:, :, None, None] & m4
    rp = (b * ratio + ti).to(tl.int64)[:, :, None, None] * W + c4
    rn = (b * S + ti - k).to(tl.int64)[:, :, None, None] * W + c4
    if PREV:
        in_st = (tv & ((w == 0) & (j > 0))[:, None])[:, :, None, None] & m4  # window 0: no predecessor
        rv = (b * ratio + t).to(tl.int64)[None, :, None, None] * hd + c4
    else:
        in_st = fp & (rp < 0)  # never
        rv = rp
    return fp, fn, rp, rn, in_st, rv


@triton.jit
def _slot_gather(pend_ptr, new_ptr, prev_ptr, fp, fn, rp, rn, in_st, rv, other, PREV: tl.constexpr):
    """Values at the addresses of :func:`_slot_addr`; ``other`` for slots that do not exist."""
    v = tl.where(fp, tl.load(pend_ptr + rp, mask=fp, other=0.0), tl.load(new_ptr + rn, mask=fn, other=other))
    if PREV:
        v = tl.where(in_st, tl.load(prev_ptr + rv, mask=in_st, other=0.0), v)
    return v


@triton.jit
def _lanes_to_blocks(v, BW: tl.constexpr, HALF: tl.constexpr, LANES: tl.constexpr):
    """Per-block maximum of ``v [BW, HALF]`` over blocks of ``LANES`` lanes, broadcast back."""
    blk = tl.max(tl.reshape(v, (BW, HALF // LANES, LANES)), axis=2)
    return tl.reshape(tl.broadcast_to(blk[:, :, None], (BW, HALF // LANES, LANES)), (BW, HALF))


# --------------------------------------------------------------------------------------------
# 2. pooling + RMSNorm + RoPE + quantisation simulation
# --------------------------------------------------------------------------------------------


@triton.jit
def _pool_kernel(
    pk_ptr, ps_ptr, nk_ptr, ns_ptr, vk_ptr, vs_ptr, n_ptr, nw_ptr, f_ptr, out_ptr,
    S, ratio, hd, W, NW, nope_half, eps, had_scale, inv_fp8, inv_fp4,
    OVERLAP: tl.constexpr, HALF: tl.constexpr, BW: tl.constexpr, BLOCK_S: tl.constexpr, QUANT: tl.constexpr,
    OUT_KIND: tl.constexpr,
):
    # one program: sequence b, output rows (windows of this call) w = wb·BW … wb·BW + BW − 1
    b = tl.program_id(0)
    w = tl.program_id(1) * BW + tl.arange(0, BW)
    n0 = tl.load(n_ptr + b)
    k = (n0 % ratio).to(tl.int32)
    nwin = (k + S) // ratio
    active = w < nwin
    j = n0 // ratio + w  # absolute window index (int64)

    i = tl.arange(0, HALF)
    col = 2 * i[:, None] + tl.arange(0, 2)[None, :]  # [HALF, 2]: lane i holds dims 2i, 2i+1
    cm = col < hd
    srow = tl.arange(0, BLOCK_S)
    cb = hd if OVERLAP else 0  # CSA: this window contributes its Cb / Zb halves

    # pass 1: per-feature maximum logit over all slots
    mx = tl.full((BW, HALF, 2), float("-inf"), tl.float32)
    if OVERLAP:
        for s0 in range(0, ratio, BLOCK_S):
            t = s0 + srow
            tv = active[:, None] & (t < ratio)[None, :]
            fp, fn, rp, rn, ist, rv = _slot_addr(b, w, j, t, tv, col, cm, k, S, ratio, W, hd, True)
            sc = _slot_gather(ps_ptr, ns_ptr, vs_ptr, fp, fn, rp, rn, ist, rv, float("-inf"), True)
            mx = tl.maximum(mx, tl.max(sc, axis=1))
    for s0 in range(0, ratio, BLOCK_S):
        t = s0 + srow
        tv = active[:, None] & (t < ratio)[None, :]
        fp, fn, rp, rn, ist, rv = _slot_addr(b, w, j, t, tv, cb + col, cm, k, S, ratio, W, hd, False)
        sc = _slot_gather(ps_ptr, ns_ptr, vs_ptr, fp, fn, rp, rn, ist, rv, float("-inf"), False)
        mx = tl.maximum(mx, tl.max(sc, axis=1))
    # inactive rows and padding lanes have no finite slot; keep their arithmetic NaN-free
    mx = tl.where(mx == float("-inf"), 0.0, mx)

    # pass 2: softmax numerator and denominator (slots with logit −inf weigh 0)
    den = tl.zeros((BW, HALF, 2), tl.float32)
    acc = tl.zeros((BW, HALF, 2), tl.float32)
    if OVERLAP:
        for s0 in range(0, ratio, BLOCK_S):
            t = s0 + srow
            tv = active[:, None] & (t < ratio)[None, :]
            fp, fn, rp, rn, ist, rv = _slot_addr(b, w, j, t, tv, col, cm, k, S, ratio, W, hd, True)
            sc = _slot_gather(ps_ptr, ns_ptr, vs_ptr, fp, fn, rp, rn, ist, rv, float("-inf"), True)
            kv = _slot_gather(pk_ptr, nk_ptr, vk_ptr, fp, fn, rp, rn, ist, rv, 0.0, True)
            e = tl.exp(sc - mx[:, None, :, :])
            den += tl.sum(e, axis=1)
            acc += tl.sum(e * kv, axis=1)
    for s0 in range(0, ratio, BLOCK_S):
        t = s0 + srow
        tv = active[:, None] & (t < ratio)[None, :]
        fp, fn, rp, rn, ist, rv = _slot_addr(b, w, j, t, tv, cb + col, cm, k, S, ratio, W, hd, False)
        sc = _slot_gather(ps_ptr, ns_ptr, vs_ptr, fp, fn, rp, rn, ist, rv, float("-inf"), False)
        kv = _slot_gather(pk_ptr, nk_ptr, vk_ptr, fp, fn, rp, rn, ist, rv, 0.0, False)
        e = tl.exp(sc - mx[:, None, :, :])
        den += tl.sum(e, axis=1)
        acc += tl.sum(e * kv, axis=1)
    keep = cm[None, :, :] & active[:, None, None]
    ye, yo = tl.split(tl.where(keep, acc / tl.where(keep, den, 1.0), 0.0))  # [BW, HALF] each
    me = (2 * i < hd)[None, :]
    mo = (2 * i + 1 < hd)[None, :]

    # pooled vector -> x.dtype, RMSNorm with fp32 weight product, one rounding (SPEC §5.1, §6.3)
    ye = round_to_out(ye, OUT_KIND)
    yo = round_to_out(yo, OUT_KIND)
    ms = (tl.sum(ye * ye, axis=1) + tl.sum(yo * yo, axis=1)) / hd
    inv = tl.div_rn(1.0, tl.sqrt_rn(ms + eps))[:, None]
    ye = round_to_out(ye * inv * tl.load(nw_ptr + 2 * i, mask=2 * i < hd, other=0.0).to(tl.float32)[None, :], OUT_KIND)
    yo = round_to_out(yo * inv * tl.load(nw_ptr + 2 * i + 1, mask=2 * i + 1 < hd, other=0.0).to(tl.float32)[None, :], OUT_KIND)

    # RoPE on the trailing r dims (lanes >= nope_half) at position j·ratio (SPEC §3.3-3.4)
    q = i - nope_half
    rope = ((q >= 0) & (2 * i + 1 < hd))[None, :]
    f = tl.load(f_ptr + q, mask=(q >= 0) & (2 * i + 1 < hd), other=0.0)
    ang = (j * ratio).to(tl.float32)[:, None] * f[None, :]
    cs = tl.cos(ang)
    sn = tl.sin(ang)
    re = round_to_out(ye * cs - yo * sn, OUT_KIND)
    im = round_to_out(ye * sn + yo * cs, OUT_KIND)
    ye = tl.where(rope, re, ye)
    yo = tl.where(rope, im, yo)

    if QUANT == 1:
        # main compressor: FP8 e4m3, pow2 scale per 64 dims (32 lanes), nope dims only (SPEC §4.3)
        amax = tl.maximum(_lanes_to_blocks(tl.maximum(tl.abs(ye), tl.abs(yo)), BW, HALF, 32), FP8_AMAX_MIN)
        kx = pow2_scale_bits(amax, inv_fp8)
        s = exp2_int(kx)
        rs = exp2_int(-kx)
        qe = round_to_out(e4m3_decode(e4m3_encode(ye * rs)) * s, OUT_KIND)
        qo = round_to_out(e4m3_decode(e4m3_encode(yo * rs)) * s, OUT_KIND)
        nope = (i < nope_half)[None, :]
        ye = tl.where(nope, qe, ye)
        yo = tl.where(nope, qo, yo)
    elif QUANT == 2:
        # indexer compressor: Hadamard over all hd dims (SPEC §4.5), then FP4 block 32 (SPEC §4.4)
        h = hadamard_tile(HALF)[None, :, :]
        ssum = (ye + yo)[:, None, :]
        sdif = (ye - yo)[:, None, :]
        ye = round_to_out(tl.sum(h * ssum, axis=2) * had_scale, OUT_KIND)
        yo = round_to_out(tl.sum(h * sdif, axis=2) * had_scale, OUT_KIND)
        amax = tl.maximum(_lanes_to_blocks(tl.maximum(tl.abs(ye), tl.abs(yo)), BW, HALF, 16), FP4_AMAX_MIN)
        kx = pow2_scale_bits(amax, inv_fp4)
        s = exp2_int(kx)
        rs = exp2_int(-kx)
        ye = round_to_out(e2m1_decode(e2m1_encode(ye * rs)) * s, OUT_KIND)
        yo = round_to_out(e2m1_decode(e2m1_encode(yo * rs)) * s, OUT_KIND)

    # rows past num_new are zeros
    y = tl.where(active[:, None, None], tl.join(ye, yo), 0.0)
    row = (b * NW + w).to(tl.int64)[:, None, None] * hd
    store_out(out_ptr + row + col[None, :, :], y, (w < NW)[:, None, None] & cm[None, :, :], OUT_KIND)


# --------------------------------------------------------------------------------------------
# 3. new state
# --------------------------------------------------------------------------------------------


@triton.jit
def _state_kernel(
    pk_ptr, ps_ptr, nk_ptr, ns_ptr, vk_ptr, vs_ptr, n_ptr, opk_ptr, ops_ptr, ovk_ptr, ovs_ptr, num_ptr,
    S, ratio, W, hd,
    OVERLAP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
):
    b = tl.program_id(0)
    tb = tl.program_id(1)
    n0 = tl.load(n_ptr + b)
    k = (n0 % ratio).to(tl.int32)
    nwin = (k + S) // ratio
    rem = k + S - nwin * ratio  # tokens of the (new) open window
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < ratio
    keep = tm & (t < rem)
    orow = (b * ratio + t).to(tl.int64)
    c = tl.arange(0, BLOCK_W)
    # pending rows of the open window; canonical 0 / −inf in every other slot
    for c0 in range(0, W, BLOCK_W):
        col = c0 + c
        cm = col < W
        kv = _timeline_rows(pk_ptr, nk_ptr, b, nwin * ratio + t, keep, col, cm, k, S, ratio, W, 0.0)
        sc = _timeline_rows(ps_ptr, ns_ptr, b, nwin * ratio + t, keep, col, cm, k, S, ratio, W, float("-inf"))
        om = tm[:, None] & cm[None, :]
        tl.store(opk_ptr + orow[:, None] * W + col[None, :], kv, mask=om)
        tl.store(ops_ptr + orow[:, None] * W + col[None, :], sc, mask=om)
    if OVERLAP:
        # Ca / Za halves of the last window this call closed; unchanged if it closed none
        closed = nwin > 0
        for c0 in range(0, hd, BLOCK_W):
            col = c0 + c
            cm = col < hd
            om = tm[:, None] & cm[None, :]
            kv = _timeline_rows(pk_ptr, nk_ptr, b, (nwin - 1) * ratio + t, tm & closed, col, cm, k, S, ratio, W, 0.0)
            sc = _timeline_rows(ps_ptr, ns_ptr, b, (nwin - 1) * ratio + t, tm & closed, col, cm, k, S, ratio, W, 0.0)
            old_m = om & (nwin == 0)
            okv = tl.load(vk_ptr + orow[:, None] * hd + col[None, :], mask=old_m, other=0.0)
            osc = tl.load(vs_ptr + orow[:, None] * hd + col[None, :], mask=old_m, other=0.0)
            tl.store(ovk_ptr + orow[:, None] * hd + col[None, :], tl.where(closed, kv, okv), mask=om)
            tl.store(ovs_ptr + orow[:, None] * hd + col[None, :], tl.where(closed, sc, osc), mask=om)
    tl.store(num_ptr + b, nwin.to(tl.int32), mask=tb == 0)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------


def _refusals(x, wkv, wgate, ape, norm_weight, freqs, *rest) -> list[str]:
    hd = norm_weight.shape[0]
    quant = rest[-3]
    reasons = []
    if rest[-1] and x.dtype != torch.float32:
        reasons.append(f"triton compress_kv implements hf_rounding only for float32 x, got {x.dtype}")
    if hd % 2:
        reasons.append(f"triton compress_kv processes head_dim as (even, odd) lanes: head_dim must be even, got {hd}")
    if quant == "fp4" and hd > HADAMARD_MAX:
        reasons.append(f"triton compress_kv holds the Hadamard matrix in one tile: quant='fp4' needs head_dim <= {HADAMARD_MAX}, got {hd}")
    return reasons


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


@register_kernel("triton", "compress_kv", refusals=_refusals)
def compress_kv(
    x: torch.Tensor,
    wkv: torch.Tensor,
    wgate: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    freqs: torch.Tensor,
    pending_kv: torch.Tensor,
    pending_score: torch.Tensor,
    prev_kv: torch.Tensor,
    prev_score: torch.Tensor,
    n_tokens: torch.Tensor,
    ratio: int,
    quant: str,
    eps: float,
    hf_rounding: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # hf_rounding is only accepted for fp32 x (see _refusals), where it is the default math
    bsz, s, d = x.shape
    hd = norm_weight.shape[0]
    r = 2 * freqs.shape[0]
    width = wkv.shape[0]  # coff·hd
    overlap = width == 2 * hd  # overlapping (CSA) windows: wkv holds both halves
    dev = x.device
    cfg = U.block_config("compressor", dev)
    f32 = dict(dtype=torch.float32, device=dev)

    # 1. projections of the call's tokens: kv [B·S, W], gate logits + ape [B·S, W]
    m_rows = bsz * s
    kv_new = torch.empty(m_rows, width, **f32)
    sc_new = torch.empty(m_rows, width, **f32)
    bm = min(cfg["BLOCK_M"], max(16, U.next_pow2(m_rows)))
    bn = min(cfg["BLOCK_N"], max(16, U.next_pow2(width)))
    bk = min(cfg["BLOCK_K"], max(16, U.next_pow2(d)))
    grid = (U.cdiv(m_rows, bm), U.cdiv(width, bn))
    for w_, out, gate in ((wkv, kv_new, False), (wgate, sc_new, True)):
        _proj_kernel[grid](
            x, w_, ape, n_tokens, out, m_rows, s, d, width, ratio, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IS_GATE=gate,
            DOT_BF16=U.dot_bf16(dev) and x.dtype == w_.dtype == torch.bfloat16)

    # 2. entries of every window the call closes
    nw = U.cdiv(s, ratio)
    entries = torch.empty(bsz, nw, hd, dtype=x.dtype, device=dev)
    # lanes: hd/2 exactly for the Hadamard butterfly; >= 32 so an FP8 block (32 lanes) fits
    half = U.next_pow2(hd) // 2
    if quant == "fp8":
        half = max(half, 32)
    bs = min(cfg["BLOCK_S"], U.next_pow2(ratio))
    # windows per program: many under the interpreter (per-op cost), bounded tile size
    bw = max(1, min(cfg["BLOCK_WIN"], U.next_pow2(nw), cfg["POOL_TILE"] // (bs * 2 * half)))
    _pool_kernel[(bsz, U.cdiv(nw, bw))](
        pending_kv, pending_score, kv_new, sc_new, prev_kv, prev_score, n_tokens, norm_weight, freqs,
        U.out_view(entries), s, ratio, hd, width, nw, (hd - r) // 2, float(eps), _f32(hd**-0.5),
        _f32(1.0 / U.FP8_MAX), _f32(1.0 / U.FP4_MAX),
        OVERLAP=overlap, HALF=half, BW=bw, BLOCK_S=bs, QUANT=_QUANT_CODE[quant],
        OUT_KIND=U.out_kind(x.dtype))

    # 3. new state and per-sequence entry counts
    new_pkv = torch.empty_like(pending_kv)
    new_psc = torch.empty_like(pending_score)
    new_vkv = torch.empty_like(prev_kv)
    new_vsc = torch.empty_like(prev_score)
    num_new = torch.empty(bsz, dtype=torch.int32, device=dev)
    bt = min(cfg["BLOCK_T"], U.next_pow2(ratio))
    _state_kernel[(bsz, U.cdiv(ratio, bt))](
        pending_kv, pending_score, kv_new, sc_new, prev_kv, prev_score, n_tokens, new_pkv, new_psc, new_vkv, new_vsc,
        num_new, s, ratio, width, hd, OVERLAP=overlap, BLOCK_T=bt, BLOCK_W=min(cfg["BLOCK_W"], U.next_pow2(width)))
    return entries, num_new, new_pkv, new_psc, new_vkv, new_vsc, n_tokens + s
