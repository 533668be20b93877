"""One-shot check of the Triton backend on a GPU: parity against the reference at real
DeepSeek-V4 dimensions, then timings with achieved TFLOP/s and GB/s. Finishes in a few minutes.

    python bench/gpu_check.py                  # CUDA (or NPU with Triton-Ascend), V4-Flash dims
    python bench/gpu_check.py --only sparse_attn_decode,indexer_topk
    TRITON_INTERPRET=1 python bench/gpu_check.py --tiny   # CPU interpreter, tiny shapes, parity only

Prints one line per workload: PASS/FAIL, the parity metric, median time, TFLOP/s, GB/s; exits 1
if any parity check fails. Bytes count the compulsory traffic (inputs read once, outputs
written once); FLOPs count multiply-adds as two.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import v4kernels as v4k  # noqa: E402
import v4kernels._registry as R  # noqa: E402
from v4kernels.testing import compare_outputs, compare_topk  # noqa: E402


def _rand(shape, dev, dtype=torch.bfloat16, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(dev)


def workloads(dev: torch.device, tiny: bool) -> dict[str, Callable[[], tuple[Callable[[], Any], float, float, str]]]:
    """name -> builder returning (call, flops, bytes, compare kind)."""
    f = (lambda full, small: small if tiny else full)

    def act_quant():
        x = _rand((f(8192, 4), 7168), dev)
        return (lambda: v4k.act_quant(x, 128)), 0.0, x.numel() * 3 + x.numel() / 32, "exact"

    def fp8_gemm():
        m, n, k = f(2048, 3), f(4096, 130), f(7168, 256)
        a, a_s = v4k.act_quant(_rand((m, k), dev), 128)
        b = _rand((n, k), dev, scale=30).to(torch.float8_e4m3fn)
        b_s = torch.rand((n + 127) // 128, k // 128, device=dev) + 0.5
        return (lambda: v4k.fp8_gemm(a, a_s, b, b_s)), 2.0 * m * n * k, m * k + n * k + 2 * m * n, "close"

    def fp4_gemm():
        m, n, k = f(2048, 3), f(4096, 64), f(4096, 128)
        a, a_s = v4k.act_quant(_rand((m, k), dev), 128)
        b, b_s = v4k.fp4_act_quant(_rand((n, k), dev), 32)
        return (lambda: v4k.fp4_gemm(a, a_s, b, b_s)), 2.0 * m * n * k, m * k + n * k / 2 + 2 * m * n, "close"

    def rope_rms():
        x = _rand((f(4096, 2), 1, 64, 512), dev)
        pos = torch.arange(x.shape[0], device=dev).reshape(-1, 1)
        fr = v4k.v4_rope_frequencies(True, device=dev)
        return (lambda: v4k.rms_norm(v4k.apply_rope(x, pos, fr), None)), 0.0, 8.0 * x.numel(), "close"

    def _attn(b, m, h, n, k, packed):
        q = _rand((b, m, h, 512), dev, seed=1)
        kv = _rand((b, n, 512), dev, seed=2)
        g = torch.Generator().manual_seed(3)
        idx = torch.randint(0, n, (b, m, k), generator=g, dtype=torch.int32).to(dev)
        sink = torch.randn(h, generator=g).to(dev)
        kvx = v4k.pack_kv_fp8(kv) if packed else kv
        row = 584 if packed else 1024
        return ((lambda: v4k.sparse_attn(q, kvx, sink, idx)), 4.0 * b * m * h * k * 512,
                b * m * (k * row + 2 * h * 512 * 2 + 4 * k), "close")

    def sparse_attn_decode():
        return _attn(f(32, 2), 1, f(64, 8), f(8192, 300), f(640, 200), False)

    def sparse_attn_decode_fp8kv():
        return _attn(f(32, 2), 1, f(64, 8), f(8192, 300), f(640, 200), True)

    def sparse_attn_prefill():
        return _attn(1, f(1024, 6), f(64, 4), f(4096, 100), f(640, 70), False)

    def indexer_topk():
        b, n, topk = f(8, 2), f(65536, 256), f(512, 40)
        q = _rand((b, 1, 64, 128), dev, seed=4)
        w = _rand((b, 1, 64), dev, dtype=torch.float32, seed=5)
        keys, ks = v4k.fp4_act_quant(_rand((b, n, 128), dev, seed=6), 32)
        pos = torch.full((b, 1), 4 * n - 1, dtype=torch.int64, device=dev)
        return ((lambda: v4k.indexer_topk(q, w, keys, pos, topk, offset=128, key_scales=ks)),
                2.0 * b * 64 * 128 * n, b * n * (64 + 16), "topk")

    def hc_pre():
        t, d = f(4096, 3), f(4096, 64)
        x = _rand((t, 4, d), dev, seed=7)
        fn = _rand((24, 4 * d), dev, dtype=torch.float32, scale=0.02, seed=8)
        sc, base = torch.rand(3, device=dev), _rand((24,), dev, dtype=torch.float32, seed=9)
        return (lambda: v4k.hc_pre(x, fn, sc, base)), 2.0 * t * 24 * 4 * d, 2 * x.numel() + t * d * 2 + fn.numel() * 4, "close"

    def hc_post():
        t, d = f(4096, 3), f(4096, 64)
        x = _rand((t, d), dev, seed=10)
        res = _rand((t, 4, d), dev, seed=11)
        post = torch.rand(t, 4, device=dev) * 2
        comb = torch.softmax(_rand((t, 4, 4), dev, dtype=torch.float32, seed=12), -1)
        return (lambda: v4k.hc_post(x, res, post, comb)), 2.0 * t * 4 * 5 * d, 2 * (x.numel() + 2 * res.numel()), "close"

    def moe_gate():
        t, e, d = f(4096, 5), f(256, 20), f(4096, 64)
        x = _rand((t, d), dev, seed=13)
        w = _rand((e, d), dev, seed=14)
        bias = _rand((e,), dev, dtype=torch.float32, seed=15)
        return (lambda: v4k.moe_gate(x, w, bias=bias, topk=6, route_scale=1.5)), 2.0 * t * e * d, 2 * (t * d + e * d), "gate"

    def moe_experts_fp4():
        from v4kernels.ops.moe.reference import quantize_fp4_rows

        t, d, i, e, k = f(512, 4), f(4096, 128), f(2048, 128), f(32, 6), 6
        x = _rand((t, d), dev, seed=16)
        g = torch.Generator().manual_seed(17)
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(torch.int32).to(dev)
        wts = torch.rand(t, k, generator=g).to(dev)
        ws = [quantize_fp4_rows(_rand(s, dev, dtype=torch.float32, scale=0.02, seed=18 + j)) for j, s in enumerate([(e, i, d), (e, i, d), (e, d, i)])]
        (w1, s1), (w3, s3), (w2, s2) = ws
        return (lambda: v4k.moe_experts(x, wts, ids, w1, w3, w2, w1_scale=s1, w3_scale=s3, w2_scale=s2)), 2.0 * t * k * 3 * d * i, 3 * e * i * d / 2 + 4 * t * d, "close"

    def _compress(ratio, hd, quant):
        from v4kernels.testing.cases.compressor import make_compressor_inputs

        b, s, d = 1, f(4096, 130 if ratio == 128 else 37), f(4096, 64)
        inp = make_compressor_inputs(torch.Generator().manual_seed(20), dev, batch=b, tokens=s, dim=d, head_dim=hd, ratio=ratio)
        x = inp.pop("x")

        def call():  # prefill from a fresh state; returns entries, counts and the new state
            st = v4k.CompressorState.empty(b, ratio, hd, device=dev)
            e, n = v4k.compress_kv(x, **inp, state=st, ratio=ratio, quant=quant)
            return (e, n, *st.tensors())

        w = inp["wkv"].shape[0]
        return (call, 2.0 * b * s * d * 2 * w, x.numel() * 2 + 2 * w * d * 2 + b * (s // ratio) * hd * 2 + 16 * b * ratio * w,
                f"compress:{quant}")

    def compress_kv_csa():
        return _compress(4, 512, "fp8")

    def compress_kv_hca():
        return _compress(128, 512, "fp8")

    def compress_kv_indexer():
        return _compress(4, 128, "fp4")

    def _indices(op, device_fn, public_fn, numel):
        # the public op computes on the host (Python-int start positions); on an accelerator the
        # Triton kernel builds the same lists from a device tensor of start positions
        def call():
            if dev.type != "cpu" and R.forced_backend(op) == "triton":
                return device_fn()
            return public_fn().to(dev)

        return call, 0.0, 4.0 * numel, "equal"

    def window_indices():
        from v4kernels.ops.indices.triton import window_indices_on

        sp, s, w = [4096 * j + 7 for j in range(f(16, 2))], f(1024, 9), 128
        spt = torch.tensor(sp, dtype=torch.int64, device=dev)
        return _indices("window_indices", lambda: window_indices_on(spt, s, w, "chunk", w),
                        lambda: v4k.window_indices(sp, s, w, "chunk"), len(sp) * s * w)

    def compressed_indices():
        from v4kernels.ops.indices.triton import compressed_indices_on

        sp, s, r = [4096 * j + 7 for j in range(f(16, 2))], f(1024, 9), 128
        width = max(p + s for p in sp) // r
        spt = torch.tensor(sp, dtype=torch.int64, device=dev)
        return _indices("compressed_indices", lambda: compressed_indices_on(spt, s, r, 128 + s, width),
                        lambda: v4k.compressed_indices(sp, s, r, 128 + s, "chunk"), len(sp) * s * width)

    return {fn.__name__: fn for fn in (act_quant, fp8_gemm, fp4_gemm, rope_rms, sparse_attn_decode, sparse_attn_decode_fp8kv,
                                        sparse_attn_prefill, indexer_topk, hc_pre, hc_post, moe_gate, moe_experts_fp4,
                                        compress_kv_csa, compress_kv_hca, compress_kv_indexer, window_indices,
                                        compressed_indices)}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elif dev.type == "npu":
        torch.npu.synchronize()  # type: ignore[attr-defined]


def _time(call: Callable[[], Any], dev: torch.device, reps: int) -> float:
    call()
    _sync(dev)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def _parity(kind: str, a: Any, e: Any) -> tuple[bool, str]:
    tol = R.get_backend("triton").tolerances
    if kind == "topk":
        r = compare_topk(a, e)
        return r.ok, r.message or f"recall={r.cosine:.4f}"
    if kind.startswith("compress:"):
        from v4kernels.testing.cases.compressor import compare_plan_outputs

        r = compare_plan_outputs(a, e, kind.split(":")[1], 64, tol)
        return r.ok, r.message[:200] if r.message else f"entries max_abs={r.max_abs:.3g} cos={r.cosine:.6f}"
    if kind == "equal":
        ok = a.dtype == e.dtype and torch.equal(a.cpu(), e.cpu())
        return ok, f"exact, {a.numel()} entries" if ok else "lists differ"
    if kind == "gate":
        ok = torch.equal(a[1].cpu(), e[1].cpu())
        r = compare_outputs(a[0], e[0], tol)
        return ok and r.ok, ("ids equal, " if ok else "ids differ, ") + (r.message or f"max_abs={r.max_abs:.3g}")
    r = compare_outputs(a, e, tol)
    return r.ok, r.message[:200] if r.message else f"max_abs={r.max_abs:.3g} cos={r.cosine:.6f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU interpreter (parity only)")
    ap.add_argument("--only", default="", help="comma-separated workload names")
    ap.add_argument("--device", default=None, help="cuda (default when available), npu or cpu")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    if args.device:
        dev = torch.device(args.device)
    elif args.tiny or not torch.cuda.is_available():
        dev = torch.device("cpu")
    else:
        dev = torch.device("cuda")
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("running on CPU needs TRITON_INTERPRET=1 (the Triton interpreter)")
        return 2
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    print(f"# v4kernels triton check on {name} (torch {torch.__version__}){' [tiny]' if args.tiny else ''}")
    wl = workloads(dev, args.tiny)
    only = [s for s in args.only.split(",") if s]
    bad = [s for s in only if s not in wl]
    if bad:
        print(f"unknown workloads {bad}; choose from {sorted(wl)}")
        return 2
    fails = 0
    t_start = time.perf_counter()
    print(f"{'workload':28s} {'parity':6s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>8s}  detail")
    for wname, build in wl.items():
        if only and wname not in only:
            continue
        call, flops, nbytes, kind = build()
        with v4k.use_backend("triton"):
            got = call()
        with v4k.use_backend("reference"):
            exp = call()
        ok, detail = _parity(kind, got, exp)
        fails += not ok
        ms = tf = gb = float("nan")
        if dev.type != "cpu":
            with v4k.use_backend("triton"):
                s = _time(call, dev, args.reps)
            ms, tf, gb = s * 1e3, flops / s / 1e12, nbytes / s / 1e9
        print(f"{wname:28s} {'PASS' if ok else 'FAIL':6s} {ms:9.3f} {tf:8.2f} {gb:8.1f}  {detail}", flush=True)
    print(f"# {fails} failure(s); {time.perf_counter() - t_start:.1f} s")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
