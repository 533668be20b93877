"""``cpu``: native C++ kernels (``csrc/cpu``, extension ``v4kernels._C_cpu``): OpenMP, AVX-512 or
AVX2 fp32 math on bf16/FP8/FP4 storage. First on CPU tensors; ops it lacks fall to the reference.

Build hook: ``V4K_BUILD_CPU=0`` skips the extension, ``=1`` makes a failed build fatal (default:
optional, failure recorded). ``V4K_CPU_ISA=avx512|avx2|baseline`` picks the instruction set
(default: the widest the compiler and the build machine support), ``V4K_CPU_NATIVE=1`` compiles
with ``-march=native``. The extension refuses to load on a CPU lacking the ISA it was built for.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile

import torch

from ._base import Backend, BuildContext, Tolerance

_ISA_FLAGS = {
    # name: (compiler flags, /proc/cpuinfo flags the build machine must have)
    "avx512": (
        ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
        {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
    ),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
    "baseline": ([], set()),
}


def _compiler_accepts(flags: list[str]) -> bool:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        r = subprocess.run([cxx, *flags, "-c", src, "-o", os.path.join(d, "t.o")], capture_output=True)
        return r.returncode == 0


def _build_machine_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa(flag) -> tuple[str, list[str]]:
    """The vector ISA of the extension: the widest one both the compiler and the build machine
    support, so the kernels never execute an instruction the build machine lacks."""
    if flag("V4K_CPU_NATIVE") == "1":
        return "native", ["-march=native"]
    forced = flag("V4K_CPU_ISA")
    if forced is not None:
        if forced not in _ISA_FLAGS:
            raise ValueError(f"V4K_CPU_ISA must be one of {sorted(_ISA_FLAGS)}, got {forced!r}")
        return forced, _ISA_FLAGS[forced][0]
    have = _build_machine_flags()
    for name in ("avx512", "avx2"):
        flags, need = _ISA_FLAGS[name]
        if need <= have and _compiler_accepts(flags):
            return name, flags
    return "baseline", []


class CpuBackend(Backend):
    name = "cpu"
    description = "native C++ kernels (OpenMP, AVX2/AVX-512 fp32 math on bf16/FP8/FP4 storage)"
    auto_priority = {"cpu": 10}
    tolerances = {
        torch.float32: Tolerance(1e-5, 1e-5, 0.99999),
        torch.bfloat16: Tolerance(1e-2, 1.6e-2, 0.9999),
        torch.float16: Tolerance(2e-3, 2e-3, 0.9999),
    }
    verification = "verified here"
    extension = "_C_cpu"

    def backend_reasons(self, device_type: str) -> list[str]:
        from .. import _platform
        from .._ext import build_info, load_extension

        # Check the ISA the extension was compiled for before loading it: a binary built for
        # AVX-512 must not even be imported on a CPU without it.
        isa = build_info().get("cpu_isa", "")
        missing = _platform.missing_cpu_features(isa)
        if missing:
            return [f"v4kernels._C_cpu was built for {isa} but this CPU lacks {', '.join(missing)}; "
                    "rebuild with V4K_CPU_ISA=avx2 or baseline"]
        p = load_extension(self.extension, self.name)
        return [] if p.ok else [p.detail]

    def build_extensions(self, ctx: BuildContext):
        if ctx.flag("V4K_BUILD_CPU") == "0":
            ctx.record(self.name, "skipped: V4K_BUILD_CPU=0")
            return [], {}
        sources = sorted(os.path.relpath(p, ctx.root) for p in glob.glob(os.path.join(ctx.root, "csrc", "cpu", "*.cpp")))
        if not sources:
            ctx.record(self.name, "skipped: no sources in csrc/cpu")
            return [], {}
        try:
            from torch.utils.cpp_extension import BuildExtension, CppExtension
        except Exception as e:  # noqa: BLE001 - any failure means "no torch in the build env"
            if ctx.flag("V4K_BUILD_CPU") == "1":
                raise
            ctx.record(self.name, f"skipped: torch not importable at build time ({type(e).__name__}: {e}); "
                                  "install torch first and use `pip install --no-build-isolation .`")
            return [], {}
        isa, isa_flags = cpu_isa(ctx.flag)
        ctx.record("cpu_isa", isa)
        if ctx.flag("V4K_SANITIZE") == "1":
            san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
            ctx.record("cpu_sanitize", "address,undefined")
        else:
            san = []
        # -ffp-contract=fast: fuse a*b+c into FMA (ISO -std=c++17 would otherwise forbid it).
        extra = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=fast", *isa_flags, *san]
        ext = CppExtension(
            name=f"v4kernels.{self.extension}",
            sources=sources,
            extra_compile_args={"cxx": extra},
            include_dirs=[os.path.join(ctx.root, "csrc", "common")],
            extra_link_args=["-fopenmp", *san],
            define_macros=[("V4K_CPU_ISA", f'"{isa}"')],
        )
        ctx.record(self.name, "pending")
        return [ext], {"build_ext": BuildExtension}


BACKEND = CpuBackend()


def native_limits() -> dict[str, int]:
    """The capability limits the native kernels declare (``kLimits`` in csrc/cpu/kernels.h), e.g.
    ``{"hc_post.max_streams": 64, ...}``. Loads the extension (raises ImportError if it cannot)."""
    import importlib

    importlib.import_module(f"v4kernels.{CpuBackend.extension}")
    return dict(torch.ops.v4k_cpu.limits())
