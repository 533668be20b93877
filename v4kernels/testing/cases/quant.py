"""Parity cases for the formats family (SPEC §4), with an independent naive encoder.

The naive encoders enumerate the finite e4m3fn / e2m1 grids and pick the nearest grid value per
element in Python (ties to the even code); scales are derived with ``math.frexp`` instead of the
bit manipulation of the reference. They share no code with ``v4kernels.ops.quant.reference``.
"""
from __future__ import annotations

import bisect
import math

import numpy as np
import torch

import v4kernels as v4k

from ..._registry import Tolerance
from ..inputs import randn
from . import ParityCase, register

# --------------------------------------------------------------------------------------------
# finite grids: (magnitude, code) sorted by magnitude
# --------------------------------------------------------------------------------------------


def _e4m3_grid() -> list[tuple[float, int]]:
    out = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue  # NaN
            v = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
            out.append((v, (e << 3) | m))
    return sorted(out)


E4M3_GRID = _e4m3_grid()
E2M1_GRID = [(0.0, 0), (0.5, 1), (1.0, 2), (1.5, 3), (2.0, 4), (3.0, 5), (4.0, 6), (6.0, 7)]
_E4M3_MAGS = [v for v, _ in E4M3_GRID]
_E2M1_MAGS = [v for v, _ in E2M1_GRID]


def _nearest(mag: float, mags: list[float], grid: list[tuple[float, int]]) -> int:
    """Code of the grid value nearest to ``mag`` (saturating), ties to the even code."""
    if mag >= mags[-1]:
        return grid[-1][1]
    i = bisect.bisect_left(mags, mag)
    if mags[i] == mag:
        return grid[i][1]
    lo, hi = grid[i - 1], grid[i]
    dl, dh = mag - lo[0], hi[0] - mag
    if dl < dh:
        return lo[1]
    if dh < dl:
        return hi[1]
    return lo[1] if lo[1] % 2 == 0 else hi[1]


def naive_e4m3_code(v: float) -> int:
    """fp32 value -> e4m3fn byte (sign bit 7), saturating to ±448; NaN -> 0x7F."""
    if math.isnan(v):
        return 0x7F
    return (0x80 if math.copysign(1.0, v) < 0 else 0) | _nearest(abs(v), _E4M3_MAGS, E4M3_GRID)


def naive_e2m1_code(v: float) -> int:
    """fp32 value -> e2m1 nibble (sign bit 3), saturating to ±6."""
    return (0x8 if math.copysign(1.0, v) < 0 else 0) | _nearest(abs(v), _E2M1_MAGS, E2M1_GRID)


def naive_pow2_exponent(amax: float, qmax: float) -> int:
    """``ceil(log2(fp32(amax · fp32(1/qmax))))`` via frexp (SPEC §4.2)."""
    f = float(np.float32(amax) * np.float32(1.0 / qmax))
    m, e = math.frexp(f)  # f = m · 2^e, m in [0.5, 1)
    return e - 1 if m == 0.5 else e


def _f32(v: float) -> float:
    return float(np.float32(v))


