"""Reference MoE router and routed/shared expert FFN (SPEC §11), fp32 math on any device.

The expert path reuses the quantisation reference kernels of SPEC §4 for FP8/FP4 weights, so a
Linear with a quantised weight is exactly ``act_quant(x, 128)`` followed by the block-scaled GEMM
of the released inference code (SPEC §4.8).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._registry import register_kernel
from ..quant import reference as Q

#: weight storage formats of ``moe_experts`` (decided by dtype: float / e4m3 / packed uint8)
FLOAT, FP8, FP4 = "float", "fp8", "fp4"


def weight_format(w: torch.Tensor) -> str:
    """Storage format of an expert weight: ``"fp8"`` (e4m3), ``"fp4"`` (packed uint8) or ``"float"``."""
    if w.dtype == torch.float8_e4m3fn:
        return FP8
    if w.dtype in (torch.uint8, torch.int8, torch.float4_e2m1fn_x2):
        return FP4
    return FLOAT


def expert_linear(x: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor | None) -> torch.Tensor:
    """``linear(x, W)`` of SPEC §4.8 for one expert weight ``w [N, K]``; output in ``x.dtype``.

    float W: fp32 matmul rounded once to ``x.dtype``. FP8 / FP4 W: ``act_quant(x, 128)`` with
    power-of-two scales, then ``fp8_gemm`` / ``fp4_gemm`` with fp32 partial sums per K tile.
    """
    fmt = weight_format(w)
    if fmt == FLOAT:
        return (x.float() @ w.float().T).to(x.dtype)
    assert w_s is not None
    a, a_s = Q.act_quant(x, 128, True)
    if fmt == FP8:
        return Q.fp8_gemm(a, a_s, w, w_s, x.dtype)
    return Q.fp4_gemm(a, a_s, w.view(torch.uint8), w_s, x.dtype)


def swiglu_clamp(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """``silu(min(g, L)) · clamp(u, −L, L)`` in fp32 (SPEC §11.3); ``L <= 0`` disables the clamp.

    The gate has no lower clamp: very negative ``g`` still gives ``silu(g) → 0⁻``.
    """
    g, u = g.float(), u.float()
    if limit > 0:
        u = u.clamp(-limit, limit)
        g = g.clamp(max=limit)
    return F.silu(g) * u


# --------------------------------------------------------------------------------------------
# Router (SPEC §11.1, §11.2)
# --------------------------------------------------------------------------------------------


def gate_scores(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Unbiased routing scores ``sqrt(softplus(fp32(x) @ fp32(W)ᵀ))`` [T, E] fp32."""
    return F.softplus(x.float() @ weight.float().T).sqrt()


def select_topk(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices of the ``topk`` largest entries per row, descending; ties go to the lower index.

    A stable descending sort keeps equal scores in index order, which makes the choice
    deterministic on every device (``torch.topk`` leaves the order of ties unspecified).
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :topk]


