"""``cambricon``: Cambricon MLUs through torch_mlu and torch_mlu_ops fused operators (adapters in
``ops/<family>/cambricon.py``); first on ``mlu`` tensors, Triton (when it targets MLU) and the
reference follow."""
from __future__ import annotations

from ._base import ACCELERATOR_TOLERANCES, Backend


class CambriconBackend(Backend):
    name = "cambricon"
    description = "Cambricon MLU: torch_mlu / torch_mlu_ops fused ops (csrc/cambricon)"
    auto_priority = {"mlu": 10}
    tolerances = ACCELERATOR_TOLERANCES
    verification = "unverified"

    def backend_reasons(self, device_type: str) -> list[str]:
        from .. import _platform

        p = _platform.mlu_probe()
        return [] if p.ok else [p.detail]


BACKEND = CambriconBackend()
