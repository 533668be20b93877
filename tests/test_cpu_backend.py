"""Native CPU backend (csrc/cpu): the extension is loaded when built, and its kernels agree with
small independent fp32 implementations written here from SPEC, on the paths the shared parity
cases do not stress: split index lists/key ranges (decode), tile tails, all-skipped rows,
causal limits at window boundaries, thread counts and big sinks.
(The shared suite in tests/test_parity.py runs every parity case on the cpu backend as well.)
"""
from __future__ import annotations

import pytest
import torch

import v4kernels as v4k
import v4kernels._registry as R
from v4kernels._ext import build_info

_REASONS = R.get_backend("cpu").backend_reasons("cpu")
needs_ext = pytest.mark.skipif(bool(_REASONS), reason="; ".join(_REASONS) or "cpu extension loaded")


def test_extension_loaded_when_built():
    recorded = build_info().get("cpu")
    if recorded != "built":
        pytest.skip(f"cpu extension not built here: {recorded or 'no build record (source checkout)'}")
    assert not _REASONS, _REASONS
    # the library implements the implementation schemas on the CPU key
    for op in ("sparse_attn", "indexer_topk", "hc_post", "compress_kv", "moe_experts", "fp8_gemm", "grouped_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"v4k_impl::{op}", "CPU"), op
    # the cpu backend is preferred over the reference on CPU tensors
    assert [b.name for b in R.candidates("sparse_attn", "cpu")][0] == "cpu"


# ------------------------------------------------------------------------------ sparse_attn
def _naive_attn(q, kv_f32, sink, idx, scale):
    """Per (b, m, h) loop of SPEC §9.2."""
    b_, m_, h_, d_ = q.shape
    out = torch.zeros(b_, m_, h_, d_, dtype=torch.float64)
    for b in range(b_):
        for m in range(m_):
            ii = idx[b, m][idx[b, m] >= 0].long()
            if ii.numel() == 0:
                continue
            k = kv_f32[b, ii].double()
            s = q[b, m].double() @ k.T * scale  # [H, n]
            mx = s.max(-1, keepdim=True).values
            e = torch.exp(s - mx)
            den = e.sum(-1, keepdim=True) + torch.exp(sink.double()[:, None] - mx)
            out[b, m] = (e @ k) / den
    return out


def _attn_inputs(g, b, m, h, n, k, skip_frac=0.3, sink_scale=1.0, dtype=torch.bfloat16):
    q = torch.randn(b, m, h, 512, generator=g).to(dtype)
    kv = torch.randn(b, n, 512, generator=g).to(dtype)
    sink = torch.randn(h, generator=g) * sink_scale
    idx = torch.randint(0, n, (b, m, k), generator=g, dtype=torch.int32)
    idx[torch.rand(b, m, k, generator=g) < skip_frac] = -1
    return q, kv, sink, idx


def _check_close(out, ref, dtype):
    tol = R.get_backend("cpu").tolerances[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol.atol, rtol=tol.rtol)


@needs_ext
@pytest.mark.parametrize(
    "b,m,h,n,k",
    [
        (1, 1, 64, 3000, 1000),  # decode: index list split across threads, merged
        (2, 1, 5, 300, 130),  # heads not a multiple of the register block, tail tile of 2
        (1, 7, 3, 90, 65),  # prefill-like, K = 64 + 1
        (1, 1, 128, 700, 640),  # Pro head count
    ],
)
def test_sparse_attn_matches_loop(b, m, h, n, k):
    g = torch.Generator().manual_seed(b * 1000 + k)
    q, kv, sink, idx = _attn_inputs(g, b, m, h, n, k)
    out = torch.ops.v4k_impl.sparse_attn(q, kv, sink, idx, 512**-0.5)
    _check_close(out, _naive_attn(q, kv.float(), sink, idx, 512**-0.5), torch.bfloat16)


@needs_ext
def test_sparse_attn_fp8_rows_and_dispatch():
    g = torch.Generator().manual_seed(3)
    q, kv, sink, idx = _attn_inputs(g, 2, 3, 8, 200, 300)
    packed = v4k.pack_kv_fp8(kv)
    kv_deq = v4k.unpack_kv_fp8(packed, torch.float32)
    with v4k.use_backend("cpu"):
        out = v4k.sparse_attn(q, packed, sink, idx, 512**-0.5)
    assert R.last_backend("sparse_attn") == "cpu"
    _check_close(out, _naive_attn(q, kv_deq, sink, idx, 512**-0.5), torch.bfloat16)


@needs_ext
def test_sparse_attn_all_skipped_rows_and_big_sinks():
    g = torch.Generator().manual_seed(5)
    q, kv, sink, idx = _attn_inputs(g, 1, 4, 16, 100, 700, sink_scale=30.0, dtype=torch.float32)
    idx[0, 1] = -1  # a whole row skipped -> zeros, no NaN
    idx[0, 2, 1:] = -1  # a single valid key
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = torch.ops.v4k_impl.sparse_attn(q, kv, sink, idx, 512**-0.5)
        finally:
            torch.set_num_threads(prev)
        assert torch.isfinite(out).all()
        assert (out[0, 1] == 0).all()
        _check_close(out, _naive_attn(q, kv, sink, idx, 512**-0.5), torch.float32)


# ------------------------------------------------------------------------------ indexer
def _naive_scores(q, w, kf, pos, ratio):
    s = torch.einsum("bshd,bnd->bshn", q.double(), kf.double()).relu()
    s = (s * w.double()[..., None]).sum(2)
    lim = (pos + 1) // ratio
    mask = torch.arange(kf.shape[1])[None, None, :] >= lim[..., None]
    return s.masked_fill(mask, float("-inf"))


def _keys(g, b, n, fmt):
    kf = torch.randn(b, n, 128, generator=g)
    if fmt == "bf16":
        return kf.bfloat16(), None, kf.bfloat16().float()
    if fmt == "fp8":
        k, s = v4k.act_quant(kf, 128)
        return k, s, v4k.act_dequant(k, s, 128, torch.float32)
    k, s = v4k.fp4_act_quant(kf, 32)
    return k, s, v4k.fp4_act_dequant(k, s, 32, torch.float32)


@needs_ext
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "fp4"])
@pytest.mark.parametrize(
    "b,s,n,ratio,topk,pos",
    [
        (1, 1, 4100, 4, 512, [[4 * 4100 - 1]]),  # decode, key range split across threads
        (1, 6, 20, 4, 8, [[0, 3, 4, 7, 8, 79]]),  # causal limits at window boundaries, −1 padding
        (2, 1, 70, 1, 100, [[69], [10]]),  # topk > N, ratio 1
    ],
)
def test_indexer_topk_and_scores(fmt, b, s, n, ratio, topk, pos):
    g = torch.Generator().manual_seed(n + s)
    hi = 64 if s == 1 else 7
    q = torch.randn(b, s, hi, 128, generator=g).bfloat16()
    w = torch.randn(b, s, hi, generator=g)
    keys, ks, kf = _keys(g, b, n, fmt)
    positions = torch.tensor(pos, dtype=torch.int64)
    ref = _naive_scores(q, w, kf, positions, ratio)
    scores = torch.ops.v4k_impl.indexer_scores(q, w, keys, ks, positions, ratio)
    assert torch.equal(torch.isinf(scores), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(scores[fin].double(), ref[fin], atol=1e-4, rtol=1e-5)

    offset = 17
    idx = torch.ops.v4k_impl.indexer_topk(q, w, keys, ks, positions, topk, ratio, offset)
    k = min(topk, n)
    assert idx.shape == (b, s, k) and idx.dtype == torch.int32
    vals, order = ref.topk(k, dim=-1)
    for bi in range(b):
        for si in range(s):
            visible = min(n, (int(positions[bi, si]) + 1) // ratio)
            row = idx[bi, si]
            nvalid = min(k, visible)
            assert (row[nvalid:] == -1).all() and (row[:nvalid] >= offset).all()
            got = set((row[:nvalid] - offset).tolist())
            assert all(c < visible for c in got)
            # every selected entry scores at least the k-th best (ties may swap members)
            if nvalid:
                kth = vals[bi, si, nvalid - 1].item()
                sel = ref[bi, si, torch.tensor(sorted(got))]
                assert (sel >= kth - 1e-4 * max(1.0, abs(kth))).all()
                exp = set(order[bi, si, :nvalid].tolist())
                assert len(got & exp) / nvalid >= 0.99


@needs_ext
def test_indexer_topk_threads_agree():
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 1, 64, 128, generator=g).bfloat16()
    w = torch.randn(1, 1, 64, generator=g)
    keys, ks, _ = _keys(g, 1, 3000, "fp4")
    pos = torch.tensor([[11999]])
    prev = torch.get_num_threads()
    res = []
    for t in (1, 2):
        torch.set_num_threads(t)
        try:
            res.append(torch.ops.v4k_impl.indexer_topk(q, w, keys, ks, pos, 512, 4, 0))
        finally:
            torch.set_num_threads(prev)
    assert set(res[0].flatten().tolist()) == set(res[1].flatten().tolist())


@needs_ext
@pytest.mark.parametrize("d_i", [32, 96, 128, 256])
def test_indexer_fp4_decode_blocks(d_i):
    """FP4 key decode (LUT + interleave + per-32 scale): blocks of one key at very different
    magnitudes, so a wrong nibble order or scale block shows in the scores."""
    g = torch.Generator().manual_seed(d_i)
    n, hi = 300, 19
    kf = torch.randn(1, n, d_i, generator=g)
    kf = kf * (4.0 ** torch.arange(d_i // 32)).repeat_interleave(32)  # per-block scales 4^0, 4^1, ...
    keys, ks = v4k.fp4_act_quant(kf, 32)
    deq = v4k.fp4_act_dequant(keys, ks, 32, torch.float32)
    assert len(set(ks[0, 0].tolist())) == d_i // 32  # the blocks really have distinct scales
    q = torch.randn(1, 2, hi, d_i, generator=g).bfloat16()
    w = torch.randn(1, 2, hi, generator=g)
    pos = torch.tensor([[4 * n - 1, 4 * 150 + 2]])
    ref = _naive_scores(q, w, deq, pos, 4)
    scores = torch.ops.v4k_impl.indexer_scores(q, w, keys, ks, pos, 4)
    assert torch.equal(torch.isinf(scores), torch.isinf(ref))
    fin = torch.isfinite(ref)
    big = ref[fin].abs().max().item()  # fp32 accumulation error grows with the largest block
    torch.testing.assert_close(scores[fin].double(), ref[fin], atol=1e-6 * big, rtol=1e-5)
    # the same keys as fp32 values give the same scores (the decode is exact)
    same = torch.ops.v4k_impl.indexer_scores(q, w, deq, None, pos, 4)
    torch.testing.assert_close(scores, same, atol=0, rtol=0)


# ------------------------------------------------------------------------------ mhc
@needs_ext
def test_hc_pre_post_against_formula():
    g = torch.Generator().manual_seed(2)
    t, hc, d = 5, 4, 136  # D not a multiple of the vector width
    x = torch.randn(t, hc, d, generator=g).bfloat16()
    fn = torch.randn(24, hc * d, generator=g) * 0.05
    scale = torch.tensor([0.7, 1.3, 0.9])
    base = torch.randn(24, generator=g) * 0.1
    x_in, post, comb = torch.ops.v4k_impl.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    xf = x.double().flatten(-2)
    mixes = (xf @ fn.double().T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)
    pre = torch.sigmoid(mixes[:, :4] * 0.7 + base[:4].double()) + 1e-6
    torch.testing.assert_close(post.double(), 2 * torch.sigmoid(mixes[:, 4:8] * 1.3 + base[4:8].double()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comb.sum(-2).double(), torch.ones(t, hc, dtype=torch.float64), atol=1e-4, rtol=0)
    ref_in = (pre[..., None] * x.double()).sum(-2)
    torch.testing.assert_close(x_in.double(), ref_in, atol=1e-2, rtol=1.6e-2)
    # post: out[k] = post[k]·a + Σ_j comb[j,k]·R[j] — the transpose matters (SPEC §10.4)
    a = torch.randn(t, d, generator=g).bfloat16()
    out = torch.ops.v4k_impl.hc_post(a, x, post, comb, False)
    ref = post.double()[..., None] * a.double()[:, None] + torch.einsum("tjk,tjd->tkd", comb.double(), x.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1.6e-2)


# ------------------------------------------------------------------------------ GEMMs
@needs_ext
@pytest.mark.parametrize("m", [1, 40])  # small-M decode kernel and the decode-then-GEMM path
def test_block_scaled_gemms(m):
    g = torch.Generator().manual_seed(m)
    n, k = 200, 384
    a, a_s = v4k.act_quant(torch.randn(m, k, generator=g), 128)
    af = v4k.act_dequant(a, a_s, 128, torch.float32).double()
    w = torch.randn(n, k, generator=g)
    wq = w.to(torch.float8_e4m3fn)
    w_s = torch.rand((n + 127) // 128, k // 128, generator=g) + 0.5
    wf = wq.double() * w_s.double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)
    out = torch.ops.v4k_impl.fp8_gemm(a, a_s, wq, w_s, torch.float32)
    torch.testing.assert_close(out.double(), af @ wf.T, atol=1e-3, rtol=1e-5)
    b4, b4_s = v4k.fp4_act_quant(w, 32)
    bf = v4k.fp4_act_dequant(b4, b4_s, 32, torch.float32).double()
    out4 = torch.ops.v4k_impl.fp4_gemm(a, a_s, b4, b4_s, torch.float32)
    torch.testing.assert_close(out4.double(), af @ bf.T, atol=1e-3, rtol=1e-5)


def _fp8_codes(g, n, k, nan_at=None):
    """Every finite e4m3fn code (both signs, subnormals, ±448) at random, as float8 [n, k]."""
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32)
    codes[(codes & 0x7F) == 0x7F] -= 1  # 0x7f / 0xff are NaN
    if nan_at is not None:
        codes[nan_at] = 0xFF
    return codes.to(torch.uint8).view(torch.float8_e4m3fn)


def _assert_gemm_close(out, af, wf):
    # fp32 sums in any order against fp64: a few ulps of Σ|a·w| (SPEC §4.6 accumulates in fp32)
    ref = af @ wf.T
    bound = 3e-6 * (af.abs() @ wf.abs().T) + 1e-30
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"


@needs_ext
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13])
def test_direct_gemm_decode_shapes(m):
    """The direct small-M kernels: every e4m3 code (subnormals, signs), per-(128x128) scales that are
    not powers of two, row tails (N % 4), the FP8 K tail (K % 16) and partial scale blocks, FP4
    nibble order and per-row 1x32 scales, activation-row tiles of 4 plus 1..3."""
    g = torch.Generator().manual_seed(100 + m)
    n, k8, k4 = 203, 392, 416
    a, a_s = v4k.act_quant(torch.randn(m, 512, generator=g) * 3, 128)  # K = 392: quantise padded
    af = v4k.act_dequant(a, a_s, 128, torch.float32).double()[:, :k8]
    a = a[:, :k8].contiguous()
    wq = _fp8_codes(g, n, k8)
    w_s = torch.rand(2, 4, generator=g) + 0.25
    wf = wq.double() * w_s.double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k8]
    _assert_gemm_close(torch.ops.v4k_impl.fp8_gemm(a, a_s, wq, w_s, torch.float32), af, wf)

    a, a_s = v4k.act_quant(torch.randn(m, 512, generator=g), 128)  # K = 416 (13 FP4 blocks)
    af = v4k.act_dequant(a, a_s, 128, torch.float32).double()[:, :k4]
    a = a[:, :k4].contiguous()
    b4 = torch.randint(0, 256, (n, k4 // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    b4_s = 2.0 ** torch.randint(-8, 3, (n, k4 // 32), generator=g).float()
    bf = v4k.fp4_act_dequant(b4, b4_s, 32, torch.float32).double()
    _assert_gemm_close(torch.ops.v4k_impl.fp4_gemm(a, a_s, b4, b4_s, torch.float32), af, bf)


@needs_ext
def test_direct_gemm_rows_independent_of_m():
    """Row m of the result is bit-identical whether it is computed alone or inside a batch of any
    size (the tiling over activation rows never changes a row's summation order)."""
    g = torch.Generator().manual_seed(5)
    n, k = 70, 512
    a, a_s = v4k.act_quant(torch.randn(11, k, generator=g), 128)
    wq = _fp8_codes(g, n, k)
    w_s = torch.rand(1, 4, generator=g) + 0.5
    b4 = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    b4_s = 2.0 ** torch.randint(-6, 0, (n, k // 32), generator=g).float()
    for op, w, ws in ((torch.ops.v4k_impl.fp8_gemm, wq, w_s), (torch.ops.v4k_impl.fp4_gemm, b4, b4_s)):
        full = op(a, a_s, w, ws, torch.float32)
        for lo, hi in ((0, 1), (3, 4), (1, 6), (4, 11), (2, 9)):
            assert torch.equal(op(a[lo:hi], a_s[lo:hi], w, ws, torch.float32), full[lo:hi])


@needs_ext
@pytest.mark.parametrize("m", [1, 6])
def test_direct_fp8_gemm_nan_codes(m):
    """An e4m3fn NaN code (0x7f / 0xff) poisons exactly its output column, as in the reference."""
    g = torch.Generator().manual_seed(9)
    n, k = 9, 256
    a, a_s = v4k.act_quant(torch.randn(m, k, generator=g), 128)
    wq = _fp8_codes(g, n, k, nan_at=(6, 200))
    out = torch.ops.v4k_impl.fp8_gemm(a, a_s, wq, torch.ones(1, 2), torch.float32)
    assert bool(torch.isnan(out[:, 6]).all())
    assert bool(torch.isfinite(out[:, [0, 1, 2, 3, 4, 5, 7, 8]]).all())


# ------------------------------------------------------------------------------ moe_experts
def _moe_weights(g, fmt, e, i, d):
    from v4kernels.ops.moe.reference import quantize_fp4_rows, quantize_fp8_blocks

    ws = [torch.randn(e, r, c, generator=g) * 0.05 for r, c in ((i, d), (i, d), (d, i))]
    if fmt == "bf16":
        return [(w.bfloat16(), None) for w in ws]
    return [quantize_fp8_blocks(w) if fmt == "fp8" else quantize_fp4_rows(w) for w in ws]


def _moe_both(x, wts, ids, weights, **kw):
    (w1, s1), (w3, s3), (w2, s2) = weights
    out = {}
    for be in ("cpu", "reference"):
        with v4k.use_backend(be):
            out[be] = v4k.moe_experts(x, wts, ids, w1, w3, w2, w1_scale=s1, w3_scale=s3, w2_scale=s2, **kw)
    return out["cpu"], out["reference"]


@needs_ext
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "fp4"])
@pytest.mark.parametrize("routing", ["zero_token_experts", "one_expert_all", "minus_one", "all_minus_one"])
def test_moe_experts_routing_edges(fmt, routing):
    g = torch.Generator().manual_seed(7)
    t, e, k, d, i = 9, 6, 3, 256, 384  # I not a multiple of the 64-row panel, T not of the 6-row tile
    x = (torch.randn(t, d, generator=g) * 2).bfloat16()
    wts = torch.rand(t, k, generator=g)
    if routing == "zero_token_experts":  # experts 0, 2, 5 receive nothing
        ids = torch.tensor([[1, 3, 4], [4, 3, 1]] * 4 + [[3, 1, 4]], dtype=torch.int32)
    elif routing == "one_expert_all":  # one expert takes every token (k = 1) ...
        ids, wts = torch.full((t, 1), 2, dtype=torch.int32), wts[:, :1]
    else:
        ids = torch.randint(0, e, (t, k), generator=g, dtype=torch.int32)
        ids[torch.rand(t, k, generator=g) < 0.4] = -1
        if routing == "all_minus_one":
            ids[3] = -1
    weights = _moe_weights(g, fmt, e, i, d)
    out, ref = _moe_both(x, wts, ids, weights)
    _check_close(out, ref.double(), torch.bfloat16)
    if routing == "all_minus_one":
        assert torch.all(out[3] == 0)
    # each token's output is the fp32 sum of its experts' rows: dropping one slot changes it
    ids2 = ids.clone()
    ids2[0, 0] = -1 if ids2[0, 0] >= 0 else 0
    out2, _ = _moe_both(x, wts, ids2, weights)
    assert not torch.equal(out2[0], out[0]) and torch.equal(out2[1:], out[1:])


@needs_ext
@pytest.mark.parametrize("after", [False, True])
def test_moe_experts_weight_position_and_clamp(after):
    g = torch.Generator().manual_seed(11)
    t, e, k, d, i = 13, 4, 2, 128, 256
    x = (torch.randn(t, d, generator=g) * 4).bfloat16()  # large enough that the clamp engages
    wts = torch.rand(t, k, generator=g) * 3
    ids = torch.randint(0, e, (t, k), generator=g, dtype=torch.int32)
    weights = _moe_weights(g, "fp8", e, i, d)
    out, ref = _moe_both(x, wts, ids, weights, swiglu_limit=1.5, weight_after_w2=after, out_dtype=torch.float32)
    _check_close(out, ref.double(), torch.bfloat16)
    other, _ = _moe_both(x, wts, ids, weights, swiglu_limit=1.5, weight_after_w2=not after, out_dtype=torch.float32)
    unclamped, _ = _moe_both(x, wts, ids, weights, swiglu_limit=0.0, weight_after_w2=after, out_dtype=torch.float32)
    assert not torch.equal(other, out) and not torch.equal(unclamped, out)


@needs_ext
@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_moe_experts_decode_tokens_independent(fmt):
    """Decode-sized calls (T = 1 .. 4) match the reference, and every token's output is
    bit-identical whether it runs alone or batched with others routed to the same experts."""
    g = torch.Generator().manual_seed(21)
    t, e, k, d, i = 7, 5, 3, 256, 384
    x = torch.randn(t, d, generator=g).bfloat16()
    wts = torch.rand(t, k, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int()
    ids[5, 1] = -1
    weights = _moe_weights(g, fmt, e, i, d)
    full, ref = _moe_both(x, wts, ids, weights, out_dtype=torch.float32)
    _check_close(full, ref.double(), torch.bfloat16)
    for lo, hi in ((0, 1), (3, 4), (1, 5), (5, 7)):
        part, ref_part = _moe_both(x[lo:hi], wts[lo:hi], ids[lo:hi], weights, out_dtype=torch.float32)
        assert torch.equal(part, full[lo:hi])
        _check_close(part, ref_part.double(), torch.bfloat16)


# ------------------------------------------------------------------------------ compress_kv
def _comp_inputs(g, ratio, hd, d=192, dtype=torch.bfloat16):
    coff = 2 if ratio == 4 else 1
    wkv = (torch.randn(coff * hd, d, generator=g) * d**-0.5).to(dtype)
    wgate = (torch.randn(coff * hd, d, generator=g) * d**-0.5).to(dtype)
    ape = torch.randn(ratio, coff * hd, generator=g) * 0.3
    nw = (1 + 0.1 * torch.randn(hd, generator=g)).to(dtype)
    freqs = 10000.0 ** (-torch.arange(32, dtype=torch.float32) / 32)
    return wkv, wgate, ape, nw, freqs


def _feed(x, params, ratio, quant, plan, backend="cpu", state=None):
    """Feed x [B, S, D] in chunks of the sizes in plan; returns (entries per sequence, state)."""
    st = state or v4k.CompressorState.empty(x.shape[0], ratio, params[3].shape[0])
    got = [[] for _ in range(x.shape[0])]
    t = 0
    with v4k.use_backend(backend):
        for n in plan:
            e, num = v4k.compress_kv(x[:, t : t + n], *params, st, ratio=ratio, quant=quant)
            for b in range(x.shape[0]):
                got[b].append(e[b, : int(num[b])])
            t += n
    return [torch.cat(r) for r in got], st


@needs_ext
@pytest.mark.parametrize("ratio,quant,hd", [(4, "fp8", 512), (4, "fp4", 128), (16, "fp8", 512), (8, "none", 128)])
def test_compress_kv_chunking_invariance_and_reference(ratio, quant, hd):
    g = torch.Generator().manual_seed(ratio + hd)
    params = _comp_inputs(g, ratio, hd)
    s = 5 * ratio + 3
    x = torch.randn(2, s, 192, generator=g).bfloat16()
    one, st1 = _feed(x, params, ratio, quant, [s])
    chunked, st2 = _feed(x, params, ratio, quant, [1, ratio - 1, 2, 1, 2 * ratio + 1, s - 3 * ratio - 4])
    for a, b in zip(one, chunked):
        assert torch.equal(a, b)  # bit-identical, whatever the chunking
    for a, b in zip(st1.tensors(), st2.tensors()):
        assert torch.equal(a, b)
    ref, st_r = _feed(x, params, ratio, quant, [s], backend="reference")
    assert one[0].shape == (s // ratio, hd)
    _check_close(torch.stack(one), torch.stack(ref).double(), torch.bfloat16)
    for a, b in zip(st1.tensors(), st_r.tensors()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # canonical state: slots past the open window's tokens are 0 / -inf
    k = s % ratio
    assert torch.all(st1.pending_kv[:, k:] == 0) and torch.all(st1.pending_score[:, k:] == float("-inf"))


@needs_ext
def test_compress_kv_state_reset_and_mixed_positions():
    g = torch.Generator().manual_seed(5)
    ratio, hd = 4, 512
    params = _comp_inputs(g, ratio, hd)
    x = torch.randn(2, 23, 192, generator=g).bfloat16()
    _, st = _feed(x, params, ratio, "fp8", [11])  # both sequences at position 11 with open windows
    # reset sequence 1 to a fresh state; sequence 0 continues: the batch holds positions 11 and 0
    fresh = v4k.CompressorState.empty(1, ratio, hd)
    for dst, src in zip(st.tensors(), fresh.tensors()):
        dst[1] = src[0]
    assert st.positions == [11, 0]
    cont, st_c = _feed(x[:, 11:], params, ratio, "fp8", [5, 7], state=st)
    whole, _ = _feed(x[:1], params, ratio, "fp8", [23])
    assert torch.equal(cont[0], whole[0][2:])  # windows 2.. of sequence 0 (0, 1 were emitted earlier)
    restart, _ = _feed(x[1:, 11:], params, ratio, "fp8", [12])
    assert torch.equal(cont[1], restart[0])
    assert st_c.positions == [23, 12]
    # a stale previous-window state is ignored for window 0 (no predecessor, SPEC §6.3)
    dirty = v4k.CompressorState.empty(1, ratio, hd)
    dirty.prev_kv.normal_(generator=g)
    dirty.prev_score.normal_(generator=g)
    stale, _ = _feed(x[1:, 11:], params, ratio, "fp8", [12], state=dirty)
    assert torch.equal(stale[0], restart[0])


# ------------------------------------------------------------------------------ hc_head
@needs_ext
def test_hc_head_against_formula():
    g = torch.Generator().manual_seed(3)
    t, hc, d = 6, 4, 136
    x = torch.randn(t, hc, d, generator=g).bfloat16()
    fn = torch.randn(hc, hc * d, generator=g) * 0.05
    scale = torch.tensor([0.8])
    base = torch.randn(hc, generator=g) * 0.1
    out = torch.ops.v4k_impl.hc_head(x, fn, scale, base, 1e-6, 1e-6)
    xf = x.double().flatten(-2)
    mixes = (xf @ fn.double().T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)
    pre = torch.sigmoid(mixes * 0.8 + base.double()) + 1e-6  # SPEC §10.5: sigmoid gates, no Sinkhorn
    _check_close(out, (pre[..., None] * x.double()).sum(-2), torch.bfloat16)


def _hc_params(g, hc, d, nm=None):
    nm = nm or (2 + hc) * hc
    fn = torch.randn(nm, hc * d, generator=g) * 0.02
    return fn, torch.tensor([0.7, 1.3, 0.9]), torch.randn(nm, generator=g) * 0.1


def _hc_pre_formula(x, fn, scale, base, hc):
    """SPEC §10.1-10.3 in float64 with the Sinkhorn split of the reference op."""
    xf = x.double().flatten(-2)
    mixes = (xf @ fn.double().T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)
    with v4k.use_backend("reference"):
        pre, post, comb = v4k.hc_split_sinkhorn(mixes.float(), scale, base, hc)
    return (pre.double()[..., None] * x.double()).sum(-2), post, comb, mixes


@needs_ext
@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_hc_pre_decode_threads_and_dtypes(t, dtype):
    """Decode-sized hc_pre: mix rows split across threads (token blocks of 1-4 plus a remainder),
    bit-identical for 1 and 2 threads, and equal to the SPEC formula."""
    g = torch.Generator().manual_seed(t)
    hc, d = 4, 1024 + 8  # hc·D = 4128: 4096 vector elements plus a scalar tail with 8-wide vectors
    x = (torch.randn(t, hc, d, generator=g) * 3).to(dtype)
    fn, scale, base = _hc_params(g, hc, d)
    prev = torch.get_num_threads()
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            outs.append(torch.ops.v4k_impl.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6))
        finally:
            torch.set_num_threads(prev)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    x_in, post, comb = outs[0]
    ref_in, ref_post, ref_comb, _ = _hc_pre_formula(x, fn, scale, base, hc)
    torch.testing.assert_close(post, ref_post, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comb, ref_comb, atol=1e-5, rtol=1e-5)
    _check_close(x_in, ref_in, dtype)


@needs_ext
def test_hc_pre_decode_shape_v4_flash():
    """The V4-Flash decode shape (hc 4, D 4096): every mix row and the RMS factor land in place."""
    g = torch.Generator().manual_seed(4096)
    hc, d = 4, 4096
    x = torch.randn(2, hc, d, generator=g).bfloat16()
    fn, scale, base = _hc_params(g, hc, d)
    fn[5] *= 40  # one large post logit: a misplaced row or RMS factor moves post visibly
    x_in, post, comb = torch.ops.v4k_impl.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    ref_in, ref_post, ref_comb, _ = _hc_pre_formula(x, fn, scale, base, hc)
    torch.testing.assert_close(post, ref_post, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comb, ref_comb, atol=1e-5, rtol=1e-5)
    _check_close(x_in, ref_in, torch.bfloat16)


@needs_ext
@pytest.mark.parametrize("hc,d", [(4, 4096 + 5), (3, 40), (1, 17)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bf16_mix", [False, True])
def test_hc_post_formula_variants(hc, d, dtype, bf16_mix):
    """hc_post [OFF] (fp32, one rounding) and [HF] (SPEC §15 #4: post/comb cast, two roundings)
    against float64 formulas, for the fixed 4-stream kernel and the generic one, with D tails."""
    g = torch.Generator().manual_seed(hc * d)
    t = 2
    x = torch.randn(t, d, generator=g).to(dtype)
    res = torch.randn(t, hc, d, generator=g).to(dtype)
    post = torch.rand(t, hc, generator=g) * 2
    comb = torch.rand(t, hc, hc, generator=g)
    out = torch.ops.v4k_impl.hc_post(x, res, post, comb, bf16_mix)
    assert out.dtype == dtype and out.shape == res.shape
    if not bf16_mix:
        ref = post.double()[..., None] * x.double()[:, None] + torch.einsum("tjk,tjd->tkd", comb.double(), res.double())
        _check_close(out, ref, dtype)
    else:
        pc, cc = post.to(dtype).double(), comb.to(dtype).double()
        a = (pc[..., None] * x.double()[:, None]).to(dtype).double()
        r = torch.einsum("tjk,tjd->tkd", cc, res.double()).to(dtype).double()
        if dtype == torch.float32:
            _check_close(out, a + r, dtype)
        else:  # each term may sit 1 ulp apart from the float64 rounding
            torch.testing.assert_close(out.double(), a + r, atol=0, rtol=2.0**-7)


# ------------------------------------------------------------------------------ grouped_linear
_GL_DT = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def _gl_inputs(gen, b, s, g, din, dout, xdt, wdt):
    x = torch.randn(b, s, g, din, generator=gen).to(xdt)
    w = (torch.randn(g, dout, din, generator=gen) * din**-0.5).to(wdt)
    return x, w


def _gl_fp64(x, w):
    return torch.einsum("bsgk,gnk->bsgn", x.double(), w.double())


@needs_ext
@pytest.mark.parametrize("b,s,g,din,dout", [
    (1, 1, 1, 37, 13),     # K tail of 37 % 16, one row tile + 1 tail row
    (3, 1, 16, 100, 33),   # 16 groups, 3 tokens (tile of 2/4 + tail), 33 rows (32-row unit + 1)
    (1, 17, 3, 256, 70),   # 17 tokens, no K tail, 70 rows
    (1, 1, 8, 512, 64),    # decode at Flash's group count
    (4, 25, 2, 53, 45),    # 100 tokens: panel GEMM path, K and panel tails
])
@pytest.mark.parametrize("xd,wd", [("bf16", "bf16"), ("f16", "f16"), ("f32", "f32"), ("bf16", "f32"),
                                   ("f32", "bf16"), ("bf16", "f16")])
def test_grouped_linear_matches_fp64(b, s, g, din, dout, xd, wd):
    """y[b,s,g] = W_g · x[b,s,g] (SPEC §9.4) against float64 for every storage pair, both paths
    (direct below 96 tokens, panel GEMM above), with K / row / token tails and 1..16 groups."""
    from v4kernels.ops.attention.cpu import GROUPED_DIRECT_MAX_T
    assert (b * s >= GROUPED_DIRECT_MAX_T) == (b * s == 100)
    gen = torch.Generator().manual_seed(b * 1000 + s * 100 + g * 10 + din + dout)
    x, w = _gl_inputs(gen, b, s, g, din, dout, _GL_DT[xd], _GL_DT[wd])
    out = torch.ops.v4k_impl.grouped_linear(x, w)
    assert out.dtype == x.dtype and out.shape == (b, s, g, dout)
    _check_close(out, _gl_fp64(x, w), x.dtype)
    # the public op dispatches here and agrees with the reference backend
    y = v4k.grouped_linear(x, w)
    assert R.last_backend("grouped_linear") == "cpu" and torch.equal(y, out)
    with R.use_backend("reference", "grouped_linear"):
        ref = v4k.grouped_linear(x, w)
    tol = R.get_backend("cpu").tolerances[x.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol.atol, rtol=tol.rtol)


@needs_ext
def test_grouped_linear_flash_decode_shape():
    """Flash's wo_a at decode (G=8, Din=4096, bf16; Dout cut to 96) for 1 and 4 tokens, fp32 out
    checked tightly against float64."""
    gen = torch.Generator().manual_seed(8)
    x, w = _gl_inputs(gen, 1, 4, 8, 4096, 96, torch.float32, torch.bfloat16)
    for t in (1, 4):
        out = torch.ops.v4k_impl.grouped_linear(x[:, :t].contiguous(), w)
        torch.testing.assert_close(out.double(), _gl_fp64(x[:, :t], w), atol=2e-6, rtol=2e-6)


@needs_ext
@pytest.mark.parametrize("t", [11, 130])
def test_grouped_linear_rows_independent_of_tokens_and_threads(t):
    """A token's output is bit-identical alone, inside any batch (on one path) and for 1 or 2
    threads: the summation order is fixed per output element."""
    gen = torch.Generator().manual_seed(t)
    x, w = _gl_inputs(gen, 1, t, 3, 4 * 16 + 7, 41, torch.float32, torch.bfloat16)
    full = torch.ops.v4k_impl.grouped_linear(x, w)
    subs = ((0, 1), (3, 4), (1, 6), (4, 11), (2, 9)) if t < 96 else ((0, 100), (7, 120), (30, 130))
    for lo, hi in subs:
        assert torch.equal(torch.ops.v4k_impl.grouped_linear(x[:, lo:hi].contiguous(), w), full[:, lo:hi])
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.v4k_impl.grouped_linear(x, w)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, full)


@needs_ext
def test_grouped_linear_nonfinite_subnormal_empty():
    """Parity edges: a NaN input element poisons only its (token, group) row and an inf weight
    only its output column; fp16 subnormal weights decode exactly; fp32 sums beyond the fp16
    range round once to inf; empty token / output / input dims give empty or zero results."""
    gen = torch.Generator().manual_seed(3)
    x, w = _gl_inputs(gen, 2, 3, 2, 40, 20, torch.float32, torch.bfloat16)
    x[1, 2, 0, 33] = float("nan")  # in the K tail of 40 % 16
    w[1, 5, 7] = float("inf")
    out = torch.ops.v4k_impl.grouped_linear(x, w)
    bad = torch.zeros_like(out, dtype=torch.bool)
    bad[1, 2, 0, :] = True
    bad[:, :, 1, 5] = True
    assert torch.equal(~torch.isfinite(out), bad)
    assert torch.equal(torch.isnan(out), torch.isnan(_gl_fp64(x, w)))

    # fp16 subnormal weights (2^-24 .. 2^-15) times powers of two: every product and sum exact
    codes = torch.randint(1, 0x400, (1, 19, 37), generator=gen, dtype=torch.int32).to(torch.int16)
    wsub = codes.view(torch.float16)
    xp = 2.0 ** torch.randint(0, 8, (1, 1, 1, 37), generator=gen).float()
    ref = _gl_fp64(xp, wsub)
    assert torch.equal(torch.ops.v4k_impl.grouped_linear(xp, wsub).double(), ref)
    assert torch.equal(torch.ops.v4k_impl.grouped_linear(xp.half(), wsub), ref.half())

    big = torch.full((1, 1, 1, 33), 300.0, dtype=torch.float16)
    wb = torch.full((1, 2, 33), 10.0, dtype=torch.float16)
    wb[0, 1] = -1.0
    assert torch.ops.v4k_impl.grouped_linear(big, wb).tolist() == [[[[float("inf"), -9904.0]]]]  # -9900 rounded once

    assert torch.ops.v4k_impl.grouped_linear(torch.zeros(2, 0, 3, 8), torch.ones(3, 5, 8)).shape == (2, 0, 3, 5)
    assert v4k.grouped_linear(torch.ones(1, 2, 3, 8), torch.ones(3, 0, 8)).shape == (1, 2, 3, 0)
    z = v4k.grouped_linear(torch.ones(1, 2, 3, 0, dtype=torch.bfloat16), torch.ones(3, 4, 0))
    assert z.dtype == torch.bfloat16 and torch.equal(z, torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16))
    from v4kernels.ops.attention.cpu import _grouped_linear_refusals
    assert _grouped_linear_refusals(torch.ones(1, 1, 1, 2, dtype=torch.float64), torch.ones(1, 1, 2)) != []
    assert _grouped_linear_refusals(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 2, dtype=torch.float16)) == []
