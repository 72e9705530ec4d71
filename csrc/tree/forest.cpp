// The search forest. See forest.h for the storage model and
// python/ponder/reference/forest.py for the semantics this file reproduces exactly.
#include "tree/forest.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>

namespace ponder::tree {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
constexpr int64_t kInt32Min = std::numeric_limits<int32_t>::min();
constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();
constexpr double kInf = std::numeric_limits<double>::infinity();

std::string at(const char* name, size_t i, int64_t v) {
  return std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(v);
}

// Comparison key of a score: NaN (e.g. inf * 0 in a product) ranks below everything.
inline double rank_of(double v) { return std::isnan(v) ? -kInf : v; }

// Better-first order: higher rank, then lower id.
struct Ranked {
  double rank;
  int32_t id;
  bool operator<(const Ranked& o) const { return rank > o.rank || (rank == o.rank && id < o.id); }
};

struct RaggedInput {
  std::vector<int64_t> tokens;
  std::vector<int64_t> offsets;
};

RaggedInput parse_ragged(const NumView& flat, const NumView& offsets, size_t n, const char* flat_name,
                         const char* offsets_name) {
  RaggedInput r;
  r.tokens = to_ints(flat, flat_name, 0, kInt32Max);
  r.offsets = to_ints(offsets, offsets_name, 0, kInt64Max);
  const std::string on(offsets_name);
  if (r.offsets.size() != n + 1)
    throw std::invalid_argument(on + " must have length " + std::to_string(n + 1) + " (n + 1), got " +
                                std::to_string(r.offsets.size()));
  if (r.offsets[0] != 0)
    throw std::invalid_argument(on + "[0] must be 0, got " + std::to_string(r.offsets[0]));
  for (size_t i = 0; i < n; ++i)
    if (r.offsets[i + 1] < r.offsets[i])
      throw std::invalid_argument(on + " must be non-decreasing (index " + std::to_string(i + 1) + ")");
  if (r.offsets[n] != static_cast<int64_t>(r.tokens.size()))
    throw std::invalid_argument(on + "[-1] = " + std::to_string(r.offsets[n]) + " must equal len(" +
                                flat_name + ") = " + std::to_string(r.tokens.size()));
  return r;
}

void check_length(size_t n, size_t got, const char* name) {
  if (got != n)
    throw std::invalid_argument(std::string(name) + " must have length " + std::to_string(n) + ", got " +
                                std::to_string(got));
}

template <typename T>
void check_unique(const std::vector<T>& ids, const char* name) {
  std::vector<T> sorted(ids);
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end()) return;
  std::unordered_set<T> seen;  // slow path: find the first repeat to name it
  for (size_t i = 0; i < ids.size(); ++i)
    if (!seen.insert(ids[i]).second) throw std::invalid_argument(at(name, i, ids[i]) + " appears more than once");
}

// Ids bucketed by group (groups numbered in order of first appearance), input order kept
// inside each group: members[offsets[g] .. offsets[g + 1]).
struct Groups {
  std::vector<int64_t> offsets;
  std::vector<int32_t> members;
  size_t size() const { return offsets.size() - 1; }
};

template <typename KeyOf>
Groups group_ids(const std::vector<int32_t>& ids, KeyOf key_of) {
  std::unordered_map<uint64_t, int32_t> group_of;
  std::vector<int32_t> g(ids.size());
  std::vector<int64_t> counts;
  for (size_t i = 0; i < ids.size(); ++i) {
    auto it = group_of.emplace(key_of(ids[i]), static_cast<int32_t>(counts.size()));
    if (it.second) counts.push_back(0);
    g[i] = it.first->second;
    ++counts[static_cast<size_t>(g[i])];
  }
  Groups out;
  out.offsets.assign(counts.size() + 1, 0);
  for (size_t k = 0; k < counts.size(); ++k) out.offsets[k + 1] = out.offsets[k] + counts[k];
  out.members.resize(ids.size());
  std::vector<int64_t> cursor(out.offsets.begin(), out.offsets.end() - 1);
  for (size_t i = 0; i < ids.size(); ++i) out.members[static_cast<size_t>(cursor[static_cast<size_t>(g[i])]++)] = ids[i];
  return out;
}

}  // namespace

