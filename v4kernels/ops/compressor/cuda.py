"""``cuda`` KV compressor (SPEC §6): native kernels (``csrc/cuda/compressor.cu``): projection GEMM
with a per-element summation order independent of the chunking, pooling fused with the RMSNorm /
RoPE / FP8-or-FP4 epilogue, and the canonical state update."""
from __future__ import annotations

import torch

from ...backends.cuda import Route, register_routes


def _refusals(x, wkv, wgate, ape, norm_weight, freqs, *rest) -> list[str]:
    hd = norm_weight.shape[0]
    return [] if hd <= 2048 else [f"native pooling keeps one entry in shared memory: head_dim <= 2048, got {hd}"]


def _native(*args):
    return torch.ops.v4k_impl.compress_kv.default(*args)


register_routes("compress_kv", [
    Route("native compressor", "native", "head_dim <= 2048, any ratio, quant none/fp8/fp4", _native, _refusals),
])
