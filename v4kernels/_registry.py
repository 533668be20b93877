"""Backends, kernel registration and per-call dispatch.

Every public operator is one ``torch.library`` custom op (namespace ``v4k``) whose body is
:func:`dispatch`. Dispatch looks at the device of the first tensor argument, walks the backends
that may run on that device in priority order (or the single backend the user forced), and calls
the first kernel that reports no reasons against the arguments. Capabilities are data on the
backend classes; every refusal is a readable reason, surfaced by :func:`available_backends` and
``python -m v4kernels info``.

Kernel modules live next to their operator: ``v4kernels/ops/<family>/<backend>.py``. They register
with :func:`register_kernel` when imported. The reference modules are imported eagerly (they are
the executable spec); every other backend's modules are imported the first time that backend is
consulted, and an import failure becomes a reason instead of an exception.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch

from . import _platform
from ._ext import build_info, load_extension

#: Operator families, one folder each under ``v4kernels/ops``.
FAMILIES: tuple[str, ...] = (
    "quant",
    "rope_norm",
    "compressor",
    "indexer",
    "indices",
    "attention",
    "mhc",
    "moe",
)


class BackendUnavailableError(RuntimeError):
    """Raised when an explicitly requested backend cannot run a call; the message lists why."""


@dataclass(frozen=True)
class Tolerance:
    """Per-dtype error budget of a backend relative to the reference."""

    atol: float
    rtol: float
    cos_min: float = 0.9999


@dataclass
class KernelEntry:
    fn: Callable[..., Any]
    refusals: Callable[..., list[str]] | None = None


# backend name -> op name -> kernel
_KERNELS: dict[str, dict[str, KernelEntry]] = {}
# op name -> list of argument names (from the schema), filled by declare_op
_OP_ARGS: dict[str, list[str]] = {}


def register_kernel(
    backend: str, op: str, *, refusals: Callable[..., list[str]] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` as ``backend``'s kernel for ``op``.

    ``fn`` takes exactly the op's schema arguments. ``refusals(*args)`` may return reasons why
    this kernel cannot handle particular arguments (dtype, shape limits); dispatch then moves on
    to the next backend (or raises, if the backend was forced).
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _KERNELS.setdefault(backend, {})[op] = KernelEntry(fn, refusals)
        _PLAN.clear()
        return fn

    return deco


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


class Backend:
    """A family of kernels for some device types; capabilities are class attributes."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: device type -> priority when chosen automatically (lower runs first)
    auto_priority: ClassVar[dict[str, int]] = {}
    #: device types where the backend runs only when forced
    forced_only_devices: ClassVar[frozenset[str]] = frozenset()
    #: the module name of this backend inside each ``ops/<family>/`` folder
    module: ClassVar[str]
    #: per output dtype error budget against the reference
    tolerances: ClassVar[dict[torch.dtype, Tolerance]] = {}

    def __init__(self) -> None:
        self._load_errors: dict[str, str] | None = None

    # -- availability -----------------------------------------------------------------------
    def backend_reasons(self, device_type: str) -> list[str]:
        """Reasons this backend cannot run anything on ``device_type`` (empty if it can)."""
        return []

    def device_reasons(self, device_type: str, forced: bool) -> list[str]:
        if device_type in self.auto_priority:
            return []
        if device_type in self.forced_only_devices:
            if forced:
                return []
            return [f"{self.name} runs on {device_type} tensors only when forced (use_backend/V4K_BACKEND)"]
        devs = sorted(set(self.auto_priority) | set(self.forced_only_devices))
        return [f"{self.name} does not run on {device_type} tensors (runs on: {', '.join(devs) or 'none'})"]

    def load(self) -> dict[str, str]:
        """Import this backend's kernel modules once; returns {family: import error}."""
        if self._load_errors is None:
            errors: dict[str, str] = {}
            for fam in FAMILIES:
                modname = f"v4kernels.ops.{fam}.{self.module}"
                if importlib.util.find_spec(modname) is None:
                    continue
                try:
                    importlib.import_module(modname)
                except Exception as e:  # noqa: BLE001 - recorded as a reason, shown by `info`
                    errors[fam] = f"{modname} failed to import: {type(e).__name__}: {e}"
            self._load_errors = errors
        return self._load_errors

    def kernel(self, op: str) -> KernelEntry | None:
        self.load()
        return _KERNELS.get(self.name, {}).get(op)

    def op_reasons(self, op: str, device_type: str, forced: bool = False) -> list[str]:
        """Reasons this backend cannot run ``op`` on ``device_type``, ignoring argument values."""
        reasons = self.device_reasons(device_type, forced)
        if reasons:
            return reasons
        reasons = self.backend_reasons(device_type)
        if reasons:
            return reasons
        if self.kernel(op) is None:
            fam = _OP_FAMILY.get(op)
            err = self.load().get(fam or "")
            if err:
                return [err]
            return [f"no {self.name} kernel for {op} yet"]
        return []

    def call_reasons(self, op: str, args: Sequence[Any], device_type: str, forced: bool) -> list[str]:
        reasons = self.op_reasons(op, device_type, forced)
        if reasons:
            return reasons
        entry = self.kernel(op)
        assert entry is not None
        return list(entry.refusals(*args)) if entry.refusals is not None else []


