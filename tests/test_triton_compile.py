"""Ahead-of-time compilation of every Triton kernel for NVIDIA sm_80 and sm_90 without a GPU
(v4kernels.testing.triton_aot): each kernel is compiled with the argument types and constexprs
its launcher produces for the parity cases, so constructs the interpreter accepts but the
compiler rejects, PTX without an entry point and shared-memory budgets beyond the GPU fail here.

Budget: PTX only (ptxas skipped); sm_90 compiles each distinct constexpr specialisation, sm_80
the subset that covers every constexpr value of every kernel; both in parallel worker processes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from v4kernels.testing import triton_aot as A  # noqa: E402

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> A.AotReport:
    cache = os.environ.get("V4K_TRITON_AOT_CACHE") or tmp_path_factory.mktemp("triton_aot_cache")
    return A.check(ARCHS, cache_dir=cache, ptx_only=True, subset={80: "cover", 90: "constexprs"}, jobs=2, timeout=540)


def test_workers_ran_every_case(report: A.AotReport) -> None:
    assert not report.worker_errors, report.worker_errors
    for arch in ARCHS:
        st = report.case_status[arch]
        assert len(st) >= 50, f"sm_{arch}: only {len(st)} parity cases driven"
        errors = {c: s for c, s in st.items() if s.startswith("error")}
        assert not errors, f"sm_{arch}: launchers failed in compile-only mode: {errors}"


def test_every_kernel_compiled_for_sm80_and_sm90(report: A.AotReport) -> None:
    kernels = report.kernels()
    assert len(kernels) >= 25, kernels
    groups = report.by_kernel()
    missing = [f"{k} sm_{a}" for k in kernels for a in ARCHS if not groups.get((k, a))]
    assert not missing, "kernels never compiled: " + ", ".join(missing)


def test_no_compile_errors_and_every_ptx_has_an_entry(report: A.AotReport) -> None:
    bad = [f"{r.kernel} [sm_{r.arch}; {r.spec}]: {r.error or 'PTX has no .entry'}"
           for r in report.records if not (r.ok and r.has_entry)]
    assert not bad, "\n".join(bad)
    assert all(r.ptx_bytes > 1000 for r in report.records)


def test_report_has_no_problems(report: A.AotReport) -> None:
    """Also: shared memory within the architecture's limit, every helper inlined somewhere, the
    list of device-dead helpers exact."""
    probs = report.problems()
    assert not probs, "\n".join(probs)


def test_inventory_matches_the_imported_modules() -> None:
    """The AST inventory finds exactly the module-level @triton.jit objects of each file."""
    import importlib

    inv = A.jit_inventory()
    found = set()
    for f in A.kernel_files():
        mod = importlib.import_module(A._module_name(f))
        for name, obj in vars(mod).items():
            fn = getattr(obj, "fn", None)
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction") and getattr(fn, "__module__", "") == mod.__name__:
                found.add(f"{mod.__name__}:{name}")
    assert found == set(inv), (found ^ set(inv))
    assert "v4kernels.ops.quant.triton:_fp8_gemm_kernel" in {n for n, f in inv.items() if f.is_kernel}
    assert not inv["v4kernels.triton_utils:e4m3_encode"].is_kernel


def test_table_lists_every_kernel_per_arch(report: A.AotReport) -> None:
    t = report.table()
    for k in report.kernels():
        row = next(line for line in t.splitlines() if line.startswith(k.split(".ops.")[-1] + " "))
        assert row.count("OK ") == len(ARCHS), row
    assert "sm_80:" in t and "sm_90:" in t


def test_problems_catch_missing_failed_and_uncovered(report: A.AotReport) -> None:
    """The checks can fail: drop one kernel's sm_80 records, fail one compile, drop PTX entry,
    exceed shared memory, and strip one helper from every record."""
    recs = [dataclasses.replace(r, helpers=list(r.helpers), cases=list(r.cases)) for r in report.records]
    victim = "v4kernels.ops.compressor.triton:_state_kernel"
    recs = [r for r in recs if not (r.kernel == victim and r.arch == 80)]
    fail = next(r for r in recs if r.kernel.endswith(":_fp8_gemm_kernel") and r.arch == 90)
    fail.ok, fail.error = False, "CompilationError: Loop-carried variable acc has initial type fp32"
    noentry = next(r for r in recs if r.kernel.endswith(":_act_quant_fwd_kernel") and r.arch == 80)
    noentry.has_entry = False
    big = next(r for r in recs if r.kernel.endswith(":_rms_norm_fwd_kernel") and r.arch == 80)
    big.shared = A.SMEM_LIMIT[80] + 1
    for r in recs:
        r.helpers = [h for h in r.helpers if not h.endswith(":e2m1_encode")]
    rep = A.AotReport(list(ARCHS), recs, report.case_status, report.inventory)
    probs = "\n".join(rep.problems())
    assert f"{victim}: never compiled for sm_80" in probs
    assert f"{victim}: never compiled for sm_90" not in probs
    assert "_fp8_gemm_kernel [sm_90;" in probs and "Loop-carried variable acc" in probs
    assert "_act_quant_fwd_kernel [sm_80;" in probs and "PTX has no .entry" in probs
    assert "_rms_norm_fwd_kernel [sm_80;" in probs and "shared memory" in probs
    assert "v4kernels.triton_utils:e2m1_encode: helper contributes code to no compiled kernel for sm_80" in probs
    # a device-dead helper that shows up compiled must be reported too
    recs[0].helpers.append(next(iter(A.DEVICE_DEAD_HELPERS)))
    assert "update the list" in "\n".join(A.AotReport(list(ARCHS), recs, report.case_status, report.inventory).problems())


_REJECT = '''
import json, sys
from v4kernels.testing import triton_aot as A
A.install(int(sys.argv[1]), ptx_only=True)
sys.path.insert(0, sys.argv[2])
import aot_probe_kernels as K
import torch
x = torch.zeros(64)
K.bad[(1,)](x, 64, BLOCK=64)   # compile error, recorded; the launch returns
K.good[(1,)](x, 64, BLOCK=64)
K.good[(1,)](x, 64, BLOCK=64)  # same specialisation: compiled once
print(json.dumps([dict(kernel=r.kernel, ok=r.ok, error=r.error, entry=r.has_entry) for r in A.records()]))
'''

_PROBE_KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def bad(x_ptr, n, BLOCK: tl.constexpr):
    acc = 0  # int32 here, fp32 after the loop body: the interpreter runs it, the compiler refuses
    for i in range(0, n, BLOCK):
        acc = acc + tl.sum(tl.load(x_ptr + i + tl.arange(0, BLOCK)))
    tl.store(x_ptr, acc)


@triton.jit
def good(x_ptr, n, BLOCK: tl.constexpr):
    acc = 0.0
    for i in range(0, n, BLOCK):
        acc = acc + tl.sum(tl.load(x_ptr + i + tl.arange(0, BLOCK)))
    tl.store(x_ptr, acc)
'''


def test_compiler_rejection_is_reported_with_kernel_and_message(tmp_path) -> None:
    (tmp_path / "aot_probe_kernels.py").write_text(textwrap.dedent(_PROBE_KERNELS))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(A.ROOT), TRITON_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", _REJECT, "80", str(tmp_path)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads(r.stdout.strip().splitlines()[-1])
    assert [x["kernel"] for x in recs] == ["aot_probe_kernels:bad", "aot_probe_kernels:good"]
    bad, good = recs
    assert not bad["ok"] and "acc" in bad["error"], bad
    assert good["ok"] and good["entry"] and not good["error"]
