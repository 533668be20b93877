// The Python module of the native CPU extension: `import v4kernels._C_cpu` loads the library, which
// runs the TORCH_LIBRARY_IMPL(v4k_impl, CPU, ...) registrations of every <family>_ops.cpp, and
// refuses to load on a CPU lacking the vector ISA it was compiled for. It also exposes the kernels'
// capability limits (kernels.h) to Python as torch.ops.v4k_cpu.limits(), and the dispatch
// fast-path helpers (fastpath.cpp) as module functions.
#include <Python.h>

#include <string>

#include <ATen/core/Dict.h>
#include <torch/library.h>

#include "fastpath.h"
#include "kernels.h"

namespace {

c10::Dict<std::string, int64_t> limits() {
  c10::Dict<std::string, int64_t> d;
  for (const auto& l : v4k_cpu::kLimits) d.insert(l.name, l.value);
  return d;
}

}  // namespace

TORCH_LIBRARY(v4k_cpu, m) { m.def("limits() -> Dict(str, int)", &limits); }


// A minimal Python module so `import v4kernels._C_cpu` loads the library (and runs the
// registrations above); no pybind11 (a build-time choice: one dependency less).
static PyMethodDef v4k_cpu_methods[] = {
    {"signature", v4k_signature, METH_O,
     "signature(args: tuple) -> bytes | None: the dispatch fast path's key of schema arguments"},
    {"index_bounds", v4k_index_bounds, METH_O,
     "index_bounds(t) -> (min, max) | None: bounds of a contiguous CPU int32/int64 tensor"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef v4k_cpu_module = {PyModuleDef_HEAD_INIT, "_C_cpu",
                                            "v4kernels native CPU kernels (implements torch.ops.v4k_impl on CPU)", -1,
                                            v4k_cpu_methods};

#ifndef V4K_CPU_ISA
#define V4K_CPU_ISA "unknown"
#endif

// The vector ISA this library was compiled for must exist on the running CPU; refuse to load
// (a readable ImportError, surfaced by `python -m v4kernels info`) instead of faulting later.
static const char* missing_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#if defined(__AVX512F__)
  if (!__builtin_cpu_supports("avx512f")) return "avx512f";
#endif
#if defined(__AVX512BW__)
  if (!__builtin_cpu_supports("avx512bw")) return "avx512bw";
#endif
#if defined(__AVX512VL__)
  if (!__builtin_cpu_supports("avx512vl")) return "avx512vl";
#endif
#if defined(__AVX512DQ__)
  if (!__builtin_cpu_supports("avx512dq")) return "avx512dq";
#endif
#if defined(__AVX2__)
  if (!__builtin_cpu_supports("avx2")) return "avx2";
#endif
#if defined(__FMA__)
  if (!__builtin_cpu_supports("fma")) return "fma";
#endif
#endif
  return nullptr;
}

PyMODINIT_FUNC PyInit__C_cpu(void) {
  if (const char* m = missing_isa()) {
    PyErr_Format(PyExc_ImportError,
                 "v4kernels._C_cpu was compiled for the %s vector ISA but this CPU lacks %s; reinstall on this "
                 "machine or with V4K_CPU_ISA=baseline",
                 V4K_CPU_ISA, m);
    return nullptr;
  }
  return PyModule_Create(&v4k_cpu_module);
}
