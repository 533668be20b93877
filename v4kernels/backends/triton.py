"""``triton``: one portable Triton source per op (``ops/<family>/triton.py``).

Automatic on CUDA GPUs (after ``cuda``) and on NPUs/MLUs whose installed Triton targets them; on
CPU tensors only when forced, through the interpreter (``TRITON_INTERPRET=1``). The device rows
of the launch table come from the backends of those devices (``triton_blocks``); the interpreter
row lives here.
"""
from __future__ import annotations

import importlib.util

from ._base import ACCELERATOR_TOLERANCES, Backend

#: Launch row for the CPU interpreter: few, large programs (each program costs ~1 ms there).
INTERPRET_BLOCKS = {
    "rows": {"BLOCK_R": 64, "ROW_ELEMS": 65536},
    "gemm": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128},
    "attn": {"BLOCK_H": 64, "BLOCK_K": 64, "SPLIT_MIN": 64, "FORCE_SPLIT": 1},
    "indexer": {"BLOCK_N": 128, "BLOCK_H": 64},
    "moe": {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128},
    "compressor": {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 512, "BLOCK_S": 128, "BLOCK_T": 128, "BLOCK_W": 1024,
                   "BLOCK_WIN": 64, "POOL_TILE": 65536},
    "indices": {"BLOCK_S": 64, "BLOCK_U": 128},
    "kv_pack": {"BLOCK_R": 128},
    "mhc": {"BLOCK_T_SPLIT": 64, "BLOCK_D_PRE": 1024, "BLOCK_T_POST": 16, "BLOCK_D_POST": 1024},
    "moe_gate": {"BLOCK_K": 256},
    "hadamard": {"BLOCK_R_DOT": 64, "BLOCK_R": 16},
}

#: device type -> the Triton backend package that must be installed for Triton to target it
_TRITON_TARGET_PACKAGE = {"npu": "triton.backends.ascend", "mlu": "triton.backends.mlu"}


class TritonBackend(Backend):
    name = "triton"
    description = "Triton kernels (NVIDIA GPUs; NPUs/MLUs with their Triton; CPU via TRITON_INTERPRET=1 when forced)"
    auto_priority = {"cuda": 20, "npu": 30, "mlu": 30}
    forced_only_devices = frozenset({"cpu"})
    tolerances = ACCELERATOR_TOLERANCES
    verification = "verified here (CPU interpreter); GPU unverified"
    triton_blocks = {"interpret": INTERPRET_BLOCKS}

    def backend_reasons(self, device_type: str) -> list[str]:
        from .. import _platform

        p = _platform.triton_probe()
        if not p.ok:
            return [p.detail]
        if device_type == "cpu":
            if not _platform.triton_interpret():
                return ["triton on cpu tensors needs TRITON_INTERPRET=1 set before importing v4kernels"]
            return []
        if device_type == "cuda":
            c = _platform.cuda_probe()
            return [] if c.ok else [c.detail]
        package = _TRITON_TARGET_PACKAGE.get(device_type)
        if package is not None:
            try:
                found = importlib.util.find_spec(package) is not None
            except (ImportError, ValueError) as e:
                return [f"triton backends not importable: {e}"]
            if not found:
                return [f"installed triton does not target {device_type} ({package} not installed)"]
            from .. import _registry

            if _registry.triton_launch_row(device_type) is None:
                return [f"no Triton launch row for {device_type}: its backend declares none"]
        return []


BACKEND = TritonBackend()
