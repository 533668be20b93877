"""Roofline plot (PNG, matplotlib Agg) of benchmark rows against the device's roofs.

Left panel: achieved GFLOP/s against arithmetic intensity (log-log) with the bandwidth roof
``AI · GB/s`` and one compute roof per precision class that the rows use; one colour per op,
one marker per backend. Right panel: the zero-FLOP ops (index generators, pure data movement)
as achieved GB/s against the bandwidth roof, since they have no place on the FLOP axis.
"""
from __future__ import annotations

import math
from typing import Sequence

from .peak import DevicePeak
from .runner import BenchRow

__all__ = ["plot_roofline"]

_MARKERS = "os^Dv<>PX*"


def plot_roofline(rows: Sequence[BenchRow], peak: DevicePeak, path: str, title: str | None = None) -> int:
    """Write the plot to ``path``; returns the number of rows drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok" and not math.isnan(r.p50_us)]
    flop_rows = [r for r in ok if r.flops > 0 and r.gflops > 0]
    mem_rows = [r for r in ok if r.flops <= 0 and r.gbs > 0]
    ops = sorted({r.op for r in ok})
    backends = sorted({r.backend for r in ok})
    palette = [plt.get_cmap("tab20")(i) for i in range(20)] + [plt.get_cmap("tab20b")(i) for i in range(20)]
    color = {op: palette[i % len(palette)] for i, op in enumerate(ops)}
    marker = {b: _MARKERS[i % len(_MARKERS)] for i, b in enumerate(backends)}

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, 8.5), gridspec_kw={"width_ratios": [3, 1.2]})
    ais = [r.intensity for r in flop_rows] or [1.0]
    lo = min(min(ais) / 4, 0.01)
    hi = max(max(ais) * 4, peak.ridge("fp32") * 8)
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [x * peak.gbs for x in xs], color="0.3", lw=1.2, ls="--", label=f"bandwidth {peak.gbs:,.1f} GB/s")
    for prec, ls in (("fp32", "-"), ("bf16", "-."), ("fp8", ":")):
        if prec in peak.gflops:
            roof = peak.gflops[prec]
            ax.plot(xs, [min(roof, x * peak.gbs) for x in xs], color="k", lw=1.6, ls=ls, label=f"{prec} compute {roof:,.1f} GFLOP/s")
    for r in flop_rows:
        ax.scatter(r.intensity, r.gflops, color=color[r.op], marker=marker[r.backend], s=42, edgecolors="k", linewidths=0.4, zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved GFLOP/s (p50)")
    ax.grid(True, which="both", alpha=0.25)
    ax.set_xlim(lo, hi)
    ys = [r.gflops for r in flop_rows] or [1.0]
    ax.set_ylim(min(ys) / 5, max(max(peak.gflops.values()), max(ys)) * 3)
    handles = [plt.Line2D([], [], color=color[op], marker="o", ls="", label=op) for op in ops]
    handles += [plt.Line2D([], [], color="0.4", marker=marker[b], ls="", label=f"backend: {b}") for b in backends]
    ax.legend(loc="upper left", fontsize=8, title="roofs")
    fig.legend(handles=handles, loc="lower center", fontsize=7, ncol=7, frameon=False)
    ax.set_title(title or f"v4kernels roofline on {peak.name} ({peak.source})", fontsize=10)

    if mem_rows:
        labels = [f"{r.workload.split('/', 1)[1][:28]} [{r.backend}]" for r in mem_rows]
        ys2 = range(len(mem_rows))
        ax2.barh(list(ys2), [r.gbs for r in mem_rows], color=[color[r.op] for r in mem_rows], edgecolor="k", lw=0.4)
        ax2.axvline(peak.gbs, color="0.3", ls="--", lw=1.2)
        ax2.set_yticks(list(ys2))
        ax2.set_yticklabels([f"{r.op}: {lab}" for r, lab in zip(mem_rows, labels)], fontsize=6)
        ax2.set_xlim(0, max(peak.gbs, max(r.gbs for r in mem_rows)) * 1.1)
        ax2.set_xlabel("achieved GB/s (p50); dashed = bandwidth roof", fontsize=8)
        ax2.set_title("zero-FLOP ops", fontsize=10)
    else:
        ax2.axis("off")
        ax2.text(0.5, 0.5, "no zero-FLOP ops in this run", ha="center", va="center", fontsize=9)
    fig.text(0.01, 0.005, f"{peak.detail}", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.03 + 0.018 * (len(handles) // 7 + 1), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return len(flop_rows) + len(mem_rows)
