"""Native CPU kernel of the routed experts (csrc/cpu/moe.cpp, SPEC §11.3-11.4).

The (token, slot) pairs are counting-sorted by expert (−1 ids dropped, experts without tokens
skipped) and each expert segment runs as GEMMs whose weights stay bf16 / FP8 / FP4 in memory:
FP8 / FP4 weights are decoded in registers by the direct kernel, float ones one panel at a time
(csrc/cpu/gemm.cpp). Quantised weights see a bit-exact C++ FP8
``act_quant`` (block 128, power-of-two scales) of their input, linear outputs are rounded to
``x.dtype``, SwiGLU is clamped in fp32 and the k rows of a token are summed in fp32 in expert
order, as in the reference.
"""
from __future__ import annotations

import torch

from ..._registry import native_kernels, register_kernels
from ...backends.cpu import native_limits

LIMITS = native_limits()


def _moe_experts_refusals(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w1: torch.Tensor,
                          w1_s: torch.Tensor | None, w3: torch.Tensor, w3_s: torch.Tensor | None, w2: torch.Tensor,
                          w2_s: torch.Tensor | None, swiglu_limit: float, weight_after_w2: bool,
                          out_dtype: torch.dtype, hf_rounding: bool) -> list[str]:
    reasons = []
    if hf_rounding and out_dtype not in (torch.float32, x.dtype):
        reasons.append(f"cpu moe_experts implements hf_rounding for out_dtype float32 or x.dtype, got {x.dtype} -> "
                       f"{out_dtype}")
    if topk_ids.dtype != torch.int32:
        reasons.append(f"cpu moe_experts needs int32 topk_ids, got {topk_ids.dtype}")
    most = LIMITS["moe_experts.max_topk"]
    if topk_ids.dim() == 2 and topk_ids.shape[1] > most:
        reasons.append(f"cpu moe_experts supports at most {most} experts per token, got {topk_ids.shape[1]}")
    return reasons


register_kernels("cpu", {"moe_experts": native_kernels("CPU")["moe_experts"]},
                 refusals={"moe_experts": _moe_experts_refusals})
