"""Command line: ``python -m v4kernels {info,demo,parity,bench,kvcalc}``."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import Sequence


def support_matrix() -> str:
    """Markdown table op x backend from the kernels registered in this install; each cell is the
    backend's declared verification level (``Backend.verification``) or "not yet"."""
    from v4kernels import _registry as R

    for b in R.BACKENDS.values():
        b.load()
    names = list(R.BACKENDS)
    fams = R.families()
    lines = ["| family | op | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for op in sorted(R.op_names(), key=lambda o: (fams.index(R.op_family(o)), o)):
        cells = [(R.BACKENDS[n].op_verification(op) if R._KERNELS.get(n, {}).get(op) else "not yet") for n in names]
        lines.append(f"| {R.op_family(op)} | `{op}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    if args.matrix:
        print(support_matrix())
        return 0

    import v4kernels
    from v4kernels import _platform, _registry
    from v4kernels._ext import build_info

    print(f"v4kernels {v4kernels.__version__}  torch {torch.__version__}  python {platform.python_version()}  {platform.machine()}")
    t = _platform.triton_probe()
    print(f"triton: {t.detail}{'  (TRITON_INTERPRET=1)' if _platform.triton_interpret() else ''}")
    for k, v in sorted(build_info().items()):
        print(f"native build [{k}]: {v}")
    print("devices:")
    for dev, p in _platform.device_probes().items():
        print(f"  {dev:5s} {'yes' if p.ok else 'no ':3s}  {p.detail}")
    from v4kernels.backends import PLUGIN_ERRORS

    for name, err in sorted(PLUGIN_ERRORS.items()):
        print(f"backend plug-in {name}: failed to load: {err}")
    print("backends:")
    for b in _registry.BACKENDS.values():
        devs = ", ".join([f"{d} (auto, priority {p})" for d, p in sorted(b.auto_priority.items(), key=lambda x: x[1]) if d != "meta"]
                         + [f"{d} (forced only)" for d in sorted(b.forced_only_devices)])
        print(f"  {b.name:10s} {b.description}\n  {'':10s} devices: {devs}")
    device = args.device
    table = _registry.available_backends(device=device)
    print(f"\nusable backends per op on device '{device}', in the order dispatch tries them:")
    names = list(_registry.BACKENDS)
    dev_type = _registry.device_type_of(device)
    for op in sorted(table):
        order = {b.name: i for i, b in enumerate(_registry.candidates(op, dev_type))}
        usable = sorted((n for n in names if not table[op][n]), key=lambda n: order.get(n, len(order)))
        usable = [n if n in order else f"{n} (forced only)" for n in usable]
        print(f"  {op:22s} usable: {', '.join(usable) or 'none'}")
        if args.verbose:
            for n in names:
                if table[op][n]:
                    print(f"      {n:10s} - {'; '.join(table[op][n])}")
                elif n in order:
                    for lim in _registry.get_backend(n).limits(op):
                        print(f"      {n:10s}   limit: {lim}")
    if not args.verbose:
        print("\nwhy the other backends are not usable here (-v lists every op x backend):")
        reasons: dict[str, set[str]] = {}
        for op in table:
            for n in names:
                for r in table[op][n]:
                    reasons.setdefault(n, set()).add(r if "kernel for" not in r else f"no {n} kernel for some ops yet")
        for n in names:
            if n in reasons:
                print(f"  {n:10s} - {'; '.join(sorted(reasons[n]))}")
    return 0


def _cmd_parity(args: argparse.Namespace) -> int:
    from v4kernels.testing import run_parity

    try:
        results = run_parity(args.backend or None, args.op or None, args.device, args.large, args.filter)
    except ValueError as e:
        print(f"parity: {e}", file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
        if r.status in ("fail", "error") or (args.verbose and r.status != "skip"):
            print(f"{r.status.upper():5s} {r.backend:10s} {r.case:55s} {r.detail}")
    by_backend: dict[str, dict[str, int]] = {}
    for r in results:
        by_backend.setdefault(r.backend, {}).setdefault(r.status, 0)
        by_backend[r.backend][r.status] += 1
    print("\nbackend     pass  fail  error  skip")
    for b, c in by_backend.items():
        print(f"{b:10s} {c.get('pass', 0):5d} {c.get('fail', 0):5d} {c.get('error', 0):6d} {c.get('skip', 0):5d}")
    ran = counts.get("pass", 0) + counts.get("fail", 0) + counts.get("error", 0)
    print(f"\n{counts.get('pass', 0)} passed, {counts.get('fail', 0) + counts.get('error', 0)} failed, {counts.get('skip', 0)} skipped")
    if ran == 0:
        print("no parity case ran on any backend", file=sys.stderr)
        return 1
    return 1 if counts.get("fail") or counts.get("error") else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v4kernels", description="DeepSeek-V4 kernels: info, demo, parity, bench, kvcalc")
    sub = p.add_subparsers(dest="cmd", required=True)

    pi = sub.add_parser("info", help="versions, devices, and which backend can run each op (with reasons)")
    pi.add_argument("--device", default="cpu")
    pi.add_argument("-v", "--verbose", action="store_true")
    pi.add_argument("--matrix", action="store_true", help="print the op x backend support matrix (markdown) and exit")
    pi.set_defaults(fn=_cmd_info)

    pp = sub.add_parser("parity", help="run the shared parity suite on every usable backend")
    pp.add_argument("--backend", action="append", help="backend(s) to test (default: all)")
    pp.add_argument("--op", action="append", help="restrict to op(s)")
    pp.add_argument("--device", default="cpu")
    pp.add_argument("--large", action="store_true", help="include large (full V4 dimension) cases")
    pp.add_argument("--filter", help="substring of case names")
    pp.add_argument("-v", "--verbose", action="store_true")
    pp.set_defaults(fn=_cmd_parity)

    from v4kernels.bench.cli import add_bench_parsers
    from v4kernels.demo import add_demo_parser

    add_demo_parser(sub)
    add_bench_parsers(sub)

    args = p.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
