"""Triton kernels for the lightning indexer (SPEC §7): ``score[c] = Σ_h w_h·ReLU(q_h·k_c)`` with
the causal limit ``c < (t+1)//ratio``, and a fused score + top-k that never materialises more
than one key tile of scores per query.

Keys may be float, FP8 e4m3 with one scale per 128 dims, or packed FP4 e2m1 with one scale per
32 dims; codes are decoded with integer bit operations and the dot product is taken per scale
block (then scaled), so decoded operands stay exact.

Top-k: each program owns one query. It keeps the best ``KP`` (a power of two >= k) candidates as
64-bit keys ``(orderable score bits << 32) | (2^32-1 − index)``, sorted descending. For a new key
tile (also ``KP`` wide) sorted ascending, the elementwise maximum of the two sequences is the
top ``KP`` of their union (the bitonic merge step), which is sorted again. Equal scores keep the
lower index first, like the reference's stable sort. Under the interpreter, candidate sets wider
than 32 are merged by rank counting instead (same result; ``tl.sort`` is very slow there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._registry import register_kernel
from ... import triton_utils as U
from ...triton_utils import e2m1_decode, e4m3_decode, load_scale


@triton.jit
def _score_tile(
    q_ptr, w_ptr, k_ptr, ks_ptr, r, kb, n0, N, H, limit,
    DI: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr, KFMT: tl.constexpr, CH: tl.constexpr,
    KS_UE8M0: tl.constexpr, DOT_BF16: tl.constexpr,
):
    """Scores of keys ``n0 .. n0+BLOCK_N`` of batch ``kb`` for query row ``r``; −inf past ``limit``."""
    h = tl.arange(0, HP)
    hm = h < H
    n = n0 + tl.arange(0, BLOCK_N)
    nm = n < limit
    krow = (kb * N + n).to(tl.int64)
    c = tl.arange(0, CH)
    logits = tl.zeros((HP, BLOCK_N), tl.float32)
    for blk in tl.static_range(DI // CH):
        q = tl.load(q_ptr + (r * H + h[:, None]).to(tl.int64) * DI + blk * CH + c[None, :], mask=hm[:, None], other=0.0).to(tl.float32)
        if KFMT == 0:
            k = tl.load(k_ptr + krow[:, None] * DI + blk * CH + c[None, :], mask=nm[:, None], other=0.0).to(tl.float32)
        elif KFMT == 1:
            k = e4m3_decode(tl.load(k_ptr + krow[:, None] * DI + blk * CH + c[None, :], mask=nm[:, None], other=0))
        else:
            j = tl.arange(0, CH // 2)
            byte = tl.load(k_ptr + krow[:, None] * (DI // 2) + blk * (CH // 2) + j[None, :], mask=nm[:, None], other=0).to(tl.int32)
            k = tl.join(e2m1_decode(byte), e2m1_decode(byte >> 4)).reshape(BLOCK_N, CH)
        if DOT_BF16:
            p = tl.dot(q.to(tl.bfloat16), tl.trans(k.to(tl.bfloat16)), out_dtype=tl.float32)
        else:
            p = tl.dot(q, tl.trans(k), input_precision="ieee")
        if KFMT != 0:
            s = load_scale(ks_ptr + krow * (DI // CH) + blk, nm, KS_UE8M0)
            p = p * s[None, :]
        logits += p
    w = tl.load(w_ptr + r * H + h, mask=hm, other=0.0).to(tl.float32)
    sc = tl.sum(w[:, None] * tl.maximum(logits, 0.0), axis=0) + 0.0  # + 0.0: no negative zero
    return tl.where(nm, sc, float("-inf")), n


@triton.jit
def _indexer_scores_kernel(
    q_ptr, w_ptr, k_ptr, ks_ptr, pos_ptr, o_ptr, S, N, H, ratio,
    DI: tl.constexpr, HP: tl.constexpr, BLOCK_N: tl.constexpr, KFMT: tl.constexpr, CH: tl.constexpr,
    KS_UE8M0: tl.constexpr, DOT_BF16: tl.constexpr,
):
    r = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    kb = r // S
    limit = tl.minimum((tl.load(pos_ptr + r).to(tl.int64) + 1) // ratio, N).to(tl.int32)
    n = n0 + tl.arange(0, BLOCK_N)
    if n0 < limit:
        sc, n = _score_tile(q_ptr, w_ptr, k_ptr, ks_ptr, r, kb, n0, N, H, limit, DI, HP, BLOCK_N, KFMT, CH, KS_UE8M0, DOT_BF16)
    else:
        sc = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    tl.store(o_ptr + r.to(tl.int64) * N + n, sc, mask=n < N)


@triton.jit
def _sort_key(sc, n):
    """(score, index) -> uint64 whose unsigned order is (score ascending, index descending)."""
    b = sc.to(tl.uint32, bitcast=True)
    flip = tl.where((b >> 31) == 1, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    # NaN ranks below every score, −inf included (high word 0, never selected: docs/numerics.md)
    hi = tl.where(sc != sc, 0, b ^ flip).to(tl.uint32)
    return (hi.to(tl.uint64) << 32) | (0xFFFFFFFF - n.to(tl.uint32)).to(tl.uint64)


@triton.jit
def _rank_merge(best, cand, ws_ptr, KP: tl.constexpr, RB: tl.constexpr):
    """Top ``KP`` of ``best ∪ cand`` (unique keys), sorted descending, by counting ranks.

    The union goes to a per-program scratch row (``2·KP`` keys), each key's rank is counted
    against the union ``RB`` rows at a time, and keys with rank < KP are scattered to their slot.
    Used where ``tl.sort`` is slow (the CPU interpreter); the result equals the sort merge."""
    i = tl.arange(0, 2 * KP)
    tl.store(ws_ptr + i, tl.join(best, cand).reshape(2 * KP).to(tl.int64, bitcast=True))
    tl.debug_barrier()
    allk = tl.load(ws_ptr + i).to(tl.uint64, bitcast=True)  # scratch is int64 storage
    rr = tl.arange(0, RB)
    for r0 in range(0, 2 * KP, RB):
        mine = tl.load(ws_ptr + r0 + rr).to(tl.uint64, bitcast=True)
        gt = (allk[None, :] > mine[:, None]) | ((allk[None, :] == mine[:, None]) & (i[None, :] < r0 + rr[:, None]))
        rank = tl.sum(gt.to(tl.int32), axis=1)
        tl.store(ws_ptr + 2 * KP + rank, mine.to(tl.int64, bitcast=True), mask=rank < KP)
    tl.debug_barrier()
    return tl.load(ws_ptr + 2 * KP + tl.arange(0, KP)).to(tl.uint64, bitcast=True)


@triton.jit
def _indexer_topk_kernel(
    q_ptr, w_ptr, k_ptr, ks_ptr, pos_ptr, o_ptr, ws_ptr, S, N, H, ratio, K, offset,
    DI: tl.constexpr, HP: tl.constexpr, KP: tl.constexpr, KFMT: tl.constexpr, CH: tl.constexpr,
    KS_UE8M0: tl.constexpr, DOT_BF16: tl.constexpr, MERGE_SORT: tl.constexpr, RB: tl.constexpr,
):
    r = tl.program_id(0)
    kb = r // S
    limit = tl.minimum((tl.load(pos_ptr + r).to(tl.int64) + 1) // ratio, N).to(tl.int32)
    best = tl.zeros((KP,), tl.uint64)  # below every real key (−inf encodes to 0x007FFFFF << 32)
    for n0 in range(0, limit, KP):
        sc, n = _score_tile(q_ptr, w_ptr, k_ptr, ks_ptr, r, kb, n0, N, H, limit, DI, HP, KP, KFMT, CH, KS_UE8M0, DOT_BF16)
        if MERGE_SORT:
            cand = tl.sort(_sort_key(sc, n), descending=False)
            best = tl.sort(tl.maximum(best, cand), descending=True)
        else:
            best = _rank_merge(best, _sort_key(sc, n), ws_ptr + r.to(tl.int64) * (3 * KP), KP, RB)
    slot = tl.arange(0, KP)
    idx = (0xFFFFFFFF - (best & 0xFFFFFFFF)).to(tl.int32)
    out = tl.where((slot < limit) & ((best >> 32) != 0), idx + offset, -1)
    tl.store(o_ptr + r.to(tl.int64) * K + slot, out, mask=slot < K)


def _fmt(keys: torch.Tensor, d: int) -> tuple[int, int]:
    if keys.dtype == torch.float8_e4m3fn:
        return 1, 128
    if keys.dtype == torch.uint8:
        return 2, 32
    return 0, d


def _args(q, weights, keys, key_scales):
    b, s, h, d = q.shape
    kfmt, ch = _fmt(keys, d)
    if key_scales is None:
        ks, ue = q, False
    else:
        ks, ue = U.scale_args(key_scales)
    kk = U.as_u8(keys) if kfmt else keys
    dot16 = U.dot_bf16(q.device) and q.dtype == torch.bfloat16 and (kfmt != 0 or keys.dtype == torch.bfloat16)
    return kk, ks, dict(DI=d, HP=max(16, U.next_pow2(h)), KFMT=kfmt, CH=ch, KS_UE8M0=ue, DOT_BF16=dot16)


def _refusals(q, weights, keys, key_scales, positions, *rest) -> list[str]:
    d, h = q.shape[-1], q.shape[-2]
    out = []
    if d & (d - 1) or d < 16 or d > 512:
        out.append(f"triton indexer needs a power-of-two head dim in [16, 512], got dI={d}")
    if h > 128:
        out.append(f"triton indexer holds all heads in one tile: HI must be <= 128, got {h}")
    return out


@register_kernel("triton", "indexer_scores", refusals=_refusals)
def indexer_scores(q, weights, keys, key_scales, positions, ratio):
    b, s, h, d = q.shape
    n = keys.shape[1]
    out = torch.empty((b, s, n), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    kk, ks, meta = _args(q, weights, keys, key_scales)
    bn = U.block_config("indexer", q.device)["BLOCK_N"]
    _indexer_scores_kernel[(b * s, U.cdiv(n, bn))](
        q, weights, kk, ks, positions.contiguous(), out, s, n, h, ratio, BLOCK_N=bn, **meta)
    return out


_TOPK_MAX = 4096


def _topk_refusals(q, weights, keys, key_scales, positions, topk, ratio, offset) -> list[str]:
    out = _refusals(q, weights, keys, key_scales, positions)
    if min(topk, keys.shape[1]) > _TOPK_MAX:
        out.append(f"triton indexer_topk keeps the candidates in one tile: k must be <= {_TOPK_MAX}, got {min(topk, keys.shape[1])}")
    return out


@register_kernel("triton", "indexer_topk", refusals=_topk_refusals)
def indexer_topk(q, weights, keys, key_scales, positions, topk, ratio, offset):
    b, s, h, d = q.shape
    n = keys.shape[1]
    k = min(topk, n)
    out = torch.empty((b, s, k), dtype=torch.int32, device=q.device)
    if out.numel() == 0:
        return out
    kk, ks, meta = _args(q, weights, keys, key_scales)
    kp = max(16, U.next_pow2(k))
    # the sort-based merge is the device path; the interpreter's tl.sort costs ~3 ms per element,
    # so there only candidate sets up to 32 use it (the tests cover both merges)
    merge_sort = U.target_kind(q.device) != "interpret" or kp <= 32
    ws = q if merge_sort else torch.empty((b * s, 3 * kp), dtype=torch.int64, device=q.device)
    # num_stages=1: software pipelining would keep 3 key tiles [KP, dI] in shared memory (408 KB for
    # bf16 keys at KP = 512, beyond any GPU); the merge's sort dominates each iteration anyway
    _indexer_topk_kernel[(b * s,)](q, weights, kk, ks, positions.contiguous(), out, ws, s, n, h, ratio, k, offset, KP=kp,
                                   MERGE_SORT=merge_sort, RB=min(2 * kp, max(16, (1 << 20) // (2 * kp))), num_stages=1,
                                   **meta)
    return out
