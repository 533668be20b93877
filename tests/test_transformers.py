"""v4kernels.integrations.transformers against transformers' own DeepSeek-V4 (eager) code.

A tiny random model with one layer of each kind (sliding-only, CSA, HCA), a hash-routed and two
routed MoE layers, built once per module; ``sinks``, ``position_bias``, ``tid2eid``, the router
bias, the mHC bases and the norm weights are randomised (HF initialises several of them to zero
or one, which would hide wrong wiring). Prompt lengths 1 and 7 leave the compressor windows
partial, 40 closes HCA windows (ratio 8) and 300 gives the indexer 75 candidates for top-4.
A second model at V4-Flash attention widths (head_dim 512, rope 64, indexer 64 x 128,
hc_mult 4) checks the same path at the real head sizes; a bf16 copy checks that the bf16 [HF]
variants run on the CPU kernels. Exact bf16 numerics are pinned op by op (``test_hf_variant_*``).

Tolerance of the fp32 logit comparisons: both sides compute the same fp32 formula; they differ
only in fp32 rounding order (GEMM blocking, the softmax and sum order, rsqrt applied before vs
after the mHC GEMV). Measured differences are ~1e-7..1e-6 on logits of magnitude ~0.5; the bound
``2e-5`` is ~20x that and still ~4 orders of magnitude below any wiring error (a wrong index list,
mask, rope table or state update moves the logits by >= 1e-2).

The indexer has 8 heads (not 2): with 2 heads, many compressed entries score exactly 0 (every
head's ReLU is zero) and top-k ties are then broken differently (v4kernels takes the lower
index, ``torch.topk`` leaves tie order unspecified).
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
M = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")

import v4kernels as v4k  # noqa: E402
from v4kernels.integrations import transformers as v4k_hf  # noqa: E402

TOL = 2e-5
VOCAB, E = 97, 4
LENGTHS = (1, 7, 40, 300)
PARTS = ("attention", "mhc", "moe", "norm")


def make_config(**over) -> "transformers.DeepseekV4Config":
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        head_dim=32, q_lora_rank=32, qk_rope_head_dim=16, n_routed_experts=E, num_experts_per_tok=2, hc_mult=2,
        sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=8, index_head_dim=16, index_topk=4,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe"], max_position_embeddings=4096,
        rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256,
                         "beta_fast": 32, "beta_slow": 1},
        attn_implementation="eager", pad_token_id=0,
    )
    kw.update(over)
    return transformers.DeepseekV4Config(**kw)


def make_model(seed: int = 0, **over) -> torch.nn.Module:
    cfg = make_config(**over)
    n_experts = cfg.n_routed_experts
    torch.manual_seed(seed)
    model = transformers.DeepseekV4ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(t: torch.Tensor, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return torch.randn(t.shape, generator=g) * scale + shift

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, M.DeepseekV4Attention):
                mod.sinks.copy_(rnd(mod.sinks))
            if isinstance(mod, (M.DeepseekV4CSACompressor, M.DeepseekV4HCACompressor, M.DeepseekV4Indexer)):
                mod.position_bias.copy_(rnd(mod.position_bias, 0.5))
            if isinstance(mod, M.DeepseekV4HashRouter):
                mod.tid2eid.copy_(torch.randint(0, n_experts, mod.tid2eid.shape, generator=g))
            if isinstance(mod, M.DeepseekV4TopKRouter):
                mod.e_score_correction_bias.copy_(rnd(mod.e_score_correction_bias, 0.1))
            if isinstance(mod, M.DeepseekV4HyperConnection):
                mod.base.copy_(rnd(mod.base, 0.5))
                mod.scale.copy_(1 + torch.rand(3, generator=g))
            if isinstance(mod, M.DeepseekV4HyperHead):
                mod.hc_base.copy_(rnd(mod.hc_base, 0.5))
            if isinstance(mod, M.DeepseekV4RMSNorm):
                mod.weight.copy_(rnd(mod.weight, 0.2, 1.0))
    model.set_experts_implementation("eager")
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


def tokens(n: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.fixture(scope="module")
def eager_prefill(model):
    """HF eager logits of the tiny model for every prompt length (computed once)."""
    return {n: logits(model, tokens(n, n), use_cache=False) for n in LENGTHS}


# ----------------------------------------------------------------------------- prefill parity
def test_prefill_logits_match_hf_eager(model, eager_prefill):
    v4k_hf.apply(model)
    try:
        with v4k.track_usage() as usage:
            out = {n: logits(model, tokens(n, n), use_cache=False) for n in LENGTHS}
    finally:
        v4k_hf.remove(model)
    for n in LENGTHS:
        assert (out[n] - eager_prefill[n]).abs().max().item() < TOL, n
    # the native CPU kernels ran, and every op that has one ran on it (no silent fallback)
    for op in ("sparse_attn", "hc_pre", "hc_post", "hc_head", "moe_experts", "grouped_linear", "compress_kv",
               "indexer_topk"):
        assert usage.get((op, "cpu"), 0) > 0, (op, usage)
    assert {op for op, _ in usage} >= {"moe_gate", "rms_norm", "apply_rope"}, usage
    for op, backend in usage:
        assert backend == "cpu" or v4k.available_backends(op)["cpu"], (op, backend)
    # remove() restores eager exactly
    for n in (7, 40):
        assert torch.equal(logits(model, tokens(n, n), use_cache=False), eager_prefill[n])


def test_chunked_prefill_and_decode_through_the_cache(model, eager_prefill, monkeypatch):
    from transformers.cache_utils import DynamicCache

    ids = tokens(40, 40)
    v4k_hf.apply(model)
    try:
        cache = DynamicCache(config=model.config)
        parts = [logits(model, ids[:, a:b], past_key_values=cache, use_cache=True)
                 for a, b in ((0, 13), (13, 14), (14, 30), (30, 31), (31, 40))]
        assert any(type(layer).__name__.startswith("V4k") for layer in cache.layers)
        # the attention's per-head work in query chunks (long prompts) gives the same logits
        monkeypatch.setattr(v4k_hf, "_Q_CHUNK", 7)
        split = logits(model, tokens(300, 300), use_cache=False)
    finally:
        v4k_hf.remove(model)
    assert (torch.cat(parts, 1) - eager_prefill[40]).abs().max().item() < TOL
    assert (split - eager_prefill[300]).abs().max().item() < TOL


def test_generate_24_greedy_tokens_identical(model):
    ids = tokens(21, 4)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=24, do_sample=False)
        v4k_hf.apply(model)
        try:
            out = model.generate(ids, max_new_tokens=24, do_sample=False)
        finally:
            v4k_hf.remove(model)
    assert torch.equal(out, ref)


def test_batch2_left_padding(model):
    ids = torch.zeros(2, 19, dtype=torch.long)
    mask = torch.zeros(2, 19, dtype=torch.long)
    ids[0], mask[0] = tokens(19, 5)[0], 1
    ids[1, 6:], mask[1, 6:] = tokens(13, 6)[0], 1
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref_pf = logits(model, ids, attention_mask=mask, use_cache=False)
        ref = model.generate(ids, attention_mask=mask, **kw)
        v4k_hf.apply(model)
        try:
            out_pf = logits(model, ids, attention_mask=mask, use_cache=False)
            out = model.generate(ids, attention_mask=mask, **kw)
        finally:
            v4k_hf.remove(model)
    # every row, padded positions included: their hidden states feed the compressors in HF too
    assert (out_pf - ref_pf).abs().max().item() < TOL
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) < TOL


def test_bf16_model_runs_on_the_cpu_kernels():
    """A bf16 model: every op that has a CPU kernel runs on it (the [HF] bf16 variants included,
    no fallback to the reference), and the logits stay at bf16 distance from HF eager (exact
    bf16 numerics are pinned op by op below; end to end, GEMM sum order flips bf16 roundings,
    ~1e-3 mean / ~3e-2 max on logits of magnitude ~0.6)."""
    m = make_model(3).to(torch.bfloat16)
    ids = tokens(40, 41)
    ref = logits(m, ids, use_cache=False)
    v4k_hf.apply(m)
    try:
        with v4k.track_usage() as usage:
            out = logits(m, ids, use_cache=False)
    finally:
        v4k_hf.remove(m)
    for op in ("sparse_attn", "compress_kv", "indexer_topk", "moe_experts", "grouped_linear", "hc_pre"):
        assert usage.get((op, "cpu"), 0) > 0, (op, usage)
    for op, backend in usage:
        assert backend == "cpu" or v4k.available_backends(op)["cpu"], (op, backend)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref.float()).abs().mean().item() < 1e-2


# ----------------------------------------------------------------------------- V4-Flash widths
def test_v4_flash_widths_match_hf_eager():
    """Two layers (CSA, HCA) at V4-Flash attention widths: head_dim 512 with rope 64, indexer
    64 heads x 128, hc_mult 4; small hidden size, experts and vocabulary; 48-token prompt (12 CSA
    candidates for top-8, 3 closed HCA windows), then 3 decode steps through the cache."""
    from transformers.cache_utils import DynamicCache

    wide = make_model(
        5, hidden_size=256, num_hidden_layers=2, num_attention_heads=2, head_dim=512, qk_rope_head_dim=64,
        q_lora_rank=128, o_groups=2, o_lora_rank=128, index_n_heads=64, index_head_dim=128, index_topk=8,
        hc_mult=4, sliding_window=16, moe_intermediate_size=64,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        layer_types=["compressed_sparse_attention", "heavily_compressed_attention"], mlp_layer_types=["hash_moe", "moe"],
    )
    ids = tokens(51, 51)
    ref = logits(wide, ids, use_cache=False)
    v4k_hf.apply(wide)
    try:
        with v4k.track_usage() as usage:
            cache = DynamicCache(config=wide.config)
            out = [logits(wide, ids[:, :48], past_key_values=cache, use_cache=True)]
            out += [logits(wide, ids[:, i : i + 1], past_key_values=cache, use_cache=True) for i in range(48, 51)]
    finally:
        v4k_hf.remove(wide)
    err = (torch.cat(out, 1) - ref).abs().max().item()
    assert err < TOL * max(1.0, ref.abs().max().item()), err
    for op in ("sparse_attn", "compress_kv", "indexer_topk", "hc_pre", "moe_experts"):
        assert usage.get((op, "cpu"), 0) > 0, (op, usage)


# ----------------------------------------------------------------------------- apply / remove
def test_instances_only_two_models_coexist_and_idempotent(model, eager_prefill):
    other = make_model(2)
    ids = tokens(40, 40)
    r1, r2 = eager_prefill[40], logits(other, ids, use_cache=False)
    v4k_hf.apply(model)
    try:
        v4k_hf.apply(model, norm=False)  # again: replaces the selection
        v4k_hf.apply(model)
        assert v4k_hf.is_applied(model) and not v4k_hf.is_applied(other)
        assert "forward" not in vars(M.DeepseekV4Attention) or M.DeepseekV4Attention.forward.__module__ == M.__name__
        assert torch.equal(logits(other, ids, use_cache=False), r2)  # the other model stays HF eager, bit for bit
        assert (logits(model, ids, use_cache=False) - r1).abs().max().item() < TOL
    finally:
        v4k_hf.remove(model)
    v4k_hf.remove(model)  # no-op
    assert torch.equal(logits(model, ids, use_cache=False), r1)
    assert model.config._experts_implementation == "eager"
    assert not any("forward" in vars(m) for m in model.modules())


def test_each_part_alone_matches(model, eager_prefill):
    ids, ref = tokens(40, 40), eager_prefill[40]
    for part in PARTS:
        v4k_hf.apply(model, **{p: p == part for p in PARTS})
        try:
            with v4k.track_usage() as usage:
                out = logits(model, ids, use_cache=False)
        finally:
            v4k_hf.remove(model)
        assert (out - ref).abs().max().item() < TOL, part
        assert usage, part  # something of this part ran on v4kernels
    assert torch.equal(logits(model, ids, use_cache=False), ref)


def test_errors(model, monkeypatch):
    with pytest.raises(TypeError, match="deepseek_v4"):
        v4k_hf.apply(torch.nn.Linear(2, 2))
    # a cache filled by HF eager cannot be continued by v4kernels (different state layout)
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    logits(model, tokens(9, 9), past_key_values=cache, use_cache=True)
    v4k_hf.apply(model)
    try:
        with pytest.raises(ValueError, match="already holds HF-eager state"):
            logits(model, tokens(1, 10), past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="2-D"):
            logits(model, tokens(4, 10), attention_mask=torch.ones(1, 1, 4, 4), use_cache=False)
    finally:
        v4k_hf.remove(model)
    # a transformers without DeepSeek-V4
    import sys

    monkeypatch.setitem(sys.modules, "transformers.models.deepseek_v4", None)
    with pytest.raises(ImportError, match="no DeepSeek-V4 model"):
        v4k_hf.apply(model)


# ----------------------------------------------------------------------------- opt-in attention function
def test_register_attention_keeps_the_mask(model, eager_prefill):
    ids, ref = tokens(40, 40), eager_prefill[40]
    name = v4k_hf.register_attention()
    model.set_attn_implementation(name)
    try:
        out = logits(model, ids, use_cache=False)
    finally:
        model.set_attn_implementation("eager")
    assert (out - ref).abs().max().item() < TOL


def test_attention_interface_alone_drops_the_mask(model, eager_prefill):
    """The trap register_attention() avoids: an implementation registered only in
    AttentionInterface gets no mask at all from HF (causal + sliding window silently lost)."""
    from transformers import AttentionInterface

    seen = []

    def probe(module, query, key, value, attention_mask, **kw):
        seen.append(attention_mask)
        return M.eager_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("v4k_probe_only", probe)
    ids, ref = tokens(40, 40), eager_prefill[40]
    model.set_attn_implementation("v4k_probe_only")
    try:
        out = logits(model, ids, use_cache=False)
    finally:
        model.set_attn_implementation("eager")
    assert seen and all(m is None for m in seen)  # no mask reached the attention function
    assert (out - ref).abs().max().item() > 1e-3  # ... and the result is silently different
    # our function refuses to run without a mask instead of attending to the future
    q = torch.randn(1, 2, 3, 32)
    kv = torch.randn(1, 1, 3, 32)
    with pytest.raises(ValueError, match="AttentionMaskInterface"):
        v4k_hf._attention_function(model.model.layers[0].self_attn, q, kv, kv, None, scaling=1.0)


# ----------------------------------------------------------------------------- [HF] numerics variants
# Pinned against the installed transformers (5.23.0) module functions, in bf16 where the
# variants differ from v4kernels' defaults.
BF = torch.bfloat16


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 ulps of b."""
    ulp = torch.finfo(BF).eps * b.float().abs().clamp_min(torch.finfo(BF).tiny)
    return (a.float() - b.float()).abs() / ulp


