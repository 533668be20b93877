"""Formats family (SPEC §4, §14): bit-exact FP8/FP4 quantisation, scales, packing, roundtrips,
Hadamard, block-scaled GEMMs and bad inputs."""
from __future__ import annotations

import math

import pytest
import torch

import v4kernels as v4k
from v4kernels.testing.cases.quant import (
    E4M3_GRID,
    naive_act_quant,
    naive_e2m1_code,
    naive_e4m3_code,
    naive_fp4_act_quant,
    naive_fp4_decode,
    naive_pow2_exponent,
)

pytestmark = pytest.mark.usefixtures("reference_backend")


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


# ----------------------------------------------------------------------------- naive encoders
def test_naive_e4m3_encoder_matches_torch_cast_on_grid_midpoints():
    # every grid value, every midpoint between neighbours (ties) and points just off them
    mags = [v for v, _ in E4M3_GRID]
    pts = list(mags)
    for a, b in zip(mags, mags[1:]):
        mid = (a + b) / 2
        pts += [mid, math.nextafter(mid, 0), math.nextafter(mid, 1e9)]
    pts += [448.0, 464.0, 1e6]
    vals = torch.tensor(pts + [-p for p in pts], dtype=torch.float32)
    ref = _bytes(vals.clamp(-448, 448).to(torch.float8_e4m3fn))
    naive = torch.tensor([naive_e4m3_code(float(v)) for v in vals], dtype=torch.uint8)
    assert torch.equal(ref, naive)
    assert len(E4M3_GRID) == 127 and E4M3_GRID[-1][0] == 448.0


def test_e2m1_code_table_and_ties():
    # the full code table through fp4_act_dequant (scale 1)
    codes = torch.arange(16, dtype=torch.uint8)
    packed = (codes[0::2] | (codes[1::2] << 4)).reshape(1, 8)
    vals = v4k.fp4_act_dequant(packed, torch.ones(1, 1), 16, torch.float32)[0]
    expect = torch.tensor(E2M1 + [-v for v in E2M1])
    assert torch.equal(vals, expect) and torch.equal(torch.signbit(vals[8]), torch.tensor(True))
    # ties go to the even code (SPEC §15 #16)
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}
    for t, want in ties.items():
        assert E2M1[naive_e2m1_code(t)] == want
        x = torch.tensor([[t, -t, 6.0] + [0.0] * 29])  # amax 6 -> scale 1
        y = v4k.fp4_act_roundtrip(x)
        assert y[0, 0].item() == want and y[0, 1].item() == -want, t
        for eps in (1e-3, -1e-3):  # just off the tie: nearest wins
            y = v4k.fp4_act_roundtrip(torch.tensor([[t + eps, 6.0] + [0.0] * 30]))
            lo = max(v for v in E2M1 if v <= t)
            hi = min(v for v in E2M1 if v >= t)
            assert y[0, 0].item() == (hi if eps > 0 else lo)


# ----------------------------------------------------------------------------- FP8
@pytest.mark.parametrize("block", [128, 64])
def test_act_quant_bit_exact_vs_naive(block):
    g = torch.Generator().manual_seed(block)
    x = (torch.randn(3, 4 * block, generator=g) * torch.logspace(-3, 3, 4 * block)).bfloat16()
    for round_scale, fmt in ((True, "ue8m0"), (False, None)):
        q, s = v4k.act_quant(x, block, scale_fmt=fmt)
        nq, ns = naive_act_quant(x, block, round_scale)
        assert torch.equal(_bytes(q), _bytes(nq)) and torch.equal(s, ns), fmt
        if round_scale:
            assert torch.equal(torch.frexp(s).mantissa, torch.full_like(s, 0.5))  # powers of two
        else:
            assert not torch.equal(torch.frexp(s).mantissa, torch.full_like(s, 0.5))