Agg parse_agg(const std::string& how, const char* name) {
  if (how == "last") return Agg::Last;
  if (how == "min") return Agg::Min;
  if (how == "prod") return Agg::Prod;
  if (how == "mean") return Agg::Mean;
  throw std::invalid_argument(std::string(name) + " must be one of last, min, prod, mean; got '" + how + "'");
}

VoteKind parse_vote(const std::string& how, const char* name) {
  if (how == "majority") return VoteKind::Majority;
  if (how == "weighted") return VoteKind::Weighted;
  if (how == "best") return VoteKind::Best;
  throw std::invalid_argument(std::string(name) + " must be one of majority, weighted, best; got '" + how + "'");
}

// ----------------------------------------------------------------------------- pages

Forest::Page::Page()
    : parent(kPageSize), problem_slot(kPageSize), subtree(kPageSize), depth(kPageSize), num_tokens(kPageSize),
      scored_children(kPageSize), token_offset(kPageSize), answer(kPageSize), score(kPageSize),
      min_score(kPageSize), prod_score(kPageSize), sum_score(kPageSize), status(kPageSize), has_step(kPageSize) {}

void Forest::Page::reset() {
  tokens.clear();
  live = 0;
}

// ----------------------------------------------------------------------------- lookups

std::vector<int32_t> Forest::live_ids(const NumView& ids, const char* name) const {
  std::vector<int64_t> raw = to_ints(ids, name, kInt32Min, kInt32Max);
  std::vector<int32_t> out(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) {
    const int64_t v = raw[i];
    bool ok = v >= 0 && v < next_id_;
    if (ok) {
      const Page* p = pages_[static_cast<size_t>(v >> kPageShift)].get();
      ok = p != nullptr && p->status[static_cast<size_t>(v & (kPageSize - 1))] != kReleased;
    }
    if (!ok) throw std::out_of_range(at(name, i, v) + " is not a live node id");
    out[i] = static_cast<int32_t>(v);
  }
  return out;
}

std::vector<int32_t> Forest::scored_ids(const NumView& ids, const char* name, bool allow_pruned) const {
  std::vector<int32_t> out = live_ids(ids, name);
  for (size_t i = 0; i < out.size(); ++i) {
    Ref r = ref(out[i]);
    if (!r.page->has_step[r.slot]) throw std::invalid_argument(at(name, i, out[i]) + " has no scored step");
    if (!allow_pruned && r.page->status[r.slot] == kPruned)
      throw std::invalid_argument(at(name, i, out[i]) + " is pruned");
  }
  return out;
}

double Forest::value(int32_t id, Agg how) const {
  Ref r = ref(id);
  switch (how) {
    case Agg::Last: return r.page->score[r.slot];
    case Agg::Min: return r.page->min_score[r.slot];
    case Agg::Prod: return r.page->prod_score[r.slot];
    case Agg::Mean: return r.page->sum_score[r.slot] / r.page->depth[r.slot];  // one score per step
  }
  return 0.0;
}

int32_t Forest::find_problem(int64_t problem_id) const {
  if (problem_id < 0)
    throw std::invalid_argument("problem_id[0] = " + std::to_string(problem_id) + " is out of range [0, " +
                                std::to_string(kInt64Max) + "]");
  auto it = problem_index_.find(problem_id);
  if (it == problem_index_.end())
    throw std::invalid_argument("problem_id " + std::to_string(problem_id) + " is not in the forest");
  return it->second;
}

int32_t Forest::problem_slot_of(int64_t problem_id, bool create) {
  auto it = problem_index_.find(problem_id);
  if (it != problem_index_.end()) return it->second;
  if (!create) return -1;
  int32_t slot;
  if (!free_problem_slots_.empty()) {
    slot = free_problem_slots_.back();
    free_problem_slots_.pop_back();
  } else {
    slot = static_cast<int32_t>(problems_.size());
    problems_.emplace_back();
  }
  problems_[static_cast<size_t>(slot)].id = problem_id;
  problems_[static_cast<size_t>(slot)].nodes.clear();
  problem_index_.emplace(problem_id, slot);
  return slot;
}