def test_hf_variant_rms_norm():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 96, generator=g) * 3).to(BF)
    norm = M.DeepseekV4RMSNorm(96)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g))
        assert torch.equal(v4k.rms_norm(x, norm.weight, 1e-6, hf_rounding=True), norm(x))
        un = M.DeepseekV4UnweightedRMSNorm(1e-6)(x)
    assert torch.equal(v4k.rms_norm(x, None, 1e-6, hf_rounding=True), un)
    assert not torch.equal(v4k.rms_norm(x, None, 1e-6), un)  # the default rounds once


def test_hf_variant_rope_tables():
    cfg = make_config()
    rot = M.DeepseekV4RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 3, 32, generator=g).to(BF)
    pos = torch.arange(100, 118).view(2, 9)
    default_differs = False
    for lt in ("main", "compress"):
        cos, sin = rot(x, position_ids=pos, layer_type=lt)
        freqs = getattr(rot, f"{lt}_inv_freq")
        for inverse in (False, True):
            ref = M.apply_rotary_pos_emb(x.transpose(1, 2), cos, -sin if inverse else sin).transpose(1, 2)
            out = v4k.apply_rope(x, pos, freqs, inverse=inverse, round_tables=True)
            assert torch.equal(out, ref), (lt, inverse)
            default_differs |= not torch.equal(v4k.apply_rope(x, pos, freqs, inverse=inverse), ref)
    assert default_differs  # the default keeps fp32 tables: a different rounding at bf16


