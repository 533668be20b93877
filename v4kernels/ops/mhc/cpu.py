"""Native CPU kernels of the mHC ops (csrc/cpu/mhc.cpp, SPEC §10).

``hc_pre`` (and ``hc_head``, SPEC §10.5, with sigmoid gates instead of the Sinkhorn split) is one fused pass: the RMS-scaled mix GEMV over the flattened streams (sum of squares
in the same pass), the Sinkhorn split and the stream collapse; ``hc_post`` expands and mixes the
streams with the transposed comb in fp32 and rounds once (or the [HF] bf16 mixing variant).
"""
from __future__ import annotations

import torch

import v4kernels._C_cpu  # noqa: F401  (registers torch.ops.v4k_cpu.*)

from ..._registry import register_kernel


@register_kernel("cpu", "hc_split_sinkhorn")
def hc_split_sinkhorn(mixes: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, hc_mult: int,
                      sinkhorn_iters: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.v4k_cpu.hc_split_sinkhorn(mixes, hc_scale, hc_base, int(hc_mult), int(sinkhorn_iters), float(eps))


@register_kernel("cpu", "hc_pre")
def hc_pre(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, sinkhorn_iters: int,
           norm_eps: float, hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.v4k_cpu.hc_pre(x, hc_fn, hc_scale, hc_base, int(sinkhorn_iters), float(norm_eps), float(hc_eps))


def _hc_post_refusals(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, bf16_mix: bool) -> list[str]:
    return [] if residual.shape[-2] <= 64 else [f"cpu hc_post supports at most 64 streams, got {residual.shape[-2]}"]


@register_kernel("cpu", "hc_post", refusals=_hc_post_refusals)
def hc_post(x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, bf16_mix: bool) -> torch.Tensor:
    return torch.ops.v4k_cpu.hc_post(x, residual, post, comb, bool(bf16_mix))


@register_kernel("cpu", "hc_head")
def hc_head(x: torch.Tensor, hc_fn: torch.Tensor, hc_scale: torch.Tensor, hc_base: torch.Tensor, norm_eps: float,
            hc_eps: float) -> torch.Tensor:
    return torch.ops.v4k_cpu.hc_head(x, hc_fn, hc_scale, hc_base, float(norm_eps), float(hc_eps))
