"""Mixture-of-experts: the sqrt-softplus router with selection-only bias and hash routing, and
the routed / shared SwiGLU-clamp expert FFN over bf16, FP8 or FP4 expert weights (SPEC §11).
"""
from __future__ import annotations

import math

import torch

from ... import _checks as C
from ..._registry import declare_op
from . import reference as _reference
from .reference import FP4, FP8, weight_format

__all__ = ["moe_gate", "moe_experts", "shared_expert", "quantize_expert_weights"]

_SCALE_DTYPES = (torch.float32, torch.float8_e8m0fnu)
_FP4_DTYPES = (torch.uint8, torch.int8, torch.float4_e2m1fn_x2)
_WEIGHT_DTYPES = (*C.FLOAT_DTYPES, torch.float8_e4m3fn, *_FP4_DTYPES)


# ----------------------------------------------------------------------------- fake kernels
def _fake_gate(x, weight, bias, tid2eid, token_ids, topk, route_scale, hf_eps, hf_routing):
    t = x.shape[0]
    return (
        x.new_empty((t, topk), dtype=torch.float32),
        x.new_empty((t, topk), dtype=torch.int32),
        x.new_empty((t, weight.shape[0]), dtype=x.dtype if hf_routing else torch.float32),
    )


def _fake_experts(x, topk_weights, topk_ids, w1, w1_s, w3, w3_s, w2, w2_s, swiglu_limit, weight_after_w2, out_dtype,
                  hf_rounding):
    return x.new_empty(x.shape, dtype=out_dtype)


# ----------------------------------------------------------------------------- checks
def _shape_str(names: tuple[str, ...], dims: tuple[int | None, ...]) -> str:
    return "[" + ", ".join(n if d is None else f"{n}={d}" for n, d in zip(names, dims)) + "]"


