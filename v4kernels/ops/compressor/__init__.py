"""The KV compressor of CSA (ratio 4, overlapping windows) and HCA (ratio 128) layers, main
(head_dim 512, FP8) and indexer (head_dim 128, Hadamard + FP4), with an explicit incremental
state (SPEC §6). Any ratio >= 1 and head dim are accepted; the overlapping (CSA) window form is
a flag (``overlap``, default ``ratio == 4`` as in V4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ... import _checks as C
from ..._registry import declare_op, last_backend
from . import reference as _reference  # noqa: F401  (registers the reference kernel)

__all__ = ["CompressorState", "compress_kv"]

_QUANTS = ("fp8", "fp4", "none")


def default_overlap(ratio: int) -> bool:
    """V4's rule: the ratio-4 (CSA) compressor uses overlapping windows, every other ratio not."""
    return ratio == 4


def _coff(overlap: bool) -> int:
    return 2 if overlap else 1


@dataclass(eq=False)
class CompressorState:
    """Per-sequence incremental state of one compressor (SPEC §6.4-6.5), all fp32 but ``n_tokens``.

    Attributes
    ----------
    pending_kv, pending_score : [B, ratio, coff·hd] fp32
        Projections ``Ckv`` and gate logits ``Z + ape`` of the tokens of the current, still open
        window at slot ``position % ratio``; slots not (yet) written hold ``0`` / ``-inf``.
    prev_kv, prev_score : [B, ratio, hd] fp32 with overlapping windows (CSA), [B, 0, hd] otherwise
        The Ca / Za halves of the last closed window (``0`` / ``-inf`` before the first one).
    n_tokens : [B] int64
        Tokens consumed so far per sequence (= position of the next token). Sequences of one
        batch may be at different positions.

    ``coff = 2`` with overlapping windows (``overlap``, default ``ratio == 4``), else 1; the state
    records it in its shapes. :func:`compress_kv` replaces the contents in place, and only after
    it succeeded.

    Example
    -------
    >>> import v4kernels
    >>> st = v4kernels.CompressorState.empty(batch=2, ratio=4, head_dim=128)
    >>> tuple(st.pending_kv.shape), tuple(st.prev_kv.shape), st.positions, st.nbytes
    ((2, 4, 256), (2, 4, 128), [0, 0], 24592)
    """

    pending_kv: torch.Tensor
    pending_score: torch.Tensor
    prev_kv: torch.Tensor
    prev_score: torch.Tensor
    n_tokens: torch.Tensor

    def __post_init__(self) -> None:
        op = "CompressorState"
        C.check_tensor(op, "pending_kv", self.pending_kv, ndim=3, dtypes=(torch.float32,))
        b, ratio, width = self.pending_kv.shape
        if ratio < 1:
            raise ValueError(f"{op}: pending_kv.shape[1] (ratio) must be >= 1, got shape {list(self.pending_kv.shape)}")
        C.check_tensor(op, "prev_kv", self.prev_kv, ndim=3, dtypes=(torch.float32,))
        hd = self.prev_kv.shape[2]
        if hd < 1 or width not in (hd, 2 * hd):
            raise ValueError(
                f"{op}: pending_kv.shape[2] must be coff*head_dim with coff 1, or 2 for overlapping windows: "
                f"{hd} or {2 * hd} (head_dim from prev_kv, ratio {ratio}), got {width}"
            )
        coff = width // hd
        C.check_tensor(op, "pending_score", self.pending_score, dtypes=(torch.float32,), shape=[b, ratio, width])
        C.check_tensor(op, "prev_kv", self.prev_kv, shape=[b, ratio if coff == 2 else 0, hd])
        C.check_tensor(op, "prev_score", self.prev_score, dtypes=(torch.float32,), shape=[b, ratio if coff == 2 else 0, hd])
        C.check_tensor(op, "n_tokens", self.n_tokens, dtypes=(torch.int64,), shape=[b])
        C.check_same_device(
            op, pending_kv=self.pending_kv, pending_score=self.pending_score, prev_kv=self.prev_kv,
            prev_score=self.prev_score, n_tokens=self.n_tokens,
        )

    @classmethod
    def empty(cls, batch: int, ratio: int, head_dim: int, device: torch.device | str | None = None,
              overlap: bool | None = None) -> "CompressorState":
        """A fresh state (kv = 0, score = −inf, no tokens) for ``batch`` sequences;
        ``overlap`` (default ``ratio == 4``) selects the overlapping-window (CSA) layout."""
        op = "CompressorState.empty"
        C.check_int(op, "batch", batch, minimum=0)
        C.check_int(op, "ratio", ratio, minimum=1)
        C.check_int(op, "head_dim", head_dim, minimum=1)
        if overlap is None:
            overlap = default_overlap(ratio)
        C.check_bool(op, "overlap", overlap)
        coff = _coff(overlap)
        nprev = ratio if coff == 2 else 0
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            torch.zeros(batch, ratio, coff * head_dim, **f32),
            torch.full((batch, ratio, coff * head_dim), float("-inf"), **f32),
            torch.zeros(batch, nprev, head_dim, **f32),
            torch.full((batch, nprev, head_dim), float("-inf"), **f32),
            torch.zeros(batch, dtype=torch.int64, device=device),
        )

    @property
    def batch_size(self) -> int:
        return self.pending_kv.shape[0]

    @property
    def ratio(self) -> int:
        return self.pending_kv.shape[1]

    @property
    def head_dim(self) -> int:
        return self.prev_kv.shape[2]

    @property
    def overlap(self) -> bool:
        return self.pending_kv.shape[2] == 2 * self.head_dim

    @property
    def device(self) -> torch.device:
        return self.pending_kv.device

    @property
    def positions(self) -> list[int]:
        """Absolute position of the next token of each sequence (reads ``n_tokens``: a device sync)."""
        return [int(v) for v in self.n_tokens.tolist()]

    @property
    def nbytes(self) -> int:
        """Bytes held by the five state tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.pending_kv, self.pending_score, self.prev_kv, self.prev_score, self.n_tokens)

    def clone(self) -> "CompressorState":
        """An independent deep copy."""
        return CompressorState(*(t.clone() for t in self.tensors()))

    def reset(self, rows: int | Sequence[int] | torch.Tensor | None = None) -> "CompressorState":
        """Reset all sequences (``rows=None``) or some (int, list of ints, int or bool tensor) to
        the fresh state, in place; a new sequence must start from a reset state (SPEC §6.4)."""
        op = "CompressorState.reset"
        b = self.batch_size
        if rows is None:
            idx = torch.arange(b, device=self.device)
        elif isinstance(rows, torch.Tensor):
            if rows.dtype == torch.bool:
                C.check_tensor(op, "rows", rows, shape=[b])
                idx = rows.nonzero().flatten().to(self.device)
            else:
                C.check_tensor(op, "rows", rows, ndim=(0, 1), dtypes=C.INDEX_DTYPES)
                idx = rows.reshape(-1).to(device=self.device, dtype=torch.int64)
        else:
            seq = [rows] if isinstance(rows, int) else list(rows)
            for r in seq:
                C.check_int(op, "rows", r)
            idx = torch.tensor(seq, dtype=torch.int64, device=self.device)
        if idx.numel():
            lo, hi = C.index_bounds(idx)
            if lo < 0 or hi >= b:
                raise ValueError(f"{op}: rows must lie in [0, {b}), got min {lo}, max {hi}")
        self.pending_kv[idx] = 0.0
        self.pending_score[idx] = float("-inf")
        self.prev_kv[idx] = 0.0
        self.prev_score[idx] = float("-inf")
        self.n_tokens[idx] = 0
        return self


def _fake_compress_kv(x, wkv, wgate, ape, norm_weight, freqs, pending_kv, pending_score, prev_kv, prev_score,
                      n_tokens, ratio, quant, eps, hf_rounding):
    b, s = x.shape[0], x.shape[1]
    return (
        x.new_empty((b, (s + ratio - 1) // ratio, norm_weight.shape[0])),
        x.new_empty((b,), dtype=torch.int32),
        torch.empty_like(pending_kv),
        torch.empty_like(pending_score),
        torch.empty_like(prev_kv),
        torch.empty_like(prev_score),
        torch.empty_like(n_tokens),
    )


#: layouts (data pointer, shape, strides, dtype of every state tensor) already found free of overlap
_DISJOINT_LAYOUTS: set = set()


def _check_no_overlap(op: str, tensors: dict[str, torch.Tensor]) -> None:
    """State tensors are written back in place: none may alias itself (an expanded, stride-0
    view) or another one. Whether they do is a function of their data pointers, shapes, strides
    and dtypes alone, so a layout that passed once (a state reused step after step) is remembered."""
    layout = tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in tensors.values())
    if layout in _DISJOINT_LAYOUTS:
        return
    spans = []
    for name, t in tensors.items():
        if t.numel() > 1 and torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(
                f"{op}: {name} must not overlap itself (got strides {t.stride()} for shape {list(t.shape)}, e.g. an "
                f"expanded view); it is updated in place: pass a materialised tensor (.clone())"
            )
        if t.numel() and t.device.type != "meta":
            start = t.data_ptr()
            end = start + ((t.shape and sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))) + 1) * t.element_size()
            spans.append((start, end, name))
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"{op}: state tensors {n0} and {n1} share memory; each must be a separate tensor")
    if len(_DISJOINT_LAYOUTS) >= 4096:
        _DISJOINT_LAYOUTS.clear()
    _DISJOINT_LAYOUTS.add(layout)


def _check_compress_kv(x, wkv, wgate, ape, norm_weight, freqs, pending_kv, pending_score, prev_kv, prev_score,
                       n_tokens, ratio, quant, eps, hf_rounding) -> None:
    op = "compress_kv"
    C.check_bool(op, "hf_rounding", hf_rounding)
    C.check_int(op, "ratio", ratio, minimum=1)
    if not isinstance(quant, str):
        raise TypeError(f"{op}: quant must be a str, got {type(quant).__name__}")
    C.check_value(op, "quant", quant, quant in _QUANTS, "one of " + ", ".join(map(repr, _QUANTS)))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"{op}: eps must be a float >= 0, got {eps!r}")
    C.check_tensor(op, "x", x, ndim=3, dtypes=C.FLOAT_DTYPES)
    bsz, _, d = x.shape
    C.check_tensor(op, "norm_weight", norm_weight, ndim=1, dtypes=C.FLOAT_DTYPES)
    hd = norm_weight.shape[0]
    C.check_tensor(op, "freqs", freqs, ndim=1, dtypes=(torch.float32,))
    r = 2 * freqs.shape[0]
    if r == 0 or r > hd:
        raise ValueError(f"{op}: 2*len(freqs) rope dims must be in [2, head_dim={hd}] (head_dim = len(norm_weight)), got {r}")
    # overlapping (CSA) windows double the projection width; the state says which form it holds
    C.check_tensor(op, "pending_kv", pending_kv, ndim=3, dtypes=(torch.float32,))
    C.check_tensor(op, "prev_kv", prev_kv, ndim=3, dtypes=(torch.float32,))
    state_hd = prev_kv.shape[2]
    coff = 2 if state_hd > 0 and pending_kv.shape[2] == 2 * state_hd else 1
    sb, sratio, width = pending_kv.shape
    if sratio != ratio:
        raise ValueError(f"{op}: state was created for ratio {sratio}, got ratio={ratio}")
    if prev_kv.shape[2] != hd:
        raise ValueError(f"{op}: state was created for head_dim {prev_kv.shape[2]}, got len(norm_weight)={hd}")
    if sb != bsz:
        raise ValueError(f"{op}: state holds {sb} sequences, got x.shape[0]={bsz} (shape {list(x.shape)})")
    if width != coff * hd:
        raise ValueError(
            f"{op}: pending_kv.shape[2] must be coff*head_dim = {coff}*{hd} = {coff * hd} "
            f"(head_dim from norm_weight, overlap {coff == 2}), got {width}"
        )
    C.check_tensor(op, "wkv", wkv, dtypes=C.FLOAT_DTYPES, shape=[coff * hd, d])
    C.check_tensor(op, "wgate", wgate, dtypes=C.FLOAT_DTYPES, shape=[coff * hd, d])
    C.check_tensor(op, "ape", ape, dtypes=(torch.float32,), shape=[ratio, coff * hd])
    nprev = ratio if coff == 2 else 0
    C.check_tensor(op, "pending_score", pending_score, dtypes=(torch.float32,), shape=[bsz, ratio, coff * hd])
    C.check_tensor(op, "prev_kv", prev_kv, shape=[bsz, nprev, hd])
    C.check_tensor(op, "prev_score", prev_score, dtypes=(torch.float32,), shape=[bsz, nprev, hd])
    C.check_tensor(op, "n_tokens", n_tokens, dtypes=(torch.int64,), shape=[bsz])
    if quant == "fp8" and (hd - r) % 64:
        raise ValueError(f"{op}: quant='fp8' quantises the {hd}-{r} nope dims in blocks of 64; {hd - r} is not a multiple of 64")
    if quant == "fp4" and (hd < 32 or hd & (hd - 1)):
        raise ValueError(f"{op}: quant='fp4' needs head_dim a power of two >= 32 (Hadamard + block 32), got {hd}")
    C.check_same_device(op, x=x, wkv=wkv, wgate=wgate, ape=ape, norm_weight=norm_weight, freqs=freqs,
                        state=pending_kv, pending_score=pending_score, prev_kv=prev_kv, prev_score=prev_score,
                        n_tokens=n_tokens)


def _check_compress_kv_state(x, wkv, wgate, ape, norm_weight, freqs, pending_kv, pending_score, prev_kv, prev_score,
                             n_tokens, ratio, quant, eps, hf_rounding) -> None:
    """The checks that depend on more than the argument signature: state aliasing (data pointers)
    and the position counters' values."""
    op = "compress_kv"
    _check_no_overlap(op, dict(pending_kv=pending_kv, pending_score=pending_score, prev_kv=prev_kv,
                               prev_score=prev_score, n_tokens=n_tokens))
    bounds, s = C.value_bounds(n_tokens), x.shape[1]
    if bounds is None or 0 <= bounds[0] and bounds[1] + s < 2**62 or not C.value_checks_on_failure():
        return
    lo, hi = bounds
    if lo < 0:
        raise ValueError(f"{op}: state.n_tokens must be >= 0, got min {lo}")
    raise ValueError(f"{op}: state.n_tokens + S must be < 2**62, got max {hi} + {s}")


