"""TEST-ONLY EMULATIONS of Huawei Ascend vendor operators, written in PyTorch from their
published schemas and documentation (torch_npu / op-plugin ``op_plugin_functions.yaml`` and
``docs/zh/custom_APIs/torch_npu/*.md``; vllm-ascend ``csrc/torch_binding.cpp`` and the op
READMEs). They are NOT the vendor kernels and were never compared with them: they encode our
reading of each op's contract — argument names and keyword-only markers, layouts (BSND, PA_ND
paged KV, half-layout RoPE output), index conventions (valid entries first, −1 tail; finalize's
``i + k·num_rows`` indexing), limits (head counts, top-k sizes, dtypes, chips) — so that the
ascend adapters' bridging can be checked against the v4kernels reference without hardware.

Every emulation enforces the documented limits with an error, so an adapter that calls an op
outside them fails here the way it would on a device. Undocumented behaviour is emulated
pessimistically (e.g. an attention row with no valid index returns NaN), so adapters must
bridge it themselves.

``install(soc)`` installs a fake ``torch_npu`` module and a fake ``torch.ops._C_ascend``
library built from these functions (use it only in a process set up by
``v4kernels.testing.fake_device.install("npu")``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SOC_CODES = {"A2": 223, "A3": 251, "950": 260}


class VendorLimitError(RuntimeError):
    """An emulated vendor op was called outside its documented limits."""


def _need(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise VendorLimitError(f"{op}: {msg}")


_SOC = {"family": "A3"}


def _soc() -> str:
    return _SOC["family"]


# ------------------------------------------------------------------------------------------
# torch_npu built-ins (op-plugin yaml signatures)
# ------------------------------------------------------------------------------------------


def npu_rms_norm(self, gamma, epsilon=1e-06):
    """y = x·rsqrt(mean(x²)+eps)·gamma over gamma's trailing dims; (y in x.dtype, rstd fp32)."""
    op = "npu_rms_norm"
    _need(self.dtype in (torch.float16, torch.bfloat16, torch.float32), op, f"x dtype {self.dtype}")
    _need(gamma.dtype == self.dtype, op, f"gamma dtype {gamma.dtype} must equal x dtype {self.dtype}")
    _need(tuple(self.shape[-gamma.dim():]) == tuple(gamma.shape), op, "gamma must match x's trailing dims")
    dims = tuple(range(self.dim() - gamma.dim(), self.dim()))
    xf = self.float()
    rstd = torch.rsqrt(xf.square().mean(dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(self.dtype), rstd


def npu_interleave_rope(x, cos, sin):
    """x [B,N,S,64] interleaved pairs; q = de-interleave(x) (evens then odds);
    out = q·cos + RotateHalf(q)·sin — in the half layout. cos/sin [B,1,S|1,64]."""
    op = "npu_interleave_rope"
    _need(x.dim() == 4 and x.shape[-1] == 64, op, f"x must be [B,N,S,64], got {list(x.shape)}")
    _need(x.dtype in (torch.float16, torch.bfloat16), op, f"x dtype {x.dtype}")
    _need(cos.dtype == x.dtype and sin.dtype == x.dtype, op, "cos/sin must have x's dtype")
    _need(cos.dim() == 4 and cos.shape[1] == 1 and cos.shape[-1] == 64 and cos.shape[2] in (1, x.shape[2]), op,
          f"cos must be [B,1,S|1,64], got {list(cos.shape)}")
    _need(x.is_contiguous() and cos.is_contiguous() and sin.is_contiguous(), op, "non-contiguous input")
    b, n, s, d = x.shape
    q = x.float().reshape(b, n, s, d // 2, 2).transpose(-1, -2).reshape(b, n, s, d)
    rot = torch.cat((-q[..., d // 2:], q[..., : d // 2]), dim=-1)
    return (q * cos.float() + rot * sin.float()).to(x.dtype)


def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                      dst_type_max=0.0):
    """Per-row symmetric quantisation: scale = rowmax|x| / DTYPE_MAX, y = round(x / scale)."""
    op = "npu_dynamic_quant"
    _need(input.dtype in (torch.float16, torch.bfloat16), op, f"x dtype {input.dtype}")
    _need(input.dim() > 1, op, "x must have more than one dim")
    _need(smooth_scales is None and group_index is None, op, "smooth scales not emulated")
    _need(quant_mode == "pertoken", op, f"quant_mode {quant_mode!r} not emulated")
    dst = torch.int8 if dst_type is None else dst_type
    if dst == torch.float8_e4m3fn:
        _need(_soc() == "950", op, "FP8 output exists on 950 only")
        qmax = 448.0
    else:
        _need(dst == torch.int8, op, f"dst_type {dst} not emulated")
        qmax = 127.0
    xf = input.float()
    scale = xf.abs().amax(-1) / qmax
    y = xf / scale.unsqueeze(-1)
    y = y.clamp(-qmax, qmax).to(torch.float8_e4m3fn) if dst == torch.float8_e4m3fn else torch.round(y).clamp(-127, 127).to(torch.int8)
    return y, scale


def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, x1_dtype=None,
                     x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None, y_scale=None):
    """Block-scaled FP8 GEMM (950, group_sizes=[1,128,128]): x1 [M,K] e4m3, x2 [K,N] e4m3,
    pertoken_scale [M,K/128], scale [K/128,N/128] fp32; y = Σ_kb (x1_kb @ x2_kb)·ps[m,kb]·s[kb,nb]."""
    op = "npu_quant_matmul"
    _need(_soc() == "950", op, "FP8 block-scaled matmul exists on 950 only")
    _need(x1.dtype == torch.float8_e4m3fn and x2.dtype == torch.float8_e4m3fn, op, "x1/x2 must be float8_e4m3fn")
    _need(list(group_sizes or []) == [1, 128, 128], op, f"group_sizes {group_sizes} not emulated")
    _need(scale.dtype == torch.float32 and pertoken_scale is not None and pertoken_scale.dtype == torch.float32, op,
          "fp32 scale and pertoken_scale required")
    _need(offset is None and bias is None and y_scale is None, op, "offset/bias/y_scale not emulated")
    m, k = x1.shape
    k2, n = x2.shape
    _need(k == k2, op, "K mismatch")
    kb, nb = math.ceil(k / 128), math.ceil(n / 128)
    _need(tuple(scale.shape) == (kb, nb) and tuple(pertoken_scale.shape) == (m, kb), op, "scale shapes")
    out = torch.zeros(m, n, dtype=torch.float32, device=x1.device)
    a, b = x1.float(), x2.float()
    for i in range(kb):
        part = a[:, i * 128:(i + 1) * 128] @ b[i * 128:(i + 1) * 128]
        out += part * pertoken_scale[:, i:i + 1] * scale[i].repeat_interleave(128)[:n]
    return out.to(output_dtype or torch.bfloat16)


def npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, *, block_table=None,
                               actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None,
                               key_rope=None, sparse_block_size=1, layout_query="BSND", layout_kv="BSND",
                               sparse_mode=3, pre_tokens=2**63 - 1, next_tokens=2**63 - 1, attention_mode=0,
                               return_softmax_lse=False, sinks=None):
    """SFA (V3.2-era): q [B,S,N1,512] + q_rope [B,S,N1,64]; k=v [B,Skv,1,512] + k_rope;
    sparse_indices [B,S,1,K] int32, valid first then −1 (entries after the first −1 ignored);
    scores (q·k + q_rope·k_rope)·scale; sparse_mode 0 = no positional mask; ``sinks`` [N1]
    fp32 joins the softmax denominator. Rows with no valid entry: undocumented (NaN here)."""
    op = "npu_sparse_flash_attention"
    _need(layout_query == "BSND" and layout_kv == "BSND", op, "only BSND emulated")
    _need(query.dtype in (torch.bfloat16, torch.float16) and key.dtype == query.dtype, op, "bf16/fp16 q and kv")
    b, s, n1, d = query.shape
    _need(d == 512 and n1 <= 128, op, f"D must be 512 and N1 <= 128, got D={d} N1={n1}")
    _need(key.dim() == 4 and key.shape[2] == 1 and key.shape[3] == 512, op, "key must be [B,Skv,1,512]")
    _need(query_rope is not None and key_rope is not None and query_rope.shape[-1] == 64, op, "rope parts required")
    _need(sparse_block_size == 1 and sparse_mode in (0, 3), op, "sparse_block_size 1, sparse_mode 0|3")
    _need(not return_softmax_lse, op, "return_softmax_lse is training-only")
    _need(sparse_indices.dtype == torch.int32 and sparse_indices.shape[:3] == (b, s, 1), op, "indices [B,S,1,K] int32")
    _need(block_table is None, op, "paged layout not emulated")
    kv = key[:, :, 0].float()
    kr = key_rope[:, :, 0].float()
    idx = sparse_indices[:, :, 0].long()
    kk = idx.shape[-1]
    valid = (idx >= 0).int().cumprod(-1).bool()  # valid-first: everything after the first −1 is ignored
    if actual_seq_lengths_kv is not None:
        valid &= idx < actual_seq_lengths_kv.long().view(b, 1, 1)
    safe = idx.clamp(min=0, max=kv.shape[1] - 1)
    gk = torch.gather(kv, 1, safe.reshape(b, s * kk, 1).expand(-1, -1, 512)).view(b, s, kk, 512)
    gr = torch.gather(kr, 1, safe.reshape(b, s * kk, 1).expand(-1, -1, 64)).view(b, s, kk, 64)
    sc = (torch.einsum("bshd,bskd->bshk", query.float(), gk) + torch.einsum("bshd,bskd->bshk", query_rope.float(), gr))
    sc = sc * scale_value
    sc = sc.masked_fill(~valid[:, :, None, :], float("-inf"))
    m = sc.amax(-1, keepdim=True)
    if sinks is not None:
        m = torch.maximum(m, sinks.float().view(1, 1, n1, 1))
    p = torch.exp(sc - m)
    den = p.sum(-1, keepdim=True)
    if sinks is not None:
        den = den + torch.exp(sinks.float().view(1, 1, n1, 1) - m)
    out = torch.einsum("bshk,bskd->bshd", p / den, gk)
    out = torch.where(valid.any(-1)[:, :, None, None], out, float("nan"))
    empty = torch.empty(0, device=query.device)
    return out.to(query.dtype), empty, empty


def npu_lightning_indexer(query, key, weights, *, actual_seq_lengths_query=None, actual_seq_lengths_key=None,
                          block_table=None, layout_query="BSND", layout_key="BSND", sparse_count=2048, sparse_mode=3,
                          pre_tokens=2**63 - 1, next_tokens=2**63 - 1, return_value=False):
    """Lightning indexer (bf16/fp16): score[b,s,n] = Σ_h w[b,s,h]·ReLU(q[b,s,h]·k[b,n]), top
    ``sparse_count`` of the first ``actual_seq_lengths_key[b]`` keys (sparse_mode 0: no causal
    mask); indices [B,S,1,sparse_count] int32, valid first (descending score), −1 tail."""
    op = "npu_lightning_indexer"
    _need(layout_query == "BSND" and layout_key == "BSND" and block_table is None, op, "only dense BSND emulated")
    _need(query.dtype in (torch.bfloat16, torch.float16) and key.dtype == query.dtype and weights.dtype == query.dtype,
          op, "q, k and weights must share a bf16/fp16 dtype")
    b, s, h, d = query.shape
    _need(d == 128 and h <= 64, op, f"D must be 128 and N1 <= 64, got D={d} N1={h}")
    _need(key.dim() == 4 and key.shape[2] == 1, op, "key must be [B,N,1,128]")
    _need(1 <= sparse_count <= 2048 and sparse_mode in (0, 3), op, "sparse_count 1..2048, sparse_mode 0|3")
    _need(sparse_mode == 0, op, "sparse_mode 3 (causal by token position) not emulated")
    n = key.shape[1]
    sc = torch.einsum("bshd,bnd->bshn", query.float(), key[:, :, 0].float()).relu()
    sc = (sc * weights.float().unsqueeze(-1)).sum(2)  # [B,S,N]
    lens = torch.full((b,), n, device=query.device) if actual_seq_lengths_key is None else actual_seq_lengths_key.long()
    col = torch.arange(n, device=query.device)
    sc = sc.masked_fill(col.view(1, 1, n) >= lens.view(b, 1, 1), float("-inf"))
    kk = min(sparse_count, n)
    vals, idx = torch.sort(sc, dim=-1, descending=True, stable=True)
    vals, idx = vals[..., :kk], idx[..., :kk]
    idx = torch.where(torch.isinf(vals), -1, idx).to(torch.int32)
    if kk < sparse_count:
        idx = torch.cat((idx, idx.new_full((b, s, sparse_count - kk), -1)), -1)
        vals = torch.cat((vals, vals.new_full((b, s, sparse_count - kk), float("-inf"))), -1)
    return idx.unsqueeze(2), (vals.unsqueeze(2).to(query.dtype) if return_value else torch.empty(0, device=query.device))


def npu_moe_init_routing_v2(x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1, expert_num=-1,
                            drop_pad_mode=0, expert_tokens_num_type=0, expert_tokens_num_flag=False, quant_mode=-1,
                            active_expert_range=(), row_idx_type=0, x_dtype=None):
    """Sort the T·K (token, slot) rows by expert (stable): expanded_x[i] = x[sorted_row[i] // K];
    row_idx_type 0 → gather index expanded_row_idx[sorted_row[i]] = i; expert token counts
    (type 1) or cumulative counts (type 0) when expert_tokens_num_flag."""
    op = "npu_moe_init_routing_v2"
    _need(drop_pad_mode == 0 and quant_mode == -1 and scale is None and offset is None, op, "only dropless, unquantised")
    _need(expert_idx.dtype == torch.int32 and expert_idx.dim() == 2, op, "expert_idx [T,K] int32")
    t, k = expert_idx.shape
    _need(expert_num > 0, op, "expert_num required")
    flat = expert_idx.reshape(-1).long()
    _need(bool(((flat >= 0) & (flat < expert_num)).all()), op, "expert ids must be in [0, expert_num)")
    sorted_row = torch.argsort(flat, stable=True)
    expanded_x = x[sorted_row // k]
    pos = torch.empty_like(sorted_row)
    pos[sorted_row] = torch.arange(t * k, device=x.device)
    expanded_row_idx = (pos if row_idx_type == 0 else sorted_row).to(torch.int32)
    counts = torch.bincount(flat, minlength=expert_num).to(torch.int64)
    tokens = counts if expert_tokens_num_type == 1 else counts.cumsum(0)
    return expanded_x, expanded_row_idx, tokens, torch.empty(0, device=x.device)


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       tuning_config=None, output_dtype=None, x_dtype=None, weight_dtype=None, scale_dtype=None,
                       per_token_scale_dtype=None):
    """Grouped GEMM, group_type 0 (split M): x [M,K] rows grouped by group_list (counts when
    group_list_type 1, cumulative when 0), weight [E,K,N]; split_item 2|3 → one [M,N] output."""
    op = "npu_grouped_matmul"
    _need(len(x) == 1 and len(weight) == 1 and group_type == 0 and split_item in (2, 3), op,
          "only single-tensor split-M form emulated")
    _need(all(v is None for v in (bias, scale, offset, antiquant_scale, per_token_scale)), op, "quantised forms not emulated")
    xx, w = x[0], weight[0]
    _need(xx.dtype in (torch.bfloat16, torch.float16) and w.dtype == xx.dtype, op, "bf16/fp16 x and weight")
    _need(w.dim() == 3 and w.shape[1] == xx.shape[1], op, f"weight must be [E,K,N] with K={xx.shape[1]}")
    counts = group_list.long() if group_list_type == 1 else torch.diff(group_list.long(), prepend=group_list.new_zeros(1))
    _need(counts.numel() == w.shape[0] and int(counts.sum()) <= xx.shape[0], op, "group_list does not match")
    out = torch.zeros(xx.shape[0], w.shape[2], dtype=torch.float32, device=xx.device)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            out[start:start + c] = xx[start:start + c].float() @ w[e].float()
        start += c
    return [out.to(output_dtype or xx.dtype)]


def npu_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales, expanded_src_to_dst_row,
                             export_for_source_row, drop_pad_mode=0, k=1):
    """out[i] = skip1 + skip2 + Σ_j scales[i,j]·rows[src_to_dst[i + j·num_rows]] (+ bias); the
    index is slot-major (j·num_rows + i). Accumulates in fp32, returns the rows' dtype."""
    op = "npu_moe_finalize_routing"
    _need(drop_pad_mode == 0 and bias is None, op, "dropless without bias only")
    nk = expanded_src_to_dst_row.numel()
    rows = nk // k
    src = expanded_src_to_dst_row.long().view(k, rows)  # [j, i]
    gathered = expanded_permuted_rows.float()[src]  # [k, rows, H]
    sc = torch.ones(rows, k, device=gathered.device) if scales is None else scales.float()
    out = (gathered * sc.t().unsqueeze(-1)).sum(0)
    for skip in (skip1, skip2):
        if skip is not None:
            out = out + skip.float()
    return out.to(expanded_permuted_rows.dtype)


# ------------------------------------------------------------------------------------------
# vllm-ascend / CANN custom ops (torch.ops._C_ascend, schemas of csrc/torch_binding.cpp)
# ------------------------------------------------------------------------------------------

_META_LEN = 1024


def sharedkv_metadata(num_heads_q, num_heads_kv, head_dim, cu_seqlens_q=None, cu_seqlens_ori_kv=None,
                      cu_seqlens_cmp_kv=None, seqused_q=None, seqused_kv=None, batch_size=0, max_seqlen_q=0,
                      max_seqlen_kv=0, ori_topk=0, cmp_topk=0, cmp_ratio=4, ori_mask_mode=4, cmp_mask_mode=3,
                      ori_win_left=128, ori_win_right=0, layout_q="BSND", layout_kv="PA_ND", has_ori_kv=True,
                      has_cmp_kv=True, device="npu"):
    """int32[1024] tiling metadata (the emulation records the launch shape in it)."""
    m = torch.zeros(_META_LEN, dtype=torch.int32)
    m[:8] = torch.tensor([num_heads_q, num_heads_kv, head_dim, batch_size, max_seqlen_q, cmp_topk, cmp_ratio,
                          int(has_ori_kv) * 2 + int(has_cmp_kv)], dtype=torch.int32)
    return m.to(device)


def sparse_attn_sharedkv(q, *, ori_kv=None, cmp_kv=None, ori_sparse_indices=None, cmp_sparse_indices=None,
                         ori_block_table=None, cmp_block_table=None, cu_seqlens_q=None, cu_seqlens_ori_kv=None,
                         cu_seqlens_cmp_kv=None, seqused_q=None, seqused_kv=None, sinks=None, metadata=None,
                         softmax_scale=0.0, cmp_ratio=0, ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=128,
                         ori_win_right=0, layout_q="BSND", layout_kv="PA_ND", return_softmax_lse=False):
    """Shared-KV sparse attention (A2/A3): BSND q [B,S,64,512]; paged caches [blocks,bs,1,512].
    Window part: the ``ori_win_left+1`` positions ending at the query's position
    ``pos = seqused_kv[b] − S + s`` from ``ori_kv``; compressed part: ``cmp_sparse_indices``
    [B,S,1,512] logical compressed positions (values < 0 invalid), visible iff
    ``j < (pos+1) // cmp_ratio`` (cmp_mask_mode 3). One softmax over both plus ``sinks``."""
    op = "npu_sparse_attn_sharedkv"
    _need(_soc() in ("A2", "A3"), op, "A2/A3 only")
    _need(metadata is not None and metadata.numel() == _META_LEN, op, "metadata is required")
    _need(layout_q == "BSND" and layout_kv == "PA_ND", op, "only BSND q + PA_ND kv emulated")
    _need(q.dtype in (torch.bfloat16, torch.float16), op, f"q dtype {q.dtype}")
    b, s, n1, d = q.shape
    _need(n1 == 64 and d == 512, op, f"N1 must be 64 and D 512, got {n1}, {d}")
    _need(not return_softmax_lse and ori_sparse_indices is None and seqused_q is None, op,
          "return_softmax_lse, ori_sparse_indices, seqused_q unsupported")
    _need(seqused_kv is not None, op, "seqused_kv required for BSND")
    _need(cmp_kv is not None or ori_kv is not None, op, "no KV given")
    meta = metadata.cpu()
    _need(meta[0] == n1 and meta[2] == d and meta[3] == b and meta[4] == s, op, "metadata does not match the call")
    _need(int(meta[7]) == int(ori_kv is not None) * 2 + int(cmp_kv is not None), op, "metadata has_ori/has_cmp mismatch")
    pos = seqused_kv.long().view(b, 1) - s + torch.arange(s, device=q.device).view(1, s)  # [B,S]
    keys, masks = [], []

    def gather_paged(cache, table, logical):  # logical [B,S,K] -> rows [B,S,K,512]
        bs = cache.shape[1]
        _need(bs % 16 == 0 and bs <= 1024, op, f"block size {bs} must be a multiple of 16 up to 1024")
        _need(cache.dtype == q.dtype and cache.shape[2] == 1 and cache.shape[3] == 512, op, "cache [blocks,bs,1,512]")
        lg = logical.clamp(min=0)
        blk = torch.gather(table.long(), 1, (lg // bs).reshape(b, -1)).view_as(lg)
        flat = cache.reshape(-1, 512).float()
        return flat[(blk * bs + lg % bs).reshape(-1)].view(*lg.shape, 512)

    if ori_kv is not None:
        _need(ori_win_left == 127 and ori_win_right == 0 and ori_mask_mode == 4, op, "window 127/0, mask mode 4")
        w = torch.arange(-ori_win_left, 1, device=q.device)
        lpos = pos.unsqueeze(-1) + w.view(1, 1, -1)
        keys.append(gather_paged(ori_kv, ori_block_table, lpos))
        masks.append(lpos >= 0)
    if cmp_kv is not None:
        _need(cmp_ratio in (4, 128) and cmp_mask_mode == 3, op, f"cmp_ratio {cmp_ratio} must be 4|128, mask mode 3")
        _need(cmp_sparse_indices is not None and cmp_sparse_indices.dtype == torch.int32, op, "int32 cmp indices")
        _need(tuple(cmp_sparse_indices.shape) == (b, s, 1, 512), op,
              f"cmp_sparse_indices must be [B,S,1,512], got {list(cmp_sparse_indices.shape)}")
        ci = cmp_sparse_indices[:, :, 0].long()
        keys.append(gather_paged(cmp_kv, cmp_block_table, ci))
        masks.append((ci >= 0) & (ci < ((pos + 1) // cmp_ratio).unsqueeze(-1)))
    kk = torch.cat(keys, 2)
    mask = torch.cat(masks, 2)
    scale = softmax_scale if softmax_scale else d ** -0.5
    sc = torch.einsum("bshd,bskd->bshk", q.float(), kk) * scale
    sc = sc.masked_fill(~mask[:, :, None, :], float("-inf"))
    m = sc.amax(-1, keepdim=True)
    if sinks is not None:
        m = torch.maximum(m, sinks.float().view(1, 1, n1, 1))
    p = torch.exp(sc - m)
    den = p.sum(-1, keepdim=True)
    if sinks is not None:
        den = den + torch.exp(sinks.float().view(1, 1, n1, 1) - m)
    out = torch.einsum("bshk,bskd->bshd", p / den, kk)
    out = torch.where(mask.any(-1)[:, :, None, None], out, float("nan"))
    return out.to(q.dtype), torch.empty(0, device=q.device)


def hc_pre_v2(x, hc_fn, hc_scale, hc_base, hc_mult, hc_sinkhorn_iters, norm_eps, hc_eps):
    """Fused mHC pre: x [T,hc,D] bf16, hc_fn fp32 [(2+hc)·hc, hc·D]; mixes = (flat x @ fnᵀ)·rsqrt(
    mean x² + eps); pre = σ(·)+eps, post = 2σ(·), comb = Sinkhorn(softmax rows + eps; column
    pass then (row, column)×(iters−1)); y = Σ_j pre_j·x_j (bf16)."""
    op = "npu_hc_pre_v2"
    _need(x.dtype == torch.bfloat16 and x.dim() == 3, op, "x must be bf16 [T,hc,D]")
    t, hc, d = x.shape
    _need(hc == 4 == hc_mult and d in (4096, 7168), op, f"hc must be 4 and D in {{4096, 7168}}, got hc={hc} D={d}")
    _need(hc_fn.dtype == torch.float32 and tuple(hc_fn.shape) == (24, 4 * d), op, "hc_fn fp32 [24, 4D]")
    xf = x.float().reshape(t, hc * d)
    mixes = (xf @ hc_fn.t()) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    s, bb = hc_scale.float(), hc_base.float()
    pre = torch.sigmoid(mixes[:, :hc] * s[0] + bb[:hc]) + hc_eps
    post = 2 * torch.sigmoid(mixes[:, hc:2 * hc] * s[1] + bb[hc:2 * hc])
    c = torch.softmax((mixes[:, 2 * hc:] * s[2] + bb[2 * hc:]).view(t, hc, hc), -1) + hc_eps
    c = c / (c.sum(1, keepdim=True) + hc_eps)
    for _ in range(hc_sinkhorn_iters - 1):
        c = c / (c.sum(2, keepdim=True) + hc_eps)
        c = c / (c.sum(1, keepdim=True) + hc_eps)
    y = (pre.unsqueeze(-1) * x.float()).sum(1).to(x.dtype)
    return y, post, c


def hc_post(x, residual, post, comb):
    """out[b,s,k] = post[b,s,k]·x[b,s] + Σ_j comb[b,s,j,k]·residual[b,s,j] (fp32, one rounding)."""
    op = "npu_hc_post"
    _need(x.dim() == 3 and residual.dim() == 4 and residual.shape[2] == 4, op, "x [b,s,d], residual [b,s,4,d]")
    _need(x.dtype == torch.bfloat16 and residual.dtype == x.dtype, op, "bf16 x and residual")
    y = post.float().unsqueeze(-1) * x.float().unsqueeze(-2) + torch.einsum("bsjk,bsjd->bskd", comb.float(), residual.float())
    return y.to(x.dtype)


def moe_gating_top_k_hash(x, k, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                          routed_scaling_factor=1.0, eps=1e-20, group_select_mode=0, renorm=0, norm_type=0,
                          out_flag=False):
    """Gate on logits x [T,E]: norm_type 2 scores sqrt(ln(1+exp(x))) (no overflow threshold);
    hash routing when tid2eid given (ids = tid2eid[input_ids]), else top-k of score+bias;
    weights = score[ids] / (Σ + eps) · routed_scaling_factor, in x's dtype."""
    op = "moe_gating_top_k_hash"
    _need(group_count == 1 and renorm == 0 and k_group == 1, op, "group_count=1, renorm=0 only (tiling)")
    _need(norm_type in (0, 1, 2), op, "norm_type 0|1|2")
    xf = x.float()
    if norm_type == 2:
        score = torch.sqrt(torch.log(1 + torch.exp(xf)))
    elif norm_type == 1:
        score = torch.sigmoid(xf)
    else:
        score = torch.softmax(xf, -1)
    if tid2eid is not None:
        _need(input_ids is not None and input_ids.dtype == torch.int64 and tid2eid.dtype == torch.int32, op,
              "input_ids int64 and tid2eid int32")
        ids = tid2eid[input_ids].long()
    else:
        sel = score if bias is None else score + bias.float()
        # tie order is undocumented; emulated as lower expert index first (bench/npu_check.py's
        # moe_gate/exact_ties case checks it on hardware)
        ids = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :k]
    w = score.gather(1, ids)
    w = w / (w.sum(-1, keepdim=True) + eps) * routed_scaling_factor
    return w.to(x.dtype), ids.to(torch.int32), (score if out_flag else torch.empty(0, device=x.device))


C_ASCEND_SCHEMAS = {
    "npu_sparse_attn_sharedkv(Tensor q, *, Tensor? ori_kv=None, Tensor? cmp_kv=None, Tensor? ori_sparse_indices=None, "
    "Tensor? cmp_sparse_indices=None, Tensor? ori_block_table=None, Tensor? cmp_block_table=None, "
    "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_ori_kv=None, Tensor? cu_seqlens_cmp_kv=None, "
    "Tensor? seqused_q=None, Tensor? seqused_kv=None, Tensor? sinks=None, Tensor? metadata=None, "
    "float softmax_scale=0, int cmp_ratio=0, int ori_mask_mode=4, int cmp_mask_mode=3, int ori_win_left=128, "
    "int ori_win_right=0, str layout_q=\"BSND\", str layout_kv=\"PA_ND\", bool return_softmax_lse=False) "
    "-> (Tensor out, Tensor softmax_lse)": sparse_attn_sharedkv,
    "npu_sparse_attn_sharedkv_metadata(int num_heads_q, int num_heads_kv, int head_dim, Tensor? cu_seqlens_q=None, "
    "Tensor? cu_seqlens_ori_kv=None, Tensor? cu_seqlens_cmp_kv=None, Tensor? seqused_q=None, "
    "Tensor? seqused_kv=None, int batch_size=0, int max_seqlen_q=0, int max_seqlen_kv=0, int ori_topk=0, "
    "int cmp_topk=0, int cmp_ratio=4, int ori_mask_mode=4, int cmp_mask_mode=3, int ori_win_left=128, "
    "int ori_win_right=0, str layout_q=\"BSND\", str layout_kv=\"PA_ND\", bool has_ori_kv=True, "
    "bool has_cmp_kv=True, str device=\"npu\") -> (Tensor metadata)": sharedkv_metadata,
    "npu_hc_pre_v2(Tensor x, Tensor hc_fn, Tensor hc_scale, Tensor hc_base, int hc_mult, int hc_sinkhorn_iters, "
    "float norm_eps, float hc_eps) -> (Tensor out0, Tensor out1, Tensor out2)": hc_pre_v2,
    "npu_hc_post(Tensor x, Tensor residual, Tensor post, Tensor comb) -> (Tensor out)": hc_post,
    "moe_gating_top_k_hash(Tensor x, int k, Tensor? bias=None, Tensor? input_ids=None, Tensor? tid2eid=None, "
    "int k_group=1, int group_count=1, float routed_scaling_factor=1.0, float eps=1e-20, int group_select_mode=0, "
    "int renorm=0, int norm_type=0, bool out_flag=False) -> (Tensor y, Tensor expert_idx, Tensor out)":
        moe_gating_top_k_hash,
}

TORCH_NPU_FUNCTIONS = {
    "npu_rms_norm": npu_rms_norm,
    "npu_interleave_rope": npu_interleave_rope,
    "npu_dynamic_quant": npu_dynamic_quant,
    "npu_quant_matmul": npu_quant_matmul,
    "npu_sparse_flash_attention": npu_sparse_flash_attention,
    "npu_lightning_indexer": npu_lightning_indexer,
    "npu_moe_init_routing_v2": npu_moe_init_routing_v2,
    "npu_grouped_matmul": npu_grouped_matmul,
    "npu_moe_finalize_routing": npu_moe_finalize_routing,
}


def install(soc: str = "A3", *, torch_npu_ops: tuple[str, ...] | None = None, c_ascend: bool = True,
            sfa_sinks: bool = True) -> None:
    """Install the emulated ``torch_npu`` (and, with ``c_ascend``, ``torch.ops._C_ascend``).

    ``torch_npu_ops`` restricts which built-ins exist (an older torch_npu); ``sfa_sinks=False``
    emulates a torch_npu whose ``npu_sparse_flash_attention`` has no ``sinks`` argument."""
    from v4kernels.testing import fake_device

    if soc not in SOC_CODES:
        raise ValueError(f"soc must be one of {sorted(SOC_CODES)}, got {soc!r}")
    _SOC["family"] = soc
    fns = {k: v for k, v in TORCH_NPU_FUNCTIONS.items() if torch_npu_ops is None or k in torch_npu_ops}
    if not sfa_sinks and "npu_sparse_flash_attention" in fns:
        full = fns["npu_sparse_flash_attention"]

        def npu_sparse_flash_attention(query, key, value, sparse_indices, scale_value, *, block_table=None,
                                       actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None,
                                       key_rope=None, sparse_block_size=1, layout_query="BSND", layout_kv="BSND",
                                       sparse_mode=3, pre_tokens=2**63 - 1, next_tokens=2**63 - 1, attention_mode=0,
                                       return_softmax_lse=False):
            return full(query, key, value, sparse_indices, scale_value, block_table=block_table,
                        actual_seq_lengths_query=actual_seq_lengths_query, actual_seq_lengths_kv=actual_seq_lengths_kv,
                        query_rope=query_rope, key_rope=key_rope, sparse_block_size=sparse_block_size,
                        layout_query=layout_query, layout_kv=layout_kv, sparse_mode=sparse_mode,
                        attention_mode=attention_mode, return_softmax_lse=return_softmax_lse)

        fns["npu_sparse_flash_attention"] = npu_sparse_flash_attention
    fake_device.install_fake_module("torch_npu", {**fns, "npu": {"get_soc_version": lambda: SOC_CODES[soc]}},
                                    version="2.13.0+emulated")
    if c_ascend:
        fake_device.define_fake_ops("_C_ascend", C_ASCEND_SCHEMAS)
