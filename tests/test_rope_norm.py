"""RoPE (SPEC §3) and RMSNorm (SPEC §5.1): frequency tables, rotation vs complex-number
implementations at long positions, inverse, layout, norm variants and bad inputs."""
from __future__ import annotations

import pytest
import torch

import v4kernels as v4k
from v4kernels.testing.cases.rope_norm import naive_apply_rope, naive_rms_norm

pytestmark = pytest.mark.usefixtures("reference_backend")


POSITIONS = [0, 1, 127, 128, 65535, 65536, 1_000_000]


def test_frequency_spot_values():
    yarn = v4k.rope_frequencies(64, 160000.0, 16.0, 65536, 32.0, 1.0)
    assert torch.equal(yarn, v4k.v4_rope_frequencies(True))
    plain = v4k.rope_frequencies(base=160000.0)
    idx = [0, 1, 8, 15, 16, 20, 24, 25, 31]
    theta = [1.0, 6.87656e-1, 5.0e-2, 3.63554e-3, 2.5e-3, 5.59017e-4, 1.25e-4, 8.59570e-5, 9.08885e-6]
    theta_y = [1.0, 6.87656e-1, 5.0e-2, 3.63554e-3, 2.26563e-3, 2.96978e-4, 1.95313e-5, 5.37231e-6, 5.68053e-7]
    assert torch.allclose(plain[idx], torch.tensor(theta), rtol=1e-5, atol=0)
    assert torch.allclose(yarn[idx], torch.tensor(theta_y), rtol=1e-5, atol=0)
    assert torch.equal(yarn[:16], plain[:16])  # pairs 0..15 keep their frequency (low = 15)
    assert torch.allclose(yarn[25:], plain[25:] / 16, rtol=1e-6)  # pairs >= 25 divided by 16
    main = v4k.v4_rope_frequencies(False)
    assert main.dtype == torch.float32 and main.shape == (32,)
    assert torch.allclose(main[[0, 15, 31]], torch.tensor([1.0, 1.3335e-2, 1.3335e-4]), rtol=1e-4, atol=0)


