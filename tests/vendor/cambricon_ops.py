"""PyTorch emulations of the torch_mlu_ops (Cambricon "TMO") functions the ``cambricon`` adapters call.

THIS IS NOT CAMBRICON'S CODE and it does not run on an MLU. Each function is written from the
operator's published Python signature and documented behaviour (the torch_mlu_ops docstrings and
call sites in Cambricon's vLLM plug-in, and torch_mlu_ops' abstract schemas): argument names,
shapes, dtypes, in-place outputs and the documented refusals (shape whitelists, dtypes) are
reproduced, and the math is plain fp32 PyTorch. Where the published material leaves behaviour
open, the emulation picks the strictest reading and says so (``UNSPECIFIED``): e.g. rows past a
returned length are poisoned, so an adapter that reads them fails its contract test.

The contract tests (``tests/test_cambricon.py``) install this module as ``torch_mlu_ops`` and run
each adapter + emulated op against the v4kernels reference on the shared parity cases. That
verifies the bridging (layouts, index tables, sink, -1 handling, dtype plumbing), not Cambricon's
kernels; ``bench/mlu_check.py`` is the check on hardware.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__version__ = "emulation"

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
#: value written past a returned length (the real ops leave that memory unspecified)
POISON_INDEX = 0x7FFF_FFFF


class TMOError(RuntimeError):
    """What the emulated op raises where the real one documents a refusal."""


def _need(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise TMOError(f"torch_mlu_ops.{op}: {msg}")


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


def single_query_cached_kv_attn(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: Optional[torch.Tensor],
    out: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    k_cache_quant_scale: Optional[torch.Tensor],
    v_cache_quant_scale: Optional[torch.Tensor],
    alibi_slopes: Optional[torch.Tensor],
    max_contxt_len: int,
    windows_size_left: int,
    windows_size_right: int,
    softmax_scale: float,
    return_lse: bool = False,
    q_quant_scale: Optional[torch.Tensor] = None,
    head_size_v: int = -1,
    compute_dtype: torch.dtype = torch.float32,
    mask: Optional[torch.Tensor] = None,
    learnable_sink: Optional[torch.Tensor] = None,
):
    """Paged decode attention, written into ``out``.

    q [batch, seq_q, q_heads, head_size]; k_cache [num_blocks, kv_heads, block_size, head_size]
    (head-major paged layout); ``v_cache=None`` means V = K; block_tables [batch, max_blocks]
    int32; context_lens [batch] int32: sequence b attends to its first ``context_lens[b]``
    tokens, token p at ``k_cache[block_tables[b, p // bs], :, p % bs]``. ``learnable_sink``
    [q_heads] fp32 adds ``exp(sink_h)`` to each head's softmax denominator (a key with zero value).
    Emulated scope: seq_q == 1 (how the V4 deployment calls it: every query token its own
    sequence), unquantised caches, no ALiBi/mask/window. UNSPECIFIED: a sequence with
    context_lens == 0 (written as NaN here).
    """
    op = "single_query_cached_kv_attn"
    _need(q.dim() == 4 and k_cache.dim() == 4, op, f"q must be 4-D and k_cache 4-D, got {q.dim()} and {k_cache.dim()}")
    _need(q.dtype in _FLOAT and k_cache.dtype == q.dtype, op,
          f"q and k_cache must share a float/half/bfloat16 dtype, got {q.dtype} and {k_cache.dtype}")
    _need(k_cache_quant_scale is None and v_cache_quant_scale is None and q_quant_scale is None, op,
          "quantised caches are outside the emulated scope")
    _need(alibi_slopes is None and mask is None, op, "alibi/mask are outside the emulated scope")
    _need(windows_size_left == -1, op, "windows_size_left other than -1 is outside the emulated scope")
    _need(block_tables.dtype == torch.int32 and context_lens.dtype == torch.int32, op,
          f"block_tables and context_lens must be int32, got {block_tables.dtype} and {context_lens.dtype}")
    batch, seq_q, q_heads, head = q.shape
    _, kv_heads, bs, kd = k_cache.shape
    _need(kd == head, op, f"k_cache head_size {kd} != q head_size {head}")
    _need(seq_q == 1, op, f"emulated for seq_q == 1, got {seq_q}")
    _need(q_heads % kv_heads == 0, op, f"q_heads {q_heads} not a multiple of kv_heads {kv_heads}")
    # documented limit: seq_q * q_heads / kv_heads <= 256 for bf16 caches, 128 otherwise
    cap = 256 if k_cache.dtype == torch.bfloat16 else 128
    _need(seq_q * (q_heads // kv_heads) <= cap, op,
          f"seq_q * q_heads / kv_heads = {seq_q * q_heads // kv_heads} exceeds {cap} for {k_cache.dtype} caches")
    _need(out.shape == (batch, seq_q, q_heads, head) and out.dtype == q.dtype, op,
          f"out must be {(batch, seq_q, q_heads, head)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    _need(block_tables.shape[0] == batch and context_lens.shape == (batch,), op, "batch mismatch in tables")
    lens = context_lens.long()
    _need(bool((lens >= 0).all()) and (int(lens.max()) if lens.numel() else 0) <= min(max_contxt_len, block_tables.shape[1] * bs),
          op, f"context_lens must lie in [0, min(max_contxt_len={max_contxt_len}, blocks*block_size)]")
    v = k_cache if v_cache is None else v_cache
    group = q_heads // kv_heads
    lse_all = torch.full((batch, q_heads, seq_q), float("inf"), device=q.device)
    for b in range(batch):
        n = int(lens[b])
        if n == 0:
            out[b] = float("nan")
            continue
        p = torch.arange(n, device=q.device)
        blk = block_tables[b, p // bs].long()
        _need(bool((blk >= 0).all()) and int(blk.max()) < k_cache.shape[0], op, "block id out of range")
        keys = k_cache[blk, :, p % bs].float()  # [n, kv_heads, D]
        vals = v[blk, :, p % bs].float()
        qf = q[b, 0].float().view(kv_heads, group, head)
        s = torch.einsum("hgd,nhd->hgn", qf, keys) * softmax_scale  # [kv_heads, group, n]
        s = s.reshape(q_heads, n)
        m = s.amax(-1, keepdim=True)
        if learnable_sink is not None:
            m = torch.maximum(m, learnable_sink.float().view(q_heads, 1))
        e = torch.exp(s - m)
        den = e.sum(-1, keepdim=True)
        if learnable_sink is not None:
            den = den + torch.exp(learnable_sink.float().view(q_heads, 1) - m)
        o = torch.einsum("hgn,nhd->hgd", (e / den).view(kv_heads, group, n), vals).reshape(q_heads, head)
        out[b, 0] = o.to(out.dtype)
        lse_all[b, :, 0] = (torch.log(den) + m).view(q_heads)
    return (out, lse_all) if return_lse else None


# --------------------------------------------------------------------------------------------
# Indexer: fused score + top-k emitting a sparse block table
# --------------------------------------------------------------------------------------------


def masked_indexer_select_paged_kv(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    weights: torch.Tensor,
    kv_cache_block_table: torch.Tensor,
    cu_seq_q_lens: Optional[torch.Tensor],
    cu_seq_k_lens: Optional[torch.Tensor],
    k_context_lens: Optional[torch.Tensor],
    k_cache_block_table: Optional[torch.Tensor],
    is_prefill: bool,
    index_topk: int,
    kv_cache_block_size: int,
    softmax_scale: float,
    q_scale: Optional[torch.Tensor] = None,
    k_scale_cache: Optional[torch.Tensor] = None,
    sparse_block_table: Optional[torch.Tensor] = None,
    sparse_context_lens: Optional[torch.Tensor] = None,
    is_score_float: bool = False,
    compress_ratio: int = 1,
    kv_cache_block_table_offset: Optional[torch.Tensor] = None,
):
    """Lightning-indexer scoring and top-k in one op (decode form), writing a sparse block table.

    query [batch, seq_q, H, D]; k_cache [blocks, block_size, D] (or [blocks, 1, block_size, D]);
    weights [batch, seq_q, H, 1]; k_context_lens [batch]: compressed entries visible to the
    sequence (``seq_len // compress_ratio``); k_cache_block_table [batch, kb]: entry c of the
    sequence is ``k_cache[k_cache_block_table[b, c // bs], c % bs]``.
    score(c) = softmax_scale * sum_h w_h * relu(q_h . k_c) (fp32 when ``is_score_float``).
    The ``min(index_topk, k_context_lens[b])`` best entries (score descending; here ties keep the
    lower c first) are written to ``sparse_block_table[b, i, :len]`` as slots of the main KV
    cache: ``kv_cache_block_table[b, c // kvbs] * kvbs + c % kvbs + kv_cache_block_table_offset[token]``
    and ``sparse_context_lens[token] = len``. UNSPECIFIED: the order of the selection and the
    entries past ``len`` (poisoned here). Emulated scope: decode form (is_prefill=False), seq_q == 1,
    unquantised bf16/half/float query and keys.
    """
    op = "masked_indexer_select_paged_kv"
    _need(not is_prefill, op, "the prefill form is outside the emulated scope")
    _need(q_scale is None and k_scale_cache is None, op, "quantised query/keys are outside the emulated scope")
    _need(query.dim() == 4, op, f"query must be [batch, seq_q, H, D], got {tuple(query.shape)}")
    _need(query.dtype in _FLOAT and k_cache.dtype == query.dtype, op,
          f"query and k_cache must share a float dtype, got {query.dtype} and {k_cache.dtype}")
    batch, seq_q, h, d = query.shape
    _need(seq_q == 1, op, f"emulated for seq_q == 1, got {seq_q}")
    kc = k_cache.squeeze(1) if k_cache.dim() == 4 else k_cache
    _need(kc.dim() == 3 and kc.shape[-1] == d, op, f"k_cache must be [blocks, block_size, {d}], got {tuple(k_cache.shape)}")
    _need(weights.shape == (batch, seq_q, h, 1), op, f"weights must be {(batch, seq_q, h, 1)}, got {tuple(weights.shape)}")
    _need(k_context_lens is not None and k_cache_block_table is not None, op, "decode form needs k_context_lens and "
          "k_cache_block_table")
    _need(sparse_block_table is not None and sparse_context_lens is not None, op, "outputs must be given")
    _need(tuple(sparse_block_table.shape) == (batch, seq_q, index_topk), op,
          f"sparse_block_table must be {(batch, seq_q, index_topk)}, got {tuple(sparse_block_table.shape)}")
    for name, t in (("kv_cache_block_table", kv_cache_block_table), ("k_cache_block_table", k_cache_block_table),
                    ("k_context_lens", k_context_lens)):
        _need(t.dtype == torch.int32, op, f"{name} must be int32, got {t.dtype}")
    bs = kc.shape[1]
    offs = (torch.zeros(batch * seq_q, dtype=torch.int64, device=query.device) if kv_cache_block_table_offset is None
            else kv_cache_block_table_offset.long())
    sparse_block_table.fill_(POISON_INDEX)
    for b in range(batch):
        n = int(k_context_lens[b])
        _need(0 <= n <= k_cache_block_table.shape[1] * bs, op, f"k_context_lens[{b}]={n} exceeds the key table")
        if n == 0:
            sparse_context_lens[b] = 0
            continue
        c = torch.arange(n, device=query.device)
        keys = kc[k_cache_block_table[b, c // bs].long(), c % bs].float()  # [n, D]
        logits = (query[b, 0].float() @ keys.T).relu()  # [H, n]
        score = (weights[b, 0, :, 0].float() @ logits) * softmax_scale
        if not is_score_float:
            score = score.to(query.dtype).float()
        k = min(index_topk, n)
        sel = torch.sort(score, descending=True, stable=True).indices[:k]
        slot = kv_cache_block_table[b, sel // kv_cache_block_size].long() * kv_cache_block_size + sel % kv_cache_block_size
        sparse_block_table[b, 0, :k] = (slot + offs[b]).to(sparse_block_table.dtype)
        sparse_context_lens[b] = k
    return sparse_block_table, sparse_context_lens


# --------------------------------------------------------------------------------------------
# mHC
# --------------------------------------------------------------------------------------------


def hc_split_sinkhorn(
    mixes: torch.Tensor,
    hc_scale: torch.Tensor,
    hc_base: torch.Tensor,
    pre_scale: Optional[torch.Tensor] = None,
    hc_mult: int = 4,
    sinkhorn_iter: int = 20,
    eps: float = 1e-6,
):
    """mixes [B, S, (2+hc)*hc] or [B, (2+hc)*hc] fp32 (times ``pre_scale`` [B, S] / [B] when given)
    -> (pre, post, comb) fp32: ``pre = sigmoid(m·s0 + b) + eps``, ``post = 2·sigmoid(m·s1 + b)``,
    comb = Sinkhorn of ``softmax(m·s2 + b) + eps`` (column pass first, then sinkhorn_iter−1
    row/column rounds)."""
    op = "hc_split_sinkhorn"
    _need(mixes.dim() in (2, 3), op, f"mixes must be 2-D or 3-D, got {mixes.dim()}-D")
    _need(mixes.dtype == torch.float32, op, f"mixes must be float32, got {mixes.dtype}")
    _need(mixes.shape[-1] == (2 + hc_mult) * hc_mult, op,
          f"mixes last dim must be (2+hc_mult)*hc_mult = {(2 + hc_mult) * hc_mult}, got {mixes.shape[-1]}")
    m = mixes.float()
    if pre_scale is not None:
        _need(pre_scale.shape == mixes.shape[:-1], op, f"pre_scale must be {tuple(mixes.shape[:-1])}")
        m = m * pre_scale.float().unsqueeze(-1)
    hc, s, b = hc_mult, hc_scale.float(), hc_base.float()
    pre = torch.sigmoid(m[..., :hc] * s[0] + b[:hc]) + eps
    post = 2.0 * torch.sigmoid(m[..., hc:2 * hc] * s[1] + b[hc:2 * hc])
    c = torch.softmax((m[..., 2 * hc:] * s[2] + b[2 * hc:]).unflatten(-1, (hc, hc)), dim=-1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(sinkhorn_iter - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return pre, post, c


def fused_mhc_post(
    x: torch.Tensor,
    residual: torch.Tensor,
    post: torch.Tensor,
    comb: torch.Tensor,
    compute_rms: bool,
    eps: float,
    output: Optional[torch.Tensor] = None,
    output_rms: Optional[torch.Tensor] = None,
):
    """``output = post * x + (comb * residual).sum(dim=1)`` i.e. out[n, k] = post[n, k]·x[n] +
    Σ_j comb[n, j, k]·residual[n, j]; x [N, D], residual [N, HC, D] (x's dtype), post [N, HC] and
    comb [N, HC, HC] fp32. Documented limitation: D must be 4096 and HC must be 4. Returns
    ``(output, output_rms)`` when ``compute_rms`` (rsqrt of the mean square of each token's HC·D
    outputs plus eps), else ``output``."""
    op = "fused_mhc_post"
    _need(x.dim() == 2 and residual.dim() == 3, op, "x must be [N, D] and residual [N, HC, D]")
    n, hc, d = residual.shape
    _need(d == 4096 and hc == 4, op, f"D must be 4096 and HC must be 4, got D={d}, HC={hc}")
    _need(x.dtype in (torch.float32, torch.bfloat16) and residual.dtype == x.dtype, op,
          f"x and residual must share float/bfloat16, got {x.dtype} and {residual.dtype}")
    _need(post.dtype == torch.float32 and comb.dtype == torch.float32, op, "post and comb must be float32")
    _need(tuple(x.shape) == (n, d) and tuple(post.shape) == (n, hc) and tuple(comb.shape) == (n, hc, hc), op,
          "shape mismatch between x, residual, post and comb")
    y = post.unsqueeze(-1) * x.float().unsqueeze(-2) + (comb.unsqueeze(-1) * residual.float().unsqueeze(-2)).sum(dim=1)
    y = y.to(x.dtype)
    if output is not None:
        output.copy_(y)
        y = output
    if not compute_rms:
        return y
    rms = torch.rsqrt(y.float().flatten(-2).square().mean(-1) + eps)
    if output_rms is not None:
        output_rms.copy_(rms)
        rms = output_rms
    return y, rms


# --------------------------------------------------------------------------------------------
# MoE
# --------------------------------------------------------------------------------------------


def moe_softplus_topk(
    input: torch.Tensor,
    topk: int,
    input_ids: Optional[torch.Tensor] = None,
    tid2eid: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    route_scale: float = 1.0,
    reduce_weight: Optional[torch.Tensor] = None,
    expert_id: Optional[torch.Tensor] = None,
):
    """DeepSeek-V4 router on logits ``input [T, E]``: scores ``sqrt(softplus(logits))``; experts
    from ``tid2eid[input_ids]`` (hash layers) or the top-k of ``scores + bias``; weights = the
    chosen scores normalised to sum 1, times ``route_scale``. -> (weights fp32 [T, k], ids int32).
    UNSPECIFIED: the order among exactly equal scores (lower expert first here)."""
    op = "moe_softplus_topk"
    _need(input.dim() == 2 and input.dtype in _FLOAT, op, f"input must be 2-D float, got {tuple(input.shape)} {input.dtype}")
    s = F.softplus(input.float()).sqrt()
    if tid2eid is not None:
        _need(input_ids is not None, op, "tid2eid needs input_ids")
        _need(tid2eid.shape[1] == topk, op, f"tid2eid width {tid2eid.shape[1]} != topk {topk}")
        ids = tid2eid[input_ids.long()].long()
    else:
        key = s if bias is None else s + bias.float()
        ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :topk]
    w = s.gather(1, ids)
    w = w / w.sum(-1, keepdim=True) * route_scale
    if reduce_weight is not None:
        reduce_weight.copy_(w)
        w = reduce_weight
    ids = ids.to(torch.int32)
    if expert_id is not None:
        expert_id.copy_(ids)
        ids = expert_id
    return w, ids


def moe_gen_idx(expert_id: torch.Tensor, expert_num: int):
    """expert_id [T, k] int32 in [0, expert_num) -> (expand_idx [T·k]: the token of each row once
    rows are grouped by expert (stable), combine_idx [T·k]: the grouped row of each (t, j),
    token_count [E], cusum_token_count [E+1]), all int32."""
    op = "moe_gen_idx"
    _need(expert_id.dim() == 2 and expert_id.dtype == torch.int32, op, "expert_id must be int32 [T, k]")
    flat = expert_id.reshape(-1).long()
    _need(bool(((flat >= 0) & (flat < expert_num)).all()), op, f"expert ids must lie in [0, {expert_num})")
    order = torch.argsort(flat, stable=True)
    k = expert_id.shape[1]
    expand_idx = (order // k).to(torch.int32)
    combine_idx = torch.empty_like(order)
    combine_idx[order] = torch.arange(order.numel(), device=expert_id.device)
    count = torch.bincount(flat, minlength=expert_num).to(torch.int32)
    cusum = torch.zeros(expert_num + 1, dtype=torch.int32, device=expert_id.device)
    cusum[1:] = torch.cumsum(count, 0)
    return expand_idx, combine_idx.to(torch.int32), count, cusum


def moe_expand_input(input: torch.Tensor, gather_idx: torch.Tensor, cusum_token_count: Optional[torch.Tensor] = None,
                     start_expert_id: int = 0, expert_size: int = 0):
    """Rows of ``input [T, D]`` gathered by ``gather_idx`` -> [len(gather_idx), D]."""
    return input[gather_idx.long()]


def group_gemm(a: torch.Tensor, b: torch.Tensor, m_list: torch.Tensor, expand_idx: Optional[torch.Tensor],
               c: Optional[torch.Tensor], alpha: Optional[torch.Tensor], beta: Optional[torch.Tensor],
               max_m: int = 0, d: Optional[torch.Tensor] = None):
    """Grouped GEMM: consecutive row segments of ``a [rows, K]`` (lengths ``m_list [E]``) times
    ``b[e]ᵀ`` (``b [E, N, K]``), fp32 accumulation, output in a's dtype. Rows past
    ``sum(m_list)`` are not computed (UNSPECIFIED, NaN here)."""
    op = "group_gemm"
    _need(a.dtype in _FLOAT and b.dtype == a.dtype, op, f"a and b must share a float dtype, got {a.dtype}, {b.dtype}")
    _need(b.dim() == 3 and a.shape[-1] == b.shape[-1] and m_list.numel() == b.shape[0], op,
          f"shape mismatch: a {tuple(a.shape)}, b {tuple(b.shape)}, m_list {tuple(m_list.shape)}")
    _need(expand_idx is None and c is None and alpha is None and beta is None, op,
          "expand_idx/c/alpha/beta are outside the emulated scope")
    out = torch.full((a.shape[0], b.shape[1]), float("nan"), dtype=a.dtype, device=a.device) if d is None else d
    start = 0
    for e, m in enumerate(m_list.tolist()):
        if m:
            out[start:start + m] = (a[start:start + m].float() @ b[e].float().T).to(out.dtype)
        start += m
    _need(start <= a.shape[0], op, f"sum(m_list) = {start} exceeds the {a.shape[0]} rows of a")
    return out


def moe_active(input: torch.Tensor, act_mode: str, is_gated: bool, output: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, cusum_token_count: Optional[torch.Tensor] = None,
               start_expert_id: int = 0, expert_size: int = 0, swiglu_limit: int = 0):
    """Gated activation of ``input [rows, 2I]`` (gate half first): ``act(min(g, L)) · clamp(u, −L, L)``
    with ``L = swiglu_limit`` (0 = no clamp), fp32 math, output [rows, I] in input's dtype.
    Emulated scope: act_mode "silu", is_gated, no bias."""
    op = "moe_active"
    _need(act_mode == "silu" and is_gated and bias is None, op, "emulated for gated silu without bias")
    _need(isinstance(swiglu_limit, int), op, f"swiglu_limit is an int, got {type(swiglu_limit).__name__}")
    half = input.shape[-1] // 2
    g, u = input[..., :half].float(), input[..., half:].float()
    if swiglu_limit > 0:
        g = g.clamp(max=swiglu_limit)
        u = u.clamp(-swiglu_limit, swiglu_limit)
    y = (F.silu(g) * u).to(input.dtype)
    if output is not None:
        output.copy_(y)
        return output
    return y


def moe_combine_result(input: torch.Tensor, reduce_weight: torch.Tensor, gather_ids: torch.Tensor,
                       residual: Optional[torch.Tensor], cusum_token_count: Optional[torch.Tensor],
                       start_expert_id: int, expert_size: int, bias: Optional[torch.Tensor] = None,
                       output: Optional[torch.Tensor] = None):
    """out[t] = Σ_j reduce_weight[t, j] · input[gather_ids[t·k + j]] (+ residual), fp32 sum, in
    input's dtype. Rows outside the experts ``[start_expert_id, start_expert_id + expert_size)``
    (by ``cusum_token_count``) contribute nothing (expert parallelism)."""
    op = "moe_combine_result"
    _need(bias is None, op, "bias is outside the emulated scope")
    t, k = reduce_weight.shape
    pos = gather_ids.long().view(t, k)
    rows = input[pos].float()  # [T, k, D]
    if cusum_token_count is not None:
        lo = int(cusum_token_count[start_expert_id])
        hi = int(cusum_token_count[start_expert_id + expert_size])
        keep = (pos >= lo) & (pos < hi)
        rows = torch.where(keep.unsqueeze(-1), rows, 0.0)
    y = (reduce_weight.float().unsqueeze(-1) * rows).sum(1)
    if residual is not None:
        y = y + residual.float()
    y = y.to(input.dtype)
    if output is not None:
        output.copy_(y)
        return output
    return y


# --------------------------------------------------------------------------------------------
# RoPE and RMSNorm
# --------------------------------------------------------------------------------------------


def apply_rotary(input: torch.Tensor, sin_cache: torch.Tensor, cos_cache: torch.Tensor,
                 position_ids: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], interleaved: bool,
                 discrete: bool, dynamic_ntk: bool, max_seqlen: int, is_inverse: bool = False):
    """Rotary embedding of ``input [batch, seq, heads, rotary_dim]`` (or packed ``[T, heads,
    rotary_dim]``): token t (flattened) uses table row ``position_ids[t]`` (``discrete``) of
    ``sin_cache``/``cos_cache [rows, rotary_dim]``, which have the input's dtype and are laid out
    like the input's pairs (interleaved: θ0 θ0 θ1 θ1 …, the layout Cambricon's deployment builds
    with ``repeat_interleave(2)``). ``is_inverse`` rotates by −θ. fp32 math, output in the input's
    dtype. Emulated scope: discrete positions without cu_seqlens, no NTK."""
    op = "apply_rotary"
    _need(input.dim() in (3, 4) and input.dtype in _FLOAT, op, f"input must be 3-D/4-D float, got "
          f"{tuple(input.shape)} {input.dtype}")
    _need(discrete and position_ids is not None and cu_seqlens is None and not dynamic_ntk, op,
          "emulated for discrete position_ids without cu_seqlens")
    _need(sin_cache.shape == cos_cache.shape and sin_cache.shape[-1] == input.shape[-1], op,
          f"sin/cos must be [rows, {input.shape[-1]}], got {tuple(sin_cache.shape)}")
    _need(sin_cache.dtype == input.dtype and cos_cache.dtype == input.dtype, op,
          f"sin/cos must have the input's dtype {input.dtype}, got {sin_cache.dtype}")
    shape = input.shape
    x = input.reshape(-1, shape[-2], shape[-1]).float()
    _need(position_ids.numel() == x.shape[0], op, f"position_ids must have one entry per token ({x.shape[0]})")
    sin = sin_cache[position_ids.long()].float().unsqueeze(1)
    cos = cos_cache[position_ids.long()].float().unsqueeze(1)
    if is_inverse:
        sin = -sin
    if interleaved:
        rot = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    else:
        h = x.shape[-1] // 2
        rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return (x * cos + rot * sin).to(input.dtype).reshape(shape)


def fused_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
                   beta: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                   store_output_before_norm: bool, quant_scale: Optional[torch.Tensor] = None,
                   out: Optional[torch.Tensor] = None, dynamic_quant: bool = False):
    """``x · rsqrt(mean(x²) + eps) · gamma`` over the last dim, fp32 math, one rounding to x's
    dtype. Emulated scope: no residual/beta/bias/quantisation."""
    op = "fused_rms_norm"
    _need(residual is None and beta is None and bias is None and quant_scale is None and not dynamic_quant, op,
          "emulated without residual, beta, bias or quantisation")
    _need(x.dtype in _FLOAT, op, f"x must be float/half/bfloat16, got {x.dtype}")
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if gamma is not None:
        _need(gamma.shape == x.shape[-1:] and gamma.dtype == x.dtype, op,
              f"gamma must be [{x.shape[-1]}] {x.dtype}, got {tuple(gamma.shape)} {gamma.dtype}")
        y = y * gamma.float()
    y = y.to(x.dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


# --------------------------------------------------------------------------------------------
# Compressor (prefill form: window pooling only)
# --------------------------------------------------------------------------------------------


def fused_compress_multi_kv(kv: torch.Tensor, score: torch.Tensor, kv_state: torch.Tensor, score_state: torch.Tensor,
                            cu_seqlens: torch.Tensor, batch_ids: torch.Tensor, ape: torch.Tensor, max_seqlen: int,
                            overlap: bool, compressed_kv: torch.Tensor):
    """Softmax-gated window pooling of a fresh prefill (every sequence starts at position 0).

    kv, score [BS, coff·hd] (packed tokens of the batch, ``cu_seqlens [B+1]``); ape [ratio, coff·hd]
    fp32 (added to the scores); compressed_kv [BS, hd]: row ``cu_seqlens[b] + w`` receives window w
    of sequence b (complete windows only). Without overlap window w pools tokens [w·r, w·r + r);
    with overlap (coff = 2) it also pools the first hd columns of window w−1's tokens, the second
    hd columns coming from its own (window 0 has no predecessor). After the call
    ``kv_state/score_state[batch_ids[b]]`` ([max_B, coff·ratio, coff·hd] fp32) hold the sequence's
    last complete window (slots 0..r−1) and the open tail (slots r..), −inf scores elsewhere.
    UNSPECIFIED: rows of compressed_kv past each sequence's window count (untouched here).
    """
    op = "fused_compress_multi_kv"
    coff = 2 if overlap else 1
    _need(kv.dim() == 2 and kv.shape == score.shape, op, "kv and score must be [BS, coff*hd] and equal")
    _need(kv.dtype in (torch.float32, torch.bfloat16) and score.dtype == kv.dtype, op, "kv/score must be float or bf16")
    ratio = ape.shape[0]
    hd = kv.shape[1] // coff
    _need(ape.shape == (ratio, coff * hd) and ape.dtype == torch.float32, op, f"ape must be [ratio, {coff * hd}] fp32")
    _need(compressed_kv.shape[-1] == hd, op, f"compressed_kv last dim must be {hd}")
    _need(kv_state.shape[1:] == (coff * ratio, coff * hd) and kv_state.dtype == torch.float32, op,
          f"kv_state must be [max_B, {coff * ratio}, {coff * hd}] fp32")
    cu = cu_seqlens.long().tolist()
    for b in range(len(cu) - 1):
        x = kv[cu[b]:cu[b + 1]].float()
        s = score[cu[b]:cu[b + 1]].float()
        n = x.shape[0]
        nw = n // ratio
        st = int(batch_ids[b])
        kv_state[st].zero_()
        score_state[st].fill_(float("-inf"))
        for w in range(nw):
            xs = x[w * ratio:(w + 1) * ratio]
            ss = s[w * ratio:(w + 1) * ratio] + ape
            if overlap:
                cur_x, cur_s = xs[:, hd:], ss[:, hd:]
                if w > 0:
                    px = x[(w - 1) * ratio:w * ratio, :hd]
                    ps = s[(w - 1) * ratio:w * ratio, :hd] + ape[:, :hd]
                    cur_x, cur_s = torch.cat((px, cur_x)), torch.cat((ps, cur_s))
            else:
                cur_x, cur_s = xs, ss
            p = torch.softmax(cur_s, dim=0)
            compressed_kv[cu[b] + w] = (p * cur_x).sum(0).to(compressed_kv.dtype)
        # state: the last complete window (for overlap) and the open tail
        if overlap and nw > 0:
            kv_state[st, :ratio] = x[(nw - 1) * ratio:nw * ratio]
            score_state[st, :ratio] = s[(nw - 1) * ratio:nw * ratio] + ape
        tail = n - nw * ratio
        if tail:
            base = ratio if overlap else 0
            kv_state[st, base:base + tail] = x[nw * ratio:]
            score_state[st, base:base + tail] = s[nw * ratio:] + ape[:tail]
    return compressed_kv
