"""mHC family (SPEC §10): reference vs the naive loop, Sinkhorn invariants, sensitivity to the
op order / transpose / eps placement, bad inputs and empty inputs."""
from __future__ import annotations

import re

import math

import pytest
import torch

import v4kernels as v4k
from v4kernels.testing import all_cases, compare_outputs, make_inputs
from v4kernels.testing.cases.mhc import (
    NAIVE_TOL,
    SINKHORN_TOL,
    naive_hc_head,
    naive_hc_post,
    naive_hc_pre,
    naive_sinkhorn,
)

pytestmark = pytest.mark.usefixtures("reference_backend")


MHC_OPS = ("hc_split_sinkhorn", "hc_pre", "hc_post", "hc_head")
CASES = [c for c in all_cases() if c.op in MHC_OPS and "nonfinite" not in c.tags]  # NaN/inf: test_parity
NAIVE_CASES = [c for c in CASES if c.naive is not None]
SPLIT_CASES = [c for c in CASES if c.op == "hc_split_sinkhorn" and "nonfinite" not in c.name]  # NaN cases: docs/numerics.md


def _hc_of(case) -> int:
    return int(case.name.split("hc")[-1].split("_")[0]) if "odd_hc" in case.name else 4


def _iters_of(case) -> int:
    m = re.search(r"iters(\d+)", case.name)
    return int(m.group(1)) if m else 20


def test_every_op_has_cases_at_v4_shapes():
    for op in MHC_OPS:
        tags = set().union(*(c.tags for c in CASES if c.op == op))
        assert any(c.naive for c in CASES if c.op == op), op
        if op != "hc_split_sinkhorn":
            assert {"v4-flash", "v4-pro", "odd"} <= tags, (op, tags)


@pytest.mark.parametrize("case", NAIVE_CASES, ids=[c.name for c in NAIVE_CASES])
def test_reference_matches_naive(case):
    inputs = make_inputs(case)
    with v4k.use_backend("reference"):
        ref = case.run(**inputs)
    r = compare_outputs(ref, case.naive(**inputs), case.naive_tol)
    assert r.ok, r.message


@pytest.mark.parametrize("case", SPLIT_CASES, ids=[c.name for c in SPLIT_CASES])
def test_sinkhorn_sums(case):
    inp = make_inputs(case)
    n_mix = inp["mixes"].shape[-1]
    hc = next(h for h in range(1, 65) if (2 + h) * h == n_mix)  # mixes are [..., (2+hc)·hc]
    pre, post, comb = v4k.hc_split_sinkhorn(**inp, hc_mult=hc, sinkhorn_iters=_iters_of(case))
    assert bool((pre > 0).all() and (pre <= 1 + 1e-6).all())
    assert bool((post >= 0).all() and (post <= 2).all())
    assert bool((comb >= 0).all())
    # the last step is a column normalisation: column sums are 1 up to the eps in the denominator
    assert torch.allclose(comb.sum(-2), torch.ones_like(pre), atol=2e-5)
    if case.name.endswith("base_only"):
        # same well-conditioned matrix for every token: converged, rows sum to 1 as well
        assert torch.allclose(comb.sum(-1), torch.ones_like(pre), atol=1e-5)
    elif case.name.endswith("random_b2s3"):
        # 20 iterations: rows are only approximately normalised (the row step is not last)
        assert torch.allclose(comb.sum(-1), torch.ones_like(pre), atol=0.1)


def test_sinkhorn_perturbations_are_detected():
    """Rows-before-columns, a missing +eps after the softmax and one iteration too few must each
    fail the parity tolerance on the shipped cases (so a kernel with such a bug cannot pass)."""
    by_name = {c.name.split("/")[1]: c for c in SPLIT_CASES}
    checks = [
        ("random_b2s3", dict(rows_last=True)),
        ("extreme_logits_pm50", dict(rows_last=True)),
        ("odd_hc2_iters1", dict(rows_last=True)),
        ("extreme_logits_pm50", dict(eps_after_softmax=False)),
        ("base_only", dict(eps_after_softmax=False)),
        ("random_b2s3", dict(sinkhorn_iters=19)),
        ("extreme_logits_pm50", dict(sinkhorn_iters=19)),
    ]
    for name, perturb in checks:
        case = by_name[name]
        inp = make_inputs(case)
        ref = case.run(**inp)
        kw = {"hc_mult": _hc_of(case), "sinkhorn_iters": _iters_of(case), **perturb}
        assert compare_outputs(ref, naive_sinkhorn(**inp, **{**kw, **perturb}), SINKHORN_TOL).ok is False, (name, perturb)
        # and the unperturbed naive passes
        kw0 = {"hc_mult": _hc_of(case), "sinkhorn_iters": _iters_of(case)}
        assert compare_outputs(ref, naive_sinkhorn(**inp, **kw0), SINKHORN_TOL).ok, name


