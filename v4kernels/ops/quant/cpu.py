"""Native CPU block-scaled GEMMs (csrc/cpu/gemm.cpp, SPEC §4.6, §4.7).

Weights stay FP8/FP4 in memory. Small M (decode): every weight row is decoded to fp32 with its
block scales once and dotted with all M activation rows. M >= 32: the weight is decoded once and
multiplied with ATen's fp32 GEMM. Scales are applied per element before the sum, so results match
the reference's per-tile promotion up to fp32 summation order.
"""
from __future__ import annotations

import torch

import v4kernels._C_cpu  # noqa: F401  (registers torch.ops.v4k_cpu.*)

from ..._registry import register_kernel


@register_kernel("cpu", "fp8_gemm")
def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return torch.ops.v4k_cpu.fp8_gemm(a, a_s, b, b_s, out_dtype)


@register_kernel("cpu", "fp4_gemm")
def fp4_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return torch.ops.v4k_cpu.fp4_gemm(a, a_s, b, b_s, out_dtype)
