"""Native CPU kernels of ``sparse_attn`` (csrc/cpu/attention.cpp + attention_ops.cpp, SPEC §9.2) and
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

from ..._registry import native_kernels, register_kernels
from ...backends.cpu import native_limits

LIMITS = native_limits()
#: token count (B·S) from which grouped_linear uses the panel GEMM (kGroupedDirectMaxT, kernels.h)
GROUPED_DIRECT_MAX_T = LIMITS["grouped_linear.direct_max_tokens"]
_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def _sparse_attn_refusals(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                          softmax_scale: float) -> list[str]:
    reasons = []
    if topk_idxs.dtype != torch.int32:
        reasons.append(f"cpu sparse_attn needs int32 topk_idxs, got {topk_idxs.dtype}")
    return reasons


def _grouped_linear_refusals(x: torch.Tensor, weight: torch.Tensor) -> list[str]:
    return [f"cpu grouped_linear needs float32/bfloat16/float16 {n}, got {t.dtype}"
            for n, t in (("x", x), ("weight", weight)) if t.dtype not in _FLOAT]


_OPS = ("sparse_attn", "grouped_linear")
register_kernels("cpu", {op: fn for op, fn in native_kernels("CPU").items() if op in _OPS},
                 refusals={"sparse_attn": _sparse_attn_refusals, "grouped_linear": _grouped_linear_refusals})