class ReferenceBackend(Backend):
    name = "reference"
    description = "pure PyTorch, fp32 math; the executable specification (any device)"
    auto_priority = {"cpu": 100, "cuda": 100, "npu": 100, "mlu": 100, "meta": 100}
    module = "reference"
    tolerances = {
        torch.float32: Tolerance(0.0, 0.0, 1.0),
        torch.bfloat16: Tolerance(0.0, 0.0, 1.0),
        torch.float16: Tolerance(0.0, 0.0, 1.0),
    }

    def device_reasons(self, device_type: str, forced: bool) -> list[str]:
        return []


class TritonBackend(Backend):
    name = "triton"
    description = "Triton kernels (NVIDIA GPUs, Triton-Ascend on NPUs; CPU via TRITON_INTERPRET=1 when forced)"
    auto_priority = {"cuda": 20, "npu": 30}
    forced_only_devices = frozenset({"cpu"})
    module = "triton"
    tolerances = {
        torch.float32: Tolerance(2e-5, 2e-5, 0.99999),
        torch.bfloat16: Tolerance(1e-2, 1.6e-2, 0.9999),
        torch.float16: Tolerance(2e-3, 2e-3, 0.9999),
    }

    def backend_reasons(self, device_type: str) -> list[str]:
        p = _platform.triton_probe()
        if not p.ok:
            return [p.detail]
        if device_type == "cpu" and not _platform.triton_interpret():
            return ["triton on cpu tensors needs TRITON_INTERPRET=1 set before importing v4kernels"]
        if device_type == "cuda" and not _platform.cuda_probe().ok:
            return [_platform.cuda_probe().detail]
        if device_type == "npu":
            try:
                import triton.backends  # noqa: F401

                if importlib.util.find_spec("triton.backends.ascend") is None:
                    return ["installed triton has no Ascend backend (Triton-Ascend not installed)"]
            except ImportError as e:
                return [f"triton backends not importable: {e}"]
        return []


class CpuBackend(Backend):
    name = "cpu"
    description = "native C++ kernels (OpenMP, AVX2/AVX-512 fp32 math on bf16/FP8/FP4 storage)"
    auto_priority = {"cpu": 10}
    module = "cpu"
    tolerances = {
        torch.float32: Tolerance(1e-5, 1e-5, 0.99999),
        torch.bfloat16: Tolerance(1e-2, 1.6e-2, 0.9999),
        torch.float16: Tolerance(2e-3, 2e-3, 0.9999),
    }

    def backend_reasons(self, device_type: str) -> list[str]:
        # Check the ISA the extension was compiled for before loading it: a binary built for
        # AVX-512 must not even be imported on a CPU without it.
        missing = _platform.missing_cpu_features(build_info().get("cpu_isa", ""))
        if missing:
            return [f"v4kernels._C_cpu was built for {build_info().get('cpu_isa')} but this CPU lacks {', '.join(missing)}; "
                    "rebuild with V4K_CPU_ISA=avx2 or baseline"]
        p = load_extension("_C_cpu", "cpu")
        return [] if p.ok else [p.detail]


class CudaBackend(Backend):
    name = "cuda"
    description = "native CUDA kernels (csrc/cuda)"
    auto_priority = {"cuda": 10}
    module = "cuda"
    tolerances = TritonBackend.tolerances

    def backend_reasons(self, device_type: str) -> list[str]:
        p = _platform.cuda_probe()
        if not p.ok:
            return [p.detail]
        e = load_extension("_C_cuda", "cuda")
        return [] if e.ok else [e.detail]


