"""Manifold-constrained hyper-connections (mHC) of DeepSeek-V4 (SPEC §10).

The residual stream is ``X [..., hc, D]`` (hc = 4 streams). Around every sub-layer
:func:`hc_pre` collapses the streams into the sub-layer input and produces the ``post`` gains
and the doubly-stochastic ``comb`` matrix (via :func:`hc_split_sinkhorn`); :func:`hc_post`
expands the sub-layer output back into the streams. :func:`hc_head` collapses the streams once
more after the last block.
"""
from __future__ import annotations

import torch

from ... import _checks as C
from ..._registry import declare_op
from .. import _autograd
from . import backward as _bw
from . import reference as _reference  # noqa: F401  (registers the reference kernels)

__all__ = ["hc_split_sinkhorn", "hc_pre", "hc_post", "hc_head"]

_F32 = (torch.float32,)


# ----------------------------------------------------------------------------- fake kernels
def _fake_split(mixes, hc_scale, hc_base, hc_mult, sinkhorn_iters, eps):
    lead = mixes.shape[:-1]
    return (
        mixes.new_empty((*lead, hc_mult), dtype=torch.float32),
        mixes.new_empty((*lead, hc_mult), dtype=torch.float32),
        mixes.new_empty((*lead, hc_mult, hc_mult), dtype=torch.float32),
    )


def _fake_pre(x, hc_fn, hc_scale, hc_base, sinkhorn_iters, norm_eps, hc_eps):
    lead, hc = x.shape[:-2], x.shape[-2]
    return (
        x.new_empty((*lead, x.shape[-1])),
        x.new_empty((*lead, hc), dtype=torch.float32),
        x.new_empty((*lead, hc, hc), dtype=torch.float32),
    )


def _fake_post(x, residual, post, comb, bf16_mix):
    return torch.empty_like(residual, dtype=x.dtype)


def _fake_head(x, hc_fn, hc_scale, hc_base, norm_eps, hc_eps):
    return x.new_empty((*x.shape[:-2], x.shape[-1]))


# ----------------------------------------------------------------------------- checks
def _check_params(op: str, hc: int, n_mix: int, n_scale: int, hc_scale: torch.Tensor, hc_base: torch.Tensor) -> None:
    C.check_tensor(op, "hc_scale", hc_scale, dtypes=_F32, shape=[n_scale])
    C.check_tensor(op, "hc_base", hc_base, dtypes=_F32, shape=[n_mix])


def _check_streams(op: str, x: torch.Tensor) -> tuple[int, int]:
    C.check_tensor(op, "x", x, dtypes=C.FLOAT_DTYPES)
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be [..., hc_mult, D] (>= 2 dims), got shape {list(x.shape)}")
    hc, d = x.shape[-2], x.shape[-1]
    if hc < 1 or d < 1:
        raise ValueError(f"{op}: x must have hc_mult >= 1 streams of D >= 1 features, got shape {list(x.shape)}")
    return hc, d


def _check_hc_split_sinkhorn(mixes, hc_scale, hc_base, hc_mult, sinkhorn_iters, eps) -> None:
    op = "hc_split_sinkhorn"
    hc = C.check_int(op, "hc_mult", hc_mult, minimum=1)
    C.check_int(op, "sinkhorn_iters", sinkhorn_iters, minimum=1)
    C.check_real(op, "eps", eps, minimum=0)
    n_mix = (2 + hc) * hc
    C.check_tensor(op, "mixes", mixes, dtypes=_F32)
    if mixes.dim() < 1 or mixes.shape[-1] != n_mix:
        raise ValueError(
            f"{op}: mixes must have shape [..., (2+hc_mult)*hc_mult = {n_mix}] for hc_mult={hc}, got {list(mixes.shape)}"
        )
    _check_params(op, hc, n_mix, 3, hc_scale, hc_base)
    C.check_same_device(op, mixes=mixes, hc_scale=hc_scale, hc_base=hc_base)


