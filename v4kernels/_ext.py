"""Loading of compiled extensions, with the reason recorded when one is missing."""
from __future__ import annotations

import functools
import importlib
import json
import os

from ._platform import Probe


@functools.cache
def build_info() -> dict[str, str]:
    """What ``setup.py`` recorded about optional native builds (empty for a source checkout)."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


@functools.cache
def load_extension(name: str, build_key: str) -> Probe:
    """Import ``v4kernels.<name>`` (which registers its torch.library kernels on import)."""
    try:
        importlib.import_module(f"v4kernels.{name}")
    except (ImportError, OSError, RuntimeError) as e:
        recorded = build_info().get(build_key)
        why = f"extension v4kernels.{name} not importable ({type(e).__name__}: {e})"
        if recorded:
            why += f"; build: {recorded}"
        return Probe(False, why)
    return Probe(True, f"v4kernels.{name} loaded")
