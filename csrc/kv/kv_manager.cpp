// The KV-cache manager. See kv_manager.h; the semantics are python/ponder/twins/kv.py.
#include "kv/kv_manager.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <unordered_set>

namespace ponder::kv {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
constexpr int64_t kInt32Min = std::numeric_limits<int32_t>::min();

inline int64_t blocks_for(int64_t tokens, int64_t bs) { return (tokens + bs - 1) / bs; }

}  // namespace

KVCacheManager::KVCacheManager(int64_t num_blocks, int64_t block_size)
    : bs_(0), pool_(num_blocks, block_size), index_(block_size, num_blocks) {
  bs_ = pool_.block_size();
  tokens_.assign(static_cast<size_t>(num_blocks) * static_cast<size_t>(bs_), 0);
}

// ---------------------------------------------------------------------------- lookups

const KVCacheManager::Seq& KVCacheManager::live(int64_t seq_id, const char* name, size_t i, bool scalar) const {
  auto it = seq_id < kInt32Min || seq_id > kInt32Max ? seqs_.end() : seqs_.find(static_cast<int32_t>(seq_id));
  if (it == seqs_.end()) {
    const std::string what = scalar ? std::string(name) + " = " + std::to_string(seq_id) : detail::at(name, i, seq_id);
    throw std::out_of_range(what + " is not a live sequence id");
  }
  return it->second;
}

std::vector<int32_t> KVCacheManager::live_ids(const NumView& seq_ids, const char* name, bool unique) const {
  std::vector<int32_t> ids = to_ints_as<int32_t>(seq_ids, name, kInt32Min, kInt32Max);
  for (size_t i = 0; i < ids.size(); ++i) live(ids[i], name, i, false);
  if (unique && ids.size() > 1) {
    std::unordered_set<int32_t> seen(ids.size() * 2);
    for (size_t i = 0; i < ids.size(); ++i)
      if (!seen.insert(ids[i]).second)
        throw std::invalid_argument(detail::at(name, i, ids[i]) + " appears more than once");
  }
  return ids;
}

int32_t KVCacheManager::allocate_block() {
  if (pool_.num_free() == 0) {
    const int32_t victim = index_.evict_one();
    if (victim < 0) throw std::logic_error("KVCacheManager: no block to evict after the capacity check");
    pool_.dec(victim);  // its only reference was the index's
    ++counters_.evictions;
  }
  return pool_.pop_free();
}

// ---------------------------------------------------------------------------- sequences

std::pair<int32_t, int64_t> KVCacheManager::new_sequence(const NumView& tokens) {
  const std::vector<int32_t> t = to_ints_as<int32_t>(tokens, "tokens", 0, kInt32Max);
  if (next_seq_ > kInt32Max)
    throw std::overflow_error("this manager has given out every int32 sequence id; make a new KVCacheManager");
  const int64_t n = static_cast<int64_t>(t.size());
  const int64_t max_blocks = n == 0 ? 0 : (n - 1) / bs_;
  Seq s;
  s.blocks = index_.find_path(t.data(), max_blocks);
  for (int32_t b : s.blocks)
    if (pool_.refcount(b) >= kInt32Max)
      throw std::overflow_error("a cached block of tokens would be referenced more than 2^31 - 1 times");
  index_.tick();
  index_.touch(s.blocks);
  for (int32_t b : s.blocks) {
    index_.add_lock(b, 1);
    pool_.inc(b);
  }
  s.len = static_cast<int64_t>(s.blocks.size()) * bs_;
  s.indexed = static_cast<int32_t>(s.blocks.size());
  const int32_t id = static_cast<int32_t>(next_seq_++);
  const int64_t cached = s.len;
  seqs_.emplace(id, std::move(s));
  counters_.tokens_requested += n;
  counters_.tokens_from_cache += cached;
  return {id, cached};
}

std::vector<int32_t> KVCacheManager::fork(int64_t seq_id, int64_t k) {
  const Seq& parent = live(seq_id, "seq_id", 0, true);
  if (k < 0 || k > kInt32Max)
    throw std::invalid_argument("k = " + std::to_string(k) + " is out of range [0, " + std::to_string(kInt32Max) + "]");
  if (next_seq_ + k > kInt32Max + 1)
    throw std::overflow_error("fork would exceed the int32 sequence ids; make a new KVCacheManager");
  for (int32_t b : parent.blocks)
    if (pool_.refcount(b) + k > kInt32Max)
      throw std::overflow_error("fork would reference a block more than 2^31 - 1 times");
  const Seq copy = parent;
  std::vector<int32_t> out(static_cast<size_t>(k));
  if (k == 0) return out;
  for (auto& id : out) {
    id = static_cast<int32_t>(next_seq_++);
    seqs_.emplace(id, copy);
  }
  const int32_t by = static_cast<int32_t>(k);
  for (int32_t b : copy.blocks) pool_.inc(b, by);
  for (int32_t j = 0; j < copy.indexed; ++j) index_.add_lock(copy.blocks[static_cast<size_t>(j)], by);
  return out;
}