def naive_act_quant(x: torch.Tensor, block_size: int = 128, round_scale: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element FP8 block quantisation (SPEC §4.3): (e4m3 [..., N], fp32 scales [..., N/block])."""
    rows = x.float().reshape(-1, x.shape[-1]).tolist()
    codes, scales = [], []
    for row in rows:
        crow, srow = [], []
        for b0 in range(0, len(row), block_size):
            blk = row[b0 : b0 + block_size]
            amax = max(max(abs(v) for v in blk), 1e-4)
            s = 2.0 ** naive_pow2_exponent(amax, 448.0) if round_scale else _f32(np.float32(amax) * np.float32(1 / 448))
            srow.append(s)
            crow.extend(naive_e4m3_code(float(np.float32(v) / np.float32(s))) for v in blk)
        codes.append(crow)
        scales.append(srow)
    q = torch.tensor(codes, dtype=torch.uint8).reshape(x.shape).view(torch.float8_e4m3fn)
    return q.to(x.device), torch.tensor(scales, dtype=torch.float32).reshape(*x.shape[:-1], -1).to(x.device)


def naive_act_quant_roundtrip(x: torch.Tensor, block_size: int = 128, round_scale: bool = True) -> torch.Tensor:
    q, s = naive_act_quant(x, block_size, round_scale)
    v = q.float().reshape(*x.shape[:-1], -1, block_size) * s.unsqueeze(-1)
    return v.reshape(x.shape).to(x.dtype)


def naive_fp4_act_quant(x: torch.Tensor, block_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per element FP4 block quantisation (SPEC §4.4): (packed uint8 [..., N/2], fp32 scales)."""
    rows = x.float().reshape(-1, x.shape[-1]).tolist()
    packed, scales = [], []
    for row in rows:
        codes, srow = [], []
        for b0 in range(0, len(row), block_size):
            blk = row[b0 : b0 + block_size]
            amax = max(max(abs(v) for v in blk), 6.0 * 2.0**-126)
            s = 2.0 ** naive_pow2_exponent(amax, 6.0)
            srow.append(s)
            codes.extend(naive_e2m1_code(float(np.float32(v) / np.float32(s))) for v in blk)
        packed.append([codes[i] | (codes[i + 1] << 4) for i in range(0, len(codes), 2)])
        scales.append(srow)
    p = torch.tensor(packed, dtype=torch.uint8).reshape(*x.shape[:-1], x.shape[-1] // 2)
    return p.to(x.device), torch.tensor(scales, dtype=torch.float32).reshape(*x.shape[:-1], -1).to(x.device)


E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def naive_fp4_decode(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] fp32 values (low nibble first)."""
    table = torch.tensor(E2M1_VALUES + [-v for v in E2M1_VALUES], dtype=torch.float32)  # bit 3 = sign
    p = packed.view(torch.uint8).long()
    vals = torch.stack((table[p & 0xF], table[p >> 4]), dim=-1)
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def naive_fp4_act_roundtrip(x: torch.Tensor, block_size: int = 32) -> torch.Tensor:
    p, s = naive_fp4_act_quant(x, block_size)
    v = naive_fp4_decode(p.cpu()).reshape(*x.shape[:-1], -1, block_size) * s.cpu().unsqueeze(-1)
    return v.reshape(x.shape).to(x.dtype).to(x.device)


def naive_hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x · H_n / sqrt(n)`` with ``H[i][j] = (−1)^popcount(i & j)`` (the Sylvester matrix), fp64."""
    n = x.shape[-1]
    rows = x.double().reshape(-1, n).tolist()
    out = [[sum(r[i] * (-1.0 if bin(i & j).count("1") % 2 else 1.0) for i in range(n)) / math.sqrt(n) for j in range(n)]
           for r in rows]
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape).to(x.dtype)


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------


def _x(shape, dtype=torch.bfloat16, scale=1.0):
    return lambda g, d: {"x": randn(g, shape, d, dtype, scale)}


def _edge_fp8(block: int):
    """All-zero block, amax exactly 448·2^k, values at ±448·s, tiny and huge blocks."""
    def make(g: torch.Generator, d: torch.device):
        x = torch.randn(6, 2 * block, generator=g)
        x[0, :block] = 0.0  # amax clamp 1e-4
        x[1, :block] = x[1, :block].clamp(-447, 447) / 448 * 2.0**3
        x[1, 5] = 448.0 * 2.0**-7 * 2.0**10  # amax = 448·2^3 exactly
        x[2, :] = torch.where(x[2] > 0, 448.0, -448.0)  # ±448 with scale 1
        x[3, :block] *= 1e-6  # amax < 1e-4
        x[4, block:] *= 3e4  # large
        x[5, 0] = -0.0
        return {"x": x.bfloat16().to(d)}
    return make


def _ties_fp4(g: torch.Generator, d: torch.device):
    """Every e2m1 tie and grid point at several power-of-two scales, negative zero, tiny blocks."""
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0]
    rows = []
    for k in (-3, 0, 5):
        base = [t * 2.0**k for t in ties]
        rows.append(base + [-v for v in base])  # amax = 6·2^k exactly
    rows.append([1e-38, -1e-39, 0.0] + [0.0] * 29)  # tiny block
    rows.append([0.0] * 32)  # all zero
    return {"x": torch.tensor(rows, dtype=torch.float32).to(d)}


for shape, block, tag in [((4, 7168), 128, "v4-pro"), ((3, 448), 64, "v4-flash"), ((1, 128), 128, "odd"), ((5, 2, 192), 64, "odd")]:
    sname = "x".join(map(str, shape))
    register(ParityCase(f"act_quant/{sname}_b{block}", "act_quant", _x(shape),
                        lambda x, _b=block: v4k.act_quant(x, _b), path="quant", tags=frozenset({tag}),
                        naive=lambda x, _b=block: naive_act_quant(x, _b)))
    register(ParityCase(f"act_quant_roundtrip/{sname}_b{block}", "act_quant_roundtrip", _x(shape),
                        lambda x, _b=block: v4k.act_quant_roundtrip(x, _b), path="qat-sim", tags=frozenset({tag}),
                        naive=lambda x, _b=block: naive_act_quant_roundtrip(x, _b)))

