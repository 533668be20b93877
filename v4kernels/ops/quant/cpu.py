"""Native CPU block-scaled GEMMs (csrc/cpu/gemm.cpp, SPEC §4.6, §4.7).

Weights stay FP8/FP4 in memory. Small M (decode): every weight row is decoded to fp32 with its
block scales once and dotted with all M activation rows. M >= 32: the weight is decoded once and
multiplied with ATen's fp32 GEMM. Scales are applied per element before the sum, so results match
the reference's per-tile promotion up to fp32 summation order.
"""
from __future__ import annotations

from ..._registry import native_kernels, register_kernels
from ...backends.cpu import native_limits  # noqa: F401  (loads the extension)

register_kernels("cpu", {op: fn for op, fn in native_kernels("CPU").items() if op in ("fp8_gemm", "fp4_gemm")})
