"""Reference index-list generators for the attention KV buffer (SPEC §8); plain int arithmetic.

Every row lists the buffer slots of the keys its query may see, valid entries first in
chronological order, then −1 padding (SPEC §8.1, §8.2).
"""
from __future__ import annotations

import torch

from ..._registry import register_kernel

MODES = ("prefill", "decode", "chunk")


def window_width(mode: str, seq_len: int, window: int) -> int:
    """Width of the window part: ``min(S, window)`` in prefill, ``window`` otherwise."""
    return min(seq_len, window) if mode == "prefill" else window


def compressed_width(start_pos: list[int], seq_len: int, ratio: int) -> int:
    """Width of the dense compressed part: ``max_b (start_pos_b + S) // ratio``."""
    return max((p + seq_len) // ratio for p in start_pos) if start_pos else 0


@register_kernel("reference", "window_indices")
def window_indices(start_pos: list[int], seq_len: int, window: int, mode: str) -> torch.Tensor:
    sp = torch.tensor(start_pos, dtype=torch.int64).reshape(-1, 1, 1)
    t = sp + torch.arange(seq_len, dtype=torch.int64).reshape(1, -1, 1)  # [B, S, 1] query positions
    u = torch.arange(window_width(mode, seq_len, window), dtype=torch.int64)
    # the query at t sees positions max(0, t − W + 1) … t (itself included, SPEC §8.3)
    p = (t - window + 1).clamp_min(0) + u  # [B, S, Wd]
    if mode == "prefill":
        slot = p  # buffer = the chunk's own rows
    elif mode == "decode":
        slot = p % window  # ring slot p mod W (SPEC §5.4)
    else:
        # [ring of positions < start_pos | chunk rows] (docs/op_contracts.md, indices)
        slot = torch.where(p < sp, p % window, window + p - sp)
    return torch.where(p <= t, slot, -1).to(torch.int32)


@register_kernel("reference", "compressed_indices")
def compressed_indices(start_pos: list[int], seq_len: int, ratio: int, offset: int, mode: str) -> torch.Tensor:
    sp = torch.tensor(start_pos, dtype=torch.int64).reshape(-1, 1, 1)
    t = sp + torch.arange(seq_len, dtype=torch.int64).reshape(1, -1, 1)
    c = torch.arange(compressed_width(start_pos, seq_len, ratio), dtype=torch.int64)
    # entry c closes at token c·m + m − 1: visible iff c < (t + 1) // m (SPEC §6.3, §8.1)
    return torch.where(c < (t + 1) // ratio, offset + c, -1).to(torch.int32)
