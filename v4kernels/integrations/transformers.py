"""Run a Hugging Face transformers DeepSeek-V4 model on v4kernels ops.

>>> from transformers import DeepseekV4ForCausalLM          # doctest: +SKIP
>>> from v4kernels.integrations import transformers as v4k_hf  # doctest: +SKIP
>>> model = DeepseekV4ForCausalLM.from_pretrained(path, dtype="auto")  # doctest: +SKIP
>>> v4k_hf.apply(model)               # same logits, v4kernels kernels  # doctest: +SKIP
>>> model.generate(input_ids, max_new_tokens=32)  # doctest: +SKIP
>>> v4k_hf.remove(model)              # back to HF eager, bit for bit   # doctest: +SKIP

:func:`apply` binds v4kernels forwards on the *instances* of one model (other models, and the
classes, are untouched):

* ``DeepseekV4Attention``: the compressor and the lightning indexer (``compress_kv`` with the
  state in HF's cache), sparse attention over the sliding window plus the selected compressed
  entries (``sparse_attn`` with per-query index lists — O(S·k) work and memory, no dense
  ``[S, S+T]`` mask), RoPE and the grouped output projection (``grouped_linear``);
* ``DeepseekV4DecoderLayer`` (both mHC sites) and ``DeepseekV4HyperHead``: ``hc_pre`` /
  ``hc_post`` / ``hc_head``;
* ``DeepseekV4TopKRouter`` / ``DeepseekV4HashRouter``: ``moe_gate``; the experts through HF's
  ``ExpertsInterface`` (``model.set_experts_implementation("v4kernels")``): ``moe_experts``;
* ``DeepseekV4RMSNorm`` / ``DeepseekV4UnweightedRMSNorm``: ``rms_norm``.

Every op gets its [HF] numerics option (``hf_rounding`` / ``round_tables`` / ``hf_routing`` /
``hf_eps`` / ``bf16_mix``, re-derived from transformers 5.23.0), so for an fp32 model the
logits agree with HF eager up to fp32 rounding (GEMM blocking, sum order); for bf16 models the
same roundings to bf16 happen at the same places as in HF.

Semantics kept from HF eager (transformers 5.23.0) on purpose, so that outputs agree:

* the compressors run over cache *slots* (left padding included, as HF does) and place RoPE on
  compressed entry ``c`` at position ``c·ratio``; the causal limit of the compressed entries uses
  ``position_ids`` (``c < (p+1) // ratio``);
* an HCA layer at decode (one query token) sees every compressed entry, as HF's does;
* padded keys are masked in the sliding window via the 2-D ``attention_mask``.

The decode state lives in HF's ``DynamicCache``: the sliding window in HF's own layer classes,
the compressor state in subclasses of ``DeepseekV4HCACache`` / ``DeepseekV4CSACache`` (same
``_layer_type``, not registered globally) holding a :class:`v4kernels.CompressorState` per
compressor. A fresh HF cache passed in is adopted; one already filled by HF eager is refused.
"""
from __future__ import annotations

import contextvars
import types
import weakref
from typing import Any

import torch

import v4kernels as v4k

__all__ = ["apply", "remove", "is_applied", "register_attention", "TRANSFORMERS_VERSION_CHECKED"]

#: transformers version whose DeepSeek-V4 code this adapter (and the ops' [HF] options) was checked against
TRANSFORMERS_VERSION_CHECKED = "5.23.0"

_CSA, _HCA, _SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
_IMPL = "v4kernels"
#: queries per chunk of the attention's per-head work (q projection, norm, rope, sparse_attn, output)
_Q_CHUNK = 1024
#: per-forward-call context set by the model wrapper: {"pad": [B, L] bool or None}
_CALL: contextvars.ContextVar[dict | None] = contextvars.ContextVar("v4k_hf_call", default=None)


