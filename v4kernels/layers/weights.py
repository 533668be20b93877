"""Decoder-block weights from checkpoints: DeepSeek's release naming and formats (SPEC §4.9: FP8
e4m3 weights with 128x128 UE8M0/fp32 ``scale`` tensors, FP4 routed experts packed two per byte
with 1x32 scales, bf16 ``wo_a``/compressors/norms, fp32 sinks, mHC and ``ape``) or a Hugging Face
``DeepseekV4`` state dict (``model.layers.L.self_attn.q_a_proj.weight`` ..., fused
``experts.gate_up_proj``; FP8 weights there carry ``weight_scale_inv``).

Tensors are read lazily from ``*.safetensors`` shards, one block at a time
(``pip install v4kernels[weights]`` for the ``safetensors`` package)::

    src = SafetensorsSource("/path/to/checkpoint")
    block = load_block(src, layer=2, cfg=V4Config.flash())

Weights keep their stored formats (an FP8 wo_a is dequantised to bf16, SPEC §15 #12; UE8M0 scales
become fp32; FP4 bytes are viewed as uint8).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

import torch

from .config import V4Config

__all__ = ["SafetensorsSource", "block_state_dict", "load_block", "detect_naming"]


class SafetensorsSource:
    """Lazy name -> tensor access to a directory of ``*.safetensors`` shards (or one file); only
    the tensors asked for are read."""

    def __init__(self, path: str | os.PathLike) -> None:
        try:
            from safetensors import safe_open
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("reading checkpoints needs the safetensors package: pip install 'v4kernels[weights]'") from e
        self._open = safe_open
        path = os.fspath(path)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"SafetensorsSource: no *.safetensors file in {path}")
        index = os.path.join(path, "model.safetensors.index.json") if os.path.isdir(path) else ""
        self._where: dict[str, str] = {}
        if index and os.path.exists(index):
            with open(index) as f:
                self._where = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        else:
            for fn in files:
                with safe_open(fn, "pt") as f:
                    self._where.update((k, fn) for k in f.keys())
        self._handles: dict[str, object] = {}

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> torch.Tensor:
        fn = self._where[name]
        if fn not in self._handles:
            self._handles[fn] = self._open(fn, "pt")
        return self._handles[fn].get_tensor(name)  # type: ignore[attr-defined]


def detect_naming(src: Mapping[str, torch.Tensor] | SafetensorsSource) -> str:
    """"hf" if the names are a Hugging Face DeepseekV4 state dict, else "release"."""
    return "hf" if any(".self_attn." in k or ".mlp." in k for k in src.keys()) else "release"


def _scale(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _dequant_fp8(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """e4m3 [N, K] with 128x128 block scales -> fp32."""
    n, k = w.shape
    full = s.float().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return w.float() * full


class _Reader:
    def __init__(self, src, prefix: str, hf: bool) -> None:
        self.src, self.prefix, self.hf = src, prefix, hf

    def has(self, name: str) -> bool:
        return self.prefix + name in self.src

    def get(self, name: str) -> torch.Tensor:
        key = self.prefix + name
        if key not in self.src:
            raise KeyError(f"checkpoint has no tensor {key!r}")
        return self.src[key]

    def linear(self, name: str) -> dict[str, torch.Tensor]:
        """``{"weight", "scale"?}`` of a linear layer (scale: ``.scale`` in the release,
        ``.weight_scale_inv`` in HF FP8 checkpoints)."""
        w = self.get(name + ".weight")
        out = {"weight": w.view(torch.uint8) if w.dtype in (torch.int8,) or str(w.dtype).startswith("torch.float4") else w}
        for sfx in (".scale", ".weight_scale_inv"):
            if self.has(name + sfx):
                out["scale"] = _scale(self.get(name + sfx))
        return out


def block_state_dict(src, layer: int, cfg: V4Config, naming: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights of decoder block ``layer`` in :class:`~v4kernels.layers.block.V4Block`'s own
    names, read from ``src`` (a mapping or :class:`SafetensorsSource`) in the release or HF
    naming (``naming=None`` detects it). Returns ``(state_dict, info)`` with info ``ratio``,
    ``csa``, ``hash_routing`` and ``n_experts`` as found in the checkpoint."""
    naming = naming or detect_naming(src)
    if naming not in ("release", "hf"):
        raise ValueError(f"block_state_dict: naming must be 'release' or 'hf', got {naming!r}")
    hf = naming == "hf"
    r = _Reader(src, f"model.layers.{layer}." if hf else f"layers.{layer}.", hf)
    A = "self_attn." if hf else "attn."
    F = "mlp." if hf else "ffn."
    sd: dict[str, torch.Tensor] = {}

    def put_linear(ours: str, theirs: str) -> None:
        for k, v in r.linear(theirs).items():
            sd[f"{ours}.{k}"] = v

    n = lambda release, hf_name: hf_name if hf else release  # noqa: E731
    put_linear("attn.wq_a", A + n("wq_a", "q_a_proj"))
    sd["attn.q_norm"] = r.get(A + n("q_norm", "q_a_norm") + ".weight")
    put_linear("attn.wq_b", A + n("wq_b", "q_b_proj"))
    put_linear("attn.wkv", A + n("wkv", "kv_proj"))
    sd["attn.kv_norm"] = r.get(A + "kv_norm.weight")
    wo_a = r.linear(A + n("wo_a", "o_a_proj"))
    w = wo_a["weight"]
    if w.dtype == torch.float8_e4m3fn:  # the reference computes wo_a in bf16 (SPEC §15 #12)
        w = _dequant_fp8(w, wo_a["scale"]).to(torch.bfloat16)
    group_in = cfg.n_heads * cfg.head_dim // cfg.o_groups
    sd["attn.wo_a"] = w.reshape(cfg.o_groups, cfg.o_lora_rank, group_in)
    put_linear("attn.wo_b", A + n("wo_b", "o_b_proj"))
    sd["attn.attn_sink"] = r.get(A + n("attn_sink", "sinks")).float()

    comp = A + "compressor."
    ratio, csa = 0, False
    if r.has(comp + n("ape", "position_bias")):
        ape = r.get(comp + n("ape", "position_bias")).float()
        ratio = ape.shape[0]
        for ours, rel, hfn in (("wkv", "wkv.weight", "kv_proj.weight"), ("wgate", "wgate.weight", "gate_proj.weight"),
                               ("norm", "norm.weight", "kv_norm.weight")):
            sd[f"attn.compressor.{ours}"] = r.get(comp + n(rel, hfn))
        sd["attn.compressor.ape"] = ape
        idx = A + ("compressor.indexer." if hf else "indexer.")
        csa = r.has(idx + n("compressor.ape", "position_bias"))
        if csa:
            put_linear("attn.index_wq_b", idx + n("wq_b", "q_b_proj"))
            sd["attn.index_weights_proj"] = r.get(idx + n("weights_proj.weight", "scorer.weights_proj.weight"))
            ic = idx + n("compressor.", "")
            for ours, rel, hfn in (("wkv", "wkv.weight", "kv_proj.weight"), ("wgate", "wgate.weight", "gate_proj.weight"),
                                   ("norm", "norm.weight", "kv_norm.weight"), ("ape", "ape", "position_bias")):
                t = r.get(ic + n(rel, hfn))
                sd[f"attn.index_compressor.{ours}"] = t.float() if ours == "ape" else t

    sd["ffn.gate"] = r.get(F + "gate.weight")
    n_experts = sd["ffn.gate"].shape[0]
    hash_routing = r.has(F + "gate.tid2eid")
    if hash_routing:
        sd["ffn.tid2eid"] = r.get(F + "gate.tid2eid").to(torch.int32)
    else:
        sd["ffn.bias"] = r.get(F + n("gate.bias", "gate.e_score_correction_bias")).float()
    if hf:
        gu = r.linear(F + "experts.gate_up_proj") if r.has(F + "experts.gate_up_proj.weight") else {"weight": r.get(F + "experts.gate_up_proj")}
        inter = gu["weight"].shape[1] // 2
        sd["ffn.w1"], sd["ffn.w3"] = gu["weight"][:, :inter].contiguous(), gu["weight"][:, inter:].contiguous()
        sd["ffn.w2"] = r.get(F + "experts.down_proj")
        for ours, hfn in (("s1", "gate_proj"), ("s3", "up_proj"), ("s2", "down_proj")):
            lin = r.linear(F + f"shared_experts.{hfn}")
            sd[f"ffn.{ours}"] = lin["weight"]
            if "scale" in lin:
                sd[f"ffn.{ours}_scale"] = lin["scale"]
    else:
        for wn in ("w1", "w3", "w2"):
            parts = [r.linear(F + f"experts.{e}.{wn}") for e in range(n_experts)]
            sd[f"ffn.{wn}"] = torch.stack([p["weight"] for p in parts])
            if "scale" in parts[0]:
                sd[f"ffn.{wn}_scale"] = torch.stack([p["scale"] for p in parts])
        for ours, rel in (("s1", "w1"), ("s3", "w3"), ("s2", "w2")):
            lin = r.linear(F + f"shared_experts.{rel}")
            sd[f"ffn.{ours}"] = lin["weight"]
            if "scale" in lin:
                sd[f"ffn.{ours}_scale"] = lin["scale"]

    sd["attn_norm"] = r.get(n("attn_norm.weight", "input_layernorm.weight"))
    sd["ffn_norm"] = r.get(n("ffn_norm.weight", "post_attention_layernorm.weight"))
    for site in ("attn", "ffn"):
        for part in ("fn", "base", "scale"):
            sd[f"hc_{site}.{part}"] = r.get(f"{site}_hc.{part}" if hf else f"hc_{site}_{part}").float()
    return sd, {"ratio": ratio, "csa": csa, "hash_routing": hash_routing, "n_experts": n_experts}


def load_block(src, layer: int, cfg: V4Config, *, naming: str | None = None, simulate_quant: bool = True,
               dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
    """A :class:`~v4kernels.layers.block.V4Block` holding checkpoint block ``layer`` (read lazily:
    only this block's tensors are loaded). The layer kind (ratio, CSA or HCA, hash routing,
    expert count) comes from the checkpoint."""
    from .block import V4Block

    sd, info = block_state_dict(src, layer, cfg, naming)
    blk = V4Block(cfg, info["ratio"], info["n_experts"], info["hash_routing"], csa=info["csa"], simulate_quant=simulate_quant,
                  dtype=dtype, weights=sd, device=device)
    blk.layer_id = layer
    return blk
