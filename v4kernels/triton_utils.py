"""Shared helpers of the Triton backend: portable number-format codecs, output rounding, device
block-size tables and interpreter detection.

Portability rules every ``v4kernels/ops/*/triton.py`` kernel follows (so the same source runs on
NVIDIA GPUs of any generation, on Ascend NPUs through Triton-Ascend and on the CPU interpreter):

* FP8 e4m3, FP4 e2m1 and UE8M0 values are decoded and encoded with integer bit operations
  (:func:`e4m3_decode`, :func:`e4m3_encode`, :func:`e2m1_decode`, :func:`e2m1_encode`,
  :func:`ue8m0_decode`); no Triton FP8 dtype is used, so nothing depends on hardware FP8.
* bf16/fp16 loads are upcast to fp32 at once; arithmetic is fp32.
* bf16 outputs are rounded to nearest-even with integer ops and stored through an ``int16`` view
  (:func:`store_out` with ``OUT_KIND == 1``), which is exact on every target (the interpreter's
  own fp32->bf16 store truncates).
* Matrix products use ``tl.dot`` on fp32 operands with IEEE precision under the interpreter; on a
  GPU the operands (decoded FP8/FP4 values and bf16 inputs are exact in bf16) are fed to
  ``tl.dot`` as bf16 with fp32 accumulation (``DOT_BF16`` constexpr).
* Block sizes come from :func:`block_config`: fixed large blocks under the interpreter (few
  programs), a per-device table otherwise.
"""
from __future__ import annotations

import functools
import os
import torch
import triton
import triton.language as tl

from .formats import DTYPE_CODES

# storage codes as compile-time constants (OUT_KIND arguments of store_out / round_to_out)
_BF16 = tl.constexpr(DTYPE_CODES[torch.bfloat16])
_F16 = tl.constexpr(DTYPE_CODES[torch.float16])

#: e4m3 / e2m1 format maxima (SPEC §4.1)
FP8_MAX = 448.0
FP4_MAX = 6.0


def interpret() -> bool:
    """True when kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------
# Block-size tables
# --------------------------------------------------------------------------------------------

def target_kind(device: torch.device) -> str:
    """``"interpret"`` for CPU tensors under the interpreter, else the device type."""
    if device.type == "cpu" or interpret():
        return "interpret"
    return device.type


def block_config(kernel: str, device: torch.device) -> dict[str, int]:
    """Launch parameters of ``kernel`` for ``device``: the row its backend declares
    (``Backend.triton_blocks``: ``cuda`` in backends/cuda.py, ``npu`` in backends/ascend.py,
    ``interpret`` in backends/triton.py). Unknown GPU-like devices use the ``cuda`` row."""
    from ._registry import triton_launch_row

    row = triton_launch_row(target_kind(device)) or triton_launch_row("cuda")
    return dict(row[kernel])


def dot_bf16(device: torch.device) -> bool:
    """Feed ``tl.dot`` bf16 operands (exact for bf16/FP8/FP4 data) instead of fp32 ones.

    False under the interpreter, whose bf16 arithmetic is broken."""
    return target_kind(device) != "interpret"


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Number of streaming multiprocessors (or a small constant off CUDA), for split heuristics."""
    if device.type == "cuda":
        return _sm_count(device.index or 0)
    return 1 if target_kind(device) == "interpret" else 32


# --------------------------------------------------------------------------------------------
# Output dtype plumbing
# --------------------------------------------------------------------------------------------

_OUT_KIND = DTYPE_CODES


def out_kind(dtype: torch.dtype) -> int:
    """Constexpr code of an output dtype for :func:`store_out`."""
    return _OUT_KIND[dtype]


def out_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor handed to a kernel for storing ``t``: bf16 goes through an int16 view."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def as_u8(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of an FP8 / UE8M0 / packed-FP4 tensor (same shape)."""
    return t.view(torch.uint8)


