"""v4kernels: DeepSeek-V4 operators behind one API, dispatched per device to the best backend.

Importing the package defines the ``torch.ops.v4k`` operators and loads the pure-PyTorch
reference kernels; it does no device probing and compiles nothing. Backends are probed lazily
on first use (see :func:`available_backends`).
"""
from __future__ import annotations

from ._registry import (
    BackendUnavailableError,
    available_backends,
    backend_usage,
    last_backend,
    op_names,
    use_backend,
)
from .ops.attention import *  # noqa: F401,F403
from .ops.compressor import *  # noqa: F401,F403
from .ops.indexer import *  # noqa: F401,F403
from .ops.indices import *  # noqa: F401,F403
from .ops.mhc import *  # noqa: F401,F403
from .ops.moe import *  # noqa: F401,F403
from .ops.quant import *  # noqa: F401,F403
from .ops.rope_norm import *  # noqa: F401,F403

__version__ = "0.1.0"
