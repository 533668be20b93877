"""Ascend adapters for the MoE router and the routed experts.

``moe_gate`` → ``_C_ascend.moe_gating_top_k_hash(logits, k, bias, input_ids, tid2eid,
norm_type=2, routed_scaling_factor, eps)`` (A2/A3). The vendor op gates *logits*; the adapter
computes ``logits = fp32(x) @ fp32(W)ᵀ`` first (one matmul on the NPU). Bridging:
- scores: norm_type 2 is ``sqrt(ln(1+exp(x)))`` with no overflow threshold (inf for logits
  above ~88); calls whose largest logit exceeds ``SOFTPLUS_SAFE`` run the reference instead
  (data-dependent, checked on the logits);
- normalisation ``w / (Σw + eps)``: eps is passed as 0 ([OFF]) or 1e-20 (``hf_eps``);
- hash routing: ``token_ids`` go as int64 ``input_ids`` and ``tid2eid`` as int32;
- weights come back in the logits' dtype (fp32) and ids as int32, like ours.
Limits (the op's tiling): group_count = 1, renorm = 0 (both fixed here).

``moe_experts`` → ``torch_npu.npu_moe_init_routing_v2`` → ``npu_grouped_matmul`` (w1, w3) →
clamped SwiGLU (V4's ``silu(min(g, L))·clamp(u, ±L)`` in torch: ``npu_swiglu`` has no clamp
and ``npu_clipped_swiglu`` is the gpt-oss form) → ``npu_grouped_matmul`` (w2) →
``npu_moe_finalize_routing``. Bridging:
- ids −1 (expert-parallel masked slots) are routed to expert 0 with weight 0: they add +0;
- init-routing returns, per (token, slot) row ``t·k + j``, its position in the expert-sorted
  rows; finalize indexes its map as ``j·T + t`` (slot-major), so the map is transposed;
- weights ``[E, out, in]`` are passed as ``[E, in, out]`` views (``x @ w`` per group);
- the routing weight multiplies h before w2 ([OFF]) or the rows before finalize
  (``weight_after_w2``); finalize reduces the k rows in fp32.
Limits: float (bf16/fp16) expert weights in x's dtype. FP8 128-block and FP4 expert weights are
refused: A2/A3 have no FP8/FP4 grouped GEMM (deployments re-quantise to W8A8), and 950's MXFP4
path takes e8m0 block-32 scales with FP8 activations, a different numeric contract.
"""
from __future__ import annotations

import torch

from ..._registry import register_kernel
from ...backends.ascend import BACKEND, VendorOp

GATE = VendorOp("_C_ascend.moe_gating_top_k_hash", socs=("A2", "A3"), note="norm_type=2 sqrt-softplus, hash or top-k")
INIT = VendorOp("torch_npu.npu_moe_init_routing_v2", note="dropless expert sort")
GMM = VendorOp("torch_npu.npu_grouped_matmul", note="split-M grouped GEMM, bf16/fp16")
FIN = VendorOp("torch_npu.npu_moe_finalize_routing", note="un-permute + weighted k-sum")
#: largest logit the vendor's unguarded softplus handles in fp32 (exp(88.7) overflows)
SOFTPLUS_SAFE = 80.0
BACKEND.declare("moe_gate", GATE, group_count=1, renorm=0, softplus_safe=SOFTPLUS_SAFE)
BACKEND.declare("moe_experts", INIT, GMM, FIN, weights=("bfloat16", "float16"))


def _gate_refusals(x, weight, bias, tid2eid, token_ids, topk, route_scale, hf_eps, hf_routing):
    r = []
    if hf_routing:
        r.append("hf_routing (routing in the activation dtype, transformers' variant) has no Ascend fused equivalent")
    if topk > weight.shape[0]:
        r.append(f"topk={topk} exceeds the expert count {weight.shape[0]}")
    return r


