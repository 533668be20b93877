"""``cambricon``: Cambricon MLUs through torch_mlu and the fused operators of torch_mlu_ops
(adapters in ``ops/<family>/cambricon.py``); first on ``mlu`` tensors, Triton (when the installed
Triton targets MLU) and the reference follow.

Everything this backend needs from torch_mlu_ops is reachable from Python (``torch_mlu_ops.<op>``),
so there is no native binding: the build hook builds ``csrc/cambricon`` with torch_mlu's
``MLUExtension`` only when sources are added there (``V4K_BUILD_MLU=0`` skips, ``=1`` makes a
failure fatal).

The data below is what ``python -m v4kernels info --device mlu -v`` shows: ``NO_VENDOR_OP`` says
why an op has no adapter (it falls back to Triton-MLU or the reference), ``LIMITS`` what each
adapter refuses (argument-dependent; the adapters' ``refusals`` read the same table).
"""
from __future__ import annotations

import functools
import glob
import importlib
import importlib.util
import os
from typing import Any

from ._base import ACCELERATOR_TOLERANCES, Backend, BuildContext, launch_row
from .cuda import CUDA_TRITON_BLOCKS

#: Launch row for Cambricon's Triton (``triton.backends.mlu``). An MLU core has a few hundred KiB
#: of NRAM and no shared-memory/warp hierarchy; programs beyond the core count (clusters x cores
#: per cluster) run in further rounds, each with a launch cost. So: large tiles that fit NRAM,
#: few programs, and split-K/split-N kept low (docs/cambricon.md, "Triton on MLU").
MLU_TRITON_BLOCKS = launch_row(
    CUDA_TRITON_BLOCKS,
    rows={"BLOCK_R": 16},
    attn={"BLOCK_K": 64, "SPLIT_MIN": 1024},
    indexer={"BLOCK_N": 128},
    compressor={"BLOCK_K": 128, "BLOCK_S": 16, "BLOCK_T": 8, "BLOCK_W": 512, "POOL_TILE": 8192},
    indices={"BLOCK_S": 32},
)

#: ops without a torch_mlu_ops equivalent an adapter could call, and why (shown by ``info``)
NO_VENDOR_OP: dict[str, str] = {
    "act_quant": "torch_mlu_ops.scaled_quantize is per token (amax/448 over a whole row): on 1 x block rows it "
                 "would lack V4's amax floor (1e-4) and power-of-two scales; Triton/reference run it",
    "act_quant_roundtrip": "torch_mlu_ops has no quantise-dequantise round trip; Triton/reference run it",
    "act_dequant": "torch_mlu_ops has no 1x128-block FP8 dequantiser; Triton/reference run it",
    "fp4_act_quant": "torch_mlu_ops has no e2m1 (FP4) activation format; Triton/reference run it",
    "fp4_act_roundtrip": "torch_mlu_ops has no e2m1 (FP4) activation format; Triton/reference run it",
    "fp4_act_dequant": "torch_mlu_ops has no e2m1 (FP4) activation format; Triton/reference run it",
    "fp4_gemm": "torch_mlu_ops scaled_matmul takes int8/fp8/int4 weights, not e2m1 with UE8M0 1x32 scales",
    "fp8_gemm": "torch_mlu_ops scaled_matmul scales are per token x per channel (or group-wise in the "
                "activation dtype), not V4's 1x128 activation x 128x128 weight blocks",
    "hadamard_transform": "torch_mlu_ops fuses the Hadamard only into its indexer/compressor ops; no standalone op",
    "pack_kv_fp8": "torch_mlu_ops KV caches are bf16, per-token int8/fp8 or MX; V4's 584-byte rows have no MLU op",
    "unpack_kv_fp8": "torch_mlu_ops KV caches are bf16, per-token int8/fp8 or MX; V4's 584-byte rows have no MLU op",
    "grouped_linear": "Cambricon's V4 deployment uses torch.einsum here (no fused op); Triton/reference run it",
    "indexer_scores": "torch_mlu_ops fuses scoring with top-k (masked_indexer_select_paged_kv) and never "
                      "returns the logits",
    "indexer_query": "torch_mlu_ops.fused_indexer_q takes the q-LoRA input and weights (projection fused); "
                     "this op starts after the projection",
    "window_indices": "torch_mlu_ops.get_window_block_tables emits compact slot tables + lengths, not V4 index "
                      "rows with -1; the adapters build their own tables, Triton/reference run this op",
    "compressed_indices": "torch_mlu_ops.get_compress_block_tables emits compact slot tables + lengths, not V4 "
                          "index rows with -1; Triton/reference run this op",
    "hc_head": "no torch_mlu_ops op (Cambricon's deployment runs it in plain torch); Triton/reference run it",
}

