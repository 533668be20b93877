"""Ahead-of-time compile check of every Triton kernel for NVIDIA GPUs, on a machine without one.

The parity suite runs the Triton backend through the CPU interpreter, which accepts constructs
the real compiler rejects (loop-carried values changing type, layouts the backend cannot lower,
shared-memory budgets...). This module compiles every kernel for real (Triton IR -> PTX -> cubin
with the ptxas that ships with Triton) for chosen CUDA architectures, with exactly the argument
types and constexpr specialisations the launchers produce:

* a worker process (``TRITON_INTERPRET`` unset) installs a fake active Triton driver whose
  current target is ``GPUTarget("cuda", arch, 32)``, turns every kernel launch into a
  compile-only ``JITFunction.run(..., warmup=True)`` and makes the launchers pick their device
  configuration (``triton_utils.target_kind`` -> ``"cuda"``, ``num_sms`` of an A100 / H100);
* it then drives every op's launcher through the non-large parity cases
  (:func:`v4kernels.testing.all_cases`) with the ``triton`` backend forced for the case's op. The
  launcher's outputs are never computed (nothing runs), so the op returns the *reference*
  kernel's outputs for the same arguments: whatever the case does afterwards sees valid values.
  No launcher reads a kernel's output on the host (audited: MoE routing metadata is computed
  with torch from ``topk_ids``; ``compress_kv`` derives the new token count from its input), so
  the compile-only launch never feeds garbage into a later launch's host-side decisions;
* every distinct specialisation ``(kernel, constexprs, argument types, arch)`` is compiled once
  and recorded with its PTX size, whether the PTX has an ``.entry``, its shared memory, and which
  ``@triton.jit`` helpers contributed code to it (from the source locations of its Triton IR).

:func:`check` runs one worker per architecture and returns an :class:`AotReport`;
:meth:`AotReport.problems` lists every kernel that was not compiled for some architecture, every
compiler error (kernel name, constexprs and the compiler's message), PTX without an ``.entry``,
shared memory beyond the architecture's limit and helpers that no compiled kernel contains.

Command line (prints the table kernel x arch for the README; exit status 1 on any problem)::

    python -m v4kernels.testing.triton_aot --arch 80,90
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import dataclasses
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[2]
PKG = ROOT / "v4kernels"

#: streaming multiprocessors of the reference part of each architecture (A100 SXM, H100 SXM);
#: only the split heuristics of the launchers read it
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132, 100: 148, 120: 84}
#: opt-in shared memory per block in bytes (CUDA programming guide, compute capability table)
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}

#: helpers that no device specialisation contains, with the reason (checked to stay exact)
DEVICE_DEAD_HELPERS: dict[str, str] = {
    "v4kernels.ops.indexer.triton:_rank_merge": "interpreter-only top-k merge (MERGE_SORT=False is chosen only under "
                                                "TRITON_INTERPRET, where tl.sort is slow); the device path is the sort merge",
}


# --------------------------------------------------------------------------------------------
# Static inventory of the @triton.jit functions (AST only: works in any process)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JitFunction:
    """One ``@triton.jit`` function of the package: ``name`` is ``module:qualname``."""

    name: str
    path: str
    first_line: int
    last_line: int
    is_kernel: bool  # launched with ``fn[grid](...)`` somewhere in the package


def kernel_files() -> list[pathlib.Path]:
    """``v4kernels/triton_utils.py`` and every ``v4kernels/ops/*/triton.py``."""
    return [PKG / "triton_utils.py", *sorted((PKG / "ops").glob("*/triton.py"))]


def _module_name(path: pathlib.Path) -> str:
    return ".".join(path.resolve().relative_to(ROOT).with_suffix("").parts)


def _is_jit(dec: ast.expr) -> bool:
    d = dec.func if isinstance(dec, ast.Call) else dec
    return (isinstance(d, ast.Attribute) and d.attr == "jit") or (isinstance(d, ast.Name) and d.id == "jit")


def jit_inventory(files: Sequence[pathlib.Path] | None = None) -> dict[str, JitFunction]:
    """Every ``@triton.jit`` function in ``files`` (default :func:`kernel_files`), by name.

    A function is a kernel when some file launches it (``fn[grid](...)``, also through a module
    alias such as ``T.fn[grid](...)``); the others are helpers inlined into their callers."""
    files = list(files) if files is not None else kernel_files()
    defs: list[tuple[str, pathlib.Path, ast.FunctionDef]] = []
    launched: set[str] = set()
    for f in files:
        tree = ast.parse(f.read_text(), str(f))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list):
                defs.append((_module_name(f), f, node))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                v = node.func.value
                if isinstance(v, ast.Name):
                    launched.add(v.id)
                elif isinstance(v, ast.Attribute):
                    launched.add(v.attr)
    out = {}
    for mod, f, node in defs:
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        name = f"{mod}:{node.name}"
        out[name] = JitFunction(name, str(f.resolve()), first, node.end_lineno or node.lineno, node.name in launched)
    return out


