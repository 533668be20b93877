"""HF transformers eager vs ``v4kernels.integrations.transformers.apply()`` on the same model.

One decoder layer at DeepSeek-V4-Flash attention widths (hidden 4096, 64 heads x 512, rope 64,
q_lora 1024, 8 output groups x 1024, indexer 64 x 128, top-k 512, hc_mult 4, window 128, CSA
ratio 4) with a small MoE (8 experts x 2048) and a small vocabulary, random weights. Every
measurement runs in its own subprocess (fresh peak RSS):

* prefill wall time and peak RSS above the loaded weights (measured after an 8-token warm-up
  forward), at ``--prefill`` lengths (HF also at
  ``--hf-fit`` lengths for the memory fit); HF runs at a length only if ``MemAvailable`` covers
  its predicted peak (quadratic fit of the shorter runs) plus a margin, so it never drives the
  machine out of memory;
* decode tokens/s for ``--decode-steps`` greedy steps after a ``--decode-prompt`` prompt;
* v4kernels bf16 vs fp32 prefill at ``--bf16`` tokens;
* the longest prompt v4kernels pushes through the layer (``--long``, chunked prefill through the
  cache); HF's limit in ``--budget-gb`` is *estimated* from its measured memory growth
  (quadratic fit of peak-above-weights vs prompt length), never run.

    nice python bench/hf_compare.py                       # full run (slow on a small CPU)
    nice python bench/hf_compare.py --prefill 1024 --long 0 --decode-steps 8 --bf16 0   # quick look

Prints a markdown table with the targets (>= 5x faster than HF fp32 prefill at the longest
length both ran, <= 1/10 of HF's peak memory above weights, bf16 no slower than fp32, a 64K
prompt through one CSA layer); ``--json PATH`` also writes the raw numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build(dtype: str):
    import torch
    import transformers

    cfg = transformers.DeepseekV4Config(
        vocab_size=1024, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=1,
        num_attention_heads=64, head_dim=512, q_lora_rank=1024, qk_rope_head_dim=64, n_routed_experts=8,
        num_experts_per_tok=2, hc_mult=4, sliding_window=128, o_groups=8, o_lora_rank=1024, index_n_heads=64,
        index_head_dim=128, index_topk=512, layer_types=["compressed_sparse_attention"], mlp_layer_types=["moe"],
        max_position_embeddings=1 << 20, attn_implementation="eager",
        rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
    )
    torch.manual_seed(0)
    with torch.no_grad():
        model = transformers.DeepseekV4ForCausalLM(cfg).eval()
        for mod in model.modules():
            if hasattr(mod, "sinks"):
                mod.sinks.normal_()
            if hasattr(mod, "position_bias"):
                mod.position_bias.normal_(0, 0.5)
    model.set_experts_implementation("eager")
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    return model


def worker(args: argparse.Namespace) -> dict:
    limit = float(os.environ.get("V4K_BENCH_DATA_LIMIT_GB", "0"))
    if limit > 0:
        # a run that outgrows the memory that was free fails with MemoryError instead of
        # pushing the (shared) machine into the OOM killer
        resource.setrlimit(resource.RLIMIT_DATA, (int(limit * 2**30), int(limit * 2**30)))
    import torch

    torch.set_grad_enabled(False)
    model = build(args.dtype)
    if args.side == "v4k":
        from v4kernels.integrations import transformers as v4k_hf

        v4k_hf.apply(model)
    from transformers.cache_utils import DynamicCache

    # one 8-token warm-up forward: lazy imports and first-call setup stay out of time and memory
    model(torch.zeros(1, 8, dtype=torch.long), use_cache=False, logits_to_keep=1)
    base = _rss_gb()
    ids = torch.randint(0, 1024, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    out: dict = {"side": args.side, "dtype": args.dtype, "mode": args.mode, "tokens": args.tokens, "weights_rss_gb": base}
    t0 = time.perf_counter()
    if args.mode == "prefill":
        if args.chunk:
            cache = DynamicCache(config=model.config)
            for a in range(0, args.tokens, args.chunk):
                model(ids[:, a : a + args.chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        else:
            model(ids, use_cache=False, logits_to_keep=1)
        out["seconds"] = time.perf_counter() - t0
    else:
        cache = DynamicCache(config=model.config)
        logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        out["prefill_seconds"] = time.perf_counter() - t0
        tok = logits[:, -1:].argmax(-1)
        t1 = time.perf_counter()
        for _ in range(args.steps):
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        out["tokens_per_s"] = args.steps / (time.perf_counter() - t1)
    out["peak_rss_gb"] = _peak_gb()
    out["peak_above_weights_gb"] = out["peak_rss_gb"] - base
    return out


def run(side: str, mode: str, tokens: int, dtype: str = "fp32", steps: int = 0, chunk: int = 0, timeout: int = 3600) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--mode", mode, "--tokens", str(tokens),
           "--dtype", dtype, "--steps", str(steps), "--chunk", str(chunk)]
    avail = mem_available_gb()
    print(f"  running {side} {mode} {tokens} {dtype}" + (f" chunk {chunk}" if chunk else "") +
          f" ({avail:.1f} GB available)", flush=True)
    env = dict(os.environ, V4K_BENCH_DATA_LIMIT_GB=f"{max(2.0, avail - 0.5):.2f}")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"side": side, "mode": mode, "tokens": tokens, "dtype": dtype, "error": f"timeout {timeout}s"}
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        return {"side": side, "mode": mode, "tokens": tokens, "dtype": dtype, "error": err}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    print("  ", json.dumps(r), flush=True)
    return r


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares ``a·S² + b·S`` through (prompt length, GB above weights) points."""
    if len(points) < 2:
        return None
    import numpy as np

    s = np.array([p[0] for p in points], dtype=float)
    m = np.array([p[1] for p in points], dtype=float)
    (a, b), *_ = np.linalg.lstsq(np.stack([s * s, s], 1), m, rcond=None)
    return float(a), float(b)


