"""Index lists into the attention KV buffer (SPEC §8): the sliding-window part and the dense
compressed (HCA) part, for prefill, single-token decode and chunked prefill.

Start positions are Python ints (one per sequence), so the lists are pure host arithmetic: the
op runs on the CPU (no tensor argument means CPU dispatch) and the wrapper moves the small
``int32`` result to ``device``. Engines that capture graphs should build these lists outside the
captured region (or keep them in a persistent buffer) since the copy is a host-to-device transfer.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ... import _checks as C
from ..._registry import declare_op
from . import reference as _reference

__all__ = ["window_indices", "compressed_indices"]

_INT32_LIMIT = 2**31


def _fake_window(start_pos, seq_len, window, mode):
    return torch.empty((len(start_pos), seq_len, _reference.window_width(mode, seq_len, window)), dtype=torch.int32)


def _fake_compressed(start_pos, seq_len, ratio, offset, mode):
    return torch.empty((len(start_pos), seq_len, _reference.compressed_width(list(start_pos), seq_len, ratio)), dtype=torch.int32)




def _start_positions(op: str, start_pos: object) -> list[int]:
    """The public ``start_pos`` (an int or a sequence of ints) as the schema's ``int[]``."""
    if isinstance(start_pos, torch.Tensor):
        raise TypeError(f"{op}: start_pos must be an int or a list of ints (use .tolist()), got a torch.Tensor")
    if isinstance(start_pos, (list, tuple)):
        return [C.check_int(op, f"start_pos[{i}]", p, minimum=0) for i, p in enumerate(start_pos)]
    return [C.check_int(op, "start_pos", start_pos, minimum=0)]


def _check_layout(op: str, start_pos: Sequence[int], seq_len: int, mode: str) -> list[int]:
    """Validate start positions, length and mode; returns start positions as a list of ints."""
    sp = _start_positions(op, list(start_pos) if isinstance(start_pos, (list, tuple)) else start_pos)
    C.check_int(op, "seq_len", seq_len, minimum=0)
    if not isinstance(mode, str) or mode not in _reference.MODES:
        raise ValueError(f"{op}: mode must be one of {list(_reference.MODES)}, got {mode!r}")
    if mode == "prefill" and any(sp):
        raise ValueError(f"{op}: mode='prefill' requires every start_pos to be 0, got {sp} (use mode='chunk')")
    if mode == "decode" and seq_len != 1:
        raise ValueError(f"{op}: mode='decode' requires seq_len == 1, got {seq_len} (use mode='chunk')")
    if sp and max(sp) + seq_len >= _INT32_LIMIT:
        raise ValueError(f"{op}: start_pos + seq_len must be < 2**31, got {max(sp) + seq_len}")
    return sp


# the reference builds int64 position/slot grids of the output's size next to the int32 result
_WORK_FACTOR = 5


def _check_window_indices(start_pos, seq_len, window, mode) -> None:
    op = "window_indices"
    sp = _check_layout(op, start_pos, seq_len, mode)
    C.check_int(op, "window", window, minimum=1)
    if window + seq_len >= _INT32_LIMIT:
        raise ValueError(f"{op}: window + seq_len must be < 2**31, got {window + seq_len}")
    width = _reference.window_width(mode, seq_len, window)
    C.check_alloc(op, f"the [B={len(sp)}, S={seq_len}, W={width}] int32 index list", len(sp) * seq_len * width, 4,
                  _WORK_FACTOR)


def _check_compressed_indices(start_pos, seq_len, ratio, offset, mode) -> None:
    op = "compressed_indices"
    sp = _check_layout(op, start_pos, seq_len, mode)
    C.check_int(op, "ratio", ratio, minimum=1)
    C.check_int(op, "offset", offset, minimum=0)
    width = _reference.compressed_width(sp, seq_len, ratio)
    if offset + width >= _INT32_LIMIT:
        raise ValueError(f"{op}: offset + width must be < 2**31, got {offset} + {width}")
    width = _reference.compressed_width(sp, seq_len, ratio)
    C.check_alloc(op, f"the [B={len(sp)}, S={seq_len}, C={width}] int32 index list", len(sp) * seq_len * width, 4,
                  _WORK_FACTOR)


_window_indices = declare_op("indices", "window_indices", "(int[] start_pos, int seq_len, int window, str mode) -> Tensor",
                             _fake_window, check=_check_window_indices)
