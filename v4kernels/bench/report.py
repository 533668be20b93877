"""CSV output, console tables, and run-to-run comparison.

The CSV has one row per (workload, backend) with the columns of
:class:`v4kernels.bench.runner.BenchRow`. :func:`compare_rows` matches two runs by
``(workload, backend, device)`` and flags every row whose median time grew by more than the
threshold; the CLI exits non-zero when any row regressed.

>>> old = [{"workload": "w", "backend": "reference", "device": "cpu", "status": "ok", "p50_us": "100"}]
>>> new = [{"workload": "w", "backend": "reference", "device": "cpu", "status": "ok", "p50_us": "130"}]
>>> compare_rows(old, new, threshold=0.2).regressions[0].ratio
1.3
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from .runner import CSV_FIELDS, BenchRow

__all__ = ["write_csv", "read_csv", "compare_rows", "Comparison", "Change", "format_table", "format_comparison"]


def write_csv(rows: Iterable[BenchRow], path: str) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        wr.writeheader()
        for r in rows:
            d = r.as_dict()
            wr.writerow({k: (f"{v:.6g}" if isinstance(v, float) and not math.isnan(v) else ("" if isinstance(v, float) else v))
                         for k, v in d.items()})


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"workload", "backend", "p50_us"} <= set(rows[0]):
        raise ValueError(f"{path}: not a v4kernels bench CSV (needs workload, backend, p50_us columns)")
    return rows


def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class Change:
    key: tuple[str, str, str]
    old_us: float
    new_us: float

    @property
    def ratio(self) -> float:
        return self.new_us / self.old_us if self.old_us > 0 else math.inf


@dataclass
class Comparison:
    threshold: float
    regressions: list[Change] = field(default_factory=list)
    improvements: list[Change] = field(default_factory=list)
    unchanged: list[Change] = field(default_factory=list)
    only_old: list[tuple[str, str, str]] = field(default_factory=list)
    only_new: list[tuple[str, str, str]] = field(default_factory=list)
    #: rows that ran before and are skipped/erroring now
    lost: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.regressions or self.lost)


def _key(r: Mapping[str, Any]) -> tuple[str, str, str]:
    return (str(r["workload"]), str(r["backend"]), str(r.get("device", "")))


def compare_rows(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]], threshold: float = 0.1) -> Comparison:
    """Median-time changes of ``new`` against ``old``; a row regresses when
    ``new_p50 > old_p50 · (1 + threshold)``, or when it ran in ``old`` and does not run in ``new``."""
    if threshold < 0:
        raise ValueError(f"compare_rows: threshold must be >= 0, got {threshold}")
    o = {_key(r): r for r in old}
    n = {_key(r): r for r in new}
    c = Comparison(threshold)
    for k, rn in n.items():
        ro = o.get(k)
        if ro is None:
            c.only_new.append(k)
            continue
        if ro.get("status") != "ok":
            continue
        if rn.get("status") != "ok":
            c.lost.append(k)
            continue
        ch = Change(k, _f(ro["p50_us"]), _f(rn["p50_us"]))
        if math.isnan(ch.old_us) or math.isnan(ch.new_us):
            continue
        if ch.new_us > ch.old_us * (1 + threshold):
            c.regressions.append(ch)
        elif ch.new_us < ch.old_us / (1 + threshold):
            c.improvements.append(ch)
        else:
            c.unchanged.append(ch)
    c.only_old = [k for k in o if k not in n]
    return c


def format_comparison(c: Comparison) -> str:
    lines = [f"comparison (threshold {c.threshold:.0%} on p50): {len(c.regressions)} slower, {len(c.improvements)} faster, "
             f"{len(c.unchanged)} within threshold, {len(c.lost)} no longer running, {len(c.only_new)} new, {len(c.only_old)} gone"]
    for title, items in (("SLOWER", c.regressions), ("faster", c.improvements)):
        for ch in sorted(items, key=lambda x: -abs(math.log(x.ratio)) if x.ratio > 0 else 0):
            lines.append(f"  {title:6s} {ch.key[0]:60s} {ch.key[1]:10s} {ch.old_us:12.1f} -> {ch.new_us:12.1f} us  x{ch.ratio:.2f}")
    for k in c.lost:
        lines.append(f"  LOST   {k[0]:60s} {k[1]:10s} ran before, does not run now")
    return "\n".join(lines)


def _fmt(v: float, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(rows: Sequence[BenchRow]) -> str:
    """A fixed-width console table of the rows."""
    head = f"{'workload':58s} {'backend':10s} {'p50 us':>11s} {'p20..p80 us':>21s} {'GFLOP/s':>9s} {'GB/s':>8s} {'roof%':>6s} {'x ref':>6s} {'mem MB':>7s} {'ref':>5s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.status != "ok":
            lines.append(f"{r.workload:58s} {r.backend:10s} {r.status.upper()}: {r.reason}")
            continue
        spread = f"{_fmt(r.p20_us, '.1f')}..{_fmt(r.p80_us, '.1f')}"
        lines.append(
            f"{r.workload:58s} {r.backend:10s} {_fmt(r.p50_us, '11.1f')} {spread:>21s} {_fmt(r.gflops, '9.2f')} "
            f"{_fmt(r.gbs, '8.2f')} {_fmt(r.frac_roofline * 100 if not math.isnan(r.frac_roofline) else math.nan, '6.1f')} "
            f"{_fmt(r.vs_reference, '6.2f')} {_fmt(r.peak_mem_mb, '7.1f')} {r.refcheck or '':>5s}"
        )
    return "\n".join(lines)