void Forest::check_id_space(int64_t more) const {
  if (next_id_ + more > kInt32Max + 1)
    throw std::overflow_error("this forest has given out every int32 node id; make a new Forest");
}

int32_t Forest::allocate(int32_t parent, int32_t problem_slot, int32_t subtree, int32_t depth) {
  const int32_t id = static_cast<int32_t>(next_id_++);
  const size_t page_index = static_cast<size_t>(id >> kPageShift);
  if (page_index == pages_.size()) {
    if (!spare_pages_.empty()) {
      pages_.push_back(std::move(spare_pages_.back()));
      spare_pages_.pop_back();
    } else {
      pages_.push_back(std::make_unique<Page>());
    }
  }
  Page& p = *pages_[page_index];
  const int32_t s = id & (kPageSize - 1);
  p.parent[s] = parent;
  p.problem_slot[s] = problem_slot;
  p.subtree[s] = subtree;
  p.depth[s] = depth;
  p.num_tokens[s] = 0;
  p.scored_children[s] = 0;
  p.token_offset[s] = static_cast<int64_t>(p.tokens.size());
  p.answer[s] = kNoAnswer;
  p.score[s] = std::numeric_limits<double>::quiet_NaN();
  p.min_score[s] = kInf;
  p.prod_score[s] = 1.0;
  p.sum_score[s] = 0.0;
  p.status[s] = kActive;
  p.has_step[s] = 0;
  ++p.live;
  ++live_nodes_;
  problems_[static_cast<size_t>(problem_slot)].nodes.push_back(id);
  return id;
}

void Forest::append_tokens(int32_t id, const int64_t* tokens, int64_t n) {
  Ref r = ref(id);
  r.page->token_offset[r.slot] = static_cast<int64_t>(r.page->tokens.size());
  r.page->num_tokens[r.slot] = static_cast<int32_t>(n);
  r.page->tokens.insert(r.page->tokens.end(), tokens, tokens + n);  // values checked to fit int32
}

// ----------------------------------------------------------------------------- building trees

std::vector<int32_t> Forest::add_roots(const NumView& problem_ids, const NumView& subtree_ids,
                                       const NumView& prompt_tokens_flat, const NumView& prompt_offsets) {
  const std::vector<int64_t> problems = to_ints(problem_ids, "problem_ids", 0, kInt64Max);
  const size_t n = problems.size();
  const std::vector<int64_t> subtrees = to_ints(subtree_ids, "subtree_ids", 0, kInt32Max);
  check_length(n, subtrees.size(), "subtree_ids");
  const RaggedInput prompts =
      parse_ragged(prompt_tokens_flat, prompt_offsets, n, "prompt_tokens_flat", "prompt_offsets");
  check_id_space(static_cast<int64_t>(n));

  std::vector<int32_t> ids(n);
  for (size_t i = 0; i < n; ++i) {
    const int32_t slot = problem_slot_of(problems[i], /*create=*/true);
    ids[i] = allocate(-1, slot, static_cast<int32_t>(subtrees[i]), 0);
    append_tokens(ids[i], prompts.tokens.data() + prompts.offsets[i], prompts.offsets[i + 1] - prompts.offsets[i]);
  }
  return ids;
}

std::vector<int32_t> Forest::expand(const NumView& parent_ids, const NumView& counts) {
  const std::vector<int32_t> parents = live_ids(parent_ids, "parent_ids");
  const size_t n = parents.size();
  const std::vector<int64_t> sizes = to_ints(counts, "counts", 0, kInt32Max);
  check_length(n, sizes.size(), "counts");
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    Ref r = ref(parents[i]);
    if (r.page->parent[r.slot] != -1 && !r.page->has_step[r.slot])
      throw std::invalid_argument(at("parent_ids", i, parents[i]) +
                                  " has no step yet; set its step before expanding it");
    if (r.page->status[r.slot] != kActive)
      throw std::invalid_argument(at("parent_ids", i, parents[i]) + " is " +
                                  (r.page->status[r.slot] == kFinished ? "finished" : "pruned") +
                                  " and cannot be expanded");
    total += sizes[i];
  }
  check_id_space(total);

  std::vector<int32_t> children;
  children.reserve(static_cast<size_t>(total));
  for (size_t i = 0; i < n; ++i) {
    // Read the parent's fields once; allocate() only appends pages, so they stay valid.
    Ref r = ref(parents[i]);
    const int32_t slot = r.page->problem_slot[r.slot], subtree = r.page->subtree[r.slot];
    const int32_t depth = r.page->depth[r.slot] + 1;
    for (int64_t k = 0; k < sizes[i]; ++k) children.push_back(allocate(parents[i], slot, subtree, depth));
  }
  return children;
}

