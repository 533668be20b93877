"""Layout bridges and vendor adapters of the ``cuda`` backend, checked on the CPU.

The bridges (v4kernels/ops/attention/cuda_bridges.py, moe/cuda.py) are pure tensor code. The
adapters' ``run`` functions are driven against *models* of the vendor kernels written here from
the vendors' documented semantics (FlashMLA's sparse decode / prefill with sink and topk_length,
its MODEL1 block layout read back from raw bytes; DeepGEMM's MQA logits, FP8 GEMM, M-grouped
contiguous GEMM and TF32 prenorm GEMM), and must reproduce the reference kernels. This proves
the bridging arithmetic, not the vendor kernels themselves (those need SM90/SM100).
"""
from __future__ import annotations

import types

import pytest
import torch

import v4kernels as v4k
from v4kernels._registry import reference_kernel
from v4kernels.ops.attention import cuda_bridges as B
from v4kernels.ops.attention.reference import PACKED_DIM, dequant_kv_rows
from v4kernels.ops.quant import reference as Q

torch.manual_seed(0)


# ------------------------------------------------------------------------------ FlashMLA layout
def _flashmla_rows_from_raw(cache: torch.Tensor) -> torch.Tensor:
    """Read a FlashMLA MODEL1 cache the way FlashMLA's tests/quant.py dequantize_k_cache does:
    per block, token data at [t·576, t·576+576), scales at bs·576 + t·8 (independent of the bridge)."""
    nb, bs = cache.shape[0], cache.shape[1]
    assert cache.stride(1) == PACKED_DIM  # FlashMLA: "the whole block must be contiguous"
    raw = torch.as_strided(cache, (nb, bs * PACKED_DIM), (cache.stride(0), 1))
    rows = torch.empty(nb, bs, PACKED_DIM, dtype=torch.uint8)
    for t in range(bs):
        rows[:, t, :576] = raw[:, t * 576 : (t + 1) * 576]
        rows[:, t, 576:] = raw[:, bs * 576 + t * 8 : bs * 576 + (t + 1) * 8]
    return rows.reshape(nb * bs, PACKED_DIM)


