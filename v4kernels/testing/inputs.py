"""Seeded input factories (CPU generator, then moved to the target device)."""
from __future__ import annotations

import torch

from .._registry import Tolerance
from ..layers.config import V4Config



def _dims(c: V4Config) -> dict[str, float]:
    return dict(dim=c.dim, n_heads=c.n_heads, head_dim=c.head_dim, rope_dim=c.rope_head_dim, q_lora=c.q_lora_rank,
                o_groups=c.o_groups, o_lora=c.o_lora_rank, index_heads=c.index_n_heads, index_dim=c.index_head_dim,
                index_topk=c.index_topk, window=c.window_size, hc=c.hc_mult, experts=c.n_routed_experts,
                topk_experts=c.n_activated_experts, moe_inter=c.moe_inter_dim, route_scale=c.route_scale)


#: V4 dimensions used by parity cases (SPEC §1.1), taken from the one definition in layers/config.py
FLASH = _dims(V4Config.flash())
PRO = _dims(V4Config.pro())


def randn(gen: torch.Generator, shape, device: torch.device, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype).to(device)


def rand(gen: torch.Generator, shape, device: torch.device, lo: float = 0.0, hi: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.rand(*shape, generator=gen, dtype=torch.float32) * (hi - lo) + lo).to(dtype).to(device)


def randint(gen: torch.Generator, lo: int, hi: int, shape, device: torch.device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.randint(lo, hi, tuple(shape), generator=gen, dtype=torch.int64).to(dtype).to(device)


def bf16_ulp_tol(ulps: float = 1.0) -> Tolerance:
    """Relative tolerance of ``ulps`` bf16 ulps (2^-7 relative per ulp, plus a tiny atol)."""
    return Tolerance(1e-6, ulps * 2.0**-7, 0.9999)
