// Tests of csrc/tree/forest.{h,cpp}: every Forest operation with hand-computed expectations,
// error kinds (and that a throwing call changes nothing), page reuse, and a seeded random
// stress run checked against a small model of python/ponder/twins/forest.py.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "common/num_view.h"
#include "test_util.h"
#include "tree/forest.h"

// Print vectors (and vectors of vectors) in failure messages instead of "{?}".
namespace ponder_test_print {
template <typename T>
void put(std::ostream& os, const T& x) {
  os << +x;
}
template <typename T>
void put(std::ostream& os, const std::vector<T>& v) {
  os << "{";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) os << ", ";
    put(os, v[i]);
  }
  os << "}";
}
}  // namespace ponder_test_print
namespace doctest {
template <typename T>
struct StringMaker<std::vector<T>> {
  static String convert(const std::vector<T>& v) {
    std::ostringstream os;
    ponder_test_print::put(os, v);
    return String(os.str().c_str());
  }
};
}  // namespace doctest

using ponder::DType;
using ponder::NumView;
using namespace ponder::tree;

namespace {

using I64 = std::vector<int64_t>;
using I32 = std::vector<int32_t>;
using F64 = std::vector<double>;
using F32 = std::vector<float>;
using U8 = std::vector<uint8_t>;
using Lists = std::vector<I32>;

constexpr int64_t kI64Max = std::numeric_limits<int64_t>::max();
constexpr int64_t kI32Max = std::numeric_limits<int32_t>::max();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------- views and wrappers

NumView L(const I64& x) { return NumView::of(x); }  // int64 view
NumView N(const I32& x) { return NumView::of(x); }  // int32 view (node ids)
NumView D(const F64& x) { return NumView::of(x); }  // float64 view
NumView B(const U8& x) { return NumView(x.data(), static_cast<int64_t>(x.size()), 1, DType::Bool); }

struct Csr {
  I64 flat, offsets;
};
Csr csr(const Lists& lists) {
  Csr c;
  c.offsets.push_back(0);
  for (const I32& l : lists) {
    c.flat.insert(c.flat.end(), l.begin(), l.end());
    c.offsets.push_back(static_cast<int64_t>(c.flat.size()));
  }
  return c;
}

I32 add_roots(Forest& f, const I64& problems, const I64& subtrees, const Lists& prompts) {
  const Csr c = csr(prompts);
  return f.add_roots(L(problems), L(subtrees), L(c.flat), L(c.offsets));
}
I32 expand(Forest& f, const I32& parents, const I64& counts) { return f.expand(N(parents), L(counts)); }
void set_steps(Forest& f, const I32& ids, const Lists& tokens, const F64& scores, const U8& finished) {
  const Csr c = csr(tokens);
  f.set_steps(N(ids), L(c.flat), L(c.offsets), D(scores), B(finished));
}
void set_answers(Forest& f, const I32& ids, const I64& answers) { f.set_answers(N(ids), L(answers)); }
F32 agg(const Forest& f, const I32& ids, const char* how) { return f.aggregate(N(ids), how); }
F64 path_scores(const Forest& f, const I32& ids, const char* how) { return f.path_scores(N(ids), how); }
I32 beam(const Forest& f, const I32& ids, int64_t keep, const char* how, bool dedupe) {
  return f.select_beam(N(ids), keep, how, dedupe);
}
I32 dvts(const Forest& f, const I32& ids, const char* how) { return f.select_dvts(N(ids), how); }
VoteResult vote(const Forest& f, const I32& ids, const char* how, const char* agg_name = "last") {
  return f.vote(N(ids), how, agg_name);
}
Lists split(const Ragged& r) {
  Lists out;
  REQUIRE(!r.offsets.empty());
  CHECK(r.offsets.front() == 0);
  CHECK(r.offsets.back() == static_cast<int64_t>(r.tokens.size()));
  for (size_t i = 0; i + 1 < r.offsets.size(); ++i)
    out.emplace_back(r.tokens.begin() + r.offsets[i], r.tokens.begin() + r.offsets[i + 1]);
  return out;
}
Lists paths(const Forest& f, const I32& ids) { return split(f.path_tokens(N(ids))); }
Lists steps_of(const Forest& f, const I32& ids) { return split(f.step_tokens(N(ids))); }
NodeFields fields(const Forest& f, const I32& ids) { return f.nodes(N(ids)); }
NodeFields field1(const Forest& f, int32_t id) { return f.nodes(N(I32{id})); }

I32 range_ids(int32_t begin, int32_t end) {
  I32 out;
  for (int32_t i = begin; i < end; ++i) out.push_back(i);
  return out;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }
bool same_bits(const F32& a, const F32& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (!same_bits(a[i], b[i])) return false;
  return true;
}
float f32(double x) { return static_cast<float>(x); }

// ---------------------------------------------------------------------------- snapshots

// Every observable piece of a forest's state.
struct Snapshot {
  int64_t num_nodes = 0;
  ForestStats stats;
  I64 problems;
  Lists problem_nodes;
  I32 ids;
  NodeFields fields;
  Lists paths, steps;
  std::vector<F32> aggregates;  // last, min, prod, mean of the scored ids

  bool operator==(const Snapshot& o) const {
    const NodeFields& a = fields;
    const NodeFields& b = o.fields;
    bool same = num_nodes == o.num_nodes && stats.live_nodes == o.stats.live_nodes &&
                stats.ids_given == o.stats.ids_given && stats.problems == o.stats.problems &&
                stats.pages_in_use == o.stats.pages_in_use && stats.spare_pages == o.stats.spare_pages &&
                stats.token_capacity == o.stats.token_capacity && stats.bytes_reserved == o.stats.bytes_reserved &&
                problems == o.problems && problem_nodes == o.problem_nodes && ids == o.ids && a.parent == b.parent &&
                a.subtree == b.subtree && a.depth == b.depth && a.num_tokens == b.num_tokens &&
                a.problem == b.problem && a.answer == b.answer && a.has_step == b.has_step &&
                same_bits(a.score, b.score) && a.status == b.status && paths == o.paths && steps == o.steps &&
                aggregates.size() == o.aggregates.size();
    for (size_t k = 0; same && k < aggregates.size(); ++k) same = same_bits(aggregates[k], o.aggregates[k]);
    return same;
  }
};

Snapshot snapshot(const Forest& f) {
  Snapshot s;
  s.num_nodes = f.num_nodes();
  s.stats = f.stats();
  s.problems = f.problems();
  for (int64_t p : s.problems) {
    s.problem_nodes.push_back(f.problem_nodes(p));
    s.ids.insert(s.ids.end(), s.problem_nodes.back().begin(), s.problem_nodes.back().end());
  }
  s.fields = f.nodes(N(s.ids));
  s.paths = paths(f, s.ids);
  s.steps = steps_of(f, s.ids);
  I32 scored;
  for (size_t i = 0; i < s.ids.size(); ++i)
    if (s.fields.has_step[i]) scored.push_back(s.ids[i]);
  for (const char* how : {"last", "min", "prod", "mean"}) s.aggregates.push_back(agg(f, scored, how));
  return s;
}

// Runs the call, checks it throws exactly `Exc` and that the forest is unchanged; returns what().
#define THROWS_UNCHANGED(forest, Exc, ...)                                                        \
  ponder_test::throws_unchanged<Exc>([&] { return snapshot(forest); }, [&] { __VA_ARGS__; }, #__VA_ARGS__, \
                                     __LINE__)

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

// ================================================================================ add_roots

TEST_CASE("forest: add_roots gives increasing ids, stores prompts and creates problems") {
  Forest f;
  CHECK(f.num_nodes() == 0);
  CHECK(f.problems().empty());
  const I32 r = add_roots(f, {7, 3, 7}, {0, 1, 2}, {{1, 2}, {}, {3}});
  CHECK(r == I32{0, 1, 2});

  const NodeFields n = fields(f, r);
  CHECK(n.parent == I32{-1, -1, -1});
  CHECK(n.problem == I64{7, 3, 7});
  CHECK(n.subtree == I32{0, 1, 2});
  CHECK(n.depth == I32{0, 0, 0});
  CHECK(n.num_tokens == I32{2, 0, 1});
  CHECK(n.has_step == U8{0, 0, 0});
  CHECK(n.status == std::vector<int8_t>{kActive, kActive, kActive});
  CHECK(n.answer == I64{kNoAnswer, kNoAnswer, kNoAnswer});
  for (float s : n.score) CHECK(std::isnan(s));

  CHECK(paths(f, r) == Lists{{1, 2}, {}, {3}});
  CHECK(steps_of(f, r) == Lists{{1, 2}, {}, {3}});
  const Ragged raw = f.path_tokens(N(r));
  CHECK(raw.tokens == I32{1, 2, 3});
  CHECK(raw.offsets == I64{0, 2, 2, 3});

  CHECK(f.problems() == I64{3, 7});
  CHECK(f.problem_nodes(7) == I32{0, 2});
  CHECK(f.problem_nodes(3) == I32{1});
  CHECK(f.num_nodes() == 3);
  const ForestStats st = f.stats();
  CHECK(st.live_nodes == 3);
  CHECK(st.ids_given == 3);
  CHECK(st.problems == 2);
  CHECK(st.pages_in_use == 1);
  CHECK(st.spare_pages == 0);
  CHECK(st.bytes_reserved >= int64_t{Forest::kPageSize} * 74);

  // Empty calls, including empty arrays of a non-integer dtype, add nothing.
  CHECK(add_roots(f, {}, {}, {}).empty());
  const F64 none;
  CHECK(f.add_roots(D(none), D(none), D(none), L(I64{0})).empty());
  CHECK(f.num_nodes() == 3);
  CHECK(f.stats().ids_given == 3);

  // Any integer dtype; extreme but valid values.
  const std::vector<uint8_t> p8{9};
  const std::vector<int16_t> s16{4};
  const std::vector<uint32_t> t32{5, 6};
  const std::vector<int32_t> o32{0, 2};
  CHECK(f.add_roots(NumView::of(p8), NumView::of(s16), NumView::of(t32), NumView::of(o32)) == I32{3});
  CHECK(add_roots(f, {kI64Max}, {kI32Max}, {{static_cast<int32_t>(kI32Max), 0}}) == I32{4});
  const NodeFields m = fields(f, {3, 4});
  CHECK(m.problem == I64{9, kI64Max});
  CHECK(m.subtree == I32{4, static_cast<int32_t>(kI32Max)});
  CHECK(paths(f, {3, 4}) == Lists{{5, 6}, {static_cast<int32_t>(kI32Max), 0}});
  CHECK(f.problems() == I64{3, 7, 9, kI64Max});

  // More roots for an existing problem join it.
  CHECK(add_roots(f, {3}, {0}, {{8}}) == I32{5});
  CHECK(f.problem_nodes(3) == I32{1, 5});
  CHECK(f.stats().problems == 4);
}

TEST_CASE("forest: add_roots rejects bad input and changes nothing") {
  Forest f;
  add_roots(f, {0}, {0}, {{1}});
  const I64 one{1}, zero{0};
  // Problem ids: >= 0, integer, 1-D.
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, add_roots(f, {-1}, {0}, {{1}})), "problem_ids[0] = -1"));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, add_roots(f, {1, -5}, {0, 0}, {{1}, {2}})),
                 "problem_ids[1]"));
  const std::vector<uint64_t> huge{uint64_t{1} << 63};
  THROWS_UNCHANGED(f, std::invalid_argument, f.add_roots(NumView::of(huge), L(zero), L(I64{}), L(I64{0, 0})));
  THROWS_UNCHANGED(f, std::invalid_argument, f.add_roots(D(F64{1.0}), L(zero), L(I64{}), L(I64{0, 0})));
  const I64 flat2{1, 2};
  THROWS_UNCHANGED(f, std::invalid_argument,
                   f.add_roots(NumView(flat2.data(), 2, 8, DType::I64, 2), L(I64{0, 0}), L(I64{}), L(I64{0, 0, 0})));
  // Subtrees: int32 range, one per root.
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, add_roots(f, {1}, {-1}, {{1}})), "subtree_ids[0]"));
  THROWS_UNCHANGED(f, std::invalid_argument, add_roots(f, {1}, {kI32Max + 1}, {{1}}));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, add_roots(f, {1}, {0, 0}, {{1}})),
                 "subtree_ids must have length 1"));
  THROWS_UNCHANGED(f, std::invalid_argument, add_roots(f, {1, 2}, {0}, {{1}, {2}}));
  // Prompt tokens and offsets.
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.add_roots(L(one), L(zero), L(I64{-1}), L(I64{0, 1}))),
                 "prompt_tokens_flat[0] = -1"));
  THROWS_UNCHANGED(f, std::invalid_argument, f.add_roots(L(one), L(zero), L(I64{kI32Max + 1}), L(I64{0, 1})));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.add_roots(L(one), L(zero), L(I64{}), L(I64{0}))),
                 "prompt_offsets must have length 2"));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.add_roots(L(one), L(zero), L(I64{5}), L(I64{1, 1}))),
                 "prompt_offsets[0] must be 0"));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument,
                                  f.add_roots(L(I64{1, 2}), L(I64{0, 0}), L(I64{5}), L(I64{0, 2, 1}))),
                 "non-decreasing"));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.add_roots(L(one), L(zero), L(I64{5, 6}), L(I64{0, 1}))),
                 "must equal len(prompt_tokens_flat)"));
  THROWS_UNCHANGED(f, std::invalid_argument, f.add_roots(L(one), L(zero), L(I64{5}), L(I64{0, -1})));
  THROWS_UNCHANGED(f, std::invalid_argument, f.add_roots(L(one), L(zero), D(F64{5.0}), L(I64{0, 1})));
  const U8 bool_offsets{0, 1};
  THROWS_UNCHANGED(f, std::invalid_argument, f.add_roots(L(one), L(zero), L(I64{5}), B(bool_offsets)));
  // Nothing was created by any of these: problem 1 does not exist, the next id is still 1.
  CHECK(f.problems() == I64{0});
  CHECK(add_roots(f, {1}, {0}, {{2}}) == I32{1});
}