def test_hf_variant_router():
    cfg = make_config()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 64, generator=g).to(BF)
    for router in (M.DeepseekV4TopKRouter(cfg), M.DeepseekV4HashRouter(cfg)):
        with torch.no_grad():
            router.weight.copy_(torch.randn(router.weight.shape, generator=g) * 0.3)
            if isinstance(router, M.DeepseekV4HashRouter):
                router.tid2eid.copy_(torch.randint(0, E, router.tid2eid.shape, generator=g))
                tok = torch.randint(0, VOCAB, (64,), generator=g)
                ref = router.to(BF)(x, tok)
                out = v4k.moe_gate(x, router.weight, topk=2, route_scale=router.routed_scaling_factor,
                                   tid2eid=router.tid2eid, token_ids=tok, hf_eps=True, hf_routing=True,
                                   return_logits=True)
            else:
                router.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.1)
                router.weight.data = router.weight.data.to(BF)
                ref = router(x)
                out = v4k.moe_gate(x, router.weight, router.e_score_correction_bias, topk=2,
                                   route_scale=router.routed_scaling_factor, hf_eps=True, hf_routing=True,
                                   return_logits=True)
        r_logits, r_w, r_ids = ref
        w, ids, lg = out
        assert lg.dtype == BF and bool((_ulps(lg, r_logits) <= 1).all())  # one GEMM rounding
        same = (ids.long().sort(-1).values == r_ids.sort(-1).values).all(-1)
        assert same.float().mean() > 0.95  # bf16 score ties may be broken differently
        order = r_ids.argsort(-1)
        w_ref = r_w.gather(-1, order)[same].float()
        w_out = w.gather(-1, ids.long().argsort(-1))[same]
        assert bool((_ulps(w_out, w_ref) <= 1).all())


