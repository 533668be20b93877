"""A fake accelerator for exercising device dispatch without the device (test-only).

:func:`install` renames PyTorch's ``PrivateUse1`` backend to a given device type (``"npu"``,
``"mlu"``, ...) and makes it a working, Python-backed device: every tensor on it owns real host
memory, and every ATen op on it runs the CPU kernel on CPU views of that memory (one boxed
fallback on the ``PrivateUse1`` key). Factory functions, ``.to(device)``/``.cpu()``, views and
in-place ops keep PyTorch's semantics (views share memory, in-place ops return their input), so
the reference ops and the layers run unchanged on ``device``-typed tensors, and a kernel
registered for the device (``torch.library.register_kernel(op, "npu")``,
``TORCH_LIBRARY_IMPL(ns, PrivateUse1, m)``) receives them.

What it proves: routing (which backend and which vendor-op call a tensor of that device type
reaches), argument bridging and error paths. What it does not prove: anything about a real
device's kernels — the numbers are computed by the CPU.

Only one rename per process is possible, so use it from a subprocess
(:func:`run_in_subprocess`) or a dedicated interpreter::

    from v4kernels.testing import fake_device
    fake_device.install("npu")
    fake_device.install_fake_module("torch_npu", {"npu_rms_norm": my_emulation}, version="emulated")
    x = torch.randn(4, 8).to("npu")

:func:`install_fake_module` and :func:`define_fake_ops` install **emulated vendor modules and
custom-op namespaces** (a fake ``torch_npu`` whose ops are PyTorch emulations, a fake
``torch.ops._C_ascend``); they exist only so a backend's probe and adapters can run against
emulations in tests. This module relies on private PyTorch APIs
(``torch.utils.backend_registration._setup_privateuseone_for_python_backend``,
``torch._C._acc``, ``torch._C._construct_storage_from_data_pointer``) and was written against
torch 2.13.
"""
from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
import types
from typing import Any, Callable

import torch

__all__ = ["install", "installed_device", "to_host", "install_fake_module", "define_fake_ops", "run_in_subprocess"]

_STATE: dict[str, Any] = {"name": None, "lib": None, "libs": [], "allocs": 0}
# host memory behind the fake device: data pointer -> (device storage, host storage). The host
# storage owns the memory; the device storage is a non-owning alias of it.
_STORAGES: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}
_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
_SWEEP_EVERY = 128


def installed_device() -> str | None:
    """The device type installed in this process (None if :func:`install` was not called)."""
    return _STATE["name"]


def _device() -> torch.device:
    return torch.device(_STATE["name"], 0)


def _sweep() -> None:
    # free host memory whose device storage is referenced only by this table
    dead = [p for p, (dev, _) in _STORAGES.items() if torch._C._storage_Use_Count(dev._cdata) <= 1]
    for p in dead:
        del _STORAGES[p]


def _register_host_storage(host: torch.UntypedStorage) -> torch.UntypedStorage:
    ptr = host.data_ptr()
    entry = _STORAGES.get(ptr)
    # an entry is stale when its host storage was resized (moved) by a CPU kernel since
    if entry is None or entry[1].data_ptr() != ptr or entry[0].nbytes() < host.nbytes():
        dev = torch._C._construct_storage_from_data_pointer(ptr, _device(), host.nbytes())
        _STORAGES[ptr] = entry = (dev, host)
        _STATE["allocs"] += 1
        if _STATE["allocs"] % _SWEEP_EVERY == 0:
            _sweep()
            _STORAGES[ptr] = entry
    return entry[0]


def _wrap(host: torch.Tensor) -> torch.Tensor:
    """A device tensor aliasing the memory of the CPU tensor ``host`` (same sizes, strides, offset)."""
    if host.untyped_storage().data_ptr() == 0:
        # zero-byte tensors have no address: give them one byte of their own
        host = torch.empty(1, dtype=host.dtype).set_(torch.UntypedStorage(max(host.element_size(), 1)), 0,
                                                     host.size(), host.stride())
    dev_storage = _register_host_storage(host.untyped_storage())
    t = torch._C._acc.create_empty_tensor([0], host.dtype)
    torch.ops.aten.set_.source_Storage_storage_offset.redispatch(
        _CPU_KEYS, t, dev_storage, host.storage_offset(), host.size(), host.stride())
    return t


def to_host(t: torch.Tensor) -> torch.Tensor:
    """The CPU view of a fake-device tensor's memory (no copy; writes are visible on the device)."""
    ptr = t.untyped_storage().data_ptr()
    entry = _STORAGES.get(ptr)
    if entry is None or entry[1].data_ptr() != ptr:
        raise RuntimeError(f"fake {_STATE['name']} device: tensor memory at {ptr:#x} is not known to the fake device")
    return torch.empty(0, dtype=t.dtype).set_(entry[1], t.storage_offset(), t.size(), t.stride())