def test_sinkhorn_layout_and_gains():
    # zero logits: pre = sigmoid(0) + eps, post = 2·sigmoid(0) = 1, comb uniform 1/hc
    pre, post, comb = v4k.hc_split_sinkhorn(torch.zeros(1, 24), torch.ones(3), torch.zeros(24), eps=0.0)
    assert torch.equal(pre, torch.full((1, 4), 0.5))
    assert torch.equal(post, torch.ones(1, 4))
    assert torch.allclose(comb, torch.full((1, 4, 4), 0.25))
    # comb logits are row-major: mixes[8 + 4j + k] -> comb[j, k]; scale[2] multiplies them
    mixes = torch.zeros(1, 24)
    mixes[0, 8 + 4 * 0 + 1] = 10.0
    mixes[0, 0] = 3.0  # pre[0] uses scale[0]
    mixes[0, 4 + 2] = 3.0  # post[2] uses scale[1]
    scale = torch.tensor([2.0, -1.0, 2.0])
    base = torch.zeros(24)
    base[3] = 1.0
    pre, post, comb = v4k.hc_split_sinkhorn(mixes, scale, base, eps=0.0)
    assert torch.allclose(pre[0], torch.sigmoid(torch.tensor([6.0, 0.0, 0.0, 1.0])))
    assert torch.allclose(post[0], 2 * torch.sigmoid(torch.tensor([0.0, 0.0, -3.0, 0.0])))
    assert int(comb[0, 0].argmax()) == 1 and int(comb[0, :, 1].argmax()) == 0
    # near doubly stochastic: comb[0,1] -> 1, the other three rows/columns share ~1/3 each
    assert float(comb[0, 0, 1]) > 0.9 and float(comb[0, 1, 0]) < 0.4


def test_hc_post_transpose():
    """out[k] = post[k]·x + Σ_j comb[j,k]·residual[j]: comb[0,1] = 1 copies stream 0 into stream 1."""
    res = torch.randn(2, 4, 8)
    x = torch.randn(2, 8)
    comb = torch.zeros(2, 4, 4)
    comb[:, 0, 1] = 1.0
    post = torch.tensor([[0.0, 0.5, 0.0, 0.0]] * 2)
    out = v4k.hc_post(x, res, post, comb)
    assert torch.allclose(out[:, 1], 0.5 * x + res[:, 0])
    assert torch.equal(out[:, 0], torch.zeros(2, 8)) and torch.equal(out[:, 2:], torch.zeros(2, 2, 8))
    # and on every hc_post parity case the untransposed mix is rejected by the tolerance
    for case in (c for c in CASES if c.op == "hc_post"):
        inp = make_inputs(case)
        ref = case.run(**inp)
        if case.naive is not None:
            bad = naive_hc_post(**inp, bf16_mix="bf16_mix" in case.name, transpose=False)
        else:
            bad = v4k.hc_post(inp["x"], inp["residual"], inp["post"], inp["comb"].transpose(-1, -2).contiguous(),
                              bf16_mix="bf16_mix" in case.name)
        assert not compare_outputs(bad, ref, NAIVE_TOL).ok, case.name


def test_hc_post_bf16_mix_variant():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 64, generator=g).bfloat16()
    res = torch.randn(3, 4, 64, generator=g).bfloat16()
    post = torch.rand(3, 4, generator=g) * 2
    comb = torch.softmax(torch.randn(3, 4, 4, generator=g), -2)
    off, hf = v4k.hc_post(x, res, post, comb), v4k.hc_post(x, res, post, comb, bf16_mix=True)
    assert not torch.equal(off, hf)  # the variant really rounds post/comb and the two terms
    assert torch.equal(hf, naive_hc_post(x, res, post, comb, True))
    exact = (post.unsqueeze(-1) * x.float().unsqueeze(-2) + comb.transpose(-1, -2) @ res.float()).bfloat16()
    assert torch.equal(off, exact)  # [OFF]: fp32 then one rounding
    # fp32 activations: both variants agree
    xf, rf = x.float(), res.float()
    assert torch.equal(v4k.hc_post(xf, rf, post, comb), v4k.hc_post(xf, rf, post, comb, bf16_mix=True))


