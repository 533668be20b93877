"""Parity cases for sparse attention with sink, the FP8 KV-row format and grouped linear
(SPEC §9, §13.1), plus the independent per-element implementations ("naive") the reference is
checked against.

Index lists follow SPEC §8: decode uses the 128-slot ring (chronological order, −1 padding
while ``t < 127``) followed by compressed entries at ``128 + c``; prefill uses the chunk rows
followed by compressed entries at ``S + c``.
"""
from __future__ import annotations

import math
import struct
from typing import Any

import torch

import v4kernels as v4k

from ..._registry import Tolerance
from ..inputs import FLASH, PRO, bf16_ulp_tol, randn
from . import ParityCase, register

WINDOW = 128
_FP32_NAIVE_TOL = Tolerance(2e-6, 2e-5, 0.99999)


# --------------------------------------------------------------------------------------------
# Independent implementations (per element, float64)
# --------------------------------------------------------------------------------------------


def naive_unpack_row(row: list[int]) -> list[float]:
    """One 584-byte row -> 512 floats, decoded byte by byte (SPEC §13.1)."""
    e4m3 = torch.tensor(row[:448], dtype=torch.uint8).view(torch.float8_e4m3fn).double().tolist()
    out = []
    for j in range(448):
        out.append(e4m3[j] * 2.0 ** (row[576 + j // 64] - 127))
    for j in range(64):
        lo, hi = row[448 + 2 * j], row[449 + 2 * j]
        out.append(struct.unpack("<f", bytes([0, 0, lo, hi]))[0])
    return out


def naive_pack_row(vals: torch.Tensor) -> list[int]:
    """One 512-value row -> 584 bytes: per-block amax and ceil(log2) by frexp (SPEC §4.2)."""
    v = vals.float()
    out = [0] * 584
    for blk in range(7):
        x = v[blk * 64 : (blk + 1) * 64]
        amax = max(float(x.abs().max()), 1e-4)
        f32 = torch.float32
        f = float(torch.tensor(amax, dtype=f32) * torch.tensor(1.0 / 448.0, dtype=f32))  # fp32 product
        mant, ex = math.frexp(f)  # f = mant · 2^ex, mant in [0.5, 1)
        k = ex - 1 if mant == 0.5 else ex
        codes = (x / 2.0**k).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).tolist()
        out[blk * 64 : (blk + 1) * 64] = codes
        out[576 + blk] = k + 127
    for j in range(64):
        w = struct.unpack("<I", struct.pack("<f", float(v[448 + j].to(torch.bfloat16))))[0]
        out[448 + 2 * j] = (w >> 16) & 0xFF
        out[449 + 2 * j] = (w >> 24) & 0xFF
    return out


def naive_pack_kv_fp8(kv: torch.Tensor) -> torch.Tensor:
    rows = kv.reshape(-1, 512)
    return torch.tensor([naive_pack_row(r) for r in rows], dtype=torch.uint8).reshape(*kv.shape[:-1], 584)


def naive_unpack_kv_fp8(packed: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    rows = packed.reshape(-1, 584).tolist()
    return torch.tensor([naive_unpack_row(r) for r in rows], dtype=torch.float64).reshape(*packed.shape[:-1], 512).to(out_dtype)


def naive_sparse_attn(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                      softmax_scale: float | None = None) -> torch.Tensor:
    """Loop over (b, i, h); plain softmax over the valid keys plus the sink, in float64."""
    scale = 512**-0.5 if softmax_scale is None else softmax_scale
    kvd = naive_unpack_kv_fp8(kv, torch.float64) if kv.dtype == torch.uint8 else kv.double()
    qd = q.double()
    b, m, h, d = q.shape
    out = torch.zeros(b, m, h, d, dtype=torch.float64)
    for bi in range(b):
        for i in range(m):
            keys = [int(k) for k in topk_idxs[bi, i].tolist() if k != -1]
            if not keys:
                continue
            kk = kvd[bi, keys]  # [n, d], duplicates included
            for hh in range(h):
                s = (kk @ qd[bi, i, hh]) * scale
                mx = float(s.max())
                e = torch.exp(s - mx)
                den = e.sum() + torch.exp(attn_sink[hh].double() - mx)  # may be inf: output 0
                out[bi, i, hh] = (e @ kk) / den
    return out.to(q.dtype)


def naive_grouped_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    groups = [x[:, :, g, :].double() @ weight[g].double().T for g in range(x.shape[2])]
    return torch.stack(groups, dim=2).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Index lists (SPEC §8)
# --------------------------------------------------------------------------------------------


def decode_window(t: int, window: int = WINDOW) -> list[int]:
    """Ring slots of positions t−window+1 … t in chronological order, −1 padding (SPEC §8.2)."""
    if t >= window - 1:
        return [(p % window) for p in range(t - window + 1, t + 1)]
    return list(range(t + 1)) + [-1] * (window - 1 - t)


def topk_like(gen: torch.Generator, visible: int, k: int, offset: int) -> list[int]:
    """``k`` distinct visible entries in random order (as a top-k would give), −1 padded."""
    take = min(visible, k)
    perm = torch.randperm(visible, generator=gen)[:take].tolist()
    return [offset + c for c in perm] + [-1] * (k - take)


def decode_indices(gen: torch.Generator, ts: list[int], n_comp: int, k_comp: int, ratio: int, dense: bool) -> torch.Tensor:
    """[B, 1, 128 + k_comp] for decode at positions ``ts``: window + CSA top-k or HCA dense part."""
    rows = []
    for t in ts:
        visible = min((t + 1) // ratio, n_comp)
        if dense:
            comp = [WINDOW + c for c in range(visible)][:k_comp] + [-1] * max(0, k_comp - visible)
        else:
            comp = topk_like(gen, visible, k_comp, WINDOW)
        rows.append([decode_window(t) + comp])
    return torch.tensor(rows, dtype=torch.int32)


def prefill_indices(gen: torch.Generator, b: int, s: int, ratio: int, k_comp: int, window: int = WINDOW) -> torch.Tensor:
    """[B, S, min(S,window) + k_comp] for a prefill from position 0 (SPEC §8.1), CSA top-k part."""
    wp = min(s, window)
    out = []
    for _ in range(b):
        rows = []
        for i in range(s):
            lo = max(0, i - window + 1)
            win = [lo + u if lo + u <= i else -1 for u in range(wp)]
            rows.append(win + topk_like(gen, (i + 1) // ratio, k_comp, s))
        out.append(rows)
    return torch.tensor(out, dtype=torch.int32)


# --------------------------------------------------------------------------------------------
# sparse_attn cases
# --------------------------------------------------------------------------------------------


def _attn_inputs(gen: torch.Generator, device: torch.device, b: int, m: int, h: int, n: int, idx: torch.Tensor,
                 dtype: torch.dtype = torch.bfloat16, fp8: bool = False, sink_scale: float = 1.0,
                 sink: torch.Tensor | None = None, d: int = 512) -> dict[str, Any]:
    q = randn(gen, (b, m, h, d), device, dtype)
    kv = randn(gen, (b, n, d), device, dtype)
    if fp8:
        kv = v4k.pack_kv_fp8(kv)
    if sink is None:
        sink = randn(gen, (h,), device, torch.float32, sink_scale)
    return {"q": q, "kv": kv, "attn_sink": sink.to(device), "topk_idxs": idx.to(device), "softmax_scale": d**-0.5}


def _run_attn(q, kv, attn_sink, topk_idxs, softmax_scale):
    return v4k.sparse_attn(q, kv, attn_sink, topk_idxs, softmax_scale)


def _attn_case(name: str, make, path: str, tags: set[str], large: bool = False, naive: bool = False,
               dtype: torch.dtype = torch.bfloat16) -> None:
    register(ParityCase(
        f"sparse_attn/{name}", "sparse_attn", make, _run_attn, path=path, tags=frozenset(tags), large=large,
        naive=naive_sparse_attn if naive else None,
        naive_tol=(bf16_ulp_tol(1.0) if dtype == torch.bfloat16 else _FP32_NAIVE_TOL) if naive else None,
    ))


def _decode_make(b_ts: list[int], h: int, n_comp: int, k_comp: int, ratio: int, dense: bool, fp8: bool):
    def make(gen: torch.Generator, device: torch.device) -> dict[str, Any]:
        idx = decode_indices(gen, b_ts, n_comp, k_comp, ratio, dense)
        return _attn_inputs(gen, device, len(b_ts), 1, h, WINDOW + n_comp, idx, fp8=fp8)
    return make


for _fp8 in (False, True):
    _sfx = "_fp8kv" if _fp8 else ""
    _path = "decode-fp8kv" if _fp8 else "decode"
    # V4-Flash CSA decode: window 128 + indexer top-512 over 1024 compressed slots (N = 1152).
    _attn_case(f"flash_csa_decode_b2_h64_k640{_sfx}",
               _decode_make([4000, 100], FLASH["n_heads"], 1024, FLASH["index_topk"], 4, False, _fp8),
               _path, {"v4-flash"}, large=_fp8, naive=not _fp8)  # FP8 path: small cases below
    # V4-Pro CSA decode: window 128 + top-1024 over 2048 compressed slots.
    _attn_case(f"pro_csa_decode_b2_h128_k1152{_sfx}",
               _decode_make([8000, 2000], PRO["n_heads"], 2048, PRO["index_topk"], 4, False, _fp8),
               _path, {"v4-pro"}, large=True)
    # HCA decode (ratio 128): window + all 64 visible compressed entries (t = 8191), and a short one.
    _attn_case(f"hca_decode_b2_h64_k192{_sfx}",
               _decode_make([8191, 300], FLASH["n_heads"], 64, 64, 128, True, _fp8),
               _path, {"v4-flash", "hca"}, naive=not _fp8)


def _prefill_make(b: int, s: int, h: int, ratio: int, k_comp: int, fp8: bool = False, window: int = WINDOW, d: int = 512,
                  dtype: torch.dtype = torch.bfloat16):
    def make(gen: torch.Generator, device: torch.device) -> dict[str, Any]:
        idx = prefill_indices(gen, b, s, ratio, k_comp, window)
        return _attn_inputs(gen, device, b, s, h, s + s // ratio, idx, fp8=fp8, d=d, dtype=dtype)
    return make


_attn_case("flash_csa_prefill_m64_h64", _prefill_make(1, 64, FLASH["n_heads"], 4, 16), "prefill", {"v4-flash"}, large=True)
_attn_case("flash_csa_prefill_m64_h64_fp8kv", _prefill_make(1, 64, FLASH["n_heads"], 4, 16, True), "prefill-fp8kv",
           {"v4-flash"}, large=True)
_attn_case("prefill_m12_h4_small", _prefill_make(2, 12, 4, 4, 3), "prefill", {"odd"}, naive=True)
_attn_case("prefill_m12_h4_small_fp8kv", _prefill_make(2, 12, 4, 4, 3, True), "prefill-fp8kv", {"odd"}, naive=True)


def _random_idx_make(b: int, m: int, h: int, n: int, k: int, p_skip: float = 0.2, dtype: torch.dtype = torch.bfloat16,
                     fp8: bool = False, skip_rows: tuple[int, ...] = (), dup: bool = False, sink_scale: float = 1.0,
                     sink: list[float] | None = None, d: int = 512):
    """Random indices with duplicates allowed when ``dup``, a fraction ``p_skip`` of −1 entries,
    and rows (over the flattened (b, i) grid) listed in ``skip_rows`` entirely −1."""
    def make(gen: torch.Generator, device: torch.device) -> dict[str, Any]:
        if dup:
            idx = torch.randint(0, max(1, n // 4), (b, m, k), generator=gen)
        else:
            idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b * m)]).reshape(b, m, k)
        idx = torch.where(torch.rand(b, m, k, generator=gen) < p_skip, -1, idx).to(torch.int32)
        flat = idx.view(b * m, k)
        for r in skip_rows:
            flat[r] = -1
        st = None if sink is None else torch.tensor(sink, dtype=torch.float32)
        return _attn_inputs(gen, device, b, m, h, n, idx, dtype=dtype, fp8=fp8, sink_scale=sink_scale, sink=st, d=d)
    return make


_attn_case("odd_h3_k70", _random_idx_make(2, 3, 3, 100, 70), "decode", {"odd"}, naive=True)
_attn_case("odd_h3_k70_fp8kv", _random_idx_make(2, 3, 3, 100, 70, fp8=True), "decode-fp8kv", {"odd"}, naive=True)
_attn_case("odd_h1_k1", _random_idx_make(1, 2, 1, 5, 1, p_skip=0.0), "decode", {"odd"}, naive=True)
_attn_case("odd_all_skipped_rows", _random_idx_make(2, 4, 5, 40, 33, skip_rows=(0, 5, 6)), "edge", {"edge"}, naive=True)
_attn_case("odd_duplicates_k130", _random_idx_make(1, 3, 2, 64, 130, p_skip=0.1, dup=True), "edge", {"edge"}, naive=True)
_attn_case("odd_big_sinks", _random_idx_make(1, 2, 4, 50, 20, sink=[-1e4, 1e4, 30.0, -30.0]), "edge", {"edge"}, naive=True)
_attn_case("odd_fp32_h64_k65", _random_idx_make(1, 2, 64, 90, 65, dtype=torch.float32), "decode", {"odd"},
           naive=True, dtype=torch.float32)
_attn_case("odd_fp16_h16_k64", _random_idx_make(2, 1, 16, 70, 64, dtype=torch.float16), "decode", {"odd"})
_attn_case("odd_h128_k200", _random_idx_make(1, 1, 128, 256, 200), "decode", {"odd", "v4-pro"})
# generic head dims (small models): 32, 40 and 24 are not whole SIMD register blocks on any ISA
_attn_case("generic_hd32_h4_prefill_w8_ratio8", _prefill_make(2, 20, 4, 8, 2, window=8, d=32), "generic", {"generic"},
           naive=True)
_attn_case("generic_hd32_h4_decode_k12", _random_idx_make(2, 1, 4, 24, 12, d=32), "generic", {"generic"}, naive=True)
_attn_case("generic_hd40_h3_k70", _random_idx_make(2, 3, 3, 100, 70, d=40), "generic", {"generic"}, naive=True)
_attn_case("generic_hd24_h7_fp32_k9", _random_idx_make(1, 4, 7, 16, 9, dtype=torch.float32, d=24), "generic", {"generic"},
           naive=True, dtype=torch.float32)
_attn_case("generic_hd96_h2_skipped_rows", _random_idx_make(2, 2, 2, 30, 17, skip_rows=(1,), d=96), "generic",
           {"generic", "edge"}, naive=True)


# --------------------------------------------------------------------------------------------
# pack / unpack cases
# --------------------------------------------------------------------------------------------


def _kv_make(shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16, zero_block: bool = False):
    def make(gen: torch.Generator, device: torch.device) -> dict[str, Any]:
        kv = randn(gen, shape, device, dtype)
        if zero_block:
            kv[..., 64:128] = 0  # amax clamp 1e-4 path
            kv[..., :64] *= 1000.0
        return {"kv": kv}
    return make


def _packed_make(shape: tuple[int, ...]):
    def make(gen: torch.Generator, device: torch.device) -> dict[str, Any]:
        return {"packed": v4k.pack_kv_fp8(randn(gen, shape, device, torch.bfloat16, 3.0))}
    return make


register(ParityCase("pack_kv_fp8/flash_cache_b2_n1152", "pack_kv_fp8", _kv_make((2, 1152, 512)),
                    lambda kv: v4k.pack_kv_fp8(kv), path="kv-cache", tags=frozenset({"v4-flash"}), large=True))
register(ParityCase("pack_kv_fp8/window_b2_n64", "pack_kv_fp8", _kv_make((2, 64, 512)),
                    lambda kv: v4k.pack_kv_fp8(kv), path="kv-cache", tags=frozenset({"v4-flash"})))
register(ParityCase("pack_kv_fp8/small_bf16_zero_block", "pack_kv_fp8", _kv_make((2, 3, 512), zero_block=True),
                    lambda kv: v4k.pack_kv_fp8(kv), path="kv-cache", tags=frozenset({"edge"}), naive=naive_pack_kv_fp8))
register(ParityCase("pack_kv_fp8/small_fp32", "pack_kv_fp8", _kv_make((5, 512), torch.float32),
                    lambda kv: v4k.pack_kv_fp8(kv), path="kv-cache", tags=frozenset({"odd"}), naive=naive_pack_kv_fp8))
for _dt in (torch.bfloat16, torch.float32):
    _n = str(_dt).replace("torch.", "")
    register(ParityCase(f"unpack_kv_fp8/flash_cache_b2_n1152_{_n}", "unpack_kv_fp8", _packed_make((2, 1152, 512)),
                        lambda packed, _d=_dt: v4k.unpack_kv_fp8(packed, _d), path="kv-cache", tags=frozenset({"v4-flash"}),
                        large=True))
    register(ParityCase(f"unpack_kv_fp8/window_b2_n64_{_n}", "unpack_kv_fp8", _packed_make((2, 64, 512)),
                        lambda packed, _d=_dt: v4k.unpack_kv_fp8(packed, _d), path="kv-cache", tags=frozenset({"v4-flash"})))
    register(ParityCase(f"unpack_kv_fp8/small_{_n}", "unpack_kv_fp8", _packed_make((3, 2, 512)),
                        lambda packed, _d=_dt: v4k.unpack_kv_fp8(packed, _d), path="kv-cache", tags=frozenset({"odd"}),
                        naive=lambda packed, _d=_dt: naive_unpack_kv_fp8(packed, _d), naive_tol=Tolerance(0.0, 0.0, 1.0)))


# --------------------------------------------------------------------------------------------
# grouped_linear cases
# --------------------------------------------------------------------------------------------


def _gl_make(b: int, s: int, g: int, din: int, dout: int, dtype: torch.dtype = torch.bfloat16,
             wdtype: torch.dtype | None = None):
    def make(gen: torch.Generator, device: torch.device) -> dict[str, Any]:
        return {"x": randn(gen, (b, s, g, din), device, dtype),
                "weight": randn(gen, (g, dout, din), device, wdtype or dtype, din**-0.5)}
    return make


def _gl_case(name: str, make, tags: set[str], large: bool = False, naive: bool = False,
             dtype: torch.dtype = torch.bfloat16) -> None:
    register(ParityCase(
        f"grouped_linear/{name}", "grouped_linear", make, lambda x, weight: v4k.grouped_linear(x, weight),
        path="wo_a", tags=frozenset(tags), large=large, naive=naive_grouped_linear if naive else None,
        naive_tol=(bf16_ulp_tol(1.0) if dtype == torch.bfloat16 else _FP32_NAIVE_TOL) if naive else None,
    ))


_FLASH_GIN = FLASH["n_heads"] // FLASH["o_groups"] * 512  # 4096
_PRO_GIN = PRO["n_heads"] // PRO["o_groups"] * 512  # 4096
_gl_case("flash_wo_a_decode_b2", _gl_make(2, 1, FLASH["o_groups"], _FLASH_GIN, FLASH["o_lora"]), {"v4-flash"}, large=True)
_gl_case("pro_wo_a_decode_b1", _gl_make(1, 1, PRO["o_groups"], _PRO_GIN, PRO["o_lora"]), {"v4-pro"}, large=True)
_gl_case("flash_wo_a_prefill_s16", _gl_make(1, 16, FLASH["o_groups"], _FLASH_GIN, FLASH["o_lora"]), {"v4-flash"}, large=True)
_gl_case("g8_512x128_s3", _gl_make(1, 3, 8, 512, 128), {"odd"}, naive=True)
_gl_case("g3_96x40_fp32", _gl_make(2, 3, 3, 96, 40, torch.float32), {"odd"}, naive=True, dtype=torch.float32)
_gl_case("g2_70x33_bf16x_fp32w", _gl_make(2, 2, 2, 70, 33, torch.bfloat16, torch.float32), {"odd"}, naive=True)


# --------------------------------------------------------------------------------------------
# NaN / ±inf inputs (docs/numerics.md): one poisoned element per float argument. Element 0 of kv
# is row 0 of batch 0, which every index list of these cases attends.
# --------------------------------------------------------------------------------------------
from ._nonfinite import register_nonfinite  # noqa: E402

register_nonfinite("sparse_attn/flash_csa_decode_b2_h64_k640", ["q", "kv", "attn_sink"], values=("nan", "inf", "ninf"))  # split-K
register_nonfinite("sparse_attn/prefill_m12_h4_small", ["q", "kv", "attn_sink"], values=("nan", "inf", "ninf"))
register_nonfinite("sparse_attn/prefill_m12_h4_small_fp8kv", ["q", "attn_sink"], values=("nan", "inf", "ninf"))
register_nonfinite("pack_kv_fp8/small_fp32", ["kv"])
register_nonfinite("grouped_linear/g3_96x40_fp32", ["x", "weight"])
