"""MoE family (SPEC §11): router, routed experts, shared expert, weight quantisation helper.

The vectorised reference is checked against the naive per-token loops of
``v4kernels.testing.cases.moe`` plus hand-built cases for every semantic detail (ties, bias only
in the selection, clamp bounds, weight placement, −1 masking, empty experts).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import v4kernels as v4k
from v4kernels._registry import Tolerance
from v4kernels.testing import assert_close
from v4kernels.testing.cases.moe import (
    EXPERT_NAIVE_TOL,
    make_expert_inputs,
    make_gate_inputs,
    naive_act_quant_row,
    naive_dequant_weight,
    naive_moe_experts,
    naive_moe_gate,
    naive_shared_expert,
)

GATE_TOL = Tolerance(1e-9, 1e-6, 0.999999)  # SPEC §14: weights rel <= 1e-6


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gate(inp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    kw = {k: v for k, v in inp.items() if k not in ("x", "weight", "bias")}
    return v4k.moe_gate(inp["x"], inp["weight"], inp["bias"], **kw)


def experts(inp: dict) -> torch.Tensor:
    kw = {k: v for k, v in inp.items() if k not in ("x", "topk_weights", "topk_ids", "w1", "w3", "w2")}
    return v4k.moe_experts(inp["x"], inp["topk_weights"], inp["topk_ids"], inp["w1"], inp["w3"], inp["w2"], **kw)


def scores64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.softplus(x.double() @ w.double().T).sqrt()


# ============================================================================================
# Router
# ============================================================================================


@pytest.mark.parametrize(
    "kw",
    [
        dict(t=16, n_experts=32, dim=64),
        dict(t=9, n_experts=64, dim=128, bias=False, topk=1, route_scale=2.5),
        dict(t=5, n_experts=6, dim=32, topk=6),  # topk == E
        dict(t=7, n_experts=20, dim=48, topk=4, hf_eps=True),
        dict(t=11, n_experts=40, dim=64, hash_vocab=50),
    ],
    ids=["bias_k6", "nobias_k1", "k_eq_e", "hf_eps", "hash"],
)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_gate_matches_naive_loop(kw, x_dtype):
    inp = make_gate_inputs(gen(1), torch.device("cpu"), **kw)
    inp["x"] = inp["x"].to(x_dtype)
    w, ids = gate(inp)
    wn, idn = naive_moe_gate(**inp)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, idn)
    assert_close(w, wn, GATE_TOL)


def test_gate_upcasts_before_matmul():
    inp = make_gate_inputs(gen(2), torch.device("cpu"), t=8, n_experts=16, dim=64)
    w_bf, i_bf = gate(inp)
    inp32 = dict(inp, x=inp["x"].float(), weight=inp["weight"].float())
    w_32, i_32 = gate(inp32)
    assert torch.equal(i_bf, i_32) and torch.equal(w_bf, w_32)


def test_gate_ties_go_to_lower_expert_id():
    # x = 0 makes every logit 0, so every s = sqrt(ln 2): all experts tie before the bias
    x = torch.zeros(3, 16, dtype=torch.bfloat16)
    w = torch.randn(8, 16, generator=gen()).to(torch.bfloat16)
    _, ids = v4k.moe_gate(x, w, None, topk=6)
    assert ids.tolist() == [[0, 1, 2, 3, 4, 5]] * 3
    bias = torch.tensor([0.0, 1.0, 1.0, 0.0, 2.0, 1.0, 0.0, 0.0])
    weights, ids = v4k.moe_gate(x, w, bias, topk=6, route_scale=1.5)
    assert ids.tolist() == [[4, 1, 2, 5, 0, 3]] * 3
    assert torch.allclose(weights, torch.full((3, 6), 0.25), rtol=1e-6, atol=0)


def test_gate_exact_ties_inside_topk():
    from v4kernels.testing.cases.moe import _tie_inputs

    inp = _tie_inputs(gen(0), torch.device("cpu"))
    _, ids = gate(inp)
    # experts 3, 9, 12 tie in s, experts 1, 7 tie in s + bias; both groups lower id first
    for r in range(4):
        assert ids[r, :5].tolist() == [3, 9, 12, 1, 7]
    assert torch.equal(ids, naive_moe_gate(**inp)[1])


def test_gate_bias_selects_but_does_not_weight():
    g = gen(3)
    x = torch.randn(10, 64, generator=g).to(torch.bfloat16)
    w = (torch.randn(12, 64, generator=g) / 8).to(torch.bfloat16)
    bias = torch.zeros(12)
    bias[[0, 6, 7, 10]] = 100.0  # forces these four into every selection
    weights, ids = v4k.moe_gate(x, w, bias, topk=4, route_scale=1.5)
    assert sorted(ids[0].tolist()) == [0, 6, 7, 10]
    s = scores64(x.float(), w.float())
    sel = s.gather(1, ids.long())
    expected = sel / sel.sum(-1, keepdim=True) * 1.5
    assert_close(weights, expected.float(), GATE_TOL)
    # if the bias leaked into the weights they would be ~1.5/4 each
    leaked = (sel + 100) / (sel + 100).sum(-1, keepdim=True) * 1.5
    assert (weights.double() - leaked).abs().max() > 1e-2
    # a zero bias is the same as no bias, and a bias does change the selection
    w0, i0 = v4k.moe_gate(x, w, torch.zeros(12), topk=4)
    wn, in_ = v4k.moe_gate(x, w, None, topk=4)
    assert torch.equal(i0, in_) and torch.equal(w0, wn)
    assert not torch.equal(ids, in_)


def test_gate_selection_uses_biased_order():
    # bias reorders two experts: selection follows s + bias, weights follow s
    x = torch.ones(1, 4)
    w = torch.tensor([[1.0] * 4, [0.5] * 4, [0.0] * 4])  # logits 4, 2, 0
    _, ids = v4k.moe_gate(x, w, None, topk=1)
    assert ids.tolist() == [[0]]
    weights, ids = v4k.moe_gate(x, w, torch.tensor([0.0, 1.0, 0.0]), topk=2, route_scale=1.0)
    assert ids.tolist() == [[1, 0]]
    s = scores64(x, w)[0]
    assert_close(weights, (s[[1, 0]] / s[[1, 0]].sum()).float()[None], GATE_TOL)


def test_gate_route_scale_and_normalisation():
    inp = make_gate_inputs(gen(4), torch.device("cpu"), t=12, n_experts=24, dim=32, route_scale=1.0)
    w1, i1 = gate(inp)
    w25, i25 = gate(dict(inp, route_scale=2.5))
    assert torch.equal(i1, i25)
    assert_close(w1.sum(-1), torch.ones(12), GATE_TOL)
    assert_close(w25.sum(-1), torch.full((12,), 2.5), GATE_TOL)
    assert_close(w25, w1 * 2.5, GATE_TOL)


def test_gate_hf_eps():
    # logits near -90 give s ~ 1e-20, where the [HF] +1e-20 in the denominator matters
    x = torch.ones(2, 4)
    # (softplus is then an fp32 subnormal with ~16 significant bits, hence rtol 1e-4 here)
    w = torch.tensor([[-22.5] * 4, [-22.75] * 4, [-23.0] * 4, [-22.25] * 4])
    off, ids = v4k.moe_gate(x, w, None, topk=2, route_scale=1.5)
    hf, ids_hf = v4k.moe_gate(x, w, None, topk=2, route_scale=1.5, hf_eps=True)
    assert torch.equal(ids, ids_hf) and ids[0].tolist() == [3, 0]
    s = torch.tensor([math.exp(-44.5), math.exp(-45.0)], dtype=torch.float64)
    assert_close(off[0], (s / s.sum() * 1.5).float(), Tolerance(0, 1e-4, 0.9999))
    assert_close(hf[0], (s / (s.sum() + 1e-20) * 1.5).float(), Tolerance(0, 1e-4, 0.9999))
    assert float(hf[0].sum()) < 0.9 * float(off[0].sum())
    # at normal magnitudes the epsilon is invisible
    inp = make_gate_inputs(gen(5), torch.device("cpu"), t=6, n_experts=16, dim=32)
    assert_close(gate(dict(inp, hf_eps=True))[0], gate(inp)[0], GATE_TOL)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_gate_hash_routing(idx_dtype):
    g = gen(6)
    x = torch.randn(5, 32, generator=g)
    w = torch.randn(10, 32, generator=g) / 6
    tid2eid = torch.tensor([[0, 1, 2], [9, 8, 7], [4, 2, 6], [5, 3, 1]], dtype=idx_dtype)
    token_ids = torch.tensor([3, 0, 3, 1, 2], dtype=idx_dtype)
    weights, ids = v4k.moe_gate(x, w, topk=3, route_scale=2.5, tid2eid=tid2eid, token_ids=token_ids)
    assert ids.dtype == torch.int32
    assert torch.equal(ids, tid2eid[token_ids].int())
    sel = scores64(x, w).gather(1, ids.long())
    assert_close(weights, (sel / sel.sum(-1, keepdim=True) * 2.5).float(), GATE_TOL)


def test_gate_hash_value_checks(monkeypatch):
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    good = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"moe_gate: tid2eid entries must lie in \[0, 4\)"):
        v4k.moe_gate(x, w, topk=2, tid2eid=torch.tensor([[0, 1], [2, 4]]), token_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"moe_gate: tid2eid entries must lie in \[0, 4\)"):
        v4k.moe_gate(x, w, topk=2, tid2eid=torch.tensor([[0, -1], [2, 3]]), token_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"moe_gate: token_ids entries must lie in \[0, 2\)"):
        v4k.moe_gate(x, w, topk=2, tid2eid=good, token_ids=torch.tensor([0, 2]))
    monkeypatch.setenv("V4K_CHECKS", "off")
    # the value check is skipped: the bad id now fails inside torch, not in our validation
    with pytest.raises((IndexError, RuntimeError)) as ei:
        v4k.moe_gate(x, w, topk=2, tid2eid=good, token_ids=torch.tensor([0, 2]))
    assert "token_ids entries" not in str(ei.value)


def test_gate_empty():
    weights, ids = v4k.moe_gate(torch.empty(0, 16), torch.randn(8, 16), torch.zeros(8), topk=6)
    assert weights.shape == (0, 6) and weights.dtype == torch.float32
    assert ids.shape == (0, 6) and ids.dtype == torch.int32


_GX, _GW = torch.randn(3, 16), torch.randn(8, 16)
_TID = torch.zeros(5, 6, dtype=torch.int32)
_TOK = torch.zeros(3, dtype=torch.int64)


@pytest.mark.parametrize(
    "args, kwargs, exc, pattern",
    [
        ((_GX[0], _GW), {}, ValueError, r"moe_gate: x must have 2 dims"),
        ((_GX.int(), _GW), {}, TypeError, r"moe_gate: x must have dtype"),
        (("x", _GW), {}, TypeError, r"moe_gate: x must be a torch.Tensor"),
        ((_GX, _GW[:, :8]), {}, ValueError, r"moe_gate: weight.shape\[1\] must be 16"),
        ((_GX, _GW.long()), {}, TypeError, r"moe_gate: weight must have dtype"),
        ((_GX, _GW, torch.zeros(7)), {}, ValueError, r"moe_gate: bias must have shape \[8\]"),
        ((_GX, _GW, torch.zeros(8, dtype=torch.int32)), {}, TypeError, r"moe_gate: bias must have dtype"),
        ((_GX, _GW), {"topk": 9}, ValueError, r"topk must be <= the number of experts E=8, got 9"),
        ((_GX, _GW), {"topk": 0}, ValueError, r"moe_gate: topk must be >= 1"),
        ((_GX, _GW), {"topk": 2.0}, TypeError, r"moe_gate: topk must be an int"),
        ((_GX, _GW), {"route_scale": float("nan")}, ValueError, r"moe_gate: route_scale must be a finite float > 0"),
        ((_GX, _GW), {"route_scale": -1.0}, ValueError, r"moe_gate: route_scale must be a finite float > 0"),
        ((_GX, _GW), {"route_scale": "1.5"}, TypeError, r"moe_gate: route_scale must be a float"),
        ((_GX, _GW), {"hf_eps": 1}, TypeError, r"moe_gate: hf_eps must be a bool"),
        ((_GX, _GW), {"tid2eid": _TID}, ValueError, r"tid2eid was given but token_ids is None"),
        ((_GX, _GW), {"token_ids": _TOK}, ValueError, r"token_ids was given but tid2eid is None"),
        ((_GX, _GW, torch.zeros(8)), {"tid2eid": _TID, "token_ids": _TOK}, ValueError, r"bias must be None with hash"),
        ((_GX, _GW), {"tid2eid": _TID.float(), "token_ids": _TOK}, TypeError, r"moe_gate: tid2eid must have dtype"),
        ((_GX, _GW), {"tid2eid": _TID[:, :4], "token_ids": _TOK}, ValueError, r"tid2eid must have shape \[V, topk=6\]"),
        ((_GX, _GW), {"tid2eid": _TID, "token_ids": _TOK[:2]}, ValueError, r"moe_gate: token_ids must have shape \[3\]"),
        ((_GX, _GW), {"tid2eid": _TID, "token_ids": _TOK.float()}, TypeError, r"moe_gate: token_ids must have dtype"),
        ((_GX, _GW.to("meta")), {}, ValueError, r"moe_gate: weight is on meta but x is on cpu"),
    ],
)
def test_gate_bad_inputs(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        v4k.moe_gate(*args, **kwargs)


# ============================================================================================
# Routed experts
# ============================================================================================

CPU = torch.device("cpu")


@pytest.mark.parametrize("fmt, dim, inter", [("bf16", 96, 80), ("fp32", 64, 48), ("fp8", 256, 128), ("fp4", 128, 256)])
@pytest.mark.parametrize("after, out_dtype", [(False, None), (True, torch.float32)], ids=["off", "hf_after_w2_fp32_out"])
def test_experts_match_naive_loop(fmt, dim, inter, after, out_dtype):
    x_dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    inp = make_expert_inputs(gen(7), CPU, t=12, k=4, n_experts=6, dim=dim, inter=inter, fmt=fmt, x_dtype=x_dtype,
                             weight_after_w2=after, out_dtype=out_dtype, act_scale=4.0)
    out = experts(inp)
    assert out.shape == (12, dim) and out.dtype == (out_dtype or x_dtype)
    naive = naive_moe_experts(**inp)
    assert_close(out, naive, EXPERT_NAIVE_TOL)
    if x_dtype == torch.float32:  # no bf16 rounding anywhere: only fp32 summation order differs
        assert_close(out, naive, Tolerance(1e-5, 1e-5, 0.999999))
    else:
        # Every rounding step (g, u, w·h and y_e to bf16; FP8 codes) is reproduced, so nearly all
        # outputs agree bit for bit; a skipped or extra rounding stage would break this.
        # (fp32 outputs are compared after rounding: the naive loop reduces in fp64)
        bf = torch.bfloat16
        assert float((out.to(bf) == naive.to(bf)).float().mean()) >= 0.9


def test_weight_placement_is_off_by_default():
    # With FP8 w2 the routing weight's placement is visible (SPEC §15 #6): the default must be
    # the [OFF] placement, bit-compatible with the naive "before w2" loop, not the [HF] one.
    inp = make_expert_inputs(gen(8), CPU, t=16, k=6, n_experts=4, dim=128, inter=256, fmt="fp8", act_scale=4.0)
    out = experts(inp)
    before = naive_moe_experts(**inp)
    after = naive_moe_experts(**dict(inp, weight_after_w2=True))
    assert_close(out, before, EXPERT_NAIVE_TOL)
    # the placements disagree on most outputs; the reference agrees with "before" almost
    # everywhere (bit for bit here; a few 1-ulp flips would come from summation order only)
    assert int((out != before).sum()) <= out.numel() // 50
    assert int((out != after).sum()) >= out.numel() // 2


def test_weight_before_after_w2_differ_only_through_fp8():
    inp = make_expert_inputs(gen(9), CPU, t=10, k=3, n_experts=4, dim=128, inter=128, fmt="fp8",
                             x_dtype=torch.float32, out_dtype=torch.float32)
    # float (fp32) w2: no quantiser sees the weight, so the placement only moves fp32 roundings
    w2f = naive_dequant_weight_all(inp["w2"], inp["w2_scale"])
    flt = dict(inp, w2=w2f, w2_scale=None)
    a, b = experts(flt), experts(dict(flt, weight_after_w2=True))
    assert_close(a, b, Tolerance(1e-5, 1e-5, 0.999999))
    # FP8 w2: act_quant of w·h versus h rounds differently, a visible but small difference
    a, b = experts(inp), experts(dict(inp, weight_after_w2=True))
    rel = float((a - b).norm() / a.norm())
    assert 1e-4 < rel < 5e-2, rel
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    assert cos > 0.999


def naive_dequant_weight_all(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.stack([naive_dequant_weight(w[e], s[e]) for e in range(w.shape[0])])


def _clamp_problem(limit: float):
    # one expert, D = I = 4, x = e_0, w2 = identity and weight 1: the output is h itself
    g_t = torch.tensor([-12.0, -3.0, 5.0, 20.0])
    u_t = torch.tensor([25.0, -30.0, 4.0, 7.0])
    w1 = torch.zeros(1, 4, 4)
    w3 = torch.zeros(1, 4, 4)
    w1[0, :, 0] = g_t
    w3[0, :, 0] = u_t
    w2 = torch.eye(4)[None]
    x = torch.zeros(1, 4)
    x[0, 0] = 1.0
    out = v4k.moe_experts(x, torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int32), w1, w3, w2, swiglu_limit=limit)
    return out[0].double(), g_t.double(), u_t.double()


@pytest.mark.parametrize("limit", [10.0, 7.0])
def test_swiglu_clamp(limit):
    out, g, u = _clamp_problem(limit)
    gc = g.clamp(max=limit)
    expected = gc * torch.sigmoid(gc) * u.clamp(-limit, limit)
    assert_close(out, expected, Tolerance(1e-9, 1e-6, 0.999999))
    # the gate has no lower clamp: clamping g from below would change entry 0 by > 5x
    wrong_lower = g.clamp(-limit, limit)
    wrong = wrong_lower * torch.sigmoid(wrong_lower) * u.clamp(-limit, limit)
    assert abs(float(out[0] - wrong[0])) > 4 * abs(float(out[0]))
    # without the clamps entries 1 and 3 would differ
    raw = g * torch.sigmoid(g) * u
    assert (out[[1, 3]] - raw[[1, 3]]).abs().min() > 1.0


def test_swiglu_limit_zero_disables_clamp():
    out, g, u = _clamp_problem(0.0)
    assert_close(out, g * torch.sigmoid(g) * u, Tolerance(1e-9, 1e-6, 0.999999))


def test_zero_token_experts_are_never_read():
    inp = make_expert_inputs(gen(10), CPU, t=8, k=2, n_experts=6, dim=128, inter=128, fmt="fp8",
                             ids=torch.tensor([[1, 4]] * 8, dtype=torch.int32))
    ref = experts(inp)
    poisoned = dict(inp)
    for n in ("w1", "w3", "w2"):
        s = inp[n + "_scale"].clone()
        s[[0, 2, 3, 5]] = float("nan")
        poisoned[n + "_scale"] = s
    assert torch.equal(experts(poisoned), ref)
    assert_close(ref, naive_moe_experts(**inp), EXPERT_NAIVE_TOL)


def test_one_expert_with_all_tokens_and_relabelling():
    inp = make_expert_inputs(gen(11), CPU, t=24, k=1, n_experts=5, dim=128, inter=64,
                             ids=torch.full((24, 1), 3, dtype=torch.int32))
    out = experts(inp)
    dense = v4k.shared_expert(inp["x"], inp["w1"][3], inp["w3"][3], inp["w2"][3], out_dtype=torch.float32)
    # the routed path rounds w·h (not h) to bf16 before w2: equal to the weighted dense FFN up to
    # that rounding, scored by cosine (SPEC §14)
    assert_close(out.float(), dense * inp["topk_weights"], Tolerance(math.inf, 0.0, 0.9999))
    assert_close(out, naive_moe_experts(**inp), EXPERT_NAIVE_TOL)
    # relabelling experts (permuting weights and ids together) changes nothing, bit for bit
    perm = torch.tensor([4, 2, 0, 1, 3])  # new expert j = old expert perm[j]
    inv = torch.argsort(perm)
    inp6 = make_expert_inputs(gen(12), CPU, t=10, k=3, n_experts=5, dim=128, inter=128, fmt="fp4")
    relab = dict(inp6, topk_ids=inv[inp6["topk_ids"].long()].int())
    for n in ("w1", "w3", "w2", "w1_scale", "w3_scale", "w2_scale"):
        relab[n] = inp6[n][perm]
    assert torch.equal(experts(relab), experts(inp6))


def test_minus_one_ids_are_skipped():
    inp = make_expert_inputs(gen(13), CPU, t=6, k=4, n_experts=4, dim=128, inter=128, fmt="fp4", out_dtype=torch.float32)
    ids = inp["topk_ids"].clone()
    ids[0, 1] = ids[2, :] = ids[5, 3] = -1
    masked = experts(dict(inp, topk_ids=ids))
    # a −1 slot contributes exactly what a zero-weight slot contributes: nothing
    zero_w = inp["topk_weights"].clone()
    zero_w[ids < 0] = 0
    assert torch.equal(masked, experts(dict(inp, topk_weights=zero_w)))
    assert torch.equal(masked[2], torch.zeros(128))
    # the weight of a skipped slot is never read
    nan_w = inp["topk_weights"].clone()
    nan_w[ids < 0] = float("nan")
    assert torch.equal(experts(dict(inp, topk_ids=ids, topk_weights=nan_w)), masked)
    assert_close(masked, naive_moe_experts(**dict(inp, topk_ids=ids)), Tolerance(1e-5, 1e-5, 0.99999))


def test_duplicate_expert_in_a_row_counts_twice():
    inp = make_expert_inputs(gen(14), CPU, t=3, k=2, n_experts=3, dim=128, inter=64, out_dtype=torch.float32,
                             ids=torch.tensor([[2, 2]] * 3, dtype=torch.int32))
    inp["topk_weights"] = torch.full((3, 2), 0.5)
    single = experts(dict(inp, topk_ids=torch.tensor([[2, -1]] * 3, dtype=torch.int32)))
    assert torch.equal(experts(inp), 2 * single)


def test_out_dtype_rounds_once():
    inp = make_expert_inputs(gen(15), CPU, t=9, k=6, n_experts=8, dim=128, inter=128, fmt="fp8")
    out32 = experts(dict(inp, out_dtype=torch.float32))
    assert torch.equal(experts(inp), out32.to(torch.bfloat16))
    assert torch.equal(experts(dict(inp, out_dtype=torch.float16)), out32.to(torch.float16))
    # each expert's y_e is rounded to x.dtype before the fp32 reduction: with one slot per
    # token the fp32 output lies on the bf16 grid, with six it generally does not
    one = experts(dict(inp, topk_ids=inp["topk_ids"][:, :1], topk_weights=inp["topk_weights"][:, :1], out_dtype=torch.float32))
    assert torch.equal(one, one.to(torch.bfloat16).float())
    assert not torch.equal(out32, out32.to(torch.bfloat16).float())


def test_index_and_storage_dtypes_are_equivalent():
    inp = make_expert_inputs(gen(16), CPU, t=5, k=3, n_experts=4, dim=128, inter=128, fmt="fp4")
    ref = experts(inp)
    alt = dict(inp, topk_ids=inp["topk_ids"].long())  # int64 ids
    assert torch.equal(experts(alt), ref)
    for n in ("w1", "w3", "w2"):
        alt[n] = inp[n].view(torch.int8)  # int8 storage of the packed codes
    alt["w1_scale"] = inp["w1_scale"].to(torch.float8_e8m0fnu)  # UE8M0 scales (exact for 2^k)
    assert torch.equal(experts(alt), ref)


def test_experts_empty_problems():
    inp = make_expert_inputs(gen(17), CPU, t=0, k=6, n_experts=4, dim=128, inter=128, fmt="fp8")
    out = experts(inp)
    assert out.shape == (0, 128) and out.dtype == torch.bfloat16
    inp = make_expert_inputs(gen(17), CPU, t=3, k=2, n_experts=4, dim=128, inter=64)
    out = experts(dict(inp, topk_ids=inp["topk_ids"][:, :0], topk_weights=inp["topk_weights"][:, :0], out_dtype=torch.float32))
    assert torch.equal(out, torch.zeros(3, 128))
    out = experts(dict(inp, topk_ids=torch.full((3, 2), -1, dtype=torch.int32)))
    assert torch.equal(out, torch.zeros(3, 128, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------- shared expert
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_shared_expert(fmt):
    inp = make_expert_inputs(gen(18), CPU, t=7, k=1, n_experts=1, dim=256, inter=128, fmt=fmt, act_scale=4.0)
    w = {n: inp[n][0] for n in ("w1", "w3", "w2")}
    s = {n + "_scale": (None if inp[n + "_scale"] is None else inp[n + "_scale"][0]) for n in ("w1", "w3", "w2")}
    out = v4k.shared_expert(inp["x"], w["w1"], w["w3"], w["w2"], **s)
    via_experts = v4k.moe_experts(inp["x"], torch.ones(7, 1), torch.zeros(7, 1, dtype=torch.int32),
                                  inp["w1"], inp["w3"], inp["w2"], w1_scale=inp["w1_scale"],
                                  w3_scale=inp["w3_scale"], w2_scale=inp["w2_scale"])
    assert torch.equal(out, via_experts)
    assert_close(out, naive_shared_expert(inp["x"], w["w1"], w["w3"], w["w2"], **s), EXPERT_NAIVE_TOL)
    # routed (fp32) + shared, rounded once, as in [OFF] MoE.forward
    total = v4k.moe_experts(inp["x"], torch.ones(7, 1), torch.zeros(7, 1, dtype=torch.int32), inp["w1"], inp["w3"],
                            inp["w2"], w1_scale=inp["w1_scale"], w3_scale=inp["w3_scale"], w2_scale=inp["w2_scale"],
                            out_dtype=torch.float32) + out.float()
    assert torch.equal(total.to(torch.bfloat16), (2 * out.float()).to(torch.bfloat16))


def test_shared_expert_checks_and_empty():
    x = torch.randn(2, 128)
    w1, w3, w2 = torch.randn(64, 128), torch.randn(64, 128), torch.randn(128, 64)
    with pytest.raises(ValueError, match=r"shared_expert: w2 must have logical shape \[D=128, I=64\]"):
        v4k.shared_expert(x, w1, w3, w2.T)
    with pytest.raises(ValueError, match=r"shared_expert: w1 must have 2 dims"):
        v4k.shared_expert(x, w1[None], w3, w2)
    q, s = v4k.quantize_expert_weights(w1, "fp8")
    with pytest.raises(ValueError, match=r"shared_expert: w1 is FP8 .* needs w1_scale"):
        v4k.shared_expert(x, q, w3, w2)
    out = v4k.shared_expert(x[:0], w1, w3, w2, out_dtype=torch.bfloat16)
    assert out.shape == (0, 128) and out.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- bad inputs
def _bad_base() -> dict:
    inp = make_expert_inputs(gen(19), CPU, t=4, k=2, n_experts=3, dim=128, inter=128, fmt="fp8")
    return inp


def _mut(**changes):
    def f(inp):
        for k, v in changes.items():
            inp[k] = v(inp) if callable(v) else v
        return inp
    return f


@pytest.mark.parametrize(
    "mutate, exc, pattern",
    [
        (_mut(x=lambda i: i["x"][0]), ValueError, r"moe_experts: x must have 2 dims"),
        (_mut(x=lambda i: i["x"].int()), TypeError, r"moe_experts: x must have dtype"),
        (_mut(topk_ids=lambda i: i["topk_ids"].float()), TypeError, r"moe_experts: topk_ids must have dtype int32/int64"),
        (_mut(topk_ids=lambda i: i["topk_ids"][:3]), ValueError, r"topk_ids.shape\[0\] must be 4 \(T = x.shape\[0\]\), got 3"),
        (_mut(topk_ids=lambda i: i["topk_ids"][0]), ValueError, r"moe_experts: topk_ids must have 2 dims"),
        (_mut(topk_weights=lambda i: i["topk_weights"][:, :1]), ValueError, r"moe_experts: topk_weights must have shape \[4, 2\]"),
        (_mut(topk_weights=lambda i: i["topk_weights"].int()), TypeError, r"moe_experts: topk_weights must have dtype"),
        (_mut(topk_ids=lambda i: torch.full((4, 2), 3, dtype=torch.int32)), ValueError, r"topk_ids entries must lie in \[-1, 3\)"),
        (_mut(topk_ids=lambda i: torch.full((4, 2), -2, dtype=torch.int32)), ValueError, r"topk_ids entries must lie in \[-1, 3\)"),
        (_mut(w1="w1"), TypeError, r"moe_experts: w1 must be a torch.Tensor"),
        (_mut(w1=lambda i: i["w1"].view(torch.int16)), TypeError, r"moe_experts: w1 must have dtype .* got int16"),
        (_mut(w1=lambda i: i["w1"][0]), ValueError, r"moe_experts: w1 must have 3 dims \[E, I, D=128\]"),
        (_mut(x=lambda i: i["x"][:, :64]), ValueError,
         r"moe_experts: w1 is FP8, which needs its in-features D to be a multiple of 128 \(act_quant block\), got D=64"),
        (_mut(w3=lambda i: i["w3"][:2], w3_scale=lambda i: i["w3_scale"][:2]), ValueError,
         r"moe_experts: w3 must have logical shape \[E=3, I=128, D=128\], got logical shape \[2, 128, 128\]"),
        (_mut(w2=lambda i: i["w2"][:, :64]), ValueError, r"moe_experts: w2 must have logical shape \[E=3, D=128, I=128\]"),
        (_mut(w1_scale=None), ValueError, r"moe_experts: w1 is FP8 \(float8_e4m3fn\) and needs w1_scale, got None"),
        (_mut(w2_scale=lambda i: i["w2_scale"][:, :, :0]), ValueError, r"moe_experts: w2_scale must have shape \[3, 1, 1\]"),
        (_mut(w3_scale=lambda i: i["w3_scale"].double()), TypeError, r"moe_experts: w3_scale must have dtype float32/float8_e8m0fnu"),
        (_mut(w2=lambda i: i["w2"].float(), w2_scale=lambda i: i["w2_scale"]), ValueError,
         r"moe_experts: w2_scale must be None for a float w2"),
        (_mut(w1=lambda i: torch.zeros(3, 128, 64, dtype=torch.uint8), w1_scale=lambda i: torch.ones(3, 128, 2)), ValueError,
         r"moe_experts: w1_scale must have shape \[3, 128, 4\]"),
        (_mut(w2=lambda i: torch.zeros(3, 128, 128, dtype=torch.uint8), w2_scale=lambda i: torch.ones(3, 128, 8)), ValueError,
         r"w2 must have logical shape \[E=3, D=128, I=128\] \(packed FP4 stores \[..., I/2\] bytes\), got logical shape \[3, 128, 256\]"),
        (_mut(swiglu_limit=-1.0), ValueError, r"moe_experts: swiglu_limit must be >= 0"),
        (_mut(swiglu_limit=float("nan")), ValueError, r"moe_experts: swiglu_limit must be >= 0"),
        (_mut(swiglu_limit="10"), TypeError, r"moe_experts: swiglu_limit must be a float"),
        (_mut(weight_after_w2=None), TypeError, r"moe_experts: weight_after_w2 must be a bool"),
        (_mut(out_dtype=torch.int32), TypeError, r"moe_experts: out_dtype must be None or one of"),
        (_mut(w2_scale=lambda i: i["w2_scale"].to("meta")), ValueError, r"moe_experts: w2_scale is on meta but x is on cpu"),
    ],
)
def test_experts_bad_inputs(mutate, exc, pattern):
    inp = mutate(_bad_base())
    with pytest.raises(exc, match=pattern):
        experts(inp)


# ============================================================================================
# Weight quantisation helper
# ============================================================================================


def test_quantize_expert_weights_fp8():
    w = torch.randn(2, 200, 300, generator=gen(20)) * torch.logspace(-3, 1, 300)  # ragged edge tiles
    q, s = v4k.quantize_expert_weights(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and s.shape == (2, 2, 3)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    for e in range(2):
        deq = naive_dequant_weight(q[e], s[e])
        for rb in range(2):
            for cb in range(3):
                tile = w[e, rb * 128 : (rb + 1) * 128, cb * 128 : (cb + 1) * 128]
                amax = float(tile.abs().max())
                sc = float(s[e, rb, cb])
                assert 224 < amax / sc <= 448  # the smallest power of two that fits (SPEC §4.2)
                err = (deq[rb * 128 : (rb + 1) * 128, cb * 128 : (cb + 1) * 128] - tile).abs().max()
                assert float(err) <= sc * 16  # half an e4m3 step at the top binade (32·s/2)
    q8, s8 = v4k.quantize_expert_weights(w, "fp8", scale_dtype=torch.float8_e8m0fnu)
    assert torch.equal(q8.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s8.float(), s)


def test_quantize_expert_weights_fp4_matches_act_quant():
    w = torch.randn(3, 40, 96, generator=gen(21))
    q, s = v4k.quantize_expert_weights(w, "fp4")
    assert q.shape == (3, 40, 48) and q.dtype == torch.uint8 and s.shape == (3, 40, 3)
    q_ref, s_ref = v4k.fp4_act_quant(w.reshape(120, 96), 32)
    assert torch.equal(q.reshape(120, 48), q_ref) and torch.equal(s.reshape(120, 3), s_ref)
    deq = naive_dequant_weight(q[1], s[1])
    assert float((deq - w[1]).abs().max()) <= float(s[1].max())  # half an e2m1 step at the top binade
    q2, s2 = v4k.quantize_expert_weights(w[0], "fp4")
    assert torch.equal(q2, q[0]) and torch.equal(s2, s[0])


def test_quantize_expert_weights_checks_and_empty():
    with pytest.raises(ValueError, match=r"quantize_expert_weights: fmt must be 'fp8' or 'fp4', got 'int4'"):
        v4k.quantize_expert_weights(torch.randn(1, 4, 32), "int4")
    with pytest.raises(ValueError, match=r"fp4 needs w.shape\[-1\] to be a multiple of 32"):
        v4k.quantize_expert_weights(torch.randn(1, 4, 48), "fp4")
    with pytest.raises(ValueError, match=r"quantize_expert_weights: w must have 2 or 3 dims"):
        v4k.quantize_expert_weights(torch.randn(4), "fp8")
    with pytest.raises(TypeError, match=r"quantize_expert_weights: w must have dtype"):
        v4k.quantize_expert_weights(torch.zeros(1, 4, 32, dtype=torch.int32), "fp8")
    q, s = v4k.quantize_expert_weights(torch.randn(0, 128, 256), "fp8")
    assert q.shape == (0, 128, 256) and s.shape == (0, 1, 2)


def test_naive_act_quant_matches_reference_act_quant():
    # keeps the second reference honest: its activation quantiser is the SPEC §4.3 one
    v = torch.randn(3, 256, generator=gen(22)) * torch.tensor([1e-3, 1.0, 300.0])[:, None]
    q, s = v4k.act_quant(v, 128)
    expected = q.float() * s.repeat_interleave(128, 1)
    for r in range(3):
        assert torch.equal(naive_act_quant_row(v[r]), expected[r])


# ============================================================================================
# torch.library registration
# ============================================================================================


def test_opcheck():
    g = gen(23)
    x, w = torch.randn(4, 32, generator=g), torch.randn(8, 32, generator=g)
    torch.library.opcheck(torch.ops.v4k.moe_gate.default, (x, w, torch.zeros(8), None, None, 3, 1.5, False, False))
    tid = torch.tensor([[0, 1, 2], [5, 6, 7]], dtype=torch.int32)
    torch.library.opcheck(torch.ops.v4k.moe_gate.default, (x, w, None, tid, torch.tensor([1, 0, 1, 1]), 3, 2.5, True, False))
    torch.library.opcheck(torch.ops.v4k.moe_gate.default, (x.bfloat16(), w.bfloat16(), torch.zeros(8), None, None, 3, 1.5,
                                                           True, True))
    for fmt in ("bf16", "fp4", "fp8"):
        inp = make_expert_inputs(g, CPU, t=3, k=2, n_experts=3, dim=128, inter=128, fmt=fmt)
        args = (inp["x"], inp["topk_weights"], inp["topk_ids"], inp["w1"], inp["w1_scale"], inp["w3"], inp["w3_scale"],
                inp["w2"], inp["w2_scale"], 10.0, False, torch.float32, False)
        # The AOT-dispatch check (a compile, the slow part) runs once; the quantised formats
        # reuse that code path. torch's schema checker cannot compare float8 tensors (allclose
        # is not implemented for e4m3 on CPU), so FP8 skips that check.
        utils = {"bf16": "ALL", "fp4": ("test_schema", "test_faketensor", "test_autograd_registration"),
                 "fp8": ("test_faketensor", "test_autograd_registration")}[fmt]
        torch.library.opcheck(torch.ops.v4k.moe_experts.default, args, test_utils=utils)


def test_experts_memoized_checks_still_read_every_calls_ids():
    """Structural checks run once per signature; the id range is checked on every call, so a bad id
    in a later call with a known signature is refused, and so is a bad shape of a new signature."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 128, generator=g).bfloat16()
    w1, w3 = (torch.randn(3, 64, 128, generator=g).bfloat16() / 11 for _ in range(2))
    w2 = torch.randn(3, 128, 64, generator=g).bfloat16() / 8
    ids = torch.tensor([[0, 1], [2, -1], [1, 1], [-1, -1]], dtype=torch.int32)
    wts = torch.full((4, 2), 0.5)
    first = v4k.moe_experts(x, wts, ids, w1, w3, w2)
    assert torch.equal(v4k.moe_experts(x, wts, ids, w1, w3, w2), first)
    with pytest.raises(ValueError, match="topk_ids"):
        v4k.moe_experts(x, wts, torch.tensor([[0, 1], [3, -1], [1, 1], [-1, -1]], dtype=torch.int32), w1, w3, w2)
    with pytest.raises(ValueError, match="topk_weights"):
        v4k.moe_experts(x, wts[:, :1], ids, w1, w3, w2)


def test_gate_memoized_checks_still_read_every_calls_hash_ids():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 64, generator=g), torch.randn(8, 64, generator=g) / 8
    table = torch.randint(0, 8, (10, 2), generator=g, dtype=torch.int32)
    tok = torch.tensor([1, 9, 4], dtype=torch.int32)
    first = v4k.moe_gate(x, w, topk=2, tid2eid=table, token_ids=tok)
    assert all(torch.equal(a, b) for a, b in zip(v4k.moe_gate(x, w, topk=2, tid2eid=table, token_ids=tok), first))
    with pytest.raises(ValueError, match="token_ids"):
        v4k.moe_gate(x, w, topk=2, tid2eid=table, token_ids=torch.tensor([1, 10, 4], dtype=torch.int32))
    bad = table.clone()
    bad[3, 1] = 8
    with pytest.raises(ValueError, match="tid2eid"):
        v4k.moe_gate(x, w, topk=2, tid2eid=bad, token_ids=tok)
