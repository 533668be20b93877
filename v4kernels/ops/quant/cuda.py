"""``cuda`` block-scaled FP8 GEMM (SPEC §4.6) through DeepGEMM's ``fp8_fp4_gemm_nt``: 1×128
activation scales, 128×128 weight scales, fp32 accumulation promoted per 128-wide K tile (the
reference's arithmetic). SM90 takes fp32 scales; SM100 takes UE8M0, so there the scales must be
powers of two (UE8M0 tensors are; fp32 ones are checked once per tensor version)."""
from __future__ import annotations

import torch

from ...backends.cuda import Route, register_routes, sm_of, vendor

_POW2_CACHE: dict[tuple, bool] = {}


def pow2_scales(s: torch.Tensor) -> bool:
    """All scales are positive powers of two (exact as UE8M0)."""
    if s.dtype == torch.float8_e8m0fnu:
        return True
    key = (s.data_ptr(), s._version, tuple(s.shape), s.dtype, s.device)
    hit = _POW2_CACHE.get(key)
    if hit is None:
        bits = s.float().contiguous().view(torch.int32)
        hit = bool(((bits & 0x807FFFFF) == 0).all() and ((bits >> 23) & 0xFF).gt(0).all())
        if len(_POW2_CACHE) > 256:
            _POW2_CACHE.clear()
        _POW2_CACHE[key] = hit
    return hit


def _refusals(a, a_s, b, b_s, out_dtype) -> list[str]:
    out = []
    if a.shape[1] % 128:
        out.append(f"DeepGEMM needs K % 128 == 0, got K={a.shape[1]}")
    if out_dtype not in (torch.bfloat16, torch.float32):
        out.append(f"DeepGEMM writes bf16 or fp32, got {str(out_dtype).replace('torch.', '')}")
    cc = sm_of(a)
    if not out and cc is not None and cc[0] == 10 and not (pow2_scales(a_s) and pow2_scales(b_s)):
        out.append("SM100 takes UE8M0 scales: fp32 scales that are not powers of two would be rounded")
    return out


def _run(a, a_s, b, b_s, out_dtype):
    dg = vendor("DeepGEMM").module
    fn = getattr(dg, "fp8_fp4_gemm_nt", None) or dg.fp8_gemm_nt
    d = torch.empty(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    if d.numel():
        fn((a, a_s.float().contiguous()), (b, b_s.float().contiguous()), d, recipe=(1, 128, 128))
    return d


register_routes("fp8_gemm", [
    Route("DeepGEMM fp8_fp4_gemm_nt", "DeepGEMM", "K % 128 == 0, bf16/fp32 output, 1x128 / 128x128 scales "
          "(powers of two on SM100)", _run, _refusals, ((9, -1), (10, -1)), "SM90/SM100"),
])