// ================================================================================ expand

TEST_CASE("forest: expand appends children parent by parent") {
  Forest f;
  const I32 r = add_roots(f, {0, 1}, {0, 5}, {{1}, {2}});
  CHECK(expand(f, {0, 1, 0}, {2, 1, 0}) == I32{2, 3, 4});
  NodeFields n = fields(f, {2, 3, 4});
  CHECK(n.parent == I32{0, 0, 1});
  CHECK(n.problem == I64{0, 0, 1});
  CHECK(n.subtree == I32{0, 0, 5});
  CHECK(n.depth == I32{1, 1, 1});
  CHECK(n.num_tokens == I32{0, 0, 0});
  CHECK(n.has_step == U8{0, 0, 0});
  CHECK(n.status == std::vector<int8_t>{kActive, kActive, kActive});
  CHECK(n.answer == I64{kNoAnswer, kNoAnswer, kNoAnswer});
  CHECK(paths(f, {2, 3, 4}) == Lists{{1}, {1}, {2}});  // a child without a step adds no tokens
  CHECK(steps_of(f, {2, 3, 4}) == Lists{{}, {}, {}});

  // The same parent twice is allowed; counts may use any integer dtype.
  const std::vector<uint8_t> c8{1, 1};
  CHECK(f.expand(N({1, 1}), NumView::of(c8)) == I32{5, 6});
  CHECK(expand(f, {}, {}).empty());
  CHECK(expand(f, {0}, {0}).empty());
  CHECK(f.problem_nodes(0) == I32{0, 2, 3});
  CHECK(f.problem_nodes(1) == I32{1, 4, 5, 6});
  CHECK(f.num_nodes() == 7);

  // Deeper levels inherit problem and subtree and count depth.
  set_steps(f, {4}, {{3}}, {0.5}, {0});
  CHECK(expand(f, {4}, {1}) == I32{7});
  set_steps(f, {7}, {{4}}, {0.5}, {0});
  CHECK(expand(f, {7}, {2}) == I32{8, 9});
  n = fields(f, {7, 8, 9});
  CHECK(n.parent == I32{4, 7, 7});
  CHECK(n.depth == I32{2, 3, 3});
  CHECK(n.subtree == I32{5, 5, 5});
  CHECK(n.problem == I64{1, 1, 1});
  CHECK(paths(f, {9}) == Lists{{2, 3, 4}});
  (void)r;
}

TEST_CASE("forest: expand errors") {
  Forest f;
  add_roots(f, {0, 1}, {0, 0}, {{1}, {2}});  // 0, 1
  expand(f, {0}, {3});                       // 2, 3, 4 (no steps)
  set_steps(f, {3, 4}, {{5}, {6}}, {0.5, 0.5}, {1, 0});  // 3 finished, 4 active
  expand(f, {1}, {1});                                  // 5
  const int64_t n = f.stats().ids_given;
  CHECK(n == 6);

  // Ids never given out or negative: out_of_range; outside int32: invalid_argument.
  CHECK(contains(THROWS_UNCHANGED(f, std::out_of_range, expand(f, {6}, {1})), "parent_ids[0] = 6 is not a live node id"));
  THROWS_UNCHANGED(f, std::out_of_range, expand(f, {1000000}, {1}));
  THROWS_UNCHANGED(f, std::out_of_range, expand(f, {-1}, {1}));
  THROWS_UNCHANGED(f, std::out_of_range, f.expand(L(I64{std::numeric_limits<int32_t>::min()}), L(I64{1})));
  THROWS_UNCHANGED(f, std::invalid_argument, f.expand(L(I64{kI32Max + 1}), L(I64{1})));
  THROWS_UNCHANGED(f, std::invalid_argument, f.expand(D(F64{0.0}), L(I64{1})));
  // Counts.
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, expand(f, {0}, {-1})), "counts[0] = -1"));
  THROWS_UNCHANGED(f, std::invalid_argument, expand(f, {0}, {kI32Max + 1}));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, expand(f, {0, 1}, {1})), "counts must have length 2"));
  THROWS_UNCHANGED(f, std::invalid_argument, f.expand(N({0}), D(F64{1.0})));
  // Parent ids are checked before counts.
  THROWS_UNCHANGED(f, std::out_of_range, expand(f, {77}, {-1}));
  // State: a child without a step, a finished node, a pruned node.
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, expand(f, {0, 2}, {1, 1})),
                 "parent_ids[1] = 2 has no step yet"));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, expand(f, {3}, {1})), "is finished"));
  f.prune(N({1, 4}));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, expand(f, {1}, {1})), "parent_ids[0] = 1 is pruned"));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, expand(f, {0, 4}, {2, 2})), "parent_ids[1] = 4 is pruned"));
  // A bad entry after good ones: nothing allocated.
  THROWS_UNCHANGED(f, std::out_of_range, expand(f, {0, 0, 99}, {3, 1, 1}));
  // More ids than int32 can number: overflow_error before anything is allocated.
  THROWS_UNCHANGED(f, std::overflow_error, expand(f, {0}, {kI32Max}));
  THROWS_UNCHANGED(f, std::overflow_error, expand(f, {0, 0}, {kI32Max, kI32Max}));
  CHECK(f.stats().ids_given == n);
  CHECK(expand(f, {0}, {1}) == I32{6});
}

// ================================================================================ set_steps

TEST_CASE("forest: set_steps keeps path aggregates last/min/prod/mean through several levels") {
  Forest f;
  CHECK(add_roots(f, {0}, {0}, {{100, 101}}) == I32{0});
  CHECK(expand(f, {0}, {2}) == I32{1, 2});
  set_steps(f, {1, 2}, {{1}, {2, 2}}, {0.5, 0.75}, {0, 0});
  CHECK(expand(f, {1}, {1}) == I32{3});
  set_steps(f, {3}, {{3}}, {0.25}, {0});
  CHECK(expand(f, {3}, {1}) == I32{4});
  set_steps(f, {4}, {{4, 4, 4}}, {0.75}, {0});
  CHECK(expand(f, {2}, {1}) == I32{5});
  set_steps(f, {5}, {{}}, {-2.0}, {1});

  const I32 all{1, 2, 3, 4, 5};
  // Path of 4: 0.5, 0.25, 0.75; path of 5: 0.75, -2.
  CHECK(agg(f, all, "last") == F32{0.5f, 0.75f, 0.25f, 0.75f, -2.0f});
  CHECK(agg(f, all, "min") == F32{0.5f, 0.75f, 0.25f, 0.25f, -2.0f});
  CHECK(agg(f, all, "prod") == F32{0.5f, 0.75f, 0.125f, 0.09375f, -1.5f});
  CHECK(agg(f, all, "mean") == F32{0.5f, 0.75f, 0.375f, 0.5f, -0.625f});
  CHECK(agg(f, {4, 4, 1}, "prod") == F32{0.09375f, 0.09375f, 0.5f});  // repeats allowed
  CHECK(agg(f, {}, "mean").empty());
  // path_scores: the same aggregates in double (these scores are exact in float too).
  CHECK(path_scores(f, all, "mean") == F64{0.5, 0.75, 0.375, 0.5, -0.625});
  CHECK(path_scores(f, {4, 1}, "prod") == F64{0.09375, 0.5});

  NodeFields n = fields(f, all);
  CHECK(n.parent == I32{0, 0, 1, 3, 2});
  CHECK(n.depth == I32{1, 1, 2, 3, 2});
  CHECK(n.has_step == U8{1, 1, 1, 1, 1});
  CHECK(n.score == F32{0.5f, 0.75f, 0.25f, 0.75f, -2.0f});
  CHECK(n.num_tokens == I32{1, 2, 1, 3, 0});
  CHECK(n.status == std::vector<int8_t>{kActive, kActive, kActive, kActive, kFinished});
  CHECK(paths(f, {4, 5, 0}) == Lists{{100, 101, 1, 3, 4, 4, 4}, {100, 101, 2, 2}, {100, 101}});
  const Ragged st = f.step_tokens(N({4, 0, 2}));
  CHECK(st.tokens == I32{4, 4, 4, 100, 101, 2, 2});
  CHECK(st.offsets == I64{0, 3, 5, 7});

  SUBCASE("re-setting a leaf replaces its step, score, status and aggregates") {
    set_steps(f, {4}, {{9}}, {0.125}, {1});
    CHECK(agg(f, {4}, "last") == F32{0.125f});
    CHECK(agg(f, {4}, "min") == F32{0.125f});
    CHECK(agg(f, {4}, "prod") == F32{0.015625f});
    CHECK(agg(f, {4}, "mean") == F32{f32((0.5 + 0.25 + 0.125) / 3)});
    CHECK(field1(f, 4).status == std::vector<int8_t>{kFinished});
    CHECK(field1(f, 4).num_tokens == I32{1});
    CHECK(paths(f, {4}) == Lists{{100, 101, 1, 3, 9}});
    // ... and again, back to active with the first values.
    set_steps(f, {4}, {{4, 4, 4}}, {0.75}, {0});
    CHECK(agg(f, all, "prod") == F32{0.5f, 0.75f, 0.125f, 0.09375f, -1.5f});
    CHECK(agg(f, all, "mean") == F32{0.5f, 0.75f, 0.375f, 0.5f, -0.625f});
    CHECK(field1(f, 4).status == std::vector<int8_t>{kActive});
    CHECK(paths(f, {4}) == Lists{{100, 101, 1, 3, 4, 4, 4}});
    // Ancestors are untouched; 3 still has a child with a step, so its step is fixed.
    CHECK(agg(f, {3}, "mean") == F32{0.375f});
    THROWS_UNCHANGED(f, std::invalid_argument, set_steps(f, {3}, {{1}}, {1.0}, {0}));
    // An empty step.
    set_steps(f, {4}, {{}}, {0.75}, {0});
    CHECK(paths(f, {4}) == Lists{{100, 101, 1, 3}});
    CHECK(steps_of(f, {4}) == Lists{{}});
  }

  SUBCASE("a parent re-set earlier in the same call feeds its child's aggregates") {
    CHECK(expand(f, {4}, {1}) == I32{6});
    // 4 may be re-set: its only child has no step yet.
    set_steps(f, {4, 6}, {{7}, {8}}, {0.5, 0.25}, {0, 0});
    CHECK(agg(f, {4}, "prod") == F32{0.0625f});  // 0.5 * 0.25 * 0.5
    CHECK(agg(f, {6}, "last") == F32{0.25f});
    CHECK(agg(f, {6}, "min") == F32{0.25f});
    CHECK(agg(f, {6}, "prod") == F32{0.015625f});
    CHECK(agg(f, {6}, "mean") == F32{0.375f});  // (0.5 + 0.25 + 0.5 + 0.25) / 4
    CHECK(field1(f, 6).depth == I32{4});
    CHECK(paths(f, {6}) == Lists{{100, 101, 1, 3, 7, 8}});
    // Now 4's step is fixed, 6's is not.
    CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, set_steps(f, {4}, {{1}}, {1.0}, {0})),
                   "has children with steps"));
    set_steps(f, {6}, {{8, 8}}, {1.0}, {1});
    CHECK(agg(f, {6}, "mean") == F32{0.5625f});  // (0.5 + 0.25 + 0.5 + 1) / 4
  }

  SUBCASE("several levels set in one call, parents first") {
    CHECK(expand(f, {2}, {1}) == I32{6});  // sibling of 5 under 2
    set_steps(f, {6}, {{1}}, {0.5}, {0});
    CHECK(expand(f, {6}, {1}) == I32{7});
    CHECK(expand(f, {5 + 1}, {0}).empty());
    // 6 (re-set, its child 7 has no step) then 7 in the same call.
    set_steps(f, {6, 7}, {{2}, {3}}, {0.25, 0.5}, {0, 1});
    CHECK(agg(f, {6, 7}, "prod") == F32{0.1875f, 0.09375f});
    CHECK(agg(f, {6, 7}, "mean") == F32{0.5f, 0.5f});
    CHECK(agg(f, {6, 7}, "min") == F32{0.25f, 0.25f});
  }

  SUBCASE("scores of any real dtype and finished flags of any integer dtype") {
    const std::vector<int32_t> iscore{1};
    const std::vector<uint16_t> toks{65535};
    const std::vector<int8_t> offs{0, 1};
    const std::vector<int64_t> done{1};
    f.set_steps(N({5}), NumView::of(toks), NumView::of(offs), NumView::of(iscore), NumView::of(done));
    CHECK(agg(f, {5}, "last") == F32{1.0f});
    CHECK(agg(f, {5}, "prod") == F32{0.75f});
    CHECK(field1(f, 5).status == std::vector<int8_t>{kFinished});
    CHECK(steps_of(f, {5}) == Lists{{65535}});
    const std::vector<float> fscore{0.5f};
    const U8 raw_true{2};  // any non-zero bool byte is true
    f.set_steps(N({5}), L(I64{}), L(I64{0, 0}), NumView::of(fscore), B(raw_true));
    CHECK(field1(f, 5).status == std::vector<int8_t>{kFinished});
    CHECK(agg(f, {5}, "mean") == F32{0.625f});
    // An empty call is fine.
    f.set_steps(N({}), L(I64{}), L(I64{0}), D(F64{}), B(U8{}));
  }
}

