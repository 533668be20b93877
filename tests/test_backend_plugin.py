"""Backends as plug-ins: a one-file toy backend through the public API, and discovery through the
``v4kernels.backends`` entry-point group."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import v4kernels as v4k

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "plugins"))


@pytest.fixture
def toy():
    import toy_backend

    backend = toy_backend.register()
    yield backend
    v4k.unregister_backend("toy")


def test_toy_backend_runs_refuses_and_reports(toy):
    x = torch.randn(3, 64)
    with v4k.track_usage() as usage:
        y = v4k.rms_norm(x)
        v4k.rms_norm(x, hf_rounding=True)  # refused: falls back
    assert usage[("rms_norm", "toy")] == 1 and sum(usage.values()) == 2
    with v4k.use_backend("reference"):
        ref = v4k.rms_norm(x)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)

    res, post, comb = torch.randn(2, 4, 8), torch.rand(2, 4), torch.rand(2, 4, 4)
    out = v4k.hc_post(torch.randn(2, 8), res, post, comb)
    assert v4k.last_backend("hc_post") == "toy" and out.shape == (2, 4, 8)
    v4k.hc_post(torch.randn(2, 8).bfloat16(), res.bfloat16(), post, comb)  # refused (fp32 only)
    assert v4k.last_backend("hc_post") != "toy"

    table = v4k.available_backends("rms_norm")
    assert table["toy"] == []
    assert v4k.available_backends("sparse_attn")["toy"] == ["no toy kernel for sparse_attn yet"]
    assert v4k.available_backends("rms_norm", "cuda")["toy"][0].startswith("toy does not run on cuda tensors")
    with v4k.use_backend("toy"), pytest.raises(v4k.BackendUnavailableError, match="toy runs fp32 only"):
        v4k.hc_post(torch.randn(2, 8).bfloat16(), res.bfloat16(), post, comb)


def test_toy_backend_in_parity_suite_and_matrix(toy):
    from v4kernels.__main__ import support_matrix
    from v4kernels.testing import run_parity

    results = run_parity(["toy"], ["rms_norm"], "cpu", False, None)
    ran = [r for r in results if r.status in ("pass", "fail", "error")]
    assert ran and all(r.status == "pass" for r in ran), [(r.case, r.status, r.detail) for r in ran]
    row = next(line for line in support_matrix().splitlines() if "`rms_norm`" in line)
    assert "verified here (toy)" in row


def test_entry_point_discovery(tmp_path):
    """A distribution advertising ``v4kernels.backends`` is registered at import; a broken one is a
    reason (shown by ``info``), never an import error."""
    (tmp_path / "toy_plugin.py").write_text(textwrap.dedent("""
        import v4kernels as v4k
        class PluginBackend(v4k.Backend):
            name = "plugin"
            auto_priority = {"cpu": 50}
        BACKEND = PluginBackend()
    """))
    dist = tmp_path / "toy_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[v4kernels.backends]\nplugin = toy_plugin\nbroken = toy_plugin_missing_module\n")
    code = ("import v4kernels as v4k, v4kernels.backends as B\n"
            "print(sorted(v4k.available_backends('rms_norm')))\n"
            "print(sorted(B.PLUGIN_ERRORS))\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    backends, errors = r.stdout.splitlines()[-2:]
    assert "'plugin'" in backends and errors == "['broken']"
