"""``ascend``: Huawei Ascend NPUs through torch_npu's and CANN's fused operators (adapters in
``ops/<family>/ascend.py``) and the native binding in ``csrc/ascend``; first on ``npu`` tensors,
Triton-Ascend and the reference follow."""
from __future__ import annotations

from ._base import ACCELERATOR_TOLERANCES, Backend

#: Launch row for Triton-Ascend: fewer, larger programs work best on its AI cores.
NPU_TRITON_BLOCKS = {
    "rows": {"BLOCK_R": 16, "ROW_ELEMS": 8192},
    "gemm": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128},
    "attn": {"BLOCK_H": 16, "BLOCK_K": 64, "SPLIT_MIN": 512, "FORCE_SPLIT": 0},
    "indexer": {"BLOCK_N": 128, "BLOCK_H": 64},
    "moe": {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128},
    "compressor": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_S": 16, "BLOCK_T": 8, "BLOCK_W": 512,
                   "BLOCK_WIN": 1, "POOL_TILE": 8192},
    "indices": {"BLOCK_S": 32, "BLOCK_U": 128},
    "kv_pack": {"BLOCK_R": 4},
    "mhc": {"BLOCK_T_SPLIT": 16, "BLOCK_D_PRE": 128, "BLOCK_T_POST": 4, "BLOCK_D_POST": 256},
    "moe_gate": {"BLOCK_K": 64},
    "hadamard": {"BLOCK_R_DOT": 32, "BLOCK_R": 16},
}


class AscendBackend(Backend):
    name = "ascend"
    description = "Huawei Ascend: torch_npu / CANN fused ops (csrc/ascend)"
    auto_priority = {"npu": 10}
    tolerances = ACCELERATOR_TOLERANCES
    verification = "unverified"
    triton_blocks = {"npu": NPU_TRITON_BLOCKS}

    def backend_reasons(self, device_type: str) -> list[str]:
        from .. import _platform

        p = _platform.npu_probe()
        return [] if p.ok else [p.detail]


BACKEND = AscendBackend()
