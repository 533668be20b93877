"""``cuda``: DeepSeek's own kernels where they apply (FlashMLA sparse attention, DeepGEMM indexer
logits / FP8 GEMMs / mHC prenorm GEMM), native CUDA kernels (``csrc/cuda``, extension
``v4kernels._C_cuda``: indexer top-k, fused hc_pre/hc_post, compressor) elsewhere; Triton and the
reference follow in dispatch order.

Each kernel in ``v4kernels/ops/<family>/cuda.py`` is a list of :class:`Route` s tried in order;
a route's limits (vendor package, SM, head counts, head dim, top-k multiples ...) are data that
return readable reasons, so a refused call says which library, SM and limit stopped it
(:meth:`CudaBackend.routes` lists them). Vendor packages and the GPU are probed lazily, once.

Build hook: built when the installed torch has CUDA (``torch.version.cuda``) and ``csrc/cuda`` has
sources; ``V4K_BUILD_CUDA=0`` skips it, ``=1`` makes a failure fatal. ``TORCH_CUDA_ARCH_LIST`` picks
the architectures as for any torch extension.
"""
from __future__ import annotations

import functools
import glob
import importlib
import importlib.util
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable

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

#: vendor library -> (python module, what it provides)
VENDOR_MODULES = {
    "FlashMLA": ("flash_mla", "sparse attention decode/prefill (SM90a, SM100f)"),
    "DeepGEMM": ("deep_gemm", "indexer MQA logits, FP8 GEMM, grouped FP8 GEMM, mHC prenorm GEMM (SM90, SM100)"),
}


@dataclass(frozen=True)
class VendorProbe:
    ok: bool
    detail: str
    module: Any = None


@functools.cache
def vendor(name: str) -> VendorProbe:
    """Import a vendor library once; failures (ImportError, RuntimeError, OSError) become a reason."""
    mod_name = VENDOR_MODULES[name][0]
    try:
        if importlib.util.find_spec(mod_name) is None:
            return VendorProbe(False, f"{name} not installed (python package '{mod_name}')")
        mod = importlib.import_module(mod_name)
    except (ImportError, RuntimeError, OSError, ValueError) as e:
        return VendorProbe(False, f"{name}: 'import {mod_name}' failed: {type(e).__name__}: {e}")
    return VendorProbe(True, f"{name} ({mod_name} {getattr(mod, '__version__', '?')})", mod)


@functools.cache
def vendor_accepts(name: str, fn: str, kwarg: str) -> bool:
    """Whether vendor function ``fn`` takes keyword ``kwarg`` (forks differ in signatures)."""
    p = vendor(name)
    f = getattr(p.module, fn, None) if p.ok else None
    if f is None:
        return False
    try:
        return kwarg in inspect.signature(f).parameters
    except (TypeError, ValueError):
        return False


@functools.cache
def capability(index: int) -> tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def sm_of(t: Any) -> tuple[int, int] | None:
    """Compute capability of the CUDA device holding tensor ``t`` (None off CUDA)."""
    if getattr(t, "device", None) is None or t.device.type != "cuda":
        return None
    return capability(t.device.index if t.device.index is not None else 0)


def sm_name(cc: tuple[int, int] | None) -> str:
    return "no CUDA device" if cc is None else f"sm_{cc[0]}{cc[1]}"


@dataclass
class Route:
    """One way a cuda kernel can run a call: a vendor library or a native kernel.

    ``library``: "FlashMLA", "DeepGEMM" or "native"; ``archs``: major compute capabilities it
    runs on (empty: any); ``limits``: what it supports, for ``info``; ``refusals(*schema_args)``:
    reasons it cannot take these arguments; ``run(*schema_args)``.
    """

    name: str
    library: str
    limits: str
    run: Callable[..., Any]
    refusals: Callable[..., list[str]] = field(default=lambda *a: [])
    archs: tuple[tuple[int, int], ...] = ()  # (major, minor); minor -1 = any minor
    arch_text: str = ""

    def availability(self) -> list[str]:
        if self.library == "native":
            return native_reasons()
        p = vendor(self.library)
        return [] if p.ok else [p.detail]

    def reasons(self, args: tuple) -> list[str]:
        out = self.availability()
        if out:
            return [f"{self.name}: {r}" for r in out]
        if self.archs:
            t = next((a for a in args if hasattr(a, "device")), None)
            cc = sm_of(t)
            if cc is None or not any(cc[0] == mj and mn in (-1, cc[1]) for mj, mn in self.archs):
                return [f"{self.name}: runs on {self.arch_text} only, this GPU is {sm_name(cc)}"]
        return [f"{self.name}: {r}" for r in self.refusals(*args)]


