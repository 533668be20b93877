"""Native CPU kernel of the KV compressor (csrc/cpu/compressor.cpp, SPEC §6).

One fused pass per call: the kv and gate projections of every token of every sequence as one
fixed-summation-order panel GEMM (so a token's fp32 projection, and hence every entry and the
state, is bit-identical however the stream is chunked), the ape bias, the softmax pooling of
each closed window (CSA: 8 slots with the previous window's Ca/Za; HCA: ratio slots), RMSNorm,
RoPE at ``j·ratio`` and the FP8 / FP4 QAT simulation, windows in parallel. The new state is
written in the reference's canonical form (pending slots outside the open window: kv 0, score −inf).
"""
from __future__ import annotations

import torch

import v4kernels._C_cpu  # noqa: F401  (registers torch.ops.v4k_cpu.*)

from ..._registry import register_kernel

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def _compress_kv_refusals(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, *args: object) -> list[str]:
    reasons = [f"cpu compress_kv needs float32/bfloat16/float16 {n}, got {t.dtype}"
               for n, t in (("x", x), ("wkv", wkv), ("wgate", wgate)) if t.dtype not in _FLOAT]
    if args[-1] and x.dtype != torch.float32:
        reasons.append(f"cpu compress_kv implements hf_rounding only for float32 x (where every rounding to x.dtype "
                       f"is exact), got {x.dtype}")
    return reasons


@register_kernel("cpu", "compress_kv", refusals=_compress_kv_refusals)
def compress_kv(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor,
                freqs: torch.Tensor, pending_kv: torch.Tensor, pending_score: torch.Tensor, prev_kv: torch.Tensor,
                prev_score: torch.Tensor, n_tokens: torch.Tensor, ratio: int, quant: str, eps: float, hf_rounding: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.v4k_cpu.compress_kv(x, wkv, wgate, ape, norm_weight, freqs, pending_kv, pending_score, prev_kv,
                                         prev_score, n_tokens.long(), int(ratio), str(quant), float(eps))
