"""``reference``: pure PyTorch, fp32 math; the executable specification. Runs on any device and is
the last candidate everywhere, so every op always has a path."""
from __future__ import annotations

import torch

from ._base import Backend, Tolerance


class ReferenceBackend(Backend):
    name = "reference"
    description = "pure PyTorch, fp32 math; the executable specification (any device)"
    auto_priority = {"cpu": 100, "cuda": 100, "npu": 100, "mlu": 100, "meta": 100}
    tolerances = {d: Tolerance(0.0, 0.0, 1.0) for d in (torch.float32, torch.bfloat16, torch.float16)}
    verification = "verified here"

    def device_reasons(self, device_type: str, forced: bool) -> list[str]:
        return []


BACKEND = ReferenceBackend()
