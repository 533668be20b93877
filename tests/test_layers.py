"""End-to-end checks of the V4 layers composed from the ops: cache layouts, index generation and
incremental state agree between a one-shot prefill and prefill-then-decode."""
from __future__ import annotations

import torch

from v4kernels.demo import DemoModel, run_demo
from v4kernels.layers.config import V4Config

TINY = V4Config(dim=256, n_heads=4, q_lora_rank=128, o_groups=2, o_lora_rank=64, index_topk=8,
                n_routed_experts=8, moe_inter_dim=128, route_scale=1.5, index_n_heads=4, vocab_size=1000)


def _inputs(total: int, batch: int = 1):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, TINY.vocab_size, (batch, total), generator=g)
    emb = torch.randn(batch, total, TINY.dim, generator=g).to(torch.bfloat16)
    h = emb.unsqueeze(2).expand(batch, total, TINY.hc_mult, TINY.dim).contiguous()
    return ids, h


def _decode_matches_prefill(kv_fp8: bool) -> None:
    total = 139  # crosses CSA (4) and HCA (128) window closes and the 128-token window
    ids, h = _inputs(total)
    one_shot = DemoModel("flash", 8, 1, total, kv_fp8, 0, TINY)
    with torch.inference_mode():
        full = one_shot.step(h, 0, ids)
    inc = DemoModel("flash", 8, 1, total, kv_fp8, 0, TINY)
    split = 129
    with torch.inference_mode():
        outs = [inc.step(h[:, :split], 0, ids[:, :split])]
        for pos in range(split, total):
            outs.append(inc.step(h[:, pos : pos + 1], pos, ids[:, pos : pos + 1]))
    got = torch.cat(outs, dim=1).float()
    ref = full.float()
    cos = torch.nn.functional.cosine_similarity(got[0, split:].flatten(), ref[0, split:].flatten(), dim=0)
    assert cos > 0.999, f"decode after prefill diverges from one-shot prefill: cosine {cos:.6f}"
    assert torch.equal(got[:, :split], ref[:, :split]) or torch.allclose(got[:, :split], ref[:, :split], atol=0.05)


def test_decode_matches_one_shot_prefill_bf16_cache():
    _decode_matches_prefill(kv_fp8=False)


def test_decode_matches_one_shot_prefill_fp8_cache():
    _decode_matches_prefill(kv_fp8=True)


def test_demo_runs_and_reports():
    r = run_demo(prefill=40, decode=3, n_experts=8, config=TINY)
    assert r["parity"]["ok"], r["parity"]
    assert "sparse_attn" in r["decode_usage"] and "indexer_topk" in r["prefill_usage"]
    assert len(r["decode_s"]) == 3 and all(b > 0 for b in r["cache_bytes"])


def test_hf_variant_without_quant_simulation_differs_slightly():
    from v4kernels.layers.attention import V4Attention

    total = 40
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, total, TINY.dim, generator=g).to(torch.bfloat16)
    outs = []
    for sim in (True, False):
        attn = V4Attention(TINY, 4, seed=1, simulate_quant=sim)
        with torch.inference_mode():
            outs.append(attn(x, attn.new_cache(1, total), 0).float())
    cos = torch.nn.functional.cosine_similarity(outs[0].flatten(), outs[1].flatten(), dim=0)
    assert not torch.equal(outs[0], outs[1]) and cos > 0.98, float(cos)