void Forest::set_steps(const NumView& node_ids, const NumView& tokens_flat, const NumView& offsets,
                       const NumView& step_scores, const NumView& finished) {
  const std::vector<int32_t> ids = live_ids(node_ids, "node_ids");
  const size_t n = ids.size();
  const RaggedInput steps = parse_ragged(tokens_flat, offsets, n, "tokens_flat", "offsets");
  const std::vector<double> scores = to_finite_doubles(step_scores, "step_scores");
  const std::vector<uint8_t> done = to_bools(finished, "finished");
  check_length(n, scores.size(), "step_scores");
  check_length(n, done.size(), "finished");
  check_unique(ids, "node_ids");

  std::unordered_map<int32_t, size_t> position;  // only needed when a parent is in this call
  for (size_t i = 0; i < n; ++i) {
    Ref r = ref(ids[i]);
    const int32_t parent = r.page->parent[r.slot];
    if (parent == -1)
      throw std::invalid_argument(at("node_ids", i, ids[i]) + " is a root; roots hold the prompt, not a step");
    if (r.page->status[r.slot] == kPruned) throw std::invalid_argument(at("node_ids", i, ids[i]) + " is pruned");
    if (r.page->scored_children[r.slot] > 0)
      throw std::invalid_argument(at("node_ids", i, ids[i]) + " has children with steps; its step is fixed");
    Ref pr = ref(parent);
    if (pr.page->parent[pr.slot] != -1 && !pr.page->has_step[pr.slot]) {
      if (position.empty())
        for (size_t j = 0; j < n; ++j) position.emplace(ids[j], j);
      auto it = position.find(parent);
      if (it == position.end() || it->second > i)
        throw std::invalid_argument(at("node_ids", i, ids[i]) + ": its parent " + std::to_string(parent) +
                                    " has no step; set the parent first (earlier in node_ids or in an earlier call)");
    }
  }

  for (size_t i = 0; i < n; ++i) {
    Ref r = ref(ids[i]);
    Ref pr = ref(r.page->parent[r.slot]);
    if (!r.page->has_step[r.slot]) ++pr.page->scored_children[pr.slot];
    append_tokens(ids[i], steps.tokens.data() + steps.offsets[i], steps.offsets[i + 1] - steps.offsets[i]);
    const double s = scores[i];
    r.page->has_step[r.slot] = 1;
    r.page->score[r.slot] = s;
    r.page->min_score[r.slot] = std::min(pr.page->min_score[pr.slot], s);
    r.page->prod_score[r.slot] = pr.page->prod_score[pr.slot] * s;
    r.page->sum_score[r.slot] = pr.page->sum_score[pr.slot] + s;
    r.page->status[r.slot] = done[i] ? kFinished : kActive;
  }
}

void Forest::set_answers(const NumView& node_ids, const NumView& answer_ids) {
  const std::vector<int32_t> ids = live_ids(node_ids, "node_ids");
  const std::vector<int64_t> answers = to_ints(answer_ids, "answer_ids", kNoAnswer + 1, kInt64Max);
  check_length(ids.size(), answers.size(), "answer_ids");
  for (size_t i = 0; i < ids.size(); ++i) {
    Ref r = ref(ids[i]);
    r.page->answer[r.slot] = answers[i];
  }
}

void Forest::prune(const NumView& node_ids) {
  for (int32_t id : live_ids(node_ids, "node_ids")) {
    Ref r = ref(id);
    r.page->status[r.slot] = kPruned;
  }
}