# --------------------------------------------------------------------------------------------
# Records and report
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Compiled:
    """One compiled (or failed) specialisation."""

    kernel: str
    arch: int
    constexprs: dict[str, str]
    arg_types: str
    ok: bool
    error: str = ""
    ptx_bytes: int = 0
    has_entry: bool = False
    shared: int = 0
    num_warps: int = 0
    helpers: list[str] = dataclasses.field(default_factory=list)
    cases: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def spec(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.constexprs.items())


@dataclasses.dataclass
class AotReport:
    archs: list[int]
    records: list[Compiled]
    case_status: dict[int, dict[str, str]]  # arch -> case -> "ok" | "skip: ..." | "error: ..."
    inventory: dict[str, JitFunction]
    worker_errors: dict[int, str] = dataclasses.field(default_factory=dict)
    seconds: dict[int, float] = dataclasses.field(default_factory=dict)

    def by_kernel(self) -> dict[tuple[str, int], list[Compiled]]:
        out: dict[tuple[str, int], list[Compiled]] = {}
        for r in self.records:
            out.setdefault((r.kernel, r.arch), []).append(r)
        return out

    def kernels(self) -> list[str]:
        return sorted(n for n, f in self.inventory.items() if f.is_kernel)

    def helpers(self) -> list[str]:
        return sorted(n for n, f in self.inventory.items() if not f.is_kernel)

    def problems(self) -> list[str]:
        """Everything that keeps the Triton backend from compiling for ``archs``; empty if none."""
        out = [f"sm_{a}: worker failed: {e}" for a, e in sorted(self.worker_errors.items())]
        groups = self.by_kernel()
        for arch in self.archs:
            if arch in self.worker_errors:
                continue
            for k in self.kernels():
                if not groups.get((k, arch)):
                    out.append(f"{k}: never compiled for sm_{arch} (no parity case reaches its launch)")
            for r in self.records:
                if r.arch != arch:
                    continue
                where = f"{r.kernel} [sm_{arch}; {r.spec}; args {r.arg_types}] (case {r.cases[0] if r.cases else '?'})"
                if not r.ok:
                    out.append(f"{where}: compile error: {r.error}")
                elif not r.has_entry:
                    out.append(f"{where}: PTX has no .entry")
                elif arch in SMEM_LIMIT and r.shared > SMEM_LIMIT[arch]:
                    out.append(f"{where}: needs {r.shared} B shared memory, sm_{arch} allows {SMEM_LIMIT[arch]}")
                if r.kernel not in self.inventory:
                    out.append(f"{where}: launched kernel not found in the inventory of kernel files")
            covered = {h for r in self.records if r.arch == arch and r.ok for h in r.helpers}
            for h in self.helpers():
                dead = h in DEVICE_DEAD_HELPERS
                if h not in covered and not dead:
                    out.append(f"{h}: helper contributes code to no compiled kernel for sm_{arch}")
                elif h in covered and dead:
                    out.append(f"{h}: listed in DEVICE_DEAD_HELPERS but compiled for sm_{arch}; update the list")
            for case, st in sorted(self.case_status.get(arch, {}).items()):
                if st.startswith("error"):
                    out.append(f"case {case} (sm_{arch}): launcher {st}")
        for h in DEVICE_DEAD_HELPERS:
            if h not in self.inventory:
                out.append(f"{h}: listed in DEVICE_DEAD_HELPERS but not a @triton.jit function of the package")
        return out

    def table(self) -> str:
        """kernel x arch -> ``OK n/ptx_KB`` (n specialisations, largest PTX) or ``FAIL``."""
        groups = self.by_kernel()
        names = self.kernels() + sorted({r.kernel for r in self.records} - set(self.kernels()))
        w = max([len("kernel")] + [len(n.split(".ops.")[-1]) for n in names])
        head = f"{'kernel':<{w}}  " + "  ".join(f"{'sm_' + str(a):<22}" for a in self.archs)
        lines = [head, "-" * len(head)]
        for n in names:
            cells = []
            for a in self.archs:
                rs = groups.get((n, a), [])
                if not rs:
                    cells.append("MISSING")
                elif not all(r.ok and r.has_entry for r in rs):
                    cells.append(f"FAIL {sum(not (r.ok and r.has_entry) for r in rs)}/{len(rs)} specs")
                else:
                    kb = max(r.ptx_bytes for r in rs) / 1024
                    cells.append(f"OK {len(rs)} specs, {kb:.0f} KB")
            lines.append(f"{n.split('.ops.')[-1]:<{w}}  " + "  ".join(f"{c:<22}" for c in cells))
        for a in self.archs:
            st = self.case_status.get(a, {})
            n_skip = sum(v.startswith("skip") for v in st.values())
            rs = [r for r in self.records if r.arch == a]
            lines.append(f"sm_{a}: {len(rs)} specialisations from {len(st) - n_skip} cases ({n_skip} skipped: "
                         f"no triton kernel or refused); compile {sum(r.cpu_seconds for r in rs):.0f} CPU-s, "
                         f"worker {self.seconds.get(a, 0.0):.0f} s")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Worker: fake driver, compile-only launches, parity cases
