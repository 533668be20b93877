"""Interleaved RoPE on the trailing rope dims with V4's two frequency tables (SPEC §3) and
RMSNorm (SPEC §5.1).
"""
from __future__ import annotations

import math

import torch

from ... import _checks as C
from ..._registry import declare_op
from . import reference as _reference  # noqa: F401

__all__ = ["rope_frequencies", "v4_rope_frequencies", "apply_rope", "rms_norm"]


def rope_frequencies(
    rope_dim: int = 64,
    base: float = 10000.0,
    factor: float = 1.0,
    original_seq_len: int = 0,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-pair rotary frequencies ``θ'_i``, i = 0..rope_dim/2−1, fp32 (SPEC §3.2).

    ``θ_i = base^(−2i/rope_dim)``; when ``original_seq_len > 0`` the YaRN blend divides the low
    frequencies by ``factor`` with a linear ramp between the correction dims of ``beta_fast`` and
    ``beta_slow``. No magnitude (mscale) factor is applied anywhere in V4.

    V4 tables: ``rope_frequencies(base=10000)`` for sliding-window-only layers and
    ``rope_frequencies(base=160000, factor=16, original_seq_len=65536)`` for compressed layers
    (see :func:`v4_rope_frequencies`).

    >>> f = rope_frequencies(base=160000, factor=16, original_seq_len=65536)
    >>> abs(float(f[31]) - 5.68053e-07) < 1e-12 and float(f[0]) == 1.0
    True
    """
    op = "rope_frequencies"
    C.check_int(op, "rope_dim", rope_dim, minimum=2)
    if rope_dim % 2:
        raise ValueError(f"{op}: rope_dim must be even, got {rope_dim}")
    base = C.check_real(op, "base", base)
    C.check_value(op, "base", base, 1.0 < base < math.inf, "a finite float > 1")
    factor = C.check_real(op, "factor", factor)
    C.check_value(op, "factor", factor, 1.0 <= factor < math.inf, "a finite float >= 1")
    C.check_int(op, "original_seq_len", original_seq_len, minimum=0)
    beta_fast = C.check_real(op, "beta_fast", beta_fast)
    beta_slow = C.check_real(op, "beta_slow", beta_slow)
    if original_seq_len > 0:
        C.check_value(op, "beta_fast", beta_fast, 0 < beta_fast < math.inf, "a finite float > 0")
        C.check_value(op, "beta_slow", beta_slow, 0 < beta_slow < math.inf, "a finite float > 0")
    freqs = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if original_seq_len > 0:

        def corr_dim(rot: float) -> float:
            return rope_dim * math.log(original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr_dim(beta_fast)), 0)
        high = min(math.ceil(corr_dim(beta_slow)), rope_dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        freqs = freqs / factor * ramp + freqs * (1 - ramp)
    return freqs.to(device) if device is not None else freqs


def v4_rope_frequencies(compressed: bool, rope_dim: int = 64, device: torch.device | str | None = None) -> torch.Tensor:
    """The released V4 tables: θ=10000 plain for m=0 layers; θ=160000 + YaRN(16, 65536, 32, 1)
    for every compressed (CSA/HCA) layer, main and indexer (SPEC §1.1, §3.2, §15 #1)."""
    C.check_bool("v4_rope_frequencies", "compressed", compressed)
    if compressed:
        return rope_frequencies(rope_dim, 160000.0, 16.0, 65536, 32.0, 1.0, device)
    return rope_frequencies(rope_dim, 10000.0, device=device)


def _fake_rope(x, positions, freqs, inverse, round_tables):
    return torch.empty_like(x)


def _fake_rms(x, weight, eps, hf_rounding):
    return torch.empty_like(x)


def _check_apply_rope(x, positions, freqs, inverse, round_tables) -> None:
    op = "apply_rope"
    C.check_tensor(op, "x", x, dtypes=C.FLOAT_DTYPES)
    if x.dim() < 3:
        raise ValueError(f"{op}: x must be [B, S, ..., L] (>= 3 dims), got shape {list(x.shape)}")
    C.check_tensor(op, "freqs", freqs, ndim=1, dtypes=(torch.float32,))
    r = 2 * freqs.shape[0]
    if r == 0 or r > x.shape[-1]:
        raise ValueError(f"{op}: 2*len(freqs)={r} rope dims must be in [2, x.shape[-1]={x.shape[-1]}]")
    C.check_tensor(op, "positions", positions, ndim=(1, 2), dtypes=C.INDEX_DTYPES)
    C.check_tensor(op, "positions", positions, shape=[x.shape[0], x.shape[1]])
    C.check_bool(op, "inverse", inverse)
    C.check_bool(op, "round_tables", round_tables)
    C.check_same_device(op, x=x, positions=positions, freqs=freqs)


def _check_apply_rope_positions(x, positions, freqs, inverse, round_tables) -> None:
    C.check_nonnegative("apply_rope", "positions", positions)


def _check_rms_norm(x, weight, eps, hf_rounding) -> None:
    op = "rms_norm"
    C.check_tensor(op, "x", x, dtypes=C.FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least 1 dim, got a scalar")
    if weight is not None:
        C.check_tensor(op, "weight", weight, dtypes=C.FLOAT_DTYPES, shape=[x.shape[-1]])
        C.check_same_device(op, x=x, weight=weight)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"{op}: eps must be a finite float >= 0, got {eps!r}")
    C.check_bool(op, "hf_rounding", hf_rounding)


_apply_rope = declare_op("rope_norm", "apply_rope", "(Tensor x, Tensor positions, Tensor freqs, bool inverse, bool round_tables) -> Tensor",
                         _fake_rope, check=_check_apply_rope, value_check=_check_apply_rope_positions,
                         memoize_checks=True)
_rms_norm = declare_op("rope_norm", "rms_norm", "(Tensor x, Tensor? weight, float eps, bool hf_rounding) -> Tensor",
                       _fake_rms, check=_check_rms_norm, memoize_checks=True)


def apply_rope(
    x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor, inverse: bool = False, *, round_tables: bool = False
) -> torch.Tensor:
    """Rotate the trailing ``2·len(freqs)`` dims of ``x`` as adjacent (interleaved) pairs (SPEC §3.1).

    ``(a, b) → (a cosφ − b sinφ, b cosφ + a sinφ)`` with ``φ = fp32(p)·fp32(θ'_i)``; ``inverse``
    uses ``−φ`` (the conjugate, applied to the attention output, SPEC §9.3). Computed in fp32 and
    rounded once; the leading (nope) dims are returned unchanged. Out of place.

    ``round_tables=True`` is the [HF] variant (checked against transformers 5.23.0,
    ``DeepseekV4RotaryEmbedding`` + ``apply_rotary_pos_emb``): ``cos φ`` and ``sin φ`` are first
    rounded to ``x.dtype`` (the model dtype), then the rotation runs in fp32 and is rounded once.
    Bit-identical to the default for fp32 ``x``.

    Parameters
    ----------
    x : [B, S, ..., L] bf16/fp16/fp32 (e.g. q [B,S,H,512], kv [B,S,512], indexer q [B,S,64,128])
    positions : [B, S] or [S] int32/int64 absolute positions (>= 0)
    freqs : [r/2] fp32 from :func:`rope_frequencies`, ``r <= L``
    inverse : rotate by ``−φ``
    round_tables : [HF] cos/sin tables rounded to ``x.dtype`` first

    Returns
    -------
    [B, S, ..., L] same dtype as ``x``.

    >>> import torch, v4kernels
    >>> x = torch.randn(1, 3, 2, 512, dtype=torch.bfloat16)
    >>> f = v4kernels.rope_frequencies()
    >>> y = v4kernels.apply_rope(x, torch.arange(3), f)
    >>> bool(torch.equal(y[..., :448], x[..., :448]))
    True
    """
    if isinstance(positions, torch.Tensor) and positions.dim() == 1 and isinstance(x, torch.Tensor) and x.dim() >= 3:
        C.check_tensor("apply_rope", "positions", positions, shape=[x.shape[1]])
        positions = positions.unsqueeze(0).expand(x.shape[0], -1)
    key = _apply_rope.validate(x, positions, freqs, inverse, round_tables)
    if x.numel() == 0:
        return torch.empty_like(x)
    return _apply_rope.run_as(key, x.contiguous(), positions.contiguous(), freqs.contiguous(), inverse, round_tables)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, hf_rounding: bool = False) -> torch.Tensor:
    """RMSNorm over the last axis (SPEC §5.1): ``bf16(w ⊙ (x · rsqrt(mean(x²) + eps)))`` in fp32.

    ``weight=None`` is the unweighted per-head norm used on q.

    ``hf_rounding=True`` selects the rounding of transformers 5.23.0 (``DeepseekV4RMSNorm`` /
    ``DeepseekV4UnweightedRMSNorm``):

    * weighted: ``dtype(w ⊙ (fp32(x) · rsqrt(mean(x²) + eps)))`` with the weight multiply in fp32
      (V4 keeps norm weights in fp32) — identical to the default;
    * unweighted: ``dtype(x · dtype(rsqrt(mean(fp32(x)²) + eps)))`` — the rsqrt factor is rounded
      to ``x.dtype`` and the product rounded again (differs from the default for bf16/fp16 ``x``).

    Both settings agree for fp32 ``x``.

    Parameters
    ----------
    x : [..., N] bf16/fp16/fp32
    weight : [N] or None
    eps : 1e-6 in V4

    Returns
    -------
    [..., N] same dtype as ``x``.

    >>> import torch, v4kernels
    >>> v4kernels.rms_norm(torch.full((1, 4), 3.0))
    tensor([[1.0000, 1.0000, 1.0000, 1.0000]])
    """
    key = _rms_norm.validate(x, weight, eps, hf_rounding)
    if x.numel() == 0:
        return torch.empty_like(x)
    return _rms_norm.run_as(key, x.contiguous(), None if weight is None else weight.contiguous(), float(eps), hf_rounding)
