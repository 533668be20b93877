"""Parity cases for the KV-buffer index generators (SPEC §8), exact compare, with per-row Python
list constructions (straight from the layout text of SPEC §8 / docs/op_contracts.md) as the
independent implementation."""
from __future__ import annotations

from typing import Any

import torch

import v4kernels as v4k

from ..._registry import Tolerance
from . import ParityCase, register

_EXACT = Tolerance(0.0, 0.0, 1.0)


def slot_of(p: int, start_pos: int, window: int, mode: str) -> int:
    """KV-buffer row holding absolute position ``p`` in each layout."""
    if mode == "prefill":
        return p
    if mode == "decode":
        return p % window
    return p % window if p < start_pos else window + p - start_pos


def naive_window_indices(start_pos: list[int], seq_len: int, window: int, mode: str) -> torch.Tensor:
    width = min(seq_len, window) if mode == "prefill" else window
    rows = []
    for sp in start_pos:
        seq = []
        for i in range(seq_len):
            t = sp + i
            visible = [p for p in range(t - window + 1, t + 1) if p >= 0]
            row = [slot_of(p, sp, window, mode) for p in visible]
            seq.append(row + [-1] * (width - len(row)))
        rows.append(seq)
    return torch.tensor(rows, dtype=torch.int32).reshape(len(start_pos), seq_len, width)


def naive_compressed_indices(start_pos: list[int], seq_len: int, ratio: int, offset: int, mode: str) -> torch.Tensor:
    width = max((sp + seq_len) // ratio for sp in start_pos)
    rows = []
    for sp in start_pos:
        seq = []
        for i in range(seq_len):
            t = sp + i
            n_closed = 0
            while (n_closed + 1) * ratio - 1 <= t:  # window c covers tokens c·m … c·m+m−1
                n_closed += 1
            seq.append([offset + c if c < n_closed else -1 for c in range(width)])
        rows.append(seq)
    return torch.tensor(rows, dtype=torch.int32).reshape(len(start_pos), seq_len, width)


def _window_case(name: str, start_pos: list[int], seq_len: int, mode: str, window: int = 128, tags=("v4-flash",)) -> None:
    def make(g: torch.Generator, d: torch.device) -> dict[str, Any]:
        return {"start_pos": list(start_pos), "seq_len": seq_len, "window": window, "mode": mode, "device": d}

    def run(start_pos, seq_len, window, mode, device):
        return v4k.window_indices(start_pos, seq_len, window, mode, device=device)

    def naive(start_pos, seq_len, window, mode, device):
        return naive_window_indices(start_pos, seq_len, window, mode)

    register(ParityCase(f"window_indices/{name}", "window_indices", make, run, path=mode, tags=frozenset(tags),
                        naive=naive, naive_tol=_EXACT))


def _compressed_case(name: str, start_pos: list[int], seq_len: int, ratio: int, offset: int, mode: str, tags=("v4-flash",)) -> None:
    def make(g: torch.Generator, d: torch.device) -> dict[str, Any]:
        return {"start_pos": list(start_pos), "seq_len": seq_len, "ratio": ratio, "offset": offset, "mode": mode, "device": d}

    def run(start_pos, seq_len, ratio, offset, mode, device):
        return v4k.compressed_indices(start_pos, seq_len, ratio, offset, mode, device=device)

    def naive(start_pos, seq_len, ratio, offset, mode, device):
        return naive_compressed_indices(start_pos, seq_len, ratio, offset, mode)

    register(ParityCase(f"compressed_indices/{name}", "compressed_indices", make, run, path=mode, tags=frozenset(tags),
                        naive=naive, naive_tol=_EXACT))


_window_case("prefill_s300", [0], 300, "prefill")
_window_case("prefill_b2_s63", [0, 0], 63, "prefill", tags=("odd",))
_window_case("decode_b6_t0_126_127_128_255_256", [0, 126, 127, 128, 255, 256], 1, "decode", tags=("edge",))
_window_case("decode_b2_far", [1_048_575, 70_000], 1, "decode")
_window_case("chunk_b2_s70", [130, 5], 70, "chunk")
_window_case("chunk_s1_window4", [9], 1, "chunk", window=4, tags=("odd",))

_compressed_case("hca_prefill_s600", [0], 600, 128, 600, "prefill")
_compressed_case("hca_decode_b6_edges", [0, 126, 127, 128, 255, 256], 1, 128, 128, "decode", tags=("edge",))
_compressed_case("hca_decode_1m", [1_048_575, 4096], 1, 128, 128, "decode")
_compressed_case("csa_all_chunk_b2_s33", [100, 7], 33, 4, 128 + 33, "chunk", tags=("odd",))

# generic shapes (small models): window 8, HCA ratio 8
_window_case("generic_prefill_s20_window8", [0, 0], 20, "prefill", window=8, tags=("generic",))
_window_case("generic_decode_b3_window8", [3, 7, 30], 1, "decode", window=8, tags=("generic",))
_window_case("generic_chunk_b2_s5_window8", [13, 2], 5, "chunk", window=8, tags=("generic",))
_compressed_case("generic_ratio8_chunk_b2_s5", [13, 2], 5, 8, 8 + 5, "chunk", tags=("generic",))
