// The prefix index. See prefix_index.h; the semantics are python/ponder/reference/kv.py.
#include "kv/prefix_index.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "kv/block_pool.h"

namespace ponder::kv {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
constexpr int64_t kInt32Min = std::numeric_limits<int32_t>::min();

inline uint64_t mix64(uint64_t x) {  // splitmix64 finalizer
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

}  // namespace

PrefixIndex::PrefixIndex(int64_t block_size, int64_t dense_block_ids) {
  if (block_size < 1 || block_size > kInt32Max)
    throw std::invalid_argument("block_size = " + std::to_string(block_size) + " is out of range [1, " +
                                std::to_string(kInt32Max) + "]");
  bs_ = static_cast<int32_t>(block_size);
  dense_ = dense_block_ids > 0;
  if (dense_) dense_slot_.assign(static_cast<size_t>(dense_block_ids), -1);
}

// ---------------------------------------------------------------------------- internals

uint64_t PrefixIndex::hash(int32_t parent_slot, const int32_t* tokens) const {
  uint64_t h = mix64(static_cast<uint64_t>(static_cast<int64_t>(parent_slot) + 2));
  for (int32_t i = 0; i < bs_; ++i)
    h = (h ^ static_cast<uint32_t>(tokens[i])) * 0x100000001b3ULL + 0x9e3779b97f4a7c15ULL;
  return mix64(h);
}

int32_t PrefixIndex::find_child(int32_t parent_slot, const int32_t* tokens) const {
  const uint64_t h = hash(parent_slot, tokens);
  auto range = children_.equal_range(h);
  for (auto it = range.first; it != range.second; ++it) {
    const Node& n = nodes_[static_cast<size_t>(it->second)];
    if (n.parent == parent_slot &&
        std::memcmp(&tokens_[static_cast<size_t>(it->second) * bs_], tokens, sizeof(int32_t) * bs_) == 0)
      return it->second;
  }
  return -1;
}

int32_t PrefixIndex::slot_of(int32_t block) const {
  if (dense_) {
    if (block < 0 || static_cast<size_t>(block) >= dense_slot_.size()) return -1;
    return dense_slot_[static_cast<size_t>(block)];
  }
  auto it = sparse_slot_.find(block);
  return it == sparse_slot_.end() ? -1 : it->second;
}

void PrefixIndex::map_block(int32_t block, int32_t slot) {
  if (dense_)
    dense_slot_[static_cast<size_t>(block)] = slot;
  else
    sparse_slot_[block] = slot;
}

void PrefixIndex::unmap_block(int32_t block) {
  if (dense_)
    dense_slot_[static_cast<size_t>(block)] = -1;
  else
    sparse_slot_.erase(block);
}

void PrefixIndex::touch_slot(int32_t slot) {
  Node& n = nodes_[static_cast<size_t>(slot)];
  if (n.last_used == clock_) return;
  if (evictable_leaf(n)) {
    leaves_.erase({n.last_used, n.block});
    leaves_.insert({clock_, n.block});
  }
  n.last_used = clock_;
}

int32_t PrefixIndex::new_node(int32_t parent_slot, const int32_t* tokens, int32_t block) {
  int32_t slot;
  if (!spare_slots_.empty()) {
    slot = spare_slots_.back();
    spare_slots_.pop_back();
  } else {
    slot = static_cast<int32_t>(nodes_.size());
    nodes_.emplace_back();
    tokens_.resize(tokens_.size() + static_cast<size_t>(bs_));
  }
  Node& n = nodes_[static_cast<size_t>(slot)];
  n = Node();
  n.block = block;
  n.parent = parent_slot;
  n.last_used = clock_;
  n.hash = hash(parent_slot, tokens);
  std::memcpy(&tokens_[static_cast<size_t>(slot) * bs_], tokens, sizeof(int32_t) * bs_);
  children_.emplace(n.hash, slot);
  map_block(block, slot);
  leaves_.insert({n.last_used, block});
  if (parent_slot >= 0) {
    Node& p = nodes_[static_cast<size_t>(parent_slot)];
    if (evictable_leaf(p)) leaves_.erase({p.last_used, p.block});
    ++p.children;
  }
  ++num_nodes_;
  return slot;
}

void PrefixIndex::remove_leaf(int32_t slot) {
  Node& n = nodes_[static_cast<size_t>(slot)];
  leaves_.erase({n.last_used, n.block});
  auto range = children_.equal_range(n.hash);
  for (auto it = range.first; it != range.second; ++it)
    if (it->second == slot) {
      children_.erase(it);
      break;
    }
  unmap_block(n.block);
  if (n.parent >= 0) {
    Node& p = nodes_[static_cast<size_t>(n.parent)];
    --p.children;
    if (evictable_leaf(p)) leaves_.insert({p.last_used, p.block});
  }
  n = Node();
  spare_slots_.push_back(slot);
  --num_nodes_;
}

void PrefixIndex::set_lock(int32_t slot, int32_t lock) {
  Node& n = nodes_[static_cast<size_t>(slot)];
  const bool was_pinned = pinned(n);
  if (n.children == 0) {
    if (n.lock == 0 && lock > 0) leaves_.erase({n.last_used, n.block});
    if (n.lock > 0 && lock == 0) leaves_.insert({n.last_used, n.block});
  }
  num_locked_ += (lock > 0) - (n.lock > 0);
  n.lock = lock;
  if (pinned(n) == was_pinned) return;
  // The subtree's pinned state flipped: tell the ancestors, until one does not change.
  const int delta = was_pinned ? -1 : 1;
  num_pinned_ += delta;
  for (int32_t p = n.parent; p >= 0;) {
    Node& a = nodes_[static_cast<size_t>(p)];
    const bool before = pinned(a);
    a.locked_children += delta;
    if (pinned(a) == before) break;
    num_pinned_ += delta;
    p = a.parent;
  }
}

std::vector<int32_t> PrefixIndex::parse_tokens(const NumView& tokens) const {
  return to_ints_as<int32_t>(tokens, "tokens", 0, kInt32Max);
}

// Parses block ids that must all be in the index (std::invalid_argument otherwise).
std::vector<int32_t> PrefixIndex::indexed_ids(const NumView& block_ids, std::vector<int32_t>* slots) const {
  std::vector<int32_t> ids = to_ints_as<int32_t>(block_ids, "block_ids", kInt32Min, kInt32Max);
  if (slots) slots->resize(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t s = slot_of(ids[i]);
    if (s < 0) throw std::invalid_argument(detail::at("block_ids", i, ids[i]) + " is not in the prefix index");
    if (slots) (*slots)[i] = s;
  }
  return ids;
}

// ---------------------------------------------------------------------------- primitives

std::vector<int32_t> PrefixIndex::find_path(const int32_t* tokens, int64_t max_blocks) const {
  std::vector<int32_t> out;
  int32_t cur = -1;
  for (int64_t i = 0; i < max_blocks; ++i) {
    cur = find_child(cur, tokens + i * bs_);
    if (cur < 0) break;
    out.push_back(nodes_[static_cast<size_t>(cur)].block);
  }
  return out;
}

void PrefixIndex::touch(const std::vector<int32_t>& blocks) {
  for (int32_t b : blocks) touch_slot(slot_of(b));
}

bool PrefixIndex::has_child(int32_t parent_block, const int32_t* tokens) const {
  return find_child(parent_block < 0 ? -1 : slot_of(parent_block), tokens) >= 0;
}

void PrefixIndex::add_child(int32_t parent_block, const int32_t* tokens, int32_t block) {
  new_node(parent_block < 0 ? -1 : slot_of(parent_block), tokens, block);
}

void PrefixIndex::add_lock(int32_t block, int32_t delta) {
  const int32_t s = slot_of(block);
  set_lock(s, nodes_[static_cast<size_t>(s)].lock + delta);
}

int32_t PrefixIndex::lock_of(int32_t block) const {
  const int32_t s = slot_of(block);
  return s < 0 ? -1 : nodes_[static_cast<size_t>(s)].lock;
}

int32_t PrefixIndex::evict_one() {
  if (leaves_.empty()) return -1;
  const int32_t block = leaves_.begin()->second;
  remove_leaf(slot_of(block));
  return block;
}

const int32_t* PrefixIndex::tokens_of(int32_t block) const {
  const int32_t s = slot_of(block);
  return s < 0 ? nullptr : &tokens_[static_cast<size_t>(s) * bs_];
}

// ---------------------------------------------------------------------------- the Python API

PrefixIndex::Match PrefixIndex::match(const NumView& tokens) {
  const std::vector<int32_t> t = parse_tokens(tokens);
  tick();
  Match m;
  m.blocks = find_path(t.data(), static_cast<int64_t>(t.size()) / bs_);
  touch(m.blocks);
  m.tokens = static_cast<int64_t>(m.blocks.size()) * bs_;
  return m;
}

int64_t PrefixIndex::insert(const NumView& tokens, const NumView& block_ids) {
  const std::vector<int32_t> t = parse_tokens(tokens);
  const std::vector<int32_t> ids = to_ints_as<int32_t>(block_ids, "block_ids", 0, kInt32Max);
  const size_t nb = t.size() / static_cast<size_t>(bs_);
  if (ids.size() != nb)
    throw std::invalid_argument("block_ids must have length len(tokens) // block_size = " + std::to_string(nb) +
                                ", got " + std::to_string(ids.size()));
  const std::vector<int32_t> path = find_path(t.data(), static_cast<int64_t>(nb));
  const size_t first_new = path.size();
  std::vector<int32_t> fresh(ids.begin() + static_cast<std::ptrdiff_t>(first_new), ids.end());
  for (size_t i = first_new; i < nb; ++i)
    if (slot_of(ids[i]) >= 0)
      throw std::invalid_argument(detail::at("block_ids", i, ids[i]) + " is already in the prefix index");
  for (const detail::Count& c : detail::count_repeats(fresh))
    if (c.count > 1)
      throw std::invalid_argument(detail::at("block_ids", first_new + c.first, c.value) +
                                  " appears more than once among the new blocks");
  tick();
  touch(path);
  int32_t parent = path.empty() ? -1 : slot_of(path.back());
  for (size_t i = first_new; i < nb; ++i) parent = new_node(parent, t.data() + i * bs_, ids[i]);
  return static_cast<int64_t>(nb - first_new);
}

void PrefixIndex::lock(const NumView& block_ids) {
  std::vector<int32_t> slots;
  const std::vector<int32_t> ids = indexed_ids(block_ids, &slots);
  for (const detail::Count& c : detail::count_repeats(ids))
    if (lock_of(c.value) + c.count > kInt32Max)
      throw std::overflow_error(detail::at("block_ids", c.first, c.value) + ": the lock count would exceed 2^31 - 1");
  for (int32_t s : slots) set_lock(s, nodes_[static_cast<size_t>(s)].lock + 1);
}

void PrefixIndex::unlock(const NumView& block_ids) {
  std::vector<int32_t> slots;
  const std::vector<int32_t> ids = indexed_ids(block_ids, &slots);
  for (const detail::Count& c : detail::count_repeats(ids))
    if (c.count > lock_of(c.value))
      throw std::invalid_argument(detail::at("block_ids", c.first, c.value) + " is unlocked " +
                                  std::to_string(c.count) + " times but its lock count is " +
                                  std::to_string(lock_of(c.value)));
  for (int32_t s : slots) set_lock(s, nodes_[static_cast<size_t>(s)].lock - 1);
}

std::vector<int32_t> PrefixIndex::lock_counts(const NumView& block_ids) const {
  std::vector<int32_t> slots;
  indexed_ids(block_ids, &slots);
  for (auto& s : slots) s = nodes_[static_cast<size_t>(s)].lock;
  return slots;
}

std::vector<int32_t> PrefixIndex::evict(int64_t n) {
  if (n < 0) throw std::invalid_argument("n = " + std::to_string(n) + " must be >= 0");
  std::vector<int32_t> out;
  while (static_cast<int64_t>(out.size()) < n) {
    const int32_t b = evict_one();
    if (b < 0) break;
    out.push_back(b);
  }
  return out;
}

bool PrefixIndex::contains(int64_t block_id) const {
  if (block_id < kInt32Min || block_id > kInt32Max) return false;
  return slot_of(static_cast<int32_t>(block_id)) >= 0;
}

// ---------------------------------------------------------------------------- self-check

void PrefixIndex::check_invariants() const {
  auto fail = [](const std::string& what) { throw std::logic_error("PrefixIndex invariant: " + what); };
  std::vector<uint8_t> live(nodes_.size(), 1);
  for (int32_t s : spare_slots_) live[static_cast<size_t>(s)] = 0;
  std::vector<int32_t> children(nodes_.size(), 0);
  int64_t count = 0, locked = 0;
  for (size_t s = 0; s < nodes_.size(); ++s) {
    if (!live[s]) continue;
    const Node& n = nodes_[s];
    ++count;
    locked += n.lock > 0;
    if (n.lock < 0) fail("negative lock");
    if (slot_of(n.block) != static_cast<int32_t>(s)) fail("block map");
    if (n.parent >= 0) {
      if (!live[static_cast<size_t>(n.parent)]) fail("dead parent");
      ++children[static_cast<size_t>(n.parent)];
    }
    if (n.hash != hash(n.parent, &tokens_[s * bs_])) fail("hash");
    if (find_child(n.parent, &tokens_[s * bs_]) != static_cast<int32_t>(s)) fail("child lookup / duplicate key");
    if (n.last_used > clock_) fail("last_used in the future");
  }
  if (count != num_nodes_) fail("num_nodes");
  if (locked != num_locked_) fail("num_locked");
  if (static_cast<int64_t>(children_.size()) != count) fail("children map size");
  if (!dense_ && static_cast<int64_t>(sparse_slot_.size()) != count) fail("block map size");
  // Pinned (subtree holds a lock) bottom-up: process nodes deepest first.
  std::vector<int32_t> depth(nodes_.size(), 0), order;
  for (size_t s = 0; s < nodes_.size(); ++s) {
    if (!live[s]) continue;
    int32_t d = 0;
    for (int32_t p = nodes_[s].parent; p >= 0; p = nodes_[static_cast<size_t>(p)].parent) ++d;
    depth[s] = d;
    order.push_back(static_cast<int32_t>(s));
  }
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return depth[static_cast<size_t>(a)] > depth[static_cast<size_t>(b)]; });
  std::vector<int32_t> locked_children(nodes_.size(), 0);
  int64_t pinned_count = 0;
  size_t leaves = 0;
  for (int32_t s : order) {
    const Node& n = nodes_[static_cast<size_t>(s)];
    if (children[static_cast<size_t>(s)] != n.children) fail("children count");
    if (locked_children[static_cast<size_t>(s)] != n.locked_children) fail("locked_children");
    const bool pin = n.lock > 0 || n.locked_children > 0;
    pinned_count += pin;
    if (pin && n.parent >= 0) ++locked_children[static_cast<size_t>(n.parent)];
    if (evictable_leaf(n)) {
      ++leaves;
      if (!leaves_.count({n.last_used, n.block})) fail("evictable leaf missing from the LRU set");
    }
  }
  if (leaves != leaves_.size()) fail("LRU set size");
  if (pinned_count != num_pinned_) fail("num_pinned");
}

}  // namespace ponder::kv