TEST_CASE("forest: set_steps errors") {
  Forest f;
  add_roots(f, {0}, {0}, {{1}});                          // 0
  expand(f, {0}, {4});                                    // 1..4
  set_steps(f, {1, 2}, {{1}, {2}}, {0.5, 0.25}, {0, 0});  // 3, 4 without steps
  expand(f, {1}, {1});                                    // 5
  set_steps(f, {5}, {{3}}, {0.5}, {0});                   // 1 now fixed
  f.prune(N({2}));
  const I64 tok{7}, off{0, 1}, off2{0, 1, 2}, tok2{7, 8};
  const F64 half{0.5}, halves{0.5, 0.5};
  const U8 no{0}, nos{0, 0};

  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({0}), L(tok), L(off), D(half), B(no))),
                 "node_ids[0] = 0 is a root"));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({2}), L(tok), L(off), D(half), B(no))),
                 "node_ids[0] = 2 is pruned"));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({1}), L(tok), L(off), D(half), B(no))),
                 "has children with steps"));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument,
                                  f.set_steps(N({3, 3}), L(tok2), L(off2), D(halves), B(nos))),
                 "node_ids[1] = 3 appears more than once"));
  // A bad node after a good one: the good one is not touched either.
  THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({3, 0}), L(tok2), L(off2), D(halves), B(nos)));
  THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({3, 2}), L(tok2), L(off2), D(halves), B(nos)));
  THROWS_UNCHANGED(f, std::out_of_range, f.set_steps(N({3, 99}), L(tok2), L(off2), D(halves), B(nos)));
  CHECK(contains(THROWS_UNCHANGED(f, std::out_of_range, f.set_steps(N({6}), L(tok), L(off), D(half), B(no))),
                 "node_ids[0] = 6"));
  THROWS_UNCHANGED(f, std::out_of_range, f.set_steps(N({-3}), L(tok), L(off), D(half), B(no)));
  // Scores: finite reals, one per node.
  for (double bad : {kNaN, kInf, -kInf}) {
    CAPTURE(bad);
    CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument,
                                    f.set_steps(N({3, 4}), L(tok2), L(off2), D(F64{0.5, bad}), B(nos))),
                   "step_scores[1]"));
    const std::vector<float> fbad{static_cast<float>(bad)};
    THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({3}), L(tok), L(off), NumView::of(fbad), B(no)));
  }
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({3, 4}), L(tok2), L(off2), D(half), B(nos))),
                 "step_scores must have length 2"));
  THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({3}), L(tok), L(off), B(no), B(no)));
  // Finished flags: 0/1 of a bool or integer dtype, one per node.
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({3}), L(tok), L(off), D(half), L(I64{2}))),
                 "finished[0] = 2"));
  THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({3}), L(tok), L(off), D(half), D(F64{1.0})));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({3, 4}), L(tok2), L(off2), D(halves), B(no))),
                 "finished must have length 2"));
  // Tokens and offsets.
  THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({3}), L(I64{-7}), L(off), D(half), B(no)));
  THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({3}), L(I64{kI32Max + 1}), L(off), D(half), B(no)));
  THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({3}), L(tok), L(I64{0, 2}), D(half), B(no)));
  THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({3}), L(tok), L(off2), D(half), B(no)));
  THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({3, 4}), L(tok2), L(I64{0, 2, 1}), D(halves), B(nos)));
  THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({3}), L(tok), L(I64{1, 1}), D(half), B(no)));
  THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({3}), D(F64{7.0}), L(off), D(half), B(no)));
  // A parent listed after its child is rejected: the child would read the parent's old step.
  CHECK(expand(f, {5}, {1}) == I32{6});  // 5 has a step and no child with a step yet
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({6, 5}), L(tok2), L(off2), D(halves), B(nos))),
                 "node_ids[0] = 6: its parent 5 comes later in node_ids"));
  THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({3, 6, 4, 5}), L(I64{1, 2, 3, 4}), L(I64{0, 1, 2, 3, 4}),
                                                         D(F64{0.5, 0.5, 0.5, 0.5}), B(U8{0, 0, 0, 0})));
  THROWS_UNCHANGED(f, std::invalid_argument, f.set_steps(N({6, 0}), L(tok2), L(off2), D(halves), B(nos)));
  // Ids are checked first: a bad id wins over a bad score.
  THROWS_UNCHANGED(f, std::out_of_range, f.set_steps(N({99}), L(tok), L(off), D(F64{kNaN}), B(no)));

  // Nothing above changed 3, 4, 5 or 6.
  CHECK(fields(f, {3, 4, 6}).has_step == U8{0, 0, 0});
  CHECK(agg(f, {5}, "last") == F32{0.5f});
  set_steps(f, {3, 4}, {{7}, {8}}, {0.5, 0.5}, {0, 0});
  CHECK(agg(f, {3, 4}, "last") == F32{0.5f, 0.5f});
  // Parent first is fine: 6 reads 5's new step.
  set_steps(f, {5, 6}, {{1}, {2}}, {0.25, 1.0}, {0, 0});
  CHECK(agg(f, {6}, "prod") == F32{0.125f});  // 0.5 * 0.25 * 1
  CHECK(agg(f, {6}, "mean") == F32{f32((0.5 + 0.25 + 1.0) / 3)});
}

// ================================================================================ set_scores

TEST_CASE("forest: set_scores late gives the aggregates set_steps gives with the same scores") {
  // Two problems; problem 0: 0 -> 1 -> 3 -> 4 and 0 -> 2 -> 5 (6 unstepped under 5, 7 pruned
  // under 3); problem 1: 8 -> 9. `late` gets placeholders first, `now` the real scores.
  const F64 real{0.3, 0.7, 0.1, 0.9, 0.6, 0.2, 0.45};  // nodes 1, 2, 3, 4, 5, 7, 9
  auto build = [](Forest& f, const F64& s) {
    add_roots(f, {0}, {0}, {{1, 2}});                              // 0
    expand(f, {0}, {2});                                           // 1, 2
    set_steps(f, {1, 2}, {{3}, {4, 4}}, {s[0], s[1]}, {0, 0});
    expand(f, {1}, {1});                                           // 3
    set_steps(f, {3}, {{5}}, {s[2]}, {0});
    expand(f, {3}, {1});                                           // 4
    set_steps(f, {4}, {{6}}, {s[3]}, {1});
    expand(f, {2}, {1});                                           // 5
    set_steps(f, {5}, {{}}, {s[4]}, {0});
    expand(f, {5}, {1});                                           // 6, no step
    expand(f, {3}, {1});                                           // 7
    set_steps(f, {7}, {{7}}, {s[5]}, {0});
    f.prune(N({7}));
    add_roots(f, {1}, {0}, {{9}});                                 // 8
    expand(f, {8}, {1});                                           // 9
    set_steps(f, {9}, {{8}}, {s[6]}, {1});
    set_answers(f, {4, 9}, {11, 12});
  };
  Forest now, late;
  build(now, real);
  build(late, F64(real.size(), 0.0));
  const I32 scored{1, 2, 3, 4, 5, 7, 9};
  CHECK(agg(late, scored, "prod") == F32(7, 0.0f));

  SUBCASE("all at once, in any order, across problems") {
    late.set_scores(N({9, 4, 1, 7, 3, 5, 2}), D(F64{0.45, 0.9, 0.3, 0.2, 0.1, 0.6, 0.7}));
    CHECK(snapshot(late) == snapshot(now));
    for (const char* how : {"last", "min", "prod", "mean"}) CHECK(path_scores(late, scored, how) == path_scores(now, scored, how));
  }
  SUBCASE("a path at a time: an ancestor set later recomputes its descendants") {
    late.set_scores(N({4, 3}), D(F64{0.9, 0.1}));
    CHECK(path_scores(late, {4}, "min") == F64{0.0});  // 1 still holds its placeholder
    late.set_scores(N({1, 7}), D(F64{0.3, 0.2}));
    CHECK(path_scores(late, {4}, "prod") == path_scores(now, {4}, "prod"));
    CHECK(path_scores(late, {4}, "mean") == F64{(0.3 + 0.1 + 0.9) / 3});
    late.set_scores(N({2, 5, 9}), D(F64{0.7, 0.6, 0.45}));
    CHECK(snapshot(late) == snapshot(now));
  }
  SUBCASE("the unstepped child stays unstepped; it takes the new aggregates when it gets its step") {
    late.set_scores(N({1, 2, 3, 4, 5, 7, 9}), D(real));
    set_steps(late, {6}, {{1}}, {0.5}, {0});
    set_steps(now, {6}, {{1}}, {0.5}, {0});
    CHECK(snapshot(late) == snapshot(now));
    CHECK(path_scores(late, {6}, "prod") == F64{0.7 * 0.6 * 0.5});
  }
  SUBCASE("setting the same scores again changes nothing") {
    const Snapshot before = snapshot(now);
    now.set_scores(N({3, 1}), D(F64{0.1, 0.3}));
    CHECK(snapshot(now) == before);
  }
}

TEST_CASE("forest: set_scores errors") {
  Forest f;
  add_roots(f, {0}, {0}, {{1}});                          // 0
  expand(f, {0}, {3});                                    // 1..3
  set_steps(f, {1, 2}, {{1}, {2}}, {0.5, 0.25}, {0, 0});  // 3 without a step
  const F64 half{0.5}, halves{0.5, 0.5};
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.set_scores(N({0}), D(half))),
                 "node_ids[0] = 0 has no step"));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.set_scores(N({1, 3}), D(halves))),
                 "node_ids[1] = 3 has no step"));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.set_scores(N({1, 1}), D(halves))),
                 "node_ids[1] = 1 appears more than once"));
  CHECK(contains(THROWS_UNCHANGED(f, std::out_of_range, f.set_scores(N({1, 4}), D(halves))), "node_ids[1] = 4"));
  THROWS_UNCHANGED(f, std::out_of_range, f.set_scores(N({-1}), D(half)));
  for (double bad : {kNaN, kInf, -kInf}) {
    CAPTURE(bad);
    CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.set_scores(N({1, 2}), D(F64{0.5, bad}))),
                   "step_scores[1]"));
  }
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.set_scores(N({1, 2}), D(half))),
                 "step_scores must have length 2"));
  THROWS_UNCHANGED(f, std::invalid_argument, f.set_scores(N({1}), B(U8{1})));
  // Ids are checked first: a bad id wins over a bad score.
  THROWS_UNCHANGED(f, std::out_of_range, f.set_scores(N({99}), D(F64{kNaN})));
  // After a release the ids are rejected; an empty call is fine.
  f.set_scores(N(I32{}), D(F64{}));
  f.release_problem(0);
  THROWS_UNCHANGED(f, std::out_of_range, f.set_scores(N({1}), D(half)));
}

// ================================================================================ set_answers

TEST_CASE("forest: set_answers records answers; later entries win") {
  Forest f;
  add_roots(f, {0}, {0}, {{1}});  // 0
  expand(f, {0}, {2});            // 1, 2
  set_answers(f, {1, 2, 1}, {10, -5, 11});
  CHECK(fields(f, {0, 1, 2}).answer == I64{kNoAnswer, 11, -5});
  set_answers(f, {0, 2}, {kI64Max, kNoAnswer + 1});  // roots too; the extremes of the valid range
  CHECK(fields(f, {0, 1, 2}).answer == I64{kI64Max, 11, kNoAnswer + 1});
  const std::vector<uint8_t> a8{200};
  f.set_answers(N({1}), NumView::of(a8));
  CHECK(field1(f, 1).answer == I64{200});
  set_answers(f, {}, {});

  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, set_answers(f, {1}, {kNoAnswer})), "answer_ids[0]"));
  THROWS_UNCHANGED(f, std::invalid_argument, set_answers(f, {1, 2}, {3, kNoAnswer}));
  const std::vector<uint64_t> big{uint64_t{1} << 63};
  THROWS_UNCHANGED(f, std::invalid_argument, f.set_answers(N({1}), NumView::of(big)));
  THROWS_UNCHANGED(f, std::invalid_argument, f.set_answers(N({1}), D(F64{1.0})));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, set_answers(f, {1, 2}, {3})), "answer_ids must have length 2"));
  THROWS_UNCHANGED(f, std::invalid_argument, set_answers(f, {1}, {3, 4}));
  CHECK(contains(THROWS_UNCHANGED(f, std::out_of_range, set_answers(f, {1, 3}, {4, 4})), "node_ids[1] = 3"));
  THROWS_UNCHANGED(f, std::out_of_range, set_answers(f, {-1}, {4}));
  CHECK(fields(f, {0, 1, 2}).answer == I64{kI64Max, 200, kNoAnswer + 1});
}

