"""Parity cases for the formats family (SPEC §4)."""
from __future__ import annotations

import torch

import v4kernels as v4k

from ..inputs import randn
from . import ParityCase, register


def _x(shape, dtype=torch.bfloat16, scale=1.0):
    return lambda g, d: {"x": randn(g, shape, d, dtype, scale)}


for shape, block, tag in [((4, 7168), 128, "v4-pro"), ((3, 448), 64, "v4-flash"), ((1, 128), 128, "odd"), ((5, 2, 192), 64, "odd")]:
    register(ParityCase(f"act_quant/{'x'.join(map(str, shape))}_b{block}", "act_quant", _x(shape),
                        lambda x, _b=block: v4k.act_quant(x, _b), path="quant", tags=frozenset({tag})))
    register(ParityCase(f"act_quant_roundtrip/{'x'.join(map(str, shape))}_b{block}", "act_quant_roundtrip", _x(shape),
                        lambda x, _b=block: v4k.act_quant_roundtrip(x, _b), path="qat-sim", tags=frozenset({tag})))

for shape in [(4, 64, 128), (3, 96), (1, 32)]:
    register(ParityCase(f"fp4_act_quant/{'x'.join(map(str, shape))}", "fp4_act_quant", _x(shape),
                        lambda x: v4k.fp4_act_quant(x, 32), path="quant"))
    register(ParityCase(f"fp4_act_roundtrip/{'x'.join(map(str, shape))}", "fp4_act_roundtrip", _x(shape),
                        lambda x: v4k.fp4_act_roundtrip(x, 32), path="qat-sim"))

register(ParityCase("hadamard_transform/indexer_64x128", "hadamard_transform", _x((2, 64, 128)),
                    lambda x: v4k.hadamard_transform(x), path="rotate", tags=frozenset({"v4-flash"})))
