"""Runs workloads on backends and produces one :class:`BenchRow` per (workload, backend).

Each op is called through its public wrapper (``v4kernels.<op>``) with the backend forced by
``v4kernels.use_backend(name, ops=[op])``, so a row measures exactly what a user calling the
library with that backend gets (validation and wrapper overhead included). Nothing here
crashes on a missing op, backend or kernel: such rows are ``skip`` with the reason, and an
exception inside an op becomes an ``error`` row.
"""
from __future__ import annotations

import datetime
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch

from .. import _registry as R
from .peak import DevicePeak
from .timer import PeakMemory, available_memory, time_fn
from .workloads import Workload

__all__ = ["BenchRow", "BenchConfig", "run_bench", "default_backends", "precision_class", "CSV_FIELDS"]


@dataclass
class BenchConfig:
    device: str = "cpu"
    warmup: int = 1
    min_time: float = 0.3
    min_reps: int = 3
    max_reps: int = 100
    refcheck: bool = False
    #: skip a workload whose ideal time at this device's roofs exceeds this many seconds per call
    max_call_s: float = 5.0
    #: skip a workload whose inputs+outputs exceed this fraction of the free device memory
    max_mem_frac: float = 0.5
    progress: bool = True


@dataclass
class BenchRow:
    workload: str
    op: str
    backend: str
    device: str
    status: str  # ok | skip | error
    reason: str = ""
    model: str = ""
    phase: str = ""
    heads: str = ""
    context: str = ""
    tags: str = ""
    source: str = ""
    shapes: str = ""
    dtype: str = ""
    flops: float = 0.0
    bytes: float = 0.0
    intensity: float = 0.0
    reps: int = 0
    p20_us: float = math.nan
    p50_us: float = math.nan
    p80_us: float = math.nan
    gflops: float = math.nan
    gbs: float = math.nan
    peak_gflops: float = math.nan
    peak_gbs: float = math.nan
    frac_compute: float = math.nan
    frac_bandwidth: float = math.nan
    frac_roofline: float = math.nan
    #: p50 of the reference backend on the same workload in the same run / this row's p50
    vs_reference: float = math.nan
    peak_mem_mb: float = math.nan
    peak_mem_method: str = ""
    refcheck: str = ""
    refcheck_detail: str = ""
    peak_source: str = ""
    device_name: str = ""
    torch_version: str = field(default_factory=lambda: torch.__version__)
    timestamp: str = field(default_factory=lambda: datetime.datetime.now().isoformat(timespec="seconds"))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


CSV_FIELDS: list[str] = list(BenchRow.__dataclass_fields__)


def precision_class(w: Workload) -> str:
    """Which compute roof applies: ``fp8`` for block-scaled FP8/FP4 GEMMs, ``fp32`` for fp32-only
    problems, else ``bf16``."""
    if w.op in ("fp8_gemm", "fp4_gemm") or (w.op == "moe_experts" and ({"fp8", "fp4"} & w.tags)):
        return "fp8"
    if w.dtype == torch.float32:
        return "fp32"
    return "bf16"


def default_backends(op: str, device_type: str) -> list[str]:
    """Backends that would run ``op`` automatically on ``device_type`` (no forced-only ones, such
    as Triton through the CPU interpreter, whose timings mean nothing)."""
    out = []
    for name, b in R.BACKENDS.items():
        if device_type in b.forced_only_devices:
            continue
        if not b.op_reasons(op, device_type, forced=False):
            out.append(name)
    return out


def _describe_shapes(w: Workload) -> str:
    return " ".join(f"{k}={'x'.join(map(str, v))}" for k, v in w.shapes.items())


def _base_row(w: Workload, backend: str, cfg: BenchConfig, peak: DevicePeak | None) -> BenchRow:
    prec = precision_class(w)
    return BenchRow(
        workload=w.name, op=w.op, backend=backend, device=cfg.device, status="ok", model=w.model, phase=w.phase,
        heads=w.tag_value("h") if any(t[1:].isdigit() for t in w.tags if t.startswith("h")) else "",
        context=w.tag_value("ctx"), tags=",".join(sorted(w.tags)), source=w.source, shapes=_describe_shapes(w),
        dtype=str(w.dtype).replace("torch.", ""), flops=w.flops, bytes=w.bytes, intensity=w.intensity,
        peak_gflops=peak.compute_gflops(prec) if peak else math.nan, peak_gbs=peak.gbs if peak else math.nan,
        peak_source=peak.source if peak else "", device_name=peak.name if peak else "",
    )


def _op_missing(op: str) -> str | None:
    import v4kernels

    if op not in R.op_names() or not callable(getattr(v4kernels, op, None)):
        return f"op {op} is not in this build of v4kernels yet (its family has not declared it)"
    return None


def _guard(w: Workload, cfg: BenchConfig, peak: DevicePeak | None) -> str | None:
    if peak is not None:
        est = max(w.flops / (peak.compute_gflops(precision_class(w)) * 1e9), w.bytes / (peak.gbs * 1e9))
        if est > cfg.max_call_s:
            return (f"ideal time {est:.3g} s per call at this device's roofs exceeds --max-call-s {cfg.max_call_s:g} "
                    f"(raise it to run this workload here)")
    free = available_memory(cfg.device)
    if free is not None and w.mem_bytes > cfg.max_mem_frac * free:
        return (f"inputs+outputs need {w.mem_bytes / 2**30:.2f} GiB, more than {cfg.max_mem_frac:.0%} of the "
                f"{free / 2**30:.1f} GiB free on {cfg.device}")
    return None


