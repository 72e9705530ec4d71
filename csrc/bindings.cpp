// ponder._core: the only file that knows pybind11. It marshals arguments (numpy buffers ->
// NumView without copying, std::vector results -> numpy arrays without copying) and leaves
// every check to the core, whose C++ exceptions pybind11 turns into Python ones:
//   std::invalid_argument -> ValueError, std::out_of_range -> IndexError,
//   std::overflow_error -> OverflowError.
// Forest calls keep the GIL: they are short, and the GIL is what serializes concurrent use
// of one Forest from several Python threads.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <vector>

#include "common/num_view.h"
#include "cuda/runtime.h"
#include "tree/forest.h"

namespace py = pybind11;
using ponder::DType;
using ponder::NumView;
using ponder::tree::Forest;

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

DType dtype_of(const py::array& a) {
  const char kind = a.dtype().kind();
  const auto size = a.itemsize();
  if (kind == 'b') return DType::Bool;
  if (kind == 'i') return size == 1 ? DType::I8 : size == 2 ? DType::I16 : size == 4 ? DType::I32 : size == 8 ? DType::I64 : DType::Other;
  if (kind == 'u') return size == 1 ? DType::U8 : size == 2 ? DType::U16 : size == 4 ? DType::U32 : size == 8 ? DType::U64 : DType::Other;
  if (kind == 'f') return size == 4 ? DType::F32 : size == 8 ? DType::F64 : DType::Other;
  return DType::Other;
}

// A 1-D view of anything numpy can read as an array; zero-copy for numpy arrays (and
// tensor.numpy()) of a native-endian supported dtype, any stride. `keep` owns any array
// created on the way, for the duration of the call.
class Args {
 public:
  NumView view(py::handle obj, const char* name) {
    py::array a = py::array::ensure(obj);
    if (!a) throw py::value_error(std::string(name) + " must be array-like (a numpy array or a list of numbers)");
    if (!a.dtype().attr("isnative").cast<bool>()) a = py::array::ensure(a.attr("astype")(a.dtype().attr("newbyteorder")("=")));
    const DType dt = dtype_of(a);
    if (dt == DType::Other && a.size() > 0)
      throw py::value_error(std::string(name) + " must be a numeric array, got dtype " + py::str(a.dtype()).cast<std::string>());
    keep_.push_back(a);
    const int nd = static_cast<int>(a.ndim());
    return NumView(a.data(), nd == 1 ? a.shape(0) : a.size(), nd == 1 ? a.strides(0) : a.itemsize(), dt, nd);
  }
  // A Python scalar checked like a one-element array.
  int64_t scalar(py::handle obj, const char* name, int64_t lo, int64_t hi) {
    py::list one;
    one.append(obj);
    return ponder::to_ints(view(one, name), name, lo, hi)[0];
  }

 private:
  std::vector<py::array> keep_;
};

template <typename T>
py::array to_numpy(std::vector<T>&& v, const char* dtype = nullptr) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  const py::dtype dt = dtype ? py::dtype(dtype) : py::dtype::of<T>();
  return py::array(dt, {static_cast<py::ssize_t>(heap->size())}, {static_cast<py::ssize_t>(sizeof(T))},
                   heap->data(), owner);
}

py::tuple ragged_to_numpy(ponder::tree::Ragged&& r) {
  return py::make_tuple(to_numpy(std::move(r.tokens)), to_numpy(std::move(r.offsets)));
}

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
  d["node_page_size"] = Forest::kPageSize;
  return d;
}

// A `how`-style option: strings pass through; anything else becomes its repr so the core
// rejects it with the list of valid choices (ValueError, like the reference).
std::string option(py::handle obj) {
  return py::isinstance<py::str>(obj) ? obj.cast<std::string>() : py::repr(obj).cast<std::string>();
}

constexpr int64_t kI64Max = INT64_MAX;
constexpr int64_t kI32Max = INT32_MAX;

// ============================================================================ kv (control plane)
void bind_kv(py::module_& m) { (void)m; }

