"""Loading decoder blocks from checkpoint shards written here: DeepSeek's release naming and
formats (FP8 + UE8M0 scales, FP4 experts as int8, bf16 wo_a) and the Hugging Face DeepseekV4
naming (renamed, experts fused into gate_up_proj / down_proj)."""
from __future__ import annotations

import json
import re

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from v4kernels.layers.block import V4Block  # noqa: E402
from v4kernels.layers.config import V4Config  # noqa: E402
from v4kernels.layers.weights import SafetensorsSource, block_state_dict, detect_naming, load_block  # noqa: E402

TINY = V4Config(dim=256, n_heads=4, q_lora_rank=128, o_groups=2, o_lora_rank=64, index_topk=8,
                n_routed_experts=4, moe_inter_dim=128, route_scale=1.5, index_n_heads=4, vocab_size=1000)
SMALL = V4Config(dim=64, n_heads=4, q_lora_rank=32, o_groups=2, o_lora_rank=16, index_topk=4, n_routed_experts=4,
                 moe_inter_dim=32, route_scale=1.5, head_dim=32, rope_head_dim=8, window_size=8, index_n_heads=2,
                 index_head_dim=16, n_activated_experts=2, vocab_size=100, hc_mult=2)


def _e8m0_if_pow2(s: torch.Tensor) -> torch.Tensor:
    m, _ = torch.frexp(s)
    return s.to(torch.float8_e8m0fnu) if bool((m == 0.5).all()) else s


def release_names(blk: V4Block, layer: int) -> dict[str, torch.Tensor]:
    """The block's weights as DeepSeek's release names them (SPEC §4.9), written out by hand."""
    sd, p, out = blk.state_dict(), f"layers.{layer}.", {}

    def lin(ours: str, theirs: str) -> None:
        w = sd[ours + ".weight"]
        out[p + theirs + ".weight"] = w.view(torch.int8) if w.dtype == torch.uint8 else w
        if ours + ".scale" in sd:
            out[p + theirs + ".scale"] = _e8m0_if_pow2(sd[ours + ".scale"])

    lin("attn.wq_a", "attn.wq_a")
    out[p + "attn.q_norm.weight"] = sd["attn.q_norm"]
    lin("attn.wq_b", "attn.wq_b")
    lin("attn.wkv", "attn.wkv")
    out[p + "attn.kv_norm.weight"] = sd["attn.kv_norm"]
    out[p + "attn.wo_a.weight"] = sd["attn.wo_a"].flatten(0, 1)
    lin("attn.wo_b", "attn.wo_b")
    out[p + "attn.attn_sink"] = sd["attn.attn_sink"]
    for comp, theirs in (("compressor", "attn.compressor"), ("index_compressor", "attn.indexer.compressor")):
        if f"attn.{comp}.ape" in sd:
            for k in ("wkv", "wgate"):
                out[f"{p}{theirs}.{k}.weight"] = sd[f"attn.{comp}.{k}"]
            out[f"{p}{theirs}.ape"] = sd[f"attn.{comp}.ape"]
            out[f"{p}{theirs}.norm.weight"] = sd[f"attn.{comp}.norm"]
    if "attn.index_wq_b.weight" in sd:
        lin("attn.index_wq_b", "attn.indexer.wq_b")
        out[p + "attn.indexer.weights_proj.weight"] = sd["attn.index_weights_proj"]
    out[p + "ffn.gate.weight"] = sd["ffn.gate"]
    if "ffn.tid2eid" in sd:
        out[p + "ffn.gate.tid2eid"] = sd["ffn.tid2eid"].long()
    else:
        out[p + "ffn.gate.bias"] = sd["ffn.bias"]
    for wn in ("w1", "w3", "w2"):
        for e in range(sd["ffn.gate"].shape[0]):
            w = sd[f"ffn.{wn}"][e]
            out[f"{p}ffn.experts.{e}.{wn}.weight"] = w.view(torch.int8) if w.dtype == torch.uint8 else w
            if f"ffn.{wn}_scale" in sd:
                out[f"{p}ffn.experts.{e}.{wn}.scale"] = _e8m0_if_pow2(sd[f"ffn.{wn}_scale"][e])
    for ours, wn in (("s1", "w1"), ("s3", "w3"), ("s2", "w2")):
        out[f"{p}ffn.shared_experts.{wn}.weight"] = sd[f"ffn.{ours}"]
        if f"ffn.{ours}_scale" in sd:
            out[f"{p}ffn.shared_experts.{wn}.scale"] = _e8m0_if_pow2(sd[f"ffn.{ours}_scale"])
    out[p + "attn_norm.weight"] = sd["attn_norm"]
    out[p + "ffn_norm.weight"] = sd["ffn_norm"]
    for site in ("attn", "ffn"):
        for part in ("fn", "base", "scale"):
            out[f"{p}hc_{site}_{part}"] = sd[f"hc_{site}.{part}"]
    return {k: v.contiguous() for k, v in out.items()}


