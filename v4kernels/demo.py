"""``python -m v4kernels demo``: two V4-Flash decoder blocks (layer 2: CSA + hash-routed MoE, layer
3: HCA + routed MoE) with mHC, random weights and a reduced expert count, through a prefill and a
few decode steps with the automatically selected backends. Prints the backend that ran each op,
the time per phase, the KV-cache bytes held, and a parity check of the last decode step against
the reference backend.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any, Iterator

import torch

import v4kernels as v4k
from v4kernels import _registry as R

from .layers.attention import AttentionCache
from .layers.block import HyperHead, V4Block
from .layers.config import V4Config, compress_ratio_of_layer


@contextlib.contextmanager
def time_in_ops() -> Iterator[list[float]]:
    """Accumulates the wall time spent inside the kernels that v4k op calls dispatch to (outermost
    kernel calls only: a kernel that calls other ops counts once) into the yielded one-element
    list. The rest of a step's wall time is host work: the layers' Python, the library's
    validation and dispatch, and the few torch ops the layers call directly (cat, scatter, views).
    Every registered kernel is wrapped for the duration of the block."""
    acc, depth = [0.0], [0]
    wrapped = []

    def timer(fn: Any) -> Any:
        def timed(*args: Any) -> Any:
            if depth[0]:
                return fn(*args)
            depth[0] += 1
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                acc[0] += time.perf_counter() - t
                depth[0] -= 1

        return timed

    for table in R._KERNELS.values():
        for entry in table.values():
            wrapped.append((entry, entry.fn))
            entry.fn = timer(entry.fn)
    try:
        yield acc
    finally:
        for entry, fn in wrapped:
            entry.fn = fn


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


@contextlib.contextmanager
def _maybe_backend(name: str | None) -> Iterator[None]:
    if name is None:
        yield
    else:
        with v4k.use_backend(name):
            yield


class DemoModel:
    def __init__(self, model: str, n_experts: int, batch: int, max_len: int, kv_fp8: bool, seed: int,
                 config: V4Config | None = None, weights: str | None = None) -> None:
        self.cfg = config or (V4Config.flash() if model == "flash" else V4Config.pro())
        layers = (2, 3)
        self.blocks = []
        if weights is not None:
            from .layers.weights import SafetensorsSource, load_block

            src = SafetensorsSource(weights)
            self.blocks = [load_block(src, layer, self.cfg) for layer in layers]
        else:
            for i, layer in enumerate(layers):
                ratio = compress_ratio_of_layer(model, layer)
                self.blocks.append(V4Block(self.cfg, ratio, n_experts, hash_routing=layer < self.cfg.n_hash_layers,
                                           seed=seed + 100 * i))
        self.layer_ids = layers
        self.head = HyperHead(self.cfg, seed)
        if weights is not None and "hc_head_fn" in src:
            for ours, theirs in (("fn", "hc_head_fn"), ("base", "hc_head_base"), ("scale", "hc_head_scale")):
                setattr(self.head, ours, src[theirs].float())
            if "norm.weight" in src:
                self.head.norm = src["norm.weight"]
        self.caches: list[AttentionCache] = [b.attn.new_cache(batch, max_len, kv_fp8=kv_fp8) for b in self.blocks]

    def step(self, h: torch.Tensor, start_pos: int, token_ids: torch.Tensor) -> torch.Tensor:
        for block, cache in zip(self.blocks, self.caches):
            h = block(h, cache, start_pos, token_ids)
        return self.head(h)

    def snapshot(self) -> list[dict]:
        return [c.snapshot() for c in self.caches]

    def restore(self, snap: list[dict]) -> None:
        for c, s in zip(self.caches, snap):
            c.restore(s)


def _usage_table(usage: dict[tuple[str, str], int]) -> dict[str, str]:
    per_op: dict[str, list[str]] = {}
    for (op, backend), n in sorted(usage.items()):
        per_op.setdefault(op, []).append(f"{backend} x{n}")
    return {op: ", ".join(v) for op, v in per_op.items()}


#: ops whose contract rounds intermediate results to the dtype of one input (argument index):
#: moe_experts rounds every linear output to x.dtype, so an fp32 result (out_dtype=fp32) carries
#: bf16 roundings, and a one-ulp flip of one of them moves it by a bf16 ulp, not an fp32 one
_ROUNDS_TO_INPUT_DTYPE = {"moe_experts": 0}


def per_op_parity(calls: list[tuple[str, str, tuple[Any, ...], Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Re-run every recorded call on the reference kernel with the same inputs and compare with
    the backend's own tolerance table (top-k lists by −1 pattern and index-set recall), at the
    precision of the input dtype for ops that round to it midway (``_ROUNDS_TO_INPUT_DTYPE``)."""
    from v4kernels.testing.compare import compare_outputs, compare_topk

    table: dict[tuple[str, str], dict[str, Any]] = {}
    for op, backend, args, got in calls:
        row = table.setdefault((op, backend), {"calls": 0, "max_abs": 0.0, "min_cos": 1.0, "ok": True, "detail": ""})
        row["calls"] += 1
        if backend == "reference":
            continue
        want = R.reference_kernel(op)(*args)
        if op == "indexer_topk":
            res = compare_topk(got, want)
        else:
            tols = R.get_backend(backend).tolerances
            if op in _ROUNDS_TO_INPUT_DTYPE:
                working = args[_ROUNDS_TO_INPUT_DTYPE[op]].dtype
                tols = {dt: tols.get(working, t) for dt, t in tols.items()}
            res = compare_outputs(got, want, tols)
        row["max_abs"] = max(row["max_abs"], res.max_abs)
        row["min_cos"] = min(row["min_cos"], res.cosine)
        if not res.ok:
            row["ok"], row["detail"] = False, res.message
    return table


