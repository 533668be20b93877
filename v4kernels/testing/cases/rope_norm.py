"""Parity cases for RoPE and RMSNorm (SPEC §3, §5.1)."""
from __future__ import annotations

import torch

import v4kernels as v4k

from ..inputs import randn
from . import ParityCase, register


def _rope_inputs(shape, positions, compressed):
    def make(g, d):
        return {
            "x": randn(g, shape, d),
            "positions": torch.tensor(positions, dtype=torch.int64, device=d).reshape(1, -1).expand(shape[0], -1).contiguous(),
            "freqs": v4k.v4_rope_frequencies(compressed, device=d),
        }
    return make


for name, shape, pos, comp in [
    ("q_flash_pos0_127_128_129", (1, 4, 64, 512), [0, 127, 128, 129], True),
    ("kv_far_positions", (2, 4, 512), [65535, 65536, 1_000_000, 1_048_575], True),
    ("indexer_q_main_table", (1, 3, 64, 128), [0, 1, 126], False),
]:
    register(ParityCase(f"apply_rope/{name}", "apply_rope", _rope_inputs(shape, pos, comp),
                        lambda x, positions, freqs: v4k.apply_rope(x, positions, freqs), path="rope"))
    register(ParityCase(f"apply_rope/{name}_inverse", "apply_rope", _rope_inputs(shape, pos, comp),
                        lambda x, positions, freqs: v4k.apply_rope(x, positions, freqs, inverse=True), path="inverse-rope"))

for name, shape, weighted in [("q_lora_flash", (3, 1024), True), ("per_head_q", (2, 64, 512), False), ("odd_77", (5, 77), True)]:
    def make(g, d, _s=shape, _w=weighted):
        return {"x": randn(g, _s, d, scale=3.0), "weight": randn(g, (_s[-1],), d) if _w else None}
    register(ParityCase(f"rms_norm/{name}", "rms_norm", make, lambda x, weight: v4k.rms_norm(x, weight), path="norm"))