KVCacheManager::Append KVCacheManager::append(const NumView& seq_ids, const NumView& n_tokens,
                                              const NumView& token_ids) {
  const std::vector<int32_t> ids = live_ids(seq_ids, "seq_ids", true);
  const std::vector<int64_t> ns = to_ints(n_tokens, "n_tokens", 0, kInt32Max);
  if (ns.size() != ids.size())
    throw std::invalid_argument("n_tokens must have length len(seq_ids) = " + std::to_string(ids.size()) + ", got " +
                                std::to_string(ns.size()));
  const std::vector<int32_t> toks = to_ints_as<int32_t>(token_ids, "token_ids", 0, kInt32Max);
  int64_t total = 0;
  for (int64_t n : ns) total += n;
  if (static_cast<int64_t>(toks.size()) != total)
    throw std::invalid_argument("token_ids must have length sum(n_tokens) = " + std::to_string(total) + ", got " +
                                std::to_string(toks.size()));

  // Capacity first: the blocks the whole call needs, simulating the copy-on-writes (a copy
  // by an earlier sequence of the call drops the shared block's count for later ones).
  std::vector<Seq*> seqs(ids.size());
  int64_t need = 0;
  std::unordered_map<int32_t, int32_t> copied;
  for (size_t i = 0; i < ids.size(); ++i) {
    Seq& s = seqs_.find(ids[i])->second;
    seqs[i] = &s;
    if (ns[i] == 0) continue;
    if (s.len % bs_ != 0) {
      const int32_t last = s.blocks.back();
      auto it = copied.find(last);
      const int32_t done = it == copied.end() ? 0 : it->second;
      if (pool_.refcount(last) - done > 1) {
        ++need;
        ++copied[last];
      }
    }
    need += blocks_for(s.len + ns[i], bs_) - blocks_for(s.len, bs_);
  }
  if (need > pool_.num_free() + index_.num_evictable())
    throw KVCacheFull("append needs " + std::to_string(need) + " new blocks but only " +
                      std::to_string(pool_.num_free()) + " are free and " + std::to_string(index_.num_evictable()) +
                      " cached blocks are evictable");

  index_.tick();
  Append out;
  out.slots.reserve(static_cast<size_t>(total));
  const int32_t* next = toks.data();
  for (size_t i = 0; i < ids.size(); ++i) {
    Seq& s = *seqs[i];
    const int64_t n = ns[i];
    if (n == 0) continue;
    if (s.len % bs_ != 0 && pool_.refcount(s.blocks.back()) > 1) {  // copy-on-write
      const int32_t old = s.blocks.back();
      const int32_t fresh = allocate_block();
      std::memcpy(row(fresh), row(old), sizeof(int32_t) * static_cast<size_t>(bs_));
      out.copy_src.push_back(old);
      out.copy_dst.push_back(fresh);
      pool_.dec(old);
      s.blocks.back() = fresh;
      ++counters_.cow_copies;
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t off = s.len % bs_;
      if (off == 0) s.blocks.push_back(allocate_block());
      const int32_t b = s.blocks.back();
      row(b)[off] = *next++;
      out.slots.push_back(static_cast<int64_t>(b) * bs_ + off);
      ++s.len;
      if (off + 1 != bs_) continue;
      // The block is full: it joins the index when its whole chain is indexed and no node
      // with its tokens exists under its parent yet; otherwise it stays private for good.
      const size_t pos = s.blocks.size() - 1;
      if (pos != static_cast<size_t>(s.indexed)) continue;
      const int32_t parent = pos == 0 ? -1 : s.blocks[pos - 1];
      if (index_.has_child(parent, row(b))) continue;
      index_.add_child(parent, row(b), b);
      index_.add_lock(b, 1);
      pool_.inc(b);
      ++s.indexed;
    }
  }
  counters_.tokens_appended += total;
  return out;
}

KVCacheManager::Table KVCacheManager::block_table(const NumView& seq_ids) const {
  const std::vector<int32_t> ids = live_ids(seq_ids, "seq_ids", false);
  Table t;
  t.rows = static_cast<int64_t>(ids.size());
  std::vector<const Seq*> seqs(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    seqs[i] = &seqs_.find(ids[i])->second;
    t.cols = std::max(t.cols, static_cast<int64_t>(seqs[i]->blocks.size()));
  }
  t.blocks.assign(static_cast<size_t>(t.rows * t.cols), -1);
  t.lengths.resize(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    std::copy(seqs[i]->blocks.begin(), seqs[i]->blocks.end(), t.blocks.begin() + static_cast<std::ptrdiff_t>(i * t.cols));
    t.lengths[i] = seqs[i]->len;
  }
  return t;
}