@pytest.mark.parametrize("block", [128, 64])
def test_act_quant_edges(block):
    x = torch.zeros(4, block)
    x[1, 0] = 448.0 * 8  # amax exactly 448·2^3
    x[1, 1:] = torch.linspace(-3000, 3000, block - 1)
    x[2, : block // 2] = 448.0
    x[2, block // 2 :] = -448.0
    x[3, 0] = -1e-12  # below half the smallest subnormal step of s = 2^-22: rounds to -0
    q, s = v4k.act_quant(x, block)
    # all-zero block: amax clamps to 1e-4 -> scale 2^ceil(log2(1e-4/448)) = 2^-22
    assert s[0, 0].item() == 2.0**-22 and torch.equal(_bytes(q[0]), torch.zeros(block, dtype=torch.uint8))
    # amax = 448·2^k: f = amax·fp32(1/448) rounds to 2^k·(1 + 2^-23) or 2^k; follow the fp32 rule
    for row, k in ((1, 3), (2, 0)):
        assert s[row, 0].item() == 2.0 ** naive_pow2_exponent(448.0 * 2.0**k, 448.0)
        assert s[row, 0].item() in (2.0**k, 2.0 ** (k + 1))
    f32_inv = torch.tensor(1 / 448, dtype=torch.float32)
    assert (torch.tensor(448.0) * f32_inv).item() == 1.0  # fp32(1/448)·448 is exactly 1 -> scale 1
    assert s[2, 0].item() == 1.0 and s[1, 0].item() == 8.0
    assert torch.equal(q[2].float(), x[2]) and torch.isfinite(q.float()).all()
    assert _bytes(q[2, 0]).item() == 0x7E and _bytes(q[2, -1]).item() == 0xFE  # ±448 = max finite codes
    # sign of zero preserved
    assert _bytes(q[3, 0]).item() == 0x80 and _bytes(q[3, 1]).item() == 0x00
    # clamp before cast: values above 448·s saturate (non power-of-two scale keeps them at 448)
    q2, s2 = v4k.act_quant(torch.tensor([[1000.0] + [-1000.0] + [0.0] * (block - 2)]), block, scale_fmt=None)
    assert q2[0, :2].float().tolist() == [448.0, -448.0]
    assert s2[0, 0].item() == (torch.tensor(1000.0) * f32_inv).item()


def test_act_quant_ue8m0_bytes():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 512, generator=g) * torch.logspace(-6, 6, 512)).bfloat16()
    q, s = v4k.act_quant(x, 128, scale_dtype=torch.float8_e8m0fnu)
    q32, s32 = v4k.act_quant(x, 128)
    assert s.dtype == torch.float8_e8m0fnu and torch.equal(_bytes(q), _bytes(q32))
    exps = torch.frexp(s32).exponent - 1  # s = 2^e
    assert torch.equal(_bytes(s).long(), (exps + 127).long())
    assert torch.equal(s.float(), s32)


def test_act_quant_inplace_and_roundtrip():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 3, 512, generator=g).bfloat16()
    rt = v4k.act_quant_roundtrip(base, 64)
    q, s = v4k.act_quant(base, 64)
    deq = v4k.act_dequant(q, s, 64, torch.bfloat16)
    assert torch.equal(rt, deq)
    x = base.clone()
    out = v4k.act_quant(x, 64, inplace=True)
    assert out is x and torch.equal(x, rt) and not torch.equal(x, base)
    # non-contiguous view: the nope slice of a KV row, quantised in place (SPEC §5.3)
    kv = base.clone()
    v4k.act_quant(kv[..., :448], 64, inplace=True)
    assert torch.equal(kv[..., :448], v4k.act_quant_roundtrip(base[..., :448].contiguous(), 64))
    assert torch.equal(kv[..., 448:], base[..., 448:])
    # roundtrip is idempotent (values already on the grid with the same scales)
    assert torch.equal(v4k.act_quant_roundtrip(rt, 64), rt)


