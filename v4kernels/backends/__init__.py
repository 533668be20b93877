"""Backends as plug-ins.

Each module of this package (``reference``, ``triton``, ``cpu``, ``cuda``, ``ascend``,
``cambricon``) defines one :class:`Backend` subclass and exposes an instance as ``BACKEND``; the
modules are discovered, not listed. Out-of-tree packages add a backend through the entry-point
group ``v4kernels.backends`` (the entry point names a module with a ``BACKEND``, or a
:class:`Backend` subclass or instance) or at run time with :func:`register_backend`.
See ``README.md`` in this folder for adding a vendor.
"""
from __future__ import annotations

import importlib
import pkgutil
import warnings
from typing import Any

import torch

from ._base import ACCELERATOR_TOLERANCES, Backend, BuildContext, Tolerance

__all__ = ["Backend", "BuildContext", "Tolerance", "ACCELERATOR_TOLERANCES", "BACKENDS", "register_backend",
           "unregister_backend", "get_backend", "discover", "load_plugins"]

#: name -> backend instance, in registration order (in-tree modules alphabetically, then entry points)
BACKENDS: dict[str, Backend] = {}

ENTRY_POINT_GROUP = "v4kernels.backends"


def _validate(backend: Any) -> Backend:
    if isinstance(backend, type) and issubclass(backend, Backend):
        backend = backend()
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend: expected a v4kernels.backends.Backend subclass or instance, got {type(backend).__name__}")
    name = getattr(type(backend), "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_backend: backend name must be an identifier string, got {name!r}")
    if not isinstance(backend.auto_priority, dict) or not all(
        isinstance(d, str) and isinstance(p, int) and not isinstance(p, bool) for d, p in backend.auto_priority.items()
    ):
        raise TypeError(f"register_backend: {name}.auto_priority must map device type (str) to priority (int), "
                        f"got {backend.auto_priority!r}")
    if not all(isinstance(d, str) for d in backend.forced_only_devices):
        raise TypeError(f"register_backend: {name}.forced_only_devices must be device type strings")
    for dt, tol in backend.tolerances.items():
        if not isinstance(dt, torch.dtype) or not isinstance(tol, Tolerance):
            raise TypeError(f"register_backend: {name}.tolerances must map a torch.dtype to Tolerance, "
                            f"got {dt!r}: {tol!r}")
    mod = backend.kernel_module
    if not isinstance(mod, str) or not mod.isidentifier():
        raise ValueError(f"register_backend: {name}.module must be an identifier, got {mod!r}")
    for target, row in backend.triton_blocks.items():
        if not isinstance(row, dict) or not all(isinstance(v, dict) for v in row.values()):
            raise TypeError(f"register_backend: {name}.triton_blocks[{target!r}] must map kernel -> {{param: int}}")
    return backend


def register_backend(backend: Backend | type[Backend], *, replace: bool = False) -> Backend:
    """Add a backend (a :class:`Backend` subclass or instance) to dispatch.

    Its kernels register with :func:`v4kernels.register_kernel` under its ``name``; kernel modules
    named ``v4kernels.ops.<family>.<module>`` are imported lazily like the in-tree ones. Raises
    ``ValueError`` if the name is taken (unless ``replace=True``) or the declaration is malformed.
    Returns the registered instance.
    """
    backend = _validate(backend)
    if backend.name in BACKENDS and not replace:
        raise ValueError(f"register_backend: a backend named {backend.name!r} is already registered "
                         f"({BACKENDS[backend.name]!r}); pass replace=True to replace it")
    BACKENDS[backend.name] = backend
    _invalidate()
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend added with :func:`register_backend` (in-tree backends cannot be removed)."""
    if name in _IN_TREE:
        raise ValueError(f"unregister_backend: {name!r} is an in-tree backend")
    if name not in BACKENDS:
        raise ValueError(f"unregister_backend: no backend named {name!r}; registered: {sorted(BACKENDS)}")
    del BACKENDS[name]
    from .. import _registry

    _registry._KERNELS.pop(name, None)
    _invalidate()


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}") from None


def _invalidate() -> None:
    from .. import _registry

    _registry.clear_dispatch_cache()


_IN_TREE: set[str] = set()
#: entry points that failed to load: name -> reason (shown by ``info``)
PLUGIN_ERRORS: dict[str, str] = {}


def discover() -> None:
    """Register the in-tree backend modules (this package)."""
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if m.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{m.name}")
        b = _validate(module.BACKEND)
        BACKENDS[b.name] = b
        _IN_TREE.add(b.name)


def load_plugins() -> None:
    """Register the backends advertised by installed distributions under the entry-point group
    ``v4kernels.backends`` (run once the package is fully imported, so a plug-in may import it)."""
    try:
        from importlib.metadata import entry_points

        eps = entry_points(group=ENTRY_POINT_GROUP)
    except Exception as e:  # noqa: BLE001 - broken metadata must not break import
        PLUGIN_ERRORS["<entry points>"] = f"{type(e).__name__}: {e}"
        return
    for ep in eps:
        try:
            obj = ep.load()
            obj = getattr(obj, "BACKEND", obj)
            b = _validate(obj)
            if b.name in BACKENDS:
                raise ValueError(f"name {b.name!r} is already registered")
            BACKENDS[b.name] = b
            _invalidate()
        except Exception as e:  # noqa: BLE001 - a broken plug-in is a reason, never an import error
            PLUGIN_ERRORS[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"
            warnings.warn(f"v4kernels: backend plug-in {ep.name!r} failed to load: {e}", RuntimeWarning, stacklevel=2)


discover()
