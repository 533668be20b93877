"""Contract tests of the ``cambricon`` backend without an MLU.

The adapters (``v4kernels/ops/*/cambricon.py``) run on CPU tensors against PyTorch emulations of
the torch_mlu_ops functions they call (``tests/vendor/cambricon_ops.py``, written from the
published signatures and behaviour, installed as ``torch_mlu_ops``). Every adapter + emulated op
must match the reference on the shared parity cases, refuse what it declares, and route on a
fake ``mlu`` device. This verifies the bridging, not Cambricon's kernels.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import v4kernels as v4k
from v4kernels import _registry as R
from v4kernels.backends import cambricon as camb_mod
from v4kernels.testing import run_case, select_cases

HERE = os.path.dirname(os.path.abspath(__file__))
EMULATION = os.path.join(HERE, "vendor", "cambricon_ops.py")


def _load_emulation():
    spec = importlib.util.spec_from_file_location("torch_mlu_ops", EMULATION)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class EmulatedCambricon(camb_mod.CambriconBackend):
    """The cambricon backend, allowed on CPU tensors when forced, with the emulation as its
    vendor module (availability = the emulation imports)."""

    forced_only_devices = frozenset({"cpu"})

    def backend_reasons(self, device_type: str) -> list[str]:
        self.tmo()
        return []


@pytest.fixture(scope="module")
def tmo():
    saved = sys.modules.get("torch_mlu_ops")
    emu = _load_emulation()
    sys.modules["torch_mlu_ops"] = emu
    camb_mod.CambriconBackend.tmo.cache_clear()
    R.register_backend(EmulatedCambricon(), replace=True)
    try:
        yield emu
    finally:
        R.register_backend(camb_mod.BACKEND, replace=True)
        camb_mod.CambriconBackend.tmo.cache_clear()
        if saved is None:
            sys.modules.pop("torch_mlu_ops", None)
        else:
            sys.modules["torch_mlu_ops"] = saved


ADAPTED = ["sparse_attn", "indexer_topk", "hc_split_sinkhorn", "hc_pre", "hc_post", "moe_gate", "moe_experts",
           "apply_rope", "rms_norm", "compress_kv"]


def test_every_adapter_registered_and_every_other_op_explained(tmo):
    b = R.get_backend("cambricon")
    b.load()
    assert not b.load(), b.load()
    have = set(R._KERNELS.get("cambricon", {}))
    assert have == set(ADAPTED), have ^ set(ADAPTED)
    for op in R.op_names():
        if op in have:
            assert camb_mod.LIMITS.get(op), f"{op}: adapter without declared limits"
        else:
            reasons = b.op_reasons(op, "mlu")
            assert reasons and reasons[0].startswith(f"no cambricon kernel for {op}: no torch_mlu_ops equivalent"), \
                (op, reasons)


@pytest.mark.parametrize("op", ADAPTED)
def test_parity_cases(tmo, op):
    """Each adapter + emulated op against the reference on the shared parity cases; a case may
    only be skipped by one of the adapter's declared refusals."""
    # NaN/inf inputs: the vendor ops' contracts do not define them (docs/numerics.md, "Vendor ops")
    cases = [c for c in select_cases([op]) if "/nonfinite_" not in c.name]
    assert cases, op
    passed = 0
    for case in cases:
        r = run_case(case, "cambricon", "cpu")
        if r.status == "skip":
            assert "cambricon" in r.detail, (case.name, r.detail)
            continue
        assert r.status == "pass", (case.name, r.status, r.detail)
        passed += 1
    assert passed, f"no {op} parity case ran on the cambricon adapter"


def _forced(op):
    return v4k.use_backend("cambricon", ops=[op])


def test_sparse_attn_fp8_rows_both_paths_and_head_groups(tmo):
    g = torch.Generator().manual_seed(0)
    for b, m, n, k, h in ((1, 6, 5, 8, 4), (2, 1, 64, 8, 300)):  # whole-buffer and gathered dequant; H > 256
        q = torch.randn(b, m, h, 512, generator=g).bfloat16()
        kv = torch.randn(b, n, 512, generator=g).bfloat16()
        packed = v4k.pack_kv_fp8(kv)
        idx = torch.randint(-1, n, (b, m, k), generator=g, dtype=torch.int32)
        idx[0, 0] = -1  # an all-skipped row -> zeros
        sink = torch.randn(h, generator=g)
        for cache in (kv, packed):
            with _forced("sparse_attn"), v4k.track_usage() as usage:
                out = v4k.sparse_attn(q, cache, sink, idx, 512 ** -0.5)
            assert usage[("sparse_attn", "cambricon")] == 1
            with v4k.use_backend("reference"):
                ref = v4k.sparse_attn(q, cache, sink, idx, 512 ** -0.5)
            torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1.6e-2)
            assert torch.count_nonzero(out[0, 0]) == 0


