"""Native CPU kernels of the lightning indexer (csrc/cpu/indexer.cpp, SPEC §7.2).

``indexer_topk`` fuses scoring with a streaming top-k: keys (bf16/fp16/fp32, e4m3 + per-128
scales, or packed FP4 + per-32 scales) are decoded one 64-key tile at a time and each tile's
scores go straight into a bounded heap per query, so the [S, N] score matrix never exists.
Returned indices are ordered by descending score (ties: smaller entry first), then −1 padding.
"""
from __future__ import annotations

from ..._registry import native_kernels, register_kernels
from ...backends.cpu import native_limits  # noqa: F401  (loads the extension)

register_kernels("cpu", {op: fn for op, fn in native_kernels("CPU").items() if op in ("indexer_scores", "indexer_topk")})
