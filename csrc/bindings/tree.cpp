// ponder._core: the search forest (csrc/tree/). Calls keep the GIL: they are short, and the GIL
// is what serializes concurrent use of one Forest from several Python threads.
#include "bindings/bindings.h"
#include "bindings/numpy_args.h"
#include "tree/forest.h"

#include <iterator>

namespace ponder::bindings {

using ponder::tree::Forest;

void bind_tree(py::module_& m) {
  m.attr("ACTIVE") = static_cast<int>(ponder::tree::kActive);
  m.attr("FINISHED") = static_cast<int>(ponder::tree::kFinished);
  m.attr("PRUNED") = static_cast<int>(ponder::tree::kPruned);
  m.attr("NO_ANSWER") = ponder::tree::kNoAnswer;
  py::tuple aggs(std::size(ponder::tree::kAggNames)), votes(std::size(ponder::tree::kVoteNames));
  for (size_t i = 0; i < aggs.size(); ++i) aggs[i] = py::str(ponder::tree::kAggNames[i]);
  for (size_t i = 0; i < votes.size(); ++i) votes[i] = py::str(ponder::tree::kVoteNames[i]);
  m.attr("AGGREGATIONS") = aggs;  // the names every `how` / `agg` argument accepts
  m.attr("VOTES") = votes;

  py::class_<Forest>(m, "Forest", R"doc(
Search trees of many problems in one node arena (C++). Same API and results as
ponder.twins.Forest, whose docstrings define every operation; inputs are 1-D array-likes
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
          "set_scores",
          [](Forest& f, py::handle ids, py::handle scores) {
            Args a;
            f.set_scores(a.view(ids, "node_ids"), a.view(scores, "step_scores"));
          },
          py::arg("node_ids"), py::arg("step_scores"),
          "node_ids int [n] (unique, with a step), step_scores float [n] (finite). New step scores; the path "
          "aggregates of these nodes and their descendants become what set_steps would have computed.")
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
          py::arg("node_ids"), py::arg("how"), "float32 [n]: path_scores rounded to float32.")
      .def(
          "path_scores",
          [](const Forest& f, py::handle ids, py::handle how) {
            Args a;
            return to_numpy(f.path_scores(a.view(ids, "node_ids"), option(how)));
          },
          py::arg("node_ids"), py::arg("how"),
          "float64 [n]: each node's path aggregate of its step scores; how: last | min | prod | mean.")
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
          "children_counts",
          [](const Forest& f, py::handle ids, py::handle total, py::handle how, py::handle mode,
             py::handle temperature, py::handle seed, py::handle weights, py::handle multiplicity) {
            Args a;
            const int64_t t = a.scalar(total, "total_per_problem", 0, kI32Max);
            py::list one;
            one.append(temperature);
            const std::vector<double> temp = to_finite_doubles(a.view(one, "temperature"), "temperature");
            const int64_t s = a.scalar(seed, "seed", INT64_MIN, kI64Max);
            const NumView view = a.view(ids, "candidate_ids");
            if (multiplicity.is_none())
              return to_numpy(f.children_counts(view, t, option(how), option(mode), temp[0], s, option(weights)));
            const NumView m = a.view(multiplicity, "multiplicity");
            return to_numpy(f.children_counts(view, t, option(how), option(mode), temp[0], s, option(weights), &m));
          },
          py::arg("candidate_ids"), py::arg("total_per_problem"), py::arg("how"), py::arg("mode") = "proportional",
          py::arg("temperature") = 1.0, py::arg("seed") = 0, py::arg("weights") = "softmax",
          py::arg("multiplicity") = py::none(),
          "int32 [n]: per problem, each candidate's share of total_per_problem from softmax(aggregate / "
          "temperature) (0: raw aggregate), or weights='logit': softmax(logit(aggregate) / temperature), "
          "times multiplicity (int [n] >= 1, None: 1 each); mode proportional | ceil | multinomial | systematic.")
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

}  // namespace ponder::bindings
