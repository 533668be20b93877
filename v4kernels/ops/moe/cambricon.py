"""Cambricon adapters of the MoE ops (SPEC §11) over torch_mlu_ops' router and fused-MoE pieces.

``moe_gate`` -> ``moe_softplus_topk(logits, topk, input_ids, tid2eid, bias, route_scale)``: the
V4 router (``sqrt(softplus)`` scores, bias for selection only, hash layers through ``tid2eid``,
normalised weights times ``route_scale``, fp32 weights). The logits GEMM ``fp32(x) @ fp32(W)ᵀ``
runs before it (as on MLU deployments). The [HF] ``hf_eps`` variant (``+1e-20`` in the
denominator) is refused.

``moe_experts`` -> ``moe_gen_idx`` (group the T·k (token, slot) rows by expert) ->
``moe_expand_input`` (gather) -> two ``group_gemm`` (w1 and w3, so the checkpoint's separate
gate/up weights are used as stored, never concatenated per call) -> ``moe_active`` (gated SiLU with
``swiglu_limit``, on ``[g | u]``) -> ``group_gemm`` (w2) -> ``moe_combine_result``.
Bridges:

* −1 expert ids (expert-parallel masking, SPEC §11.4) have no TMO encoding: they are mapped to
  a virtual expert ``E`` that sorts last; the GEMMs get ``token_count[:E]`` and the combine
  ``expert_size = E``, so those rows are never computed nor added;
* the routing weight is applied before w2 ([OFF], ``weight_after_w2=False``) by scaling the
  activation rows in expert order, and the combine then runs with unit weights; with
  ``weight_after_w2`` the combine applies them;
* the activation runs on fp32 rows (``g``, ``u`` already rounded to the activation dtype by the
  GEMMs, as in the reference) so that ``h``, times the routing weight, is rounded once: a second
  rounding is amplified by the cancellation in w2 (outputs off by ~25% of their size at
  ``act_scale = 4``); the combine runs on fp32 rows so that an fp32 ``out_dtype`` gets one
  rounding too;
* FP8 (128x128 blocks) and FP4 expert weights are refused: ``group_gemm`` takes float weights
  (and ``smooth_quant_group_gemm`` per-channel int8), so V4 checkpoints need re-quantisation at
  load time, which is outside this op's contract;
* ``moe_active`` takes an integer ``swiglu_limit``; V4's 10.0 is integral, other limits are refused.
"""
from __future__ import annotations

import torch

from ..._registry import register_kernel
from ...backends.cambricon import BACKEND, LIMITS
from .reference import weight_format

_EXP = LIMITS["moe_experts"]


def _gate_refusals(x, weight, bias, tid2eid, token_ids, topk, route_scale, hf_eps, hf_routing) -> list[str]:
    if hf_eps:
        return ["cambricon moe_gate: moe_softplus_topk has no +1e-20 denominator term (the hf_eps variant)"]
    if hf_routing:
        return ["cambricon moe_gate: moe_softplus_topk routes in fp32, not in the activation dtype (the hf_routing variant)"]
    return []


@register_kernel("cambricon", "moe_gate", refusals=_gate_refusals)
def moe_gate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tid2eid: torch.Tensor | None,
             token_ids: torch.Tensor | None, topk: int, route_scale: float, hf_eps: bool, hf_routing: bool):
    logits = x.float() @ weight.float().T
    w, ids = BACKEND.tmo().moe_softplus_topk(
        logits, topk, None if token_ids is None else token_ids.to(torch.int32),
        None if tid2eid is None else tid2eid.to(torch.int32),
        None if bias is None else bias.float(), float(route_scale))
    return w.float(), ids.to(torch.int32), logits


def _experts_refusals(x, topk_weights, topk_ids, w1, w1_s, w3, w3_s, w2, w2_s, swiglu_limit, weight_after_w2,
                      out_dtype, hf_rounding) -> list[str]:
    reasons = []
    if hf_rounding:
        reasons.append("cambricon moe_experts: no fused path for transformers' per-step roundings (hf_rounding)")
    fmts = {weight_format(w) for w in (w1, w3, w2)}
    if fmts != {"float"}:
        reasons.append(f"cambricon moe_experts: expert weights must be float ({_EXP['weights']}); got "
                       f"{sorted(fmts)}: {_EXP['note']}")
    elif not all(w.dtype == x.dtype for w in (w1, w3, w2)):
        reasons.append(f"cambricon moe_experts: group_gemm needs weights in the activation dtype {x.dtype}, got "
                       f"{w1.dtype}/{w3.dtype}/{w2.dtype}")
    if swiglu_limit > 0 and float(swiglu_limit) != int(swiglu_limit):
        reasons.append(f"cambricon moe_experts: swiglu_limit must be {_EXP['swiglu_limit']}, got {swiglu_limit}")
    return reasons


@register_kernel("cambricon", "moe_experts", refusals=_experts_refusals)
def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w1: torch.Tensor,
                w1_s: torch.Tensor | None, w3: torch.Tensor, w3_s: torch.Tensor | None, w2: torch.Tensor,
                w2_s: torch.Tensor | None, swiglu_limit: float, weight_after_w2: bool, out_dtype: torch.dtype,
                hf_rounding: bool):
    tmo = BACKEND.tmo()
    t, d = x.shape
    k = topk_ids.shape[1]
    n_exp = w1.shape[0]
    if t == 0 or k == 0:
        return torch.zeros((t, d), dtype=out_dtype, device=x.device)
    ids = torch.where(topk_ids < 0, n_exp, topk_ids).to(torch.int32)  # −1 -> virtual expert E (sorts last)
    expand_idx, combine_idx, count, cusum = tmo.moe_gen_idx(ids, n_exp + 1)
    m_list = count[:n_exp]
    xs = tmo.moe_expand_input(x, expand_idx, cusum, 0, n_exp)
    g = tmo.group_gemm(xs, w1, m_list, None, None, None, None, t)
    u = tmo.group_gemm(xs, w3, m_list, None, None, None, None, t)
    # fp32 activation so that h (times the routing weight) is rounded once, as in the reference
    h = tmo.moe_active(torch.cat((g, u), dim=-1).float(), "silu", True, None, None, cusum, 0, n_exp,
                       swiglu_limit=int(swiglu_limit) if swiglu_limit > 0 else 0)
    wts = topk_weights.float()
    if not weight_after_w2:
        # routing weight of each grouped row: row combine_idx[i] holds flattened pair i
        w_rows = torch.empty(t * k, dtype=torch.float32, device=x.device)
        w_rows[combine_idx.long()] = wts.reshape(-1)
        h = h * w_rows.unsqueeze(1)
        wts = torch.ones_like(wts)
    h = h.to(x.dtype)
    y = tmo.group_gemm(h, w2, m_list, None, None, None, None, t)
    out = tmo.moe_combine_result(y.float(), wts, combine_idx, None, cusum, 0, n_exp)
    return out.to(out_dtype)