def test_hf_variant_experts_bf16_sum():
    cfg = make_config()
    ex = M.DeepseekV4Experts(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g) * 0.2)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) * 0.2)
    ex = ex.to(BF)
    ex.config._experts_implementation = "eager"
    x = torch.randn(40, 64, generator=g).to(BF)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(40)])
    w = torch.rand(40, 2, generator=g).to(BF)
    with torch.no_grad():
        ref = ex(x, ids, w)
    inter = ex.gate_up_proj.shape[1] // 2
    args = (x, w, ids, ex.gate_up_proj[:, :inter], ex.gate_up_proj[:, inter:], ex.down_proj)
    with torch.no_grad():
        out = v4k.moe_experts(*args, weight_after_w2=True, hf_rounding=True)
        default = v4k.moe_experts(*args, weight_after_w2=True)
    err_hf = _ulps(out, ref)
    assert out.dtype == BF and err_hf.median() == 0 and bool((err_hf <= 2).all())
    # the default (fp32 sum, one rounding) is a different rounding order
    assert (_ulps(default, ref) > 0).float().mean() > (err_hf > 0).float().mean()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_hf_variant_compressor_pooling(backend):
    cfg = make_config()
    comp = M.DeepseekV4HCACompressor(cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in (comp.kv_proj.weight, comp.gate_proj.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        comp.position_bias.copy_(torch.randn(comp.position_bias.shape, generator=g))
        comp.kv_norm.weight.copy_(1 + 0.2 * torch.randn(32, generator=g))
    comp = comp.to(BF)
    comp.position_bias.data = comp.position_bias.data.float()  # HF keeps it fp32
    comp.kv_norm.weight.data = comp.kv_norm.weight.data.float()
    x = torch.randn(2, 40, 64, generator=g).to(BF)
    with torch.no_grad():
        ref, _ = comp(x, None, torch.arange(40).expand(2, -1), None, 2)
    st = v4k.CompressorState.empty(2, 8, 32)
    args = (x, comp.kv_proj.weight, comp.gate_proj.weight, comp.position_bias, comp.kv_norm.weight,
            comp.rotary_emb.compress_inv_freq.float())
    with torch.no_grad(), v4k.use_backend(backend, "compress_kv"), v4k.track_usage() as usage:
        out, n = v4k.compress_kv(*args, st, ratio=8, quant="none", hf_rounding=True)
        default, _ = v4k.compress_kv(*args, v4k.CompressorState.empty(2, 8, 32), ratio=8, quant="none")
    assert usage == {("compress_kv", backend): 2}
    assert n.tolist() == [5, 5]
    err = _ulps(out, ref[:, 0])
    assert err.median() == 0 and bool((err <= 2).all())
    assert (_ulps(default, ref[:, 0]) > 0).float().mean() > (err > 0).float().mean()


def test_hf_variant_linear_bf16():
    """apply(linear=True) runs bf16 nn.Linear layers on grouped_linear: fp32 accumulation and one
    rounding, as HF's bf16 GEMM (which differs only in the order of the fp32 sum)."""
    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(256, 96, bias=False).to(BF)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 256, generator=g) * 0.1)
    x = torch.randn(3, 7, 256, generator=g).to(BF)
    with torch.no_grad():
        ref = lin(x)
        with v4k.track_usage() as usage:
            out = v4k_hf._linear_forward(lin, x)  # 21 rows: streamed by grouped_linear
        big = torch.randn(2, 50, 256, generator=g).to(BF)
        out_big, ref_big = v4k_hf._linear_forward(lin, big), lin(big)  # 100 rows: grouped_linear's panel GEMM
    assert out.dtype == BF and out.shape == ref.shape
    assert usage.get(("grouped_linear", "cpu"), 0) == 1, usage
    assert bool((_ulps(out, ref) <= 1).all()) and bool((_ulps(out_big, ref_big) <= 1).all())
    x32, lin32 = x.float(), lin.float()
    with torch.no_grad():
        assert torch.equal(v4k_hf._linear_forward(lin32, x32), lin32(x32))  # fp32 keeps torch's GEMM


