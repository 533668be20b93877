"""Named, seeded parity cases. One module per operator family registers its cases with
:func:`register`; :func:`all_cases` imports every module of this package."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..._registry import Tolerance
from ..compare import CompareResult

Inputs = dict[str, Any]


@dataclass(frozen=True)
class ParityCase:
    """One parity case.

    name     readable id, ``<op>/<what>`` (e.g. ``sparse_attn/flash_decode_b4_k640``)
    op       the dispatched op under test (a ``torch.ops.v4k`` name); only it is forced to the
             backend under test, everything else the case calls is auto-dispatched
    make     ``make(gen, device) -> inputs``: seeded inputs (a dict of keyword arguments)
    run      ``run(**inputs) -> outputs`` through the public API
    path     which kernel path it drives ("prefill", "decode", "fp8-kv", ...)
    tags     e.g. {"v4-flash"}, {"v4-pro"}, {"odd"}, {"edge"}
    large    skipped by quick runs and under the Triton interpreter
    compare  optional ``compare(actual, expected, tol) -> CompareResult`` (default: per-dtype tolerance)
    naive    optional independent implementation ``naive(**inputs) -> outputs`` the reference
             is checked against (a second reference, usually a per-element loop)
    """

    name: str
    op: str
    make: Callable[[torch.Generator, torch.device], Inputs]
    run: Callable[..., Any]
    path: str = ""
    tags: frozenset[str] = field(default_factory=frozenset)
    large: bool = False
    compare: Callable[[Any, Any, dict[torch.dtype, Tolerance]], CompareResult] | None = None
    naive: Callable[..., Any] | None = None
    naive_tol: Tolerance | dict[torch.dtype, Tolerance] | None = None
    seed: int = 0


_CASES: dict[str, ParityCase] = {}


def register(case: ParityCase) -> ParityCase:
    if case.name in _CASES:
        raise ValueError(f"duplicate parity case name {case.name!r}")
    _CASES[case.name] = case
    return case


def all_cases() -> list[ParityCase]:
    for m in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{m.name}")
    return list(_CASES.values())


def make_inputs(case: ParityCase, device: torch.device | str = "cpu") -> Inputs:
    gen = torch.Generator().manual_seed(case.seed)
    return case.make(gen, torch.device(device))


__all__ = ["ParityCase", "register", "all_cases", "make_inputs", "Inputs"]