// ================================================================================ aggregate, tokens

TEST_CASE("forest: aggregate errors; NaN and infinite aggregates") {
  Forest f;
  add_roots(f, {0}, {0}, {{1}});                              // 0
  expand(f, {0}, {3});                                        // 1, 2, 3
  set_steps(f, {1, 2}, {{1}, {2}}, {1e300, 1e-300}, {0, 0});  // 3 without a step
  expand(f, {1}, {1});                                        // 4
  set_steps(f, {4}, {{}}, {1e300}, {0});                      // prod: inf
  expand(f, {4}, {2});                                        // 5, 6
  set_steps(f, {5, 6}, {{}, {}}, {0.0, -1.0}, {0, 0});        // prod: inf * 0 = NaN, inf * -1 = -inf

  const F32 prod = agg(f, {1, 2, 4, 5, 6}, "prod");
  CHECK(prod[0] == f32(1e300));  // beyond float range: +inf
  CHECK(std::isinf(prod[0]));
  CHECK(prod[1] == f32(1e-300));
  CHECK(prod[2] == f32(kInf));
  CHECK(std::isnan(prod[3]));
  CHECK(prod[4] == -std::numeric_limits<float>::infinity());
  CHECK(agg(f, {5, 6}, "min") == F32{0.0f, -1.0f});
  CHECK(agg(f, {5}, "mean") == F32{f32((1e300 + 1e300 + 0.0) / 3)});

  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, agg(f, {1}, "max")), "how must be one of"));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, path_scores(f, {1}, "max")),
                 "how must be one of last, min, prod, mean; got 'max'"));
  THROWS_UNCHANGED(f, std::invalid_argument, agg(f, {1}, ""));
  THROWS_UNCHANGED(f, std::invalid_argument, agg(f, {1}, "Mean"));
  THROWS_UNCHANGED(f, std::invalid_argument, agg(f, {99}, "median"));  // how is checked first
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, agg(f, {1, 0}, "last")), "node_ids[1] = 0 has no scored step"));
  THROWS_UNCHANGED(f, std::invalid_argument, agg(f, {3}, "min"));
  CHECK(contains(THROWS_UNCHANGED(f, std::out_of_range, agg(f, {1, 7}, "last")), "node_ids[1] = 7"));
  THROWS_UNCHANGED(f, std::out_of_range, agg(f, {-1}, "last"));
  // Pruned nodes can still be read.
  f.prune(N({1}));
  CHECK(agg(f, {1}, "last") == F32{f32(1e300)});
}

TEST_CASE("forest: path_tokens and step_tokens") {
  Forest f;
  add_roots(f, {0, 1}, {0, 0}, {{10, 11}, {}});  // 0, 1
  expand(f, {0, 1}, {1, 1});                     // 2, 3
  set_steps(f, {2, 3}, {{20}, {}}, {0.5, 0.5}, {0, 0});
  expand(f, {2, 3}, {1, 1});  // 4, 5
  set_steps(f, {4, 5}, {{40, 41, 42}, {50}}, {0.5, 0.5}, {0, 0});

  const I32 ids{5, 4, 0, 4, 1, 3};
  CHECK(paths(f, ids) == Lists{{50}, {10, 11, 20, 40, 41, 42}, {10, 11}, {10, 11, 20, 40, 41, 42}, {}, {}});
  CHECK(steps_of(f, ids) == Lists{{50}, {40, 41, 42}, {10, 11}, {40, 41, 42}, {}, {}});
  const Ragged empty = f.path_tokens(N({}));
  CHECK(empty.tokens.empty());
  CHECK(empty.offsets == I64{0});
  CHECK(f.step_tokens(N({})).offsets == I64{0});
  // The path is the concatenation of the steps along it.
  I32 cat;
  for (const I32& s : steps_of(f, {0, 2, 4})) cat.insert(cat.end(), s.begin(), s.end());
  CHECK(paths(f, {4}) == Lists{cat});

  CHECK(contains(THROWS_UNCHANGED(f, std::out_of_range, f.path_tokens(N({4, 6}))), "node_ids[1] = 6"));
  THROWS_UNCHANGED(f, std::out_of_range, f.step_tokens(N({-2})));
  THROWS_UNCHANGED(f, std::invalid_argument, f.path_tokens(D(F64{1.0})));
  THROWS_UNCHANGED(f, std::invalid_argument, f.step_tokens(L(I64{kI32Max + 1})));
}

TEST_CASE("forest: nodes, problems and problem_nodes") {
  Forest f;
  add_roots(f, {4}, {3}, {{1}});  // 0
  expand(f, {0}, {1});            // 1
  set_steps(f, {1}, {{2, 3}}, {0.25}, {1});
  set_answers(f, {1}, {42});
  const NodeFields n = fields(f, {1, 0, 1});
  CHECK(n.parent == I32{0, -1, 0});
  CHECK(n.problem == I64{4, 4, 4});
  CHECK(n.subtree == I32{3, 3, 3});
  CHECK(n.depth == I32{1, 0, 1});
  CHECK(n.num_tokens == I32{2, 1, 2});
  CHECK(n.has_step == U8{1, 0, 1});
  CHECK(n.score[0] == 0.25f);
  CHECK(std::isnan(n.score[1]));
  CHECK(n.status == std::vector<int8_t>{kFinished, kActive, kFinished});
  CHECK(n.answer == I64{42, kNoAnswer, 42});
  const NodeFields e = fields(f, {});
  CHECK(e.parent.empty());
  CHECK(e.score.empty());

  THROWS_UNCHANGED(f, std::out_of_range, fields(f, {2}));
  THROWS_UNCHANGED(f, std::invalid_argument, f.nodes(NumView(nullptr, 0, 8, DType::I64, 2)));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.problem_nodes(5)), "problem_id 5 is not in the forest"));
  THROWS_UNCHANGED(f, std::invalid_argument, f.problem_nodes(-1));
  CHECK(f.problem_nodes(4) == I32{0, 1});
}

// ================================================================================ select_beam

TEST_CASE("forest: select_beam keeps the best per problem, ties to the lower id, groups in first-seen order") {
  Forest f;
  CHECK(add_roots(f, {0, 1}, {0, 0}, {{1}, {2}}) == I32{0, 1});
  CHECK(expand(f, {0, 1}, {4, 3}) == I32{2, 3, 4, 5, 6, 7, 8});
  // Problem 0: 2 {1} .5, 3 {2} .75, 4 {1} .75 (same parent and tokens as 2), 5 {3} .5.
  // Problem 1: 6 {1} .25, 7 {1} .125 (same as 6), 8 {} .875.
  set_steps(f, {2, 3, 4, 5, 6, 7, 8}, {{1}, {2}, {1}, {3}, {1}, {1}, {}}, {0.5, 0.75, 0.75, 0.5, 0.25, 0.125, 0.875},
            {0, 0, 0, 0, 0, 0, 1});
  const I32 cands{6, 2, 3, 4, 5, 7, 8};

  CHECK(beam(f, cands, 2, "last", false) == I32{8, 6, 3, 4});
  CHECK(beam(f, cands, 3, "last", false) == I32{8, 6, 7, 3, 4, 2});
  CHECK(beam(f, cands, 10, "last", false) == I32{8, 6, 7, 3, 4, 2, 5});
  CHECK(beam(f, cands, 0, "last", false).empty());
  CHECK(beam(f, cands, 0, "last", true).empty());
  CHECK(beam(f, {}, 3, "last", true).empty());
  CHECK(beam(f, {5, 2}, 1, "last", false) == I32{2});  // tie at .5: the lower id, whatever the input order
  CHECK(beam(f, {4, 3}, 1, "last", false) == I32{3});
  // Problem 0 first when it appears first.
  CHECK(beam(f, {5, 8, 2}, 1, "last", false) == I32{2, 8});

  // Dedupe: 2 duplicates 4 (kept, better), 7 duplicates 6; the rest fill up to keep.
  CHECK(beam(f, cands, 3, "last", true) == I32{8, 6, 3, 4, 5});
  CHECK(beam(f, cands, 10, "last", true) == I32{8, 6, 3, 4, 5});
  CHECK(beam(f, cands, 2, "last", true) == I32{8, 6, 3, 4});
  CHECK(beam(f, {2, 7}, 5, "last", true) == I32{2, 7});  // no duplicate among the candidates given

  // Depth 2 so that the aggregations differ: 9 under 3, tokens {1} (like 2 and 4, but another parent).
  CHECK(expand(f, {3}, {1}) == I32{9});
  set_steps(f, {9}, {{1}}, {1.0}, {0});
  // 9: last 1, min .75, prod .75, mean .875.
  const I32 deep{2, 3, 4, 5, 9};
  CHECK(beam(f, deep, 2, "last", false) == I32{9, 3});
  CHECK(beam(f, deep, 2, "min", false) == I32{3, 4});
  CHECK(beam(f, deep, 2, "prod", false) == I32{3, 4});
  CHECK(beam(f, deep, 2, "mean", false) == I32{9, 3});
  CHECK(beam(f, deep, 3, "min", false) == I32{3, 4, 9});
  CHECK(beam(f, deep, 3, "min", true) == I32{3, 4, 9});
  CHECK(beam(f, deep, 4, "last", true) == I32{9, 3, 4, 5});
  CHECK(beam(f, deep, 5, "last", true) == I32{9, 3, 4, 5});

  // Empty steps are identical to each other; a prefix is not identical.
  CHECK(expand(f, {1}, {2}) == I32{10, 11});
  set_steps(f, {10, 11}, {{}, {1, 0}}, {0.875, 0.25}, {0, 0});
  CHECK(beam(f, {10, 8, 11, 6}, 4, "last", true) == I32{8, 6, 11});
  CHECK(beam(f, {10, 8, 11, 6}, 4, "last", false) == I32{8, 10, 6, 11});
  // Finished candidates are fine.
  CHECK(field1(f, 8).status == std::vector<int8_t>{kFinished});
}

TEST_CASE("forest: select_beam and select_dvts rank NaN lowest, tied with -inf") {
  Forest f;
  add_roots(f, {0}, {0}, {{1}});      // 0
  expand(f, {0}, {2});                // 1 (x), 2 (y)
  set_steps(f, {1, 2}, {{1}, {2}}, {1e300, -1.0}, {0, 0});
  expand(f, {1}, {1});                // 3
  set_steps(f, {3}, {{3}}, {1e300}, {0});  // prod inf
  expand(f, {3}, {2});                // 4, 5
  set_steps(f, {4, 5}, {{4}, {5}}, {0.0, -1.0}, {0, 0});  // prod NaN, -inf
  CHECK(std::isnan(agg(f, {4}, "prod")[0]));
  CHECK(beam(f, {4, 2, 1}, 3, "prod", false) == I32{1, 2, 4});
  CHECK(beam(f, {5, 4, 2}, 3, "prod", false) == I32{2, 4, 5});  // NaN (4) ties -inf (5): lower id first
  CHECK(beam(f, {5, 4}, 1, "prod", true) == I32{4});
  CHECK(dvts(f, {5, 4}, "prod") == I32{4});
  CHECK(dvts(f, {4, 2}, "prod") == I32{2});
  CHECK(dvts(f, {4, 3}, "prod") == I32{3});
  // Weighted vote: a NaN total loses to anything.
  set_answers(f, {4, 2}, {1, 2});
  VoteResult v = vote(f, {4, 2}, "weighted", "prod");
  CHECK(v.answer_ids == I64{2});
  CHECK(v.node_ids == I32{2});
  CHECK(v.weights == F32{-1.0f});
  v = vote(f, {4, 2}, "best", "prod");
  CHECK(v.answer_ids == I64{2});
  v = vote(f, {4}, "best", "prod");
  CHECK(v.answer_ids == I64{1});
  CHECK(v.node_ids == I32{4});
  CHECK(std::isnan(v.weights[0]));
}

TEST_CASE("forest: select_beam errors") {
  Forest f;
  add_roots(f, {0}, {0}, {{1}});  // 0
  expand(f, {0}, {3});            // 1, 2, 3
  set_steps(f, {1, 2}, {{1}, {2}}, {0.5, 0.5}, {0, 0});
  f.prune(N({2}));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, beam(f, {1}, -1, "last", false)),
                 "keep_per_problem[0] = -1"));
  THROWS_UNCHANGED(f, std::invalid_argument, beam(f, {1}, kI32Max + 1, "last", false));
  CHECK(beam(f, {1}, kI32Max, "last", false) == I32{1});
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, beam(f, {1}, 1, "best", false)), "how must be one of"));
  THROWS_UNCHANGED(f, std::invalid_argument, beam(f, {99}, 1, "nope", false));  // how first
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, beam(f, {1, 0}, 1, "last", false)),
                 "candidate_ids[1] = 0 has no scored step"));
  THROWS_UNCHANGED(f, std::invalid_argument, beam(f, {3}, 1, "last", true));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, beam(f, {1, 2}, 1, "last", false)),
                 "candidate_ids[1] = 2 is pruned"));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, beam(f, {1, 1}, 1, "last", false)),
                 "candidate_ids[1] = 1 appears more than once"));
  CHECK(contains(THROWS_UNCHANGED(f, std::out_of_range, beam(f, {1, 4}, 1, "last", false)), "candidate_ids[1] = 4"));
  THROWS_UNCHANGED(f, std::out_of_range, beam(f, {-1}, 1, "last", false));
}

