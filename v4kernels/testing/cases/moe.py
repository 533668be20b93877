"""Parity cases for the MoE family (SPEC §11) and naive per-token implementations used as the
second, independent reference (own dequantisation, own activation quantiser, loops over tokens).

Router cases compare ids exactly and weights with the backend's fp32 tolerance (SPEC §14:
"exact expert ids; weights rel ≤ 1e-6"); expert cases use the per-dtype tolerance plus the
cosine ≥ 0.9999 bound of SPEC §14.
"""
from __future__ import annotations

import math
from typing import Any

import torch

import v4kernels as v4k

from ..._registry import Tolerance
from ..inputs import FLASH, PRO, randint, randn
from . import ParityCase, register

# --------------------------------------------------------------------------------------------
# Naive router: one token at a time, fp64 dot products, explicit (score desc, id asc) ordering
# --------------------------------------------------------------------------------------------


def naive_moe_gate(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    topk: int = 6,
    route_scale: float = 1.5,
    tid2eid: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    hf_eps: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loop version of :func:`v4kernels.moe_gate` (SPEC §11.1–11.2)."""
    x64, w64 = x.detach().cpu().double(), weight.detach().cpu().double()
    t_count = x64.shape[0]
    weights = torch.empty(t_count, topk, dtype=torch.float32)
    ids = torch.empty(t_count, topk, dtype=torch.int32)
    b32 = None if bias is None else bias.detach().cpu().float()
    for t in range(t_count):
        logits = (w64 @ x64[t]).float()  # exact dot, rounded once to fp32
        s64 = [math.sqrt(math.log1p(math.exp(v))) if v < 20 else math.sqrt(v) for v in logits.double().tolist()]
        if tid2eid is not None:
            chosen = [int(e) for e in tid2eid[int(token_ids[t])].tolist()]
        else:
            key = torch.tensor(s64, dtype=torch.float32)
            if b32 is not None:
                key = key + b32
            kl = key.tolist()
            chosen = sorted(range(len(kl)), key=lambda e: (-kl[e], e))[:topk]
        sel = [s64[e] for e in chosen]
        denom = sum(sel) + (1e-20 if hf_eps else 0.0)
        weights[t] = torch.tensor([v / denom * route_scale for v in sel], dtype=torch.float64).float()
        ids[t] = torch.tensor(chosen, dtype=torch.int32)
    return weights.to(x.device), ids.to(x.device)


# --------------------------------------------------------------------------------------------
# Naive experts: per (token, slot) loop over explicitly dequantised weights
# --------------------------------------------------------------------------------------------

_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def naive_dequant_weight(w: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """One expert's weight [N, K(/2)] (+ scales) -> exact fp32 values [N, K]."""
    w = w.detach().cpu()
    if w.dtype == torch.float8_e4m3fn:
        assert s is not None
        n, k = w.shape
        sf = s.detach().cpu().float()
        full = sf.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        return w.float() * full
    if w.dtype in (torch.uint8, torch.int8, torch.float4_e2m1fn_x2):
        assert s is not None
        b = w.view(torch.uint8).long()
        lut = torch.tensor(_E2M1, dtype=torch.float32)
        vals = torch.stack((lut[b % 16], lut[b // 16]), dim=-1).reshape(b.shape[0], -1)
        return vals * s.detach().cpu().float().repeat_interleave(32, 1)
    return w.float()


def naive_act_quant_row(v: torch.Tensor) -> torch.Tensor:
    """FP8 round trip of one activation row, block 128, power-of-two scales (SPEC §4.2–4.3)."""
    v = v.float()
    out = torch.empty_like(v)
    inv = torch.tensor(1.0 / 448.0, dtype=torch.float32)
    for b0 in range(0, v.numel(), 128):
        blk = v[b0 : b0 + 128]
        f = float(torch.clamp(blk.abs().max(), min=1e-4) * inv)  # fp32 product, as released
        m, e = math.frexp(f)  # f = m·2^e, m in [0.5, 1)
        scale = 2.0 ** (e - 1 if m == 0.5 else e)  # 2^ceil(log2 f)
        q = (blk / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float()
        out[b0 : b0 + 128] = q * scale
    return out


def _is_quant(w: torch.Tensor) -> bool:
    return w.dtype in (torch.float8_e4m3fn, torch.uint8, torch.int8, torch.float4_e2m1fn_x2)


def naive_moe_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    w1_scale: torch.Tensor | None = None,
    w3_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    swiglu_limit: float = 10.0,
    weight_after_w2: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-token loop version of :func:`v4kernels.moe_experts` (SPEC §11.3)."""
    dt = x.dtype
    out_dtype = out_dtype or dt
    xc = x.detach().cpu()
    cache: dict[tuple[int, int], torch.Tensor] = {}

    def weight(j: int, e: int) -> torch.Tensor:
        if (j, e) not in cache:
            w, s = ((w1, w1_scale), (w3, w3_scale), (w2, w2_scale))[j]
            cache[(j, e)] = naive_dequant_weight(w[e], None if s is None else s[e])
        return cache[(j, e)]

    def lin(v: torch.Tensor, j: int, e: int) -> torch.Tensor:
        w = (w1, w3, w2)[j]
        a = naive_act_quant_row(v) if _is_quant(w) else v.float()
        return torch.mv(weight(j, e), a).to(dt)

    lim = float(swiglu_limit)
    out = torch.zeros(xc.shape, dtype=torch.float64)
    for t in range(xc.shape[0]):
        for slot in range(topk_ids.shape[1]):
            e = int(topk_ids[t, slot])
            if e < 0:
                continue
            wt = float(topk_weights[t, slot])
            g = lin(xc[t], 0, e).double()
            u = lin(xc[t], 1, e).double()
            if lim > 0:
                u = u.clamp(-lim, lim)
                g = g.clamp(max=lim)
            h = g * torch.sigmoid(g) * u
            if not weight_after_w2:
                h = h * wt
            y = lin(h.float().to(dt), 2, e).double()
            out[t] += y * wt if weight_after_w2 else y
    return out.to(out_dtype).to(x.device)


def naive_shared_expert(x, w1, w3, w2, w1_scale=None, w3_scale=None, w2_scale=None, swiglu_limit=10.0, out_dtype=None):
    one = lambda w: None if w is None else w.unsqueeze(0)  # noqa: E731
    t = x.shape[0]
    return naive_moe_experts(
        x, torch.ones(t, 1), torch.zeros(t, 1, dtype=torch.int32), one(w1), one(w3), one(w2),
        one(w1_scale), one(w3_scale), one(w2_scale), swiglu_limit, False, out_dtype,
    )


# --------------------------------------------------------------------------------------------
# Input factories
# --------------------------------------------------------------------------------------------


def make_gate_inputs(g: torch.Generator, d: torch.device, t: int, n_experts: int, dim: int, *, bias: bool = True,
                     topk: int = 6, route_scale: float = 1.5, hash_vocab: int = 0, hf_eps: bool = False) -> dict[str, Any]:
    """Router inputs with logits of order 1 (gate rows scaled by D^-1/2) and a bias of order 0.1."""
    inp: dict[str, Any] = {
        "x": randn(g, (t, dim), d),
        "weight": randn(g, (n_experts, dim), d, scale=dim**-0.5),
        "bias": None,
        "topk": topk,
        "route_scale": route_scale,
        "tid2eid": None,
        "token_ids": None,
        "hf_eps": hf_eps,
    }
    if hash_vocab:
        # distinct experts per vocabulary row, like the released tables: a random start plus
        # increasing offsets spanning less than E, taken modulo E
        start = torch.randint(0, n_experts, (hash_vocab, 1), generator=g)
        gaps = torch.randint(1, max(2, n_experts // topk), (hash_vocab, topk), generator=g)
        gaps[:, 0] = 0
        inp["tid2eid"] = ((start + gaps.cumsum(1)) % n_experts).to(torch.int32).to(d)
        inp["token_ids"] = randint(g, 0, hash_vocab, (t,), d, torch.int64)
    elif bias:
        inp["bias"] = randn(g, (n_experts,), d, torch.float32, scale=0.1)
    return inp


def random_topk_ids(g: torch.Generator, t: int, k: int, n_experts: int, allowed: list[int] | None = None) -> torch.Tensor:
    """[T, k] distinct expert ids per row, drawn from ``allowed`` (default: all experts)."""
    pool = torch.tensor(allowed if allowed is not None else list(range(n_experts)))
    perm = torch.argsort(torch.rand(t, pool.numel(), generator=g), dim=1)[:, :k]
    return pool[perm].to(torch.int32)


def make_expert_inputs(g: torch.Generator, d: torch.device, *, t: int, k: int, n_experts: int, dim: int, inter: int,
                       fmt: str = "bf16", x_dtype: torch.dtype = torch.bfloat16, ids: torch.Tensor | None = None,
                       swiglu_limit: float = 10.0, weight_after_w2: bool = False,
                       out_dtype: torch.dtype | None = None, act_scale: float = 1.0) -> dict[str, Any]:
    """Expert-FFN inputs. Weights scaled so that g, u are O(act_scale) (the ±10 clamp engages
    for act_scale ≳ 4) and the output is O(1); ``fmt`` is "bf16", "fp32", "fp8" or "fp4"."""
    x = randn(g, (t, dim), torch.device("cpu"), x_dtype)
    if ids is None:
        ids = random_topk_ids(g, t, k, n_experts)
    wts = torch.rand(t, ids.shape[1], generator=g) + 0.1
    wts = (wts / wts.sum(-1, keepdim=True) * 1.5).float()
    ws: dict[str, torch.Tensor | None] = {}
    for name, shape, scale in (("w1", (n_experts, inter, dim), act_scale * dim**-0.5),
                               ("w3", (n_experts, inter, dim), act_scale * dim**-0.5),
                               ("w2", (n_experts, dim, inter), inter**-0.5)):
        w = torch.randn(*shape, generator=g) * scale
        if fmt in ("fp8", "fp4"):
            q, s = v4k.quantize_expert_weights(w, fmt)
            ws[name], ws[name + "_scale"] = q.to(d), s.to(d)
        else:
            ws[name] = w.to(torch.float32 if fmt == "fp32" else torch.bfloat16).to(d)
            ws[name + "_scale"] = None
    return {"x": x.to(d), "topk_weights": wts.to(d), "topk_ids": ids.to(d), **ws,
            "swiglu_limit": swiglu_limit, "weight_after_w2": weight_after_w2, "out_dtype": out_dtype}


def _run_gate(x, weight, bias, topk, route_scale, tid2eid, token_ids, hf_eps):
    return v4k.moe_gate(x, weight, bias, topk=topk, route_scale=route_scale, tid2eid=tid2eid, token_ids=token_ids, hf_eps=hf_eps)


def _run_experts(x, topk_weights, topk_ids, w1, w3, w2, w1_scale, w3_scale, w2_scale, swiglu_limit, weight_after_w2, out_dtype):
    return v4k.moe_experts(x, topk_weights, topk_ids, w1, w3, w2, w1_scale=w1_scale, w3_scale=w3_scale,
                           w2_scale=w2_scale, swiglu_limit=swiglu_limit, weight_after_w2=weight_after_w2,
                           out_dtype=out_dtype)


def _run_shared(x, w1, w3, w2, w1_scale, w3_scale, w2_scale, swiglu_limit, out_dtype):
    return v4k.shared_expert(x, w1, w3, w2, w1_scale=w1_scale, w3_scale=w3_scale, w2_scale=w2_scale,
                             swiglu_limit=swiglu_limit, out_dtype=out_dtype)


#: router weights vs the naive fp64 loop: SPEC §14 "weights rel ≤ 1e-6"
GATE_NAIVE_TOL = Tolerance(1e-9, 1e-6, 0.999999)
#: expert outputs vs the naive loop: different fp32 summation orders can move a bf16 rounding of
#: g/u/h by one ulp, which then may flip an FP8 code of w2's input; 2 bf16 ulps plus an atol of
#: 1/64 of the O(1) output scale, and the SPEC §14 cosine bound.
EXPERT_NAIVE_TOL = Tolerance(2.0**-6, 2.0**-6, 0.9999)

# --------------------------------------------------------------------------------------------
# Router cases
# --------------------------------------------------------------------------------------------

_GATE_CASES = [
    ("flash_t8", dict(t=8, n_experts=FLASH["experts"], dim=FLASH["dim"], route_scale=FLASH["route_scale"]), {"v4-flash"}),
    ("flash_t64", dict(t=64, n_experts=FLASH["experts"], dim=FLASH["dim"], route_scale=FLASH["route_scale"]), {"v4-flash"}),
    ("pro_t16", dict(t=16, n_experts=PRO["experts"], dim=PRO["dim"], route_scale=PRO["route_scale"]), {"v4-pro"}),
    ("flash_hash_t16", dict(t=16, n_experts=FLASH["experts"], dim=FLASH["dim"], route_scale=FLASH["route_scale"],
                            hash_vocab=129280), {"v4-flash", "hash"}),
    ("pro_hash_hf_eps_t5", dict(t=5, n_experts=PRO["experts"], dim=PRO["dim"], route_scale=PRO["route_scale"],
                                hash_vocab=1000, hf_eps=True), {"v4-pro", "hash", "hf"}),
    ("odd_e37_k5_nobias_t3", dict(t=3, n_experts=37, dim=96, topk=5, bias=False, route_scale=1.0), {"odd"}),
]

for _name, _kw, _tags in _GATE_CASES:
    register(ParityCase(
        f"moe_gate/{_name}", "moe_gate",
        lambda g, d, _kw=_kw: make_gate_inputs(g, d, **_kw),
        _run_gate, path="hash" if "hash" in _tags else "topk", tags=frozenset(_tags),
        naive=naive_moe_gate, naive_tol=GATE_NAIVE_TOL,
    ))


def _tie_inputs(g: torch.Generator, d: torch.device) -> dict[str, Any]:
    # Small-integer x and gate rows make every fp32 dot product exact. Experts 3, 9, 12 share one
    # row (exact ties in s) and experts 1, 7 share another plus the same bias (exact ties in
    # s + bias); tokens 0..3 align with those rows, so the ties sit inside the top-6 and the ids
    # must come out lower-id first: 3, 9, 12, 1, 7, ...
    v = torch.randint(0, 2, (128,), generator=g).float() * 2 - 1
    x = torch.randint(-3, 4, (8, 128), generator=g).float()
    x[:4] = v
    w = torch.randint(-1, 2, (16, 128), generator=g).float() / 64
    w[[3, 9, 12]] = v * (2 / 64)
    w[[1, 7]] = v * (1 / 64)
    bias = torch.zeros(16)
    bias[[1, 7]] = 0.25
    return {"x": x.to(torch.bfloat16).to(d), "weight": w.to(torch.bfloat16).to(d), "bias": bias.to(d), "topk": 6,
            "route_scale": 1.5, "tid2eid": None, "token_ids": None, "hf_eps": False}


register(ParityCase("moe_gate/exact_ties", "moe_gate", _tie_inputs, _run_gate, path="topk", tags=frozenset({"edge"}),
                    naive=naive_moe_gate, naive_tol=GATE_NAIVE_TOL))

# --------------------------------------------------------------------------------------------
# Expert cases
# --------------------------------------------------------------------------------------------


def _expert_case(name: str, path: str, tags: set[str], large: bool = False, **kw: Any) -> None:
    register(ParityCase(
        f"moe_experts/{name}", "moe_experts",
        lambda g, d, _kw=kw: make_expert_inputs(g, d, **_kw),
        _run_experts, path=path, tags=frozenset(tags), large=large,
        naive=naive_moe_experts, naive_tol=EXPERT_NAIVE_TOL,
    ))


_expert_case("bf16_e8_k6_t16", "bf16", {"small"}, t=16, k=6, n_experts=8, dim=192, inter=96, act_scale=4.0)
_expert_case("fp8_e8_k6_t12", "fp8", {"small"}, fmt="fp8", t=12, k=6, n_experts=8, dim=256, inter=128, act_scale=4.0)
_expert_case("fp4_e16_k6_t10", "fp4", {"small"}, fmt="fp4", t=10, k=6, n_experts=16, dim=256, inter=128, act_scale=4.0)
_expert_case("fp4_e8_k6_t7_hf_after_w2", "fp4", {"hf"}, fmt="fp4", t=7, k=6, n_experts=8, dim=128, inter=256,
             weight_after_w2=True)
_expert_case("fp8_out_fp32_t9", "fp8", {"small"}, fmt="fp8", t=9, k=6, n_experts=8, dim=128, inter=128,
             out_dtype=torch.float32)
_expert_case("fp32_x_t5_no_clamp", "fp32", {"odd"}, fmt="fp32", x_dtype=torch.float32, t=5, k=3, n_experts=4,
             dim=80, inter=48, swiglu_limit=0.0, act_scale=4.0)
# experts 0, 2, 4, 6, 7 receive no tokens
_expert_case("zero_token_experts", "bf16", {"edge"}, t=12, k=3, n_experts=8, dim=128, inter=64,
             ids=torch.tensor([[1, 3, 5]] * 6 + [[5, 3, 1]] * 6, dtype=torch.int32))
# expert 2 is in every token's list (one expert with all tokens), with k=1 and with k=6
_expert_case("one_expert_all_tokens_k1", "fp4", {"edge"}, fmt="fp4", t=20, k=1, n_experts=4, dim=128, inter=128,
             ids=torch.full((20, 1), 2, dtype=torch.int32))
_expert_case("one_expert_all_tokens_k6", "fp8", {"edge"}, fmt="fp8", t=10, k=6, n_experts=12, dim=128, inter=128,
             ids=torch.cat((torch.full((10, 1), 2, dtype=torch.int32),
                            torch.tensor([[e for e in range(12) if e != 2][(3 * r) % 5:][:5] for r in range(10)],
                                         dtype=torch.int32)), 1))
# expert parallel: ids of experts owned by another rank are −1; one row fully masked
_expert_case("ep_masked_minus1", "fp8", {"edge"}, fmt="fp8", t=8, k=6, n_experts=8, dim=128, inter=128,
             ids=torch.tensor([[0, -1, 3, -1, 1, 2], [-1] * 6, [7, 6, 5, 4, 3, 2], [3, -1, -1, -1, -1, 0],
                               [1, 2, 3, -1, 5, 6], [0, 1, 2, 3, 4, 5], [-1, -1, -1, -1, -1, 7], [4, 0, -1, 6, 1, 5]],
                              dtype=torch.int32))
_expert_case("t0", "bf16", {"edge"}, t=0, k=6, n_experts=8, dim=128, inter=64)
_expert_case("flash_fp4_e8_d4096_i2048_t16", "fp4", {"v4-flash"}, large=True, fmt="fp4", t=16, k=6, n_experts=8,
             dim=FLASH["dim"], inter=FLASH["moe_inter"])


def _shared_inputs(g: torch.Generator, d: torch.device, t: int, dim: int, inter: int, fmt: str) -> dict[str, Any]:
    inp = make_expert_inputs(g, d, t=t, k=1, n_experts=1, dim=dim, inter=inter, fmt=fmt, act_scale=4.0)
    out = {"x": inp["x"], "swiglu_limit": 10.0, "out_dtype": None}
    for n in ("w1", "w3", "w2"):
        out[n] = inp[n][0]
        out[n + "_scale"] = None if inp[n + "_scale"] is None else inp[n + "_scale"][0]
    return out


register(ParityCase("moe_experts/shared_fp8_t6", "moe_experts", lambda g, d: _shared_inputs(g, d, 6, 256, 256, "fp8"),
                    _run_shared, path="shared-fp8", tags=frozenset({"shared"}),
                    naive=naive_shared_expert, naive_tol=EXPERT_NAIVE_TOL))
register(ParityCase("moe_experts/shared_flash_fp8_d4096_i2048_t8", "moe_experts",
                    lambda g, d: _shared_inputs(g, d, 8, FLASH["dim"], FLASH["moe_inter"], "fp8"),
                    _run_shared, path="shared-fp8", tags=frozenset({"shared", "v4-flash"}), large=True,
                    naive=naive_shared_expert, naive_tol=EXPERT_NAIVE_TOL))


# --------------------------------------------------------------------------------------------
# NaN / ±inf inputs (docs/numerics.md)
# --------------------------------------------------------------------------------------------
from ._nonfinite import register_nonfinite  # noqa: E402

register_nonfinite("moe_gate/flash_t8", ["x", "weight", "bias"])
register_nonfinite("moe_experts/bf16_e8_k6_t16", ["x", "topk_weights", "w1", "w3", "w2"])
register_nonfinite("moe_experts/fp8_e8_k6_t12", ["w1", "w1_scale", "w2_scale"])
