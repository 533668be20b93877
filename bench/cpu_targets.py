"""Performance targets of the native CPU backend, measured in one run on this machine.

Every problem is a workload of the benchmark registry (``v4kernels.bench.workloads``: shapes,
seeded inputs, FLOP counts) and every time comes from the harness timer
(``v4kernels.bench.timer.time_fn``, median of the timed repetitions). The script prints this
machine's fp32 GEMM rate (torch.matmul) and stream bandwidth, then one line per workload (median
time, GFLOP/s, fraction of the measured GEMM rate, speed-up over the reference backend) and a
pass/MISS table of the targets:

* ``gemm``: the workloads' FLOPs per second reach a fraction of this machine's fp32 GEMM rate;
* ``reference``: the cpu backend is at least N times faster than the reference backend on the
  same inputs (summed over the listed workloads, e.g. ``hc_pre`` + ``hc_post`` of one step);
* ``faster``: the workload is at least as fast as another one (FP4 indexer keys vs bf16 keys).

    python bench/cpu_targets.py            # all targets except the 64K-token CSA layer
    python bench/cpu_targets.py --csa64k   # also the 64K-token CSA-layer prefill (peak RSS; minutes)
    python bench/cpu_targets.py --quick    # fewer repetitions
    python bench/cpu_targets.py --list     # the targets and their workloads, without running
    python bench/cpu_targets.py --only hc_  # targets/info workloads whose name contains "hc_"
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch

import v4kernels as v4k
import v4kernels._registry as R
from v4kernels.bench.layouts import CSA_RATIO, FLASH, HEAD_DIM, INDEX_DIM, INDEX_HEADS, WINDOW
from v4kernels.bench.peak import gemm_gflops, stream_gbs
from v4kernels.bench.timer import PeakMemory, Timing, time_fn
from v4kernels.bench.workloads import Workload, get_workload


@dataclass(frozen=True)
class Target:
    """``kind`` ``gemm``: Σflops / Σtime(cpu) >= goal · GEMM rate; ``reference``:
    Σtime(reference) / Σtime(cpu) >= goal; ``faster``: time(cpu, ``than``) / Σtime(cpu) >= goal."""

    name: str
    workloads: tuple[str, ...]
    kind: str
    goal: float
    than: str = ""

    @property
    def want(self) -> str:
        if self.kind == "gemm":
            return f">= {self.goal:.0%} of GEMM"
        if self.kind == "reference":
            return f">= x{self.goal:g} vs reference"
        return f"no slower than {self.than.split('/', 1)[1]}"


_SA = "sparse_attn/flash-decode-csa-b{}-h64-ctx32k"
_IDX = "indexer_topk/flash-decode-b1-ctx1m-{}"

TARGETS: tuple[Target, ...] = (
    *(Target(f"sparse_attn decode B={b}", (_SA.format(b),), "gemm", 0.70) for b in (1, 4, 16)),
    Target("sparse_attn prefill 4096 queries", ("sparse_attn/flash-prefill-csa-s4096-h64",), "gemm", 0.60),
    Target("indexer_topk decode 1M bf16 keys", (_IDX.format("bf16"),), "gemm", 0.60),
    Target("indexer_topk decode 1M fp4 keys", (_IDX.format("fp4"),), "faster", 1.0, than=_IDX.format("bf16")),
    *(Target(f"hc_pre+hc_post decode T={t}", (f"hc_pre/flash-decode-b{t}-s1", f"hc_post/flash-decode-b{t}-s1"), "reference", 10)
      for t in (1, 4)),
    Target("compress_kv prefill CSA S=4096", ("compress_kv/flash-csa-prefill-b1-s4096",), "reference", 10),
    Target("compress_kv prefill HCA S=4096", ("compress_kv/flash-hca-prefill-b1-s4096",), "reference", 10),
    Target("moe_experts 512 tokens fp4", ("moe_experts/flash-ep16-fp4-prefill-t512",), "reference", 3),
)
#: measured and printed, no target
INFO: tuple[str, ...] = (
    *(f"sparse_attn/flash-decode-csa-fp8kv-b{b}-h64-ctx32k" for b in (1, 4, 16)),
    _IDX.format("fp8"),
    "hc_head/flash-decode-b4-s1",
)
#: reference runs of these workloads take seconds to tens of seconds: one timed call, no warm-up
SLOW_REFERENCE = {"sparse_attn/flash-prefill-csa-s4096-h64", "compress_kv/flash-csa-prefill-b1-s4096",
                  "compress_kv/flash-hca-prefill-b1-s4096", "moe_experts/flash-ep16-fp4-prefill-t512"}


class Runner:
    """Times registry workloads on the cpu and reference backends (inputs made once per workload)."""

    def __init__(self, min_time: float) -> None:
        self.min_time = min_time
        self.times: dict[tuple[str, str], float] = {}
        self._inputs: dict[str, Any] = {}

    def _inputs_of(self, w: Workload) -> Any:
        if w.name not in self._inputs:
            self._inputs = {w.name: w.make(torch.device("cpu"))}  # keep one workload's inputs alive at a time
        return self._inputs[w.name]

    def time(self, name: str, backend: str) -> float:
        key = (name, backend)
        if key not in self.times:
            w = get_workload(name)
            inputs = self._inputs_of(w)

            def call() -> Any:
                with v4k.use_backend(backend, ops=[w.op]):
                    return w.run(inputs)

            if backend == "reference" and name in SLOW_REFERENCE:
                t: Timing = time_fn(call, "cpu", warmup=0, min_time=0.0, min_reps=1, max_reps=1)
            else:
                t = time_fn(call, "cpu", warmup=1, min_time=self.min_time, min_reps=3)
            self.times[key] = t.p50
        return self.times[key]


def _row(w: Workload, t: float, gemm: float, ref_t: float | None, note: str) -> None:
    cols = [f"{w.name:<52}", f"{t * 1e3:11.3f} ms"]
    if w.flops:
        gf = w.flops / t / 1e9
        cols.append(f"{gf:8.1f} GFLOP/s {gf / gemm:6.1%} of GEMM")
    else:
        cols.append(" " * 32)
    cols.append(f"  x{ref_t / t:6.1f} vs reference" if ref_t else " " * 22)
    cols.append(f"  {note}")
    print("".join(cols), flush=True)


def evaluate(target: Target, run: Runner, gemm: float) -> tuple[str, bool]:
    """Measure ``target``'s workloads, print one line each, return (measured, passed)."""
    cpu = {n: run.time(n, "cpu") for n in target.workloads}
    ref = {n: run.time(n, "reference") for n in target.workloads} if target.kind == "reference" else {}
    if target.kind == "gemm" and target.workloads[0] not in SLOW_REFERENCE:
        ref = {n: run.time(n, "reference") for n in target.workloads}  # for information
    for n in target.workloads:
        _row(get_workload(n), cpu[n], gemm, ref.get(n), f"target: {target.name} {target.want}")
    total = sum(cpu.values())
    if target.kind == "gemm":
        measured = sum(get_workload(n).flops for n in target.workloads) / total / 1e9 / gemm
        return f"{measured:.1%}", measured >= target.goal
    if target.kind == "reference":
        measured = sum(ref.values()) / total
    elif target.kind == "faster":
        measured = run.time(target.than, "cpu") / total
    else:
        raise ValueError(f"unknown target kind {target.kind!r}")
    return f"x{measured:.2f}", measured >= target.goal


