"""One DeepSeek-V4 attention layer (sliding window, CSA or HCA) composed from v4kernels ops,
with its per-layer cache (SPEC §2, §5-§9). Random weights; used by the demo and the benchmarks.
"""
from __future__ import annotations

import torch
from torch import nn

import v4kernels as v4k

from .config import V4Config
from .linear import Linear, linear


class AttentionCache:
    """Decode state of one attention layer for ``batch`` sequences that share their position.

    kv        [B, window + max_len/ratio, 512] bf16, or uint8 [B, ..., 584] in the packed FP8
              layout (``kv_fp8=True``): slots 0..window-1 are the ring (position p in slot
              p % window), slot window + c holds compressed entry c (SPEC §5.4, §8.2)
    index_keys [B, max_len/4, 128] bf16 indexer keys (CSA layers)
    compressor / index_compressor: the incremental compressor states (SPEC §6.5)
    """

    def __init__(self, cfg: V4Config, ratio: int, batch: int, max_len: int, device: torch.device | str = "cpu",
                 kv_fp8: bool = False) -> None:
        self.cfg, self.ratio, self.batch, self.max_len, self.kv_fp8 = cfg, ratio, batch, max_len, kv_fp8
        self.window = cfg.window_size
        self.n_comp = max_len // ratio if ratio else 0
        rows = self.window + self.n_comp
        if kv_fp8:
            self.kv = torch.zeros(batch, rows, 584, dtype=torch.uint8, device=device)
        else:
            self.kv = torch.zeros(batch, rows, cfg.head_dim, dtype=torch.bfloat16, device=device)
        self.index_keys = (
            torch.zeros(batch, self.n_comp, cfg.index_head_dim, dtype=torch.bfloat16, device=device) if ratio == 4 else None
        )
        self.compressor = v4k.CompressorState.empty(batch, ratio, cfg.head_dim, device=device) if ratio else None
        self.index_compressor = v4k.CompressorState.empty(batch, 4, cfg.index_head_dim, device=device) if ratio == 4 else None
        self.pos = 0

    def store_rows(self, rows: torch.Tensor, slots: torch.Tensor | slice) -> None:
        """Write KV rows [B, n, 512] (bf16, already FP8-simulated) into cache slots."""
        self.kv[:, slots] = v4k.pack_kv_fp8(rows) if self.kv_fp8 else rows.to(self.kv.dtype)

    def nbytes(self) -> int:
        """Bytes held by this layer's cache: KV rows, indexer keys and compressor states."""
        n = self.kv.numel() * self.kv.element_size()
        if self.index_keys is not None:
            n += self.index_keys.numel() * self.index_keys.element_size()
        for st in (self.compressor, self.index_compressor):
            if st is not None:
                n += st.nbytes
        return n

    def snapshot(self) -> dict:
        return {
            "kv": self.kv.clone(),
            "index_keys": None if self.index_keys is None else self.index_keys.clone(),
            "compressor": None if self.compressor is None else self.compressor.clone(),
            "index_compressor": None if self.index_compressor is None else self.index_compressor.clone(),
            "pos": self.pos,
        }

    def restore(self, snap: dict) -> None:
        self.kv.copy_(snap["kv"])
        if self.index_keys is not None:
            self.index_keys.copy_(snap["index_keys"])
        self.compressor = None if snap["compressor"] is None else snap["compressor"].clone()
        self.index_compressor = None if snap["index_compressor"] is None else snap["index_compressor"].clone()
        self.pos = snap["pos"]