def _check_hc_pre(x, hc_fn, hc_scale, hc_base, sinkhorn_iters, norm_eps, hc_eps) -> None:
    op = "hc_pre"
    hc, d = _check_streams(op, x)
    n_mix = (2 + hc) * hc
    C.check_tensor(op, "hc_fn", hc_fn, dtypes=_F32, shape=[n_mix, hc * d])
    _check_params(op, hc, n_mix, 3, hc_scale, hc_base)
    C.check_int(op, "sinkhorn_iters", sinkhorn_iters, minimum=1)
    C.check_real(op, "norm_eps", norm_eps, minimum=0)
    C.check_real(op, "hc_eps", hc_eps, minimum=0)
    C.check_same_device(op, x=x, hc_fn=hc_fn, hc_scale=hc_scale, hc_base=hc_base)


def _check_hc_post(x, residual, post, comb, bf16_mix) -> None:
    op = "hc_post"
    C.check_tensor(op, "x", x, dtypes=C.FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be [..., D], got a scalar")
    lead, d = list(x.shape[:-1]), x.shape[-1]
    C.check_tensor(op, "residual", residual, dtypes=(x.dtype,))
    if residual.dim() != x.dim() + 1 or list(residual.shape[:-2]) != lead or residual.shape[-1] != d:
        exp = "[" + ", ".join(map(str, lead + ["hc", d])) + "]"
        raise ValueError(f"{op}: residual must have shape {exp} to match x {list(x.shape)}, got {list(residual.shape)}")
    hc = residual.shape[-2]
    if hc < 1:
        raise ValueError(f"{op}: residual must have hc_mult >= 1 streams, got shape {list(residual.shape)}")
    C.check_tensor(op, "post", post, dtypes=_F32, shape=[*lead, hc])
    C.check_tensor(op, "comb", comb, dtypes=_F32, shape=[*lead, hc, hc])
    if not isinstance(bf16_mix, bool):
        raise TypeError(f"{op}: bf16_mix must be a bool, got {type(bf16_mix).__name__} {bf16_mix!r}")
    C.check_same_device(op, x=x, residual=residual, post=post, comb=comb)


def _check_hc_head(x, hc_fn, hc_scale, hc_base, norm_eps, hc_eps) -> None:
    op = "hc_head"
    hc, d = _check_streams(op, x)
    C.check_tensor(op, "hc_fn", hc_fn, dtypes=_F32, shape=[hc, hc * d])
    _check_params(op, hc, hc, 1, hc_scale, hc_base)
    C.check_real(op, "norm_eps", norm_eps, minimum=0)
    C.check_real(op, "hc_eps", hc_eps, minimum=0)
    C.check_same_device(op, x=x, hc_fn=hc_fn, hc_scale=hc_scale, hc_base=hc_base)


_split = declare_op(
    "mhc", "hc_split_sinkhorn",
    "(Tensor mixes, Tensor hc_scale, Tensor hc_base, int hc_mult, int sinkhorn_iters, float eps) -> (Tensor, Tensor, Tensor)",
    _fake_split,
    check=_check_hc_split_sinkhorn,
    memoize_checks=True,
    autograd=_autograd.recompute_backward(_bw.hc_split_sinkhorn_math, (0, 1, 2)),
)
_pre = declare_op(
    "mhc", "hc_pre",
    "(Tensor x, Tensor hc_fn, Tensor hc_scale, Tensor hc_base, int sinkhorn_iters, float norm_eps, float hc_eps)"
    " -> (Tensor, Tensor, Tensor)",
    _fake_pre,
    check=_check_hc_pre,
    memoize_checks=True,
    autograd=_autograd.recompute_backward(_bw.hc_pre_math, (0, 1, 2, 3)),
)
_post = declare_op("mhc", "hc_post", "(Tensor x, Tensor residual, Tensor post, Tensor comb, bool bf16_mix) -> Tensor", _fake_post,
                  check=_check_hc_post, memoize_checks=True, autograd=_autograd.recompute_backward(_bw.hc_post_math, (0, 1, 2, 3)))
_head = declare_op(
    "mhc", "hc_head", "(Tensor x, Tensor hc_fn, Tensor hc_scale, Tensor hc_base, float norm_eps, float hc_eps) -> Tensor",
    _fake_head,
    check=_check_hc_head,
    memoize_checks=True,
    autograd=_autograd.recompute_backward(_bw.hc_head_math, (0, 1, 2, 3)),
)


# ----------------------------------------------------------------------------- public ops
def hc_split_sinkhorn(
    mixes: torch.Tensor,
    hc_scale: torch.Tensor,
    hc_base: torch.Tensor,
    hc_mult: int = 4,
    sinkhorn_iters: int = 20,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split mix logits into ``pre``/``post`` gains and a Sinkhorn-normalised ``comb`` (SPEC §10.2).

    With ``hc = hc_mult`` and logits laid out ``[pre (hc) | post (hc) | comb (hc·hc, row-major)]``::

        pre  = sigmoid(mixes[:hc]·scale[0] + base[:hc]) + eps
        post = 2·sigmoid(mixes[hc:2hc]·scale[1] + base[hc:2hc])
        C    = softmax_rows(mixes[2hc:]·scale[2] + base[2hc:]) + eps;  C /= colsum(C) + eps
        repeat sinkhorn_iters − 1 times:  C /= rowsum(C) + eps;  C /= colsum(C) + eps

    so every column of ``comb`` sums to ≈ 1. All fp32.

    Parameters
    ----------
    mixes : [..., (2+hc)·hc] fp32 mix logits (from the pre-norm GEMV, SPEC §10.1)
    hc_scale : [3] fp32
    hc_base : [(2+hc)·hc] fp32
    hc_mult : number of streams (4 in V4)
    sinkhorn_iters : >= 1 (20 in V4)
    eps : hc_eps (1e-6 in V4)

    Returns
    -------
    pre [..., hc] fp32, post [..., hc] fp32, comb [..., hc, hc] fp32 (``comb[j, k]``: source
    stream j, destination stream k).

    Example
    -------
    >>> import torch, v4kernels
    >>> pre, post, comb = v4kernels.hc_split_sinkhorn(torch.zeros(1, 24), torch.ones(3), torch.zeros(24))
    >>> post
    tensor([[1., 1., 1., 1.]])
    >>> bool(torch.allclose(comb.sum(-2), torch.ones(1, 4), atol=1e-5))
    True
    """
    key = _split.validate(mixes, hc_scale, hc_base, hc_mult, sinkhorn_iters, eps)
    hc, iters, eps = hc_mult, sinkhorn_iters, float(eps)
    if mixes.numel() == 0:
        return _fake_split(mixes, hc_scale, hc_base, hc, iters, eps)
    return _split.run_as(key, mixes.contiguous(), hc_scale.contiguous(), hc_base.contiguous(), hc, iters, eps)


def hc_pre(
    x: torch.Tensor,
    hc_fn: torch.Tensor,
    hc_scale: torch.Tensor,
    hc_base: torch.Tensor,
    sinkhorn_iters: int = 20,
    norm_eps: float = 1e-6,
    hc_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse the residual streams into one sub-layer input (SPEC §10.1–§10.3).

    Per token: ``mixes = (fp32(X).view(hc·D) @ hc_fnᵀ) · rsqrt(mean(X²) + norm_eps)``, then
    :func:`hc_split_sinkhorn`, then ``x_in = Σ_j pre[j]·X[j]`` in fp32, rounded once.

    Parameters
    ----------
    x : [..., hc, D] bf16/fp16/fp32 residual streams (e.g. [B, S, 4, 4096])
    hc_fn : [(2+hc)·hc, hc·D] fp32 (``hc_attn_fn`` / ``hc_ffn_fn``)
    hc_scale : [3] fp32
    hc_base : [(2+hc)·hc] fp32
    sinkhorn_iters, norm_eps, hc_eps : 20, 1e-6, 1e-6 in V4

    Returns
    -------
    x_in [..., D] x.dtype, post [..., hc] fp32, comb [..., hc, hc] fp32 (feed both to :func:`hc_post`).

    Example
    -------
    >>> import torch, v4kernels
    >>> x = torch.randn(2, 1, 4, 64, dtype=torch.bfloat16)
    >>> x_in, post, comb = v4kernels.hc_pre(x, torch.randn(24, 256) / 16, torch.ones(3), torch.zeros(24))
    >>> x_in.shape, post.shape, comb.shape
    (torch.Size([2, 1, 64]), torch.Size([2, 1, 4]), torch.Size([2, 1, 4, 4]))
    """
    key = _pre.validate(x, hc_fn, hc_scale, hc_base, sinkhorn_iters, norm_eps, hc_eps)
    iters, norm_eps, hc_eps = sinkhorn_iters, float(norm_eps), float(hc_eps)
    if x.numel() == 0:
        return _fake_pre(x, hc_fn, hc_scale, hc_base, iters, norm_eps, hc_eps)
    return _pre.run_as(
        key, x.contiguous(), hc_fn.contiguous(), hc_scale.contiguous(), hc_base.contiguous(), iters, norm_eps, hc_eps
    )


def hc_post(
    x: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, bf16_mix: bool = False
) -> torch.Tensor:
    """Expand a sub-layer output back into the residual streams (SPEC §10.4).

    ``out[k] = post[k]·x + Σ_j comb[j, k]·residual[j]`` — the residual is mixed with
    ``combᵀ`` (j is the source stream). Computed in fp32 and rounded once ([OFF]).
    ``bf16_mix=True`` selects the [HF] variant (SPEC §15 #4): ``post`` and ``comb`` are cast to
    ``x.dtype`` and ``post·x`` and ``combᵀ @ residual`` are each rounded to ``x.dtype`` before
    the final sum (fp32 accumulation inside each term); for fp32 activations both agree.

    Parameters
    ----------
    x : [..., D] bf16/fp16/fp32 sub-layer output
    residual : [..., hc, D] x.dtype, the streams that went into :func:`hc_pre`
    post : [..., hc] fp32
    comb : [..., hc, hc] fp32

    Returns
    -------
    [..., hc, D] x.dtype, the new residual streams.

    Example
    -------
    >>> import torch, v4kernels
    >>> res = torch.arange(8.0).reshape(1, 4, 2)
    >>> comb = torch.zeros(1, 4, 4); comb[0, 0, 1] = 1.0   # stream 0 feeds stream 1
    >>> v4kernels.hc_post(torch.ones(1, 2), res, torch.zeros(1, 4), comb)[0, 1]
    tensor([0., 1.])
    """
    key = _post.validate(x, residual, post, comb, bf16_mix)
    if residual.numel() == 0:
        return _fake_post(x, residual, post, comb, bf16_mix)
    return _post.run_as(key, x.contiguous(), residual.contiguous(), post.contiguous(), comb.contiguous(), bf16_mix)


def hc_head(
    x: torch.Tensor,
    hc_fn: torch.Tensor,
    hc_scale: torch.Tensor,
    hc_base: torch.Tensor,
    norm_eps: float = 1e-6,
    hc_eps: float = 1e-6,
) -> torch.Tensor:
    """Final HyperHead: collapse the streams after the last block (SPEC §10.5).

    ``mixes = (fp32(X).view(hc·D) @ hc_fnᵀ) · rsqrt(mean(X²) + norm_eps)``,
    ``pre = sigmoid(mixes·scale + base) + hc_eps``, ``y = Σ_j pre[j]·X[j]`` (fp32, rounded once).
    No Sinkhorn, no post/comb.

    Parameters
    ----------
    x : [..., hc, D] bf16/fp16/fp32
    hc_fn : [hc, hc·D] fp32 (``hc_head_fn``)
    hc_scale : [1] fp32
    hc_base : [hc] fp32

    Returns
    -------
    y [..., D] x.dtype

    Example
    -------
    >>> import torch, v4kernels
    >>> x = torch.ones(1, 4, 8)
    >>> v4kernels.hc_head(x, torch.zeros(4, 32), torch.ones(1), torch.zeros(4), hc_eps=0.0)[0, :2]
    tensor([2., 2.])
    """
    key = _head.validate(x, hc_fn, hc_scale, hc_base, norm_eps, hc_eps)
    norm_eps, hc_eps = float(norm_eps), float(hc_eps)
    if x.numel() == 0:
        return _fake_head(x, hc_fn, hc_scale, hc_base, norm_eps, hc_eps)
    return _head.run_as(key, x.contiguous(), hc_fn.contiguous(), hc_scale.contiguous(), hc_base.contiguous(), norm_eps, hc_eps)
