"""``ascend``: Huawei Ascend NPUs through the vendor's fused operators, first on ``npu`` tensors;
Triton-Ascend and the reference follow.

Kernels are adapters in ``ops/<family>/ascend.py``: each calls a vendor op (a ``torch_npu``
built-in, ``torch.ops.npu.*``; or a CANN custom op registered by vllm-ascend / the CANN
custom-op package, ``torch.ops._C_ascend.*``; or a ``v4k_impl`` op of the native binding in
``csrc/ascend``) and bridges the semantic differences. Each adapter declares, as data
(:class:`VendorOp`), which vendor op it calls, on which chips (SoC families ``A2`` = 910B,
``A3`` = 910_93, ``950``) and under which per-call limits, so ``python -m v4kernels info
--device npu -v`` and dispatch errors say exactly why a call goes to Triton or the reference.

Probing is lazy and never raises: ``torch_npu`` missing, CANN missing, a custom-op library not
loaded, an older ``torch_npu`` without a keyword (``sinks=``) — each is a reason.

Build hook: ``csrc/ascend`` (a ``v4k_impl`` binding over aclnn entry points that torch_npu does
not expose in Python) is built when ``torch_npu`` is importable at build time and
``ASCEND_TOOLKIT_HOME``/``ASCEND_HOME_PATH`` points at a CANN toolkit; ``V4K_BUILD_ASCEND=0``
skips it, ``=1`` makes a failure fatal.
"""
from __future__ import annotations

import functools
import glob
import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ._base import ACCELERATOR_TOLERANCES, Backend, BuildContext, launch_row
from .cuda import CUDA_TRITON_BLOCKS

#: Launch row for Triton-Ascend: the GPU row with larger tiles (see docs/triton_portability.md). An Ascend AI core runs one
#: program at a time and a launch grid is best kept near the core count (24-40 vector cores on
#: 910B/910_93); every tile of a program must fit the core's unified buffer (192 KiB on
#: A2/A3, of which the compiler uses about half for double buffering), so tiles here are chosen
#: so that each kernel's working set stays under UB_BUDGET_BYTES.
NPU_TRITON_BLOCKS = launch_row(
    CUDA_TRITON_BLOCKS,
    rows={"BLOCK_R": 16},
    attn={"BLOCK_K": 64, "SPLIT_MIN": 512},
    indexer={"BLOCK_N": 128},
    compressor={"BLOCK_K": 128, "BLOCK_S": 16, "BLOCK_T": 8, "BLOCK_W": 512, "POOL_TILE": 8192},
    indices={"BLOCK_S": 32},
)

#: Triton-Ascend constraints the launch row and the kernels are checked against.
NPU_TRITON_LIMITS = {
    "max_grid": 65535,            # programs per launch (grid product)
    "ub_bytes": 192 * 1024,       # unified buffer per AI core (A2/A3)
    "ub_budget_bytes": 96 * 1024,  # what one program's live tiles may use (double buffering)
    "dot_dtypes": ("float16", "bfloat16", "int8", "float32"),  # operand dtypes tl.dot lowers to the cube unit
    "dot_min_block": 16,          # tl.dot tiles: every dim a multiple of 16
}

SOC_FAMILIES = ("A2", "A3", "950")