void KVCacheManager::free(const NumView& seq_ids) {
  const std::vector<int32_t> ids = live_ids(seq_ids, "seq_ids", true);
  for (int32_t id : ids) {
    auto it = seqs_.find(id);
    const Seq& s = it->second;
    for (int32_t j = 0; j < s.indexed; ++j) index_.add_lock(s.blocks[static_cast<size_t>(j)], -1);
    for (int32_t b : s.blocks) pool_.dec(b);
    seqs_.erase(it);
  }
}

std::vector<int64_t> KVCacheManager::seq_len(const NumView& seq_ids) const {
  const std::vector<int32_t> ids = live_ids(seq_ids, "seq_ids", false);
  std::vector<int64_t> out(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) out[i] = seqs_.find(ids[i])->second.len;
  return out;
}

std::vector<int32_t> KVCacheManager::evict(int64_t n) {
  if (n < 0) throw std::invalid_argument("n = " + std::to_string(n) + " must be >= 0");
  std::vector<int32_t> out;
  while (static_cast<int64_t>(out.size()) < n) {
    const int32_t b = index_.evict_one();
    if (b < 0) break;
    pool_.dec(b);
    ++counters_.evictions;
    out.push_back(b);
  }
  return out;
}

KVStats KVCacheManager::stats() const {
  KVStats s = counters_;
  s.blocks_total = pool_.num_blocks();
  s.blocks_free = pool_.num_free();
  s.blocks_cached = index_.num_nodes();
  s.blocks_evictable = index_.num_evictable();
  // Allocated blocks are held by a sequence unless they are index nodes no sequence locks.
  s.blocks_in_use = (s.blocks_total - s.blocks_free) - index_.num_unlocked();
  return s;
}

// ---------------------------------------------------------------------------- self-check

void KVCacheManager::check_invariants() const {
  auto fail = [](const std::string& what) { throw std::logic_error("KVCacheManager invariant: " + what); };
  index_.check_invariants();
  const size_t nb = static_cast<size_t>(pool_.num_blocks());
  std::vector<int64_t> held(nb, 0), locks(nb, 0);
  std::vector<int64_t> seen(nb, -1);
  for (const auto& kv : seqs_) {
    const Seq& s = kv.second;
    if (static_cast<int64_t>(s.blocks.size()) != blocks_for(s.len, bs_)) fail("table size != ceil(len / bs)");
    if (s.indexed < 0 || static_cast<size_t>(s.indexed) > s.blocks.size()) fail("indexed out of range");
    for (size_t j = 0; j < s.blocks.size(); ++j) {
      const int32_t b = s.blocks[j];
      if (b < 0 || static_cast<size_t>(b) >= nb) fail("block id out of range");
      if (seen[static_cast<size_t>(b)] == kv.first) fail("a sequence holds a block twice");
      seen[static_cast<size_t>(b)] = kv.first;
      ++held[static_cast<size_t>(b)];
      const bool in_index = index_.lock_of(b) >= 0;
      if (j < static_cast<size_t>(s.indexed)) {
        if (!in_index) fail("an indexed position holds a block outside the index");
        ++locks[static_cast<size_t>(b)];
        if (std::memcmp(index_.tokens_of(b), &tokens_[static_cast<size_t>(b) * bs_], sizeof(int32_t) * bs_) != 0)
          fail("index tokens differ from the block's tokens");
      } else if (in_index) {
        fail("a sequence holds an index node beyond its indexed prefix");
      }
    }
    if (s.indexed > 0) {  // the indexed prefix is a root path of the index
      std::vector<int32_t> toks;
      for (int32_t j = 0; j < s.indexed; ++j) {
        const int32_t* r = &tokens_[static_cast<size_t>(s.blocks[static_cast<size_t>(j)]) * bs_];
        toks.insert(toks.end(), r, r + bs_);
      }
      const std::vector<int32_t> path = index_.find_path(toks.data(), s.indexed);
      if (!std::equal(path.begin(), path.end(), s.blocks.begin()) || path.size() != static_cast<size_t>(s.indexed))
        fail("the indexed prefix is not a root path of the index");
    }
  }
  std::vector<uint8_t> is_free(nb, 0);
  for (int32_t b : pool_.free_list()) {
    if (is_free[static_cast<size_t>(b)]) fail("a block is on the free list twice");
    is_free[static_cast<size_t>(b)] = 1;
  }
  for (size_t b = 0; b < nb; ++b) {
    const int32_t lock = index_.lock_of(static_cast<int32_t>(b));
    const int64_t expected = held[b] + (lock >= 0 ? 1 : 0);
    if (pool_.refcount(static_cast<int32_t>(b)) != expected) fail("refcount != holders + in_index");
    if (lock >= 0 && lock != locks[b]) fail("lock count != sequences holding the node");
    if ((expected == 0) != (is_free[b] != 0)) fail("free list != blocks with refcount 0");
  }
}

}  // namespace ponder::kv
