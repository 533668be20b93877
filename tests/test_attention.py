"""Sparse attention with sink, FP8 KV rows and grouped linear (SPEC §9, §13.1): the reference
against closed forms and an independent per-(b, i, h) loop, byte layout, edge cases, bad inputs."""
from __future__ import annotations

import doctest
import math

import pytest
import torch

import v4kernels as v4k
import v4kernels.ops.attention as attn_mod
from v4kernels.ops.attention import reference as ref
from v4kernels.testing import assert_close
from v4kernels.testing.cases.attention import (
    decode_window,
    naive_grouped_linear,
    naive_pack_kv_fp8,
    naive_sparse_attn,
    naive_unpack_kv_fp8,
)
from v4kernels.testing.inputs import bf16_ulp_tol
from v4kernels._registry import Tolerance

FP32_TOL = Tolerance(2e-6, 2e-5, 0.99999)
SCALE = 512**-0.5


pytestmark = pytest.mark.usefixtures("reference_backend")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(b, m, h, n, k, dtype=torch.float32, seed=0, p_skip=0.0, dup=False, sink_scale=1.0):
    g = _gen(seed)
    q = torch.randn(b, m, h, 512, generator=g).to(dtype)
    kv = torch.randn(b, n, 512, generator=g).to(dtype)
    sink = torch.randn(h, generator=g) * sink_scale
    if dup:
        idx = torch.randint(0, max(1, n // 3), (b, m, k), generator=g)
    else:
        idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b * m)]).reshape(b, m, k)
    idx = torch.where(torch.rand(b, m, k, generator=g) < p_skip, -1, idx).to(torch.int32)
    return q, kv, sink, idx


# ============================================================================ sparse_attn math


@pytest.mark.parametrize(
    "b,m,h,n,k,dtype,p_skip,dup",
    [
        (1, 1, 1, 8, 1, torch.float32, 0.0, False),
        (2, 3, 3, 100, 70, torch.float32, 0.2, False),
        (2, 3, 3, 100, 70, torch.bfloat16, 0.2, False),
        (1, 2, 5, 64, 130, torch.float32, 0.1, True),
        (1, 4, 2, 30, 17, torch.float16, 0.3, False),
    ],
)
def test_reference_matches_naive_loop(b, m, h, n, k, dtype, p_skip, dup):
    q, kv, sink, idx = _inputs(b, m, h, n, k, dtype, seed=k, p_skip=p_skip, dup=dup)
    out = v4k.sparse_attn(q, kv, sink, idx, SCALE)
    assert out.dtype == dtype and out.shape == q.shape
    tol = FP32_TOL if dtype == torch.float32 else bf16_ulp_tol(1.0 if dtype == torch.bfloat16 else 0.125)
    assert_close(out, naive_sparse_attn(q, kv, sink, idx, SCALE), tol)


@pytest.mark.parametrize("h", [1, 3, 64, 128])
def test_head_counts(h):
    q, kv, sink, idx = _inputs(1, 2, h, 40, 9, seed=h, p_skip=0.2)
    assert_close(v4k.sparse_attn(q, kv, sink, idx, SCALE), naive_sparse_attn(q, kv, sink, idx, SCALE), FP32_TOL)


def test_sink_only_in_denominator_single_key():
    # One valid key per row: o = v · e^s / (e^s + e^sink) = v · sigmoid(s − sink), per head.
    q, kv, _, _ = _inputs(1, 2, 4, 6, 1)
    sink = torch.tensor([0.0, 1.5, -2.0, 4.0])
    idx = torch.tensor([[[-1, 3, -1, -1], [5, -1, -1, -1]]], dtype=torch.int32)  # all-but-one −1
    out = v4k.sparse_attn(q, kv, sink, idx, 0.1)
    for i, key in enumerate((3, 5)):
        for hh in range(4):
            s = 0.1 * float(q[0, i, hh].double() @ kv[0, key].double())
            w = 1.0 / (1.0 + math.exp(float(sink[hh]) - s))
            torch.testing.assert_close(out[0, i, hh].double(), kv[0, key].double() * w, rtol=1e-5, atol=1e-6)
    # Omitting the sink would give exactly v; make sure the test can tell the difference.
    assert not torch.allclose(out[0, 0, 1], kv[0, 3], rtol=1e-3, atol=1e-3)


