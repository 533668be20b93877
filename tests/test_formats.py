"""One home for layouts and codes: v4kernels/formats.py, the generated C++ header, the kernels."""
from __future__ import annotations

import os
import re

import torch

import v4kernels as v4k
from v4kernels import formats as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generated_header_matches_module():
    with open(os.path.join(ROOT, "csrc", "common", "v4k_formats.h")) as f:
        assert f.read() == F.c_header(), "csrc/common/v4k_formats.h is stale: python -m v4kernels.formats > csrc/common/v4k_formats.h"


def test_packed_row_layout_is_consistent():
    assert F.NOPE_DIM + F.ROPE_DIM == F.HEAD_DIM
    assert F.KV_N_SCALES * F.KV_SCALE_BLOCK == F.NOPE_DIM
    assert F.KV_ROPE_OFFSET + 2 * F.ROPE_DIM == F.KV_SCALE_OFFSET
    assert F.PACKED_KV_ROW_BYTES == 584
    kv = torch.randn(3, F.HEAD_DIM).bfloat16()
    with v4k.use_backend("reference"):
        packed = v4k.pack_kv_fp8(kv)
    assert packed.shape == (3, F.PACKED_KV_ROW_BYTES)
    assert torch.all(packed[:, F.KV_PAD_OFFSET] == 0)
    rope = packed[:, F.KV_ROPE_OFFSET:F.KV_SCALE_OFFSET].contiguous().view(torch.bfloat16)
    assert torch.equal(rope, kv[:, F.NOPE_DIM:])


def _python_numbers(path: str) -> list[tuple[int, str]]:
    import io
    import tokenize

    with open(path) as f:
        src = f.read()
    return [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(src).readline)
            if tok.type == tokenize.NUMBER]


def _cpp_numbers(path: str) -> list[tuple[int, str]]:
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            code = re.sub(r'"(\\.|[^"\\])*"', '""', line.split("//")[0])
            out += [(i, m) for m in re.findall(r"(?<![\w.])\d+(?![\w.])", code)]
    return out


def test_no_restated_layout_literals():
    """Kernels take the packed row's size and offsets from formats (Python) or the generated header
    (C++), never as bare literals in code (comments, docstrings and messages may name them)."""
    offenders = []
    kernel_files = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "v4kernels", "ops")):
        kernel_files += [os.path.join(dirpath, n) for n in files if n.endswith(".py")]
    for dirpath, _, files in os.walk(os.path.join(ROOT, "csrc")):
        kernel_files += [os.path.join(dirpath, n) for n in files if n.endswith((".cpp", ".h", ".cu", ".cuh"))
                         and n != "v4k_formats.h"]
    for path in kernel_files:
        numbers = _python_numbers(path) if path.endswith(".py") else _cpp_numbers(path)
        offenders += [f"{os.path.relpath(path, ROOT)}:{i}: {n}" for i, n in numbers if n in ("584", "576", "583")]
    assert not offenders, "\n".join(offenders)


def test_cpu_limits_come_from_the_extension():
    import pytest

    if v4k.available_backends("hc_post")["cpu"]:
        pytest.skip("cpu extension not built")
    from v4kernels.backends.cpu import native_limits
    from v4kernels.ops.mhc import cpu as mhc_cpu

    lim = native_limits()
    assert set(lim) >= {"hc_post.max_streams", "moe_experts.max_topk", "grouped_linear.direct_max_tokens"}
    assert mhc_cpu.LIMITS == lim
    hc = lim["hc_post.max_streams"] + 1
    reasons = mhc_cpu._hc_post_refusals(torch.zeros(1, 8), torch.zeros(1, hc, 8), torch.zeros(1, hc), torch.zeros(1, hc, hc), False)
    assert reasons and str(lim["hc_post.max_streams"]) in reasons[0]