void Forest::release_problem(int64_t problem_id) {
  const int32_t slot = find_problem(problem_id);
  Problem& prob = problems_[static_cast<size_t>(slot)];
  for (int32_t id : prob.nodes) {
    const size_t page_index = static_cast<size_t>(id >> kPageShift);
    Page& p = *pages_[page_index];
    p.status[static_cast<size_t>(id & (kPageSize - 1))] = kReleased;
    --live_nodes_;
    // A page whose ids are all given out and released can serve new ids.
    if (--p.live == 0 && static_cast<int64_t>(page_index + 1) * kPageSize <= next_id_) {
      p.reset();
      if (spare_pages_.size() < 64) spare_pages_.push_back(std::move(pages_[page_index]));
      pages_[page_index].reset();
    }
  }
  prob.nodes.clear();
  prob.nodes.shrink_to_fit();
  prob.id = -1;
  problem_index_.erase(problem_id);
  free_problem_slots_.push_back(slot);
}

// ----------------------------------------------------------------------------- reading

std::vector<float> Forest::aggregate(const NumView& node_ids, const std::string& how) const {
  const Agg agg = parse_agg(how, "how");
  const std::vector<int32_t> ids = scored_ids(node_ids, "node_ids", /*allow_pruned=*/true);
  std::vector<float> out(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) out[i] = static_cast<float>(value(ids[i], agg));
  return out;
}

Ragged Forest::gather_tokens(const std::vector<int32_t>& ids, bool whole_path) const {
  Ragged out;
  out.offsets.resize(ids.size() + 1);
  out.offsets[0] = 0;
  std::vector<int32_t> chain;
  for (size_t i = 0; i < ids.size(); ++i) {
    chain.clear();
    for (int32_t id = ids[i]; id != -1; id = whole_path ? ref(id).page->parent[ref(id).slot] : -1)
      chain.push_back(id);
    for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
      Ref r = ref(*it);
      const int32_t* src = r.page->tokens.data() + r.page->token_offset[r.slot];
      out.tokens.insert(out.tokens.end(), src, src + r.page->num_tokens[r.slot]);
    }
    out.offsets[i + 1] = static_cast<int64_t>(out.tokens.size());
  }
  return out;
}

Ragged Forest::path_tokens(const NumView& node_ids) const {
  return gather_tokens(live_ids(node_ids, "node_ids"), /*whole_path=*/true);
}

Ragged Forest::step_tokens(const NumView& node_ids) const {
  return gather_tokens(live_ids(node_ids, "node_ids"), /*whole_path=*/false);
}

NodeFields Forest::nodes(const NumView& node_ids) const {
  const std::vector<int32_t> ids = live_ids(node_ids, "node_ids");
  const size_t n = ids.size();
  NodeFields f;
  f.parent.resize(n), f.subtree.resize(n), f.depth.resize(n), f.num_tokens.resize(n);
  f.problem.resize(n), f.answer.resize(n), f.has_step.resize(n), f.score.resize(n), f.status.resize(n);
  for (size_t i = 0; i < n; ++i) {
    Ref r = ref(ids[i]);
    const Page& p = *r.page;
    f.parent[i] = p.parent[r.slot];
    f.problem[i] = problems_[static_cast<size_t>(p.problem_slot[r.slot])].id;
    f.subtree[i] = p.subtree[r.slot];
    f.depth[i] = p.depth[r.slot];
    f.num_tokens[i] = p.num_tokens[r.slot];
    f.has_step[i] = p.has_step[r.slot];
    f.score[i] = static_cast<float>(p.score[r.slot]);  // NaN when no step
    f.status[i] = p.status[r.slot];
    f.answer[i] = p.answer[r.slot];
  }
  return f;
}

std::vector<int32_t> Forest::problem_nodes(int64_t problem_id) const {
  return problems_[static_cast<size_t>(find_problem(problem_id))].nodes;
}

std::vector<int64_t> Forest::problems() const {
  std::vector<int64_t> out;
  out.reserve(problem_index_.size());
  for (const auto& kv : problem_index_) out.push_back(kv.first);
  std::sort(out.begin(), out.end());
  return out;
}