def _off_style_rope(x, positions, freqs, inverse=False):
    """[OFF]-style: fp32 angle table, torch.polar -> complex64, complex multiply, one rounding."""
    ang = positions.to(torch.float32).unsqueeze(-1) * freqs
    cis = torch.polar(torch.ones_like(ang), ang)
    if inverse:
        cis = cis.conj()
    r = 2 * freqs.shape[0]
    y = x.clone()
    z = torch.view_as_complex(x[..., -r:].float().reshape(*x.shape[:-1], r // 2, 2).contiguous())
    cis = cis.reshape(*cis.shape[:2], *([1] * (x.dim() - 3)), r // 2)
    y[..., -r:] = torch.view_as_real(z * cis).flatten(-2).to(x.dtype)
    return y


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("inverse", [False, True])
def test_apply_rope_vs_complex(compressed, inverse):
    g = torch.Generator().manual_seed(int(compressed) * 2 + int(inverse))
    x = torch.randn(2, len(POSITIONS), 3, 512, generator=g).bfloat16()
    pos = torch.tensor(POSITIONS).expand(2, -1)
    f = v4k.v4_rope_frequencies(compressed)
    y = v4k.apply_rope(x, pos, f, inverse=inverse)
    # fp32 angle reproduced -> bitwise after bf16 against the complex64 formulation
    assert torch.equal(y, _off_style_rope(x, pos, f, inverse))
    # per-element complex numbers in float64 (same fp32 angle): <= 1 bf16 ulp
    nv = naive_apply_rope(x[:1], pos[:1], f, inverse)
    ulp = 2.0 ** (torch.floor(torch.log2(nv.float().abs().clamp_min(1e-30))) - 7)
    assert bool(((y[:1].float() - nv.float()).abs() <= ulp).all())


def test_angle_is_an_fp32_product():
    """At p = 10^6 the fp32 rounding of p·θ moves the angle by up to ~0.06 rad (SPEC §3.4): a
    float64 angle gives visibly different results, so the test would catch that perturbation."""
    x = torch.randn(1, 1, 64)
    pos = torch.tensor([[1_000_000]])
    f = v4k.v4_rope_frequencies(False)
    y = v4k.apply_rope(x, pos, f)
    ang64 = 1_000_000 * f.double()
    a, b = x[..., 0::2].double(), x[..., 1::2].double()
    y64 = torch.stack((a * ang64.cos() - b * ang64.sin(), a * ang64.sin() + b * ang64.cos()), -1).flatten(-2)
    assert (y.double() - y64).abs().max() > 1e-3
    ang32 = (torch.tensor(1_000_000.0) * f).double()
    y32 = torch.stack((a * ang32.cos() - b * ang32.sin(), a * ang32.sin() + b * ang32.cos()), -1).flatten(-2)
    assert torch.allclose(y.double(), y32, atol=1e-5)


def test_interleaved_layout_and_nope_untouched():
    x = torch.zeros(1, 2, 512)
    x[..., 448] = 1.0  # real part of pair 0 (theta_0 = 1)
    x[..., :448] = torch.arange(448.0)
    f = v4k.rope_frequencies()
    y = v4k.apply_rope(x, torch.tensor([0, 1]), f)
    assert torch.equal(y[..., :448], x[..., :448])
    assert torch.equal(y[0, 0], x[0, 0])  # position 0 is the identity
    c, s = torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))
    assert torch.allclose(y[0, 1, 448:450], torch.stack((c, s)))  # adjacent pair (a, b) rotated together
    assert torch.equal(y[0, 1, 450:], torch.zeros(62))  # not NeoX: nothing lands at 448 + 32
    # the rope dims are the TRAILING ones for a 128-dim indexer head too
    xi = torch.zeros(1, 1, 2, 128)
    xi[..., 64] = 1.0
    yi = v4k.apply_rope(xi, torch.tensor([[1]]), f)
    assert torch.allclose(yi[0, 0, :, 64:66], torch.stack((c, s)).expand(2, 2))
    assert torch.equal(yi[..., :64], xi[..., :64])


def test_inverse_of_forward_is_identity():
    x = torch.randn(2, 7, 4, 512, dtype=torch.float64).float()
    pos = torch.tensor(POSITIONS).expand(2, -1)
    for comp in (False, True):
        f = v4k.v4_rope_frequencies(comp)
        back = v4k.apply_rope(v4k.apply_rope(x, pos, f), pos, f, inverse=True)
        assert torch.allclose(back, x, atol=1e-5)
        fwd = v4k.apply_rope(x, pos, f)
        assert not torch.allclose(fwd[:, 1:], x[:, 1:], atol=1e-3)
    # relative-position property (SPEC §9.3): <R(p)q, R(p')k> depends only on p - p'
    f = v4k.v4_rope_frequencies(True)
    q, k = torch.randn(1, 1, 64, dtype=torch.float64).float(), torch.randn(1, 1, 64, dtype=torch.float64).float()
    d1 = (v4k.apply_rope(q, torch.tensor([[10]]), f) * v4k.apply_rope(k, torch.tensor([[3]]), f)).sum()
    d2 = (v4k.apply_rope(q, torch.tensor([[107]]), f) * v4k.apply_rope(k, torch.tensor([[100]]), f)).sum()
    assert torch.allclose(d1, d2, atol=1e-4)


def test_positions_forms_and_dtypes():
    x = torch.randn(2, 3, 128).bfloat16()
    f = v4k.rope_frequencies()
    p2 = torch.tensor([[5, 6, 7], [0, 1, 2]])
    y = v4k.apply_rope(x, p2.int(), f)
    assert torch.equal(y, v4k.apply_rope(x, p2, f))
    assert torch.equal(v4k.apply_rope(x, torch.tensor([5, 6, 7]), f)[0], y[0])
    assert y.dtype == torch.bfloat16
    assert v4k.apply_rope(x.half(), p2, f).dtype == torch.float16
    assert v4k.apply_rope(torch.zeros(0, 3, 128), torch.zeros(0, 3, dtype=torch.long), f).shape == (0, 3, 128)


def test_rms_norm_variants():
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(4, 1024, generator=g) * 3).bfloat16()
    w = torch.randn(1024, generator=g).bfloat16()
    y = v4k.rms_norm(x, w)
    xf = x.float()
    xn = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(y, (w.float() * xn).bfloat16())  # [OFF]: one rounding
    assert torch.equal(v4k.rms_norm(x, None), xn.bfloat16())
    # [HF] (transformers 5.23.0): the weighted norm multiplies in fp32 and rounds once (= default);
    # the unweighted one rounds the rsqrt factor to bf16 and the product again
    assert torch.equal(v4k.rms_norm(x, w, hf_rounding=True), y)
    inv = torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)
    hf = v4k.rms_norm(x, None, hf_rounding=True)
    assert torch.equal(hf, x * inv.bfloat16())
    assert not torch.equal(hf, xn.bfloat16())
    nv = naive_rms_norm(x, w)
    assert bool(((y.float() - nv.float()).abs() <= nv.float().abs() * 2.0**-7 + 1e-6).all())
    # eps matters for tiny rows; fp32 input stays fp32
    tiny = torch.full((1, 8), 1e-4)
    assert torch.allclose(v4k.rms_norm(tiny, None, eps=1e-6), tiny / torch.sqrt(torch.tensor(1e-8 + 1e-6)))
    assert v4k.rms_norm(x.float(), w).dtype == torch.float32
    assert v4k.rms_norm(torch.zeros(0, 16), torch.ones(16)).shape == (0, 16)


