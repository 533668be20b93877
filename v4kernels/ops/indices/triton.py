"""Triton kernels for the KV-buffer index lists (SPEC §8): one element per (sequence, query,
entry), pure integer arithmetic, exact.

The ops take Python-int start positions and dispatch on the CPU (no tensor argument), so through
the registry these kernels run under the Triton interpreter only. :func:`window_indices_on` and
:func:`compressed_indices_on` build the same lists directly on an accelerator from a device
tensor of start positions (no host round trip), for engines and for ``bench/gpu_check.py``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..._registry import register_kernel
from ... import triton_utils as U
from .reference import compressed_width, window_width

_MODE_CODE = {"prefill": 0, "decode": 1, "chunk": 2}


@triton.jit
def _window_kernel(
    sp_ptr, o_ptr, S, window, width,
    MODE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_U: tl.constexpr,
):
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    u = tl.program_id(2) * BLOCK_U + tl.arange(0, BLOCK_U)
    sp = tl.load(sp_ptr + b)  # int64
    t = sp + rows[:, None]  # query positions
    # the query at t sees positions max(0, t − window + 1) … t, itself included (SPEC §8.3)
    p = tl.maximum(t - window + 1, 0) + u[None, :]
    if MODE == 0:
        slot = p  # prefill: buffer rows are the chunk's own tokens
    elif MODE == 1:
        slot = p % window  # decode: ring slot (SPEC §5.4)
    else:
        # chunk: [ring of positions < start_pos | chunk rows]
        slot = tl.where(p < sp, p % window, window + p - sp)
    val = tl.where(p <= t, slot, -1).to(tl.int32)
    m = (rows[:, None] < S) & (u[None, :] < width)
    tl.store(o_ptr + ((b * S + rows[:, None]).to(tl.int64) * width + u[None, :]), val, mask=m)


@triton.jit
def _compressed_kernel(
    sp_ptr, o_ptr, S, ratio, offset, width,
    BLOCK_S: tl.constexpr, BLOCK_U: tl.constexpr,
):
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(2) * BLOCK_U + tl.arange(0, BLOCK_U)
    t = tl.load(sp_ptr + b) + rows[:, None]
    # entry c closes at token c·ratio + ratio − 1: visible iff c < (t + 1) // ratio (SPEC §6.3, §8.1)
    val = tl.where(c[None, :] < (t + 1) // ratio, offset + c[None, :], -1).to(tl.int32)
    m = (rows[:, None] < S) & (c[None, :] < width)
    tl.store(o_ptr + ((b * S + rows[:, None]).to(tl.int64) * width + c[None, :]), val, mask=m)


def _grid(bsz: int, s: int, width: int, device: torch.device) -> tuple[tuple[int, int, int], int, int]:
    cfg = U.block_config("indices", device)
    bs = min(cfg["BLOCK_S"], U.next_pow2(s))
    bu = min(cfg["BLOCK_U"], U.next_pow2(max(width, 1)))
    return (bsz, U.cdiv(s, bs), U.cdiv(width, bu)), bs, bu


def window_indices_on(start_pos: torch.Tensor, seq_len: int, window: int, mode: str, width: int) -> torch.Tensor:
    """``window_indices`` on ``start_pos.device`` from an int64 tensor ``start_pos [B]``;
    ``width`` is the list width of the mode (``min(S, window)`` in prefill, else ``window``).
    Inputs are not validated here (the public op does that)."""
    bsz = start_pos.shape[0]
    out = torch.empty(bsz, seq_len, width, dtype=torch.int32, device=start_pos.device)
    if out.numel():
        grid, bs, bu = _grid(bsz, seq_len, width, start_pos.device)
        _window_kernel[grid](start_pos.to(torch.int64).contiguous(), out, seq_len, window, width,
                             MODE=_MODE_CODE[mode], BLOCK_S=bs, BLOCK_U=bu)
    return out


def compressed_indices_on(start_pos: torch.Tensor, seq_len: int, ratio: int, offset: int, width: int) -> torch.Tensor:
    """``compressed_indices`` on ``start_pos.device`` from an int64 tensor ``start_pos [B]``;
    ``width = max_b (start_pos_b + S) // ratio``. Inputs are not validated here."""
    bsz = start_pos.shape[0]
    out = torch.empty(bsz, seq_len, width, dtype=torch.int32, device=start_pos.device)
    if out.numel():
        grid, bs, bu = _grid(bsz, seq_len, width, start_pos.device)
        _compressed_kernel[grid](start_pos.to(torch.int64).contiguous(), out, seq_len, ratio, offset, width,
                                 BLOCK_S=bs, BLOCK_U=bu)
    return out


@register_kernel("triton", "window_indices")
def window_indices(start_pos: Sequence[int], seq_len: int, window: int, mode: str) -> torch.Tensor:
    sp = torch.tensor(list(start_pos), dtype=torch.int64)
    return window_indices_on(sp, seq_len, window, mode, window_width(mode, seq_len, window))


@register_kernel("triton", "compressed_indices")
def compressed_indices(start_pos: Sequence[int], seq_len: int, ratio: int, offset: int, mode: str) -> torch.Tensor:
    sp = torch.tensor(list(start_pos), dtype=torch.int64)
    return compressed_indices_on(sp, seq_len, ratio, offset, compressed_width(list(start_pos), seq_len, ratio))