// ================================================================================ select_dvts

TEST_CASE("forest: select_dvts keeps the best per (problem, subtree)") {
  Forest f;
  CHECK(add_roots(f, {0, 0, 1}, {0, 1, 0}, {{1}, {2}, {3}}) == I32{0, 1, 2});
  CHECK(expand(f, {0, 1, 2}, {2, 2, 1}) == I32{3, 4, 5, 6, 7});
  set_steps(f, {3, 4, 5, 6, 7}, {{1}, {2}, {3}, {4}, {5}}, {0.5, 0.75, 0.25, 0.25, 0.125}, {0, 0, 0, 0, 1});
  // Groups in first-seen order: (0, 1), (1, 0), (0, 0).
  CHECK(dvts(f, {5, 7, 3, 6, 4}, "last") == I32{5, 7, 4});
  CHECK(dvts(f, {6, 5}, "last") == I32{5});  // tie: the lower id
  CHECK(dvts(f, {3, 4, 5, 6, 7}, "last") == I32{4, 5, 7});
  CHECK(dvts(f, {}, "min").empty());
  // Depth 2: 8 under 3 with 1.0 -> last 1, min .5, prod .5, mean .75 (ties 4's .75).
  CHECK(expand(f, {3}, {1}) == I32{8});
  set_steps(f, {8}, {{6}}, {1.0}, {0});
  CHECK(dvts(f, {3, 8, 4}, "last") == I32{8});
  CHECK(dvts(f, {3, 8, 4}, "min") == I32{4});
  CHECK(dvts(f, {3, 8, 4}, "prod") == I32{4});
  CHECK(dvts(f, {8, 4, 3}, "mean") == I32{4});

  f.prune(N({7}));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, dvts(f, {3, 7}, "last")), "candidate_ids[1] = 7 is pruned"));
  THROWS_UNCHANGED(f, std::invalid_argument, dvts(f, {0}, "last"));
  THROWS_UNCHANGED(f, std::invalid_argument, dvts(f, {3, 4, 3}, "last"));
  THROWS_UNCHANGED(f, std::invalid_argument, dvts(f, {3}, "weighted"));
  THROWS_UNCHANGED(f, std::out_of_range, dvts(f, {3, 9}, "last"));
}

// ================================================================================ children_counts

TEST_CASE("forest: children_counts proportional / multinomial / systematic") {
  Forest f;
  CHECK(add_roots(f, {0, 1}, {0, 0}, {{1}, {2}}) == I32{0, 1});
  CHECK(expand(f, {0, 1}, {3, 3}) == I32{2, 3, 4, 5, 6, 7});
  set_steps(f, {2, 3, 4, 5, 6, 7}, {{1}, {2}, {3}, {4}, {5}, {6}}, {0.2, 0.3, 0.5, 0.5, 0.5, 0.5}, {0, 0, 0, 0, 0, 0});
  auto counts = [&](const I32& ids, int64_t total, const char* mode, double t, int64_t seed = 0) {
    return f.children_counts(N(ids), total, "last", mode, t, seed);
  };
  // Raw weights (temperature 0): quotas 2, 3, 5 of 10; 0.8, 1.2, 2 of 4 -> the remainder to 0.8.
  CHECK(counts({2, 3, 4}, 10, "proportional", 0.0) == I32{2, 3, 5});
  CHECK(counts({2, 3, 4}, 4, "proportional", 0.0) == I32{1, 1, 2});
  // Equal softmax weights: remainders tie, the lower id wins; each problem gets its own total.
  CHECK(counts({5, 6, 7}, 4, "proportional", 1.0) == I32{2, 1, 1});
  CHECK(counts({7, 2, 6, 3, 5, 4}, 4, "proportional", 0.0) == I32{1, 1, 1, 1, 2, 2});
  CHECK(counts({2, 3, 4}, 0, "multinomial", 1.0) == I32{0, 0, 0});
  CHECK(counts({}, 5, "systematic", 1.0).empty());
  // A very low temperature puts everything on the best; seeds are deterministic.
  CHECK(counts({2, 3, 4}, 4, "systematic", 1e-3, 1) == I32{0, 0, 4});
  for (const char* mode : {"multinomial", "systematic"}) {
    const I32 a = counts({2, 3, 4}, 9, mode, 0.5, 42);
    CHECK(a == counts({2, 3, 4}, 9, mode, 0.5, 42));
    CHECK(a[0] + a[1] + a[2] == 9);
  }
  // Ceil (REBASE's released code): heaviest first, ceil of the share of what is left: 4 of raw
  // weights .5, .3, .2 -> 2 (of 4 * .5), 2 (ceil of 2 * .3 / .5), 0; ties to the lower id.
  CHECK(counts({2, 3, 4}, 4, "ceil", 0.0) == I32{0, 2, 2});
  CHECK(counts({7, 6, 5}, 4, "ceil", 1.0) == I32{1, 1, 2});
  CHECK(counts({5, 6, 7}, 2, "ceil", 1.0) == I32{1, 1, 0});
  CHECK(counts({5, 6, 7}, 0, "ceil", 1.0) == I32{0, 0, 0});
  // Systematic: every count within one of its quota 1000 * softmax(score / 0.1).
  const I32 s = counts({2, 3, 4}, 1000, "systematic", 0.1, 3);
  const double w0 = std::exp(-3.0), w1 = std::exp(-2.0), sum = w0 + w1 + 1.0;
  CHECK(std::abs(s[0] - 1000 * w0 / sum) < 1.0);
  CHECK(std::abs(s[1] - 1000 * w1 / sum) < 1.0);

  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, counts({2}, 3, "stratified", 1.0)), "mode"));
  THROWS_UNCHANGED(f, std::invalid_argument, f.children_counts(N({2}), 3, "best", "multinomial", 1.0, 0));
  THROWS_UNCHANGED(f, std::invalid_argument, counts({2}, -1, "multinomial", 1.0));
  THROWS_UNCHANGED(f, std::invalid_argument, counts({2}, 3, "multinomial", -1.0));
  THROWS_UNCHANGED(f, std::invalid_argument, counts({2}, 3, "multinomial", kNaN));
  THROWS_UNCHANGED(f, std::invalid_argument, counts({2, 2}, 3, "multinomial", 1.0));
  THROWS_UNCHANGED(f, std::invalid_argument, counts({0}, 3, "multinomial", 1.0));  // a root: no step
  THROWS_UNCHANGED(f, std::out_of_range, counts({2, 99}, 3, "multinomial", 1.0));
  f.prune(N({3}));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, counts({2, 3}, 3, "proportional", 1.0)), "pruned"));
}

TEST_CASE("forest: children_counts logit weights and multiplicity") {
  Forest f;
  CHECK(add_roots(f, {0, 1}, {0, 0}, {{1}, {2}}) == I32{0, 1});
  CHECK(expand(f, {0, 1}, {3, 2}) == I32{2, 3, 4, 5, 6});
  set_steps(f, {2, 3, 4, 5, 6}, {{1}, {2}, {3}, {4}, {5}}, {0.2, 0.5, 0.8, 0.0, 1.0}, {0, 0, 1, 0, 0});
  auto counts = [&](const I32& ids, int64_t total, double t, const std::vector<int64_t>* mult = nullptr) {
    if (mult == nullptr) return f.children_counts(N(ids), total, "last", "proportional", t, 0, "logit");
    const NumView m = NumView::of(*mult);
    return f.children_counts(N(ids), total, "last", "proportional", t, 0, "logit", &m);
  };
  // Odds 1/4, 1, 4 (a finished node is a candidate like any other): quotas 1, 4, 16 of 21; at
  // T = 0.5 their squares: 1, 16, 256 of 273.
  CHECK(counts({2, 3, 4}, 21, 1.0) == I32{1, 4, 16});
  CHECK(counts({2, 3, 4}, 273, 0.5) == I32{1, 16, 256});
  // Multiplicity 4 of odds 1/4 weighs as one of odds 1: 2, 2, 8 of 12.
  const std::vector<int64_t> m{4, 1, 1};
  CHECK(counts({2, 3, 4}, 12, 1.0, &m) == I32{2, 2, 8});
  // 0 and 1 are clamped to [1e-7, 1 - 1e-7]: finite odds, the 0 gets nothing of 10.
  CHECK(counts({5, 6}, 10, 1.0) == I32{0, 10});
  // Errors: temperature 0, a score outside [0, 1], a bad weights name, bad multiplicities.
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, counts({2}, 3, 0.0)), "logit"));
  const std::vector<int64_t> zero{0}, two{1, 1};
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, counts({2}, 3, 1.0, &zero)), "multiplicity"));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, counts({2}, 3, 1.0, &two)), "multiplicity"));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument,
                                  f.children_counts(N({2}), 3, "last", "multinomial", 1.0, 0, "odds")),
                 "weights"));
  Forest g;
  CHECK(add_roots(g, {0}, {0}, {{1}}) == I32{0});
  CHECK(expand(g, {0}, {2}) == I32{1, 2});
  set_steps(g, {1, 2}, {{1}, {2}}, {0.5, 1.5}, {0, 0});
  CHECK(contains(THROWS_UNCHANGED(g, std::invalid_argument,
                                  g.children_counts(N({1, 2}), 3, "last", "multinomial", 1.0, 0, "logit")),
                 "[0, 1]"));
}

// ================================================================================ vote

TEST_CASE("forest: vote majority / weighted / best with ties, abstaining nodes and NO_ANSWER rows") {
  Forest f;
  CHECK(add_roots(f, {0, 1, 2, 3}, {0, 0, 0, 0}, {{1}, {2}, {3}, {4}}) == I32{0, 1, 2, 3});
  CHECK(expand(f, {0, 1, 2, 3}, {5, 2, 1, 3}) == range_ids(4, 15));
  // Problem 0: 4..8, problem 1: 9, 10, problem 2: 11 (no step), problem 3: 12, 13, 14.
  set_steps(f, range_ids(4, 11), {{}, {}, {}, {}, {}, {}, {}}, {0.5, 0.25, 0.75, 0.5, 0.125, 0.5, 0.5},
            {1, 1, 1, 1, 1, 1, 1});
  set_steps(f, {12, 13, 14}, {{}, {}, {}}, {-1.0, -0.5, -0.25}, {1, 1, 1});
  // Answers: 4 -> 100, 5 -> 200, 6 -> 200, 7 -> 100, 8 abstains; 9 -> 300, 10 -> 400; 11 abstains;
  // 12 -> 1, 13 -> 2, 14 -> 1.
  set_answers(f, {4, 5, 6, 7, 9, 10, 12, 13, 14}, {100, 200, 200, 100, 300, 400, 1, 2, 1});
  const I32 ids{8, 5, 4, 6, 7, 9, 10, 11, 0, 12, 13, 14};

  VoteResult v = vote(f, ids, "majority");
  CHECK(v.problem_ids == I64{0, 1, 2, 3});
  // p0: 200 x2 and 100 x2 -> 200 (seen first), its first node 5; p1: 300/400 tie -> 300.
  CHECK(v.answer_ids == I64{200, 300, kNoAnswer, 1});
  CHECK(v.node_ids == I32{5, 9, -1, 12});
  CHECK(v.weights == F32{2.0f, 1.0f, 0.0f, 2.0f});

  v = vote(f, ids, "weighted", "last");
  // p0: 200 -> .25 + .75 = 1, 100 -> .5 + .5 = 1: tie -> 200, best node 6; p3: 1 -> -1.25, 2 -> -.5.
  CHECK(v.problem_ids == I64{0, 1, 2, 3});
  CHECK(v.answer_ids == I64{200, 300, kNoAnswer, 2});
  CHECK(v.node_ids == I32{6, 9, -1, 13});
  CHECK(v.weights == F32{1.0f, 0.5f, 0.0f, -0.5f});

  v = vote(f, ids, "best", "last");
  CHECK(v.answer_ids == I64{200, 300, kNoAnswer, 1});
  CHECK(v.node_ids == I32{6, 9, -1, 14});
  CHECK(v.weights == F32{0.75f, 0.5f, 0.0f, -0.25f});

  // Input order decides majority ties and the majority node, not ids.
  v = vote(f, {7, 4, 5, 6}, "majority");
  CHECK(v.answer_ids == I64{100});
  CHECK(v.node_ids == I32{7});
  CHECK(v.weights == F32{2.0f});
  v = vote(f, {10, 9}, "majority");
  CHECK(v.answer_ids == I64{400});
  CHECK(v.node_ids == I32{10});
  v = vote(f, {10, 9}, "weighted");
  CHECK(v.answer_ids == I64{400});
  CHECK(v.node_ids == I32{10});
  // "best" ties go to the lower id whatever the order.
  v = vote(f, {10, 9}, "best");
  CHECK(v.answer_ids == I64{300});
  CHECK(v.node_ids == I32{9});
  // Weighted: the best-scored node of the winning answer, ties to the lower id.
  v = vote(f, {7, 4, 8}, "weighted");
  CHECK(v.answer_ids == I64{100});
  CHECK(v.node_ids == I32{4});
  CHECK(v.weights == F32{1.0f});
  // Only abstaining nodes, and no nodes.
  v = vote(f, {8, 0, 11}, "best");
  CHECK(v.problem_ids == I64{0, 2});
  CHECK(v.answer_ids == I64{kNoAnswer, kNoAnswer});
  CHECK(v.node_ids == I32{-1, -1});
  CHECK(v.weights == F32{0.0f, 0.0f});
  v = vote(f, {}, "weighted");
  CHECK(v.problem_ids.empty());
  CHECK(v.node_ids.empty());

  SUBCASE("majority counts answered nodes without a step; weighted and best reject them") {
    set_answers(f, {11, 0}, {7, 8});
    v = vote(f, {11}, "majority");
    CHECK(v.answer_ids == I64{7});
    CHECK(v.node_ids == I32{11});
    CHECK(v.weights == F32{1.0f});
    v = vote(f, {4, 0, 5}, "majority");
    CHECK(v.answer_ids == I64{100});  // 100, 8, 200: one each, 100 seen first
    CHECK(v.node_ids == I32{4});
    CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, vote(f, {11}, "weighted")),
                   "node_ids[0] = 11 has an answer but no scored step"));
    THROWS_UNCHANGED(f, std::invalid_argument, vote(f, {4, 0}, "best"));
  }
  SUBCASE("pruned nodes vote") {
    f.prune(N({5, 6}));
    v = vote(f, {4, 5, 6}, "weighted");
    CHECK(v.answer_ids == I64{200});
    CHECK(v.node_ids == I32{6});
  }
  SUBCASE("errors") {
    CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, vote(f, {4}, "mode")), "how must be one of"));
    CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, vote(f, {4}, "best", "max")), "agg must be one of"));
    THROWS_UNCHANGED(f, std::invalid_argument, vote(f, {4}, "majority", "median"));  // agg checked for majority too
    CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, vote(f, {4, 5, 4}, "majority")),
                   "node_ids[2] = 4 appears more than once"));
    CHECK(contains(THROWS_UNCHANGED(f, std::out_of_range, vote(f, {4, 20}, "majority")), "node_ids[1] = 20"));
    THROWS_UNCHANGED(f, std::invalid_argument, f.vote(D(F64{4.0}), "majority", "last"));
  }
}

