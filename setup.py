"""Build script: the pure-Python install always works; native extensions are optional.

Every backend in ``v4kernels/backends/`` may declare a build hook (``Backend.build_extensions``):
the CPU extension (``V4K_BUILD_CPU``) is built when torch is importable in the build environment
(install torch first, then ``pip install --no-build-isolation .``) and a C++ compiler is present;
the CUDA extension (``V4K_BUILD_CUDA``) when that torch has CUDA. ``V4K_BUILD_<NAME>=0`` skips a
backend's extension, ``=1`` makes its failure fatal. Each outcome is recorded under the backend's
name in ``v4kernels/_build_info.json``, so ``python -m v4kernels info`` can say why an extension is
missing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pkgutil
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
BACKENDS_DIR = os.path.join(ROOT, "v4kernels", "backends")
BUILD_INFO: dict[str, str] = {}


def _flag(name: str) -> str | None:
    v = os.environ.get(name)
    return None if v is None or v == "" else v


def _record(key: str, text: str) -> None:
    BUILD_INFO[key] = text


def _load_backends() -> list:
    """Import the backend modules as a stand-alone package (v4kernels itself is not imported)."""
    spec = importlib.util.spec_from_file_location(
        "_v4k_build_backends", os.path.join(BACKENDS_DIR, "_base.py"), submodule_search_locations=[BACKENDS_DIR]
    )
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["_v4k_build_backends"] = pkg
    base = importlib.import_module("_v4k_build_backends._base")
    out = []
    for m in sorted(pkgutil.iter_modules([BACKENDS_DIR]), key=lambda m: m.name):
        if m.name.startswith("_"):
            continue
        mod = importlib.import_module(f"_v4k_build_backends.{m.name}")
        out.append((mod.BACKEND, base.BuildContext(ROOT, _flag, _record)))
    return out


def _collect():
    ext_modules, owner, build_ext_cls = [], {}, None
    try:
        backends = _load_backends()
    except Exception as e:  # noqa: BLE001 - e.g. no torch in the build environment
        why = f"skipped: backend build hooks not loadable ({type(e).__name__}: {e}); pure-Python install"
        for key in ("cpu", "cuda"):
            if _flag(f"V4K_BUILD_{key.upper()}") == "1":
                raise
            BUILD_INFO[key] = why
        return [], None, {}
    for backend, ctx in backends:
        exts, cmd = backend.build_extensions(ctx)
        for ext in exts:
            owner[ext.name] = backend.name
        ext_modules += exts
        build_ext_cls = cmd.get("build_ext", build_ext_cls)
    return ext_modules, build_ext_cls, owner


ext_modules, _build_ext_base, _OWNER = _collect()


class OptionalBuildExtension(_build_ext_base or _setuptools_build_ext):
    """Builds each backend's extension; a failure is recorded for ``info`` instead of aborting the
    install, unless ``V4K_BUILD_<BACKEND>=1``."""

    def build_extension(self, ext):
        name = _OWNER.get(ext.name, ext.name)
        try:
            super().build_extension(ext)
            BUILD_INFO[name] = "built"
        except Exception as e:  # noqa: BLE001
            if _flag(f"V4K_BUILD_{name.upper()}") == "1":
                raise
            BUILD_INFO[name] = f"build failed: {type(e).__name__}: {str(e)[:400]}"
            print(f"warning: optional {name} extension not built: {e}", file=sys.stderr)
        _write_build_info(self.build_lib)


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


cmdclass = {"build_py": BuildPyWithInfo}
if ext_modules:
    cmdclass["build_ext"] = OptionalBuildExtension
setup(ext_modules=ext_modules, cmdclass=cmdclass)
