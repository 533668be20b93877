"""Reference sparse attention with sink, FP8 KV-row packing and grouped linear (SPEC §9, §13.1).

fp32 math on any device, one rounding to the output dtype. Memory stays bounded for long index
lists and long prefills: queries are processed in blocks and the index list in chunks with an
online (running-max) softmax, so at most ``_GATHER_BUDGET`` fp32 KV elements are gathered at a
time; packed FP8 rows are dequantised only after they are gathered.
"""
from __future__ import annotations

import torch

from ... import formats as F
from ..._registry import register_kernel
from ..quant.reference import _blocks, _fp8_scales, fp8_encode

KV_DIM = F.HEAD_DIM
ROPE_DIM = F.ROPE_DIM
NOPE_DIM = F.NOPE_DIM
KV_BLOCK = F.KV_SCALE_BLOCK  # FP8 block size of the nope dims (SPEC §4.3 call sites)
N_SCALES = F.KV_N_SCALES
PACKED_DIM = F.PACKED_KV_ROW_BYTES  # 584 (layout: v4kernels/formats.py, SPEC §13.1)
_ROPE_BYTES = slice(F.KV_ROPE_OFFSET, F.KV_SCALE_OFFSET)  # 448..575
_SCALE_BYTES = slice(F.KV_SCALE_OFFSET, F.KV_PAD_OFFSET)  # 576..582

#: fp32 elements of gathered KV held at once by sparse_attn (16 MiB)
_GATHER_BUDGET = 1 << 22
#: index-list chunk of the online softmax
_K_CHUNK = 2048
#: fp32 elements of activations per step of grouped_linear (64 MiB)
_LINEAR_BUDGET = 1 << 24


# --------------------------------------------------------------------------------------------
# FP8 KV rows (SPEC §13.1)
# --------------------------------------------------------------------------------------------