def _compare_to_reference(w: Workload, backend: str, out: Any, ref: Any) -> tuple[str, str]:
    from ..testing.compare import compare_outputs, compare_topk

    if w.op == "indexer_topk":
        r = compare_topk(out, ref)
    else:
        r = compare_outputs(out, ref, R.get_backend(backend).tolerances)
    if r.ok:
        return "pass", f"max_abs={r.max_abs:.3g} cos={r.cosine:.6f}" if w.op != "indexer_topk" else f"recall={r.cosine:.4f}"
    return "fail", r.message


def _fill_timing(row: BenchRow, t: Any) -> None:
    row.reps = t.reps
    row.p20_us, row.p50_us, row.p80_us = t.p20 * 1e6, t.p50 * 1e6, t.p80 * 1e6
    sec = t.p50
    row.gflops = row.flops / sec / 1e9 if sec > 0 else math.nan
    row.gbs = row.bytes / sec / 1e9 if sec > 0 else math.nan
    if not math.isnan(row.peak_gflops) and row.peak_gflops > 0:
        row.frac_compute = row.gflops / row.peak_gflops
    if not math.isnan(row.peak_gbs) and row.peak_gbs > 0:
        row.frac_bandwidth = row.gbs / row.peak_gbs
    if row.flops > 0 and not math.isnan(row.peak_gflops):
        attainable = min(row.peak_gflops, row.intensity * row.peak_gbs)
        row.frac_roofline = row.gflops / attainable
    elif not math.isnan(row.frac_bandwidth):
        row.frac_roofline = row.frac_bandwidth


def run_bench(workloads: Sequence[Workload], backends: Iterable[str] | None, cfg: BenchConfig,
              peak: DevicePeak | None = None) -> list[BenchRow]:
    """Time every workload on every backend (``None``: the backends usable for its op here)."""
    import v4kernels

    dev = torch.device(cfg.device)
    requested = list(backends) if backends else None
    for b in requested or ():
        R.get_backend(b)
    plan: list[tuple[Workload, list[str]]] = []
    for w in workloads:
        names = requested if requested is not None else (default_backends(w.op, dev.type) if not _op_missing(w.op) else ["reference"])
        plan.append((w, names or ["reference"]))
    total = sum(len(b) for _, b in plan)
    rows: list[BenchRow] = []
    bar = _progress(total, cfg.progress)
    try:
        for w, names in plan:
            bar.set_description(w.name[:48])
            missing = _op_missing(w.op)
            guard = None if missing else _guard(w, cfg, peak)
            inputs: dict[str, Any] | None = None
            make_err = None
            if missing is None and guard is None:
                try:
                    inputs = w.make(dev)
                except Exception as e:  # noqa: BLE001 - reported in the row
                    make_err = f"input factory failed: {type(e).__name__}: {e}"
            ref_out: Any = None
            ref_err: str | None = None
            for name in names:
                row = _base_row(w, name, cfg, peak)
                rows.append(row)
                bar.update(1)
                if missing or guard:
                    row.status, row.reason = "skip", missing or guard or ""
                    continue
                if make_err:
                    row.status, row.reason = "error", make_err
                    continue
                reasons = R.get_backend(name).op_reasons(w.op, dev.type, forced=True)
                if reasons:
                    row.status, row.reason = "skip", "; ".join(reasons)
                    continue
                assert inputs is not None

                def call(_name: str = name) -> Any:
                    with v4kernels.use_backend(_name, ops=[w.op]):
                        return w.run(inputs)

                try:
                    out = call()
                    with PeakMemory(dev) as pm:
                        # the call above was the first warm-up
                        t = time_fn(call, dev, warmup=max(cfg.warmup - 1, 0), min_time=cfg.min_time, min_reps=cfg.min_reps,
                                    max_reps=cfg.max_reps)
                except R.BackendUnavailableError as e:
                    row.status, row.reason = "skip", str(e)
                    continue
                except Exception as e:  # noqa: BLE001 - reported in the row
                    row.status, row.reason = "error", f"{type(e).__name__}: {e}"
                    continue
                _fill_timing(row, t)
                row.peak_mem_mb = pm.mb if pm.mb is not None else math.nan
                row.peak_mem_method = pm.method_description
                if cfg.refcheck:
                    if name == "reference":
                        row.refcheck = "self"
                    else:
                        if ref_out is None and ref_err is None:
                            try:
                                with v4kernels.use_backend("reference", ops=[w.op]):
                                    ref_out = w.run(inputs)
                            except Exception as e:  # noqa: BLE001
                                ref_err = f"reference failed: {type(e).__name__}: {e}"
                        if ref_err:
                            row.refcheck, row.refcheck_detail = "error", ref_err
                        else:
                            row.refcheck, row.refcheck_detail = _compare_to_reference(w, name, out, ref_out)
                del out
            del inputs, ref_out
    finally:
        bar.close()
    _fill_vs_reference(rows)
    return rows


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_description(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr that appears once the run has lasted two seconds (terminals only)."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="run", delay=2.0, file=sys.stderr, dynamic_ncols=True, leave=False, disable=None)


def _fill_vs_reference(rows: Sequence[BenchRow]) -> None:
    """Speed-up of each row over the reference backend's row of the same workload (same run)."""
    ref = {(r.workload, r.device): r.p50_us for r in rows if r.backend == "reference" and r.status == "ok"}
    for r in rows:
        base = ref.get((r.workload, r.device))
        if r.status == "ok" and base and r.p50_us > 0:
            r.vs_reference = base / r.p50_us