_compress_kv = declare_op(
    "compressor",
    "compress_kv",
    "(Tensor x, Tensor wkv, Tensor wgate, Tensor ape, Tensor norm_weight, Tensor freqs, Tensor pending_kv, "
    "Tensor pending_score, Tensor prev_kv, Tensor prev_score, Tensor n_tokens, int ratio, str quant, float eps, "
    "bool hf_rounding) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _fake_compress_kv,
    check=_check_compress_kv,
    value_check=_check_compress_kv_state,
    memoize_checks=True,
)


def compress_kv(
    x: torch.Tensor,
    wkv: torch.Tensor,
    wgate: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    freqs: torch.Tensor,
    state: CompressorState,
    *,
    ratio: int,
    quant: str = "fp8",
    eps: float = 1e-6,
    hf_rounding: bool = False,
    overlap: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed ``S`` more tokens per sequence to the KV compressor; emit the entries of every window
    they close (SPEC §6).

    Per token at position ``p``: ``Ckv = fp32(x)·wkvᵀ``, ``Z = fp32(x)·wgateᵀ + ape[p % ratio]``.
    Window ``j`` (positions ``j·ratio … j·ratio+ratio−1``) is pooled feature-wise with a softmax
    over its slots: without overlap (HCA) its ``ratio`` tokens; with overlap (CSA, the default for
    ``ratio == 4``) the Ca halves (``Ckv[:, :hd]``, logits ``Z[:, :hd]``, biased by ``ape[:, :hd]``)
    of window ``j−1`` plus the Cb halves (``[:, hd:]``) of window ``j`` — window 0 has no
    predecessor. The pooled fp32 vector is
    rounded to ``x.dtype``, RMS-normalised with ``norm_weight``, rotated (RoPE, trailing
    ``2·len(freqs)`` dims, position ``j·ratio``) and quantisation-simulated:

    - ``quant="fp8"``: main compressor, FP8 e4m3 block-64 power-of-two scales on the leading
      ``hd − 2·len(freqs)`` (nope) dims ([OFF]);
    - ``quant="fp4"``: indexer compressor, Hadamard rotation of all ``hd`` dims then FP4 e2m1
      block 32 ([OFF]);
    - ``quant="none"``: no simulation ([HF]).

    Any split of a sequence into calls (token by token, chunks, one call) gives bit-identical
    entries and state; one call from a fresh state is [OFF]'s prefill (SPEC §6.4).

    Parameters
    ----------
    x : [B, S, D] bf16/fp16/fp32, attention input (after attn_norm)
    wkv, wgate : [coff·hd, D] bf16/fp16/fp32 (math in fp32); ``coff = 2`` with overlap, else 1
    ape : [ratio, coff·hd] fp32, in-window gate bias
    norm_weight : [hd] bf16/fp16/fp32, RMSNorm weight (``hd`` = 512 main, 128 indexer in V4; any)
    freqs : [r/2] fp32, the compressed-layer RoPE table (``v4_rope_frequencies(True)``, r = 64 in
        V4; any even ``r <= hd``)
    state : :class:`CompressorState` for ``B`` sequences, this ``ratio`` and ``hd``; updated in
        place after success only (a failing call leaves it unchanged)
    ratio : compression ratio (4 = CSA, 128 = HCA in V4; any ratio >= 1)
    quant : "fp8" (needs ``(hd − r) % 64 == 0``), "fp4" (needs ``hd`` a power of two >= 32) or "none"
    eps : RMSNorm epsilon (1e-6 in V4)
    hf_rounding : [HF] pooling of transformers 5.23.0 (``DeepseekV4CSACompressor`` /
        ``DeepseekV4HCACompressor`` / the indexer's compressor; use with ``quant="none"``): the
        kv and gate projections are rounded to ``x.dtype`` (HF's ``nn.Linear`` outputs), the
        fp32 softmax weights are rounded to ``x.dtype``, each ``kv·weight`` product is rounded to
        ``x.dtype`` and the sum over the window's slots is rounded once to ``x.dtype``; RoPE uses
        cos/sin tables rounded to ``x.dtype``. Same as the default for fp32 ``x`` (up to the
        softmax's fp32 rounding).
    overlap : overlapping (CSA) windows; default ``ratio == 4``. Must match the ``state``.

    Returns
    -------
    entries : [B, ceil(S/ratio), hd] x.dtype
        Row ``r`` of sequence ``b`` is compressed entry ``n_tokens_b // ratio + r`` (its cache row);
        rows ``>= num_new[b]`` are zero.
    num_new : [B] int32, entries emitted per sequence (``(n_b + S)//ratio − n_b//ratio``).

    Notes
    -----
    Validation reads ``state.n_tokens`` (must be >= 0) on CPU, or everywhere under
    ``V4K_CHECKS=full``; the reference kernel reads it anyway (a device sync).

    Example
    -------
    >>> import torch, v4kernels
    >>> g = torch.Generator().manual_seed(0)
    >>> D, hd = 64, 128
    >>> wkv, wgate = torch.randn(2 * hd, D, generator=g) / 8, torch.randn(2 * hd, D, generator=g) / 8
    >>> ape, nw = torch.zeros(4, 2 * hd), torch.ones(hd)
    >>> f = v4kernels.v4_rope_frequencies(True)
    >>> st = v4kernels.CompressorState.empty(1, 4, hd)
    >>> x = torch.randn(1, 6, D, generator=g, dtype=torch.float32).bfloat16()
    >>> e, n = v4kernels.compress_kv(x, wkv, wgate, ape, nw, f, st, ratio=4)
    >>> tuple(e.shape), n.tolist(), st.positions
    ((1, 2, 128), [1], [6])
    >>> e2, n2 = v4kernels.compress_kv(x[:, :2], wkv, wgate, ape, nw, f, st, ratio=4)
    >>> n2.tolist(), st.positions  # positions 6, 7 close window 1
    ([1], [8])
    """
    if not isinstance(state, CompressorState):
        raise TypeError(f"compress_kv: state must be a CompressorState, got {type(state).__name__}")
    key = _compress_kv.validate(x, wkv, wgate, ape, norm_weight, freqs, *state.tensors(), ratio, quant, eps, hf_rounding)
    if overlap is None:
        overlap = default_overlap(ratio)
    C.check_bool("compress_kv", "overlap", overlap)
    if state.overlap != overlap:
        raise ValueError(f"compress_kv: state was created with overlap={state.overlap}, got overlap={overlap} (ratio {ratio})")
    bsz, s = x.shape[0], x.shape[1]
    hd = norm_weight.shape[0]
    if bsz == 0 or s == 0:
        return (x.new_zeros((bsz, (s + ratio - 1) // ratio, hd)), torch.zeros(bsz, dtype=torch.int32, device=x.device))
    out = _compress_kv.run_as(
        key,
        x.contiguous(), wkv.contiguous(), wgate.contiguous(), ape.contiguous(), norm_weight.contiguous(),
        freqs.contiguous(), *(t.contiguous() for t in state.tensors()), ratio, quant, float(eps), hf_rounding,
    )
    entries, num_new = out[0], out[1]
    for name, dst, src in zip(("pending_kv", "pending_score", "prev_kv", "prev_score", "n_tokens"), state.tensors(), out[2:]):
        if src.shape != dst.shape or src.dtype != dst.dtype or src.device != dst.device:
            raise RuntimeError(
                f"compress_kv: the {last_backend('compress_kv')} kernel returned {name} {list(src.shape)} "
                f"{src.dtype} on {src.device}, expected {list(dst.shape)} {dst.dtype} on {dst.device}; state left unchanged"
            )
    # Success: publish the new state in place (keeps tensor identity for static-buffer users).
    for dst, src in zip(state.tensors(), out[2:]):
        dst.copy_(src)
    return entries, num_new
