"""``cuda`` routed experts (SPEC §11.3-11.4) on DeepGEMM's ``m_grouped_fp8_fp4_gemm_nt_contiguous``.

The (token, slot) pairs are permuted into DeepGEMM's M-grouped contiguous layout (one segment per
expert, each padded to ``get_mk_alignment_for_contiguous_layout()`` rows, padding rows marked −1;
:func:`contiguous_layout`), activations are quantised 1×128 with power-of-two scales exactly as the
reference's ``expert_linear`` does, the w1/w3 GEMMs write bf16, SwiGLU with the V4 clamp and the
routing weight run in fp32, then the w2 GEMM, and the rows are reduced per token in fp32.
FP8 weights with 128×128 scales only (FP4 expert weights run on Triton).
"""
from __future__ import annotations

import torch

from ...backends.cuda import Route, register_routes, sm_of, vendor
from ..quant.cuda import pow2_scales
from .reference import swiglu_clamp


def contiguous_layout(topk_ids: torch.Tensor, n_experts: int, align: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_ids [T, k]`` (−1 = skip) -> (``src [Mp]`` int64: the flattened (token, slot) pair of
    each row, −1 on padding; ``layout [Mp]`` int32: its expert, −1 on padding). Experts appear in
    order, each segment padded to a multiple of ``align`` rows; pairs keep their order inside a
    segment."""
    flat = topk_ids.reshape(-1).long()
    valid = flat >= 0
    order = torch.argsort(torch.where(valid, flat, -1), stable=True)
    order = order[int((~valid).sum()):]  # the −1 pairs sort first and are dropped
    ids = flat[order]
    counts = torch.bincount(ids, minlength=n_experts)
    padded = (counts + align - 1) // align * align
    start = torch.cumsum(counts, 0) - counts
    start_p = torch.cumsum(padded, 0) - padded
    total = int(padded.sum())
    dest = start_p[ids] + torch.arange(ids.numel(), device=flat.device) - start[ids]
    src = torch.full((total,), -1, dtype=torch.int64, device=flat.device)
    layout = torch.full((total,), -1, dtype=torch.int32, device=flat.device)
    src[dest] = order
    layout[dest] = ids.to(torch.int32)
    return src, layout


def _refusals(x, topk_weights, topk_ids, w1, w1_s, w3, w3_s, w2, w2_s, *rest) -> list[str]:
    out = []
    if rest[-1]:  # hf_rounding
        out.append("hf_rounding (transformers' per-step roundings) is not bridged to DeepGEMM")
    if x.dtype != torch.bfloat16:
        out.append(f"DeepGEMM grouped GEMMs write bf16: x must be bf16, got {str(x.dtype).replace('torch.', '')}")
    if w1.dtype != torch.float8_e4m3fn or w3.dtype != torch.float8_e4m3fn or w2.dtype != torch.float8_e4m3fn:
        out.append("only FP8 e4m3 expert weights with 128x128 scales are bridged (FP4/float weights: Triton)")
    d, i = x.shape[1], w1.shape[1]
    if d % 128 or i % 128:
        out.append(f"DeepGEMM needs hidden and intermediate sizes % 128 == 0, got D={d}, I={i}")
    cc = sm_of(x)
    if not out and cc is not None and cc[0] == 10 and not all(pow2_scales(s) for s in (w1_s, w3_s, w2_s)):
        out.append("SM100 takes UE8M0 scales: fp32 weight scales that are not powers of two would be rounded")
    return out


def _grouped(dg, a, a_s, w, w_s, layout, n):
    y = torch.empty(a.shape[0], n, dtype=torch.bfloat16, device=a.device)
    fn = getattr(dg, "m_grouped_fp8_fp4_gemm_nt_contiguous", None) or dg.m_grouped_fp8_gemm_nt_contiguous
    fn((a, a_s), (w, w_s.float().contiguous()), y, layout, recipe=(1, 128, 128))
    return y


def _run(x, topk_weights, topk_ids, w1, w1_s, w3, w3_s, w2, w2_s, swiglu_limit, weight_after_w2, out_dtype,
         hf_rounding):
    from ..quant import act_quant

    dg = vendor("DeepGEMM").module
    t, d = x.shape
    k = topk_ids.shape[1]
    out = torch.zeros(t, d, dtype=torch.float32, device=x.device)
    align_fn = getattr(dg, "get_mk_alignment_for_contiguous_layout", None)
    src, layout = contiguous_layout(topk_ids, w1.shape[0], int(align_fn()) if align_fn else 128)
    if src.numel() == 0:
        return out.to(out_dtype)
    real = src >= 0
    tok = torch.where(real, src // k, 0)
    wts = torch.where(real, topk_weights.reshape(-1).float()[src.clamp_min(0)], 0.0).unsqueeze(1)
    xs = torch.where(real.unsqueeze(1), x[tok], 0).contiguous()
    a, a_s = act_quant(xs, 128, "ue8m0")  # 1x128, power-of-two scales (reference expert_linear)
    a_s = a_s.float()
    g = _grouped(dg, a, a_s, w1, w1_s, layout, w1.shape[1])
    u = _grouped(dg, a, a_s, w3, w3_s, layout, w3.shape[1])
    h = swiglu_clamp(g, u, swiglu_limit)
    if not weight_after_w2:
        h = h * wts  # [OFF]: the routing weight scales h before w2's activation quantiser
    a2, a2_s = act_quant(h.to(x.dtype).contiguous(), 128, "ue8m0")
    y = _grouped(dg, a2, a2_s.float(), w2, w2_s, layout, w2.shape[1]).float()
    if weight_after_w2:
        y = y * wts
    out.index_add_(0, tok[real], y[real])
    return out.to(out_dtype)


register_routes("moe_experts", [
    Route("DeepGEMM m_grouped_fp8_fp4_gemm_nt_contiguous", "DeepGEMM",
          "bf16 x, FP8 weights + 128x128 scales (powers of two on SM100), D and I % 128 == 0", _run, _refusals,
          ((9, -1), (10, -1)), "SM90/SM100"),
])