def scale_args(s: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(tensor for the kernel, is_ue8m0) for scales given as fp32 or float8_e8m0fnu."""
    if s.dtype == torch.float8_e8m0fnu:
        return s.view(torch.uint8), True
    s = s.float()
    # an infinite block scale (not representable in UE8M0) counts as NaN (docs/numerics.md)
    return torch.where(torch.isinf(s), float("nan"), s), False


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else triton.next_power_of_2(n)


# --------------------------------------------------------------------------------------------
# Device-side helpers (inlined into the calling kernels)
# --------------------------------------------------------------------------------------------


@triton.jit
def bf16_rne_bits(x):
    """fp32 -> bf16 bit pattern (int16), round to nearest even; NaN stays NaN."""
    b = x.to(tl.uint32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    r = tl.where((b & 0x7FFFFFFF) > 0x7F800000, (b >> 16) | 0x40, r)
    return r.to(tl.int16)


@triton.jit
def store_out(ptr, x, mask, OUT_KIND: tl.constexpr):
    """Store fp32 ``x`` as fp32 (0), bf16 through an int16 pointer (1) or fp16 (2)."""
    if OUT_KIND == _BF16:
        tl.store(ptr, bf16_rne_bits(x), mask=mask)
    elif OUT_KIND == _F16:
        tl.store(ptr, x.to(tl.float16), mask=mask)
    else:
        tl.store(ptr, x, mask=mask)


@triton.jit
def round_to_out(x, OUT_KIND: tl.constexpr):
    """fp32 value of ``x`` rounded to the output dtype (for intermediate roundings)."""
    if OUT_KIND == _BF16:
        b = bf16_rne_bits(x).to(tl.int32) & 0xFFFF
        return (b << 16).to(tl.float32, bitcast=True)
    elif OUT_KIND == _F16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def ue8m0_decode(byte):
    """UE8M0 byte (as int) -> fp32 ``2^(e-127)`` (byte 0 gives 0, no NaN handling)."""
    return ((byte.to(tl.int32) & 0xFF) << 23).to(tl.float32, bitcast=True)


@triton.jit
def load_scale(ptr, mask, IS_UE8M0: tl.constexpr):
    """Load a block scale stored as fp32 or as a UE8M0 byte."""
    if IS_UE8M0:
        return ue8m0_decode(tl.load(ptr, mask=mask, other=127))
    else:
        return tl.load(ptr, mask=mask, other=1.0)


@triton.jit
def pow2_scale_bits(amax, inv_qmax):
    """Power-of-two scale of SPEC §4.2 as the unbiased exponent ``k`` (int32): ``s = 2^k``."""
    f = (amax * inv_qmax).to(tl.uint32, bitcast=True)
    e = ((f >> 23) & 0xFF).to(tl.int32)
    m = f & 0x7FFFFF
    return e - 127 + (m != 0).to(tl.int32)


@triton.jit
def exp2_int(k):
    """fp32 ``2^k`` for an int32 ``k`` in the normal range, built from bits."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_decode(code):
    """e4m3fn byte (any int type) -> fp32, integer bit operations only (SPEC §4.1)."""
    c = code.to(tl.int32) & 0xFF
    e = (c >> 3) & 0xF
    m = c & 0x7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125  # m * 2^-9
    v = tl.where(e == 0, sub, normal)
    # sign as a bit (``-v`` would turn -0 into +0)
    return (v.to(tl.uint32, bitcast=True) | ((c & 0x80).to(tl.uint32) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _rne_shift(m, s):
    """Round ``m >> s`` to nearest even (``m`` uint32 holding < 2^25, ``1 <= s <= 25``)."""
    q = m >> s
    rem = m & ((1 << s) - 1)
    half = 1 << (s - 1)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    return q + up.to(tl.uint32)


@triton.jit
def e4m3_encode(v):
    """fp32 -> e4m3fn byte (uint8), saturating to ±448, round to nearest even, integer ops only.

    A normal value keeps 3 fraction bits (shift 20 of the 24-bit significand); below 2^-6 the
    quantum is 2^-9, so the shift grows by the exponent deficit. A carry out of the significand
    moves into the exponent field by itself.
    """
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    b = v.to(tl.uint32, bitcast=True)
    sign = (b >> 24) & 0x80
    ef = ((b >> 23) & 0xFF).to(tl.int32)
    e = ef - 127
    m24 = (b & 0x7FFFFF) | 0x800000
    shift = 20 + tl.maximum(-6 - e, 0)
    shift = tl.minimum(shift, 25)
    q = _rne_shift(m24, shift.to(tl.uint32)).to(tl.int32)
    code = tl.where(e >= -6, ((e + 6) << 3) + q, q)
    code = tl.where(ef == 0, 0, code)
    return (code.to(tl.uint32) | sign).to(tl.uint8)


@triton.jit
def e2m1_decode(code):
    """e2m1 nibble (low 4 bits of an int) -> fp32 (SPEC §4.1 table)."""
    c = code.to(tl.int32) & 0xF
    e = (c >> 1) & 0x3
    m = c & 1
    normal = (((e + 126) << 23) | (m << 22)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, m.to(tl.float32) * 0.5, normal)
    return (v.to(tl.uint32, bitcast=True) | ((c & 0x8).to(tl.uint32) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_encode(v):
    """fp32 (already divided by the scale) -> e2m1 code 0..15 (uint8), saturating, RNE.

    Decision boundaries between neighbouring magnitudes; at an exact tie the even code wins
    (SPEC §15 #16), hence ``>`` for the ties that round down and ``>=`` for those that round up.
    """
    a = tl.abs(v)
    c = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
    c += (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)
    sign = ((v.to(tl.uint32, bitcast=True) >> 28) & 0x8).to(tl.int32)
    return (c | sign).to(tl.uint8)


__all__ = [
    "FP8_MAX", "FP4_MAX", "interpret", "target_kind", "block_config", "dot_bf16", "num_sms",
    "out_kind", "out_view", "as_u8", "scale_args", "cdiv", "next_pow2",
    "bf16_rne_bits", "store_out", "round_to_out", "ue8m0_decode", "load_scale", "pow2_scale_bits",
    "exp2_int", "e4m3_decode", "e4m3_encode", "e2m1_decode", "e2m1_encode",
]
