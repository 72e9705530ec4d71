// The search forest. See forest.h for the storage model and
// python/ponder/twins/forest.py for the semantics this file reproduces exactly.
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

// Validated CSR input. `data` points into the caller's array when it already is contiguous
// int32 (the common case: no copy of what is the bulk of every set_steps call), else into
// `converted`.
struct RaggedInput {
  std::vector<int32_t> converted;
  const int32_t* data = nullptr;
  int64_t size = 0;
  std::vector<int64_t> offsets;
};

RaggedInput parse_ragged(const NumView& flat, const NumView& offsets, size_t n, const char* flat_name,
                         const char* offsets_name) {
  RaggedInput r;
  if (flat.ndim == 1 && flat.dtype == DType::I32 && flat.stride == 4 && flat.size > 0) {
    const int32_t* p = reinterpret_cast<const int32_t*>(flat.data);
    int32_t lowest = 0;
    for (int64_t i = 0; i < flat.size; ++i) lowest = std::min(lowest, p[i]);
    if (lowest < 0) r.converted = to_ints_as<int32_t>(flat, flat_name, 0, kInt32Max);  // throws, naming the index
    r.data = p;
    r.size = flat.size;
  } else {
    r.converted = to_ints_as<int32_t>(flat, flat_name, 0, kInt32Max);
    r.data = r.converted.data();
    r.size = static_cast<int64_t>(r.converted.size());
  }
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
  if (r.offsets[n] != r.size)
    throw std::invalid_argument(on + "[-1] = " + std::to_string(r.offsets[n]) + " must equal len(" +
                                flat_name + ") = " + std::to_string(r.size));
  return r;
}

void check_length(size_t n, size_t got, const char* name) {
  if (got != n)
    throw std::invalid_argument(std::string(name) + " must have length " + std::to_string(n) + ", got " +
                                std::to_string(got));
}

// Membership of the ids of one call: a bitmap over [min, max] when that range is dense enough
// (the usual case: a batch of recent nodes), a hash set otherwise.
class IdSet {
 public:
  // Returns the index of the first repeated id, or -1.
  int64_t build(const std::vector<int32_t>& ids) {
    if (ids.empty()) return -1;
    auto mm = std::minmax_element(ids.begin(), ids.end());
    lo_ = *mm.first;
    const int64_t range = static_cast<int64_t>(*mm.second) - lo_ + 1;
    dense_ = range <= 64 * static_cast<int64_t>(ids.size()) + 4096;
    if (dense_) bits_.assign(static_cast<size_t>((range + 63) / 64), 0);
    for (size_t i = 0; i < ids.size(); ++i)
      if (!insert(ids[i])) return static_cast<int64_t>(i);
    return -1;
  }
  bool contains(int32_t id) const {
    if (!dense_) return set_.count(id) != 0;
    const int64_t k = static_cast<int64_t>(id) - lo_;
    return k >= 0 && k < static_cast<int64_t>(bits_.size()) * 64 &&
           (bits_[static_cast<size_t>(k >> 6)] >> (k & 63) & 1u);
  }

 private:
  bool insert(int32_t id) {
    if (!dense_) return set_.insert(id).second;
    const int64_t k = static_cast<int64_t>(id) - lo_;
    uint64_t& word = bits_[static_cast<size_t>(k >> 6)];
    const uint64_t bit = uint64_t{1} << (k & 63);
    if (word & bit) return false;
    word |= bit;
    return true;
  }
  int64_t lo_ = 0;
  bool dense_ = true;
  std::vector<uint64_t> bits_;
  std::unordered_set<int32_t> set_;
};

void check_unique(const std::vector<int32_t>& ids, const char* name, IdSet* out = nullptr) {
  IdSet local;
  IdSet& set = out ? *out : local;
  const int64_t dup = set.build(ids);
  if (dup >= 0)
    throw std::invalid_argument(at(name, static_cast<size_t>(dup), ids[static_cast<size_t>(dup)]) +
                                " appears more than once");
}

// Ids bucketed by group (groups numbered in order of first appearance), input order kept
// inside each group: members[offsets[g] .. offsets[g + 1]).
struct Groups {
  std::vector<int64_t> offsets;
  std::vector<int32_t> members;
  size_t size() const { return offsets.size() - 1; }
};

