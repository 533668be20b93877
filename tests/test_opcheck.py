"""``torch.library.opcheck`` on every ``torch.ops.v4k`` operator.

Sample arguments come from the parity cases: each op's smallest non-large case is run through
the public API under ``v4kernels.record_calls()``, which captures the positional schema arguments
of the op's first call.
New ops are picked up automatically; an op without a parity case fails.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

import v4kernels  # noqa: F401  (declares every op)
import v4kernels._registry as R
from v4kernels.testing import all_cases, make_inputs

OPS = R.op_names()


def _nbytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(_nbytes(u) for u in v)
    if isinstance(v, dict):
        return sum(_nbytes(u) for u in v.values())
    return 0


def _clone(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, list):
        return [_clone(u) for u in v]
    if isinstance(v, tuple):
        return tuple(_clone(u) for u in v)
    return v


_SAMPLES: dict[str, tuple[str, tuple[Any, ...]]] = {}


def _sample(op: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, tuple[Any, ...]]:
    if op in _SAMPLES:
        return _SAMPLES[op]
    cases = [c for c in all_cases() if c.op == op]
    if not cases:
        pytest.fail(f"op {op!r} has no parity case in v4kernels.testing.cases; opcheck needs one for sample inputs")
    small = [c for c in cases if not c.large] or cases
    sized = sorted(((_nbytes(make_inputs(c)), i, c) for i, c in enumerate(small)), key=lambda t: t[:2])
    case = sized[0][2]
    recorded: dict[str, tuple[Any, ...]] = {}
    with R.record_calls() as calls:
        case.run(**make_inputs(case))
    for name, _, args, _ in calls:
        recorded.setdefault(name, _clone(args))
    if op not in recorded:
        pytest.fail(f"parity case {case.name} did not call torch.ops.v4k.{op} (recorded: {sorted(recorded)})")
    _SAMPLES[op] = (case.name, recorded[op])
    return _SAMPLES[op]


def test_ops_are_declared():
    assert len(OPS) >= 15 and {"act_quant", "apply_rope", "hc_pre", "hc_post"} <= set(OPS)


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu)


def _has_fp8(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.dtype in _FP8
    return isinstance(v, (list, tuple)) and any(_has_fp8(u) for u in v)


def _bytes_of(v: Any) -> list[Any]:
    if isinstance(v, torch.Tensor):
        return [v.detach().contiguous().view(torch.uint8) if v.numel() else v]
    if isinstance(v, (list, tuple)):
        return [b for u in v for b in _bytes_of(u)]
    return []


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, monkeypatch):
    case_name, args = _sample(op, monkeypatch)
    overload = getattr(torch.ops.v4k, op).default
    utils: tuple[str, ...] = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if _has_fp8(args):
        # torch's SchemaCheckMode compares inputs with allclose, which CPU torch does not
        # implement for float8 dtypes; check "no input is mutated" on the raw bytes instead.
        utils = utils[1:]
        inputs = _clone(args)
        before = [b.clone() for b in _bytes_of(inputs)]
        overload(*inputs)
        after = _bytes_of(inputs)
        assert all(torch.equal(x, y) for x, y in zip(before, after)), f"v4k::{op} mutated an input"
    try:
        torch.library.opcheck(overload, _clone(args), test_utils=utils)
    except Exception as e:  # re-raise with the case that produced the sample
        raise AssertionError(f"opcheck failed for v4k::{op} with the arguments of case {case_name}: {e}") from e
