"""``python -m v4kernels bench`` and ``python -m v4kernels kvcalc``.

Exit codes of ``bench``: 0 when every selected row ran (or was skipped with a reason) and no
comparison failed; 1 when a row errored, a ``--refcheck`` failed, or ``--compare`` found a row
slower than ``--threshold`` (or no longer running); 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

__all__ = ["add_bench_parsers", "cmd_bench", "cmd_kvcalc"]

QUICK_CSV = os.path.join("out", "bench_quick.csv")
QUICK_PNG = os.path.join("out", "bench_quick.png")


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or () for v in item.split(",") if v.strip()]


def add_bench_parsers(sub: Any) -> None:
    """Add the ``bench`` and ``kvcalc`` subcommands to an argparse subparsers object."""
    pb = sub.add_parser(
        "bench", help="time ops on backends over the shared V4 workload registry (CSV, roofline PNG, --compare)",
        description="Microbenchmarks of the public ops over V4-Flash/Pro workloads. Each row: p20/p50/p80 time, "
        "GFLOP/s, GB/s, the device's roofs and the fraction reached, peak memory, optional parity check.",
    )
    pb.add_argument("--op", action="append", help="op(s) to run (repeat or comma-separate); default: all")
    pb.add_argument("--backends", "--backend", dest="backends", action="append",
                    help="backend(s), e.g. reference,cpu,triton; default: those usable for each op on --device")
    pb.add_argument("--workload", action="append", help="workload name glob or substring (repeatable)")
    pb.add_argument("--tag", action="append", help="keep workloads carrying every given tag (flash, pro, decode, h16, ctx1m, ...)")
    pb.add_argument("--device", default="cpu")
    pb.add_argument("--quick", action="store_true", help=f"small CPU-friendly subset, short timing; writes {QUICK_CSV} and {QUICK_PNG} by default")
    pb.add_argument("--list", action="store_true", help="list the selected workloads and exit")
    pb.add_argument("--csv", help="write the rows to this CSV")
    pb.add_argument("--plot", help="write a roofline PNG")
    pb.add_argument("--refcheck", action="store_true", help="compare each backend's output with the reference backend")
    pb.add_argument("--compare", metavar="OLD_CSV", help="compare against an earlier CSV; exit 1 past --threshold")
    pb.add_argument("--against", metavar="NEW_CSV", help="with --compare: compare two CSVs without running anything")
    pb.add_argument("--threshold", type=float, default=0.10, help="allowed p50 slowdown for --compare (default 0.10 = 10%%)")
    pb.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per row (default 0.3, quick 0.1)")
    pb.add_argument("--max-reps", type=int, default=None, help="at most this many timed calls per row (default 100, quick 20)")
    pb.add_argument("--warmup", type=int, default=1)
    pb.add_argument("--max-call-s", type=float, default=None,
                    help="skip workloads whose ideal time per call at this device's roofs exceeds this (default 5, quick 1)")
    pb.add_argument("--max-mem-frac", type=float, default=0.5, help="skip workloads needing more than this fraction of free memory")
    pb.add_argument("--measure-peak", action="store_true", help="measure the roofs even on a GPU/NPU in the datasheet table")
    pb.add_argument("--no-progress", action="store_true")
    pb.add_argument("--overhead", action="store_true",
                    help="per-call host overhead of each op (with --op: those) above the bare kernel it dispatches to, "
                         "at a decode shape; exit 1 if a hot-path op misses its target")
    pb.set_defaults(fn=cmd_bench)

    pk = sub.add_parser(
        "kvcalc", help="V4 KV-cache bytes and decode FLOPs per token vs V3.2/V3 (SPEC §13)",
        description="KV-cache bytes per token and in total, and decode FLOPs per token by term, for DeepSeek-V4 "
        "against V3.2 and V3, from the layout definitions in v4kernels.bench.layouts; checks DeepSeek's published ratios.",
    )
    pk.add_argument("--model", choices=["flash", "pro"], default="flash")
    pk.add_argument("--context", type=int, default=1 << 20, help="tokens per sequence (default 1048576)")
    pk.add_argument("--batch", type=int, default=1, help="sequences (scales the totals)")
    pk.add_argument("--indexer", choices=["fp4", "fp8", "bf16"], default="fp4", help="indexer key storage (default fp4, 68 B)")
    pk.add_argument("--json", action="store_true", help="print the figures as JSON")
    pk.set_defaults(fn=cmd_kvcalc)


def cmd_kvcalc(args: argparse.Namespace) -> int:
    from . import kvcalc

    if args.context < 0 or args.batch < 1:
        print(f"kvcalc: --context must be >= 0 and --batch >= 1, got {args.context}, {args.batch}", file=sys.stderr)
        return 2
    r = kvcalc.report(args.model, args.context, args.batch, args.indexer)
    print(kvcalc.to_json(r) if args.json else kvcalc.format_report(r))
    return 0


def _list(ws: list[Any]) -> None:
    print(f"{'workload':62s} {'GFLOP':>10s} {'MB':>10s} {'FLOP/B':>8s}  tags / source")
    for w in ws:
        print(f"{w.name:62s} {w.flops / 1e9:10.3f} {w.bytes / 1e6:10.2f} {w.intensity:8.2f}  {','.join(sorted(w.tags))}  [{w.source}]")
    print(f"\n{len(ws)} workloads")


def _have_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cmd_bench(args: argparse.Namespace) -> int:
    from . import report

    if args.against and not args.compare:
        print("bench: --against needs --compare OLD_CSV", file=sys.stderr)
        return 2
    if args.threshold < 0:
        print(f"bench: --threshold must be >= 0, got {args.threshold}", file=sys.stderr)
        return 2
    if args.against:
        c = report.compare_rows(report.read_csv(args.compare), report.read_csv(args.against), args.threshold)
        print(report.format_comparison(c))
        return 1 if c.failed else 0

    import torch

    from . import workloads as W
    from .peak import measure_peak
    from .runner import BenchConfig, run_bench

    ops = _split(args.op)
    known = W.ops_covered()
    bad = [o for o in ops if o not in known]
    if bad:
        print(f"bench: unknown op(s) {bad}; ops with workloads: {sorted(known)}", file=sys.stderr)
        return 2
    if args.overhead:
        from .overhead import format_overhead, measure_overhead

        rows = measure_overhead(ops or None, str(torch.device(args.device)))
        print(format_overhead(rows))
        missed = [r.op for r in rows if r.ok is False]
        if missed:
            print(f"\noverhead above target: {', '.join(missed)}")
        return 1 if missed else 0
    ws = W.select(ops or None, args.workload, args.tag, quick=args.quick)
    if not ws:
        print("bench: no workload matches the selection (see --list)", file=sys.stderr)
        return 2
    if args.list:
        _list(ws)
        return 0
    try:
        device = str(torch.device(args.device))
    except RuntimeError as e:
        print(f"bench: bad --device {args.device!r}: {e}", file=sys.stderr)
        return 2
    backends = _split(args.backends) or None
    from .. import _registry as R

    for b in backends or ():
        if b not in R.BACKENDS:
            print(f"bench: unknown backend {b!r}; expected one of {sorted(R.BACKENDS)}", file=sys.stderr)
            return 2
    if args.max_reps is not None and args.max_reps < 1:
        print(f"bench: --max-reps must be >= 1, got {args.max_reps}", file=sys.stderr)
        return 2
    csv_path = args.csv or (QUICK_CSV if args.quick else None)
    png_path = args.plot or (QUICK_PNG if args.quick else None)
    # optional dependencies are looked up before any work: an explicit --plot needs matplotlib,
    # the implicit --quick plot is skipped (and said so) without it
    plot_skipped = ""
    if png_path and not _have_module("matplotlib"):
        if args.plot:
            print("bench: --plot needs matplotlib, which is not installed; install it with "
                  "`pip install matplotlib` (or `pip install 'v4kernels[bench]'`), or drop --plot", file=sys.stderr)
            return 2
        plot_skipped = f"roofline plot {png_path} skipped: matplotlib is not installed (pip install matplotlib)"
        png_path = None
    if not args.no_progress and not _have_module("tqdm"):
        print("bench: tqdm is not installed: no progress bar (pip install tqdm)", file=sys.stderr)
    cfg = BenchConfig(
        device=device, warmup=args.warmup,
        min_time=args.min_time if args.min_time is not None else (0.1 if args.quick else 0.3),
        max_reps=args.max_reps if args.max_reps is not None else (20 if args.quick else 100),
        min_reps=min(3, args.max_reps) if args.max_reps is not None else 3,
        refcheck=args.refcheck,
        max_call_s=args.max_call_s if args.max_call_s is not None else (1.0 if args.quick else 5.0),
        max_mem_frac=args.max_mem_frac, progress=not args.no_progress,
    )
    t0 = time.perf_counter()
    peak = measure_peak(device, quick=args.quick, use_table=not args.measure_peak)
    print(f"device {device}: {peak.name}; roofs {', '.join(f'{k} {v:,.1f} GFLOP/s' for k, v in peak.gflops.items())}, "
          f"{peak.gbs:,.1f} GB/s ({peak.source}{'; ' + peak.detail if peak.detail else ''})")
    rows = run_bench(ws, backends, cfg, peak)
    print(report.format_table(rows))
    n = {s: sum(r.status == s for r in rows) for s in ("ok", "skip", "error")}
    ref_fail = [r for r in rows if r.refcheck in ("fail", "error")]
    print(f"\n{n['ok']} timed, {n['skip']} skipped, {n['error']} errors"
          + (f", {len(ref_fail)} refcheck failures" if args.refcheck else "") + f" in {time.perf_counter() - t0:.1f} s")
    over = [r for r in rows if r.status == "ok" and r.frac_roofline > 1.05]
    if over and peak.source == "measured":
        print(f"note: {len(over)} rows exceed the measured roofs; the machine was busier while its peak was measured "
              "(shared cores) or the op's formula undercounts its work; rerun on a quiet machine for fractions of peak")
    for path in (csv_path, png_path):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if csv_path:
        report.write_csv(rows, csv_path)
        print(f"wrote {csv_path}")
    if png_path:
        from .roofline import plot_roofline

        plot_roofline(rows, peak, png_path)
        print(f"wrote {png_path}")
    if plot_skipped:
        print(plot_skipped)
    rc = 1 if n["error"] or ref_fail else 0
    if args.compare:
        c = report.compare_rows(report.read_csv(args.compare), [r.as_dict() for r in rows], args.threshold)
        print(report.format_comparison(c))
        rc = rc or (1 if c.failed else 0)
    return rc
