"""Input validation shared by every public op.

All checks run before any kernel launches and raise ``TypeError`` (wrong type/dtype) or
``ValueError`` (wrong shape, device, value) naming the op, the argument, the expected and the
actual value. Checks that must *read tensor values* (index ranges, tid2eid entries) only run
when :func:`value_checks_enabled` says so: always for CPU tensors, on accelerators only under
``V4K_CHECKS=full`` (reading values there forces a device synchronisation and breaks graph
capture). ``V4K_CHECKS=off`` disables value checks everywhere.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_DTYPES = (torch.float8_e4m3fn,)
INDEX_DTYPES = (torch.int32, torch.int64)


def _dt(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Validate one tensor argument; ``None`` entries in ``shape`` match any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        nd = t.dim()
        if nd != ndim and (isinstance(ndim, int) or nd not in ndim):
            nds = (ndim,) if isinstance(ndim, int) else tuple(ndim)
            raise ValueError(
                f"{op}: {name} must have {' or '.join(map(str, nds))} dims, got shape {tuple(t.shape)}"
            )
    if shape is not None:
        actual = t.shape
        if len(actual) != len(shape) or not all(e is None or e == a for e, a in zip(shape, actual)):
            exp = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
            raise ValueError(f"{op}: {name} must have shape {exp}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype {_dt(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (got strides {t.stride()} for shape {tuple(t.shape)})")
    return t


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    first_name, first = None, None
    for n, t in tensors.items():
        if t is None:
            continue
        d = t.device
        if first is None:
            first_name, first = n, d
        elif d != first:
            raise ValueError(f"{op}: {n} is on {d} but {first_name} is on {first}; all tensors must share a device")
    return first


def check_dim(op: str, name: str, t: torch.Tensor, dim: int, expected: int, what: str = "") -> None:
    if t.shape[dim] != expected:
        extra = f" ({what})" if what else ""
        raise ValueError(f"{op}: {name}.shape[{dim}] must be {expected}{extra}, got {t.shape[dim]} (shape {list(t.shape)})")


def check_value(op: str, name: str, value: object, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{op}: {name} must be {expected}, got {value!r}")


def check_int(op: str, name: str, value: object, *, minimum: int | None = None, choices: Sequence[int] | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    if choices is not None and value not in choices:
        raise ValueError(f"{op}: {name} must be one of {list(choices)}, got {value}")
    return value


def check_real(op: str, name: str, value: object, *, minimum: float | None = None) -> float:
    """A real number (int or float, not bool), optionally ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__} {value!r}")
    if minimum is not None:
        check_value(op, name, value, value >= minimum, f"a float >= {minimum:g}")
    return float(value)


def check_bool(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_out_dtype(op: str, out_dtype: object, default: torch.dtype) -> torch.dtype:
    """``out_dtype`` of an op: None (use ``default``) or one of bf16/fp16/fp32."""
    if out_dtype is None:
        return default
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be None or one of bfloat16/float16/float32, got {out_dtype!r}")
    return out_dtype


def contiguous_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a contiguous ``dtype`` tensor, without a call into torch when it already is one
    (``Tensor.to`` costs about a microsecond of argument parsing even when it does nothing)."""
    if t.dtype is not dtype:
        t = t.to(dtype)
    return t.contiguous()


# os.environ.get costs about a microsecond (key encoding); on POSIX read the raw mapping directly
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _checks_mode() -> str:
    if _ENV_DATA is not None:
        v = _ENV_DATA.get(b"V4K_CHECKS")
        return "auto" if v is None else os.fsdecode(v)
    return os.environ.get("V4K_CHECKS", "auto")


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def value_checks_enabled(*tensors: torch.Tensor) -> bool:
    mode = _checks_mode()
    if mode == "off":
        return False
    for t in tensors:
        if type(t) not in _PLAIN_TENSORS and isinstance(t, torch._subclasses.FakeTensor):
            return False
        if t.is_cpu:
            continue
        if mode != "full" or t.is_meta:
            return False
    return True


#: ``index_bounds(t) -> (min, max) | None`` of the CPU extension (set when it is built)
native_index_bounds = None


def index_bounds(idx: torch.Tensor) -> tuple[int, int]:
    """``(min, max)`` of a non-empty integer tensor, read on the host."""
    if native_index_bounds is not None:
        b = native_index_bounds(idx)
        if b is not None:
            return b
    mn, mx = torch.aminmax(idx)
    return int(mn), int(mx)


def value_bounds(t: torch.Tensor) -> tuple[int, int] | None:
    """``(min, max)`` of an integer tensor whose values are to be checked, else None. A CPU tensor
    is read in place by the extension whatever ``V4K_CHECKS`` says (that read is cheaper than the
    mode lookup): a caller that finds a violation must still ask :func:`value_checks_on_failure`."""
    b = native_index_bounds(t) if native_index_bounds is not None else None
    if b is None and t.numel() and value_checks_enabled(t):
        b = index_bounds(t)
    return b


def value_checks_on_failure() -> bool:
    """Whether a violation found by :func:`value_bounds` is reported (not with ``V4K_CHECKS=off``)."""
    return _checks_mode() != "off"


def check_index_range(op: str, name: str, idx: torch.Tensor, n: int, allow_sentinel: bool = True) -> None:
    """Indices must lie in ``[0, n)`` (or be the -1 sentinel). Reads values: see module doc."""
    lo = -1 if allow_sentinel else 0
    bounds = value_bounds(idx)
    if bounds is None or bounds[0] >= lo and bounds[1] < n or not value_checks_on_failure():
        return
    mn, mx = bounds
    bad = idx[(idx < lo) | (idx >= n)]
    exp = f"[-1, {n})" if allow_sentinel else f"[0, {n})"
    raise ValueError(
        f"{op}: {name} entries must lie in {exp}, got min {mn}, max {mx} "
        f"(first offending value {int(bad.flatten()[0])})"
    )


def check_nonnegative(op: str, name: str, t: torch.Tensor) -> None:
    """Integer entries (positions) must be >= 0. Reads values: see module doc."""
    bounds = value_bounds(t)
    if bounds is not None and bounds[0] < 0 and value_checks_on_failure():
        raise ValueError(f"{op}: {name} must be >= 0, got min {bounds[0]}")


def max_alloc_bytes() -> int:
    """Largest single allocation an op may derive from its *scalar* arguments (index lists whose
    size is set by ``seq_len``/``window``/``start_pos``, ...): ``V4K_MAX_ALLOC_GB`` GiB, default 4."""
    raw = os.environ.get("V4K_MAX_ALLOC_GB", "4")
    try:
        gb = float(raw)
    except ValueError:
        raise ValueError(f"V4K_MAX_ALLOC_GB must be a number of GiB, got {raw!r}") from None
    return int(gb * 2**30)


def check_alloc(op: str, what: str, numel: int, element_size: int, work_factor: int = 1) -> None:
    """Refuse, before allocating, an output of ``numel`` elements whose size comes from scalar
    arguments when it (times ``work_factor`` for temporaries) exceeds :func:`max_alloc_bytes`."""
    need = numel * element_size * work_factor
    limit = max_alloc_bytes()
    if need > limit:
        raise ValueError(
            f"{op}: {what} would need {need / 2**30:.1f} GiB ({numel} elements x {element_size} bytes"
            f"{f' x {work_factor} for temporaries' if work_factor > 1 else ''}), over the {limit / 2**30:.1f} GiB "
            f"limit (V4K_MAX_ALLOC_GB); check the arguments"
        )
