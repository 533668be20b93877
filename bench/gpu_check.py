"""One-shot GPU check of the ``cuda`` and ``triton`` backends: parity against the reference at
DeepSeek-V4-Flash and V4-Pro dimensions (tensor-parallel head counts 8, 16, 32 included), then
time, TFLOP/s, GB/s and the fraction of the GPU's roofline per workload, and the Triton-over-cuda
time ratio. Installs nothing; runs from a fresh clone in a few minutes on one GPU.

    python bench/gpu_check.py                       # all selected workloads, cuda + triton
    python bench/gpu_check.py --only 'sparse_attn/*decode*' --backends cuda
    python bench/gpu_check.py --list                # the workloads it would run
    TRITON_INTERPRET=1 python bench/gpu_check.py --tiny   # CPU smoke test: tiny workloads, Triton interpreter

Workloads, FLOP/byte formulas, the timer and the roofline come from the benchmark registry
(``v4kernels.bench``: workloads.py, timer.py, peak.py); parity uses each backend's declared
tolerances (index-set recall for top-k). The shared parity suite (``python -m v4kernels parity``)
runs first on a GPU (``--no-suite`` skips it). Exit status 1 on any parity failure or kernel error.

Targets this check reports against (for whoever runs it): sparse decode >= 70 % of HBM bandwidth
at TP head counts, sparse prefill >= 40 % of bf16 peak at V4-Pro, indexer at 1M tokens with top-k
< 1 ms.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

#: registry workloads the full check runs: every op, decode and prefill, Flash and Pro, TP heads
GPU_WORKLOADS = [
    # sparse attention: TP head counts 8/16/32/64/128, bf16 and FP8 KV, FlashMLA's V4 test shapes
    "sparse_attn/flash-decode-csa-h8-ctx128k", "sparse_attn/flash-decode-csa-h16-ctx128k",
    "sparse_attn/flash-decode-csa-h32-ctx128k", "sparse_attn/flash-decode-csa-h64-ctx128k",
    "sparse_attn/pro-decode-csa-h8-ctx128k", "sparse_attn/pro-decode-csa-h32-ctx128k",
    "sparse_attn/pro-decode-csa-h128-ctx128k", "sparse_attn/pro-decode-hca-h16-ctx128k",
    "sparse_attn/flash-decode-csa-fp8kv-b32-h64-ctx64k", "sparse_attn/pro-decode-csa-fp8kv-b32-h128-ctx64k",
    "sparse_attn/flashmla-decode-h64-b64-sk16k", "sparse_attn/flashmla-decode-h128-b64-sk16k",
    "sparse_attn/flash-prefill-csa-s4096-h16", "sparse_attn/flash-prefill-csa-s4096-h64",
    "sparse_attn/pro-prefill-csa-s4096-h16", "sparse_attn/pro-prefill-csa-s4096-h128",
    "sparse_attn/flashmla-prefill-h128-k1024-skv32k",
    "pack_kv_fp8/flash-prefill-b1-s4096", "unpack_kv_fp8/flash-prefill-b1-s4096",
    "grouped_linear/flash-decode-b64-s1", "grouped_linear/pro-prefill-b1-s4096",
    # indexer: 1M-token decode with top-k, batched decode, prefill; FP8 / FP4 / bf16 keys
    "indexer_topk/flash-decode-b1-ctx1m-fp8", "indexer_topk/pro-decode-b1-ctx1m-fp4",
    "indexer_topk/flash-decode-b32-ctx64k-fp8", "indexer_topk/flash-decode-b1-ctx128k-bf16",
    "indexer_topk/pro-prefill-s4096-bf16", "indexer_scores/decode-b1-ctx128k-bf16", "indexer_scores/prefill-s4096-bf16",
    "window_indices/decode-b64-ctx64k", "compressed_indices/decode-b1-ctx1m",
    # compressor: CSA (fp8), indexer (fp4), HCA; decode and prefill
    "compress_kv/flash-csa-decode-b64-s1", "compress_kv/flash-csa-prefill-b1-s4096",
    "compress_kv/flash-csa-indexer-prefill-b1-s4096", "compress_kv/pro-hca-prefill-b1-s4096",
    "compress_kv/pro-csa-indexer-decode-b64-s1",
    # mHC
    "hc_pre/flash-decode-b1-s1", "hc_pre/pro-decode-b64-s1", "hc_pre/flash-prefill-b1-s4096",
    "hc_post/flash-decode-b64-s1", "hc_post/pro-decode-b1-s1", "hc_post/pro-prefill-b1-s4096",
    "hc_head/pro-decode-b64-s1", "hc_split_sinkhorn/challenge-4k-decode-b16-s1",
    # MoE and GEMMs
    "moe_gate/flash-decode-t64", "moe_gate/pro-prefill-t4096-hash",
    "moe_experts/flash-ep8-fp8-decode-t64", "moe_experts/pro-ep8-fp8-prefill-t4096",
    "moe_experts/flash-ep8-fp4-decode-t64",
    "fp8_gemm/flash-decode-m64-n1024-k4096", "fp8_gemm/pro-prefill-m4096-n1536-k7168",
    "fp4_gemm/pro-decode-m64-n3072-k7168",
    # quantisation, RoPE, norms
    "act_quant/pro-prefill-t4096", "act_quant_roundtrip/flash-kv-decode-t64", "hadamard_transform/flash-prefill-t4096",
    "fp4_act_quant/pro-decode-t64", "fp4_act_roundtrip/flash-prefill-t4096", "act_dequant/flash-decode-t64",
    "fp4_act_dequant/pro-decode-t64", "apply_rope/pro-prefill-b1-s4096-q", "rms_norm/flash-prefill-b1-s4096-hidden",
]

#: the CPU smoke test (--tiny): tiny registry workloads, Triton through the interpreter
TINY_WORKLOADS = [
    "sparse_attn/tiny-decode-b4-h8-k256", "sparse_attn/tiny-decode-fp8kv-b4-h8-k256", "indexer_topk/tiny-decode-b2-n2048-fp8",
    "indexer_scores/tiny-decode-b2-n2048-fp4", "fp8_gemm/tiny-m64-n256-k512",
    "moe_experts/tiny-bf16-t16", "grouped_linear/tiny-b4-g2", "compress_kv/flash-csa-decode-b4-s1",
    "hc_split_sinkhorn/challenge-1k-decode-b64-s1",
]


def _fmt(v: float, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny workloads on the Triton interpreter")
    ap.add_argument("--only", action="append", default=[],
                    help="workload names or globs, comma-separated or repeated (under --tiny: tiny/quick ones only)")
    ap.add_argument("--backends", default="cuda,triton", help="comma-separated backends (default: cuda,triton)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--min-time", type=float, default=0.1, help="seconds of timed calls per workload and backend")
    ap.add_argument("--suite", action=argparse.BooleanOptionalAction, default=None,
                    help="run the shared parity suite first (default: on a GPU yes, with --tiny no)")
    ap.add_argument("--list", action="store_true", help="list the selected workloads and exit")
    ap.add_argument("--record", default=None, metavar="FILE",
                    help="write {op: GPU} for every op whose cuda rows all passed (read via V4K_CUDA_VERIFIED=FILE)")
    args = ap.parse_args(argv)

    import v4kernels as v4k
    from v4kernels.bench import timer  # noqa: F401  (the registry's timer, used by run_bench)
    from v4kernels.bench.peak import measure_peak
    from v4kernels.bench.runner import BenchConfig, run_bench
    from v4kernels.bench.workloads import get_workload, select

    dev = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    names = TINY_WORKLOADS if args.tiny else GPU_WORKLOADS
    wls = [get_workload(n) for n in names]
    only = [p for o in args.only for p in o.split(",") if p]
    if only:
        wls = [w for w in select(patterns=only) if not args.tiny or "tiny" in w.tags or w.quick]
    if args.list:
        for w in wls:
            print(f"{w.name:55s} {w.flops:12.4g} FLOP {w.bytes:12.4g} B")
        return 0
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("on the CPU this check needs TRITON_INTERPRET=1 (Triton interpreter); on a GPU run it without --tiny")
        return 2
    backends = [b for b in args.backends.split(",") if b]
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)"
    print(f"# v4kernels {v4k.__version__} gpu_check on {gpu}; torch {torch.__version__}; backends {backends}")
    if dev.type == "cuda":
        from v4kernels.backends import cuda as CB

        cc = torch.cuda.get_device_capability(dev)
        print(f"# sm_{cc[0]}{cc[1]}; " + "; ".join(CB.vendor(n).detail for n in CB.VENDOR_MODULES))
    t0 = time.perf_counter()
    failures = 0

    if args.suite if args.suite is not None else not args.tiny:
        from v4kernels.testing import run_parity

        res = run_parity(backends, None, dev.type, False, None)
        bad = [r for r in res if r.status in ("fail", "error")]
        counts = {s: sum(r.status == s for r in res) for s in ("pass", "fail", "error", "skip")}
        print(f"# parity suite: {counts} ({time.perf_counter() - t0:.1f} s)")
        for r in bad:
            print(f"FAIL suite {r.backend:8s} {r.case} {r.detail[:200]}")
        failures += len(bad)

    peak = measure_peak(str(dev), quick=True)
    print(f"# roofs: {peak.gbs:.0f} GB/s, bf16 {peak.compute_gflops('bf16') / 1e3:.0f} TFLOP/s, "
          f"fp8 {peak.compute_gflops('fp8') / 1e3:.0f} TFLOP/s ({peak.source})")
    if dev.type == "cpu":  # smoke test: parity plus one timed call (interpreter timings mean nothing)
        cfg = BenchConfig(device=str(dev), warmup=0, min_time=0.0, min_reps=1, max_reps=1, refcheck=True,
                          max_call_s=1e9, progress=False)
    else:
        cfg = BenchConfig(device=str(dev), warmup=1, min_time=args.min_time, min_reps=3, max_reps=50, refcheck=True,
                          max_call_s=30.0, progress=False)
    print(f"{'workload':50s} {'backend':8s} {'parity':6s} {'us':>10s} {'TFLOP/s':>8s} {'GB/s':>7s} {'roof%':>6s}  detail")
    cuda_ok: dict[str, bool] = {}
    for w in wls:
        rows = run_bench([w], backends, cfg, peak)
        p50 = {}
        for r in rows:
            if r.backend == "cuda" and r.status != "skip":
                cuda_ok[w.op] = cuda_ok.get(w.op, True) and r.status == "ok" and r.refcheck == "pass"
            if r.status == "ok":
                ok = r.refcheck in ("pass", "self")
                failures += not ok
                p50[r.backend] = r.p50_us
                print(f"{w.name:50s} {r.backend:8s} {'PASS' if ok else 'FAIL':6s} {_fmt(r.p50_us, '10.1f')} "
                      f"{_fmt(r.gflops / 1e3, '8.2f')} {_fmt(r.gbs, '7.0f')} {_fmt(100 * r.frac_roofline, '6.1f')}  "
                      f"{r.refcheck_detail[:120]}", flush=True)
            elif r.status == "error":
                failures += 1
                print(f"{w.name:50s} {r.backend:8s} ERROR  {r.reason[:200]}", flush=True)
            else:
                print(f"{w.name:50s} {r.backend:8s} skip   {r.reason[:160]}", flush=True)
        if "cuda" in p50 and "triton" in p50:
            print(f"{w.name:50s} triton/cuda time ratio {p50['triton'] / p50['cuda']:.2f}")
    if args.record and dev.type == "cuda":
        import datetime
        import json

        cc = torch.cuda.get_device_capability(dev)
        stamp = f"{gpu} (sm_{cc[0]}{cc[1]}) {datetime.date.today().isoformat()}"
        with open(args.record, "w") as f:
            json.dump({op: stamp for op, ok in sorted(cuda_ok.items()) if ok}, f, indent=1)
        print(f"# recorded {sum(cuda_ok.values())} verified cuda op(s) in {args.record}")
    print(f"# {failures} failure(s); {time.perf_counter() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
