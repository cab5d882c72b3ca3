// The Python module lbw_kernels._C: the switches of common.h, the optimizer's per-call helpers
// (gather_grads, layout_key) and the eager entries to the lbw ops (schemas: ops.cpp).
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <functional>
#include <optional>
#include <unordered_map>
#include <vector>

#include "../cpu/multi_tensor_cpu.h"
#include "common.h"

static PyObject* set_poison_outputs(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  const bool old = lbw::poison_outputs().exchange(on != 0);
  return PyBool_FromLong(old);
}

// _cuda_geometry() -> (threads, ilp, chunk, warp_partials) in use; _cuda_geometry(threads, ilp,
// chunk, warp_partials) sets it (ValueError for one without kernels) and returns the previous one.
static PyObject* cuda_geometry(PyObject*, PyObject* args) {
  lbw::cuda::Geometry& current = lbw::cuda_geometry();
  const lbw::cuda::Geometry old = current;
  if (PyTuple_GET_SIZE(args) > 0) {
    lbw::cuda::Geometry geo;
    long long chunk = 0;
    if (!PyArg_ParseTuple(args, "iiLi:_cuda_geometry", &geo.threads, &geo.ilp, &chunk, &geo.warp_partials))
      return nullptr;
    geo.chunk = chunk;
    if (!lbw::cuda::geometry_supported(geo)) {
      PyErr_Format(PyExc_ValueError,
                   "CUDA geometry threads=%d, ilp=%d, chunk=%lld, warp_partials=%d has no kernels: (threads, ilp) "
                   "must be (512, 1), (512, 2), (256, 2) or (256, 4), chunk a power of two from 4096 to 1048576, "
                   "warp_partials 0 or 1",
                   geo.threads, geo.ilp, chunk, geo.warp_partials);
      return nullptr;
    }
    current = geo;
  }
  return Py_BuildValue("(iiLi)", old.threads, old.ilp, static_cast<long long>(old.chunk), old.warp_partials);
}

// (RuntimeError for an LBW_CPU_ISA that names no instruction set: dispatch.cpp)
static PyObject* cpu_isa(PyObject*, PyObject*) {
  HANDLE_TH_ERRORS
  return PyUnicode_FromString(lbw::cpu::kernels().isa);
  END_HANDLE_TH_ERRORS
}

// A tensor's dtype code for a layout key, flagged when the tensor is not contiguous: its strides
// then follow in the key's appendix (strides_appendix). A Triton plan walks p, g, m, v as flat
// arrays in one element order, so a grad buffer reused with other strides (same address, same
// numel) must not find the old plan. Contiguity is a flag torch keeps: ~1 ns a tensor.
constexpr int64_t kStridesFollow = int64_t(1) << 16;

static int64_t layout_code(const at::Tensor& t, std::vector<int64_t>& appendix, int64_t index) {
  if (t.is_contiguous()) return int64_t(t.scalar_type());
  appendix.push_back(index);
  appendix.push_back(t.dim());
  for (const int64_t st : t.strides()) appendix.push_back(st);
  return int64_t(t.scalar_type()) | kStridesFollow;
}

// `key` with `appendix` (index, ndim, strides... of each flagged tensor) appended: a new bytes
// object (the rare case: some tensor is not contiguous), `key` itself when there is none.
static PyObject* strides_appendix(PyObject* key, const std::vector<int64_t>& appendix) {
  if (appendix.empty()) return key;
  const Py_ssize_t head = PyBytes_GET_SIZE(key), tail = Py_ssize_t(appendix.size() * sizeof(int64_t));
  PyObject* out = PyBytes_FromStringAndSize(nullptr, head + tail);
  if (out != nullptr) {
    std::memcpy(PyBytes_AS_STRING(out), PyBytes_AS_STRING(key), size_t(head));
    std::memcpy(PyBytes_AS_STRING(out) + head, appendix.data(), size_t(tail));
  }
  Py_DECREF(key);
  return out;
}