ForestStats Forest::stats() const {
  ForestStats s;
  s.live_nodes = live_nodes_;
  s.ids_given = next_id_;
  s.problems = static_cast<int64_t>(problem_index_.size());
  s.spare_pages = static_cast<int64_t>(spare_pages_.size());
  constexpr int64_t kBytesPerNode = 6 * 4 + 2 * 8 + 4 * 8 + 1 + 1;
  for (const auto& p : pages_)
    if (p) {
      ++s.pages_in_use;
      s.token_capacity += static_cast<int64_t>(p->tokens.capacity());
    }
  for (const auto& p : spare_pages_) s.token_capacity += static_cast<int64_t>(p->tokens.capacity());
  s.bytes_reserved = (s.pages_in_use + s.spare_pages) * kPageSize * kBytesPerNode + s.token_capacity * 4;
  return s;
}

// ----------------------------------------------------------------------------- selection and voting

std::vector<int32_t> Forest::select_beam(const NumView& candidate_ids, int64_t keep_per_problem,
                                         const std::string& how, bool dedupe) const {
  const Agg agg = parse_agg(how, "how");
  if (keep_per_problem < 0 || keep_per_problem > kInt32Max)
    throw std::invalid_argument("keep_per_problem[0] = " + std::to_string(keep_per_problem) +
                                " is out of range [0, " + std::to_string(kInt32Max) + "]");
  const std::vector<int32_t> ids = scored_ids(candidate_ids, "candidate_ids", /*allow_pruned=*/false);
  check_unique(ids, "candidate_ids");

  const Groups groups = group_ids(ids, [this](int32_t id) {
    Ref r = ref(id);
    return static_cast<uint64_t>(r.page->problem_slot[r.slot]);
  });
  std::vector<int32_t> kept;
  std::vector<Ranked> members;
  for (size_t g = 0; g < groups.size(); ++g) {
    members.clear();
    for (int64_t k = groups.offsets[g]; k < groups.offsets[g + 1]; ++k) {
      const int32_t id = groups.members[static_cast<size_t>(k)];
      members.push_back({rank_of(value(id, agg)), id});
    }
    const size_t keep = std::min(members.size(), static_cast<size_t>(keep_per_problem));
    if (!dedupe) {
      std::partial_sort(members.begin(), members.begin() + static_cast<std::ptrdiff_t>(keep), members.end());
      for (size_t k = 0; k < keep; ++k) kept.push_back(members[k].id);
      continue;
    }
    std::sort(members.begin(), members.end());
    // Identical step tokens under the same parent count once: the best copy stays.
    std::unordered_map<uint64_t, std::vector<int32_t>> seen;  // hash -> kept ids with that hash
    size_t taken = 0;
    for (size_t k = 0; k < members.size() && taken < keep; ++k) {
      Ref r = ref(members[k].id);
      const int32_t* tok = r.page->tokens.data() + r.page->token_offset[r.slot];
      const int32_t len = r.page->num_tokens[r.slot];
      uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(static_cast<uint32_t>(r.page->parent[r.slot]));
      for (int32_t t = 0; t < len; ++t) h = (h ^ static_cast<uint32_t>(tok[t])) * 1099511628211ull;
      h ^= static_cast<uint64_t>(len) << 32;
      auto& bucket = seen[h];
      bool duplicate = false;
      for (int32_t other : bucket) {
        Ref o = ref(other);
        if (o.page->parent[o.slot] == r.page->parent[r.slot] && o.page->num_tokens[o.slot] == len &&
            std::equal(tok, tok + len, o.page->tokens.data() + o.page->token_offset[o.slot])) {
          duplicate = true;
          break;
        }
      }
      if (duplicate) continue;
      bucket.push_back(members[k].id);
      kept.push_back(members[k].id);
      ++taken;
    }
  }
  return kept;
}

