"""Ascend adapter for the block-scaled FP8 GEMM (950 only:
A2/A3 have no FP8 datapath; deployments there re-quantise to W8A8 INT8, which is not this op).

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

QMM = VendorOp("torch_npu.npu_quant_matmul", socs=("950",), note="FP8 x FP8 with [1,128,128] block scales")
BACKEND.declare("fp8_gemm", QMM, block=128, out_dtypes=("bfloat16", "float16"))


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