// (address, numel, dtype code) of every tensor of a sequence, packed as int64s into one bytes
// object, with the strides of those that are not contiguous after them (layout_code): the
// Triton backend's plan-cache key. Bytes compare at memory speed (the cache compares
// them, it does not hash them: chunk_table.PlanCache); a tuple of Python ints for 2000 tensors
// took ~1 ms per call to build, hash and compare.
static PyObject* layout_key(PyObject*, PyObject* arg) {
  const char* name = "_layout_key";
  constexpr Py_ssize_t kFields = 3;
  PyObject* seq = PySequence_Fast(arg, "expected a sequence of tensors");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  PyObject* out = PyBytes_FromStringAndSize(nullptr, kFields * n * Py_ssize_t(sizeof(int64_t)));
  if (out == nullptr) {
    Py_DECREF(seq);
    return nullptr;
  }
  auto* values = reinterpret_cast<int64_t*>(PyBytes_AS_STRING(out));
  std::vector<int64_t> appendix;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_Check(items[i])) {
      PyErr_Format(PyExc_TypeError, "%s: item %zd is not a tensor", name, i);
      Py_DECREF(out);
      Py_DECREF(seq);
      return nullptr;
    }
    const at::Tensor& t = THPVariable_Unpack(items[i]);
    values[kFields * i] = int64_t(reinterpret_cast<uintptr_t>(t.has_storage() ? t.data_ptr() : nullptr));
    values[kFields * i + 1] = t.numel();
    values[kFields * i + 2] = layout_code(t, appendix, i);
  }
  Py_DECREF(seq);
  return strides_appendix(out, appendix);
}

// Whether .grad of a param of this Python type is the tensor's own C++ grad, readable without
// Python: its type overrides neither the `grad` attribute nor __torch_function__ (DTensor and
// torchao's float8 weight wrapper disable the latter), so torch's own getter would return
// exactly that. getattr costs ~1.5 us a param for those (3 ms a call for 2000 FSDP2 params).
// Kept per type, with a reference to it (so its address is never another type's).
static bool grad_read_directly(PyTypeObject* type) {
  static std::unordered_map<PyTypeObject*, bool> known;
  const auto it = known.find(type);
  if (it != known.end()) return it->second;
  static PyObject* const grad_name = PyUnicode_InternFromString("grad");
  static PyObject* const function_name = PyUnicode_InternFromString("__torch_function__");
  static PyObject* const disabled = [] {
    PyObject* module = PyImport_ImportModule("torch._C");
    PyObject* impl = module != nullptr ? PyObject_GetAttrString(module, "_disabled_torch_function_impl") : nullptr;
    Py_XDECREF(module);
    if (impl == nullptr) PyErr_Clear();  // (then no subclass takes this path)
    return impl;
  }();
  auto* const base = reinterpret_cast<PyTypeObject*>(THPVariableClass);
  const bool direct = disabled != nullptr && grad_name != nullptr && function_name != nullptr &&
                      _PyType_Lookup(type, grad_name) == _PyType_Lookup(base, grad_name) &&
                      _PyType_Lookup(type, function_name) == disabled;
  Py_INCREF(type);
  known.emplace(type, direct);
  return direct;
}

