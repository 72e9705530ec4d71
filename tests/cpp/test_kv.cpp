// Tests of csrc/kv/: BlockPool, PrefixIndex and KVCacheManager with hand-computed expectations
// (the same cases as tests/test_kv_control.py), error kinds with "a throwing call changes
// nothing", and seeded random stress runs of thousands of operations that check every internal
// invariant (check_invariants) and read every live sequence back through a simulated KV pool.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/num_view.h"
#include "kv/block_pool.h"
#include "kv/kv_manager.h"
#include "kv/prefix_index.h"
#include "test_util.h"

using ponder::NumView;
using namespace ponder::kv;

namespace {

using I32 = std::vector<int32_t>;
using I64 = std::vector<int64_t>;

constexpr int64_t kI32Max = std::numeric_limits<int32_t>::max();

template <typename T>
std::string str(const std::vector<T>& v) {
  std::ostringstream os;
  os << "{";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << +v[i];
  os << "}";
  return os.str();
}
// Vectors are compared as one bool (no doctest decomposition) and printed on failure.
#define CHECK_VEC(a, b) CHECK_MESSAGE(((a) == (b)), str(a) << " != " << str(b))

NumView N(const I64& v) { return NumView::of(v); }
NumView N(const I32& v) { return NumView::of(v); }

I64 range64(int64_t n) {
  I64 v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = i;
  return v;
}

// Runs the call, checks it throws exactly `Exc` and that `snap()` is unchanged.
#define THROWS_UNCHANGED(snap, Exc, ...) \
  ponder_test::throws_unchanged<Exc>((snap), [&] { __VA_ARGS__; }, #__VA_ARGS__, __LINE__)

struct PoolSnap {
  int64_t free;
  I32 refs;
  I32 free_list;
  bool operator==(const PoolSnap& o) const { return free == o.free && refs == o.refs && free_list == o.free_list; }
};
PoolSnap snap_pool(const BlockPool& p) {
  return {p.num_free(), p.refcounts(N(range64(p.num_blocks()))), p.free_list()};
}

struct IndexSnap {
  int64_t nodes, evictable, clock;
  I32 present, locks;
  bool operator==(const IndexSnap& o) const {
    return nodes == o.nodes && evictable == o.evictable && clock == o.clock && present == o.present &&
           locks == o.locks;
  }
};
IndexSnap snap_index(const PrefixIndex& x) {
  IndexSnap s{x.num_nodes(), x.num_evictable(), x.clock(), {}, {}};
  for (int32_t b = 0; b < 64; ++b)
    if (x.contains(b)) s.present.push_back(b);
  s.locks = x.lock_counts(N(s.present));
  return s;
}

struct ManagerSnap {
  KVStats stats;
  int64_t seqs;
  I32 table, refs, free_list;
  I64 lengths;
  int64_t clock;
  bool operator==(const ManagerSnap& o) const {
    const KVStats& a = stats;
    const KVStats& b = o.stats;
    return a.tokens_requested == b.tokens_requested && a.tokens_from_cache == b.tokens_from_cache &&
           a.tokens_appended == b.tokens_appended && a.blocks_free == b.blocks_free &&
           a.blocks_in_use == b.blocks_in_use && a.blocks_cached == b.blocks_cached &&
           a.blocks_evictable == b.blocks_evictable && a.cow_copies == b.cow_copies && a.evictions == b.evictions &&
           seqs == o.seqs && table == o.table && refs == o.refs && free_list == o.free_list && lengths == o.lengths &&
           clock == o.clock;
  }
};
ManagerSnap snap_manager(const KVCacheManager& m, const I64& live) {
  const KVCacheManager::Table t = m.block_table(N(live));
  return {m.stats(), m.num_sequences(), t.blocks, m.refcounts(N(range64(m.num_blocks()))),
          m.pool().free_list(), t.lengths, m.index().clock()};
}

std::pair<int32_t, int64_t> new_seq(KVCacheManager& m, const I64& tokens) { return m.new_sequence(N(tokens)); }
KVCacheManager::Append append(KVCacheManager& m, const I64& ids, const I64& counts, const I64& tokens) {
  return m.append(N(ids), N(counts), N(tokens));
}

}  // namespace

// ================================================================================ BlockPool

TEST_CASE("kv pool: blocks are handed out 0, 1, 2, ... and freed ones LIFO") {
  BlockPool p(5, 16);
  CHECK(p.num_blocks() == 5);
  CHECK(p.block_size() == 16);
  CHECK(p.num_free() == 5);
  CHECK_VEC(p.allocate(3), (I32{0, 1, 2}));
  CHECK_VEC(p.refcounts(N(I64{0, 1, 2, 3, 4})), (I32{1, 1, 1, 0, 0}));
  p.decref(N(I64{2, 0}));
  CHECK_VEC(p.allocate(2), (I32{0, 2}));
  CHECK(p.allocate(0).empty());
  CHECK_VEC(p.allocate(2), (I32{3, 4}));
  CHECK(p.num_free() == 0);
  p.incref(N(I64{1, 1}));
  p.decref(N(I64{1, 0, 1, 1}));
  CHECK_VEC(p.refcounts(N(I64{0, 1})), (I32{0, 0}));
  CHECK_VEC(p.allocate(2), (I32{1, 0}));
}

TEST_CASE("kv pool: errors change nothing") {
  CHECK_THROWS_AS(BlockPool(0, 4), std::invalid_argument);
  CHECK_THROWS_AS(BlockPool(kI32Max + 1, 4), std::invalid_argument);
  CHECK_THROWS_AS(BlockPool(4, 0), std::invalid_argument);
  BlockPool p(4, 2);
  p.allocate(2);
  p.incref(N(I64{1}));
  auto snap = [&] { return snap_pool(p); };
  THROWS_UNCHANGED(snap, KVCacheFull, p.allocate(3));
  THROWS_UNCHANGED(snap, std::invalid_argument, p.allocate(-1));
  THROWS_UNCHANGED(snap, std::out_of_range, p.incref(N(I64{0, 4})));
  THROWS_UNCHANGED(snap, std::out_of_range, p.incref(N(I64{-1})));
  THROWS_UNCHANGED(snap, std::invalid_argument, p.incref(N(I64{int64_t{1} << 31})));
  THROWS_UNCHANGED(snap, std::invalid_argument, p.incref(N(I64{0, 2})));
  THROWS_UNCHANGED(snap, std::invalid_argument, p.decref(N(I64{0, 3})));
  THROWS_UNCHANGED(snap, std::invalid_argument, p.decref(N(I64{1, 0, 0})));
  THROWS_UNCHANGED(snap, std::invalid_argument, p.decref(N(I64{1, 1, 1})));
  THROWS_UNCHANGED(snap, std::out_of_range, p.refcounts(N(I64{7})));
  const std::vector<double> floats{0.0};
  THROWS_UNCHANGED(snap, std::invalid_argument, p.incref(NumView::of(floats)));
}

// ================================================================================ PrefixIndex

TEST_CASE("kv index: insert and match full blocks; existing nodes are kept") {
  PrefixIndex x(2);
  CHECK(x.insert(N(I64{1, 2, 3, 4, 5}), N(I64{10, 11})) == 2);
  auto m = x.match(N(I64{1, 2, 3, 4, 9}));
  CHECK(m.tokens == 4);
  CHECK_VEC(m.blocks, (I32{10, 11}));
  CHECK_VEC(x.match(N(I64{1, 2, 9, 9})).blocks, (I32{10}));
  CHECK(x.match(N(I64{1})).tokens == 0);
  CHECK(x.match(N(I64{})).blocks.empty());
  CHECK(x.insert(N(I64{1, 2, 3, 4, 7, 8}), N(I64{20, 21, 22})) == 1);
  CHECK(!x.contains(20));
  CHECK(!x.contains(21));
  CHECK(x.contains(22));
  CHECK_VEC(x.match(N(I64{1, 2, 3, 4, 7, 8})).blocks, (I32{10, 11, 22}));
  CHECK(x.insert(N(I64{1, 2, 5, 6}), N(I64{11, 30})) == 1);
  CHECK_VEC(x.match(N(I64{1, 2, 5, 6})).blocks, (I32{10, 30}));
  CHECK(x.num_nodes() == 4);
  x.check_invariants();
}

TEST_CASE("kv index: insert / lock errors change nothing") {
  PrefixIndex x(2);
  x.insert(N(I64{1, 2, 3, 4}), N(I64{10, 11}));
  x.lock(N(I64{11}));
  auto snap = [&] { return snap_index(x); };
  THROWS_UNCHANGED(snap, std::invalid_argument, x.insert(N(I64{1, 2, 3, 4}), N(I64{10})));
  THROWS_UNCHANGED(snap, std::invalid_argument, x.insert(N(I64{5, 6}), N(I64{11})));
  THROWS_UNCHANGED(snap, std::invalid_argument, x.insert(N(I64{1, 2, 5, 6, 7, 8}), N(I64{10, 12, 12})));
  THROWS_UNCHANGED(snap, std::invalid_argument, x.insert(N(I64{1, -2}), N(I64{12})));
  THROWS_UNCHANGED(snap, std::invalid_argument, x.insert(N(I64{5, 6}), N(I64{-1})));
  THROWS_UNCHANGED(snap, std::invalid_argument, x.match(N(I64{1, int64_t{1} << 31})));
  THROWS_UNCHANGED(snap, std::invalid_argument, x.lock(N(I64{10, 12})));
  THROWS_UNCHANGED(snap, std::invalid_argument, x.unlock(N(I64{10})));
  THROWS_UNCHANGED(snap, std::invalid_argument, x.unlock(N(I64{11, 11})));
  THROWS_UNCHANGED(snap, std::invalid_argument, x.lock_counts(N(I64{99})));
  THROWS_UNCHANGED(snap, std::invalid_argument, x.evict(-1));
  CHECK_THROWS_AS(PrefixIndex(0), std::invalid_argument);
}

TEST_CASE("kv index: LRU eviction of unlocked leaves, exposing parents; locks protect subtrees") {
  PrefixIndex x(1);
  x.insert(N(I64{1, 2}), N(I64{0, 1}));
  x.insert(N(I64{1, 3}), N(I64{5, 2}));
  x.insert(N(I64{4}), N(I64{3}));
  CHECK(x.num_evictable() == 4);
  CHECK_VEC(x.evict(1), (I32{1}));
  CHECK_VEC(x.evict(2), (I32{2, 0}));
  CHECK(x.evict(0).empty());
  CHECK_VEC(x.evict(5), (I32{3}));
  CHECK(x.num_nodes() == 0);
  x.check_invariants();

  PrefixIndex y(1);
  y.insert(N(I64{1, 2, 3}), N(I64{0, 1, 2}));
  y.insert(N(I64{1, 5}), N(I64{0, 3}));
  y.lock(N(I64{1, 1}));
  CHECK_VEC(y.lock_counts(N(I64{0, 1, 2, 3})), (I32{0, 2, 0, 0}));
  CHECK(y.num_evictable() == 2);
  CHECK_VEC(y.evict(10), (I32{2, 3}));
  CHECK(y.num_evictable() == 0);
  y.unlock(N(I64{1}));
  CHECK(y.num_evictable() == 0);
  y.unlock(N(I64{1}));
  CHECK(y.num_evictable() == 2);
  y.check_invariants();
  CHECK_VEC(y.evict(10), (I32{1, 0}));
  y.check_invariants();

  PrefixIndex z(1);
  z.insert(N(I64{1}), N(I64{0}));
  z.insert(N(I64{2}), N(I64{1}));
  z.insert(N(I64{3}), N(I64{2}));
  z.match(N(I64{1, 9}));
  CHECK_VEC(z.evict(3), (I32{1, 2, 0}));
}

// ================================================================================ KVCacheManager

TEST_CASE("kv manager: append, fork and copy-on-write") {
  KVCacheManager m(8, 4);
  auto [s, cached] = new_seq(m, range64(10));
  CHECK(s == 0);
  CHECK(cached == 0);
  auto r = append(m, {s}, {10}, range64(10));
  CHECK_VEC(r.slots, range64(10));
  CHECK(r.copy_src.empty());
  CHECK_VEC(m.refcounts(N(range64(8))), (I32{2, 2, 1, 0, 0, 0, 0, 0}));
  CHECK_VEC(m.fork(s, 2), (I32{1, 2}));
  CHECK_VEC(m.refcounts(N(I64{0, 1, 2})), (I32{4, 4, 3}));
  r = append(m, {1, 2}, {1, 1}, {7, 8});
  CHECK_VEC(r.slots, (I64{14, 18}));
  CHECK_VEC(r.copy_src, (I32{2, 2}));
  CHECK_VEC(r.copy_dst, (I32{3, 4}));
  const auto t = m.block_table(N(I64{0, 1, 2}));
  CHECK(t.rows == 3);
  CHECK(t.cols == 3);
  CHECK_VEC(t.blocks, (I32{0, 1, 2, 0, 1, 3, 0, 1, 4}));
  CHECK_VEC(t.lengths, (I64{10, 11, 11}));
  r = append(m, {0}, {3}, {10, 11, 12});
  CHECK_VEC(r.slots, (I64{10, 11, 20}));
  const KVStats st = m.stats();
  CHECK(st.tokens_appended == 15);
  CHECK(st.blocks_free == 2);
  CHECK(st.blocks_in_use == 6);
  CHECK(st.blocks_cached == 3);
  CHECK(st.blocks_evictable == 0);
  CHECK(st.cow_copies == 2);
  m.check_invariants();
}

TEST_CASE("kv manager: cached prefixes, never the last token; duplicates stay private") {
  KVCacheManager m(8, 4);
  auto a = new_seq(m, range64(10)).first;
  append(m, {a}, {10}, range64(10));
  I64 longer = range64(10);
  longer.push_back(5);
  auto b = new_seq(m, longer);
  CHECK(b.first == 1);
  CHECK(b.second == 8);
  auto c = new_seq(m, range64(8));
  CHECK(c.second == 4);
  append(m, {c.first}, {4}, {4, 5, 6, 7});
  CHECK_VEC(m.block_table(N(I64{c.first})).blocks, (I32{0, 3}));
  CHECK(m.stats().blocks_cached == 2);
  append(m, {c.first}, {4}, {40, 41, 42, 43});
  CHECK(m.stats().blocks_cached == 2);
  CHECK(new_seq(m, {}).second == 0);
  CHECK(new_seq(m, {0}).second == 0);
  m.check_invariants();
  m.free(N(I64{0, 1, 2, 3, 4}));
  CHECK(m.num_sequences() == 0);
  CHECK(m.stats().blocks_in_use == 0);
  CHECK(m.evict(100).size() == 2);
  CHECK(m.stats().blocks_free == 8);
  m.check_invariants();
}

TEST_CASE("kv manager: eviction when the free list runs dry, ties to the lower block id") {
  KVCacheManager m(4, 2);
  const int32_t s0 = new_seq(m, {}).first;
  const int32_t s1 = new_seq(m, {}).first;
  append(m, {s0, s1}, {2, 2}, {1, 1, 2, 2});
  m.free(N(I64{s0, s1}));
  const int32_t s2 = new_seq(m, {}).first;
  CHECK(m.stats().blocks_evictable == 2);
  CHECK_VEC(append(m, {s2}, {6}, {5, 5, 6, 6, 7, 7}).slots, (I64{4, 5, 6, 7, 0, 1}));
  CHECK(m.stats().evictions == 1);
  CHECK(new_seq(m, {1, 1, 0}).second == 0);
  CHECK(new_seq(m, {2, 2, 0}).second == 2);
  m.check_invariants();
}

TEST_CASE("kv manager: every error changes nothing") {
  CHECK_THROWS_AS(KVCacheManager(0, 2), std::invalid_argument);
  CHECK_THROWS_AS(KVCacheManager(2, 0), std::invalid_argument);
  KVCacheManager m(6, 2);
  const int32_t a = new_seq(m, {}).first;
  append(m, {a}, {3}, {1, 2, 3});
  const int32_t b = m.fork(a, 1)[0];
  const int32_t c = new_seq(m, {}).first;
  m.free(N(I64{c}));
  const I64 live{a, b};
  auto snap = [&] { return snap_manager(m, live); };
  THROWS_UNCHANGED(snap, std::invalid_argument, new_seq(m, {1, -1}));
  THROWS_UNCHANGED(snap, std::out_of_range, m.fork(c, 1));
  THROWS_UNCHANGED(snap, std::out_of_range, m.fork(-1, 1));
  THROWS_UNCHANGED(snap, std::out_of_range, m.fork(int64_t{1} << 40, 1));
  THROWS_UNCHANGED(snap, std::invalid_argument, m.fork(a, -1));
  THROWS_UNCHANGED(snap, std::overflow_error, m.fork(a, kI32Max));
  THROWS_UNCHANGED(snap, std::invalid_argument, append(m, {a, a}, {1, 1}, {5, 5}));
  THROWS_UNCHANGED(snap, std::out_of_range, append(m, {a, c}, {1, 1}, {5, 5}));
  THROWS_UNCHANGED(snap, std::invalid_argument, append(m, {a, b}, {1}, {5}));
  THROWS_UNCHANGED(snap, std::invalid_argument, append(m, {a, b}, {2, -1}, {5}));
  THROWS_UNCHANGED(snap, std::invalid_argument, append(m, {a, b}, {1, 1}, {5}));
  THROWS_UNCHANGED(snap, std::invalid_argument, append(m, {a, b}, {1, 1}, {5, -5}));
  THROWS_UNCHANGED(snap, KVCacheFull, append(m, {a, b}, {4, 4}, I64(8, 5)));
  THROWS_UNCHANGED(snap, std::invalid_argument, m.free(N(I64{a, b, a})));
  THROWS_UNCHANGED(snap, std::out_of_range, m.free(N(I64{a, c})));
  THROWS_UNCHANGED(snap, std::out_of_range, m.block_table(N(I64{b, c})));
  THROWS_UNCHANGED(snap, std::out_of_range, m.seq_len(N(I64{c})));
  THROWS_UNCHANGED(snap, std::invalid_argument, m.evict(-1));
  THROWS_UNCHANGED(snap, std::out_of_range, m.refcounts(N(I64{6})));
  m.check_invariants();
}

// ================================================================================ stress

namespace {

// A random search-like workload on one manager: prompts sharing prefixes, forks, appends of
// random lengths, frees, evictions. A simulated pool (one token id per slot) must read back
// every live sequence's tokens, and check_invariants() must hold throughout.
void stress_manager(uint64_t seed, int ops) {
  std::mt19937_64 rng(seed);
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  const int64_t bs = uniform(1, 5);
  const int64_t nb = uniform(8, 64);
  INFO("seed " << seed << " bs " << bs << " nb " << nb);
  KVCacheManager m(nb, bs);
  std::vector<int64_t> memory(static_cast<size_t>(nb * bs), -1);
  std::map<int32_t, I64> tokens;
  std::vector<I64> bases(4);
  for (auto& base : bases)
    for (int64_t i = 0, n = uniform(0, 5 * bs); i < n; ++i) base.push_back(uniform(0, 2));
  int64_t full = 0, next_id = 0;
  auto live_ids = [&] {
    I64 v;
    for (const auto& kv : tokens) v.push_back(kv.first);
    return v;
  };
  auto pick = [&](size_t max_n) {
    I64 live = live_ids();
    std::shuffle(live.begin(), live.end(), rng);
    live.resize(std::min(live.size(), static_cast<size_t>(uniform(1, static_cast<int64_t>(max_n)))));
    return live;
  };
  auto random_tokens = [&](int64_t lo, int64_t hi) {
    I64 v;
    for (int64_t i = 0, n = uniform(lo, hi); i < n; ++i) v.push_back(uniform(0, 2));
    return v;
  };
  for (int op = 0; op < ops; ++op) {
    const int64_t what = uniform(0, 99);
    I64 ids;
    std::vector<I64> chunks;
    if (what < 15 || tokens.empty()) {  // new sequence
      I64 prompt = bases[static_cast<size_t>(uniform(0, 3))];
      prompt.resize(static_cast<size_t>(uniform(0, static_cast<int64_t>(prompt.size()))));
      for (int64_t t : random_tokens(1, 3)) prompt.push_back(t);
      const auto r = new_seq(m, prompt);
      REQUIRE(r.first == next_id);
      ++next_id;
      REQUIRE(r.second % bs == 0);
      REQUIRE(r.second <= static_cast<int64_t>(prompt.size()) - 1);
      tokens[r.first] = I64(prompt.begin(), prompt.begin() + r.second);
      ids = {r.first};
      chunks = {I64(prompt.begin() + r.second, prompt.end())};
    } else if (what < 35) {  // fork, then write to the family
      const int32_t parent = static_cast<int32_t>(pick(1)[0]);
      const I32 kids = m.fork(parent, uniform(0, 3));
      ids = {parent};
      for (int32_t k : kids) {
        REQUIRE(k == next_id);
        ++next_id;
        tokens[k] = tokens[parent];
        ids.push_back(k);
      }
      for (size_t i = 0; i < ids.size(); ++i) chunks.push_back(random_tokens(0, 2 * bs));
    } else if (what < 75) {  // append
      ids = pick(4);
      for (size_t i = 0; i < ids.size(); ++i) chunks.push_back(random_tokens(0, 2 * bs + 1));
    } else if (what < 92) {  // free
      const I64 drop = pick(3);
      m.free(N(drop));
      for (int64_t i : drop) tokens.erase(static_cast<int32_t>(i));
    } else {  // evict
      const int64_t before = m.stats().blocks_evictable;
      const int64_t n = uniform(0, 3);
      REQUIRE(static_cast<int64_t>(m.evict(n).size()) == std::min(n, before));
    }
    if (!ids.empty()) {
      I64 counts, flat;
      for (const auto& c : chunks) {
        counts.push_back(static_cast<int64_t>(c.size()));
        flat.insert(flat.end(), c.begin(), c.end());
      }
      try {
        const auto r = append(m, ids, counts, flat);
        REQUIRE(r.slots.size() == flat.size());
        REQUIRE(r.copy_src.size() == r.copy_dst.size());
        for (size_t i = 0; i < r.copy_src.size(); ++i)
          std::copy_n(memory.begin() + r.copy_src[i] * bs, bs, memory.begin() + r.copy_dst[i] * bs);
        for (size_t i = 0; i < flat.size(); ++i) memory[static_cast<size_t>(r.slots[i])] = flat[i];
        for (size_t i = 0; i < ids.size(); ++i) {
          I64& t = tokens[static_cast<int32_t>(ids[i])];
          t.insert(t.end(), chunks[i].begin(), chunks[i].end());
        }
        // every written slot lies in a block held by exactly one live sequence
        const auto table = m.block_table(N(live_ids()));
        std::map<int32_t, int> holders;
        for (int32_t b : table.blocks)
          if (b >= 0) ++holders[b];
        for (int64_t slot : r.slots) REQUIRE(holders[static_cast<int32_t>(slot / bs)] == 1);
      } catch (const KVCacheFull&) {
        ++full;
        I64 drop = live_ids();
        drop.resize((drop.size() + 1) / 2);
        m.free(N(drop));
        for (int64_t i : drop) tokens.erase(static_cast<int32_t>(i));
      }
    }
    // read every live sequence back through its block table
    const I64 live = live_ids();
    const auto table = m.block_table(N(live));
    for (size_t row = 0; row < live.size(); ++row) {
      const I64& want = tokens[static_cast<int32_t>(live[row])];
      REQUIRE(table.lengths[row] == static_cast<int64_t>(want.size()));
      for (size_t t = 0; t < want.size(); ++t) {
        const int32_t b = table.blocks[row * static_cast<size_t>(table.cols) + t / static_cast<size_t>(bs)];
        REQUIRE(memory[static_cast<size_t>(b * bs) + t % static_cast<size_t>(bs)] == want[t]);
      }
    }
    if (op % 16 == 0) m.check_invariants();
  }
  m.check_invariants();
  const KVStats st = m.stats();
  CHECK(st.evictions > 0);
  CHECK(full > 0);
  CHECK(st.tokens_from_cache > 0);
  if (bs > 1) CHECK(st.cow_copies > 0);
  // no leaks
  m.free(N(live_ids()));
  m.evict(std::numeric_limits<int64_t>::max());
  m.check_invariants();
  CHECK(m.stats().blocks_free == nb);
  CHECK(m.stats().blocks_cached == 0);
}

void stress_index(uint64_t seed, int ops) {
  std::mt19937_64 rng(seed);
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  const int64_t bs = uniform(1, 3);
  INFO("seed " << seed << " bs " << bs);
  PrefixIndex x(bs);
  std::set<int32_t> evicted;
  int64_t next_block = 0;
  std::vector<I64> bases(3);
  for (auto& base : bases)
    for (int64_t i = 0, n = uniform(0, 6 * bs); i < n; ++i) base.push_back(uniform(0, 2));
  std::map<int32_t, int32_t> locks;  // the model: lock count of present nodes
  auto random_prompt = [&] {
    I64 p = bases[static_cast<size_t>(uniform(0, 2))];
    p.resize(static_cast<size_t>(uniform(0, static_cast<int64_t>(p.size()))));
    for (int64_t i = 0, n = uniform(0, 2 * bs); i < n; ++i) p.push_back(uniform(0, 2));
    return p;
  };
  for (int op = 0; op < ops; ++op) {
    const int64_t what = uniform(0, 99);
    if (what < 35) {
      const I64 toks = random_prompt();
      I64 ids;
      for (size_t i = 0; i < toks.size() / static_cast<size_t>(bs); ++i) ids.push_back(next_block++);
      const int64_t before = x.num_nodes();
      const int64_t added = x.insert(N(toks), N(ids));
      REQUIRE(x.num_nodes() == before + added);
      for (int64_t b : ids)
        if (x.contains(b)) locks[static_cast<int32_t>(b)] = 0;
    } else if (what < 60) {
      const auto m = x.match(N(random_prompt()));
      for (int32_t b : m.blocks) REQUIRE(!evicted.count(b));
    } else if (what < 85 && !locks.empty()) {
      auto it = locks.begin();
      std::advance(it, uniform(0, static_cast<int64_t>(locks.size()) - 1));
      if (it->second > 0 && uniform(0, 1)) {
        x.unlock(N(I64{it->first}));
        --it->second;
      } else {
        x.lock(N(I64{it->first}));
        ++it->second;
      }
    } else {
      const int64_t before = x.num_evictable();
      const int64_t n = what < 98 ? uniform(0, 4) : std::numeric_limits<int64_t>::max();
      const I32 out = x.evict(n);
      REQUIRE(static_cast<int64_t>(out.size()) == std::min(n, before));
      for (int32_t b : out) {
        REQUIRE(locks.at(b) == 0);
        locks.erase(b);
        evicted.insert(b);
      }
    }
    REQUIRE(x.num_nodes() == static_cast<int64_t>(locks.size()));
    if (op % 8 == 0) {
      x.check_invariants();
      for (const auto& kv : locks) REQUIRE(x.lock_counts(N(I64{kv.first}))[0] == kv.second);
    }
  }
  x.check_invariants();
  for (auto& kv : locks)
    while (kv.second-- > 0) x.unlock(N(I64{kv.first}));
  const int64_t n = x.num_nodes();
  CHECK(x.num_evictable() == n);
  CHECK(static_cast<int64_t>(x.evict(n + 5).size()) == n);
  CHECK(x.num_nodes() == 0);
  x.check_invariants();
}

}  // namespace

TEST_CASE("kv stress: random manager workloads keep every invariant and read back every token") {
  for (uint64_t seed = 1; seed <= 6; ++seed) stress_manager(seed, 2500);
}

TEST_CASE("kv stress: random prefix-index workloads") {
  for (uint64_t seed = 1; seed <= 6; ++seed) stress_index(seed, 3000);
}
