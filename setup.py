"""Build script: pure-Python install always works; native extensions are optional.

The native CPU extension (``v4kernels._C_cpu``) is built when torch is importable in the build
environment (install torch first, then ``pip install --no-build-isolation .``) and a C++ compiler
is present. ``V4K_BUILD_CPU=0`` skips it, ``V4K_BUILD_CPU=1`` makes a failure fatal. Whatever
happens is recorded in ``v4kernels/_build_info.json`` so ``python -m v4kernels info`` can say why
a backend is missing.
"""
from __future__ import annotations

import glob
import json
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO: dict[str, str] = {}


def _flag(name: str) -> str | None:
    v = os.environ.get(name)
    return None if v is None or v == "" else v


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
    import shutil
    import subprocess
    import tempfile

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        r = subprocess.run([cxx, *flags, "-c", src, "-o", os.path.join(d, "t.o")], capture_output=True)
        return r.returncode == 0


def _cpu_isa() -> tuple[str, list[str]]:
    """Vector ISA of the CPU extension: the widest one both the compiler and this (build) machine
    support, so the kernels never execute an instruction the build machine lacks.

    ``V4K_CPU_ISA=avx512|avx2|baseline`` overrides (e.g. ``baseline`` for a wheel meant for older
    x86 machines); ``V4K_CPU_NATIVE=1`` compiles with ``-march=native``. At import the extension
    refuses to load (ImportError with the reason) on a CPU without the ISA it was built for.
    """
    if _flag("V4K_CPU_NATIVE") == "1":
        return "native", ["-march=native"]
    forced = _flag("V4K_CPU_ISA")
    if forced is not None:
        if forced not in _ISA_FLAGS:
            raise ValueError(f"V4K_CPU_ISA must be one of {sorted(_ISA_FLAGS)}, got {forced!r}")
        return forced, _ISA_FLAGS[forced][0]
    have: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    for name in ("avx512", "avx2"):
        flags, need = _ISA_FLAGS[name]
        if need <= have and _compiler_accepts(flags):
            return name, flags
    return "baseline", []


def _cpu_extension():
    """Return (ext_modules, cmdclass) for the CPU extension, or record why it is skipped."""
    if _flag("V4K_BUILD_CPU") == "0":
        BUILD_INFO["cpu"] = "skipped: V4K_BUILD_CPU=0"
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not sources:
        BUILD_INFO["cpu"] = "skipped: no sources in csrc/cpu"
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # noqa: BLE001 - any failure means "no torch in the build env"
        BUILD_INFO["cpu"] = (
            f"skipped: torch not importable at build time ({type(e).__name__}: {e}); "
            "install torch first and use `pip install --no-build-isolation .`"
        )
        if _flag("V4K_BUILD_CPU") == "1":
            raise
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that records a failed optional build instead of aborting the install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
                BUILD_INFO["cpu"] = "built"
            except Exception as e:  # noqa: BLE001
                if _flag("V4K_BUILD_CPU") == "1":
                    raise
                BUILD_INFO["cpu"] = f"build failed: {type(e).__name__}: {str(e)[:400]}"
                print(f"warning: optional CPU extension not built: {e}", file=sys.stderr)
            _write_build_info(self.build_lib)

    isa, isa_flags = _cpu_isa()
    BUILD_INFO["cpu_isa"] = isa
    # -ffp-contract=fast: fuse a*b+c into FMA (ISO -std=c++17 would otherwise forbid it).
    extra = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=fast", *isa_flags]
    ext = CppExtension(
        name="v4kernels._C_cpu",
        sources=sources,
        extra_compile_args={"cxx": extra},
        extra_link_args=["-fopenmp"],
        define_macros=[("V4K_CPU_ISA", f'"{isa}"')],
    )
    BUILD_INFO["cpu"] = "pending"
    return [ext], {"build_ext": OptionalBuildExtension}


def _write_build_info(build_lib: str | None) -> None:
    for base in filter(None, [build_lib, ROOT]):
        path = os.path.join(base, "v4kernels", "_build_info.json")
        if os.path.isdir(os.path.dirname(path)):
            with open(path, "w") as f:
                json.dump(BUILD_INFO, f, indent=1, sort_keys=True)


class BuildPyWithInfo(build_py):
    def run(self):
        super().run()
        _write_build_info(self.build_lib)


ext_modules, cmdclass = _cpu_extension()
cmdclass = {"build_py": BuildPyWithInfo, **cmdclass}
setup(ext_modules=ext_modules, cmdclass=cmdclass)
