"""Per-call dispatch overhead: the public op against the bare kernel it dispatches to.

For each op, one decode-shaped workload of the registry is called through the public function
(validation + backend selection + kernel; looked up once and called with positional arguments,
as an engine's hot loop calls it) and, on identical arguments, through the kernel that
dispatch chose (for a native backend, the implementation op ``torch.ops.v4k_impl.<op>``). The
library's own cost is isolated exactly by swapping that kernel for a stub that returns the
recorded output: ``overhead = median(public call with the stub) − median(stub call)``, timed in
alternating rounds of back-to-back calls in one process, so the kernel's run time (and its noise on
a shared machine) drops out. The kernel's own median is reported beside it.

``python -m v4kernels bench --overhead`` prints the table; the targets (``TARGET_US`` for the
ops of a decode step's hot path) are checked as a pass/fail column.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .workloads import Workload, all_workloads

__all__ = ["OverheadRow", "measure_overhead", "format_overhead", "TARGET_US", "pick_workload"]

#: per-call overhead targets (µs above the bare kernel) of the decode hot path
TARGET_US = {"hc_post": 3.0, "sparse_attn": 3.0, "rms_norm": 3.0, "apply_rope": 3.0}


@dataclass
class OverheadRow:
    op: str
    workload: str
    backend: str
    overhead_us: float  # host time of the public call above the kernel it dispatches to
    kernel_us: float  # the kernel alone, for scale

    @property
    def target_us(self) -> float | None:
        return TARGET_US.get(self.op)

    @property
    def ok(self) -> bool | None:
        t = self.target_us
        return None if t is None else self.overhead_us <= t


def pick_workload(op: str) -> Workload | None:
    """The cheapest decode workload of ``op`` (the per-call cost matters most where kernels are small)."""
    ws = [w for w in all_workloads() if w.op == op]
    dec = [w for w in ws if w.phase == "decode"] or ws
    return min(dec, key=lambda w: (w.bytes + w.flops, w.name)) if dec else None


def _public_call(w: Workload, inputs: Any) -> Callable[[], Any]:
    """The workload's public call as an engine's hot loop makes it: the function looked up once and
    called with positional arguments (the harness's own lookup and keyword packing are not the
    library's cost)."""
    if w.call is not None:
        return lambda: w.run(inputs)
    import inspect

    import v4kernels

    fn = getattr(v4kernels, w.op)
    bound = inspect.signature(fn).bind(**inputs)
    args, kwargs = bound.args, bound.kwargs
    if kwargs:
        return lambda: fn(*args, **kwargs)
    return lambda: fn(*args)


def _per_call_us(fn: Callable[[], Any], calls: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - t0) / calls / 1e3


def measure_overhead(ops: list[str] | None = None, device: str = "cpu", rounds: int = 15,
                     min_round_s: float = 0.01) -> list[OverheadRow]:
    """Time every op (or ``ops``) through the public function and through its bare kernel."""
    import v4kernels
    from v4kernels import _registry as R

    dev = torch.device(device)
    rows = []
    names = ops or sorted({w.op for w in all_workloads()})
    for op in names:
        w = pick_workload(op)
        if w is None:
            continue
        inputs = w.make(dev)
        with torch.inference_mode():
            with R.record_calls() as calls:
                w.run(inputs)
            mine = [c for c in calls if c[0] == op]
            if len(mine) != 1:
                continue  # composite entry points (several ops per call) have no single bare kernel
            _, backend, args, recorded_out = mine[0]
            entry = R.get_backend(backend).kernel(op)
            kernel_args = tuple(args)
            bare = lambda: entry.fn(*kernel_args)  # noqa: E731
            bare()
            t0 = time.perf_counter()
            bare()
            one = max(time.perf_counter() - t0, 1e-7)
            ker = [_per_call_us(bare, max(3, min(2000, int(min_round_s / one)))) for _ in range(3)]
            real_fn = entry.fn
            stub = lambda *a: recorded_out  # noqa: E731
            entry.fn = stub
            try:
                public = _public_call(w, inputs)
                direct = lambda: stub(*kernel_args)  # noqa: E731
                public()
                pub, dirs = [], []
                for _ in range(rounds):
                    pub.append(_per_call_us(public, 2000))
                    dirs.append(_per_call_us(direct, 2000))
            finally:
                entry.fn = real_fn
        rows.append(OverheadRow(op, w.name, backend, statistics.median(pub) - statistics.median(dirs),
                                statistics.median(ker)))
    return rows


def format_overhead(rows: list[OverheadRow]) -> str:
    head = f"{'op':22s} {'backend':10s} {'overhead µs':>12s} {'kernel µs':>11s}  target     workload"
    lines = [head, "-" * len(head)]
    for r in rows:
        tgt = "" if r.target_us is None else f"≤{r.target_us:g} {'PASS' if r.ok else 'FAIL'}"
        lines.append(f"{r.op:22s} {r.backend:10s} {r.overhead_us:12.2f} {r.kernel_us:11.1f}  {tgt:10s} {r.workload}")
    return "\n".join(lines)
