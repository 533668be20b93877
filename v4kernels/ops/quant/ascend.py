"""Ascend adapters for FP8 activation quantisation and the block-scaled FP8 GEMM (950 only:
A2/A3 have no FP8 datapath; deployments there re-quantise to W8A8 INT8, which is not this op).

``act_quant`` → ``torch_npu.npu_dynamic_quant(x, dst_type=float8_e4m3fn)`` (950).
  The vendor op quantises per *row* (scale = rowmax|x| / 448, y = x / scale); the adapter makes
  each 1×``block_size`` block a row (``x.view(-1, block_size)``), which is exactly V4's block
  quantisation. Differences bridged: V4 clamps the block amax at 1e-4 — blocks below it (all
  zeros, tiny values) are recomputed with the clamped scale after the call; the power-of-two
  scale (``round_scale=True``) has no vendor equivalent and is refused. Limits: x bf16/fp16.

``fp8_gemm`` → ``torch_npu.npu_quant_matmul(x1, x2, scale, pertoken_scale=..., group_sizes=[1,128,128])`` (950).
  Bridging: our ``b [N,K]`` is passed transposed (``x2 = bᵀ`` as a view, ``[K,N]``), its scales
  ``b_s [N/128, K/128]`` transposed to the vendor's ``[K/128, N/128]``; ``a_s [M, K/128]`` is the
  per-token-group scale. UE8M0 scales are widened to fp32 (exact). Limits: out bf16/fp16,
  K and N multiples of 128.
"""
from __future__ import annotations

import torch

from ..._registry import register_kernel
from ...backends.ascend import BACKEND, VendorOp
from .reference import FP8_AMAX_MIN, FP8_MAX, fp8_encode

DQ = VendorOp("torch_npu.npu_dynamic_quant", socs=("950",), note="per-row dynamic quant; FP8 output on 950 only")
QMM = VendorOp("torch_npu.npu_quant_matmul", socs=("950",), note="FP8 x FP8 with [1,128,128] block scales")
BACKEND.declare("act_quant", DQ, round_scale=False, dtypes=("bfloat16", "float16"))
BACKEND.declare("fp8_gemm", QMM, block=128, out_dtypes=("bfloat16", "float16"))


def _aq_refusals(x, block_size, round_scale):
    r = []
    if round_scale:
        r.append("npu_dynamic_quant's scale is amax/448, not a power of two (round_scale=True)")
    if x.dtype not in (torch.bfloat16, torch.float16):
        r.append(f"npu_dynamic_quant takes bf16/fp16 x, got {x.dtype}")
    return r


@register_kernel("ascend", "act_quant", refusals=_aq_refusals)
def act_quant(x, block_size, round_scale):
    rows = x.reshape(-1, block_size)
    y, s = BACKEND.vendor(DQ)(rows, dst_type=torch.float8_e4m3fn)
    s = s.float().reshape(-1)
    small = rows.float().abs().amax(-1) < FP8_AMAX_MIN
    if bool(small.any()):
        # V4 clamps the block amax at 1e-4: redo those blocks with the clamped scale
        s_fix = torch.full_like(s, FP8_AMAX_MIN) * torch.tensor(1.0 / FP8_MAX, dtype=torch.float32)
        y_fix = fp8_encode(rows.float() / s_fix.unsqueeze(-1))
        y = torch.where(small.unsqueeze(-1), y_fix, y)
        s = torch.where(small, s_fix, s)
    return y.reshape(x.shape), s.reshape(*x.shape[:-1], x.shape[-1] // block_size)


def _gemm_refusals(a, a_s, b, b_s, out_dtype):
    r = []
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn:
        r.append(f"npu_quant_matmul here takes e4m3 a and b, got {a.dtype}, {b.dtype}")
    if out_dtype not in (torch.bfloat16, torch.float16):
        r.append(f"npu_quant_matmul outputs bf16/fp16, got {out_dtype}")
    if a.shape[1] % 128 or b.shape[0] % 128:
        r.append(f"npu_quant_matmul block scales need K and N multiples of 128, got K={a.shape[1]}, N={b.shape[0]}")
    return r


@register_kernel("ascend", "fp8_gemm", refusals=_gemm_refusals)
def fp8_gemm(a, a_s, b, b_s, out_dtype):
    return BACKEND.vendor(QMM)(a, b.t(), b_s.float().t().contiguous(), pertoken_scale=a_s.float().contiguous(),
                               output_dtype=out_dtype, group_sizes=[1, 128, 128])
