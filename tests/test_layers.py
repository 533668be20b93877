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


def test_demo_parity_judges_moe_experts_at_its_input_precision(monkeypatch):
    """moe_experts rounds every linear output to x.dtype: an fp32 result from bf16 x may differ
    from the reference by one bf16 ulp (a rounding flip), which the fp32 table must not judge;
    any other op keeps its output dtype's tolerance, and a bigger error still fails."""
    from v4kernels import _registry as R
    from v4kernels.demo import per_op_parity

    want = torch.full((1, 8), -0.0495605, dtype=torch.float32)
    one_ulp = want.clone()
    one_ulp[0, 3] -= 2.0**-12  # one bf16 ulp at this magnitude
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    monkeypatch.setattr(R, "reference_kernel", lambda op: (lambda *a: want))
    for op, got, ok in (("moe_experts", one_ulp, True), ("hc_head", one_ulp, False),
                        ("moe_experts", want + 0.05, False)):
        row = per_op_parity([(op, "cpu", (x,), got)])[(op, "cpu")]
        assert row["ok"] is ok, (op, row)


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


# ---------------------------------------------------------------------------------------------
# generic (small-model) shapes, model dtype, chunks, per-sequence positions, construction
# ---------------------------------------------------------------------------------------------
import time  # noqa: E402

import pytest  # noqa: E402

from v4kernels.layers.attention import AttentionCache, V4Attention  # noqa: E402
from v4kernels.layers.block import V4Block  # noqa: E402

# the shapes model tests use: head dim 32, 8 rope dims, indexer 2 heads x 16, window 8, top-4,
# hc_mult 2; CSA ratio 4 (overlapping windows), HCA ratio 8
SMALL = V4Config(dim=64, n_heads=4, q_lora_rank=32, o_groups=2, o_lora_rank=16, index_topk=4, n_routed_experts=4,
                 moe_inter_dim=32, route_scale=1.5, head_dim=32, rope_head_dim=8, window_size=8, index_n_heads=2,
                 index_head_dim=16, n_activated_experts=2, vocab_size=100, hc_mult=2)
KINDS = [(0, None), (4, None), (8, None), (8, True)]  # window only, CSA 4, HCA 8, CSA 8
KIND_IDS = ["swa", "csa4", "hca8", "csa8"]


def _x(b: int, s: int, dtype=torch.float32, seed: int = 0, dim: int = SMALL.dim) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, dim, generator=g).to(dtype)


@pytest.mark.parametrize("ratio,csa", KINDS, ids=KIND_IDS)
def test_fp32_end_to_end_and_cache_dtype(ratio, csa):
    attn = V4Attention(SMALL, ratio, seed=2, simulate_quant=False, csa=csa, dtype=torch.float32)
    cache = attn.new_cache(2, 40)
    assert cache.kv.dtype == torch.float32
    assert cache.index_keys is None or cache.index_keys.dtype == torch.float32
    x = _x(2, 21)
    with torch.inference_mode():
        y = attn(x[:, :20], cache, 0)
        z = attn(x[:, 20:], cache, 20)  # fp32 decode (used to raise TypeError on the bf16 cache)
    assert y.dtype == z.dtype == torch.float32 and torch.isfinite(z).all()
    with pytest.raises(TypeError, match="cache holds torch.float32"):
        attn(x[:, :1].bfloat16(), cache, 21)
    assert cache.pos == 21  # a failing call leaves the cache unchanged


