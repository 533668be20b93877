"""Ascend adapters for RMSNorm and interleaved RoPE.

``rms_norm`` → ``torch_npu.npu_rms_norm(x, gamma, epsilon) -> (y, rstd)`` (A2/A3/950).
  Bridging: ``weight=None`` passes a ones gamma; the vendor multiplies by gamma in fp32 and
  rounds once, which is the [OFF] order — the [HF] order (``hf_rounding=True``, normalised value
  rounded before the weight multiply) is refused. Limits: gamma must have x's dtype.

``apply_rope`` → ``torch_npu.npu_interleave_rope(x[B,N,S,64], cos[B,1,S,64], sin)`` (A2/A3/950).
  Bridging: our x ``[B,S,...,L]`` rotates its trailing 64 dims as interleaved pairs; the vendor
  op takes BNSD, de-interleaves the pairs (evens then odds) and returns the rotated vector in
  that *half* layout, with rotate-half cos/sin tables ``[cos θ_0..θ_31, cos θ_0..θ_31]``. The
  adapter moves the middle dims into N, builds the tables from ``positions · freqs`` (in x's
  dtype, as the vendor requires), negates sin for ``inverse``, re-interleaves the output and
  writes it back behind the untouched nope dims. Limits: rope dims = 64, x bf16/fp16.
"""
from __future__ import annotations

import torch

from ..._registry import register_kernel
from ...backends.ascend import BACKEND, VendorOp

RMS = VendorOp("torch_npu.npu_rms_norm", note="RMSNorm with gamma, fp32 math, one rounding")
ROPE = VendorOp("torch_npu.npu_interleave_rope", note="D=64 only; half-layout output")
BACKEND.declare("rms_norm", RMS, dtypes=("bfloat16", "float16", "float32"), gamma="x.dtype", hf_rounding=False)
BACKEND.declare("apply_rope", ROPE, rope_dims=64, dtypes=("bfloat16", "float16"))


def _rms_refusals(x, weight, eps, hf_rounding):
    r = []
    if hf_rounding:
        r.append("npu_rms_norm rounds once after the weight multiply; hf_rounding=True needs the [HF] order")
    if weight is not None and weight.dtype != x.dtype:
        r.append(f"npu_rms_norm needs gamma in x's dtype ({x.dtype}), got {weight.dtype}")
    return r


@register_kernel("ascend", "rms_norm", refusals=_rms_refusals)
def rms_norm(x, weight, eps, hf_rounding):
    gamma = weight if weight is not None else torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    y, _ = BACKEND.vendor(RMS)(x, gamma, epsilon=eps)
    return y


def _rope_refusals(x, positions, freqs, inverse, round_tables):
    r = []
    if 2 * freqs.shape[0] != 64:
        r.append(f"npu_interleave_rope rotates exactly 64 dims, got {2 * freqs.shape[0]}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        r.append(f"npu_interleave_rope takes bf16/fp16 x, got {x.dtype}")
    return r


@register_kernel("ascend", "apply_rope", refusals=_rope_refusals)
def apply_rope(x, positions, freqs, inverse, round_tables):
    b, s, L = x.shape[0], x.shape[1], x.shape[-1]
    rope = x[..., L - 64:].reshape(b, s, -1, 64).transpose(1, 2).contiguous()  # [B,N,S,64]
    ang = positions.to(torch.float32).unsqueeze(-1) * freqs.to(torch.float32)  # [B,S,32]
    cos = torch.cat((ang.cos(), ang.cos()), -1).to(x.dtype).unsqueeze(1).contiguous()  # [B,1,S,64]
    sin = torch.cat((ang.sin(), ang.sin()), -1)
    sin = (-sin if inverse else sin).to(x.dtype).unsqueeze(1).contiguous()
    half = BACKEND.vendor(ROPE)(rope, cos, sin)  # [B,N,S,64]: [rotated evens | rotated odds]
    inter = half.reshape(b, -1, s, 2, 32).transpose(-1, -2).reshape(b, -1, s, 64)
    y = x.clone()
    y[..., L - 64:] = inter.transpose(1, 2).reshape(*x.shape[:-1], 64)
    return y
