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

    extra = ["-O3", "-fopenmp", "-std=c++17", "-march=native" if _flag("V4K_CPU_NATIVE") == "1" else "-mavx2", "-mfma", "-mf16c"]
    ext = CppExtension(
        name="v4kernels._C_cpu",
        sources=sources,
        extra_compile_args={"cxx": extra},
        extra_link_args=["-fopenmp"],
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
