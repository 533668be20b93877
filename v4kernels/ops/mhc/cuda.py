"""``cuda`` mHC (SPEC §10): the fused native hc_pre (mixes GEMM + RMS + Sinkhorn + collapse in one
launch, ``csrc/cuda/mhc.cu``), optionally after DeepGEMM's ``tf32_hc_prenorm_gemm`` (the mixes GEMM
fused with the square sum, SM90/SM100), and the native hc_post.

The TF32 GEMM is exact only when ``hc_fn`` has no bits below TF32 precision (bf16 activations
are exact in TF32); that property of the weight is checked once per weight version.
"""
from __future__ import annotations

import torch

from ...backends.cuda import Route, native_reasons, register_routes, vendor

_HC = 4
_TF32_CACHE: dict[tuple, bool] = {}


def _tf32_exact(w: torch.Tensor) -> bool:
    key = (w.data_ptr(), w._version, tuple(w.shape), w.dtype, w.device)
    hit = _TF32_CACHE.get(key)
    if hit is None:
        bits = w.float().contiguous().view(torch.int32)
        hit = bool(((bits & 0x1FFF) == 0).all())  # TF32 keeps 10 of fp32's 23 mantissa bits
        if len(_TF32_CACHE) > 64:
            _TF32_CACHE.clear()
        _TF32_CACHE[key] = hit
    return hit


#: tokens above which the fused kernel (which re-reads hc_fn for every 2 tokens) yields to Triton's
#: tiled GEMM; the DeepGEMM route has no such limit
FUSED_MAX_TOKENS = 512


def _hc_refusals(x) -> list[str]:
    hc = x.shape[-2]
    return [] if hc == _HC else [f"the fused kernel is built for hc_mult = {_HC}, got {hc}"]


def _native_pre_refusals(x, *rest) -> list[str]:
    out = _hc_refusals(x)
    t = x.numel() // max(1, x.shape[-1] * x.shape[-2])
    if t > FUSED_MAX_TOKENS:
        out.append(f"the fused decode kernel takes <= {FUSED_MAX_TOKENS} tokens, got {t} (prefill: DeepGEMM or Triton)")
    return out


def _dg_pre_refusals(x, hc_fn, *rest) -> list[str]:
    out = _hc_refusals(x) + [f"native Sinkhorn/collapse: {r}" for r in native_reasons()]
    if x.dtype != torch.bfloat16:
        out.append(f"tf32_hc_prenorm_gemm takes bf16 activations, got {str(x.dtype).replace('torch.', '')}")
    elif not out and not _tf32_exact(hc_fn):
        out.append("hc_fn has mantissa bits below TF32 precision: the TF32 GEMM would round it")
    return out


def _dg_pre(x, hc_fn, hc_scale, hc_base, sinkhorn_iters, norm_eps, hc_eps):
    dg = vendor("DeepGEMM").module
    hc, d = x.shape[-2], x.shape[-1]
    a = x.reshape(-1, hc * d).contiguous()
    t = a.shape[0]
    fn = hc_fn.float().contiguous()
    mix = torch.empty(t, fn.shape[0], dtype=torch.float32, device=x.device)
    sq = torch.empty(t, dtype=torch.float32, device=x.device)
    if t:
        dg.tf32_hc_prenorm_gemm(a, fn, mix, sq)  # mix = a·fnᵀ, sq = Σ a² per row
    return torch.ops.v4k_cuda.hc_pre_apply(x, mix, sq, hc_fn, hc_scale, hc_base, sinkhorn_iters, norm_eps, hc_eps)


def _native_pre(*args):
    return torch.ops.v4k_impl.hc_pre.default(*args)


def _post_refusals(x, residual, *rest) -> list[str]:
    hc = residual.shape[-2]
    return [] if 1 <= hc <= 8 else [f"native hc_post handles hc_mult 1..8, got {hc}"]


def _native_post(*args):
    return torch.ops.v4k_impl.hc_post.default(*args)


register_routes("hc_pre", [
    Route("DeepGEMM tf32_hc_prenorm_gemm + native Sinkhorn/collapse", "DeepGEMM",
          "bf16 x, hc_mult 4, TF32-exact hc_fn", _dg_pre, _dg_pre_refusals, ((9, -1), (10, -1)), "SM90/SM100"),
    Route("native fused hc_pre", "native", f"hc_mult 4, any float dtype, <= {FUSED_MAX_TOKENS} tokens (decode)",
          _native_pre, _native_pre_refusals),
])
register_routes("hc_post", [
    Route("native hc_post", "native", "hc_mult 1..8, any float dtype", _native_post, _post_refusals),
])