class AscendBackend(Backend):
    name = "ascend"
    description = "Huawei Ascend: torch_npu fused ops (csrc/ascend)"
    auto_priority = {"npu": 10}
    module = "ascend"
    tolerances = TritonBackend.tolerances

    def backend_reasons(self, device_type: str) -> list[str]:
        p = _platform.npu_probe()
        return [] if p.ok else [p.detail]


class CambriconBackend(Backend):
    name = "cambricon"
    description = "Cambricon MLU: torch_mlu / torch_mlu_ops fused ops (csrc/cambricon)"
    auto_priority = {"mlu": 10}
    module = "cambricon"
    tolerances = TritonBackend.tolerances

    def backend_reasons(self, device_type: str) -> list[str]:
        p = _platform.mlu_probe()
        return [] if p.ok else [p.detail]


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        ReferenceBackend(),
        TritonBackend(),
        CpuBackend(),
        CudaBackend(),
        AscendBackend(),
        CambriconBackend(),
    )
}
_OP_FAMILY: dict[str, str] = {}


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}") from None


# --------------------------------------------------------------------------------------------
# Forcing a backend
# --------------------------------------------------------------------------------------------

_FORCED: contextvars.ContextVar[tuple[tuple[str | None, str], ...]] = contextvars.ContextVar(
    "v4k_forced", default=()
)


@functools.lru_cache(maxsize=16)
def _parse_env(value: str) -> tuple[tuple[str | None, str], ...]:
    """``V4K_BACKEND=cpu`` or ``V4K_BACKEND=sparse_attn=cpu,indexer_topk=triton``."""
    out: list[tuple[str | None, str]] = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        op, _, name = part.rpartition("=")
        get_backend(name)
        out.append((op or None, name))
    return tuple(out)


def forced_backend(op: str) -> str | None:
    """The backend forced for ``op`` by ``use_backend`` (innermost first) or ``V4K_BACKEND``."""
    for scope in (_FORCED.get(), _parse_env(os.environ.get("V4K_BACKEND", ""))):
        for target, name in reversed(scope):
            if target is None or target == op:
                return name
    return None


@contextlib.contextmanager
def use_backend(name: str, ops: Sequence[str] | str | None = None) -> Iterator[None]:
    """Force ``name`` for every op (or only ``ops``) inside the ``with`` block.

    A forced backend that cannot run a call raises :class:`BackendUnavailableError` listing its
    reasons; it never silently falls back.

    Example
    -------
    >>> import torch, v4kernels
    >>> with v4kernels.use_backend("reference"):
    ...     y = v4kernels.rms_norm(torch.randn(2, 8), None)
    """
    get_backend(name)
    if isinstance(ops, str):
        ops = [ops]
    for op in ops or ():
        if op not in _OP_ARGS:
            raise ValueError(f"use_backend: unknown op {op!r}; expected one of {sorted(_OP_ARGS)}")
    add = tuple((op, name) for op in ops) if ops else ((None, name),)
    token = _FORCED.set(_FORCED.get() + add)
    try:
        yield
    finally:
        _FORCED.reset(token)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

_LAST_USED: dict[str, str] = {}
_USAGE: dict[tuple[str, str], int] = {}


def _device_type(args: Sequence[Any]) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    return b.device.type
    return "cpu"


def candidates(op: str, device_type: str) -> list[Backend]:
    """Backends that may run ``op`` automatically on ``device_type``, best first."""
    bs = [b for b in BACKENDS.values() if device_type in b.auto_priority]
    return sorted(bs, key=lambda b: b.auto_priority[device_type])


# (op, device type, forced backend or None) -> backends whose argument-independent checks pass,
# in priority order, with their kernels. Availability does not change within a process (probes
# and extension loads are cached), so only the kernels' `refusals` checks run per call.
_PLAN: dict[tuple[str, str, str | None], list[tuple[Backend, KernelEntry]]] = {}


def clear_dispatch_cache() -> None:
    """Forget cached backend plans (after registering kernels or backends at run time)."""
    _PLAN.clear()


def _plan(op: str, device_type: str, forced: str | None) -> list[tuple[Backend, KernelEntry]]:
    key = (op, device_type, forced)
    plan = _PLAN.get(key)
    if plan is None:
        backends = [BACKENDS[forced]] if forced is not None else candidates(op, device_type)
        plan = []
        for b in backends:
            if not b.op_reasons(op, device_type, forced=forced is not None):
                entry = b.kernel(op)
                assert entry is not None
                plan.append((b, entry))
        _PLAN[key] = plan
    return plan


