"""The backend base class: everything a backend is, as data plus a few overridable methods.

A backend is one file in this package (or an out-of-tree module named by a ``v4kernels.backends``
entry point) defining a :class:`Backend` subclass and exposing an instance as ``BACKEND``. Its
kernels live beside each operator, in ``v4kernels/ops/<family>/<module>.py``, and register with
:func:`v4kernels.register_kernel`. See ``README.md`` in this folder.

Backend modules import nothing from the rest of v4kernels at import time (only this module and
torch), so ``setup.py`` can run their build hooks without importing the package.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class Tolerance:
    """Per-dtype error budget of a backend relative to the reference: ``|a-e| <= atol + rtol·|e|``
    elementwise and cosine similarity >= ``cos_min`` per case."""

    atol: float
    rtol: float
    cos_min: float = 0.9999


#: the tolerance table every GPU-class backend starts from (bf16 outputs: one bf16 ulp plus slack)
ACCELERATOR_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(2e-5, 2e-5, 0.99999),
    torch.bfloat16: Tolerance(1e-2, 1.6e-2, 0.9999),
    torch.float16: Tolerance(2e-3, 2e-3, 0.9999),
}


def launch_row(base: dict[str, dict[str, int]], **overrides: dict[str, int]) -> dict[str, dict[str, int]]:
    """A Triton launch row that differs from ``base`` only in the given kernels' parameters, e.g.
    ``launch_row(CUDA_TRITON_BLOCKS, attn={"SPLIT_MIN": 512})``; every kernel of ``base`` is kept."""
    unknown = set(overrides) - set(base)
    if unknown:
        raise KeyError(f"launch_row: kernels {sorted(unknown)} are not in the base row")
    return {k: {**params, **overrides.get(k, {})} for k, params in base.items()}


@dataclass
class BuildContext:
    """What ``setup.py`` hands to each backend's build hook."""

    root: str  # repository root (sources are relative to it)
    flag: Any  # flag(name) -> str | None: an environment switch, "" counted as unset
    record: Any  # record(key, text): what happened, stored in v4kernels/_build_info.json


class Backend:
    """A set of kernels for some device types. Subclasses set the class attributes.

    Class attributes
    ----------------
    name : unique backend name (``use_backend(name)``, ``V4K_BACKEND=name``)
    description : one line for ``info``
    auto_priority : ``{device_type: priority}`` where the backend is chosen automatically (lower first)
    forced_only_devices : device types where it runs only when forced
    module : the kernel module name inside each ``ops/<family>/`` folder (default: ``name``)
    tolerances : ``{torch dtype: Tolerance}`` against the reference, per output dtype
    verification : how its kernels are verified, shown in the support matrix
    extension : the native extension module (``"_C_cpu"`` → ``v4kernels._C_cpu``), or None
    follows_nan_policy : whether its kernels implement docs/numerics.md (the NaN/inf parity cases
        are skipped, with that reason, for backends that do not)
    triton_blocks : ``{target: {kernel: {param: value}}}`` Triton launch rows this backend's devices
        use (target = a device type, or ``"interpret"`` for the CPU interpreter), or ``{}``
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    auto_priority: ClassVar[dict[str, int]] = {}
    forced_only_devices: ClassVar[frozenset[str]] = frozenset()
    module: ClassVar[str | None] = None
    tolerances: ClassVar[dict[torch.dtype, Tolerance]] = {}
    verification: ClassVar[str] = "unverified"
    extension: ClassVar[str | None] = None
    #: whether the kernels follow docs/numerics.md's NaN/inf policy (true for the kernels this project
    #: writes; vendor fused ops do not define their NaN/inf behaviour, so NaN/inf parity cases skip)
    follows_nan_policy: ClassVar[bool] = True
    triton_blocks: ClassVar[dict[str, dict[str, dict[str, int]]]] = {}

    def __init__(self) -> None:
        self._load_errors: dict[str, str] | None = None

    @property
    def kernel_module(self) -> str:
        return self.module or self.name

    # -- build ------------------------------------------------------------------------------
    def build_extensions(self, ctx: BuildContext) -> tuple[list[Any], dict[str, Any]]:
        """Build hook run by ``setup.py``: ``(ext_modules, cmdclass)`` to build, recording the
        outcome with ``ctx.record(self.name, ...)``. Default: nothing to build."""
        return [], {}

    # -- availability -----------------------------------------------------------------------
    def backend_reasons(self, device_type: str) -> list[str]:
        """Reasons this backend cannot run anything on ``device_type`` (empty if it can).
        Called once per (op, device, forced) and cached by dispatch: probes may be slow."""
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

    def tolerance(self, dtype: torch.dtype) -> Tolerance:
        try:
            return self.tolerances[dtype]
        except KeyError:
            raise KeyError(f"backend {self.name!r} declares no tolerance for {dtype}; has {list(self.tolerances)}") from None

    def op_verification(self, op: str) -> str:
        """How this backend's kernel for ``op`` was verified (a support-matrix cell); by default the
        backend-wide ``verification``."""
        return self.verification

    def limits(self, op: str) -> list[str]:
        """Human-readable limits of this backend's kernel for ``op`` (shapes, dtypes, SoC, vendor
        library), listed by ``info -v`` beside the op; per-call refusals quote them."""
        return []

    # -- kernels ----------------------------------------------------------------------------
    def load(self) -> dict[str, str]:
        """Import this backend's kernel modules once; returns ``{family: import error}``."""
        if self._load_errors is None:
            from .. import _registry

            errors: dict[str, str] = {}
            for fam in _registry.families():
                modname = f"v4kernels.ops.{fam}.{self.kernel_module}"
                if importlib.util.find_spec(modname) is None:
                    continue
                try:
                    importlib.import_module(modname)
                except Exception as e:  # noqa: BLE001 - recorded as a reason, shown by `info`
                    errors[fam] = f"{modname} failed to import: {type(e).__name__}: {e}"
            self._load_errors = errors
        return self._load_errors

    def kernel(self, op: str) -> Any:
        from .. import _registry

        self.load()
        return _registry._KERNELS.get(self.name, {}).get(op)

    def op_reasons(self, op: str, device_type: str, forced: bool = False) -> list[str]:
        """Reasons this backend cannot run ``op`` on ``device_type``, ignoring argument values."""
        reasons = self.device_reasons(device_type, forced)
        if reasons:
            return reasons
        reasons = self.backend_reasons(device_type)
        if reasons:
            return reasons
        if self.kernel(op) is None:
            from .. import _registry

            err = self.load().get(_registry.op_family(op))
            return [err] if err else [f"no {self.name} kernel for {op} yet"]
        return []

    def call_reasons(self, op: str, args: tuple, device_type: str, forced: bool) -> list[str]:
        """Reasons this backend refuses this particular call (device, availability, then the
        kernel's ``refusals``)."""
        reasons = self.op_reasons(op, device_type, forced)
        if reasons:
            return reasons
        entry = self.kernel(op)
        return list(entry.refusals(*args)) if entry.refusals is not None else []

    def __repr__(self) -> str:
        return f"<v4kernels backend {self.name!r}>"
