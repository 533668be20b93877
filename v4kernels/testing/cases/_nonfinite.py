"""NaN / ±inf variants of parity cases (docs/numerics.md).

:func:`register_nonfinite` derives, from an existing case, one case per (tensor argument, value)
in which a single element of that argument is replaced by NaN, +inf or −inf. The comparison is
the usual one, which requires NaN and inf at identical positions (``compare.compare_tensors``),
so a backend whose non-finite behaviour drifts from the reference fails. Integer and packed
arguments are not poisoned (they have no NaN); FP8 e4m3 tensors get NaN only (no inf in e4m3).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch

from . import _CASES, ParityCase, register

VALUES = {"nan": math.nan, "inf": math.inf, "ninf": -math.inf}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def poison(t: torch.Tensor, value: float, at: Sequence[int] | None = None) -> torch.Tensor:
    """A copy of ``t`` with one element (``at``, default the first) set to ``value``."""
    out = t.clone()
    flat = out.view(-1) if out.is_contiguous() else out.reshape(-1)
    i = 0 if at is None else int(torch.tensor(at).dot(torch.tensor(out.stride())).item())
    if t.dtype == torch.float8_e4m3fn:
        flat.view(torch.uint8)[i] = 0x7F  # e4m3 NaN (no inf in this format)
    else:
        flat[i] = value
    return out if out.is_contiguous() else flat.view(out.shape)


def register_nonfinite(
    base: str,
    args: Sequence[str],
    values: Sequence[str] = ("nan", "inf"),
    *,
    at: dict[str, Sequence[int]] | None = None,
    getter: dict[str, Callable[[dict[str, Any]], torch.Tensor]] | None = None,
    setter: dict[str, Callable[[dict[str, Any], torch.Tensor], None]] | None = None,
) -> list[ParityCase]:
    """Register the non-finite variants of case ``base`` for each name in ``args``.

    ``at[name]`` picks the poisoned element (default: the first). ``getter``/``setter`` reach a
    tensor that is not a plain keyword input (e.g. a field of a state object).
    """
    case = _CASES[base]
    sample = case.make(torch.Generator().manual_seed(case.seed), torch.device("cpu"))
    out = []
    for name in args:
        t0 = (getter or {}).get(name, lambda d: d[name])(sample)
        for v in values:
            if t0.dtype == torch.float8_e4m3fn and v != "nan":
                continue  # e4m3 has no infinities
            def make(gen: torch.Generator, device: torch.device, _name=name, _v=v, _make=case.make) -> dict[str, Any]:
                inputs = _make(gen, device)
                get = (getter or {}).get(_name, lambda d: d[_name])
                t = get(inputs)
                new = poison(t, VALUES[_v], (at or {}).get(_name))
                if setter and _name in setter:
                    setter[_name](inputs, new)
                else:
                    inputs[_name] = new
                return inputs

            out.append(register(dataclasses.replace(
                case, name=f"{case.name}/nonfinite_{name}_{v}", make=make, path="nonfinite",
                tags=frozenset({*case.tags, "nonfinite"}), naive=None, large=False,
            )))
    return out


def float_args(inputs: dict[str, Any], with_fp8: bool = True) -> list[str]:
    dts = _FLOATS + ((torch.float8_e4m3fn,) if with_fp8 else ())
    return [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dtype in dts and v.numel()]


#: Non-finite cases a backend is known to get wrong (docs/numerics.md, "Known divergences").
#: tests/test_parity.py marks them strict xfail: fixing a backend turns the entry into an XPASS
#: failure, and the entry must then be removed.
KNOWN_DRIFT: dict[str, frozenset[str]] = {
    # Triton, measured under the CPU interpreter (TRITON_INTERPRET=1): its reductions and float8
    # conversions treat NaN differently from PyTorch and from compiled Triton on a GPU
    "triton": frozenset({
        "act_dequant/3x448_b64/nonfinite_y_nan",
        "act_quant/1x128_b128/nonfinite_x_inf",
        "act_quant/1x128_b128/nonfinite_x_nan",
        "act_quant/1x128_b128/nonfinite_x_ninf",
        "act_quant_roundtrip/1x128_b128/nonfinite_x_inf",
        "act_quant_roundtrip/1x128_b128/nonfinite_x_nan",
        "act_quant_roundtrip/1x128_b128/nonfinite_x_ninf",
        "compress_kv/csa_small_prefill_s129/nonfinite_ape_inf",
        "compress_kv/csa_small_prefill_s129/nonfinite_ape_nan",
        "compress_kv/csa_small_prefill_s129/nonfinite_norm_weight_inf",
        "compress_kv/csa_small_prefill_s129/nonfinite_norm_weight_nan",
        "compress_kv/csa_small_prefill_s129/nonfinite_norm_weight_ninf",
        "compress_kv/csa_small_prefill_s129/nonfinite_wgate_inf",
        "compress_kv/csa_small_prefill_s129/nonfinite_wgate_nan",
        "compress_kv/csa_small_prefill_s129/nonfinite_wgate_ninf",
        "compress_kv/csa_small_prefill_s129/nonfinite_wkv_inf",
        "compress_kv/csa_small_prefill_s129/nonfinite_wkv_nan",
        "compress_kv/csa_small_prefill_s129/nonfinite_wkv_ninf",
        "compress_kv/csa_small_prefill_s129/nonfinite_x_inf",
        "compress_kv/csa_small_prefill_s129/nonfinite_x_nan",
        "compress_kv/csa_small_prefill_s129/nonfinite_x_ninf",
        "compress_kv/hca_small_prefill_s130/nonfinite_ape_inf",
        "compress_kv/hca_small_prefill_s130/nonfinite_ape_nan",
        "compress_kv/hca_small_prefill_s130/nonfinite_wgate_inf",
        "compress_kv/hca_small_prefill_s130/nonfinite_wgate_nan",
        "compress_kv/hca_small_prefill_s130/nonfinite_wgate_ninf",
        "compress_kv/hca_small_prefill_s130/nonfinite_wkv_inf",
        "compress_kv/hca_small_prefill_s130/nonfinite_wkv_nan",
        "compress_kv/hca_small_prefill_s130/nonfinite_wkv_ninf",
        "compress_kv/hca_small_prefill_s130/nonfinite_x_inf",
        "compress_kv/hca_small_prefill_s130/nonfinite_x_nan",
        "compress_kv/hca_small_prefill_s130/nonfinite_x_ninf",
        "fp4_act_quant/1x32/nonfinite_x_inf",
        "fp4_act_quant/1x32/nonfinite_x_nan",
        "fp4_act_quant/1x32/nonfinite_x_ninf",
        "fp4_act_roundtrip/1x32/nonfinite_x_inf",
        "fp4_act_roundtrip/1x32/nonfinite_x_nan",
        "fp4_act_roundtrip/1x32/nonfinite_x_ninf",
        "fp4_gemm/m1_n200_k256/nonfinite_a_nan",
        "fp8_gemm/m1_n200_k256/nonfinite_a_nan",
        "fp8_gemm/m1_n200_k256/nonfinite_b_nan",
        "indexer_topk/chunk_h16_s32_topk100_fp8/nonfinite_key_scales_inf",
        "indexer_topk/chunk_h16_s32_topk100_fp8/nonfinite_key_scales_nan",
        "indexer_topk/chunk_h16_s32_topk100_fp8/nonfinite_key_scales_ninf",
        "indexer_topk/chunk_h16_s32_topk100_fp8/nonfinite_keys_nan",
        "moe_experts/fp8_e8_k6_t12/nonfinite_w1_nan",
        "moe_experts/fp8_e8_k6_t12/nonfinite_w1_scale_inf",
        "moe_experts/fp8_e8_k6_t12/nonfinite_w1_scale_nan",
        "moe_experts/fp8_e8_k6_t12/nonfinite_w1_scale_ninf",
        "pack_kv_fp8/small_fp32/nonfinite_kv_inf",
        "pack_kv_fp8/small_fp32/nonfinite_kv_nan",
        "pack_kv_fp8/small_fp32/nonfinite_kv_ninf",
        "sparse_attn/flash_csa_decode_b2_h64_k640/nonfinite_q_nan",
        "sparse_attn/prefill_m12_h4_small/nonfinite_kv_inf",
        "sparse_attn/prefill_m12_h4_small/nonfinite_kv_nan",
        "sparse_attn/prefill_m12_h4_small/nonfinite_kv_ninf",
        "sparse_attn/prefill_m12_h4_small/nonfinite_q_nan",
        "sparse_attn/prefill_m12_h4_small_fp8kv/nonfinite_q_nan",
    }),
}