for block in (128, 64):
    register(ParityCase(f"act_quant/edges_b{block}", "act_quant", _edge_fp8(block),
                        lambda x, _b=block: v4k.act_quant(x, _b), path="quant", tags=frozenset({"edge"}),
                        naive=lambda x, _b=block: naive_act_quant(x, _b)))
    register(ParityCase(f"act_quant/edges_b{block}_plain_scale", "act_quant", _edge_fp8(block),
                        lambda x, _b=block: v4k.act_quant(x, _b, scale_fmt=None), path="quant", tags=frozenset({"edge"}),
                        naive=lambda x, _b=block: naive_act_quant(x, _b, round_scale=False)))
register(ParityCase("act_quant_roundtrip/edges_b64", "act_quant_roundtrip", _edge_fp8(64),
                    lambda x: v4k.act_quant_roundtrip(x, 64), path="qat-sim", tags=frozenset({"edge"}),
                    naive=lambda x: naive_act_quant_roundtrip(x, 64)))

for shape in [(4, 64, 128), (3, 96), (1, 32)]:
    sname = "x".join(map(str, shape))
    register(ParityCase(f"fp4_act_quant/{sname}", "fp4_act_quant", _x(shape),
                        lambda x: v4k.fp4_act_quant(x, 32), path="quant", naive=lambda x: naive_fp4_act_quant(x, 32)))
    register(ParityCase(f"fp4_act_roundtrip/{sname}", "fp4_act_roundtrip", _x(shape),
                        lambda x: v4k.fp4_act_roundtrip(x, 32), path="qat-sim", naive=lambda x: naive_fp4_act_roundtrip(x, 32)))
register(ParityCase("fp4_act_quant/ties_pow2_tiny", "fp4_act_quant", _ties_fp4, lambda x: v4k.fp4_act_quant(x, 32),
                    path="quant", tags=frozenset({"edge"}), naive=lambda x: naive_fp4_act_quant(x, 32)))
register(ParityCase("fp4_act_roundtrip/ties_pow2_tiny", "fp4_act_roundtrip", _ties_fp4, lambda x: v4k.fp4_act_roundtrip(x, 32),
                    path="qat-sim", tags=frozenset({"edge"}), naive=lambda x: naive_fp4_act_roundtrip(x, 32)))

register(ParityCase("hadamard_transform/indexer_64x128", "hadamard_transform", _x((2, 64, 128)),
                    lambda x: v4k.hadamard_transform(x), path="rotate", tags=frozenset({"v4-flash"})))
register(ParityCase("hadamard_transform/small_fp32_3x128", "hadamard_transform", _x((3, 128), torch.float32),
                    lambda x: v4k.hadamard_transform(x), path="rotate", tags=frozenset({"odd"}), naive=naive_hadamard))


