"""One-shot hardware check of the Cambricon MLU backends: parity of every ``cambricon`` adapter
and every Triton-MLU kernel against the reference (the shared parity cases, large V4-Flash ones
included), then timings with GB/s and TFLOP/s on the V4-Flash workloads of the benchmark
registry (``v4kernels/bench/workloads.py``), each also checked against the reference.

    python bench/mlu_check.py                       # on a machine with torch_mlu + torch_mlu_ops
    python bench/mlu_check.py --only sparse_attn,indexer_topk --quick
    python bench/mlu_check.py --emulate --quick     # no MLU: CPU tensors, emulated torch_mlu_ops
                                                    # (tests/vendor/cambricon_ops.py), parity only

Prints one line per parity case and per timed workload; exits 1 if any parity or reference
check fails (or nothing ran), 0 otherwise. ``--emulate`` checks the bridging only, never
Cambricon's kernels.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import v4kernels as v4k  # noqa: E402,F401
from v4kernels import _registry as R  # noqa: E402
from v4kernels.backends import cambricon as camb  # noqa: E402

BACKENDS = ("cambricon", "triton")


def install_emulation() -> None:
    """CPU stand-in: torch_mlu_ops := the emulation, and the cambricon backend forced-runnable on
    CPU tensors (what tests/test_cambricon.py does)."""
    spec = importlib.util.spec_from_file_location("torch_mlu_ops", os.path.join(ROOT, "tests", "vendor",
                                                                                "cambricon_ops.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["torch_mlu_ops"] = mod
    camb.CambriconBackend.tmo.cache_clear()

    class Emulated(camb.CambriconBackend):
        forced_only_devices = frozenset({"cpu"})

        def backend_reasons(self, device_type: str) -> list[str]:
            self.tmo()
            return []

    R.register_backend(Emulated(), replace=True)


def parity(device: str, ops: list[str] | None, large: bool, backends: tuple[str, ...]) -> tuple[int, int]:
    from v4kernels.testing import run_case, select_cases

    passed = failed = 0
    for case in select_cases(ops, include_large=large):
        for name in backends:
            r = run_case(case, name, device)
            if r.status == "skip":
                continue
            ok = r.status == "pass"
            passed += ok
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'} {name:9s} {case.name:58s} {r.detail} ({r.seconds * 1e3:.1f} ms)",
                  flush=True)
    return passed, failed


def timings(device: str, ops: list[str] | None, quick: bool, backends: tuple[str, ...]) -> tuple[int, int]:
    from v4kernels.bench.runner import BenchConfig, run_bench
    from v4kernels.bench.workloads import select

    ws = [w for w in select(ops, tags=["flash"], quick=quick)]
    cfg = BenchConfig(device=device, refcheck=True, progress=False, min_time=0.2, max_reps=50)
    rows = run_bench(ws, list(backends), cfg)
    ok = bad = 0
    print(f"\n{'workload':52s} {'backend':9s} {'p50 us':>10s} {'TFLOP/s':>8s} {'GB/s':>8s}  reference check")
    for r in rows:
        if r.status != "ok":
            continue
        good = r.refcheck in ("pass", "self")
        ok += good
        bad += not good
        tf = r.gflops / 1e3 if not math.isnan(r.gflops) else float("nan")
        print(f"{r.workload[:52]:52s} {r.backend:9s} {r.p50_us:10.1f} {tf:8.2f} {r.gbs:8.1f}  "
              f"{r.refcheck} {r.refcheck_detail}", flush=True)
    return ok, bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated ops")
    p.add_argument("--quick", action="store_true", help="no large parity cases; quick workloads only")
    p.add_argument("--emulate", action="store_true", help="CPU + emulated torch_mlu_ops: adapter parity only")
    p.add_argument("--no-bench", action="store_true", help="parity only")
    args = p.parse_args(argv)
    ops = args.only.split(",") if args.only else None
    if args.emulate:
        install_emulation()
        device, backends = "cpu", ("cambricon",)
    else:
        # the device name "mlu" exists in torch only once torch_mlu is imported
        from v4kernels import _platform

        probe = _platform.mlu_probe()
        if not probe.ok:
            print(f"no usable MLU: {probe.detail}", file=sys.stderr)
            return 1
        device, backends = "mlu", BACKENDS
        for name in backends:
            why = R.get_backend(name).backend_reasons("mlu")
            print(f"{name}: {'usable' if not why else '; '.join(why)}")
    print(f"cambricon limits: {', '.join(sorted(camb.LIMITS))} adapted; fallbacks: {', '.join(sorted(camb.NO_VENDOR_OP))}")
    passed, failed = parity(device, ops, not args.quick, backends)
    print(f"\nparity: {passed} passed, {failed} failed")
    if not args.emulate and not args.no_bench:
        ok, bad = timings(device, ops, args.quick, backends)
        print(f"\nreference checks of timed workloads: {ok} passed, {bad} failed")
        failed += bad
        passed += ok
    if passed == 0:
        print("nothing ran", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