def test_sink_two_keys_and_duplicates():
    q, kv, _, _ = _inputs(1, 1, 2, 5, 1, seed=3)
    sink = torch.tensor([0.5, -0.25])
    idx = torch.tensor([[[2, 4, 2]]], dtype=torch.int32)  # key 2 counted twice
    out = v4k.sparse_attn(q, kv, sink, idx, SCALE)
    for hh in range(2):
        s2 = SCALE * float(q[0, 0, hh].double() @ kv[0, 2].double())
        s4 = SCALE * float(q[0, 0, hh].double() @ kv[0, 4].double())
        e2, e4, es = 2 * math.exp(s2), math.exp(s4), math.exp(float(sink[hh]))
        exp = (e2 * kv[0, 2].double() + e4 * kv[0, 4].double()) / (e2 + e4 + es)
        torch.testing.assert_close(out[0, 0, hh].double(), exp, rtol=1e-5, atol=1e-6)


def test_softmax_scale_is_applied():
    q, kv, sink, idx = _inputs(1, 1, 2, 20, 8, seed=5)
    a = v4k.sparse_attn(q, kv, sink, idx, 0.3)
    assert_close(a, naive_sparse_attn(q, kv, sink, idx, 0.3), FP32_TOL)
    assert not torch.allclose(a, v4k.sparse_attn(q, kv, sink, idx, SCALE), atol=1e-3)
    assert_close(v4k.sparse_attn(q, kv, sink, idx), v4k.sparse_attn(q, kv, sink, idx, SCALE))  # default 512^-0.5


def test_minus_one_skips_and_never_wraps():
    q, kv, sink, _ = _inputs(1, 1, 3, 10, 1, seed=7)
    kv[0, -1] = 50.0  # a −1 read as "last row" would dominate the output
    full = torch.tensor([[[-1, 2, -1, 5, 1, -1]]], dtype=torch.int32)
    compact = torch.tensor([[[2, 5, 1]]], dtype=torch.int32)
    assert_close(v4k.sparse_attn(q, kv, sink, full, SCALE), v4k.sparse_attn(q, kv, sink, compact, SCALE), FP32_TOL)
    # and −1 is not row 0 either
    with_zero = torch.tensor([[[0, 2, 5, 1]]], dtype=torch.int32)
    assert not torch.allclose(v4k.sparse_attn(q, kv, sink, full, SCALE), v4k.sparse_attn(q, kv, sink, with_zero, SCALE), atol=1e-4)


@pytest.mark.parametrize("sink_value", [-1e4, 0.0, 1e4, float("inf"), float("-inf")])
def test_all_skipped_rows_are_zero(sink_value):
    q, kv, _, idx = _inputs(2, 3, 4, 12, 5, seed=11)
    idx[0, 1] = -1
    idx[1, 2] = -1
    sink = torch.full((4,), sink_value)
    out = v4k.sparse_attn(q, kv, sink, idx, SCALE)
    assert not torch.isnan(out).any()
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1])) and torch.equal(out[1, 2], torch.zeros_like(out[1, 2]))
    assert out[0, 0].abs().sum() > 0 or sink_value > 100


def test_large_sinks():
    q, kv, _, idx = _inputs(1, 2, 4, 30, 12, seed=13)
    sink = torch.tensor([-1e4, 1e4, 60.0, -60.0])
    out = v4k.sparse_attn(q, kv, sink, idx, SCALE)
    assert torch.isfinite(out).all()
    assert_close(out, naive_sparse_attn(q, kv, sink, idx, SCALE), FP32_TOL)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))  # huge sink absorbs everything
    no_sink = naive_sparse_attn(q, kv, torch.full((4,), float("-inf")), idx, SCALE)
    assert_close(out[:, :, 0], no_sink[:, :, 0], FP32_TOL)  # very negative sink: plain softmax
    assert float(out[:, :, 2].abs().max()) < 1e-20


