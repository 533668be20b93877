"""Cambricon adapter of ``compress_kv`` (SPEC §6) for fresh prefills, over
``torch_mlu_ops.fused_compress_multi_kv`` (softmax-gated window pooling).

The op pools, nothing more: the projections ``x @ wkv/wgateᵀ`` (fp32), the RMSNorm, the RoPE at
``j·ratio`` and the FP8 / Hadamard+FP4 quantisation simulation run through v4kernels' own ops
(dispatched, so on an MLU they reach the other cambricon adapters or Triton). The decode form
(``fused_compress_single_kv``) fuses norm, RoPE and Hadamard and writes a bf16 paged cache with no
FP8/FP4 simulation, so it cannot produce V4 entries; continuing sequences are refused here and
run on Triton/the reference.

Layout bridge: tokens are packed ``[B·S, coff·hd]`` with ``cu_seqlens = [0, S, 2S, …]`` and
``batch_ids = arange(B)``; ``ape`` is passed as is (the op adds it to the scores); the op's state
``[B, coff·ratio, coff·hd]`` (slots ``0..r−1``: the last complete window, ``r..``: the open tail;
no overlap: tail from slot 0) is converted to ours: ``pending_* [B, ratio, coff·hd]`` = the open
tail (0 / −inf elsewhere), ``prev_* [B, ratio, hd]`` = the Ca/Za half of the last complete window
(CSA only). Compressed rows come back at ``cu_seqlens[b] + w``.
"""
from __future__ import annotations

import torch

from ..._registry import register_kernel
from ...backends.cambricon import BACKEND


def _refusals(x, wkv, wgate, ape, norm_weight, freqs, pending_kv, pending_score, prev_kv, prev_score, n_tokens,
              ratio, quant, eps, hf_rounding) -> list[str]:
    reasons = []
    if hf_rounding:
        reasons.append("cambricon compress_kv: no fused path for transformers' bf16 pooling (hf_rounding)")
    if x.dtype not in (torch.float32, torch.bfloat16):
        reasons.append(f"cambricon compress_kv: fused_compress_multi_kv takes float/bf16, got {x.dtype}")
    # reads n_tokens (one host sync per call on an accelerator)
    if n_tokens.numel() and bool((n_tokens != 0).any()):
        reasons.append("cambricon compress_kv: fused_compress_multi_kv pools fresh prefills only (every sequence at "
                       "position 0); continuing sequences run on Triton/the reference")
    return reasons


@register_kernel("cambricon", "compress_kv", refusals=_refusals, refusals_read_values=True)
def compress_kv(x, wkv, wgate, ape, norm_weight, freqs, pending_kv, pending_score, prev_kv, prev_score, n_tokens,
                ratio: int, quant: str, eps: float, hf_rounding: bool):
    import v4kernels as v4k

    tmo = BACKEND.tmo()
    bsz, s, dm = x.shape
    hd = norm_weight.shape[0]
    overlap = wkv.shape[0] == 2 * norm_weight.shape[0]  # the CSA form doubles the projection width
    coff = 2 if overlap else 1
    dev = x.device
    xf = x.reshape(bsz * s, dm).float()
    kv = xf @ wkv.float().T
    score = xf @ wgate.float().T
    kv_state = torch.zeros((bsz, coff * ratio, coff * hd), dtype=torch.float32, device=dev)
    score_state = torch.full_like(kv_state, float("-inf"))
    compressed = torch.zeros((bsz * s, hd), dtype=torch.float32, device=dev)
    tmo.fused_compress_multi_kv(
        kv=kv, score=score, kv_state=kv_state, score_state=score_state,
        cu_seqlens=torch.arange(0, (bsz + 1) * s, s, dtype=torch.int32, device=dev)[: bsz + 1],
        batch_ids=torch.arange(bsz, dtype=torch.int32, device=dev), ape=ape.float(), max_seqlen=s,
        overlap=overlap, compressed_kv=compressed,
    )
    nw = s // ratio
    entries = torch.zeros((bsz, (s + ratio - 1) // ratio, hd), dtype=x.dtype, device=dev)
    if nw:
        e = v4k.rms_norm(compressed.view(bsz, s, hd)[:, :nw].to(x.dtype), norm_weight, eps)
        pos = (torch.arange(nw, device=dev) * ratio).expand(bsz, nw)
        e = v4k.apply_rope(e, pos, freqs)
        r = 2 * freqs.shape[0]
        if quant == "fp8":
            e = torch.cat((v4k.act_quant_roundtrip(e[..., : hd - r].contiguous(), 64), e[..., hd - r:]), dim=-1)
        elif quant == "fp4":
            e = v4k.fp4_act_roundtrip(v4k.hadamard_transform(e), 32)
        entries[:, :nw] = e
    rem = s - nw * ratio
    base = ratio if overlap else 0
    new_pkv = torch.zeros_like(pending_kv)
    new_psc = torch.full_like(pending_score, float("-inf"))
    new_pkv[:, :rem] = kv_state[:, base:base + rem]
    new_psc[:, :rem] = score_state[:, base:base + rem]
    if overlap and nw:
        new_vkv, new_vsc = kv_state[:, :ratio, :hd].clone(), score_state[:, :ratio, :hd].clone()
    else:
        new_vkv, new_vsc = prev_kv.clone(), prev_score.clone()
    num_new = torch.full((bsz,), nw, dtype=torch.int32, device=dev)
    return entries, num_new, new_pkv, new_psc, new_vkv, new_vsc, n_tokens + s
