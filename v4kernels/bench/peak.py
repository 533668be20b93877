"""The device's compute and memory-bandwidth limits for the roofline and the fraction-of-peak
columns.

* CPU: measured in the same run — an fp32 GEMM (``torch.matmul`` on large square matrices;
  V4's CPU kernels compute in fp32 tiles, so this is the relevant compute roof) and a
  stream-style bandwidth (``copy`` and ``triad`` on tensors far larger than the last-level
  cache; the better of the two is the roof).
* Known GPUs/NPUs: dense (no 2:4 sparsity) tensor throughput and memory bandwidth from the
  vendors' datasheets (:data:`KNOWN_DEVICES`); an unknown accelerator is measured like the CPU,
  with a bf16 GEMM.

>>> p = DevicePeak("cpu", "test", {"fp32": 100.0}, 20.0, "measured", "")
>>> p.compute_gflops("bf16"), p.ridge("fp32")
(100.0, 5.0)
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .timer import synchronizer

__all__ = ["DevicePeak", "KNOWN_DEVICES", "measure_peak", "lookup_known", "gemm_gflops", "stream_gbs"]


@dataclass(frozen=True)
class KnownDevice:
    match: tuple[str, ...]  # lower-case substrings of the device name
    name: str
    bf16_tflops: float  # dense tensor-core BF16/FP16
    fp8_tflops: float | None  # dense FP8 (None: no FP8 units)
    fp32_tflops: float  # non-tensor FP32
    hbm_tbs: float
    source: str


#: Dense (non-sparse) peaks. Sources: NVIDIA H100 / H200 / HGX B200 / A100 / L40S product
#: datasheets (their "with sparsity" figures halved), the NVIDIA RTX Blackwell GPU architecture
#: whitepaper (RTX 5090, FP32-accumulate tensor rates), Huawei Atlas 800T A2 material (Ascend 910B,
#: the 910B3 SKU) and Huawei's CloudMatrix384 paper (Ascend 910C / A3 package of two dies).
#: Ascend SKUs differ by ±20 %; check your part. Order matters: first match wins.
KNOWN_DEVICES: tuple[KnownDevice, ...] = (
    KnownDevice(("h200",), "NVIDIA H200 SXM", 989.4, 1978.9, 66.9, 4.8, "NVIDIA H200 datasheet"),
    KnownDevice(("h100 pcie", "h100-pcie"), "NVIDIA H100 PCIe", 756.0, 1513.0, 51.2, 2.0, "NVIDIA H100 datasheet"),
    KnownDevice(("h100", "h800"), "NVIDIA H100 SXM", 989.4, 1978.9, 66.9, 3.35, "NVIDIA H100 datasheet"),
    KnownDevice(("b200",), "NVIDIA B200", 2250.0, 4500.0, 75.0, 8.0, "NVIDIA HGX B200 datasheet"),
    KnownDevice(("a100",), "NVIDIA A100 SXM4 80GB", 312.0, None, 19.5, 2.039, "NVIDIA A100 datasheet"),
    KnownDevice(("l40s",), "NVIDIA L40S", 362.05, 733.0, 91.6, 0.864, "NVIDIA L40S datasheet"),
    KnownDevice(("rtx 5090",), "NVIDIA GeForce RTX 5090", 209.5, 419.0, 104.8, 1.792, "NVIDIA RTX Blackwell whitepaper"),
    KnownDevice(("910_93", "910c", "ascend a3"), "Huawei Ascend 910C (A3)", 752.0, None, 0.0, 3.2, "Huawei CloudMatrix384 paper"),
    KnownDevice(("910b",), "Huawei Ascend 910B", 313.0, None, 0.0, 1.6, "Huawei Atlas 800T A2 datasheet"),
)


@dataclass(frozen=True)
class DevicePeak:
    """Compute roofs in GFLOP/s per precision class (``fp32``, ``bf16``, ``fp8``) and the memory
    roof in GB/s."""

    device: str
    name: str
    gflops: dict[str, float]
    gbs: float
    source: str  # "measured" or "table: <datasheet>"
    detail: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    def compute_gflops(self, precision: str) -> float:
        """Roof for a precision class, falling back to the next wider class that is known."""
        for p in {"fp8": ("fp8", "bf16", "fp32"), "bf16": ("bf16", "fp32"), "fp32": ("fp32", "bf16")}.get(precision, ("fp32",)):
            if self.gflops.get(p):
                return self.gflops[p]
        return max(self.gflops.values())

    def ridge(self, precision: str = "bf16") -> float:
        """FLOP per byte where the compute roof meets the bandwidth roof."""
        return self.compute_gflops(precision) / self.gbs


def lookup_known(name: str) -> KnownDevice | None:
    low = name.lower()
    for k in KNOWN_DEVICES:
        if any(m in low for m in k.match):
            return k
    return None


def _best_time(fn: Callable[[], object], sync: Callable[[], None], budget: float, min_reps: int = 3) -> float:
    fn()
    sync()
    best = float("inf")
    start, reps = time.perf_counter(), 0
    while reps < min_reps or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best


def gemm_gflops(device: str | torch.device, n: int, dtype: torch.dtype = torch.float32, budget: float = 0.5) -> float:
    """Best-of-several ``n x n x n`` GEMM rate in GFLOP/s."""
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    t = _best_time(lambda: torch.matmul(a, b), synchronizer(dev), budget)
    return 2 * n**3 / t / 1e9


def stream_gbs(device: str | torch.device, n: int, budget: float = 0.5) -> dict[str, float]:
    """STREAM-style copy (``b = a``: 2 x 4n bytes) and triad (``a = b + 3c``: 3 x 4n bytes) in GB/s."""
    dev = torch.device(device)
    a = torch.rand(n, device=dev)
    b = torch.rand(n, device=dev)
    c = torch.rand(n, device=dev)
    sync = synchronizer(dev)
    t_copy = _best_time(lambda: b.copy_(a), sync, budget / 2)
    t_triad = _best_time(lambda: torch.add(b, c, alpha=3.0, out=a), sync, budget / 2)
    return {"copy": 2 * 4 * n / t_copy / 1e9, "triad": 3 * 4 * n / t_triad / 1e9}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str | torch.device) -> str:
    dev = torch.device(device)
    if dev.type == "cpu":
        return f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    mod = getattr(torch, dev.type, None)
    fn = getattr(mod, "get_device_name", None)
    try:
        return str(fn(dev)) if fn is not None else dev.type
    except Exception:  # noqa: BLE001 - the name is informational
        return dev.type


def measure_peak(device: str | torch.device = "cpu", quick: bool = False, use_table: bool = True) -> DevicePeak:
    """The roofs for ``device``: the datasheet table for known accelerators (unless
    ``use_table=False``), otherwise measured now (fp32 GEMM on the CPU, bf16 elsewhere)."""
    dev = torch.device(device)
    name = device_name(dev)
    if dev.type != "cpu" and use_table:
        k = lookup_known(name)
        if k is not None:
            gf = {"bf16": k.bf16_tflops * 1e3, "fp32": k.fp32_tflops * 1e3 or k.bf16_tflops * 1e3}
            if k.fp8_tflops:
                gf["fp8"] = k.fp8_tflops * 1e3
            return DevicePeak(str(dev), k.name, gf, k.hbm_tbs * 1e3, f"table: {k.source}", f"matched {name!r}")
    if dev.type == "cpu":
        n_gemm, n_stream, budget = (1024, 1 << 24, 0.5) if quick else (2048, 1 << 25, 1.0)
        gemm = gemm_gflops(dev, n_gemm, torch.float32, budget)
        gf = {"fp32": gemm}
        gemm_desc = f"fp32 GEMM {n_gemm}^3"
    else:
        n_gemm, n_stream, budget = 8192, 1 << 28, 0.5
        gemm = gemm_gflops(dev, n_gemm, torch.bfloat16, budget)
        gf = {"bf16": gemm, "fp32": gemm_gflops(dev, 4096, torch.float32, budget)}
        gemm_desc = f"bf16 GEMM {n_gemm}^3"
    bw = stream_gbs(dev, n_stream, budget)
    detail = (f"{gemm_desc}: {gemm:.1f} GFLOP/s; stream copy {bw['copy']:.1f} GB/s, triad {bw['triad']:.1f} GB/s "
              f"on {n_stream * 4 >> 20} MiB arrays")
    return DevicePeak(str(dev), name, gf, max(bw.values()), "measured", detail, {"copy_gbs": bw["copy"], "triad_gbs": bw["triad"]})
