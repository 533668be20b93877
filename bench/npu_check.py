"""One-shot check of v4kernels on an Ascend NPU (torch_npu + CANN installed): parity of every
ascend adapter and every Triton-Ascend kernel against the reference, including the full
V4-Flash-dimension cases, then timings with TFLOP/s and GB/s for each workload of the registry
(``v4kernels/bench/workloads.py``) the ascend backend runs.

    python bench/npu_check.py                      # parity (all cases, large included) + timings
    python bench/npu_check.py --parity-only
    python bench/npu_check.py --only sparse_attn,moe_gate --min-time 0.5

Prints PASS/FAIL/SKIP per (case, backend) with the metric or the refusal reason, then one line per
workload: op, backend that ran it, median time, TFLOP/s, GB/s. Exits 1 on any parity failure (an
unexpected vendor tie order, layout or sink semantics shows up here first), 2 when no NPU is usable.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import v4kernels as v4k  # noqa: E402
from v4kernels import _platform  # noqa: E402
from v4kernels import _registry as R  # noqa: E402
from v4kernels.bench.timer import synchronizer, time_fn  # noqa: E402
from v4kernels.bench.workloads import all_workloads  # noqa: E402
from v4kernels.testing import run_case, select_cases  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="npu")
    p.add_argument("--only", help="comma-separated ops")
    p.add_argument("--parity-only", action="store_true")
    p.add_argument("--min-time", type=float, default=0.2)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    probe = _platform.npu_probe()
    if dev.type == "npu" and not probe.ok:
        print(f"no usable NPU: {probe.detail}", file=sys.stderr)
        return 2
    ascend = R.get_backend("ascend")
    print(f"ascend: {ascend.soc[1]}; torch_npu: {probe.detail}")
    ops = args.only.split(",") if args.only else None
    failed = 0
    for case in select_cases(ops, include_large=True):
        for backend in ("ascend", "triton"):
            r = run_case(case, backend, dev)
            failed += r.status in ("fail", "error")
            print(f"{r.status.upper():5s} {backend:7s} {case.name:55s} {r.detail[:160]}")
    print(f"\nparity: {failed} failure(s)")
    if args.parity_only:
        return 1 if failed else 0
    sync = synchronizer(dev)
    print(f"\n{'workload':48s} {'backend':10s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>8s}")
    for w in all_workloads():
        if ops and w.op not in ops:
            continue
        try:
            inputs = w.make(dev)
            with v4k.track_usage() as usage:
                w.run(inputs)
            backend = ",".join(sorted({b for (op, b) in usage if op == w.op})) or "?"
            t = time_fn(lambda: w.run(inputs), dev, min_time=args.min_time)
            sec = t.p50
            sync()
        except Exception as e:  # noqa: BLE001 - one failing workload must not hide the others
            print(f"{w.name:48s} error: {type(e).__name__}: {str(e)[:120]}")
            continue
        print(f"{w.name:48s} {backend:10s} {sec * 1e3:9.3f} {w.flops / sec / 1e12:8.2f} {w.bytes / sec / 1e9:8.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
