"""Compile check of csrc/ascend against the headers of the torch_npu 2.13.0 wheel.

The wheel is downloaded once (``pip download --no-deps``, cached under the temp dir) and only its
``include/`` tree is unpacked; it is never installed. The translation unit is really compiled
(``g++ -c``) with ``-DCURRENT_VERSION=V2R13``. CANN's aclnn headers are not available here:
csrc/ascend/aclnn_v4k.h declares the entry points it calls, and a static_assert in each call site
checks the converted argument list against those declarations. Linking and running need
torch_npu + CANN and are not done here."""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(tempfile.gettempdir(), "v4k_torch_npu_2.13.0")


def _headers() -> str:
    inc = os.path.join(CACHE, "torch_npu", "include")
    if os.path.isdir(os.path.join(inc, "third_party", "op-plugin")):
        return inc
    os.makedirs(CACHE, exist_ok=True)
    wheels = glob.glob(os.path.join(CACHE, "torch_npu-2.13.0-*.whl"))
    if not wheels:
        p = subprocess.run([sys.executable, "-m", "pip", "download", "torch_npu==2.13.0", "--no-deps", "-q", "-d", CACHE],
                           capture_output=True, text=True, timeout=600)
        wheels = glob.glob(os.path.join(CACHE, "torch_npu-2.13.0-*.whl"))
        if p.returncode != 0 or not wheels:
            pytest.skip(f"torch_npu 2.13.0 wheel could not be downloaded: {(p.stderr or p.stdout)[-300:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(CACHE, [n for n in z.namelist() if n.startswith("torch_npu/include/")])
    return inc


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_csrc_ascend_compiles_against_torch_npu_headers(tmp_path):
    import torch
    from torch.utils.cpp_extension import include_paths

    if not torch.__version__.startswith("2.13"):
        pytest.skip(f"headers are checked with torch 2.13 (CURRENT_VERSION=V2R13), have {torch.__version__}")
    inc = _headers()
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "ascend", "*.cpp")))
    assert sources, "csrc/ascend has no sources"
    flags = ["-std=c++17", "-O0", "-fPIC", "-c", "-DCURRENT_VERSION=V2R13",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}",
             f"-I{inc}", f"-I{os.path.join(inc, 'third_party', 'op-plugin')}",
             f"-I{os.path.join(inc, 'third_party', 'acl', 'inc')}", f"-I{os.path.join(ROOT, 'csrc', 'ascend')}"]
    for src in sources:
        obj = tmp_path / (os.path.basename(src) + ".o")
        p = subprocess.run(["g++", *flags, src, "-o", str(obj)], capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-6000:]
        assert obj.stat().st_size > 0
        syms = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
        # the binding registers on PrivateUse1 and calls through op-plugin's dynamic lookup
        assert "v4k_ascend::sparse_attn" in syms and "GetOpApiFuncAddr" in syms, syms[:2000]