def run_demo(model: str = "flash", prefill: int = 2048, decode: int = 4, n_experts: int = 16, batch: int = 1,
             kv_fp8: bool = False, backend: str | None = None, seed: int = 0, threads: int | None = None,
             config: V4Config | None = None, weights: str | None = None) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    m = DemoModel(model, n_experts, batch, prefill + decode, kv_fp8, seed, config, weights)
    cfg = m.cfg
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed + 1)
    total = prefill + decode
    token_ids = torch.randint(0, cfg.vocab_size, (batch, total), generator=g)
    # random "embeddings" broadcast to the hc streams (SPEC §2); no vocabulary table is needed
    emb = (torch.randn(batch, total, cfg.dim, generator=g)).to(torch.bfloat16)

    def streams(sl: slice) -> torch.Tensor:
        e = emb[:, sl]
        return e.unsqueeze(2).expand(*e.shape[:2], cfg.hc_mult, cfg.dim).contiguous()

    with R.track_usage(), _maybe_backend(backend), torch.inference_mode():
        t = time.perf_counter()
        m.step(streams(slice(0, prefill)), 0, token_ids[:, :prefill])
        prefill_s = time.perf_counter() - t
        prefill_usage = _usage_table(R.backend_usage(reset=True))
        step_times, host_times = [], []
        out = None
        snap = None
        for i in range(decode):
            pos = prefill + i
            if i == decode - 1:
                snap = m.snapshot()
            with time_in_ops() as in_ops:
                t = time.perf_counter()
                out = m.step(streams(slice(pos, pos + 1)), pos, token_ids[:, pos : pos + 1])
                step_times.append(time.perf_counter() - t)
            host_times.append(step_times[-1] - in_ops[0])
        decode_usage = _usage_table(R.backend_usage(reset=True))

    parity: dict[str, Any] = {}
    if decode and snap is not None and out is not None:
        after = m.snapshot()
        pos = prefill + decode - 1
        step_in = (streams(slice(pos, pos + 1)), pos, token_ids[:, pos : pos + 1])
        # 1) op by op: replay the last step with the automatic backends, recording every call,
        #    and re-run each call on the reference with identical inputs
        m.restore(snap)
        with R.record_calls() as calls, _maybe_backend(backend), torch.inference_mode():
            m.step(*step_in)
        parity["per_op"] = per_op_parity(calls)
        # 2) end to end: the same step entirely on the reference backend
        m.restore(snap)
        with v4k.use_backend("reference"), torch.inference_mode():
            t = time.perf_counter()
            ref = m.step(*step_in)
            parity["reference_step_s"] = time.perf_counter() - t
        m.restore(after)
        a, e = out.float(), ref.float()
        parity["max_abs"] = float((a - e).abs().max())
        parity["ref_max_abs"] = float(e.abs().max())
        parity["cosine"] = float(torch.nn.functional.cosine_similarity(a.flatten(), e.flatten(), dim=0))
        parity["ok"] = all(r["ok"] for r in parity["per_op"].values()) and bool(torch.isfinite(a).all())

    cache_bytes = [c.nbytes() for c in m.caches]
    return {
        "cfg": cfg, "model": model, "layers": m.layer_ids, "ratios": [b.attn.ratio for b in m.blocks],
        "prefill": prefill, "decode": decode, "batch": batch, "n_experts": n_experts, "kv_fp8": kv_fp8,
        "build_s": build_s, "prefill_s": prefill_s, "decode_s": step_times, "decode_host_s": host_times,
        "weights": weights,
        "prefill_usage": prefill_usage, "decode_usage": decode_usage, "cache_bytes": cache_bytes,
        "parity": parity, "forced_backend": backend,
    }