def test_hc_post_at_v4_flash_width(tmo):
    """fused_mhc_post takes D = 4096, HC = 4 only: the adapter runs there and refuses elsewhere."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4096, generator=g).bfloat16()
    res = torch.randn(3, 4, 4096, generator=g).bfloat16()
    post, comb = torch.rand(3, 4, generator=g), torch.rand(3, 4, 4, generator=g)
    with _forced("hc_post"):
        out = v4k.hc_post(x, res, post, comb)
    with v4k.use_backend("reference"):
        ref = v4k.hc_post(x, res, post, comb)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1.6e-2)
    with _forced("hc_post"), pytest.raises(v4k.BackendUnavailableError, match="fused_mhc_post takes only HC"):
        v4k.hc_post(x[:, :7168 // 2], res[..., :7168 // 2], post, comb)
    with pytest.raises(tmo.TMOError, match="D must be 4096"):
        tmo.fused_mhc_post(x[:, :64], res[..., :64], post, comb, False, 1e-6)


def test_moe_refusals_and_expert_parallel_mask(tmo):
    from v4kernels.ops.moe.reference import quantize_fp8_blocks

    g = torch.Generator().manual_seed(2)
    t, d, inter, e, k = 5, 64, 32, 4, 2
    x = torch.randn(t, d, generator=g).bfloat16()
    w1, w3 = (torch.randn(e, inter, d, generator=g).bfloat16() * 0.1 for _ in range(2))
    w2 = torch.randn(e, d, inter, generator=g).bfloat16() * 0.1
    wts = torch.rand(t, k, generator=g)
    ids = torch.randint(0, e, (t, k), generator=g, dtype=torch.int32)
    ids[1, 0] = -1
    for after in (False, True):
        with _forced("moe_experts"):
            out = v4k.moe_experts(x, wts, ids, w1, w3, w2, swiglu_limit=10.0, weight_after_w2=after,
                                  out_dtype=torch.float32)
        with v4k.use_backend("reference"):
            ref = v4k.moe_experts(x, wts, ids, w1, w3, w2, swiglu_limit=10.0, weight_after_w2=after,
                                  out_dtype=torch.float32)
        torch.testing.assert_close(out, ref, atol=1e-2, rtol=1.6e-2)
    xq = torch.randn(t, 128, generator=g).bfloat16()
    wq = [quantize_fp8_blocks(torch.randn(e, *shape, generator=g) * 0.1) for shape in ((128, 128),) * 3]
    with _forced("moe_experts"), pytest.raises(v4k.BackendUnavailableError, match="expert weights must be float"):
        v4k.moe_experts(xq, wts, ids, wq[0][0], wq[1][0], wq[2][0], w1_scale=wq[0][1], w3_scale=wq[1][1],
                        w2_scale=wq[2][1])
    with _forced("moe_experts"), pytest.raises(v4k.BackendUnavailableError, match="swiglu_limit must be"):
        v4k.moe_experts(x, wts, ids, w1, w3, w2, swiglu_limit=7.5)
    with _forced("moe_gate"), pytest.raises(v4k.BackendUnavailableError, match="hf_eps"):
        v4k.moe_gate(x, torch.randn(e, d, generator=g), topk=k, hf_eps=True)


def test_auto_dispatch_falls_back_on_refusal(tmo):
    """A refused call goes to the next backend, and an unrefused one to cambricon, on the same op."""
    x = torch.randn(4, 64)
    with v4k.use_backend("cambricon", ops=["rms_norm"]), v4k.track_usage() as usage:
        v4k.rms_norm(x, torch.ones(64))
    assert usage == {("rms_norm", "cambricon"): 1}
    with v4k.use_backend("cambricon", ops=["rms_norm"]), pytest.raises(v4k.BackendUnavailableError,
                                                                        match="hf_rounding"):
        v4k.rms_norm(x, torch.ones(64), hf_rounding=True)


def test_emulation_refuses_what_the_vendor_documents(tmo):
    q = torch.randn(1, 1, 300, 512).bfloat16()
    cache = torch.randn(4, 1, 1, 512).bfloat16()
    out = torch.empty_like(q)
    tables = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(tmo.TMOError, match="exceeds 256"):
        tmo.single_query_cached_kv_attn(q, cache, None, out, tables, torch.ones(1, dtype=torch.int32), None, None,
                                        None, 4, -1, -1, 1.0)
    with pytest.raises(tmo.TMOError, match="expert ids must lie"):
        tmo.moe_gen_idx(torch.tensor([[0, 5]], dtype=torch.int32), 4)


def test_info_explains_mlu_fallbacks():
    """Without torch_mlu, info --device mlu -v names why cambricon cannot run, per op. (The device
    name "mlu" exists only once torch_mlu, or here a PrivateUse1 rename, has registered it.)"""
    code = ("import torch, sys; torch.utils.rename_privateuse1_backend('mlu'); "
            "from v4kernels.__main__ import main; sys.exit(main(['info', '--device', 'mlu', '-v']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    attn = next(i for i, line in enumerate(lines) if line.strip().startswith("sparse_attn "))
    block = "\n".join(lines[attn:attn + 8])
    assert "cambricon" in block and "torch_mlu" in block, block
    hc_head = next(i for i, line in enumerate(lines) if line.strip().startswith("hc_head "))
    assert "no torch_mlu_ops equivalent" in "\n".join(lines[hc_head:hc_head + 8])


_FAKE_MLU_SETUP = f"""
import importlib.util, sys
_spec = importlib.util.spec_from_file_location("torch_mlu_ops", {EMULATION!r})
_tmo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tmo)
sys.modules["torch_mlu_ops"] = _tmo
_fd.install_fake_module("torch_mlu", {{}}, version="emulated")
"""

_FAKE_MLU_ROUTING = """
import torch, v4kernels as v4k
from v4kernels import _registry as R

