"""Microbenchmark harness, rooflines and the V4 cost calculator.

* :mod:`.workloads` — the shared workload registry (V4-Flash/Pro shapes, published kernel-test tables).
* :mod:`.runner` — times public ops under ``v4kernels.use_backend``; :mod:`.timer` percentiles
  and peak memory; :mod:`.peak` the device's roofs (measured on CPU, datasheet for known GPUs/NPUs).
* :mod:`.report` CSV and ``--compare``; :mod:`.roofline` the PNG.
* :mod:`.layouts` the KV byte layouts and layer schedules; :mod:`.kvcalc` SPEC §13 accounting.

Command line: ``python -m v4kernels bench ...`` and ``python -m v4kernels kvcalc ...``.
"""
from __future__ import annotations

from . import kvcalc, layouts
from .layouts import FLASH, PRO, ModelConfig

__all__ = ["kvcalc", "layouts", "FLASH", "PRO", "ModelConfig"]
