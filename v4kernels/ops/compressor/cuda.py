"""``cuda`` KV compressor (SPEC §6): the native pooling epilogue (``csrc/cuda/compressor.cu``:
channel-wise softmax pooling fused with RMSNorm, RoPE at ``j·ratio`` and the FP8 / FP4
simulation) and state update, after the token projections.

The projection runs on Triton's tensor-core kernel when Triton is usable, else on the native fp32
GEMM. One process always takes the same route for every call size (the choice depends only on
whether Triton is installed), so a sequence's entries do not depend on how it is chunked: both
projections compute each output element with an order independent of the number of rows.
"""
from __future__ import annotations

import torch

from ... import _platform
from ...backends.cuda import Route, register_routes


def _refusals(x, wkv, wgate, ape, norm_weight, freqs, *rest) -> list[str]:
    hd = norm_weight.shape[0]
    out = [] if hd <= 2048 else [f"native pooling keeps one entry in shared memory: head_dim <= 2048, got {hd}"]
    if rest[-1] and x.dtype != torch.float32:  # hf_rounding: transformers' bf16 pooling
        out.append(f"hf_rounding (transformers' pooling in the activation dtype) is native for float32 x only, got {x.dtype}")
    return out


def _triton_refusals(x, *rest) -> list[str]:
    p = _platform.triton_probe()
    return ([] if p.ok else [p.detail]) + _refusals(x, *rest)


def _no_triton_refusals(x, *rest) -> list[str]:
    if _platform.triton_probe().ok:
        return ["Triton is installed: its tensor-core projection route is used for every call"]
    return _refusals(x, *rest)


def _triton_proj(x, wkv, wgate, ape, norm_weight, freqs, pending_kv, pending_score, prev_kv, prev_score, n_tokens,
                 ratio, quant, eps, hf_rounding):
    from ... import triton_utils as U
    from .triton import _proj_kernel

    bsz, s, d = x.shape
    width = wkv.shape[0]
    cfg = U.block_config("compressor", x.device)
    m_rows = bsz * s
    kv_new = torch.empty(m_rows, width, dtype=torch.float32, device=x.device)
    sc_new = torch.empty(m_rows, width, dtype=torch.float32, device=x.device)
    # fixed tile sizes (not derived from the row count): the same arithmetic for every chunk size
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (U.cdiv(m_rows, bm), U.cdiv(width, bn))
    xc = x.contiguous()
    for w_, out, gate in ((wkv.contiguous(), kv_new, False), (wgate.contiguous(), sc_new, True)):
        _proj_kernel[grid](xc, w_, ape.contiguous(), n_tokens, out, m_rows, s, d, width, ratio, BLOCK_M=bm, BLOCK_N=bn,
                           BLOCK_K=bk, IS_GATE=gate,
                           DOT_BF16=U.dot_bf16(x.device) and x.dtype == w_.dtype == torch.bfloat16)
    return torch.ops.v4k_cuda.compress_from_proj(x, kv_new, sc_new, norm_weight, freqs, pending_kv, pending_score,
                                                 prev_kv, prev_score, n_tokens, ratio, quant, eps)


def _native(*args):
    return torch.ops.v4k_impl.compress_kv.default(*args)


register_routes("compress_kv", [
    Route("Triton projection + native pooling epilogue", "native", "head_dim <= 2048, any ratio, quant none/fp8/fp4",
          _triton_proj, _triton_refusals),
    Route("native compressor (fp32 projection)", "native", "without Triton; head_dim <= 2048", _native,
          _no_triton_refusals),
])