# -- dequantisers and block-scaled GEMMs (inputs produced by the quantisers above)
def naive_dequant_gemm(a: torch.Tensor, a_s: torch.Tensor, b_vals: torch.Tensor, b_scale_full: torch.Tensor,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """``Σ_k A[m,k]·a_s[m,k/128] · B[n,k]·bs[n,k]`` in float64 (``b_scale_full`` expanded to [N, K])."""
    k = a.shape[1]
    adeq = a.double() * a_s.double().repeat_interleave(128, 1)[:, :k]
    return (adeq @ (b_vals.double() * b_scale_full.double()).T).to(out_dtype)


def _weight_fp8(g: torch.Generator, n: int, k: int, d: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] e4m3 weight with one power-of-two scale per 128x128 tile (checkpoint layout, SPEC §4.6)."""
    w = torch.randn(n, k, generator=g)
    tn, tk = (n + 127) // 128, (k + 127) // 128
    wp = torch.nn.functional.pad(w, (0, tk * 128 - k, 0, tn * 128 - n)).reshape(tn, 128, tk, 128)
    s = 2.0 ** torch.ceil(torch.log2((wp.abs().amax((1, 3)) / 448).clamp_min(1e-4)))
    q = (wp / s[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(tn * 128, tk * 128)
    return q[:n, :k].contiguous().to(d), s.to(d)


def _gemm_inputs(m: int, n: int, k: int, fp4: bool, e8m0: bool = False):
    def make(g: torch.Generator, d: torch.device):
        kp = (k + 127) // 128 * 128
        xa = torch.nn.functional.pad(torch.randn(m, k, generator=g), (0, kp - k))
        a, a_s = v4k.act_quant(xa, 128)
        a = a[:, :k].contiguous()
        if fp4:
            b, b_s = v4k.fp4_act_quant(torch.randn(n, k, generator=g) * 0.05, 32)
        else:
            b, b_s = _weight_fp8(g, n, k, torch.device("cpu"))
        if e8m0:
            a_s, b_s = a_s.to(torch.float8_e8m0fnu), b_s.to(torch.float8_e8m0fnu)
        return {"a": a.to(d), "a_s": a_s.to(d), "b": b.to(d), "b_s": b_s.to(d)}
    return make


def _naive_fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32):
    n, k = b.shape
    full = b_s.float().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return naive_dequant_gemm(a.cpu(), a_s.float().cpu(), b.float().cpu(), full.cpu(), out_dtype)


def _naive_fp4_gemm(a, a_s, b, b_s, out_dtype=torch.float32):
    return naive_dequant_gemm(a.cpu(), a_s.float().cpu(), naive_fp4_decode(b.cpu()),
                              b_s.float().cpu().repeat_interleave(32, 1), out_dtype)


_GEMM_TOL = Tolerance(1e-3, 1e-4, 0.99999)  # fp32 tile sums vs float64
# (2, 1024, 4096) is Flash wq_a at decode; it is "large" (slow under the Triton interpreter)
for m, n, k, tag, e8, large in [(1, 200, 256, "odd", False, False), (4, 130, 384, "odd", True, False),
                                (3, 64, 200, "odd", False, False), (1, 128, 4096, "v4-flash", True, False),
                                (2, 1024, 4096, "v4-flash", True, True)]:
    nm = f"m{m}_n{n}_k{k}" + ("_e8m0" if e8 else "")
    register(ParityCase(f"fp8_gemm/{nm}", "fp8_gemm", _gemm_inputs(m, n, k, False, e8),
                        lambda a, a_s, b, b_s: v4k.fp8_gemm(a, a_s, b, b_s, torch.float32), path="gemm",
                        tags=frozenset({tag}), large=large, naive=_naive_fp8_gemm, naive_tol=_GEMM_TOL))
    if k % 32 == 0:
        register(ParityCase(f"fp4_gemm/{nm}", "fp4_gemm", _gemm_inputs(m, n, k, True, e8),
                            lambda a, a_s, b, b_s: v4k.fp4_gemm(a, a_s, b, b_s, torch.float32), path="gemm",
                            tags=frozenset({tag}), large=large, naive=_naive_fp4_gemm, naive_tol=_GEMM_TOL))
register(ParityCase("fp8_gemm/m2_n256_k512_bf16_out", "fp8_gemm", _gemm_inputs(2, 256, 512, False),
                    lambda a, a_s, b, b_s: v4k.fp8_gemm(a, a_s, b, b_s), path="gemm", tags=frozenset({"v4-flash"})))


def _deq_inputs(shape, block: int, fp4: bool):
    def make(g: torch.Generator, d: torch.device):
        x = randn(g, shape, torch.device("cpu"))
        y, s = v4k.fp4_act_quant(x, block) if fp4 else v4k.act_quant(x, block)
        return {"y": y.to(d), "scales": s.to(d)}
    return make


for shape, block in [((3, 448), 64), ((2, 5, 256), 128)]:
    register(ParityCase(f"act_dequant/{'x'.join(map(str, shape))}_b{block}", "act_dequant", _deq_inputs(shape, block, False),
                        lambda y, scales, _b=block: v4k.act_dequant(y, scales, _b, torch.float32), path="dequant",
                        naive=lambda y, scales, _b=block: (y.float().unflatten(-1, (-1, _b)) * scales.unsqueeze(-1)).flatten(-2)))
for shape in [(4, 128), (2, 3, 64)]:
    register(ParityCase(f"fp4_act_dequant/{'x'.join(map(str, shape))}", "fp4_act_dequant", _deq_inputs(shape, 32, True),
                        lambda y, scales: v4k.fp4_act_dequant(y, scales, 32, torch.float32), path="dequant",
                        naive=lambda y, scales: (naive_fp4_decode(y.cpu()).unflatten(-1, (-1, 32))
                                                 * scales.cpu().unsqueeze(-1)).flatten(-2)))


# --------------------------------------------------------------------------------------------
# NaN / ±inf inputs (docs/numerics.md)
# --------------------------------------------------------------------------------------------
from ._nonfinite import register_nonfinite  # noqa: E402

register_nonfinite("act_quant/1x128_b128", ["x"])
register_nonfinite("act_quant_roundtrip/1x128_b128", ["x"])
register_nonfinite("fp4_act_quant/1x32", ["x"])
register_nonfinite("fp4_act_roundtrip/1x32", ["x"])
register_nonfinite("hadamard_transform/small_fp32_3x128", ["x"])
register_nonfinite("fp8_gemm/m1_n200_k256", ["a", "a_s", "b", "b_s"])
register_nonfinite("fp4_gemm/m1_n200_k256", ["a", "a_s", "b_s"])
register_nonfinite("act_dequant/3x448_b64", ["y", "scales"])
register_nonfinite("fp4_act_dequant/4x128", ["scales"])