std::vector<int32_t> Forest::select_dvts(const NumView& candidate_ids, const std::string& how) const {
  const Agg agg = parse_agg(how, "how");
  const std::vector<int32_t> ids = scored_ids(candidate_ids, "candidate_ids", /*allow_pruned=*/false);
  check_unique(ids, "candidate_ids");
  std::unordered_map<uint64_t, size_t> group_of;
  std::vector<Ranked> best;
  for (int32_t id : ids) {
    Ref r = ref(id);
    const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(r.page->problem_slot[r.slot])) << 32) |
                         static_cast<uint32_t>(r.page->subtree[r.slot]);
    const Ranked cand{rank_of(value(id, agg)), id};
    auto it = group_of.emplace(key, best.size());
    if (it.second)
      best.push_back(cand);
    else if (cand < best[it.first->second])
      best[it.first->second] = cand;
  }
  std::vector<int32_t> out(best.size());
  for (size_t g = 0; g < best.size(); ++g) out[g] = best[g].id;
  return out;
}

VoteResult Forest::vote(const NumView& node_ids, const std::string& how, const std::string& agg_name) const {
  const VoteKind kind = parse_vote(how, "how");
  const Agg agg = parse_agg(agg_name, "agg");
  const std::vector<int32_t> ids = live_ids(node_ids, "node_ids");
  check_unique(ids, "node_ids");
  if (kind != VoteKind::Majority)
    for (size_t i = 0; i < ids.size(); ++i) {
      Ref r = ref(ids[i]);
      if (r.page->answer[r.slot] != kNoAnswer && !r.page->has_step[r.slot])
        throw std::invalid_argument(at("node_ids", i, ids[i]) + " has an answer but no scored step");
    }

  const Groups groups = group_ids(ids, [this](int32_t id) {
    Ref r = ref(id);
    return static_cast<uint64_t>(r.page->problem_slot[r.slot]);
  });
  VoteResult out;
  std::vector<std::pair<int64_t, double>> totals;  // (answer, total) in first-seen order
  std::unordered_map<int64_t, size_t> total_of;
  for (size_t g = 0; g < groups.size(); ++g) {
    const int32_t* begin = groups.members.data() + groups.offsets[g];
    const int32_t* end = groups.members.data() + groups.offsets[g + 1];
    Ref first = ref(*begin);
    int64_t answer = kNoAnswer;
    int32_t winner = -1;
    double weight = 0.0;
    if (kind == VoteKind::Best) {
      Ranked best_key{0.0, -1};
      for (const int32_t* it = begin; it != end; ++it) {
        Ref r = ref(*it);
        if (r.page->answer[r.slot] == kNoAnswer) continue;
        const double s = value(*it, agg);
        const Ranked key{rank_of(s), *it};
        if (winner == -1 || key < best_key) answer = r.page->answer[r.slot], winner = *it, weight = s, best_key = key;
      }
    } else {
      totals.clear();
      total_of.clear();
      for (const int32_t* it = begin; it != end; ++it) {
        Ref r = ref(*it);
        const int64_t a = r.page->answer[r.slot];
        if (a == kNoAnswer) continue;
        const double add = kind == VoteKind::Majority ? 1.0 : value(*it, agg);
        auto found = total_of.emplace(a, totals.size());
        if (found.second)
          totals.emplace_back(a, add);
        else
          totals[found.first->second].second += add;
      }
      for (const auto& t : totals)
        if (answer == kNoAnswer || rank_of(t.second) > rank_of(weight)) answer = t.first, weight = t.second;
      Ranked best_key{0.0, -1};
      for (const int32_t* it = begin; it != end && answer != kNoAnswer; ++it) {
        Ref r = ref(*it);
        if (r.page->answer[r.slot] != answer) continue;
        if (kind == VoteKind::Majority) {  // the first node of the winning answer
          winner = *it;
          break;
        }
        const Ranked key{rank_of(value(*it, agg)), *it};
        if (winner == -1 || key < best_key) winner = *it, best_key = key;
      }
    }
    out.problem_ids.push_back(problems_[static_cast<size_t>(first.page->problem_slot[first.slot])].id);
    out.answer_ids.push_back(answer);
    out.node_ids.push_back(winner);
    out.weights.push_back(static_cast<float>(weight));
  }
  return out;
}

}  // namespace ponder::tree