TEST_CASE("forest: vote weighted with deeper aggregations") {
  Forest f;
  add_roots(f, {9}, {0}, {{1}});  // 0
  expand(f, {0}, {2});            // 1, 2
  set_steps(f, {1, 2}, {{}, {}}, {0.5, 1.0}, {0, 0});
  expand(f, {1, 2}, {1, 1});  // 3 (under 1), 4 (under 2)
  set_steps(f, {3, 4}, {{}, {}}, {1.0, 0.25}, {1, 1});
  set_answers(f, {3, 4}, {5, 6});
  // 3: last 1, min .5, prod .5, mean .75; 4: last .25, min .25, prod .25, mean .625.
  CHECK(vote(f, {4, 3}, "best", "last").answer_ids == I64{5});
  CHECK(vote(f, {4, 3}, "best", "min").weights == F32{0.5f});
  CHECK(vote(f, {4, 3}, "weighted", "prod").weights == F32{0.5f});
  CHECK(vote(f, {4, 3}, "weighted", "mean").answer_ids == I64{5});
  CHECK(vote(f, {4, 3}, "weighted", "mean").weights == F32{0.75f});
  set_answers(f, {4}, {5});
  VoteResult v = vote(f, {4, 3}, "weighted", "mean");
  CHECK(v.answer_ids == I64{5});
  CHECK(v.node_ids == I32{3});
  CHECK(v.weights == F32{1.375f});
  CHECK(v.problem_ids == I64{9});
}

// ================================================================================ prune

TEST_CASE("forest: prune") {
  Forest f;
  add_roots(f, {0, 1}, {0, 0}, {{1}, {2}});  // 0, 1
  expand(f, {0}, {3});                       // 2, 3, 4
  set_steps(f, {2, 3}, {{}, {}}, {0.5, 0.25}, {0, 1});
  expand(f, {2}, {1});  // 5 (no step)

  f.prune(N({2, 3, 2}));  // duplicates are fine; finished nodes can be pruned
  f.prune(N({}));
  CHECK(fields(f, {2, 3, 4, 5}).status == std::vector<int8_t>{kPruned, kPruned, kActive, kActive});
  f.prune(N({2}));  // idempotent
  CHECK(field1(f, 2).status == std::vector<int8_t>{kPruned});
  // Pruned: no expand, no set_steps, no selection; aggregates, tokens and votes still work.
  THROWS_UNCHANGED(f, std::invalid_argument, expand(f, {2}, {1}));
  THROWS_UNCHANGED(f, std::invalid_argument, set_steps(f, {2}, {{}}, {1.0}, {0}));
  THROWS_UNCHANGED(f, std::invalid_argument, beam(f, {2}, 1, "last", false));
  THROWS_UNCHANGED(f, std::invalid_argument, dvts(f, {3}, "last"));
  CHECK(agg(f, {2, 3}, "last") == F32{0.5f, 0.25f});
  // The child of a pruned node keeps its own state: it can still be stepped and expanded.
  set_steps(f, {5}, {{7}}, {0.5}, {0});
  CHECK(agg(f, {5}, "prod") == F32{0.25f});
  CHECK(expand(f, {5}, {1}) == I32{6});
  CHECK(paths(f, {5}) == Lists{{1, 7}});
  // Roots can be pruned.
  f.prune(N({1}));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, expand(f, {1}, {1})), "is pruned"));
  // Errors: nothing is pruned when any id is bad.
  CHECK(contains(THROWS_UNCHANGED(f, std::out_of_range, f.prune(N({4, 7}))), "node_ids[1] = 7"));
  THROWS_UNCHANGED(f, std::out_of_range, f.prune(N({-1})));
  THROWS_UNCHANGED(f, std::invalid_argument, f.prune(D(F64{4.0})));
  THROWS_UNCHANGED(f, std::invalid_argument, f.prune(L(I64{kI32Max + 1})));
  CHECK(field1(f, 4).status == std::vector<int8_t>{kActive});
}

// ================================================================================ release_problem

TEST_CASE("forest: release_problem rejects the released ids everywhere; new ids keep increasing") {
  Forest f;
  CHECK(add_roots(f, {5, 6}, {0, 0}, {{1}, {2}}) == I32{0, 1});
  CHECK(expand(f, {0, 1}, {2, 1}) == I32{2, 3, 4});
  set_steps(f, {2, 3, 4}, {{3}, {4}, {5}}, {0.5, 0.25, 0.75}, {0, 0, 0});
  set_answers(f, {2, 4}, {1, 2});
  f.release_problem(5);

  CHECK(f.num_nodes() == 2);
  CHECK(f.problems() == I64{6});
  ForestStats st = f.stats();
  CHECK(st.live_nodes == 2);
  CHECK(st.ids_given == 5);
  CHECK(st.problems == 1);
  CHECK(st.pages_in_use == 1);  // page 0 is not full: it stays

  for (int32_t gone : {0, 2, 3}) {
    CAPTURE(gone);
    const std::string name = "[0] = " + std::to_string(gone) + " is not a live node id";
    CHECK(contains(THROWS_UNCHANGED(f, std::out_of_range, fields(f, {gone})), name));
    THROWS_UNCHANGED(f, std::out_of_range, paths(f, {gone}));
    THROWS_UNCHANGED(f, std::out_of_range, steps_of(f, {gone}));
    CHECK(contains(THROWS_UNCHANGED(f, std::out_of_range, expand(f, {gone}, {1})), "parent_ids" + name));
    THROWS_UNCHANGED(f, std::out_of_range, set_steps(f, {gone}, {{}}, {0.5}, {0}));
    THROWS_UNCHANGED(f, std::out_of_range, set_answers(f, {gone}, {1}));
    THROWS_UNCHANGED(f, std::out_of_range, f.prune(N({gone})));
    THROWS_UNCHANGED(f, std::out_of_range, agg(f, {gone}, "last"));
    THROWS_UNCHANGED(f, std::out_of_range, beam(f, {gone}, 1, "last", false));
    THROWS_UNCHANGED(f, std::out_of_range, dvts(f, {gone}, "last"));
    THROWS_UNCHANGED(f, std::out_of_range, vote(f, {gone}, "majority"));
  }
  CHECK(contains(THROWS_UNCHANGED(f, std::out_of_range, fields(f, {4, 2})), "node_ids[1] = 2"));
  // Unknown, released or negative problems.
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.release_problem(5)), "problem_id 5 is not in the forest"));
  THROWS_UNCHANGED(f, std::invalid_argument, f.release_problem(12345));
  CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, f.release_problem(-1)), "problem_id[0] = -1"));
  THROWS_UNCHANGED(f, std::invalid_argument, f.problem_nodes(5));

  // Problem 6 is untouched.
  CHECK(paths(f, {4}) == Lists{{2, 5}});
  CHECK(agg(f, {4}, "mean") == F32{0.75f});
  CHECK(vote(f, {4}, "best").answer_ids == I64{2});

  // Ids keep increasing; the problem id can be used again.
  CHECK(add_roots(f, {5}, {1}, {{9}}) == I32{5});
  CHECK(f.problem_nodes(5) == I32{5});
  CHECK(expand(f, {5, 4}, {1, 1}) == I32{6, 7});
  set_steps(f, {6}, {{8}}, {0.5}, {0});
  CHECK(paths(f, {6}) == Lists{{9, 8}});
  CHECK(fields(f, {6}).problem == I64{5});
  CHECK(fields(f, {6}).subtree == I32{1});
  THROWS_UNCHANGED(f, std::out_of_range, fields(f, {2}));
  CHECK(f.problems() == I64{5, 6});
  st = f.stats();
  CHECK(st.ids_given == 8);
  CHECK(st.live_nodes == 5);

  f.release_problem(6);
  f.release_problem(5);
  CHECK(f.num_nodes() == 0);
  CHECK(f.problems().empty());
  CHECK(f.stats().ids_given == 8);
  THROWS_UNCHANGED(f, std::out_of_range, fields(f, {7}));
  CHECK(add_roots(f, {6}, {0}, {{}}) == I32{8});
}

// ================================================================================ memory reuse

TEST_CASE("forest: pages of released nodes are reused; their ids stay rejected") {
  constexpr int32_t P = Forest::kPageSize;
  static_assert(P == 4096, "the expectations below assume 4096 nodes per page");
  Forest f;
  // Five problems of 1 root + 3000 children: 15005 ids on pages 0..3 (page 3 partly used).
  std::vector<I32> kids;
  for (int64_t p = 0; p < 5; ++p) {
    const I32 r = add_roots(f, {p}, {0}, {{static_cast<int32_t>(p)}});
    CHECK(r == I32{static_cast<int32_t>(p * 3001)});
    kids.push_back(expand(f, r, {3000}));
    // Steps with tokens for the first 200 children.
    const I32 some(kids.back().begin(), kids.back().begin() + 200);
    Lists toks;
    for (int32_t id : some) toks.push_back({id, static_cast<int32_t>(p)});
    set_steps(f, some, toks, F64(200, 0.5), U8(200, 0));
  }
  ForestStats st = f.stats();
  CHECK(st.ids_given == 15005);
  CHECK(st.live_nodes == 15005);
  CHECK(st.pages_in_use == 4);
  CHECK(st.spare_pages == 0);
  CHECK(st.token_capacity >= 2000);
  const int64_t bytes_full = st.bytes_reserved;

  // Problem 0 (ids 0..3000) shares page 0 with problem 1: nothing is freed yet.
  f.release_problem(0);
  st = f.stats();
  CHECK(st.pages_in_use == 4);
  CHECK(st.spare_pages == 0);
  CHECK(paths(f, {3002}) == Lists{{1, 3002, 1}});
  // Problem 1 (3001..6001) was the last on page 0.
  f.release_problem(1);
  st = f.stats();
  CHECK(st.pages_in_use == 3);
  CHECK(st.spare_pages == 1);
  CHECK(st.live_nodes == 9003);
  CHECK(paths(f, {6003}) == Lists{{2, 6003, 2}});  // page 1 still serves problem 2
  f.release_problem(3);
  f.release_problem(2);
  st = f.stats();
  CHECK(st.pages_in_use == 2);  // pages 1, 2 free; page 2 held ids 8192..12287 of problems 2, 3, 4
  f.release_problem(4);
  st = f.stats();
  CHECK(st.live_nodes == 0);
  CHECK(st.problems == 0);
  CHECK(st.pages_in_use == 1);  // page 3 is only partly given out: it stays
  CHECK(st.spare_pages == 3);
  CHECK(st.ids_given == 15005);
  CHECK(st.bytes_reserved == bytes_full);  // spare pages keep their memory

  for (int32_t gone : {0, 1, 3000, P - 1, P, 2 * P + 7, 3 * P - 1, 3 * P, 15004}) {
    CAPTURE(gone);
    THROWS_UNCHANGED(f, std::out_of_range, fields(f, {gone}));
    THROWS_UNCHANGED(f, std::out_of_range, expand(f, {gone}, {1}));
  }
  THROWS_UNCHANGED(f, std::out_of_range, fields(f, {15005}));

  // Allocate three more pages' worth: the spare pages serve them, no new page memory.
  const I32 r = add_roots(f, {10}, {2}, {{77}});
  CHECK(r == I32{15005});
  const I32 fresh = expand(f, r, {3 * P});
  REQUIRE(fresh.size() == static_cast<size_t>(3 * P));
  CHECK(fresh.front() == 15006);
  CHECK(fresh.back() == 15005 + 3 * P);
  st = f.stats();
  CHECK(st.pages_in_use == 4);
  CHECK(st.spare_pages == 0);
  CHECK(st.live_nodes == 1 + 3 * P);
  CHECK(st.pages_in_use + st.spare_pages == 4);  // no page memory was added
  // The new nodes work, including ones on recycled pages and across page boundaries.
  const I32 probe{fresh[0], fresh[P], fresh[2 * P + 1], fresh.back()};
  set_steps(f, probe, {{1}, {2, 2}, {}, {4}}, {0.5, 0.25, 1.0, -1.0}, {0, 0, 1, 0});
  CHECK(paths(f, probe) == Lists{{77, 1}, {77, 2, 2}, {77}, {77, 4}});
  CHECK(agg(f, probe, "last") == F32{0.5f, 0.25f, 1.0f, -1.0f});
  const NodeFields n = fields(f, probe);
  CHECK(n.problem == I64{10, 10, 10, 10});
  CHECK(n.subtree == I32{2, 2, 2, 2});
  CHECK(n.parent == I32{15005, 15005, 15005, 15005});
  CHECK(n.answer == I64{kNoAnswer, kNoAnswer, kNoAnswer, kNoAnswer});
  CHECK(n.status == std::vector<int8_t>{kActive, kActive, kFinished, kActive});
  // Untouched new nodes carry no stale state from the page's previous life.
  const I32 untouched{fresh[1], fresh[P + 1], fresh[2 * P + 2]};
  const NodeFields u = fields(f, untouched);
  CHECK(u.has_step == U8{0, 0, 0});
  CHECK(u.num_tokens == I32{0, 0, 0});
  CHECK(u.status == std::vector<int8_t>{kActive, kActive, kActive});
  CHECK(paths(f, untouched) == Lists{{77}, {77}, {77}});
  CHECK(expand(f, {probe[0]}, {1}) == I32{static_cast<int32_t>(15006 + 3 * P)});
  CHECK(beam(f, probe, 2, "last", true) == I32{fresh[2 * P + 1], fresh[0]});
  // The old ids are still rejected.
  for (int32_t gone : {0, P, 2 * P, 15004}) THROWS_UNCHANGED(f, std::out_of_range, fields(f, {gone}));
  // With the spares used up, a new page is allocated.
  expand(f, r, {P});
  st = f.stats();
  CHECK(st.pages_in_use == 5);
  CHECK(st.spare_pages == 0);
  CHECK(st.bytes_reserved > bytes_full);
  f.release_problem(10);
  CHECK(f.stats().live_nodes == 0);
  CHECK(f.stats().pages_in_use + f.stats().spare_pages <= 6);
}

