import os

# The Triton interpreter's tl.dot is a numpy matmul: threaded BLAS on a busy 2-core machine makes
# each tiny product ~100x slower.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Value checks (index ranges, tid2eid) on for every device in the test suite.
os.environ.setdefault("V4K_CHECKS", "full")
# Triton kernels run through the CPU interpreter here; the variable is read when @triton.jit
# decorates, so it must be set before any v4kernels.ops.*.triton module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