# transformers 5.23 conversion_mapping "deepseek_v4" renames (release -> HF), in order
HF_RENAMES = [
    (r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."), (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"\.attn_norm\.", ".input_layernorm."), (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_attn_fn", ".attn_hc.fn"), (r"\.hc_attn_base", ".attn_hc.base"), (r"\.hc_attn_scale", ".attn_hc.scale"),
    (r"\.hc_ffn_fn", ".ffn_hc.fn"), (r"\.hc_ffn_base", ".ffn_hc.base"), (r"\.hc_ffn_scale", ".ffn_hc.scale"),
    (r"\.attn_sink", ".sinks"), (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."), (r"\.norm\.", ".kv_norm."), (r"\.ape", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."), (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."), (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."), (r"\.wo_b\.", ".o_b_proj."), (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias", ".gate.e_score_correction_bias"), (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."), (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
]


def hf_names(release: dict[str, torch.Tensor], layer: int, n_experts: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in release.items():
        if ".experts." in k and ".shared_experts." not in k:
            continue
        for pat, rep in HF_RENAMES:
            k = re.sub(pat, rep, k)
        out["model." + k] = v
    p = f"layers.{layer}.ffn.experts."
    w1 = torch.stack([release[f"{p}{e}.w1.weight"] for e in range(n_experts)])
    w3 = torch.stack([release[f"{p}{e}.w3.weight"] for e in range(n_experts)])
    out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat((w1, w3), dim=1)
    out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([release[f"{p}{e}.w2.weight"] for e in range(n_experts)])
    return out


def _write_shards(tensors: dict[str, torch.Tensor], path) -> None:
    keys = sorted(tensors)
    half = len(keys) // 2
    wmap = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        fn = f"model-{i + 1:05d}-of-00002.safetensors"
        safetensors_torch.save_file({k: tensors[k] for k in part}, str(path / fn))
        wmap.update((k, fn) for k in part)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))


def _run(blk: V4Block, cfg: V4Config, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    h = torch.randn(1, 12, cfg.hc_mult, cfg.dim, generator=g).to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=g)
    cache = blk.attn.new_cache(1, 12)
    with torch.inference_mode():
        a = blk(h[:, :11], cache, 0, ids[:, :11])
        b = blk(h[:, 11:], cache, 11, ids[:, 11:])
    return torch.cat((a, b), dim=1)


@pytest.mark.parametrize("ratio,hash_routing", [(4, True), (128, False)], ids=["csa_hash", "hca_routed"])
def test_release_shards(tmp_path, ratio, hash_routing):
    blk = V4Block(TINY, ratio, n_experts=8, hash_routing=hash_routing, seed=5)
    rel = release_names(blk, 7)
    assert rel["layers.7.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert rel["layers.7.ffn.experts.0.w1.weight"].dtype == torch.int8
    _write_shards(rel, tmp_path)
    src = SafetensorsSource(tmp_path)
    assert detect_naming(src) == "release"
    got = load_block(src, 7, TINY)
    assert got.attn.ratio == ratio and got.attn.csa == (ratio == 4) and got.ffn.hash_routing == hash_routing
    assert got.attn.wq_a.weight.dtype == torch.float8_e4m3fn and got.ffn.w1.dtype == torch.uint8
    assert torch.equal(_run(got, TINY), _run(blk, TINY))
    with pytest.raises(KeyError, match="layers.3.attn.wq_a.weight"):
        block_state_dict(src, 3, TINY)


def test_release_fp8_wo_a_is_dequantised():
    blk = V4Block(TINY, 128, n_experts=8, hash_routing=False, seed=5)
    rel = release_names(blk, 0)
    w = rel["layers.0.attn.wo_a.weight"].float()
    s = torch.full((-(-w.shape[0] // 128), -(-w.shape[1] // 128)), 2.0**-6)
    rel["layers.0.attn.wo_a.weight"] = (w / 2.0**-6).to(torch.float8_e4m3fn)
    rel["layers.0.attn.wo_a.scale"] = s.to(torch.float8_e8m0fnu)
    sd, _ = block_state_dict(rel, 0, TINY)
    want = (rel["layers.0.attn.wo_a.weight"].float() * 2.0**-6).to(torch.bfloat16)
    assert sd["attn.wo_a"].dtype == torch.bfloat16 and torch.equal(sd["attn.wo_a"].flatten(0, 1), want)


@pytest.mark.parametrize("ratio,csa", [(4, True), (8, False)], ids=["csa4", "hca8"])
def test_hf_shards(tmp_path, ratio, csa):
    blk = V4Block(SMALL, ratio, n_experts=4, hash_routing=not csa, seed=6, csa=csa, simulate_quant=False,
                  dtype=torch.float32)
    hf = hf_names(release_names(blk, 1), 1, 4)
    assert "model.layers.1.self_attn.q_a_proj.weight" in hf and "model.layers.1.mlp.experts.gate_up_proj" in hf
    if csa:
        assert "model.layers.1.self_attn.compressor.indexer.position_bias" in hf
    _write_shards(hf, tmp_path)
    src = SafetensorsSource(tmp_path)
    assert detect_naming(src) == "hf"
    got = load_block(src, 1, SMALL, simulate_quant=False, dtype=torch.float32)
    assert got.attn.ratio == ratio and got.attn.csa == csa
    assert torch.equal(_run(got, SMALL, torch.float32), _run(blk, SMALL, torch.float32))
