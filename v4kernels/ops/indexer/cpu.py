"""Native CPU kernels of the lightning indexer (csrc/cpu/indexer.cpp, SPEC §7.2).

``indexer_topk`` fuses scoring with a streaming top-k: keys (bf16/fp16/fp32, e4m3 + per-128
scales, or packed FP4 + per-32 scales) are decoded one 64-key tile at a time and each tile's
scores go straight into a bounded heap per query, so the [S, N] score matrix never exists.
Returned indices are ordered by descending score (ties: smaller entry first), then −1 padding.
"""
from __future__ import annotations

import torch

import v4kernels._C_cpu  # noqa: F401  (registers torch.ops.v4k_cpu.*)

from ..._registry import register_kernel


@register_kernel("cpu", "indexer_scores")
def indexer_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, key_scales: torch.Tensor | None,
                   positions: torch.Tensor, ratio: int) -> torch.Tensor:
    return torch.ops.v4k_cpu.indexer_scores(q, weights, keys, key_scales, positions, int(ratio))


@register_kernel("cpu", "indexer_topk")
def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, key_scales: torch.Tensor | None,
                 positions: torch.Tensor, topk: int, ratio: int, offset: int) -> torch.Tensor:
    return torch.ops.v4k_cpu.indexer_topk(q, weights, keys, key_scales, positions, int(topk), int(ratio), int(offset))
