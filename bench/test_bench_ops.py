"""pytest-benchmark regression tracking on small shapes: every op's tiny/quick workloads from the
shared registry (v4kernels.bench.workloads), on every backend usable here.

Run explicitly (CI's testpaths is ``tests``)::

    pytest bench/ --benchmark-only                      # time
    pytest bench/ --benchmark-autosave                  # store a baseline under .benchmarks/
    pytest bench/ --benchmark-compare --benchmark-compare-fail=median:10%   # fail on a regression

Each benchmark's ``extra_info`` carries the workload's FLOPs and bytes, so GFLOP/s and GB/s
can be derived from the stored JSON.
"""
from __future__ import annotations

import pytest
import torch

import v4kernels
from v4kernels.bench.runner import default_backends
from v4kernels.bench.workloads import select

CASES = [(w, b) for w in select(quick=True) for b in default_backends(w.op, "cpu")]


@pytest.mark.parametrize("workload,backend", CASES, ids=[f"{w.name}[{b}]" for w, b in CASES])
def test_bench(benchmark, workload, backend):
    inputs = workload.make(torch.device("cpu"))
    benchmark.extra_info.update(op=workload.op, backend=backend, flops=workload.flops, bytes=workload.bytes,
                                tags=",".join(sorted(workload.tags)))

    def run():
        with v4kernels.use_backend(backend, ops=[workload.op]):
            return workload.run(inputs)

    out = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert out is not None
    assert v4kernels.last_backend(workload.op) == backend
