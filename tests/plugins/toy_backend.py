"""A complete out-of-tree backend in one file, added through the public API only.

It runs ``rms_norm`` (any float dtype) and ``hc_post`` (fp32 only) on CPU tensors ahead of every
in-tree backend and refuses everything else with a reason, so the tests can check priority,
refusal and fallback.
"""
from __future__ import annotations

import torch

import v4kernels as v4k


class ToyBackend(v4k.Backend):
    name = "toy"
    description = "one-file example backend (rms_norm, fp32 hc_post on CPU)"
    auto_priority = {"cpu": 1}
    tolerances = {torch.float32: v4k.Tolerance(1e-6, 1e-6, 0.999999),
                  torch.bfloat16: v4k.Tolerance(1e-2, 1.6e-2, 0.9999),
                  torch.float16: v4k.Tolerance(2e-3, 2e-3, 0.9999)}
    verification = "verified here (toy)"


def _fp32_only(x, *rest):
    return [] if x.dtype == torch.float32 else [f"toy runs fp32 only, got {x.dtype}"]


def _no_hf_rounding(x, weight, eps, hf_rounding):
    return ["toy has no [HF] rounding variant"] if hf_rounding else []


def rms_norm(x, weight, eps, hf_rounding):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float() if weight is not None else y).to(x.dtype)


def hc_post(x, residual, post, comb, bf16_mix):
    return post.unsqueeze(-1) * x.unsqueeze(-2) + torch.einsum("...jk,...jd->...kd", comb, residual)


def register() -> ToyBackend:
    """Register the backend and its kernels (what an entry point's module does on import)."""
    backend = v4k.register_backend(ToyBackend)
    v4k.register_kernels("toy", {"rms_norm": rms_norm, "hc_post": hc_post},
                         refusals={"rms_norm": _no_hf_rounding, "hc_post": _fp32_only})
    return backend