def test_index_order_invariance():
    q, kv, sink, idx = _inputs(2, 3, 4, 80, 70, seed=17, p_skip=0.2)
    perm = torch.randperm(70, generator=_gen(1))
    assert_close(v4k.sparse_attn(q, kv, sink, idx[..., perm], SCALE), v4k.sparse_attn(q, kv, sink, idx, SCALE), FP32_TOL)


def test_batches_read_their_own_kv():
    q, kv, sink, idx = _inputs(3, 2, 2, 16, 6, seed=19)
    out = v4k.sparse_attn(q, kv, sink, idx, SCALE)
    for bi in range(3):
        one = v4k.sparse_attn(q[bi : bi + 1], kv[bi : bi + 1], sink, idx[bi : bi + 1], SCALE)
        assert_close(out[bi : bi + 1], one, FP32_TOL)


def test_query_blocks_and_index_chunks(monkeypatch):
    # Force the bounded-memory path: 2 query rows per block, index chunks of 7 entries.
    monkeypatch.setattr(ref, "_K_CHUNK", 7)
    monkeypatch.setattr(ref, "_GATHER_BUDGET", 7 * 512 * 2)
    q, kv, sink, idx = _inputs(2, 5, 3, 90, 70, seed=23, p_skip=0.3)
    idx[0, 0, :40] = -1  # first chunks empty, keys only later: running max starts at -inf
    idx[0, 1, 7:] = -1  # keys only in the first chunk
    idx[1, 3] = -1  # nothing at all
    idx[0, 0, 45] = 7
    kv[0, 7] *= 8.0  # a late, dominant key forces rescaling of the running sums
    out = v4k.sparse_attn(q, kv, sink, idx, SCALE)
    assert_close(out, naive_sparse_attn(q, kv, sink, idx, SCALE), FP32_TOL)
    monkeypatch.undo()
    assert_close(out, v4k.sparse_attn(q, kv, sink, idx, SCALE), FP32_TOL)


def test_decode_window_list_shape():
    # Window lists of SPEC §8.2 used by the parity cases: first entry always valid, chronological ring.
    assert decode_window(0)[:2] == [0, -1] and len(decode_window(0)) == 128
    assert decode_window(127) == list(range(128))
    assert decode_window(128)[0] == 1 and decode_window(128)[-1] == 0


def test_int64_indices_and_bf16_sink_accepted():
    q, kv, sink, idx = _inputs(1, 2, 3, 20, 5, seed=29)
    a = v4k.sparse_attn(q, kv, sink, idx, SCALE)
    assert_close(v4k.sparse_attn(q, kv, sink, idx.long(), SCALE), a)
    s16 = sink.bfloat16()
    assert_close(v4k.sparse_attn(q, kv, s16, idx, SCALE), v4k.sparse_attn(q, kv, s16.float(), idx, SCALE))


# ============================================================================ FP8 KV path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_kv_equals_unpacked_kv(dtype):
    q, kv, sink, idx = _inputs(2, 3, 4, 50, 33, dtype=dtype, seed=31, p_skip=0.2)
    packed = v4k.pack_kv_fp8(kv)
    a = v4k.sparse_attn(q, packed, sink, idx, SCALE)
    b = v4k.sparse_attn(q, v4k.unpack_kv_fp8(packed, dtype), sink, idx, SCALE)
    assert torch.equal(a, b)
    tol = FP32_TOL if dtype == torch.float32 else bf16_ulp_tol(1.0)
    assert_close(a, naive_sparse_attn(q, packed, sink, idx, SCALE), tol)