def test_act_dequant_inverse():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 256, generator=g)
    q, s = v4k.act_quant(x, 128)
    y = v4k.act_dequant(q, s, 128, torch.float32)
    assert torch.equal(y, (q.float().reshape(4, 2, 128) * s.unsqueeze(-1)).reshape(4, 256))
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of each value's own magnitude, or the
    # subnormal step s·2^-9
    assert bool(((y - x).abs() <= x.abs() * 2.0**-4 + s.repeat_interleave(128, -1) * 2.0**-9).all())
    # e8m0 scales accepted and identical
    assert torch.equal(v4k.act_dequant(q, s.to(torch.float8_e8m0fnu), 128, torch.float32), y)


# ----------------------------------------------------------------------------- FP4
def test_fp4_bit_exact_vs_naive_and_packing():
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(4, 128, generator=g) * torch.logspace(-4, 4, 128)).bfloat16()
    p, s = v4k.fp4_act_quant(x)
    np_, ns = naive_fp4_act_quant(x)
    assert torch.equal(p, np_) and torch.equal(s, ns) and p.dtype == torch.uint8
    # nibble order: element 2i in the low nibble
    x2 = torch.tensor([[0.5, 6.0, -1.0, 0.0] + [0.0] * 28])
    p2, s2 = v4k.fp4_act_quant(x2)
    assert s2.item() == 1.0 and p2[0, 0].item() == 0x71 and p2[0, 1].item() == 0x0A
    assert torch.equal(naive_fp4_decode(p2)[0, :4], x2[0, :4])


def test_fp4_scales_and_tiny_blocks():
    rows = torch.zeros(5, 32)
    for i, k in enumerate((-4, 0, 3)):
        rows[i, 0] = 6.0 * 2.0**k  # amax = 6·2^k exactly -> scale 2^k
        rows[i, 1] = 5.0 * 2.0**k  # tie 5 -> 4
    rows[3, 0] = 1e-38  # tiny: clamp at 6·2^-126
    rows[4, 0] = -0.0
    p, s = v4k.fp4_act_quant(rows)
    assert s[:3, 0].tolist() == [2.0**-4, 1.0, 8.0]
    assert s[3, 0].item() == 2.0**-126 and s[4, 0].item() == 2.0**-126
    y = v4k.fp4_act_dequant(p, s, 32, torch.float32)
    for i, k in enumerate((-4, 0, 3)):
        assert y[i, :2].tolist() == [6.0 * 2.0**k, 4.0 * 2.0**k]
    assert torch.isfinite(y).all()
    assert p[4, 0].item() & 0xF == 0x8  # negative zero keeps its sign bit
    assert torch.signbit(v4k.fp4_act_roundtrip(rows)[4, 0]).item()


def test_fp4_inplace_roundtrip_dequant_and_x2_storage():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(3, 4, 128, generator=g).bfloat16()
    rt = v4k.fp4_act_roundtrip(base)
    x = base.clone()
    assert v4k.fp4_act_quant(x, inplace=True) is x and torch.equal(x, rt)
    p, s = v4k.fp4_act_quant(base)
    assert torch.equal(v4k.fp4_act_dequant(p, s, 32, torch.bfloat16), rt)
    assert torch.equal(v4k.fp4_act_dequant(p.view(torch.float4_e2m1fn_x2), s, 32, torch.bfloat16), rt)
    assert torch.equal(v4k.fp4_act_dequant(p.view(torch.int8), s.to(torch.float8_e8m0fnu), 32, torch.bfloat16), rt)
    assert torch.equal(v4k.fp4_act_roundtrip(rt), rt)