# --------------------------------------------------------------------------------------------


class _State:
    arch = 0
    case = ""
    records: dict[tuple, Compiled] = {}
    covered: set[tuple] = set()
    file_map: dict[str, list[JitFunction]] = {}


def _helpers_in_ir(ttir: str, own: str) -> list[str]:
    """``@triton.jit`` functions (other than ``own``) with a source location in the Triton IR of
    a compiled kernel (after inlining, before the target lowering: the same for every arch)."""
    hit: set[str] = set()
    for path, line in set(re.findall(r'loc\("([^"]+)":(\d+):\d+\)', ttir)):
        for fn in _State.file_map.get(os.path.realpath(path), ()):
            if fn.first_line <= int(line) <= fn.last_line and fn.name != own:
                hit.add(fn.name)
    return sorted(hit)


def _arg_type(v: Any) -> str:
    import torch

    # Triton specialises pointers and integers on 16-divisibility and integers on == 1
    if isinstance(v, torch.Tensor):
        return "*" + str(v.dtype).replace("torch.", "") + (":16" if v.data_ptr() % 16 == 0 else "")
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        if v == 1:
            return "1"
        return ("i32" if -(2**31) <= v < 2**31 else "i64") + (":16" if v % 16 == 0 else "")
    if isinstance(v, float):
        return "fp32"
    return type(v).__name__