@register_kernel("reference", "moe_gate")
def moe_gate(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tid2eid: torch.Tensor | None,
    token_ids: torch.Tensor | None,
    topk: int,
    route_scale: float,
    hf_eps: bool,
    hf_routing: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if hf_routing:
        return _hf_gate(x, weight, bias, tid2eid, token_ids, topk, route_scale)
    logits = x.float() @ weight.float().T
    s = F.softplus(logits).sqrt()
    if tid2eid is not None:
        assert token_ids is not None
        ids = tid2eid[token_ids.long()].long()
    else:
        # the bias (e_score_correction_bias) shifts the selection only, never the weights
        ids = select_topk(s if bias is None else s + bias.float(), topk)
    w = s.gather(1, ids)
    denom = w.sum(dim=-1, keepdim=True)
    if hf_eps:
        denom = denom + 1e-20  # [HF] variant, SPEC §15 #6
    w = w / denom
    w = w * route_scale
    return w, ids.to(torch.int32), logits


def _hf_gate(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tid2eid: torch.Tensor | None,
    token_ids: torch.Tensor | None,
    topk: int,
    route_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[HF] router of transformers 5.23.0 (``DeepseekV4TopKRouter`` / ``DeepseekV4HashRouter``):
    every step is rounded to the activation dtype ``dt`` — logits, softplus, sqrt, the sum of the
    selected scores (+1e-20), the division and the ``route_scale`` product; only the selection
    ``scores + bias`` is fp32 (the bias is an fp32 buffer)."""
    dt = x.dtype
    logits = (x.float() @ weight.float().T).to(dt)
    s = F.softplus(logits.float()).to(dt).float().sqrt().to(dt)
    if tid2eid is not None:
        assert token_ids is not None
        ids = tid2eid[token_ids.long()].long()
    else:
        ids = select_topk(s.float() if bias is None else s.float() + bias.float(), topk)
    w = s.gather(1, ids)
    denom = (w.float().sum(dim=-1, keepdim=True).to(dt).float() + 1e-20).to(dt)
    w = (w.float() / denom.float()).to(dt)
    w = (w.float() * route_scale).to(dt)
    return w.float(), ids.to(torch.int32), logits


# --------------------------------------------------------------------------------------------
# Routed experts (SPEC §11.3, §11.4)
# --------------------------------------------------------------------------------------------


@register_kernel("reference", "moe_experts")
def moe_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: torch.Tensor,
    w1_s: torch.Tensor | None,
    w3: torch.Tensor,
    w3_s: torch.Tensor | None,
    w2: torch.Tensor,
    w2_s: torch.Tensor | None,
    swiglu_limit: float,
    weight_after_w2: bool,
    out_dtype: torch.dtype,
    hf_rounding: bool,
) -> torch.Tensor:
    if hf_rounding:
        return _hf_experts(x, topk_weights, topk_ids, w1, w1_s, w3, w3_s, w2, w2_s, swiglu_limit, out_dtype)
    t, d = x.shape
    k = topk_ids.shape[1]
    n_experts = w1.shape[0]
    out = torch.zeros(t, d, dtype=torch.float32, device=x.device)
    flat = topk_ids.reshape(-1).long()
    # Permute the T·k (token, slot) pairs by expert; −1 (expert-parallel masked) sorts first
    # and is dropped, so each expert owns one contiguous segment of rows.
    order = torch.argsort(flat, stable=True)
    order = order[int((flat < 0).sum()) :]
    if order.numel() == 0:
        return out.to(out_dtype)
    tok = order // k
    wts = topk_weights.reshape(-1)[order].float().unsqueeze(1)
    xs = x[tok]
    counts = torch.bincount(flat[order], minlength=n_experts).tolist()
    ys = torch.empty(order.numel(), d, dtype=torch.float32, device=x.device)
    start = 0
    for e, n_e in enumerate(counts):
        if n_e == 0:
            continue
        seg = slice(start, start + n_e)
        start += n_e
        xe = xs[seg]
        g = expert_linear(xe, w1[e], None if w1_s is None else w1_s[e])
        u = expert_linear(xe, w3[e], None if w3_s is None else w3_s[e])
        h = swiglu_clamp(g, u, swiglu_limit)
        if not weight_after_w2:
            # [OFF]: the routing weight scales h before w2, so it passes through w2's FP8
            # activation quantiser (SPEC §15 #6)
            h = h * wts[seg]
        y = expert_linear(h.to(x.dtype), w2[e], None if w2_s is None else w2_s[e]).float()
        if weight_after_w2:
            y = y * wts[seg]
        ys[seg] = y
    # un-permute and reduce the k rows of each token in fp32 (SPEC §11.4)
    out.index_add_(0, tok, ys)
    return out.to(out_dtype)


def _hf_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: torch.Tensor,
    w1_s: torch.Tensor | None,
    w3: torch.Tensor,
    w3_s: torch.Tensor | None,
    w2: torch.Tensor,
    w2_s: torch.Tensor | None,
    swiglu_limit: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """[HF] experts of transformers 5.23.0 (``DeepseekV4Experts`` eager): per expert in ascending
    id, ``silu(min(g, L))`` and its product with the clamped ``u`` each rounded to ``dt = x.dtype``,
    ``y = linear(h, w2)`` times the routing weight rounded to ``dt``, and the running sum over
    experts kept in ``out_dtype`` (``dt`` in HF: a bf16 model sums its experts in bf16)."""
    dt = x.dtype
    t, d = x.shape
    out = torch.zeros(t, d, dtype=out_dtype, device=x.device)
    wts = topk_weights.to(dt)
    for e in torch.unique(topk_ids[topk_ids >= 0]).tolist():
        tok, slot = torch.where(topk_ids == e)
        xe = x[tok]
        g = expert_linear(xe, w1[e], None if w1_s is None else w1_s[e])
        u = expert_linear(xe, w3[e], None if w3_s is None else w3_s[e])
        if swiglu_limit > 0:
            g, u = g.clamp(max=swiglu_limit), u.clamp(-swiglu_limit, swiglu_limit)
        h = (F.silu(g.float()).to(dt).float() * u.float()).to(dt)
        y = expert_linear(h, w2[e], None if w2_s is None else w2_s[e])
        y = (y.float() * wts[tok, slot, None].float()).to(dt)
        out.index_add_(0, tok, y.to(out_dtype))
    return out


# --------------------------------------------------------------------------------------------
# Building quantised expert weights (checkpoint formats, SPEC §4.9)
# --------------------------------------------------------------------------------------------


def quantize_fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, R, C] float -> (e4m3 [E, R, C], fp32 [E, ceil(R/128), ceil(C/128)]) with one
    power-of-two scale per 128×128 tile (partial edge tiles use their own amax)."""
    e, r, c = w.shape
    rb, cb = -(-r // 128), -(-c // 128)
    wp = torch.zeros(e, rb * 128, cb * 128, dtype=torch.float32, device=w.device)
    wp[:, :r, :c] = w.float()
    tiles = wp.reshape(e, rb, 128, cb, 128)
    amax = tiles.abs().amax(dim=(2, 4)).clamp_min(Q.FP8_AMAX_MIN)
    s = Q.pow2_scale(amax, Q.FP8_MAX)
    q = Q.fp8_encode(tiles / s[:, :, None, :, None]).reshape(e, rb * 128, cb * 128)[:, :r, :c]
    return q.contiguous(), s


def quantize_fp4_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, R, C] float -> (uint8 [E, R, C/2] packed e2m1, fp32 [E, R, C/32]): 1×32 blocks."""
    return Q.fp4_act_quant(w, 32)