// The optimizer's per-call gathering, in one pass: for each group (a sequence of params), the
// list of their .grad (None where absent); per group whether some grad is None; whether every
// grad is dense, real and floating-point (what check_grads_cheaply asks); and per group the layout of its
// params and grads as read on the way, as bytes (GroupTensors.layout_key: 6 int64 per param,
// its address, numel and layout_code, then its grad's, code -1 for no grad; the strides of
// those that are not contiguous after the rows), or None when a param is not a plain tensor or
// nn.Parameter or a grad is a tensor subclass; and per group which objects its list holds, with
// their element counts and dtypes (3 int64 per param, as bytes: the step plan's key sees a
// param replaced in its list, and one resized or cast in place through .data, which leaves the
// plan's element counts or its split by dtype stale). ~20 ns per param, against ~0.4 us for the
// three Python passes it replaces. Params that are not plain tensors or nn.Parameters have no
// layout here (a wrapper subclass's address is not its elements'); their .grad is read in C++
// where grad_read_directly says it is the same, else asked through getattr (subclasses may
// override attribute access).
static PyObject* gather_grads(PyObject*, PyObject* arg) {
  PyObject* groups = PySequence_Fast(arg, "_gather_grads expects a sequence of param lists");
  if (groups == nullptr) return nullptr;
  const Py_ssize_t ngroups = PySequence_Fast_GET_SIZE(groups);
  PyObject* per_group = PyList_New(ngroups);
  PyObject* missing = PyTuple_New(ngroups);
  PyObject* layouts = PyTuple_New(ngroups);
  PyObject* identities = PyTuple_New(ngroups);
  bool dense_real = true;
  // (index among all the groups' params, Python type) of each grad that is a tensor subclass: a
  // wrapper's address is not its elements', so a plan must be rebuilt when these change.
  std::vector<int64_t> subclass_grads;
  Py_ssize_t offset = 0;  // of the current group's params among all
  auto fail = [&]() -> PyObject* {
    Py_XDECREF(per_group);
    Py_XDECREF(missing);
    Py_XDECREF(layouts);
    Py_XDECREF(identities);
    Py_DECREF(groups);
    return nullptr;
  };
  if (per_group == nullptr || missing == nullptr || layouts == nullptr || identities == nullptr) return fail();
  for (Py_ssize_t gi = 0; gi < ngroups; ++gi) {
    PyObject* params = PySequence_Fast(PySequence_Fast_GET_ITEM(groups, gi), "_gather_grads: a group's params must be a sequence");
    if (params == nullptr) return fail();
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(params);
    PyObject** items = PySequence_Fast_ITEMS(params);
    PyObject* grads = PyList_New(n);
    PyObject* layout = PyBytes_FromStringAndSize(nullptr, 6 * n * Py_ssize_t(sizeof(int64_t)));
    PyObject* ids = PyBytes_FromStringAndSize(nullptr, 3 * n * Py_ssize_t(sizeof(int64_t)));
    if (grads == nullptr || layout == nullptr || ids == nullptr) {
      Py_XDECREF(grads);
      Py_XDECREF(layout);
      Py_XDECREF(ids);
      Py_DECREF(params);
      return fail();
    }
    auto* member = reinterpret_cast<int64_t*>(PyBytes_AS_STRING(ids));
    for (Py_ssize_t i = 0; i < n; ++i, member += 3) {
      member[0] = int64_t(reinterpret_cast<uintptr_t>(items[i]));
      member[1] = member[2] = -1;  // (not a tensor, or one whose size cannot be read)
      if (THPVariable_Check(items[i])) {
        try {
          const at::Tensor& p = THPVariable_Unpack(items[i]);
          member[1] = p.numel();
          member[2] = int64_t(p.scalar_type());
        } catch (const std::exception&) {
        }
      }
    }
    PyTuple_SET_ITEM(identities, gi, ids);  // steals
    auto* row = reinterpret_cast<int64_t*>(PyBytes_AS_STRING(layout));
    std::vector<int64_t> appendix;
    bool layout_known = true;
    const auto address = [](const at::Tensor& t) {
      return int64_t(reinterpret_cast<uintptr_t>(t.has_storage() ? t.data_ptr() : nullptr));
    };
    bool any_missing = false;
    for (Py_ssize_t i = 0; i < n; ++i, row += 6) {
      PyObject* grad = nullptr;
      const bool exact = THPVariable_CheckExact(items[i]);
      if (exact || (THPVariable_Check(items[i]) && grad_read_directly(Py_TYPE(items[i])))) {
        const at::Tensor& p = THPVariable_Unpack(items[i]);
        const at::Tensor& g = p.grad();
        if (g.defined()) {
          grad = THPVariable_Wrap(g);  // the grad's own Python object (identity kept)
          const auto dtype = g.scalar_type();
          dense_real = dense_real && g.layout() == at::kStrided && at::isFloatingType(dtype);
        } else {
          grad = Py_NewRef(Py_None);
        }
        // A subclass has no layout here: its address is not its elements' (a wrapper's is 0).
        // (Unvalidated tensors: one whose address or size cannot be read, a nested tensor say,
        // leaves the group without a layout rather than raising here.)
        if (!exact) {
          layout_known = false;
        } else {
          try {
            row[0] = address(p);
            row[1] = p.numel();
            row[2] = layout_code(p, appendix, 2 * i);
            row[3] = g.defined() ? address(g) : 0;
            row[4] = g.defined() ? g.numel() : 0;
            row[5] = g.defined() ? layout_code(g, appendix, 2 * i + 1) : -1;
          } catch (const std::exception&) {
            layout_known = false;
          }
        }
      } else {
        layout_known = false;
        grad = PyObject_GetAttrString(items[i], "grad");
        if (grad != nullptr && grad != Py_None) {
          if (!THPVariable_Check(grad)) {
            dense_real = false;  // the full check names it
          } else {
            const at::Tensor& g = THPVariable_Unpack(grad);
            dense_real = dense_real && g.layout() == at::kStrided && at::isFloatingType(g.scalar_type());
          }
        }
      }
      if (grad == nullptr) {
        Py_DECREF(grads);
        Py_DECREF(layout);
        Py_DECREF(params);
        return fail();
      }
      any_missing = any_missing || grad == Py_None;
      if (grad != Py_None && !THPVariable_CheckExact(grad)) {
        subclass_grads.push_back(int64_t(offset + i));
        subclass_grads.push_back(int64_t(reinterpret_cast<uintptr_t>(Py_TYPE(grad))));
        // Nor has its group a layout then: a wrapper's address (0) is not its elements', and the
        // plans read the inner tensors the step resolves it to, whose moves this row would miss.
        layout_known = false;
      }
      PyList_SET_ITEM(grads, i, grad);  // steals
    }
    Py_DECREF(params);
    offset += n;
    PyList_SET_ITEM(per_group, gi, grads);  // steals
    PyTuple_SET_ITEM(missing, gi, PyBool_FromLong(any_missing));
    if (!layout_known) {
      Py_SETREF(layout, Py_NewRef(Py_None));
    } else if ((layout = strides_appendix(layout, appendix)) == nullptr) {
      return fail();
    }
    PyTuple_SET_ITEM(layouts, gi, layout);  // steals
  }
  PyObject* subclasses = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(subclass_grads.data()),
                                                   Py_ssize_t(subclass_grads.size() * sizeof(int64_t)));
  if (subclasses == nullptr) return fail();
  Py_DECREF(groups);
  PyObject* out = Py_BuildValue("(NNONNN)", per_group, missing, dense_real ? Py_True : Py_False, layouts, identities,
                                subclasses);
  return out;
}

