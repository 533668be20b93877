"""Byte layouts of the KV caches and the model schedules, in one place (SPEC §1, §13).

These constants are the single source for the cost calculator (:mod:`v4kernels.bench.kvcalc`),
for the byte formulas of the benchmark workloads, and for the kernels' documentation (the packed
FP8 KV of ``pack_kv_fp8`` / ``sparse_attn`` is :data:`MAIN_KV_FP8`; the indexer key formats of
``indexer_scores`` are :data:`INDEXER_KEY_FP4` / :data:`INDEXER_KEY_FP8`).

Each layout is a :class:`KVLayout`: named byte fields whose sum is the size of one cache entry, so
a layout change shows up in every figure derived from it.

>>> MAIN_KV_FP8.nbytes, INDEXER_KEY_FP4.nbytes, INDEXER_KEY_FP8.nbytes
(584, 68, 132)
>>> FLASH.n_csa, FLASH.n_hca, FLASH.n_swa, PRO.n_csa, PRO.n_hca
(21, 20, 2, 30, 31)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..layers.config import V4Config, compress_ratio_of_layer

__all__ = [
    "KVLayout", "MAIN_KV_FP8", "MAIN_KV_BF16", "INDEXER_KEY_FP4", "INDEXER_KEY_FP8", "INDEXER_KEY_BF16",
    "MLA_KV_FP8_V32", "MLA_KV_BF16", "INDEXER_LAYOUTS", "MAIN_LAYOUTS",
    "ModelConfig", "FLASH", "PRO", "V32", "V3", "MODELS", "get_model",
    "HEAD_DIM", "ROPE_DIM", "NOPE_DIM", "WINDOW", "CSA_RATIO", "HCA_RATIO", "INDEX_HEADS", "INDEX_DIM",
]

_FLASH_CFG, _PRO_CFG = V4Config.flash(), V4Config.pro()

HEAD_DIM = _FLASH_CFG.head_dim  #: d = 512: K=V head vector, [nope 448 | rope 64] (SPEC §0.2)
ROPE_DIM = _FLASH_CFG.rope_head_dim  #: r = 64
NOPE_DIM = _FLASH_CFG.nope_dim  #: n = 448
WINDOW = _FLASH_CFG.window_size  #: sliding window W = 128 (every V4 layer)
CSA_RATIO = 4  #: m for compressed sparse attention (SPEC §1.2)
HCA_RATIO = 128  #: m for heavily compressed attention
INDEX_HEADS = _FLASH_CFG.index_n_heads  #: HI = 64
INDEX_DIM = _FLASH_CFG.index_head_dim  #: dI = 128


@dataclass(frozen=True)
class KVLayout:
    """One cache entry as ordered ``(field, bytes)`` pairs; ``nbytes`` is their sum."""

    name: str
    fields: tuple[tuple[str, int], ...]
    note: str = ""

    @property
    def nbytes(self) -> int:
        return sum(b for _, b in self.fields)

    def describe(self) -> str:
        return f"{self.name}: " + " + ".join(f"{b} {n}" for n, b in self.fields) + f" = {self.nbytes} B"


#: V4 main KV entry (window, CSA and HCA alike), FlashMLA "MODEL1" / SGLang layout (SPEC §13.1,
#: op_contracts ``pack_kv_fp8``): 448 e4m3 nope values, the 64 rope values in bf16, one UE8M0
#: scale per 64-wide nope block (7) and one pad byte.
MAIN_KV_FP8 = KVLayout(
    "v4-main-fp8",
    (("e4m3 nope", NOPE_DIM), ("bf16 rope", ROPE_DIM * 2), ("ue8m0 scales (block 64)", NOPE_DIM // 64), ("pad", 1)),
    "FlashMLA MODEL1 / SGLang: 448 + 64*2 + 8",
)
#: The same entry held in bf16 (what the [OFF] reference keeps in memory).
MAIN_KV_BF16 = KVLayout("v4-main-bf16", (("bf16 values", HEAD_DIM * 2),))
#: Indexer key, FP4 e2m1 packed two per byte with one UE8M0 scale per 32 values (SPEC §4.4, §13.1).
INDEXER_KEY_FP4 = KVLayout("indexer-fp4", (("e2m1 packed", INDEX_DIM // 2), ("ue8m0 scales (block 32)", INDEX_DIM // 32)))
#: Indexer key, FP8 e4m3 with one fp32 scale per key (SGLang / DeepGEMM default).
INDEXER_KEY_FP8 = KVLayout("indexer-fp8", (("e4m3", INDEX_DIM), ("fp32 scale", 4)))
#: Indexer key in bf16.
INDEXER_KEY_BF16 = KVLayout("indexer-bf16", (("bf16", INDEX_DIM * 2),))
#: V3/V3.2 MLA latent in FlashMLA's FP8 format: 512 e4m3 + 4 fp32 tile-128 scales + 64 bf16 rope.
MLA_KV_FP8_V32 = KVLayout("mla-fp8-v32", (("e4m3 latent", 512), ("fp32 scales (tile 128)", 16), ("bf16 rope", 128)))
#: V3 MLA latent (512 + 64 rope dims) in bf16.
MLA_KV_BF16 = KVLayout("mla-bf16", (("bf16 latent+rope", 576 * 2),))

INDEXER_LAYOUTS: dict[str, KVLayout] = {"fp4": INDEXER_KEY_FP4, "fp8": INDEXER_KEY_FP8, "bf16": INDEXER_KEY_BF16}
MAIN_LAYOUTS: dict[str, KVLayout] = {"fp8": MAIN_KV_FP8, "bf16": MAIN_KV_BF16}


@dataclass(frozen=True)
class ModelConfig:
    """Attention-relevant configuration of one model (SPEC §1.1, §1.2, §13).

    ``compress_ratios`` lists the main layers only (the MTP block is excluded from KV and FLOPs
    accounting, as in SPEC §13). For V3/V3.2 ``kind`` is ``"mla"`` and every layer is an MLA
    layer (``dsa`` says whether it has the V3.2 indexer).
    """

    name: str
    kind: str  # "v4" | "mla"
    n_layers: int
    n_heads: int
    dim: int
    active_params: float  # published active parameters (SPEC §13.3 counts 2 FLOP per active param)
    compress_ratios: tuple[int, ...] = ()
    index_topk: int = 0
    q_lora: int = 0
    o_groups: int = 0
    o_lora: int = 0
    n_experts: int = 0
    topk_experts: int = 0
    moe_inter: int = 0
    route_scale: float = 1.0
    dsa: bool = False
    mla_latent: int = 512
    mla_rope: int = 64
    published: dict[str, float] = field(default_factory=dict)

    @property
    def n_csa(self) -> int:
        return sum(1 for m in self.compress_ratios if m == CSA_RATIO)

    @property
    def n_hca(self) -> int:
        return sum(1 for m in self.compress_ratios if m == HCA_RATIO)

    @property
    def n_swa(self) -> int:
        return sum(1 for m in self.compress_ratios if m == 0)


def _v4_model(name: str, cfg: V4Config, active_params: float, published: dict[str, float]) -> ModelConfig:
    """A V4 model's :class:`ModelConfig` from its :class:`V4Config` (the one definition of the
    dimensions) and the per-layer schedule of SPEC §1.2 (main layers only)."""
    return ModelConfig(
        name, "v4", cfg.n_layers, cfg.n_heads, cfg.dim, active_params,
        tuple(compress_ratio_of_layer(name, i) for i in range(cfg.n_layers)), index_topk=cfg.index_topk,
        q_lora=cfg.q_lora_rank, o_groups=cfg.o_groups, o_lora=cfg.o_lora_rank, n_experts=cfg.n_routed_experts,
        topk_experts=cfg.n_activated_experts, moe_inter=cfg.moe_inter_dim, route_scale=cfg.route_scale,
        published=published,
    )


# Active parameters (SPEC §1.1) and DeepSeek's published fractions of V3.2 at 1M context (SPEC §15 #13)
FLASH = _v4_model("flash", _FLASH_CFG, 13e9, {"kv_vs_v32": 0.07, "flops_vs_v32": 0.10})
PRO = _v4_model("pro", _PRO_CFG, 49e9, {"kv_vs_v32": 0.10, "flops_vs_v32": 0.27})
#: DeepSeek-V3.2: 61 MLA layers, each with the DSA indexer (64 heads x 128, top-2048).
V32 = ModelConfig("v3.2", "mla", 61, 128, 7168, 37e9, index_topk=2048, dsa=True)
#: DeepSeek-V3: 61 dense MLA layers, no indexer.
V3 = ModelConfig("v3", "mla", 61, 128, 7168, 37e9)

MODELS: dict[str, ModelConfig] = {m.name: m for m in (FLASH, PRO, V32, V3)}


def get_model(name: str) -> ModelConfig:
    key = name.lower().replace("v4-", "").replace("deepseek-", "")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[key]
