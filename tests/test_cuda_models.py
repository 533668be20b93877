"""Line-by-line PyTorch models of the native CUDA kernels' algorithms (csrc/cuda/mhc.cu,
compressor.cu, common.cuh), run on the CPU against the reference.

They check the parts where the kernels deliberately differ in *form* from the reference — the
bit-level FP8/FP4 codecs and power-of-two scale exponents, the in-place Hadamard butterfly and
its indexing, the pooling as ``Σ kv·(e/den)`` in slot order, the loop form of the Sinkhorn
iteration — so a translation error there shows up without a GPU. Each model mirrors the kernel
code statement by statement (same order of operations; fp32 throughout).
"""
from __future__ import annotations

import math

import pytest
import torch

from v4kernels.ops.compressor.reference import finish_entry, pool_window
from v4kernels.ops.mhc.reference import sinkhorn_split
from v4kernels.ops.quant import reference as Q

F32 = torch.float32


def f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=F32)


# ------------------------------------------------------------------------------ common.cuh
def pow2_scale_exp(amax: torch.Tensor, inv_qmax: float) -> torch.Tensor:
    f = amax * f32(inv_qmax)
    bits = f.view(torch.int32)
    return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    a = v.abs().clamp_max(6.0)
    q = torch.where(a < 2, torch.round(a * 2) * 0.5, torch.where(a < 4, torch.round(a), torch.round(a * 0.5) * 2))
    code = torch.where(q < 2, q * 2, torch.where(q < 4, q + 2, q * 0.5 + 4)).to(torch.int32)
    return code | (torch.signbit(v).to(torch.int32) << 3)


def test_codecs_and_scale_exponents_match_reference():
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(100_000, generator=g) * s for s in (1e-3, 0.3, 3, 40)] +
                  [torch.arange(-7, 7.01, 0.25), torch.tensor([-0.0, 0.0, 6.0, 7.0, -6.5])])
    assert torch.equal(e2m1_encode(v).to(torch.uint8), Q.fp4_encode(v))
    amax = v.abs().clamp_min(1e-4)
    for qmax in (448.0, 6.0):
        k = pow2_scale_exp(amax, 1.0 / qmax)
        assert torch.equal(torch.ldexp(torch.ones_like(amax), k.float()), Q.pow2_scale(amax, qmax))


# ------------------------------------------------------------------------------ mhc.cu
def kernel_sinkhorn(m, scale, base, iters, eps, hc=4):
    """sinkhorn_split of mhc.cu for one token, scalar loops as in the kernel."""
    sig = lambda x: 1.0 / (1.0 + torch.exp(-x))  # noqa: E731
    pre = [sig(m[j] * scale[0] + base[j]) + eps for j in range(hc)]
    post = [2.0 * sig(m[hc + j] * scale[1] + base[hc + j]) for j in range(hc)]
    c = [[None] * hc for _ in range(hc)]
    for j in range(hc):
        lg = [m[2 * hc + hc * j + k] * scale[2] + base[2 * hc + hc * j + k] for k in range(hc)]
        mx = max(lg)
        ex = [torch.exp(x - mx) for x in lg]
        s = sum(ex[1:], ex[0])
        for k in range(hc):
            c[j][k] = ex[k] / s + eps

    def col_norm():
        for k in range(hc):
            s = sum((c[j][k] for j in range(1, hc)), c[0][k]) + eps
            for j in range(hc):
                c[j][k] = c[j][k] / s

    col_norm()
    for _ in range(iters - 1):
        for j in range(hc):
            s = sum(c[j][1:], c[j][0]) + eps
            for k in range(hc):
                c[j][k] = c[j][k] / s
        col_norm()
    return torch.stack(pre), torch.stack(post), torch.stack([torch.stack(r) for r in c])


def test_sinkhorn_loops_match_reference():
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        m = torch.randn(24, generator=g) * 3
        scale, base = torch.rand(3, generator=g) + 0.5, torch.randn(24, generator=g)
        got = kernel_sinkhorn(m, scale, base, 20, 1e-6)
        exp = sinkhorn_split(m[None], scale, base, 4, 20, 1e-6)
        for a, e in zip(got, exp):
            assert torch.allclose(a, e[0], rtol=2e-6, atol=2e-7)