class Compressor(nn.Module):
    """Weights of one KV compressor (SPEC §6.1): wkv, wgate [coff·hd, D], ape [m, coff·hd], norm [hd]."""

    def __init__(self, dim: int, head_dim: int, ratio: int, gen: torch.Generator) -> None:
        super().__init__()
        coff = 2 if ratio == 4 else 1
        self.ratio, self.head_dim = ratio, head_dim
        self.register_buffer("wkv", (torch.randn(coff * head_dim, dim, generator=gen) / dim**0.5).to(torch.bfloat16))
        self.register_buffer("wgate", (torch.randn(coff * head_dim, dim, generator=gen) / dim**0.5).to(torch.bfloat16))
        self.register_buffer("ape", torch.randn(ratio, coff * head_dim, generator=gen) * 0.5)
        self.register_buffer("norm", (1 + 0.1 * torch.randn(head_dim, generator=gen)).to(torch.bfloat16))

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, state: v4k.CompressorState, quant: str) -> tuple[torch.Tensor, torch.Tensor]:
        return v4k.compress_kv(x, self.wkv, self.wgate, self.ape, self.norm, freqs, state, ratio=self.ratio, quant=quant)


class V4Attention(nn.Module):
    """Attention of one V4 layer with compress ratio 0, 4 (CSA) or 128 (HCA).

    ``forward(x [B,S,D], cache, start_pos)`` supports a prefill from position 0 (S >= 1) and
    single-token decode (S == 1) at ``start_pos == cache.pos``. ``simulate_quant=False`` is the
    [HF] variant (SPEC §15 #5, #8): no FP8 simulation of the window and compressed KV, no
    Hadamard/FP4 simulation in the indexer.
    """

    def __init__(self, cfg: V4Config, ratio: int, seed: int = 0, simulate_quant: bool = True) -> None:
        super().__init__()
        self.simulate_quant = simulate_quant
        if ratio not in (0, 4, 128):
            raise ValueError(f"V4Attention: ratio must be 0, 4 or 128, got {ratio}")
        g = torch.Generator().manual_seed(seed)
        self.cfg, self.ratio = cfg, ratio
        d, h, hd = cfg.dim, cfg.n_heads, cfg.head_dim
        self.wq_a = Linear(d, cfg.q_lora_rank, "fp8", g)
        self.register_buffer("q_norm", (1 + 0.1 * torch.randn(cfg.q_lora_rank, generator=g)).to(torch.bfloat16))
        self.wq_b = Linear(cfg.q_lora_rank, h * hd, "fp8", g)
        self.wkv = Linear(d, hd, "fp8", g)
        self.register_buffer("kv_norm", (1 + 0.1 * torch.randn(hd, generator=g)).to(torch.bfloat16))
        group_in = h * hd // cfg.o_groups
        # wo_a is a bf16 grouped projection in the reference (SPEC §9.4, §15 #12)
        self.register_buffer(
            "wo_a", (torch.randn(cfg.o_groups, cfg.o_lora_rank, group_in, generator=g) / group_in**0.5).to(torch.bfloat16)
        )
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, d, "fp8", g)
        self.register_buffer("attn_sink", torch.randn(h, generator=g))
        self.register_buffer("freqs", v4k.v4_rope_frequencies(compressed=ratio > 0, rope_dim=cfg.rope_head_dim))
        if ratio:
            self.compressor = Compressor(d, hd, ratio, g)
        if ratio == 4:
            self.index_wq_b = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, "fp8", g)
            self.register_buffer(
                "index_weights_proj", (torch.randn(cfg.index_n_heads, d, generator=g) / d**0.5).to(torch.bfloat16)
            )
            self.index_compressor = Compressor(d, cfg.index_head_dim, 4, g)

    def new_cache(self, batch: int, max_len: int, device: torch.device | str = "cpu", kv_fp8: bool = False) -> AttentionCache:
        return AttentionCache(self.cfg, self.ratio, batch, max_len, device, kv_fp8)

    def forward(self, x: torch.Tensor, cache: AttentionCache, start_pos: int) -> torch.Tensor:
        cfg = self.cfg
        b, s, _ = x.shape
        decode = start_pos > 0
        if decode and s != 1:
            raise ValueError(f"V4Attention: after the prefill only single-token decode is supported, got S={s} at start_pos={start_pos}")
        if start_pos != cache.pos:
            raise ValueError(f"V4Attention: start_pos={start_pos} does not match the cache position {cache.pos}")
        if start_pos + s > cache.max_len:
            raise ValueError(f"V4Attention: {start_pos + s} tokens exceed the cache capacity max_len={cache.max_len}")
        w = cfg.window_size
        positions = torch.arange(start_pos, start_pos + s, device=x.device).unsqueeze(0).expand(b, s).contiguous()

        # query path (SPEC §5.2)
        qr = v4k.rms_norm(self.wq_a(x), self.q_norm, cfg.norm_eps)
        q = self.wq_b(qr).view(b, s, cfg.n_heads, cfg.head_dim)
        q = v4k.apply_rope(v4k.rms_norm(q, None, cfg.norm_eps), positions, self.freqs)

        # window K=V (SPEC §5.3): RoPE on the rope dims, FP8 QAT simulation on the nope dims
        kv = v4k.rms_norm(self.wkv(x), self.kv_norm, cfg.norm_eps)
        kv = v4k.apply_rope(kv.unsqueeze(2), positions, self.freqs).squeeze(2)
        if self.simulate_quant:
            kv = torch.cat((v4k.act_quant_roundtrip(kv[..., : cfg.nope_dim], 64), kv[..., cfg.nope_dim :]), dim=-1)

        start = [start_pos] * b
        offset = w if decode else s  # where compressed entries start in the KV buffer (SPEC §8)
        mode = "decode" if decode else "prefill"
        idx_parts = [v4k.window_indices(start, s, w, mode=mode)]
        if decode:
            cache.store_rows(kv, slice(start_pos % w, start_pos % w + 1))

        if self.ratio == 4:
            # lightning indexer (SPEC §7): its own compressor runs first, then scoring + top-k
            qi = self.index_wq_b(qr).view(b, s, cfg.index_n_heads, cfg.index_head_dim)
            qi = v4k.indexer_query(qi, positions, self.freqs, rotate=self.simulate_quant, simulate_fp4=self.simulate_quant)
            keys, n_new = self.index_compressor(x, self.freqs, cache.index_compressor, "fp4" if self.simulate_quant else "none")
            first = start_pos // 4
            n = int(n_new[0])
            if n:
                cache.index_keys[:, first : first + n] = keys[:, :n]
            visible = (start_pos + s) // 4
            weights = linear(x, self.index_weights_proj).float() * v4k.indexer_scale(cfg.index_n_heads, cfg.index_head_dim)
            idx_parts.append(
                v4k.indexer_topk(qi, weights, cache.index_keys[:, :visible].contiguous(), positions, cfg.index_topk,
                                 ratio=4, offset=offset)
            )
        elif self.ratio == 128:
            idx_parts.append(v4k.compressed_indices(start, s, 128, offset, mode=mode))

        if self.ratio:
            entries, n_new = self.compressor(x, self.freqs, cache.compressor, "fp8" if self.simulate_quant else "none")
            first = start_pos // self.ratio
            n = int(n_new[0])
            if n:
                cache.store_rows(entries[:, :n], slice(w + first, w + first + n))
        if decode:
            kv_buffer = cache.kv
        else:
            n_entries = s // self.ratio if self.ratio else 0
            kv_buffer = kv if n_entries == 0 else torch.cat((kv, entries[:, :n_entries]), dim=1)
            # the last `window` tokens go to the ring for the decode steps that follow
            last = min(s, w)
            ring_pos = torch.arange(s - last, s)
            cache.store_rows(kv[:, s - last :], ring_pos % w)
        cache.pos = start_pos + s

        idx = torch.cat(idx_parts, dim=-1) if len(idx_parts) > 1 else idx_parts[0]
        o = v4k.sparse_attn(q, kv_buffer, self.attn_sink, idx, cfg.head_dim**-0.5)
        o = v4k.apply_rope(o, positions, self.freqs, inverse=True)  # SPEC §9.3
        u = v4k.grouped_linear(o.view(b, s, cfg.o_groups, -1), self.wo_a)  # SPEC §9.4
        return self.wo_b(u.flatten(2))