@pytest.mark.parametrize("ratio,csa", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("chunk", [2, 5, 11])
def test_chunk_equals_decode_steps(ratio, csa, chunk):
    """A chunk of tokens continuing a sequence gives what the same tokens give one by one."""
    attn = V4Attention(SMALL, ratio, seed=3, simulate_quant=False, csa=csa, dtype=torch.float32)
    x = _x(2, 13 + chunk, seed=1)
    with torch.inference_mode():
        c1, c2 = attn.new_cache(2, 40), attn.new_cache(2, 40)
        attn(x[:, :13], c1, 0)
        attn(x[:, :13], c2, 0)
        got = attn(x[:, 13:], c1, 13)
        want = torch.cat([attn(x[:, p : p + 1], c2, p) for p in range(13, 13 + chunk)], dim=1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the caches agree afterwards, and so does the next step
        torch.testing.assert_close(c1.kv, c2.kv, rtol=1e-6, atol=1e-6)
        nxt = _x(2, 1, seed=9)
        torch.testing.assert_close(attn(nxt, c1, 13 + chunk), attn(nxt, c2, 13 + chunk), rtol=1e-5, atol=1e-5)


def test_chunk_equals_decode_steps_v4_dims_bf16():
    """Same on V4's dims (head dim 512, indexer 64x128, FP8/FP4 simulation), bf16."""
    attn = V4Attention(TINY, 4, seed=1)
    x = _x(1, 140, torch.bfloat16, dim=TINY.dim)
    with torch.inference_mode():
        c1, c2 = attn.new_cache(1, 140), attn.new_cache(1, 140)
        attn(x[:, :130], c1, 0)
        attn(x[:, :130], c2, 0)
        got = attn(x[:, 130:], c1, 130).float()
        want = torch.cat([attn(x[:, p : p + 1], c2, p) for p in range(130, 140)], dim=1).float()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cos > 0.9999 and (got - want).abs().max() < 0.05 * want.abs().max(), float(cos)


@pytest.mark.parametrize("ratio,csa", KINDS, ids=KIND_IDS)
def test_sequences_at_different_positions(ratio, csa):
    """Rows of one batch at different positions (prompts prefilled separately, then stacked)
    give what each sequence gives alone, for decode steps and chunks."""
    attn = V4Attention(SMALL, ratio, seed=4, simulate_quant=False, csa=csa, dtype=torch.float32)
    xa, xb = _x(1, 30, seed=5), _x(1, 30, seed=6)
    with torch.inference_mode():
        ca, cb = attn.new_cache(1, 40), attn.new_cache(1, 40)
        attn(xa[:, :9], ca, 0)
        attn(xb[:, :14], cb, 0)
        both = AttentionCache.stack([ca, cb])
        assert both.pos == [9, 14]
        # decode step, then a 4-token chunk, with per-row positions
        y1 = attn(torch.cat((xa[:, 9:10], xb[:, 14:15])), both, [9, 14])
        y2 = attn(torch.cat((xa[:, 10:14], xb[:, 15:19])), both, [10, 15])
        ra1, rb1 = attn(xa[:, 9:10], ca, 9), attn(xb[:, 14:15], cb, 14)
        ra2, rb2 = attn(xa[:, 10:14], ca, 10), attn(xb[:, 15:19], cb, 15)
    torch.testing.assert_close(y1, torch.cat((ra1, rb1)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, torch.cat((ra2, rb2)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not match the cache positions"):
        attn(_x(2, 1), both, 19)


def test_construction_from_weights_or_meta_draws_nothing():
    flash = V4Config.flash()
    t = time.perf_counter()
    meta = V4Attention(flash, 4, device="meta")
    meta_s = time.perf_counter() - t
    assert meta.wq_b.weight.is_meta and meta.wq_b.weight.dtype == torch.float8_e4m3fn
    blk = V4Block(flash, 4, n_experts=256, hash_routing=False, device="meta")
    assert blk.ffn.w1.is_meta and blk.ffn.w1.shape == (256, flash.moe_inter_dim, flash.dim // 2)
    # a layer built from a state dict reproduces the layer it came from, without random init
    src = V4Attention(TINY, 4, seed=3)
    t = time.perf_counter()
    again = V4Attention(TINY, 4, seed=99, weights=src.state_dict())
    weights_s = time.perf_counter() - t
    assert meta_s < 0.5 and weights_s < 0.5, (meta_s, weights_s)
    x = _x(1, 9, torch.bfloat16, dim=TINY.dim)
    with torch.inference_mode():
        assert torch.equal(src(x, src.new_cache(1, 9), 0), again(x, again.new_cache(1, 9), 0))
    bad = dict(src.state_dict())
    bad.pop("attn_sink")
    with pytest.raises(KeyError, match="missing \\['attn_sink'\\]"):
        V4Attention(TINY, 4, weights=bad)


def test_small_block_fp32():
    blk = V4Block(SMALL, 8, n_experts=4, hash_routing=True, simulate_quant=False, dtype=torch.float32)
    cache = blk.attn.new_cache(1, 24)
    h = _x(1, 17).unsqueeze(2).expand(1, 17, SMALL.hc_mult, SMALL.dim).contiguous()
    ids = torch.randint(0, SMALL.vocab_size, (1, 17))
    with torch.inference_mode():
        out = blk(h[:, :16], cache, 0, ids[:, :16])
        out2 = blk(h[:, 16:], cache, 16, ids[:, 16:])
    assert out.dtype == out2.dtype == torch.float32 and torch.isfinite(out2).all()