def install(arch: int, *, ptx_only: bool = False, subset: str = "all") -> None:
    """Make this process compile Triton kernels for ``sm_<arch>`` instead of launching them.

    ``ptx_only`` stops after PTX (skips ptxas, about half the compile time of large kernels).
    ``subset`` picks what is compiled: ``"all"`` every distinct specialisation (constexprs and
    Triton's argument specialisations: 16-divisible pointers / integers, integers equal to 1);
    ``"constexprs"`` each distinct constexpr combination once (the first argument variant
    met); ``"cover"`` a specialisation only if it brings a (kernel, constexpr = value) pair not
    compiled yet, in parity-case order, so each constexpr value of each kernel is compiled once.
    Must run before any kernel module is imported, in a process without ``TRITON_INTERPRET``."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("triton_aot needs real @triton.jit functions: unset TRITON_INTERPRET")
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from .. import _platform
    from .. import triton_utils as U

    class AotDriver(DriverBase):
        """An active driver with a fixed target and no device: enough for compile-only runs."""

        @classmethod
        def is_active(cls) -> bool:
            return False

        def map_python_to_cpp_type(self, ty: str) -> str:
            raise NotImplementedError("compile-only driver")

        def get_current_target(self) -> Any:
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self) -> Any:
            return torch.device("cpu")

        def get_benchmarker(self) -> Any:
            raise NotImplementedError("compile-only driver")

        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

    driver.set_active(AotDriver())
    if ptx_only:
        from triton.backends.nvidia.compiler import CUDABackend

        CUDABackend.make_cubin = lambda self, src, metadata, opt, capability: b""  # type: ignore[method-assign]
    _State.arch = arch
    _State.covered = set()
    _State.records = {}
    _State.file_map = {}
    for fn in jit_inventory().values():
        _State.file_map.setdefault(os.path.realpath(fn.path), []).append(fn)

    orig_run = JITFunction.run

    def compile_only(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        name = f"{self.fn.__module__}:{self.fn.__qualname__}"
        names = {p.name for p in self.params}
        bound = self.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
        bound.apply_defaults()
        cons = {p.name: repr(bound.arguments[p.name]) for p in self.params if p.is_constexpr}
        cons.update({k: repr(v) for k, v in sorted(kwargs.items()) if k not in names})  # num_warps, num_stages...
        types = ",".join(_arg_type(bound.arguments[p.name]) for p in self.params if not p.is_constexpr)
        key = (name, tuple(cons.items()), types)
        rec = _State.records.get(key)
        pairs = {(name, k, v) for k, v in cons.items()}
        if rec is None and subset == "cover" and pairs <= _State.covered:
            return None
        if rec is None and subset == "constexprs" and (name, tuple(cons.items())) in _State.covered:
            return None
        _State.covered |= pairs | {(name, tuple(cons.items()))}
        if rec is None:
            rec = _State.records[key] = Compiled(name, arch, cons, types, ok=False)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                k = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
            except Exception as e:  # noqa: BLE001 - the compiler's message is the result
                rec.error = f"{type(e).__name__}: {e}"[-4000:]
            else:
                ptx = k.asm.get("ptx", "")
                rec.ok = True
                rec.ptx_bytes = len(ptx)
                rec.has_entry = re.search(r"^\s*(\.visible\s+)?\.entry\s", ptx, re.M) is not None
                rec.shared = int(getattr(k.metadata, "shared", 0) or 0)
                rec.num_warps = int(getattr(k.metadata, "num_warps", 0) or 0)
                rec.helpers = _helpers_in_ir(k.asm.get("ttir", ""), name)
            rec.seconds = time.perf_counter() - t0
            rec.cpu_seconds = time.process_time() - c0
        if _State.case and _State.case not in rec.cases and len(rec.cases) < 3:
            rec.cases.append(_State.case)
        return None

    JITFunction.run = compile_only  # type: ignore[method-assign]
    _platform.triton_interpret = lambda: True  # the registry then accepts CPU tensors for triton
    U.target_kind = lambda device: "cuda"  # launchers choose their device blocks and paths
    U.num_sms = lambda device: SM_COUNT.get(arch, 108)


def _wrap_triton_kernels() -> None:
    """Each triton kernel entry: compile-only launch, then the reference outputs."""
    from .. import _registry as R

    tb = R.get_backend("triton")
    for op in R.op_names():
        entry = tb.kernel(op)
        if entry is None or getattr(entry.fn, "_v4k_aot", False):
            continue

        def fn(*args: Any, _launch: Any = entry.fn, _op: str = op) -> Any:
            _launch(*args)
            return R.reference_kernel(_op)(*args)

        fn._v4k_aot = True  # type: ignore[attr-defined]
        entry.fn = fn


def run_cases(ops: Iterable[str] | None = None, name_filter: str | None = None) -> dict[str, str]:
    """Drive every selected non-large parity case through its triton launcher (after
    :func:`install`); returns case -> status."""
    import torch

    from .. import _registry as R
    from .cases import make_inputs
    from .runner import select_cases

    torch.set_num_threads(1)
    _wrap_triton_kernels()
    status = {}
    for case in select_cases(ops, include_large=False, name_filter=name_filter):
        reasons = R.get_backend("triton").op_reasons(case.op, "cpu", forced=True)
        if reasons:
            status[case.name] = "skip: " + "; ".join(reasons)
            continue
        _State.case = case.name
        try:
            inputs = make_inputs(case, "cpu")
            with R.use_backend("triton", ops=[case.op]):
                case.run(**inputs)
            status[case.name] = "ok"
        except R.BackendUnavailableError as e:
            status[case.name] = f"skip: {e}"
        except Exception as e:  # noqa: BLE001 - reported as a problem of the launcher
            status[case.name] = f"error: {type(e).__name__}: {e}"
        finally:
            _State.case = ""
    return status


def records() -> list[Compiled]:
    """Specialisations compiled in this process so far."""
    return list(_State.records.values())


def _worker(arch: int, out: str, ops: list[str] | None, name_filter: str | None, ptx_only: bool, subset: str) -> None:
    t0 = time.perf_counter()
    install(arch, ptx_only=ptx_only, subset=subset)
    status = run_cases(ops, name_filter)
    data = {"arch": arch, "cases": status, "records": [dataclasses.asdict(r) for r in records()],
            "seconds": time.perf_counter() - t0}
    pathlib.Path(out).write_text(json.dumps(data))


# --------------------------------------------------------------------------------------------
# Driver: one worker process per architecture
# --------------------------------------------------------------------------------------------


def check(
    archs: Sequence[int] = (80, 90),
    *,
    ops: Sequence[str] | None = None,
    name_filter: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    jobs: int = 2,
    timeout: float = 600.0,
    ptx_only: bool = False,
    subset: dict[int, str] | None = None,
) -> AotReport:
    """Compile every Triton kernel for each of ``archs`` (one worker process per architecture,
    ``jobs`` at a time) and return the report. ``cache_dir`` becomes ``TRITON_CACHE_DIR`` (a
    persistent cache makes a rerun cheap; PTX-only builds use a subfolder of their own);
    ``ops`` / ``name_filter`` select parity cases; ``ptx_only`` and ``subset`` (arch -> "all" |
    "constexprs" | "cover", default "all") as in :func:`install`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["V4K_CHECKS"] = "off"  # nothing here should be slowed down by value checks
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(pathlib.Path(cache_dir) / ("ptx" if ptx_only else "cubin"))
    subset = dict(subset or {})
    inventory = jit_inventory()
    report = AotReport(list(archs), [], {}, inventory)
    with tempfile.TemporaryDirectory() as tmp:

        def one(arch: int) -> None:
            out = os.path.join(tmp, f"sm_{arch}.json")
            cmd = [sys.executable, "-m", "v4kernels.testing.triton_aot", "--worker", str(arch), "--out", out]
            if ops:
                cmd += ["--ops", ",".join(ops)]
            if name_filter:
                cmd += ["--filter", name_filter]
            if ptx_only:
                cmd += ["--ptx-only"]
            cmd += ["--subset", subset.get(arch, "all")]
            try:
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
            except subprocess.TimeoutExpired:
                report.worker_errors[arch] = f"timed out after {timeout:.0f} s"
                return
            if r.returncode != 0 or not os.path.exists(out):
                report.worker_errors[arch] = f"exit {r.returncode}: {(r.stdout + r.stderr)[-3000:]}"
                return
            data = json.loads(pathlib.Path(out).read_text())
            report.case_status[arch] = data["cases"]
            report.seconds[arch] = data["seconds"]
            report.records.extend(Compiled(**d) for d in data["records"])

        with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as ex:
            list(ex.map(one, archs))
    report.records.sort(key=lambda r: (r.kernel, r.arch, r.spec, r.arg_types))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m v4kernels.testing.triton_aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90", help="comma-separated CUDA compute capabilities (default 80,90)")
    p.add_argument("--ops", default="", help="only parity cases of these ops (comma-separated)")
    p.add_argument("--filter", default="", help="only parity cases whose name contains this")
    p.add_argument("--cache-dir", default=None, help="TRITON_CACHE_DIR for the workers")
    p.add_argument("--jobs", type=int, default=2, help="architectures compiled in parallel")
    p.add_argument("--specs", action="store_true", help="also list every specialisation")
    p.add_argument("--ptx-only", action="store_true", help="stop after PTX (skip ptxas)")
    p.add_argument("--subset", default="all", choices=("all", "constexprs", "cover"),
                   help="all distinct specialisations, each constexpr combination once, or a subset "
                        "covering every constexpr value")
    p.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    ops = [o for o in a.ops.split(",") if o] or None
    if a.worker:
        _worker(a.worker, a.out, ops, a.filter or None, a.ptx_only, a.subset)
        return 0
    archs = [int(x) for x in a.arch.split(",") if x]
    rep = check(archs, ops=ops, name_filter=a.filter or None, cache_dir=a.cache_dir, jobs=a.jobs,
                ptx_only=a.ptx_only, subset={x: a.subset for x in archs})
    print(rep.table())
    if a.specs:
        for r in rep.records:
            state = "OK" if r.ok and r.has_entry else "FAIL"
            print(f"  {state} sm_{r.arch} {r.kernel.split('.ops.')[-1]} [{r.spec}] ptx={r.ptx_bytes} smem={r.shared}")
    probs = rep.problems()
    if ops or a.filter:  # a partial selection cannot cover every kernel
        probs = [x for x in probs if "never compiled" not in x and "helper contributes" not in x]
    for x in probs:
        print("PROBLEM:", x)
    print("PASS" if not probs else f"FAIL ({len(probs)} problems)")
    return 1 if probs else 0


if __name__ == "__main__":
    sys.exit(main())