def test_hc_pre_and_head_definitions():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 16, generator=g).bfloat16()
    fn = torch.randn(24, 64, generator=g) / 8
    scale, base = torch.tensor([1.0, 0.7, 1.3]), torch.randn(24, generator=g)
    x_in, post, comb = v4k.hc_pre(x, fn, scale, base)
    xf = x.float().flatten(-2)
    mixes = (xf @ fn.T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)
    pre2, post2, comb2 = v4k.hc_split_sinkhorn(mixes, scale, base)
    assert torch.allclose(post, post2, atol=1e-6) and torch.allclose(comb, comb2, atol=1e-6)
    assert torch.allclose(x_in.float(), (pre2.unsqueeze(-1) * x.float()).sum(-2), rtol=2**-7, atol=1e-6)
    assert x_in.dtype == torch.bfloat16
    # the norm uses all hc·D values of a token (not per stream): scaling one token's streams
    # jointly leaves the mixes unchanged, so x_in scales exactly
    x2 = x.clone()
    x2[0, 0] *= 4
    y2 = v4k.hc_pre(x2, fn, scale, base)[0]
    assert torch.equal(y2[0, 0], (x_in[0, 0].float() * 4).bfloat16())
    hfn, hbase = torch.randn(4, 64, generator=g) / 8, torch.randn(4, generator=g)
    y = v4k.hc_head(x, hfn, torch.tensor([0.9]), hbase)
    pre = torch.sigmoid(((xf @ hfn.T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)) * 0.9 + hbase) + 1e-6
    assert torch.allclose(y.float(), (pre.unsqueeze(-1) * x.float()).sum(-2), rtol=2**-7, atol=1e-6)
    assert torch.equal(y, naive_hc_head(x, hfn, torch.tensor([0.9]), hbase))
    r = compare_outputs(v4k.hc_pre(x, fn, scale, base), naive_hc_pre(x, fn, scale, base), NAIVE_TOL)
    assert r.ok, r.message


def test_empty_inputs():
    pre, post, comb = v4k.hc_split_sinkhorn(torch.zeros(0, 3, 24), torch.ones(3), torch.zeros(24))
    assert pre.shape == (0, 3, 4) and post.shape == (0, 3, 4) and comb.shape == (0, 3, 4, 4)
    x_in, post, comb = v4k.hc_pre(torch.zeros(2, 0, 4, 8, dtype=torch.bfloat16), torch.zeros(24, 32), torch.ones(3), torch.zeros(24))
    assert x_in.shape == (2, 0, 8) and x_in.dtype == torch.bfloat16 and post.shape == (2, 0, 4) and comb.shape == (2, 0, 4, 4)
    out = v4k.hc_post(torch.zeros(0, 8), torch.zeros(0, 4, 8), torch.zeros(0, 4), torch.zeros(0, 4, 4))
    assert out.shape == (0, 4, 8)
    y = v4k.hc_head(torch.zeros(0, 4, 8), torch.zeros(4, 32), torch.ones(1), torch.zeros(4))
    assert y.shape == (0, 8)


def _expect(exc, op, *words):
    return pytest.raises(exc, match=rf"^{op}: .*" + ".*".join(map(str, words)))


def test_bad_inputs_split():
    m, s, b = torch.zeros(2, 24), torch.ones(3), torch.zeros(24)
    with _expect(TypeError, "hc_split_sinkhorn", "mixes", "float32", "bfloat16"):
        v4k.hc_split_sinkhorn(m.bfloat16(), s, b)
    with _expect(ValueError, "hc_split_sinkhorn", "mixes", "24", r"\[2, 20\]"):
        v4k.hc_split_sinkhorn(torch.zeros(2, 20), s, b)
    with _expect(ValueError, "hc_split_sinkhorn", "mixes", "8", r"\[2, 24\]"):
        v4k.hc_split_sinkhorn(m, s, b, hc_mult=2)
    with _expect(ValueError, "hc_split_sinkhorn", "hc_scale", r"\[3\]", r"\[1\]"):
        v4k.hc_split_sinkhorn(m, torch.ones(1), b)
    with _expect(ValueError, "hc_split_sinkhorn", "hc_base", r"\[24\]", r"\[4\]"):
        v4k.hc_split_sinkhorn(m, s, torch.zeros(4))
    with _expect(ValueError, "hc_split_sinkhorn", "sinkhorn_iters", ">= 1", "0"):
        v4k.hc_split_sinkhorn(m, s, b, sinkhorn_iters=0)
    with _expect(TypeError, "hc_split_sinkhorn", "hc_mult", "int"):
        v4k.hc_split_sinkhorn(m, s, b, hc_mult=4.0)
    with _expect(ValueError, "hc_split_sinkhorn", "eps", ">= 0", "-1"):
        v4k.hc_split_sinkhorn(m, s, b, eps=-1.0)
    with _expect(TypeError, "hc_split_sinkhorn", "mixes", "Tensor", "list"):
        v4k.hc_split_sinkhorn([0.0] * 24, s, b)
    with _expect(ValueError, "hc_split_sinkhorn", "hc_scale", "meta", "mixes", "cpu"):
        v4k.hc_split_sinkhorn(m, s.to("meta"), b)