# ----------------------------------------------------------------------------- transformers access
def _hf() -> types.ModuleType:
    """The transformers DeepSeek-V4 modeling module, imported on first use."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError(
            "v4kernels.integrations.transformers needs the `transformers` package "
            f"(checked against transformers=={TRANSFORMERS_VERSION_CHECKED}): pip install transformers"
        ) from e
    try:
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as M
    except ImportError as e:
        raise ImportError(
            f"transformers {transformers.__version__} has no DeepSeek-V4 model "
            "(transformers.models.deepseek_v4.modeling_deepseek_v4); v4kernels' integration needs "
            f"transformers>={TRANSFORMERS_VERSION_CHECKED} (checked against {TRANSFORMERS_VERSION_CHECKED})"
        ) from e
    return M


def _check_model(model: Any) -> None:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if not isinstance(model, torch.nn.Module) or mt != "deepseek_v4":
        raise TypeError(
            "v4kernels.integrations.transformers: expected a transformers DeepSeek-V4 model "
            f"(config.model_type == 'deepseek_v4'), got {type(model).__name__} with model_type {mt!r}"
        )


def _base(model: torch.nn.Module, M: types.ModuleType) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, M.DeepseekV4Model):
            return m
    raise TypeError(f"v4kernels.integrations.transformers: no DeepseekV4Model inside {type(model).__name__}")


def _check_config(cfg: Any, rot: torch.nn.Module) -> None:
    op = "v4kernels.integrations.transformers.apply"
    rates = cfg.compress_rates
    if _CSA in cfg.layer_types and rates[_CSA] != 4:
        raise NotImplementedError(f"{op}: CSA layers need compress_rates['{_CSA}'] == 4 (overlapping windows), got {rates[_CSA]}")
    if _HCA in cfg.layer_types and rates[_HCA] == 4:
        raise NotImplementedError(f"{op}: HCA layers with compress rate 4 (non-overlapping) are not supported")
    for lt in rot.layer_types:
        if float(getattr(rot, f"{lt}_attention_scaling")) != 1.0:
            raise NotImplementedError(f"{op}: RoPE '{lt}' has attention_scaling != 1 (mscale); V4 uses none")
    if cfg.hidden_act != "silu" or cfg.scoring_func != "sqrtsoftplus":
        raise NotImplementedError(
            f"{op}: needs hidden_act='silu' and scoring_func='sqrtsoftplus', got {cfg.hidden_act!r}, {cfg.scoring_func!r}"
        )


# ----------------------------------------------------------------------------- cache layers
_CACHE_CLASSES: dict[str, type] = {}


def _cache_classes(M: types.ModuleType) -> dict[str, type]:
    """Subclasses of HF's HCA / CSA cache layers holding :class:`v4kernels.CompressorState`.

    They keep HF's ``_layer_type`` but are created without it (then given it), so HF's
    auto-registration in ``DYNAMIC_LAYER_TYPE_MAPPING`` is not triggered: HF eager models keep
    getting HF's own classes.
    """
    if _CACHE_CLASSES:
        return _CACHE_CLASSES

    class _V4kCompressorCacheMixin:
        """Compressed entries in ``compressed_kv[name]`` ([B, T, hd]), running state in
        ``v4k_states[name]`` (a :class:`v4kernels.CompressorState`)."""

        def __init__(self, config: Any, **kwargs: Any) -> None:
            super().__init__(config, **kwargs)
            self.v4k_states: dict[str, v4k.CompressorState] = {}

        def v4k_state(self, name: str, batch: int, ratio: int, head_dim: int, device: torch.device) -> v4k.CompressorState:
            st = self.v4k_states.get(name)
            if st is None:
                st = self.v4k_states[name] = v4k.CompressorState.empty(batch, ratio, head_dim, device)
            elif st.batch_size != batch:
                raise ValueError(f"v4kernels cache layer: holds {st.batch_size} sequences, got a batch of {batch}")
            return st

        def v4k_append(self, name: str, new: torch.Tensor) -> torch.Tensor:
            old = self.compressed_kv[name]
            if old is None:
                self.compressed_kv[name] = new
            elif new.shape[1]:
                self.compressed_kv[name] = torch.cat([old, new], dim=1)
            self.entry_count[name] += new.shape[1]
            return self.compressed_kv[name]

        def store_compression_weights(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(
                "this cache layer holds v4kernels compressor state; use it only with a model prepared by "
                "v4kernels.integrations.transformers.apply() (start a new cache after remove())"
            )

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            super().reorder_cache(beam_idx)
            for name, st in list(self.v4k_states.items()):
                idx = beam_idx.to(st.device)
                self.v4k_states[name] = v4k.CompressorState(*(t.index_select(0, idx) for t in st.tensors()))

        def reset(self) -> None:
            super().reset()
            self.v4k_states.clear()

    out = {}
    for lt, base in ((_HCA, M.DeepseekV4HCACache), (_CSA, M.DeepseekV4CSACache)):
        cls = type(f"V4k{base.__name__}", (_V4kCompressorCacheMixin, base), {"_layer_type": None, "__module__": __name__})
        cls._layer_type = lt  # set after creation: no global registration
        out[lt] = cls
    _CACHE_CLASSES.update(out)
    return out


def _adopt_cache(cache: Any, cfg: Any, M: types.ModuleType) -> None:
    """Swap the fresh HF compressor cache layers of ``cache`` for the v4kernels ones."""
    classes = _cache_classes(M)
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"v4kernels: past_key_values must be a transformers Cache with per-layer caches, got {type(cache).__name__}")
    for i, lt in enumerate(cfg.layer_types[: len(layers)]):
        if lt not in classes or isinstance(layers[i], classes[lt]):
            continue
        layer = layers[i]
        fresh = (
            isinstance(layer, (M.DeepseekV4HCACache,))
            and not layer.is_initialized
            and all(v is None for v in layer.compressed_kv.values())
        )
        if not fresh:
            raise ValueError(
                f"v4kernels: cache layer {i} ({type(layer).__name__}) already holds HF-eager state; "
                "a cache must be filled by one implementation — start a new cache after apply()/remove()"
            )
        layers[i] = classes[lt](cfg)


# ----------------------------------------------------------------------------- forwards
def _positions(position_ids: torch.Tensor, b: int, s: int) -> torch.Tensor:
    p = position_ids.to(torch.int64)
    if p.dim() == 1:
        p = p.unsqueeze(0)
    return p.expand(b, s).contiguous()


def _freqs(rot: torch.nn.Module, layer_type: str) -> torch.Tensor:
    return getattr(rot, f"{layer_type}_inv_freq").float().contiguous()


def _window_indices(b: int, s: int, p: int, window: int, start: int, pad: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """[B, S, window] rows into the window buffer (``p`` cached rows then the ``s`` new ones).

    Query ``i`` (cache slot ``start + i``) sees rows ``i+p-window+1 … i+p`` that exist and whose
    slot is not padding (HF's sliding-window causal mask, key side).
    """
    i = torch.arange(s, device=device).unsqueeze(1)
    r = i + p - (window - 1) + torch.arange(window, device=device).unsqueeze(0)  # [S, W]
    valid = (r >= 0).unsqueeze(0).expand(b, s, window)
    if pad is not None:
        slot = (start - p + r).clamp(min=0)
        valid = valid & pad[:, slot]
    return torch.where(valid, r.unsqueeze(0), -1).to(torch.int32)


def _compress(comp: torch.nn.Module, x: torch.Tensor, rot: torch.nn.Module, cache_layer: Any, name: str,
              ratio: int, eps: float) -> torch.Tensor:
    """Run one HF compressor module's math through ``compress_kv``; returns all entries so far [B, T, hd]."""
    b = x.shape[0]
    hd = comp.kv_norm.weight.shape[0]
    if cache_layer is not None:
        st = cache_layer.v4k_state(name, b, ratio, hd, x.device)
    else:
        st = v4k.CompressorState.empty(b, ratio, hd, x.device)
    entries, num_new = v4k.compress_kv(
        x, comp.kv_proj.weight, comp.gate_proj.weight, comp.position_bias.float(), comp.kv_norm.weight,
        _freqs(rot, "compress"), st, ratio=ratio, quant="none", eps=eps, hf_rounding=True,
    )
    n = int(num_new[0]) if b else 0  # every row of a batch sits at the same slot count (HF semantics)
    new = entries[:, :n]
    if cache_layer is None:
        return new
    return cache_layer.v4k_append(name, new)


def _rope_tail(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor, inverse: bool) -> None:
    """``x = apply_rope(x, ...)`` in place on a fresh per-head tensor ``x`` [B, S, H, D]: only the
    trailing ``2·len(freqs)`` rotary dims go through ``apply_rope`` (it leaves the others as they
    are), so the ``D - rope`` leading dims are not copied (at V4 widths 448 of 512)."""
    r = 2 * freqs.shape[0]
    x[..., x.shape[-1] - r :] = v4k.apply_rope(x[..., x.shape[-1] - r :], pos, freqs, inverse=inverse, round_tables=True)


def _attention_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: Any = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: Any = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    call = _CALL.get()
    if call is None:
        if attention_mask is not None:
            raise RuntimeError(
                "v4kernels: a DeepseekV4Attention prepared by apply() was called outside the model's forward with a "
                "dense attention_mask; call the model (it passes the 2-D padding mask), or remove() first"
            )
        call = {"pad": None}
    cfg = self.config
    b, s, _ = hidden_states.shape
    h, hd = self.num_heads, self.head_dim
    eps = cfg.rms_norm_eps
    rot = self.__dict__["_v4k_rot"]()
    pos = _positions(position_ids, b, s)
    freqs = _freqs(rot, self.rope_layer_type)

    q_res = self.q_a_norm(self.q_a_proj(hidden_states))
    kv = self.kv_norm(self.kv_proj(hidden_states))
    kv = v4k.apply_rope(kv, pos, freqs, round_tables=True)

    cache_layer = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
    if cache_layer is not None:
        win = cache_layer.update(kv.unsqueeze(1), kv.unsqueeze(1))[0][:, 0]  # [B, P+S, hd] (HF keeps window-1 rows)
        start = cache_layer.cumulative_length - s
    else:
        win, start = kv, 0
    p = win.shape[1] - s
    pad = call["pad"]
    if pad is not None and pad.shape[1] != start + s:
        raise ValueError(
            f"v4kernels: attention_mask covers {pad.shape[1]} positions but the cache holds {start} + {s} new tokens"
        )
    idx = _window_indices(b, s, p, self.sliding_window, start, pad, hidden_states.device)
    kvbuf = win
    if self.compressor is not None:
        comp = self.compressor
        ratio = comp.compress_rate
        entries = _compress(comp, hidden_states, comp.rotary_emb, cache_layer, "compressor", ratio, eps)
        t = entries.shape[1]
        off = win.shape[1]
        if t:
            kvbuf = torch.cat([win, entries], dim=1)
            if self.layer_type == _CSA:
                ix = comp.indexer
                keys = _compress(ix, hidden_states, ix.rotary_emb, cache_layer, "indexer", ratio, eps)
                qi = ix.q_b_proj(q_res).view(b, s, ix.num_heads, ix.head_dim)
                qi = v4k.apply_rope(qi, pos, _freqs(ix.rotary_emb, "compress"), round_tables=True)
                sc = ix.scorer
                w = sc.weights_proj(hidden_states).float() * (sc.weights_scaling * sc.softmax_scale)
                cidx = v4k.indexer_topk(qi, w, keys, pos, ix.index_topk, ratio=ratio, offset=off)
            else:
                c = torch.arange(t, device=hidden_states.device)
                if s == 1:
                    # HF's HCA decode step applies no causal limit to the compressed entries
                    visible = torch.ones(b, s, t, dtype=torch.bool, device=c.device)
                else:
                    visible = c.view(1, 1, t) < ((pos + 1) // ratio).unsqueeze(-1)
                cidx = torch.where(visible, c + off, -1).to(torch.int32)
            idx = torch.cat([idx, cidx], dim=-1)
        elif self.layer_type == _CSA:
            # HF still runs the indexer's compressor (its state advances) when no entry exists yet
            _compress(comp.indexer, hidden_states, comp.indexer.rotary_emb, cache_layer, "indexer", ratio, eps)
    kvbuf = kvbuf.to(q_res.dtype).contiguous()
    sinks = self.sinks.float()
    g = cfg.o_groups
    wa = self.o_a_proj.weight
    wa = wa.view(g, -1, wa.shape[-1])
    # Queries are independent once the KV buffer and their index lists exist: the per-head
    # tensors ([.., H, hd] — q, its norm and rope, the attention output) live one chunk of
    # queries at a time, so a long prefill holds O(chunk·H·hd) of them, not O(S·H·hd).
    outs = []
    for c0 in range(0, s, _Q_CHUNK):
        c1 = min(s, c0 + _Q_CHUNK)
        q = self.q_b_proj(q_res[:, c0:c1]).view(b, c1 - c0, h, hd)
        q = v4k.rms_norm(q, None, eps, hf_rounding=True)
        _rope_tail(q, pos[:, c0:c1], freqs, inverse=False)
        o = v4k.sparse_attn(q, kvbuf, sinks, idx[:, c0:c1], self.scaling)
        del q
        _rope_tail(o, pos[:, c0:c1], freqs, inverse=True)
        o = v4k.grouped_linear(o.reshape(b, c1 - c0, g, -1), wa).flatten(2)
        outs.append(self.o_b_proj(o))
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), None


def _decoder_layer_forward(self: torch.nn.Module, hidden_states: torch.Tensor, input_ids: torch.Tensor | None = None,
                           **kwargs: Any) -> torch.Tensor:
    def pre(hc: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return v4k.hc_pre(x, hc.fn.float(), hc.scale.float(), hc.base.float(), hc.hc_sinkhorn_iters,
                          hc.input_norm.eps, hc.hc_eps)

    x_in, post, comb = pre(self.attn_hc, hidden_states)
    attn_output, _ = self.self_attn(self.input_layernorm(x_in), **kwargs)
    hidden_states = v4k.hc_post(attn_output, hidden_states, post, comb, bf16_mix=True)
    x_in, post, comb = pre(self.ffn_hc, hidden_states)
    mlp_output = self.mlp(self.post_attention_layernorm(x_in), input_ids=input_ids)
    return v4k.hc_post(mlp_output, hidden_states, post, comb, bf16_mix=True)


def _hyper_head_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return v4k.hc_head(x, self.hc_fn.float(), self.hc_scale.float(), self.hc_base.float(), self.input_norm.eps, self.eps)


def _linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A bias-free bf16/fp16 ``nn.Linear`` as HF computes it — fp32 accumulation, one rounding to
    ``x.dtype`` — without torch's slow half-precision CPU GEMM: ``grouped_linear`` with one group
    reads the half-precision weight in place (streamed once at decode, decoded one cache-resident
    block at a time at prefill; no fp32 copy of the weight). fp32 layers and non-CPU devices keep
    torch's GEMM."""
    w = self.weight
    if (w.dtype == torch.float32 and x.dtype == torch.float32) or x.device.type != "cpu":
        return torch.nn.functional.linear(x, w)  # accelerators: their own half-precision GEMM
    if x.dtype != w.dtype:
        raise TypeError(f"v4kernels linear: input dtype {x.dtype} != weight dtype {w.dtype} (HF would fail the same way)")
    lead = x.shape[:-1]
    out = v4k.grouped_linear(x.reshape(1, -1, 1, x.shape[-1]), w.unsqueeze(0))
    return out.view(*lead, w.shape[0])


def _rms_norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return v4k.rms_norm(hidden_states, self.weight, self.variance_epsilon, hf_rounding=True)


def _unweighted_rms_norm_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return v4k.rms_norm(x, None, self.eps, hf_rounding=True)


def _gate(self: torch.nn.Module, hidden_states: torch.Tensor, **hash_args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = hidden_states.reshape(-1, self.hidden_dim)
    bias = getattr(self, "e_score_correction_bias", None)
    w, ids, logits = v4k.moe_gate(
        flat, self.weight, None if hash_args else bias, topk=self.top_k, route_scale=self.routed_scaling_factor,
        hf_eps=True, hf_routing=True, return_logits=True, **hash_args,
    )
    return logits, w.to(flat.dtype), ids.long()


def _topk_router_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gate(self, hidden_states)


def _hash_router_forward(self: torch.nn.Module, hidden_states: torch.Tensor, input_ids: torch.Tensor | None) -> tuple:
    if input_ids is None:
        raise ValueError("v4kernels: hash-routed MoE layers need input_ids (the model was called with inputs_embeds only)")
    return _gate(self, hidden_states, tid2eid=self.tid2eid, token_ids=input_ids.reshape(-1))


def _experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"v4kernels"`` entry of HF's ``ExpertsInterface``: ``moe_experts`` on the instances
    :func:`apply` prepared, HF's eager experts on any other model sharing the config."""
    if not self.__dict__.get("_v4k_experts"):
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    # HF fuses gate and up as [E, 2I, D]: the halves are passed as views (each expert's rows stay
    # contiguous), which the CPU kernel reads in place — no copy of the expert weights
    gu = self.gate_up_proj
    inter = gu.shape[1] // 2
    w1, w3 = gu[:, :inter], gu[:, inter:]
    return v4k.moe_experts(
        hidden_states, top_k_weights, top_k_index, w1, w3, self.down_proj, swiglu_limit=float(self.limit),
        weight_after_w2=True, out_dtype=hidden_states.dtype, hf_rounding=True,
    )


def _model_forward(self: torch.nn.Module, input_ids: torch.Tensor | None = None, attention_mask: Any = None,
                   position_ids: torch.Tensor | None = None, past_key_values: Any = None,
                   inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None, **kwargs: Any) -> Any:
    """DeepseekV4Model.forward with the v4kernels attention: the cache is adopted, the 2-D padding
    mask goes to the attention layers through a context (HF's dense 4-D mask is never built)."""
    M = _hf()
    from transformers.cache_utils import DynamicCache

    use_cache = use_cache if use_cache is not None else self.config.use_cache
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache(config=self.config)
    if past_key_values is not None:
        _adopt_cache(past_key_values, self.config, M)
    pad = None
    if isinstance(attention_mask, torch.Tensor):
        if attention_mask.dim() != 2:
            raise ValueError(
                "v4kernels: pass attention_mask as the 2-D [batch, past + new] padding mask (1 = token, 0 = padding), "
                f"got shape {list(attention_mask.shape)}"
            )
        if not bool(attention_mask.bool().all()):
            pad = attention_mask.bool()
    elif attention_mask is not None:
        raise ValueError(f"v4kernels: attention_mask must be a 2-D tensor or None, got {type(attention_mask).__name__}")
    token = _CALL.set({"pad": pad})
    try:
        # A mask dict makes HF's forward skip building its dense [B, 1, S, S+T] mask.
        return type(self).forward(
            self, input_ids=input_ids, attention_mask={_IMPL: None}, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
    finally:
        _CALL.reset(token)


# ----------------------------------------------------------------------------- apply / remove
def _bind(module: torch.nn.Module, fn: Any, tag: str) -> None:
    module.__dict__["forward"] = types.MethodType(fn, module)
    module.__dict__.setdefault("_v4k_bound", set()).add(tag)


def is_applied(model: torch.nn.Module) -> bool:
    """Whether :func:`apply` prepared ``model`` (and :func:`remove` has not undone it)."""
    return "_v4k_applied" in model.__dict__


def apply(model: torch.nn.Module, *, attention: bool = True, mhc: bool = True, moe: bool = True,
          norm: bool = True, linear: bool = True) -> torch.nn.Module:
    """Run ``model`` (a transformers ``DeepseekV4ForCausalLM`` / ``DeepseekV4Model``) on v4kernels.

    Binds v4kernels forwards on this model's module instances (the classes and other models are
    untouched); calling it again replaces the previous selection (idempotent). :func:`remove`
    restores HF eager bit for bit. Returns ``model``.

    Parameters
    ----------
    attention : the attention layers (compressor, indexer, sparse attention, output projection)
        and the model forward that adopts the cache and passes the 2-D padding mask
    mhc : the hyper-connection sites of every decoder layer and the final HyperHead
    moe : both routers (``moe_gate``) and the routed experts (``moe_experts`` via
        ``ExpertsInterface`` + ``model.set_experts_implementation("v4kernels")``)
    norm : every RMSNorm (weighted and unweighted)
    linear : the model's plain bias-free ``nn.Linear`` layers (q/kv/o projections, indexer,
        shared expert, ``lm_head``) when their weights are bf16/fp16: fp32 accumulation and one
        rounding (as HF) without torch's slow half-precision CPU GEMM (``grouped_linear``, which
        reads the half-precision weight in place); fp32 layers keep torch's GEMM

    Raises
    ------
    TypeError for a model that is not ``deepseek_v4``; ImportError for a transformers without
    DeepSeek-V4; NotImplementedError for configs outside V4's structure (see the module docs).
    """
    _check_model(model)
    M = _hf()
    base = _base(model, M)
    _check_config(base.config, base.rotary_emb)
    if is_applied(model):
        remove(model)
    rot_ref = weakref.ref(base.rotary_emb)
    for m in model.modules():
        if attention and isinstance(m, M.DeepseekV4Attention):
            m.__dict__["_v4k_rot"] = rot_ref
            _bind(m, _attention_forward, "attention")
        elif mhc and isinstance(m, M.DeepseekV4DecoderLayer):
            _bind(m, _decoder_layer_forward, "mhc")
        elif mhc and isinstance(m, M.DeepseekV4HyperHead):
            _bind(m, _hyper_head_forward, "mhc")
        elif norm and isinstance(m, M.DeepseekV4RMSNorm):
            _bind(m, _rms_norm_forward, "norm")
        elif norm and isinstance(m, M.DeepseekV4UnweightedRMSNorm):
            _bind(m, _unweighted_rms_norm_forward, "norm")
        elif moe and isinstance(m, M.DeepseekV4TopKRouter):
            _bind(m, _topk_router_forward, "moe")
        elif moe and isinstance(m, M.DeepseekV4HashRouter):
            _bind(m, _hash_router_forward, "moe")
        elif moe and isinstance(m, M.DeepseekV4Experts):
            m.__dict__["_v4k_experts"] = True
        elif linear and type(m) is torch.nn.Linear and m.bias is None:
            _bind(m, _linear_forward, "linear")
    if attention:
        _bind(base, _model_forward, "attention")
    state: dict[str, Any] = {"attention": attention, "mhc": mhc, "moe": moe, "norm": norm, "linear": linear}
    if moe:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        ALL_EXPERTS_FUNCTIONS.register(_IMPL, _experts_forward)
        state["experts_impl"] = model.config._experts_implementation
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation(_IMPL)
        else:
            model.config._experts_implementation = _IMPL
    model.__dict__["_v4k_applied"] = state
    return model


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply`: every module gets its class forward back (HF eager, bit for bit) and
    the experts implementation its previous value. A no-op on a model that was not prepared."""
    _check_model(model)
    state = model.__dict__.pop("_v4k_applied", None)
    if state is None:
        return model
    for m in model.modules():
        if m.__dict__.pop("_v4k_bound", None) is not None:
            m.__dict__.pop("forward", None)
        for k in ("_v4k_rot", "_v4k_experts"):
            m.__dict__.pop(k, None)
    if "experts_impl" in state:
        prev = state["experts_impl"]
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation(prev)
        else:
            model.config._experts_implementation = prev
    return model


# ----------------------------------------------------------------------------- opt-in attention function
def _attention_function(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """HF attention-function signature on ``sparse_attn``: query [B, H, S, D], key = value
    [B, 1, N, D], additive mask [B, 1, S, N] (0 = visible, large negative = hidden) -> [B, S, H, D].

    The visible keys of each query are read off HF's dense mask and passed as an index list, so
    this path keeps HF's O(S·N) mask (use :func:`apply` to avoid it)."""
    if dropout:
        raise NotImplementedError("v4kernels attention function: dropout is not supported")
    b, h, s, d = query.shape
    n = key.shape[2]
    if key.shape[1] != 1 or not torch.equal(key, value):
        raise NotImplementedError("v4kernels attention function: needs DeepSeek-V4's single shared K=V head")
    if attention_mask is None:
        raise ValueError(
            "v4kernels attention function got no mask: register it with register_attention() (which also fills "
            "AttentionMaskInterface), otherwise HF silently drops the causal/sliding mask"
        )
    visible = attention_mask[:, 0] > torch.finfo(attention_mask.dtype).min / 2 if attention_mask.is_floating_point() \
        else attention_mask[:, 0].bool()
    if attention_mask.is_floating_point() and bool((attention_mask[:, 0][visible] != 0).any()):
        raise NotImplementedError("v4kernels attention function: only 0 / -inf style masks (no additive biases)")
    visible = visible.expand(b, s, n)
    k = int(visible.sum(-1).max()) if visible.numel() else 0
    cols = torch.arange(n, device=query.device).expand(b, s, n)
    # stable sort puts the visible columns first, in order
    order = torch.sort((~visible).to(torch.int8), dim=-1, stable=True).indices[..., :k]
    idx = torch.where(visible.gather(-1, order), cols.gather(-1, order), -1).to(torch.int32)
    sinks = kwargs.get("s_aux", getattr(module, "sinks", None))
    o = v4k.sparse_attn(query.transpose(1, 2).contiguous(), key[:, 0].contiguous(), sinks.float(), idx,
                        float(scaling if scaling is not None else d**-0.5))
    return o, None


def register_attention(name: str = _IMPL) -> str:
    """Register ``name`` as an attention implementation in BOTH HF's ``AttentionInterface`` (the
    function above) and ``AttentionMaskInterface`` (HF's eager mask builder). Opt-in and
    global; select it per model with ``model.set_attn_implementation(name)``.

    This path keeps HF's dense ``[B, 1, S, S+T]`` mask (the function reads the visible keys off
    it): it is for drop-in use; :func:`apply` is the O(S·k) path. Registering a function only in
    ``AttentionInterface`` would make HF build *no* mask for it — every query would then see
    every key, future ones included — hence both registrations.
    """
    _hf()
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, _attention_function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    return name