def _is_fake(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == _STATE["name"]


def _host_args(x: Any, originals: dict[int, torch.Tensor]) -> Any:
    if isinstance(x, torch.Tensor):
        if _is_fake(x):
            h = to_host(x)
            originals[id(h)] = x
            return h
        return x
    if isinstance(x, torch.device):
        return torch.device("cpu") if x.type == _STATE["name"] else x
    if isinstance(x, (list, tuple)):
        return type(x)(_host_args(v, originals) for v in x)
    return x


def _device_results(x: Any, originals: dict[int, torch.Tensor], wrap: bool) -> Any:
    if isinstance(x, torch.Tensor):
        o = originals.get(id(x))
        if o is not None:
            return o  # an in-place op returned its (device) input
        return _wrap(x) if wrap and x.device.type == "cpu" else x
    if isinstance(x, (list, tuple)):
        return type(x)(_device_results(v, originals, wrap) for v in x)
    return x


def _contiguous_strides(size: list[int]) -> list[int]:
    strides, acc = [], 1
    for s in reversed(size):
        strides.append(acc)
        acc *= max(int(s), 1)
    return list(reversed(strides))


def _resize(t: torch.Tensor, size: list[int]) -> torch.Tensor:
    numel = 1
    for s in size:
        numel *= int(s)
    need = (t.storage_offset() + numel) * t.element_size()
    if need <= t.untyped_storage().nbytes():
        storage, offset = t.untyped_storage(), t.storage_offset()
    else:
        host = torch.empty(numel, dtype=t.dtype)
        old = to_host(t).reshape(-1)
        n = min(old.numel(), numel)
        host[:n] = old[:n]
        storage, offset = _register_host_storage(host.untyped_storage()), 0
    torch.ops.aten.set_.source_Storage_storage_offset.redispatch(
        _CPU_KEYS, t, storage, offset, list(size), _contiguous_strides(list(size)))
    return t


def _fallback(op: torch._ops.OpOverload, *args: Any, **kwargs: Any) -> Any:
    name = op.name()
    if name == "aten::_copy_from":
        src, dst = args[0], args[1]
        (to_host(dst) if _is_fake(dst) else dst).copy_(to_host(src) if _is_fake(src) else src)
        return dst
    if name == "aten::_copy_from_and_resize":
        src, dst = args[0], args[1]
        if _is_fake(dst) and list(dst.shape) != list(src.shape):
            _resize(dst, list(src.shape))
        elif not _is_fake(dst):
            dst.resize_(src.shape)
        (to_host(dst) if _is_fake(dst) else dst).copy_(to_host(src) if _is_fake(src) else src)
        return dst
    if name == "aten::resize_":
        return _resize(args[0], list(args[1]))
    if name in ("aten::is_pinned", "aten::_pin_memory"):
        raise RuntimeError(f"fake {_STATE['name']} device: {name} is not supported")
    originals: dict[int, torch.Tensor] = {}
    args = _rewrap_numbers(op, args)
    hargs = _host_args(args, originals)
    hkwargs = {k: _host_args(v, originals) for k, v in kwargs.items()}
    dev = kwargs.get("device")
    if dev is not None:
        wrap = torch.device(dev).type == _STATE["name"]
    else:
        wrap = bool(originals)
    # out= tensors the CPU kernel may resize: remember where their memory was
    outs = [(h, o, h.untyped_storage().data_ptr(), h.size(), h.stride()) for h, o in
            ((h, originals[id(h)]) for h in _flat_tensors(hkwargs.values()) if id(h) in originals)
            if _is_mutable_out(op, o, kwargs)]
    result = op(*hargs, **hkwargs)
    for h, o, ptr, size, stride in outs:
        if h.untyped_storage().data_ptr() != ptr or h.size() != size or h.stride() != stride:
            stale = _STORAGES.get(ptr)
            if stale is not None and stale[1].data_ptr() != ptr:
                del _STORAGES[ptr]
            storage = _register_host_storage(h.untyped_storage())
            torch.ops.aten.set_.source_Storage_storage_offset.redispatch(
                _CPU_KEYS, o, storage, h.storage_offset(), h.size(), h.stride())
    return _device_results(result, originals, wrap)


def _rewrap_numbers(op: torch._ops.OpOverload, args: tuple) -> tuple:
    """The boxed fallback receives wrapped-number tensors (``x & 255``) as Python numbers; turn
    them back into 0-dim tensors where the schema wants a Tensor."""
    schema_args = op._schema.arguments
    out = list(args)
    changed = False
    for i, v in enumerate(args):
        if i < len(schema_args) and isinstance(v, (bool, int, float, complex)) and \
                isinstance(schema_args[i].type, torch._C.TensorType):
            if isinstance(v, bool):
                dt = torch.bool
            elif isinstance(v, int):
                dt = torch.int64
            elif isinstance(v, float):
                dt = torch.float64 if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args) \
                    else torch.get_default_dtype()
            else:
                dt = torch.complex64
            out[i] = torch.tensor(v, dtype=dt)
            changed = True
    return tuple(out) if changed else args