def test_pack_byte_layout():
    kv = torch.zeros(512, dtype=torch.bfloat16)
    kv[0:64] = 1.0  # amax 1 -> scale 2^ceil(log2(1/448)) = 2^-8 -> byte 119; 1/2^-8 = 256 = e4m3 0x78
    kv[64] = 448.0  # amax 448 -> scale 2^0 -> byte 127; 448 = e4m3 0x7E
    kv[65] = -1.0  # -1 -> e4m3 0xB8
    # block 2 (128..191) all zero: amax clamp 1e-4 -> 2^ceil(log2(1e-4/448)) = 2^-22 -> byte 105
    kv[192:256] = 3.0 * 2.0**-10  # amax 3·2^-10 -> 2^ceil(log2(3·2^-10/448)) = 2^-17 -> byte 110; 3·2^7=384=0x7C
    kv[448] = 1.0  # bf16 0x3F80 -> bytes 80 3F (little endian)
    kv[449] = -2.0  # 0xC000 -> 00 C0
    kv[511] = 0.5  # 0x3F00 -> 00 3F
    p = v4k.pack_kv_fp8(kv).tolist()
    assert len(p) == 584
    assert p[0:64] == [0x78] * 64
    assert p[64] == 0x7E and p[65] == 0xB8 and p[66:128] == [0] * 62
    assert p[128:192] == [0] * 64
    assert p[192:256] == [0x7C] * 64
    assert p[448:452] == [0x80, 0x3F, 0x00, 0xC0]
    assert p[574:576] == [0x00, 0x3F]
    assert p[576:583] == [119, 127, 105, 110, 105, 105, 105]
    assert p[583] == 0


def test_pack_matches_naive_and_roundtrip():
    g = _gen(37)
    kv = (torch.randn(3, 4, 512, generator=g) * torch.logspace(-3, 3, 4).view(1, 4, 1)).bfloat16()
    packed = v4k.pack_kv_fp8(kv)
    assert packed.shape == (3, 4, 584) and packed.dtype == torch.uint8
    assert torch.equal(packed, naive_pack_kv_fp8(kv))
    assert packed[..., 583].eq(0).all()
    back = v4k.unpack_kv_fp8(packed)
    assert back.dtype == torch.bfloat16 and back.shape == kv.shape
    assert torch.equal(back[..., :448], v4k.act_quant_roundtrip(kv[..., :448], 64))
    assert torch.equal(back[..., 448:], kv[..., 448:])
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(v4k.unpack_kv_fp8(packed, dt), naive_unpack_kv_fp8(packed, dt))
    # scale bytes agree with act_quant's power-of-two scales
    _, s = v4k.act_quant(kv[..., :448], 64)
    assert torch.equal(packed[..., 576:583].view(torch.float8_e8m0fnu).float(), s)


def test_pack_fp32_input_rounds_rope_to_bf16():
    kv = torch.randn(2, 512, generator=_gen(41))
    back = v4k.unpack_kv_fp8(v4k.pack_kv_fp8(kv), torch.float32)
    assert torch.equal(back[:, 448:], kv[:, 448:].bfloat16().float())
    assert torch.equal(back[:, :448], v4k.act_quant_roundtrip(kv[:, :448], 64))
    assert torch.equal(v4k.pack_kv_fp8(kv), naive_pack_kv_fp8(kv))


def test_unpack_nan_scale_byte():
    p = v4k.pack_kv_fp8(torch.ones(1, 512))
    p[0, 577] = 0xFF  # UE8M0 NaN for block 1
    out = v4k.unpack_kv_fp8(p, torch.float32)
    assert torch.isnan(out[0, 64:128]).all() and not torch.isnan(out[0, :64]).any()


# ============================================================================ grouped_linear