// key_of(id) must return a key in [0, num_keys): a dense array maps keys to groups.
template <typename KeyOf>
Groups group_ids(const std::vector<int32_t>& ids, size_t num_keys, KeyOf key_of) {
  std::vector<int32_t> group_of(num_keys, -1);
  std::vector<int32_t> g(ids.size());
  std::vector<int64_t> counts;
  for (size_t i = 0; i < ids.size(); ++i) {
    int32_t& slot = group_of[key_of(ids[i])];
    if (slot < 0) {
      slot = static_cast<int32_t>(counts.size());
      counts.push_back(0);
    }
    g[i] = slot;
    ++counts[static_cast<size_t>(slot)];
  }
  Groups out;
  out.offsets.assign(counts.size() + 1, 0);
  for (size_t k = 0; k < counts.size(); ++k) out.offsets[k + 1] = out.offsets[k] + counts[k];
  out.members.resize(ids.size());
  std::vector<int64_t> cursor(out.offsets.begin(), out.offsets.end() - 1);
  for (size_t i = 0; i < ids.size(); ++i) out.members[static_cast<size_t>(cursor[static_cast<size_t>(g[i])]++)] = ids[i];
  return out;
}

// Puts the best k members, best first, at the front (the rest in any order). nth_element +
// sort beats partial_sort's heap when k is a sizeable fraction of the group (keep = N/M).
void sort_prefix(std::vector<Ranked>& members, size_t k) {
  if (k < members.size())
    std::nth_element(members.begin(), members.begin() + static_cast<std::ptrdiff_t>(k), members.end());
  std::sort(members.begin(), members.begin() + static_cast<std::ptrdiff_t>(std::min(k, members.size())));
}

// Open-addressing set of (hash -> node ids) for dedupe; sized for the few kept candidates of
// one group and reused across groups.
class StepSet {
 public:
  void reset(size_t expected) {
    size_t cap = 16;
    while (cap < 2 * expected + 2) cap <<= 1;
    hashes_.assign(cap, 0);
    ids_.assign(cap, -1);
  }
  // Calls same(other_id) for each stored id with this hash; inserts when none matches.
  // Returns false when a duplicate was found.
  template <typename Same>
  bool insert(uint64_t hash, int32_t id, Same same) {
    if (hash == 0) hash = 1;  // 0 marks an empty slot
    const size_t mask = hashes_.size() - 1;
    for (size_t k = hash & mask;; k = (k + 1) & mask) {
      if (hashes_[k] == 0) {
        hashes_[k] = hash;
        ids_[k] = id;
        return true;
      }
      if (hashes_[k] == hash && same(ids_[k])) return false;
    }
  }

 private:
  std::vector<uint64_t> hashes_;
  std::vector<int32_t> ids_;
};

}  // namespace

namespace {
// The index of `how` in `names`, else invalid_argument listing them.
template <size_t N>
size_t parse_name(const std::string& how, const char* name, const char* const (&names)[N]) {
  for (size_t i = 0; i < N; ++i)
    if (how == names[i]) return i;
  std::string all;
  for (size_t i = 0; i < N; ++i) all += (i ? ", " : "") + std::string(names[i]);
  throw std::invalid_argument(std::string(name) + " must be one of " + all + "; got '" + how + "'");
}
}  // namespace

Agg parse_agg(const std::string& how, const char* name) { return static_cast<Agg>(parse_name(how, name, kAggNames)); }

