"""Triton kernels for the MoE router and the routed experts (SPEC §11).

``moe_gate``: one program per token block computes the gate GEMM, ``sqrt(softplus)``, the
top-k on ``score + bias`` (k rounds of arg-max over unique 64-bit (score, index) keys, ties to
the lower expert) or the
hash lookup, and the normalised, scaled weights.

``moe_experts`` (SPEC §11.4): the (token, slot) pairs are sorted by expert on the device (no
host synchronisation); a tile map built with ``searchsorted`` sends every program to one M-tile
of one expert's contiguous segment (experts with zero tokens own no tile; spare programs exit).
Kernel 1 is the gate/up grouped GEMM with the SwiGLU clamp (and the [OFF] routing weight)
fused; kernel 2 the down grouped GEMM; kernel 3 un-permutes and reduces the k rows of each
token in fp32. For FP8/FP4 weights the activation quantiser of SPEC §4.8 (``act_quant`` block
128, power-of-two scales) runs on the fly on each 128-wide K tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._registry import register_kernel
from ... import triton_utils as U
from ...triton_utils import e2m1_decode, e4m3_decode, e4m3_encode, exp2_int, load_scale, pow2_scale_bits, round_to_out, store_out


# --------------------------------------------------------------------------------------------
# Router (SPEC §11.1, §11.2)
# --------------------------------------------------------------------------------------------


@triton.jit
def _log1p(y):
    """Accurate log(1 + y) for y >= 0 (Kahan: log(u)·y/(u−1) with u = 1 + y)."""
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))


@triton.jit
def _moe_gate_fwd_kernel(
    x_ptr, w_ptr, b_ptr, t2e_ptr, tid_ptr, ow_ptr, oi_ptr, ol_ptr, T, D, E, route_scale,
    TOPK: tl.constexpr, TKP: tl.constexpr, EP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HASH: tl.constexpr, HF_EPS: tl.constexpr, DOT_BF16: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    e = tl.arange(0, EP)
    em = e < E
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, EP), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + kk
        km = k < D
        x = tl.load(x_ptr + t[:, None].to(tl.int64) * D + k[None, :], mask=tm[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptr + e[:, None].to(tl.int64) * D + k[None, :], mask=em[:, None] & km[None, :], other=0.0)
        if DOT_BF16:
            acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), out_dtype=tl.float32)
        else:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    # router logits out (fp32)
    tl.store(ol_ptr + t[:, None].to(tl.int64) * E + e[None, :], acc, mask=tm[:, None] & em[None, :])
    # sqrt(softplus(l)), softplus with torch's threshold 20
    s = tl.sqrt_rn(tl.where(acc > 20.0, acc, _log1p(tl.exp(tl.minimum(acc, 20.0)))))
    c = tl.arange(0, TKP)
    ids = tl.zeros((BLOCK_T, TKP), tl.int32)
    if HASH:
        tid = tl.load(tid_ptr + t, mask=tm, other=0).to(tl.int64)
        ids = tl.load(t2e_ptr + tid[:, None] * TOPK + c[None, :], mask=tm[:, None] & (c[None, :] < TOPK), other=0).to(tl.int32)
    else:
        sel = s
        if HAS_BIAS:
            sel = s + tl.load(b_ptr + e, mask=em, other=0.0)[None, :]
        sel = sel + 0.0
        b = sel.to(tl.uint32, bitcast=True)
        flip = tl.where((b >> 31) == 1, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
        key = ((b ^ flip).to(tl.uint64) << 32) | (0xFFFFFFFF - e.to(tl.uint32)).to(tl.uint64)[None, :]
        key = tl.where(em[None, :], key, 0)
        # TOPK rounds of arg-max over unique keys (cheaper than a sort for k = 6 of E)
        for j in tl.static_range(TOPK):
            kj = tl.max(key, axis=1)
            ids = tl.where(c[None, :] == j, (0xFFFFFFFF - (kj & 0xFFFFFFFF)).to(tl.int32)[:, None], ids)
            key = tl.where(key == kj[:, None], 0, key)
    # weights use the unbiased scores: gather s at the chosen experts
    wsel = tl.zeros((BLOCK_T, TKP), tl.float32)
    for j in tl.static_range(TOPK):
        idj = tl.sum(tl.where(c[None, :] == j, ids, 0), axis=1)
        sj = tl.sum(tl.where(e[None, :] == idj[:, None], s, 0.0), axis=1)
        wsel = tl.where(c[None, :] == j, sj[:, None], wsel)
    den = tl.sum(wsel, axis=1)
    if HF_EPS:
        den = den + 1e-20
    wout = (wsel / den[:, None]) * route_scale
    om = tm[:, None] & (c[None, :] < TOPK)
    tl.store(ow_ptr + t[:, None] * TOPK + c[None, :], wout, mask=om)
    tl.store(oi_ptr + t[:, None] * TOPK + c[None, :], ids, mask=om)


_GATE_MAX_E = 1024


@register_kernel(
    "triton", "moe_gate",
    refusals=lambda x, weight, bias, tid2eid, token_ids, topk, route_scale, hf_eps, hf_routing: (
        ([] if weight.shape[0] <= _GATE_MAX_E
         else [f"triton moe_gate holds all experts in one tile: E must be <= {_GATE_MAX_E}, got {weight.shape[0]}"])
        + ([] if not hf_routing or x.dtype == torch.float32
           else [f"triton moe_gate implements hf_routing (x.dtype rounding) only for float32 x, got {x.dtype}"])),
)
def moe_gate(x, weight, bias, tid2eid, token_ids, topk, route_scale, hf_eps, hf_routing):
    # hf_routing with fp32 x: every rounding to x.dtype is exact, so it is the fp32 path below
    t, d = x.shape
    e = weight.shape[0]
    ow = torch.empty((t, topk), dtype=torch.float32, device=x.device)
    oi = torch.empty((t, topk), dtype=torch.int32, device=x.device)
    ol = torch.empty((t, e), dtype=torch.float32, device=x.device)
    if t == 0:
        return ow, oi, ol
    bt = 16
    bk = min(U.block_config("moe_gate", x.device)["BLOCK_K"], max(16, U.next_pow2(d)))
    dot16 = U.dot_bf16(x.device) and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
    _moe_gate_fwd_kernel[(U.cdiv(t, bt),)](
        x, weight, bias.float().contiguous() if bias is not None else x, tid2eid.contiguous() if tid2eid is not None else x,
        token_ids.contiguous() if token_ids is not None else x, ow, oi, ol, t, d, e, route_scale,
        TOPK=topk, TKP=max(2, U.next_pow2(topk)), EP=max(16, U.next_pow2(e)), BLOCK_T=bt, BLOCK_K=bk,
        HAS_BIAS=bias is not None, HASH=tid2eid is not None, HF_EPS=hf_eps, DOT_BF16=dot16)
    return ow, oi, ol


# --------------------------------------------------------------------------------------------
# Routed experts (SPEC §11.3, §11.4)
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_gemm(
    a_ptr, a_rows, a_stride, am, w_ptr, ws_ptr, e, rn, N, K,
    WFMT: tl.constexpr, WS_UE8M0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_BF16: tl.constexpr,
):
    """fp32 ``A[a_rows] · W[e][rn]ᵀ`` over K. WFMT 0: float W (plain fp32-accumulated product);
    1: e4m3 W with 128x128 tile scales; 2: packed e2m1 W with 1x32 scales. For 1 and 2 the rows
    of A go through act_quant (block 128, power-of-two scales) on the fly (SPEC §4.8)."""
    nm = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    c = tl.arange(0, 128)
    arow = a_rows[:, None].to(tl.int64) * a_stride
    KT = (K + 127) // 128
    for kt in range(0, KT):
        k = kt * 128 + c
        km = k < K
        a = tl.load(a_ptr + arow + k[None, :], mask=am[:, None] & km[None, :], other=0.0).to(tl.float32)
        if WFMT == 0:
            w = tl.load(w_ptr + (e * N + rn[:, None]).to(tl.int64) * K + k[None, :], mask=nm[:, None] & km[None, :], other=0.0).to(tl.float32)
            if DOT_BF16:
                acc += tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), out_dtype=tl.float32)
            else:
                acc += tl.dot(a, tl.trans(w), input_precision="ieee")
        else:
            ks = pow2_scale_bits(tl.maximum(tl.max(tl.abs(a), axis=1), 1e-4), 1.0 / 448.0)
            aq = e4m3_decode(e4m3_encode(a * exp2_int(-ks)[:, None]))
            sa = exp2_int(ks)
            if WFMT == 1:
                w = e4m3_decode(tl.load(w_ptr + (e * N + rn[:, None]).to(tl.int64) * K + k[None, :], mask=nm[:, None], other=0))
                if DOT_BF16:
                    p = tl.dot(aq.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), out_dtype=tl.float32)
                else:
                    p = tl.dot(aq, tl.trans(w), input_precision="ieee")
                sw = load_scale(ws_ptr + (e * ((N + 127) // 128) + rn // 128) * KT + kt, nm, WS_UE8M0)
                acc += p * sa[:, None] * sw[None, :]
            else:
                # four 32-wide slices, each with its own weight scale (SPEC §4.7)
                j = tl.arange(0, 16)
                aq3 = tl.reshape(aq, (BLOCK_M, 4, 32))
                for sub in tl.static_range(4):
                    a_sub = tl.sum(tl.where(tl.arange(0, 4)[None, :, None] == sub, aq3, 0.0), axis=1)
                    byte = tl.load(w_ptr + (e * N + rn[:, None]).to(tl.int64) * (K // 2) + kt * 64 + sub * 16 + j[None, :], mask=nm[:, None], other=0).to(tl.int32)
                    w = tl.join(e2m1_decode(byte), e2m1_decode(byte >> 4)).reshape(BLOCK_N, 32)
                    if DOT_BF16:
                        p = tl.dot(a_sub.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), out_dtype=tl.float32)
                    else:
                        p = tl.dot(a_sub, tl.trans(w), input_precision="ieee")
                    sw = load_scale(ws_ptr + (e * N + rn).to(tl.int64) * (K // 32) + kt * 4 + sub, nm, WS_UE8M0)
                    acc += p * sa[:, None] * sw[None, :]
    return acc


@triton.jit
def _tile_rows(tile_e_ptr, tile_first_ptr, seg_start_ptr, seg_cnt_ptr, p, E, BLOCK_M: tl.constexpr):
    e = tl.load(tile_e_ptr + p)
    ec = tl.minimum(e, E - 1)
    local = p - tl.load(tile_first_ptr + ec)
    start = tl.load(seg_start_ptr + ec)
    cnt = tl.load(seg_cnt_ptr + ec)
    r = local * BLOCK_M + tl.arange(0, BLOCK_M)
    return e, ec, start + r, (r < cnt) & (e < E)


@triton.jit
def _moe_up_kernel(
    x_ptr, order_ptr, tw_ptr, w1_ptr, w1s_ptr, w3_ptr, w3s_ptr, h_ptr,
    tile_e_ptr, tile_first_ptr, seg_start_ptr, seg_cnt_ptr, E, D, I, TOPK, limit,
    WFMT: tl.constexpr, WS_UE8M0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WEIGHT_BEFORE: tl.constexpr, DOT_BF16: tl.constexpr, X_KIND: tl.constexpr,
):
    e, ec, rows, rm = _tile_rows(tile_e_ptr, tile_first_ptr, seg_start_ptr, seg_cnt_ptr, tl.program_id(0), E, BLOCK_M)
    if e < E:
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        pair = tl.load(order_ptr + rows, mask=rm, other=0)
        tok = pair // TOPK
        g = _tile_gemm(x_ptr, tok, D, rm, w1_ptr, w1s_ptr, ec, rn, I, D, WFMT, WS_UE8M0, BLOCK_M, BLOCK_N, DOT_BF16)
        u = _tile_gemm(x_ptr, tok, D, rm, w3_ptr, w3s_ptr, ec, rn, I, D, WFMT, WS_UE8M0, BLOCK_M, BLOCK_N, DOT_BF16)
        # each Linear returns x.dtype; SwiGLU with clamp in fp32 (SPEC §11.3)
        g = round_to_out(g, X_KIND)
        u = round_to_out(u, X_KIND)
        if limit > 0:
            u = tl.minimum(tl.maximum(u, -limit), limit)
            g = tl.minimum(g, limit)
        h = g * tl.sigmoid(g) * u
        if WEIGHT_BEFORE:
            h = h * tl.load(tw_ptr + pair, mask=rm, other=0.0).to(tl.float32)[:, None]
        store_out(h_ptr + rows[:, None].to(tl.int64) * I + rn[None, :], h, rm[:, None] & (rn[None, :] < I), X_KIND)


@triton.jit
def _moe_down_kernel(
    h_ptr, order_ptr, tw_ptr, w2_ptr, w2s_ptr, y_ptr,
    tile_e_ptr, tile_first_ptr, seg_start_ptr, seg_cnt_ptr, E, D, I,
    WFMT: tl.constexpr, WS_UE8M0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WEIGHT_BEFORE: tl.constexpr, DOT_BF16: tl.constexpr, X_KIND: tl.constexpr,
):
    e, ec, rows, rm = _tile_rows(tile_e_ptr, tile_first_ptr, seg_start_ptr, seg_cnt_ptr, tl.program_id(0), E, BLOCK_M)
    if e < E:
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        y = _tile_gemm(h_ptr, rows, I, rm, w2_ptr, w2s_ptr, ec, rn, D, I, WFMT, WS_UE8M0, BLOCK_M, BLOCK_N, DOT_BF16)
        y = round_to_out(y, X_KIND)
        if not WEIGHT_BEFORE:
            pair = tl.load(order_ptr + rows, mask=rm, other=0)
            y = y * tl.load(tw_ptr + pair, mask=rm, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rows[:, None].to(tl.int64) * D + rn[None, :], y, mask=rm[:, None] & (rn[None, :] < D))


@triton.jit
def _moe_reduce_kernel(
    y_ptr, inv_ptr, ids_ptr, o_ptr, T, D, TOPK,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, OUT_KIND: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tm = t < T
    m = tm[:, None] & (d[None, :] < D)
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for j in range(0, TOPK):
        ok = tm & (tl.load(ids_ptr + t * TOPK + j, mask=tm, other=-1) >= 0)
        r = tl.load(inv_ptr + t * TOPK + j, mask=ok, other=0)
        acc += tl.load(y_ptr + r[:, None].to(tl.int64) * D + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0)
    store_out(o_ptr + t[:, None].to(tl.int64) * D + d[None, :], acc, m, OUT_KIND)


def _wfmt(w: torch.Tensor) -> int:
    if w.dtype == torch.float8_e4m3fn:
        return 1
    if w.dtype in (torch.uint8, torch.int8, torch.float4_e2m1fn_x2):
        return 2
    return 0


def _experts_refusals(x, tw, ids, w1, w1_s, w3, w3_s, w2, w2_s, swiglu_limit, weight_after_w2, out_dtype, hf_rounding) -> list[str]:
    if hf_rounding and (x.dtype != torch.float32 or out_dtype != torch.float32):
        return [f"triton moe_experts implements hf_rounding only for float32 x and output, got {x.dtype} -> {out_dtype}"]
    fm = {_wfmt(w1), _wfmt(w3), _wfmt(w2)}
    if len(fm) != 1:
        return ["triton moe_experts needs w1, w3 and w2 in one storage format"]
    if len({None if s is None else s.dtype for s in (w1_s, w3_s, w2_s)}) != 1:
        return ["triton moe_experts needs w1_s, w3_s and w2_s in one scale dtype"]
    return []


@register_kernel("triton", "moe_experts", refusals=_experts_refusals)
def moe_experts(x, topk_weights, topk_ids, w1, w1_s, w3, w3_s, w2, w2_s, swiglu_limit, weight_after_w2, out_dtype,
                hf_rounding):
    # hf_rounding with fp32 x and output: every intermediate rounding is exact (same as the default)
    t, d = x.shape
    k = topk_ids.shape[1]
    n_exp, inter = w1.shape[0], w1.shape[1]
    dev = x.device
    out = torch.empty((t, d), dtype=out_dtype, device=dev)
    if t == 0 or k == 0:
        return out.zero_()
    fmt = _wfmt(w1)
    cfg = U.block_config("moe", dev)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    # expert-sorted segments, all on the device (−1 pairs sort last, into a dropped bucket E)
    flat = topk_ids.reshape(-1).long()
    key = torch.where(flat < 0, n_exp, flat)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n_exp + 1)[:n_exp]
    seg_start = torch.cumsum(counts, 0) - counts
    tiles = (counts + bm - 1) // bm
    tile_end = torch.cumsum(tiles, 0)
    n_tiles = U.cdiv(t * k, bm) + n_exp  # upper bound on Σ tiles
    tile_e = torch.searchsorted(tile_end, torch.arange(n_tiles, device=dev), right=True)
    tile_first = tile_end - tiles
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=dev)
    tw = topk_weights.reshape(-1).float().contiguous()
    order32 = order.to(torch.int32)
    meta_t = (tile_e.to(torch.int32), tile_first.to(torch.int32), seg_start.to(torch.int32), counts.to(torch.int32))
    s1, ue = U.scale_args(w1_s) if w1_s is not None else (x, False)
    s3 = U.scale_args(w3_s)[0] if w3_s is not None else x
    s2 = U.scale_args(w2_s)[0] if w2_s is not None else x
    ww = (lambda w: w.view(torch.uint8)) if fmt else (lambda w: w.contiguous())
    dot16 = U.dot_bf16(dev) and (fmt != 0 or (x.dtype == torch.bfloat16 and w1.dtype == torch.bfloat16))
    xk = U.out_kind(x.dtype)
    h = torch.empty((t * k, inter), dtype=x.dtype, device=dev)
    _moe_up_kernel[(n_tiles, U.cdiv(inter, bn))](
        x, order32, tw, ww(w1), s1, ww(w3), s3, U.out_view(h), *meta_t, n_exp, d, inter, k, float(swiglu_limit),
        WFMT=fmt, WS_UE8M0=ue, BLOCK_M=bm, BLOCK_N=bn, WEIGHT_BEFORE=not weight_after_w2, DOT_BF16=dot16, X_KIND=xk)
    y = torch.empty((t * k, d), dtype=torch.float32, device=dev)
    _moe_down_kernel[(n_tiles, U.cdiv(d, bn))](
        h, order32, tw, ww(w2), s2, y, *meta_t, n_exp, d, inter,
        WFMT=fmt, WS_UE8M0=ue, BLOCK_M=bm, BLOCK_N=bn, WEIGHT_BEFORE=not weight_after_w2, DOT_BF16=dot16, X_KIND=xk)
    bt, bd = 16, min(256, U.next_pow2(d))
    _moe_reduce_kernel[(U.cdiv(t, bt), U.cdiv(d, bd))](
        y, inv.to(torch.int32), topk_ids.to(torch.int32).contiguous(), U.out_view(out), t, d, k,
        BLOCK_T=bt, BLOCK_D=bd, OUT_KIND=U.out_kind(out_dtype))
    return out