def _check_weight(
    op: str,
    name: str,
    w: object,
    scale_name: str,
    w_s: object,
    names: tuple[str, ...],
    dims: tuple[int | None, ...],
) -> tuple[int, ...]:
    """Validate one expert weight and its scales; returns the logical (unpacked) shape.

    ``names``/``dims`` describe the expected logical shape (``None`` = not yet known); the last
    dim is the GEMM's K (in-features). Formats (SPEC §4.9, docs/op_contracts.md): float with no
    scales; e4m3 with one scale per 128×128 tile; packed FP4 ``[..., K/2]`` with 1×32 scales.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _WEIGHT_DTYPES:
        raise TypeError(
            f"{op}: {name} must have dtype bfloat16/float16/float32 (float), float8_e4m3fn (FP8) or "
            f"uint8 (packed FP4), got {str(w.dtype).replace('torch.', '')}"
        )
    if w.dim() != len(dims):
        raise ValueError(f"{op}: {name} must have {len(dims)} dims {_shape_str(names, dims)}, got shape {list(w.shape)}")
    fmt = weight_format(w)
    k = dims[-1]
    assert k is not None
    if fmt != "float" and k % 128:
        raise ValueError(
            f"{op}: {name} is {fmt.upper()}, which needs its in-features {names[-1]} to be a multiple of 128 "
            f"(act_quant block), got {names[-1]}={k}"
        )
    logical = (*w.shape[:-1], w.shape[-1] * 2 if fmt == FP4 else w.shape[-1])
    if any(e is not None and e != a for e, a in zip(dims, logical)):
        packed = f" (packed FP4 stores [..., {names[-1]}/2] bytes)" if fmt == FP4 else ""
        raise ValueError(
            f"{op}: {name} must have logical shape {_shape_str(names, dims)}{packed}, got logical shape "
            f"{list(logical)} (stored {list(w.shape)}, dtype {str(w.dtype).replace('torch.', '')})"
        )
    lead, rows = list(logical[:-2]), logical[-2]
    if fmt == "float":
        if w_s is not None:
            raise ValueError(f"{op}: {scale_name} must be None for a float {name} (dtype {str(w.dtype).replace('torch.', '')})")
        return logical
    if w_s is None:
        raise ValueError(f"{op}: {name} is {fmt.upper()} ({str(w.dtype).replace('torch.', '')}) and needs {scale_name}, got None")
    if fmt == FP8:
        expected = [*lead, -(-rows // 128), -(-k // 128)]
    else:
        expected = [*lead, rows, k // 32]
    C.check_tensor(op, scale_name, w_s, dtypes=_SCALE_DTYPES, shape=expected)
    return logical


def _prep_weight(w: torch.Tensor) -> torch.Tensor:
    # A CPU float expert stack whose experts are each row-contiguous (e.g. one half of a fused
    # [E, 2I, D] gate_up weight) is passed as is: the CPU kernels read it in place (the reference
    # takes any strides, the Triton adapter makes it contiguous), so no copy of the weights.
    if not (w.device.type == "cpu" and w.dtype in C.FLOAT_DTYPES and w.dim() == 3 and w.stride(-1) == 1
            and w.stride(-2) == w.shape[-1] and w.stride(0) >= w.shape[-2] * w.shape[-1]):
        w = w.contiguous()
    return w.view(torch.uint8) if weight_format(w) == FP4 and w.dtype != torch.uint8 else w


def _opt(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _check_ffn_options(op: str, swiglu_limit: object, out_dtype: object, default: torch.dtype) -> tuple[float, torch.dtype]:
    lim = C.check_real(op, "swiglu_limit", swiglu_limit)
    C.check_value(op, "swiglu_limit", swiglu_limit, lim >= 0, ">= 0 (0 disables the clamp)")
    return lim, C.check_out_dtype(op, out_dtype, default)


def _check_moe_gate(x, weight, bias, tid2eid, token_ids, topk, route_scale, hf_eps, hf_routing) -> None:
    """Structural checks (types, dtypes, shapes, devices, options): a fact of the signature."""
    op = "moe_gate"
    C.check_tensor(op, "x", x, ndim=2, dtypes=C.FLOAT_DTYPES)
    t, d = x.shape
    C.check_tensor(op, "weight", weight, ndim=2, dtypes=C.FLOAT_DTYPES)
    C.check_dim(op, "weight", weight, 1, d, "D = x.shape[1]")
    n_experts = weight.shape[0]
    C.check_int(op, "topk", topk, minimum=1)
    if topk > n_experts:
        raise ValueError(f"{op}: topk must be <= the number of experts E={n_experts}, got {topk}")
    rs = C.check_real(op, "route_scale", route_scale)
    C.check_value(op, "route_scale", route_scale, math.isfinite(rs) and rs > 0, "a finite float > 0")
    C.check_bool(op, "hf_eps", hf_eps)
    C.check_bool(op, "hf_routing", hf_routing)
    if bias is not None:
        C.check_tensor(op, "bias", bias, dtypes=C.FLOAT_DTYPES, shape=[n_experts])
    if (tid2eid is None) != (token_ids is None):
        given, missing = ("tid2eid", "token_ids") if token_ids is None else ("token_ids", "tid2eid")
        raise ValueError(f"{op}: hash routing needs both tid2eid and token_ids; {given} was given but {missing} is None")
    if tid2eid is not None:
        if bias is not None:
            raise ValueError(f"{op}: bias must be None with hash routing (tid2eid given); hash layers have no bias")
        C.check_tensor(op, "tid2eid", tid2eid, ndim=2, dtypes=C.INDEX_DTYPES)
        if tid2eid.shape[1] != topk:
            raise ValueError(f"{op}: tid2eid must have shape [V, topk={topk}], got {list(tid2eid.shape)}")
        C.check_tensor(op, "token_ids", token_ids, dtypes=C.INDEX_DTYPES, shape=[t])
    C.check_same_device(op, x=x, weight=weight, bias=bias, tid2eid=tid2eid, token_ids=token_ids)


def _check_moe_gate_ids(x, weight, bias, tid2eid, token_ids, topk, route_scale, hf_eps, hf_routing) -> None:
    """The value checks of hash routing: table entries are experts, token ids index the table."""
    if tid2eid is not None:
        C.check_index_range("moe_gate", "tid2eid", tid2eid, weight.shape[0], allow_sentinel=False)
        C.check_index_range("moe_gate", "token_ids", token_ids, tid2eid.shape[0], allow_sentinel=False)


def _check_moe_experts(x, topk_weights, topk_ids, w1, w1_s, w3, w3_s, w2, w2_s, swiglu_limit, weight_after_w2,
                       out_dtype, hf_rounding) -> None:
    """Structural checks (types, dtypes, shapes, devices, options): a fact of the signature."""
    op = "moe_experts"
    C.check_tensor(op, "x", x, ndim=2, dtypes=C.FLOAT_DTYPES)
    t, d = x.shape
    C.check_tensor(op, "topk_ids", topk_ids, ndim=2, dtypes=C.INDEX_DTYPES)
    C.check_dim(op, "topk_ids", topk_ids, 0, t, "T = x.shape[0]")
    k = topk_ids.shape[1]
    C.check_tensor(op, "topk_weights", topk_weights, dtypes=C.FLOAT_DTYPES, shape=[t, k])
    e, i, _ = _check_weight(op, "w1", w1, "w1_scale", w1_s, ("E", "I", "D"), (None, None, d))
    _check_weight(op, "w3", w3, "w3_scale", w3_s, ("E", "I", "D"), (e, i, d))
    _check_weight(op, "w2", w2, "w2_scale", w2_s, ("E", "D", "I"), (e, d, i))
    _check_ffn_options(op, swiglu_limit, out_dtype, x.dtype)
    C.check_bool(op, "weight_after_w2", weight_after_w2)
    C.check_bool(op, "hf_rounding", hf_rounding)
    if hf_rounding and not weight_after_w2:
        raise ValueError(f"{op}: hf_rounding=True is the [HF] expert, which weights after w2: pass weight_after_w2=True")
    C.check_same_device(
        op, x=x, topk_weights=topk_weights, topk_ids=topk_ids, w1=w1, w1_scale=w1_s,
        w3=w3, w3_scale=w3_s, w2=w2, w2_scale=w2_s,
    )


def _check_moe_experts_ids(x, topk_weights, topk_ids, w1, w1_s, w3, w3_s, w2, w2_s, swiglu_limit, weight_after_w2,
                           out_dtype, hf_rounding) -> None:
    """The value check: every id is an expert of w1 or the −1 sentinel."""
    C.check_index_range("moe_experts", "topk_ids", topk_ids, w1.shape[0], allow_sentinel=True)


_moe_gate = declare_op(
    "moe",
    "moe_gate",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? tid2eid, Tensor? token_ids, int topk, float route_scale, "
    "bool hf_eps, bool hf_routing) -> (Tensor, Tensor, Tensor)",
    _fake_gate,
    check=_check_moe_gate,
    value_check=_check_moe_gate_ids,
    memoize_checks=True,
)
_moe_experts = declare_op(
    "moe",
    "moe_experts",
    "(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor w1, Tensor? w1_s, Tensor w3, Tensor? w3_s, Tensor w2, "
    "Tensor? w2_s, float swiglu_limit, bool weight_after_w2, ScalarType out_dtype, bool hf_rounding) -> Tensor",
    _fake_experts,
    check=_check_moe_experts,
    value_check=_check_moe_experts_ids,
    memoize_checks=True,
)


# ----------------------------------------------------------------------------- router
def moe_gate(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    topk: int = 6,
    route_scale: float = 1.5,
    tid2eid: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    hf_eps: bool = False,
    hf_routing: bool = False,
    return_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-V4 MoE router: sqrt-softplus scores, top-k with a selection-only bias, or hash
    routing (SPEC §11.1, §11.2).

    ``s = sqrt(softplus(fp32(x) @ fp32(weight)ᵀ))``; the selected experts are the ``topk``
    largest ``s + bias`` (learned layers) or ``tid2eid[token_ids]`` (hash layers 0..2). The
    weights are the **unbiased** ``s`` at the selection, normalised to sum 1 and multiplied by
    ``route_scale``. Selected ids are ordered by descending ``s + bias``; **ties go to the lower
    expert id** (deterministic on every backend). Hash routing keeps the table's column order.

    Parameters
    ----------
    x : [T, D] bf16/fp16/fp32 (upcast to fp32)
    weight : [E, D] bf16/fp16/fp32 gate weight
    bias : [E] float (``e_score_correction_bias``; used for selection only) or None
    topk : experts per token, 1..E (6 in V4)
    route_scale : 1.5 (Flash) / 2.5 (Pro); finite and > 0
    tid2eid : [V, topk] int32/int64 hash table with entries in [0, E), or None. Needs
        ``token_ids`` and excludes ``bias``.
    token_ids : [T] int32/int64 vocabulary ids in [0, V) (hash routing only)
    hf_eps : [HF] variant: add 1e-20 to the normalisation denominator (SPEC §15 #6)
    hf_routing : [HF] variant of transformers 5.23.0 (``DeepseekV4TopKRouter`` /
        ``DeepseekV4HashRouter``, use with ``hf_eps=True``): the logits, ``softplus``, ``sqrt``,
        the sum of the selected scores, the division and the ``route_scale`` product are each
        rounded to ``x.dtype`` (selection ``scores + bias`` in fp32). Same as the default for fp32
        ``x``. Ties in the selection still go to the lower id (HF's ``torch.topk`` leaves them open).
    return_logits : also return the router logits ``x @ weightᵀ`` [T, E] (fp32; ``x.dtype`` with
        ``hf_routing``), as HF's routers do

    Returns
    -------
    (weights [T, topk] fp32, ids [T, topk] int32), plus logits [T, E] with ``return_logits``

    Notes
    -----
    The entries of ``tid2eid`` and ``token_ids`` are range-checked when value checks are on
    (CPU tensors, or any device under ``V4K_CHECKS=full``; ``V4K_CHECKS=off`` skips them) since
    reading them on an accelerator forces a synchronisation.

    Example
    -------
    >>> import torch, v4kernels
    >>> x, w = torch.randn(3, 64), torch.randn(16, 64) / 8
    >>> weights, ids = v4kernels.moe_gate(x, w, torch.zeros(16), topk=4, route_scale=1.5)
    >>> weights.shape, ids.dtype, bool(torch.allclose(weights.sum(-1), torch.tensor(1.5)))
    (torch.Size([3, 4]), torch.int32, True)
    """
    C.check_bool("moe_gate", "return_logits", return_logits)
    key = _moe_gate.validate(x, weight, bias, tid2eid, token_ids, topk, route_scale, hf_eps, hf_routing)
    t, rs = x.shape[0], float(route_scale)
    if t == 0:
        w, ids, logits = _fake_gate(x, weight, bias, tid2eid, token_ids, topk, rs, hf_eps, hf_routing)
    else:
        w, ids, logits = _moe_gate.run_as(
            key,
            x.contiguous(),
            weight.contiguous(),
            None if bias is None else C.contiguous_as(bias, torch.float32),
            _opt(tid2eid),
            _opt(token_ids),
            topk,
            rs,
            hf_eps,
            hf_routing,
        )
    return (w, ids, logits) if return_logits else (w, ids)


