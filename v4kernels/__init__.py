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
    record_calls,
    register_backend,
    register_kernel,
    register_kernels,
    track_usage,
    unregister_backend,
    use_backend,
)
from .backends import Backend, Tolerance
from .ops.attention import *  # noqa: F401,F403
from .ops.compressor import *  # noqa: F401,F403
from .ops.indexer import *  # noqa: F401,F403
from .ops.indices import *  # noqa: F401,F403
from .ops.mhc import *  # noqa: F401,F403
from .ops.moe import *  # noqa: F401,F403
from .ops.quant import *  # noqa: F401,F403
from .ops.rope_norm import *  # noqa: F401,F403
from . import _registry as _R

_R._ALL_DECLARED = True

from .backends import load_plugins as _load_plugins  # noqa: E402

_load_plugins()

__version__ = "0.1.0"
