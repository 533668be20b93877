"""Backends and dispatch: availability reasons, forcing (context manager, per op,
nesting, V4K_BACKEND), automatic fallback, usage accounting, lazy imports and broken backends."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import v4kernels as v4k
import v4kernels._registry as R
from v4kernels.ops import rope_norm as rope_norm_pkg

SIX = {"reference", "triton", "cpu", "cuda", "ascend", "cambricon"}
X = torch.randn(2, 8)


def test_available_backends_lists_all_six_with_reasons():
    table = v4k.available_backends("rms_norm")
    assert set(table) == SIX
    assert table["reference"] == []
    for name in ("cuda", "ascend", "cambricon"):
        assert table[name] and all(isinstance(r, str) and r for r in table[name]), name
    assert "cambricon" in table["cambricon"][0] and "cpu" in table["cambricon"][0]
    full = v4k.available_backends()
    assert set(full) == set(v4k.op_names()) and all(set(v) == SIX and v["reference"] == [] for v in full.values())
    with pytest.raises(ValueError, match="available_backends: unknown op 'nope'"):
        v4k.available_backends("nope")


def test_forced_backend_that_cannot_run_raises_with_reasons():
    reasons = v4k.available_backends("rms_norm")["cambricon"]
    with v4k.use_backend("cambricon"):
        with pytest.raises(v4k.BackendUnavailableError, match="'cambricon' was requested for rms_norm on cpu") as ei:
            v4k.rms_norm(X)
    assert all(r in str(ei.value) for r in reasons)
    assert torch.equal(v4k.rms_norm(X), R.reference_kernel("rms_norm")(X, None, 1e-6, False))  # restored


def test_per_op_forcing_and_nesting():
    with v4k.use_backend("cambricon", ops="rms_norm"):
        with pytest.raises(v4k.BackendUnavailableError):
            v4k.rms_norm(X)
        v4k.hadamard_transform(X)  # other ops are not forced
        assert v4k.last_backend("hadamard_transform") != "cambricon"
        with v4k.use_backend("reference"):  # inner scope wins
            v4k.rms_norm(X)
            assert v4k.last_backend("rms_norm") == "reference"
            with v4k.use_backend("ascend", ops=["hadamard_transform"]):
                v4k.rms_norm(X)
                with pytest.raises(v4k.BackendUnavailableError, match="ascend"):
                    v4k.hadamard_transform(X)
        with pytest.raises(v4k.BackendUnavailableError):  # back to the outer scope
            v4k.rms_norm(X)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        with v4k.use_backend("gpu"):
            pass
    with pytest.raises(ValueError, match="use_backend: unknown op 'rmsnorm'"):
        with v4k.use_backend("reference", ops="rmsnorm"):
            pass


def test_env_var_forcing(monkeypatch):
    monkeypatch.setenv("V4K_BACKEND", "cambricon")
    with pytest.raises(v4k.BackendUnavailableError, match="cambricon"):
        v4k.rms_norm(X)
    with v4k.use_backend("reference"):  # the context manager beats the environment
        v4k.rms_norm(X)
    monkeypatch.setenv("V4K_BACKEND", "rms_norm=cambricon, hadamard_transform=reference")
    with pytest.raises(v4k.BackendUnavailableError, match="cambricon"):
        v4k.rms_norm(X)
    v4k.hadamard_transform(X)
    assert v4k.last_backend("hadamard_transform") == "reference"
    # "cpu" form: the native CPU backend either runs or raises with its reason (never falls back)
    monkeypatch.setenv("V4K_BACKEND", "cpu")
    cpu_reasons = v4k.available_backends("rms_norm")["cpu"]
    if cpu_reasons:
        with pytest.raises(v4k.BackendUnavailableError, match="'cpu' was requested") as ei:
            v4k.rms_norm(X)
        assert cpu_reasons[0] in str(ei.value)
    else:
        v4k.rms_norm(X)
        assert v4k.last_backend("rms_norm") == "cpu"
    monkeypatch.setenv("V4K_BACKEND", "nosuch")
    with pytest.raises(ValueError, match="unknown backend 'nosuch'"):
        v4k.rms_norm(X)



class _FakeBackend(v4k.Backend):
    name = "fake"
    description = "test double"
    auto_priority = {"cpu": 1}
    module = "fake_test_backend"
    tolerances = R.get_backend("reference").tolerances


@pytest.fixture
def fake_backend():
    b = v4k.register_backend(_FakeBackend)
    yield b
    v4k.unregister_backend("fake")


def test_priority_fallback_and_usage(fake_backend):
    calls = []

    def refusals(x, weight, eps, hf_rounding):
        return [f"fake handles only even widths, got {x.shape[-1]}"] if x.shape[-1] % 2 else []

    @v4k.register_kernel("fake", "rms_norm", refusals=refusals)
    def fake_rms(x, weight, eps, hf_rounding):
        calls.append(x.shape)
        return torch.zeros_like(x)

    with v4k.track_usage() as usage:
        assert torch.equal(v4k.rms_norm(X), torch.zeros_like(X))  # highest priority wins
        assert v4k.last_backend("rms_norm") == "fake"
        odd = torch.randn(2, 7)
        y = v4k.rms_norm(odd)  # refused by refusals(): automatic fallback to the reference
        assert v4k.last_backend("rms_norm") == "reference"
        assert torch.equal(y, R.reference_kernel("rms_norm")(odd, None, 1e-6, False))
        v4k.hadamard_transform(X)  # fake has no kernel: falls back
        assert v4k.last_backend("hadamard_transform") != "fake"
        with v4k.use_backend("fake"):
            with pytest.raises(v4k.BackendUnavailableError, match="fake handles only even widths, got 7"):
                v4k.rms_norm(odd)
            with pytest.raises(v4k.BackendUnavailableError, match="no fake kernel for hadamard_transform yet"):
                v4k.hadamard_transform(X)
    assert usage[("rms_norm", "fake")] == 1 and usage[("rms_norm", "reference")] == 1
    assert v4k.backend_usage() == {}  # outside track_usage nothing is counted
    assert len(calls) == 1
    assert "fake" in v4k.available_backends("rms_norm") and v4k.available_backends("rms_norm")["fake"] == []


def test_register_backend_validates():
    with pytest.raises(TypeError, match="expected a v4kernels.backends.Backend"):
        v4k.register_backend(object())

    class BadName(v4k.Backend):
        name = "not an identifier"

    with pytest.raises(ValueError, match="must be an identifier"):
        v4k.register_backend(BadName)

    class BadPriority(v4k.Backend):
        name = "badprio"
        auto_priority = {"cpu": "high"}

    with pytest.raises(TypeError, match="auto_priority must map device type"):
        v4k.register_backend(BadPriority)

    class Clash(v4k.Backend):
        name = "cpu"

    with pytest.raises(ValueError, match="already registered"):
        v4k.register_backend(Clash)
    with pytest.raises(ValueError, match="in-tree backend"):
        v4k.unregister_backend("cpu")
    with pytest.raises(ValueError, match="unknown op 'no_such_op'"):
        v4k.register_kernel("cpu", "no_such_op")


def test_broken_backend_module_shows_as_reason(monkeypatch, tmp_path):
    # a kernel module of the backend that fails to import, found through the family package
    (tmp_path / "broken_test_backend.py").write_text("raise ImportError('vendor library libfoo.so missing')\n")
    monkeypatch.setattr(rope_norm_pkg, "__path__", [*rope_norm_pkg.__path__, str(tmp_path)])

    class Broken(_FakeBackend):
        name = "broken"
        module = "broken_test_backend"

    v4k.register_backend(Broken)
    try:
        reasons = v4k.available_backends("rms_norm")["broken"]
        assert len(reasons) == 1 and "v4kernels.ops.rope_norm.broken_test_backend failed to import" in reasons[0]
        assert "ImportError: vendor library libfoo.so missing" in reasons[0]
        assert v4k.available_backends("hc_pre")["broken"] == ["no broken kernel for hc_pre yet"]
        y = v4k.rms_norm(X)  # automatic choice skips it
        assert v4k.last_backend("rms_norm") != "broken" and y.shape == X.shape
        with v4k.use_backend("broken"):
            with pytest.raises(v4k.BackendUnavailableError, match="libfoo.so missing"):
                v4k.rms_norm(X)
    finally:
        v4k.unregister_backend("broken")


def test_import_is_lazy():
    code = (
        "import sys, v4kernels, v4kernels._platform as P\n"
        "assert 'triton' not in sys.modules, 'triton imported at import time'\n"
        "for n in ('torch_npu', 'torch_mlu', 'v4kernels._C_cpu', 'v4kernels._C_cuda'):\n"
        "    assert n not in sys.modules, n\n"
        "for f in (P.triton_probe, P.cuda_probe, P.npu_probe, P.mlu_probe):\n"
        "    assert f.cache_info().currsize == 0, f.__name__\n"
        "print('ok', len(v4kernels.op_names()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


# ----------------------------------------------------------------------------- dispatch fast path
def _signatures():
    sigs = [R._py_signature]
    R.signature((X,))  # first use switches to the CPU extension's helper when it is built
    if R._sig is not R._py_signature:
        sigs.append(R._sig)
    return sigs


@pytest.mark.parametrize("sig", _signatures(), ids=lambda f: "native" if f is not R._py_signature else "python")
def test_signature_tells_apart_what_checks_and_selection_depend_on(sig):
    base = sig((X, None, True, 1e-6, "fp8", torch.float32))
    assert base == sig((X.clone(), None, True, 1e-6, "fp8", torch.float32))  # values do not count
    assert base == sig((X.t().contiguous().t(), None, True, 1e-6, "fp8", torch.float32))  # nor strides
    different = [
        (X.double(), None, True, 1e-6, "fp8", torch.float32),  # dtype
        (X.reshape(4, 4), None, True, 1e-6, "fp8", torch.float32),  # shape
        (X.requires_grad_(False).clone().requires_grad_(True), None, True, 1e-6, "fp8", torch.float32),
        (X, X, True, 1e-6, "fp8", torch.float32),  # None vs a tensor
        (X, None, 1, 1e-6, "fp8", torch.float32),  # True vs 1
        (X, None, True, 1e-5, "fp8", torch.float32),
        (X, None, True, 1e-6, "fp4", torch.float32),
        (X, None, True, 1e-6, "fp8", torch.bfloat16),
        (X, None, True, 1e-6, "fp8", torch.float32, [X, 2]),
    ]
    keys = [sig(a) for a in different]
    assert base not in keys and len(set(keys)) == len(keys)
    with torch.no_grad():
        assert sig((X, None, True, 1e-6, "fp8", torch.float32)) != base  # grad mode is part of it

    class Sub(torch.Tensor):
        pass

    assert sig((X.as_subclass(Sub),)) is None and sig((object(),)) is None
    big = sig((2**70,))
    assert big is None or big != sig((2**70 + 1,))  # never confused: no key, or an exact one


def test_selection_is_remembered_per_signature_unless_refusals_read_values(fake_backend):
    consulted = []

    def structural(x, weight, eps, hf_rounding):
        consulted.append("structural")
        return []

    def by_value(x, weight, eps, hf_rounding):
        consulted.append("value")
        return ["fake refuses negative first entries"] if float(x.flatten()[0]) < 0 else []

    v4k.register_kernel("fake", "rms_norm", refusals=structural)(lambda x, w, e, h: torch.zeros_like(x))
    pos = X.abs() + 1
    for _ in range(3):
        assert torch.equal(v4k.rms_norm(pos), torch.zeros_like(pos))
    assert consulted == ["structural"]  # asked once for this signature
    v4k.rms_norm(torch.randn(3, 8))
    assert consulted == ["structural"] * 2  # a new signature asks again

    consulted.clear()
    v4k.register_kernel("fake", "rms_norm", refusals=by_value, refusals_read_values=True)(
        lambda x, w, e, h: torch.zeros_like(x))
    v4k.rms_norm(pos)
    assert v4k.last_backend("rms_norm") == "fake"
    v4k.rms_norm(-pos)  # same signature, refused by value: the reference runs
    assert v4k.last_backend("rms_norm") == "reference"
    v4k.rms_norm(pos)
    assert v4k.last_backend("rms_norm") == "fake" and consulted == ["value"] * 3


def test_remembered_routes_follow_registration_and_forcing(fake_backend):
    v4k.rms_norm(X)
    assert v4k.last_backend("rms_norm") != "fake"  # fake has no kernel yet
    v4k.register_kernel("fake", "rms_norm")(lambda x, w, e, h: torch.zeros_like(x))
    assert torch.equal(v4k.rms_norm(X), torch.zeros_like(X)) and v4k.last_backend("rms_norm") == "fake"
    with v4k.use_backend("reference"):
        assert not torch.equal(v4k.rms_norm(X), torch.zeros_like(X))
    with v4k.track_usage() as usage:
        v4k.rms_norm(X)
    assert usage == {("rms_norm", "fake"): 1}
    Y = X.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="rms_norm has no backward"):  # autograd still sees the op
        v4k.rms_norm(Y)


def test_public_functions_trace_in_one_graph():
    """torch.compile(fullgraph=True) of the public functions: the handle takes the custom op when
    compiling, before any native fast-path helper (which dynamo cannot trace) is called, and the
    checks that read values run inside the custom op, not in the traced wrapper."""
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(1, 2, 4, 64, generator=g), torch.randn(1, 10, 64, generator=g)
    sink, idx = torch.zeros(4), torch.randint(0, 10, (1, 2, 3), dtype=torch.int32, generator=g)
    x, res = torch.randn(2, 1, 64, generator=g), torch.randn(2, 1, 4, 64, generator=g)
    post, comb = torch.rand(2, 1, 4, generator=g), torch.rand(2, 1, 4, 4, generator=g)
    pos, freqs = torch.arange(2).reshape(2, 1), v4k.v4_rope_frequencies(True)[:32]
    xe = torch.randn(4, 128, generator=g).bfloat16()
    w1, w3 = (torch.randn(3, 64, 128, generator=g).bfloat16() / 11 for _ in range(2))
    w2 = torch.randn(3, 128, 64, generator=g).bfloat16() / 8
    ids = torch.tensor([[0, 1], [2, -1], [1, 1], [-1, -1]], dtype=torch.int32)
    qi, wi, keys = torch.randn(1, 2, 4, 64, generator=g), torch.rand(1, 2, 4, generator=g), torch.randn(1, 6, 64, generator=g)
    ipos = torch.tensor([[20, 21]])
    xc = torch.randn(1, 8, 64, generator=g)
    wkv, wgate, ape = (torch.randn(*shape, generator=g) / 8 for shape in ((64, 64), (64, 64), (4, 64)))

    def compress():
        state = v4k.CompressorState.empty(1, 4, 32, overlap=True)
        return v4k.compress_kv(xc, wkv, wgate, ape, torch.ones(32), v4k.rope_frequencies(16, 10000.0), state,
                               ratio=4, quant="none")[0]

    cases = [
        (lambda: v4k.sparse_attn(q, kv, sink, idx, 0.1)),
        (lambda: v4k.hc_post(x, res, post, comb)),
        (lambda: v4k.rms_norm(x, None)),
        (lambda: v4k.apply_rope(res, pos, freqs)),
        (lambda: v4k.moe_experts(xe, torch.full((4, 2), 0.5), ids, w1, w3, w2)),
        (lambda: v4k.moe_gate(xe.float(), w1[0].float(), topk=2)[1]),
        (lambda: v4k.indexer_topk(qi, wi, keys, ipos, 3)),
        (lambda: v4k.indexer_scores(qi, wi, keys, ipos)),
        compress,
    ]
    for fn in cases:
        compiled = torch.compile(fn, backend="eager", fullgraph=True)
        assert torch.equal(compiled(), fn())


def test_remembered_plain_signatures_keep_conversions_and_empty_cases_apart():
    g = torch.Generator().manual_seed(1)
    q, kv = torch.randn(1, 2, 4, 64, generator=g), torch.randn(1, 10, 64, generator=g)
    sink, idx = torch.randn(4, generator=g), torch.randint(0, 10, (1, 2, 3), dtype=torch.int32, generator=g)
    want = v4k.sparse_attn(q, kv, sink, idx, 0.1)
    assert torch.equal(v4k.sparse_attn(q, kv, sink, idx, 0.1), want)  # the remembered (plain) signature
    assert torch.equal(v4k.sparse_attn(q, kv, sink, idx.long(), 0.1), want)  # int64 indices converted
    got = v4k.sparse_attn(q, kv, sink.bfloat16(), idx, 0.1)  # a bf16 sink is converted
    assert torch.equal(got, v4k.sparse_attn(q, kv, sink.bfloat16().float(), idx, 0.1))
    assert torch.equal(v4k.sparse_attn(q, kv, sink, idx[:, :, :0], 0.1), torch.zeros_like(q))  # K = 0
    assert v4k.sparse_attn(q[:, :0], kv, sink, idx[:, :0], 0.1).shape == (1, 0, 4, 64)


def test_compiled_public_function_still_checks_values_when_the_graph_runs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 128, generator=g).bfloat16()
    w1, w3 = (torch.randn(3, 64, 128, generator=g).bfloat16() / 11 for _ in range(2))
    w2 = torch.randn(3, 128, 64, generator=g).bfloat16() / 8
    fn = torch.compile(lambda ids: v4k.moe_experts(x, torch.full((4, 2), 0.5), ids, w1, w3, w2), backend="eager",
                       fullgraph=True)
    fn(torch.tensor([[0, 1], [2, -1], [1, 1], [-1, -1]], dtype=torch.int32))
    with pytest.raises(ValueError, match="topk_ids entries must lie in"):
        fn(torch.tensor([[0, 1], [7, -1], [1, 1], [-1, -1]], dtype=torch.int32))