// ---------------------------------------------------------------------------------------
// Eager entry points: the same ops, called from Python without torch.ops' argument parsing.
// torch.ops checks every tensor of every list for __torch_function__ overrides, boxes the
// lists into IValues and runs the boxed autograd fallback: ~0.9 ms per call for 5 lists of
// 2000 tensors, more than the GPU needs for the update itself. These unpack the lists once
// and call the op through the dispatcher's typed (unboxed) handle below the autograd keys,
// which the ops have no kernels for (the step runs under no_grad; as torch's fused AdamW, the
// ops leave version counters alone). torch.compile keeps calling torch.ops.lbw.*.
namespace {

// What the kernels take: walkable (common.h: contiguous, or dense in another order of its dims,
// as channels_last), float32/float64/bfloat16/float16. The backend sends anything else to the
// reference.
bool kernel_ready(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return lbw::walkable(t) &&
         (dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf);
}

// The tensors of a Python sequence, borrowed: no reference-count traffic on the tensors
// (owning copies cost an atomic increment and decrement each, ~0.2 ms per update call of
// 5 x 2000 tensors). With `hold`, a reference to each Python object holds it, and so its
// tensor, for as long as the borrows live, even if the caller's list changes while the GIL is
// released (Not a tuple copy of the sequence: allocating and freeing 5 tuples of 2000 per
// call, and the garbage collector's passes they trigger, were ~10% of the entry's time on
// CPU.) Without it the GIL must stay held while the borrows are used (the lists cannot change
// then): that saves a second pass over every Python object, whose reference counts the
// destructor would drop (perf, CPU op on 5 x 2000 tensors: ~9% of the call in the destructor).
class BorrowedTensors {
 public:
  BorrowedTensors() = default;
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  ~BorrowedTensors() {
    for (auto& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
    for (PyObject* item : held_) Py_DECREF(item);
  }

  // false with a TypeError naming `what` when obj is not a sequence of tensors. Notes on the
  // way whether the kernels take every tensor (kernel_ready), and whether all share a dtype.
  bool unpack(PyObject* obj, const char* what, bool hold) {
    PyObject* seq = PySequence_Fast(obj, "");  // a list or tuple: itself
    if (seq == nullptr) {  // (an error raised while iterating is kept as it is)
      if (PyErr_ExceptionMatches(PyExc_TypeError))
        PyErr_Format(PyExc_TypeError, "lbw: %s must be a sequence of tensors", what);
      return false;
    }
    // Any other sequence was copied into a new list, released below: only references of our
    // own then keep its items (and their tensors) alive.
    hold = hold || seq != obj;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    if (hold) held_.reserve(n);
    tensors_.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = items[i];
      if (!THPVariable_Check(item)) {
        PyErr_Format(PyExc_TypeError, "lbw: %s[%zd] is not a tensor", what, i);
        Py_DECREF(seq);
        return false;
      }
      if (hold) held_.push_back(Py_NewRef(item));
      const at::Tensor& t = THPVariable_Unpack(item);
      if (i == 0) first_ = t.scalar_type();
      ready_ = ready_ && kernel_ready(t);
      contiguous_ = contiguous_ && t.is_contiguous();
      uniform_ = uniform_ && t.scalar_type() == first_;
      tensors_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t));
    }
    Py_DECREF(seq);
    return true;
  }

  at::TensorList list() const { return tensors_; }
  // Whether the kernels take every tensor; with `uniform`, also whether they share one dtype.
  bool ready(bool uniform) const { return ready_ && (uniform_ || !uniform); }
  // The first tensor's dtype (Undefined for an empty list).
  at::ScalarType dtype() const { return first_; }
  // Whether every tensor is contiguous (the common case: then no element order to compare).
  bool contiguous() const { return contiguous_; }

 private:
  std::vector<PyObject*> held_;
  std::vector<at::Tensor> tensors_;
  bool ready_ = true, uniform_ = true, contiguous_ = true;
  at::ScalarType first_ = at::ScalarType::Undefined;
};