def hf_limit(points: list[tuple[int, float]], budget: float) -> float | None:
    """Prompt length at which HF's peak-above-weights reaches ``budget`` GB (from :func:`fit`)."""
    ab = fit(points)
    if ab is None or ab[0] <= 0:
        return None
    a, b = ab
    return float((-b + (b * b + 4 * a * budget) ** 0.5) / (2 * a))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["hf", "v4k"])
    ap.add_argument("--mode", default="prefill")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=0)
    ap.add_argument("--prefill", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--hf-fit", type=int, nargs="*", default=[512], help="extra HF-only lengths for the memory fit")
    ap.add_argument("--hf-prefill-max", type=int, default=4096, help="longest prompt HF eager is ever run at")
    ap.add_argument("--hf-margin-gb", type=float, default=1.5, help="free memory kept beyond HF's predicted peak")
    ap.add_argument("--decode-prompt", type=int, default=2048)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--long", type=int, default=65536, help="long v4kernels prompt (0 = skip)")
    ap.add_argument("--long-chunk", type=int, default=4096)
    ap.add_argument("--budget-gb", type=float, default=24.0)
    ap.add_argument("--bf16", type=int, default=1024, help="prompt for the bf16-vs-fp32 v4kernels check (0 = skip)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.worker:
        a.side = a.worker
        print(json.dumps(worker(a)))
        return
    t_start = time.time()
    load = os.getloadavg()
    hf_pts: list[tuple[int, float]] = []
    weights = [0.0]

    def run_hf(n: int) -> dict:
        if n > a.hf_prefill_max:
            return {"error": f"not run (> --hf-prefill-max {a.hf_prefill_max})"}
        ab = fit(hf_pts)
        if ab is not None:
            need = ab[0] * n * n + ab[1] * n + weights[0] + a.hf_margin_gb
            avail = mem_available_gb()
            if need > avail:
                return {"error": f"not run: predicted peak {need - a.hf_margin_gb:.1f} GB, {avail:.1f} GB available"}
        r = run("hf", "prefill", n)
        if "peak_above_weights_gb" in r:
            hf_pts.append((n, r["peak_above_weights_gb"]))
            weights[0] = r["weights_rss_gb"]
        return r

    for n in a.hf_fit:
        run_hf(n)
    rows = []
    for n in a.prefill:
        v = run("v4k", "prefill", n)
        h = run_hf(n)
        rows.append((n, h, v))
    dv = run("v4k", "decode", a.decode_prompt, steps=a.decode_steps) if a.decode_steps else {"error": "not run"}
    dh = run("hf", "decode", a.decode_prompt, steps=a.decode_steps) if a.decode_steps else {"error": "not run"}
    extra: dict = {}
    if a.bf16:
        extra["bf16"] = run("v4k", "prefill", a.bf16, dtype="bf16")
        extra["bf16_fp32"] = next((v for n, _, v in rows if n == a.bf16), None) or run("v4k", "prefill", a.bf16)
    if a.long:
        extra["long"] = run("v4k", "prefill", a.long, chunk=a.long_chunk, timeout=7200)
    est = hf_limit(hf_pts, a.budget_gb - weights[0])

    def f(r: dict | None, k: str, fmt: str = "{:.2f}") -> str:
        if r is None:
            return "-"
        return fmt.format(r[k]) if k in r else str(r.get("error", "-"))

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("met" if ok else "MISSED")

    print(f"\nmachine: {os.cpu_count()} CPUs, load average at start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, "
          f"at end {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(t_start))}; "
          f"total {time.time() - t_start:.0f} s")
    print("\n| measurement | HF eager fp32 | v4kernels fp32 | ratio | target |")
    print("|---|---|---|---|---|")
    both = [(n, h, v) for n, h, v in rows if "seconds" in h and "seconds" in v]
    for n, h, v in rows:
        sp = h["seconds"] / v["seconds"] if "seconds" in h and "seconds" in v else None
        tgt = f">= 5x: {verdict(sp >= 5)}" if sp is not None and both and n == both[-1][0] else ""
        print(f"| prefill {n} tokens, s | {f(h, 'seconds')} | {f(v, 'seconds')} | "
              f"{'-' if sp is None else f'{sp:.2f}x faster'} | {tgt} |")
        hm, vm = h.get("peak_above_weights_gb"), v.get("peak_above_weights_gb")
        mr = vm / hm if hm and vm is not None and hm > 0 else None
        print(f"| prefill {n}: peak RSS above weights, GB | {f(h, 'peak_above_weights_gb')} | "
              f"{f(v, 'peak_above_weights_gb')} | {'-' if mr is None else f'{mr:.3f} of HF'} | "
              f"{'-' if mr is None else f'<= 0.1: {verdict(mr <= 0.1)}'} |")
    for n in a.hf_fit:
        r = next((r for r in [dict(zip(('n', 'g'), p)) for p in hf_pts] if r["n"] == n), None)
        if r:
            print(f"| HF prefill {n} (for the memory fit): peak RSS above weights, GB | {r['g']:.2f} | - | - | - |")
    ratio = dv["tokens_per_s"] / dh["tokens_per_s"] if "tokens_per_s" in dv and "tokens_per_s" in dh else None
    if a.decode_steps:
        print(f"| decode after {a.decode_prompt}, tokens/s ({a.decode_steps} steps) | {f(dh, 'tokens_per_s')} | "
              f"{f(dv, 'tokens_per_s')} | {'-' if ratio is None else f'{ratio:.2f}x'} | - |")
    if "bf16" in extra:
        b, b32 = extra["bf16"], extra["bf16_fp32"]
        r = b["seconds"] / b32["seconds"] if "seconds" in b and b32 and "seconds" in b32 else None
        print(f"| v4kernels prefill {a.bf16}: bf16 s (fp32 s) | - | {f(b, 'seconds')} ({f(b32, 'seconds')}) | "
              f"{'-' if r is None else f'bf16 = {r:.2f}x the fp32 time'} | "
              f"{'-' if r is None else f'<= 1x: {verdict(r <= 1.0)}'} |")
    if "long" in extra:
        lg = extra["long"]
        ok = "seconds" in lg
        print(f"| longest prompt run through the layer, tokens | - | {a.long} (chunks of {a.long_chunk}): "
              f"{f(lg, 'seconds', '{:.0f}')} s, peak RSS above weights {f(lg, 'peak_above_weights_gb')} GB | - | "
              f"64K: {verdict(ok and a.long >= 65536)} |")
    if est is not None:
        print(f"| longest prompt in {a.budget_gb:.0f} GB, tokens | ~{est:.0f} (estimated from the a·S²+b·S fit of "
              f"{len(hf_pts)} measured points, not run) | {a.long if 'seconds' in extra.get('long', {}) else '-'} "
              f"(run) | - | - |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"rows": rows, "decode": [dh, dv], **extra, "hf_points": hf_pts, "hf_limit_estimate": est,
                       "load": load}, fh, indent=1)


if __name__ == "__main__":
    main()