#: Ops with no Ascend fused equivalent: why the ascend backend has no kernel for them.
NO_VENDOR_OP = {
    "hadamard_transform": "CANN has no Hadamard op (deployments use a dense F.linear); Triton-Ascend or the reference runs it",
    "pack_kv_fp8": "no Ascend op writes the 584-byte V4 FP8 KV row (950's kv_compress_epilog writes a 640-byte rope-first row; A2/A3 keep bf16 KV)",
    "unpack_kv_fp8": "no Ascend op reads the 584-byte V4 FP8 KV row",
    "indexer_scores": "the Ascend lightning indexers fuse scoring with top-k and return no score matrix",
    "window_indices": "the Ascend sparse attention builds its window from block tables internally; no index-list op",
    "compressed_indices": "the Ascend sparse attention builds its compressed list internally; no index-list op",
    "hc_split_sinkhorn": "only 950 has npu_mhc_sinkhorn, and it returns comb only (no pre/post split); A2/A3 fuse it into npu_hc_pre_v2",
    "hc_head": "no Ascend op for the mHC head (deployments compute it in torch)",
    "act_quant": "npu_dynamic_quant quantises per row (usable per 1x128 block as a row) but computes the scale as "
                 "amax/448 by division and has no power-of-two scale: its FP8 codes differ from V4's quantiser "
                 "(amax * fp32(1/448), amax clamped at 1e-4) in a fraction of entries, and act_quant is bit-exact; "
                 "FP8 output exists on 950 only",
    "act_quant_roundtrip": "no fused quantise-dequantise op; act_quant + act_dequant run where they can",
    "act_dequant": "a block-scaled elementwise multiply; no fused op",
    "fp4_act_quant": "npu_dynamic_mx_quant's FP4 (e2m1) output is undocumented; not used",
    "fp4_act_roundtrip": "no fused FP4 quantise-dequantise op",
    "fp4_act_dequant": "no fused FP4 dequantise op",
    "fp4_gemm": "950's MXFP4 GEMM takes e8m0 block-32 activation scales and FP8 activations, not this op's fp32-scaled FP8 x FP4 contract",
    "compress_kv": "_C_ascend.compressor keeps its state in a paged fp32 cache (state_block_table, cache_mode) whose "
                   "layout has no published contract, so this op's state tensors cannot be bridged to it exactly; "
                   "not bridged (A3/950 only in any case)",
    "grouped_linear": "npu_transpose_batchmatmul needs the group axis first; no gain over torch.bmm on NPU",
}


@dataclass(frozen=True)
class VendorOp:
    """One vendor operator an adapter may call.

    name      ``"torch_npu.<fn>"`` (a torch_npu built-in, schema ``torch.ops.npu.<fn>``),
              ``"_C_ascend.<fn>"`` (CANN custom op registered by vllm-ascend / the CANN
              custom-op package) or ``"v4k_impl.<op>"`` (this package's csrc/ascend binding)
    socs      SoC families the op exists on
    needs_args  schema argument names the installed op must have (e.g. ``("sinks",)``)
    note      one line for docs/ascend.md and ``info``
    """

    name: str
    socs: tuple[str, ...] = SOC_FAMILIES
    needs_args: tuple[str, ...] = ()
    note: str = ""


@dataclass
class _OpDecl:
    routes: tuple[VendorOp, ...]
    limits: dict[str, Any] = field(default_factory=dict)


#: providers of ``torch.ops._C_ascend``: modules whose import registers the custom ops
C_ASCEND_PROVIDERS = ("vllm_ascend.vllm_ascend_C",)


def soc_family_from(name: str | None, code: int | None) -> str | None:
    """Map a device name (``torch.npu.get_device_name``) or SoC code
    (``torch_npu.npu.get_soc_version``) to ``A2``/``A3``/``950`` (None if unknown)."""
    if name:
        n = name.replace(" ", "").lower()
        if "950" in n:
            return "950"
        if "910_93" in n or "910c" in n:
            return "A3"
        if "910b" in n:
            return "A2"
    if code is not None:
        if 220 <= code <= 225:
            return "A2"
        if 250 <= code <= 255:
            return "A3"
        if code >= 260:
            return "950"
    return None