bool unpack_tensor(PyObject* obj, const char* what, at::Tensor& out) {
  if (!THPVariable_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "lbw: %s is not a tensor", what);
    return false;
  }
  out = THPVariable_Unpack(obj);
  return true;
}

// Whether an entry releases the GIL while the op runs: for CPU tensors, where the op does the
// arithmetic (other Python threads run meanwhile, as with torch's own ops); not for CUDA ones,
// where the op only checks, looks up its table and enqueues launches (~0.3 ms for 2000
// tensors), so holding the GIL lets the entry borrow the tensors without holding each Python
// object (BorrowedTensors). Decided by the first tensor of `seq` (the op refuses mixed
// devices); an empty or malformed sequence releases (unpack then says what is wrong).
bool releases_gil(PyObject* seq) {
  PyObject* first = nullptr;
  if (PyList_Check(seq) && PyList_GET_SIZE(seq) > 0) first = PyList_GET_ITEM(seq, 0);
  if (PyTuple_Check(seq) && PyTuple_GET_SIZE(seq) > 0) first = PyTuple_GET_ITEM(seq, 0);
  return first == nullptr || !THPVariable_Check(first) || !THPVariable_Unpack(first).is_cuda();
}

// Runs `body` (without the GIL when `release`); a C++ exception is rethrown with the GIL held
// and translated by torch's own handler, so callers see what torch.ops would raise
// (RuntimeError, torch.OutOfMemoryError, ...).
template <class Body>
bool run_op(bool release, Body&& body) {
  std::exception_ptr error;
  const auto guarded = [&] {
    try {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      body();
    } catch (...) {
      error = std::current_exception();
    }
  };
  if (release) {
    Py_BEGIN_ALLOW_THREADS
    guarded();
    Py_END_ALLOW_THREADS
  } else {
    guarded();
  }
  if (!error) return true;
  HANDLE_TH_ERRORS
  std::rethrow_exception(error);
  END_HANDLE_TH_ERRORS_RET(false)
}

// The five tensor lists of an update op: params, grads, exp_avgs, exp_avg_sqs, steps.
struct UpdateLists {
  BorrowedTensors params, grads, exp_avgs, exp_avg_sqs, steps;

  bool unpack(PyObject* p, PyObject* g, PyObject* m, PyObject* v, PyObject* s, bool hold) {
    return params.unpack(p, "params", hold) && grads.unpack(g, "grads", hold) &&
           exp_avgs.unpack(m, "exp_avgs", hold) && exp_avg_sqs.unpack(v, "exp_avg_sqs", hold) &&
           steps.unpack(s, "steps", hold);
  }

