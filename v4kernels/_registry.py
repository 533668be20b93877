"""Kernel registration and per-call dispatch.

Every public operator is one ``torch.library`` custom op (namespace ``v4k``) declared once with
:func:`declare_op`. A call looks at the device of its first tensor argument, walks the backends
that may run on that device in priority order (or the single backend the user forced), and runs
the first kernel that reports no refusal for the arguments. Backends are plug-ins
(``v4kernels/backends/``); their capabilities are data and every refusal is a readable reason,
surfaced by :func:`available_backends` and ``python -m v4kernels info``.

Kernel modules live next to their operator: ``v4kernels/ops/<family>/<backend module>.py``. They
register with :func:`register_kernel` when imported. The reference modules are imported eagerly
(they are the executable spec); every other backend's modules are imported the first time that
backend is consulted, and an import failure becomes a reason instead of an exception.

Two call paths reach a kernel:

* ``torch.ops.v4k.<op>`` (and ``torch.compile`` graphs, fake tensors, autograd): the custom op,
  whose body validates the arguments with the op's ``check`` and dispatches.
* the public functions (``v4kernels.hc_post`` ...) validate first, then call the op handle, which
  in plain eager mode skips the torch dispatcher and jumps to the cached kernel; it takes the
  custom-op path whenever tracing, a dispatch mode or autograd needs to see the op.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import pkgutil
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from .backends import BACKENDS, Backend, Tolerance, get_backend, register_backend, unregister_backend  # noqa: F401


class BackendUnavailableError(RuntimeError):
    """Raised when an explicitly requested backend cannot run a call; the message lists why."""


@functools.cache
def families() -> tuple[str, ...]:
    """Operator families: the sub-packages of ``v4kernels/ops``, in a stable order."""
    from . import ops

    return tuple(sorted(m.name for m in pkgutil.iter_modules(ops.__path__) if m.ispkg))


@dataclass
class KernelEntry:
    fn: Callable[..., Any]
    #: ``refusals(*args) -> list[str]``: why this kernel cannot take these arguments (empty: it can)
    refusals: Callable[..., list[str]] | None = None
    #: the refusals read tensor values; otherwise they depend only on what :func:`signature`
    #: encodes, and dispatch caches their verdict per argument signature
    refusals_read_values: bool = False


# backend name -> op name -> kernel
_KERNELS: dict[str, dict[str, KernelEntry]] = {}
# op name -> schema argument names, and op name -> family; filled by declare_op
_OP_ARGS: dict[str, list[str]] = {}
_OP_FAMILY: dict[str, str] = {}
# op name -> its handle (see Op)
_OPS: dict[str, "Op"] = {}
# set once every family has declared its ops (the reference kernels register while they do)
_ALL_DECLARED = False


def op_family(op: str) -> str:
    return _OP_FAMILY.get(op, "")


def register_kernel(
    backend: str, op: str, *, refusals: Callable[..., list[str]] | None = None, refusals_read_values: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` as ``backend``'s kernel for ``op``.

    ``fn`` takes exactly the op's schema arguments (``docs/op_contracts.md``), already validated.
    ``refusals(*args)`` may return reasons why this kernel cannot handle particular arguments
    (dtype, shape limits); dispatch then moves on to the next backend (or raises, if the backend
    was forced). Refusals may depend only on dtypes, shapes, devices, ``requires_grad`` and scalar
    arguments — dispatch remembers their verdict per argument signature — unless
    ``refusals_read_values=True`` says they read tensor values (then they run on every call).

    Example
    -------
    >>> import v4kernels
    >>> @v4kernels.register_kernel("reference", "rms_norm")   # doctest: +SKIP
    ... def my_rms_norm(x, weight, eps, hf_rounding): ...
    """
    if not isinstance(backend, str) or not backend:
        raise TypeError(f"register_kernel: backend must be a non-empty str, got {backend!r}")
    if _ALL_DECLARED and op not in _OP_ARGS:
        raise ValueError(f"register_kernel: unknown op {op!r}; expected one of {sorted(_OP_ARGS)}")
    if refusals is not None and not callable(refusals):
        raise TypeError(f"register_kernel: refusals must be callable or None, got {type(refusals).__name__}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise TypeError(f"register_kernel: kernel for {op} must be callable, got {type(fn).__name__}")
        _KERNELS.setdefault(backend, {})[op] = KernelEntry(fn, refusals, bool(refusals_read_values))
        clear_dispatch_cache()
        return fn

    return deco


def register_kernels(backend: str, table: dict[str, Callable[..., Any]],
                     refusals: dict[str, Callable[..., list[str]]] | None = None,
                     refusals_read_values: Sequence[str] = ()) -> None:
    """Register a pass-through table ``{op: fn}`` (e.g. native implementation ops) for ``backend``;
    ``refusals_read_values`` names the ops whose refusals read tensor values (see
    :func:`register_kernel`)."""
    refusals = refusals or {}
    unknown = (set(refusals) | set(refusals_read_values)) - set(table)
    if unknown:
        raise ValueError(f"register_kernels: refusals given for ops without a kernel: {sorted(unknown)}")
    for op, fn in table.items():
        register_kernel(backend, op, refusals=refusals.get(op), refusals_read_values=op in refusals_read_values)(fn)


def triton_launch_row(target: str) -> dict[str, dict[str, int]] | None:
    """The Triton launch parameters for ``target`` (a device type, or ``"interpret"``), from the
    backend that declares them (``Backend.triton_blocks``)."""
    for b in BACKENDS.values():
        row = b.triton_blocks.get(target)
        if row is not None:
            return row
    return None


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


# os.environ.get costs about a microsecond (key encoding); on POSIX read the raw mapping directly
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _env_backend() -> str | None:
    if _ENV_DATA is not None:
        v = _ENV_DATA.get(b"V4K_BACKEND")
        return None if v is None else os.fsdecode(v)
    return os.environ.get("V4K_BACKEND")


def forced_backend(op: str) -> str | None:
    """The backend forced for ``op`` by ``use_backend`` (innermost first) or ``V4K_BACKEND``."""
    scope = _FORCED.get()
    env = _env_backend()
    if not scope and not env:
        return None
    for s in (scope, _parse_env(env or "")):
        for target, name in reversed(s):
            if target is None or target == op:
                return name
    return None


@contextlib.contextmanager
def use_backend(name: str, ops: Sequence[str] | str | None = None) -> Iterator[None]:
    """Force ``name`` for every op (or only ``ops``) inside the ``with`` block, in this thread
    (and in tasks started from it: the setting is a context variable).

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
# Per-thread bookkeeping: what ran, usage counts, recordings
# --------------------------------------------------------------------------------------------

_THREAD = threading.local()
_USAGE: contextvars.ContextVar[dict[tuple[str, str], int] | None] = contextvars.ContextVar("v4k_usage", default=None)
_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("v4k_recording", default=None)


def _last_used() -> dict[str, str]:
    d = getattr(_THREAD, "last", None)
    if d is None:
        d = _THREAD.last = {}
    return d


def last_backend(op: str) -> str | None:
    """Name of the backend that ran the most recent call of ``op`` in this thread."""
    return _last_used().get(op)


@contextlib.contextmanager
def track_usage() -> Iterator[dict[tuple[str, str], int]]:
    """Count ``(op, backend)`` calls made in this thread inside the block.

    Counting costs a dict update per call, so it happens only inside this block (or
    :func:`record_calls`). Nested blocks each count their own calls.

    Example
    -------
    >>> import torch, v4kernels
    >>> with v4kernels.track_usage() as usage:
    ...     _ = v4kernels.rms_norm(torch.randn(2, 8), None)
    >>> sum(n for (op, _), n in usage.items() if op == "rms_norm")
    1
    """
    counts: dict[tuple[str, str], int] = {}
    parent = _USAGE.get()
    token = _USAGE.set(counts)
    try:
        yield counts
    finally:
        _USAGE.reset(token)
        if parent is not None:
            for k, n in counts.items():
                parent[k] = parent.get(k, 0) + n


def backend_usage(reset: bool = False) -> dict[tuple[str, str], int]:
    """Counts of ``(op, backend)`` calls in the innermost :func:`track_usage` block of this thread
    (empty outside one); ``reset=True`` zeroes them after reading."""
    counts = _USAGE.get()
    if counts is None:
        return {}
    out = dict(counts)
    if reset:
        counts.clear()
    return out


@contextlib.contextmanager
def record_calls() -> Iterator[list[tuple[str, str, tuple[Any, ...], Any]]]:
    """Record ``(op, backend, copied schema args, outputs)`` of every call made in this thread
    inside the block (used to re-check a real workload op by op against the reference on
    identical inputs). Calls are also counted as by :func:`track_usage`."""
    calls: list[tuple[str, str, tuple[Any, ...], Any]] = []
    token = _RECORDING.set(calls)
    try:
        with track_usage():
            yield calls
    finally:
        _RECORDING.reset(token)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def _device_type(args: Sequence[Any]) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    return b.device.type
    for a in args:
        if isinstance(a, torch.device):
            return a.type
    return "cpu"


def candidates(op: str, device_type: str) -> list[Backend]:
    """Backends that may run ``op`` automatically on ``device_type``, best first."""
    bs = [b for b in BACKENDS.values() if device_type in b.auto_priority]
    return sorted(bs, key=lambda b: b.auto_priority[device_type])


# (op, device type, forced backend or None) -> backends whose argument-independent checks pass,
# in priority order, with their kernels. Availability does not change within a process (probes
# and extension loads are cached), so only the kernels' `refusals` run per call.
_PLAN: dict[tuple[str, str, str | None], list[tuple[Backend, KernelEntry]]] = {}


def clear_dispatch_cache() -> None:
    """Forget cached backend plans and routes (after registering kernels or backends at run time)."""
    _PLAN.clear()
    for op in _OPS.values():
        op._routes.clear()


def _plan(op: str, device_type: str, forced: str | None) -> list[tuple[Backend, KernelEntry]]:
    key = (op, device_type, forced)
    plan = _PLAN.get(key)
    if plan is None:
        backends = [get_backend(forced)] if forced is not None else candidates(op, device_type)
        plan = []
        for b in backends:
            if not b.op_reasons(op, device_type, forced=forced is not None):
                plan.append((b, b.kernel(op)))
        _PLAN[key] = plan
    return plan


def select_backend(op: str, args: Sequence[Any], device_type: str | None = None) -> tuple[Backend, KernelEntry]:
    if device_type is None:
        device_type = _device_type(args)
    forced = forced_backend(op)
    for b, entry in _plan(op, device_type, forced):
        if entry.refusals is None or not entry.refusals(*args):
            return b, entry
    # nothing can run: recompute the reasons in full for the error message
    if forced is not None:
        reasons = get_backend(forced).call_reasons(op, tuple(args), device_type, forced=True)
        raise BackendUnavailableError(
            f"backend {forced!r} was requested for {op} on {device_type} but cannot run it: " + "; ".join(reasons)
        )
    tried = [f"{b.name}: {'; '.join(b.call_reasons(op, tuple(args), device_type, forced=False))}"
             for b in candidates(op, device_type)]
    raise BackendUnavailableError(f"no backend can run {op} on {device_type}: " + " | ".join(tried))


def _forcing() -> bool:
    """Whether a ``use_backend`` scope or ``V4K_BACKEND`` may force a backend (cheap test)."""
    if _FORCED.get():
        return True
    if _ENV_DATA is not None:
        return b"V4K_BACKEND" in _ENV_DATA
    return bool(_env_backend())


def _run(op: str, args: tuple, device_type: str | None = None, routes: dict | None = None,
         key: bytes | tuple | None = None) -> Any:
    """Select the backend for ``args`` and run its kernel. With ``routes`` and a signature ``key``,
    a selection that depends on nothing but the signature is remembered there (see :class:`Op`)."""
    if device_type is None:
        device_type = _device_type(args)
    forced = forced_backend(op) if _forcing() else None
    plan = _PLAN.get((op, device_type, forced))
    if plan is None:
        plan = _plan(op, device_type, forced)
    by_signature = forced is None
    for backend, entry in plan:
        if entry.refusals is None:
            break
        by_signature = by_signature and not entry.refusals_read_values
        if not entry.refusals(*args):
            break
    else:
        backend, entry = select_backend(op, args, device_type)  # raises with every reason
    if routes is not None and key is not None and by_signature:
        if len(routes) >= _MAX_SIGNATURES:
            routes.clear()
        routes[key] = (backend.name, entry)
    last = getattr(_THREAD, "last", None)
    if last is None:
        last = _last_used()
    last[op] = backend.name
    usage = _USAGE.get()
    if usage is not None:
        key = (op, backend.name)
        usage[key] = usage.get(key, 0) + 1
        recording = _RECORDING.get()
        if recording is not None:
            # inputs are copied before the call: callers may update them in place afterwards
            saved = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            out = entry.fn(*args)
            recording.append((op, backend.name, saved, out))
            return out
    return entry.fn(*args)


def dispatch(op: str, *args: Any) -> Any:
    """Run ``op`` on already validated schema arguments through the backend selection."""
    return _run(op, args)


_MAX_SIGNATURES = 1024
#: torch.device -> its type string (reading ``.type`` allocates a str each time)
_DEVICE_TYPES: dict[torch.device, str] = {}
_Tensor = torch.Tensor
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_SCALARS = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _py_signature(args: Sequence[Any], depth: int = 0) -> tuple | None:
    key: list[Any] = [torch.is_grad_enabled()] if depth == 0 else []
    for a in args:
        t = type(a)
        if t in _PLAIN_TENSORS:
            key.append((a.dtype, a.shape, a.device, a.requires_grad))
        elif t in _SCALARS:
            key.append((t, a))
        elif (t is list or t is tuple) and depth < 2:
            inner = _py_signature(a, depth + 1)
            if inner is None:
                return None
            key.append((t, inner))
        else:
            return None
    return tuple(key)


def signature(args: tuple) -> bytes | tuple | None:
    """The key under which an op call's structural checks and backend selection are remembered:
    grad mode, and per schema argument its kind plus, for a tensor, dtype, device, shape and
    ``requires_grad``, for a scalar its type and value (``True`` and ``1`` differ). Strides and
    tensor values are not part of it. None when an argument has no key (tensor subclasses, other
    objects): such calls are checked and dispatched in full every time."""
    return _sig(args)


def _load_native_sig(args: tuple) -> bytes | tuple | None:
    """First call of ``_sig``: switch to the CPU extension's helpers (``csrc/cpu/fastpath.cpp``:
    the same key as bytes, and the index bounds of value checks, in a fraction of the time) when
    it is built, else keep the pure-Python versions. Done on first use, not at import, so that
    importing v4kernels loads no native library."""
    global _sig
    _sig = _py_signature
    try:
        from . import _C_cpu  # noqa: PLC0415
    except Exception:  # noqa: BLE001 - not built, or built for another CPU: keep the Python helpers
        return _sig(args)
    from . import _checks

    _checks.native_index_bounds = _C_cpu.index_bounds
    _sig = _C_cpu.signature
    return _sig(args)


_sig: Callable[[tuple], bytes | tuple | None] = _load_native_sig


_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack


class Op:
    """Handle of one declared op: calling it runs the op on validated schema arguments.

    In plain eager mode it goes straight to the cached kernel (no torch dispatcher round trip);
    under ``torch.compile``, a dispatch mode (fake tensors, functionalisation), on meta tensors or
    when autograd must see the call, it calls the custom op ``torch.ops.v4k.<name>``.
    """

    __slots__ = ("name", "family", "overload", "check", "value_check", "memoize", "differentiable", "_tensor_pos",
                 "_validated", "_routes", "plain")

    def __init__(self, name: str, family: str, overload: Any, check: Callable[..., None] | None,
                 value_check: Callable[..., None] | None, memoize: bool, differentiable: bool,
                 tensor_pos: tuple[int, ...]) -> None:
        self.name, self.family, self.overload, self.check = name, family, overload, check
        self.value_check, self.memoize = value_check, memoize
        self.differentiable = differentiable
        self._tensor_pos = tensor_pos
        self._validated: set = set()
        #: signature -> (backend name, kernel entry), or (None, custom op) for calls autograd or a
        #: meta tensor must route through ``torch.ops.v4k``
        self._routes: dict = {}
        #: signatures for which the public function found that the arguments need no conversion
        #: and no special case (empty inputs ...): it may pass them straight on (see :meth:`remember_plain`)
        self.plain: set = set()

    def validate(self, *args: Any) -> bytes | tuple | None:
        """Run the op's checks on schema arguments and return their :func:`signature`. With
        ``memoize``, the structural checks (types, dtypes, shapes, devices, scalars) run once per
        distinct signature; checks that read tensor values (``value_check``) run on every call."""
        if _is_compiling():
            # traced by torch.compile: the checks run on the traced arguments (the custom op the
            # handle calls then checks the real ones, values included, when the graph runs)
            if self.check is not None:
                self.check(*args)
            return None
        key = _sig(args)
        if self.check is not None:
            if not self.memoize or key is None:
                self.check(*args)
            elif key not in self._validated:
                self.check(*args)
                if len(self._validated) >= _MAX_SIGNATURES:
                    self._validated.clear()
                self._validated.add(key)
        if self.value_check is not None:
            self.value_check(*args)
        return key

    def __call__(self, *args: Any) -> Any:
        if _is_compiling() or _dispatch_modes():
            return self.overload(*args)
        return self.run_as(_sig(args), *args)

    def run_as(self, key: bytes | tuple | None, *args: Any) -> Any:
        """:meth:`__call__` with the signature already known: ``key`` is what :meth:`validate`
        returned for the arguments as the caller received them. A public function may pass
        arguments made contiguous or converted from them, as long as the conversion depends on
        nothing but that signature (a dtype cast, ``.contiguous()``), so that one key keeps
        naming one route."""
        if _is_compiling() or _dispatch_modes():
            return self.overload(*args)
        route = self._routes.get(key)
        # (inlined _forcing(): on POSIX a scope or V4K_BACKEND sends the call down the full path)
        if route is not None and not _FORCED.get() and _ENV_DATA is not None and b"V4K_BACKEND" not in _ENV_DATA:
            backend, entry = route
            if backend is None:
                return entry(*args)
            usage = _USAGE.get()
            if usage is None or _RECORDING.get() is None:
                last = getattr(_THREAD, "last", None)
                if last is None:
                    last = _last_used()
                last[self.name] = backend
                if usage is not None:
                    k = (self.name, backend)
                    usage[k] = usage.get(k, 0) + 1
                return entry.fn(*args)
        return self._call(args, key)

    def remember_plain(self, key: bytes | tuple | None) -> None:
        """Record that calls with signature ``key`` need no argument conversion or special case in
        the public function (a fact of dtypes and shapes alone)."""
        if key is not None:
            if len(self.plain) >= _MAX_SIGNATURES:
                self.plain.clear()
            self.plain.add(key)

    def _call(self, args: tuple, key: bytes | tuple | None) -> Any:
        """The full path of :meth:`__call__`: find the device, send calls that autograd, a tensor
        subclass or a meta tensor must see through the custom op, otherwise select the kernel
        (remembering a signature-determined choice) and run it."""
        device_type = None
        for i in self._tensor_pos:
            t = args[i]
            if t is not None:
                if type(t) is not _Tensor and type(t).__torch_dispatch__ is not _Tensor.__torch_dispatch__:
                    return self.overload(*args)  # tensor subclasses with their own dispatch see the op
                dev = t.device
                device_type = _DEVICE_TYPES.get(dev)
                if device_type is None:
                    device_type = _DEVICE_TYPES[dev] = dev.type  # torch.device.type builds a new str
                break
        if torch.is_grad_enabled():
            for i in self._tensor_pos:
                t = args[i]
                if t is not None and t.requires_grad:
                    return self._through_custom_op(args, key)
        if device_type is None:
            device_type = _device_type(args)
        elif device_type == "meta":
            return self._through_custom_op(args, key)
        return _run(self.name, args, device_type, self._routes, key)

    def _through_custom_op(self, args: tuple, key: bytes | tuple | None) -> Any:
        if key is not None:
            if len(self._routes) >= _MAX_SIGNATURES:
                self._routes.clear()
            self._routes[key] = (None, self.overload)
        return self.overload(*args)

    def __repr__(self) -> str:
        return f"<v4kernels op {self.name}>"


_LIB = torch.library.Library("v4k", "DEF")
#: The implementation schemas: ``v4k_impl::<op>`` has exactly the schema of ``v4k::<op>`` and no
#: Python body. Native libraries implement it per dispatch key
#: (``TORCH_LIBRARY_IMPL(v4k_impl, CPU | CUDA | PrivateUse1, m)``) and never restate it; their
#: Python adapters register ``torch.ops.v4k_impl.<op>`` as the backend's kernel (see
#: :func:`native_kernels`).
_IMPL_LIB = torch.library.Library("v4k_impl", "DEF")


def _tensor_positions(schema: torch._C.FunctionSchema) -> tuple[int, ...]:
    pos = []
    for i, a in enumerate(schema.arguments):
        t = a.type
        if isinstance(t, torch._C.TensorType) or (isinstance(t, torch._C.OptionalType)
                                                  and isinstance(t.getElementType(), torch._C.TensorType)):
            pos.append(i)
    return tuple(pos)


def _requires_grad(args: Sequence[Any]) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return True
        if isinstance(a, (list, tuple)) and any(isinstance(b, torch.Tensor) and b.requires_grad for b in a):
            return True
    return False


def declare_op(
    family: str,
    name: str,
    schema: str,
    fake: Callable[..., Any],
    *,
    check: Callable[..., None] | None = None,
    value_check: Callable[..., None] | None = None,
    memoize_checks: bool = False,
    autograd: tuple[Callable[..., Any], Callable[..., Any]] | None = None,
) -> Op:
    """Define ``v4k::<name><schema>``, the one declaration of an op every backend implements.

    ``fake`` computes output metadata for FakeTensor/meta tracing (torch.compile, graph capture).
    ``check(*schema_args)`` validates arguments and raises ``TypeError``/``ValueError``; it runs
    inside the custom op, so ``torch.ops.v4k.<name>`` rejects bad input exactly like the public
    function. ``value_check(*schema_args)`` holds the checks that read tensor values (index ranges);
    ``memoize_checks=True`` lets :meth:`Op.validate` skip ``check`` for an argument signature it
    has already accepted (only for checks that depend on nothing but dtypes, shapes, devices and
    scalar values). ``autograd=(backward, setup_context)`` registers a backward
    (``torch.library.register_autograd``); without it a call that needs gradients raises
    at forward time instead of silently producing ``None`` gradients.
    Returns the op handle (see :class:`Op`).
    """
    _LIB.define(f"{name}{schema}")
    _IMPL_LIB.define(f"{name}{schema}")
    parsed = torch._C.parse_schema(f"v4k::{name}{schema}")
    arg_names = [a.name for a in parsed.arguments]
    _OP_ARGS[name] = arg_names
    _OP_FAMILY[name] = family

    def impl(*args: Any, **kwargs: Any) -> Any:
        if kwargs:
            args = args + tuple(kwargs[n] for n in arg_names[len(args):])
        _OPS[name].validate(*args)
        return _run(name, args)

    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"v4k::{name}", fake, lib=_LIB)
    overload = getattr(torch.ops.v4k, name).default
    if autograd is not None:
        backward, setup_context = autograd
        torch.library.register_autograd(f"v4k::{name}", backward, setup_context=setup_context, lib=_LIB)
    else:
        def no_backward(*args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled() and (_requires_grad(args) or _requires_grad(tuple(kwargs.values()))):
                raise RuntimeError(
                    f"{name} has no backward: an input requires grad; call it under torch.no_grad() or "
                    f"torch.inference_mode(), or detach the inputs"
                )
            with torch._C._AutoDispatchBelowAutograd():
                return overload(*args, **kwargs)

        _LIB.impl(name, no_backward, "Autograd")
    op = Op(name, family, overload, check, value_check, memoize_checks, autograd is not None, _tensor_positions(parsed))
    _OPS[name] = op
    return op


def native_kernels(dispatch_key: str) -> dict[str, Callable[..., Any]]:
    """``{op: torch.ops.v4k_impl.<op>}`` for every op a loaded native library implements on
    ``dispatch_key`` (``"CPU"``, ``"CUDA"``, ``"PrivateUse1"``): the pass-through table a native
    backend registers with :func:`register_kernels`."""
    out = {}
    for op in _OP_ARGS:
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"v4k_impl::{op}", dispatch_key):
            out[op] = getattr(torch.ops.v4k_impl, op).default
    return out


def device_type_of(device: str | torch.device) -> str:
    """``"npu"`` for ``"npu:1"`` or ``torch.device("npu", 1)``; works for device types this
    process has not registered (``torch.device("npu")`` raises until torch_npu is imported)."""
    if isinstance(device, torch.device):
        return device.type
    if not isinstance(device, str) or not device:
        raise TypeError(f"device must be a str or torch.device, got {device!r}")
    return device.split(":", 1)[0]


def available_backends(op: str | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Which backends can run ``op`` (or each op) on ``device``, with reasons for the rest.

    Returns ``{backend: [reasons]}`` for one op (an empty list means usable), or
    ``{op: {backend: [reasons]}}`` when ``op`` is None. Backends that run on a device only when
    forced (Triton on CPU through the interpreter) are reported as if forced.
    """
    device_type = device_type_of(device)
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


def reference_kernel(op: str) -> Callable[..., Any]:
    """The reference implementation of ``op`` (always importable)."""
    return _KERNELS["reference"][op].fn
