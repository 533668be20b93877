"""Native CPU kernels of the mHC ops (csrc/cpu/mhc.cpp, SPEC §10).

``hc_pre`` (and ``hc_head``, SPEC §10.5, with sigmoid gates instead of the Sinkhorn split) is one fused pass: the RMS-scaled mix GEMV over the flattened streams (sum of squares
in the same pass), the Sinkhorn split and the stream collapse; ``hc_post`` expands and mixes the
streams with the transposed comb in fp32 and rounds once (or the [HF] bf16 mixing variant).
"""
from __future__ import annotations

import torch

from ..._registry import native_kernels, register_kernels
from ...backends.cpu import native_limits

LIMITS = native_limits()


def _hc_post_refusals(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                      bf16_mix: bool) -> list[str]:
    most = LIMITS["hc_post.max_streams"]
    return [] if residual.shape[-2] <= most else [f"cpu hc_post supports at most {most} streams, got {residual.shape[-2]}"]


_OPS = ("hc_split_sinkhorn", "hc_pre", "hc_post", "hc_head")
register_kernels("cpu", {op: fn for op, fn in native_kernels("CPU").items() if op in _OPS},
                 refusals={"hc_post": _hc_post_refusals})