  // Whether the kernels take the call: every tensor of the four lists kernel_ready, one dtype
  // per list, grads of the params' dtype or fp32 grads of bf16/fp16 params (torch >= 2.10's
  // grad_dtype; update_dtypes_supported), each param's grad and states in its element order
  // (checked only where some tensor is not contiguous), and the op's own checks then say what
  // else is wrong. Other pairs (fp32 params with bf16 grads, say) and a grad or state in another
  // order than its param go to the reference.
  bool kernel_ready() const {
    if (!(params.ready(true) && grads.ready(true) && exp_avgs.ready(true) && exp_avg_sqs.ready(true) &&
          lbw::update_dtypes_supported(params.dtype(), grads.dtype())))
      return false;
    if (params.contiguous() && grads.contiguous() && exp_avgs.contiguous() && exp_avg_sqs.contiguous()) return true;
    const at::TensorList p = params.list(), g = grads.list(), m = exp_avgs.list(), v = exp_avg_sqs.list();
    const size_t n = std::min({p.size(), g.size(), m.size(), v.size()});  // (other lengths: the op refuses)
    for (size_t i = 0; i < n; ++i)
      if (!lbw::same_element_order(g[i], p[i]) || !lbw::same_element_order(m[i], p[i]) ||
          !lbw::same_element_order(v[i], p[i]))
        return false;
    return true;
  }
};

// The update ops' leading arguments: the lists, lr_scale, lr, beta1, beta2, eps, weight_decay,
// maximize, then one op-specific argument (and, for _adamw_, an optional second one:
// grad_factor).
struct UpdateArgs : UpdateLists {
  at::Tensor lr_scale;
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
  int maximize = 0;
  PyObject* last = nullptr;
  PyObject* extra = nullptr;  // (only where the format has a 14th "O")
  bool release = true;  // releases_gil(params)

  // `format`: "OOOOOOdddddpO:<function name>" (the name is PyArg's for its error messages).
  bool parse(PyObject* args, const char* format) {
    PyObject *p, *g, *m, *v, *s, *scale;
    if (!PyArg_ParseTuple(args, format, &p, &g, &m, &v, &s, &scale, &lr, &beta1, &beta2, &eps,
                          &weight_decay, &maximize, &last, &extra))
      return false;
    release = releases_gil(p);
    return unpack(p, g, m, v, s, release) && unpack_tensor(scale, "lr_scale", lr_scale);
  }
};

// The entries return False (_adamw_) or None (the others) without doing anything when a
// tensor is not what the kernels take (UpdateArgs::kernel_ready): the caller then runs the
// reference. One pass over the lists unpacks and checks them.
// An optional tensor argument: None (or absent, nullptr) -> nothing.
bool unpack_optional(PyObject* obj, const char* what, std::optional<at::Tensor>& out) {
  if (obj == nullptr || obj == Py_None) return true;
  at::Tensor t;
  if (!unpack_tensor(obj, what, t)) return false;
  out = std::move(t);
  return true;
}

PyObject* call_adamw(PyObject*, PyObject* args) {
  UpdateArgs a;
  if (!a.parse(args, "OOOOOOdddddpO|O:_adamw_")) return nullptr;
  if (!a.kernel_ready()) Py_RETURN_FALSE;
  std::optional<at::Tensor> skip, grad_factor;
  if (!unpack_optional(a.last, "skip", skip) || !unpack_optional(a.extra, "grad_factor", grad_factor)) return nullptr;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lbw::adamw_", "")
                       .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                   const at::Tensor&, double, double, double, double, double, bool,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  if (!run_op(a.release, [&] {
        op.call(a.params.list(), a.grads.list(), a.exp_avgs.list(), a.exp_avg_sqs.list(), a.steps.list(),
                a.lr_scale, a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.maximize != 0, skip, grad_factor);
      }))
    return nullptr;
  Py_RETURN_TRUE;
}

PyObject* call_adamw_telemetry(PyObject*, PyObject* args) {
  UpdateArgs a;
  if (!a.parse(args, "OOOOOOdddddpO:_adamw_telemetry_")) return nullptr;
  const int mask = PyObject_IsTrue(a.last);
  if (mask < 0) return nullptr;
  if (!a.kernel_ready()) Py_RETURN_NONE;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lbw::adamw_telemetry_", "")
                       .typed<at::Tensor(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                         at::TensorList, const at::Tensor&, double, double, double, double,
                                         double, bool, bool)>();
  at::Tensor out;
  if (!run_op(a.release, [&] {
        out = op.call(a.params.list(), a.grads.list(), a.exp_avgs.list(), a.exp_avg_sqs.list(), a.steps.list(),
                      a.lr_scale, a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.maximize != 0, mask != 0);
      }))
    return nullptr;
  return THPVariable_Wrap(std::move(out));
}