@pytest.mark.parametrize("bs", [1, 2, 64])
def test_flashmla_cache_layout(bs):
    kv = torch.randn(37, 512)
    rows = v4k.pack_kv_fp8(kv)
    cache = B.to_flashmla_cache(rows, bs)
    nb = -(-37 // bs)
    assert cache.shape == (nb, bs, 1, PACKED_DIM) and cache.stride(0) == B.flashmla_block_bytes(bs)
    assert B.flashmla_block_bytes(bs) % 576 == 0
    assert torch.equal(_flashmla_rows_from_raw(cache)[:37], rows)
    assert torch.equal(B.from_flashmla_cache(cache, 37), rows)


def test_compact_indices_and_global_ids():
    idx = torch.tensor([[[3, -1, 5, -1], [-1, -1, -1, -1]], [[0, 1, 2, -1], [-1, 7, -1, 7]]], dtype=torch.int32)
    g = B.global_indices(idx, 10)
    assert g.tolist() == [[[3, -1, 5, -1], [-1, -1, -1, -1]], [[10, 11, 12, -1], [-1, 17, -1, 17]]]
    c, n = B.compact_indices(g, 64)
    assert c.shape == (2, 2, 64) and n.tolist() == [[2, 0], [3, 2]]
    assert c[1, 1, :3].tolist() == [17, 17, -1] and bool((c[..., 4:] == -1).all())


# ------------------------------------------------------------------------------ FlashMLA model
def _attend(q, rows_f, idx, valid, sink, scale):
    """FlashMLA's documented sparse math for one query: softmax over valid indices, output scaled
    by e^lse / (e^lse + e^sink), 0 when nothing is valid. q [H, D], rows_f [R, D]."""
    h = q.shape[0]
    if not bool(valid.any()):
        return torch.zeros(h, q.shape[1])
    k = rows_f[idx[valid].long()]
    s = (q.float() @ k.T) * scale
    lse = torch.logsumexp(s, dim=-1)
    o = torch.softmax(s, dim=-1) @ k
    return o * (torch.exp(lse) / (torch.exp(lse) + torch.exp(sink.float())))[:, None]


class FakeFlashMLA(types.ModuleType):
    def __init__(self):
        super().__init__("flash_mla")
        self.calls = []

    def get_mla_metadata(self, *a, **k):
        return object(), None

    def flash_mla_with_kvcache(self, q, k_cache, block_table, cache_seqlens, head_dim_v, meta, softmax_scale=None,
                               causal=False, is_fp8_kvcache=False, indices=None, attn_sink=None, topk_length=None):
        b, s_q, h, d = q.shape
        assert q.dtype == torch.bfloat16 and h in (64, 128) and d == 512 and head_dim_v == 512
        assert is_fp8_kvcache and not causal and indices.shape[-1] % 64 == 0 and indices.dtype == torch.int32
        assert topk_length.shape == (b,) and attn_sink.shape == (h,)
        self.calls.append(("decode", h, indices.shape[-1]))
        rows_f = dequant_kv_rows(_flashmla_rows_from_raw(k_cache))
        out = torch.zeros(b, s_q, h, d)
        pos = torch.arange(indices.shape[-1])
        for bi in range(b):
            for i in range(s_q):
                idx = indices[bi, i]
                valid = (idx != -1) & (pos < topk_length[bi])
                out[bi, i] = _attend(q[bi, i], rows_f, idx, valid, attn_sink, softmax_scale)
        return out.to(torch.bfloat16), torch.zeros(b, s_q, h)

    def flash_mla_sparse_fwd(self, q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None):
        s_q, h, d = q.shape
        assert q.dtype == kv.dtype == torch.bfloat16 and h in (64, 128) and kv.shape[1] == 1
        assert indices.shape[:2] == (s_q, 1) and indices.shape[-1] % 64 == 0 and topk_length.shape == (s_q,)
        self.calls.append(("prefill", h, indices.shape[-1]))
        rows_f = kv[:, 0].float()
        out = torch.zeros(s_q, h, d)
        pos = torch.arange(indices.shape[-1])
        for i in range(s_q):
            idx = indices[i, 0]
            valid = (idx != -1) & (idx < kv.shape[0]) & (pos < topk_length[i])
            out[i] = _attend(q[i], rows_f, idx, valid, attn_sink, sm_scale)
        return out.to(torch.bfloat16), torch.zeros(s_q, h), torch.zeros(s_q, h)


@pytest.fixture
def fake_vendors(monkeypatch):
    from v4kernels.backends import cuda as CB

    fm, dg = FakeFlashMLA(), FakeDeepGEMM()
    probes = {"FlashMLA": CB.VendorProbe(True, "fake", fm), "DeepGEMM": CB.VendorProbe(True, "fake", dg)}
    monkeypatch.setattr(CB, "vendor", lambda name: probes[name])
    for mod in ("attention", "indexer", "mhc", "quant", "moe"):
        m = __import__(f"v4kernels.ops.{mod}.cuda", fromlist=["x"])
        if hasattr(m, "vendor"):
            monkeypatch.setattr(m, "vendor", lambda name: probes[name])
        if hasattr(m, "sm_of"):
            monkeypatch.setattr(m, "sm_of", lambda t: (9, 0))
    return fm, dg


def _attn_case(b, m, h, n, k, packed, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, m, h, 512, generator=g).to(torch.bfloat16)
    kv = torch.randn(b, n, 512, generator=g).to(torch.bfloat16)
    kv_in = v4k.pack_kv_fp8(kv) if packed else kv
    sink = torch.randn(h, generator=g)
    idx = torch.randint(0, n, (b, m, k), generator=g, dtype=torch.int32)
    idx[torch.rand(b, m, k, generator=g) < 0.3] = -1
    idx[0, 0] = -1  # an empty row
    return q, kv_in, sink, idx


@pytest.mark.parametrize("h", [8, 64, 100])
@pytest.mark.parametrize("n", [6, 300])  # whole-cache repack / gather of the referenced rows only
def test_flashmla_decode_adapter(fake_vendors, h, n):
    from v4kernels.ops.attention import cuda as A

    q, kv, sink, idx = _attn_case(2, 1, h, n, 40, True, h + n)
    scale = 512**-0.5
    got = A._decode(q, kv, sink, idx, scale)
    exp = reference_kernel("sparse_attn")(q, kv, sink, idx, scale)
    assert torch.allclose(got.float(), exp.float(), atol=2e-2, rtol=2e-2)
    assert bool((got[0, 0] == 0).all())
    assert {c[1] for c in fake_vendors[0].calls} == ({64} if h <= 64 else {128})


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("h", [16, 128, 160])
def test_flashmla_prefill_adapter(fake_vendors, packed, h):
    from v4kernels.ops.attention import cuda as A

    q, kv, sink, idx = _attn_case(2, 3, h, 50, 70, packed, h)
    got = A._prefill(q, kv, sink, idx, 0.05)
    exp = reference_kernel("sparse_attn")(q, kv, sink, idx, 0.05)
    assert torch.allclose(got.float(), exp.float(), atol=2e-2, rtol=2e-2)
    assert all(c[2] % 64 == 0 for c in fake_vendors[0].calls)


# ------------------------------------------------------------------------------ DeepGEMM model
class FakeDeepGEMM(types.ModuleType):
    def __init__(self):
        super().__init__("deep_gemm")

    def get_mk_alignment_for_contiguous_layout(self):
        return 128

    def fp8_fp4_mqa_logits(self, q, kv, weights, ks, ke, clean_logits=True, max_seqlen_k=0, logits_dtype=torch.float32):
        q8, q_sf = q
        assert q_sf is None and q8.dtype == torch.float8_e4m3fn and q8.shape[1] in (32, 64)
        assert weights.dtype == torch.float32 and ks.dtype == ke.dtype == torch.int32 and not clean_logits
        k8, k_sf = kv
        kf = k8.float() * k_sf[:, None]
        out = torch.full((q8.shape[0], max_seqlen_k), float("nan"))  # past ke: garbage
        for i in range(q8.shape[0]):
            for j in range(int(ke[i] - ks[i])):
                out[i, j] = ((q8[i].float() @ kf[int(ks[i]) + j]).relu() * weights[i]).sum()
        return out

    def fp8_fp4_gemm_nt(self, a, b, d, recipe=None):
        assert recipe == (1, 128, 128)
        d.copy_(Q.fp8_gemm(a[0], a[1], b[0], b[1], d.dtype))

    def m_grouped_fp8_fp4_gemm_nt_contiguous(self, a, b, d, layout, recipe=None):
        assert d.dtype == torch.bfloat16 and layout.dtype == torch.int32 and a[0].shape[0] % 128 == 0
        seg = layout.view(-1, 128)
        assert bool(((seg == seg[:, :1]) | (seg == -1)).all())  # one expert per aligned block
        for r in range(a[0].shape[0]):
            e = int(layout[r])
            if e >= 0:
                d[r] = Q.fp8_gemm(a[0][r : r + 1], a[1][r : r + 1], b[0][e], b[1][e], d.dtype)[0]

    def tf32_hc_prenorm_gemm(self, a, b, d, sqr_sum, num_splits=None):
        assert a.dtype == torch.bfloat16 and b.dtype == torch.float32
        d.copy_(a.float() @ b.T)
        sqr_sum.copy_(a.float().square().sum(-1))


def test_deepgemm_indexer_cache_layout():
    keys = torch.randn(70, 128).to(torch.float8_e4m3fn)
    sc = torch.rand(70) + 0.1
    cache = B.to_deepgemm_indexer_cache(keys, sc, 64)
    assert cache.shape == (2, 64, 1, 132)
    raw = cache.reshape(2, 64 * 132)
    assert torch.equal(raw[0, 5 * 128 : 6 * 128], keys[5].view(torch.uint8))
    assert raw[1, 64 * 128 + 4 * 3 : 64 * 128 + 4 * 4].view(torch.float32).item() == sc[67].item()
    k2, s2 = B.from_deepgemm_indexer_cache(cache, 70)
    assert torch.equal(k2.view(torch.uint8), keys.view(torch.uint8)) and torch.equal(s2, sc)


def _indexer_case(h, seed):
    g = torch.Generator().manual_seed(seed)
    b, s, n, d = 2, 5, 90, 128
    q = v4k.indexer_query(torch.randn(b, s, h, d, generator=g), torch.arange(s), v4k.v4_rope_frequencies(compressed=True))
    w = torch.randn(b, s, h, generator=g) * v4k.indexer_scale(h, d)
    keys, ks = v4k.act_quant(torch.randn(b, n, d, generator=g), 128, None)
    pos = torch.tensor([[3, 50, 100, 200, 359], [0, 7, 8, 300, 400]])
    return q, w, keys, ks, pos


@pytest.mark.parametrize("h", [8, 32, 64])
def test_deepgemm_indexer_adapter(fake_vendors, monkeypatch, h):
    from v4kernels.ops.indexer import cuda as I
    from v4kernels.ops.indexer.reference import select_topk

    q, w, keys, ks, pos = _indexer_case(h, h)
    assert B.fp8_exact_query(q.reshape(-1, h, 128), w.reshape(-1, h)) is not None  # FP4-simulated q is FP8-exact
    got = I._dg_scores_op(q, w, keys, ks, pos, 4)
    exp = reference_kernel("indexer_scores")(q, w, keys, ks, pos, 4)
    fin = torch.isfinite(exp)
    assert torch.equal(fin, torch.isfinite(got))
    assert torch.allclose(got[fin], exp[fin], rtol=1e-5, atol=1e-5)

    def host_select(sc, lim, k, off):
        return select_topk(sc, lim, k, off)

    monkeypatch.setattr(I, "_select", host_select)  # the native select is checked in test_cuda_topk_host.py
    exp_idx = reference_kernel("indexer_topk")(q, w, keys, ks, pos, 16, 4, 7)
    for chunk in (1 << 26, 200):  # whole batch in one launch / row chunks per sequence
        monkeypatch.setattr(I, "_CHUNK_ELEMS", chunk)
        got_idx = I._dg_topk(q, w, keys, ks, pos, 16, 4, 7)
        for a, e in zip(got_idx.reshape(-1, 16), exp_idx.reshape(-1, 16)):
            assert set(a.tolist()) == set(e.tolist())


def test_fp8_exact_query_rejects_inexact():
    q = torch.full((1, 1, 128), 1.0)
    q[0, 0, 0] = 1.0 + 2**-10
    assert B.fp8_exact_query(q, torch.ones(1, 1)) is None


def test_deepgemm_fp8_gemm_adapter(fake_vendors):
    from v4kernels.ops.quant import cuda as QC

    a, a_s = v4k.act_quant(torch.randn(5, 256), 128)
    b, b_s = v4k.act_quant(torch.randn(200, 256), 128)
    b_s = torch.rand(2, 2) + 0.5
    for dt in (torch.float32, torch.bfloat16):
        assert torch.equal(QC._run(a, a_s, b, b_s, dt), Q.fp8_gemm(a, a_s, b, b_s, dt))
    assert QC._refusals(a, a_s, b, b_s, torch.float16)


def test_moe_contiguous_layout():
    from v4kernels.ops.moe.cuda import contiguous_layout

    ids = torch.tensor([[2, 0], [2, -1], [1, 2]], dtype=torch.int32)
    src, lay = contiguous_layout(ids, 4, 4)
    assert lay.tolist() == [0, -1, -1, -1, 1, -1, -1, -1, 2, 2, 2, -1]
    assert src.tolist() == [1, -1, -1, -1, 4, -1, -1, -1, 0, 2, 5, -1]


@pytest.mark.parametrize("after", [False, True])
def test_deepgemm_moe_adapter(fake_vendors, after):
    from v4kernels.ops.moe import cuda as MC
    from v4kernels.ops.moe.reference import quantize_fp8_blocks

    g = torch.Generator().manual_seed(1)
    t, d, i, e, k = 6, 128, 256, 4, 2
    x = torch.randn(t, d, generator=g).to(torch.bfloat16)
    w1, w1_s = quantize_fp8_blocks(torch.randn(e, i, d, generator=g) * 0.1)
    w3, w3_s = quantize_fp8_blocks(torch.randn(e, i, d, generator=g) * 0.1)
    w2, w2_s = quantize_fp8_blocks(torch.randn(e, d, i, generator=g) * 0.1)
    ids = torch.randint(0, e, (t, k), generator=g, dtype=torch.int32)
    ids[1, 1] = -1
    wts = torch.rand(t, k, generator=g)
    args = (x, wts, ids, w1, w1_s, w3, w3_s, w2, w2_s, 10.0, after, torch.float32, False)
    assert not MC._refusals(*args)
    got = MC._run(*args)
    exp = reference_kernel("moe_experts")(*args)
    assert torch.allclose(got, exp, rtol=1e-2, atol=1e-3)


def test_hc_prenorm_split_matches_reference():
    """The native kernel's vendor branch computes mixes = d · rsqrt(sqr_sum / (hc·D) + eps) from
    DeepGEMM's (d, sqr_sum); that formula equals the reference's mix_logits."""
    from v4kernels.ops.mhc.reference import mix_logits

    x = torch.randn(3, 4, 64).to(torch.bfloat16)
    fn = torch.randn(24, 256)
    d = x.float().reshape(3, 256) @ fn.T
    sq = x.float().reshape(3, 256).square().sum(-1)
    mixes = d * torch.rsqrt(sq / 256 + 1e-6)[:, None]
    assert torch.allclose(mixes, mix_logits(x, fn, 1e-6), rtol=1e-5, atol=1e-5)
