"""Runs every parity case on every usable backend against the reference."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from .. import _registry as R
from .cases import ParityCase, all_cases, make_inputs
from .compare import CompareResult, compare_outputs


@dataclass
class ParityResult:
    case: str
    op: str
    backend: str
    status: str  # "pass" | "fail" | "skip" | "error"
    detail: str
    seconds: float = 0.0


def _clone(inputs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in inputs.items():
        out[k] = v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
    return out


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def run_case(case: ParityCase, backend: str, device: str | torch.device = "cpu") -> ParityResult:
    """Run ``case`` with ``backend`` forced for ``case.op``; compare against the reference.

    For the reference backend itself the comparison is against ``case.naive`` (an independent
    implementation) when the case has one.
    """
    try:
        if isinstance(device, str):
            from .. import _platform

            # importing the vendor plug-in (torch_npu / torch_mlu) is what registers its device type
            _platform.device_probes()
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"parity: device {device!r} is not available in this process ({e}); install and import "
                         f"its torch plug-in (torch_npu, torch_mlu) first") from None
    b = R.get_backend(backend)
    reasons = b.op_reasons(case.op, device.type, forced=True)
    if not reasons and "nonfinite" in case.tags and not b.follows_nan_policy:
        reasons = [f"{backend} calls vendor ops whose NaN/inf behaviour is unspecified (docs/numerics.md, Vendor ops)"]
    if reasons:
        return ParityResult(case.name, case.op, backend, "skip", "; ".join(reasons))
    inputs = make_inputs(case, device)
    t0 = time.perf_counter()
    try:
        if backend == "reference":
            if case.naive is None:
                return ParityResult(case.name, case.op, backend, "skip", "no independent implementation for this case")
            with R.use_backend("reference"):
                actual = _to_cpu(case.run(**_clone(inputs)))
            expected = _to_cpu(case.naive(**_clone(inputs)))
            tol: Any = case.naive_tol or R.Tolerance(1e-5, 1e-5, 0.99999)
        else:
            with R.use_backend(backend, ops=[case.op]):
                actual = _to_cpu(case.run(**_clone(inputs)))
            with R.use_backend("reference"):
                expected = _to_cpu(case.run(**_clone(inputs)))
            tol = b.tolerances
    except R.BackendUnavailableError as e:
        return ParityResult(case.name, case.op, backend, "skip", str(e))
    except Exception as e:  # noqa: BLE001 - a crash is a parity failure, reported with its type
        return ParityResult(case.name, case.op, backend, "error", f"{type(e).__name__}: {e}", time.perf_counter() - t0)
    dt = time.perf_counter() - t0
    res: CompareResult = case.compare(actual, expected, tol) if case.compare else compare_outputs(actual, expected, tol)
    detail = res.message or f"max_abs={res.max_abs:.3g} cos={res.cosine:.6f}"
    return ParityResult(case.name, case.op, backend, "pass" if res.ok else "fail", detail, dt)


def select_cases(ops: Iterable[str] | None = None, include_large: bool = False, name_filter: str | None = None) -> list[ParityCase]:
    ops = set(ops) if ops else None
    out = []
    for c in all_cases():
        if ops and c.op not in ops:
            continue
        if c.large and not include_large:
            continue
        if name_filter and name_filter not in c.name:
            continue
        out.append(c)
    return out


def run_parity(
    backends: Iterable[str] | None = None,
    ops: Iterable[str] | None = None,
    device: str = "cpu",
    include_large: bool = False,
    name_filter: str | None = None,
) -> list[ParityResult]:
    names = list(backends) if backends else list(R.BACKENDS)
    results = []
    for case in select_cases(ops, include_large, name_filter):
        for name in names:
            results.append(run_case(case, name, device))
    return results