// The CUDA exact gate in one call: (params, grads, exp_avgs, exp_avg_sqs, steps, lr_scale, lr,
// beta1, beta2, eps, weight_decay, maximize, skip, decide[, partials]). The telemetry rows of
// the grads (or `partials`, when given and not None: rows launched already,
// lbw_kernels/early_telemetry.py) go to decide(partials), a Python callable that enqueues rules
// 1-4 on the stream and returns None or the gradient factor (max_grad_norm) the update then
// reads; then the update, which reads lr_scale, skip and that factor on the device after it.
// False, with nothing done, for tensors the kernels do not take, CPU tensors or a build without
// CUDA (exact_step_cuda). The GIL stays held but for
// decide's own torch calls: the borrowed tensors are used only before decide runs; the update
// then reads the table's addresses, whose tensors the caller's lists (the optimizer's
// GroupTensors, alive for the whole call) keep alive even if another thread resets .grad.
PyObject* call_adamw_exact(PyObject*, PyObject* args) {
  const lbw::ExactStepFn exact = lbw::cuda_exact_step();
  if (!PyTuple_Check(args) || (PyTuple_GET_SIZE(args) != 14 && PyTuple_GET_SIZE(args) != 15)) {
    PyErr_SetString(PyExc_TypeError, "_adamw_exact_ takes 14 positional arguments (15 with the rows)");
    return nullptr;
  }
  PyObject* head = PyTuple_GetSlice(args, 0, 13);
  if (head == nullptr) return nullptr;
  UpdateArgs a;
  const bool parsed = a.parse(head, "OOOOOOdddddpO:_adamw_exact_");
  Py_DECREF(head);
  if (!parsed) return nullptr;
  PyObject* decide = PyTuple_GET_ITEM(args, 13);
  if (!PyCallable_Check(decide)) {
    PyErr_SetString(PyExc_TypeError, "lbw: decide must be callable");
    return nullptr;
  }
  if (exact == nullptr || a.release || !a.kernel_ready()) Py_RETURN_FALSE;
  std::optional<at::Tensor> skip, rows;
  if (!unpack_optional(a.last, "skip", skip)) return nullptr;
  if (PyTuple_GET_SIZE(args) == 15 && !unpack_optional(PyTuple_GET_ITEM(args, 14), "partials", rows)) return nullptr;
  // decide runs as Python with the caller's dispatcher state, not the one run_op sets for the
  // op; a Python error it raises is carried through as python_error and restored by run_op.
  const c10::impl::LocalDispatchKeySet caller = c10::impl::tls_local_dispatch_key_set();
  const lbw::ExactDecideFn call_decide = [decide, caller](const at::Tensor& partials) {
    const c10::impl::ForceDispatchKeyGuard as_caller(caller);
    PyObject* rows = THPVariable_Wrap(partials);
    PyObject* result = rows == nullptr ? nullptr : PyObject_CallOneArg(decide, rows);
    Py_XDECREF(rows);
    if (result != nullptr && result != Py_None && !THPVariable_Check(result)) {
      Py_DECREF(result);
      PyErr_SetString(PyExc_TypeError, "lbw: decide must return None or a tensor (the gradient factor)");
      result = nullptr;
    }
    if (result == nullptr) {
      python_error error;
      error.persist();  // the Python exception travels with it (restored by HANDLE_TH_ERRORS)
      throw error;
    }
    std::optional<at::Tensor> factor;
    if (result != Py_None) factor = THPVariable_Unpack(result);  // (a new reference to the tensor)
    Py_DECREF(result);
    return factor;
  };
  bool done = false;
  if (!run_op(false, [&] {
        done = exact(a.params.list(), a.grads.list(), a.exp_avgs.list(), a.exp_avg_sqs.list(), a.steps.list(),
                     a.lr_scale, a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.maximize != 0, skip, call_decide,
                     rows);
      }))
    return nullptr;
  return PyBool_FromLong(done);
}

