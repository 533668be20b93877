"""Linear layer in the release's weight formats (SPEC §4.8): bf16, FP8 (128x128 block scales) or
FP4 (1x32 block scales). FP8/FP4 weights quantise the activation with ``act_quant(block 128)``
and run the block-scaled GEMM; bf16 weights compute in fp32 and round once (bf16 matmuls on CPUs
without AMX are two orders of magnitude slower than fp32)."""
from __future__ import annotations

import torch
from torch import nn

import v4kernels as v4k

FORMATS = ("bf16", "fp8", "fp4")


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x · Wᵀ`` for x [..., K] and W [N, K] (float), e4m3 [N, K] + scale, or FP4 [N, K/2] + scale."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if weight.dtype == torch.float8_e4m3fn:
        a, a_s = v4k.act_quant(x2, 128)
        y = v4k.fp8_gemm(a, a_s, weight, scale, x.dtype)
    elif weight.dtype == torch.uint8:
        a, a_s = v4k.act_quant(x2, 128)
        y = v4k.fp4_gemm(a, a_s, weight, scale, x.dtype)
    else:
        y = (x2.float() @ weight.float().T).to(x.dtype)
    return y.reshape(*lead, y.shape[-1])


def weight_shapes(in_features: int, out_features: int, fmt: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Storage shapes and dtypes of a ``fmt`` weight: ``{"weight": ..., "scale": ...}`` (no scale for bf16)."""
    if fmt == "bf16":
        return {"weight": ((out_features, in_features), torch.bfloat16)}
    if fmt == "fp8":
        return {"weight": ((out_features, in_features), torch.float8_e4m3fn),
                "scale": ((-(-out_features // 128), -(-in_features // 128)), torch.float32)}
    return {"weight": ((out_features, in_features // 2), torch.uint8), "scale": ((out_features, in_features // 32), torch.float32)}


class Linear(nn.Module):
    """A bias-free linear layer with weights stored as ``fmt`` ("bf16", "fp8" or "fp4").

    Random weights from ``generator`` by default; ``init=False`` allocates uninitialised storage
    of the right shapes and dtypes on ``device`` (to be filled from a checkpoint; ``device="meta"``
    allocates nothing)."""

    def __init__(self, in_features: int, out_features: int, fmt: str = "bf16", generator: torch.Generator | None = None,
                 init_scale: float = 1.0, *, init: bool = True, device: torch.device | str | None = None) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"Linear: fmt must be 'bf16', 'fp8' or 'fp4', got {fmt!r}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        if not init:
            for name, (shape, dt) in weight_shapes(in_features, out_features, fmt).items():
                self.register_buffer(name, torch.empty(shape, dtype=dt, device=device))
            if fmt == "bf16":
                self.scale = None
            return
        w = torch.randn(out_features, in_features, generator=generator) * (init_scale / in_features**0.5)
        if fmt == "bf16":
            self.register_buffer("weight", w.to(torch.bfloat16).to(device))
            self.scale = None
        else:
            q, s = v4k.quantize_expert_weights(w.unsqueeze(0), fmt)
            self.register_buffer("weight", q[0].contiguous().to(device))
            self.register_buffer("scale", s[0].contiguous().to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.scale)