@register_kernel("ascend", "moe_gate", refusals=_gate_refusals)
def moe_gate(x, weight, bias, tid2eid, token_ids, topk, route_scale, hf_eps, hf_routing):
    logits = x.float() @ weight.float().t()
    if logits.numel() and float(logits.max()) > SOFTPLUS_SAFE:
        from . import reference

        return reference.moe_gate(x, weight, bias, tid2eid, token_ids, topk, route_scale, hf_eps, hf_routing)
    w, ids, _ = BACKEND.vendor(GATE)(
        logits, topk, bias=None if bias is None else bias.float(),
        input_ids=None if token_ids is None else token_ids.long(),
        tid2eid=None if tid2eid is None else tid2eid.to(torch.int32),
        k_group=1, group_count=1, routed_scaling_factor=float(route_scale), eps=1e-20 if hf_eps else 0.0,
        group_select_mode=0, renorm=0, norm_type=2, out_flag=False)
    return w.float(), ids.to(torch.int32), logits


def _experts_refusals(x, topk_weights, topk_ids, w1, w1_s, w3, w3_s, w2, w2_s, swiglu_limit, weight_after_w2, out_dtype,
                      hf_rounding):
    r = []
    if hf_rounding:
        r.append("hf_rounding (transformers' per-step roundings) has no Ascend fused equivalent")
    if w1_s is not None or w3_s is not None or w2_s is not None or not w1.dtype.is_floating_point:
        r.append("quantised expert weights (FP8 128-block / FP4) have no matching Ascend grouped GEMM "
                 "(A2/A3: W8A8 only; 950: MXFP4 with e8m0 block-32 scales)")
    elif not (x.dtype in (torch.bfloat16, torch.float16) and w1.dtype == w3.dtype == w2.dtype == x.dtype):
        r.append(f"npu_grouped_matmul takes bf16/fp16 x and weights of the same dtype, got x {x.dtype}, w {w1.dtype}")
    return r


@register_kernel("ascend", "moe_experts", refusals=_experts_refusals)
def moe_experts(x, topk_weights, topk_ids, w1, w1_s, w3, w3_s, w2, w2_s, swiglu_limit, weight_after_w2, out_dtype,
                hf_rounding):
    t, k = topk_ids.shape
    n_exp = w1.shape[0]
    masked = topk_ids < 0
    ids = torch.where(masked, 0, topk_ids).to(torch.int32)
    wts = torch.where(masked, 0.0, topk_weights.float())
    xs, row_pos, counts, _ = BACKEND.vendor(INIT)(
        x, ids, active_num=t * k, expert_num=n_exp, drop_pad_mode=0, expert_tokens_num_type=1,
        expert_tokens_num_flag=True, quant_mode=-1, row_idx_type=0)
    gmm = BACKEND.vendor(GMM)
    g = gmm([xs], [w1.transpose(1, 2)], group_list=counts, split_item=2, group_type=0, group_list_type=1)[0]
    u = gmm([xs], [w3.transpose(1, 2)], group_list=counts, split_item=2, group_type=0, group_list_type=1)[0]
    g, u = g.float(), u.float()
    if swiglu_limit > 0:
        g = g.clamp(max=swiglu_limit)
        u = u.clamp(-swiglu_limit, swiglu_limit)
    h = torch.nn.functional.silu(g) * u
    # the weight of expanded row i: its (token, slot) is the source row whose position is i
    src_of_pos = torch.empty_like(row_pos)
    src_of_pos[row_pos.long()] = torch.arange(t * k, dtype=row_pos.dtype, device=row_pos.device)
    row_w = wts.reshape(-1)[src_of_pos.long()].unsqueeze(1)
    if not weight_after_w2:
        h = h * row_w
    y = gmm([h.to(x.dtype)], [w2.transpose(1, 2)], group_list=counts, split_item=2, group_type=0, group_list_type=1)[0]
    y = y.float()
    if weight_after_w2:
        y = y * row_w
    slot_major = row_pos.view(t, k).t().reshape(-1)
    out = BACKEND.vendor(FIN)(y, None, None, None, None, slot_major, None, drop_pad_mode=0, k=k)
    return out.to(out_dtype)
