"""Parity cases for the lightning indexer (SPEC §7) and two independent implementations the
reference is checked against: a per-element loop (tiny shapes, used by the unit tests) and a dense
fp64 evaluation without tiling (real V4 shapes)."""
from __future__ import annotations

from typing import Any

import torch

import v4kernels as v4k

from ..._registry import Tolerance
from ..compare import CompareResult, compare_topk
from ..inputs import FLASH, PRO, randn
from . import ParityCase, register

#: e2m1 code -> value (SPEC §4.1), written out again so the naive paths share nothing with quant
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def naive_dequant_keys(keys: torch.Tensor, key_scales: torch.Tensor | None) -> torch.Tensor:
    """Keys -> fp64 [B, N, dI], independently of the quant module."""
    if keys.dtype == torch.float8_e4m3fn:
        return keys.double() * key_scales.double().repeat_interleave(128, dim=-1)
    if keys.dtype == torch.uint8:
        table = torch.tensor(_E2M1, dtype=torch.float64, device=keys.device)
        lo, hi = table[(keys & 0xF).long()], table[(keys >> 4).long()]
        vals = torch.stack((lo, hi), dim=-1).flatten(-2)
        return vals * key_scales.double().repeat_interleave(32, dim=-1)
    return keys.double()


def naive_loop_scores(q, weights, keys, positions, ratio=4, key_scales=None) -> torch.Tensor:
    """Per-element Python loop in fp64 (tiny shapes only)."""
    b, s, h, d = q.shape
    k = naive_dequant_keys(keys, key_scales).tolist()
    qq, ww = q.double().tolist(), weights.double().tolist()
    pos = positions.expand(b, s).tolist() if positions.dim() == 2 else [positions.tolist()] * b
    n = keys.shape[1]
    out = torch.empty(b, s, n, dtype=torch.float64)
    for bi in range(b):
        for i in range(s):
            for c in range(n):
                if c >= (pos[bi][i] + 1) // ratio:
                    out[bi, i, c] = float("-inf")
                    continue
                tot = 0.0
                for hh in range(h):
                    dot = sum(qq[bi][i][hh][e] * k[bi][c][e] for e in range(d))
                    tot += ww[bi][i][hh] * max(dot, 0.0)
                out[bi, i, c] = tot
    return out