def _bf16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [..., 2n] uint8: each value as bf16, low byte first (little endian)."""
    bits = x.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.stack((bits & 0xFF, bits >> 8), dim=-1).flatten(-2).to(torch.uint8)


def _bf16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """[..., 2n] uint8 little-endian bf16 -> [..., n] fp32 (exact)."""
    bi = b.to(torch.int32)
    bits = bi[..., 0::2] | (bi[..., 1::2] << 8)
    # A bf16 pattern in the high half of an fp32 word is the same value in fp32.
    return (bits << 16).view(torch.float32)


def dequant_kv_rows(packed: torch.Tensor) -> torch.Tensor:
    """[..., 584] uint8 rows -> [..., 512] fp32 (nope = e4m3 · UE8M0 scale, rope = bf16)."""
    nope = packed[..., :NOPE_DIM].contiguous().view(torch.float8_e4m3fn).float()
    scales = packed[..., _SCALE_BYTES].contiguous().view(torch.float8_e8m0fnu).float()
    nope = (nope.unflatten(-1, (N_SCALES, KV_BLOCK)) * scales.unsqueeze(-1)).flatten(-2)
    return torch.cat((nope, _bf16_from_bytes(packed[..., _ROPE_BYTES])), dim=-1)


@register_kernel("reference", "pack_kv_fp8")
def pack_kv_fp8(kv: torch.Tensor) -> torch.Tensor:
    xb = _blocks(kv[..., :NOPE_DIM], KV_BLOCK)  # fp32 [..., 7, 64]
    s = _fp8_scales(xb, True)  # power-of-two scales, amax clamp 1e-4 (SPEC §4.2-4.3)
    q = fp8_encode(xb / s.unsqueeze(-1)).flatten(-2)
    out = torch.empty((*kv.shape[:-1], PACKED_DIM), dtype=torch.uint8, device=kv.device)
    out[..., :NOPE_DIM] = q.view(torch.uint8)
    out[..., _ROPE_BYTES] = _bf16_bytes(kv[..., NOPE_DIM:])
    # s = 2^k exactly, so its biased fp32 exponent field is the UE8M0 byte k + 127.
    out[..., _SCALE_BYTES] = ((s.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    out[..., PACKED_DIM - 1] = 0
    return out


@register_kernel("reference", "unpack_kv_fp8")
def unpack_kv_fp8(packed: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return dequant_kv_rows(packed).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Sparse attention with sink (SPEC §9.2)
# --------------------------------------------------------------------------------------------


@register_kernel("reference", "sparse_attn")
def sparse_attn(
    q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor, softmax_scale: float
) -> torch.Tensor:
    b, m, h, d = q.shape
    n = kv.shape[1]
    k_total = topk_idxs.shape[2]
    out = torch.zeros((b * m, h, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0 or k_total == 0 or n == 0:
        return out.reshape(q.shape)
    packed = kv.dtype == torch.uint8
    kv_rows = kv.reshape(b * n, kv.shape[2])
    qf_all = q.reshape(b * m, h, d)
    idx_all = topk_idxs.reshape(b * m, k_total)
    # Row r of the flattened (b, i) grid reads keys of batch r // m, i.e. rows (r // m)·n + idx.
    row_base = (torch.arange(b * m, device=q.device) // m * n).unsqueeze(1)
    sink = attn_sink.float()
    kc = min(k_total, _K_CHUNK)
    rows_per_block = max(1, _GATHER_BUDGET // (kc * d))
    neg_inf = torch.tensor(float("-inf"), device=q.device)

    for r0 in range(0, b * m, rows_per_block):
        r1 = min(b * m, r0 + rows_per_block)
        qf = qf_all[r0:r1].float()  # [R, H, D]
        mx = torch.full((r1 - r0, h), float("-inf"), device=q.device)
        den = torch.zeros((r1 - r0, h), device=q.device)
        has_valid = torch.zeros((r1 - r0, 1), dtype=torch.bool, device=q.device)
        acc = torch.zeros((r1 - r0, h, d), device=q.device)
        for k0 in range(0, k_total, kc):
            idx = idx_all[r0:r1, k0 : k0 + kc].long()
            valid = idx >= 0
            has_valid |= valid.any(-1, keepdim=True)
            rows = kv_rows[torch.where(valid, idx + row_base[r0:r1], 0)]  # skipped slots read row 0
            kvf = dequant_kv_rows(rows) if packed else rows.float()  # [R, kc, D]
            # the stand-in row of a skipped slot must not leak NaN/inf through 0 · value
            kvf = torch.where(valid.unsqueeze(-1), kvf, 0.0)
            s = torch.bmm(qf, kvf.transpose(1, 2)) * softmax_scale  # [R, H, kc]
            s = torch.where(valid.unsqueeze(1), s, neg_inf)
            # Online softmax across index chunks: rescale the running sums to the new max. A row
            # with no valid key so far has max -inf; use 0 as its shift so that exp gives 0, not NaN.
            new_mx = torch.maximum(mx, s.amax(-1))
            shift = torch.where(new_mx == float("-inf"), 0.0, new_mx)
            p = torch.exp(s - shift.unsqueeze(-1))
            alpha = torch.exp(mx - shift)
            den = den * alpha + p.sum(-1)
            acc = acc * alpha.unsqueeze(-1) + torch.bmm(p, kvf)
            mx = new_mx
        # Zeros only for rows without any listed key; a NaN score (mx NaN) propagates to the row
        # (docs/numerics.md), all -inf scores give 0 (the sink takes all the weight).
        any_valid = has_valid
        shift = torch.where(mx > float("-inf"), mx, 0.0)
        # The sink is a virtual key with a zero value: denominator only (SPEC §9.2).
        den = den + torch.exp(sink.unsqueeze(0) - shift)
        o = torch.where(any_valid.unsqueeze(-1), acc / den.unsqueeze(-1), 0.0)
        out[r0:r1] = o.to(q.dtype)
    return out.reshape(q.shape)


# --------------------------------------------------------------------------------------------
# Grouped low-rank output projection (SPEC §9.4)
# --------------------------------------------------------------------------------------------


@register_kernel("reference", "grouped_linear")
def grouped_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    b, s, g, din = x.shape
    dout = weight.shape[1]
    t = b * s
    xt = x.reshape(t, g, din)
    out = torch.empty((t, g, dout), dtype=x.dtype, device=x.device)
    tb = max(1, _LINEAR_BUDGET // max(1, din, dout))
    for gi in range(g):
        wg = weight[gi].float()  # one group's weight in fp32 at a time
        for t0 in range(0, t, tb):
            out[t0 : t0 + tb, gi] = (xt[t0 : t0 + tb, gi].float() @ wg.T).to(x.dtype)
    return out.reshape(b, s, g, dout)