# ----------------------------------------------------------------------------- Hadamard
def test_hadamard():
    n = 128
    eye = torch.eye(n)
    h = v4k.hadamard_transform(eye)  # rows = H/sqrt(n)
    assert torch.equal(h.abs(), torch.full((n, n), n**-0.5))
    assert torch.allclose(h @ h.T, eye, atol=1e-6)  # orthonormal
    hm = (h * math.sqrt(n)).round()
    assert torch.allclose(h * math.sqrt(n), hm, atol=1e-6) and torch.equal(hm @ hm, n * eye)  # H·H = n·I
    assert torch.equal(hm[:2, :4], torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1]]))  # Sylvester order
    # ±1 basis vectors: row i of H, sign flips with the input (bf16, exact: ±2^-3.5 rounds the same)
    for i in (0, 1, 77, 127):
        for sgn in (1.0, -1.0):
            e = torch.zeros(1, n, dtype=torch.bfloat16)
            e[0, i] = sgn
            y = v4k.hadamard_transform(e)
            assert torch.equal(y[0], (sgn * h[i]).bfloat16())
    x = torch.randn(3, 16, n).bfloat16()
    y = v4k.hadamard_transform(x)
    assert y.dtype == torch.bfloat16
    ulp = 2.0 ** (torch.floor(torch.log2(y.float().abs().clamp_min(1e-30))) - 7)
    exact = x.double() @ hm.double() / math.sqrt(n)
    assert bool(((y.double() - exact).abs() <= ulp.double()).all())  # <= 1 bf16 ulp
    assert torch.equal(v4k.hadamard_transform(torch.ones(2, 1)), torch.ones(2, 1))


# ----------------------------------------------------------------------------- GEMMs
def _fp64_dequant_gemm(a, a_s, bdeq):
    adeq = a.double() * a_s.double().repeat_interleave(128, 1)[:, : a.shape[1]]
    return adeq @ bdeq.T


def _check_gemm(c, exact):
    assert torch.isfinite(c).all()
    rel = (c.double() - exact).norm() / exact.norm()
    cos = torch.nn.functional.cosine_similarity(c.double().flatten(), exact.flatten(), dim=0)
    assert rel <= 1e-2 and cos >= 0.9999, (float(rel), float(cos))


