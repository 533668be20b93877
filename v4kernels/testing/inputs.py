"""Seeded input factories (CPU generator, then moved to the target device)."""
from __future__ import annotations

import torch

from .._registry import Tolerance

#: V4 dimensions used by parity cases and benchmarks (SPEC §1.1)
FLASH = dict(dim=4096, n_heads=64, head_dim=512, rope_dim=64, q_lora=1024, o_groups=8, o_lora=1024,
             index_heads=64, index_dim=128, index_topk=512, window=128, hc=4, experts=256, topk_experts=6,
             moe_inter=2048, route_scale=1.5)
PRO = dict(dim=7168, n_heads=128, head_dim=512, rope_dim=64, q_lora=1536, o_groups=16, o_lora=1024,
           index_heads=64, index_dim=128, index_topk=1024, window=128, hc=4, experts=384, topk_experts=6,
           moe_inter=3072, route_scale=2.5)


def randn(gen: torch.Generator, shape, device: torch.device, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype).to(device)


def rand(gen: torch.Generator, shape, device: torch.device, lo: float = 0.0, hi: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.rand(*shape, generator=gen, dtype=torch.float32) * (hi - lo) + lo).to(dtype).to(device)


def randint(gen: torch.Generator, lo: int, hi: int, shape, device: torch.device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.randint(lo, hi, tuple(shape), generator=gen, dtype=torch.int64).to(dtype).to(device)


def bf16_ulp_tol(ulps: float = 1.0) -> Tolerance:
    """Relative tolerance of ``ulps`` bf16 ulps (2^-7 relative per ulp, plus a tiny atol)."""
    return Tolerance(1e-6, ulps * 2.0**-7, 0.9999)