class AscendBackend(Backend):
    name = "ascend"
    description = "Huawei Ascend: torch_npu / CANN fused ops (adapters) and the csrc/ascend aclnn binding"
    auto_priority = {"npu": 10}
    tolerances = ACCELERATOR_TOLERANCES
    verification = "bridging verified against emulated vendor ops; hardware unverified"
    follows_nan_policy = False  # vendor ops leave NaN/inf behaviour unspecified
    extension = "_C_ascend_v4k"
    triton_blocks = {"npu": NPU_TRITON_BLOCKS}

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, _OpDecl] = {}
        self._resolved: dict[str, tuple[Any, str]] = {}
        self._providers_tried: str | None = None

    # -- declarations (called by the adapters) -----------------------------------------------
    def declare(self, op: str, *routes: VendorOp, **limits: Any) -> None:
        """Record the vendor ops an adapter for ``op`` calls (in preference order) and its
        per-call limits (shown by ``info`` and docs)."""
        self.ops[op] = _OpDecl(tuple(routes), dict(limits))

    # -- probing -------------------------------------------------------------------------------
    def backend_reasons(self, device_type: str) -> list[str]:
        from .. import _platform

        p = _platform.npu_probe()
        return [] if p.ok else [p.detail]

    @functools.cached_property
    def soc(self) -> tuple[str | None, str]:
        """``(family, detail)`` of device 0: family is ``A2``/``A3``/``950`` or None."""
        try:
            import torch
            import torch_npu  # noqa: F401

            name = None
            code = None
            try:
                name = torch.npu.get_device_name(0)  # type: ignore[attr-defined]
            except (RuntimeError, AttributeError, AssertionError):
                pass
            try:
                code = int(torch_npu.npu.get_soc_version())  # type: ignore[attr-defined]
            except (RuntimeError, AttributeError, TypeError, ValueError):
                pass
        except (ImportError, RuntimeError, OSError) as e:
            return None, f"SoC unknown ({type(e).__name__}: {e})"
        fam = soc_family_from(name, code)
        forced = os.environ.get("V4K_ASCEND_SOC")
        if forced:
            if forced not in SOC_FAMILIES:
                return None, f"V4K_ASCEND_SOC={forced!r} is not one of {SOC_FAMILIES}"
            return forced, f"{forced} (V4K_ASCEND_SOC; device reports {name!r}, code {code})"
        return fam, f"{fam or 'unknown SoC'} (device {name!r}, soc code {code})"

    def _load_providers(self) -> str:
        if self._providers_tried is None:
            import torch

            notes = []
            for mod in C_ASCEND_PROVIDERS:
                try:
                    importlib.import_module(mod)
                    notes.append(f"{mod} loaded")
                except (ImportError, RuntimeError, OSError) as e:
                    notes.append(f"{mod}: {type(e).__name__}: {e}")
            lib = os.environ.get("V4K_ASCEND_CUSTOM_OPS")
            if lib:
                try:
                    torch.ops.load_library(lib)
                    notes.append(f"{lib} loaded")
                except (OSError, RuntimeError) as e:
                    notes.append(f"V4K_ASCEND_CUSTOM_OPS={lib}: {e}")
            self._providers_tried = "; ".join(notes)
        return self._providers_tried

    def resolve(self, name: str) -> tuple[Any, str]:
        """``(callable, "")`` for a vendor op name, or ``(None, reason)``; cached."""
        hit = self._resolved.get(name)
        if hit is not None:
            return hit
        import torch

        ns, _, fn = name.partition(".")
        out: tuple[Any, str]
        if ns == "torch_npu":
            try:
                import torch_npu

                f = getattr(torch_npu, fn, None)
                out = (f, "") if f is not None else (None, f"torch_npu {getattr(torch_npu, '__version__', '?')} has no {fn}")
            except (ImportError, RuntimeError, OSError) as e:
                out = (None, f"torch_npu not importable: {e}")
        elif ns in ("_C_ascend", "v4k_impl"):
            if ns == "v4k_impl":
                from .._ext import load_extension

                e = load_extension(self.extension, self.name)
                ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"v4k_impl::{fn}", "PrivateUse1")
                out = (getattr(torch.ops.v4k_impl, fn), "") if ok else (
                    None, f"v4k_impl::{fn} has no PrivateUse1 kernel (csrc/ascend binding: {e.detail})")
            else:
                f = self._c_ascend(fn)
                if f is None:
                    detail = self._load_providers()
                    f = self._c_ascend(fn)
                    out = (f, "") if f is not None else (
                        None, f"torch.ops._C_ascend.{fn} is not registered (vllm-ascend custom ops / CANN custom-op "
                              f"package not loaded: {detail})")
                else:
                    out = (f, "")
        else:
            out = (None, f"unknown vendor op namespace in {name!r}")
        self._resolved[name] = out
        return out

    @staticmethod
    def _c_ascend(fn: str) -> Any:
        import torch

        try:
            return getattr(getattr(torch.ops, "_C_ascend"), fn)
        except (AttributeError, RuntimeError):
            return None

    @staticmethod
    def schema_args(f: Any) -> set[str] | None:
        """Argument names of a vendor op: from its dispatcher schema (``torch.ops.npu.<fn>``,
        ``torch.ops._C_ascend.<fn>``) or its Python signature; None when neither is readable."""
        import inspect

        import torch

        packet = f if isinstance(f, torch._ops.OpOverloadPacket) else None
        if packet is None:
            name = getattr(f, "__name__", "")
            try:
                packet = getattr(torch.ops.npu, name) if name else None
            except (AttributeError, RuntimeError):
                packet = None
        if isinstance(packet, torch._ops.OpOverloadPacket):
            try:
                return {a.name for a in packet.default._schema.arguments}
            except (AttributeError, RuntimeError):
                pass
        try:
            return set(inspect.signature(f).parameters)
        except (TypeError, ValueError):
            return None

    def route_reasons(self, route: VendorOp) -> list[str]:
        """Argument-independent reasons a route cannot be used here."""
        f, why = self.resolve(route.name)
        if f is None:
            return [why]
        fam, detail = self.soc
        if fam is not None and fam not in route.socs:
            return [f"{route.name} exists on {'/'.join(route.socs)} only; this device is {detail}"]
        if route.needs_args:
            args = self.schema_args(f)
            if args is not None:
                missing = [a for a in route.needs_args if a not in args]
                if missing:
                    return [f"installed {route.name} lacks argument(s) {', '.join(missing)} (needs a newer release)"]
        return []

    def limits(self, op: str) -> list[str]:
        decl = self.ops.get(op)
        if decl is None:
            return []
        out = [f"route {r.name} on {'/'.join(r.socs)}" + (f": {r.note}" if r.note else "") for r in decl.routes]
        return out + [f"{k} = {v}" for k, v in decl.limits.items()]

    def usable_routes(self, op: str) -> list[VendorOp]:
        decl = self.ops.get(op)
        return [] if decl is None else [r for r in decl.routes if not self.route_reasons(r)]

    def vendor(self, route: VendorOp) -> Callable[..., Any]:
        f, why = self.resolve(route.name)
        if f is None:
            raise RuntimeError(why)
        return f

    def op_reasons(self, op: str, device_type: str, forced: bool = False) -> list[str]:
        reasons = super().op_reasons(op, device_type, forced)
        if reasons:
            if op in NO_VENDOR_OP and any("kernel for" in r for r in reasons):
                return [NO_VENDOR_OP[op]]
            return reasons
        decl = self.ops.get(op)
        if decl is not None and decl.routes:
            why = [f"{r.name}: {'; '.join(self.route_reasons(r))}" for r in decl.routes if self.route_reasons(r)]
            if len(why) == len(decl.routes):
                return why
        return []

    # -- build ---------------------------------------------------------------------------------
    def build_extensions(self, ctx: BuildContext):
        if ctx.flag("V4K_BUILD_ASCEND") == "0":
            ctx.record(self.name, "skipped: V4K_BUILD_ASCEND=0")
            return [], {}
        sources = sorted(os.path.relpath(p, ctx.root) for p in glob.glob(os.path.join(ctx.root, "csrc", "ascend", "*.cpp")))
        if not sources:
            ctx.record(self.name, "skipped: no sources in csrc/ascend")
            return [], {}
        import importlib.util

        def skip(msg: str):
            if ctx.flag("V4K_BUILD_ASCEND") == "1":
                raise RuntimeError(f"V4K_BUILD_ASCEND=1 but {msg}")
            ctx.record(self.name, f"skipped: {msg}")
            return [], {}

        if importlib.util.find_spec("torch_npu") is None:
            return skip("torch_npu is not installed")
        cann = os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")
        if not cann or not os.path.isdir(cann):
            return skip("no CANN toolkit (set ASCEND_TOOLKIT_HOME or source CANN's set_env.sh)")
        try:
            from torch.utils.cpp_extension import BuildExtension, CppExtension

            spec = importlib.util.find_spec("torch_npu")
            npu_root = os.path.dirname(spec.origin)  # type: ignore[arg-type]
            import torch_npu  # noqa: F401  (needs CANN at build time too)
        except Exception as e:  # noqa: BLE001
            return skip(f"torch_npu not importable at build time ({type(e).__name__}: {e})")
        ext = CppExtension(
            name=f"v4kernels.{self.extension}",
            sources=sources,
            include_dirs=[os.path.join(npu_root, "include"),
                          os.path.join(npu_root, "include", "third_party", "op-plugin"),
                          os.path.join(npu_root, "include", "third_party", "acl", "inc"),
                          os.path.join(cann, "include")],
            library_dirs=[os.path.join(npu_root, "lib"), os.path.join(cann, "lib64")],
            libraries=["torch_npu", "ascendcl"],
            extra_compile_args=["-O2", "-std=c++17", f"-DCURRENT_VERSION={ascend_version_macro()}"],
        )
        ctx.record(self.name, "pending")
        return [ext], {"build_ext": BuildExtension}


def ascend_version_macro() -> str:
    """op-plugin's ``CURRENT_VERSION`` for the installed torch (``V2R13`` for torch 2.13)."""
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"V{major}R{minor}"


BACKEND = AscendBackend()