// The update ops' checks alone, and the states' shapes, on (params, grads, exp_avgs, exp_avg_sqs, steps) of one part:
// True when they pass, False (nothing checked) for tensors the kernels do not take (the caller
// checks those for the reference), an error naming the tensor otherwise. For a step of several
// parts (param groups), one op call each: all are checked before the first writes, so a part
// refused (a state moved through `.data` to a tensor the kernels refuse) leaves the others as
// they were. The GIL stays held: nothing is computed, and the borrows need no holds.
PyObject* call_check_update(PyObject*, PyObject* args) {
  PyObject *p, *g, *m, *v, *s;
  if (!PyArg_ParseTuple(args, "OOOOO:_check_update_", &p, &g, &m, &v, &s)) return nullptr;
  UpdateLists a;
  if (!a.unpack(p, g, m, v, s, false)) return nullptr;
  if (!a.kernel_ready()) Py_RETURN_FALSE;
  if (a.params.list().empty()) Py_RETURN_TRUE;
  if (!run_op(false, [&] {
        lbw::check_update_args(a.params.list(), a.grads.list(), a.exp_avgs.list(), a.exp_avg_sqs.list(),
                               a.steps.list(), a.params.list()[0].device().type());
        // The states' shapes too (the ops need their element counts only; the reference's
        // foreach ops, which the callers also check for, need the shapes)
        for (size_t i = 0; i < a.params.list().size(); ++i) {
          const auto sizes = a.params.list()[i].sizes();
          TORCH_CHECK(a.exp_avgs.list()[i].sizes() == sizes && a.exp_avg_sqs.list()[i].sizes() == sizes,
                      "lbw: exp_avgs[", i, "] or exp_avg_sqs[", i, "] is not shaped like params[", i, "] ", sizes);
        }
      }))
    return nullptr;
  Py_RETURN_TRUE;
}

PyObject* call_telemetry(PyObject*, PyObject* arg) {
  BorrowedTensors grads;
  const bool release = releases_gil(arg);
  if (!grads.unpack(arg, "grads", release)) return nullptr;
  if (!grads.ready(false)) Py_RETURN_NONE;  // (telemetry takes mixed dtypes)
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lbw::telemetry", "").typed<at::Tensor(at::TensorList)>();
  at::Tensor out;
  if (!run_op(release, [&] { out = op.call(grads.list()); })) return nullptr;
  return THPVariable_Wrap(std::move(out));
}

}  // namespace

static PyMethodDef methods[] = {
    {"_adamw_", call_adamw, METH_VARARGS,
     "torch.ops.lbw.adamw_ for eager callers (positional arguments); True, or False without doing anything "
     "when a tensor is not dense and of a kernel dtype, a grad or state is in another element order than its "
     "param, or a list mixes dtypes."},
    {"_adamw_telemetry_", call_adamw_telemetry, METH_VARARGS,
     "torch.ops.lbw.adamw_telemetry_ for eager callers (positional arguments); None (nothing done) where "
     "_adamw_ gives False."},
    {"_adamw_exact_", call_adamw_exact, METH_VARARGS,
     "The exact gate's call on CUDA tensors in one call: the grads' telemetry rows to decide(rows), then "
     "torch.ops.lbw.adamw_'s update (arguments: adamw_'s, then decide); False, nothing done, where the kernels do "
     "not take the tensors, on CPU, or without CUDA."},
    {"_check_update_", call_check_update, METH_VARARGS,
     "The checks of torch.ops.lbw.adamw_ alone on (params, grads, exp_avgs, exp_avg_sqs, steps): True, an error "
     "naming the tensor, or False (nothing checked) where _adamw_ would give False."},
    {"_telemetry", call_telemetry, METH_O,
     "torch.ops.lbw.telemetry for eager callers; None when a grad is not dense and of a kernel dtype."},
    {"_gather_grads", gather_grads, METH_O,
     "(grads per group, whether each group misses a grad, whether all grads are dense, real and floating-point, "
     "each group's layout of params and grads as bytes or None, each group's param object addresses as bytes)."},
    {"_layout_key", layout_key, METH_O,
     "(data_ptr, numel, dtype code) of each tensor of a sequence, packed as int64s in one bytes object, then "
     "(index, ndim, strides) of each that is not contiguous."},
    {"_cuda_geometry", cuda_geometry, METH_VARARGS,
     "_cuda_geometry([threads, ilp, chunk, warp_partials]): the CUDA kernels' launch geometry (csrc/cuda/geometry.h); "
     "with arguments, sets it and returns the previous one."},
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
  PyModule_AddIntConstant(m, "TABLE_CACHE_CAPACITY", long(lbw::kTableCacheCapacity));
  return m;
}