# ----------------------------------------------------------------------------- experts
def moe_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    *,
    w1_scale: torch.Tensor | None = None,
    w3_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    swiglu_limit: float = 10.0,
    weight_after_w2: bool = False,
    out_dtype: torch.dtype | None = None,
    hf_rounding: bool = False,
) -> torch.Tensor:
    """Routed experts: permute → per-expert SwiGLU-clamp FFN → weight → unpermute-reduce (SPEC §11.3–11.4).

    For each (token, slot) with expert ``e = topk_ids[t, j] >= 0`` and weight ``w``::

        g = linear(x_t, w1[e]);  u = linear(x_t, w3[e])      # rounded to x.dtype
        h = silu(min(g, L)) · clamp(u, −L, L)                # fp32, L = swiglu_limit
        y = linear(x.dtype(w · h), w2[e])                    # [OFF]: weight before w2
        out_t += fp32(y)                                     # fp32 reduction

    ``linear`` of a float weight is an fp32 matmul rounded to ``x.dtype``; of an FP8 or FP4
    weight it is ``act_quant(·, 128)`` (power-of-two scales) + ``fp8_gemm`` / ``fp4_gemm``
    (SPEC §4.8). Ids of −1 are skipped (expert-parallel masking); experts with no tokens cost
    nothing. The gate has no lower clamp.

    Parameters
    ----------
    x : [T, D] bf16/fp16/fp32
    topk_weights : [T, k] float routing weights (from :func:`moe_gate`)
    topk_ids : [T, k] int32/int64 expert ids in [0, E) or −1
    w1, w3 : [E, I, D] gate / up projections; w2 : [E, D, I] down projection. Each is either
        float (bf16/fp16/fp32, scale None), or float8_e4m3fn with scale
        [E, ceil(rows/128), ceil(cols/128)], or packed FP4 uint8 [E, rows, cols/2] with scale
        [E, rows, cols/32] (scales fp32 or float8_e8m0fnu). Quantised weights need their
        in-features (D for w1/w3, I for w2) to be a multiple of 128.
    w1_scale, w3_scale, w2_scale : the scales above, or None for float weights
    swiglu_limit : L (10.0 in V4); 0 disables the clamp
    weight_after_w2 : [HF] variant (SPEC §15 #6): multiply ``y`` by the weight after w2
        instead of ``h`` before it; differs from [OFF] only through w2's FP8 input rounding
    out_dtype : output dtype, default ``x.dtype``; fp32 lets the caller add the shared expert
        before a single rounding
    hf_rounding : [HF] variant of transformers 5.23.0 (``DeepseekV4Experts`` eager forward;
        needs ``weight_after_w2=True``): ``silu(g)`` and ``silu(g)·u`` are each rounded to
        ``x.dtype``, ``y·w`` is rounded to ``x.dtype``, and the sum over a token's experts runs
        in ``out_dtype`` in ascending expert id (HF: ``out_dtype = x.dtype``, a bf16 sum).
        Same as the default for fp32 ``x`` and output, up to the order of the fp32 sum.

    Returns
    -------
    out : [T, D] out_dtype

    Notes
    -----
    ``topk_ids`` is range-checked when value checks are on (CPU tensors, or
    ``V4K_CHECKS=full``). A token listing the same expert twice gets both contributions.

    Example
    -------
    >>> import torch, v4kernels
    >>> x = torch.randn(4, 128, dtype=torch.bfloat16)
    >>> w1, w3 = torch.randn(2, 2, 64, 128, dtype=torch.bfloat16) / 11
    >>> w2 = torch.randn(2, 128, 64, dtype=torch.bfloat16) / 8
    >>> ids = torch.tensor([[0, 1], [1, -1], [0, 0], [-1, -1]], dtype=torch.int32)
    >>> out = v4kernels.moe_experts(x, torch.full((4, 2), 0.5), ids, w1, w3, w2)
    >>> out.shape, out.dtype, bool(out[3].eq(0).all())
    (torch.Size([4, 128]), torch.bfloat16, True)
    """
    out_dtype = C.check_out_dtype("moe_experts", out_dtype, x.dtype if isinstance(x, torch.Tensor) else torch.float32)
    key = _moe_experts.validate(x, topk_weights, topk_ids, w1, w1_scale, w3, w3_scale, w2, w2_scale, swiglu_limit,
                                weight_after_w2, out_dtype, hf_rounding)
    (t, d), k, i, lim = x.shape, topk_ids.shape[1], w1.shape[1], float(swiglu_limit)
    if t == 0 or d == 0:
        return torch.empty((t, d), dtype=out_dtype, device=x.device)
    if k == 0 or i == 0:
        return torch.zeros((t, d), dtype=out_dtype, device=x.device)
    return _moe_experts.run_as(
        key,
        x.contiguous(),
        C.contiguous_as(topk_weights, torch.float32),
        C.contiguous_as(topk_ids, torch.int32),
        _prep_weight(w1), _opt(w1_scale),
        _prep_weight(w3), _opt(w3_scale),
        _prep_weight(w2), _opt(w2_scale),
        lim,
        weight_after_w2,
        out_dtype,
        hf_rounding,
    )