def _raises(exc, op, *words):
    return pytest.raises(exc, match=rf"^{op}: .*" + ".*".join(words))


def test_bad_inputs():
    f = v4k.rope_frequencies()
    x = torch.randn(1, 2, 512)
    with _raises(ValueError, "apply_rope", "x", ">= 3 dims", r"\[2, 512\]"):
        v4k.apply_rope(x[0], torch.arange(2), f)
    with _raises(TypeError, "apply_rope", "x", "dtype", "int64"):
        v4k.apply_rope(x.long(), torch.arange(2), f)
    with _raises(TypeError, "apply_rope", "freqs", "float32", "float64"):
        v4k.apply_rope(x, torch.arange(2), f.double())
    with _raises(ValueError, "apply_rope", "rope dims", "512"):
        v4k.apply_rope(x, torch.arange(2), torch.ones(257))
    with _raises(ValueError, "apply_rope", "positions", r"\[2\]", r"\[3\]"):
        v4k.apply_rope(x, torch.arange(3), f)
    with _raises(ValueError, "apply_rope", "positions", r"\[1, 2\]", r"\[2, 2\]"):
        v4k.apply_rope(x, torch.zeros(2, 2, dtype=torch.long), f)
    with _raises(TypeError, "apply_rope", "positions", "int32/int64", "float32"):
        v4k.apply_rope(x, torch.zeros(2), f)
    with _raises(ValueError, "apply_rope", "positions", ">= 0", "-1"):
        v4k.apply_rope(x, torch.tensor([0, -1]), f)
    with _raises(ValueError, "apply_rope", "freqs", "meta", "x", "cpu"):
        v4k.apply_rope(x, torch.arange(2), f.to("meta"))
    with _raises(ValueError, "rms_norm", "weight", r"\[512\]", r"\[511\]"):
        v4k.rms_norm(x, torch.ones(511))
    with _raises(TypeError, "rms_norm", "x", "dtype", "int64"):
        v4k.rms_norm(x.long())
    with _raises(ValueError, "rms_norm", "eps", ">= 0", "-1"):
        v4k.rms_norm(x, None, eps=-1.0)
    with _raises(ValueError, "rms_norm", "x", "scalar"):
        v4k.rms_norm(torch.tensor(1.0))
    with _raises(ValueError, "rope_frequencies", "rope_dim", "even", "63"):
        v4k.rope_frequencies(63)
    with _raises(ValueError, "rope_frequencies", "base", "> 1", "0.5"):
        v4k.rope_frequencies(64, 0.5)
    with _raises(ValueError, "rope_frequencies", "factor", ">= 1", "0.5"):
        v4k.rope_frequencies(64, 10000.0, 0.5)
