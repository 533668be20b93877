// Host-side helpers of the dispatch fast path (v4kernels/_registry.py), exposed as
// v4kernels._C_cpu.signature / index_bounds. Both have pure-Python equivalents that the registry
// uses when this extension is not built; these exist because a decode step makes hundreds of op
// calls and the Python versions cost microseconds each.
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <string>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>

#include "fastpath.h"

namespace {

template <typename T>
void put(std::string& key, T v) {
  key.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

// Appends the encoding of one argument; false when the argument has no signature (a tensor
// subclass, an unsupported type, an int that does not fit in int64).
bool encode(std::string& key, PyObject* a, int depth) {
  if (THPVariable_CheckExact(a)) {
    const at::Tensor& t = THPVariable_Unpack(a);
    key.push_back('T');
    if (!t.defined()) {
      key.push_back('u');
      return true;
    }
    put<int8_t>(key, static_cast<int8_t>(t.scalar_type()));
    put<int8_t>(key, static_cast<int8_t>(t.device().type()));
    put<int8_t>(key, t.device().index());
    put<int8_t>(key, t.requires_grad() ? 1 : 0);
    const auto sizes = t.sizes();
    put<int8_t>(key, static_cast<int8_t>(sizes.size()));
    key.append(reinterpret_cast<const char*>(sizes.data()), sizes.size() * sizeof(int64_t));
    return true;
  }
  if (a == Py_None) {
    key.push_back('N');
    return true;
  }
  if (PyBool_Check(a)) {
    key.push_back(a == Py_True ? 'B' : 'b');
    return true;
  }
  if (PyLong_CheckExact(a)) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(a, &overflow);
    if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return false;
    }
    key.push_back('i');
    put<int64_t>(key, static_cast<int64_t>(v));
    return true;
  }
  if (PyFloat_CheckExact(a)) {
    key.push_back('f');
    put<double>(key, PyFloat_AS_DOUBLE(a));
    return true;
  }
  if (PyUnicode_CheckExact(a)) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(a, &n);
    if (s == nullptr) {
      PyErr_Clear();
      return false;
    }
    key.push_back('s');
    put<int64_t>(key, static_cast<int64_t>(n));
    key.append(s, static_cast<size_t>(n));
    return true;
  }
  if (THPDtype_Check(a)) {
    key.push_back('d');
    put<int8_t>(key, static_cast<int8_t>(reinterpret_cast<THPDtype*>(a)->scalar_type));
    return true;
  }
  if (THPDevice_Check(a)) {
    const at::Device& d = reinterpret_cast<THPDevice*>(a)->device;
    key.push_back('D');
    put<int8_t>(key, static_cast<int8_t>(d.type()));
    put<int8_t>(key, d.index());
    return true;
  }
  if ((PyList_CheckExact(a) || PyTuple_CheckExact(a)) && depth < 2) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(a);
    PyObject** items = PySequence_Fast_ITEMS(a);
    key.push_back(PyList_CheckExact(a) ? 'L' : 'U');
    put<int64_t>(key, static_cast<int64_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!encode(key, items[i], depth + 1)) return false;
    }
    return true;
  }
  return false;
}

}  // namespace

// signature(args: tuple) -> bytes | None
// An exact encoding of everything an op's structural checks and its backend selection may depend
// on: autograd's grad mode, and per argument its kind plus, for a tensor, dtype, device, shape and
// requires_grad; for a scalar, its type and value (True and 1 differ). Strides and values are not
// part of it. None when an argument has no encoding (tensor subclasses, other Python objects).
PyObject* v4k_signature(PyObject* /*self*/, PyObject* args) {
  if (!PyTuple_CheckExact(args)) {
    PyErr_SetString(PyExc_TypeError, "signature: expected a tuple of schema arguments");
    return nullptr;
  }
  std::string key;
  key.reserve(160);
  key.push_back(at::GradMode::is_enabled() ? 'G' : 'g');
  const Py_ssize_t n = PyTuple_GET_SIZE(args);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!encode(key, PyTuple_GET_ITEM(args, i), 0)) Py_RETURN_NONE;
  }
  return PyBytes_FromStringAndSize(key.data(), static_cast<Py_ssize_t>(key.size()));
}

// index_bounds(t: Tensor) -> (min, max) | None
// Min and max of a non-empty CPU int32/int64 tensor (value checks of index arguments); None for
// anything else, which the caller then reduces with torch.
PyObject* v4k_index_bounds(PyObject* /*self*/, PyObject* arg) {
  if (!THPVariable_CheckExact(arg)) Py_RETURN_NONE;
  const at::Tensor& t = THPVariable_Unpack(arg);
  if (!t.defined() || !t.device().is_cpu() || t.numel() == 0 ||
      (t.scalar_type() != at::kLong && t.scalar_type() != at::kInt) || !t.is_contiguous()) {
    Py_RETURN_NONE;
  }
  const int64_t n = t.numel();
  int64_t lo = 0, hi = 0;
  if (t.scalar_type() == at::kLong) {
    const int64_t* p = t.const_data_ptr<int64_t>();
    lo = hi = p[0];
    for (int64_t i = 1; i < n; ++i) {
      lo = p[i] < lo ? p[i] : lo;
      hi = p[i] > hi ? p[i] : hi;
    }
  } else {
    const int32_t* p = t.const_data_ptr<int32_t>();
    lo = hi = p[0];
    for (int64_t i = 1; i < n; ++i) {
      lo = p[i] < lo ? p[i] : lo;
      hi = p[i] > hi ? p[i] : hi;
    }
  }
  return Py_BuildValue("(LL)", static_cast<long long>(lo), static_cast<long long>(hi));
}
