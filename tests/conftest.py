import os

# Environment for the whole suite; set before v4kernels (and with it any Triton kernel module)
# is imported.
# Value checks (index ranges, tid2eid) on for every device in the test suite.
os.environ.setdefault("V4K_CHECKS", "full")
# Triton kernels run through the CPU interpreter here; the variable is read when @triton.jit
# decorates, so it must be set before any v4kernels.ops.*.triton module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter's tl.dot is a numpy matmul: threaded BLAS on a busy 2-core machine makes each
# tiny product ~100x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture
def reference_backend():
    """Force the reference backend: for tests that pin down the executable spec. Every other
    backend is held to the reference by the parity suite (tests/test_parity.py)."""
    import v4kernels as v4k

    with v4k.use_backend("reference"):
        yield


@pytest.fixture
def reference_backend_for():
    """``with reference_backend_for(ops):`` forces the reference for some ops only."""
    import v4kernels as v4k

    return lambda ops: v4k.use_backend("reference", ops=ops)