def _flat_tensors(values: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(_flat_tensors(v))
    return out


def _is_mutable_out(op: torch._ops.OpOverload, t: torch.Tensor, kwargs: dict[str, Any]) -> bool:
    for a in op._schema.arguments:
        if a.is_out and kwargs.get(a.name) is t:
            return True
    return False


def install(name: str = "npu") -> None:
    """Make ``PrivateUse1`` a working fake device named ``name`` in this process.

    Idempotent for the same name; a second, different name raises (PyTorch allows one rename
    per process)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"fake_device.install: device name must be an identifier, got {name!r}")
    if _STATE["name"] is not None:
        if _STATE["name"] != name:
            raise RuntimeError(f"fake_device.install: this process already has a fake {_STATE['name']!r} device; "
                               f"PrivateUse1 can be renamed once per process (use a subprocess for {name!r})")
        return
    current = torch._C._get_privateuse1_backend_name()
    if current != "privateuseone":
        raise RuntimeError(f"fake_device.install: PrivateUse1 is already named {current!r} in this process")
    from torch.utils.backend_registration import _DummyBackendModule, _setup_privateuseone_for_python_backend

    class _FakeDeviceModule(_DummyBackendModule):
        """``torch.<name>``: availability, one device, and the few queries code asks a device."""

        def get_device_name(self, device: Any = None) -> str:
            return f"fake-{name}"

        def synchronize(self, device: Any = None) -> None:
            return None

        def is_bf16_supported(self) -> bool:
            return True

    _setup_privateuseone_for_python_backend(name, backend_module=_FakeDeviceModule())
    _STATE["name"] = name
    lib = torch.library.Library("_", "IMPL")
    lib.fallback(_fallback, "PrivateUse1")
    _STATE["lib"] = lib


def install_fake_module(module_name: str, attrs: dict[str, Any], version: str = "0+emulated") -> types.ModuleType:
    """Insert a module ``module_name`` (e.g. ``"torch_npu"``) built from ``attrs`` into
    ``sys.modules`` so ``import module_name`` and ``importlib.util.find_spec`` see it.

    Test-only emulation of a vendor package: its functions are whatever ``attrs`` provides
    (PyTorch re-implementations of the vendor ops). Dotted names (``"torch_npu.npu"``) create
    sub-modules; ``attrs`` values that are dicts become sub-module contents."""
    mod = types.ModuleType(module_name, f"test-only emulation of {module_name} (v4kernels.testing.fake_device)")
    mod.__spec__ = importlib.machinery.ModuleSpec(module_name, loader=None, is_package=True)
    mod.__path__ = []  # type: ignore[attr-defined]
    mod.__version__ = version  # type: ignore[attr-defined]
    mod.__v4k_emulated__ = True  # type: ignore[attr-defined]
    for k, v in attrs.items():
        if isinstance(v, dict):
            setattr(mod, k, install_fake_module(f"{module_name}.{k}", v, version))
        else:
            setattr(mod, k, v)
    sys.modules[module_name] = mod
    if "." in module_name:
        parent, _, child = module_name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, mod)
    return mod


def define_fake_ops(namespace: str, ops: dict[str, Callable[..., Any]],
                    dispatch_keys: tuple[str, ...] = ("PrivateUse1", "CPU")) -> torch.library.Library:
    """Define ``torch.ops.<namespace>.<op>`` from ``{"name(schema) -> ret": python_fn}``, each
    implemented by ``python_fn`` on ``dispatch_keys``: a test-only emulation of a vendor custom-op
    library (e.g. ``_C_ascend``), with the vendor's published schema, so adapters are exercised
    through the same dispatcher path and argument checking as the real library."""
    lib = torch.library.Library(namespace, "DEF")
    for schema, fn in ops.items():
        lib.define(schema)
        opname = schema.split("(", 1)[0]
        for key in dispatch_keys:
            lib.impl(opname, fn, key)
    _STATE["libs"].append(lib)
    return lib


def run_in_subprocess(code: str, *, device: str = "npu", setup: str = "", timeout: float = 900.0,
                      env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter after ``install(device)`` and ``setup`` (e.g. installing
    emulated vendor modules). Returns the completed process (stdout/stderr as text)."""
    prelude = (
        "import torch\n"
        "from v4kernels.testing import fake_device as _fd\n"
        f"_fd.install({device!r})\n"
    )
    full_env = dict(os.environ)
    full_env.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-c", prelude + setup + "\n" + code], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)
