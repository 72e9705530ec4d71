// The search forest: the trees of many problems in one struct-of-arrays node arena.
//
// Semantics are defined by the pure-Python twin, python/ponder/twins/forest.py; this
// class returns bit-identical results and throws the same error kinds:
//   std::invalid_argument -> ValueError, std::out_of_range -> IndexError,
//   std::overflow_error -> OverflowError.
// Every entry point validates all of its inputs before it mutates anything, so a call that
// throws leaves the forest unchanged.
//
// Storage: node ids are handed out in increasing order and never reused. Nodes live in
// fixed-size pages (id >> kPageShift selects the page); a page whose nodes have all been
// released returns to a spare pool and its memory serves new ids, while the released ids
// stay rejected. Each page keeps the tokens of its nodes in one flat buffer.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/num_view.h"

namespace ponder::tree {

enum Status : int8_t { kActive = 0, kFinished = 1, kPruned = 2, kReleased = 3 };
enum class Agg { Last, Min, Prod, Mean };
enum class VoteKind { Majority, Weighted, Best };
// The names parse_agg / parse_vote accept, in enum order: the one list of them
// (ponder._core.AGGREGATIONS / VOTES, re-exported by ponder.methods.config).
inline constexpr const char* kAggNames[] = {"last", "min", "prod", "mean"};
inline constexpr const char* kVoteNames[] = {"majority", "weighted", "best"};

constexpr int64_t kNoAnswer = INT64_MIN;

Agg parse_agg(const std::string& how, const char* name);
VoteKind parse_vote(const std::string& how, const char* name);

struct Ragged {
  std::vector<int32_t> tokens;
  std::vector<int64_t> offsets;  // size n + 1
};

struct NodeFields {
  std::vector<int32_t> parent, subtree, depth, num_tokens;
  std::vector<int64_t> problem, answer;
  std::vector<uint8_t> has_step;
  std::vector<float> score;
  std::vector<int8_t> status;
};

struct VoteResult {
  std::vector<int64_t> problem_ids, answer_ids;
  std::vector<int32_t> node_ids;
  std::vector<float> weights;
};

struct ForestStats {
  int64_t live_nodes = 0, ids_given = 0, problems = 0;
  int64_t pages_in_use = 0, spare_pages = 0, token_capacity = 0, bytes_reserved = 0;
};

class Forest {
 public:
  static constexpr int kPageShift = 12;
  static constexpr int32_t kPageSize = 1 << kPageShift;

  Forest() = default;

  // Building trees.
  std::vector<int32_t> add_roots(const NumView& problem_ids, const NumView& subtree_ids,
                                 const NumView& prompt_tokens_flat, const NumView& prompt_offsets);
  std::vector<int32_t> expand(const NumView& parent_ids, const NumView& counts);
  void set_steps(const NumView& node_ids, const NumView& tokens_flat, const NumView& offsets,
                 const NumView& step_scores, const NumView& finished);
  // New PRM scores for nodes that have a step; the path aggregates of those nodes and of all
  // their descendants become what set_steps would have computed with these scores.
  void set_scores(const NumView& node_ids, const NumView& step_scores);
  void set_answers(const NumView& node_ids, const NumView& answer_ids);
  void prune(const NumView& node_ids);
  void release_problem(int64_t problem_id);

  // Reading.
  // Each node's path aggregate, computed and returned in double; `aggregate` is the same
  // rounded to float (the dtype of node scores and vote weights).
  std::vector<double> path_scores(const NumView& node_ids, const std::string& how) const;
  std::vector<float> aggregate(const NumView& node_ids, const std::string& how) const;
  Ragged path_tokens(const NumView& node_ids) const;
  Ragged step_tokens(const NumView& node_ids) const;
  NodeFields nodes(const NumView& node_ids) const;
  std::vector<int32_t> problem_nodes(int64_t problem_id) const;
  std::vector<int64_t> problems() const;
  int64_t num_nodes() const { return live_nodes_; }
  ForestStats stats() const;

  // Selection and voting.
  std::vector<int32_t> select_beam(const NumView& candidate_ids, int64_t keep_per_problem,
                                   const std::string& how, bool dedupe) const;
  std::vector<int32_t> select_dvts(const NumView& candidate_ids, const std::string& how) const;
  VoteResult vote(const NumView& node_ids, const std::string& how, const std::string& agg) const;
  // Per problem, how many of `total_per_problem` children (or resampled copies) each candidate
  // gets, from weights softmax(aggregate / temperature) (temperature 0: the raw aggregate), or
  // with weights="logit" softmax(logit(clamp(aggregate, 1e-7, 1 - 1e-7)) / temperature), times
  // the candidate's multiplicity (nullptr: 1 each).
  // mode: proportional (largest remainder) | ceil (heaviest first, each the ceiling of its share
  // of what is left: REBASE's released code) | multinomial | systematic (seeded splitmix64).
  std::vector<int32_t> children_counts(const NumView& candidate_ids, int64_t total_per_problem,
                                       const std::string& how, const std::string& mode, double temperature,
                                       int64_t seed, const std::string& weights = "softmax",
                                       const NumView* multiplicity = nullptr) const;

 private:
  struct Page {
    std::vector<int32_t> parent, problem_slot, subtree, depth, num_tokens, scored_children;
    std::vector<int64_t> token_offset, answer;
    std::vector<double> score, min_score, prod_score, sum_score;
    std::vector<int8_t> status;
    std::vector<uint8_t> has_step;
    std::vector<int32_t> tokens;  // the tokens of this page's nodes, appended as they are set
    int32_t live = 0;             // allocated and not released
    Page();
    void reset();
  };
  struct Problem {
    int64_t id = -1;
    std::vector<int32_t> nodes;  // every node of the problem, ascending
  };
  struct Ref {  // where a node lives
    Page* page;
    int32_t slot;
  };

  Ref ref(int32_t id) const { return {pages_[static_cast<size_t>(id >> kPageShift)].get(), id & (kPageSize - 1)}; }
  // Parse ids and check every one is live; throws out_of_range naming `name[i]`.
  std::vector<int32_t> live_ids(const NumView& ids, const char* name) const;
  std::vector<int32_t> scored_ids(const NumView& ids, const char* name, bool allow_pruned) const;
  double value(int32_t id, Agg how) const;
  int32_t problem_slot_of(int64_t problem_id, bool create);
  int32_t find_problem(int64_t problem_id) const;  // slot or throws invalid_argument
  void check_id_space(int64_t more) const;
  int32_t allocate(int32_t parent, int32_t problem_slot, int32_t subtree, int32_t depth);
  void append_tokens(int32_t id, const int32_t* tokens, int64_t n);
  Ragged gather_tokens(const std::vector<int32_t>& ids, bool whole_path) const;

  std::vector<std::unique_ptr<Page>> pages_;
  std::vector<std::unique_ptr<Page>> spare_pages_;
  std::vector<Problem> problems_;
  std::vector<int32_t> free_problem_slots_;
  std::unordered_map<int64_t, int32_t> problem_index_;
  int64_t next_id_ = 0;
  int64_t live_nodes_ = 0;
};

}  // namespace ponder::tree
