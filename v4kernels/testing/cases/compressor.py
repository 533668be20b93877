"""Parity cases for the KV compressor (SPEC §6), plus its independent implementation.

A case feeds a token stream through ``compress_kv`` following a *plan* (calls of S tokens and
per-sequence resets) and returns every emitted entry plus the final state. The independent
implementation, :func:`naive_compress_kv`, is written directly from SPEC §6.2-6.4 as [OFF]'s
prefill of one whole prompt: float64 projections and a per-window, per-feature, per-slot Python
loop for the pooling; it shares only the already-verified primitives (RMSNorm, RoPE, FP8/FP4
round trips, Hadamard) with the reference.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

import v4kernels as v4k

from ..._registry import Tolerance
from ..compare import CompareResult, compare_tensors
from ..inputs import FLASH, randn
from . import ParityCase, register

#: a plan step: ("call", S) feeds the next S tokens of every sequence; ("reset", rows) resets rows
Plan = Sequence[tuple[str, Any]]

#: state tolerance of the naive float64 projections against the fp32 reference projections
NAIVE_STATE_TOL = Tolerance(2e-5, 2e-5, 0.99999)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def make_compressor_inputs(
    gen: torch.Generator,
    device: torch.device | str,
    *,
    batch: int,
    tokens: int,
    dim: int,
    head_dim: int,
    ratio: int,
    dtype: torch.dtype = torch.bfloat16,
    weight_dtype: torch.dtype = torch.bfloat16,
    overlap: bool | None = None,
    rope_dim: int = 64,
) -> dict[str, torch.Tensor]:
    """Seeded weights and a token stream ``x [batch, tokens, dim]``; projections come out O(1)
    and the gate logits spread over a few units, so the softmax is neither flat nor one-hot."""
    device = torch.device(device)
    coff = 2 if (ratio == 4 if overlap is None else overlap) else 1
    return {
        "x": randn(gen, (batch, tokens, dim), device, dtype),
        "wkv": randn(gen, (coff * head_dim, dim), device, weight_dtype, dim**-0.5),
        "wgate": randn(gen, (coff * head_dim, dim), device, weight_dtype, 2.0 * dim**-0.5),
        "ape": randn(gen, (ratio, coff * head_dim), device, torch.float32),
        "norm_weight": (1.0 + 0.25 * torch.randn(head_dim, generator=gen)).to(weight_dtype).to(device),
        "freqs": v4k.v4_rope_frequencies(True, rope_dim=rope_dim, device=device),
    }


# --------------------------------------------------------------------------------------------
# the naive implementation (SPEC §6.2-6.4, one prompt from a fresh state)
# --------------------------------------------------------------------------------------------


def naive_compress_kv(
    x: torch.Tensor,
    wkv: torch.Tensor,
    wgate: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    freqs: torch.Tensor,
    *,
    ratio: int,
    quant: str = "fp8",
    eps: float = 1e-6,
    overlap: bool | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """All ``S // ratio`` entries of whole prompts ``x [B, S, D]`` and the state [OFF] leaves.

    Returns ``(entries [B, S//ratio, hd] x.dtype, (pending_kv, pending_score, prev_kv, prev_score,
    n_tokens))`` with the state in :class:`v4kernels.CompressorState`'s canonical form.
    """
    from ...ops.quant.reference import act_quant_roundtrip, fp4_act_roundtrip, hadamard_transform
    from ...ops.rope_norm.reference import apply_rope, rms_norm

    bsz, s, _ = x.shape
    hd = norm_weight.shape[0]
    m = ratio
    overlap = m == 4 if overlap is None else overlap
    coff = 2 if overlap else 1
    r = 2 * freqs.shape[0]
    dev = x.device
    xd = x.double()
    ckv = xd @ wkv.double().T  # [B, S, coff·hd]   (SPEC §6.2)
    z = xd @ wgate.double().T + ape.double()[torch.arange(s, device=dev) % m]
    n_win = s // m
    entries = torch.zeros(bsz, n_win, hd, dtype=x.dtype, device=dev)
    for b in range(bsz):
        kv_l, z_l = ckv[b].tolist(), z[b].tolist()
        for j in range(n_win):
            pooled = []
            for f in range(hd):
                # (logit, value) of every slot of window j for feature f (SPEC §6.3)
                if overlap:
                    slots = [(z_l[t][f], kv_l[t][f]) for t in range((j - 1) * m, j * m)] if j > 0 else []
                    slots += [(z_l[t][hd + f], kv_l[t][hd + f]) for t in range(j * m, (j + 1) * m)]
                else:
                    slots = [(z_l[t][f], kv_l[t][f]) for t in range(j * m, (j + 1) * m)]
                top = max(lg for lg, _ in slots)
                wts = [math.exp(lg - top) for lg, _ in slots]
                den = sum(wts)
                pooled.append(sum(w * v for w, (_, v) in zip(wts, slots)) / den)
            c = torch.tensor(pooled, dtype=torch.float64, device=dev).float().to(x.dtype).view(1, 1, hd)
            c = rms_norm(c, norm_weight, eps, False)
            c = apply_rope(c, torch.tensor([[j * m]], device=dev), freqs, False, False)
            if quant == "fp8":
                c = torch.cat((act_quant_roundtrip(c[..., : hd - r].contiguous(), 64, True), c[..., hd - r :]), -1)
            elif quant == "fp4":
                c = fp4_act_roundtrip(hadamard_transform(c), 32)
            entries[b, j] = c.view(hd)
    # final state: the open window's rows, and the Ca/Za halves of the last closed window
    st = v4k.CompressorState.empty(bsz, m, hd, device=dev, overlap=overlap)
    rem = s - n_win * m
    st.pending_kv[:, :rem] = ckv[:, n_win * m :].float()
    st.pending_score[:, :rem] = z[:, n_win * m :].float()
    if overlap and n_win > 0:
        st.prev_kv[:] = ckv[:, (n_win - 1) * m : n_win * m, :hd].float()
        st.prev_score[:] = z[:, (n_win - 1) * m : n_win * m, :hd].float()
    st.n_tokens[:] = s
    assert coff * hd == ckv.shape[-1]
    return entries, st.tensors()


# --------------------------------------------------------------------------------------------
# plans: running a token stream through the public op, and the naive equivalent
# --------------------------------------------------------------------------------------------


def _pack(per_seq: list[list[torch.Tensor]], hd: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    counts = [sum(t.shape[0] for t in rows) for rows in per_seq]
    out = torch.zeros(len(per_seq), max(counts, default=0), hd, dtype=dtype, device=device)
    for b, rows in enumerate(per_seq):
        if rows:
            cat = torch.cat(rows, 0)
            out[b, : cat.shape[0]] = cat
    return out, torch.tensor(counts, dtype=torch.int64)


def run_plan(
    x: torch.Tensor,
    wkv: torch.Tensor,
    wgate: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    freqs: torch.Tensor,
    *,
    ratio: int,
    plan: Plan,
    quant: str = "fp8",
    eps: float = 1e-6,
    overlap: bool | None = None,
) -> tuple[torch.Tensor, ...]:
    """Feed ``x`` through ``compress_kv`` step by step from a fresh state.

    Returns ``(entries [B, N, hd], counts [B] int64, *final state tensors)``: the entries every
    sequence emitted, in order, packed and zero padded.
    """
    bsz, _, _ = x.shape
    hd = norm_weight.shape[0]
    st = v4k.CompressorState.empty(bsz, ratio, hd, device=x.device, overlap=overlap)
    got: list[list[torch.Tensor]] = [[] for _ in range(bsz)]
    t = 0
    for kind, arg in plan:
        if kind == "reset":
            st.reset(arg)
            continue
        e, n = v4k.compress_kv(x[:, t : t + arg], wkv, wgate, ape, norm_weight, freqs, st, ratio=ratio, quant=quant, eps=eps,
                                overlap=overlap)
        for b, nb in enumerate(n.tolist()):
            got[b].append(e[b, :nb])
        t += arg
    return (*_pack(got, hd, x.dtype, x.device), *st.tensors())


def naive_plan(
    x: torch.Tensor,
    wkv: torch.Tensor,
    wgate: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    freqs: torch.Tensor,
    *,
    ratio: int,
    plan: Plan,
    quant: str = "fp8",
    eps: float = 1e-6,
    overlap: bool | None = None,
) -> tuple[torch.Tensor, ...]:
    """What :func:`run_plan` must return: every sequence split at its resets into prompts, each
    prompt compressed at once by :func:`naive_compress_kv`."""
    bsz = x.shape[0]
    hd = norm_weight.shape[0]
    seg_start = [0] * bsz
    t = 0
    segments: list[list[tuple[int, int]]] = [[] for _ in range(bsz)]
    for kind, arg in plan:
        if kind == "call":
            t += arg
            continue
        rows = range(bsz) if arg is None else ([arg] if isinstance(arg, int) else list(arg))
        for b in rows:
            segments[b].append((seg_start[b], t))
            seg_start[b] = t
    got: list[list[torch.Tensor]] = [[] for _ in range(bsz)]
    final: list[tuple[torch.Tensor, ...]] = []
    for b in range(bsz):
        for lo, hi in segments[b] + [(seg_start[b], t)]:
            e, st = naive_compress_kv(x[b : b + 1, lo:hi], wkv, wgate, ape, norm_weight, freqs, ratio=ratio, quant=quant, eps=eps,
                                      overlap=overlap)
            got[b].append(e[0])
        final.append(st)  # the state of the last prompt (empty if the row was just reset)
    state = tuple(torch.cat([f[i] for f in final], 0) for i in range(5))
    return (*_pack(got, hd, x.dtype, x.device), *state)


# --------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------


def _exp2_floor(v: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.floor(torch.log2(v.clamp_min(1e-30))))


def entry_grid_step(actual: torch.Tensor, expected: torch.Tensor, quant: str, rope_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element ``(fine, coarse)`` error allowances for compressed entries ``[..., hd]``.

    ``fine``: rounding noise of the output dtype (2 ulps) at the element's magnitude, or for RoPE
    dims at its pair's magnitude (the rotation mixes the pair), plus 64 fp32 ulps of the row's
    RMS for the fp32 evaluation-order noise of the pooling.
    ``coarse``: one step of the FP8 / FP4 grid at the element's magnitude and block scale, on the
    quantised dims (zero elsewhere). A value that sits next to a rounding boundary of the output
    format may legitimately land one step away when two correct fp32 evaluation orders differ.
    """
    a, e = actual.double(), expected.double()
    hd = a.shape[-1]
    mag = torch.maximum(a.abs(), e.abs())
    pair = mag.clone()
    rope = pair[..., hd - rope_dims :].reshape(*pair.shape[:-1], rope_dims // 2, 2)
    pair[..., hd - rope_dims :] = rope.amax(-1, keepdim=True).expand_as(rope).reshape(*pair.shape[:-1], rope_dims)
    mant = {torch.bfloat16: 7, torch.float16: 10}.get(actual.dtype, 23)
    # fp32 evaluation-order noise is absolute at the row's scale (pooling sums signed terms)
    row_rms = e.square().mean(-1, keepdim=True).sqrt()
    fine = 2.0 * _exp2_floor(pair) * 2.0**-mant + 64.0 * 2.0**-23 * row_rms
    coarse = torch.zeros_like(fine)
    if quant == "fp8":
        n = hd - rope_dims
        blk = mag[..., :n].reshape(*mag.shape[:-1], n // 64, 64)
        scale_hi = torch.exp2(torch.ceil(torch.log2(blk.amax(-1, keepdim=True).clamp_min(1e-30) / 448.0)))
        step = torch.maximum(_exp2_floor(blk) * 2.0**-3, scale_hi * 2.0**-9)
        coarse[..., :n] = step.reshape(*mag.shape[:-1], n)
    elif quant == "fp4":
        blk = mag.reshape(*mag.shape[:-1], hd // 32, 32)
        scale_hi = torch.exp2(torch.ceil(torch.log2(blk.amax(-1, keepdim=True).clamp_min(1e-30) / 6.0)))
        step = torch.maximum(_exp2_floor(blk) * 0.5, scale_hi * 0.5)
        coarse = step.reshape(mag.shape)
    return fine, coarse


def compare_entries(actual: torch.Tensor, expected: torch.Tensor, quant: str, rope_dims: int, name: str = "entries") -> CompareResult:
    """Entries agree iff every element is within one output-grid step (:func:`entry_grid_step`)
    and at most ``1 % + 4`` elements need more than the fine (dtype rounding) allowance."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return CompareResult(False, message=f"{name}: {list(actual.shape)} {actual.dtype} != expected {list(expected.shape)} {expected.dtype}")
    if actual.numel() == 0:
        return CompareResult(True)
    a, e = actual.detach().cpu(), expected.detach().cpu()
    # NaN and ±inf must sit at identical positions (docs/numerics.md); the rest is compared
    nan_a, nan_e, inf_a, inf_e = a.isnan(), e.isnan(), a.isinf(), e.isinf()
    if not torch.equal(nan_a, nan_e) or not torch.equal(inf_a, inf_e) or not torch.equal(a[inf_a], e[inf_e]):
        bad = (nan_a != nan_e) | (inf_a != inf_e)
        return CompareResult(False, message=f"{name}: NaN/inf positions differ (actual {int((~torch.isfinite(a)).sum())}, "
                                            f"expected {int((~torch.isfinite(e)).sum())} non-finite; e.g. at "
                                            f"{[tuple(w) for w in bad.nonzero()[:3].tolist()]})")
    finite = torch.isfinite(a)
    a, e = torch.where(finite, a, 0), torch.where(finite, e, 0)
    fine, coarse = entry_grid_step(a, e, quant, rope_dims)
    diff = (a.double() - e.double()).abs()
    over = diff > torch.maximum(fine, coarse)
    flips = int((diff > fine).sum())
    max_abs = float(diff.max())
    cos = float(torch.nn.functional.cosine_similarity(a.double().flatten(), e.double().flatten(), dim=0)) if float(e.double().norm()) else 1.0
    if bool(over.any()):
        i = tuple(int(v) for v in over.nonzero()[0])
        return CompareResult(False, max_abs, 0.0, cos, f"{name}: {int(over.sum())} of {a.numel()} elements beyond one grid step; "
                             f"first at {i}: got {float(a[i]):.6g}, expected {float(e[i]):.6g}")
    limit = 0.01 * a.numel() + 4
    if flips > limit:
        return CompareResult(False, max_abs, 0.0, cos, f"{name}: {flips} of {a.numel()} elements off by a quantisation step (allowed {limit:.0f})")
    return CompareResult(True, max_abs, 0.0, cos)


def compare_plan_outputs(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], quant: str, rope_dims: int,
                         tol: Tolerance | dict[torch.dtype, Tolerance]) -> CompareResult:
    """``run_plan`` outputs: counts, positions and the -inf pattern exact, entries by
    :func:`compare_entries`, fp32 state within ``tol``."""
    names = ("entries", "counts", "pending_kv", "pending_score", "prev_kv", "prev_score", "n_tokens")
    if len(actual) != len(expected):
        return CompareResult(False, message=f"expected {len(expected)} outputs, got {len(actual)}")
    res = compare_entries(actual[0], expected[0], quant, rope_dims)
    if not res.ok:
        return res
    for nm, a, e in zip(names[1:], actual[1:], expected[1:]):
        t = tol.get(e.dtype, Tolerance(0.0, 0.0, 1.0)) if isinstance(tol, dict) else tol
        if not e.dtype.is_floating_point:
            t = Tolerance(0.0, 0.0, 1.0)
        r = compare_tensors(a, e, t, nm)
        if not r.ok:
            return r
    return res


# --------------------------------------------------------------------------------------------
# registered cases
# --------------------------------------------------------------------------------------------


def _case(name: str, *, batch: int, dim: int, head_dim: int, ratio: int, quant: str, plan: Plan, path: str,
          tags: Sequence[str] = (), large: bool = False, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
          overlap: bool | None = None, rope_dim: int = 64) -> ParityCase:
    tokens = sum(a for k, a in plan if k == "call")

    def make(g: torch.Generator, d: torch.device) -> dict[str, Any]:
        return make_compressor_inputs(g, d, batch=batch, tokens=tokens, dim=dim, head_dim=head_dim, ratio=ratio, dtype=dtype,
                                      overlap=overlap, rope_dim=rope_dim)

    def run(**kw: Any) -> tuple[torch.Tensor, ...]:
        return run_plan(**kw, ratio=ratio, plan=plan, quant=quant, overlap=overlap)

    def naive(**kw: Any) -> tuple[torch.Tensor, ...]:
        return naive_plan(**kw, ratio=ratio, plan=plan, quant=quant, overlap=overlap)

    def compare(actual: Any, expected: Any, tol: Any) -> CompareResult:
        return compare_plan_outputs(actual, expected, quant, rope_dim, tol)

    return register(ParityCase(f"compress_kv/{name}", "compress_kv", make, run, path=path, tags=frozenset(tags),
                               large=large, compare=compare, naive=naive, naive_tol=NAIVE_STATE_TOL, seed=seed))


def _calls(*sizes: int) -> list[tuple[str, Any]]:
    return [("call", s) for s in sizes]


D = FLASH["dim"]
# small shapes (fast everywhere, including the Triton interpreter)
_case("csa_small_prefill_s129", batch=2, dim=64, head_dim=128, ratio=4, quant="fp8", plan=_calls(129), path="prefill", tags=("odd",))
_case("csa_indexer_small_prefill_s37", batch=1, dim=64, head_dim=128, ratio=4, quant="fp4", plan=_calls(37), path="prefill", tags=("odd",))
_case("hca_small_prefill_s130", batch=1, dim=64, head_dim=128, ratio=128, quant="fp8", plan=_calls(130), path="prefill", tags=("odd",))
_case("csa_small_decode_cross_close", batch=2, dim=64, head_dim=128, ratio=4, quant="fp8", plan=_calls(6, 1, 1, 1, 1, 1, 1, 1),
      path="decode", tags=("edge",))
_case("csa_small_odd_chunks_reset", batch=2, dim=64, head_dim=128, ratio=4, quant="none",
      plan=[*_calls(3, 5, 1), ("reset", [1]), *_calls(7, 2), ("reset", None), *_calls(6)], path="chunk", tags=("odd", "edge"))
_case("hca_small_decode_cross_close", batch=1, dim=64, head_dim=128, ratio=128, quant="fp8", plan=_calls(126, 1, 1, 1), path="decode",
      tags=("edge",))
# real V4-Flash dimensions
_case("flash_csa_main_s9", batch=1, dim=D, head_dim=512, ratio=4, quant="fp8", plan=_calls(5, 1, 1, 1, 1), path="decode",
      tags=("v4-flash",))
_case("flash_csa_main_s259", batch=2, dim=D, head_dim=512, ratio=4, quant="fp8", plan=_calls(259), path="prefill",
      tags=("v4-flash",), large=True)
_case("flash_csa_indexer_s130", batch=2, dim=D, head_dim=128, ratio=4, quant="fp4", plan=_calls(130), path="prefill",
      tags=("v4-flash",), large=True)
_case("flash_hca_s260", batch=1, dim=D, head_dim=512, ratio=128, quant="fp8", plan=_calls(260), path="prefill",
      tags=("v4-flash",), large=True)
_case("flash_csa_main_chunks_decode", batch=2, dim=D, head_dim=512, ratio=4, quant="fp8", plan=_calls(61, 67, 1, 1, 1, 1, 3),
      path="chunk", tags=("v4-flash", "odd"), large=True)
_case("flash_hca_chunks_decode", batch=1, dim=D, head_dim=512, ratio=128, quant="fp8", plan=_calls(127, 1, 1, 129, 2),
      path="chunk", tags=("v4-flash", "odd"), large=True)

# generic shapes (small models, e.g. test configurations): head dim 32, rope dims 8-16, any
# ratio >= 2, the overlapping (CSA) window form on and off independently of the ratio
_case("generic_csa_hd32_r8", batch=2, dim=48, head_dim=32, ratio=4, quant="none", plan=_calls(13, 1, 1, 3), path="generic",
      tags=("generic",), rope_dim=8)
_case("generic_hca_ratio8_hd32_r16", batch=2, dim=48, head_dim=32, ratio=8, quant="none", plan=_calls(5, 4, 1, 1, 9),
      path="generic", tags=("generic",), rope_dim=16)
_case("generic_overlap_ratio8_hd32", batch=1, dim=40, head_dim=32, ratio=8, quant="none", plan=_calls(19, 1, 1, 5),
      path="generic", tags=("generic",), rope_dim=8, overlap=True)
_case("generic_ratio4_no_overlap_hd40", batch=2, dim=32, head_dim=40, ratio=4, quant="none", plan=_calls(6, 1, 1, 1, 7),
      path="generic", tags=("generic",), rope_dim=8, overlap=False)
_case("generic_overlap_ratio2_hd16", batch=1, dim=24, head_dim=16, ratio=2, quant="none", plan=_calls(7, 1, 2),
      path="generic", tags=("generic",), rope_dim=8, overlap=True)
_case("generic_hd96_r32_fp8_ratio8", batch=1, dim=32, head_dim=96, ratio=8, quant="fp8", plan=_calls(17, 1, 6),
      path="generic", tags=("generic",), rope_dim=32)
_case("generic_indexer_hd32_fp4", batch=2, dim=48, head_dim=32, ratio=4, quant="fp4", plan=_calls(9, 1, 2), path="generic",
      tags=("generic",), rope_dim=8)
_case("generic_fp32_overlap_ratio16", batch=1, dim=32, head_dim=32, ratio=16, quant="none", plan=_calls(33, 1, 14),
      path="generic", tags=("generic",), rope_dim=8, overlap=True, dtype=torch.float32)

# --------------------------------------------------------------------------------------------
# NaN / ±inf inputs (docs/numerics.md)
# --------------------------------------------------------------------------------------------
from ._nonfinite import register_nonfinite  # noqa: E402

register_nonfinite("compress_kv/csa_small_prefill_s129", ["x", "wkv", "wgate", "ape", "norm_weight", "freqs"], values=("nan", "inf", "ninf"))
register_nonfinite("compress_kv/hca_small_prefill_s130", ["x", "wkv", "wgate", "ape"], values=("nan", "inf", "ninf"))