def shared_expert(
    x: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    *,
    w1_scale: torch.Tensor | None = None,
    w3_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    swiglu_limit: float = 10.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The shared expert (SPEC §11.3): the same SwiGLU-clamp FFN with no routing weight.

    Runs :func:`moe_experts` with one expert that every token selects with weight 1 (exact in
    fp32), so every backend's grouped kernel serves it too.

    Parameters
    ----------
    x : [T, D] bf16/fp16/fp32
    w1, w3 : [I, D]; w2 : [D, I]. Float, or FP8 e4m3 with [ceil(rows/128), ceil(cols/128)]
        scales (the V4 checkpoint format), or packed FP4 uint8 [rows, cols/2] with
        [rows, cols/32] scales.
    swiglu_limit : 10.0 in V4 (the shared expert uses the routed clamp); 0 disables it
    out_dtype : default ``x.dtype``

    Returns
    -------
    [T, D] out_dtype

    Example
    -------
    >>> import torch, v4kernels
    >>> x = torch.randn(2, 128)
    >>> w1, s1 = v4kernels.quantize_expert_weights(torch.randn(64, 128) / 11, "fp8")
    >>> w3, s3 = v4kernels.quantize_expert_weights(torch.randn(64, 128) / 11, "fp8")
    >>> w2 = torch.randn(128, 64) / 8
    >>> v4kernels.shared_expert(x, w1, w3, w2, w1_scale=s1, w3_scale=s3).shape
    torch.Size([2, 128])
    """
    op = "shared_expert"
    C.check_tensor(op, "x", x, ndim=2, dtypes=C.FLOAT_DTYPES)
    t, d = x.shape
    i, _ = _check_weight(op, "w1", w1, "w1_scale", w1_scale, ("I", "D"), (None, d))
    _check_weight(op, "w3", w3, "w3_scale", w3_scale, ("I", "D"), (i, d))
    _check_weight(op, "w2", w2, "w2_scale", w2_scale, ("D", "I"), (d, i))
    lim, out_dtype = _check_ffn_options(op, swiglu_limit, out_dtype, x.dtype)
    C.check_same_device(op, x=x, w1=w1, w1_scale=w1_scale, w3=w3, w3_scale=w3_scale, w2=w2, w2_scale=w2_scale)
    if t == 0 or d == 0:
        return torch.empty((t, d), dtype=out_dtype, device=x.device)
    if i == 0:
        return torch.zeros((t, d), dtype=out_dtype, device=x.device)

    def one(w: torch.Tensor | None) -> torch.Tensor | None:
        return None if w is None else w.unsqueeze(0)

    return _moe_experts(
        x.contiguous(),
        torch.ones((t, 1), dtype=torch.float32, device=x.device),
        torch.zeros((t, 1), dtype=torch.int32, device=x.device),
        _prep_weight(one(w1)), _opt(one(w1_scale)),
        _prep_weight(one(w3)), _opt(one(w3_scale)),
        _prep_weight(one(w2)), _opt(one(w2_scale)),
        lim,
        False,
        out_dtype,
        False,
    )


# ----------------------------------------------------------------------------- weight helpers
def quantize_expert_weights(
    w: torch.Tensor, fmt: str = "fp8", *, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise float expert weights into the V4 checkpoint formats (SPEC §4.1–4.2, §4.9).

    ``"fp8"``: e4m3 with one power-of-two (UE8M0-style) scale per 128×128 tile,
    ``s = 2^ceil(log2(amax/448))`` (edge tiles use their own amax). ``"fp4"``: e2m1 codes
    packed two per byte along the last axis with one power-of-two scale per 1×32 block,
    ``s = 2^ceil(log2(amax/6))``, round to nearest even. For tests, demos and benchmarks.

    Parameters
    ----------
    w : [E, R, C] (or [R, C] for a shared expert) bf16/fp16/fp32; ``C % 32 == 0`` for fp4
    fmt : "fp8" or "fp4"
    scale_dtype : torch.float32 (default) or torch.float8_e8m0fnu

    Returns
    -------
    fp8: (w_q [E, R, C] float8_e4m3fn, scales [E, ceil(R/128), ceil(C/128)])
    fp4: (w_q [E, R, C/2] uint8, scales [E, R, C/32])

    Example
    -------
    >>> import torch, v4kernels
    >>> q, s = v4kernels.quantize_expert_weights(torch.randn(2, 256, 128), "fp8")
    >>> q.dtype, s.shape
    (torch.float8_e4m3fn, torch.Size([2, 2, 1]))
    >>> q, s = v4kernels.quantize_expert_weights(torch.randn(2, 256, 128), "fp4")
    >>> q.shape, s.shape
    (torch.Size([2, 256, 64]), torch.Size([2, 256, 4]))
    """
    op = "quantize_expert_weights"
    C.check_tensor(op, "w", w, ndim=(2, 3), dtypes=C.FLOAT_DTYPES)
    C.check_value(op, "fmt", fmt, fmt in ("fp8", "fp4"), "'fp8' or 'fp4'")
    C.check_value(op, "scale_dtype", scale_dtype, scale_dtype in _SCALE_DTYPES, "torch.float32 or torch.float8_e8m0fnu")
    squeeze = w.dim() == 2
    w3d = w.unsqueeze(0) if squeeze else w
    e, r, c = w3d.shape
    if fmt == "fp4":
        if c % 32:
            raise ValueError(f"{op}: fp4 needs w.shape[-1] to be a multiple of 32 (1x32 blocks), got {c}")
        if w3d.numel() == 0:
            q = torch.empty((e, r, c // 2), dtype=torch.uint8, device=w.device)
            s = torch.empty((e, r, c // 32), dtype=torch.float32, device=w.device)
        else:
            q, s = _reference.quantize_fp4_rows(w3d.contiguous())
    else:
        if w3d.numel() == 0:
            q = torch.empty((e, r, c), dtype=torch.float8_e4m3fn, device=w.device)
            s = torch.empty((e, -(-r // 128), -(-c // 128)), dtype=torch.float32, device=w.device)
        else:
            q, s = _reference.quantize_fp8_blocks(w3d)
    s = s.to(scale_dtype)
    return (q[0], s[0]) if squeeze else (q, s)