TEST_CASE("forest: the spare page pool is bounded") {
  constexpr int32_t P = Forest::kPageSize;
  Forest f;
  const I32 r = add_roots(f, {0}, {0}, {{1}});
  expand(f, r, {70 * P});  // ids 0 .. 70 * P: pages 0..69 full, page 70 holds one id
  ForestStats st = f.stats();
  CHECK(st.pages_in_use == 71);
  f.release_problem(0);
  st = f.stats();
  CHECK(st.pages_in_use == 1);
  CHECK(st.spare_pages == 64);
  CHECK(st.live_nodes == 0);
  THROWS_UNCHANGED(f, std::out_of_range, fields(f, {70 * P}));
  THROWS_UNCHANGED(f, std::out_of_range, fields(f, {5 * P}));
  const I32 r2 = add_roots(f, {1}, {0}, {{2}});
  CHECK(r2 == I32{70 * P + 1});
  const I32 more = expand(f, r2, {P});  // fills page 70, then one spare
  CHECK(more.back() == 71 * P + 1);
  st = f.stats();
  CHECK(st.pages_in_use == 2);
  CHECK(st.spare_pages == 63);
  set_steps(f, {more.back()}, {{3}}, {0.5}, {1});
  CHECK(paths(f, {more.back()}) == Lists{{2, 3}});
}

// ================================================================================ stress

namespace {

// A small model of the reference semantics (python/ponder/twins/forest.py).
struct MNode {
  int32_t parent = -1;
  int64_t problem = 0;
  int32_t subtree = 0, depth = 0;
  I32 tokens;
  bool has_step = false;
  double score = kNaN, min = kInf, prod = 1.0, sum = 0.0;
  int num_scored = 0;
  int8_t status = kActive;
  int64_t answer = kNoAnswer;
  int scored_children = 0;
};

struct Model {
  std::map<int32_t, MNode> nodes;  // live nodes
  std::map<int64_t, I32> problems;
  int64_t next_id = 0;
  I32 released;

  static double value(const MNode& n, const std::string& how) {
    if (how == "last") return n.score;
    if (how == "min") return n.min;
    if (how == "prod") return n.prod;
    return n.sum / n.num_scored;
  }
  static double rank(double v) { return std::isnan(v) ? -kInf : v; }

  I32 add_roots(const I64& problems_in, const I64& subtrees, const Lists& prompts) {
    I32 ids;
    for (size_t i = 0; i < problems_in.size(); ++i) {
      MNode n;
      n.problem = problems_in[i];
      n.subtree = static_cast<int32_t>(subtrees[i]);
      n.tokens = prompts[i];
      const int32_t id = static_cast<int32_t>(next_id++);
      nodes[id] = n;
      problems[n.problem].push_back(id);
      ids.push_back(id);
    }
    return ids;
  }
  I32 expand(const I32& parents, const I64& counts) {
    I32 ids;
    for (size_t i = 0; i < parents.size(); ++i) {
      const MNode p = nodes.at(parents[i]);
      for (int64_t k = 0; k < counts[i]; ++k) {
        MNode n;
        n.parent = parents[i];
        n.problem = p.problem;
        n.subtree = p.subtree;
        n.depth = p.depth + 1;
        const int32_t id = static_cast<int32_t>(next_id++);
        nodes[id] = n;
        problems[n.problem].push_back(id);
        ids.push_back(id);
      }
    }
    return ids;
  }
  void set_steps(const I32& ids, const Lists& tokens, const F64& scores, const U8& done) {
    for (size_t i = 0; i < ids.size(); ++i) {
      MNode& n = nodes.at(ids[i]);
      MNode& p = nodes.at(n.parent);
      if (!n.has_step) ++p.scored_children;
      n.tokens = tokens[i];
      n.has_step = true;
      n.score = scores[i];
      n.min = std::min(p.min, scores[i]);
      n.prod = p.prod * scores[i];
      n.sum = p.sum + scores[i];
      n.num_scored = p.num_scored + 1;
      n.status = done[i] ? kFinished : kActive;
    }
  }
  void release(int64_t problem) {
    for (int32_t id : problems.at(problem)) {
      nodes.erase(id);
      released.push_back(id);
    }
    problems.erase(problem);
  }

  I32 beam(const I32& cands, int64_t keep, const std::string& how, bool dedupe) const {
    std::vector<int64_t> order;
    std::map<int64_t, std::vector<std::pair<double, int32_t>>> groups;
    for (int32_t id : cands) {
      const MNode& n = nodes.at(id);
      if (!groups.count(n.problem)) order.push_back(n.problem);
      groups[n.problem].push_back({-rank(value(n, how)), id});
    }
    I32 kept;
    for (int64_t p : order) {
      auto members = groups[p];
      std::sort(members.begin(), members.end());
      std::set<std::pair<int32_t, I32>> seen;
      int64_t taken = 0;
      for (const auto& m : members) {
        if (taken == keep) break;
        const MNode& n = nodes.at(m.second);
        if (dedupe && !seen.insert({n.parent, n.tokens}).second) continue;
        kept.push_back(m.second);
        ++taken;
      }
    }
    return kept;
  }
  I32 dvts(const I32& cands, const std::string& how) const {
    std::vector<std::pair<int64_t, int32_t>> order;
    std::map<std::pair<int64_t, int32_t>, std::pair<double, int32_t>> best;
    for (int32_t id : cands) {
      const MNode& n = nodes.at(id);
      const auto key = std::make_pair(n.problem, n.subtree);
      const auto cand = std::make_pair(-rank(value(n, how)), id);
      auto it = best.find(key);
      if (it == best.end()) {
        order.push_back(key);
        best[key] = cand;
      } else if (cand < it->second) {
        it->second = cand;
      }
    }
    I32 out;
    for (const auto& k : order) out.push_back(best[k].second);
    return out;
  }
  VoteResult vote(const I32& ids, const std::string& how, const std::string& agg_name) const {
    std::vector<int64_t> order;
    std::map<int64_t, I32> groups;
    for (int32_t id : ids) {
      const MNode& n = nodes.at(id);
      if (!groups.count(n.problem)) order.push_back(n.problem);
      groups[n.problem].push_back(id);
    }
    VoteResult out;
    for (int64_t p : order) {
      int64_t answer = kNoAnswer;
      int32_t winner = -1;
      double weight = 0.0;
      std::pair<double, int32_t> best_key;
      if (how == "best") {
        for (int32_t id : groups[p]) {
          const MNode& n = nodes.at(id);
          if (n.answer == kNoAnswer) continue;
          const double s = value(n, agg_name);
          const auto key = std::make_pair(-rank(s), id);
          if (winner == -1 || key < best_key) answer = n.answer, winner = id, weight = s, best_key = key;
        }
      } else {
        std::vector<std::pair<int64_t, double>> totals;
        for (int32_t id : groups[p]) {
          const MNode& n = nodes.at(id);
          if (n.answer == kNoAnswer) continue;
          const double add = how == "majority" ? 1.0 : value(n, agg_name);
          auto it = std::find_if(totals.begin(), totals.end(), [&](const auto& t) { return t.first == n.answer; });
          if (it == totals.end())
            totals.push_back({n.answer, add});
          else
            it->second += add;
        }
        for (const auto& t : totals)
          if (answer == kNoAnswer || rank(t.second) > rank(weight)) answer = t.first, weight = t.second;
        for (int32_t id : groups[p]) {
          const MNode& n = nodes.at(id);
          if (answer == kNoAnswer || n.answer != answer) continue;
          if (how == "majority") {
            winner = id;
            break;
          }
          const auto key = std::make_pair(-rank(value(n, agg_name)), id);
          if (winner == -1 || key < best_key) winner = id, best_key = key;
        }
      }
      out.problem_ids.push_back(p);
      out.answer_ids.push_back(answer);
      out.node_ids.push_back(winner);
      out.weights.push_back(static_cast<float>(weight));
    }
    return out;
  }
};

struct Rng {
  std::mt19937_64 gen;
  explicit Rng(uint64_t seed) : gen(seed) {}
  uint64_t below(uint64_t n) { return gen() % n; }
  bool chance(int percent) { return below(100) < static_cast<uint64_t>(percent); }
  template <typename T>
  const T& pick(const std::vector<T>& v) {
    return v[below(v.size())];
  }
  template <typename T>
  void shuffle(std::vector<T>& v) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[below(i)]);
  }
  // Up to k distinct elements of v, in random order.
  template <typename T>
  std::vector<T> sample(std::vector<T> v, size_t k) {
    shuffle(v);
    if (v.size() > k) v.resize(k);
    return v;
  }
};

const char* const kAggs[] = {"last", "min", "prod", "mean"};
const char* const kVotes[] = {"majority", "weighted", "best"};

// Compares the forest with the model on `ids`, and checks path invariants through the
// forest's own API (the parent chain from nodes().parent).
void check_nodes(const Forest& f, const Model& m, const I32& ids) {
  if (ids.empty()) return;
  const NodeFields n = f.nodes(N(ids));
  const Lists path = paths(f, ids);
  const Lists step = steps_of(f, ids);
  bool ok = true;
  for (size_t i = 0; i < ids.size() && ok; ++i) {
    const MNode& x = m.nodes.at(ids[i]);
    INFO("node " << ids[i]);
    ok = n.parent[i] == x.parent && n.problem[i] == x.problem && n.subtree[i] == x.subtree &&
         n.depth[i] == x.depth && n.num_tokens[i] == static_cast<int32_t>(x.tokens.size()) &&
         n.has_step[i] == (x.has_step ? 1 : 0) && same_bits(n.score[i], static_cast<float>(x.score)) &&
         n.status[i] == x.status && n.answer[i] == x.answer && step[i] == x.tokens;
    CHECK_MESSAGE(ok, "nodes()/step_tokens differ from the model");

    // The chain root .. node, through nodes().parent.
    I32 chain{ids[i]};
    while (true) {
      const int32_t parent = field1(f, chain.back()).parent[0];
      if (parent == -1) break;
      chain.push_back(parent);
    }
    std::reverse(chain.begin(), chain.end());
    ok = ok && static_cast<int32_t>(chain.size()) == n.depth[i] + 1;
    I32 cat;
    for (const I32& s : steps_of(f, chain)) cat.insert(cat.end(), s.begin(), s.end());
    ok = ok && cat == path[i];
    CHECK_MESSAGE(ok, "path_tokens is not the concatenation of the steps along the parent chain");
    if (!x.has_step) continue;
    // Recompute the aggregates from the scores along the chain (float64, root first).
    const I32 scored(chain.begin() + 1, chain.end());
    double mn = kInf, prod = 1.0, sum = 0.0;
    for (int32_t id : scored) {
      const double s = m.nodes.at(id).score;
      mn = std::min(mn, s);
      prod *= s;
      sum += s;
    }
    const F32 got_last = agg(f, {ids[i]}, "last"), got_min = agg(f, {ids[i]}, "min");
    const F32 got_prod = agg(f, {ids[i]}, "prod"), got_mean = agg(f, {ids[i]}, "mean");
    ok = same_bits(got_last[0], static_cast<float>(x.score)) && same_bits(got_min[0], static_cast<float>(mn)) &&
         same_bits(got_prod[0], static_cast<float>(prod)) &&
         same_bits(got_mean[0], static_cast<float>(sum / static_cast<double>(scored.size())));
    CHECK_MESSAGE(ok, "aggregates differ from the scores along the path");
    // The same through the float32 scores the forest reports (min is exact; mean approximately).
    const F32 chain_scores = agg(f, scored, "last");
    float fmin = std::numeric_limits<float>::infinity();
    double fsum = 0.0;
    for (float s : chain_scores) fmin = std::min(fmin, s), fsum += s;
    CHECK(same_bits(fmin, got_min[0]));
    const double fmean = fsum / static_cast<double>(chain_scores.size());
    if (std::isfinite(fmean) && std::fabs(fmean) < 1e30 && std::isfinite(got_mean[0]))
      CHECK(got_mean[0] == doctest::Approx(fmean).epsilon(1e-5));
  }
}

