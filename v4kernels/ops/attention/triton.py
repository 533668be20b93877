"""Triton kernels for sparse attention with sink (SPEC §9.2), the 584-byte FP8 KV row format
(SPEC §13.1) and the grouped output projection (SPEC §9.4).

``sparse_attn`` has two paths over one gather/online-softmax body:

* prefill (``M > 1``): one program per (token, head block) walks the whole index list and
  finalises in place (sink added to the denominator after the last block);
* decode (``M == 1``, or too few programs to fill the device): the index list is split across
  programs, each writes a partial softmax state (running max, denominator, unnormalised output)
  and a combine kernel merges them: ``m = max m_s``, ``l = Σ l_s·e^{m_s−m}`` (+ the sink),
  ``o = Σ acc_s·e^{m_s−m} / l``.

Packed FP8 KV rows are dequantised in the gather: e4m3 nope bytes times their UE8M0 block scale,
rope dims from little-endian bf16 bytes, all with integer bit operations.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._registry import register_kernel
from ... import triton_utils as U
from ...triton_utils import bf16_rne_bits, e4m3_decode, e4m3_encode, exp2_int, pow2_scale_bits, store_out, ue8m0_decode

D_KV = 512
D_NOPE = 448
ROW_BYTES = 584
SCALE_OFF = 576


@triton.jit
def _load_kv_tile(kv_ptr, rows, valid, PACKED: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gather KV rows ``rows`` [BK] as an fp32 [BK, BLOCK_D] tile (invalid rows and the columns
    past the head dim ``D`` read as zeros). Packed rows are V4's (D = BLOCK_D = 512)."""
    d = tl.arange(0, BLOCK_D)
    if PACKED:
        base = rows[:, None].to(tl.int64) * 584
        is_nope = d[None, :] < 448
        nm = valid[:, None] & is_nope
        rm = valid[:, None] & (d[None, :] >= 448)
        code = tl.load(kv_ptr + base + d[None, :], mask=nm, other=0)
        sc = ue8m0_decode(tl.load(kv_ptr + base + 576 + d[None, :] // 64, mask=nm, other=0))
        rb = 448 + 2 * (d[None, :] - 448)
        lo = tl.load(kv_ptr + base + rb, mask=rm, other=0).to(tl.int32)
        hi = tl.load(kv_ptr + base + rb + 1, mask=rm, other=0).to(tl.int32)
        rope = ((lo | (hi << 8)) << 16).to(tl.float32, bitcast=True)
        return tl.where(is_nope, e4m3_decode(code) * sc, rope)
    else:
        return tl.load(kv_ptr + rows[:, None].to(tl.int64) * D + d[None, :], mask=valid[:, None] & (d < D)[None, :],
                       other=0.0).to(tl.float32)


@triton.jit
def _sparse_attn_fwd_kernel(
    q_ptr, kv_ptr, sink_ptr, idx_ptr, o_ptr, m_ws, l_ws, acc_ws,
    M, N, H, K, chunk, n_splits, scale,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PACKED: tl.constexpr, SPLIT: tl.constexpr,
    DOT_BF16: tl.constexpr, OUT_KIND: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)  # flattened (b, i)
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    b = r // M
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    d = tl.arange(0, BLOCK_D)
    hdm = hm[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + (r * H + h[:, None]).to(tl.int64) * D + d[None, :], mask=hdm, other=0.0).to(tl.float32)
    if DOT_BF16:
        qd = q.to(tl.bfloat16)
    mx = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    den = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    k_lo = sp * chunk
    k_hi = tl.minimum(k_lo + chunk, K)
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ko = k0 + kk
        idx = tl.load(idx_ptr + r.to(tl.int64) * K + ko, mask=ko < k_hi, other=-1)
        valid = idx >= 0
        kv = _load_kv_tile(kv_ptr, b * N + tl.where(valid, idx, 0), valid, PACKED, D, BLOCK_D)
        if DOT_BF16:
            kvd = kv.to(tl.bfloat16)
            s = tl.dot(qd, tl.trans(kvd), out_dtype=tl.float32)
        else:
            s = tl.dot(q, tl.trans(kv), input_precision="ieee")
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        new_mx = tl.maximum(mx, tl.max(s, axis=1))
        # a head with no valid key so far keeps max −inf; shift by 0 so exp gives 0, not NaN
        shift = tl.where(new_mx == float("-inf"), 0.0, new_mx)
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(mx - shift)
        den = den * alpha + tl.sum(p, axis=1)
        if DOT_BF16:
            pv = tl.dot(p.to(tl.bfloat16), kvd, out_dtype=tl.float32)
        else:
            pv = tl.dot(p, kv, input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        mx = new_mx
    if SPLIT:
        ws = (r * n_splits + sp) * H + h
        tl.store(m_ws + ws, mx, mask=hm)
        tl.store(l_ws + ws, den, mask=hm)
        tl.store(acc_ws + ws[:, None].to(tl.int64) * D + d[None, :], acc, mask=hdm)
    else:
        any_valid = mx > float("-inf")
        shift = tl.where(any_valid, mx, 0.0)
        # the sink: a virtual key with zero value, denominator only (SPEC §9.2)
        sink = tl.load(sink_ptr + h, mask=hm, other=0.0)
        den = den + tl.exp(sink - shift)
        o = tl.where(any_valid[:, None], acc / den[:, None], 0.0)
        store_out(o_ptr + (r * H + h[:, None]).to(tl.int64) * D + d[None, :], o, hdm, OUT_KIND)


@triton.jit
def _sparse_attn_combine_kernel(
    sink_ptr, o_ptr, m_ws, l_ws, acc_ws, H, n_splits,
    BLOCK_H: tl.constexpr, OUT_KIND: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    hb = tl.program_id(1)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    d = tl.arange(0, BLOCK_D)
    hdm = hm[:, None] & (d < D)[None, :]
    mx = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    for sp in range(0, n_splits):
        mx = tl.maximum(mx, tl.load(m_ws + (r * n_splits + sp) * H + h, mask=hm, other=float("-inf")))
    any_valid = mx > float("-inf")
    shift = tl.where(any_valid, mx, 0.0)
    den = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for sp in range(0, n_splits):
        ws = (r * n_splits + sp) * H + h
        w = tl.exp(tl.load(m_ws + ws, mask=hm, other=float("-inf")) - shift)
        den += tl.load(l_ws + ws, mask=hm, other=0.0) * w
        acc += tl.load(acc_ws + ws[:, None].to(tl.int64) * D + d[None, :], mask=hdm, other=0.0) * w[:, None]
    sink = tl.load(sink_ptr + h, mask=hm, other=0.0)
    den = den + tl.exp(sink - shift)
    o = tl.where(any_valid[:, None], acc / den[:, None], 0.0)
    store_out(o_ptr + (r * H + h[:, None]).to(tl.int64) * D + d[None, :], o, hdm, OUT_KIND)


def attn_splits(rows: int, head_blocks: int, k_total: int, m: int, device: torch.device) -> int:
    """How many programs share one index list (1 = prefill path, no combine)."""
    cfg = U.block_config("attn", device)
    max_splits = U.cdiv(k_total, cfg["SPLIT_MIN"])
    if U.target_kind(device) == "interpret":
        # decode always takes the split-K path here, so the CPU tests exercise the combine
        return min(8, max_splits) if m == 1 else 1
    progs = rows * head_blocks
    want = U.cdiv(2 * U.num_sms(device), progs)
    if m > 1 and progs >= U.num_sms(device):
        return 1
    return max(1, min(want, max_splits, 64))


#: largest head dim whose q, KV and output tiles fit one program (V4's 512)
D_MAX = D_KV


def _attn_refusals(q, kv, attn_sink, topk_idxs, softmax_scale) -> list[str]:
    if q.shape[-1] > D_MAX:
        return [f"triton sparse_attn holds a whole head in one tile: head dim must be <= {D_MAX}, got {q.shape[-1]}"]
    return []


@register_kernel("triton", "sparse_attn", refusals=_attn_refusals)
def sparse_attn(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    b, m, h, hd = q.shape
    n = kv.shape[1]
    k_total = topk_idxs.shape[2]
    bd = max(16, U.next_pow2(hd))  # tl.dot needs >= 16 along the reduction; extra columns are masked
    out = torch.empty_like(q)
    if k_total == 0 or n == 0:
        return out.zero_()
    packed = kv.dtype == torch.uint8
    cfg = U.block_config("attn", q.device)
    bh = min(cfg["BLOCK_H"], max(16, U.next_pow2(h)))
    bk = cfg["BLOCK_K"]
    rows = b * m
    hblocks = U.cdiv(h, bh)
    splits = attn_splits(rows, hblocks, k_total, m, q.device)
    chunk = U.cdiv(U.cdiv(k_total, splits), bk) * bk
    splits = U.cdiv(k_total, chunk)
    sink = attn_sink.float().contiguous()
    idx = topk_idxs.to(torch.int32).contiguous()
    kvk = U.as_u8(kv) if packed else kv
    dot16 = U.dot_bf16(q.device) and q.dtype == torch.bfloat16
    ok = U.out_kind(q.dtype)
    if splits == 1:
        _sparse_attn_fwd_kernel[(rows, hblocks, 1)](
            q, kvk, sink, idx, U.out_view(out), sink, sink, sink, m, n, h, k_total, chunk, 1, softmax_scale,
            BLOCK_H=bh, BLOCK_K=bk, PACKED=packed, SPLIT=False, DOT_BF16=dot16, OUT_KIND=ok, D=hd, BLOCK_D=bd)
        return out
    m_ws = torch.empty((rows, splits, h), dtype=torch.float32, device=q.device)
    l_ws = torch.empty_like(m_ws)
    acc_ws = torch.empty((rows, splits, h, hd), dtype=torch.float32, device=q.device)
    _sparse_attn_fwd_kernel[(rows, hblocks, splits)](
        q, kvk, sink, idx, out, m_ws, l_ws, acc_ws, m, n, h, k_total, chunk, splits, softmax_scale,
        BLOCK_H=bh, BLOCK_K=bk, PACKED=packed, SPLIT=True, DOT_BF16=dot16, OUT_KIND=ok, D=hd, BLOCK_D=bd)
    _sparse_attn_combine_kernel[(rows, hblocks)](sink, U.out_view(out), m_ws, l_ws, acc_ws, h, splits, BLOCK_H=bh, OUT_KIND=ok,
                                                 D=hd, BLOCK_D=bd)
    return out


# --------------------------------------------------------------------------------------------
# FP8 KV rows (SPEC §13.1)
# --------------------------------------------------------------------------------------------


@triton.jit
def _pack_kv_fp8_kernel(kv_ptr, p_ptr, n_rows, inv_qmax, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < n_rows
    c = tl.arange(0, 64)
    src = rows[:, None].to(tl.int64) * 512
    dst = rows[:, None].to(tl.int64) * 584
    for blk in tl.static_range(7):
        x = tl.load(kv_ptr + src + blk * 64 + c[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
        k = pow2_scale_bits(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4), inv_qmax)
        tl.store(p_ptr + dst + blk * 64 + c[None, :], e4m3_encode(x * exp2_int(-k)[:, None]), mask=rm[:, None])
        tl.store(p_ptr + rows.to(tl.int64) * 584 + 576 + blk, (k + 127).to(tl.uint8), mask=rm)
    x = tl.load(kv_ptr + src + 448 + c[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
    bits = bf16_rne_bits(x).to(tl.int32) & 0xFFFF
    tl.store(p_ptr + dst + 448 + 2 * c[None, :], (bits & 0xFF).to(tl.uint8), mask=rm[:, None])
    tl.store(p_ptr + dst + 449 + 2 * c[None, :], (bits >> 8).to(tl.uint8), mask=rm[:, None])
    tl.store(p_ptr + rows.to(tl.int64) * 584 + 583, tl.zeros((BLOCK_R,), tl.uint8), mask=rm)


@register_kernel("triton", "pack_kv_fp8")
def pack_kv_fp8(kv: torch.Tensor) -> torch.Tensor:
    n_rows = kv.numel() // D_KV
    out = torch.empty((*kv.shape[:-1], ROW_BYTES), dtype=torch.uint8, device=kv.device)
    br = 128 if U.target_kind(kv.device) == "interpret" else 4
    inv = float(torch.tensor(1.0 / U.FP8_MAX, dtype=torch.float32))
    _pack_kv_fp8_kernel[(U.cdiv(n_rows, br),)](kv, out, n_rows, inv, BLOCK_R=br)
    return out


@triton.jit
def _unpack_kv_fp8_kernel(p_ptr, o_ptr, n_rows, BLOCK_R: tl.constexpr, OUT_KIND: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < n_rows
    v = _load_kv_tile(p_ptr, rows, rm, True)
    d = tl.arange(0, 512)
    store_out(o_ptr + rows[:, None].to(tl.int64) * 512 + d[None, :], v, rm[:, None], OUT_KIND)


@register_kernel("triton", "unpack_kv_fp8")
def unpack_kv_fp8(packed: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    n_rows = packed.numel() // ROW_BYTES
    out = torch.empty((*packed.shape[:-1], D_KV), dtype=out_dtype, device=packed.device)
    br = 128 if U.target_kind(packed.device) == "interpret" else 4
    _unpack_kv_fp8_kernel[(U.cdiv(n_rows, br),)](packed, U.out_view(out), n_rows, BLOCK_R=br, OUT_KIND=U.out_kind(out_dtype))
    return out


# --------------------------------------------------------------------------------------------
# Grouped linear (SPEC §9.4): out[t, g] = W[g] · x[t, g], fp32 accumulation, one rounding
# --------------------------------------------------------------------------------------------


@triton.jit
def _grouped_linear_kernel(
    x_ptr, w_ptr, o_ptr, T, G, DIN, DOUT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_BF16: tl.constexpr, OUT_KIND: tl.constexpr,
):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    g = tl.program_id(2)
    rm = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, DIN, BLOCK_K):
        kk = k0 + rk
        a = tl.load(x_ptr + (rm[:, None].to(tl.int64) * G + g) * DIN + kk[None, :], mask=(rm[:, None] < T) & (kk[None, :] < DIN), other=0.0)
        w = tl.load(w_ptr + (g * DOUT + rn[:, None]).to(tl.int64) * DIN + kk[None, :], mask=(rn[:, None] < DOUT) & (kk[None, :] < DIN), other=0.0)
        if DOT_BF16:
            acc += tl.dot(a.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), out_dtype=tl.float32)
        else:
            acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    store_out(o_ptr + (rm[:, None].to(tl.int64) * G + g) * DOUT + rn[None, :], acc, (rm[:, None] < T) & (rn[None, :] < DOUT), OUT_KIND)


@register_kernel("triton", "grouped_linear")
def grouped_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    b, s, g, din = x.shape
    dout = weight.shape[1]
    t = b * s
    out = torch.empty((b, s, g, dout), dtype=x.dtype, device=x.device)
    cfg = U.block_config("gemm", x.device)
    bm = min(cfg["BLOCK_M"], max(16, U.next_pow2(t)))
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    dot16 = U.dot_bf16(x.device) and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
    _grouped_linear_kernel[(U.cdiv(t, bm), U.cdiv(dout, bn), g)](
        x, weight, U.out_view(out), t, g, din, dout, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_BF16=dot16,
        OUT_KIND=U.out_kind(x.dtype))
    return out
