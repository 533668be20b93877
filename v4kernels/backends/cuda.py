"""``cuda``: native CUDA kernels (``csrc/cuda``, extension ``v4kernels._C_cuda``) and adapters to
NVIDIA-side vendor libraries, first on CUDA tensors; Triton and the reference follow.

Build hook: built when the installed torch has CUDA (``torch.version.cuda``) and ``csrc/cuda`` has
sources; ``V4K_BUILD_CUDA=0`` skips it, ``=1`` makes a failure fatal. ``TORCH_CUDA_ARCH_LIST`` picks
the architectures as for any torch extension.
"""
from __future__ import annotations

import glob
import os

from ._base import ACCELERATOR_TOLERANCES, Backend, BuildContext

#: Launch row for Ampere/Hopper/Blackwell class GPUs (also used for unknown CUDA devices).
CUDA_TRITON_BLOCKS = {
    "rows": {"BLOCK_R": 8, "ROW_ELEMS": 8192},
    "gemm": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128},
    "attn": {"BLOCK_H": 16, "BLOCK_K": 32, "SPLIT_MIN": 256, "FORCE_SPLIT": 0},
    "indexer": {"BLOCK_N": 64, "BLOCK_H": 64},
    "moe": {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128},
    "compressor": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_S": 8, "BLOCK_T": 4, "BLOCK_W": 256,
                   "BLOCK_WIN": 1, "POOL_TILE": 4096},
    "indices": {"BLOCK_S": 16, "BLOCK_U": 128},
    "kv_pack": {"BLOCK_R": 4},
    "mhc": {"BLOCK_T_SPLIT": 16, "BLOCK_D_PRE": 128, "BLOCK_T_POST": 4, "BLOCK_D_POST": 256},
    "moe_gate": {"BLOCK_K": 64},
    "hadamard": {"BLOCK_R_DOT": 32, "BLOCK_R": 16},
}


class CudaBackend(Backend):
    name = "cuda"
    description = "native CUDA kernels (csrc/cuda) and NVIDIA vendor-library adapters"
    auto_priority = {"cuda": 10}
    tolerances = ACCELERATOR_TOLERANCES
    verification = "unverified"
    extension = "_C_cuda"
    triton_blocks = {"cuda": CUDA_TRITON_BLOCKS}

    def backend_reasons(self, device_type: str) -> list[str]:
        from .. import _platform
        from .._ext import load_extension

        p = _platform.cuda_probe()
        if not p.ok:
            return [p.detail]
        e = load_extension(self.extension, self.name)
        return [] if e.ok else [e.detail]

    def build_extensions(self, ctx: BuildContext):
        if ctx.flag("V4K_BUILD_CUDA") == "0":
            ctx.record(self.name, "skipped: V4K_BUILD_CUDA=0")
            return [], {}
        kernels = sorted(os.path.relpath(p, ctx.root) for p in glob.glob(os.path.join(ctx.root, "csrc", "cuda", "*.cu")))
        bindings = sorted(os.path.relpath(p, ctx.root) for p in glob.glob(os.path.join(ctx.root, "csrc", "cuda", "*.cpp")))
        if not kernels:
            ctx.record(self.name, "skipped: no sources in csrc/cuda")
            return [], {}
        try:
            import torch
            from torch.utils.cpp_extension import BuildExtension, CUDAExtension
        except Exception as e:  # noqa: BLE001
            if ctx.flag("V4K_BUILD_CUDA") == "1":
                raise
            ctx.record(self.name, f"skipped: torch not importable at build time ({type(e).__name__}: {e})")
            return [], {}
        if torch.version.cuda is None:
            msg = f"skipped: torch {torch.__version__} is a build without CUDA"
            if ctx.flag("V4K_BUILD_CUDA") == "1":
                raise RuntimeError(f"V4K_BUILD_CUDA=1 but {msg}")
            ctx.record(self.name, msg)
            return [], {}
        ext = CUDAExtension(
            name=f"v4kernels.{self.extension}",
            sources=[*kernels, *bindings],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
        )
        ctx.record(self.name, "pending")
        return [ext], {"build_ext": BuildExtension}


BACKEND = CudaBackend()