dev = "mlu"
g = torch.Generator().manual_seed(0)
cpu = {
    "q": torch.randn(2, 1, 8, 512, generator=g).bfloat16(), "kv": torch.randn(2, 40, 512, generator=g).bfloat16(),
    "sink": torch.randn(8, generator=g), "idx": torch.randint(-1, 40, (2, 1, 16), generator=g, dtype=torch.int32),
    "x": torch.randn(3, 4096, generator=g).bfloat16(), "res": torch.randn(3, 4, 4096, generator=g).bfloat16(),
    "post": torch.rand(3, 4, generator=g), "comb": torch.rand(3, 4, 4, generator=g),
}
on = {k: v.to(dev) for k, v in cpu.items()}
assert on["q"].device.type == "mlu"
with v4k.track_usage() as usage:
    a = v4k.sparse_attn(on["q"], on["kv"], on["sink"], on["idx"])
    p = v4k.hc_post(on["x"], on["res"], on["post"], on["comb"])
    p_small = v4k.hc_post(on["x"][:, :40], on["res"][..., :40], on["post"], on["comb"])  # refused: D != 4096
    h = v4k.rms_norm(on["x"], None)
    hh = v4k.rms_norm(on["x"], None, hf_rounding=True)  # refused variant
    v4k.hc_head(on["res"], torch.randn(4, 4 * 4096, generator=g).to(dev) * 0.01, torch.rand(1).to(dev),
                torch.randn(4).to(dev))  # no vendor op
print("USAGE", sorted(usage.items()))
assert usage[("sparse_attn", "cambricon")] == 1 and usage[("rms_norm", "cambricon")] == 1, usage
assert usage[("hc_post", "cambricon")] == 1 and usage[("hc_post", "reference")] == 1, usage
assert usage[("rms_norm", "reference")] == 1 and usage[("hc_head", "reference")] == 1, usage
assert a.device.type == "mlu" and p.device.type == "mlu"
with v4k.use_backend("reference"):
    ra = v4k.sparse_attn(cpu["q"], cpu["kv"], cpu["sink"], cpu["idx"])
    rp = v4k.hc_post(cpu["x"], cpu["res"], cpu["post"], cpu["comb"])
torch.testing.assert_close(a.cpu().float(), ra.float(), atol=1e-2, rtol=1.6e-2)
torch.testing.assert_close(p.cpu().float(), rp.float(), atol=1e-2, rtol=1.6e-2)

