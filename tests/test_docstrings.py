"""Every public op's docstring example runs (reference backend, CPU)."""
from __future__ import annotations

import doctest
import importlib

import pytest

import v4kernels as v4k

MODULES = [f"v4kernels.ops.{f}" for f in ("quant", "rope_norm", "compressor", "indexer", "indices", "attention", "mhc", "moe")] + [
    "v4kernels._registry", "v4kernels.bench.kvcalc", "v4kernels.bench.report", "v4kernels.bench.layouts",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(name)
    with v4k.use_backend("reference"):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0


def test_every_public_op_has_an_example():
    missing = [op for op in v4k.op_names() if ">>>" not in (getattr(v4k, op).__doc__ or "")]
    assert not missing, f"public ops without a docstring example: {missing}"
