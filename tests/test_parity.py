"""The shared parity suite: every case on every backend usable here, against the reference
(and the reference against the case's independent implementation where it has one)."""
from __future__ import annotations

import pytest

import v4kernels._registry as R
from v4kernels.testing import run_case, select_cases
from v4kernels.testing.cases._nonfinite import KNOWN_DRIFT

CASES = select_cases(include_large=False)
# Backends that can run on CPU tensors at all (forced); the others are reported by `info`.
BACKENDS = [n for n, b in R.BACKENDS.items() if not b.device_reasons("cpu", forced=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_parity(case, backend, request):
    if case.name in KNOWN_DRIFT.get(backend, ()):
        request.applymarker(pytest.mark.xfail(strict=True, reason="known NaN/inf divergence (docs/numerics.md)"))
    res = run_case(case, backend)
    if res.status == "skip":
        pytest.skip(res.detail)
    assert res.status == "pass", res.detail
