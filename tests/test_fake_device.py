"""The fake-device harness (v4kernels.testing.fake_device): a Python-backed PrivateUse1 device
under any name, exercised in subprocesses (one rename per process)."""
import textwrap

import pytest

from v4kernels.testing.fake_device import run_in_subprocess

SEMANTICS = textwrap.dedent("""
    import torch, v4kernels
    dev = torch.device(DEV, 0)
    x = torch.randn(4, 8)
    xd = x.to(DEV)
    assert xd.device == dev and xd.shape == (4, 8), (xd.device, xd.shape)
    assert torch.equal((xd * 2 + 1).sum(-1).cpu(), (x * 2 + 1).sum(-1))
    v = xd[:, :4]
    v.fill_(0)                                   # views share memory
    assert torch.equal(xd.cpu()[:, :4], torch.zeros(4, 4)) and torch.equal(xd.cpu()[:, 4:], x[:, 4:])
    y = xd.t().contiguous()
    assert y.is_contiguous() and torch.equal(y.cpu(), xd.cpu().t())
    o = torch.empty(0, device=DEV)
    torch.abs(xd, out=o)                        # out= resizes a device tensor
    assert o.shape == (4, 8) and torch.equal(o.cpu(), xd.cpu().abs())
    z = torch.zeros(3, device=DEV, dtype=torch.bfloat16)
    r = z.add_(1)
    assert r is z and z.dtype == torch.bfloat16 and z.device == dev
    assert int(torch.arange(5, device=DEV)[3].item()) == 3
    assert (torch.arange(8, device=DEV, dtype=torch.int32) & 3).device == dev    # wrapped numbers
    # a kernel registered for the device receives its tensors
    lib = torch.library.Library("fdtest", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    seen = []
    lib.impl("twice", lambda t: (seen.append("cpu"), t * 2)[1], "CPU")
    lib.impl("twice", lambda t: (seen.append(DEV), t * 2)[1], "PrivateUse1")
    torch.ops.fdtest.twice(xd); torch.ops.fdtest.twice(x)
    assert seen == [DEV, "cpu"], seen
    # reference ops run on the device and dispatch sees the device type
    with v4kernels.track_usage() as usage:
        out = v4kernels.rms_norm(xd.bfloat16(), torch.ones(8, device=DEV))
    assert out.device == dev and ("rms_norm", "reference") in usage, usage
    ref = v4kernels.rms_norm(xd.cpu().bfloat16(), torch.ones(8))
    assert torch.equal(out.cpu(), ref)
    print("OK", DEV)
""")


@pytest.mark.parametrize("name", ["npu", "mlu"])
def test_fake_device_semantics(name):
    p = run_in_subprocess(f"DEV = {name!r}\n" + SEMANTICS, device=name, timeout=300)
    assert p.returncode == 0 and f"OK {name}" in p.stdout, p.stdout + p.stderr


def test_one_rename_per_process():
    p = run_in_subprocess(textwrap.dedent("""
        try:
            _fd.install("mlu")
        except RuntimeError as e:
            print("refused:", e)
        _fd.install("npu")   # same name again: no-op
        """), device="npu", timeout=120)
    assert p.returncode == 0 and "refused:" in p.stdout and "once per process" in p.stdout, p.stdout + p.stderr


def test_fake_vendor_module_and_ops():
    p = run_in_subprocess(textwrap.dedent("""
        import importlib.util, torch
        _fd.install_fake_module("vendor_x", {"npu": {"get_soc_version": lambda: 251}, "op": lambda t: t + 1},
                                version="9.9+emulated")
        assert importlib.util.find_spec("vendor_x") is not None
        import vendor_x, vendor_x.npu
        assert vendor_x.__version__ == "9.9+emulated" and vendor_x.npu.get_soc_version() == 251
        _fd.define_fake_ops("_vendor_x", {"inc(Tensor x, *, int by=1) -> Tensor": lambda x, by=1: x + by})
        t = torch.zeros(2, device="npu")
        assert torch.equal(torch.ops._vendor_x.inc(t, by=3).cpu(), torch.full((2,), 3.0))
        try:
            torch.ops._vendor_x.inc(t, 3)        # keyword-only in the schema
        except (RuntimeError, TypeError) as e:
            print("schema enforced")
        """), device="npu", timeout=120)
    assert p.returncode == 0 and "schema enforced" in p.stdout, p.stdout + p.stderr