def csa_layer_64k() -> tuple[str, str, bool]:
    """Attention path of one V4-Flash CSA layer over a 64K-token prefill: indexer top-k over the
    16K compressed indexer keys (FP4) and sparse attention of every query over its window and its
    selected entries (KV: 64K window rows + 16K compressed rows, packed FP8). Not a single op, so
    not a registry workload; dimensions from ``layouts`` (i.e. ``V4Config``), one timed call."""
    s = 65536
    n_c, heads, topk = s // CSA_RATIO, FLASH.n_heads, FLASH.index_topk
    g = torch.Generator().manual_seed(0)

    def layer() -> torch.Tensor:
        qi = torch.randn(1, s, INDEX_HEADS, INDEX_DIM, generator=g).bfloat16()
        w = torch.randn(1, s, INDEX_HEADS, generator=g)
        keys, ks = v4k.fp4_act_quant(torch.randn(1, n_c, INDEX_DIM, generator=g), 32)
        with v4k.use_backend("cpu", ops=["indexer_topk"]):
            comp = v4k.indexer_topk(qi, w, keys, torch.arange(s)[None], topk, ratio=CSA_RATIO, offset=s, key_scales=ks)
        del qi, w
        # the window part of the index list is plain index arithmetic (no cpu kernel; reference)
        idx = torch.cat((v4k.window_indices([0], s, WINDOW, mode="prefill"), comp), -1)
        del comp
        q = torch.randn(1, s, heads, HEAD_DIM, generator=g).bfloat16()
        kv = v4k.pack_kv_fp8(torch.randn(1, s + n_c, HEAD_DIM, generator=g).bfloat16())
        with v4k.use_backend("cpu", ops=["sparse_attn"]):
            return v4k.sparse_attn(q, kv, torch.zeros(heads), idx)

    with PeakMemory("cpu") as pm:
        t = time_fn(layer, "cpu", warmup=0, min_time=0.0, min_reps=1, max_reps=1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    grew = f", {pm.mb / 1024:.2f} GiB of it during the layer" if pm.mb is not None else ""
    print(f"{'csa layer prefill 64K (indexer + sparse_attn)':<52} {t.p50:11.1f} s   process peak RSS {rss:.2f} GiB{grew}"
          f"  target: within 24 GiB")
    return "csa layer prefill 64K peak RSS (<= 24 GiB)", f"{rss:.2f} GiB", rss <= 24.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter timing budget per workload")
    ap.add_argument("--csa64k", action="store_true", help="run the 64K-token CSA-layer prefill (slow)")
    ap.add_argument("--list", action="store_true", help="print the targets and their registry workloads, run nothing")
    ap.add_argument("--only", metavar="TEXT", help="only the targets (and information rows) whose name contains TEXT")
    args = ap.parse_args(argv)
    targets = [tg for tg in TARGETS if not args.only or args.only in tg.name]
    info = [n for n in INFO if not args.only or args.only in n]
    if args.list:
        for tg in targets:
            print(f"{tg.name:<40} {tg.want:<34} {', '.join(tg.workloads)}")
        print(f"{'(information only)':<40} {'':<34} {', '.join(info)}")
        return 0
    reasons = R.get_backend("cpu").backend_reasons("cpu")
    if reasons:
        print("cpu backend unavailable:", "; ".join(reasons))
        return 1
    gemm = gemm_gflops("cpu", 2048, budget=1.0)
    bw = stream_gbs("cpu", 1 << 25, budget=1.0)
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cpus "
          f"(a load above the cpu count means other processes shared these cores during the run)")
    print(f"machine: {torch.get_num_threads()} threads, fp32 GEMM {gemm:.1f} GFLOP/s, stream copy {bw['copy']:.1f} GB/s, "
          f"triad {bw['triad']:.1f} GB/s")
    run = Runner(0.2 if args.quick else 0.6)
    summary: list[tuple[str, str, bool]] = []
    for tg in targets:
        measured, ok = evaluate(tg, run, gemm)
        summary.append((f"{tg.name} ({tg.want})", measured, ok))
    for name in info:
        _row(get_workload(name), run.time(name, "cpu"), gemm, None, "(info)")
    if args.csa64k:
        summary.append(csa_layer_64k())
    print("\ntargets (one run; reference times of the slow workloads are single calls):")
    print(f"{'target':<62} {'measured':>10}  result")
    for name, meas, ok in summary:
        print(f"{name:<62} {meas:>10}  {'pass' if ok else 'MISS'}")
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
