"""One DeepSeek-V4 attention layer (sliding window, CSA or HCA) composed from v4kernels ops,
with its per-layer cache (SPEC §2, §5-§9).

Device-agnostic: every tensor is created on the input's device, token counts live on the device
(the compressor states' ``n_tokens``, the cache's ``positions_dev``) and a step never reads a
device value on the host. The host tracks positions itself (``AttentionCache.positions``, plain
ints known from the calls), which is all the index-list widths and cache slots need.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

import v4kernels as v4k

from .config import V4Config
from .linear import Linear, linear

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


class _Init:
    """Draws random weights from one seeded generator (in a fixed order), or, for layers built
    from a checkpoint or on the meta device, allocates uninitialised storage (no random init)."""

    def __init__(self, seed: int, random: bool, device: torch.device | str | None) -> None:
        self.g = torch.Generator().manual_seed(seed) if random else None
        self.device = device

    @property
    def random(self) -> bool:
        return self.g is not None

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype, draw) -> torch.Tensor:
        if self.g is None:
            return torch.empty(shape, dtype=dtype, device=self.device)
        return draw(self.g).to(dtype).to(self.device)

    @classmethod
    def wrap(cls, g: torch.Generator) -> "_Init":
        """Draw from an existing generator (continuing its sequence)."""
        init = cls(0, True, None)
        init.g = g
        return init

    def linear(self, din: int, dout: int, fmt: str) -> Linear:
        # random FP8 weights need whole 128-wide activation blocks; smaller models get bf16 ones
        if self.random and fmt == "fp8" and din % 128:
            fmt = "bf16"
        return Linear(din, dout, fmt, self.g, init=self.random, device=self.device)


def weight_format(weights: Mapping[str, torch.Tensor] | None, name: str, default: str) -> str:
    """Storage format of linear ``name`` in a state dict: e4m3 -> "fp8", packed uint8/int8 -> "fp4",
    float -> "bf16" (kept in its own float dtype)."""
    if weights is None or f"{name}.weight" not in weights:
        return default
    dt = weights[f"{name}.weight"].dtype
    return "fp8" if dt == torch.float8_e4m3fn else "fp4" if dt in (torch.uint8, torch.int8) else "bf16"


def load_weights(module: nn.Module, weights: Mapping[str, torch.Tensor], device: torch.device | str | None) -> None:
    """Adopt ``weights`` (this module's own state-dict names) as the module's buffers, keeping their
    dtypes; missing or unexpected names, or wrong shapes, raise with the names listed."""
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        raise KeyError(f"{type(module).__name__}: weights do not match the layer: missing {missing}, unexpected {extra}")
    bad = [f"{k}: expected {list(own[k].shape)}, got {list(v.shape)}" for k, v in weights.items() if own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{type(module).__name__}: weight shapes do not match the configuration: " + "; ".join(bad))
    conv = {k: (v.view(torch.uint8) if v.dtype == torch.int8 else v).to(device) for k, v in weights.items()}
    module.load_state_dict(conv, strict=True, assign=True)


def rope_table(cfg: V4Config, compressed: bool, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE frequencies of a layer (SPEC §3.2): YaRN-scaled ``compress_rope_theta`` for compressed
    (CSA/HCA) layers, plain ``rope_theta`` for sliding-window-only layers."""
    if compressed:
        return v4k.rope_frequencies(cfg.rope_head_dim, cfg.compress_rope_theta, cfg.rope_factor, cfg.original_seq_len,
                                    cfg.beta_fast, cfg.beta_slow, device=device)
    return v4k.rope_frequencies(cfg.rope_head_dim, cfg.rope_theta, device=device)


def _as_starts(op: str, start_pos: int | Sequence[int] | torch.Tensor, batch: int) -> list[int]:
    if isinstance(start_pos, torch.Tensor):
        if start_pos.device.type != "cpu":
            raise TypeError(f"{op}: start_pos must be host ints (an int, a list or a CPU tensor), got a tensor on "
                            f"{start_pos.device}; positions on the device are kept by the cache")
        start_pos = start_pos.tolist()
    starts = [int(start_pos)] * batch if isinstance(start_pos, int) else [int(p) for p in start_pos]
    if len(starts) != batch:
        raise ValueError(f"{op}: start_pos must hold one position per sequence ({batch}), got {len(starts)}")
    return starts


class AttentionCache:
    """Decode state of one attention layer for ``batch`` sequences (each at its own position).

    kv          [B, window + max_len/ratio, head_dim] in the model dtype, or uint8 [B, ..., 584] in
                the packed FP8 layout (``kv_fp8=True``, V4's head dim 512 only): slots
                0..window-1 are the ring (position p in slot p % window), slot window + c holds
                compressed entry c (SPEC §5.4, §8.2)
    index_keys  [B, max_len/ratio, index_head_dim] indexer keys (CSA layers), model dtype
    compressor / index_compressor: the incremental compressor states (SPEC §6.5)
    positions   host list: next position of each sequence; ``positions_dev`` the same on the device
    """

    def __init__(self, cfg: V4Config, ratio: int, batch: int, max_len: int, device: torch.device | str = "cpu",
                 kv_fp8: bool = False, dtype: torch.dtype = torch.bfloat16, csa: bool | None = None) -> None:
        if dtype not in _FLOAT:
            raise TypeError(f"AttentionCache: dtype must be float32/bfloat16/float16, got {dtype}")
        if kv_fp8 and cfg.head_dim != 512:
            raise ValueError(f"AttentionCache: the packed FP8 KV rows (584 B) hold V4's 512-dim heads only, got "
                             f"head_dim {cfg.head_dim}; use kv_fp8=False")
        self.cfg, self.ratio, self.batch, self.max_len, self.kv_fp8 = cfg, ratio, batch, max_len, kv_fp8
        self.csa = (ratio == 4) if csa is None else csa
        self.dtype = dtype
        self.window = cfg.window_size
        self.n_comp = max_len // ratio if ratio else 0
        rows = self.window + self.n_comp
        if kv_fp8:
            self.kv = torch.zeros(batch, rows, 584, dtype=torch.uint8, device=device)
        else:
            self.kv = torch.zeros(batch, rows, cfg.head_dim, dtype=dtype, device=device)
        self.index_keys = (
            torch.zeros(batch, self.n_comp, cfg.index_head_dim, dtype=dtype, device=device) if ratio and self.csa else None
        )
        self.compressor = (
            v4k.CompressorState.empty(batch, ratio, cfg.head_dim, device=device, overlap=self.csa) if ratio else None
        )
        self.index_compressor = (
            v4k.CompressorState.empty(batch, ratio, cfg.index_head_dim, device=device, overlap=True)
            if ratio and self.csa else None
        )
        self.positions = [0] * batch
        self.positions_dev = torch.zeros(batch, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def pos(self) -> int | list[int]:
        """The common position of all sequences, or the list when they differ."""
        return self.positions[0] if len(set(self.positions)) <= 1 and self.positions else list(self.positions)

    def store_rows(self, rows: torch.Tensor, slots: torch.Tensor | slice) -> None:
        """Write KV rows [B, n, hd] (already FP8-simulated) into the same cache slots of every row."""
        self.kv[:, slots] = self.encode(rows)

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """KV rows in the cache's storage format (packed FP8 or the cache dtype)."""
        return v4k.pack_kv_fp8(rows) if self.kv_fp8 else rows.to(self.kv.dtype)

    def ring_slots(self, first: torch.Tensor, n: int) -> torch.Tensor:
        """Ring slots [B, n] of positions ``first[b] + i`` (device tensor [B])."""
        return (first.unsqueeze(1) + torch.arange(n, device=first.device)) % self.window

    def store_ring(self, rows: torch.Tensor, first: torch.Tensor) -> None:
        """Write rows [B, n, hd] of positions ``first[b] + i`` (device tensor [B]) into their ring slots."""
        slots = self.ring_slots(first, rows.shape[1])  # [B, n]
        enc = self.encode(rows)
        self.kv[:, : self.window].scatter_(1, slots.unsqueeze(-1).expand(-1, -1, enc.shape[-1]), enc)

    @classmethod
    def stack(cls, caches: Sequence["AttentionCache"]) -> "AttentionCache":
        """One cache holding the sequences of ``caches`` (same layer, capacity, dtype and layout),
        in order, each at its own position: e.g. prompts prefilled separately, decoded together."""
        if not caches:
            raise ValueError("AttentionCache.stack: needs at least one cache")
        c0 = caches[0]
        key = lambda c: (c.cfg, c.ratio, c.csa, c.max_len, c.kv_fp8, c.dtype, c.device)  # noqa: E731
        for c in caches[1:]:
            if key(c) != key(c0):
                raise ValueError(f"AttentionCache.stack: caches differ in (cfg, ratio, csa, max_len, kv_fp8, dtype, device): "
                                 f"{key(c0)[1:]} vs {key(c)[1:]}")
        out = cls.__new__(cls)
        out.__dict__.update(c0.__dict__)
        out.batch = sum(c.batch for c in caches)
        out.kv = torch.cat([c.kv for c in caches])
        out.index_keys = None if c0.index_keys is None else torch.cat([c.index_keys for c in caches])
        for name in ("compressor", "index_compressor"):
            if getattr(c0, name) is not None:
                parts = [getattr(c, name).tensors() for c in caches]
                setattr(out, name, v4k.CompressorState(*(torch.cat(t) for t in zip(*parts))))
        out.positions = [p for c in caches for p in c.positions]
        out.positions_dev = torch.cat([c.positions_dev for c in caches])
        return out

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
            "positions": list(self.positions),
            "positions_dev": self.positions_dev.clone(),
        }

    def restore(self, snap: dict) -> None:
        self.kv.copy_(snap["kv"])
        if self.index_keys is not None:
            self.index_keys.copy_(snap["index_keys"])
        for name in ("compressor", "index_compressor"):
            cur, saved = getattr(self, name), snap[name]
            if cur is None or saved is None:
                setattr(self, name, None if saved is None else saved.clone())
            else:
                for dst, src in zip(cur.tensors(), saved.tensors()):
                    dst.copy_(src)
        self.positions = list(snap["positions"])
        self.positions_dev.copy_(snap["positions_dev"])


class Compressor(nn.Module):
    """Weights of one KV compressor (SPEC §6.1): wkv, wgate [coff·hd, D], ape [m, coff·hd], norm [hd];
    ``coff = 2`` with overlapping (CSA) windows."""

    def __init__(self, dim: int, head_dim: int, ratio: int, gen: torch.Generator | _Init, overlap: bool | None = None) -> None:
        super().__init__()
        init = gen if isinstance(gen, _Init) else _Init.wrap(gen)
        self.overlap = (ratio == 4) if overlap is None else overlap
        coff = 2 if self.overlap else 1
        self.ratio, self.head_dim = ratio, head_dim
        w = coff * head_dim
        bf = torch.bfloat16
        self.register_buffer("wkv", init.tensor((w, dim), bf, lambda g: torch.randn(w, dim, generator=g) / dim**0.5))
        self.register_buffer("wgate", init.tensor((w, dim), bf, lambda g: torch.randn(w, dim, generator=g) / dim**0.5))
        self.register_buffer("ape", init.tensor((ratio, w), torch.float32, lambda g: torch.randn(ratio, w, generator=g) * 0.5))
        self.register_buffer("norm", init.tensor((head_dim,), bf, lambda g: 1 + 0.1 * torch.randn(head_dim, generator=g)))

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, state: v4k.CompressorState, quant: str) -> tuple[torch.Tensor, torch.Tensor]:
        return v4k.compress_kv(x, self.wkv, self.wgate, self.ape, self.norm, freqs, state, ratio=self.ratio, quant=quant,
                               overlap=self.overlap)