def test_bad_inputs_pre_head():
    x, fn, s, b = torch.zeros(2, 4, 8), torch.zeros(24, 32), torch.ones(3), torch.zeros(24)
    with _expect(ValueError, "hc_pre", "x", ">= 2 dims", r"\[8\]"):
        v4k.hc_pre(torch.zeros(8), fn, s, b)
    with _expect(TypeError, "hc_pre", "x", "bfloat16/float16/float32", "int64"):
        v4k.hc_pre(x.long(), fn, s, b)
    with _expect(ValueError, "hc_pre", "hc_fn", r"\[24, 32\]", r"\[24, 16\]"):
        v4k.hc_pre(x, torch.zeros(24, 16), s, b)
    with _expect(ValueError, "hc_pre", "hc_fn", r"\[8, 16\]", r"\[24, 32\]"):
        v4k.hc_pre(torch.zeros(2, 2, 8), fn, s, torch.zeros(8))  # hc = 2 from x
    with _expect(TypeError, "hc_pre", "hc_fn", "float32", "bfloat16"):
        v4k.hc_pre(x, fn.bfloat16(), s, b)
    with _expect(ValueError, "hc_pre", "norm_eps", ">= 0"):
        v4k.hc_pre(x, fn, s, b, norm_eps=-1e-6)
    with _expect(ValueError, "hc_pre", "x", "D >= 1", r"\[2, 4, 0\]"):
        v4k.hc_pre(torch.zeros(2, 4, 0), torch.zeros(24, 0), s, b)
    hfn, hs, hb = torch.zeros(4, 32), torch.ones(1), torch.zeros(4)
    with _expect(ValueError, "hc_head", "hc_fn", r"\[4, 32\]", r"\[24, 32\]"):
        v4k.hc_head(x, fn, hs, hb)
    with _expect(ValueError, "hc_head", "hc_scale", r"\[1\]", r"\[3\]"):
        v4k.hc_head(x, hfn, s, hb)
    with _expect(ValueError, "hc_head", "hc_base", r"\[4\]", r"\[24\]"):
        v4k.hc_head(x, hfn, hs, b)
    with _expect(TypeError, "hc_head", "hc_eps", "float", "str"):
        v4k.hc_head(x, hfn, hs, hb, hc_eps="1e-6")


def test_bad_inputs_post():
    x, r, p, c = torch.zeros(2, 8), torch.zeros(2, 4, 8), torch.zeros(2, 4), torch.zeros(2, 4, 4)
    with _expect(ValueError, "hc_post", "residual", r"\[2, hc, 8\]", r"\[2, 4, 7\]"):
        v4k.hc_post(x, torch.zeros(2, 4, 7), p, c)
    with _expect(ValueError, "hc_post", "residual", r"\[2, hc, 8\]", r"\[3, 4, 8\]"):
        v4k.hc_post(x, torch.zeros(3, 4, 8), p, c)
    with _expect(TypeError, "hc_post", "residual", "float32", "bfloat16"):
        v4k.hc_post(x, r.bfloat16(), p, c)
    with _expect(ValueError, "hc_post", "post", r"\[2, 4\]", r"\[2, 3\]"):
        v4k.hc_post(x, r, torch.zeros(2, 3), c)
    with _expect(ValueError, "hc_post", "comb", r"\[2, 4, 4\]", r"\[2, 16\]"):
        v4k.hc_post(x, r, p, torch.zeros(2, 16))
    with _expect(TypeError, "hc_post", "comb", "float32", "bfloat16"):
        v4k.hc_post(x, r, p, c.bfloat16())
    with _expect(TypeError, "hc_post", "bf16_mix", "bool"):
        v4k.hc_post(x, r, p, c, bf16_mix=1)
    with _expect(ValueError, "hc_post", "x", "a scalar"):
        v4k.hc_post(torch.tensor(1.0), r, p, c)


def test_failed_call_leaves_inputs_unchanged():
    x = torch.randn(2, 4, 8)
    before = x.clone()
    with pytest.raises(ValueError):
        v4k.hc_pre(x, torch.zeros(24, 31), torch.ones(3), torch.zeros(24))
    assert torch.equal(x, before)


def test_hc_pre_extreme_scales_stay_finite():
    # large-magnitude streams (bf16 max region) and tiny ones: the fp32 norm keeps mixes finite
    for mag in (1e30, 1e-30):
        x = (torch.randn(1, 2, 4, 32) * mag).bfloat16()
        x_in, post, comb = v4k.hc_pre(x, torch.randn(24, 128) / 11, torch.ones(3), torch.zeros(24))
        assert bool(torch.isfinite(post).all() and torch.isfinite(comb).all()), mag
        assert math.isfinite(float(x_in.float().abs().max()))