# Triton is a candidate on mlu only when the installed Triton targets MLU
why = R.available_backends("rms_norm", dev)["triton"]
assert why and "triton.backends.mlu" in why[0], why
_fd.install_fake_module("triton.backends.mlu", {})
R.clear_dispatch_cache()
assert R.get_backend("triton").backend_reasons(dev) == [], R.get_backend("triton").backend_reasons(dev)
order = [b.name for b in R.candidates("rms_norm", dev)]
assert order[:2] == ["cambricon", "triton"], order
print("ROUTING OK")
"""


def test_routing_on_fake_mlu_device():
    """On a fake ``mlu`` device (PrivateUse1 renamed, in a subprocess) with emulated torch_mlu and
    torch_mlu_ops, automatic dispatch reaches the cambricon adapters, falls back on refusals and
    for ops without a vendor op, and considers Triton only when it targets MLU."""
    from v4kernels.testing import fake_device

    r = fake_device.run_in_subprocess(_FAKE_MLU_ROUTING, device="mlu", setup=_FAKE_MLU_SETUP, timeout=600)
    assert r.returncode == 0 and "ROUTING OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_info_on_fake_mlu_device_shows_adapters_usable():
    from v4kernels.testing import fake_device

    code = "from v4kernels.__main__ import main; main(['info', '--device', 'mlu', '-v'])"
    r = fake_device.run_in_subprocess(code, device="mlu", setup=_FAKE_MLU_SETUP, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    usable = {line.split()[0]: line.split("usable:")[1] for line in r.stdout.splitlines() if "usable:" in line}
    for op in ADAPTED:
        assert usable[op].strip().startswith("cambricon"), (op, usable[op])
    assert usable["hc_head"].strip().startswith("reference"), usable["hc_head"]


def test_parity_cli_on_fake_mlu_device():
    """``python -m v4kernels parity --device mlu --backend cambricon`` on fake mlu tensors: the
    adapters keep every tensor they make on the input's device."""
    from v4kernels.testing import fake_device

    ops = ["sparse_attn", "indexer_topk", "moe_experts", "compress_kv", "apply_rope", "hc_post"]
    args = ["parity", "--device", "mlu", "--backend", "cambricon"] + [a for op in ops for a in ("--op", op)]
    code = f"import sys; from v4kernels.__main__ import main; sys.exit(main({args!r}))"
    r = fake_device.run_in_subprocess(code, device="mlu", setup=_FAKE_MLU_SETUP, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " 0 failed" in r.stdout, r.stdout[-2000:]


def test_mlu_check_script_on_fake_mlu_device():
    """bench/mlu_check.py's hardware path (probe, parity on mlu tensors, timed workloads with the
    reference check) end to end on a fake mlu device; exit status 0 only when everything passed."""
    from v4kernels.testing import fake_device

    script = os.path.join(HERE, "..", "bench", "mlu_check.py")
    code = (f"import sys, runpy; sys.argv = ['mlu_check.py', '--quick', '--only', 'rms_norm,hc_post']; "
            f"runpy.run_path({script!r}, run_name='__main__')")
    r = fake_device.run_in_subprocess(code, device="mlu", setup=_FAKE_MLU_SETUP, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"parity: [1-9]\d* passed, 0 failed", r.stdout) and "reference checks of timed workloads: 2 passed, 0 failed" in r.stdout, r.stdout


def test_build_hook(tmp_path):
    """csrc/cambricon has no sources: nothing to build. With sources but no torch_mlu the build is
    skipped with the reason recorded, or fails under V4K_BUILD_MLU=1; V4K_BUILD_MLU=0 skips."""
    from v4kernels.backends import BuildContext

    repo = os.path.join(HERE, "..")

    def run(root, flags):
        rec = {}
        ctx = BuildContext(root, lambda name: flags.get(name) or None, lambda k, v: rec.__setitem__(k, v))
        return camb_mod.BACKEND.build_extensions(ctx), rec["cambricon"]

    (exts, cmd), msg = run(repo, {})
    assert exts == [] and cmd == {} and msg.startswith("nothing to build")
    src = tmp_path / "csrc" / "cambricon"
    src.mkdir(parents=True)
    (src / "kernels.mlu").write_text("// BANG C\n")
    (exts, _), msg = run(str(tmp_path), {})
    assert exts == [] and "torch_mlu" in msg and msg.startswith("skipped")
    with pytest.raises(ImportError):
        run(str(tmp_path), {"V4K_BUILD_MLU": "1"})
    assert run(str(tmp_path), {"V4K_BUILD_MLU": "0"})[1] == "skipped: V4K_BUILD_MLU=0"


def test_mlu_triton_launch_row_covers_every_kernel():
    """The mlu row declares every kernel and parameter the other rows declare (block_config reads
    it for mlu tensors)."""
    from v4kernels.backends.cuda import CUDA_TRITON_BLOCKS

    row = R.triton_launch_row("mlu")
    assert row is camb_mod.MLU_TRITON_BLOCKS
    assert {k: set(v) for k, v in row.items()} == {k: set(v) for k, v in CUDA_TRITON_BLOCKS.items()}
    assert all(isinstance(n, int) and (n > 0 or p == "FORCE_SPLIT") for params in row.values() for p, n in params.items())
