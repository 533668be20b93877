"""Lazy, cached detection of devices and optional packages.

Nothing here runs at ``import v4kernels``; every probe is behind ``functools.cache`` and catches
the failures a half-installed vendor stack produces (ImportError, RuntimeError, OSError), turning
them into a reason string instead of an exception.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    """Outcome of probing an optional component: ``ok`` plus a human-readable ``detail``."""

    ok: bool
    detail: str


def _guarded_import(module: str) -> Probe:
    if importlib.util.find_spec(module) is None:
        return Probe(False, f"python package '{module}' is not installed")
    try:
        mod = importlib.import_module(module)
    except (ImportError, RuntimeError, OSError) as e:
        return Probe(False, f"'import {module}' failed: {type(e).__name__}: {e}")
    return Probe(True, f"{module} {getattr(mod, '__version__', '?')}")


@functools.cache
def triton_probe() -> Probe:
    return _guarded_import("triton")


def triton_interpret() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def cuda_probe() -> Probe:
    import torch

    if torch.version.cuda is None:
        return Probe(False, f"torch {torch.__version__} is a build without CUDA")
    try:
        if not torch.cuda.is_available():
            return Probe(False, "torch.cuda.is_available() is False (no GPU or driver)")
        name = torch.cuda.get_device_name(0)
        cc = torch.cuda.get_device_capability(0)
    except (RuntimeError, AssertionError) as e:
        return Probe(False, f"CUDA probe failed: {e}")
    return Probe(True, f"{name} (sm_{cc[0]}{cc[1]})")


@functools.cache
def npu_probe() -> Probe:
    p = _guarded_import("torch_npu")
    if not p.ok:
        return p
    import torch

    try:
        if not torch.npu.is_available():  # type: ignore[attr-defined]
            return Probe(False, "torch_npu imported but torch.npu.is_available() is False")
    except (RuntimeError, AttributeError) as e:
        return Probe(False, f"NPU probe failed: {e}")
    return Probe(True, p.detail)


@functools.cache
def mlu_probe() -> Probe:
    p = _guarded_import("torch_mlu")
    if not p.ok:
        return p
    import torch

    try:
        if not torch.mlu.is_available():  # type: ignore[attr-defined]
            return Probe(False, "torch_mlu imported but torch.mlu.is_available() is False")
    except (RuntimeError, AttributeError) as e:
        return Probe(False, f"MLU probe failed: {e}")
    return Probe(True, p.detail)


def device_probes() -> dict[str, Probe]:
    """Every device type v4kernels knows, with whether it is usable here."""
    return {
        "cpu": Probe(True, f"{os.cpu_count()} logical cores"),
        "cuda": cuda_probe(),
        "npu": npu_probe(),
        "mlu": mlu_probe(),
    }


_ISA_FLAGS = {"avx512": ("avx512f", "avx2", "fma", "f16c"), "avx2": ("avx2", "fma", "f16c")}


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """CPU feature flags from /proc/cpuinfo (None where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return frozenset()


def missing_cpu_features(isa: str) -> list[str]:
    """Flags the native CPU extension's instruction set needs that this CPU does not report."""
    flags = cpu_flags()
    if flags is None:
        return []
    return [f for f in _ISA_FLAGS.get(isa, ()) if f not in flags]
