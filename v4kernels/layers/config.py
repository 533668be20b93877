"""DeepSeek-V4 model dimensions (SPEC §1.1) as a dataclass with the Flash and Pro presets."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class V4Config:
    dim: int
    n_heads: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    index_topk: int
    n_routed_experts: int
    moe_inter_dim: int
    route_scale: float
    n_layers: int = 43  # decoder layers, MTP block excluded (the Pro preset sets 61)
    head_dim: int = 512
    rope_head_dim: int = 64
    window_size: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    n_activated_experts: int = 6
    n_hash_layers: int = 3
    vocab_size: int = 129280
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @classmethod
    def flash(cls) -> "V4Config":
        return cls(dim=4096, n_heads=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, index_topk=512,
                   n_routed_experts=256, moe_inter_dim=2048, route_scale=1.5)

    @classmethod
    def pro(cls) -> "V4Config":
        return cls(dim=7168, n_heads=128, q_lora_rank=1536, o_groups=16, o_lora_rank=1024, index_topk=1024,
                   n_routed_experts=384, moe_inter_dim=3072, route_scale=2.5, n_layers=61)

    def with_(self, **kw: object) -> "V4Config":
        return replace(self, **kw)  # type: ignore[arg-type]


def compress_ratio_of_layer(model: str, layer: int) -> int:
    """``compress_ratios`` of the released configs (SPEC §1.2): 0 (window only), 4 (CSA), 128 (HCA)."""
    if model == "flash":
        if layer in (0, 1) or layer == 43:
            return 0
        return 4 if layer % 2 == 0 else 128
    if model == "pro":
        if layer in (0, 1):
            return 128
        if layer == 61:
            return 0
        return 4 if layer % 2 == 0 else 128
    raise ValueError(f"compress_ratio_of_layer: model must be 'flash' or 'pro', got {model!r}")
