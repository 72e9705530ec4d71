// ponder._core: the module (version, build_info, CUDA status) and the components' bindings
// (tree.cpp, kv.cpp, kernels.cpp). Binding files only marshal arguments and leave every check
// to the core, whose C++ exceptions pybind11 turns into Python ones:
//   std::invalid_argument -> ValueError, std::out_of_range -> IndexError,
//   std::overflow_error -> OverflowError, std::runtime_error -> RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "bindings/bindings.h"
#include "cuda/runtime.h"
#include "tree/forest.h"

namespace py = pybind11;

namespace {

#ifndef PONDER_VERSION
#define PONDER_VERSION "0.0.0"
#endif
#ifndef PONDER_WITH_CUDA
#define PONDER_WITH_CUDA 0
#endif
#ifndef PONDER_CUDA_ARCHS
#define PONDER_CUDA_ARCHS ""
#endif
#ifndef PONDER_CUDA_VERSION
#define PONDER_CUDA_VERSION ""
#endif
#ifndef PONDER_SANITIZERS
#define PONDER_SANITIZERS ""
#endif
#ifndef PONDER_BUILD_TYPE
#define PONDER_BUILD_TYPE ""
#endif

py::list split_list(const std::string& joined) {
  py::list out;
  size_t start = 0;
  while (start < joined.size()) {
    size_t end = joined.find(',', start);
    if (end == std::string::npos) end = joined.size();
    if (end > start) out.append(joined.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

py::dict build_info() {
  py::dict d;
  d["version"] = PONDER_VERSION;
  d["cuda"] = static_cast<bool>(PONDER_WITH_CUDA);
  d["cuda_architectures"] = split_list(PONDER_CUDA_ARCHS);
  d["cuda_version"] = std::string(PONDER_CUDA_VERSION);
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["sanitizers"] = split_list(PONDER_SANITIZERS);
  d["build_type"] = std::string(PONDER_BUILD_TYPE);
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string("unknown");
#endif
  d["node_page_size"] = ponder::tree::Forest::kPageSize;
  return d;
}

void bind_module(py::module_& m) {
  m.def("build_info", &build_info,
        "What this extension was compiled with: version, cuda (bool), cuda_architectures, cuda_version, "
        "openmp, sanitizers, build_type, compiler.");
  m.def(
      "cuda_runtime_ok",
      []() {
        std::string why;
        return ponder::cuda::runtime_ok(&why);
      },
      "True when a probe CUDA kernel of this build launches and runs on device 0 now.");
  m.def(
      "cuda_status",
      []() {
        std::string why;
        py::dict d;
        const int n = ponder::cuda::device_count(&why);
        const bool ok = n > 0 && ponder::cuda::runtime_ok(&why);
        d["device_count"] = n;
        d["kernels_run"] = ok;
        d["reason"] = ok ? std::string() : why;
        return d;
      },
      "dict(device_count, kernels_run, reason): why CUDA kernels can or cannot run now.");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "ponder's compiled core. Semantics: ponder.twins (the pure-Python twins).";
  m.attr("__version__") = PONDER_VERSION;
  bind_module(m);
  ponder::bindings::bind_tree(m);
  ponder::bindings::bind_kv(m);
  ponder::bindings::bind_kernels(m);
}