def select_backend(op: str, args: Sequence[Any]) -> tuple[Backend, KernelEntry]:
    device_type = _device_type(args)
    forced = forced_backend(op)
    for b, entry in _plan(op, device_type, forced):
        if entry.refusals is None or not entry.refusals(*args):
            return b, entry
    # nothing can run: recompute the reasons in full for the error message
    if forced is not None:
        reasons = BACKENDS[forced].call_reasons(op, args, device_type, forced=True)
        raise BackendUnavailableError(
            f"backend {forced!r} was requested for {op} on {device_type} but cannot run it: " + "; ".join(reasons)
        )
    tried = [f"{b.name}: {'; '.join(b.call_reasons(op, args, device_type, forced=False))}" for b in candidates(op, device_type)]
    raise BackendUnavailableError(f"no backend can run {op} on {device_type}: " + " | ".join(tried))


def dispatch(op: str, *args: Any) -> Any:
    backend, entry = select_backend(op, args)
    _LAST_USED[op] = backend.name
    key = (op, backend.name)
    _USAGE[key] = _USAGE.get(key, 0) + 1
    if _RECORDING is not None:
        # inputs are copied before the call: callers may update them in place afterwards
        saved = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        out = entry.fn(*args)
        _RECORDING.append((op, backend.name, saved, out))
        return out
    return entry.fn(*args)


_RECORDING: list[tuple[str, str, tuple[Any, ...], Any]] | None = None


@contextlib.contextmanager
def record_calls() -> Iterator[list[tuple[str, str, tuple[Any, ...], Any]]]:
    """Record ``(op, backend, copied schema args, outputs)`` of every dispatched call in the block
    (used to re-check a real workload op by op against the reference on identical inputs)."""
    global _RECORDING
    prev, _RECORDING = _RECORDING, []
    try:
        yield _RECORDING
    finally:
        _RECORDING = prev


def last_backend(op: str) -> str | None:
    """Name of the backend that ran the most recent call of ``op`` in this process."""
    return _LAST_USED.get(op)


def backend_usage(reset: bool = False) -> dict[tuple[str, str], int]:
    """Counts of (op, backend) calls since the last reset."""
    out = dict(_USAGE)
    if reset:
        _USAGE.clear()
    return out


def available_backends(op: str | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Which backends can run ``op`` (or each op) on ``device``, with reasons for the rest.

    Returns ``{backend: [reasons]}`` for one op (an empty list means usable), or
    ``{op: {backend: [reasons]}}`` when ``op`` is None. Backends that run on a device only when
    forced (Triton on CPU through the interpreter) are reported as if forced.
    """
    device_type = torch.device(device).type
    ops = [op] if op is not None else sorted(_OP_ARGS)
    for o in ops:
        if o not in _OP_ARGS:
            raise ValueError(f"available_backends: unknown op {o!r}; expected one of {sorted(_OP_ARGS)}")
    table = {
        o: {name: b.op_reasons(o, device_type, forced=device_type in b.forced_only_devices) for name, b in BACKENDS.items()}
        for o in ops
    }
    return table[op] if op is not None else table


def op_names() -> list[str]:
    return sorted(_OP_ARGS)


# --------------------------------------------------------------------------------------------
# Declaring operators
# --------------------------------------------------------------------------------------------

_LIB = torch.library.Library("v4k", "DEF")


def declare_op(family: str, name: str, schema: str, fake: Callable[..., Any]) -> Any:
    """Define ``v4k::<name><schema>`` whose implementation is :func:`dispatch`.

    ``fake`` computes output metadata for FakeTensor/meta tracing (torch.compile, graph capture).
    Returns the ``OpOverload`` (``torch.ops.v4k.<name>.default``).
    """
    _LIB.define(f"{name}{schema}")
    arg_names = [a.name for a in torch._C.parse_schema(f"v4k::{name}{schema}").arguments]
    _OP_ARGS[name] = arg_names
    _OP_FAMILY[name] = family

    def impl(*args: Any, **kwargs: Any) -> Any:
        if kwargs:
            args = args + tuple(kwargs[n] for n in arg_names[len(args):])
        return dispatch(name, *args)

    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"v4k::{name}", fake, lib=_LIB)
    return getattr(torch.ops.v4k, name).default


def reference_kernel(op: str) -> Callable[..., Any]:
    """The reference implementation of ``op`` (always importable)."""
    entry = _KERNELS["reference"][op]
    return entry.fn
