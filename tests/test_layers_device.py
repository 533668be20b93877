"""The layers keep every tensor on the input's device and never read the device from the host in
a decode step: a CSA and an HCA layer run prefill, decode and a chunk on a fake ``npu`` device.

The fake device (run in a subprocess: the PrivateUse1 backend can be renamed once per process)
is a tensor subclass reporting device ``npu:0`` around a CPU tensor. Every aten op and every
``v4k`` op on it runs on the wrapped CPU tensors, but only after checking that no argument is a
plain CPU tensor (0-dim scalars excepted, as on real accelerators): a tensor the layer left on
the CPU fails the op that meets it. Factories with ``device="npu"`` allocate wrapped tensors.
Device-to-host reads (``.item()``, ``.tolist()``, copies to the CPU) are counted; a decode step
must make none.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r'''
    import sys
    import torch
    from torch.utils._pytree import tree_map

    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    _setup_privateuseone_for_python_backend("npu")  # rename + dummy device module, hooks and guard
    NPU = torch.device("npu", 0)
    aten = torch.ops.aten
    READS = []
    _TRANSFERS = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default}

    class NpuTensor(torch.Tensor):
        @staticmethod
        def __new__(cls, inner):
            t = torch.Tensor._make_wrapper_subclass(cls, inner.size(), strides=inner.stride(),
                storage_offset=inner.storage_offset(), dtype=inner.dtype, device=NPU, requires_grad=False)
            t.inner = inner
            return t

        def __repr__(self):
            return f"NpuTensor({self.inner!r})"

        def data_ptr(self):  # a real device tensor has its own address (aliasing checks compare them)
            return self.inner.data_ptr()

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            if func not in _TRANSFERS:
                strays = [a for a in flat if not isinstance(a, NpuTensor) and a.device.type == "cpu" and a.dim() > 0]
                if strays:
                    raise RuntimeError(f"{func}: CPU tensor {list(strays[0].shape)} {strays[0].dtype} mixed with npu tensors")
            if func is aten._local_scalar_dense.default:
                READS.append(str(func))
            if func is aten._to_copy.default and torch.device(kwargs.get("device") or NPU).type == "cpu":
                READS.append("to(cpu)")
            inner_of = {}
            def unwrap(a):
                if isinstance(a, NpuTensor):
                    inner_of[id(a.inner)] = a
                    return a.inner
                if isinstance(a, torch.device) and a.type == "npu":
                    return torch.device("cpu")
                return a
            out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
            to_cpu = func is aten._to_copy.default and torch.device(kwargs.get("device") or NPU).type == "cpu"
            def wrap(o):
                if isinstance(o, torch.Tensor) and not isinstance(o, NpuTensor):
                    if id(o) in inner_of:
                        return inner_of[id(o)]
                    return o if to_cpu else NpuTensor(o)
                return o
            return tree_map(wrap, out)

    lib = torch.library.Library("aten", "IMPL")
    def _empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
        return NpuTensor(torch.empty(size, dtype=dtype or torch.get_default_dtype()))
    def _empty_strided(size, stride, dtype=None, layout=None, device=None, pin_memory=None):
        return NpuTensor(torch.empty_strided(size, stride, dtype=dtype or torch.get_default_dtype()))
    def _copy_from(src, dst, non_blocking=False):
        s = src.inner if isinstance(src, NpuTensor) else src
        if isinstance(dst, NpuTensor):
            dst.inner.copy_(s)
        else:
            READS.append("copy to cpu")
            dst.copy_(s)
        return dst
    lib.impl("empty.memory_format", _empty, "PrivateUse1")
    lib.impl("empty_strided", _empty_strided, "PrivateUse1")
    lib.impl("_copy_from", _copy_from, "PrivateUse1")

    import v4kernels as v4k
    from v4kernels.layers.attention import V4Attention
    from v4kernels.layers.config import V4Config

    if "--break" in sys.argv:  # the bug this test exists for: index lists left on the CPU
        _wi = v4k.window_indices
        v4k.window_indices = lambda *a, device=None, **k: _wi(*a, **k)

    cfg = V4Config(dim=64, n_heads=4, q_lora_rank=32, o_groups=2, o_lora_rank=16, index_topk=4, n_routed_experts=4,
                   moe_inter_dim=32, route_scale=1.5, head_dim=32, rope_head_dim=8, window_size=8, index_n_heads=2,
                   index_head_dim=16, hc_mult=2)
    g = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(2, 24, cfg.dim, generator=g)
    for ratio in (4, 8):  # CSA (indexer, overlapping windows), HCA
        ref = V4Attention(cfg, ratio, seed=1, simulate_quant=False, dtype=torch.float32)
        dev = V4Attention(cfg, ratio, seed=1, simulate_quant=False, dtype=torch.float32, device=NPU)
        assert all(isinstance(t, NpuTensor) for t in dev.buffers()), "a weight stayed on the CPU"
        c_ref = ref.new_cache(2, 32)
        c_dev = dev.new_cache(2, 32, device=NPU)
        x = x_cpu.to(NPU)
        assert isinstance(x, NpuTensor)
        with torch.no_grad():
            outs = [(ref(x_cpu[:, :17], c_ref, 0), dev(x[:, :17], c_dev, 0))]
            for p in (17, 18):
                READS.clear()
                outs.append((ref(x_cpu[:, p : p + 1], c_ref, p), dev(x[:, p : p + 1], c_dev, p)))
                assert not READS, f"ratio {ratio}: decode step read the device from the host: {READS}"
            outs.append((ref(x_cpu[:, 19:24], c_ref, 19), dev(x[:, 19:24], c_dev, 19)))
        for want, got in outs:
            assert isinstance(got, NpuTensor)
            torch.testing.assert_close(got.inner, want)
        print(f"ratio {ratio}: prefill, 2 decode steps and a chunk on npu match the CPU run")
    print("OK")
''')


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, V4K_CHECKS="auto")  # accelerator default: no value checks (they sync)
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)


def test_layers_stay_on_the_device_without_host_reads():
    r = _run()
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_fake_device_catches_an_index_list_left_on_the_cpu():
    r = _run("--break")
    assert r.returncode != 0, r.stdout
    assert "mixed with npu" in r.stderr or "must be on the same device" in r.stderr, r.stderr[-2000:]
