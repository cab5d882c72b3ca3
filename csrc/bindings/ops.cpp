// The lbw operator library: schemas (TORCH_LIBRARY) and the Python module lbw_kernels._C.
// Kernels are registered per device in ops_cpu.cpp and ops_cuda.cpp; the fake (meta)
// implementations are in lbw_kernels/cpp_backend.py.
#include <Python.h>
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

static PyMethodDef methods[] = {
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
