"""Comparison helpers for parity checks: NaN/inf positions, allclose with a backend's
tolerance, a cosine bound, and the worst offending indices on failure."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .._registry import Tolerance

EXACT = Tolerance(0.0, 0.0, 1.0)


@dataclass
class CompareResult:
    ok: bool
    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0
    message: str = ""

    def __bool__(self) -> bool:
        return self.ok


def _is_exact_dtype(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu)


def _worst(diff: torch.Tensor, a: torch.Tensor, e: torch.Tensor, k: int = 5) -> str:
    flat = diff.flatten()
    k = min(k, flat.numel())
    vals, pos = flat.topk(k)
    rows = []
    for v, p in zip(vals.tolist(), pos.tolist()):
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(p), diff.shape))
        rows.append(f"{idx}: got {a.flatten()[p].item():.6g}, expected {e.flatten()[p].item():.6g} (|diff| {v:.3g})")
    return "; ".join(rows)


def compare_tensors(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance = EXACT, name: str = "out") -> CompareResult:
    """Compare one tensor: shape/dtype, NaN/inf positions, ``|a−e| <= atol + rtol·|e|``, cosine."""
    if actual.shape != expected.shape:
        return CompareResult(False, message=f"{name}: shape {list(actual.shape)} != expected {list(expected.shape)}")
    if actual.dtype != expected.dtype:
        return CompareResult(False, message=f"{name}: dtype {actual.dtype} != expected {expected.dtype}")
    if actual.numel() == 0:
        return CompareResult(True)
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if _is_exact_dtype(a):
        if a.dtype.is_floating_point:
            a, e = a.view(torch.uint8), e.view(torch.uint8)
        neq = a != e
        if bool(neq.any()):
            n = int(neq.sum())
            where = [tuple(int(i) for i in w) for w in neq.nonzero()[:5].tolist()]
            return CompareResult(False, message=f"{name}: {n} of {a.numel()} entries differ (exact compare); first at {where}")
        return CompareResult(True)
    a, e = a.double(), e.double()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    if not torch.equal(nan_a, nan_e) or not torch.equal(inf_a, inf_e) or not torch.equal(a[inf_a], e[inf_e]):
        bad = (nan_a != nan_e) | (inf_a != inf_e)
        where = [tuple(w) for w in bad.nonzero()[:5].tolist()]
        return CompareResult(False, message=f"{name}: NaN/inf positions differ, e.g. at {where}")
    finite = ~(nan_a | inf_a)
    a0, e0 = torch.where(finite, a, 0.0), torch.where(finite, e, 0.0)
    diff = (a0 - e0).abs()
    max_abs = float(diff.max())
    max_rel = float((diff / e0.abs().clamp_min(1e-30)).max())
    na, ne = a0.norm(), e0.norm()
    cos = 1.0 if float(na) == 0.0 and float(ne) == 0.0 else float((a0 * e0).sum() / (na * ne).clamp_min(1e-300))
    over = diff > tol.atol + tol.rtol * e0.abs()
    if bool(over.any()):
        return CompareResult(
            False, max_abs, max_rel, cos,
            f"{name}: {int(over.sum())} of {a.numel()} entries outside atol={tol.atol:g} rtol={tol.rtol:g}; "
            f"max_abs={max_abs:.3g} cos={cos:.6f}; worst: {_worst(diff - tol.rtol * e0.abs(), a0, e0)}",
        )
    if cos < tol.cos_min:
        return CompareResult(False, max_abs, max_rel, cos, f"{name}: cosine {cos:.7f} < {tol.cos_min}")
    return CompareResult(True, max_abs, max_rel, cos)


def compare_outputs(actual: Any, expected: Any, tol: Tolerance | dict[torch.dtype, Tolerance] = EXACT, name: str = "out") -> CompareResult:
    """Compare tensors or (nested) tuples of tensors; ``tol`` may be a per-dtype table."""
    if isinstance(expected, torch.Tensor):
        t = tol.get(expected.dtype, EXACT) if isinstance(tol, dict) else tol
        if not isinstance(actual, torch.Tensor):
            return CompareResult(False, message=f"{name}: expected a tensor, got {type(actual).__name__}")
        return compare_tensors(actual, expected, t, name)
    if isinstance(expected, (tuple, list)):
        if not isinstance(actual, (tuple, list)) or len(actual) != len(expected):
            return CompareResult(False, message=f"{name}: expected a sequence of {len(expected)} outputs")
        worst = CompareResult(True)
        for i, (a, e) in enumerate(zip(actual, expected)):
            r = compare_outputs(a, e, tol, f"{name}[{i}]")
            if not r.ok:
                return r
            if r.cosine < worst.cosine or r.max_abs > worst.max_abs:
                worst = CompareResult(True, max(worst.max_abs, r.max_abs), max(worst.max_rel, r.max_rel), min(worst.cosine, r.cosine))
        return worst
    if actual != expected:
        return CompareResult(False, message=f"{name}: {actual!r} != expected {expected!r}")
    return CompareResult(True)


def index_set_recall(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Mean over rows of |A ∩ E| / |E| for index lists ``[..., k]`` (−1 entries ignored)."""
    a = actual.reshape(-1, actual.shape[-1]).cpu()
    e = expected.reshape(-1, expected.shape[-1]).cpu()
    total, hit = 0, 0
    for ra, re in zip(a.tolist(), e.tolist()):
        se = {v for v in re if v >= 0}
        sa = {v for v in ra if v >= 0}
        total += len(se)
        hit += len(se & sa)
    return 1.0 if total == 0 else hit / total


def compare_topk(actual: torch.Tensor, expected: torch.Tensor, min_recall: float = 0.99, name: str = "idx") -> CompareResult:
    """Top-k index lists: same shape, identical −1 pattern (as counts per row), set recall ≥ bound."""
    if actual.shape != expected.shape:
        return CompareResult(False, message=f"{name}: shape {list(actual.shape)} != expected {list(expected.shape)}")
    na = (actual < 0).sum(-1)
    ne = (expected < 0).sum(-1)
    if not torch.equal(na.cpu(), ne.cpu()):
        return CompareResult(False, message=f"{name}: number of -1 sentinels per row differs")
    rec = index_set_recall(actual, expected)
    if rec < min_recall:
        return CompareResult(False, message=f"{name}: index-set recall {rec:.4f} < {min_recall}")
    return CompareResult(True, cosine=rec)


def assert_close(actual: Any, expected: Any, tol: Tolerance | dict[torch.dtype, Tolerance] = EXACT, name: str = "out") -> None:
    r = compare_outputs(actual, expected, tol, name)
    if not r.ok:
        raise AssertionError(r.message)


__all__: Sequence[str] = [
    "CompareResult", "EXACT", "compare_tensors", "compare_outputs", "compare_topk", "index_set_recall", "assert_close",
]
