#!/usr/bin/env bash
# Build the native CPU extension with AddressSanitizer + UndefinedBehaviorSanitizer
# (V4K_SANITIZE=1) in a separate copy of the source tree, then run the CPU parity cases and the
# out-of-range robustness driver against it. The regular build (v4kernels/_C_cpu*.so) is not
# touched.
#
# usage: scripts/sanitize.sh [PYTHON] [pytest -k filter]
#   PYTHON   interpreter with torch + pytest (default .venv/bin/python)
#   filter   pytest -k expression for tests/test_parity.py (default "cpu")
# env: V4K_SANITIZE_DIR  where the copy and its build go (default build/sanitize)
#      V4K_CPU_ISA       forwarded to the build (e.g. avx2)
#
# The sanitizer runtime must be loaded before Python: libasan (and libubsan) from the compiler
# are LD_PRELOADed. Python itself is not instrumented, so leak detection is off
# (detect_leaks=0); any memory error or undefined behaviour in the extension aborts the run
# (halt_on_error=1) with a report on stderr, and the script exits non-zero.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-$ROOT/.venv/bin/python}"
FILTER="${2:-cpu}"
OUT="${V4K_SANITIZE_DIR:-$ROOT/build/sanitize}"
CXX_BIN="${CXX:-g++}"

echo "== copying the source tree to $OUT/src"
mkdir -p "$OUT/src"
(cd "$ROOT" && git ls-files -co --exclude-standard | grep -v '^build/' | tar -cf - -T -) | tar -xf - -C "$OUT/src"

echo "== building v4kernels._C_cpu with -fsanitize=address,undefined"
(cd "$OUT/src" && V4K_SANITIZE=1 V4K_BUILD_CPU=1 V4K_BUILD_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" \
    "$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1) || { tail -40 "$OUT/build.log"; exit 1; }
grep -q "cpu_sanitize" "$OUT/src/v4kernels/_build_info.json" 2>/dev/null || true

ASAN_LIB="$($CXX_BIN -print-file-name=libasan.so)"
UBSAN_LIB="$($CXX_BIN -print-file-name=libubsan.so)"
[ -f "$ASAN_LIB" ] || { echo "libasan.so not found (got $ASAN_LIB)"; exit 1; }
export LD_PRELOAD="$ASAN_LIB $UBSAN_LIB"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONPATH="$OUT/src"
export V4K_BUILD_CPU=1

echo "== sanity: the sanitized extension is the one loaded"
(cd "$OUT/src" && "$PY" - <<'PY'
import v4kernels, v4kernels._C_cpu as c, v4kernels._registry as R
print("loaded", c.__file__)
assert not R.get_backend("cpu").backend_reasons("cpu"), R.get_backend("cpu").backend_reasons("cpu")
PY
)

echo "== CPU parity cases (tests/test_parity.py -k '$FILTER') and the robustness driver"
cd "$OUT/src"
"$PY" -m pytest -q -p no:cacheprovider tests/test_parity.py -k "$FILTER" 2>&1 | tee "$OUT/pytest.log" | tail -5
status=${PIPESTATUS[0]}
"$PY" -m pytest -q -p no:cacheprovider tests/test_robustness.py -k "no_crash or nan_ or threads" 2>&1 | tee -a "$OUT/pytest.log" | tail -5
status=$(( status || PIPESTATUS[0] ))
if grep -q "ERROR: AddressSanitizer\|runtime error:" "$OUT/pytest.log"; then
    echo "sanitizer reports found in $OUT/pytest.log"; exit 1
fi
exit "$status"