#: what each adapter refuses, as data (the adapters build their ``refusals`` from these entries)
LIMITS: dict[str, dict[str, Any]] = {
    "sparse_attn": {
        "vendor_op": "torch_mlu_ops.single_query_cached_kv_attn(learnable_sink=)",
        "dtypes": ("bfloat16", "float16", "float32"),
        "head_dim": 512,
        # query heads per call for one query token and one KV head (bf16 caches; larger H is split)
        "heads_per_call": 256,
        "note": "packed FP8 rows (uint8 [B,N,584]) are dequantised to q.dtype first (only the referenced rows "
                "when cheaper); -1 entries are compacted away (context_lens); all-skipped rows are zeroed",
    },
    "indexer_topk": {
        "vendor_op": "torch_mlu_ops.masked_indexer_select_paged_kv(is_prefill=False, compress_ratio=)",
        "dtypes": ("bfloat16", "float16", "float32"),
        "note": "FP8/FP4 keys are dequantised to q.dtype (bf16 rounding of non-power-of-two scales can reorder "
                "near ties); the keys are one page per sequence (kv_cache_block_size = N: a hardware cap on the "
                "block size would need page tables); the compact table + lengths is padded with -1",
    },
    "hc_split_sinkhorn": {"vendor_op": "torch_mlu_ops.hc_split_sinkhorn"},
    "hc_pre": {"vendor_op": "F.linear + torch_mlu_ops.hc_split_sinkhorn(pre_scale=rsqrt)"},
    "hc_post": {"vendor_op": "torch_mlu_ops.fused_mhc_post", "hc_mult": (4,), "dim": (4096,),
                "dtypes": ("bfloat16", "float32"), "bf16_mix": False},
    "moe_gate": {"vendor_op": "torch_mlu_ops.moe_softplus_topk", "hf_eps": False},
    "moe_experts": {
        "vendor_op": "moe_gen_idx -> moe_expand_input -> group_gemm -> moe_active(swiglu_limit) -> group_gemm "
                     "-> moe_combine_result",
        "weights": "float (bf16/fp16/fp32) only",
        "swiglu_limit": "integral (moe_active takes an int limit)",
        "note": "FP8 128x128-block and FP4 expert weights need re-quantisation at load time (group_gemm takes "
                "float or per-channel smooth-quant weights); refused",
    },
    "apply_rope": {"vendor_op": "torch_mlu_ops.apply_rotary(interleaved=True, discrete=True, is_inverse=)",
                   "dtypes": ("bfloat16", "float16", "float32")},
    "rms_norm": {"vendor_op": "torch_mlu_ops.fused_rms_norm", "dtypes": ("bfloat16", "float16", "float32"),
                 "hf_rounding": False},
    "compress_kv": {
        "vendor_op": "torch_mlu_ops.fused_compress_multi_kv (window pooling; projections, norm, RoPE and "
                     "quantisation simulation stay in v4kernels ops)",
    },
}


class CambriconBackend(Backend):
    name = "cambricon"
    description = "Cambricon MLU: adapters over torch_mlu_ops fused ops (torch_mlu, Neuware)"
    auto_priority = {"mlu": 10}
    tolerances = ACCELERATOR_TOLERANCES
    verification = "bridging verified against emulated vendor ops; hardware unverified"
    follows_nan_policy = False  # vendor ops leave NaN/inf behaviour unspecified
    triton_blocks = {"mlu": MLU_TRITON_BLOCKS}

    #: the module adapters call; tests substitute an emulation (``tests/vendor/cambricon_ops.py``)
    vendor_module = "torch_mlu_ops"

    # -- availability -------------------------------------------------------------------------
    def backend_reasons(self, device_type: str) -> list[str]:
        from .. import _platform

        p = _platform.mlu_probe()
        if not p.ok:
            return [p.detail]
        try:
            self.tmo()
        except Exception as e:  # noqa: BLE001 - any import failure is a reason
            return [f"torch_mlu_ops not usable: {type(e).__name__}: {e}"]
        return []

    def op_reasons(self, op: str, device_type: str, forced: bool = False) -> list[str]:
        reasons = self.device_reasons(device_type, forced)
        if reasons:
            return reasons
        if op in NO_VENDOR_OP:
            return [f"no cambricon kernel for {op}: no torch_mlu_ops equivalent ({NO_VENDOR_OP[op]})"]
        return super().op_reasons(op, device_type, forced)

    def limits(self, op: str) -> list[str]:
        """The declared limits of this backend's adapter for ``op`` (empty if it has none)."""
        lim = LIMITS.get(op)
        if lim is None:
            return []
        return [f"{k}: {v}" for k, v in lim.items()]

    # -- the vendor module --------------------------------------------------------------------
    @functools.cache  # noqa: B019 - one instance per process
    def tmo(self) -> Any:
        """``torch_mlu_ops`` (imported on first use; never at ``import v4kernels``)."""
        if importlib.util.find_spec(self.vendor_module) is None:
            raise ImportError(f"python package '{self.vendor_module}' is not installed (it ships with Cambricon's "
                              f"Neuware SDK, not PyPI)")
        return importlib.import_module(self.vendor_module)

    # -- build ----------------------------------------------------------------------------------
    def build_extensions(self, ctx: BuildContext):
        if ctx.flag("V4K_BUILD_MLU") == "0":
            ctx.record(self.name, "skipped: V4K_BUILD_MLU=0")
            return [], {}
        src = os.path.join(ctx.root, "csrc", "cambricon")
        sources = sorted(os.path.relpath(p, ctx.root)
                         for pat in ("*.mlu", "*.cpp") for p in glob.glob(os.path.join(src, pat)))
        if not sources:
            ctx.record(self.name, "nothing to build: every torch_mlu_ops operator used is called from Python "
                                  "(csrc/cambricon/README.md)")
            return [], {}
        try:
            import torch_mlu  # noqa: F401
            from torch_mlu.utils.cpp_extension import BuildExtension, MLUExtension
        except Exception as e:  # noqa: BLE001
            if ctx.flag("V4K_BUILD_MLU") == "1":
                raise
            ctx.record(self.name, f"skipped: torch_mlu (Neuware) not importable at build time "
                                  f"({type(e).__name__}: {e})")
            return [], {}
        arch = ctx.flag("V4K_MLU_ARCH")  # e.g. mtp_592; default: cncc's own
        ext = MLUExtension(
            name="v4kernels._C_mlu",
            sources=sources,
            extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                "cncc": ["-O3", *([f"--bang-mlu-arch={arch}"] if arch else [])]},
        )
        ctx.record(self.name, "pending")
        return [ext], {"build_ext": BuildExtension}


BACKEND = CambriconBackend()
