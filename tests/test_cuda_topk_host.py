"""The radix top-k of the CUDA backend, checked on the CPU: csrc/cuda/tests/topk_host.cpp runs the
kernel's passes sequentially on the same digit/bucket/ordering helpers (csrc/cuda/topk_select.h)
and must select exactly what the reference's stable descending sort selects, including ties,
signed zeros, rows with fewer visible entries than k, and k past N."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from v4kernels.ops.indexer.reference import select_topk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "csrc", "cuda", "tests", "topk_host.cpp")


@pytest.fixture(scope="module")
def host_select(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the host model of the CUDA top-k")
    so = str(tmp_path_factory.mktemp("topk") / "topk_host.so")
    subprocess.run([cxx, "-O2", "-std=c++17", "-Wall", "-Werror", "-shared", "-fPIC", SRC, "-o", so], check=True)
    lib = ctypes.CDLL(so)
    fn = lib.v4k_topk_select_host
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int64,
                   ctypes.c_void_p]

    def run(scores: torch.Tensor, limits: torch.Tensor, k: int, offset: int) -> torch.Tensor:
        scores = scores.float().contiguous()
        limits = limits.long().contiguous()
        rows, n = scores.shape
        kk = min(k, n)
        out = torch.empty(rows, kk, dtype=torch.int32)
        fn(scores.data_ptr(), limits.data_ptr(), rows, n, kk, offset, out.data_ptr())
        return out

    return run


def _expected(scores, limits, k, offset):
    n = scores.shape[1]
    lim = limits.clamp(max=n)
    masked = scores.masked_fill(torch.arange(n)[None, :] >= lim[:, None], float("-inf"))
    return select_topk(masked, lim, min(k, n), offset)


@pytest.mark.parametrize("seed", range(6))
def test_random_rows_match_reference(host_select, seed):
    g = torch.Generator().manual_seed(seed)
    rows, n = 7, int(torch.randint(1, 3000, (1,), generator=g))
    scores = torch.randn(rows, n, generator=g)
    if seed % 2:  # heavy ties: few distinct values, signed zeros
        scores = torch.randint(-3, 4, (rows, n), generator=g).float() * 0.5
        scores[scores == 0] = torch.where(torch.rand(int((scores == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    limits = torch.randint(0, n + 5, (rows,), generator=g)
    limits[0] = n
    for k in (1, 7, 64, 512, n + 3):
        got = host_select(scores, limits, k, 11)
        exp = _expected(scores, limits, k, 11)
        assert torch.equal(got, exp), (seed, k)


def test_large_row_and_extremes(host_select):
    g = torch.Generator().manual_seed(7)
    n = 262_144
    scores = torch.randn(2, n, generator=g) * 1e3
    scores[0, ::1000] = float("inf")
    scores[1, ::997] = -float("inf")
    scores[1, 5] = torch.finfo(torch.float32).max
    scores[1, 6] = -torch.finfo(torch.float32).max
    scores[1, 7] = 1e-45  # denormal
    limits = torch.tensor([n, n - 12345])
    for k in (512, 1024, 4096):
        assert torch.equal(host_select(scores, limits, k, 0), _expected(scores, limits, k, 0))


def test_all_equal_row_takes_lowest_columns(host_select):
    scores = torch.full((1, 100), 2.5)
    out = host_select(scores, torch.tensor([100]), 10, 0)
    assert out.tolist() == [list(range(10))]
