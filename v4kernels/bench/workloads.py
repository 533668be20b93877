"""The shared benchmark workload registry.

A :class:`Workload` is one named problem for one public op: input shapes and dtype, a seeded
input factory ``make(device)`` returning the op's keyword arguments, the FLOP and byte counts
of the problem (with the formula that gave them) and tags (model ``flash``/``pro``, phase
``prefill``/``decode``, ``h<heads>`` after tensor parallelism, ``ctx<tokens>``, source table).

Sources of the shapes:

* V4-Flash / V4-Pro model dimensions (SPEC §1.1, :mod:`v4kernels.bench.layouts`), prefill
  chunks of 4096 tokens and decode batches, head counts 8..128 after tensor parallelism,
  contexts up to 1M tokens for the indexer and the HCA path;
* the sparse-attention and mHC tables of the Triton V4 challenge (tasks 01 and 02);
* the FlashMLA V4 ("MODEL1") test shapes: sparse prefill ``s_q = 4096`` over
  8K..64K KV rows with h64/top-512 and h128/top-1024, decode batches 2..256 at ``s_k = 16384``.

FLOPs count multiply-adds as 2 and elementwise arithmetic as 1 per operation; bytes are the
compulsory traffic (every input read once, every output written once, gathered KV rows and
touched experts counted once). Both are what the roofline needs, not what a given kernel moves.

>>> from v4kernels.bench.workloads import all_workloads, select
>>> len(select(quick=True)) > 5
True
>>> w = next(w for w in all_workloads() if w.name == "sparse_attn/flash-decode-csa-h64-ctx128k")
>>> w.flops, w.tags >= {"flash", "decode", "h64"}
(83886080.0, True)
"""
from __future__ import annotations

import fnmatch
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from .layouts import (
    CSA_RATIO, FLASH, HCA_RATIO, HEAD_DIM, NOPE_DIM, INDEX_DIM, INDEX_HEADS, INDEXER_KEY_FP4, INDEXER_KEY_FP8, MAIN_KV_FP8,
    PRO, ROPE_DIM, WINDOW, ModelConfig,
)

__all__ = ["Workload", "all_workloads", "select", "get_workload", "ops_covered", "register_workload"]

Inputs = dict[str, Any]

_DT_BYTES = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4, torch.float8_e4m3fn: 1, torch.uint8: 1,
             torch.int32: 4, torch.int64: 8}