_compressed_indices = declare_op(
    "indices", "compressed_indices", "(int[] start_pos, int seq_len, int ratio, int offset, str mode) -> Tensor",
    _fake_compressed, check=_check_compressed_indices,
)


def window_indices(
    start_pos: int | Sequence[int],
    seq_len: int,
    window: int = 128,
    mode: str = "prefill",
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sliding-window index lists (SPEC §8.1, §8.2): each query at position ``t`` sees the raw
    keys at positions ``max(0, t − window + 1) … t``, listed in chronological order as slots of
    the attention KV buffer, followed by −1 padding.

    Buffer layouts (``mode``):

    - ``"prefill"`` (every start_pos 0): ``[chunk rows (S) | compressed]``; width
      ``min(S, window)``; position ``p`` is row ``p``.
    - ``"decode"`` (``seq_len == 1``): ``[ring (window slots) | compressed]``; width ``window``;
      position ``p`` is slot ``p % window`` (the ring already holds the current token).
    - ``"chunk"`` (any start_pos, any S): ``[ring of positions < start_pos | chunk rows (S) |
      compressed]``; width ``window``; ``p < start_pos`` -> ``p % window``, else
      ``window + p − start_pos``.

    Parameters
    ----------
    start_pos : int or list of int (one per sequence, >= 0)
    seq_len : int >= 0, tokens per sequence in this call (``S``)
    window : int >= 1 (128 in V4)
    mode : "prefill" | "decode" | "chunk"
    device : where the result goes (computed on the CPU, then copied)

    Returns
    -------
    idx : [B, S, W] int32, ``B = len(start_pos)`` (1 for an int)

    Example
    -------
    >>> import v4kernels
    >>> v4kernels.window_indices(0, 3, window=2)
    tensor([[[ 0, -1],
             [ 0,  1],
             [ 1,  2]]], dtype=torch.int32)
    >>> v4kernels.window_indices([5], 1, window=4, mode="decode")
    tensor([[[2, 3, 0, 1]]], dtype=torch.int32)
    """
    sp = _start_positions("window_indices", start_pos)
    _check_window_indices(sp, seq_len, window, mode)
    width = _reference.window_width(mode, seq_len, window)
    if not sp or seq_len == 0:
        return torch.empty((len(sp), seq_len, width), dtype=torch.int32, device=device)
    out = _window_indices(sp, seq_len, window, mode)
    return out if device is None else out.to(device)


def compressed_indices(
    start_pos: int | Sequence[int],
    seq_len: int,
    ratio: int,
    offset: int,
    mode: str = "prefill",
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dense compressed-entry lists, as used by HCA layers (SPEC §8.1, §8.2).

    Width ``C = max_b (start_pos_b + S) // ratio``. For the query at position ``t``, entry ``c``
    is listed as ``offset + c`` iff ``c < (t + 1) // ratio`` (its window has closed), else −1.
    ``offset`` is where compressed entries start in the KV buffer: ``S`` in prefill, ``window``
    in decode, ``window + S`` in chunk mode (see :func:`window_indices`). ``mode`` only
    validates the start positions and length.

    Parameters
    ----------
    start_pos : int or list of int (one per sequence, >= 0)
    seq_len : int >= 0
    ratio : int >= 1 (128 for HCA; 4 gives every closed CSA entry)
    offset : int >= 0
    mode : "prefill" | "decode" | "chunk"
    device : where the result goes (computed on the CPU, then copied)

    Returns
    -------
    idx : [B, S, C] int32

    Example
    -------
    >>> import v4kernels
    >>> v4kernels.compressed_indices([0], 8, ratio=4, offset=8)
    tensor([[[-1, -1],
             [-1, -1],
             [-1, -1],
             [ 8, -1],
             [ 8, -1],
             [ 8, -1],
             [ 8, -1],
             [ 8,  9]]], dtype=torch.int32)
    """
    sp = _start_positions("compressed_indices", start_pos)
    _check_compressed_indices(sp, seq_len, ratio, offset, mode)
    width = _reference.compressed_width(sp, seq_len, ratio)
    if not sp or seq_len == 0 or width == 0:
        return torch.empty((len(sp), seq_len, width), dtype=torch.int32, device=device)
    out = _compressed_indices(sp, seq_len, ratio, offset, mode)
    return out if device is None else out.to(device)
