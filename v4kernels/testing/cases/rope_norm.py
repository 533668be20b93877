"""Parity cases for RoPE and RMSNorm (SPEC §3, §5.1), with naive per-element implementations
(complex-number rotation, Python-float RMS) as the independent second reference."""
from __future__ import annotations

import cmath
import math

import numpy as np
import torch

import v4kernels as v4k

from ..inputs import bf16_ulp_tol, randn
from . import ParityCase, register


def naive_apply_rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Per element: ``z_i = x[L-r+2i] + j·x[L-r+2i+1]`` times ``e^{±j·φ}``, ``φ = fp32(p)·fp32(θ_i)``
    rounded to fp32 (SPEC §3.1, §3.4), rotation in float64, one rounding to ``x.dtype``."""
    b, s, length = x.shape[0], x.shape[1], x.shape[-1]
    if positions.dim() == 1:
        positions = positions.unsqueeze(0).expand(b, -1)
    th = [np.float32(t) for t in freqs.float().tolist()]
    r = 2 * len(th)
    out = x.double().reshape(b, s, -1, length).clone()
    vals = out.tolist()
    for bi in range(b):
        for si in range(s):
            p = np.float32(int(positions[bi, si]))
            for row in vals[bi][si]:
                for i, t in enumerate(th):
                    phi = float(np.float32(p * t))
                    z = complex(row[length - r + 2 * i], row[length - r + 2 * i + 1]) * cmath.exp((-1j if inverse else 1j) * phi)
                    row[length - r + 2 * i], row[length - r + 2 * i + 1] = z.real, z.imag
    return torch.tensor(vals, dtype=torch.float64).reshape(x.shape).to(x.dtype)


def naive_rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, hf_rounding: bool = False) -> torch.Tensor:
    """Per row: ``w_f · x_f / sqrt(mean(x²) + eps)`` in float64, one rounding ([OFF], SPEC §5.1)."""
    n = x.shape[-1]
    w = weight.double().tolist() if weight is not None else [1.0] * n
    rows = []
    for row in x.double().reshape(-1, n).tolist():
        inv = 1.0 / math.sqrt(sum(v * v for v in row) / n + eps)
        rows.append([w[f] * row[f] * inv for f in range(n)])
    return torch.tensor(rows, dtype=torch.float64).reshape(x.shape).to(x.dtype)



def _rope_inputs(shape, positions, compressed, rope_dim=64):
    def make(g, d):
        return {
            "x": randn(g, shape, d),
            "positions": torch.tensor(positions, dtype=torch.int64, device=d).reshape(1, -1).expand(shape[0], -1).contiguous(),
            "freqs": v4k.v4_rope_frequencies(compressed, rope_dim=rope_dim, device=d),
        }
    return make


for name, shape, pos, comp, rd in [
    ("q_flash_pos0_127_128_129", (1, 4, 64, 512), [0, 127, 128, 129], True, 64),
    ("kv_far_positions", (2, 4, 512), [65535, 65536, 1_000_000, 1_048_575], True, 64),
    ("indexer_q_main_table", (1, 3, 64, 128), [0, 1, 126], False, 64),
    # generic shapes (small models): head dim 32 with 8 rope dims, indexer head 16 with 16
    ("generic_q_hd32_rope8", (2, 3, 4, 32), [0, 7, 9], False, 8),
    ("generic_indexer_d16_rope16", (1, 2, 2, 16), [3, 100], True, 16),
]:
    register(ParityCase(f"apply_rope/{name}", "apply_rope", _rope_inputs(shape, pos, comp, rd),
                        lambda x, positions, freqs: v4k.apply_rope(x, positions, freqs), path="rope",
                        naive=naive_apply_rope, naive_tol=bf16_ulp_tol(1.0)))
    register(ParityCase(f"apply_rope/{name}_inverse", "apply_rope", _rope_inputs(shape, pos, comp, rd),
                        lambda x, positions, freqs: v4k.apply_rope(x, positions, freqs, inverse=True), path="inverse-rope",
                        naive=lambda x, positions, freqs: naive_apply_rope(x, positions, freqs, True),
                        naive_tol=bf16_ulp_tol(1.0)))

for name, shape, weighted in [("q_lora_flash", (3, 1024), True), ("per_head_q", (2, 64, 512), False), ("odd_77", (5, 77), True)]:
    def make(g, d, _s=shape, _w=weighted):
        return {"x": randn(g, _s, d, scale=3.0), "weight": randn(g, (_s[-1],), d) if _w else None}
    register(ParityCase(f"rms_norm/{name}", "rms_norm", make, lambda x, weight: v4k.rms_norm(x, weight), path="norm",
                        naive=naive_rms_norm, naive_tol=bf16_ulp_tol(1.0)))