@dataclass(frozen=True)
class Workload:
    """One benchmark problem for one public op.

    ``make(device)`` returns the keyword arguments of ``v4kernels.<op>`` (seeded, so two runs
    time the same data); ``call(inputs)`` runs the op (default: ``v4kernels.<op>(**inputs)``).
    ``mem_bytes`` is the memory the inputs and outputs occupy, used to skip problems that do not
    fit the device.
    """

    name: str
    op: str
    shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype
    make: Callable[[torch.device], Inputs]
    flops: float
    bytes: float
    flop_formula: str
    byte_formula: str
    tags: frozenset[str] = frozenset()
    mem_bytes: float = 0.0
    call: Callable[[Inputs], Any] | None = None
    quick: bool = False
    source: str = "V4 shapes (SPEC §1.1)"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte."""
        return self.flops / self.bytes if self.bytes else 0.0

    def run(self, inputs: Inputs) -> Any:
        if self.call is not None:
            return self.call(inputs)
        import v4kernels

        return getattr(v4kernels, self.op)(**inputs)

    def tag_value(self, prefix: str) -> str:
        return next((t[len(prefix):] for t in sorted(self.tags) if t.startswith(prefix)), "")

    @property
    def model(self) -> str:
        return "flash" if "flash" in self.tags else "pro" if "pro" in self.tags else ""

    @property
    def phase(self) -> str:
        return "prefill" if "prefill" in self.tags else "decode" if "decode" in self.tags else ""


_REGISTRY: dict[str, Workload] = {}


def register_workload(w: Workload) -> Workload:
    if w.name in _REGISTRY:
        raise ValueError(f"duplicate workload name {w.name!r}")
    _REGISTRY[w.name] = w
    return w


def all_workloads() -> list[Workload]:
    return list(_REGISTRY.values())


def get_workload(name: str) -> Workload:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r} (see `python -m v4kernels bench --list`)") from None


def select(ops: Iterable[str] | None = None, patterns: Iterable[str] | None = None, tags: Iterable[str] | None = None,
           quick: bool = False) -> list[Workload]:
    """Workloads of ``ops`` whose name matches any glob/substring in ``patterns`` and that carry
    every tag in ``tags``; ``quick`` keeps the small CPU-friendly subset."""
    ops_s = set(ops or ())
    pats = list(patterns or ())
    tag_s = set(tags or ())
    out = []
    for w in _REGISTRY.values():
        if ops_s and w.op not in ops_s:
            continue
        if pats and not any(fnmatch.fnmatchcase(w.name, p) or p in w.name for p in pats):
            continue
        if tag_s and not tag_s <= w.tags:
            continue
        if quick and not w.quick:
            continue
        out.append(w)
    return out


def ops_covered() -> set[str]:
    return {w.op for w in _REGISTRY.values()}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _nb(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * _DT_BYTES[dtype]


def _randn(g: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, dev: torch.device, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(dev)


def _randint(g: torch.Generator, lo: int, hi: int, shape: tuple[int, ...], dev: torch.device) -> torch.Tensor:
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(torch.int32).to(dev)


def _ctx(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}m"
    return f"{n >> 10}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _tags(model: ModelConfig | None, phase: str | None, *extra: str, heads: int | None = None, ctx: int | None = None) -> frozenset[str]:
    t = set(extra)
    if model is not None:
        t.add(model.name)
    if phase:
        t.add(phase)
    if heads is not None:
        t.add(f"h{heads}")
    if ctx is not None:
        t.add(f"ctx{_ctx(ctx)}")
    return frozenset(t)


def _w(name: str, op: str, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, make: Callable[[torch.device], Inputs],
       flops: float, nbytes: float, flop_formula: str, byte_formula: str, tags: frozenset[str], mem: float,
       call: Callable[[Inputs], Any] | None = None, quick: bool = False, source: str = "V4 shapes (SPEC §1.1)",
       params: dict[str, Any] | None = None) -> None:
    register_workload(Workload(f"{op}/{name}", op, shapes, dtype, make, float(flops), float(nbytes), flop_formula,
                               byte_formula, tags, float(mem), call, quick, source, params or {}))


TP_HEADS = (8, 16, 32, 64, 128)


# --------------------------------------------------------------------------------------------
# attention: sparse_attn, pack/unpack, grouped_linear (SPEC §9, §13.1)
# --------------------------------------------------------------------------------------------


def sparse_attn_counts(B: int, M: int, H: int, N: int, K: int, fp8_kv: bool, dtype: torch.dtype) -> tuple[float, float]:
    """FLOPs ``4·512·B·M·H·K`` (QK and PV over all 512 dims); bytes: q and o, the index list,
    the sink, and the KV rows gathered — at most ``min(N, M·K)`` distinct rows per sequence."""
    e = _DT_BYTES[dtype]
    row = MAIN_KV_FP8.nbytes if fp8_kv else HEAD_DIM * e
    flops = 4 * HEAD_DIM * B * M * H * K
    nbytes = 2 * B * M * H * HEAD_DIM * e + B * M * K * 4 + H * 4 + B * min(N, M * K) * row
    return flops, nbytes


def _sparse_attn(name: str, B: int, M: int, H: int, N: int, K: int, tags: frozenset[str], *, fp8_kv: bool = False,
                 quick: bool = False, source: str = "V4 shapes (SPEC §1.1)", dtype: torch.dtype = torch.bfloat16) -> None:
    def make(dev: torch.device) -> Inputs:
        import v4kernels

        g = _gen(name)
        kv = _randn(g, (B, N, HEAD_DIM), dtype, dev)
        if fp8_kv:
            with v4kernels.use_backend("reference", ops=["pack_kv_fp8"]):
                kv = v4kernels.pack_kv_fp8(kv)
        return {"q": _randn(g, (B, M, H, HEAD_DIM), dtype, dev), "kv": kv,
                "attn_sink": _randn(g, (H,), torch.float32, dev), "topk_idxs": _randint(g, 0, N, (B, M, K), dev),
                "softmax_scale": HEAD_DIM ** -0.5}

    fl, nb = sparse_attn_counts(B, M, H, N, K, fp8_kv, dtype)
    kvshape = (B, N, MAIN_KV_FP8.nbytes if fp8_kv else HEAD_DIM)
    shapes = {"q": (B, M, H, HEAD_DIM), "kv": kvshape, "topk_idxs": (B, M, K)}
    mem = 2 * _nb((B, M, H, HEAD_DIM), dtype) + _nb(kvshape, torch.uint8 if fp8_kv else dtype) + _nb((B, M, K), torch.int32)
    _w(name, "sparse_attn", shapes, dtype, make, fl, nb, "4·512·B·M·H·K",
       "q+o + idx + sink + B·min(N, M·K)·row (" + ("584 B fp8 row" if fp8_kv else "512·elt") + ")",
       tags | {"fp8kv" if fp8_kv else "bf16kv"}, mem, quick=quick, source=source)


def _attention_workloads() -> None:
    for model in (FLASH, PRO):
        topk = model.index_topk
        # decode at 128K context, heads after TP; CSA: window + top-k; HCA: window + all L/128
        ctx = 128 * 1024
        for h in (h for h in TP_HEADS if h <= model.n_heads):
            for kind, K, N in (("csa", WINDOW + topk, WINDOW + ctx // CSA_RATIO), ("hca", WINDOW + ctx // HCA_RATIO, WINDOW + ctx // HCA_RATIO)):
                _sparse_attn(f"{model.name}-decode-{kind}-h{h}-ctx128k", 1, 1, h, N, K,
                             _tags(model, "decode", kind, heads=h, ctx=ctx), quick=(h == 8 and model is FLASH))
        # HCA decode up to 1M tokens (all entries visible), full heads
        for ctx in (16 * 1024, 1 << 20):
            K = N = WINDOW + ctx // HCA_RATIO
            _sparse_attn(f"{model.name}-decode-hca-h{model.n_heads}-ctx{_ctx(ctx)}", 1, 1, model.n_heads, N, K,
                         _tags(model, "decode", "hca", heads=model.n_heads, ctx=ctx))
        # FP8 KV decode, batch 32 at 64K context
        ctx = 64 * 1024
        _sparse_attn(f"{model.name}-decode-csa-fp8kv-b32-h{model.n_heads}-ctx64k", 32, 1, model.n_heads,
                     WINDOW + ctx // CSA_RATIO, WINDOW + topk, _tags(model, "decode", "csa", heads=model.n_heads, ctx=ctx),
                     fp8_kv=True)
        # prefill chunk of 4096 tokens from position 0: buffer [chunk | S/4 compressed]
        S = 4096
        for h in sorted({min(16, model.n_heads), model.n_heads}):
            _sparse_attn(f"{model.name}-prefill-csa-s4096-h{h}", 1, S, h, S + S // CSA_RATIO, WINDOW + topk,
                         _tags(model, "prefill", "csa", heads=h, ctx=S))
    # Flash CSA decode batches at 32K context, all 64 heads, bf16 and FP8 KV (the CPU backend's
    # decode targets, bench/cpu_targets.py)
    ctx = 32 * 1024
    for B in (1, 4, 16):
        for fp8 in (False, True):
            _sparse_attn(f"flash-decode-csa-{'fp8kv-' if fp8 else ''}b{B}-h{FLASH.n_heads}-ctx32k", B, 1, FLASH.n_heads,
                         WINDOW + ctx // CSA_RATIO, WINDOW + FLASH.index_topk,
                         _tags(FLASH, "decode", "csa", heads=FLASH.n_heads, ctx=ctx), fp8_kv=fp8)
    # small CPU-sized problems for --quick
    _sparse_attn("tiny-decode-b4-h8-k256", 4, 1, 8, 1024, 256, _tags(None, "decode", "tiny", heads=8), quick=True)
    _sparse_attn("tiny-decode-fp8kv-b4-h8-k256", 4, 1, 8, 1024, 256, _tags(None, "decode", "tiny", heads=8), quick=True,
                 fp8_kv=True)
    _sparse_attn("tiny-prefill-s64-h8-k192", 1, 64, 8, 256, 192, _tags(None, "prefill", "tiny", heads=8), quick=True)

    # Triton V4 challenge task 01: 16 heads = Flash at TP4, topk 640 = 128 SWA + 512 CSA
    src = "Triton V4 challenge, task 01"
    for phase, B, S, N, K in (("prefill", 64, 1024, 1024, 128), ("prefill", 64, 1024, 1280, 384), ("prefill", 16, 4096, 4096, 128),
                              ("prefill", 1, 16384, 16384, 128), ("prefill", 1, 16384, 20480, 640), ("decode", 64, 1, 128, 128),
                              ("decode", 64, 1, 400, 392), ("decode", 64, 1, 640, 640), ("decode", 16, 1, 1408, 640),
                              ("decode", 1, 1, 4480, 640)):
        _sparse_attn(f"challenge-{phase}-b{B}-s{S}-kv{N}-k{K}", B, S, 16, N, K,
                     _tags(FLASH, phase, "challenge", heads=16), source=src)

    # FlashMLA V4 (MODEL1) tests: sparse prefill s_q=4096, s_kv 8K..64K, no batch;
    # decode s_k=16384 with batches 2..256 (main SWA top-128 + extra c4 top-k).
    src = "FlashMLA MODEL1 tests"
    for model in (FLASH, PRO):
        h, k = model.n_heads, model.index_topk
        for skv in (8192, 32768, 65536):
            _sparse_attn(f"flashmla-prefill-h{h}-k{k}-skv{skv >> 10}k", 1, 4096, h, skv, k,
                         _tags(model, "prefill", "flashmla", heads=h, ctx=skv), source=src)
        for B in (2, 64, 256):
            _sparse_attn(f"flashmla-decode-h{h}-b{B}-sk16k", B, 1, h, WINDOW + 16384 // CSA_RATIO, WINDOW + k,
                         _tags(model, "decode", "flashmla", heads=h, ctx=16384), source=src, fp8_kv=True)

    # pack / unpack FP8 KV rows (SPEC §13.1)
    for model, B, S, phase in ((FLASH, 64, 1, "decode"), (FLASH, 1, 4096, "prefill")):
        name = f"{model.name}-{phase}-b{B}-s{S}"

        def make_pack(dev: torch.device, _n=name, _B=B, _S=S) -> Inputs:
            return {"kv": _randn(_gen(_n), (_B, _S, HEAD_DIM), torch.bfloat16, dev)}

        rows = B * S
        _w(name, "pack_kv_fp8", {"kv": (B, S, HEAD_DIM)}, torch.bfloat16, make_pack, 3 * rows * 448, rows * (1024 + 584),
           "3·rows·448 (amax, scale, cast)", "rows·(1024 + 584)", _tags(model, phase), rows * 1608, quick=(phase == "decode"))

        def make_unpack(dev: torch.device, _n=name, _B=B, _S=S) -> Inputs:
            import v4kernels

            with v4kernels.use_backend("reference", ops=["pack_kv_fp8"]):
                p = v4kernels.pack_kv_fp8(_randn(_gen(_n), (_B, _S, HEAD_DIM), torch.bfloat16, dev))
            return {"packed": p, "out_dtype": torch.bfloat16}

        _w(name, "unpack_kv_fp8", {"packed": (B, S, 584)}, torch.uint8, make_unpack, rows * 448, rows * (1024 + 584),
           "rows·448 (scale multiply)", "rows·(584 + 1024)", _tags(model, phase), rows * 1608, quick=(phase == "decode"))

    # grouped low-rank output projection wo_a (SPEC §9.4): x [B,S,G,H/G·512] x weight [G,o_lora,H/G·512]
    for model in (FLASH, PRO):
        G, din, dout = model.o_groups, model.n_heads // model.o_groups * HEAD_DIM, model.o_lora
        for phase, B, S in (("decode", 64, 1), ("prefill", 1, 4096)):
            name = f"{model.name}-{phase}-b{B}-s{S}"

            def make_gl(dev: torch.device, _n=name, _B=B, _S=S, _G=G, _di=din, _do=dout) -> Inputs:
                g = _gen(_n)
                return {"x": _randn(g, (_B, _S, _G, _di), torch.bfloat16, dev),
                        "weight": _randn(g, (_G, _do, _di), torch.bfloat16, dev, _di ** -0.5)}

            T = B * S
            fl = 2 * T * G * dout * din
            nb = 2 * (T * G * din + G * dout * din + T * G * dout)
            _w(name, "grouped_linear", {"x": (B, S, G, din), "weight": (G, dout, din)}, torch.bfloat16, make_gl, fl, nb,
               "2·B·S·G·Dout·Din", "x + weight + y (bf16)", _tags(model, phase), nb)
    name = "tiny-b4-g2"
    _w(name, "grouped_linear", {"x": (4, 1, 2, 512), "weight": (2, 256, 512)}, torch.bfloat16,
       lambda dev: {"x": _randn(_gen(name), (4, 1, 2, 512), torch.bfloat16, dev),
                    "weight": _randn(_gen(name + "w"), (2, 256, 512), torch.bfloat16, dev, 512 ** -0.5)},
       2 * 4 * 2 * 256 * 512, 2 * (4 * 2 * 512 + 2 * 256 * 512 + 4 * 2 * 256), "2·B·S·G·Dout·Din", "x + weight + y (bf16)",
       _tags(None, "decode", "tiny"), 600_000, quick=True)


# --------------------------------------------------------------------------------------------
# indexer (SPEC §7)
# --------------------------------------------------------------------------------------------


def visible_entries(start: int, S: int, N: int, ratio: int = CSA_RATIO) -> int:
    """``Σ_t min(N, (t+1)//ratio)`` over the query positions ``t = start … start+S−1``: the
    (query, entry) pairs the causal limit leaves (SPEC §7.2)."""
    total = 0
    for t in range(start, start + S):
        total += min(N, (t + 1) // ratio)
    return total


def indexer_counts(B: int, S: int, N: int, key_fmt: str, topk: int | None, start: int | None = None) -> tuple[float, float]:
    """FLOPs ``(2·HI·dI + 2·HI)·B·V`` with ``V`` the visible (query, key) pairs (q·k, then the
    ReLU-weighted head sum; ``V = S·N`` when ``start`` is None); bytes: q and weights (bf16),
    every key once per sequence in its storage format, and the output (fp32 scores, or int32 top-k)."""
    key_b = {"bf16": INDEX_DIM * 2, "fp8": INDEXER_KEY_FP8.nbytes, "fp4": INDEXER_KEY_FP4.nbytes}[key_fmt]
    V = S * N if start is None else visible_entries(start, S, N)
    fl = (2 * INDEX_HEADS * INDEX_DIM + 2 * INDEX_HEADS) * B * V
    out = B * S * min(topk, N) * 4 if topk is not None else B * S * N * 4
    nb = B * S * INDEX_HEADS * (INDEX_DIM + 1) * 2 + B * N * key_b + B * S * 8 + out
    return fl, nb


def _indexer(name: str, B: int, S: int, N: int, start: int, key_fmt: str, topk: int | None, tags: frozenset[str],
             quick: bool = False) -> None:
    op = "indexer_topk" if topk is not None else "indexer_scores"

    def make(dev: torch.device) -> Inputs:
        import v4kernels

        g = _gen(f"{op}/{name}")
        keys = _randn(g, (B, N, INDEX_DIM), torch.bfloat16, dev)
        scales = None
        if key_fmt == "fp8":
            keys, scales = v4kernels.act_quant(keys, INDEX_DIM, scale_fmt="ue8m0")
        elif key_fmt == "fp4":
            keys, scales = v4kernels.fp4_act_quant(keys, 32)
        pos = (torch.arange(S, dtype=torch.int64) + start).expand(B, S).contiguous().to(dev)
        d: Inputs = {"q": _randn(g, (B, S, INDEX_HEADS, INDEX_DIM), torch.bfloat16, dev),
                     "weights": _randn(g, (B, S, INDEX_HEADS), torch.bfloat16, dev, (INDEX_HEADS * INDEX_DIM) ** -0.5),
                     "keys": keys, "positions": pos, "ratio": CSA_RATIO, "key_scales": scales}
        if topk is not None:
            d["topk"] = topk
        return d

    fl, nb = indexer_counts(B, S, N, key_fmt, topk, start)
    kdim = INDEX_DIM // 2 if key_fmt == "fp4" else INDEX_DIM
    shapes = {"q": (B, S, INDEX_HEADS, INDEX_DIM), "keys": (B, N, kdim)}
    out_mem = B * S * N * 4
    _w(name, op, shapes, torch.bfloat16, make, fl, nb, "(2·HI·dI + 2·HI)·B·Σ_t min(N, (t+1)//4)",
       f"q + w + keys ({key_fmt}) + positions + out", tags | {f"keys-{key_fmt}"}, nb + out_mem, quick=quick)


def _indexer_workloads() -> None:
    for model in (FLASH, PRO):
        k = model.index_topk
        for ctx in (8192, 128 * 1024, 1 << 20):
            N = ctx // CSA_RATIO
            for fmt in ("bf16", "fp8", "fp4"):
                if fmt != "fp4" and ctx == 8192:
                    continue
                _indexer(f"{model.name}-decode-b1-ctx{_ctx(ctx)}-{fmt}", 1, 1, N, ctx - 1, fmt, k,
                         _tags(model, "decode", heads=INDEX_HEADS, ctx=ctx))
        _indexer(f"{model.name}-decode-b32-ctx64k-fp8", 32, 1, 16384, 65535, "fp8", k,
                 _tags(model, "decode", heads=INDEX_HEADS, ctx=65536))
        _indexer(f"{model.name}-prefill-s4096-bf16", 1, 4096, 1024, 0, "bf16", k,
                 _tags(model, "prefill", heads=INDEX_HEADS, ctx=4096))
    # scores only (the unfused path) at the same shapes as Flash decode
    for ctx in (128 * 1024, 1 << 20):
        _indexer(f"decode-b1-ctx{_ctx(ctx)}-bf16", 1, 1, ctx // CSA_RATIO, ctx - 1, "bf16", None,
                 _tags(FLASH, "decode", heads=INDEX_HEADS, ctx=ctx))
    _indexer("prefill-s4096-bf16", 1, 4096, 1024, 0, "bf16", None, _tags(FLASH, "prefill", heads=INDEX_HEADS, ctx=4096))
    _indexer("tiny-decode-b2-n2048-fp4", 2, 1, 2048, 8191, "fp4", None, _tags(None, "decode", "tiny"), quick=True)
    _indexer("tiny-decode-b2-n2048-fp8", 2, 1, 2048, 8191, "fp8", 512, _tags(None, "decode", "tiny"), quick=True)
    _indexer("tiny-prefill-s128-n32", 1, 128, 32, 0, "bf16", 16, _tags(None, "prefill", "tiny"), quick=True)


# --------------------------------------------------------------------------------------------
# indices (SPEC §8): index arithmetic only, 0 FLOPs
# --------------------------------------------------------------------------------------------


def _indices_workloads() -> None:
    for phase, B, S, ctx in (("decode", 64, 1, 65536), ("decode", 1, 1, 1 << 20), ("prefill", 1, 4096, 4096)):
        start = [ctx - 1] * B if phase == "decode" else [0] * B
        mode = phase
        name = f"{phase}-b{B}-ctx{_ctx(ctx)}"
        offset = WINDOW if phase == "decode" else S
        _w(name, "window_indices", {"out": (B, S, WINDOW)}, torch.int32,
           lambda dev, _s=start, _S=S, _m=mode: {"start_pos": _s, "seq_len": _S, "window": WINDOW, "mode": _m, "device": dev},
           0, B * S * min(WINDOW, max(S, WINDOW)) * 4, "0", "out int32", _tags(None, phase, ctx=ctx), B * S * WINDOW * 4,
           quick=(B == 64))
        C = ctx // HCA_RATIO
        _w(name, "compressed_indices", {"out": (B, S, C)}, torch.int32,
           lambda dev, _s=start, _S=S, _m=mode, _o=offset: {"start_pos": _s, "seq_len": _S, "ratio": HCA_RATIO, "offset": _o,
                                                            "mode": _m, "device": dev},
           0, B * S * C * 4, "0", "out int32", _tags(None, phase, "hca", ctx=ctx), B * S * C * 4, quick=(B == 64))


# --------------------------------------------------------------------------------------------
# compressor (SPEC §6): CSA main (hd 512, fp8), CSA indexer (hd 128, fp4), HCA (hd 512, fp8)
# --------------------------------------------------------------------------------------------


def compressor_counts(B: int, S: int, D: int, ratio: int, hd: int) -> tuple[float, float]:
    """FLOPs ``2·B·S·D·2·coff·hd`` (kv and gate projections) ``+ 4·B·S·coff·hd`` (softmax-weighted
    pooling); bytes: x and both weights in bf16, fp32 state in and out, bf16 entries out."""
    coff = 2 if ratio == CSA_RATIO else 1
    fl = 2 * B * S * D * 2 * coff * hd + 4 * B * S * coff * hd
    state = B * 4 * (2 * ratio * coff * hd + (2 * ratio * hd if ratio == CSA_RATIO else 0))
    nb = 2 * B * S * D + 2 * 2 * coff * hd * D + 2 * state + 2 * B * -(-S // ratio) * hd
    return fl, nb


def _compress_call(inputs: Inputs) -> Any:
    import v4kernels

    args = dict(inputs)
    state_factory = args.pop("_state")
    return v4kernels.compress_kv(state=state_factory(), **args)


def _compressor_workloads() -> None:
    for model in (FLASH, PRO):
        D = model.dim
        for kind, ratio, hd, quant in (("csa", CSA_RATIO, HEAD_DIM, "fp8"), ("csa-indexer", CSA_RATIO, INDEX_DIM, "fp4"),
                                       ("hca", HCA_RATIO, HEAD_DIM, "fp8")):
            for phase, B, S in (("decode", 4, 1), ("decode", 64, 1), ("prefill", 1, 4096)):
                name = f"{model.name}-{kind}-{phase}-b{B}-s{S}"
                coff = 2 if ratio == CSA_RATIO else 1

                def make(dev: torch.device, _n=name, _B=B, _S=S, _D=D, _r=ratio, _hd=hd, _q=quant, _c=coff) -> Inputs:
                    import v4kernels

                    g = _gen(_n)
                    return {
                        "x": _randn(g, (_B, _S, _D), torch.bfloat16, dev),
                        "wkv": _randn(g, (_c * _hd, _D), torch.bfloat16, dev, _D ** -0.5),
                        "wgate": _randn(g, (_c * _hd, _D), torch.bfloat16, dev, _D ** -0.5),
                        "ape": _randn(g, (_r, _c * _hd), torch.float32, dev, 0.1),
                        "norm_weight": _randn(g, (_hd,), torch.bfloat16, dev),
                        "freqs": v4kernels.v4_rope_frequencies(True, device=dev),
                        "ratio": _r, "quant": _q,
                        "_state": lambda: v4kernels.CompressorState.empty(_B, _r, _hd, device=dev),
                    }

                fl, nb = compressor_counts(B, S, D, ratio, hd)
                _w(name, "compress_kv", {"x": (B, S, D), "wkv": (coff * hd, D)}, torch.bfloat16, make, fl, nb,
                   "2·B·S·D·2·coff·hd + 4·B·S·coff·hd", "x + wkv + wgate + 2·state + entries",
                   _tags(model, phase, kind, ctx=S if phase == "prefill" else None), nb, call=_compress_call,
                   quick=(model is FLASH and B == 4 and kind != "hca"))


# --------------------------------------------------------------------------------------------
# mHC (SPEC §10), including the task-02 table of the Triton V4 challenge
# --------------------------------------------------------------------------------------------

HC = 4
NMIX = (2 + HC) * HC  # 24
SINKHORN_ITERS = 20


def sinkhorn_flops(rows: int) -> float:
    """Per row: ``4·24`` for the sigmoid/softmax prologue, ``4·hc²`` per Sinkhorn iteration."""
    return rows * (4 * NMIX + SINKHORN_ITERS * 4 * HC * HC)


def _mhc_workloads() -> None:
    src = "Triton V4 challenge, task 02"
    for ctx, pre, B in (("16k", 16384, 1), ("4k", 4096, 16), ("1k", 1024, 64)):
        for phase, S in (("decode", 1), ("prefill", pre)):
            name = f"challenge-{ctx}-{phase}-b{B}-s{S}"
            rows = B * S

            def make(dev: torch.device, _n=name, _B=B, _S=S) -> Inputs:
                g = _gen(_n)
                return {"mixes": _randn(g, (_B, _S, NMIX), torch.float32, dev), "hc_scale": _randn(g, (3,), torch.float32, dev, 0.5),
                        "hc_base": _randn(g, (NMIX,), torch.float32, dev, 0.5), "hc_mult": HC, "sinkhorn_iters": SINKHORN_ITERS}

            nb = rows * 4 * (NMIX + HC + HC + HC * HC)
            _w(name, "hc_split_sinkhorn", {"mixes": (B, S, NMIX)}, torch.float32, make, sinkhorn_flops(rows), nb,
               "rows·(4·24 + iters·4·hc²)", "mixes + pre + post + comb (fp32)", _tags(FLASH, phase, "challenge"), nb,
               quick=(phase == "decode" and B == 64), source=src)
    for model in (FLASH, PRO):
        D = model.dim
        for phase, B, S in (("decode", 1, 1), ("decode", 4, 1), ("decode", 64, 1), ("prefill", 1, 4096)):
            name = f"{model.name}-{phase}-b{B}-s{S}"
            T = B * S
            quick = model is FLASH and phase == "decode" and B == 64

            def make_pre(dev: torch.device, _n=name, _B=B, _S=S, _D=D) -> Inputs:
                g = _gen(_n)
                return {"x": _randn(g, (_B, _S, HC, _D), torch.bfloat16, dev),
                        "hc_fn": _randn(g, (NMIX, HC * _D), torch.float32, dev, (HC * _D) ** -0.5),
                        "hc_scale": _randn(g, (3,), torch.float32, dev, 0.5), "hc_base": _randn(g, (NMIX,), torch.float32, dev, 0.5)}

            fl = T * (2 * NMIX * HC * D + 2 * HC * D + 2 * HC * D) + sinkhorn_flops(T)
            nb = T * HC * D * 2 + NMIX * HC * D * 4 + T * D * 2 + T * 4 * (HC + HC * HC)
            _w(name, "hc_pre", {"x": (B, S, HC, D), "hc_fn": (NMIX, HC * D)}, torch.bfloat16, make_pre, fl, nb,
               "T·(2·24·hc·D + 4·hc·D) + sinkhorn", "x + hc_fn (fp32) + x_in + post + comb", _tags(model, phase), nb, quick=quick)

            def make_post(dev: torch.device, _n=name, _B=B, _S=S, _D=D) -> Inputs:
                g = _gen(_n + "post")
                comb = torch.rand(_B, _S, HC, HC, generator=g)
                return {"x": _randn(g, (_B, _S, _D), torch.bfloat16, dev), "residual": _randn(g, (_B, _S, HC, _D), torch.bfloat16, dev),
                        "post": (2 * torch.rand(_B, _S, HC, generator=g)).to(dev), "comb": (comb / comb.sum(-2, keepdim=True)).to(dev)}

            fl = T * (2 * HC * D + 2 * HC * HC * D)
            nb = T * D * 2 + 2 * T * HC * D * 2 + T * 4 * (HC + HC * HC)
            _w(name, "hc_post", {"x": (B, S, D), "residual": (B, S, HC, D)}, torch.bfloat16, make_post, fl, nb,
               "T·(2·hc·D + 2·hc²·D)", "x + residual + out (bf16) + post + comb", _tags(model, phase), nb, quick=quick)

            def make_head(dev: torch.device, _n=name, _B=B, _S=S, _D=D) -> Inputs:
                g = _gen(_n + "head")
                return {"x": _randn(g, (_B, _S, HC, _D), torch.bfloat16, dev),
                        "hc_fn": _randn(g, (HC, HC * _D), torch.float32, dev, (HC * _D) ** -0.5),
                        "hc_scale": _randn(g, (1,), torch.float32, dev, 0.5), "hc_base": _randn(g, (HC,), torch.float32, dev, 0.5)}

            fl = T * (2 * HC * HC * D + 4 * HC * D)
            nb = T * HC * D * 2 + HC * HC * D * 4 + T * D * 2
            _w(name, "hc_head", {"x": (B, S, HC, D), "hc_fn": (HC, HC * D)}, torch.bfloat16, make_head, fl, nb,
               "T·(2·hc·hc·D + 4·hc·D)", "x + hc_fn (fp32) + y", _tags(model, phase), nb, quick=quick)


# --------------------------------------------------------------------------------------------
# MoE (SPEC §11)
# --------------------------------------------------------------------------------------------

VOCAB = 129280


def moe_expert_counts(T: int, k: int, E: int, D: int, I: int, wfmt: str) -> tuple[float, float]:
    """FLOPs ``2·3·D·I`` per (token, expert) pair; bytes: x and out (bf16), ids/weights, and the
    weights (w1, w3, w2) of every expert that receives a token, at most ``min(E, T·k)``."""
    per_w = {"bf16": 2.0, "fp8": 1.0 + 4 / (128 * 128), "fp4": 0.5 + 4 / 32}[wfmt]
    fl = 2 * 3 * D * I * T * k
    nb = T * D * 2 * 2 + T * k * 8 + min(E, T * k) * 3 * D * I * per_w
    return fl, nb


def _moe_workloads() -> None:
    for model in (FLASH, PRO):
        D, E, k = model.dim, model.n_experts, model.topk_experts
        for phase, T in (("decode", 1), ("decode", 64), ("prefill", 4096)):
            name = f"{model.name}-{phase}-t{T}"

            def make_gate(dev: torch.device, _n=name, _T=T, _D=D, _E=E, _k=k, _s=model.route_scale) -> Inputs:
                g = _gen(_n)
                return {"x": _randn(g, (_T, _D), torch.bfloat16, dev), "weight": _randn(g, (_E, _D), torch.bfloat16, dev, _D ** -0.5),
                        "bias": _randn(g, (_E,), torch.float32, dev, 0.01), "topk": _k, "route_scale": _s}

            nb = T * D * 2 + E * D * 2 + E * 4 + T * k * 8
            _w(name, "moe_gate", {"x": (T, D), "weight": (E, D)}, torch.bfloat16, make_gate, 2 * T * E * D + 6 * T * E, nb,
               "2·T·E·D + 6·T·E (sqrtsoftplus, bias)", "x + weight + bias + weights/ids out", _tags(model, phase), nb,
               quick=(model is FLASH and T == 64))

            def make_hash(dev: torch.device, _n=name, _T=T, _D=D, _E=E, _k=k, _s=model.route_scale) -> Inputs:
                g = _gen(_n + "hash")
                return {"x": _randn(g, (_T, _D), torch.bfloat16, dev), "weight": _randn(g, (_E, _D), torch.bfloat16, dev, _D ** -0.5),
                        "topk": _k, "route_scale": _s, "tid2eid": _randint(g, 0, _E, (VOCAB, _k), dev), "token_ids": _randint(g, 0, VOCAB, (_T,), dev)}

            _w(name + "-hash", "moe_gate", {"x": (T, D), "weight": (E, D), "tid2eid": (VOCAB, k)}, torch.bfloat16, make_hash,
               2 * T * E * D + 6 * T * E, nb + T * k * 4, "2·T·E·D + 6·T·E", "x + weight + tid2eid rows + out",
               _tags(model, phase, "hash"), nb + VOCAB * k * 4)
        # experts: 8-way expert parallelism (E/8 local experts), real D and I, FP8 and FP4 weights
        El, I = E // 8, model.moe_inter
        for wfmt in ("fp8", "fp4"):
            for phase, T in (("decode", 64), ("prefill", 4096)):
                name = f"{model.name}-ep8-{wfmt}-{phase}-t{T}"
                _moe_experts(name, T, k, El, D, I, wfmt, _tags(model, phase, "ep8", wfmt))
    # a 512-token chunk on 16 local experts (Flash at 16-way expert parallelism), FP4 weights
    _moe_experts("flash-ep16-fp4-prefill-t512", 512, FLASH.topk_experts, FLASH.n_experts // 16, FLASH.dim, FLASH.moe_inter,
                 "fp4", _tags(FLASH, "prefill", "ep16", "fp4"))
    _moe_experts("tiny-bf16-t16", 16, 6, 8, 256, 128, "bf16", _tags(None, "decode", "tiny", "bf16"), quick=True)
    _moe_experts("tiny-fp4-t16", 16, 6, 8, 256, 128, "fp4", _tags(None, "decode", "tiny", "fp4"), quick=True)


def _moe_experts(name: str, T: int, k: int, E: int, D: int, I: int, wfmt: str, tags: frozenset[str], quick: bool = False) -> None:
    def make(dev: torch.device) -> Inputs:
        import v4kernels

        g = _gen(name)

        def weight(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            w = torch.randn(E, rows, cols, generator=g) * cols ** -0.5
            if wfmt == "bf16":
                return w.to(torch.bfloat16).to(dev), None
            q, s = v4kernels.quantize_expert_weights(w, wfmt)
            return q.to(dev), s.to(dev)

        w1, w1_s = weight(I, D)
        w3, w3_s = weight(I, D)
        w2, w2_s = weight(D, I)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
        wts = torch.rand(T, k, generator=g)
        return {"x": _randn(g, (T, D), torch.bfloat16, dev), "topk_weights": (wts / wts.sum(-1, keepdim=True)).to(dev),
                "topk_ids": ids.to(dev), "w1": w1, "w3": w3, "w2": w2, "w1_scale": w1_s, "w3_scale": w3_s, "w2_scale": w2_s}

    fl, nb = moe_expert_counts(T, k, E, D, I, wfmt)
    per_w = {"bf16": 2.0, "fp8": 1.0, "fp4": 0.5}[wfmt]
    _w(name, "moe_experts", {"x": (T, D), "w1": (E, I, D), "w2": (E, D, I)}, torch.bfloat16, make, fl, nb,
       "2·3·D·I·T·k", f"x + out + ids/weights + touched experts' w1,w3,w2 ({wfmt})", tags,
       E * 3 * D * I * per_w + 4 * T * D, quick=quick)


# --------------------------------------------------------------------------------------------
# formats and GEMMs (SPEC §4), rope and norm (SPEC §3, §5.1)
# --------------------------------------------------------------------------------------------


def _quant_workloads() -> None:
    for model in (FLASH, PRO):
        D = model.dim
        for phase, T in (("decode", 64), ("prefill", 4096)):
            quick = model is FLASH and phase == "decode"
            name = f"{model.name}-{phase}-t{T}"
            n = T * D
            _w(name, "act_quant", {"x": (T, D)}, torch.bfloat16,
               lambda dev, _n=name, _T=T, _D=D: {"x": _randn(_gen(_n), (_T, _D), torch.bfloat16, dev), "block_size": 128},
               3 * n, n * 2 + n + n // 128 * 4, "3·numel (amax, scale, cast)", "x (bf16) + q (e4m3) + scales (fp32)",
               _tags(model, phase), 4 * n, quick=quick)

            def make_deq(dev: torch.device, _n=name, _T=T, _D=D) -> Inputs:
                import v4kernels

                y, s = v4kernels.act_quant(_randn(_gen(_n), (_T, _D), torch.bfloat16, dev), 128)
                return {"y": y, "scales": s, "block_size": 128}

            _w(name, "act_dequant", {"y": (T, D)}, torch.float8_e4m3fn, make_deq, n, n + n // 128 * 4 + 2 * n,
               "numel (scale multiply)", "q + scales + x (bf16)", _tags(model, phase), 4 * n, quick=quick)
            # KV nope dims, QAT simulation with block 64 (SPEC §5.3)
            _w(f"{model.name}-kv-{phase}-t{T}", "act_quant_roundtrip", {"x": (T, NOPE_DIM)}, torch.bfloat16,
               lambda dev, _n=name, _T=T: {"x": _randn(_gen(_n + "kv"), (_T, NOPE_DIM), torch.bfloat16, dev), "block_size": 64},
               4 * T * NOPE_DIM, 4 * T * NOPE_DIM, "4·numel", "x in + out (bf16)", _tags(model, phase), 4 * T * NOPE_DIM,
               quick=quick)
            # indexer q/k: Hadamard then FP4 (SPEC §7.1)
            shape = (T, INDEX_HEADS, INDEX_DIM)
            m = math.prod(shape)
            _w(name, "hadamard_transform", {"x": shape}, torch.bfloat16,
               lambda dev, _n=name, _s=shape: {"x": _randn(_gen(_n + "h"), _s, torch.bfloat16, dev)},
               m * int(math.log2(INDEX_DIM)), 4 * m, "numel·log2(128) (fast transform)", "x + out (bf16)",
               _tags(model, phase), 4 * m, quick=quick)
            _w(name, "fp4_act_quant", {"x": shape}, torch.bfloat16,
               lambda dev, _n=name, _s=shape: {"x": _randn(_gen(_n + "f"), _s, torch.bfloat16, dev), "block_size": 32},
               3 * m, 2 * m + m // 2 + m // 32 * 4, "3·numel", "x (bf16) + packed + scales", _tags(model, phase), 4 * m, quick=quick)
            _w(name, "fp4_act_roundtrip", {"x": shape}, torch.bfloat16,
               lambda dev, _n=name, _s=shape: {"x": _randn(_gen(_n + "r"), _s, torch.bfloat16, dev), "block_size": 32},
               4 * m, 4 * m, "4·numel", "x + out (bf16)", _tags(model, phase), 4 * m, quick=quick)

            def make_fp4deq(dev: torch.device, _n=name, _s=shape) -> Inputs:
                import v4kernels

                p, s = v4kernels.fp4_act_quant(_randn(_gen(_n + "d"), _s, torch.bfloat16, dev), 32)
                return {"packed": p, "scales": s, "block_size": 32}

            _w(name, "fp4_act_dequant", {"packed": (T, INDEX_HEADS, INDEX_DIM // 2)}, torch.uint8, make_fp4deq, m,
               m // 2 + m // 32 * 4 + 2 * m, "numel", "packed + scales + out (bf16)", _tags(model, phase), 4 * m, quick=quick)
        # block-scaled GEMMs: q down-projection wq_a [q_lora, D] (FP8) and an expert w1 [I, D] (FP4)
        for op, N in (("fp8_gemm", model.q_lora), ("fp4_gemm", model.moe_inter)):
            for phase, M in (("decode", 64), ("prefill", 4096)):
                name = f"{model.name}-{phase}-m{M}-n{N}-k{D}"
                _gemm(name, op, M, N, D, _tags(model, phase), quick=False)
    _gemm("tiny-m64-n256-k512", "fp8_gemm", 64, 256, 512, _tags(None, "decode", "tiny"), quick=True)
    _gemm("tiny-m64-n256-k512", "fp4_gemm", 64, 256, 512, _tags(None, "decode", "tiny"), quick=True)


def _gemm(name: str, op: str, M: int, N: int, K: int, tags: frozenset[str], quick: bool) -> None:
    def make(dev: torch.device) -> Inputs:
        import v4kernels

        g = _gen(f"{op}/{name}")
        a, a_s = v4kernels.act_quant(torch.randn(M, K, generator=g), 128)
        w = torch.randn(N, K, generator=g) * K ** -0.5
        if op == "fp4_gemm":
            b, b_s = v4kernels.fp4_act_quant(w, 32)
        else:
            R, Cc = -(-N // 128), -(-K // 128)
            amax = torch.nn.functional.pad(w.abs(), (0, Cc * 128 - K, 0, R * 128 - N)).view(R, 128, Cc, 128).amax((1, 3))
            b_s = torch.exp2(torch.ceil(torch.log2(amax.clamp_min(1e-4) / 448)))
            b = (w / b_s.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]).clamp(-448, 448).to(torch.float8_e4m3fn)
        return {"a": a.to(dev), "a_s": a_s.to(dev), "b": b.to(dev), "b_s": b_s.to(dev)}

    wb = N * K * (1.0 if op == "fp8_gemm" else 0.5) + (N * K / 32 * 4 if op == "fp4_gemm" else 0)
    nb = M * K + M * (K // 128) * 4 + wb + M * N * 2
    _w(name, op, {"a": (M, K), "b": (N, K if op == "fp8_gemm" else K // 2)}, torch.float8_e4m3fn, make, 2 * M * N * K, nb,
       "2·M·N·K", "a + a_s + b + b_s + c (bf16)", tags, nb, quick=quick)


def _rope_norm_workloads() -> None:
    for model in (FLASH, PRO):
        H, D = model.n_heads, model.dim
        for phase, B, S in (("decode", 64, 1), ("prefill", 1, 4096)):
            name = f"{model.name}-{phase}-b{B}-s{S}-q"
            quick = model is FLASH and phase == "decode"

            def make_rope(dev: torch.device, _n=name, _B=B, _S=S, _H=H) -> Inputs:
                import v4kernels

                g = _gen(_n)
                pos = torch.randint(0, 1 << 20, (_B, _S), generator=g)
                return {"x": _randn(g, (_B, _S, _H, HEAD_DIM), torch.bfloat16, dev), "positions": pos.to(dev),
                        "freqs": v4kernels.v4_rope_frequencies(True, device=dev)}

            n = B * S * H * HEAD_DIM
            r = B * S * H * ROPE_DIM
            _w(name, "apply_rope", {"x": (B, S, H, HEAD_DIM)}, torch.bfloat16, make_rope, 3 * r, 4 * n + B * S * 8,
               "3·rope elements (6 per pair)", "x + out (bf16) + positions", _tags(model, phase, heads=H), 4 * n, quick=quick)

            def make_norm(dev: torch.device, _n=name, _B=B, _S=S, _H=H) -> Inputs:
                return {"x": _randn(_gen(_n + "n"), (_B, _S, _H, HEAD_DIM), torch.bfloat16, dev), "weight": None}

            _w(name, "rms_norm", {"x": (B, S, H, HEAD_DIM)}, torch.bfloat16, make_norm, 4 * n, 4 * n,
               "4·numel (square, sum, scale, ...)", "x + out (bf16)", _tags(model, phase, heads=H), 4 * n, quick=quick)
            name = f"{model.name}-{phase}-b{B}-s{S}-hidden"
            m = B * S * D
            _w(name, "rms_norm", {"x": (B * S, D), "weight": (D,)}, torch.bfloat16,
               lambda dev, _n=name, _T=B * S, _D=D: {"x": _randn(_gen(_n), (_T, _D), torch.bfloat16, dev),
                                                     "weight": _randn(_gen(_n + "w"), (_D,), torch.bfloat16, dev)},
               5 * m, 4 * m + 2 * D, "5·numel", "x + out + weight (bf16)", _tags(model, phase), 4 * m)


_attention_workloads()
_indexer_workloads()
_indices_workloads()
_compressor_workloads()
_mhc_workloads()
_moe_workloads()
_quant_workloads()
_rope_norm_workloads()
