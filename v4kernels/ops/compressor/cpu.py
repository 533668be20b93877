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

from ..._registry import native_kernels, register_kernels
from ...backends.cpu import native_limits  # noqa: F401  (loads the extension)

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def _compress_kv_refusals(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, *args: object) -> list[str]:
    return [f"cpu compress_kv needs float32/bfloat16/float16 {n}, got {t.dtype}"
               for n, t in (("x", x), ("wkv", wkv), ("wgate", wgate)) if t.dtype not in _FLOAT]


register_kernels("cpu", {"compress_kv": native_kernels("CPU")["compress_kv"]},
                 refusals={"compress_kv": _compress_kv_refusals})