@pytest.mark.parametrize("dtype", [torch.float32, BF])
def test_experts_read_fused_gate_up_in_place(dtype):
    """apply() passes the two halves of HF's fused [E, 2I, D] gate_up weight as views: the CPU
    kernel reads them in place and gives exactly what it gives on contiguous copies."""
    g = torch.Generator().manual_seed(6)
    gu = (torch.randn(4, 2 * 48, 64, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(4, 64, 48, generator=g) * 0.2).to(dtype)
    x = torch.randn(30, 64, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(30)]).to(torch.int32)
    w = torch.rand(30, 2, generator=g).to(dtype)
    w1, w3 = gu[:, :48], gu[:, 48:]
    assert not w1.is_contiguous()
    with v4k.track_usage() as usage:
        views = v4k.moe_experts(x, w, ids, w1, w3, w2, weight_after_w2=True, hf_rounding=True)
    copies = v4k.moe_experts(x, w, ids, w1.contiguous(), w3.contiguous(), w2, weight_after_w2=True, hf_rounding=True)
    assert usage == {("moe_experts", "cpu"): 1}
    assert torch.equal(views, copies)
    ref = v4k._registry.reference_kernel("moe_experts")(x, w.float(), ids, w1, None, w3, None, w2, None, 0.0, True,
                                                        dtype, True)
    if dtype == torch.float32:
        assert (views - ref).abs().max().item() < 1e-5
    else:  # the [HF] bf16 roundings natively: equal to the reference up to GEMM sum order
        err = _ulps(views, ref)
        assert err.median() == 0 and bool((err <= 2).all())
