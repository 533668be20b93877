"""Parity cases for the mHC family (SPEC §10), with a naive per-element implementation.

The naive functions below loop over tokens and elements in Python (float64 arithmetic) and
share no code with the vectorised reference; they are the second reference for small shapes.
``naive_sinkhorn`` takes switches that perturb the op order, used by the tests to show that the
parity tolerance detects such mistakes.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

import v4kernels as v4k

from ..._registry import Tolerance
from ..inputs import FLASH, PRO, bf16_ulp_tol, rand, randn
from . import ParityCase, register

#: naive (float64 loops) vs reference (fp32 tensor ops): SPEC §14 asks max-abs <= 1e-6 for the
#: fp32 Sinkhorn outputs (all in [0, 2]) and <= 1 ulp for activations (a few fp32 ulps for
#: fp32 activations, whose sums the two implementations order differently).
SINKHORN_TOL: dict[torch.dtype, Tolerance] = {torch.float32: Tolerance(1e-6, 0.0, 0.999999)}
NAIVE_TOL: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(1e-6, 1e-6, 0.999999),
    torch.bfloat16: bf16_ulp_tol(1.0),
    torch.float16: Tolerance(1e-6, 2.0**-10, 0.9999),
}


# --------------------------------------------------------------------------------------------
# naive implementation (per token, per element)
# --------------------------------------------------------------------------------------------


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def naive_sinkhorn_token(
    mixes: Sequence[float],
    scale: Sequence[float],
    base: Sequence[float],
    hc: int,
    iters: int,
    eps: float,
    *,
    rows_last: bool = False,
    eps_after_softmax: bool = True,
) -> tuple[list[float], list[float], list[list[float]]]:
    """SPEC §10.2 for one token. ``rows_last`` swaps the normalisation order (a perturbation);
    ``eps_after_softmax=False`` drops the +eps after the softmax (a perturbation)."""
    pre = [_sigmoid(mixes[j] * scale[0] + base[j]) + eps for j in range(hc)]
    post = [2.0 * _sigmoid(mixes[hc + j] * scale[1] + base[hc + j]) for j in range(hc)]
    c = [[mixes[2 * hc + hc * j + k] * scale[2] + base[2 * hc + hc * j + k] for k in range(hc)] for j in range(hc)]
    for j in range(hc):
        mx = max(c[j])
        e = [math.exp(v - mx) for v in c[j]]
        tot = sum(e)
        c[j] = [v / tot + (eps if eps_after_softmax else 0.0) for v in e]

    def norm_cols() -> None:
        for k in range(hc):
            tot = sum(c[j][k] for j in range(hc))
            for j in range(hc):
                c[j][k] = c[j][k] / (tot + eps)

    def norm_rows() -> None:
        for j in range(hc):
            tot = sum(c[j])
            c[j] = [v / (tot + eps) for v in c[j]]

    first, second = (norm_rows, norm_cols) if rows_last else (norm_cols, norm_rows)
    first()
    for _ in range(iters - 1):
        second()
        first()
    return pre, post, c


def naive_sinkhorn(
    mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc_mult: int = 4,
    sinkhorn_iters: int = 20, eps: float = 1e-6, **perturb: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lead = mixes.shape[:-1]
    rows = mixes.double().reshape(-1, mixes.shape[-1]).tolist()
    sc, bs = hc_scale.double().tolist(), hc_base.double().tolist()
    pres, posts, combs = [], [], []
    for m in rows:
        p, q, c = naive_sinkhorn_token(m, sc, bs, hc_mult, sinkhorn_iters, eps, **perturb)
        pres.append(p)
        posts.append(q)
        combs.append(c)

    def out(v: list[Any], *shape: int) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float64).reshape(*lead, *shape).float()

    return out(pres, hc_mult), out(posts, hc_mult), out(combs, hc_mult, hc_mult)


def _naive_mixes(xt: list[list[float]], fn: list[list[float]], norm_eps: float) -> list[float]:
    flat = [v for stream in xt for v in stream]
    rs = 1.0 / math.sqrt(sum(v * v for v in flat) / len(flat) + norm_eps)
    return [sum(w * v for w, v in zip(row, flat)) * rs for row in fn]


def _naive_collapse(xt: list[list[float]], pre: list[float]) -> list[float]:
    return [sum(pre[j] * xt[j][f] for j in range(len(xt))) for f in range(len(xt[0]))]


def naive_hc_pre(
    x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
    sinkhorn_iters: int = 20, norm_eps: float = 1e-6, hc_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hc, d = x.shape[-2], x.shape[-1]
    lead = x.shape[:-2]
    toks = x.double().reshape(-1, hc, d).tolist()
    fn, sc, bs = hc_fn.double().tolist(), hc_scale.double().tolist(), hc_base.double().tolist()
    ys, posts, combs = [], [], []
    for xt in toks:
        pre, post, comb = naive_sinkhorn_token(_naive_mixes(xt, fn, norm_eps), sc, bs, hc, sinkhorn_iters, hc_eps)
        ys.append(_naive_collapse(xt, pre))
        posts.append(post)
        combs.append(comb)
    y = torch.tensor(ys, dtype=torch.float64).reshape(*lead, d).to(x.dtype)
    return (y, torch.tensor(posts, dtype=torch.float64).reshape(*lead, hc).float(),
            torch.tensor(combs, dtype=torch.float64).reshape(*lead, hc, hc).float())


def naive_hc_head(
    x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor,
    norm_eps: float = 1e-6, hc_eps: float = 1e-6,
) -> torch.Tensor:
    hc, d = x.shape[-2], x.shape[-1]
    fn, sc, bs = hc_fn.double().tolist(), float(hc_scale[0]), hc_base.double().tolist()
    ys = []
    for xt in x.double().reshape(-1, hc, d).tolist():
        mixes = _naive_mixes(xt, fn, norm_eps)
        pre = [_sigmoid(mixes[j] * sc + bs[j]) + hc_eps for j in range(hc)]
        ys.append(_naive_collapse(xt, pre))
    return torch.tensor(ys, dtype=torch.float64).reshape(*x.shape[:-2], d).to(x.dtype)


def naive_hc_post(
    x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, bf16_mix: bool = False,
    *, transpose: bool = True,
) -> torch.Tensor:
    """``out[k][f] = post[k]·x[f] + Σ_j comb[j][k]·residual[j][f]``; ``transpose=False`` uses
    ``comb[k][j]`` instead (a perturbation). ``bf16_mix`` rounds post, comb and both terms to
    ``x.dtype`` ([HF], SPEC §15 #4)."""
    dt = x.dtype
    hc, d = residual.shape[-2], residual.shape[-1]

    def rnd(v: torch.Tensor) -> torch.Tensor:
        return v.to(dt).double() if bf16_mix else v

    xs = x.double().reshape(-1, d).tolist()
    rs = residual.double().reshape(-1, hc, d).tolist()
    ps = rnd(post.double()).reshape(-1, hc).tolist()
    cs = rnd(comb.double()).reshape(-1, hc, hc).tolist()
    t1, t2 = [], []
    for xt, rt, pt, ct in zip(xs, rs, ps, cs):
        t1.append([[pt[k] * xt[f] for f in range(d)] for k in range(hc)])
        t2.append([[sum((ct[j][k] if transpose else ct[k][j]) * rt[j][f] for j in range(hc)) for f in range(d)]
                   for k in range(hc)])
    a = rnd(torch.tensor(t1, dtype=torch.float64))
    b = rnd(torch.tensor(t2, dtype=torch.float64))
    return (a + b).reshape(residual.shape).to(dt)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _params(g: torch.Generator, d: torch.device, hc: int, dim: int, head: bool = False) -> dict[str, torch.Tensor]:
    n_mix = hc if head else (2 + hc) * hc
    # fn rows ~ N(0, 4/(hc·D)) so that the mix logits of unit-RMS streams are ~N(0, 4)
    return {
        "hc_fn": randn(g, (n_mix, hc * dim), d, torch.float32, scale=2.0 / math.sqrt(hc * dim)),
        "hc_scale": rand(g, (1 if head else 3,), d, 0.5, 1.5),
        "hc_base": randn(g, (n_mix,), d, torch.float32, scale=0.5),
    }


def _split_inputs(lead: tuple[int, ...], hc: int, kind: str):
    def make(g: torch.Generator, d: torch.device) -> dict[str, Any]:
        n_mix = (2 + hc) * hc
        if kind == "random":
            mixes = randn(g, (*lead, n_mix), d, torch.float32, scale=2.0)
            scale, base = rand(g, (3,), d, 0.5, 1.5), randn(g, (n_mix,), d, torch.float32, scale=0.5)
        elif kind == "extreme":
            # logits ±50; token 0 has an all −50 comb column, whose entries survive only via +eps
            sign = torch.randint(0, 2, (*lead, n_mix), generator=g).float() * 2 - 1
            mixes = sign * 50.0
            flat = mixes.view(-1, n_mix)
            flat[0, 2 * hc :: hc] = -50.0
            flat[0, 2 * hc + 1 :: hc] = 50.0
            mixes = mixes.to(d)
            scale, base = torch.ones(3, device=d), torch.zeros(n_mix, device=d)
        else:  # base only: zero logits, the bias alone decides
            mixes = torch.zeros(*lead, n_mix, device=d)
            scale, base = rand(g, (3,), d, 0.5, 1.5), randn(g, (n_mix,), d, torch.float32, scale=3.0)
        return {"mixes": mixes, "hc_scale": scale, "hc_base": base}

    return make


def _pre_inputs(lead: tuple[int, ...], hc: int, dim: int, dtype: torch.dtype, head: bool = False):
    def make(g: torch.Generator, d: torch.device) -> dict[str, Any]:
        return {"x": randn(g, (*lead, hc, dim), d, dtype), **_params(g, d, hc, dim, head)}

    return make


def _post_inputs(lead: tuple[int, ...], hc: int, dim: int, dtype: torch.dtype):
    def make(g: torch.Generator, d: torch.device) -> dict[str, Any]:
        # post in (0, 2) and column-stochastic, non-symmetric comb, as hc_pre produces them
        return {
            "x": randn(g, (*lead, dim), d, dtype),
            "residual": randn(g, (*lead, hc, dim), d, dtype),
            "post": rand(g, (*lead, hc), d, 0.0, 2.0),
            "comb": torch.softmax(randn(g, (*lead, hc, hc), torch.device("cpu"), torch.float32, scale=2.0), dim=-2).to(d),
        }

    return make


def _reg(name: str, op: str, make, run, tags: set[str], naive=None, large: bool = False, path: str = "") -> None:
    tol = SINKHORN_TOL if op == "hc_split_sinkhorn" else NAIVE_TOL
    register(ParityCase(f"{op}/{name}", op, make, run, path=path or op, tags=frozenset(tags), large=large,
                        naive=naive, naive_tol=tol if naive is not None else None))


# -- hc_split_sinkhorn
for _name, _lead, _hc, _kind, _iters in [
    ("random_b2s3", (2, 3), 4, "random", 20),
    ("extreme_logits_pm50", (3, 2), 4, "extreme", 20),
    ("base_only", (2, 1), 4, "base", 20),
    ("odd_hc2_iters1", (5,), 2, "random", 1),
    ("odd_hc3_iters7", (7,), 3, "random", 7),
    ("generic_hc2_iters20_b2s3", (2, 3), 2, "random", 20),
]:
    _reg(_name, "hc_split_sinkhorn", _split_inputs(_lead, _hc, _kind),
         lambda mixes, hc_scale, hc_base, _h=_hc, _i=_iters: v4k.hc_split_sinkhorn(mixes, hc_scale, hc_base, _h, _i),
         {"odd" if _hc != 4 else "edge" if _kind != "random" else "v4-flash"},
         naive=lambda mixes, hc_scale, hc_base, _h=_hc, _i=_iters: naive_sinkhorn(mixes, hc_scale, hc_base, _h, _i))

# -- hc_pre / hc_head: V4 decode shapes (vs backends only) and small ones (also vs the naive loop)
_SHAPES = [
    ("flash_decode_b4", (4, 1), 4, FLASH["dim"], torch.bfloat16, {"v4-flash"}, False),
    ("pro_decode_b2", (2, 1), 4, PRO["dim"], torch.bfloat16, {"v4-pro"}, False),
    ("small_b2s3_d40", (2, 3), 4, 40, torch.bfloat16, {"odd"}, True),
    ("odd_hc2_fp32_d24", (3,), 2, 24, torch.float32, {"odd"}, True),
    ("prefill_s5_d100", (1, 5), 4, 100, torch.bfloat16, {"odd"}, True),
    ("generic_hc2_b2s3_d64", (2, 3), 2, 64, torch.bfloat16, {"generic"}, True),
    ("generic_hc2_fp32_s4_d32", (1, 4), 2, 32, torch.float32, {"generic"}, True),
]
for _name, _lead, _hc, _dim, _dt, _tags, _naive in _SHAPES:
    _reg(_name, "hc_pre", _pre_inputs(_lead, _hc, _dim, _dt),
         lambda x, hc_fn, hc_scale, hc_base: v4k.hc_pre(x, hc_fn, hc_scale, hc_base), _tags,
         naive=naive_hc_pre if _naive else None)
    _reg(_name, "hc_head", _pre_inputs(_lead, _hc, _dim, _dt, head=True),
         lambda x, hc_fn, hc_scale, hc_base: v4k.hc_head(x, hc_fn, hc_scale, hc_base), _tags,
         naive=naive_hc_head if _naive else None)
    for _mix in (False, True):
        _reg(_name + ("_bf16_mix" if _mix else ""), "hc_post", _post_inputs(_lead, _hc, _dim, _dt),
             lambda x, residual, post, comb, _m=_mix: v4k.hc_post(x, residual, post, comb, bf16_mix=_m),
             _tags | ({"hf"} if _mix else set()),
             naive=(lambda x, residual, post, comb, _m=_mix: naive_hc_post(x, residual, post, comb, _m)) if _naive else None,
             path="hc_post_hf" if _mix else "hc_post")