class V4Attention(nn.Module):
    """Attention of one V4 layer: sliding window only (``ratio == 0``), CSA (compressed entries
    chosen by the lightning indexer, overlapping compressor windows; V4: ratio 4) or HCA (every
    compressed entry, no overlap; V4: ratio 128). ``csa`` defaults to ``ratio == 4``.

    ``forward(x [B,S,D], cache, start_pos)``: ``start_pos`` is an int, or one int per sequence
    (sequences may be at different positions), and must match the cache. Any ``S >= 1`` at any
    position: a prefill from 0, single-token decode, or a chunk continuing a sequence; a chunk
    gives the same result as feeding its tokens one by one. Activations and the cache use the
    model dtype (``dtype``, bf16 by default; fp32 works end to end).

    ``simulate_quant=False`` is the [HF] variant (SPEC §15 #5, #8): no FP8 simulation of the
    window and compressed KV, no Hadamard/FP4 simulation in the indexer. The simulation needs
    V4-like dims (nope dims a multiple of 64, indexer head dim a power of two >= 32).

    Weights: random (seeded) by default; ``weights=`` (this module's state-dict names, see
    :mod:`v4kernels.layers.weights` for the release and Hugging Face namings) or
    ``device="meta"`` build the layer without drawing random weights.
    """

    def __init__(self, cfg: V4Config, ratio: int, seed: int = 0, simulate_quant: bool = True, *, csa: bool | None = None,
                 dtype: torch.dtype = torch.bfloat16, weights: Mapping[str, torch.Tensor] | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not isinstance(ratio, int) or ratio < 0 or ratio == 1:
            raise ValueError(f"V4Attention: ratio must be 0 (window only) or an int >= 2, got {ratio!r}")
        if dtype not in _FLOAT:
            raise TypeError(f"V4Attention: dtype must be float32/bfloat16/float16, got {dtype}")
        self.csa = bool(ratio) and ((ratio == 4) if csa is None else bool(csa))
        if simulate_quant:
            if cfg.nope_dim % 64:
                raise ValueError(f"V4Attention: simulate_quant=True quantises the {cfg.nope_dim} nope dims in FP8 blocks of 64; "
                                 f"use simulate_quant=False for head_dim {cfg.head_dim} with {cfg.rope_head_dim} rope dims")
            d = cfg.index_head_dim
            if self.csa and (d < 32 or d & (d - 1)):
                raise ValueError(f"V4Attention: simulate_quant=True needs an indexer head dim that is a power of two >= 32 "
                                 f"(Hadamard + FP4 blocks of 32), got {d}; use simulate_quant=False")
        self.simulate_quant = simulate_quant
        self.cfg, self.ratio, self.dtype = cfg, ratio, dtype
        random = weights is None and torch.device(device or "cpu").type != "meta"
        init = _Init(seed, random, device if weights is None else "meta")
        d, h, hd = cfg.dim, cfg.n_heads, cfg.head_dim
        bf = torch.bfloat16
        fmt = lambda name, default="fp8": weight_format(weights, name, default)  # noqa: E731
        # (random weights are drawn in this order from one generator: keep it)
        self.wq_a = init.linear(d, cfg.q_lora_rank, fmt("wq_a"))
        self.register_buffer("q_norm", init.tensor((cfg.q_lora_rank,), bf, lambda g: 1 + 0.1 * torch.randn(cfg.q_lora_rank, generator=g)))
        self.wq_b = init.linear(cfg.q_lora_rank, h * hd, fmt("wq_b"))
        self.wkv = init.linear(d, hd, fmt("wkv"))
        self.register_buffer("kv_norm", init.tensor((hd,), bf, lambda g: 1 + 0.1 * torch.randn(hd, generator=g)))
        group_in = h * hd // cfg.o_groups
        # wo_a is a bf16 grouped projection in the reference (SPEC §9.4, §15 #12)
        shape = (cfg.o_groups, cfg.o_lora_rank, group_in)
        self.register_buffer("wo_a", init.tensor(shape, bf, lambda g: torch.randn(*shape, generator=g) / group_in**0.5))
        self.wo_b = init.linear(cfg.o_groups * cfg.o_lora_rank, d, fmt("wo_b"))
        self.register_buffer("attn_sink", init.tensor((h,), torch.float32, lambda g: torch.randn(h, generator=g)))
        self.register_buffer("freqs", rope_table(cfg, ratio > 0, device=device), persistent=False)
        if ratio:
            self.compressor = Compressor(d, hd, ratio, init, overlap=self.csa)
        if self.csa:
            self.index_wq_b = init.linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, fmt("index_wq_b"))
            ni = cfg.index_n_heads
            self.register_buffer("index_weights_proj", init.tensor((ni, d), bf, lambda g: torch.randn(ni, d, generator=g) / d**0.5))
            self.index_compressor = Compressor(d, cfg.index_head_dim, ratio, init, overlap=True)
        if weights is not None:
            load_weights(self, weights, device)

    def new_cache(self, batch: int, max_len: int, device: torch.device | str = "cpu", kv_fp8: bool = False,
                  dtype: torch.dtype | None = None) -> AttentionCache:
        """A cache for ``batch`` sequences of up to ``max_len`` tokens, in ``dtype`` (default: the layer's)."""
        return AttentionCache(self.cfg, self.ratio, batch, max_len, device, kv_fp8, dtype or self.dtype, csa=self.csa)

    def forward(self, x: torch.Tensor, cache: AttentionCache, start_pos: int | Sequence[int]) -> torch.Tensor:
        """One step. Transactional: it either completes (cache advanced by ``S`` tokens) or raises
        and leaves the cache (KV rows, indexer keys, compressor states, positions) bit-identical.
        The compressors run on copies of their states, committed after the last op; the KV rows
        and indexer keys the step overwrites are saved first and put back on failure."""
        out, pending = self.step(x, cache, start_pos)
        pending.commit()
        return out

    def step(self, x: torch.Tensor, cache: AttentionCache, start_pos: int | Sequence[int]) -> tuple[torch.Tensor, "PendingStep"]:
        """``forward`` without the commit: the output and the step's :class:`PendingStep`, to
        ``commit()`` once the caller's own work after the attention succeeded or to
        ``rollback()`` (e.g. a block whose FFN fails). Until then the cache holds the step's KV
        rows but not its positions or compressor states: call one of the two before the next step."""
        op = "V4Attention"
        cfg = self.cfg
        if x.dim() != 3 or x.shape[-1] != cfg.dim:
            raise ValueError(f"{op}: x must be [B, S, {cfg.dim}], got {list(x.shape)}")
        b, s, _ = x.shape
        starts = _as_starts(op, start_pos, b)
        self._check_cache(cache, x, starts)
        undo = _UndoLog()
        comp = cache.compressor.clone() if self.ratio else None
        icomp = cache.index_compressor.clone() if self.csa else None
        try:
            out = self._step(x, cache, starts, comp, icomp, undo)
        except BaseException:
            undo.rollback()
            raise
        return out, PendingStep(cache, s, comp, icomp, undo)

    def _check_cache(self, cache: AttentionCache, x: torch.Tensor, starts: list[int]) -> None:
        """Everything a step needs from ``cache``, checked before anything is written."""
        op = "V4Attention"
        cfg = self.cfg
        b, s = x.shape[0], x.shape[1]
        if not isinstance(cache, AttentionCache):
            raise TypeError(f"{op}: cache must be an AttentionCache (new_cache()), got {type(cache).__name__}")
        if cache.batch != b or cache.ratio != self.ratio or cache.csa != self.csa:
            raise ValueError(f"{op}: the cache was made for batch {cache.batch}, ratio {cache.ratio}, csa={cache.csa}; "
                             f"got batch {b}, ratio {self.ratio}, csa={self.csa}")
        if s < 1:
            raise ValueError(f"{op}: x must hold at least one token per sequence, got S={s}")
        if min(starts) < 0:
            raise ValueError(f"{op}: start_pos must be >= 0, got {starts}")
        if starts != cache.positions:
            raise ValueError(f"{op}: start_pos={starts} does not match the cache positions {cache.positions}")
        if max(starts) + s > cache.max_len:
            raise ValueError(f"{op}: {max(starts) + s} tokens exceed the cache capacity max_len={cache.max_len}")
        if x.dtype != cache.dtype:
            raise TypeError(f"{op}: x has dtype {x.dtype} but the cache holds {cache.dtype} (new_cache(dtype=...))")
        w = cfg.window_size
        n_comp = cache.max_len // self.ratio if self.ratio else 0
        if cache.window != w or cache.n_comp != n_comp:
            raise ValueError(f"{op}: the cache holds a {cache.window}-slot window and {cache.n_comp} compressed rows; the "
                             f"layer needs {w} and {n_comp} (max_len {cache.max_len}, ratio {self.ratio})")
        if cache.kv_fp8:
            row, kv_dtype = 584, torch.uint8
            if cfg.head_dim != 512:
                raise ValueError(f"{op}: a packed FP8 KV cache (584 B rows) holds 512-dim heads, the layer has head_dim "
                                 f"{cfg.head_dim}")
        else:
            row, kv_dtype = cfg.head_dim, cache.dtype
        want = [b, w + n_comp, row]
        if list(cache.kv.shape) != want or cache.kv.dtype != kv_dtype:
            raise ValueError(f"{op}: cache.kv must be {kv_dtype} {want} (kv_fp8={cache.kv_fp8}), got {cache.kv.dtype} "
                             f"{list(cache.kv.shape)}")
        tensors = {"kv": cache.kv, "positions_dev": cache.positions_dev}
        if list(cache.positions_dev.shape) != [b] or cache.positions_dev.dtype != torch.int64:
            raise ValueError(f"{op}: cache.positions_dev must be int64 [{b}], got {cache.positions_dev.dtype} "
                             f"{list(cache.positions_dev.shape)}")
        if self.csa:
            want = [b, n_comp, cfg.index_head_dim]
            ik = cache.index_keys
            if ik is None or list(ik.shape) != want or ik.dtype != cache.dtype:
                got = None if ik is None else f"{ik.dtype} {list(ik.shape)}"
                raise ValueError(f"{op}: a CSA layer needs cache.index_keys {cache.dtype} {want}, got {got}")
            tensors["index_keys"] = ik
        for name, hd, overlap, needed in (("compressor", cfg.head_dim, self.csa, bool(self.ratio)),
                                          ("index_compressor", cfg.index_head_dim, True, self.csa)):
            st = getattr(cache, name)
            if not needed:
                continue
            if not isinstance(st, v4k.CompressorState):
                raise ValueError(f"{op}: the layer (ratio {self.ratio}) needs cache.{name}, got {type(st).__name__}")
            got = (st.batch_size, st.ratio, st.head_dim, st.overlap)
            if got != (b, self.ratio, hd, overlap):
                raise ValueError(f"{op}: cache.{name} must have (batch, ratio, head_dim, overlap) = "
                                 f"{(b, self.ratio, hd, overlap)}, got {got}")
            tensors.update({f"{name}.{i}": t for i, t in enumerate(st.tensors())})
        wrong = {k: str(t.device) for k, t in tensors.items() if t.device != x.device}
        if wrong:
            raise ValueError(f"{op}: x is on {x.device} but cache tensors are on {wrong}")

    def _step(self, x: torch.Tensor, cache: AttentionCache, starts: list[int], comp: v4k.CompressorState | None,
              icomp: v4k.CompressorState | None, undo: "_UndoLog") -> torch.Tensor:
        """The step on a checked cache: compressors update ``comp``/``icomp`` (copies of the cache's
        states), every cache row overwritten is first saved in ``undo``; positions are left as
        they are (the caller commits)."""
        cfg = self.cfg
        b, s, _ = x.shape
        dev = x.device
        w = cfg.window_size
        # Layout of the KV buffer the index lists point into (SPEC §8, docs/op_contracts.md):
        #   prefill: [chunk rows | compressed]; decode: [ring | compressed];
        #   chunk:   [ring (positions < start) | chunk rows | compressed]
        if not any(starts):
            mode, offset = "prefill", s
        elif s == 1:
            mode, offset = "decode", w
        else:
            mode, offset = "chunk", w + s
        first_dev = cache.positions_dev  # [B] device copy of `starts`
        positions = first_dev.unsqueeze(1) + torch.arange(s, device=dev)  # [B, S]
        rows_b = torch.arange(b, device=dev).unsqueeze(1)  # [B, 1]

        # query path (SPEC §5.2)
        qr = v4k.rms_norm(self.wq_a(x), self.q_norm, cfg.norm_eps)
        q = self.wq_b(qr).view(b, s, cfg.n_heads, cfg.head_dim)
        q = v4k.apply_rope(v4k.rms_norm(q, None, cfg.norm_eps), positions, self.freqs)

        # window K=V (SPEC §5.3): RoPE on the rope dims, FP8 QAT simulation on the nope dims
        kv = v4k.rms_norm(self.wkv(x), self.kv_norm, cfg.norm_eps)
        kv = v4k.apply_rope(kv.unsqueeze(2), positions, self.freqs).squeeze(2)
        if self.simulate_quant:
            kv = torch.cat((v4k.act_quant_roundtrip(kv[..., : cfg.nope_dim], 64), kv[..., cfg.nope_dim :]), dim=-1)

        idx_parts = [v4k.window_indices(starts, s, w, mode=mode, device=dev)]
        if mode == "decode":
            undo.save(cache.kv, (rows_b, cache.ring_slots(first_dev, 1)))
            cache.store_ring(kv, first_dev)  # the ring holds the current token before attention reads it

        ends = [p + s for p in starts]
        if self.csa:
            # lightning indexer (SPEC §7): its own compressor runs first, then scoring + top-k
            qi = self.index_wq_b(qr).view(b, s, cfg.index_n_heads, cfg.index_head_dim)
            qi = v4k.indexer_query(qi, positions, self.freqs, rotate=self.simulate_quant, simulate_fp4=self.simulate_quant)
            keys, _ = self.index_compressor(x, self.freqs, icomp, "fp4" if self.simulate_quant else "none")
            self._store_entries(cache.index_keys, keys, starts, s, 0, undo)
            visible = max(e // self.ratio for e in ends)
            weights = linear(x, self.index_weights_proj).float() * v4k.indexer_scale(cfg.index_n_heads, cfg.index_head_dim)
            idx_parts.append(
                v4k.indexer_topk(qi, weights, cache.index_keys[:, :visible].contiguous(), positions, cfg.index_topk,
                                 ratio=self.ratio, offset=offset)
            )
        elif self.ratio:
            idx_parts.append(v4k.compressed_indices(starts, s, self.ratio, offset, mode=mode, device=dev))

        entries = None
        if self.ratio:
            entries, _ = self.compressor(x, self.freqs, comp, "fp8" if self.simulate_quant else "none")
            self._store_entries(cache.kv, entries, starts, s, w, undo, encode=cache.encode)
        if mode == "decode":
            kv_buffer = cache.kv
        elif mode == "prefill":
            n_entries = s // self.ratio if self.ratio else 0
            kv_buffer = kv if n_entries == 0 else torch.cat((kv, entries[:, :n_entries]), dim=1)
        else:
            n_vis = max(e // self.ratio for e in ends) if self.ratio else 0
            kv_buffer = torch.cat((cache.kv[:, :w], cache.encode(kv), cache.kv[:, w : w + n_vis]), dim=1)
        if mode != "decode":
            # the last `window` tokens go to the ring for the steps that follow
            last = min(s, w)
            ring_first = first_dev + (s - last)
            undo.save(cache.kv, (rows_b, cache.ring_slots(ring_first, last)))
            cache.store_ring(kv[:, s - last :], ring_first)

        idx = torch.cat(idx_parts, dim=-1) if len(idx_parts) > 1 else idx_parts[0]
        o = v4k.sparse_attn(q, kv_buffer, self.attn_sink, idx, cfg.head_dim**-0.5)
        o = v4k.apply_rope(o, positions, self.freqs, inverse=True)  # SPEC §9.3
        u = v4k.grouped_linear(o.view(b, s, cfg.o_groups, -1), self.wo_a)  # SPEC §9.4
        return self.wo_b(u.flatten(2))

    def _store_entries(self, dst: torch.Tensor, entries: torch.Tensor, starts: list[int], n_tok: int, base: int,
                       undo: "_UndoLog", encode=None) -> None:
        """Write the compressed entries a call of ``n_tok`` tokens emitted (row r of sequence b is
        entry p_b // ratio + r; the first (p_b + S) // ratio − p_b // ratio rows are valid) at
        ``dst[b, base + entry]``, saving the rows overwritten in ``undo``. The counts are host
        arithmetic on the known positions: nothing is read back from the device."""
        m = self.ratio
        counts = [(p + n_tok) // m - p // m for p in starts]
        enc = encode or (lambda t: t.to(dst.dtype))
        if len(set(starts)) == 1:
            n, first = counts[0], base + starts[0] // m
            if n:
                undo.save(dst, (slice(None), slice(first, first + n)))
                dst[:, first : first + n] = enc(entries[:, :n])
            return
        for bi, (p, n) in enumerate(zip(starts, counts)):
            if n:
                first = base + p // m
                undo.save(dst, (bi, slice(first, first + n)))
                dst[bi, first : first + n] = enc(entries[bi, :n])


class PendingStep:
    """A step that ran but is not committed: its KV rows and indexer keys are in the cache (the
    rows they replaced saved), its compressor states and positions are not."""

    def __init__(self, cache: AttentionCache, n_tok: int, comp, icomp, undo: "_UndoLog") -> None:
        self.cache, self.n_tok, self.comp, self.icomp, self.undo = cache, n_tok, comp, icomp, undo
        self.done = False

    def _finish(self) -> None:
        if self.done:
            raise RuntimeError("V4Attention: this step was already committed or rolled back")
        self.done = True

    def commit(self) -> None:
        """Publish the compressor states (in place: references stay valid) and the positions."""
        self._finish()
        c = self.cache
        for new, cur in ((self.comp, c.compressor), (self.icomp, c.index_compressor)):
            if new is not None:
                for dst, src in zip(cur.tensors(), new.tensors()):
                    dst.copy_(src)
        c.positions = [p + self.n_tok for p in c.positions]
        c.positions_dev += self.n_tok

    def rollback(self) -> None:
        """Put back the rows the step overwrote: the cache is as before the step."""
        self._finish()
        self.undo.rollback()


class _UndoLog:
    """The cache rows a step overwrites, saved just before each write (only those rows: a decode
    step saves one ring slot and at most a compressed row per sequence); ``rollback`` writes them
    back in reverse order."""

    def __init__(self) -> None:
        self._saved: list[tuple[torch.Tensor, tuple, torch.Tensor]] = []

    def save(self, dst: torch.Tensor, index: tuple) -> None:
        self._saved.append((dst, index, dst[index].detach().clone()))

    def rollback(self) -> None:
        with torch.no_grad():
            while self._saved:
                dst, index, old = self._saved.pop()
                dst[index] = old
