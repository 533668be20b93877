"""A DeepSeek-V4 decoder block (SPEC §2): mHC around attention and MoE, with random weights or
weights from a checkpoint (``weights=``, this module's state-dict names; see
:mod:`v4kernels.layers.weights` for loading the release and Hugging Face namings).

The random routed experts are FP4 and the shared expert FP8, as in the instruct release
(SPEC §1.1); the expert count can be reduced so a block fits a laptop-sized machine. Checkpoint
experts keep their stored format (FP4/FP8 with scales, or plain float).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

import v4kernels as v4k

from .attention import AttentionCache, V4Attention, _Init, load_weights
from .config import V4Config


def _rand_weights(n: int, rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, rows, cols, generator=g) / cols**0.5


def _rand_fp4_weights(n: int, rows: int, cols: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random FP4 expert weights drawn directly in the storage format: uniform e2m1 codes (RMS
    value 2.93) with one power-of-two scale per 1x32 block giving an RMS of about cols^-0.5.
    Equivalent for a demo to quantising Gaussian weights, at a fraction of the cost."""
    packed = torch.randint(0, 256, (n, rows, cols // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    scale = 2.0 ** round(math.log2(1.0 / (2.93 * cols**0.5)))
    return packed, torch.full((n, rows, cols // 32), scale, dtype=torch.float32)


class V4MoE(nn.Module):
    """Router (sqrt-softplus, bias for selection only, or hash routing) + FP4 routed experts +
    FP8 shared expert (SPEC §11)."""

    def __init__(self, cfg: V4Config, n_experts: int, hash_routing: bool, seed: int = 0, *,
                 weights: Mapping[str, torch.Tensor] | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cfg, self.n_experts, self.hash_routing = cfg, n_experts, hash_routing
        d, inter, k = cfg.dim, cfg.moe_inter_dim, cfg.n_activated_experts
        if weights is not None or torch.device(device or "cpu").type == "meta":
            self._empty(weights, device)
            if weights is not None:
                load_weights(self, weights, device)
            return
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("gate", (torch.randn(n_experts, d, generator=g) / d**0.5).to(torch.bfloat16).to(device))
        if hash_routing:
            # tid2eid: k distinct experts per vocabulary id (SPEC §11.2)
            perm = torch.rand(cfg.vocab_size, n_experts, generator=g).argsort(dim=1)[:, :k]
            self.register_buffer("tid2eid", perm.to(torch.int32).to(device))
            self.bias = None
        else:
            self.register_buffer("bias", (torch.randn(n_experts, generator=g) * 0.1).to(device))
            self.tid2eid = None
        if d % 128 or inter % 128:
            # FP4/FP8 experts need whole 128-wide activation blocks: smaller models get bf16 experts
            for name, (n, rows, cols) in {"w1": (n_experts, inter, d), "w3": (n_experts, inter, d), "w2": (n_experts, d, inter),
                                          "s1": (1, inter, d), "s3": (1, inter, d), "s2": (1, d, inter)}.items():
                w = _rand_weights(n, rows, cols, g).to(torch.bfloat16)
                self.register_buffer(name, (w if name[0] == "w" else w[0]).to(device))
                setattr(self, name + "_scale", None)
            return
        for name, (rows, cols) in {"w1": (inter, d), "w3": (inter, d), "w2": (d, inter)}.items():
            q, s = _rand_fp4_weights(n_experts, rows, cols, g)
            self.register_buffer(name, q.to(device))
            self.register_buffer(name + "_scale", s.to(device))
        for name, (rows, cols) in {"s1": (inter, d), "s3": (inter, d), "s2": (d, inter)}.items():
            q, s = v4k.quantize_expert_weights(_rand_weights(1, rows, cols, g), "fp8")
            self.register_buffer(name, q[0].contiguous().to(device))
            self.register_buffer(name + "_scale", s[0].contiguous().to(device))

    def _empty(self, weights: Mapping[str, torch.Tensor] | None, device: torch.device | str | None) -> None:
        """Uninitialised buffers shaped for ``weights`` (their storage formats) or, on the meta
        device, for the release formats (FP4 routed, FP8 shared experts)."""
        cfg, e = self.cfg, self.n_experts
        d, inter, k = cfg.dim, cfg.moe_inter_dim, cfg.n_activated_experts
        dev = "meta" if weights is not None else device

        def empty(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
            if weights is not None and name in weights:
                shape, dtype = tuple(weights[name].shape), weights[name].dtype
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=dev))

        empty("gate", (e, d), torch.bfloat16)
        if self.hash_routing:
            empty("tid2eid", (cfg.vocab_size, k), torch.int32)
            self.bias = None
        else:
            empty("bias", (e,), torch.float32)
            self.tid2eid = None
        for name, (rows, cols), n, fmt in (("w1", (inter, d), e, "fp4"), ("w3", (inter, d), e, "fp4"), ("w2", (d, inter), e, "fp4"),
                                            ("s1", (inter, d), 0, "fp8"), ("s3", (inter, d), 0, "fp8"), ("s2", (d, inter), 0, "fp8")):
            lead = (n,) if n else ()
            w = weights.get(name) if weights is not None else None
            if w is not None and w.is_floating_point() and w.dtype != torch.float8_e4m3fn:
                empty(name, lead + (rows, cols), w.dtype)  # plain float expert weights: no scales
                setattr(self, name + "_scale", None)
                continue
            if fmt == "fp4" and (w is None or w.dtype in (torch.uint8, torch.int8)):
                empty(name, lead + (rows, cols // 2), torch.uint8)
                empty(name + "_scale", lead + (rows, cols // 32), torch.float32)
            else:
                empty(name, lead + (rows, cols), torch.float8_e4m3fn)
                empty(name + "_scale", lead + (-(-rows // 128), -(-cols // 128)), torch.float32)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        lead = x.shape[:-1]
        x2 = x.reshape(-1, cfg.dim)
        weights, ids = v4k.moe_gate(
            x2, self.gate, self.bias, topk=cfg.n_activated_experts, route_scale=cfg.route_scale,
            tid2eid=self.tid2eid, token_ids=token_ids.reshape(-1) if self.hash_routing else None,
        )
        routed = v4k.moe_experts(
            x2, weights, ids, self.w1, self.w3, self.w2, w1_scale=self.w1_scale, w3_scale=self.w3_scale,
            w2_scale=self.w2_scale, swiglu_limit=cfg.swiglu_limit, out_dtype=torch.float32,
        )
        shared = v4k.shared_expert(
            x2, self.s1, self.s3, self.s2, w1_scale=self.s1_scale, w3_scale=self.s3_scale, w2_scale=self.s2_scale,
            swiglu_limit=cfg.swiglu_limit, out_dtype=torch.float32,
        )
        return (routed + shared).to(x.dtype).reshape(*lead, cfg.dim)


class HyperConnection(nn.Module):
    """Parameters of one mHC site (SPEC §10): fn [(2+hc)·hc, hc·D], base [(2+hc)·hc], scale [3]."""

    def __init__(self, cfg: V4Config, g: torch.Generator | _Init) -> None:
        super().__init__()
        init = g if isinstance(g, _Init) else _Init.wrap(g)
        hc, d = cfg.hc_mult, cfg.dim
        n = (2 + hc) * hc
        f32 = torch.float32
        self.register_buffer("fn", init.tensor((n, hc * d), f32, lambda g: torch.randn(n, hc * d, generator=g) / (hc * d) ** 0.5))
        self.register_buffer("base", init.tensor((n,), f32, lambda g: torch.randn(n, generator=g) * 0.5))
        self.register_buffer("scale", init.tensor((3,), f32, lambda g: torch.rand(3, generator=g) * 0.5 + 0.25))


class V4Block(nn.Module):
    """``h [B,S,hc,D] -> h`` through hc_pre → attn_norm → attention → hc_post → hc_pre →
    ffn_norm → MoE → hc_post (SPEC §2).

    ``weights``: this module's state-dict names (``attn.*``, ``ffn.*``, ``hc_attn.*``, ...; see
    :func:`v4kernels.layers.weights.load_block`); with it, or on the meta device, nothing random
    is drawn. ``n_experts`` then comes from the weights' routed-expert count if None."""

    def __init__(self, cfg: V4Config, ratio: int, n_experts: int | None = None, hash_routing: bool = False, seed: int = 0, *,
                 csa: bool | None = None, simulate_quant: bool = True, dtype: torch.dtype = torch.bfloat16,
                 weights: Mapping[str, torch.Tensor] | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        sub = (lambda prefix: {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}) if weights is not None else (lambda prefix: None)  # noqa: E731
        ffn_w = sub("ffn.")
        if n_experts is None:
            n_experts = ffn_w["gate"].shape[0] if ffn_w is not None else cfg.n_routed_experts
        self.attn = V4Attention(cfg, ratio, seed, simulate_quant, csa=csa, dtype=dtype, weights=sub("attn."), device=device)
        self.ffn = V4MoE(cfg, n_experts, hash_routing, seed + 1, weights=ffn_w, device=device)
        random = weights is None and torch.device(device or "cpu").type != "meta"
        init = _Init(seed + 7, random, device if weights is None else "meta")
        self.hc_attn = HyperConnection(cfg, init)
        self.hc_ffn = HyperConnection(cfg, init)
        bf = torch.bfloat16
        self.register_buffer("attn_norm", init.tensor((cfg.dim,), bf, lambda g: 1 + 0.1 * torch.randn(cfg.dim, generator=g)))
        self.register_buffer("ffn_norm", init.tensor((cfg.dim,), bf, lambda g: 1 + 0.1 * torch.randn(cfg.dim, generator=g)))
        if weights is not None:
            own = {k: v for k, v in weights.items() if not k.startswith(("attn.", "ffn."))}
            for name, mod in (("hc_attn", self.hc_attn), ("hc_ffn", self.hc_ffn)):
                load_weights(mod, {k[len(name) + 1:]: v for k, v in own.items() if k.startswith(name + ".")}, device)
            rest = {k: v for k, v in own.items() if not k.startswith(("hc_attn.", "hc_ffn."))}
            if set(rest) != {"attn_norm", "ffn_norm"}:
                raise KeyError(f"V4Block: expected attn_norm and ffn_norm besides attn.*, ffn.*, hc_attn.*, hc_ffn.*; got {sorted(rest)}")
            for k, v in rest.items():
                setattr(self, k, v.to(device))

    def _hc_pre(self, h: torch.Tensor, site: HyperConnection):
        c = self.cfg
        return v4k.hc_pre(h, site.fn, site.scale, site.base, sinkhorn_iters=c.hc_sinkhorn_iters, norm_eps=c.norm_eps, hc_eps=c.hc_eps)

    def forward(self, h: torch.Tensor, cache: AttentionCache, start_pos: int, token_ids: torch.Tensor) -> torch.Tensor:
        x, post, comb = self._hc_pre(h, self.hc_attn)
        a, pending = self.attn.step(v4k.rms_norm(x, self.attn_norm, self.cfg.norm_eps), cache, start_pos)
        try:  # the cache advances only if the whole block step succeeds
            h = v4k.hc_post(a, h, post, comb)
            x, post, comb = self._hc_pre(h, self.hc_ffn)
            f = self.ffn(v4k.rms_norm(x, self.ffn_norm, self.cfg.norm_eps), token_ids)
            out = v4k.hc_post(f, h, post, comb)
        except BaseException:
            pending.rollback()
            raise
        pending.commit()
        return out


class HyperHead(nn.Module):
    """Final stream collapse (SPEC §10.5) + the model's final RMSNorm."""

    def __init__(self, cfg: V4Config, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed + 11)
        hc, d = cfg.hc_mult, cfg.dim
        self.cfg = cfg
        self.register_buffer("fn", torch.randn(hc, hc * d, generator=g) / (hc * d) ** 0.5)
        self.register_buffer("base", torch.randn(hc, generator=g) * 0.5)
        self.register_buffer("scale", torch.rand(1, generator=g) * 0.5 + 0.25)
        self.register_buffer("norm", (1 + 0.1 * torch.randn(d, generator=g)).to(torch.bfloat16))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = v4k.hc_head(h, self.fn, self.scale, self.base, norm_eps=self.cfg.norm_eps, hc_eps=self.cfg.hc_eps)
        return v4k.rms_norm(y, self.norm, self.cfg.norm_eps)