@pytest.mark.parametrize("m,n,k", [(1, 200, 256), (5, 128, 384), (3, 70, 200), (2, 129, 128)])
def test_fp8_gemm_vs_fp64(m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    a, a_s = _quant_ragged(torch.randn(m, k, generator=g))
    w = torch.randn(n, k, generator=g)
    b, b_s = _quant_weight_fp8(w)
    bdeq = b.double() * b_s.double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    exact = _fp64_dequant_gemm(a, a_s, bdeq)
    for dt in (torch.bfloat16, torch.float32):
        c = v4k.fp8_gemm(a, a_s, b, b_s, dt)
        assert c.dtype == dt and c.shape == (m, n)
        _check_gemm(c, exact)
    # fp32 output of the reference is near-exact; e8m0 scales give identical results
    c32 = v4k.fp8_gemm(a, a_s, b, b_s, torch.float32)
    assert torch.allclose(c32.double(), exact, rtol=1e-5, atol=1e-4)
    assert torch.equal(v4k.fp8_gemm(a, a_s.to(torch.float8_e8m0fnu), b, b_s.to(torch.float8_e8m0fnu), torch.float32), c32)
    # scales really are applied per tile: perturbing one b_s tile changes exactly its columns
    b_s2 = b_s.clone()
    b_s2[0, 0] *= 2
    diff = (v4k.fp8_gemm(a, a_s, b, b_s2, torch.float32) - c32).abs().sum(0) > 0
    assert bool(diff[: min(n, 128)].any()) and not bool(diff[128:].any())


def _quant_ragged(x):
    # K not a multiple of 128: quantise the zero-padded matrix and drop the padding
    k = x.shape[1]
    kp = (k + 127) // 128 * 128
    q, s = v4k.act_quant(torch.nn.functional.pad(x, (0, kp - k)), 128)
    return q[:, :k].contiguous(), s


def _quant_weight_fp8(w):
    n, k = w.shape
    np_, kp = (n + 127) // 128 * 128, (k + 127) // 128 * 128
    wp = torch.nn.functional.pad(w, (0, kp - k, 0, np_ - n))
    tiles = wp.reshape(np_ // 128, 128, kp // 128, 128)
    s = (tiles.abs().amax((1, 3)) / 448).clamp_min(1e-4)
    s = 2.0 ** torch.ceil(torch.log2(s))
    q = (tiles / s[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.reshape(np_, kp)[:n, :k].contiguous(), s


@pytest.mark.parametrize("m,n,k", [(1, 200, 128), (4, 64, 96), (3, 130, 256)])
def test_fp4_gemm_vs_fp64(m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    a, a_s = _quant_ragged(torch.randn(m, k, generator=g))
    b, b_s = v4k.fp4_act_quant(torch.randn(n, k, generator=g), 32)
    bdeq = naive_fp4_decode(b).double() * b_s.double().repeat_interleave(32, 1)
    exact = _fp64_dequant_gemm(a, a_s, bdeq)
    for dt in (torch.bfloat16, torch.float32):
        _check_gemm(v4k.fp4_gemm(a, a_s, b, b_s, dt), exact)
    c32 = v4k.fp4_gemm(a, a_s, b, b_s, torch.float32)
    assert torch.allclose(c32.double(), exact, rtol=1e-5, atol=1e-4)
    assert torch.equal(v4k.fp4_gemm(a, a_s.to(torch.float8_e8m0fnu), b, b_s.to(torch.float8_e8m0fnu), torch.float32), c32)
    assert torch.equal(v4k.fp4_gemm(a, a_s, b.view(torch.float4_e2m1fn_x2), b_s, torch.float32), c32)


# ----------------------------------------------------------------------------- empty + bad inputs
def test_empty_inputs():
    q, s = v4k.act_quant(torch.zeros(0, 256))
    assert q.shape == (0, 256) and s.shape == (0, 2) and q.dtype == torch.float8_e4m3fn
    q, s = v4k.act_quant(torch.zeros(0, 256), scale_dtype=torch.float8_e8m0fnu)
    assert s.dtype == torch.float8_e8m0fnu
    assert v4k.act_quant_roundtrip(torch.zeros(3, 0)).shape == (3, 0)
    p, s = v4k.fp4_act_quant(torch.zeros(2, 0, 64))
    assert p.shape == (2, 0, 32) and s.shape == (2, 0, 2)
    assert v4k.fp4_act_dequant(p, s).shape == (2, 0, 64)
    assert v4k.hadamard_transform(torch.zeros(0, 128)).shape == (0, 128)
    a = torch.zeros(0, 128, dtype=torch.float8_e4m3fn)
    assert v4k.fp8_gemm(a, torch.zeros(0, 1), torch.zeros(5, 128, dtype=torch.float8_e4m3fn), torch.ones(1, 1)).shape == (0, 5)
    assert v4k.fp4_gemm(a, torch.zeros(0, 1), torch.zeros(5, 64, dtype=torch.uint8), torch.ones(5, 4)).shape == (0, 5)


def _raises(exc, op, *words):
    return pytest.raises(exc, match=rf"^{op}: .*" + ".*".join(words))


def test_bad_inputs():
    x = torch.randn(2, 256)
    with _raises(ValueError, "act_quant", "x.shape", "multiple of block_size=128", "200"):
        v4k.act_quant(torch.randn(2, 200))
    with _raises(TypeError, "act_quant", "x", "dtype", "int32"):
        v4k.act_quant(x.int())
    with _raises(ValueError, "act_quant", "scale_fmt", "ue8m0", "e4m3"):
        v4k.act_quant(x, scale_fmt="e4m3")
    with _raises(ValueError, "act_quant", "scale_dtype", "float8_e8m0fnu", "float16"):
        v4k.act_quant(x, scale_dtype=torch.float16)
    with _raises(ValueError, "act_quant", "scale_dtype=float8_e8m0fnu", "scale_fmt=None"):
        v4k.act_quant(x, scale_fmt=None, scale_dtype=torch.float8_e8m0fnu)
    with _raises(TypeError, "act_quant", "block_size", "int", "float"):
        v4k.act_quant(x, 128.0)
    with _raises(ValueError, "act_quant", "block_size", ">= 1", "0"):
        v4k.act_quant(x, 0)
    with _raises(TypeError, "act_quant", "x", "torch.Tensor", "list"):
        v4k.act_quant([1.0] * 128)
    with _raises(ValueError, "act_quant_roundtrip", "multiple of block_size=64", "100"):
        v4k.act_quant_roundtrip(torch.randn(100), 64)
    q, s = v4k.act_quant(x)
    with _raises(TypeError, "act_dequant", "y", "float8_e4m3fn", "float32"):
        v4k.act_dequant(x, s)
    with _raises(ValueError, "act_dequant", "scales", r"\[2, 2\]", r"\[2, 1\]"):
        v4k.act_dequant(q, s[:, :1])
    with _raises(TypeError, "act_dequant", "scales", "float32/float8_e8m0fnu", "bfloat16"):
        v4k.act_dequant(q, s.bfloat16())
    with _raises(ValueError, "act_dequant", "out_dtype", "bf16/fp16/fp32", "int32"):
        v4k.act_dequant(q, s, out_dtype=torch.int32)
    with _raises(ValueError, "act_dequant", "scales", "meta", "y", "cpu"):
        v4k.act_dequant(q, s.to("meta"))
    with _raises(ValueError, "fp4_act_quant", "multiple of block_size=32", "48"):
        v4k.fp4_act_quant(torch.randn(2, 48))
    with _raises(ValueError, "fp4_act_quant", "even", "3"):
        v4k.fp4_act_quant(torch.randn(2, 3), 1)
    with _raises(ValueError, "fp4_act_roundtrip", "multiple of block_size=32", "16"):
        v4k.fp4_act_roundtrip(torch.randn(16))
    p, ps = v4k.fp4_act_quant(x)
    with _raises(TypeError, "fp4_act_dequant", "packed", "uint8", "float32"):
        v4k.fp4_act_dequant(x, ps)
    with _raises(ValueError, "fp4_act_dequant", "scales", r"\[2, 8\]", r"\[2, 4\]"):
        v4k.fp4_act_dequant(p, ps[:, :4])
    with _raises(ValueError, "hadamard_transform", "power of two", r"\[2, 96\]"):
        v4k.hadamard_transform(torch.randn(2, 96))
    with _raises(TypeError, "hadamard_transform", "x", "dtype", "int64"):
        v4k.hadamard_transform(torch.ones(2, 4, dtype=torch.long))
    b, b_s = _quant_weight_fp8(torch.randn(64, 256))
    with _raises(ValueError, "fp8_gemm", "a", "2 dims", r"\(2, 1, 256\)"):
        v4k.fp8_gemm(q.unsqueeze(1), s, b, b_s)
    with _raises(ValueError, "fp8_gemm", "b.shape\\[1\\]", "128", "K of a", "256"):
        v4k.fp8_gemm(q[:, :128].contiguous(), s[:, :1], b, b_s)
    with _raises(ValueError, "fp8_gemm", "b_s", r"\[1, 2\]", r"\[2, 2\]"):
        v4k.fp8_gemm(q, s, b, torch.ones(2, 2))
    with _raises(ValueError, "fp8_gemm", "a_s", r"\[2, 2\]", r"\[2, 1\]"):
        v4k.fp8_gemm(q, s[:, :1], b, b_s)
    with _raises(TypeError, "fp8_gemm", "b", "float8_e4m3fn", "bfloat16"):
        v4k.fp8_gemm(q, s, b.bfloat16(), b_s)
    wb, wb_s = v4k.fp4_act_quant(torch.randn(64, 256))
    with _raises(ValueError, "fp4_gemm", "b.shape\\[1\\]", "128", "K/2", "64"):
        v4k.fp4_gemm(q, s, wb[:, :64].contiguous(), wb_s)
    with _raises(ValueError, "fp4_gemm", "b_s", r"\[64, 8\]", r"\[64, 4\]"):
        v4k.fp4_gemm(q, s, wb, wb_s[:, :4].contiguous())
    with _raises(ValueError, "fp4_gemm", "multiple of 32", "48"):
        v4k.fp4_gemm(torch.zeros(2, 48, dtype=torch.float8_e4m3fn), torch.ones(2, 1), wb, wb_s)
    with _raises(TypeError, "fp4_gemm", "b", "uint8", "float32"):
        v4k.fp4_gemm(q, s, wb.float(), wb_s)
