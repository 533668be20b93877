"""Native CPU kernel of the routed experts (csrc/cpu/moe.cpp, SPEC §11.3-11.4).

The (token, slot) pairs are counting-sorted by expert (−1 ids dropped, experts without tokens
skipped) and each expert segment runs as panel GEMMs whose weights stay bf16 / FP8 / FP4 in
memory and are decoded one 64-row panel at a time. Quantised weights see a bit-exact C++ FP8
``act_quant`` (block 128, power-of-two scales) of their input, linear outputs are rounded to
``x.dtype``, SwiGLU is clamped in fp32 and the k rows of a token are summed in fp32 in expert
order, as in the reference.
"""
from __future__ import annotations

import torch

import v4kernels._C_cpu  # noqa: F401  (registers torch.ops.v4k_cpu.*)

from ..._registry import register_kernel


def _moe_experts_refusals(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w1: torch.Tensor,
                          w1_s: torch.Tensor | None, w3: torch.Tensor, w3_s: torch.Tensor | None, w2: torch.Tensor,
                          w2_s: torch.Tensor | None, swiglu_limit: float, weight_after_w2: bool,
                          out_dtype: torch.dtype, hf_rounding: bool) -> list[str]:
    reasons = []
    if hf_rounding and (x.dtype != torch.float32 or out_dtype != torch.float32):
        reasons.append(f"cpu moe_experts implements hf_rounding only for float32 x and output (where it equals the "
                       f"default up to the order of the fp32 sum), got {x.dtype} -> {out_dtype}")
    if topk_ids.dtype != torch.int32:
        reasons.append(f"cpu moe_experts needs int32 topk_ids, got {topk_ids.dtype}")
    if topk_ids.dim() == 2 and topk_ids.shape[1] > 64:
        reasons.append(f"cpu moe_experts supports at most 64 experts per token, got {topk_ids.shape[1]}")
    return reasons


@register_kernel("cpu", "moe_experts", refusals=_moe_experts_refusals)
def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w1: torch.Tensor,
                w1_s: torch.Tensor | None, w3: torch.Tensor, w3_s: torch.Tensor | None, w2: torch.Tensor,
                w2_s: torch.Tensor | None, swiglu_limit: float, weight_after_w2: bool,
                out_dtype: torch.dtype, hf_rounding: bool) -> torch.Tensor:
    return torch.ops.v4k_cpu.moe_experts(x, topk_weights, topk_ids, w1, w1_s, w3, w3_s, w2, w2_s, float(swiglu_limit),
                                         bool(weight_after_w2), out_dtype)