def print_report(r: dict[str, Any]) -> None:
    cfg = r["cfg"]
    print(f"DeepSeek-V4-{r['model'].capitalize()} blocks {r['layers']} (compress ratios {r['ratios']}), D={cfg.dim}, "
          f"H={cfg.n_heads}, top-k={cfg.index_topk}, experts {r['n_experts']} of {cfg.n_routed_experts} (6 active, FP4) + shared (FP8), "
          f"batch {r['batch']}, KV cache {'FP8 packed (584 B/row)' if r['kv_fp8'] else 'bf16'}")
    if r.get("weights"):
        print(f"weights: {r['weights']}")
    if r["forced_backend"]:
        print(f"backend forced: {r['forced_backend']}")
    print(f"\nbackend per op (calls):")
    ops = sorted(set(r["prefill_usage"]) | set(r["decode_usage"]))
    print(f"  {'op':22s} {'prefill':28s} decode")
    for op in ops:
        print(f"  {op:22s} {r['prefill_usage'].get(op, '-'):28s} {r['decode_usage'].get(op, '-')}")
    print("\ntime per phase:")
    print(f"  build weights        {r['build_s']:8.2f} s")
    print(f"  prefill {r['prefill']:5d} tokens {r['prefill_s']:8.2f} s  ({r['prefill'] * r['batch'] / r['prefill_s']:.1f} tokens/s)")
    if r["decode_s"]:
        med = statistics.median(r["decode_s"])
        print(f"  decode {len(r['decode_s'])} steps       median {med * 1e3:8.1f} ms/step  (min {min(r['decode_s']) * 1e3:.1f}, max {max(r['decode_s']) * 1e3:.1f})")
        host = statistics.median(r["decode_host_s"])
        print(f"  decode host (Python) median {host * 1e3:8.2f} ms/step  (step wall time minus the time inside the kernels:")
        print("                                         the layers' Python, v4kernels' validation and dispatch, and the")
        print("                                         torch ops the layers call directly)")
    print("\nKV cache held (after the last step):")
    for layer, ratio, nb in zip(r["layers"], r["ratios"], r["cache_bytes"]):
        kind = {4: "CSA", 128: "HCA", 0: "SWA"}[ratio]
        print(f"  layer {layer} ({kind}, ratio {ratio:3d})  {_fmt_bytes(nb)}")
    print(f"  total                     {_fmt_bytes(sum(r['cache_bytes']))}")
    p = r["parity"]
    if p:
        print("\nparity of the last decode step, op by op (each call re-run on the reference with the same inputs,")
        print("compared with the backend's tolerance; top-k by index-set recall):")
        for (op, backend), row in sorted(p["per_op"].items()):
            if backend == "reference":
                print(f"  {op:22s} {backend:10s} {row['calls']:3d} calls  (is the reference)")
            else:
                print(f"  {op:22s} {backend:10s} {row['calls']:3d} calls  max|diff| {row['max_abs']:.3g}  "
                      f"{'recall' if op == 'indexer_topk' else 'cosine'} {row['min_cos']:.6f}  {'OK' if row['ok'] else 'FAIL: ' + row['detail']}")
        print(f"end to end vs the step run entirely on the reference: max|diff| {p['max_abs']:.4g} (max|ref| {p['ref_max_abs']:.4g}), "
              f"cosine {p['cosine']:.6f} (rounding differences compound through the blocks)")
        print(f"parity: {'OK' if p['ok'] else 'MISMATCH'}  (reference step took {p['reference_step_s'] * 1e3:.0f} ms)")


def _cmd_demo(args: argparse.Namespace) -> int:
    r = run_demo(args.model, args.prefill, args.decode, args.experts, args.batch, args.kv_fp8, args.backend, args.seed, args.threads,
                 weights=args.weights)
    print_report(r)
    return 0 if (not r["parity"] or r["parity"]["ok"]) else 1


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run two V4 decoder blocks (CSA + HCA) through prefill and decode")
    p.add_argument("--model", choices=("flash", "pro"), default="flash")
    p.add_argument("--prefill", type=int, default=2048, help="prompt tokens (default 2048)")
    p.add_argument("--decode", type=int, default=4, help="decode steps (default 4)")
    p.add_argument("--experts", type=int, default=16, help="routed experts per MoE (release: 256 Flash / 384 Pro)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kv-fp8", action="store_true", help="store the KV cache in the packed FP8 layout (SPEC §13.1)")
    p.add_argument("--backend", default=None, help="force one backend for every op (default: automatic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--weights", default=None, metavar="DIR",
                   help="checkpoint directory (*.safetensors, release or Hugging Face naming): blocks 2 and 3 load "
                        "from it; default: random weights")
    p.set_defaults(fn=_cmd_demo)
