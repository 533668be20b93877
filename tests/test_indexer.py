"""Lightning indexer (SPEC §7): causal limit, −1 sentinel, decode boundary crossing, T = 4·K_top,
quantised keys, tiling, a per-element loop as second reference, set-recall compare, bad inputs."""
from __future__ import annotations

import doctest
import math

import pytest
import torch

import v4kernels as v4k
import v4kernels.ops.indexer as indexer_mod
from v4kernels.ops.indexer import reference as ref
from v4kernels.testing import compare_topk, index_set_recall
from v4kernels.testing.cases.indexer import dense_topk, naive_loop_scores, naive_select


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(b, s, h, d, n, seed=0, dtype=torch.float32):
    g = _gen(seed)
    q = torch.randn(b, s, h, d, generator=g).to(dtype)
    w = torch.randn(b, s, h, generator=g).to(dtype)
    k = torch.randn(b, n, d, generator=g).to(dtype)
    return q, w, k


def _visible(positions, ratio=4):
    return (torch.as_tensor(positions).long() + 1) // ratio




@pytest.fixture(autouse=True)
def _reference_backend(reference_backend_for):
    with reference_backend_for(("indexer_scores", "indexer_topk")):
        yield

# --------------------------------------------------------------------- causal limit and sentinel
def test_causal_limit_positions_0_to_9():
    q, w, k = _inputs(1, 10, 2, 8, 3)
    pos = torch.arange(10)[None]
    sc = v4k.indexer_scores(q, w, k, pos)
    assert sc.shape == (1, 10, 3) and sc.dtype == torch.float32
    finite = torch.isfinite(sc[0]).sum(-1).tolist()
    assert finite == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]  # t = 2 sees none, t = 3 sees entry 0, t = 7 sees 0..1
    # visible entries are a prefix, masked ones are exactly −inf
    c = torch.arange(3)
    assert torch.equal(torch.isinf(sc[0]), c[None] >= _visible(pos[0])[:, None])
    assert bool((sc[0][torch.isinf(sc[0])] < 0).all())


def test_sentinel_pattern_exact():
    q, w, k = _inputs(1, 10, 2, 8, 3, seed=1)
    pos = torch.arange(10)[None]
    idx = v4k.indexer_topk(q, w, k, pos, 2, offset=100)
    assert idx.shape == (1, 10, 2) and idx.dtype == torch.int32
    sc = naive_loop_scores(q, w, k, pos)
    assert torch.equal(idx, naive_select(sc, pos, 2, offset=100))
    assert (idx[0] < 0).sum(-1).tolist() == [2, 2, 2, 1, 1, 1, 1, 0, 0, 0]
    assert _row(idx[0, 3]) == [100, -1]  # t = 3: only entry 0, plus offset
    assert set(_row(idx[0, 9])) == {100, 101}


def _row(t):
    return [int(v) for v in t]


def test_rows_with_fewer_than_k_visible():
    q, w, k = _inputs(2, 12, 3, 16, 40, seed=2)
    pos = torch.tensor([list(range(0, 12)), list(range(30, 42))])
    idx = v4k.indexer_topk(q, w, k, pos, 8, offset=5)
    assert idx.shape == (2, 12, 8)
    n_valid = (idx >= 0).sum(-1)
    assert torch.equal(n_valid, _visible(pos).clamp(max=8))
    # valid entries are a prefix of the row, distinct, and in range [offset, offset + visible)
    for bi in range(2):
        for i in range(12):
            row = _row(idx[bi, i])
            v = int(n_valid[bi, i])
            assert all(x >= 0 for x in row[:v]) and all(x == -1 for x in row[v:])
            assert len(set(row[:v])) == v
            assert all(5 <= x < 5 + int(_visible(pos[bi, i])) for x in row[:v])
    assert torch.equal(idx, naive_select(naive_loop_scores(q, w, k, pos), pos, 8, offset=5))


