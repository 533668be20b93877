"""Native CPU kernels of ``sparse_attn`` (csrc/cpu/attention.cpp, SPEC §9.2) and
``grouped_linear`` (csrc/cpu/gemm.cpp, SPEC §9.4).

sparse_attn: online softmax over 64-index tiles with all heads of a query sharing each gathered KV
tile; bf16/fp16/fp32 KV of any head dim (whole SIMD register blocks for V4's 512, a scalar loop
for the columns past the last whole block of other dims) or the packed 584-byte FP8 rows
(SPEC §13.1), decoded to fp32 in the kernel.

grouped_linear: below ``GROUPED_DIRECT_MAX_T`` tokens the bf16/fp16/fp32 weight streams once from
memory in its storage format, each output one fixed-order fp32 FMA sequence (bit-identical for any
token count below that and any thread count); from there on, the fixed-order panel GEMM per group. One rounding to
``x.dtype``.
"""
from __future__ import annotations

import torch

import v4kernels._C_cpu  # noqa: F401  (registers torch.ops.v4k_cpu.*)

from ..._registry import register_kernel


def _sparse_attn_refusals(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor, softmax_scale: float) -> list[str]:
    reasons = []
    if topk_idxs.dtype != torch.int32:
        reasons.append(f"cpu sparse_attn needs int32 topk_idxs, got {topk_idxs.dtype}")
    return reasons


@register_kernel("cpu", "sparse_attn", refusals=_sparse_attn_refusals)
def sparse_attn(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    return torch.ops.v4k_cpu.sparse_attn(q, kv, attn_sink.float(), topk_idxs, float(softmax_scale))


_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
#: token count (B·S) from which grouped_linear uses the panel GEMM (kGroupedDirectMaxT, kernels.h)
GROUPED_DIRECT_MAX_T = 96


def _grouped_linear_refusals(x: torch.Tensor, weight: torch.Tensor) -> list[str]:
    return [f"cpu grouped_linear needs float32/bfloat16/float16 {n}, got {t.dtype}"
            for n, t in (("x", x), ("weight", weight)) if t.dtype not in _FLOAT]


@register_kernel("cpu", "grouped_linear", refusals=_grouped_linear_refusals)
def grouped_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.v4k_cpu.grouped_linear(x, weight)
