"""Targets of the native CPU backend (issue 4, point 5), measured in one run on this machine.

Prints this machine's fp32 GEMM rate (torch.matmul) and stream bandwidth, then for each target
the median time, the achieved GFLOP/s, the fraction of the measured GEMM rate and (where the
target is a speed-up) the ratio to the reference backend.

    python bench/cpu_targets.py            # all targets except the 64K-token CSA layer
    python bench/cpu_targets.py --csa64k   # also the 64K-token CSA-layer prefill (peak RSS; minutes)
    python bench/cpu_targets.py --quick    # smaller repetitions
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from typing import Any, Callable

import torch

import v4kernels as v4k
import v4kernels._registry as R
from v4kernels.bench.peak import gemm_gflops, stream_gbs
from v4kernels.bench.timer import time_fn

H_FLASH, D, WINDOW, TOPK = 64, 512, 128, 512


def _median(fn: Callable[[], Any], backend: str, min_time: float) -> float:
    with v4k.use_backend(backend):
        return time_fn(fn, "cpu", warmup=1, min_time=min_time, min_reps=3).p50


#: (target, measured, pass) rows of the summary table printed at the end
SUMMARY: list[tuple[str, str, bool]] = []


def _target(name: str, measured: float, goal: float, unit: str) -> None:
    """Record a target of issue 4 point 5 (measured >= goal passes)."""
    fmt = f"{measured:.1%}" if unit == "%" else f"x{measured:.1f}"
    want = f">= {goal:.0%} of GEMM" if unit == "%" else f">= x{goal:g}"
    SUMMARY.append((f"{name} ({want})", fmt, measured >= goal))


def _once(fn: Callable[[], Any], backend: str) -> float:
    """One timed call (for reference runs of tens of seconds; a warm-up call is not affordable)."""
    with v4k.use_backend(backend):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def _row(name: str, t: float, flops: float | None, gemm: float, ref_t: float | None, target: str) -> None:
    gf = flops / t / 1e9 if flops else None
    cols = [f"{name:<46}", f"{t * 1e3:10.3f} ms"]
    cols.append(f"{gf:8.1f} GFLOP/s  {gf / gemm:6.1%} of GEMM" if gf else " " * 33)
    cols.append(f"  x{ref_t / t:6.1f} vs reference" if ref_t else " " * 22)
    cols.append(f"  target: {target}")
    print("".join(cols), flush=True)


def sparse_attn_inputs(g: torch.Generator, b: int, m: int, n: int, k: int) -> tuple[torch.Tensor, ...]:
    q = torch.randn(b, m, H_FLASH, D, generator=g).bfloat16()
    kv = torch.randn(b, n, D, generator=g).bfloat16()
    sink = torch.randn(H_FLASH, generator=g)
    idx = torch.randint(0, n, (b, m, k), generator=g, dtype=torch.int32)
    return q, kv, sink, idx


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--csa64k", action="store_true", help="run the 64K-token CSA-layer prefill (slow)")
    args = ap.parse_args(argv)
    mt = 0.2 if args.quick else 0.6
    reasons = R.get_backend("cpu").backend_reasons("cpu")
    if reasons:
        print("cpu backend unavailable:", "; ".join(reasons))
        return 1
    g = torch.Generator().manual_seed(0)
    gemm = gemm_gflops("cpu", 2048, budget=1.0)
    bw = stream_gbs("cpu", 1 << 25, budget=1.0)
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cpus "
          f"(a load above the cpu count means other processes shared these cores during the run)")
    print(f"machine: {torch.get_num_threads()} threads, fp32 GEMM {gemm:.1f} GFLOP/s, stream copy {bw['copy']:.1f} GB/s, "
          f"triad {bw['triad']:.1f} GB/s")

    # sparse_attn decode, V4-Flash: 64 heads, 128 window + 512 top-k, d = 512 (SPEC §9.2)
    k = WINDOW + TOPK
    for b in (1, 4, 16):
        q, kv, sink, idx = sparse_attn_inputs(g, b, 1, 8192, k)
        fn = lambda: v4k.sparse_attn(q, kv, sink, idx)  # noqa: E731
        t = _median(fn, "cpu", mt)
        tr = _median(fn, "reference", mt)
        _row(f"sparse_attn decode flash b{b} k{k}", t, 4 * b * H_FLASH * k * D, gemm, tr, ">= 70% of GEMM")
        _target(f"sparse_attn decode b{b}", 4 * b * H_FLASH * k * D / t / 1e9 / gemm, 0.70, "%")
        packed = v4k.pack_kv_fp8(kv)
        fn8 = lambda: v4k.sparse_attn(q, packed, sink, idx)  # noqa: E731
        _row(f"sparse_attn decode flash b{b} k{k} fp8-kv", _median(fn8, "cpu", mt), 4 * b * H_FLASH * k * D, gemm, None,
             "(info)")

    # sparse_attn prefill: 4K queries x 640 indices
    q, kv, sink, idx = sparse_attn_inputs(g, 1, 4096, 4096 + 1024, k)
    fn = lambda: v4k.sparse_attn(q, kv, sink, idx)  # noqa: E731
    t = _median(fn, "cpu", 0.0)
    _row(f"sparse_attn prefill m4096 k{k}", t, 4 * 4096 * H_FLASH * k * D, gemm, None, ">= 60% of GEMM")
    _target("sparse_attn prefill m4096", 4 * 4096 * H_FLASH * k * D / t / 1e9 / gemm, 0.60, "%")

    # indexer decode at 1M tokens: 262,144 compressed keys, 64 heads x 128, top-512 (SPEC §7.2)
    n = 262144
    qi = torch.randn(1, 1, 64, 128, generator=g).bfloat16()
    w = torch.randn(1, 1, 64, generator=g)
    pos = torch.tensor([[4 * n - 1]])
    kf = torch.randn(1, n, 128, generator=g)
    fmts: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {
        "bf16": (kf.bfloat16(), None),
        "fp8": v4k.act_quant(kf, 128),
        "fp4": v4k.fp4_act_quant(kf, 32),
    }
    del kf
    times: dict[str, float] = {}
    for fmt, (keys, ks) in fmts.items():
        fn = lambda: v4k.indexer_topk(qi, w, keys, pos, TOPK, ratio=4, offset=WINDOW, key_scales=ks)  # noqa: E731
        t = _median(fn, "cpu", mt)
        tr = _median(fn, "reference", 0.0) if fmt == "bf16" else None
        tgt = ">= 60% of GEMM" if fmt == "bf16" else "no slower than bf16" if fmt == "fp4" else "(info)"
        _row(f"indexer_topk decode n{n} {fmt}", t, 2 * 64 * 128 * n, gemm, tr, tgt)
        times[fmt] = t
        if fmt == "bf16":
            _target("indexer_topk decode 1M bf16", 2 * 64 * 128 * n / t / 1e9 / gemm, 0.60, "%")
        elif fmt == "fp4":
            _target("indexer_topk decode 1M fp4 vs bf16 (speed ratio)", times["bf16"] / t, 1.0, "x")

    # hc_pre + hc_post at decode shapes (V4-Flash D = 4096, 4 streams), 1 and 4 tokens
    hc, dm = 4, 4096
    fnw = torch.randn(24, hc * dm, generator=g) * 0.01
    scale = torch.rand(3, generator=g)
    base = torch.randn(24, generator=g) * 0.1
    for nt in (1, 4):
        x = torch.randn(nt, hc, dm, generator=g).bfloat16()
        a = torch.randn(nt, dm, generator=g).bfloat16()

        def hc_step() -> torch.Tensor:
            x_in, post, comb = v4k.hc_pre(x, fnw, scale, base)  # noqa: B023
            return v4k.hc_post(a, x, post, comb)  # noqa: B023

        t, tr = _median(hc_step, "cpu", mt), _median(hc_step, "reference", mt)
        _row(f"hc_pre+hc_post decode flash t{nt}", t, None, gemm, tr, ">= 10x reference")
        _target(f"hc_pre+hc_post decode T={nt}", tr / t, 10, "x")
    fnh = torch.randn(hc, hc * dm, generator=g) * 0.01
    head = lambda: v4k.hc_head(x, fnh, scale[:1], base[:hc])  # noqa: E731
    _row("hc_head decode flash t4", _median(head, "cpu", mt), None, gemm, _median(head, "reference", mt), "(info)")

    compressor_prefill(g, gemm)
    moe_512(g, gemm)

    if args.csa64k:
        csa_layer_64k(g, gemm)
    print("\ntargets of issue 4 point 5 (one run; reference times of the slow ops are single calls):")
    print(f"{'target':<58} {'measured':>10}  result")
    for name, meas, ok in SUMMARY:
        print(f"{name:<58} {meas:>10}  {'pass' if ok else 'MISS'}")
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


def compressor_prefill(g: torch.Generator, gemm: float) -> None:
    """compress_kv prefill at V4-Flash dimensions (D 4096, hd 512, S 2048), CSA and HCA (SPEC §6)."""
    dm, hd, s = 4096, 512, 2048
    for ratio, name in ((4, "csa"), (128, "hca")):
        coff = 2 if ratio == 4 else 1
        x = torch.randn(1, s, dm, generator=g).bfloat16()
        wkv = (torch.randn(coff * hd, dm, generator=g) * dm**-0.5).bfloat16()
        wgate = (torch.randn(coff * hd, dm, generator=g) * dm**-0.5).bfloat16()
        ape = torch.randn(ratio, coff * hd, generator=g) * 0.1
        nw, freqs = torch.ones(hd).bfloat16(), 10000.0 ** (-torch.arange(32, dtype=torch.float32) / 32)
        fn = lambda: v4k.compress_kv(x, wkv, wgate, ape, nw, freqs, v4k.CompressorState.empty(1, ratio, hd), ratio=ratio)  # noqa: E731,B023
        t, tr = _median(fn, "cpu", 0.0), _once(fn, "reference")
        _row(f"compress_kv prefill flash {name} s{s}", t, 2 * s * dm * 2 * coff * hd, gemm, tr, ">= 10x reference")
        _target(f"compress_kv prefill {name} S=2048", tr / t, 10, "x")


def moe_512(g: torch.Generator, gemm: float) -> None:
    """moe_experts at 512 tokens, V4-Flash D 4096 / I 2048, 16 experts, top-6, FP4 weights (SPEC §11.3)."""
    from v4kernels.ops.moe.reference import quantize_fp4_rows

    t_, e, i, dm, k = 512, 16, 2048, 4096, 6
    x = torch.randn(t_, dm, generator=g).bfloat16()
    (w1, s1), (w3, s3), (w2, s2) = (quantize_fp4_rows(torch.randn(e, r, c, generator=g) * 0.02)
                                    for r, c in ((i, dm), (i, dm), (dm, i)))
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t_)]).int()
    wts = torch.rand(t_, k, generator=g)
    fn = lambda: v4k.moe_experts(x, wts, ids, w1, w3, w2, w1_scale=s1, w3_scale=s3, w2_scale=s2)  # noqa: E731
    t, tr = _median(fn, "cpu", 0.0), _once(fn, "reference")
    _row(f"moe_experts t{t_} e{e} k{k} fp4", t, 3 * 2 * t_ * k * dm * i, gemm, tr, ">= 3x reference")
    _target("moe_experts 512 tokens fp4", tr / t, 3, "x")


def csa_layer_64k(g: torch.Generator, gemm: float) -> None:
    """Attention path of one V4-Flash CSA layer over a 64K-token prefill: indexer top-k over the
    16K compressed indexer keys (FP4) and sparse attention of every query over 128 window + 512
    selected entries (KV: 64K window rows + 16K compressed rows). Reports the peak RSS."""
    s, n_c = 65536, 65536 // 4
    t0 = time.perf_counter()
    qi = torch.randn(1, s, 64, 128, generator=g).bfloat16()
    w = torch.randn(1, s, 64, generator=g)
    keys, ks = v4k.fp4_act_quant(torch.randn(1, n_c, 128, generator=g), 32)
    pos = torch.arange(s)[None]
    with v4k.use_backend("cpu"):
        comp = v4k.indexer_topk(qi, w, keys, pos, TOPK, ratio=4, offset=s, key_scales=ks)
        del qi, w
    # the window part of the index list is plain index arithmetic (no cpu kernel; reference)
    win = v4k.window_indices([0], s, WINDOW, mode="prefill")
    idx = torch.cat((win, comp), -1)
    del win, comp
    q = torch.randn(1, s, H_FLASH, D, generator=g).bfloat16()
    kv = v4k.pack_kv_fp8(torch.randn(1, s + n_c, D, generator=g).bfloat16())
    with v4k.use_backend("cpu"):
        out = v4k.sparse_attn(q, kv, torch.zeros(H_FLASH), idx)
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{'csa layer prefill 64K (indexer + sparse_attn)':<46} {dt:10.1f} s  peak RSS {rss:.2f} GiB  "
          f"out {tuple(out.shape)}  target: within 24 GiB")
    SUMMARY.append(("csa layer prefill 64K peak RSS (<= 24 GiB)", f"{rss:.2f} GiB", rss <= 24.0))


if __name__ == "__main__":
    sys.exit(main())