def test_decode_crossing_a_boundary():
    # keys 0..j; entry j (the highest-scoring one) closes at token 4j + 3
    j = 6
    q, w, k = _inputs(1, 1, 2, 8, j + 1, seed=3)
    w = w.abs()
    k[0, j] = q[0, 0].sum(0) * 10  # makes every head's logit with entry j large and positive
    for t, expect_j in [(4 * j + 1, False), (4 * j + 2, False), (4 * j + 3, True), (4 * j + 4, True)]:
        idx = v4k.indexer_topk(q, w, k, torch.tensor([[t]]), 3, offset=128)
        assert ((idx == 128 + j).any().item()) == expect_j, t
        assert int((idx >= 0).sum()) == min(3, (t + 1) // 4)
        if expect_j:
            assert int(idx[0, 0, 0]) == 128 + j  # highest first


def test_t_equals_4_ktop():
    kt = 512
    q, w, k = _inputs(2, 1, 2, 16, kt, seed=4)
    pos = torch.tensor([[4 * kt - 1], [4 * kt - 2]])
    idx = v4k.indexer_topk(q, w, k, pos, kt, offset=128)
    assert idx.shape == (2, 1, kt)
    assert sorted(_row(idx[0, 0])) == list(range(128, 128 + kt))  # every entry, no sentinel
    assert (idx[1, 0] < 0).sum().item() == 1 and int(idx[1, 0, -1]) == -1
    assert 128 + kt - 1 not in _row(idx[1, 0])  # the entry closed by token 4·kt − 1 is not visible yet


def test_limit_beyond_key_count_is_clamped():
    q, w, k = _inputs(1, 2, 2, 8, 5, seed=5)
    pos = torch.tensor([[1000, 3]])
    sc = v4k.indexer_scores(q, w, k, pos)
    assert bool(torch.isfinite(sc[0, 0]).all()) and int(torch.isfinite(sc[0, 1]).sum()) == 1
    idx = v4k.indexer_topk(q, w, k, pos, 10)
    assert idx.shape == (1, 2, 5) and sorted(_row(idx[0, 0])) == [0, 1, 2, 3, 4]


def test_ratio_option():
    q, w, k = _inputs(1, 4, 1, 8, 4, seed=6)
    pos = torch.tensor([[0, 1, 2, 7]])
    sc = v4k.indexer_scores(q, w, k, pos, ratio=2)
    assert torch.isfinite(sc[0]).sum(-1).tolist() == [0, 1, 1, 4]


# --------------------------------------------------------------------- values: second reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_against_naive_loop(dtype):
    q, w, k = _inputs(2, 5, 3, 8, 6, seed=7, dtype=dtype)
    pos = torch.tensor([[0, 3, 8, 20, 23], [4, 5, 6, 7, 11]])
    sc = v4k.indexer_scores(q, w, k, pos)
    exp = naive_loop_scores(q, w, k, pos)
    torch.testing.assert_close(sc.double(), exp, rtol=1e-5, atol=1e-5)
    idx = v4k.indexer_topk(q, w, k, pos, 4, offset=7)
    assert torch.equal(idx, naive_select(exp, pos, 4, offset=7))


def test_relu_is_per_head_before_weighting():
    # one head with a negative logit contributes 0, not w·logit; a negative weight subtracts
    q = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # [1,1,2,2]
    k = torch.tensor([[[2.0, -3.0]]])  # logits: head0 = 2, head1 = −3
    w = torch.tensor([[[0.5, 10.0]]])
    assert v4k.indexer_scores(q, w, k, torch.tensor([[3]])).item() == 1.0
    w = torch.tensor([[[-0.5, 10.0]]])
    assert v4k.indexer_scores(q, w, k, torch.tensor([[3]])).item() == -1.0


def test_ties_prefer_lower_index():
    q = torch.ones(1, 2, 2, 4)
    w = torch.ones(1, 2, 2)
    k = torch.ones(1, 9, 4)
    k[0, 5] = 2.0  # strictly best
    idx = v4k.indexer_topk(q, w, k, torch.tensor([[39, 39]]), 4)
    assert _row(idx[0, 0]) == [5, 0, 1, 2] and torch.equal(idx[0, 0], idx[0, 1])
    # long rows with large tie groups (where unstable sorts and torch.topk reorder ties)
    n = 3000
    k = torch.ones(1, n, 4)
    k[0, ::7] = 2.0
    k[0, 2999] = 3.0
    q, w = torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1)
    idx = v4k.indexer_topk(q, w, k, torch.tensor([[4 * n]]), 600)
    exp = [2999] + list(range(0, n, 7)) + [c for c in range(n) if c % 7 and c != 2999][: 600 - 1 - len(range(0, n, 7))]
    assert _row(idx[0, 0]) == exp