// Best-first within each problem group (by the float64 aggregate, ties to the lower id; the
// float32 values the forest reports are then non-increasing), each group contiguous.
void check_beam_order(const Forest& f, const Model& m, const I32& kept, const char* how) {
  if (kept.empty()) return;
  const F32 v = agg(f, kept, how);
  const NodeFields n = f.nodes(N(kept));
  std::set<int64_t> done;
  bool ok = true;
  for (size_t i = 0; i < kept.size(); ++i) {
    if (i > 0 && n.problem[i] == n.problem[i - 1]) {
      const double a = Model::rank(Model::value(m.nodes.at(kept[i - 1]), how));
      const double b = Model::rank(Model::value(m.nodes.at(kept[i]), how));
      ok = ok && (a > b || (a == b && kept[i - 1] < kept[i]));
      ok = ok && Model::rank(v[i - 1]) >= Model::rank(v[i]);
    } else {
      ok = ok && done.insert(n.problem[i]).second;  // a problem's group appears once
    }
  }
  CHECK_MESSAGE(ok, "select_beam result is not sorted best-first per problem");
}

}  // namespace

TEST_CASE("forest: seeded random stress against the model") {
  for (uint64_t seed : {1u, 2u, 3u}) {
    CAPTURE(seed);
    Rng rng(seed * 0x9E3779B97F4A7C15ull);
    Forest f;
    Model m;
    const F64 score_pool{0.5, 0.25, 0.75, 1.0, 0.0, -0.5, 0.1, 0.3, 0.9, 2.0, 1e300, -1e300, 1e-300, 1e308};
    int ops = 0, throws = 0, selections = 0, votes = 0, releases = 0, pairs_tried = 0, parent_late = 0;
    int64_t max_pages = 0;
    const int kSteps = 4000;

    for (int step = 0; step < kSteps; ++step) {
      // Candidate lists from the model.
      I32 live, expandable, steppable, scored_unpruned;
      for (const auto& kv : m.nodes) {
        const MNode& n = kv.second;
        live.push_back(kv.first);
        if (n.status == kActive && (n.parent == -1 || n.has_step)) expandable.push_back(kv.first);
        if (n.parent != -1 && n.status != kPruned && n.scored_children == 0) steppable.push_back(kv.first);
        if (n.has_step && n.status != kPruned) scored_unpruned.push_back(kv.first);
      }
      const uint64_t r = rng.below(100);
      ++ops;
      if (live.empty() || r < 8) {  // add_roots
        const size_t k = 1 + rng.below(3);
        I64 probs, subs;
        Lists prompts;
        for (size_t i = 0; i < k; ++i) {
          probs.push_back(static_cast<int64_t>(rng.below(40)));
          subs.push_back(static_cast<int64_t>(rng.below(3)));
          I32 p;
          for (uint64_t t = rng.below(4); t > 0; --t) p.push_back(static_cast<int32_t>(rng.below(1000)));
          prompts.push_back(p);
        }
        CHECK(add_roots(f, probs, subs, prompts) == m.add_roots(probs, subs, prompts));
      } else if (r < 30) {  // expand (the same parent may come twice)
        if (expandable.empty()) continue;
        I32 parents;
        I64 counts;
        for (uint64_t k = 1 + rng.below(3); k > 0; --k) {
          parents.push_back(rng.pick(expandable));
          counts.push_back(rng.chance(5) ? 150 : static_cast<int64_t>(rng.below(4)));
        }
        CHECK(expand(f, parents, counts) == m.expand(parents, counts));
      } else if (r < 55) {  // set_steps, ascending ids so that parents come first
        // Usually ascending ids (parents first); otherwise random order, where a parent listed
        // after its child must be rejected.
        I32 ids = rng.sample(steppable, 1 + rng.below(6));
        if (rng.chance(25)) {  // add a (child, parent) pair that may both be set in one call
          const std::set<int32_t> ok(steppable.begin(), steppable.end());
          std::vector<std::pair<int32_t, int32_t>> pairs;
          for (int32_t c : steppable)
            if (ok.count(m.nodes.at(c).parent)) pairs.push_back({c, m.nodes.at(c).parent});
          if (!pairs.empty()) {
            const auto cp = rng.pick(pairs);
            ids.erase(std::remove_if(ids.begin(), ids.end(),
                                     [&](int32_t x) { return x == cp.first || x == cp.second; }),
                      ids.end());
            ids.push_back(cp.first);
            ids.push_back(cp.second);
            ++pairs_tried;
          }
        }
        if (rng.chance(70)) std::sort(ids.begin(), ids.end());
        bool parent_after_child = false;
        for (size_t i = 0; i < ids.size(); ++i)
          for (size_t j = i + 1; j < ids.size(); ++j)
            parent_after_child |= m.nodes.at(ids[i]).parent == ids[j];
        Lists toks;
        F64 scores;
        U8 done;
        for (size_t i = 0; i < ids.size(); ++i) {
          I32 t;
          for (uint64_t k = rng.below(4); k > 0; --k) t.push_back(static_cast<int32_t>(rng.below(6)));
          toks.push_back(t);
          scores.push_back(rng.pick(score_pool));
          done.push_back(rng.chance(20) ? 1 : 0);
        }
        if (parent_after_child) {
          ++throws;
          ++parent_late;
          CHECK(contains(THROWS_UNCHANGED(f, std::invalid_argument, set_steps(f, ids, toks, scores, done)),
                         "comes later in node_ids"));
        } else {
          set_steps(f, ids, toks, scores, done);
          m.set_steps(ids, toks, scores, done);
        }
      } else if (r < 60) {  // set_answers (repeats: the later one wins)
        I32 ids;
        I64 answers;
        for (uint64_t k = 1 + rng.below(4); k > 0; --k) {
          ids.push_back(rng.pick(live));
          answers.push_back(rng.chance(5) ? kNoAnswer + 1 : static_cast<int64_t>(rng.below(4)));
        }
        set_answers(f, ids, answers);
        for (size_t i = 0; i < ids.size(); ++i) m.nodes.at(ids[i]).answer = answers[i];
      } else if (r < 64) {  // prune
        const I32 ids = rng.sample(live, 1 + rng.below(2));
        f.prune(N(ids));
        for (int32_t id : ids) m.nodes.at(id).status = kPruned;
      } else if (r < 68 || live.size() > 1200) {  // release a problem
        std::vector<int64_t> probs;
        for (const auto& kv : m.problems) probs.push_back(kv.first);
        const int64_t p = rng.pick(probs);
        f.release_problem(p);
        m.release(p);
        ++releases;
      } else if (r < 78) {  // select_beam
        const I32 cands = rng.sample(scored_unpruned, rng.below(30));
        const int64_t keep = static_cast<int64_t>(rng.below(5));
        const char* how = kAggs[rng.below(4)];
        const bool dedupe = rng.chance(50);
        const I32 got = beam(f, cands, keep, how, dedupe);
        CHECK(got == m.beam(cands, keep, how, dedupe));
        check_beam_order(f, m, got, how);
        const std::set<int32_t> cand_set(cands.begin(), cands.end());
        for (int32_t id : got) CHECK(cand_set.count(id) == 1);
        ++selections;
      } else if (r < 83) {  // select_dvts
        const I32 cands = rng.sample(scored_unpruned, rng.below(30));
        const char* how = kAggs[rng.below(4)];
        CHECK(dvts(f, cands, how) == m.dvts(cands, how));
        ++selections;
      } else if (r < 90) {  // vote
        const char* how = kVotes[rng.below(3)];
        const char* agg_name = kAggs[rng.below(4)];
        I32 ids;
        for (int32_t id : rng.sample(live, rng.below(30))) {
          const MNode& n = m.nodes.at(id);
          if (std::string(how) == "majority" || n.has_step || n.answer == kNoAnswer) ids.push_back(id);
        }
        const VoteResult got = vote(f, ids, how, agg_name);
        const VoteResult want = m.vote(ids, how, agg_name);
        CHECK(got.problem_ids == want.problem_ids);
        CHECK(got.answer_ids == want.answer_ids);
        CHECK(got.node_ids == want.node_ids);
        CHECK(same_bits(got.weights, want.weights));
        ++votes;
      } else if (r < 95) {  // read back and check invariants
        check_nodes(f, m, rng.sample(live, 8));
      } else {  // an invalid call: the right error, nothing changed
        ++throws;
        switch (rng.below(6)) {
          case 0: {
            const int32_t bad = m.released.empty() || rng.chance(30) ? static_cast<int32_t>(m.next_id + rng.below(5))
                                                                     : rng.pick(m.released);
            THROWS_UNCHANGED(f, std::out_of_range, expand(f, {rng.pick(live), bad}, {1, 1}));
            break;
          }
          case 1:
            if (steppable.empty()) break;
            THROWS_UNCHANGED(f, std::invalid_argument, set_steps(f, {steppable[0]}, {{1}}, {kNaN}, {0}));
            break;
          case 2: {
            if (steppable.empty()) break;
            int32_t root = -1;
            for (int32_t id : live)
              if (m.nodes.at(id).parent == -1) root = id;
            if (root == -1 || root == steppable[0]) break;
            THROWS_UNCHANGED(f, std::invalid_argument, set_steps(f, {steppable[0], root}, {{1}, {2}}, {0.5, 0.5}, {0, 0}));
            break;
          }
          case 3:
            if (scored_unpruned.empty()) break;
            THROWS_UNCHANGED(f, std::invalid_argument,
                             beam(f, {scored_unpruned[0], scored_unpruned[0]}, 1, "last", false));
            break;
          case 4: {
            if (m.released.empty()) break;
            const int32_t gone = rng.pick(m.released);
            THROWS_UNCHANGED(f, std::out_of_range, set_answers(f, {rng.pick(live), gone}, {1, 1}));
            THROWS_UNCHANGED(f, std::out_of_range, f.prune(N({rng.pick(live), gone})));
            THROWS_UNCHANGED(f, std::out_of_range, fields(f, {gone}));
            break;
          }
          default:
            THROWS_UNCHANGED(f, std::invalid_argument, f.release_problem(1000 + static_cast<int64_t>(rng.below(10))));
            break;
        }
      }

      // Cheap whole-forest invariants after every operation.
      const ForestStats st = f.stats();
      const bool ok = f.num_nodes() == static_cast<int64_t>(m.nodes.size()) && st.live_nodes == f.num_nodes() &&
                      st.ids_given == m.next_id && st.problems == static_cast<int64_t>(m.problems.size()) &&
                      st.spare_pages <= 64 &&
                      st.pages_in_use <= (st.ids_given + Forest::kPageSize - 1) / Forest::kPageSize;
      if (!ok) {
        CHECK_MESSAGE(ok, "stats differ from the model at step " << step);
        break;
      }
      max_pages = std::max(max_pages, st.pages_in_use + st.spare_pages);
    }

    // Final full comparison, and every released id is rejected.
    I32 live;
    for (const auto& kv : m.nodes) live.push_back(kv.first);
    check_nodes(f, m, live);
    I64 probs;
    for (const auto& kv : m.problems) {
      probs.push_back(kv.first);
      CHECK(f.problem_nodes(kv.first) == kv.second);
    }
    CHECK(f.problems() == probs);
    bool all_rejected = true;
    for (int32_t gone : m.released) {
      try {
        f.nodes(N({gone}));
        all_rejected = false;
      } catch (const std::out_of_range&) {
      }
    }
    CHECK(all_rejected);
    // The run was long enough to give out several pages and to recycle some.
    CHECK(m.next_id > 3 * Forest::kPageSize);
    CHECK(max_pages < (m.next_id + Forest::kPageSize - 1) / Forest::kPageSize);
    CHECK(releases > 10);
    CHECK(selections > 100);
    CHECK(votes > 50);
    CHECK(throws > 50);
    CHECK(pairs_tried > 50);
    CHECK(parent_late > 10);
    MESSAGE("seed " << seed << ": " << ops << " ops, " << m.next_id << " ids, " << m.released.size()
                    << " released, " << max_pages << " pages at most, " << parent_late
                    << " set_steps calls rejected for a parent after its child");
  }
}