VoteKind parse_vote(const std::string& how, const char* name) {
  return static_cast<VoteKind>(parse_name(how, name, kVoteNames));
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
  std::vector<int32_t> out = to_ints_as<int32_t>(ids, name, kInt32Min, kInt32Max);
  for (size_t i = 0; i < out.size(); ++i) {
    const int32_t v = out[i];
    bool ok = v >= 0 && v < next_id_;
    if (ok) {
      const Page* p = pages_[static_cast<size_t>(v >> kPageShift)].get();
      ok = p != nullptr && p->status[static_cast<size_t>(v & (kPageSize - 1))] != kReleased;
    }
    if (!ok) throw std::out_of_range(at(name, i, v) + " is not a live node id");
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

void Forest::append_tokens(int32_t id, const int32_t* tokens, int64_t n) {
  Ref r = ref(id);
  r.page->token_offset[r.slot] = static_cast<int64_t>(r.page->tokens.size());
  r.page->num_tokens[r.slot] = static_cast<int32_t>(n);
  r.page->tokens.insert(r.page->tokens.end(), tokens, tokens + n);
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
    append_tokens(ids[i], prompts.data + prompts.offsets[i], prompts.offsets[i + 1] - prompts.offsets[i]);
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
  IdSet in_call;
  check_unique(ids, "node_ids", &in_call);

  std::unordered_map<int32_t, size_t> position;  // node id -> index, built only if a parent is in the call
  for (size_t i = 0; i < n; ++i) {
    Ref r = ref(ids[i]);
    const int32_t parent = r.page->parent[r.slot];
    if (parent == -1)
      throw std::invalid_argument(at("node_ids", i, ids[i]) + " is a root; roots hold the prompt, not a step");
    if (r.page->status[r.slot] == kPruned) throw std::invalid_argument(at("node_ids", i, ids[i]) + " is pruned");
    if (r.page->scored_children[r.slot] > 0)
      throw std::invalid_argument(at("node_ids", i, ids[i]) + " has children with steps; its step is fixed");
    if (position.empty() && in_call.contains(parent))
      for (size_t j = 0; j < n; ++j) position.emplace(ids[j], j);
    auto it = position.find(parent);
    if (it != position.end() && it->second > i)  // would read the parent's old step
      throw std::invalid_argument(at("node_ids", i, ids[i]) + ": its parent " + std::to_string(parent) +
                                  " comes later in node_ids; list parents before their children");
    Ref pr = ref(parent);
    if (pr.page->parent[pr.slot] != -1 && !pr.page->has_step[pr.slot] && it == position.end())
      throw std::invalid_argument(at("node_ids", i, ids[i]) + ": its parent " + std::to_string(parent) +
                                  " has no step; set the parent first (earlier in node_ids or in an earlier call)");
  }

  for (size_t i = 0; i < n; ++i) {
    Ref r = ref(ids[i]);
    Ref pr = ref(r.page->parent[r.slot]);
    if (!r.page->has_step[r.slot]) ++pr.page->scored_children[pr.slot];
    append_tokens(ids[i], steps.data + steps.offsets[i], steps.offsets[i + 1] - steps.offsets[i]);
    const double s = scores[i];
    r.page->has_step[r.slot] = 1;
    r.page->score[r.slot] = s;
    r.page->min_score[r.slot] = std::min(pr.page->min_score[pr.slot], s);
    r.page->prod_score[r.slot] = pr.page->prod_score[pr.slot] * s;
    r.page->sum_score[r.slot] = pr.page->sum_score[pr.slot] + s;
    r.page->status[r.slot] = done[i] ? kFinished : kActive;
  }
}

void Forest::set_scores(const NumView& node_ids, const NumView& step_scores) {
  const std::vector<int32_t> ids = live_ids(node_ids, "node_ids");
  const size_t n = ids.size();
  const std::vector<double> scores = to_finite_doubles(step_scores, "step_scores");
  check_length(n, scores.size(), "step_scores");
  IdSet in_call;
  check_unique(ids, "node_ids", &in_call);
  for (size_t i = 0; i < n; ++i) {
    Ref r = ref(ids[i]);
    if (!r.page->has_step[r.slot])
      throw std::invalid_argument(at("node_ids", i, ids[i]) +
                                  " has no step; set_steps gives a node its step and score");
  }

  std::unordered_map<int32_t, int32_t> first;  // problem slot -> lowest id of the call in it
  for (size_t i = 0; i < n; ++i) {
    Ref r = ref(ids[i]);
    r.page->score[r.slot] = scores[i];
    auto it = first.emplace(r.page->problem_slot[r.slot], ids[i]).first;
    it->second = std::min(it->second, ids[i]);
  }
  // Ids grow from parent to child: one ascending pass over a problem's nodes from the call's
  // lowest id there recomputes every changed node after its parent, as set_steps would.
  std::vector<uint8_t> changed;  // per node of the pass, from `begin`
  for (const auto& [slot, start] : first) {
    const std::vector<int32_t>& all = problems_[static_cast<size_t>(slot)].nodes;
    const auto begin = std::lower_bound(all.begin(), all.end(), start);
    changed.assign(static_cast<size_t>(all.end() - begin), 0);
    for (auto it = begin; it != all.end(); ++it) {
      const int32_t id = *it;
      Ref r = ref(id);
      if (!r.page->has_step[r.slot]) continue;
      const int32_t parent = r.page->parent[r.slot];
      bool mine = in_call.contains(id);
      if (!mine && parent >= start) {
        const auto p = std::lower_bound(begin, it, parent);
        mine = changed[static_cast<size_t>(p - begin)] != 0;
      }
      if (!mine) continue;
      changed[static_cast<size_t>(it - begin)] = 1;
      Ref pr = ref(parent);
      const double s = r.page->score[r.slot];
      r.page->min_score[r.slot] = std::min(pr.page->min_score[pr.slot], s);
      r.page->prod_score[r.slot] = pr.page->prod_score[pr.slot] * s;
      r.page->sum_score[r.slot] = pr.page->sum_score[pr.slot] + s;
    }
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

std::vector<double> Forest::path_scores(const NumView& node_ids, const std::string& how) const {
  const Agg agg = parse_agg(how, "how");
  const std::vector<int32_t> ids = scored_ids(node_ids, "node_ids", /*allow_pruned=*/true);
  std::vector<double> out(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) out[i] = value(ids[i], agg);
  return out;
}

std::vector<float> Forest::aggregate(const NumView& node_ids, const std::string& how) const {
  const std::vector<double> exact = path_scores(node_ids, how);
  std::vector<float> out(exact.size());
  for (size_t i = 0; i < exact.size(); ++i) out[i] = static_cast<float>(exact[i]);
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

  const Groups groups = group_ids(ids, problems_.size(), [this](int32_t id) {
    Ref r = ref(id);
    return static_cast<size_t>(r.page->problem_slot[r.slot]);
  });
  std::vector<int32_t> kept;
  std::vector<Ranked> members;
  StepSet seen;
  for (size_t g = 0; g < groups.size(); ++g) {
    members.clear();
    for (int64_t k = groups.offsets[g]; k < groups.offsets[g + 1]; ++k) {
      const int32_t id = groups.members[static_cast<size_t>(k)];
      members.push_back({rank_of(value(id, agg)), id});
    }
    const size_t keep = std::min(members.size(), static_cast<size_t>(keep_per_problem));
    if (!dedupe) {
      sort_prefix(members, keep);
      for (size_t k = 0; k < keep; ++k) kept.push_back(members[k].id);
      continue;
    }
    // Identical step tokens under the same parent count once: the best copy stays. Sort only
    // as far as the scan needs: a prefix of 2 * keep first, everything if duplicates eat it.
    size_t sorted = std::min(members.size(), 2 * keep);
    sort_prefix(members, sorted);
    seen.reset(keep);
    size_t taken = 0;
    for (size_t k = 0; k < members.size() && taken < keep; ++k) {
      if (k == sorted) {
        std::sort(members.begin() + static_cast<std::ptrdiff_t>(sorted), members.end());
        sorted = members.size();
      }
      Ref r = ref(members[k].id);
      const int32_t* tok = r.page->tokens.data() + r.page->token_offset[r.slot];
      const int32_t len = r.page->num_tokens[r.slot], parent = r.page->parent[r.slot];
      // Duplicates can only be siblings, so hash (parent, length, first and last token) and
      // let the exact comparison settle the rest (hashing every token would dominate the scan).
      uint64_t h = static_cast<uint64_t>(static_cast<uint32_t>(parent)) * 0x9E3779B97F4A7C15ull;
      h ^= static_cast<uint64_t>(len) * 0xC2B2AE3D27D4EB4Full;
      if (len > 0) {
        h ^= static_cast<uint64_t>(static_cast<uint32_t>(tok[0])) * 0x165667B19E3779F9ull;
        h ^= static_cast<uint64_t>(static_cast<uint32_t>(tok[len - 1])) * 0x27D4EB2F165667C5ull;
      }
      h ^= h >> 29;
      const bool fresh = seen.insert(h, members[k].id, [&](int32_t other) {
        Ref o = ref(other);
        return o.page->parent[o.slot] == parent && o.page->num_tokens[o.slot] == len &&
               std::equal(tok, tok + len, o.page->tokens.data() + o.page->token_offset[o.slot]);
      });
      if (!fresh) continue;
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
  group_of.reserve(ids.size());
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

  const Groups groups = group_ids(ids, problems_.size(), [this](int32_t id) {
    Ref r = ref(id);
    return static_cast<size_t>(r.page->problem_slot[r.slot]);
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

// ----------------------------------------------------------------------------- children counts

namespace ponder::tree {
namespace {

enum class CountMode { Proportional, Ceil, Multinomial, Systematic };

CountMode parse_count_mode(const std::string& mode) {
  if (mode == "proportional") return CountMode::Proportional;
  if (mode == "ceil") return CountMode::Ceil;
  if (mode == "multinomial") return CountMode::Multinomial;
  if (mode == "systematic") return CountMode::Systematic;
  throw std::invalid_argument("mode must be one of proportional, ceil, multinomial, systematic; got '" + mode + "'");
}

enum class WeightMode { Softmax, Logit };

WeightMode parse_weight_mode(const std::string& weights) {
  if (weights == "softmax") return WeightMode::Softmax;
  if (weights == "logit") return WeightMode::Logit;
  throw std::invalid_argument("weights must be one of softmax, logit; got '" + weights + "'");
}

// weights="logit": scores are clamped to [kLogitEps, 1 - kLogitEps] (its_hub's clip) before
// log(r / (1 - r)), so 0 and 1 give finite logits.
constexpr double kLogitEps = 1e-7;

// splitmix64 (Steele et al. 2014): state += golden gamma, then the finalizer; uniforms in [0, 1)
// from the top 53 bits. The twin computes the same integers and the same doubles.
struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
};

// First index whose cumulative weight exceeds `target`; the last positive-weight index when
// rounding puts target at or past the total.
size_t pick(const std::vector<double>& cum, const std::vector<double>& w, double target) {
  const auto it = std::upper_bound(cum.begin(), cum.end(), target);
  if (it != cum.end()) return static_cast<size_t>(it - cum.begin());
  size_t i = w.size() - 1;
  while (i > 0 && !(w[i] > 0)) --i;
  return i;
}

}  // namespace

std::vector<int32_t> Forest::children_counts(const NumView& candidate_ids, int64_t total_per_problem,
                                             const std::string& how, const std::string& mode, double temperature,
                                             int64_t seed, const std::string& weights,
                                             const NumView* multiplicity) const {
  const Agg agg = parse_agg(how, "how");
  const CountMode cm = parse_count_mode(mode);
  const WeightMode wm = parse_weight_mode(weights);
  if (total_per_problem < 0 || total_per_problem > kInt32Max)
    throw std::invalid_argument("total_per_problem[0] = " + std::to_string(total_per_problem) +
                                " is out of range [0, " + std::to_string(kInt32Max) + "]");
  if (!std::isfinite(temperature) || temperature < 0)
    throw std::invalid_argument("temperature must be a finite number >= 0, got " + std::to_string(temperature));
  if (wm == WeightMode::Logit && temperature == 0)
    throw std::invalid_argument("temperature must be > 0 with weights='logit', got 0");
  const std::vector<int32_t> ids = scored_ids(candidate_ids, "candidate_ids", /*allow_pruned=*/false);
  check_unique(ids, "candidate_ids");
  std::vector<int64_t> mult(ids.size(), 1);
  if (multiplicity != nullptr) {
    mult = to_ints(*multiplicity, "multiplicity", 1, kInt32Max);
    check_length(ids.size(), mult.size(), "multiplicity");
  }
  std::vector<double> rank(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    rank[i] = rank_of(value(ids[i], agg));
    if (wm == WeightMode::Logit && rank[i] != -kInf && !(rank[i] >= 0 && rank[i] <= 1))
      throw std::invalid_argument(at("candidate_ids", i, ids[i]) +
                                  " has an aggregate outside [0, 1]; weights='logit' needs scores in [0, 1]");
    if (temperature == 0 && rank[i] < 0 && rank[i] != -kInf)
      throw std::invalid_argument(at("candidate_ids", i, ids[i]) +
                                  " has a negative aggregate; temperature 0 (raw weights) needs scores >= 0");
  }
  if (wm == WeightMode::Logit)  // the logit replaces the score; the softmax below is unchanged
    for (double& r : rank)
      if (r != -kInf) {
        const double c = std::min(std::max(r, kLogitEps), 1.0 - kLogitEps);
        r = std::log(c / (1.0 - c));
      }
  // Group positions (not ids) by problem, first-appearance order.
  std::vector<int32_t> pos(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) pos[i] = static_cast<int32_t>(i);
  const Groups groups = group_ids(pos, problems_.size(), [this, &ids](int32_t i) {
    Ref r = ref(ids[static_cast<size_t>(i)]);
    return static_cast<size_t>(r.page->problem_slot[r.slot]);
  });
  std::vector<int32_t> counts(ids.size(), 0);
  const int64_t total = total_per_problem;
  std::vector<double> w, cum;
  std::vector<size_t> members;
  for (size_t g = 0; g < groups.size(); ++g) {
    members.clear();
    for (int64_t k = groups.offsets[g]; k < groups.offsets[g + 1]; ++k)
      members.push_back(static_cast<size_t>(groups.members[static_cast<size_t>(k)]));
    const size_t n = members.size();
    w.assign(n, 0.0);
    double top = -kInf;
    for (size_t k = 0; k < n; ++k) top = std::max(top, rank[members[k]]);
    for (size_t k = 0; k < n; ++k) {
      const double r = rank[members[k]];
      if (top == kInf) w[k] = r == kInf ? 1.0 : 0.0;
      else if (r == -kInf) w[k] = 0.0;
      else if (temperature == 0) w[k] = r;
      else w[k] = std::exp((r - top) / temperature);
    }
    double sum = 0;
    for (size_t k = 0; k < n; ++k) sum += (w[k] *= static_cast<double>(mult[members[k]]));
    if (!(sum > 0)) {  // every weight 0: each copy weighs the same
      sum = 0;
      for (size_t k = 0; k < n; ++k) sum += (w[k] = static_cast<double>(mult[members[k]]));
    }
    if (cm == CountMode::Proportional) {
      std::vector<std::pair<double, size_t>> rest;  // (fractional part, k)
      int64_t given = 0;
      for (size_t k = 0; k < n; ++k) {
        const double q = static_cast<double>(total) * w[k] / sum;
        const double f = std::floor(q);
        counts[members[k]] = static_cast<int32_t>(f);
        given += static_cast<int64_t>(f);
        rest.push_back({q - f, k});
      }
      std::stable_sort(rest.begin(), rest.end(), [&](const auto& a, const auto& b) {
        if (a.first != b.first) return a.first > b.first;
        return ids[members[a.second]] < ids[members[b.second]];
      });
      for (int64_t j = 0; given + j < total; ++j) ++counts[members[rest[static_cast<size_t>(j) % n].second]];
      continue;
    }
    if (cm == CountMode::Ceil) {  // heaviest first (ties: lower id), each ceil(rest * w / rest of the weight)
      std::vector<size_t> order(n);
      for (size_t k = 0; k < n; ++k) order[k] = k;
      std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
        if (w[a] != w[b]) return w[a] > w[b];
        return ids[members[a]] < ids[members[b]];
      });
      int64_t left = total;
      double left_w = sum;
      for (const size_t k : order) {
        int64_t c = 0;
        if (left > 0 && left_w > 0) {
          const double x = static_cast<double>(left) * w[k] / left_w;
          c = x >= static_cast<double>(left) ? left : (x > 0 ? static_cast<int64_t>(std::ceil(x)) : 0);
        }
        counts[members[k]] = static_cast<int32_t>(c);
        left -= c;
        left_w -= w[k];
      }
      if (n > 0) counts[members[order[0]]] += static_cast<int32_t>(left);  // rounding left some: to the heaviest
      continue;
    }
    cum.assign(n, 0.0);
    double c = 0;
    for (size_t k = 0; k < n; ++k) cum[k] = (c += w[k]);
    SplitMix64 rng{static_cast<uint64_t>(seed)};
    if (cm == CountMode::Multinomial) {
      for (int64_t j = 0; j < total; ++j) ++counts[members[pick(cum, w, rng.uniform() * c)]];
    } else {
      const double u = total > 0 ? rng.uniform() : 0.0;
      for (int64_t j = 0; j < total; ++j)
        ++counts[members[pick(cum, w, (u + static_cast<double>(j)) / static_cast<double>(total) * c)]];
    }
  }
  return counts;
}

}  // namespace ponder::tree