def test_tiling_matches_untiled(monkeypatch):
    q, w, k = _inputs(2, 9, 5, 16, 37, seed=8)
    pos = torch.tensor([list(range(100, 109)), list(range(60, 69))])
    full_s = v4k.indexer_scores(q, w, k, pos)
    full_i = v4k.indexer_topk(q, w, k, pos, 11, offset=3)
    monkeypatch.setattr(ref, "_TILE_ELEMS", 40)  # -> 1 query, ≤ 2 heads per tile
    monkeypatch.setattr(ref, "_KEY_BLOCK", 8)  # -> 5 key blocks
    tiled_s = v4k.indexer_scores(q, w, k, pos)
    tiled_i = v4k.indexer_topk(q, w, k, pos, 11, offset=3)
    torch.testing.assert_close(tiled_s, full_s, rtol=1e-6, atol=1e-6)
    assert torch.equal(tiled_i, full_i)
    torch.testing.assert_close(full_s.double(), naive_loop_scores(q, w, k, pos), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- quantised keys
def test_fp8_and_fp4_keys_match_dequantised_bf16_keys():
    g = _gen(9)
    q = v4k.indexer_query(torch.randn(2, 3, 4, 128, generator=g).bfloat16(), torch.arange(3), v4k.v4_rope_frequencies(True))
    w = (torch.randn(2, 3, 4, generator=g) * v4k.indexer_scale(4, 128)).bfloat16()
    keys = torch.randn(2, 50, 128, generator=g).bfloat16() * 3
    pos = torch.tensor([[150, 180, 199], [7, 100, 203]])
    k8, s8 = v4k.act_quant(keys, 128)
    k4, s4 = v4k.fp4_act_quant(keys, 32)
    for kq, ks, deq in [(k8, s8, v4k.act_dequant(k8, s8, 128, torch.bfloat16)), (k4, s4, v4k.fp4_act_dequant(k4, s4, 32, torch.bfloat16))]:
        sq = v4k.indexer_scores(q, w, kq, pos, key_scales=ks)
        sd = v4k.indexer_scores(q, w, deq, pos)
        assert torch.equal(sq, sd)
        assert torch.equal(v4k.indexer_topk(q, w, kq, pos, 20, key_scales=ks, offset=3), v4k.indexer_topk(q, w, deq, pos, 20, offset=3))
    # e8m0 scale storage is accepted and equivalent
    assert torch.equal(v4k.indexer_scores(q, w, k8, pos, key_scales=s8.to(torch.float8_e8m0fnu)), v4k.indexer_scores(q, w, k8, pos, key_scales=s8))


def test_fp4_keys_against_naive_loop():
    g = _gen(10)
    q = torch.randn(1, 2, 2, 32, generator=g)
    w = torch.randn(1, 2, 2, generator=g)
    kq, ks = v4k.fp4_act_quant(torch.randn(1, 5, 32, generator=g), 32)
    pos = torch.tensor([[11, 19]])
    torch.testing.assert_close(v4k.indexer_scores(q, w, kq, pos, key_scales=ks).double(), naive_loop_scores(q, w, kq, pos, key_scales=ks), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- compare helper
def test_compare_topk_usage():
    q, w, k = _inputs(2, 6, 4, 16, 300, seed=11)
    pos = torch.tensor([list(range(0, 600, 100)), list(range(1000, 1006))])
    idx = v4k.indexer_topk(q, w, k, pos, 64, offset=128)
    exp = dense_topk(q, w, k, pos, 64, offset=128)
    assert compare_topk(idx, exp).ok
    # order inside a row does not matter
    assert compare_topk(idx.flip(-1), exp).ok
    # replacing many entries drops the recall below the bound
    bad = idx.clone()
    bad[1, :, :10] = 127
    assert not compare_topk(bad, exp).ok and index_set_recall(bad, exp) < 0.99
    # a different −1 pattern fails regardless of recall
    shifted = dense_topk(q, w, k, pos + 4, 64, offset=128)
    assert not compare_topk(shifted, exp).ok


# --------------------------------------------------------------------- indexer_query / indexer_scale
def test_indexer_scale():
    assert indexer_mod.indexer_scale() == 128**-0.5 * 64**-0.5
    assert math.isclose(v4k.indexer_scale(64, 128), 1 / math.sqrt(8192), rel_tol=1e-15)
    assert math.isclose(v4k.indexer_scale(32, 64), 1 / math.sqrt(2048), rel_tol=1e-15)


def _hadamard(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


def test_indexer_query_pipeline():
    g = _gen(12)
    q = torch.randn(2, 3, 4, 128, generator=g).bfloat16()
    pos = torch.tensor([[0, 5, 9000], [1, 2, 3]])
    f = v4k.v4_rope_frequencies(True)
    hf = v4k.indexer_query(q, pos, f, rotate=False, simulate_fp4=False)
    roped = v4k.apply_rope(q, pos, f)
    assert torch.equal(hf, roped)
    assert torch.equal(hf[..., :64], q[..., :64]) and not torch.equal(hf[..., 64:], q[..., 64:])  # rope on trailing 64 only
    rot = v4k.indexer_query(q, pos, f, simulate_fp4=False)
    exp_rot = (roped.double() @ _hadamard(128)).to(torch.bfloat16)
    assert (rot.float() - exp_rot.float()).abs().max() <= 2**-7 * exp_rot.float().abs().max()
    full = v4k.indexer_query(q, pos, f)
    assert torch.equal(full, v4k.fp4_act_roundtrip(rot, 32))
    # every block of 32 lies on the FP4 grid times one power-of-two scale (the smallest power of
    # two s with amax <= 6·s also works when the original scale was larger)
    blocks = full.float().reshape(-1, 32)
    scale = torch.exp2(torch.ceil(torch.log2(blocks.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 6)))
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    scaled = (blocks / scale.clamp_min(1e-30)).abs()
    assert bool(((scaled[..., None] - grid).abs().amin(-1) < 1e-6).all())
    # 1-D positions broadcast over the batch
    assert torch.equal(v4k.indexer_query(q[:1], pos[0], f), full[:1])


# --------------------------------------------------------------------- empty inputs, positions forms, torch.library
def test_empty_inputs():
    q, w, k = _inputs(2, 0, 3, 8, 5)
    assert v4k.indexer_scores(q, w, k, torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0, 5)
    assert v4k.indexer_topk(q, w, k, torch.zeros(2, 0, dtype=torch.long), 4).shape == (2, 0, 4)
    q, w, k = _inputs(1, 3, 2, 8, 0)
    pos = torch.tensor([[5, 6, 7]])
    assert v4k.indexer_scores(q, w, k, pos).shape == (1, 3, 0)
    assert v4k.indexer_topk(q, w, k, pos, 4).shape == (1, 3, 0)
    q, w, k = _inputs(1, 3, 2, 8, 6)
    assert v4k.indexer_topk(q, w, k, pos, 0).shape == (1, 3, 0)
    assert v4k.indexer_query(torch.zeros(0, 2, 2, 128), torch.zeros(0, 2, dtype=torch.long), v4k.rope_frequencies()).shape == (0, 2, 2, 128)


def test_positions_int32_and_1d():
    q, w, k = _inputs(2, 4, 2, 8, 6, seed=13)
    p64 = torch.tensor([[3, 9, 14, 23]] * 2)
    base = v4k.indexer_topk(q, w, k, p64, 3)
    assert torch.equal(v4k.indexer_topk(q, w, k, p64.int(), 3), base)
    assert torch.equal(v4k.indexer_topk(q, w, k, p64[0], 3), base)


def test_opcheck():
    q, w, k = _inputs(1, 3, 2, 128, 6, seed=14)
    pos = torch.tensor([[3, 9, 23]])
    torch.library.opcheck(torch.ops.v4k.indexer_scores.default, (q, w, k, None, pos, 4))
    torch.library.opcheck(torch.ops.v4k.indexer_topk.default, (q, w, k, None, pos, 4, 4, 7))
    kq, ks = v4k.fp4_act_quant(k, 32)
    torch.library.opcheck(torch.ops.v4k.indexer_topk.default, (q, w, kq, ks, pos, 4, 4, 7))


def test_doctests():
    assert doctest.testmod(indexer_mod).failed == 0


# --------------------------------------------------------------------- bad inputs
def _bad_cases():
    q, w, k = _inputs(1, 2, 2, 128, 4)
    pos = torch.tensor([[3, 7]])
    k8, s8 = v4k.act_quant(k, 128)
    k4, s4 = v4k.fp4_act_quant(k, 32)
    f = v4k.rope_frequencies()
    S, T = v4k.indexer_scores, v4k.indexer_topk
    return [
        (lambda: S(q[0], w, k, pos), ValueError, "indexer_scores: q must have 4 dims"),
        (lambda: S(q.int(), w, k, pos), TypeError, "indexer_scores: q must have dtype"),
        (lambda: S(q, w[..., :1], k, pos), ValueError, r"indexer_scores: weights must have shape \[1, 2, 2\]"),
        (lambda: S(q, w, k[..., :64], pos), ValueError, r"indexer_scores: keys.shape\[2\] must be 128"),
        (lambda: S(q, w, torch.cat([k, k]), pos), ValueError, r"indexer_scores: keys.shape\[0\] must be 1"),
        (lambda: S(q, w, k.int(), pos), TypeError, "indexer_scores: keys must have dtype"),
        (lambda: S(q, w, k, pos, key_scales=s8), ValueError, "indexer_scores: key_scales must be None"),
        (lambda: S(q, w, k8, pos), ValueError, "indexer_scores: key_scales .* is required for FP8"),
        (lambda: S(q, w, k8, pos, key_scales=s4), ValueError, r"indexer_scores: key_scales must have shape \[1, 4, 1\]"),
        (lambda: S(q, w, k4, pos, key_scales=s4.double()), TypeError, "indexer_scores: key_scales must have dtype"),
        (lambda: S(q, w, k4[..., :10], pos, key_scales=s4), ValueError, "indexer_scores: keys.shape.*packed FP4"),
        (lambda: S(q[..., :96], w, k8[..., :96], pos, key_scales=s8), ValueError, "indexer_scores: FP8 keys need dI % 128"),
        (lambda: S(q, w, k, pos.float()), TypeError, "indexer_scores: positions must have dtype"),
        (lambda: S(q, w, k, pos[:, :1]), ValueError, r"indexer_scores: positions must have shape \[1, 2\]"),
        (lambda: S(q, w, k, -pos), ValueError, "indexer_scores: positions must be >= 0"),
        (lambda: S(q, w, k, pos, ratio=0), ValueError, "indexer_scores: ratio must be >= 1"),
        (lambda: S(q, w, k, pos, ratio=4.0), TypeError, "indexer_scores: ratio must be an int"),
        (lambda: S(q, w.to("meta"), k, pos), ValueError, "indexer_scores: weights is on meta"),
        (lambda: T(q, w, k, pos, -1), ValueError, "indexer_topk: topk must be >= 0"),
        (lambda: T(q, w, k, pos, 2.5), TypeError, "indexer_topk: topk must be an int"),
        (lambda: T(q, w, k, pos, 2, offset=-3), ValueError, "indexer_topk: offset must be >= 0"),
        (lambda: T(q, w, k, pos, 2, offset=2**31 - 2), ValueError, "indexer_topk: offset \\+ N must fit int32"),
        (lambda: T(q, w, k8, pos, 2), ValueError, "indexer_topk: key_scales"),
        (lambda: v4k.indexer_query(q[0], pos, f), ValueError, "indexer_query: q must have 4 dims"),
        (lambda: v4k.indexer_query(q[..., :96], pos, f), ValueError, "indexer_query: rotate=True needs dI a power of two"),
        (lambda: v4k.indexer_query(q[..., :48], pos, f[:8], rotate=False), ValueError, "indexer_query: simulate_fp4=True needs dI % 32"),
        (lambda: v4k.indexer_query(q[..., :32], pos, f), ValueError, r"indexer_query: 2\*len\(freqs\)=64"),
        (lambda: v4k.indexer_query(q, pos, f.double()), TypeError, "indexer_query: freqs must have dtype"),
        (lambda: v4k.indexer_query(q, pos[:, :1], f), ValueError, "indexer_query: positions must have shape"),
        (lambda: v4k.indexer_query(q, -pos, f), ValueError, "indexer_query: positions must be >= 0"),
        (lambda: v4k.indexer_scale(0), ValueError, "indexer_scale: index_heads must be >= 1"),
        (lambda: v4k.indexer_scale(64, 128.0), TypeError, "indexer_scale: index_dim must be an int"),
    ]


@pytest.mark.parametrize("i", range(32))
def test_bad_inputs(i):
    cases = _bad_cases()
    assert len(cases) == 32
    call, exc, match = cases[i]
    with pytest.raises(exc, match=match):
        call()


def test_memoized_checks_still_read_every_calls_positions():
    g = torch.Generator().manual_seed(7)
    q, w = torch.randn(1, 2, 4, 64, generator=g), torch.rand(1, 2, 4, generator=g)
    keys = torch.randn(1, 6, 64, generator=g)
    pos = torch.tensor([[20, 21]])
    first = v4k.indexer_topk(q, w, keys, pos, 3)
    assert torch.equal(v4k.indexer_topk(q, w, keys, pos, 3), first)
    for fn in (lambda p: v4k.indexer_topk(q, w, keys, p, 3), lambda p: v4k.indexer_scores(q, w, keys, p)):
        fn(pos)
        with pytest.raises(ValueError, match="positions must be >= 0"):
            fn(torch.tensor([[20, -1]]))