@pytest.mark.parametrize("xdt,wdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_grouped_linear_matches_naive(xdt, wdt):
    g = _gen(43)
    x = torch.randn(2, 3, 4, 96, generator=g).to(xdt)
    w = (torch.randn(4, 40, 96, generator=g) * 0.1).to(wdt)
    y = v4k.grouped_linear(x, w)
    assert y.shape == (2, 3, 4, 40) and y.dtype == xdt
    assert_close(y, naive_grouped_linear(x, w), FP32_TOL if xdt == torch.float32 else bf16_ulp_tol(1.0))


def test_grouped_linear_groups_are_block_diagonal():
    x = torch.zeros(1, 1, 3, 4)
    x[0, 0, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.arange(3 * 2 * 4, dtype=torch.float32).reshape(3, 2, 4)
    y = v4k.grouped_linear(x, w)
    assert torch.equal(y[0, 0, 0], torch.zeros(2)) and torch.equal(y[0, 0, 2], torch.zeros(2))
    assert torch.equal(y[0, 0, 1], w[1] @ x[0, 0, 1])


def test_grouped_linear_token_blocks(monkeypatch):
    monkeypatch.setattr(ref, "_LINEAR_BUDGET", 70)  # 1 token per step
    g = _gen(47)
    x, w = torch.randn(2, 5, 2, 70, generator=g), torch.randn(2, 33, 70, generator=g)
    assert_close(v4k.grouped_linear(x, w), naive_grouped_linear(x, w), FP32_TOL)


# ============================================================================ empty inputs


def test_empty_inputs():
    q, kv, sink, idx = _inputs(2, 3, 4, 10, 5)
    assert v4k.sparse_attn(q[:, :0], kv, sink, idx[:, :0], SCALE).shape == (2, 0, 4, 512)
    assert v4k.sparse_attn(q[:0], kv[:0], sink, idx[:0], SCALE).shape == (0, 3, 4, 512)
    assert v4k.sparse_attn(q[:, :, :0], kv, sink[:0], idx, SCALE).shape == (2, 3, 0, 512)
    z = v4k.sparse_attn(q, kv, sink, idx[..., :0], SCALE)
    assert z.shape == q.shape and torch.equal(z, torch.zeros_like(q))
    z = v4k.sparse_attn(q, kv[:, :0], sink, torch.full_like(idx, -1), SCALE)
    assert torch.equal(z, torch.zeros_like(q))
    z = v4k.sparse_attn(q, v4k.pack_kv_fp8(kv)[:, :0], sink, torch.full_like(idx, -1), SCALE)
    assert torch.equal(z, torch.zeros_like(q))
    assert v4k.pack_kv_fp8(torch.zeros(0, 512)).shape == (0, 584)
    assert v4k.unpack_kv_fp8(torch.zeros(2, 0, 584, dtype=torch.uint8), torch.float32).shape == (2, 0, 512)
    assert v4k.grouped_linear(torch.zeros(1, 0, 2, 8), torch.zeros(2, 3, 8)).shape == (1, 0, 2, 3)
    assert v4k.grouped_linear(torch.zeros(1, 2, 0, 8), torch.zeros(0, 3, 8)).shape == (1, 2, 0, 3)
    assert v4k.grouped_linear(torch.zeros(1, 2, 2, 8), torch.zeros(2, 0, 8)).shape == (1, 2, 2, 0)
    z = v4k.grouped_linear(torch.ones(1, 2, 2, 0, dtype=torch.bfloat16), torch.ones(2, 3, 0))
    assert z.dtype == torch.bfloat16 and torch.equal(z, torch.zeros(1, 2, 2, 3, dtype=torch.bfloat16))


# ============================================================================ bad inputs


def _attn_args(**over):
    q, kv, sink, idx = _inputs(2, 3, 4, 10, 5)
    args = dict(q=q, kv=kv, attn_sink=sink, topk_idxs=idx, softmax_scale=SCALE)
    args.update(over)
    return args


_Q, _KV, _SINK, _IDX = _inputs(2, 3, 4, 10, 5)
_META = torch.device("meta")

ATTN_BAD = [
    ("q", dict(q=_Q[0]), ValueError, "must have 4 dims"),
    ("kv", dict(q=_Q[..., :256]), ValueError, "kv must have shape [2, *, 256]"),  # any head dim, kv must match
    ("q", dict(q=_Q[..., :0]), ValueError, "head dim) must be >= 1"),
    ("kv", dict(q=_Q[..., :256], kv=torch.zeros(2, 10, 584, dtype=torch.uint8)), ValueError, "packed FP8 kv rows"),
    ("q", dict(q=_Q.to(torch.int32)), TypeError, "q must have dtype"),
    ("q", dict(q="x"), TypeError, "q must be a torch.Tensor"),
    ("kv", dict(kv=_KV[0]), ValueError, "kv must have 3 dims"),
    ("kv", dict(kv=_KV[:1]), ValueError, "kv must have shape [2, *, 512]"),
    ("kv", dict(kv=_KV[..., :448]), ValueError, "kv must have shape"),
    ("kv", dict(kv=_KV.bfloat16()), TypeError, "kv must have dtype float32 (same as q) or uint8"),
    ("kv", dict(kv=torch.zeros(2, 10, 512, dtype=torch.uint8)), ValueError, "kv must have shape [2, *, 584]"),
    ("kv", dict(kv=_KV.to(_META)), ValueError, "kv is on meta"),
    ("attn_sink", dict(attn_sink=_SINK[:3]), ValueError, "attn_sink must have shape [4]"),
    ("attn_sink", dict(attn_sink=_SINK.long()), TypeError, "attn_sink must have dtype"),
    ("attn_sink", dict(attn_sink=_SINK.to(_META)), ValueError, "attn_sink is on meta"),
    ("topk_idxs", dict(topk_idxs=_IDX.float()), TypeError, "topk_idxs must have dtype int32/int64"),
    ("topk_idxs", dict(topk_idxs=_IDX[0]), ValueError, "topk_idxs must have 3 dims"),
    ("topk_idxs", dict(topk_idxs=_IDX[:, :2]), ValueError, "topk_idxs must have shape [2, 3, *]"),
    ("topk_idxs", dict(topk_idxs=torch.full_like(_IDX, 10)), ValueError, "entries must lie in [-1, 10)"),
    ("topk_idxs", dict(topk_idxs=torch.full_like(_IDX, -2)), ValueError, "got min -2"),
    ("topk_idxs", dict(topk_idxs=_IDX.to(_META)), ValueError, "topk_idxs is on meta"),
    ("softmax_scale", dict(softmax_scale=float("nan")), TypeError, "softmax_scale must be a finite float"),
    ("softmax_scale", dict(softmax_scale=True), TypeError, "softmax_scale must be a finite float"),
    ("softmax_scale", dict(softmax_scale=torch.tensor(0.1)), TypeError, "softmax_scale must be a finite float"),
]


@pytest.mark.parametrize("arg,over,exc,msg", ATTN_BAD, ids=[f"{a}-{i}" for i, (a, *_r) in enumerate(ATTN_BAD)])
def test_sparse_attn_bad_inputs(arg, over, exc, msg):
    with pytest.raises(exc) as ei:
        v4k.sparse_attn(**_attn_args(**over))
    text = str(ei.value)
    assert text.startswith("sparse_attn:") and arg in text and msg in text, text


def test_out_of_range_index_packed_and_unpacked():
    q, kv, sink, idx = _inputs(1, 2, 2, 10, 4)
    idx[0, 1, 3] = 10  # == N
    with pytest.raises(ValueError, match=r"sparse_attn: topk_idxs entries must lie in \[-1, 10\).*max 10"):
        v4k.sparse_attn(q, kv, sink, idx, SCALE)
    packed = v4k.pack_kv_fp8(kv)
    with pytest.raises(ValueError, match="sparse_attn: topk_idxs"):
        v4k.sparse_attn(q, packed, sink, idx, SCALE)


OTHER_BAD = [
    (lambda: v4k.pack_kv_fp8(torch.zeros(3, 448)), ValueError, "pack_kv_fp8: kv must have shape [..., 512], got [3, 448]"),
    (lambda: v4k.pack_kv_fp8(torch.zeros(3, 512, dtype=torch.int32)), TypeError, "pack_kv_fp8: kv must have dtype"),
    (lambda: v4k.pack_kv_fp8(torch.tensor(1.0)), ValueError, "pack_kv_fp8: kv must have shape"),
    (lambda: v4k.pack_kv_fp8([1.0]), TypeError, "pack_kv_fp8: kv must be a torch.Tensor"),
    (lambda: v4k.unpack_kv_fp8(torch.zeros(3, 512, dtype=torch.uint8)), ValueError, "unpack_kv_fp8: packed must have shape [..., 584], got [3, 512]"),
    (lambda: v4k.unpack_kv_fp8(torch.zeros(3, 584, dtype=torch.int8)), TypeError, "unpack_kv_fp8: packed must have dtype uint8, got int8"),
    (lambda: v4k.unpack_kv_fp8(torch.zeros(3, 584, dtype=torch.uint8), torch.int32), ValueError, "unpack_kv_fp8: out_dtype must be"),
    (lambda: v4k.grouped_linear(torch.zeros(2, 3, 4), torch.zeros(4, 2, 3)), ValueError, "grouped_linear: x must have 4 dims"),
    (lambda: v4k.grouped_linear(torch.zeros(1, 1, 4, 8), torch.zeros(4, 8)), ValueError, "grouped_linear: weight must have 3 dims"),
    (lambda: v4k.grouped_linear(torch.zeros(1, 1, 4, 8), torch.zeros(3, 2, 8)), ValueError, "grouped_linear: weight.shape[0] must be 4"),
    (lambda: v4k.grouped_linear(torch.zeros(1, 1, 4, 8), torch.zeros(4, 2, 7)), ValueError, "grouped_linear: weight.shape[2] must be 8"),
    (lambda: v4k.grouped_linear(torch.zeros(1, 1, 4, 8, dtype=torch.int64), torch.zeros(4, 2, 8)), TypeError, "grouped_linear: x must have dtype"),
    (lambda: v4k.grouped_linear(torch.zeros(1, 1, 4, 8), torch.zeros(4, 2, 8, dtype=torch.float8_e4m3fn)), TypeError, "grouped_linear: weight must have dtype"),
    (lambda: v4k.grouped_linear(torch.zeros(1, 1, 4, 8), torch.zeros(4, 2, 8, device="meta")), ValueError, "grouped_linear: weight is on meta"),
]


@pytest.mark.parametrize("fn,exc,msg", OTHER_BAD, ids=[m.split(":")[0] + f"-{i}" for i, (_f, _e, m) in enumerate(OTHER_BAD)])
def test_other_bad_inputs(fn, exc, msg):
    with pytest.raises(exc) as ei:
        fn()
    assert msg in str(ei.value), str(ei.value)


# ============================================================================ registration


def test_opcheck():
    q, kv, sink, idx = _inputs(1, 2, 2, 9, 5, dtype=torch.bfloat16, p_skip=0.3)
    ops = torch.ops.v4k
    torch.library.opcheck(ops.sparse_attn.default, (q, kv, sink, idx, SCALE))
    torch.library.opcheck(ops.sparse_attn.default, (q, v4k.pack_kv_fp8(kv), sink, idx, SCALE))
    torch.library.opcheck(ops.pack_kv_fp8.default, (kv,))
    torch.library.opcheck(ops.unpack_kv_fp8.default, (v4k.pack_kv_fp8(kv), torch.float32))
    torch.library.opcheck(ops.grouped_linear.default, (torch.randn(1, 2, 3, 16), torch.randn(3, 5, 16)))
    assert v4k.last_backend("sparse_attn") == "reference"


def test_docstring_examples():
    res = doctest.testmod(attn_mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 4 and res.failed == 0
