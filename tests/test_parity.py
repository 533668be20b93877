"""The shared parity suite: every case on every backend that can run it here, against the reference
(and the reference against the case's independent implementation where it has one).

The (case, backend) pairs are computed at collection time from ``available_backends(op, "cpu")``,
so a backend that cannot run an op here (or the reference on a case without an independent
implementation) is not collected at all instead of being reported as an always-skipped test;
``python -m v4kernels info`` lists what is not runnable and why. A collected pair that skips at run
time is a failure: the registry said it could run.
"""
from __future__ import annotations

import pytest
import torch

import v4kernels as v4k
import v4kernels._registry as R
from v4kernels.testing import run_case, select_cases
from v4kernels.testing.cases.mhc import naive_hc_post
from v4kernels.testing.cases._nonfinite import KNOWN_DRIFT

CASES = select_cases(include_large=False)


def runnable_pairs(cases, device: str = "cpu"):
    """``(case, backend)`` for every backend with no reasons against ``case.op`` on ``device``; the
    reference only where the case has an independent implementation to compare it with."""
    pairs = []
    for case in cases:
        for backend, reasons in R.available_backends(case.op, device).items():
            if reasons or (backend == "reference" and case.naive is None):
                continue
            pairs.append((case, backend))
    return pairs


PAIRS = runnable_pairs(CASES)


@pytest.mark.parametrize("case,backend", PAIRS, ids=[f"{c.name}-{b}" for c, b in PAIRS])
def test_parity(case, backend, request):
    if case.name in KNOWN_DRIFT.get(backend, ()):
        request.applymarker(pytest.mark.xfail(strict=True, reason="known NaN/inf divergence (docs/numerics.md)"))
    res = run_case(case, backend)
    assert res.status == "pass", f"{res.status}: {res.detail}"


def test_pairs_cover_every_case():
    """Every case runs on at least one backend (the reference with a naive implementation, or
    another backend compared with the reference)."""
    covered = {c.name for c, _ in PAIRS}
    assert covered == {c.name for c in CASES}, sorted({c.name for c in CASES} - covered)


def test_unavailable_pairs_are_not_collected():
    case = next(c for c in CASES if c.naive is None)
    assert (case, "reference") not in PAIRS
    for c, b in PAIRS:
        assert not R.available_backends(c.op, "cpu")[b]


# ------------------------------------------------------------------------- hc_post, [HF] variant


def _hf_post_inputs(t: int = 64, hc: int = 4, d: int = 520, seed: int = 0):
    """Inputs whose fp32 products and 4-term sums are exact (bf16 operands with at most 8
    significant bits and a narrow exponent range), so every correct kernel rounds the same real
    numbers and the result is defined bit for bit, independent of summation order. ``post`` and
    ``comb`` carry full fp32 mantissas: rounding them to bf16 first ([HF]) changes the result."""
    g = torch.Generator().manual_seed(seed)

    def bf16_in(shape, lo, hi):
        sign = torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)
        return (sign * (lo + (hi - lo) * torch.rand(*shape, generator=g))).bfloat16()

    x = bf16_in((t, d), 1.0, 2.0)
    residual = bf16_in((t, hc, d), 1.0, 2.0)
    post = 0.25 + 1.75 * torch.rand(t, hc, generator=g)  # fp32, in [0.25, 2)
    comb = 0.25 + 0.75 * torch.rand(t, hc, hc, generator=g)  # fp32, in [0.25, 1)
    return x, residual, post, comb


_POST_BACKENDS = [b for b, r in R.available_backends("hc_post", "cpu").items() if not r]


@pytest.mark.parametrize("backend", _POST_BACKENDS)
def test_hc_post_bf16_mix_bit_exact(backend):
    """``hc_post(..., bf16_mix=True)`` is [HF]'s rounding (SPEC §10.4, §15 #4):
    ``bf16(bf16(bf16(post)·a) + bf16(Σ_j bf16(C[j,k])·R[j]))``. On inputs where that expression is
    exact up to its roundings, every backend must reproduce the float64 formula bit for bit, and
    the result must differ from the [OFF] single-rounding variant (so a kernel that skips any of
    the roundings fails)."""
    x, residual, post, comb = _hf_post_inputs()
    with v4k.use_backend(backend, ops=["hc_post"]):
        hf = v4k.hc_post(x, residual, post, comb, bf16_mix=True)
        off = v4k.hc_post(x, residual, post, comb, bf16_mix=False)
    expect = naive_hc_post(x, residual, post, comb, bf16_mix=True)
    # the same formula, written out here once more with torch ops (float64 is exact on these inputs)
    pc, cc = post.bfloat16().double(), comb.bfloat16().double()
    a = (pc[..., None] * x.double()[:, None]).bfloat16().double()
    r = torch.einsum("tjk,tjd->tkd", cc, residual.double()).bfloat16().double()
    assert torch.equal(expect, (a + r).bfloat16())
    assert hf.dtype == torch.bfloat16 and hf.shape == residual.shape
    mism = (hf.view(torch.int16) != expect.view(torch.int16)).sum().item()
    assert mism == 0, f"{backend}: {mism} of {expect.numel()} elements differ from the [HF] rounding"
    differs = (off.view(torch.int16) != hf.view(torch.int16)).float().mean().item()
    assert differs > 0.05, f"inputs too weak: [OFF] and [HF] variants differ in only {differs:.1%} of elements"
