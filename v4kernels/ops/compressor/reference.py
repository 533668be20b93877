"""Reference KV compressor (SPEC §6): fp32 projections, channel-wise softmax pooling of each
closed window, then bf16 rounding, RMSNorm, RoPE at ``j·ratio`` and the FP8 / FP4 QAT simulation.

Chunking invariance is built in, not hoped for. BLAS results for one row depend on how many rows
the GEMM has, and transcendental element-wise kernels take a scalar path on tails whose position
depends on the tensor size. So:

* every token is projected inside a fixed ``PROJ_TILE``-row GEMM at row ``position % PROJ_TILE``
  (the other rows are zero padding), whatever the call's chunk size;
* every window is pooled and post-processed on its own, by the same sequence of tensor ops on
  tensors of the same shapes, whatever the number of windows a call closes.

Hence a sequence fed token by token, in arbitrary chunks or in one call gives bit-identical
entries and state. The state keeps a canonical form: pending slots that do not belong to the
current open window hold ``kv = 0, score = -inf``.
"""
from __future__ import annotations

import torch

from ..._registry import register_kernel

#: rows of the fixed-shape projection GEMM (token at position p sits at row p % PROJ_TILE)
PROJ_TILE = 16


def project_tokens(x: torch.Tensor, start: int, w_t: torch.Tensor) -> torch.Tensor:
    """fp32 ``x @ w_t`` for the tokens of one sequence at positions ``start .. start+S-1``.

    ``x [S, D]`` any float dtype, ``w_t [D, N]`` fp32. Each token goes through an identically
    shaped ``[PROJ_TILE, D] @ [D, N]`` GEMM at the row fixed by its absolute position, so its fp32
    result does not depend on how the sequence was chunked.
    """
    s, d = x.shape
    out = torch.empty(s, w_t.shape[1], dtype=torch.float32, device=x.device)
    xf = x.float()
    i = 0
    while i < s:
        p = start + i
        row = p % PROJ_TILE
        n = min(PROJ_TILE - row, s - i)
        tile = torch.zeros(PROJ_TILE, d, dtype=torch.float32, device=x.device)
        tile[row : row + n] = xf[i : i + n]
        out[i : i + n] = torch.mm(tile, w_t)[row : row + n]
        i += n
    return out


