// The prefix index. See prefix_index.h; the semantics are python/ponder/twins/kv.py.
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

// The 128-bit product of a and b, folded to 64 bits (the wyhash mixing step).
inline uint64_t mum(uint64_t a, uint64_t b) {
  __extension__ using u128 = unsigned __int128;
  const u128 p = static_cast<u128>(a) * b;
  return static_cast<uint64_t>(p) ^ static_cast<uint64_t>(p >> 64);
}

inline uint64_t load64(const int32_t* p) {
  uint64_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

// The values of an int array, each checked to lie in [lo, hi], as int32: read in place when the
// array already is a contiguous int32 array with every value in range (the common case: no
// copy, no allocation), else converted into buf by to_ints_as, which raises the errors.
const int32_t* int32s(const NumView& v, const char* name, int64_t lo, int64_t hi, std::vector<int32_t>& buf) {
  if (v.ndim == 1 && v.dtype == DType::I32 && v.stride == static_cast<int64_t>(sizeof(int32_t)) && v.size > 0 &&
      reinterpret_cast<uintptr_t>(v.data) % alignof(int32_t) == 0) {
    const int32_t* p = reinterpret_cast<const int32_t*>(v.data);
    int32_t mn = p[0], mx = p[0];
    for (int64_t i = 1; i < v.size; ++i) {  // branch-free: vectorizes
      mn = std::min(mn, p[i]);
      mx = std::max(mx, p[i]);
    }
    if (mn >= lo && mx <= hi) return p;
  }
  buf = to_ints_as<int32_t>(v, name, lo, hi);
  return buf.data();
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

// Hashes 4 tokens per 128-bit multiply; the multiplies are independent (summed, each keyed by
// its position), so a block of 16 tokens costs a few cycles instead of a 16-step serial chain.
uint64_t PrefixIndex::hash(int32_t parent_slot, const int32_t* tokens) const {
  constexpr uint64_t kA = 0xa0761d6478bd642fULL, kB = 0xe7037ed1a0b428dbULL, kStep = 0x8ebc6af09c88c6e3ULL;
  uint64_t acc = 0, ka = kA, kb = kB;
  int32_t i = 0;
  for (; i + 4 <= bs_; i += 4, ka += kStep, kb += kStep)
    acc += mum(load64(tokens + i) ^ ka, load64(tokens + i + 2) ^ kb);
  if (i < bs_) {  // the last 1-3 tokens, zero-padded (every block of this index has bs_ tokens)
    int32_t rest[4] = {0, 0, 0, 0};
    std::memcpy(rest, tokens + i, sizeof(int32_t) * static_cast<size_t>(bs_ - i));
    acc += mum(load64(rest) ^ ka, load64(rest + 2) ^ kb);
  }
  return mix64(acc ^ mum(static_cast<uint64_t>(static_cast<int64_t>(parent_slot) + 2) ^ kA, kB));
}

int32_t PrefixIndex::find_child(int32_t parent_slot, const int32_t* tokens) const {
  if (table_.empty()) return -1;
  const uint64_t h = hash(parent_slot, tokens);
  const size_t mask = table_.size() - 1;
  for (size_t i = static_cast<size_t>(h) & mask;; i = (i + 1) & mask) {
    const Bucket& e = table_[i];
    if (e.slot < 0) return -1;
    if (e.hash == h && nodes_[static_cast<size_t>(e.slot)].parent == parent_slot &&
        std::memcmp(&tokens_[static_cast<size_t>(e.slot) * bs_], tokens, sizeof(int32_t) * bs_) == 0)
      return e.slot;
  }
}

void PrefixIndex::table_insert(uint64_t h, int32_t slot) {
  // Keep the load at most 1/2 (short probes); the table only grows.
  if (static_cast<size_t>(num_nodes_ + 1) * 2 > table_.size()) {
    std::vector<Bucket> old(std::max<size_t>(16, table_.size() * 2));
    old.swap(table_);
    for (const Bucket& e : old)
      if (e.slot >= 0) table_insert(e.hash, e.slot);
  }
  const size_t mask = table_.size() - 1;
  size_t i = static_cast<size_t>(h) & mask;
  while (table_[i].slot >= 0) i = (i + 1) & mask;
  table_[i] = Bucket{h, slot};
}

void PrefixIndex::table_erase(uint64_t h, int32_t slot) {
  const size_t mask = table_.size() - 1;
  size_t i = static_cast<size_t>(h) & mask;
  while (table_[i].slot != slot) i = (i + 1) & mask;
  // Backward-shift deletion: move later entries of the probe run into the hole unless their
  // home bucket lies cyclically in (hole, their position], where the hole would hide them.
  for (size_t j = (i + 1) & mask; table_[j].slot >= 0; j = (j + 1) & mask) {
    const size_t home = static_cast<size_t>(table_[j].hash) & mask;
    const bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
    if (stays) continue;
    table_[i] = table_[j];
    i = j;
  }
  table_[i] = Bucket{};
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

// The LRU set changes on most calls (the touched leaf moves to the back; a new leaf replaces
// its parent); a spare node handle lets these moves reuse one set node instead of freeing and
// allocating one each time.
void PrefixIndex::leaf_add(int64_t last_used, int32_t block) {
  if (spare_leaf_.empty()) {
    leaves_.insert({last_used, block});
    return;
  }
  spare_leaf_.value() = {last_used, block};
  spare_leaf_ = std::move(leaves_.insert(std::move(spare_leaf_)).node);  // empty once inserted
}

void PrefixIndex::leaf_remove(int64_t last_used, int32_t block) {
  auto nh = leaves_.extract({last_used, block});
  if (spare_leaf_.empty()) spare_leaf_ = std::move(nh);
}

void PrefixIndex::touch_slot(int32_t slot) {
  Node& n = nodes_[static_cast<size_t>(slot)];
  if (n.last_used == clock_) return;
  if (evictable_leaf(n)) {
    leaf_remove(n.last_used, n.block);
    leaf_add(clock_, n.block);
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
  table_insert(n.hash, slot);
  map_block(block, slot);
  if (parent_slot >= 0) {
    Node& p = nodes_[static_cast<size_t>(parent_slot)];
    if (evictable_leaf(p)) leaf_remove(p.last_used, p.block);
    ++p.children;
  }
  leaf_add(clock_, block);
  ++num_nodes_;
  return slot;
}

void PrefixIndex::remove_leaf(int32_t slot) {
  Node& n = nodes_[static_cast<size_t>(slot)];
  leaf_remove(n.last_used, n.block);
  table_erase(n.hash, slot);
  unmap_block(n.block);
  if (n.parent >= 0) {
    Node& p = nodes_[static_cast<size_t>(n.parent)];
    --p.children;
    if (evictable_leaf(p)) leaf_add(p.last_used, p.block);
  }
  n = Node();
  spare_slots_.push_back(slot);
  --num_nodes_;
  ++removals_;  // the slot may be reused: walk_ can no longer be trusted
}

void PrefixIndex::set_lock(int32_t slot, int32_t lock) {
  Node& n = nodes_[static_cast<size_t>(slot)];
  const bool was_pinned = pinned(n);
  if (n.children == 0) {
    if (n.lock == 0 && lock > 0) leaf_remove(n.last_used, n.block);
    if (n.lock > 0 && lock == 0) leaf_add(n.last_used, n.block);
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

void PrefixIndex::walk(const int32_t* tokens, int64_t max_blocks) {
  // The nodes along walk_ that hold the same tokens are the start of this walk too (a node is
  // the only child of its parent with its tokens), so only their tokens are compared.
  size_t k = 0;
  if (walk_removals_ == removals_) {
    const size_t n = std::min(walk_.size(), static_cast<size_t>(std::max<int64_t>(max_blocks, 0)));
    while (k < n && std::memcmp(&tokens_[static_cast<size_t>(walk_[k]) * bs_], tokens + k * bs_,
                                sizeof(int32_t) * bs_) == 0)
      ++k;
  }
  walk_.resize(k);
  walk_removals_ = removals_;
  for (int32_t cur = k ? walk_.back() : -1; static_cast<int64_t>(walk_.size()) < max_blocks;) {
    cur = find_child(cur, tokens + walk_.size() * bs_);
    if (cur < 0) break;
    walk_.push_back(cur);
  }
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
  const int32_t* t = int32s(tokens, "tokens", 0, kInt32Max, token_buf_);
  tick();
  walk(t, tokens.size / bs_);
  Match m;
  m.blocks.resize(walk_.size());
  for (size_t i = 0; i < walk_.size(); ++i) {
    touch_slot(walk_[i]);
    m.blocks[i] = nodes_[static_cast<size_t>(walk_[i])].block;
  }
  m.tokens = static_cast<int64_t>(m.blocks.size()) * bs_;
  return m;
}

int64_t PrefixIndex::insert(const NumView& tokens, const NumView& block_ids) {
  const int32_t* t = int32s(tokens, "tokens", 0, kInt32Max, token_buf_);
  const int32_t* ids = int32s(block_ids, "block_ids", 0, kInt32Max, id_buf_);
  const size_t nb = static_cast<size_t>(tokens.size / bs_);
  if (static_cast<size_t>(block_ids.size) != nb)
    throw std::invalid_argument("block_ids must have length len(tokens) // block_size = " + std::to_string(nb) +
                                ", got " + std::to_string(block_ids.size));
  walk(t, static_cast<int64_t>(nb));
  const size_t first_new = walk_.size();
  for (size_t i = first_new; i < nb; ++i)
    if (slot_of(ids[i]) >= 0)
      throw std::invalid_argument(detail::at("block_ids", i, ids[i]) + " is already in the prefix index");
  if (nb - first_new > 1) {  // usually 0 or 1 new blocks: nothing can repeat
    const std::vector<int32_t> fresh(ids + first_new, ids + nb);
    for (const detail::Count& c : detail::count_repeats(fresh))
      if (c.count > 1)
        throw std::invalid_argument(detail::at("block_ids", first_new + c.first, c.value) +
                                    " appears more than once among the new blocks");
  }
  tick();
  for (int32_t s : walk_) touch_slot(s);
  int32_t parent = first_new ? walk_.back() : -1;
  for (size_t i = first_new; i < nb; ++i) {
    parent = new_node(parent, t + i * bs_, ids[i]);
    walk_.push_back(parent);  // walk_ stays the path of these tokens for the next walk
  }
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
  int64_t buckets = 0;
  for (const Bucket& e : table_) buckets += e.slot >= 0;
  if (buckets != count) fail("children table size");
  if (walk_removals_ == removals_)
    for (size_t i = 0; i < walk_.size(); ++i)
      if (!live[static_cast<size_t>(walk_[i])] ||
          nodes_[static_cast<size_t>(walk_[i])].parent != (i ? walk_[i - 1] : -1))
        fail("cached walk is not a root path");
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
