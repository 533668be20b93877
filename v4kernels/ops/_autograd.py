"""Recomputation backwards for custom ops.

:func:`recompute_backward` turns a differentiable PyTorch function with an op's schema
arguments (``math``) into the ``(backward, setup_context)`` pair of
``declare_op(..., autograd=...)``: the forward kernel runs as usual (any backend); the backward
saves the inputs, re-runs ``math`` on them under autograd and differentiates it. ``math``
computes in fp32 for bf16/fp16/fp32 inputs and in fp64 for fp64 inputs, which is how the
backwards are checked with ``torch.autograd.gradcheck`` (see ``tests/test_robustness.py``).
Memory is that of the PyTorch recomputation: meant for training-side use and verification,
not a fused backward kernel.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any floating input is fp64, else fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def recompute_backward(math: Callable[..., Any], differentiable: tuple[int, ...]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(backward, setup_context)`` for an op whose outputs equal ``math(*schema_args)``.

    ``differentiable`` lists the schema positions of the floating-point tensor arguments that get
    gradients (every other argument gets ``None``).
    """

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        tensor_pos = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.tensor_pos = tensor_pos
        ctx.others = [None if isinstance(a, torch.Tensor) else a for a in inputs]
        ctx.save_for_backward(*(inputs[i] for i in tensor_pos))

    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        args: list[Any] = list(ctx.others)
        wanted: list[int] = []
        for i, t in zip(ctx.tensor_pos, ctx.saved_tensors):
            need = i in differentiable and bool(ctx.needs_input_grad[i])
            args[i] = t.detach().requires_grad_(need)
            if need:
                wanted.append(i)
        result: list[torch.Tensor | None] = [None] * len(args)
        if not wanted:
            return tuple(result)
        with torch.enable_grad():
            outs = math(*args)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        if not pairs:
            return tuple(result)
        gin = torch.autograd.grad(
            [o for o, _ in pairs], [args[i] for i in wanted], [g.to(o.dtype) for o, g in pairs], allow_unused=True
        )
        for i, g in zip(wanted, gin):
            result[i] = torch.zeros_like(args[i]) if g is None else g.to(args[i].dtype)
        return tuple(result)

    return backward, setup_context
