#include "bindings/dlpack_args.h"

#include <cstring>

// DLPack ABI (tensor exchange with torch/numpy); third_party/ is not on the include path of _core.
#include "../third_party/dlpack/dlpack.h"

namespace ponder::bindings {

namespace {

std::string dl_dtype_name(const DLDataType& t) {
  std::string base;
  switch (t.code) {
    case kDLInt: base = "int"; break;
    case kDLUInt: base = "uint"; break;
    case kDLFloat: base = "float"; break;
    case kDLBfloat: base = "bfloat"; break;
    case kDLComplex: base = "complex"; break;
    case kDLBool: return t.lanes == 1 ? "bool" : "bool x" + std::to_string(t.lanes);
    default: base = "dlpack-type-" + std::to_string(t.code) + "-bits-"; break;
  }
  std::string s = base + std::to_string(t.bits);
  if (t.lanes != 1) s += " x" + std::to_string(t.lanes);
  return s;
}

std::string dl_shape_str(const DLTensor& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + "]";
}

}  // namespace

// Borrows `obj` through DLPack; `keep` holds its capsule for the call.
TensorView dl_view(py::handle obj, const std::string& name, int ndim, const char* layout, Want want,
                         bool writable, int64_t stream, std::vector<py::object>& keep) {
  if (obj.is_none()) throw py::value_error(name + " must be a tensor " + layout + ", got None");
  if (!py::hasattr(obj, "__dlpack__"))
    throw py::value_error(name + " must be a tensor or array that supports DLPack (torch.Tensor, numpy.ndarray), got " +
                          py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
  if (py::hasattr(obj, "requires_grad") && py::bool_(obj.attr("requires_grad")))
    throw py::value_error(name + " requires grad: pass " + name + ".detach() (these kernels are not differentiable)");
  int dev_type = kDLCPU;
  if (py::hasattr(obj, "__dlpack_device__")) {
    try {
      dev_type = py::tuple(obj.attr("__dlpack_device__")())[0].cast<int>();
    } catch (py::error_already_set& e) {
      throw py::value_error(name + ".__dlpack_device__() failed: " + e.what());
    } catch (py::cast_error&) {
      throw py::value_error(name + ".__dlpack_device__() did not return a (device_type, device_id) tuple");
    }
  }
  py::dict kwargs;
  // DLPack reserves 0 for CUDA; 1 names the legacy default stream.
  if (dev_type == kDLCUDA || dev_type == kDLCUDAManaged) kwargs["stream"] = stream == 0 ? int64_t(1) : stream;
  py::object cap;
  try {
    py::dict versioned = py::reinterpret_steal<py::dict>(PyDict_Copy(kwargs.ptr()));  // not an alias
    versioned["max_version"] = py::make_tuple(DLPACK_MAJOR_VERSION, 0);
    cap = obj.attr("__dlpack__")(**versioned);
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_TypeError)) throw py::value_error(name + " cannot be exported through DLPack: " + e.what());
    try {  // a producer older than DLPack 1.0 does not know max_version
      cap = obj.attr("__dlpack__")(**kwargs);
    } catch (py::error_already_set& e2) {
      throw py::value_error(name + " cannot be exported through DLPack: " + e2.what());
    }
  }
  PyObject* c = cap.ptr();
  if (!PyCapsule_CheckExact(c)) throw py::value_error(name + ".__dlpack__() did not return a PyCapsule");
  const char* cname = PyCapsule_GetName(c);
  DLTensor* t = nullptr;
  bool read_only = false;
  if (cname && std::strcmp(cname, "dltensor_versioned") == 0) {
    auto* mt = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(c, cname));
    if (!mt) throw py::error_already_set();
    if (mt->version.major != DLPACK_MAJOR_VERSION)
      throw py::value_error(name + ": DLPack version " + std::to_string(mt->version.major) + "." +
                            std::to_string(mt->version.minor) + " is not supported (this build reads 1.x)");
    read_only = (mt->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
    t = &mt->dl_tensor;
  } else if (cname && std::strcmp(cname, "dltensor") == 0) {
    auto* mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, cname));
    if (!mt) throw py::error_already_set();
    t = &mt->dl_tensor;
  } else {
    throw py::value_error(name + ".__dlpack__() returned a capsule named '" + (cname ? cname : "") +
                          "' (expected 'dltensor' or 'dltensor_versioned')");
  }
  keep.push_back(cap);

  if (t->ndim != ndim)
    throw py::value_error(name + " must be a " + std::to_string(ndim) + "-D tensor " + layout + ", got " +
                          std::to_string(t->ndim) + "-D with shape " + dl_shape_str(*t));
  TensorView v;
  const DLDataType dt = t->dtype;
  bool ok_type = dt.lanes == 1;
  if (ok_type && dt.code == kDLFloat && dt.bits == 32) v.dtype = ScalarType::Float32;
  else if (ok_type && dt.code == kDLFloat && dt.bits == 16) v.dtype = ScalarType::Float16;
  else if (ok_type && dt.code == kDLBfloat && dt.bits == 16) v.dtype = ScalarType::BFloat16;
  else if (ok_type && dt.code == kDLInt && dt.bits == 32) v.dtype = ScalarType::Int32;
  else if (ok_type && dt.code == kDLInt && dt.bits == 64) v.dtype = ScalarType::Int64;
  else ok_type = false;
  const bool want_index = want == Want::Index;
  if (!ok_type || is_index(v.dtype) != want_index)
    throw py::value_error(name + " has dtype " + dl_dtype_name(dt) + "; it must be " +
                          (want_index ? "int32 or int64" : "float32, float16 or bfloat16"));
  switch (t->device.device_type) {
    case kDLCPU:
    case kDLCUDAHost: v.device = DeviceType::CPU; v.device_id = 0; break;
    case kDLCUDA: v.device = DeviceType::CUDA; v.device_id = t->device.device_id; break;
    default:
      throw py::value_error(name + " is on an unsupported device (DLPack device type " +
                            std::to_string(static_cast<int>(t->device.device_type)) + "); use a CPU or CUDA tensor");
  }
  if (writable && read_only) throw py::value_error(name + " is read-only; the kernel writes into it");
  v.ndim = ndim;
  int64_t expected = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (t->shape[i] < 0) throw py::value_error(name + " has a negative extent");
    v.shape[i] = t->shape[i];
    v.strides[i] = t->strides ? t->strides[i] : expected;
    expected *= t->shape[i];
  }
  v.data = static_cast<char*>(t->data) + t->byte_offset;
  return v;
}

std::vector<TensorView> dl_list(py::handle obj, const char* name, int64_t stream, std::vector<py::object>& keep) {
  if (py::hasattr(obj, "__dlpack__"))
    throw py::value_error(std::string(name) + " must be a list of tensors (one pool per layer), got a single tensor; "
                          "wrap it in a list");
  if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
    throw py::value_error(std::string(name) + " must be a list or tuple of tensors (one pool per layer), got " +
                          py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
  std::vector<TensorView> out;
  py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
  for (size_t i = 0; i < seq.size(); ++i)
    out.push_back(dl_view(seq[i], std::string(name) + "[" + std::to_string(i) + "]", 4, kCacheLayout, Want::Data,
                          true, stream, keep));
  return out;
}

}  // namespace ponder::bindings
