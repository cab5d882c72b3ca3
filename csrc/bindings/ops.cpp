// The lbw operator library: schemas (TORCH_LIBRARY) and the Python module lbw_kernels._C.
// Kernels are registered per device in ops_cpu.cpp and ops_cuda.cpp; the fake (meta)
// implementations are in lbw_kernels/cpp_backend.py.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include "../cpu/multi_tensor_cpu.h"
#include "common.h"

namespace lbw {
std::atomic<bool>& poison_outputs() {
  static std::atomic<bool> flag{false};
  return flag;
}
}  // namespace lbw

TORCH_LIBRARY(lbw, m) {
  // Per non-empty gradient, in order: (sum g^2, sum g, nonfinite 0/1), float64 [T, 3].
  m.def("telemetry(Tensor[] grads) -> Tensor");
  // AdamW with lr = lr * lr_scale (lr_scale: 0-dim float64 on the params' device, the guard's
  // scale). skip (0-dim, non-zero = skip): nothing changes, steps included.
  m.def(
      "adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor lr_scale, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool maximize, Tensor? skip) -> ()");
  // single_pass: the update plus the telemetry rows of the non-empty grads as read; with
  // mask_nonfinite an element whose grad is NaN/Inf keeps its p, m, v.
  m.def(
      "adamw_telemetry_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, Tensor lr_scale, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool maximize, bool mask_nonfinite) -> Tensor");
}

static PyObject* set_poison_outputs(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  const bool old = lbw::poison_outputs().exchange(on != 0);
  return PyBool_FromLong(old);
}

static PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(lbw::cpu::kernels().isa); }

// (address, numel, dtype code) of every tensor of a sequence, flattened into one tuple of ints:
// the Triton backend's plan-cache key, read in one call instead of three Python calls per
// tensor (~2 ms per step for 2000 tensors on a slow host).
static PyObject* layout_key(PyObject*, PyObject* arg) {
  PyObject* seq = PySequence_Fast(arg, "_layout_key expects a sequence of tensors");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  PyObject* out = PyTuple_New(3 * n);
  if (out == nullptr) {
    Py_DECREF(seq);
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_Check(items[i])) {
      PyErr_Format(PyExc_TypeError, "_layout_key: item %zd is not a tensor", i);
      Py_DECREF(out);
      Py_DECREF(seq);
      return nullptr;
    }
    const at::Tensor& t = THPVariable_Unpack(items[i]);
    PyObject* values[3] = {
        PyLong_FromVoidPtr(t.has_storage() ? t.data_ptr() : nullptr),
        PyLong_FromLongLong(t.numel()),
        PyLong_FromLong(static_cast<long>(t.scalar_type())),
    };
    if (values[0] == nullptr || values[1] == nullptr || values[2] == nullptr) {
      for (PyObject* v : values) Py_XDECREF(v);
      Py_DECREF(out);
      Py_DECREF(seq);
      return nullptr;
    }
    for (int k = 0; k < 3; ++k) PyTuple_SET_ITEM(out, 3 * i + k, values[k]);  // steals
  }
  Py_DECREF(seq);
  return out;
}

static PyMethodDef methods[] = {
    {"_layout_key", layout_key, METH_O,
     "(data_ptr, numel, dtype code) of each tensor of a sequence, as one flat tuple of ints."},
    {"_cpu_isa", cpu_isa, METH_NOARGS,
     "Instruction set of the CPU kernels in use (default, avx2 or avx512; LBW_CPU_ISA caps it)."},
    {"_set_poison_outputs", set_poison_outputs, METH_O,
     "Test mode: fill outputs the ops allocate with NaN before the kernels write them. "
     "Returns the previous setting."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                        "lbw operator library (torch.ops.lbw)", -1, methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef LBW_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}
