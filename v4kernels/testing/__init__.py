"""The shared parity suite: seeded cases, comparison helpers and a runner.

Run it on any machine with ``python -m v4kernels parity`` (every case on every backend usable
there); ``tests/test_parity.py`` in the source tree wraps the same cases for pytest.
"""
from .cases import ParityCase, all_cases, make_inputs, register
from .compare import assert_close, compare_outputs, compare_tensors, compare_topk, index_set_recall
from .runner import ParityResult, run_case, run_parity, select_cases

__all__ = [
    "ParityCase", "all_cases", "make_inputs", "register", "assert_close", "compare_outputs", "compare_tensors",
    "compare_topk", "index_set_recall", "ParityResult", "run_case", "run_parity", "select_cases",
]