def pool_window_hf(kv: torch.Tensor, score: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[HF] pooling (transformers 5.23.0): ``dtype(Σ dtype(kv · dtype(softmax_fp32(score))))``,
    returned as fp32 holding a ``dtype`` value."""
    p = torch.softmax(score, dim=0).to(dtype)
    return (kv.to(dtype) * p).sum(dim=0).float()


def pool_window(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Channel-wise softmax pooling over the slots of one window (SPEC §6.3): ``[slots, hd] -> [hd]``.

    Slot order is [OFF]'s: for CSA the Ca rows of window j−1 first, then the Cb rows of window j.
    Slots with score −inf get weight 0 (at least one slot must be finite). The softmax is
    spelled out (max, exp, sum, divide) because ``torch.softmax`` over a leading dim pays a
    thread-pool launch per call on CPU, which dominates for these tiny per-window tensors.
    """
    e = torch.exp(score - score.amax(dim=0))
    return (kv * (e / e.sum(dim=0))).sum(dim=0)


def finish_entry(
    c: torch.Tensor,
    position: int,
    norm_weight: torch.Tensor,
    freqs: torch.Tensor,
    quant: str,
    eps: float,
    dtype: torch.dtype,
    round_tables: bool = False,
) -> torch.Tensor:
    """Pooled fp32 ``c [hd]`` -> cache entry ``[hd]`` in ``dtype`` (SPEC §6.3, after pooling)."""
    from ..quant.reference import act_quant_roundtrip, fp4_act_roundtrip, hadamard_transform
    from ..rope_norm.reference import apply_rope, rms_norm

    hd = c.shape[0]
    r = 2 * freqs.shape[0]
    e = rms_norm(c.to(dtype).view(1, 1, hd), norm_weight, eps, False)
    pos = torch.full((1, 1), position, dtype=torch.int64, device=c.device)
    e = apply_rope(e, pos, freqs, False, round_tables)  # trailing r dims, position j·ratio (SPEC §3.3)
    if quant == "fp8":
        # main compressor: FP8 QAT simulation, block 64, pow2 scales, nope dims only (SPEC §4.3)
        e = torch.cat((act_quant_roundtrip(e[..., : hd - r].contiguous(), 64, True), e[..., hd - r :]), dim=-1)
    elif quant == "fp4":
        # indexer compressor: Hadamard rotation of the whole vector, then FP4 block 32 (SPEC §4.4-4.5)
        e = fp4_act_roundtrip(hadamard_transform(e), 32)
    return e.view(hd)


@register_kernel("reference", "compress_kv")
def compress_kv(
    x: torch.Tensor,
    wkv: torch.Tensor,
    wgate: torch.Tensor,
    ape: torch.Tensor,
    norm_weight: torch.Tensor,
    freqs: torch.Tensor,
    pending_kv: torch.Tensor,
    pending_score: torch.Tensor,
    prev_kv: torch.Tensor,
    prev_score: torch.Tensor,
    n_tokens: torch.Tensor,
    ratio: int,
    quant: str,
    eps: float,
    hf_rounding: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    bsz, s, _ = x.shape
    hd = norm_weight.shape[0]
    m = ratio
    width = wkv.shape[0]  # coff·hd
    overlap = width == 2 * hd  # overlapping (CSA) windows: the projections hold both halves
    dev = x.device

    entries = torch.zeros(bsz, (s + m - 1) // m, hd, dtype=x.dtype, device=dev)
    num_new = torch.zeros(bsz, dtype=torch.int32, device=dev)
    new_pkv = torch.zeros_like(pending_kv)
    new_psc = torch.full_like(pending_score, float("-inf"))
    new_vkv = prev_kv.clone()
    new_vsc = prev_score.clone()

    w_t = torch.cat((wkv.float(), wgate.float()), dim=0).t()  # [D, 2·coff·hd]
    apef = ape.float()
    no_prev_kv = torch.zeros(m, hd, dtype=torch.float32, device=dev)
    no_prev_score = torch.full((m, hd), float("-inf"), dtype=torch.float32, device=dev)

    for b, n0 in enumerate(n_tokens.tolist()):
        proj = project_tokens(x[b], n0, w_t)
        if hf_rounding:
            # [HF]: the kv / gate projections are nn.Linear outputs in the model dtype
            proj = proj.to(x.dtype).float()
        kv_new = proj[:, :width]
        slot_pos = torch.arange(n0, n0 + s, device=dev) % m
        score_new = proj[:, width:] + apef[slot_pos]  # gate logits carry the in-window bias (SPEC §6.2)
        # Timeline from the start of the open window: pending rows (positions base..n0-1) + new rows.
        k = n0 % m
        base = n0 - k
        tl_kv = torch.cat((pending_kv[b, :k], kv_new), dim=0)
        tl_score = torch.cat((pending_score[b, :k], score_new), dim=0)
        n_win = (k + s) // m
        if overlap:
            pk, ps = prev_kv[b], prev_score[b]
        for w in range(n_win):
            j = base // m + w
            cur_kv, cur_score = tl_kv[w * m : (w + 1) * m], tl_score[w * m : (w + 1) * m]
            if overlap:
                # CSA: 2m slots = Ca/Za of window j-1 ∪ Cb/Zb of window j; window 0 has no
                # predecessor (kv 0, logit -inf) whatever the state holds (SPEC §6.3).
                if j == 0:
                    pk, ps = no_prev_kv, no_prev_score
                kv_w = torch.cat((pk, cur_kv[:, hd:]), dim=0)
                sc_w = torch.cat((ps, cur_score[:, hd:]), dim=0)
                pk, ps = cur_kv[:, :hd], cur_score[:, :hd]
            else:
                kv_w = torch.cat((cur_kv,), dim=0)
                sc_w = torch.cat((cur_score,), dim=0)
            c = pool_window_hf(kv_w, sc_w, x.dtype) if hf_rounding else pool_window(kv_w, sc_w)
            entries[b, w] = finish_entry(c, j * m, norm_weight, freqs, quant, eps, x.dtype, hf_rounding)
        num_new[b] = n_win
        rem = k + s - n_win * m
        new_pkv[b, :rem] = tl_kv[n_win * m :]
        new_psc[b, :rem] = tl_score[n_win * m :]
        if overlap and n_win > 0:
            new_vkv[b] = pk
            new_vsc[b] = ps
    return entries, num_new, new_pkv, new_psc, new_vkv, new_vsc, n_tokens + s
