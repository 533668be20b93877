"""Storage layouts and codes shared by every backend: the one home of these facts.

Python kernels import them from here; native code includes ``csrc/common/v4k_formats.h``, which
is generated from this module (``python -m v4kernels.formats > csrc/common/v4k_formats.h``) and
checked against it by the test suite.

The packed FP8 KV row (docs/spec.md §13.1), 584 bytes per token::

    bytes [  0, 448)  448 e4m3 values of the no-RoPE dims, one UE8M0 scale per 64 of them
    bytes [448, 576)  64 RoPE dims as bf16 (little-endian)
    bytes [576, 583)  7 UE8M0 scale bytes (value 2^(byte − 127))
    byte   583        zero padding
"""
from __future__ import annotations

import torch

#: head dimension of the V4 attention (nope + rope) and its parts
HEAD_DIM = 512
ROPE_DIM = 64
NOPE_DIM = HEAD_DIM - ROPE_DIM  # 448
#: no-RoPE values sharing one UE8M0 scale in the packed KV row
KV_SCALE_BLOCK = 64
KV_N_SCALES = NOPE_DIM // KV_SCALE_BLOCK  # 7
#: byte offsets inside a packed KV row
KV_ROPE_OFFSET = NOPE_DIM  # 448
KV_SCALE_OFFSET = KV_ROPE_OFFSET + 2 * ROPE_DIM  # 576
KV_PAD_OFFSET = KV_SCALE_OFFSET + KV_N_SCALES  # 583
PACKED_KV_ROW_BYTES = KV_PAD_OFFSET + 1  # 584
#: UE8M0 exponent bias (scale = 2^(byte − 127))
UE8M0_BIAS = 127

#: float storage codes (kernel arguments selecting a load/store path)
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

#: storage kinds beyond the float codes
KV_FP8_PACKED = 100  # sparse_attn kv: packed 584-byte rows
KEY_FP8 = 101  # indexer keys: e4m3 [B, N, dI] + fp32 scales [B, N, dI/128]
KEY_FP4 = 102  # indexer keys: packed e2m1 [B, N, dI/2] + fp32 scales [B, N, dI/32]
W_FP8 = 201  # weights: e4m3 [E, rows, cols] + scales [E, ceil(rows/128), ceil(cols/128)]
W_FP4 = 202  # weights: packed e2m1 [E, rows, cols/2] + scales [E, rows, cols/32]

#: block sizes of the quantised formats
FP8_ACT_BLOCK = 128
FP4_ACT_BLOCK = 32
FP8_WEIGHT_BLOCK = 128


def dtype_code(dtype: torch.dtype) -> int:
    """The storage code of a float dtype (``DTYPE_CODES``)."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"no storage code for {dtype}; expected one of {list(DTYPE_CODES)}") from None


_HEADER_CONSTANTS = [
    ("kHeadDim", "HEAD_DIM"), ("kRopeDim", "ROPE_DIM"), ("kNopeDim", "NOPE_DIM"),
    ("kKvScaleBlock", "KV_SCALE_BLOCK"), ("kKvNScales", "KV_N_SCALES"), ("kKvRopeOffset", "KV_ROPE_OFFSET"),
    ("kKvScaleOffset", "KV_SCALE_OFFSET"), ("kKvPadOffset", "KV_PAD_OFFSET"),
    ("kPackedRowBytes", "PACKED_KV_ROW_BYTES"), ("kUe8m0Bias", "UE8M0_BIAS"),
    ("kFp8ActBlock", "FP8_ACT_BLOCK"), ("kFp4ActBlock", "FP4_ACT_BLOCK"), ("kFp8WeightBlock", "FP8_WEIGHT_BLOCK"),
]
_HEADER_CODES = ["KV_FP8_PACKED", "KEY_FP8", "KEY_FP4", "W_FP8", "W_FP4"]


def c_header() -> str:
    """``csrc/common/v4k_formats.h``: these constants for native code (CPU and CUDA)."""
    g = globals()
    lines = [
        "// Generated from v4kernels/formats.py by `python -m v4kernels.formats`; do not edit.",
        "// The test suite checks that this file matches the Python module.",
        "#pragma once",
        "",
        "#include <cstdint>",
        "",
        "namespace v4k {",
        "",
        "// float storage codes",
        "enum DType : int { "
        + ", ".join(f"{n} = {DTYPE_CODES[d]}" for n, d in (("F32", torch.float32), ("BF16", torch.bfloat16), ("F16", torch.float16)))
        + " };",
        "",
        "// storage kinds beyond the float codes",
        *[f"constexpr int {n} = {g[n]};" for n in _HEADER_CODES],
        "",
        "// packed FP8 KV row (584 bytes) and block sizes",
        *[f"constexpr int64_t {c} = {g[p]};" for c, p in _HEADER_CONSTANTS],
        "",
        "}  // namespace v4k",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    sys.stdout.write(c_header())