def naive_select(scores: torch.Tensor, positions: torch.Tensor, topk: int, ratio: int = 4, offset: int = 0) -> torch.Tensor:
    """Top-k by Python sorting of (−score, c) over the visible entries of each row; −1 padding."""
    b, s, n = scores.shape
    k = min(topk, n)
    pos = positions.expand(b, s).tolist() if positions.dim() == 2 else [positions.tolist()] * b
    out = torch.full((b, s, k), -1, dtype=torch.int32)
    sc = scores.tolist()
    for bi in range(b):
        for i in range(s):
            vis = min(n, (pos[bi][i] + 1) // ratio)
            best = sorted(range(vis), key=lambda c: (-sc[bi][i][c], c))[:k]
            for j, c in enumerate(best):
                out[bi, i, j] = c + offset
    return out


def dense_scores_f64(q, weights, keys, positions, ratio=4, key_scales=None) -> torch.Tensor:
    """Whole-tensor fp64 einsum, no tiling; −inf past the causal limit."""
    kf = naive_dequant_keys(keys, key_scales)
    logits = torch.einsum("bshd,bnd->bshn", q.double(), kf).clamp_min(0)
    sc = torch.einsum("bsh,bshn->bsn", weights.double(), logits)
    pos = positions if positions.dim() == 2 else positions.unsqueeze(0)
    lim = (pos.long() + 1) // ratio
    c = torch.arange(keys.shape[1], device=q.device)
    return sc.masked_fill(c >= lim.unsqueeze(-1), float("-inf"))


def dense_topk(q, weights, keys, positions, topk, ratio=4, offset=0, key_scales=None) -> torch.Tensor:
    sc = dense_scores_f64(q, weights, keys, positions, ratio, key_scales)
    k = min(topk, keys.shape[1])
    order = torch.sort(sc, dim=-1, descending=True, stable=True).indices[..., :k]
    pos = positions if positions.dim() == 2 else positions.unsqueeze(0)
    vis = torch.clamp((pos.long() + 1) // ratio, max=keys.shape[1])
    return torch.where(torch.arange(k, device=q.device) < vis.unsqueeze(-1), order + offset, -1).to(torch.int32)


def _topk_compare(actual: Any, expected: Any, tol: Any) -> CompareResult:
    return compare_topk(actual, expected, min_recall=0.99)


def make_indexer_inputs(
    g: torch.Generator,
    d: torch.device,
    positions: list[list[int]],
    n_keys: int,
    key_fmt: str,
    heads: int = FLASH["index_heads"],
    dim: int = FLASH["index_dim"],
    rope_dim: int = 64,
) -> dict[str, Any]:
    """V4-like inputs: FP4-simulated rotated queries (``indexer_query``), scaled bf16 head
    weights, and keys as the indexer compressor emits them (Hadamard + FP4), stored as bf16,
    FP8 (block 128) or packed FP4 (block 32)."""
    b, s = len(positions), len(positions[0])
    pos = torch.tensor(positions, dtype=torch.int64, device=d)
    freqs = v4k.v4_rope_frequencies(True, rope_dim=rope_dim, device=d)
    fp4 = dim % 32 == 0  # the FP4 simulation works in blocks of 32 (smaller heads: rotation only)
    q = v4k.indexer_query(randn(g, (b, s, heads, dim), d), pos, freqs, simulate_fp4=fp4)
    w = (randn(g, (b, s, heads), d, torch.float32) * v4k.indexer_scale(heads, dim)).to(torch.bfloat16)
    k = v4k.hadamard_transform(randn(g, (b, n_keys, dim), d))
    k = v4k.fp4_act_roundtrip(k, 32) if fp4 else k
    inputs: dict[str, Any] = {"q": q, "weights": w, "positions": pos}
    if key_fmt == "bf16":
        inputs.update(keys=k, key_scales=None)
    elif key_fmt == "fp8":
        kq, ks = v4k.act_quant(k, 128)
        inputs.update(keys=kq, key_scales=ks)
    else:
        kq, ks = v4k.fp4_act_quant(k, 32)
        inputs.update(keys=kq, key_scales=ks)
    return inputs


def _register_topk(name, positions, n_keys, key_fmt, topk, offset, tags, large=False, path="decode", heads=FLASH["index_heads"],
                   dim=FLASH["index_dim"], rope_dim=64, ratio=4):
    def make(g, d):
        x = make_indexer_inputs(g, d, positions, n_keys, key_fmt, heads=heads, dim=dim, rope_dim=rope_dim)
        x.update(topk=topk, offset=offset)
        return x

    def run(q, weights, keys, positions, key_scales, topk, offset):
        return v4k.indexer_topk(q, weights, keys, positions, topk, ratio=ratio, offset=offset, key_scales=key_scales)

    def naive(q, weights, keys, positions, key_scales, topk, offset):
        return dense_topk(q, weights, keys, positions, topk, ratio=ratio, offset=offset, key_scales=key_scales)

    register(ParityCase(f"indexer_topk/{name}", "indexer_topk", make, run, path=f"{path}-{key_fmt}-keys",
                        tags=frozenset(tags), large=large, compare=_topk_compare, naive=naive))


def _register_scores(name, positions, n_keys, key_fmt, tags, path, heads=FLASH["index_heads"], dim=FLASH["index_dim"],
                     rope_dim=64, ratio=4):
    def make(g, d):
        return make_indexer_inputs(g, d, positions, n_keys, key_fmt, heads=heads, dim=dim, rope_dim=rope_dim)

    def run(q, weights, keys, positions, key_scales):
        return v4k.indexer_scores(q, weights, keys, positions, ratio=ratio, key_scales=key_scales)

    def naive(q, weights, keys, positions, key_scales):
        return dense_scores_f64(q, weights, keys, positions, ratio=ratio, key_scales=key_scales).float()

    register(ParityCase(f"indexer_scores/{name}", "indexer_scores", make, run, path=f"{path}-{key_fmt}-keys",
                        tags=frozenset(tags), naive=naive, naive_tol=Tolerance(1e-5, 1e-5, 0.99999)))


_K = FLASH["index_topk"]
# Quick cases (real V4-Flash HI = 64, dI = 128 unless noted) stay cheap enough for the Triton
# interpreter; the heavier long-context shapes are `large`.
# Flash decode, batch 2 at different positions; the second row sees only 250 entries (−1 padding)
_register_topk("flash_decode_b2_n1024_bf16", [[4095], [1000]], 1024, "bf16", _K, 128, {"v4-flash"})
_register_topk("flash_decode_b2_n1024_fp4", [[4095], [2050]], 1024, "fp4", _K, 128, {"v4-flash"})
# T = 4·K_top exactly: every entry selected, no padding; one token earlier: one −1
_register_topk("flash_decode_t_eq_4k_bf16", [[4 * _K - 1], [4 * _K - 2]], _K, "bf16", _K, 128, {"v4-flash", "edge"})
# prefill from 0 (S = 64, N = S//4 = 16 < K_top): every row has fewer than k visible
_register_topk("flash_prefill_s64_fewer_than_k_bf16", [list(range(64))], 16, "bf16", _K, 64, {"v4-flash", "edge"}, path="prefill")
# chunked prefill with 16 heads, topk 100 (not a multiple of 64): rows before t = 399 see < 100
# entries, the second sequence never reaches 100
_register_topk("chunk_h16_s32_topk100_fp8", [list(range(380, 412)), list(range(100, 132))], 103, "fp8", 100, 128 + 32,
               {"odd"}, path="chunk", heads=16)
# long-context / wide top-k shapes
_register_topk("flash_decode_b2_n4096_fp8", [[16383], [9000]], 4096, "fp8", _K, 128, {"v4-flash"}, large=True)
_register_topk("flash_decode_b2_n2048_fp4", [[8191], [2050]], 2048, "fp4", _K, 128, {"v4-flash"}, large=True)
_register_topk("decode_topk1152_n4096_fp4", [[16383], [4000]], 4096, "fp4", 1152, 128, {"odd"}, large=True)
_register_topk("pro_decode_b2_n4096_fp4", [[16383], [6000]], 4096, "fp4", PRO["index_topk"], 128, {"v4-pro"}, large=True)
_register_topk("flash_decode_b2_n262144_fp4", [[1_048_575], [600_001]], 262144, "fp4", _K, 128, {"v4-flash"}, large=True)

_register_scores("prefill_s64_n16_bf16", [list(range(64))], 16, "bf16", {"v4-flash"}, "prefill")
_register_scores("decode_b2_n1024_fp8", [[4095], [1002]], 1024, "fp8", {"v4-flash"}, "decode")
_register_scores("decode_b2_n512_fp4", [[2047], [10]], 512, "fp4", {"v4-flash", "edge"}, "decode")

# generic shapes (small models): 2 heads of 16 dims, rope dims 8, top-4, compression ratio 8
_register_topk("generic_h2_d16_top4_prefill_ratio8", [list(range(40))], 5, "bf16", 4, 40, {"generic"}, path="generic",
               heads=2, dim=16, rope_dim=8, ratio=8)
_register_topk("generic_h2_d16_top4_decode_b2", [[43], [17]], 5, "bf16", 4, 8, {"generic"}, path="generic",
               heads=2, dim=16, rope_dim=8, ratio=8)
_register_topk("generic_h3_d32_top4_decode_fp4", [[61], [9]], 15, "fp4", 4, 8, {"generic"}, path="generic",
               heads=3, dim=32, rope_dim=16, ratio=4)
_register_scores("generic_h2_d16_chunk_ratio8", [list(range(30, 42))], 5, "bf16", {"generic"}, "generic",
                 heads=2, dim=16, rope_dim=8, ratio=8)

# --------------------------------------------------------------------------------------------
# NaN / ±inf inputs (docs/numerics.md)
# --------------------------------------------------------------------------------------------
from ._nonfinite import register_nonfinite  # noqa: E402

register_nonfinite("indexer_topk/flash_decode_b2_n1024_bf16", ["q", "weights", "keys"], values=("nan", "inf", "ninf"))
register_nonfinite("indexer_topk/chunk_h16_s32_topk100_fp8", ["keys", "key_scales"])
register_nonfinite("indexer_scores/prefill_s64_n16_bf16", ["q", "weights", "keys"])