# ------------------------------------------------------------------------------ compressor.cu
def kernel_pool(kv: torch.Tensor, sc: torch.Tensor) -> torch.Tensor:
    """pool_kernel's per-dim pooling: max, den = Σ e (slot order), acc = Σ kv·(e/den)."""
    mx = sc.amax(0)
    den = torch.zeros(kv.shape[1])
    for i in range(kv.shape[0]):
        den = den + torch.exp(sc[i] - mx)
    acc = torch.zeros(kv.shape[1])
    for i in range(kv.shape[0]):
        acc = acc + kv[i] * (torch.exp(sc[i] - mx) / den)
    return acc


def kernel_epilogue(c, pos, norm_w, freqs, quant, eps, dt):
    rnd = lambda x: x.to(dt).to(F32)  # noqa: E731
    hd = c.shape[0]
    y = rnd(c)
    tot = (y * y).sum()
    inv = 1.0 / torch.sqrt(tot / f32(hd) + f32(eps))
    y = rnd((y * inv) * norm_w.float())
    r = 2 * freqs.shape[0]
    nope = hd - r
    ang = f32(pos) * freqs
    cs, sn = torch.cos(ang), torch.sin(ang)
    a, b = y[nope::2].clone(), y[nope + 1 :: 2].clone()
    y[nope::2] = rnd(a * cs - b * sn)
    y[nope + 1 :: 2] = rnd(a * sn + b * cs)
    if quant == "fp8":
        blocks = y[:nope].view(-1, 64)
        e = pow2_scale_exp(blocks.abs().amax(1).clamp_min(1e-4), 1.0 / 448.0)
        s, rs = torch.ldexp(torch.ones(e.shape), e.float()), torch.ldexp(torch.ones(e.shape), -e.float())
        q = (blocks * rs[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s[:, None]
        y[:nope] = rnd(q).view(-1)
    elif quant == "fp4":
        h = 1
        while h < hd:  # the kernel's butterfly: pair (lo, lo + h), lo = (i / h)·2h + i % h
            i = torch.arange(hd // 2)
            lo = (i // h) * 2 * h + i % h
            hi = lo + h
            u, v = y[lo].clone(), y[hi].clone()
            y[lo], y[hi] = u + v, u - v
            h <<= 1
        y = rnd(y * f32(1.0 / math.sqrt(hd)))
        blocks = y.view(-1, 32)
        e = pow2_scale_exp(blocks.abs().amax(1).clamp_min(6.0 * 2.0**-126), 1.0 / 6.0)
        s, rs = torch.ldexp(torch.ones(e.shape), e.float()), torch.ldexp(torch.ones(e.shape), -e.float())
        codes = e2m1_encode(blocks * rs[:, None])
        y = rnd(Q.fp4_decode(codes.to(torch.uint8)) * s[:, None]).view(-1)
    return y.to(dt)


@pytest.mark.parametrize("quant,hd", [("fp8", 512), ("fp4", 128), ("none", 512)])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32])
def test_pool_and_epilogue_match_reference(quant, hd, dt):
    g = torch.Generator().manual_seed(hd)
    freqs = 1.0 / (10000 ** (torch.arange(32, dtype=F32) / 32))
    exact = total = 0
    for trial in range(6):
        slots = 8
        kv = torch.randn(slots, hd, generator=g)
        sc = torch.randn(slots, hd, generator=g) * 2
        sc[:4, : hd // 2] = float("-inf") if trial % 2 else sc[:4, : hd // 2]  # window 0: no previous slots
        w = (torch.rand(hd, generator=g) + 0.5).to(dt)
        c_k, c_r = kernel_pool(kv, sc), pool_window(kv, sc)
        assert torch.allclose(c_k, c_r, rtol=1e-6, atol=1e-6)
        pos = 4 * (37 + trial)
        got = kernel_epilogue(c_r, pos, w, freqs, quant, 1e-6, dt).float()
        exp = finish_entry(c_r, pos, w, freqs, quant, 1e-6, dt).float()
        assert torch.allclose(got, exp, rtol=2e-2, atol=2e-2 * float(exp.abs().max()) / 8)
        exact += int((got == exp).sum())
        total += hd
    # same operations in the same order: in bf16 the one rounding absorbs the only differences
    # (order of the square sum / Hadamard adds, rsqrt vs 1/sqrt); in fp32 those are 1-ulp differences
    if dt == torch.bfloat16:
        assert exact / total > 0.97
    elif quant == "none":
        assert torch.allclose(got, exp, rtol=1e-5, atol=1e-6)
