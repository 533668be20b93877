"""Wall-clock timing with device synchronisation, percentiles, and peak-memory probes.

Every timed call is bracketed by the device's ``synchronize`` (CUDA, NPU, MLU) so the time is
the kernel's, not the launch's. Repetitions run until ``min_time`` seconds or ``max_reps``
calls, whichever comes first (at least ``min_reps``); the result keeps every sample so the
p20/p50/p80 percentiles describe the spread, not only the centre.

>>> t = time_fn(lambda: sum(range(1000)), "cpu", warmup=1, min_time=0.0, min_reps=5, max_reps=5)
>>> t.reps, t.p20 <= t.p50 <= t.p80
(5, True)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Timing", "time_fn", "percentile", "synchronizer", "PeakMemory", "available_memory"]


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """A no-argument function that waits for all work queued on ``device``."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return lambda: None
    mod = getattr(torch, dev.type, None)
    sync = getattr(mod, "synchronize", None)
    if sync is None:
        return lambda: None
    return lambda: sync(dev)


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    if not samples:
        return float("nan")
    s = sorted(samples)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Timing:
    """Seconds per call of every timed repetition."""

    samples: list[float]

    @property
    def reps(self) -> int:
        return len(self.samples)

    @property
    def p20(self) -> float:
        return percentile(self.samples, 20)

    @property
    def p50(self) -> float:
        return percentile(self.samples, 50)

    @property
    def p80(self) -> float:
        return percentile(self.samples, 80)


def time_fn(fn: Callable[[], Any], device: str | torch.device = "cpu", *, warmup: int = 1, min_time: float = 0.3,
            min_reps: int = 3, max_reps: int = 100) -> Timing:
    """Time ``fn()`` on ``device``: ``warmup`` untimed calls, then ``min_reps..max_reps`` timed
    calls until ``min_time`` seconds have been spent."""
    if min_reps < 1 or max_reps < min_reps:
        raise ValueError(f"time_fn: need 1 <= min_reps <= max_reps, got min_reps={min_reps}, max_reps={max_reps}")
    sync = synchronizer(device)
    for _ in range(warmup):
        fn()
    sync()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return Timing(samples)


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def available_memory(device: str | torch.device) -> int | None:
    """Free bytes on ``device`` (``MemAvailable`` for the CPU), or None when unknown."""
    dev = torch.device(device)
    if dev.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    mod = getattr(torch, dev.type, None)
    info = getattr(mod, "mem_get_info", None)
    if info is None:
        return None
    try:
        return int(info(dev)[0])
    except Exception:  # noqa: BLE001 - unknown is a valid answer here
        return None


class PeakMemory:
    """Peak memory used *above the level at entry* while the block runs (outputs and temporaries).

    Accelerators: the caching allocator's ``max_memory_allocated``. CPU (Linux): the process's
    resident high-water mark (``VmHWM``), reset on entry through ``/proc/self/clear_refs``; it
    includes anything else the process allocates meanwhile. ``mb`` is None where no probe exists.
    """

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.mb: float | None = None
        self.method = "none"
        self._base = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cpu":
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                rss = _proc_status_kb("VmRSS")
                if rss is not None:
                    self._base = rss * 1024
                    self.method = "VmHWM"
            except OSError:
                self.method = "none"
        else:
            mod = getattr(torch, self.device.type, None)
            if mod is not None and hasattr(mod, "max_memory_allocated") and hasattr(mod, "reset_peak_memory_stats"):
                synchronizer(self.device)()
                mod.reset_peak_memory_stats(self.device)
                self._base = int(mod.memory_allocated(self.device))
                self.method = "allocator"
        return self

    @property
    def method_description(self) -> str:
        return {"VmHWM": "RSS high-water growth (lower bound: freed heap is reused)",
                "allocator": "allocator max_memory_allocated"}.get(self.method, "unavailable")

    def __exit__(self, *exc: object) -> None:
        if self.method == "VmHWM":
            hwm = _proc_status_kb("VmHWM")
            if hwm is not None:
                self.mb = max(0, hwm * 1024 - self._base) / 2**20
        elif self.method == "allocator":
            mod = getattr(torch, self.device.type)
            synchronizer(self.device)()
            self.mb = max(0, int(mod.max_memory_allocated(self.device)) - self._base) / 2**20