// ============================================================================ kernels (data plane)
void bind_kernels(py::module_& m) { (void)m; }

// ============================================================================ tree (search forest)
void bind_tree(py::module_& m) {
  m.attr("ACTIVE") = static_cast<int>(ponder::tree::kActive);
  m.attr("FINISHED") = static_cast<int>(ponder::tree::kFinished);
  m.attr("PRUNED") = static_cast<int>(ponder::tree::kPruned);
  m.attr("NO_ANSWER") = ponder::tree::kNoAnswer;

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

  py::class_<Forest>(m, "Forest", R"doc(
Search trees of many problems in one node arena (C++). Same API and results as
ponder.reference.Forest, whose docstrings define every operation; inputs are 1-D array-likes
(numpy arrays of any integer/float/bool dtype and stride are read without copying).)doc")
      .def(py::init<>())
      .def(
          "add_roots",
          [](Forest& f, py::handle problem_ids, py::handle subtree_ids, py::handle flat, py::handle offsets) {
            Args a;
            return to_numpy(f.add_roots(a.view(problem_ids, "problem_ids"), a.view(subtree_ids, "subtree_ids"),
                                        a.view(flat, "prompt_tokens_flat"), a.view(offsets, "prompt_offsets")));
          },
          py::arg("problem_ids"), py::arg("subtree_ids"), py::arg("prompt_tokens_flat"), py::arg("prompt_offsets"),
          "One root per entry. problem_ids int [n], subtree_ids int [n], prompt_tokens_flat int [total], "
          "prompt_offsets int [n + 1]. Returns int32 [n] root ids.")
      .def(
          "expand",
          [](Forest& f, py::handle parent_ids, py::handle counts) {
            Args a;
            return to_numpy(f.expand(a.view(parent_ids, "parent_ids"), a.view(counts, "counts")));
          },
          py::arg("parent_ids"), py::arg("counts"),
          "parent_ids int [n], counts int [n] -> int32 [sum(counts)] child ids, grouped by parent in input order.")
      .def(
          "set_steps",
          [](Forest& f, py::handle ids, py::handle flat, py::handle offsets, py::handle scores, py::handle finished) {
            Args a;
            f.set_steps(a.view(ids, "node_ids"), a.view(flat, "tokens_flat"), a.view(offsets, "offsets"),
                        a.view(scores, "step_scores"), a.view(finished, "finished"));
          },
          py::arg("node_ids"), py::arg("tokens_flat"), py::arg("offsets"), py::arg("step_scores"),
          py::arg("finished"),
          "node_ids int [n], tokens_flat int [total], offsets int [n + 1], step_scores float [n], "
          "finished bool [n]. Sets each step and its path aggregates.")
      .def(
          "set_answers",
          [](Forest& f, py::handle ids, py::handle answers) {
            Args a;
            f.set_answers(a.view(ids, "node_ids"), a.view(answers, "answer_ids"));
          },
          py::arg("node_ids"), py::arg("answer_ids"), "node_ids int [n], answer_ids int64 [n] (not NO_ANSWER).")
      .def(
          "prune",
          [](Forest& f, py::handle ids) {
            Args a;
            f.prune(a.view(ids, "node_ids"));
          },
          py::arg("node_ids"))
      .def(
          "release_problem",
          [](Forest& f, py::handle problem_id) {
            Args a;
            f.release_problem(a.scalar(problem_id, "problem_id", 0, kI64Max));
          },
          py::arg("problem_id"))
      .def(
          "aggregate",
          [](const Forest& f, py::handle ids, py::handle how) {
            Args a;
            return to_numpy(f.aggregate(a.view(ids, "node_ids"), option(how)));
          },
          py::arg("node_ids"), py::arg("how"), "float32 [n] path scores; how: last | min | prod | mean.")
      .def(
          "path_tokens",
          [](const Forest& f, py::handle ids) {
            Args a;
            return ragged_to_numpy(f.path_tokens(a.view(ids, "node_ids")));
          },
          py::arg("node_ids"), "(int32 [total], int64 [n + 1]): prompt + steps of each path.")
      .def(
          "step_tokens",
          [](const Forest& f, py::handle ids) {
            Args a;
            return ragged_to_numpy(f.step_tokens(a.view(ids, "node_ids")));
          },
          py::arg("node_ids"), "(int32 [total], int64 [n + 1]): each node's own tokens.")
      .def(
          "nodes",
          [](const Forest& f, py::handle ids) {
            Args a;
            ponder::tree::NodeFields n = f.nodes(a.view(ids, "node_ids"));
            py::dict d;
            d["parent"] = to_numpy(std::move(n.parent));
            d["problem"] = to_numpy(std::move(n.problem));
            d["subtree"] = to_numpy(std::move(n.subtree));
            d["depth"] = to_numpy(std::move(n.depth));
            d["num_tokens"] = to_numpy(std::move(n.num_tokens));
            d["has_step"] = to_numpy(std::move(n.has_step), "bool");
            d["score"] = to_numpy(std::move(n.score));
            d["status"] = to_numpy(std::move(n.status));
            d["answer"] = to_numpy(std::move(n.answer));
            return d;
          },
          py::arg("node_ids"))
      .def(
          "problem_nodes",
          [](const Forest& f, py::handle problem_id) {
            Args a;
            return to_numpy(f.problem_nodes(a.scalar(problem_id, "problem_id", 0, kI64Max)));
          },
          py::arg("problem_id"))
      .def("problems", [](const Forest& f) { return to_numpy(f.problems()); })
      .def_property_readonly("num_nodes", &Forest::num_nodes)
      .def("__len__", &Forest::num_nodes)
      .def(
          "select_beam",
          [](const Forest& f, py::handle ids, py::handle keep, py::handle how, bool dedupe) {
            Args a;
            const int64_t k = a.scalar(keep, "keep_per_problem", 0, kI32Max);
            return to_numpy(f.select_beam(a.view(ids, "candidate_ids"), k, option(how), dedupe));
          },
          py::arg("candidate_ids"), py::arg("keep_per_problem"), py::arg("how"), py::arg("dedupe") = false,
          "int32 ids: per problem (first-appearance order) the best keep_per_problem candidates, best first.")
      .def(
          "select_dvts",
          [](const Forest& f, py::handle ids, py::handle how) {
            Args a;
            return to_numpy(f.select_dvts(a.view(ids, "candidate_ids"), option(how)));
          },
          py::arg("candidate_ids"), py::arg("how"), "int32 ids: the best candidate per (problem, subtree).")
      .def(
          "vote",
          [](const Forest& f, py::handle ids, py::handle how, py::handle agg) {
            Args a;
            ponder::tree::VoteResult v = f.vote(a.view(ids, "node_ids"), option(how), option(agg));
            py::dict d;
            d["problem_ids"] = to_numpy(std::move(v.problem_ids));
            d["answer_ids"] = to_numpy(std::move(v.answer_ids));
            d["node_ids"] = to_numpy(std::move(v.node_ids));
            d["weights"] = to_numpy(std::move(v.weights));
            return d;
          },
          py::arg("node_ids"), py::arg("how"), py::arg("agg") = "last",
          "Per problem the winning answer: dict of problem_ids int64, answer_ids int64, node_ids int32, "
          "weights float32. how: majority | weighted | best; agg: last | min | prod | mean.")
      .def("stats", [](const Forest& f) {
        const ponder::tree::ForestStats s = f.stats();
        py::dict d;
        d["live_nodes"] = s.live_nodes;
        d["ids_given"] = s.ids_given;
        d["problems"] = s.problems;
        d["pages_in_use"] = s.pages_in_use;
        d["spare_pages"] = s.spare_pages;
        d["token_capacity"] = s.token_capacity;
        d["bytes_reserved"] = s.bytes_reserved;
        return d;
      });
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "ponder's compiled core. Semantics: ponder.reference (the pure-Python twins).";
  m.attr("__version__") = PONDER_VERSION;
  bind_tree(m);
  bind_kv(m);
  bind_kernels(m);
}