def native_reasons() -> list[str]:
    from .._ext import load_extension

    e = load_extension(BACKEND.extension, BACKEND.name)
    return [] if e.ok else [e.detail]


def verified_record() -> dict[str, str]:
    """``{op: "<GPU> (sm_XY) <date>"}`` from the file named by ``V4K_CUDA_VERIFIED`` (written by
    ``bench/gpu_check.py --record``), or empty."""
    import json

    path = os.environ.get("V4K_CUDA_VERIFIED")
    if not path:
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


#: op -> routes, in the order they are tried (filled by the ops/<family>/cuda.py modules)
ROUTES: dict[str, list[Route]] = {}


def register_routes(op: str, routes: list[Route]) -> None:
    """Register the cuda kernel of ``op`` as the first route that accepts a call."""
    from .._registry import register_kernel

    ROUTES[op] = list(routes)

    def refusals(*args: Any) -> list[str]:
        out: list[str] = []
        for r in ROUTES[op]:
            why = r.reasons(args)
            if not why:
                return []
            out.extend(why)
        return out

    def kernel(*args: Any) -> Any:
        for r in ROUTES[op]:
            if not r.reasons(args):
                return r.run(*args)
        raise RuntimeError(f"cuda {op}: no route accepts this call: {'; '.join(refusals(*args))}")

    kernel.__name__ = f"cuda_{op}"
    register_kernel(BACKEND.name, op, refusals=refusals)(kernel)


class CudaBackend(Backend):
    name = "cuda"
    description = "DeepSeek vendor kernels (FlashMLA, DeepGEMM) and native CUDA kernels (csrc/cuda)"
    auto_priority = {"cuda": 10}
    tolerances = ACCELERATOR_TOLERANCES
    #: the native kernels were compiled for sm_80/90a/100a and their algorithms checked on the CPU;
    #: no GPU run is recorded for this release (see docs/cuda.md)
    verification = "compiled only (native); bridged to vendor library, unverified"
    follows_nan_policy = False  # vendor ops leave NaN/inf behaviour unspecified
    extension = "_C_cuda"
    triton_blocks = {"cuda": CUDA_TRITON_BLOCKS}

    def backend_reasons(self, device_type: str) -> list[str]:
        # The vendor routes need no extension: only a usable CUDA torch. Native routes check the
        # extension themselves (Route.availability).
        from .. import _platform

        p = _platform.cuda_probe()
        return [] if p.ok else [p.detail]

    def op_reasons(self, op: str, device_type: str, forced: bool = False) -> list[str]:
        reasons = super().op_reasons(op, device_type, forced)
        if reasons or op not in ROUTES:
            return reasons
        # usable only if some route's library is present (argument limits are per call)
        avail = [r.availability() for r in ROUTES[op]]
        if all(avail):
            return [f"{r.name}: {'; '.join(a)}" for r, a in zip(ROUTES[op], avail)]
        return []

    def routes(self, op: str) -> list[str]:
        """One line per route of ``op``: library, architectures, limits and whether it is present."""
        self.load()
        out = []
        for r in ROUTES.get(op, []):
            avail = r.availability()
            state = "available" if not avail else "unavailable: " + "; ".join(avail)
            arch = r.arch_text or "any CUDA GPU"
            out.append(f"{r.name} [{r.library}, {arch}] {r.limits} ({state})")
        return out

    def limits(self, op: str) -> list[str]:
        """``info -v`` lines for ``op``: every route with its library, SM, limits and presence."""
        return self.routes(op)

    def op_verification(self, op: str) -> str:
        """Support-matrix text for one op: "verified on <GPU>" when a passing ``bench/gpu_check.py
        --record FILE`` run is named by ``V4K_CUDA_VERIFIED=FILE``; otherwise "bridged to <library>,
        unverified" for vendor routes and "compiled only" for native ones."""
        self.load()
        rec = verified_record().get(op)
        if rec:
            return f"verified on {rec}"
        libs = [r.library for r in ROUTES.get(op, [])]
        parts = []
        vend = sorted({lib for lib in libs if lib != "native"})
        if vend:
            parts.append(f"bridged to {'/'.join(vend)}, unverified")
        if "native" in libs:
            parts.append("native compiled only")
        return "; ".join(parts) or "not yet"

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
        # No --use_fast_math: the kernels mirror the reference's IEEE fp32 evaluation (expf,
        # sqrt, division); torch's headers need C++20.
        ext = CUDAExtension(
            name=f"v4kernels.{self.extension}",
            sources=[*kernels, *bindings],
            extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-std=c++20"]},
        )
        ctx.record(self.name, "pending")
        return [ext], {"build_ext": BuildExtension}


BACKEND = CudaBackend()
