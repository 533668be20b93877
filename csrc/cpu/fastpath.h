// Host-side helpers of the dispatch fast path (see fastpath.cpp), registered as module functions
// of v4kernels._C_cpu by module.cpp.
#pragma once

#include <Python.h>

PyObject* v4k_signature(PyObject* self, PyObject* args);
PyObject* v4k_index_bounds(PyObject* self, PyObject* arg);
