"""KV compressor (SPEC §6): reference vs the naive §6.3 loop, chunking invariance, batches at
different positions, state handling, the Ca/Cb half assignment, bad inputs."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import v4kernels as v4k
import v4kernels._registry as R
from v4kernels import CompressorState, compress_kv
from v4kernels.ops.compressor import reference as cref
from v4kernels.testing.cases.compressor import (
    NAIVE_STATE_TOL,
    compare_entries,
    compare_plan_outputs,
    make_compressor_inputs,
    naive_plan,
    run_plan,
)

D, HD = 64, 128


def _inputs(ratio, tokens, batch=2, dtype=torch.bfloat16, seed=0, dim=D, head_dim=HD, weight_dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return make_compressor_inputs(g, "cpu", batch=batch, tokens=tokens, dim=dim, head_dim=head_dim, ratio=ratio,
                                  dtype=dtype, weight_dtype=weight_dtype)


def _weights(inp):
    return {k: v for k, v in inp.items() if k != "x"}


def _check_vs_naive(inp, ratio, plan, quant):
    got = run_plan(**inp, ratio=ratio, plan=plan, quant=quant)
    exp = naive_plan(**inp, ratio=ratio, plan=plan, quant=quant)
    res = compare_plan_outputs(got, exp, quant, 64, NAIVE_STATE_TOL)
    assert res.ok, res.message
    return got, exp


def _states_equal(a: CompressorState, b: CompressorState) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))


# ------------------------------------------------------------------------------ naive vs reference


@pytest.mark.parametrize("ratio", [4, 128])
@pytest.mark.parametrize("s", [1, 2, 3, 4, 5, 127, 128, 129])
def test_prefill_matches_naive_fp32(ratio, s):
    # fp32 activations, no quantisation: tight check of projections, pooling, norm and RoPE
    inp = _inputs(ratio, s, dtype=torch.float32, weight_dtype=torch.float32, seed=s)
    got, _ = _check_vs_naive(inp, ratio, [("call", s)], "none")
    assert got[1].tolist() == [s // ratio] * 2


@pytest.mark.parametrize("ratio,s,quant", [(4, 5, "fp8"), (4, 129, "fp8"), (128, 129, "fp8"), (128, 128, "none"),
                                           (4, 129, "fp4"), (4, 4, "fp4")])
def test_prefill_matches_naive_bf16(ratio, s, quant):
    inp = _inputs(ratio, s, seed=100 + s)
    _check_vs_naive(inp, ratio, [("call", s)], quant)


def test_real_dims_hca_chunked_matches_naive():
    # V4-Flash D=4096, main head_dim 512, HCA: a window closed inside a 1-token call
    inp = _inputs(128, 129, batch=1, dim=4096, head_dim=512, seed=7)
    got, _ = _check_vs_naive(inp, 128, [("call", 64), ("call", 63), ("call", 1), ("call", 1)], "fp8")
    assert got[1].tolist() == [1]


def test_fp8_only_on_nope_dims_and_fp4_on_grid():
    inp = _inputs(4, 16, batch=1, seed=3)
    st = CompressorState.empty(1, 4, HD)
    e, n = compress_kv(**_weights(inp), x=inp["x"], state=st, ratio=4, quant="fp8")
    nope = e[..., : HD - 64]
    assert torch.equal(v4k.act_quant_roundtrip(nope.contiguous(), 64), nope)  # already on the FP8 grid
    rope = e[..., HD - 64 :]
    assert not torch.equal(v4k.act_quant_roundtrip(rope.contiguous(), 64), rope)  # rope dims stay bf16
    st = CompressorState.empty(1, 4, HD)
    e4, _ = compress_kv(**_weights(inp), x=inp["x"], state=st, ratio=4, quant="fp4")
    assert torch.equal(v4k.fp4_act_roundtrip(e4, 32), e4)
    assert not torch.equal(e4, e)


# ------------------------------------------------------------------------------ chunking invariance


def _feed(inp, state, lo, hi, ratio, quant, chunks=None):
    """Feed tokens lo..hi-1 in the given chunk sizes; return per-row lists of emitted entries."""
    out = [[] for _ in range(state.batch_size)]
    sizes = chunks if chunks is not None else [hi - lo]
    t = lo
    for c in sizes:
        e, n = compress_kv(inp["x"][:, t : t + c], **_weights(inp), state=state, ratio=ratio, quant=quant)
        for b, nb in enumerate(n.tolist()):
            assert e[b, nb:].abs().sum() == 0
            out[b].append(e[b, :nb])
        t += c
    assert t == hi
    empty = inp["x"].new_zeros(0, state.head_dim)
    return [torch.cat(r, 0) if r else empty for r in out]


@st.composite
def _chunking(draw):
    ratio = draw(st.sampled_from([4, 4, 128, 3]))
    quant = draw(st.sampled_from(["fp8", "fp4", "none"]))
    prefix = draw(st.integers(0, 2 * ratio + 3))
    total = draw(st.integers(0, 140 if ratio == 128 else 40))
    chunks, left = [], total
    while left:
        c = draw(st.integers(1, min(left, 64)))
        chunks.append(c)
        left -= c
    reset_row1 = draw(st.booleans())
    return ratio, quant, prefix, total, chunks, reset_row1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_chunking())
def test_chunking_invariance_bitwise(params):
    ratio, quant, prefix, total, chunks, reset_row1 = params
    inp = _inputs(ratio, prefix + total, seed=prefix * 1000 + total)
    base = CompressorState.empty(2, ratio, HD)
    _feed(inp, base, 0, prefix, ratio, quant)
    if reset_row1:
        base.reset(1)  # row 1 restarts: the two sequences sit at different positions
    one, many = base.clone(), base.clone()
    a = _feed(inp, one, prefix, prefix + total, ratio, quant)
    b = _feed(inp, many, prefix, prefix + total, ratio, quant, chunks)
    for ra, rb in zip(a, b):
        assert torch.equal(ra, rb)
    assert _states_equal(one, many)


@pytest.mark.parametrize("ratio,n", [(4, 13), (128, 131)])
def test_token_by_token_equals_one_call(ratio, n):
    inp = _inputs(ratio, n, seed=11)
    one, tok = CompressorState.empty(2, ratio, HD), CompressorState.empty(2, ratio, HD)
    a = _feed(inp, one, 0, n, ratio, "fp8")
    b = _feed(inp, tok, 0, n, ratio, "fp8", [1] * n)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[0].shape[0] == n // ratio
    assert _states_equal(one, tok)


# ------------------------------------------------------------------------------ batches and state


def test_batch_rows_at_different_positions_match_solo_runs():
    ratio = 4
    inp = _inputs(ratio, 17, batch=3, seed=5)
    stb = CompressorState.empty(3, ratio, HD)
    _feed(inp, stb, 0, 5, ratio, "fp8")
    stb.reset(1)
    _feed(inp, stb, 5, 8, ratio, "fp8")
    stb.reset(torch.tensor([False, False, True]))
    assert stb.positions == [8, 3, 0]
    batched = _feed(inp, stb, 8, 17, ratio, "fp8")
    for b, start in enumerate([0, 5, 8]):
        solo_in = dict(inp, x=inp["x"][b : b + 1, start:])
        st1 = CompressorState.empty(1, ratio, HD)
        solo = _feed(solo_in, st1, 0, 17 - start, ratio, "fp8", [8 - start, 9])
        n_before = (8 - start) // ratio
        assert torch.equal(batched[b], solo[0][n_before:]), b
        assert all(torch.equal(x[b : b + 1], y) for x, y in zip(stb.tensors(), st1.tensors())), b


def test_reset_second_prompt_equals_fresh():
    ratio = 4
    inp = _inputs(ratio, 16, batch=1, seed=9)
    st1 = CompressorState.empty(1, ratio, HD)
    _feed(inp, st1, 0, 7, ratio, "fp8")
    st_stale = st1.clone()
    st1.reset()
    second = _feed(inp, st1, 7, 16, ratio, "fp8")
    fresh_in = dict(inp, x=inp["x"][:, 7:])
    st2 = CompressorState.empty(1, ratio, HD)
    fresh = _feed(fresh_in, st2, 0, 9, ratio, "fp8")
    assert torch.equal(second[0], fresh[0]) and _states_equal(st1, st2)
    # without the reset the second prompt would continue the first one (guards this test)
    stale = _feed(inp, st_stale, 7, 16, ratio, "fp8")
    assert stale[0].shape != fresh[0].shape or not torch.equal(stale[0], fresh[0])


def test_reset_rows_leaves_other_rows_untouched():
    inp = _inputs(4, 6, batch=3)
    s = CompressorState.empty(3, 4, HD)
    _feed(inp, s, 0, 6, 4, "fp8")
    before = s.clone()
    s.reset([0, 2])
    fresh = CompressorState.empty(3, 4, HD)
    for t, f, b in zip(s.tensors(), fresh.tensors(), before.tensors()):
        assert torch.equal(t[[0, 2]], f[[0, 2]]) and torch.equal(t[1], b[1])


def test_first_window_ignores_stale_prev_state():
    # window 0 has no predecessor (SPEC §6.3): whatever prev holds before position 4 is unused
    inp = _inputs(4, 4, batch=1, seed=2)
    a, b = CompressorState.empty(1, 4, HD), CompressorState.empty(1, 4, HD)
    _feed(inp, a, 0, 2, 4, "fp8")
    _feed(inp, b, 0, 2, 4, "fp8")
    b.prev_kv.normal_()
    b.prev_score.normal_()
    assert torch.equal(_feed(inp, a, 2, 4, 4, "fp8")[0], _feed(inp, b, 2, 4, 4, "fp8")[0])


def test_state_object_api():
    s = CompressorState.empty(2, 4, HD)
    assert s.ratio == 4 and s.head_dim == HD and s.overlap and s.batch_size == 2
    assert s.pending_kv.shape == (2, 4, 2 * HD) and s.prev_kv.shape == (2, 4, HD)
    assert bool((s.pending_kv == 0).all()) and bool((s.pending_score == float("-inf")).all())
    assert s.nbytes == 2 * (2 * 4 * 2 * HD * 4) + 2 * (2 * 4 * HD * 4) + 2 * 8
    h = CompressorState.empty(1, 128, 512)
    assert h.prev_kv.shape == (1, 0, 512) and h.pending_kv.shape == (1, 128, 512) and not h.overlap
    c = s.clone()
    c.pending_kv += 1
    c.n_tokens += 3
    assert bool((s.pending_kv == 0).all()) and s.positions == [0, 0] and c.positions == [3, 3]
    with pytest.raises(ValueError, match=r"CompressorState.reset: rows must lie in \[0, 2\)"):
        s.reset([2])
    with pytest.raises(TypeError, match="CompressorState.reset: rows"):
        s.reset("0")
    with pytest.raises(ValueError, match="CompressorState.reset: rows must have shape"):
        s.reset(torch.tensor([True]))
    with pytest.raises(ValueError, match="pending_kv.shape\\[2\\] must be coff\\*head_dim"):
        CompressorState(torch.zeros(1, 4, 100), torch.zeros(1, 4, 100), torch.zeros(1, 4, 64), torch.zeros(1, 4, 64), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(TypeError, match="n_tokens must have dtype int64"):
        CompressorState(*CompressorState.empty(1, 4, 8).tensors()[:4], torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="CompressorState.empty: ratio must be >= 1"):
        CompressorState.empty(1, 0, 8)


# ------------------------------------------------------------------------------ Ca / Cb halves


def test_ca_cb_half_assignment_and_rope_position():
    """Gate logits = ape only; ape[:, hd:] (Zb) is hugely negative, so every window j >= 1 pools
    only the Ca halves (Ckv[:, :hd]) of window j-1 with uniform weights, and window 0 (no
    predecessor) the Cb halves of its own tokens. Fails if Ca/Cb or the ape halves are swapped,
    or if the entry is rotated at any position other than j*4."""
    ratio, s = 4, 12
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, s, D, generator=g)
    wkv = torch.randn(2 * HD, D, generator=g) / 8
    wgate = torch.zeros(2 * HD, D)
    ape = torch.zeros(ratio, 2 * HD)
    ape[:, HD:] = -1e4
    nw = torch.ones(HD)
    freqs = v4k.v4_rope_frequencies(True)
    st0 = CompressorState.empty(1, ratio, HD)
    e, n = compress_kv(x, wkv, wgate, ape, nw, freqs, st0, ratio=ratio, quant="none")
    ckv = (x.double() @ wkv.double().T)[0]
    pooled = [ckv[0:4, HD:].mean(0), ckv[0:4, :HD].mean(0), ckv[4:8, :HD].mean(0)]
    for j, c in enumerate(pooled):
        ref = v4k.rms_norm(c.float().view(1, 1, HD), nw)
        ref = v4k.apply_rope(ref, torch.tensor([[j * ratio]]), freqs)
        torch.testing.assert_close(e[0, j], ref.view(HD), atol=1e-5, rtol=1e-5)
    # ape[:, :hd] biases Za: pushing one Ca slot up makes it dominate window 1
    ape2 = ape.clone()
    ape2[2, :HD] = 30.0
    e2, _ = compress_kv(x, wkv, wgate, ape2, nw, freqs, CompressorState.empty(1, ratio, HD), ratio=ratio, quant="none")
    ref = v4k.apply_rope(v4k.rms_norm(ckv[2, :HD].float().view(1, 1, HD), nw), torch.tensor([[4]]), freqs)
    torch.testing.assert_close(e2[0, 1], ref.view(HD), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(e2[0, 0], e[0, 0], atol=0, rtol=0)  # window 0 only sees Zb


# ------------------------------------------------------------------------------ sensitivity of the checks


def test_checks_catch_a_perturbed_reference(monkeypatch):
    inp = _inputs(4, 13, batch=1, seed=21)
    orig = cref.finish_entry

    def off_by_one_rope(c, position, *a):
        return orig(c, position + 1, *a)

    def quantise_everything(c, position, norm_weight, freqs, quant, eps, dtype, *rest):
        e = orig(c, position, norm_weight, freqs, quant, eps, dtype, *rest)
        return v4k.act_quant_roundtrip(e.view(1, -1), 64).view(-1)

    for bad in (off_by_one_rope, quantise_everything):
        monkeypatch.setattr(cref, "finish_entry", bad)
        got = run_plan(**inp, ratio=4, plan=[("call", 13)], quant="fp8")
        monkeypatch.setattr(cref, "finish_entry", orig)
        exp = naive_plan(**inp, ratio=4, plan=[("call", 13)], quant="fp8")
        assert not compare_plan_outputs(got, exp, "fp8", 64, NAIVE_STATE_TOL).ok, bad.__name__


def test_compare_entries_rejects_systematic_bf16_drift():
    e = torch.randn(4, 3, HD).bfloat16()
    up = (e.float() * (1 + 2.0**-4)).bfloat16()  # 6 %: beyond bf16 noise, inside one FP8 step
    assert compare_entries(e, e, "none", 64).ok and compare_entries(e, e, "fp8", 64).ok
    assert not compare_entries(up, e, "none", 64).ok
    assert not compare_entries(up, e, "fp8", 64).ok  # too many elements off by a quantisation step
    assert not compare_entries(e.roll(1, dims=1), e, "fp8", 64).ok


# ------------------------------------------------------------------------------ failures and bad inputs


def _snapshot(s):
    return [t.clone() for t in s.tensors()]


def test_failing_call_leaves_state_unchanged(monkeypatch):
    inp = _inputs(4, 12, batch=2)
    s = CompressorState.empty(2, 4, HD)
    _feed(inp, s, 0, 6, 4, "fp8")
    snap = _snapshot(s)
    ids = [id(t) for t in s.tensors()]
    w = _weights(inp)
    with pytest.raises(ValueError):
        compress_kv(inp["x"][:1, 6:], **w, state=s, ratio=4)
    with pytest.raises(R.BackendUnavailableError):
        with v4k.use_backend("cuda", ops=["compress_kv"]):
            compress_kv(inp["x"][:, 6:], **w, state=s, ratio=4)

    def boom(*args):
        raise RuntimeError("kernel failed half way")

    monkeypatch.setattr(R._KERNELS["reference"]["compress_kv"], "fn", boom)
    with pytest.raises(RuntimeError, match="half way"):
        compress_kv(inp["x"][:, 6:], **w, state=s, ratio=4)
    assert all(torch.equal(a, b) for a, b in zip(s.tensors(), snap))
    assert [id(t) for t in s.tensors()] == ids


def _good(ratio=4, batch=2, s=5):
    inp = _inputs(ratio, s, batch=batch)
    return dict(inp, state=CompressorState.empty(batch, ratio, HD), ratio=ratio, quant="fp8", eps=1e-6)


def _bad_state_ratio(kw):
    kw["state"] = CompressorState.empty(2, 128, HD)


def _bad_state_tensor(kw):
    kw["state"].pending_kv = torch.zeros(2, 4, 7)


def _bad_n_tokens(kw):
    kw["state"].n_tokens[0] = -1


BAD = [
    ("x not a tensor", lambda kw: kw.update(x=[1.0]), TypeError, "compress_kv: x must be a torch.Tensor"),
    ("x 2-d", lambda kw: kw.update(x=kw["x"][0]), ValueError, "compress_kv: x must have 3 dims"),
    ("x int", lambda kw: kw.update(x=kw["x"].to(torch.int32)), TypeError, "compress_kv: x must have dtype"),
    ("x batch", lambda kw: kw.update(x=kw["x"][:1]), ValueError, "state holds 2 sequences, got x.shape\\[0\\]=1"),
    ("wkv shape", lambda kw: kw.update(wkv=kw["wkv"][:HD]), ValueError, "compress_kv: wkv must have shape \\[256, 64\\]"),
    ("wkv dtype", lambda kw: kw.update(wkv=kw["wkv"].to(torch.float64)), TypeError, "compress_kv: wkv must have dtype"),
    ("wgate shape", lambda kw: kw.update(wgate=kw["wgate"][:, :32]), ValueError, "compress_kv: wgate must have shape"),
    ("ape shape", lambda kw: kw.update(ape=kw["ape"][:3]), ValueError, "compress_kv: ape must have shape \\[4, 256\\]"),
    ("ape dtype", lambda kw: kw.update(ape=kw["ape"].bfloat16()), TypeError, "compress_kv: ape must have dtype float32"),
    ("norm_weight 2-d", lambda kw: kw.update(norm_weight=kw["norm_weight"].view(1, -1)), ValueError, "compress_kv: norm_weight must have 1 dims"),
    ("norm_weight size", lambda kw: kw.update(norm_weight=kw["norm_weight"][:64]), ValueError, "compress_kv: state was created for head_dim 128, got len\\(norm_weight\\)=64"),
    ("freqs dtype", lambda kw: kw.update(freqs=kw["freqs"].double()), TypeError, "compress_kv: freqs must have dtype float32"),
    ("freqs too long", lambda kw: kw.update(freqs=torch.ones(65)), ValueError, "compress_kv: 2\\*len\\(freqs\\) rope dims"),
    ("freqs fp8 blocks", lambda kw: kw.update(freqs=torch.ones(16)), ValueError, "quant='fp8' quantises the 128-32 nope dims"),
    ("state type", lambda kw: kw.update(state=None), TypeError, "compress_kv: state must be a CompressorState"),
    ("state ratio", _bad_state_ratio, ValueError, "state was created for ratio 128, got ratio=4"),
    ("state tensor", _bad_state_tensor, ValueError, "pending_kv.shape\\[2\\] must be coff\\*head_dim"),
    ("state positions", _bad_n_tokens, ValueError, "compress_kv: state.n_tokens must be >= 0"),
    ("ratio type", lambda kw: kw.update(ratio=4.0), TypeError, "compress_kv: ratio must be an int"),
    ("ratio value", lambda kw: kw.update(ratio=0), ValueError, "compress_kv: ratio must be >= 1"),
    ("quant value", lambda kw: kw.update(quant="fp16"), ValueError, "compress_kv: quant must be one of"),
    ("quant type", lambda kw: kw.update(quant=None), TypeError, "compress_kv: quant must be a str"),
    ("eps", lambda kw: kw.update(eps=-1.0), ValueError, "compress_kv: eps must be a float >= 0"),
]


@pytest.mark.parametrize("name,mutate,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(name, mutate, exc, msg):
    kw = _good()
    mutate(kw)
    state = kw["state"]
    snap = _snapshot(state) if isinstance(state, CompressorState) else None
    with pytest.raises(exc, match=msg):
        compress_kv(kw.pop("x"), kw.pop("wkv"), kw.pop("wgate"), kw.pop("ape"), kw.pop("norm_weight"), kw.pop("freqs"),
                    kw.pop("state"), **kw)
    if snap is not None:
        assert all(torch.equal(a, b) for a, b in zip(state.tensors(), snap))


def test_fp4_needs_power_of_two_head_dim():
    g = torch.Generator().manual_seed(0)
    inp = make_compressor_inputs(g, "cpu", batch=1, tokens=4, dim=D, head_dim=192, ratio=4)
    with pytest.raises(ValueError, match="quant='fp4' needs head_dim a power of two"):
        compress_kv(inp["x"], **_weights(inp), state=CompressorState.empty(1, 4, 192), ratio=4, quant="fp4")


def test_device_mismatch_rejected():
    kw = _good()
    kw["state"] = CompressorState.empty(2, 4, HD, device="meta")
    with pytest.raises(ValueError, match="compress_kv: .* is on"):
        compress_kv(kw.pop("x"), kw.pop("wkv"), kw.pop("wgate"), kw.pop("ape"), kw.pop("norm_weight"), kw.pop("freqs"),
                    kw.pop("state"), **kw)


@pytest.mark.parametrize("batch,s", [(2, 0), (0, 5)])
def test_empty_inputs(batch, s):
    inp = _inputs(4, s, batch=batch)
    st_ = CompressorState.empty(batch, 4, HD)
    _ = st_.n_tokens.fill_(3)
    snap = _snapshot(st_)
    e, n = compress_kv(inp["x"], **_weights(inp), state=st_, ratio=4)
    assert e.shape == (batch, (s + 3) // 4, HD) and e.dtype == torch.bfloat16
    assert n.shape == (batch,) and n.dtype == torch.int32 and not n.any()
    assert all(torch.equal(a, b) for a, b in zip(st_.tensors(), snap))


def test_opcheck():
    inp = _inputs(4, 6, batch=2)
    s = CompressorState.empty(2, 4, HD)
    s.n_tokens[1] = 2
    args = (inp["x"], inp["wkv"], inp["wgate"], inp["ape"], inp["norm_weight"], inp["freqs"], *s.tensors(), 4, "fp8", 1e-6, False)
    torch.library.opcheck(torch.ops.v4k.compress_kv.default, args)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny per-window tensors: thread-pool wake-ups cost more than the math on a shared 2-core box
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


pytestmark = pytest.mark.usefixtures("reference_backend")
